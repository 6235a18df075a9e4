//! How are host calls made? [`Envoy`], the [`Host`] over proxy-wasm's
//! `hostcalls`: every call returns `Result`, and a failure is logged, never
//! a panic.

use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType, Status};

use super::{Host, Map, MetricKind};
use crate::admission::inflight::{SlotStore, StoreError};
use crate::llm::LocalReply;
use crate::rls;

/// The host of this VM: Envoy.
pub struct Envoy;

/// The raw host calls behind `hostcalls::get_map`/`set_map`. The SDK turns
/// every name and value into a `String` with `unwrap`, so one request header
/// value that is not UTF-8 (HTTP allows bytes 0x80-0xFF) would panic the VM;
/// these read and write the pairs as bytes.
mod raw {
    #[link(wasm_import_module = "env")]
    extern "C" {
        pub fn proxy_get_header_map_pairs(map_type: u32, return_data: *mut *mut u8, return_size: *mut usize) -> u32;
        pub fn proxy_set_header_map_pairs(map_type: u32, data: *const u8, size: usize) -> u32;
    }
}

fn map_type(map: Map) -> MapType {
    match map {
        Map::RequestHeaders => MapType::HttpRequestHeaders,
        Map::ResponseHeaders => MapType::HttpResponseHeaders,
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

fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Host for Envoy {
    fn now_ms(&mut self) -> u64 {
        now_ms()
    }

    /// Logs at the level the host logs wasm code at (Envoy's `wasm`
    /// component, which `POST /logging?wasm=debug` changes at run time), so
    /// debug lines cost nothing unless asked for.
    fn follow_log_level(&mut self) {
        if let Ok(level) = hostcalls::get_log_level() {
            proxy_wasm::set_log_level(level);
        }
    }

    fn plugin_config(&mut self) -> Result<Vec<u8>, String> {
        match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(bytes) => Ok(bytes.unwrap_or_default()),
            Err(status) => Err(format!("{status:?}")),
        }
    }

    fn env(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn set_tick_ms(&mut self, ms: u64) -> bool {
        match hostcalls::set_tick_period(Duration::from_millis(ms)) {
            Ok(()) => true,
            Err(s) => {
                log::error!("tollgate: cannot set the tick period: {s:?}");
                false
            }
        }
    }

    fn slot_store(&mut self) -> Box<dyn SlotStore> {
        Box::new(EnvoySharedData)
    }

    /// A counter in shared data, incremented under compare-and-swap.
    fn new_vm_id(&mut self) -> u64 {
        const KEY: &str = "tollgate.vm_seq";
        for _ in 0..64 {
            let Ok((value, cas)) = hostcalls::get_shared_data(KEY) else { break };
            let current = value.and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok()).map_or(0, u64::from_le_bytes);
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

    fn header_pairs(&mut self, map: Map) -> Vec<u8> {
        get_header_bytes(map_type(map)).unwrap_or_else(|s| {
            log::error!("tollgate: cannot read the {map:?} (status {s})");
            Vec::new()
        })
    }

    fn set_header_pairs(&mut self, map: Map, pairs: &[(Vec<u8>, Vec<u8>)]) {
        let bytes = crate::envoy::pairs::encode(pairs);
        // SAFETY: the host only reads `bytes` during the call.
        let status = unsafe { raw::proxy_set_header_map_pairs(map_type(map) as u32, bytes.as_ptr(), bytes.len()) };
        if status != 0 {
            log::warn!("tollgate: rewriting the {map:?} failed (status {status})");
        }
    }

    fn set_header(&mut self, map: Map, name: &str, value: &str) {
        if let Err(s) = hostcalls::set_map_value(map_type(map), name, Some(value)) {
            log::warn!("tollgate: setting header {name} failed: {s:?}");
        }
    }

    fn remove_header(&mut self, map: Map, name: &str) {
        if let Err(s) = hostcalls::remove_map_value(map_type(map), name) {
            log::warn!("tollgate: removing header {name} failed: {s:?}");
        }
    }

    fn request_body(&mut self, len: usize) -> Vec<u8> {
        match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, len) {
            Ok(b) => b.unwrap_or_default(),
            Err(s) => {
                log::error!("tollgate: cannot read the request body: {s:?}");
                Vec::new()
            }
        }
    }

    fn set_request_body(&mut self, len: usize, body: &[u8]) {
        if let Err(s) = hostcalls::set_buffer(BufferType::HttpRequestBody, 0, len, body) {
            log::error!("tollgate: replacing the request body failed: {s:?}");
        }
    }

    fn response_body(&mut self, from: usize, len: usize) -> Vec<u8> {
        match hostcalls::get_buffer(BufferType::HttpResponseBody, from, len) {
            Ok(b) => b.unwrap_or_default(),
            Err(s) => {
                log::warn!("tollgate: cannot read a response chunk: {s:?}");
                Vec::new()
            }
        }
    }

    fn set_response_body(&mut self, start: usize, len: usize, data: &[u8]) {
        if let Err(s) = hostcalls::set_buffer(BufferType::HttpResponseBody, start, len, data) {
            log::warn!("tollgate: rewriting a response chunk failed: {s:?}");
        }
    }

    fn resume_request(&mut self) {
        if let Err(s) = hostcalls::resume_http_request() {
            log::error!("tollgate: resuming the request failed: {s:?}");
        }
    }

    fn send_reply(&mut self, reply: &LocalReply) {
        let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        if let Err(s) = hostcalls::send_http_response(u32::from(reply.status), headers, Some(&reply.body)) {
            log::error!("tollgate: sending a local reply failed: {s:?}");
        }
    }

    fn property(&mut self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }

    fn set_property(&mut self, name: &str, value: &str) {
        if let Err(s) = hostcalls::set_property(vec![name], Some(value.as_bytes())) {
            log::debug!("tollgate: setting filter state {name} failed: {s:?}");
        }
    }

    fn dispatch_rls(
        &mut self,
        cluster: &str,
        metadata: &[(String, String)],
        message: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, String> {
        let meta: Vec<(&str, &[u8])> = metadata.iter().map(|(k, v)| (k.as_str(), v.as_bytes())).collect();
        hostcalls::dispatch_grpc_call(
            cluster,
            rls::SERVICE,
            rls::METHOD,
            meta,
            Some(message),
            Duration::from_millis(timeout_ms),
        )
        .map_err(|s| format!("{s:?}"))
    }

    fn grpc_response(&mut self, len: usize) -> Option<Vec<u8>> {
        match hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, len) {
            Ok(bytes) => Some(bytes.unwrap_or_default()),
            Err(_) => None,
        }
    }

    fn dispatch_get(&mut self, cluster: &str, path: &str, authority: &str, timeout_ms: u64) -> Result<u32, String> {
        let headers =
            vec![(":method", "GET"), (":path", path), (":authority", authority), ("accept", "application/json")];
        hostcalls::dispatch_http_call(cluster, headers, None, vec![], Duration::from_millis(timeout_ms))
            .map_err(|s| format!("{s:?}"))
    }

    fn http_response(&mut self, len: usize) -> (Option<u32>, Option<Vec<u8>>) {
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| s.parse::<u32>().ok());
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, len).ok().flatten();
        (status, body)
    }

    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Option<u32> {
        let kind = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Histogram => MetricType::Histogram,
            MetricKind::Gauge => MetricType::Gauge,
        };
        match hostcalls::define_metric(kind, name) {
            Ok(id) => Some(id),
            Err(s) => {
                log::warn!("tollgate: defining metric {name} failed: {s:?}");
                None
            }
        }
    }

    fn increment_metric(&mut self, id: u32, by: u64) {
        let _ = hostcalls::increment_metric(id, i64::try_from(by).unwrap_or(i64::MAX));
    }

    fn record_metric(&mut self, id: u32, value: u64) {
        let _ = hostcalls::record_metric(id, value);
    }
}
