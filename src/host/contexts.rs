//! What does each host callback do? The root and HTTP contexts: read what
//! the host offers, hand it to the core, carry out the core's answer. No
//! business decision lives here; every branch is on what the core said or on
//! a host call failing.

use std::cell::RefCell;
use std::rc::Rc;

use hashbrown::HashMap;

use super::{Action, Host, Map, MetricKind};
use crate::admission::inflight;
use crate::config::{self, Plugin};
use crate::envoy::pairs;
use crate::llm::LocalReply;
use crate::ratelimit::outbox::Answer;
use crate::request::effect::{BodyOut, BodyStep, Finish, HeadersStep, RlsCall};
use crate::request::flow::RequestFlow;
use crate::request::header_plan::HeaderPlan;
use crate::worker::{Worker, TICK_MS};

/// Metric ids by name, defined on first use. Counter increments are summed
/// here and handed to the host once per tick (`flush`): a request's five or
/// so increments cost no host call of their own, and Envoy sees them at most
/// one tick (50 ms) later. Histogram values are recorded as they come.
#[derive(Default)]
pub struct Metrics {
    ids: HashMap<String, u32>,
    /// Counter increments not yet handed to the host, by metric id.
    pending: HashMap<u32, u64>,
}

impl Metrics {
    fn id<H: Host>(&mut self, host: &mut H, kind: MetricKind, name: &str) -> Option<u32> {
        if let Some(id) = self.ids.get(name) {
            return Some(*id);
        }
        let id = host.define_metric(kind, name)?;
        self.ids.insert(name.to_string(), id);
        Some(id)
    }

    fn count<H: Host>(&mut self, host: &mut H, name: &str, by: u64) {
        if by == 0 {
            return;
        }
        if let Some(id) = self.id(host, MetricKind::Counter, name) {
            let n = self.pending.entry(id).or_insert(0);
            *n = n.saturating_add(by);
        }
    }

    /// Hands the summed counter increments to the host.
    fn flush<H: Host>(&mut self, host: &mut H) {
        for (id, by) in self.pending.drain() {
            host.increment_metric(id, by);
        }
    }

    fn record<H: Host>(&mut self, host: &mut H, name: &str, value: u64) {
        if let Some(id) = self.id(host, MetricKind::Histogram, name) {
            host.record_metric(id, value);
        }
    }

    fn gauge<H: Host>(&mut self, host: &mut H, name: &str, value: u64) {
        if let Some(id) = self.id(host, MetricKind::Gauge, name) {
            host.record_metric(id, value);
        }
    }
}

/// The root context: configuration, the tick (settles, leases, heartbeats,
/// JWKS refreshes, counters) and the drain of a removed plugin.
#[derive(Default)]
pub struct Root {
    plugin: Option<Rc<Plugin>>,
    worker: Option<Rc<RefCell<Worker>>>,
    metrics: Rc<RefCell<Metrics>>,
    /// JWKS fetches in flight: call token -> provider index.
    jwks_calls: HashMap<u32, usize>,
    /// The tenant registry change-feed poll in flight.
    changes_call: Option<u32>,
    /// The registry cache's counts as last handed to the metrics.
    registry_reported: crate::identity::registry::RegistryStats,
}

impl Root {
    /// The worker state this root shares with its requests.
    pub fn worker(&self) -> Option<&Rc<RefCell<Worker>>> {
        self.worker.as_ref()
    }

    /// A new configuration: compiled, or refused (the host keeps the old
    /// one). A reconfiguration keeps the worker state: queued settles survive.
    pub fn on_configure<H: Host>(&mut self, host: &mut H) -> bool {
        host.follow_log_level();
        let raw = match host.plugin_config() {
            Ok(raw) => raw,
            Err(e) => {
                log::error!("tollgate: cannot read the plugin configuration: {e}");
                return false;
            }
        };
        let plugin = match config::load(&raw, &|name| host.env(name)) {
            Ok(plugin) => plugin,
            Err(e) => {
                log::error!("tollgate: configuration refused: {e}");
                return false;
            }
        };
        log::info!(
            "tollgate: configuration accepted: {} tenants, {} routes, {} providers",
            plugin.tenants.len(),
            plugin.routes.len(),
            plugin.providers.len()
        );
        let store = host.slot_store();
        // Circuit records exist before the first failure, so that every
        // write to them is a compare-and-swap.
        for p in &plugin.providers {
            if let Err(e) = inflight::create(store.as_ref(), &p.circuit_key) {
                log::warn!("tollgate: cannot create the circuit record of provider {}: {e:?}", p.name);
            }
        }
        for t in plugin.tenants.iter().filter(|t| t.policy.max_concurrent_requests.is_some()) {
            if let Err(e) = inflight::create(store.as_ref(), &inflight::key(&t.id)) {
                log::warn!("tollgate: cannot create the in-flight table of tenant {}: {e:?}", t.id);
            }
        }
        // The tick also hands counters to the host: always on.
        if !host.set_tick_ms(TICK_MS) {
            return false;
        }
        let now = host.now_ms();
        if let (Some(old), Some(worker)) = (&self.plugin, &self.worker) {
            let n = worker.borrow_mut().reconfigured(old, now);
            if n > 0 {
                log::info!("tollgate: reconfigured: gave back {n} quota leases of the previous configuration");
            }
        }
        if self.worker.is_none() {
            let capacity = plugin.rate_limit.as_ref().map_or(1, |r| r.journal_capacity);
            let mut worker = Worker::new(capacity);
            worker.slots = store;
            worker.vm_id = host.new_vm_id();
            self.worker = Some(Rc::new(RefCell::new(worker)));
        }
        self.plugin = Some(Rc::new(plugin));
        true
    }

    pub fn on_tick<H: Host>(&mut self, host: &mut H) {
        self.metrics.borrow_mut().flush(host);
        host.follow_log_level();
        self.refresh_jwks(host);
        let (Some(plugin), Some(worker)) = (self.plugin.clone(), self.worker.clone()) else { return };
        let now = host.now_ms();
        let (gauges, stall_retries) = {
            let mut w = worker.borrow_mut();
            w.refresh_circuit_gauges(&plugin, now);
            (std::mem::take(&mut w.circuit_gauges), std::mem::take(&mut w.stall_retries))
        };
        let mut m = self.metrics.borrow_mut();
        for (name, value) in gauges {
            m.gauge(host, &name, value);
        }
        m.count(host, "tollgate.rls.stall_retries", stall_retries);
        drop(m);
        worker.borrow_mut().heartbeat(now);
        for line in worker.borrow_mut().incident_lines(now) {
            log::warn!("{line}");
        }
        self.poll_registry(host, now);
        if plugin.rate_limit.is_none() {
            return;
        }
        worker.borrow_mut().expire_leases(&plugin, now);
        self.send_settles(host, now, false);
    }

    /// A request's context, sharing this root's configuration and worker.
    pub fn new_http(&self) -> Option<Http> {
        let plugin = self.plugin.as_ref()?;
        let worker = self.worker.as_ref()?;
        Some(Http {
            flow: RequestFlow::new(Rc::clone(plugin), Rc::clone(worker)),
            worker: Rc::clone(worker),
            metrics: Rc::clone(&self.metrics),
            bypass: false,
            rls_token: None,
            rls_sent_ms: 0,
            hold_body: false,
            held_headers: None,
            body_started: false,
            lookup_token: None,
            body_done: None,
        })
    }

    /// The plugin is removed: see [`Worker::start_drain`]. The host keeps
    /// the context while this returns false.
    pub fn on_done<H: Host>(&mut self, host: &mut H) -> bool {
        self.metrics.borrow_mut().flush(host);
        let (Some(plugin), Some(worker)) = (&self.plugin, &self.worker) else { return true };
        if plugin.rate_limit.is_none() {
            return true;
        }
        let now = host.now_ms();
        let (leases, queued) = worker.borrow_mut().start_drain(plugin, now);
        log::info!("tollgate: plugin removed: giving back {leases} quota leases, sending {queued} queued settles");
        self.send_settles(host, now, true);
        self.drain_finished(host)
    }

    /// A settle's answer. Returns true when a removed plugin's drain is
    /// over: the host is to be told the root context is done.
    pub fn on_grpc_call_response<H: Host>(&mut self, host: &mut H, token: u32, status: u32, len: usize) -> bool {
        let Some(worker) = self.worker.clone() else { return false };
        let body = if status == 0 { host.grpc_response(len) } else { None };
        let answer = Answer::of(status, body.as_deref());
        let now = host.now_ms();
        if worker.borrow_mut().journal.answered(token, answer, now) {
            if answer == Answer::Rejected {
                log::error!("tollgate: the rate-limit service rejected a settle as invalid");
            }
            self.metrics.borrow_mut().count(host, answer.metric(), 1);
        }
        if worker.borrow().draining_until.is_some() {
            if worker.borrow().drain_sends(now) {
                self.send_settles(host, now, false);
            }
            if self.drain_finished(host) {
                log::info!("tollgate: removed plugin drained");
                return true;
            }
        }
        false
    }

    pub fn on_http_call_response<H: Host>(&mut self, host: &mut H, token: u32, body_len: usize) {
        if self.changes_call == Some(token) {
            self.changes_call = None;
            let (status, body) = host.http_response(body_len);
            let now = host.now_ms();
            if let Some(worker) = &self.worker {
                let mut w = worker.borrow_mut();
                let w = &mut *w;
                w.registry.on_changes(status, body.as_deref(), w.slots.as_ref(), now);
            }
            return;
        }
        let Some(index) = self.jwks_calls.remove(&token) else { return };
        let Some(slot) = self.plugin.as_ref().and_then(|p| p.jwt.as_ref()) else { return };
        let (status, body) = host.http_response(body_len);
        let now_s = host.now_ms() / 1000;
        if let Ok(mut verifier) = slot.0.try_borrow_mut() {
            let outcome = verifier.complete_jwks_fetch(index, status, body.as_deref(), now_s);
            log::info!("tollgate: JWKS refresh for provider {index}: status {status:?}, {outcome:?}");
        }
    }

    /// Asks the tenant registry for changes when a poll is due, and hands
    /// the registry cache's counts to the metrics.
    fn poll_registry<H: Host>(&mut self, host: &mut H, now: u64) {
        let (Some(plugin), Some(worker)) = (&self.plugin, &self.worker) else { return };
        let Some(reg) = &plugin.registry else { return };
        let due = worker.borrow_mut().registry.poll_due(reg, now);
        if let Some(path) = due {
            match host.dispatch_get(&reg.cluster, &path, &reg.authority, reg.timeout_ms.max(1000)) {
                Ok(token) => self.changes_call = Some(token),
                Err(e) => {
                    log::warn!("tollgate: cannot poll the tenant registry: {e}");
                    worker.borrow_mut().registry.poll_failed();
                }
            }
        }
        let stats = worker.borrow().registry.stats;
        let old = std::mem::replace(&mut self.registry_reported, stats);
        let mut m = self.metrics.borrow_mut();
        m.count(host, "tollgate.registry.lookups", stats.lookups.saturating_sub(old.lookups));
        m.count(host, "tollgate.registry.lookups_refused", stats.lookup_failures.saturating_sub(old.lookup_failures));
        m.count(host, "tollgate.registry.shared_hits", stats.shared_hits.saturating_sub(old.shared_hits));
        m.count(host, "tollgate.registry.polls_failed", stats.polls_failed.saturating_sub(old.polls_failed));
        m.count(host, "tollgate.registry.resets", stats.resets.saturating_sub(old.resets));
    }

    /// Sends the settles that are due (all queued ones with `force`) and
    /// counts newly dropped ones.
    fn send_settles<H: Host>(&mut self, host: &mut H, now: u64, force: bool) {
        let (Some(plugin), Some(worker)) = (&self.plugin, &self.worker) else { return };
        let Some(rl) = &plugin.rate_limit else { return };
        let due = worker.borrow_mut().settles_due(now, force);
        for entry in due {
            // Settles stay typed until here: built into descriptors and
            // encoded only as they are sent.
            let Some(message) = entry.encode() else {
                // Nothing to charge or refund (a settle that nets to zero
                // is never queued): counted as dropped, never silent.
                worker.borrow_mut().journal.dropped += 1;
                continue;
            };
            let sent = host.dispatch_rls(&rl.cluster, &entry.metadata(), &message, rl.timeout_ms.max(1000));
            drop(message);
            let mut w = worker.borrow_mut();
            match sent {
                Ok(token) => w.journal.sent(token, entry),
                Err(e) => {
                    if let Some(line) = w.rls_incident.failure("", &format!("cannot dispatch a settle: {e}"), now) {
                        log::warn!("{line}");
                    }
                    w.journal.retry_later(entry, now);
                }
            }
        }
        self.report_dropped(host);
    }

    fn report_dropped<H: Host>(&mut self, host: &mut H) {
        let Some(worker) = &self.worker else { return };
        let n = worker.borrow_mut().newly_dropped();
        self.metrics.borrow_mut().count(host, "tollgate.settle.dropped", n);
    }

    fn drain_finished<H: Host>(&mut self, host: &mut H) -> bool {
        let Some(worker) = &self.worker else { return false };
        if !worker.borrow_mut().drain_finished() {
            return false;
        }
        self.report_dropped(host);
        self.metrics.borrow_mut().flush(host);
        true
    }

    fn refresh_jwks<H: Host>(&mut self, host: &mut H) {
        let Some(slot) = self.plugin.as_ref().and_then(|p| p.jwt.as_ref()) else { return };
        let Ok(mut verifier) = slot.0.try_borrow_mut() else { return };
        if !verifier.has_remote_jwks() {
            return;
        }
        let now_s = host.now_ms() / 1000;
        for fetch in verifier.plan_jwks_fetches(now_s) {
            match host.dispatch_get(&fetch.cluster, &fetch.path, &fetch.authority, fetch.timeout_ms.max(1)) {
                Ok(token) => {
                    self.jwks_calls.insert(token, fetch.provider_index);
                }
                Err(e) => {
                    log::warn!("tollgate: cannot fetch JWKS from cluster {}: {e}", fetch.cluster);
                    verifier.complete_jwks_fetch(fetch.provider_index, None, None, now_s);
                }
            }
        }
    }
}

/// The response headers as the host holds them, and tollgate's headers for
/// them, written together in one host call: at once for a passed-through
/// response, or once its body is complete for a held one.
struct ResponseHeaders {
    raw: Vec<u8>,
    set: Vec<(String, String)>,
}

impl ResponseHeaders {
    fn write<H: Host>(self, host: &mut H) {
        if self.set.is_empty() {
            return;
        }
        match pairs::decode(&self.raw) {
            Some(map) if !map.is_empty() => {
                host.set_header_pairs(Map::ResponseHeaders, &pairs::with_headers_set(&map, &self.set));
            }
            // Not readable: one call per header, as a fallback.
            _ => {
                for (name, value) in &self.set {
                    host.set_header(Map::ResponseHeaders, name, value);
                }
            }
        }
    }
}

/// One request's context.
pub struct Http {
    flow: RequestFlow,
    worker: Rc<RefCell<Worker>>,
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
    /// The tenant registry lookup in flight.
    lookup_token: Option<u32>,
    /// The request body's size once complete, while a lookup holds it.
    body_done: Option<usize>,
}

/// Carries out the header plan over the request headers as read (`raw`,
/// the pairs encoding): the whole map is written back in one host call.
/// Envoy clears the route cache whenever a filter changes request headers,
/// so routes that match tollgate's headers (`x-tollgate-tier`) see them.
fn apply_plan<H: Host>(host: &mut H, raw: &[u8], plan: &HeaderPlan) {
    match pairs::decode(raw) {
        Some(map) if !map.is_empty() => {
            let pairs = pairs::with_headers_replaced(&map, &plan.remove, &plan.set);
            host.set_header_pairs(Map::RequestHeaders, &pairs);
        }
        // Not readable: one call per header, as a fallback.
        _ => {
            for name in &plan.remove {
                host.remove_header(Map::RequestHeaders, name);
            }
            for (name, value) in &plan.set {
                host.set_header(Map::RequestHeaders, name, value);
            }
        }
    }
}

impl Http {
    /// The request's flow (for tests and tools).
    pub fn flow(&self) -> &RequestFlow {
        &self.flow
    }

    fn emit<H: Host>(&self, host: &mut H, finish: &Finish) {
        for (name, value) in &finish.properties {
            host.set_property(name, value);
        }
        let mut m = self.metrics.borrow_mut();
        for (name, v) in &finish.counters {
            m.count(host, name, *v);
        }
        for (name, v) in &finish.histograms {
            m.record(host, name, *v);
        }
    }

    fn reply<H: Host>(&mut self, host: &mut H, reply: &LocalReply) {
        // A 2xx local reply is an answer (the quota endpoint), not a refusal.
        if reply.status >= 300 {
            let name = self.flow.refusal_metric(reply);
            self.metrics.borrow_mut().count(host, &name, 1);
            for (k, v) in self.flow.refusal_properties(reply) {
                host.set_property(k, &v);
            }
            let now = host.now_ms();
            self.flow.note_refusal(reply, now);
        }
        host.send_reply(reply);
    }

    /// A call made from the request headers (the quota endpoint's check).
    fn headers_call<H: Host>(&mut self, host: &mut H, call: &RlsCall) {
        if self.dispatch(host, call).is_err() {
            let now = host.now_ms();
            let step = self.flow.on_rls_reply(Err(14), now);
            let _ = self.run_body_step(host, step, 0, false);
        }
    }

    /// The reserve call of a request without a body (a WebSocket upgrade),
    /// made from its headers: `Pause` until the answer, or, when it cannot be
    /// sent, what the failure mode says now (`Continue` to let it go).
    fn admit_call<H: Host>(&mut self, host: &mut H, call: &RlsCall) -> Action {
        if self.dispatch(host, call).is_ok() {
            return Action::Pause;
        }
        let now = host.now_ms();
        let step = self.flow.on_rls_reply(Err(14), now);
        // As inside a callback: a forward is answered `Continue`, not resumed.
        self.run_body_step(host, step, 0, true)
    }

    /// Carries out a body step. `in_body_callback` says whether the request
    /// is paused inside `on_http_request_body` (return the action) or
    /// waiting for a gRPC answer (resume it).
    fn run_body_step<H: Host>(
        &mut self,
        host: &mut H,
        step: BodyStep,
        body_size: usize,
        in_body_callback: bool,
    ) -> Action {
        match step {
            BodyStep::NeedMore => Action::Pause,
            BodyStep::Reply(reply) => {
                self.reply(host, &reply);
                Action::Pause
            }
            BodyStep::Call(call) => match self.dispatch(host, &call) {
                Ok(()) => Action::Pause,
                Err(()) => {
                    let now = host.now_ms();
                    let step = self.flow.on_rls_reply(Err(14), now);
                    self.run_body_step(host, step, body_size, in_body_callback)
                }
            },
            BodyStep::Forward { body, set_headers } => {
                if let Some(body) = body {
                    // In the body callback the chunk seen is replaced; after
                    // a call, the whole buffered body.
                    let len = if in_body_callback { body_size } else { usize::MAX };
                    host.set_request_body(len, &body);
                }
                for (name, value) in &set_headers {
                    // Envoy clears the route cache itself (see `apply_plan`).
                    host.set_header(Map::RequestHeaders, name, value);
                }
                if !in_body_callback {
                    host.resume_request();
                }
                Action::Continue
            }
        }
    }

    fn dispatch<H: Host>(&mut self, host: &mut H, call: &RlsCall) -> Result<(), ()> {
        match host.dispatch_rls(&call.cluster, &call.metadata, &call.message, call.timeout_ms) {
            Ok(token) => {
                self.rls_token = Some(token);
                self.rls_sent_ms = host.now_ms();
                Ok(())
            }
            Err(e) => {
                // Told (once per incident) by the flow's failure mode.
                log::debug!("tollgate: dispatching the reserve call failed: {e}");
                Err(())
            }
        }
    }

    pub fn on_grpc_call_response<H: Host>(&mut self, host: &mut H, token: u32, status: u32, len: usize) {
        if self.rls_token != Some(token) {
            return;
        }
        self.rls_token = None;
        let now = host.now_ms();
        {
            let mut m = self.metrics.borrow_mut();
            m.record(host, "tollgate.rls.latency_ms", now.saturating_sub(self.rls_sent_ms));
            if status != 0 {
                m.count(host, &format!("tollgate.rls.grpc_status_{status}"), 1);
            }
        }
        let step = if status == 0 {
            match host.grpc_response(len) {
                Some(bytes) => self.flow.on_rls_reply(Ok(&bytes), now),
                // INTERNAL: the answer could not be read.
                None => self.flow.on_rls_reply(Err(13), now),
            }
        } else {
            self.flow.on_rls_reply(Err(status), now)
        };
        let _ = self.run_body_step(host, step, 0, false);
    }

    pub fn on_request_headers<H: Host>(&mut self, host: &mut H, end_of_stream: bool) -> Action {
        let raw = host.header_pairs(Map::RequestHeaders);
        let headers = pairs::header_map(&raw).unwrap_or_else(|| {
            log::error!("tollgate: the request headers are not in the pairs encoding");
            Vec::new()
        });
        let now = host.now_ms();
        let payload = self.flow.plugin().identity.jwt_authn.as_ref().and_then(|spec| {
            host.property(&[
                "metadata",
                "filter_metadata",
                "envoy.filters.http.jwt_authn",
                spec.payload_in_metadata.as_str(),
            ])
        });
        let worker = Rc::clone(&self.worker);
        let step = self.flow.on_request_headers_with(&headers, end_of_stream, now, payload.as_deref(), || {
            worker.borrow_mut().new_request_id(now)
        });
        match step {
            HeadersStep::Reply(reply) => {
                self.reply(host, &reply);
                Action::Pause
            }
            HeadersStep::PassThrough { remove } => {
                for name in &remove {
                    host.remove_header(Map::RequestHeaders, name);
                }
                self.bypass = true;
                Action::Continue
            }
            HeadersStep::ReadBody(plan) => {
                apply_plan(host, &raw, &plan);
                Action::Pause
            }
            HeadersStep::Call(call) => {
                self.headers_call(host, &call);
                Action::Pause
            }
            HeadersStep::Admit(plan, call) => {
                apply_plan(host, &raw, &plan);
                self.admit_call(host, &call)
            }
            HeadersStep::Forward(plan) => {
                apply_plan(host, &raw, &plan);
                Action::Continue
            }
            HeadersStep::Lookup(call) => {
                match host.dispatch_get(&call.cluster, &call.path, &call.authority, call.timeout_ms) {
                    Ok(token) => self.lookup_token = Some(token),
                    Err(e) => {
                        log::warn!("tollgate: cannot send a tenant registry lookup: {e}");
                        self.after_lookup(host, None, None);
                    }
                }
                Action::Pause
            }
        }
    }

    /// The tenant registry's answer to this request's lookup.
    pub fn on_http_call_response<H: Host>(&mut self, host: &mut H, token: u32, body_len: usize) {
        if self.lookup_token != Some(token) {
            return;
        }
        self.lookup_token = None;
        let (status, body) = host.http_response(body_len);
        self.after_lookup(host, status, body.as_deref());
    }

    /// Continues a request held for a lookup: the rest of its headers'
    /// step, then its body if it is complete already.
    fn after_lookup<H: Host>(&mut self, host: &mut H, status: Option<u32>, body: Option<&[u8]>) {
        let raw = host.header_pairs(Map::RequestHeaders);
        let headers = pairs::header_map(&raw).unwrap_or_default();
        let now = host.now_ms();
        let step = self.flow.on_lookup_answer(&headers, status, body, now);
        self.metrics.borrow_mut().count(
            host,
            if status == Some(200) { "tollgate.registry.lookups_answered" } else { "tollgate.registry.lookups_failed" },
            1,
        );
        match step {
            HeadersStep::Reply(reply) => self.reply(host, &reply),
            HeadersStep::Call(call) => self.headers_call(host, &call),
            HeadersStep::Admit(plan, call) => {
                apply_plan(host, &raw, &plan);
                if self.admit_call(host, &call) == Action::Continue {
                    host.resume_request();
                }
            }
            HeadersStep::Forward(plan) => {
                apply_plan(host, &raw, &plan);
                host.resume_request();
            }
            HeadersStep::ReadBody(plan) => {
                apply_plan(host, &raw, &plan);
                if let Some(size) = self.body_done {
                    let step = match self.flow.on_request_body_size(size as u64, true) {
                        Some(step) => step,
                        None => {
                            let body = host.request_body(size);
                            self.flow.on_request_body(&body, now)
                        }
                    };
                    let _ = self.run_body_step(host, step, size, false);
                }
            }
            // Not after a lookup; a request that cannot go on is refused.
            HeadersStep::PassThrough { .. } | HeadersStep::Lookup(_) => {
                let reply = LocalReply { status: 500, headers: Vec::new(), body: Vec::new() };
                self.reply(host, &reply);
            }
        }
    }

    pub fn on_request_body<H: Host>(&mut self, host: &mut H, body_size: usize, end_of_stream: bool) -> Action {
        if let Some(pass) = self.flow.unread_body() {
            // A WebSocket's frames: held until its reserve is answered, then passed.
            return if pass { Action::Continue } else { Action::Pause };
        }
        if self.bypass {
            return Action::Continue;
        }
        if end_of_stream && self.flow.resolving() {
            self.body_done = Some(body_size);
        }
        let step = match self.flow.on_request_body_size(body_size as u64, end_of_stream) {
            Some(step) => step,
            None => {
                let body = host.request_body(body_size);
                let now = host.now_ms();
                self.flow.on_request_body(&body, now)
            }
        };
        self.run_body_step(host, step, body_size, true)
    }

    pub fn on_response_headers<H: Host>(&mut self, host: &mut H, end_of_stream: bool) -> Action {
        if self.bypass {
            return Action::Continue;
        }
        let raw = host.header_pairs(Map::ResponseHeaders);
        if self.flow.watches_upstream() {
            let now = host.now_ms();
            self.flow.on_upstream_answer(&raw, now);
        }
        let step = self.flow.on_response_headers(pairs::status(&raw));
        let mut headers = ResponseHeaders { raw, set: step.set };
        if end_of_stream {
            let now = host.now_ms();
            let fin = self.flow.on_response_end(now);
            if let Some(fin) = &fin {
                headers.set.extend(fin.headers.iter().cloned());
            }
            headers.write(host);
            if let Some(fin) = fin {
                self.emit(host, &fin);
            }
            return Action::Continue;
        }
        self.hold_body = step.hold_body;
        if self.hold_body {
            self.held_headers = Some(headers);
            Action::Pause
        } else {
            headers.write(host);
            Action::Continue
        }
    }

    pub fn on_response_body<H: Host>(&mut self, host: &mut H, body_size: usize, end_of_stream: bool) -> Action {
        if self.bypass {
            return Action::Continue;
        }
        if self.hold_body && !end_of_stream {
            // The host buffers; the whole body is read once it is complete.
            return Action::Pause;
        }
        // The clock is a host call: only read it when the flow uses it (the
        // first byte's time, the end of the response).
        let now = if end_of_stream || (!self.body_started && body_size > 0) { host.now_ms() } else { 0 };
        // Edge scanning: a large chunk of a chat stream is read only near
        // its edges (the tap says which bytes it needs).
        let taken =
            self.flow.on_response_chunk(body_size, end_of_stream, now, &mut |from, len| host.response_body(from, len));
        self.body_started |= body_size > 0;
        if taken.read > 0 && taken.read < body_size {
            log::debug!("tollgate: response chunk of {body_size} bytes read at its edges ({} bytes)", taken.read);
        }
        if !taken.out.is_unchanged() {
            // Writing the edit back may need the bytes that were not read.
            let chunk = match taken.chunk {
                None if taken.out.edit.needs_chunk_bytes(body_size) => Some(host.response_body(0, body_size)),
                chunk => chunk,
            };
            write_body(host, &taken.out, chunk.as_deref(), body_size);
        }
        if end_of_stream {
            if let Some(mut headers) = self.held_headers.take() {
                if let Some(fin) = &taken.finish {
                    headers.set.extend(fin.headers.iter().cloned());
                }
                headers.write(host);
            }
        }
        if let Some(fin) = taken.finish {
            self.emit(host, &fin);
        }
        Action::Continue
    }

    /// The stream is over (Envoy's `on_log`): whatever is unsettled is
    /// settled, the in-flight slot given back.
    pub fn on_log<H: Host>(&mut self, host: &mut H) {
        if !self.flow.has_work_at_stream_end() {
            return;
        }
        let now = host.now_ms();
        if let Some(fin) = self.flow.on_stream_done(now) {
            self.emit(host, &fin);
        }
    }
}

/// Writes a changed response chunk back (see [`BodyOut::writes`]).
fn write_body<H: Host>(host: &mut H, out: &BodyOut, chunk: Option<&[u8]>, size: usize) {
    for w in out.writes(chunk, size) {
        host.set_response_body(w.start, w.len, &w.data);
    }
}
