//! The only code that talks to the proxy-wasm host.
//!
//! Every callback reads what the host offers, hands it to the host-free core
//! ([`crate::flow`]) and carries out the answer. Host calls go through
//! `proxy_wasm::hostcalls`, which return `Result`, never through the SDK's
//! convenience methods, which panic on any unexpected status: a panic would
//! take down this worker's VM.

use std::cell::Cell;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};

use crate::api::LocalReply;
use crate::config::{self, Plugin};
use crate::flow::{BodyStep, HeadersStep, RequestFlow};
use crate::plan::HeaderPlan;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    plugin: Option<Rc<Plugin>>,
    request_counter: Rc<Cell<u64>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => Vec::new(),
            Err(status) => {
                log::error!("tollgate: cannot read the plugin configuration: {status:?}");
                return false;
            }
        };
        match config::load(&raw, &|name| std::env::var(name).ok()) {
            Ok(plugin) => {
                log::info!(
                    "tollgate: configuration accepted: {} tenants, {} routes, {} providers",
                    plugin.tenants.len(),
                    plugin.routes.len(),
                    plugin.providers.len()
                );
                self.plugin = Some(Rc::new(plugin));
                true
            }
            Err(e) => {
                log::error!("tollgate: configuration refused: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let plugin = self.plugin.as_ref()?;
        Some(Box::new(Http {
            flow: RequestFlow::new(Rc::clone(plugin)),
            counter: Rc::clone(&self.request_counter),
            bypass: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    flow: RequestFlow,
    counter: Rc<Cell<u64>>,
    /// Set for unmatched paths passed through untouched.
    bypass: bool,
}

impl Context for Http {}

fn now_nanos() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64)
}

fn apply_plan(plan: &HeaderPlan) {
    for name in &plan.remove {
        if let Err(s) = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name) {
            log::warn!("tollgate: removing header {name} failed: {s:?}");
        }
    }
    for (name, value) in &plan.set {
        if let Err(s) = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value)) {
            log::warn!("tollgate: setting header {name} failed: {s:?}");
        }
    }
}

fn clear_route_cache() {
    if let Err(s) = hostcalls::call_foreign_function("clear_route_cache", None) {
        log::warn!("tollgate: clear_route_cache failed: {s:?}");
    }
}

fn send_reply(reply: &LocalReply) {
    let headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    if let Err(s) = hostcalls::send_http_response(u32::from(reply.status), headers, Some(&reply.body)) {
        log::error!("tollgate: sending a local reply failed: {s:?}");
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let headers = match hostcalls::get_map(MapType::HttpRequestHeaders) {
            Ok(h) => h,
            Err(s) => {
                log::error!("tollgate: cannot read request headers: {s:?}");
                Vec::new()
            }
        };
        let counter = Rc::clone(&self.counter);
        let step = self.flow.on_request_headers(&headers, end_of_stream, || {
            let n = counter.get().wrapping_add(1);
            counter.set(n);
            format!("tg-{:016x}{:08x}", now_nanos(), n as u32)
        });
        match step {
            HeadersStep::Reply(reply) => {
                send_reply(&reply);
                Action::Pause
            }
            HeadersStep::PassThrough => {
                self.bypass = true;
                Action::Continue
            }
            HeadersStep::ReadBody(plan) => {
                apply_plan(&plan);
                clear_route_cache();
                Action::Pause
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.bypass {
            return Action::Continue;
        }
        let step = match self.flow.on_request_body_size(body_size as u64, end_of_stream) {
            Some(step) => step,
            None => {
                let body = match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
                    Ok(b) => b.unwrap_or_default(),
                    Err(s) => {
                        log::error!("tollgate: cannot read the request body: {s:?}");
                        Vec::new()
                    }
                };
                self.flow.on_request_body(&body)
            }
        };
        match step {
            BodyStep::NeedMore => Action::Pause,
            BodyStep::Reply(reply) => {
                send_reply(&reply);
                Action::Pause
            }
            BodyStep::Forward(new_body) => {
                if let Some(body) = new_body {
                    if let Err(s) = hostcalls::set_buffer(BufferType::HttpRequestBody, 0, body_size, &body) {
                        log::error!("tollgate: replacing the request body failed: {s:?}");
                    }
                }
                Action::Continue
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.bypass || self.flow.request_id.is_empty() {
            return Action::Continue;
        }
        let name = self.flow.plugin().request_id_header.clone();
        if let Err(s) =
            hostcalls::set_map_value(MapType::HttpResponseHeaders, &name, Some(&self.flow.request_id))
        {
            log::warn!("tollgate: echoing the request id failed: {s:?}");
        }
        Action::Continue
    }
}
