//! The only code that talks to the proxy-wasm host.
//!
//! Every callback reads what the host offers, hands it to the host-free core
//! ([`crate::request::flow`]) and carries out the answer. Host calls go through
//! `proxy_wasm::hostcalls`, which return `Result`, never through the SDK's
//! convenience methods, which panic on any unexpected status: a panic would
//! take down this worker's VM.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use hashbrown::HashMap;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};

use crate::llm::LocalReply;
use crate::config::{self, Plugin};
use crate::request::effect::{BodyOut, BodyStep, Finish, HeadersStep, RlsCall};
use crate::request::flow::RequestFlow;
use crate::worker::Worker;
use crate::admission::inflight::{self, SlotStore, StoreError};
use crate::ratelimit::outbox::Answer;
use crate::metering::tap::ChunkEdit;
use crate::request::header_plan::HeaderPlan;
use crate::rls;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// How often the root context sends queued settles. Short, so each tick sends
/// a small batch (a long tick makes a burst that stalls this worker's requests).
const TICK: Duration = Duration::from_millis(50);
/// How long a removed plugin keeps sending the settles that follow from
/// answers (see `Root::on_done`).
const DRAIN_MS: u64 = 5_000;
/// Settles in flight at once per worker. Must exceed (requests/s per worker x
/// settle round trip) or the journal backs up; it bounds memory, not rate.
const MAX_SETTLES_IN_FLIGHT: usize = 4096;

/// Metric ids by name, defined on first use. Counter increments are summed
/// here and handed to Envoy once per tick (`flush`): a request's five or so
/// increments cost no host call of their own, and Envoy sees them at most
/// one tick (50 ms) later. Histogram values are recorded as they come.
#[derive(Default)]
struct Metrics {
    ids: HashMap<String, u32>,
    /// Counter increments not yet handed to Envoy, by metric id.
    pending: HashMap<u32, u64>,
}

impl Metrics {
    fn id(&mut self, kind: MetricType, name: &str) -> Option<u32> {
        if let Some(id) = self.ids.get(name) {
            return Some(*id);
        }
        match hostcalls::define_metric(kind, name) {
            Ok(id) => {
                self.ids.insert(name.to_string(), id);
                Some(id)
            }
            Err(s) => {
                log::warn!("tollgate: defining metric {name} failed: {s:?}");
                None
            }
        }
    }

    fn count(&mut self, name: &str, by: u64) {
        if by == 0 {
            return;
        }
        if let Some(id) = self.id(MetricType::Counter, name) {
            let n = self.pending.entry(id).or_insert(0);
            *n = n.saturating_add(by);
        }
    }

    /// Hands the summed counter increments to Envoy.
    fn flush(&mut self) {
        for (id, by) in self.pending.drain() {
            let _ = hostcalls::increment_metric(id, i64::try_from(by).unwrap_or(i64::MAX));
        }
    }

    fn record(&mut self, name: &str, value: u64) {
        if let Some(id) = self.id(MetricType::Histogram, name) {
            let _ = hostcalls::record_metric(id, value);
        }
    }
}

/// Envoy's shared data: one table per `vm_id` for the whole process, so the
/// in-flight cap counts every worker (see [`crate::admission::inflight`]).
struct EnvoySharedData;

impl SlotStore for EnvoySharedData {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        hostcalls::get_shared_data(key).map_err(|_| StoreError::Unavailable)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(_) => Err(StoreError::Unavailable),
        }
    }
}

/// Log at the level the host logs wasm code at (Envoy's `wasm` component,
/// which `POST /logging?wasm=debug` changes at run time; read at configuration
/// and on each tick), so debug lines such as edge scanning's cost nothing
/// unless asked for.
fn follow_host_log_level() {
    if let Ok(level) = hostcalls::get_log_level() {
        proxy_wasm::set_log_level(level);
    }
}

/// A number no other VM of this Envoy process has: a counter in shared data,
/// incremented under compare-and-swap.
fn new_vm_id() -> u64 {
    const KEY: &str = "tollgate.vm_seq";
    for _ in 0..64 {
        let Ok((value, cas)) = hostcalls::get_shared_data(KEY) else { break };
        let current = value
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_le_bytes);
        let next = current.wrapping_add(1).max(1);
        match hostcalls::set_shared_data(KEY, Some(&next.to_le_bytes()), cas) {
            Ok(()) => return next,
            Err(Status::CasMismatch) => continue,
            Err(_) => break,
        }
    }
    // No shared data: the time is unique enough among a process's workers.
    now_ms() ^ 0x5eed_0000_0000_0000
}

/// The raw host call behind `hostcalls::get_map`. The SDK turns every name
/// and value into a `String` with `unwrap`, so one request header value that
/// is not UTF-8 (HTTP allows bytes 0x80-0xFF) would panic the VM; this reads
/// the pairs as bytes and [`crate::envoy::pairs::header_map`] decodes them.
mod raw {
    #[link(wasm_import_module = "env")]
    extern "C" {
        pub fn proxy_get_header_map_pairs(map_type: u32, return_data: *mut *mut u8, return_size: *mut usize) -> u32;
        pub fn proxy_set_header_map_pairs(map_type: u32, data: *const u8, size: usize) -> u32;
    }
}

/// All headers of `map` in the pairs encoding, as the host sent them.
fn get_header_bytes(map: MapType) -> Result<Vec<u8>, u32> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer it allocated through the SDK's
    // `proxy_on_memory_allocate` (a `Vec<u8>` of capacity `size`, leaked)
    // and its length; ownership passes to us, as in `hostcalls::get_map`.
    let status = unsafe { raw::proxy_get_header_map_pairs(map as u32, &mut data, &mut size) };
    if status != 0 {
        return Err(status);
    }
    if data.is_null() || size == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: see above; the buffer is freed when the Vec drops.
    Ok(unsafe { Vec::from_raw_parts(data, size, size) })
}

/// Replaces every header of `map` with `pairs` in one host call.
fn set_header_bytes(map: MapType, pairs: &[(Vec<u8>, Vec<u8>)]) {
    let bytes = crate::envoy::pairs::encode(pairs);
    // SAFETY: the host only reads `bytes` during the call.
    let status = unsafe { raw::proxy_set_header_map_pairs(map as u32, bytes.as_ptr(), bytes.len()) };
    if status != 0 {
        log::warn!("tollgate: rewriting the {map:?} failed (status {status})");
    }
}

/// The response headers as Envoy holds them, and tollgate's headers for
/// them, written together (`write`) in one host call: once at once for a
/// passed-through response, or once its body is complete for a held one.
struct ResponseHeaders {
    raw: Vec<u8>,
    /// `:status`, read once with the headers (0 when absent or unreadable).
    status: u16,
    set: Vec<(String, String)>,
}

impl ResponseHeaders {
    fn read() -> Self {
        let raw = get_header_bytes(MapType::HttpResponseHeaders).unwrap_or_else(|s| {
            log::error!("tollgate: cannot read response headers (status {s})");
            Vec::new()
        });
        let status = crate::envoy::pairs::decode(&raw)
            .and_then(|p| p.into_iter().find(|(k, _)| *k == b":status"))
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
            .unwrap_or(0);
        ResponseHeaders { raw, status, set: Vec::new() }
    }

    fn write(self) {
        if self.set.is_empty() {
            return;
        }
        match crate::envoy::pairs::decode(&self.raw) {
            Some(map) if !map.is_empty() => {
                set_header_bytes(MapType::HttpResponseHeaders, &crate::envoy::pairs::with_headers_set(&map, &self.set));
            }
            // Not readable: one call per header, as a fallback.
            _ => set_headers(MapType::HttpResponseHeaders, &self.set),
        }
    }
}

fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Default)]
struct Root {
    plugin: Option<Rc<Plugin>>,
    shared: Option<Rc<RefCell<Worker>>>,
    metrics: Rc<RefCell<Metrics>>,
    dropped_reported: u64,
    /// JWKS fetches in flight: call token -> provider index.
    jwks_calls: HashMap<u32, usize>,
    /// The plugin is being removed (`on_done`): settles are sent until this
    /// time (ms), then the context reports itself done.
    draining_until: Option<u64>,
}

impl Root {
    /// Sends the settles that are due (all queued ones with `force`), at
    /// most `MAX_SETTLES_IN_FLIGHT` at a time, and reports newly dropped ones.
    fn send_settles(&mut self, now: u64, force: bool) {
        let (Some(plugin), Some(shared)) = (&self.plugin, &self.shared) else { return };
        let Some(rl) = &plugin.rate_limit else { return };
        let due = {
            let mut s = shared.borrow_mut();
            s.queue_settle_nets();
            let room = MAX_SETTLES_IN_FLIGHT.saturating_sub(s.journal.in_flight());
            crate::ratelimit::outbox::merge(s.journal.due(if force { u64::MAX } else { now }, room))
        };
        for entry in due {
            let meta = entry.metadata();
            let meta_ref: Vec<(&str, &[u8])> = meta.iter().map(|(k, v)| (k.as_str(), v.as_bytes())).collect();
            let result = hostcalls::dispatch_grpc_call(
                &rl.cluster,
                rls::SERVICE,
                rls::METHOD,
                meta_ref,
                Some(&entry.message),
                Duration::from_millis(rl.timeout_ms.max(1000)),
            );
            let mut s = shared.borrow_mut();
            match result {
                Ok(token) => s.journal.sent(token, entry),
                Err(status) => {
                    log::warn!("tollgate: cannot dispatch a settle: {status:?}");
                    s.journal.retry_later(entry, now);
                }
            }
        }
        self.report_dropped();
    }

    /// Counts the settles the journal dropped since the last report.
    fn report_dropped(&mut self) {
        let Some(shared) = &self.shared else { return };
        let dropped = shared.borrow().journal.dropped;
        if dropped > self.dropped_reported {
            self.metrics
                .borrow_mut()
                .count("tollgate.settle.dropped", dropped - self.dropped_reported);
            self.dropped_reported = dropped;
        }
    }

    /// While draining: whether the drain is over (no settle in flight).
    /// What is still queued then (settles whose call failed) is dropped and
    /// counted.
    fn drain_finished(&mut self) -> bool {
        let (Some(_), Some(shared)) = (self.draining_until, &self.shared) else { return false };
        let (in_flight, queued) = {
            let s = shared.borrow();
            (s.journal.in_flight(), s.journal.pending().saturating_sub(s.journal.in_flight()))
        };
        if in_flight > 0 {
            return false;
        }
        if queued > 0 {
            let lost = shared.borrow_mut().journal.drop_queued();
            log::warn!("tollgate: plugin removed with {lost} settles unsent (the rate-limit service did not answer)");
            self.report_dropped();
        }
        self.metrics.borrow_mut().flush();
        self.draining_until = None;
        true
    }

    fn refresh_jwks(&mut self) {
        let Some(plugin) = &self.plugin else { return };
        let Some(slot) = &plugin.jwt else { return };
        let Ok(mut verifier) = slot.0.try_borrow_mut() else { return };
        if !verifier.has_remote_jwks() {
            return;
        }
        let now_s = now_ms() / 1000;
        for fetch in verifier.plan_jwks_fetches(now_s) {
            let headers = vec![
                (":method", "GET"),
                (":path", fetch.path.as_str()),
                (":authority", fetch.authority.as_str()),
                ("accept", "application/json"),
            ];
            match hostcalls::dispatch_http_call(
                &fetch.cluster,
                headers,
                None,
                vec![],
                Duration::from_millis(fetch.timeout_ms.max(1)),
            ) {
                Ok(token) => {
                    self.jwks_calls.insert(token, fetch.provider_index);
                }
                Err(s) => {
                    log::warn!("tollgate: cannot fetch JWKS from cluster {}: {s:?}", fetch.cluster);
                    verifier.complete_jwks_fetch(fetch.provider_index, None, None, now_s);
                }
            }
        }
    }
}

impl Context for Root {
    /// The plugin is removed (a configuration push replaced it, or Envoy
    /// stops): unused lease quota is given back and every queued settle is
    /// sent at once, backoff or not, before the context is done. Envoy keeps
    /// the context while this returns false. Settles that follow from an
    /// answer (a replay's settle) are sent for up to `DRAIN_MS`; a settle
    /// whose call fails is not retried. The drain ends when no settle is in
    /// flight; whatever is left is counted as dropped.
    fn on_done(&mut self) -> bool {
        self.metrics.borrow_mut().flush();
        let (Some(plugin), Some(shared)) = (&self.plugin, &self.shared) else { return true };
        if plugin.rate_limit.is_none() {
            return true;
        }
        let now = now_ms();
        let leases = shared.borrow_mut().release_leases(plugin, now);
        let queued = shared.borrow().pending_settles();
        log::info!("tollgate: plugin removed: giving back {leases} quota leases, sending {queued} queued settles");
        self.draining_until = Some(now.saturating_add(DRAIN_MS));
        self.send_settles(now, true);
        self.drain_finished()
    }

    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        let Some(index) = self.jwks_calls.remove(&token_id) else { return };
        let Some(plugin) = &self.plugin else { return };
        let Some(slot) = &plugin.jwt else { return };
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| s.parse::<u32>().ok());
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size).ok().flatten();
        if let Ok(mut verifier) = slot.0.try_borrow_mut() {
            let outcome = verifier.complete_jwks_fetch(index, status, body.as_deref(), now_ms() / 1000);
            log::info!("tollgate: JWKS refresh for provider {index}: status {status:?}, {outcome:?}");
        }
    }

    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let Some(shared) = &self.shared else { return };
        let reply = (status_code == 0).then(|| match hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, response_size) {
            Ok(Some(bytes)) => <rls::RateLimitResponse as prost::Message>::decode(bytes.as_slice()).ok(),
            Ok(None) => Some(rls::RateLimitResponse::default()),
            Err(_) => None,
        });
        // INVALID_ARGUMENT will never succeed: drop it (counted) rather than
        // retry it until the journal overflows.
        let answer = match reply {
            _ if status_code == 3 => Answer::Rejected,
            Some(Some(r)) if r.overall_code == rls::Code::OverLimit as i32 => Answer::Refused,
            Some(Some(_)) => Answer::Applied,
            _ => Answer::Failed,
        };
        let mut m = self.metrics.borrow_mut();
        if shared.borrow_mut().journal.answered(token_id, answer, now_ms()) {
            let name = match answer {
                Answer::Rejected => {
                    log::error!("tollgate: the rate-limit service rejected a settle as invalid");
                    "tollgate.settle.rejected"
                }
                Answer::Applied | Answer::Refused => "tollgate.settle.ok",
                Answer::Failed => "tollgate.settle.retried",
            };
            m.count(name, 1);
        }
        drop(m);
        if let Some(until) = self.draining_until {
            let now = now_ms();
            if now < until {
                self.send_settles(now, false);
            }
            if self.drain_finished() {
                log::info!("tollgate: removed plugin drained");
                self.done();
            }
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        follow_host_log_level();
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
                let capacity = plugin.rate_limit.as_ref().map_or(1, |r| r.journal_capacity);
                let capped: Vec<&str> = plugin
                    .tenants
                    .iter()
                    .filter(|t| t.policy.max_concurrent_requests.is_some())
                    .map(|t| t.id.as_str())
                    .collect();
                for id in &capped {
                    if let Err(e) = inflight::create(&EnvoySharedData, &inflight::key(id)) {
                        log::warn!("tollgate: cannot create the in-flight table of tenant {id}: {e:?}");
                    }
                }
                // The tick also hands counters to Envoy: always on.
                if let Err(s) = hostcalls::set_tick_period(TICK) {
                    log::error!("tollgate: cannot set the tick period: {s:?}");
                    return false;
                }
                // A reconfiguration keeps the journal: queued settles survive.
                if self.shared.is_none() {
                    let mut shared = Worker::new(capacity);
                    shared.slots = Box::new(EnvoySharedData);
                    shared.vm_id = new_vm_id();
                    self.shared = Some(Rc::new(RefCell::new(shared)));
                }
                self.plugin = Some(Rc::new(plugin));
                true
            }
            Err(e) => {
                log::error!("tollgate: configuration refused: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        self.metrics.borrow_mut().flush();
        follow_host_log_level();
        self.refresh_jwks();
        let (Some(plugin), Some(shared)) = (&self.plugin, &self.shared) else { return };
        let now = now_ms();
        shared.borrow_mut().heartbeat(now);
        if plugin.rate_limit.is_none() {
            return;
        }
        shared.borrow_mut().expire_leases(plugin, now);
        self.send_settles(now, false);
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let plugin = self.plugin.as_ref()?;
        let shared = self.shared.as_ref()?;
        Some(Box::new(Http {
            flow: RequestFlow::new(Rc::clone(plugin), Rc::clone(shared)),
            shared: Rc::clone(shared),
            metrics: Rc::clone(&self.metrics),
            bypass: false,
            rls_token: None,
            rls_sent_ms: 0,
            hold_body: false,
            held_headers: None,
            body_started: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    flow: RequestFlow,
    shared: Rc<RefCell<Worker>>,
    metrics: Rc<RefCell<Metrics>>,
    /// Set for unmatched paths passed through untouched.
    bypass: bool,
    rls_token: Option<u32>,
    rls_sent_ms: u64,
    hold_body: bool,
    /// A held response's headers, with tollgate's, until its body is complete.
    held_headers: Option<ResponseHeaders>,
    /// A response body chunk has been seen (its time is the first byte's).
    body_started: bool,
}

/// Write a changed response chunk back with the host's buffer operations:
/// `set_buffer(0, n, data)` replaces the first `n` bytes with `data` (so
/// `n = 0` prepends), and a start at or past the end appends. Only the bytes
/// that change cross into the host: a released hold is prepended, a new hold
/// cuts the chunk's tail, a removed leading event is drained. `chunk` is the
/// whole chunk, or `None` when only a window of it was read and the edit
/// does not need its bytes ([`ChunkEdit::needs_chunk_bytes`]).
fn apply_body_out(chunk: Option<&[u8]>, body_size: usize, out: &BodyOut) {
    let set = |start: usize, len: usize, data: &[u8]| {
        if let Err(s) = hostcalls::set_buffer(BufferType::HttpResponseBody, start, len, data) {
            log::warn!("tollgate: rewriting a response chunk failed: {s:?}");
        }
    };
    let size = body_size;
    let mut len = size;
    match (&out.edit, chunk) {
        (ChunkEdit::Unchanged, _) => {}
        // The chunk could not be read: leave it be.
        (edit, Some(c)) if c.len() != size && edit.needs_chunk_bytes(size) => {}
        (edit, None) if edit.needs_chunk_bytes(size) => {}
        (ChunkEdit::Splice { prefix, from, to }, chunk) => {
            let (from, to) = ((*from).min(size), (*to).min(size));
            if to < size {
                let kept = chunk.and_then(|c| c.get(from..to)).unwrap_or(&[]);
                set(0, size, kept);
                len = to.saturating_sub(from);
            } else if from > 0 {
                set(0, from, &[]);
                len = size.saturating_sub(from);
            }
            if !prefix.is_empty() {
                set(0, 0, prefix);
                len = len.saturating_add(prefix.len());
            }
        }
        (ChunkEdit::Replace(bytes), _) => {
            set(0, size, bytes);
            len = bytes.len();
        }
        (edit @ ChunkEdit::Ranges { .. }, chunk) => {
            let bytes = edit.apply(chunk.unwrap_or(&[]));
            set(0, size, &bytes);
            len = bytes.len();
        }
    }
    if !out.append.is_empty() {
        set(len, 0, &out.append);
    }
}

/// Read `len` bytes of the response chunk from `from`.
fn read_response(from: usize, len: usize) -> Vec<u8> {
    match hostcalls::get_buffer(BufferType::HttpResponseBody, from, len) {
        Ok(b) => b.unwrap_or_default(),
        Err(s) => {
            log::warn!("tollgate: cannot read a response chunk: {s:?}");
            Vec::new()
        }
    }
}

/// Carries out the header plan over the request headers as read (`raw`,
/// the pairs encoding): the whole map is written back in one host call.
/// Envoy clears the route cache whenever a filter changes request headers,
/// so routes that match tollgate's headers (`x-tollgate-tier`) see them.
fn apply_plan(raw: &[u8], plan: &HeaderPlan) {
    match crate::envoy::pairs::decode(raw) {
        Some(map) if !map.is_empty() => {
            let pairs = crate::envoy::pairs::with_headers_replaced(&map, &plan.remove, &plan.set);
            set_header_bytes(MapType::HttpRequestHeaders, &pairs);
        }
        // Not readable: one call per header, as a fallback.
        _ => {
            for name in &plan.remove {
                if let Err(s) = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name) {
                    log::warn!("tollgate: removing header {name} failed: {s:?}");
                }
            }
            set_headers(MapType::HttpRequestHeaders, &plan.set);
        }
    }
}

fn set_headers(map: MapType, headers: &[(String, String)]) {
    for (name, value) in headers {
        if let Err(s) = hostcalls::set_map_value(map, name, Some(value)) {
            log::warn!("tollgate: setting header {name} failed: {s:?}");
        }
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

impl Http {
    fn emit(&self, finish: &Finish) {
        for (name, value) in &finish.properties {
            if let Err(s) = hostcalls::set_property(vec![*name], Some(value.as_bytes())) {
                log::debug!("tollgate: setting filter state {name} failed: {s:?}");
            }
        }
        let mut m = self.metrics.borrow_mut();
        for (name, v) in &finish.counters {
            m.count(name, *v);
        }
        for (name, v) in &finish.histograms {
            m.record(name, *v);
        }
    }

    fn count_refusal(&self, reply: &LocalReply) {
        let tenant = self.flow.tenant().map_or("unknown", |t| t.id.as_str()).to_string();
        let code = reply.header("x-tollgate-error").unwrap_or("unknown").to_string();
        self.metrics
            .borrow_mut()
            .count(&crate::metering::metrics::refused(&tenant, &code), 1);
    }

    /// Carries out a body step. `in_body_callback` says whether the request
    /// is paused inside `on_http_request_body` (return the action) or
    /// waiting for a gRPC answer (resume it).
    fn run_body_step(&mut self, step: BodyStep, body_size: usize, in_body_callback: bool) -> Action {
        match step {
            BodyStep::NeedMore => Action::Pause,
            BodyStep::Reply(reply) => {
                self.count_refusal(&reply);
                send_reply(&reply);
                Action::Pause
            }
            BodyStep::Call(call) => match self.dispatch(&call) {
                Ok(()) => Action::Pause,
                Err(()) => {
                    let step = self.flow.on_rls_reply(Err(14), now_ms());
                    self.run_body_step(step, body_size, in_body_callback)
                }
            },
            BodyStep::Forward { body, set_headers: hs } => {
                if let Some(body) = body {
                    let size = if in_body_callback {
                        body_size
                    } else {
                        // The whole buffered body is replaced.
                        usize::MAX
                    };
                    if let Err(s) = hostcalls::set_buffer(BufferType::HttpRequestBody, 0, size, &body) {
                        log::error!("tollgate: replacing the request body failed: {s:?}");
                    }
                }
                if !hs.is_empty() {
                    // Envoy clears the route cache itself (see `apply_plan`).
                    set_headers(MapType::HttpRequestHeaders, &hs);
                }
                if !in_body_callback {
                    if let Err(s) = hostcalls::resume_http_request() {
                        log::error!("tollgate: resuming the request failed: {s:?}");
                    }
                }
                Action::Continue
            }
        }
    }

    fn dispatch(&mut self, call: &RlsCall) -> Result<(), ()> {
        let meta: Vec<(&str, &[u8])> = call
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_bytes()))
            .collect();
        match hostcalls::dispatch_grpc_call(
            &call.cluster,
            rls::SERVICE,
            rls::METHOD,
            meta,
            Some(&call.message),
            Duration::from_millis(call.timeout_ms),
        ) {
            Ok(token) => {
                self.rls_token = Some(token);
                self.rls_sent_ms = now_ms();
                Ok(())
            }
            Err(s) => {
                log::warn!("tollgate: dispatching the reserve call failed: {s:?}");
                Err(())
            }
        }
    }
}

impl Context for Http {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        if self.rls_token != Some(token_id) {
            return;
        }
        self.rls_token = None;
        let now = now_ms();
        {
            let mut m = self.metrics.borrow_mut();
            m.record("tollgate.rls.latency_ms", now.saturating_sub(self.rls_sent_ms));
            if status_code != 0 {
                m.count(&format!("tollgate.rls.grpc_status_{status_code}"), 1);
            }
        }
        let step = if status_code == 0 {
            match hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, response_size) {
                Ok(bytes) => {
                    let bytes = bytes.unwrap_or_default();
                    self.flow.on_rls_reply(Ok(&bytes), now)
                }
                Err(_) => self.flow.on_rls_reply(Err(13), now),
            }
        } else {
            self.flow.on_rls_reply(Err(status_code), now)
        };
        let _ = self.run_body_step(step, 0, false);
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let raw = get_header_bytes(MapType::HttpRequestHeaders).unwrap_or_else(|s| {
            log::error!("tollgate: cannot read request headers (status {s})");
            Vec::new()
        });
        let headers = crate::envoy::pairs::header_map(&raw).unwrap_or_else(|| {
            log::error!("tollgate: the request headers are not in the pairs encoding");
            Vec::new()
        });
        let now = now_ms();
        let shared = Rc::clone(&self.shared);
        let payload = self.flow.plugin().identity.jwt_authn.as_ref().and_then(|spec| {
            hostcalls::get_property(vec![
                "metadata",
                "filter_metadata",
                "envoy.filters.http.jwt_authn",
                spec.payload_in_metadata.as_str(),
            ])
            .ok()
            .flatten()
        });
        let step = self.flow.on_request_headers_with(&headers, end_of_stream, now, payload.as_deref(), || {
            let mut s = shared.borrow_mut();
            s.counter = s.counter.wrapping_add(1);
            format!("tg-{:012x}{:08x}", now, s.counter as u32)
        });
        match step {
            HeadersStep::Reply(reply) => {
                self.count_refusal(&reply);
                send_reply(&reply);
                Action::Pause
            }
            HeadersStep::PassThrough => {
                self.bypass = true;
                Action::Continue
            }
            HeadersStep::ReadBody(plan) => {
                apply_plan(&raw, &plan);
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
                self.flow.on_request_body(&body, now_ms())
            }
        };
        self.run_body_step(step, body_size, true)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if self.bypass {
            return Action::Continue;
        }
        let mut headers = ResponseHeaders::read();
        let step = self.flow.on_response_headers(headers.status);
        headers.set = step.set;
        if end_of_stream {
            let fin = self.flow.on_response_end(now_ms());
            if let Some(fin) = &fin {
                headers.set.extend(fin.headers.iter().cloned());
            }
            headers.write();
            if let Some(fin) = fin {
                self.emit(&fin);
            }
            return Action::Continue;
        }
        self.hold_body = step.hold_body;
        if self.hold_body {
            self.held_headers = Some(headers);
            Action::Pause
        } else {
            headers.write();
            Action::Continue
        }
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.bypass {
            return Action::Continue;
        }
        if self.hold_body && !end_of_stream {
            // Envoy buffers; the whole body is read once it is complete.
            return Action::Pause;
        }
        // The clock is a host call: only read it when the flow uses it (the
        // first byte's time, the end of the response).
        let now = if end_of_stream || (!self.body_started && body_size > 0) {
            now_ms()
        } else {
            0
        };
        // Edge scanning: a large chunk of a chat stream is read only near
        // its edges (the tap says which bytes it needs).
        let taken = self.flow.on_response_chunk(body_size, end_of_stream, now, &mut read_response);
        self.body_started |= body_size > 0;
        if taken.read > 0 && taken.read < body_size {
            log::debug!(
                "tollgate: response chunk of {body_size} bytes read at its edges ({} bytes)",
                taken.read
            );
        }
        if !taken.out.is_unchanged() {
            // Writing the edit back may need the bytes that were not read.
            let chunk = match taken.chunk {
                None if taken.out.edit.needs_chunk_bytes(body_size) => Some(read_response(0, body_size)),
                chunk => chunk,
            };
            apply_body_out(chunk.as_deref(), body_size, &taken.out);
        }
        if end_of_stream {
            if let Some(mut headers) = self.held_headers.take() {
                if let Some(fin) = &taken.finish {
                    headers.set.extend(fin.headers.iter().cloned());
                }
                headers.write();
            }
        }
        if let Some(fin) = taken.finish {
            self.emit(&fin);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if !self.flow.has_work_at_stream_end() {
            return;
        }
        if let Some(fin) = self.flow.on_stream_done(now_ms()) {
            self.emit(&fin);
        }
    }
}
