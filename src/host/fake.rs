//! What would Envoy have seen? A recording [`Host`] for native tests: it
//! holds one stream's headers and bodies, answers reads from them, applies
//! writes as Envoy does, and records every call out, reply, property and
//! metric, so a whole request runs through the same entry points Envoy calls
//! ([`super::contexts`]).

use std::collections::BTreeMap;

use hashbrown::HashMap;

use super::{Host, Map, MetricKind};
use crate::admission::inflight::{LocalStore, SlotStore};
use crate::envoy::pairs;
use crate::llm::LocalReply;
use crate::request::effect::BufferWrite;

/// A call to the rate-limit service the filter made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RlsSent {
    pub token: u32,
    pub cluster: String,
    pub metadata: Vec<(String, String)>,
    pub message: Vec<u8>,
    pub timeout_ms: u64,
}

impl RlsSent {
    /// The value of one metadata entry.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// A recording host. Public fields are the stream as the host holds it.
#[derive(Debug, Default)]
pub struct FakeHost {
    pub now_ms: u64,
    pub config: Vec<u8>,
    pub env: HashMap<String, String>,
    pub request_headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub response_headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub request_body: Vec<u8>,
    /// The response chunk being delivered.
    pub response_chunk: Vec<u8>,
    /// Properties a test makes readable (`property`), by joined path.
    pub readable: HashMap<String, Vec<u8>>,
    /// The answer the next `grpc_response` reads (`None`: unreadable).
    pub grpc_answer: Option<Vec<u8>>,
    /// Make every dispatch fail.
    pub fail_dispatch: bool,

    // What the filter did.
    pub replies: Vec<LocalReply>,
    pub resumed: usize,
    pub properties: BTreeMap<String, String>,
    pub rls_calls: Vec<RlsSent>,
    pub get_calls: Vec<(String, String)>,
    /// The status and body `http_response` answers (none: no answer).
    pub http_answer: Option<(u32, Vec<u8>)>,
    pub counters: BTreeMap<String, u64>,
    pub histograms: BTreeMap<String, Vec<u64>>,
    /// Host calls that wrote a header map or a body, by kind.
    pub writes: BTreeMap<&'static str, usize>,
    metric_names: Vec<(String, MetricKind)>,
    next_token: u32,
}

impl FakeHost {
    /// A host whose plugin configuration is `config` (JSON).
    pub fn with_config(config: &str) -> Self {
        FakeHost { now_ms: 1_700_000_000_000, config: config.as_bytes().to_vec(), ..Default::default() }
    }

    /// The current value of a request header.
    pub fn request_header(&self, name: &str) -> Option<String> {
        header(&self.request_headers, name)
    }

    /// The current value of a response header.
    pub fn response_header(&self, name: &str) -> Option<String> {
        header(&self.response_headers, name)
    }

    fn wrote(&mut self, what: &'static str) {
        *self.writes.entry(what).or_insert(0) += 1;
    }

    fn map(&mut self, map: Map) -> &mut Vec<(Vec<u8>, Vec<u8>)> {
        match map {
            Map::RequestHeaders => &mut self.request_headers,
            Map::ResponseHeaders => &mut self.response_headers,
        }
    }
}

fn header(map: &[(Vec<u8>, Vec<u8>)], name: &str) -> Option<String> {
    map.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

/// Header pairs from text pairs.
pub fn headers(list: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    list.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect()
}

impl Host for FakeHost {
    fn now_ms(&mut self) -> u64 {
        self.now_ms
    }

    fn plugin_config(&mut self) -> Result<Vec<u8>, String> {
        Ok(self.config.clone())
    }

    fn env(&self, name: &str) -> Option<String> {
        self.env.get(name).cloned()
    }

    fn set_tick_ms(&mut self, _ms: u64) -> bool {
        true
    }

    fn slot_store(&mut self) -> Box<dyn SlotStore> {
        Box::new(LocalStore::default())
    }

    fn new_vm_id(&mut self) -> u64 {
        1
    }

    fn header_pairs(&mut self, map: Map) -> Vec<u8> {
        pairs::encode(self.map(map))
    }

    fn set_header_pairs(&mut self, map: Map, pairs: &[(Vec<u8>, Vec<u8>)]) {
        self.wrote("header_pairs");
        *self.map(map) = pairs.to_vec();
    }

    fn set_header(&mut self, map: Map, name: &str, value: &str) {
        self.wrote("header");
        let m = self.map(map);
        m.retain(|(k, _)| !k.eq_ignore_ascii_case(name.as_bytes()));
        m.push((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
    }

    fn remove_header(&mut self, map: Map, name: &str) {
        self.wrote("header");
        self.map(map).retain(|(k, _)| !k.eq_ignore_ascii_case(name.as_bytes()));
    }

    fn request_body(&mut self, len: usize) -> Vec<u8> {
        self.request_body.iter().take(len).copied().collect()
    }

    fn set_request_body(&mut self, len: usize, body: &[u8]) {
        self.wrote("request_body");
        BufferWrite { start: 0, len, data: body.into() }.apply_to(&mut self.request_body);
    }

    fn response_body(&mut self, from: usize, len: usize) -> Vec<u8> {
        self.response_chunk.iter().skip(from).take(len).copied().collect()
    }

    fn set_response_body(&mut self, start: usize, len: usize, data: &[u8]) {
        self.wrote("response_body");
        BufferWrite { start, len, data: data.into() }.apply_to(&mut self.response_chunk);
    }

    fn resume_request(&mut self) {
        self.resumed += 1;
    }

    fn send_reply(&mut self, reply: &LocalReply) {
        self.replies.push(reply.clone());
    }

    fn property(&mut self, path: &[&str]) -> Option<Vec<u8>> {
        self.readable.get(&path.join(".")).cloned()
    }

    fn set_property(&mut self, name: &str, value: &str) {
        self.properties.insert(name.to_string(), value.to_string());
    }

    fn dispatch_rls(
        &mut self,
        cluster: &str,
        metadata: &[(String, String)],
        message: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, String> {
        if self.fail_dispatch {
            return Err("unknown cluster".into());
        }
        self.next_token += 1;
        self.rls_calls.push(RlsSent {
            token: self.next_token,
            cluster: cluster.to_string(),
            metadata: metadata.to_vec(),
            message: message.to_vec(),
            timeout_ms,
        });
        Ok(self.next_token)
    }

    fn grpc_response(&mut self, _len: usize) -> Option<Vec<u8>> {
        self.grpc_answer.clone()
    }

    fn dispatch_get(&mut self, cluster: &str, path: &str, _authority: &str, _timeout_ms: u64) -> Result<u32, String> {
        if self.fail_dispatch {
            return Err("unknown cluster".into());
        }
        self.next_token += 1;
        self.get_calls.push((cluster.to_string(), path.to_string()));
        Ok(self.next_token)
    }

    fn http_response(&mut self, _len: usize) -> (Option<u32>, Option<Vec<u8>>) {
        match &self.http_answer {
            Some((status, body)) => (Some(*status), Some(body.clone())),
            None => (None, None),
        }
    }

    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Option<u32> {
        self.metric_names.push((name.to_string(), kind));
        u32::try_from(self.metric_names.len() - 1).ok()
    }

    fn increment_metric(&mut self, id: u32, by: u64) {
        if let Some((name, _)) = self.metric_names.get(id as usize) {
            *self.counters.entry(name.clone()).or_insert(0) += by;
        }
    }

    fn record_metric(&mut self, id: u32, value: u64) {
        if let Some((name, _)) = self.metric_names.get(id as usize) {
            self.histograms.entry(name.clone()).or_default().push(value);
        }
    }
}

#[cfg(test)]
mod registry_tests;
#[cfg(test)]
mod tests;
