//! How does Envoy reach tollgate? The proxy-wasm entry point and context
//! registrations: each callback is one line into [`super::contexts`] with
//! [`Envoy`] as the host.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use super::abi::Envoy;
use super::contexts;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root(contexts::Root::default())) });
}}

fn action(a: super::Action) -> Action {
    match a {
        super::Action::Continue => Action::Continue,
        super::Action::Pause => Action::Pause,
    }
}

struct Root(contexts::Root);

impl Context for Root {
    fn on_done(&mut self) -> bool {
        self.0.on_done(&mut Envoy)
    }

    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        self.0.on_http_call_response(&mut Envoy, token_id, body_size);
    }

    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        if self.0.on_grpc_call_response(&mut Envoy, token_id, status_code, response_size) {
            self.done();
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.0.on_configure(&mut Envoy)
    }

    fn on_tick(&mut self) {
        self.0.on_tick(&mut Envoy);
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http(self.0.new_http()?)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http(contexts::Http);

impl Context for Http {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        self.0.on_grpc_call_response(&mut Envoy, token_id, status_code, response_size);
    }

    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        self.0.on_http_call_response(&mut Envoy, token_id, body_size);
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(self.0.on_request_headers(&mut Envoy, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.0.on_request_body(&mut Envoy, body_size, end_of_stream))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(self.0.on_response_headers(&mut Envoy, end_of_stream))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.0.on_response_body(&mut Envoy, body_size, end_of_stream))
    }

    fn on_log(&mut self) {
        self.0.on_log(&mut Envoy);
    }
}
