//! What happens next for this request?
//!
//! The per-request state machine. The host contexts hand every callback to
//! a [`RequestFlow`] and carry out what it answers; all decisions live here,
//! where plain `cargo test` reaches them.
//!
//! Life of a request:
//! 1. headers: route, identity, header plan (credentials swapped, identity
//!    headers dropped, trusted tenant headers set); the request is held;
//! 2. body: size, JSON, model policy; then the estimate, the reserve call to
//!    the rate-limit service, and possibly a body rewrite (usage injection,
//!    output clamp, fallback model);
//! 3. response: every chunk is metered as it passes (streams are never held);
//! 4. end: usage (or a flagged estimate) is priced, written to filter state
//!    and metrics, and the settle is netted with the tenant's others and
//!    queued in the VM's journal on the next tick.

use std::cell::RefCell;
use std::rc::Rc;

use prost::Message;
use serde_json::Value;

use crate::admission::lease::{lease_refund, times, Account, Lease};
use crate::identity::registry::{Ask, Cached};
use crate::identity::{resolve_identity, Who};
use crate::request::effect::{
    BodyOut, BodyStep, Finish, HeadersStep, LookupCall, ResponseChunk, ResponseHeadersStep, RlsCall,
};
use crate::worker::{Slot, Worker};

use crate::config::{FailureMode, KeyInfo, LeaseSize, Plugin, RlsMode, TenantRef, UnmatchedRoutes, AUTO_LEASE_MAX};
use crate::identity::api_key::{self, Headers};
use crate::llm::inspect::{self, RequestInfo};
use crate::llm::{self, Api, Family, LocalReply, Refusal};
use crate::metering::meter::ResponseMeter;
use crate::metering::metrics;
use crate::metering::record;
use crate::metering::tap::StreamTap;
use crate::metering::usage::{self, MeterLimits, Usage};
use crate::ratelimit::descriptors::{self as levels, Amounts, LimitItem, LimitKind, LimitState, PoolScope, Scope};
use crate::ratelimit::outbox::{self};
use crate::ratelimit::reserve::{self, Verdict};
use crate::ratelimit::{headers, quota, settle};

/// The self-service quota endpoint: `GET /tollgate/v1/quota` with the
/// caller's own API key or JWT.
pub const QUOTA_PATH: &str = "/tollgate/v1/quota";
use crate::request::header_plan::{self};
use crate::rls;
use crate::rls::ledger::UsageRow;
use crate::upstream::circuit::{self, Outcome, Transition};
use crate::upstream::{self, Picked};

#[derive(Debug, Clone)]
struct Reservation {
    estimate: Amounts,
    states: Vec<LimitState>,
    /// The service charged the estimate (reserve mode): settle the difference.
    charged: bool,
    /// Admitted locally while the service was unreachable: charge in full later.
    fail_open: bool,
    /// The reserve whose answer was lost (fail-open admissions).
    replay: Option<Replay>,
    /// Extra requests' worth that reserve asked for as a lease.
    lease: u64,
    /// Shadow mode let it through a refusal: nothing was charged, and
    /// nothing is settled.
    shadow: bool,
}

#[derive(Debug, Clone)]
struct Pending {
    items: Vec<LimitItem>,
    /// This request's estimate.
    estimate: Amounts,
    /// Extra requests' worth reserved as a lease (0: none).
    lease: u64,
    /// The reserve as sent, for a replay if its answer is lost.
    replay: Option<Replay>,
}

/// A reserve call that can be sent again under its idempotency key.
#[derive(Debug, Clone)]
struct Replay {
    message: Vec<u8>,
    key: String,
}

/// Where the request is, with what only that step has.
// The phase lives inside the request's context, one heap object already:
// boxing the large `Upstream` would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Phase {
    /// Reading the headers and the body.
    Start,
    /// Waiting for the tenant registry's answer; the request headers ended
    /// the stream when `end_of_stream`.
    Resolving { ask: Ask, end_of_stream: bool },
    /// A reply was sent; nothing more happens.
    Refused,
    /// The reserve call is in flight.
    Waiting(Pending),
    /// Sent upstream; its response is metered as it passes.
    Upstream(Upstream),
    /// Finished: reported and settled.
    Done,
}

/// A request sent upstream.
#[derive(Debug, Default)]
struct Upstream {
    /// What was reserved for it (none when no limit applies).
    reservation: Option<Reservation>,
    /// Meters the response body (and strips the usage chunk when asked),
    /// from the response headers on.
    tap: Option<StreamTap>,
    /// A non-streamed response held until complete, for the usage headers.
    hold_body: bool,
    /// The response's status (0 until its headers arrive).
    status: u16,
    first_byte_ms: Option<u64>,
}

/// State of one request.
pub struct RequestFlow {
    plugin: Rc<Plugin>,
    shared: Rc<RefCell<Worker>>,
    phase: Phase,
    pub request_id: String,
    pub api: Option<Api>,
    pub tenant: Option<TenantRef>,
    pub path: String,
    pub info: Option<RequestInfo>,
    pub user: Option<String>,
    /// The route's provider (index into the plugin's providers).
    provider: usize,
    /// A named key: its own model list, limits and shadow mode.
    key: Option<Rc<KeyInfo>>,
    /// The levels beyond the tenant that limit this request.
    scope: Option<Rc<Scope>>,
    /// Shadow mode: the refusal code a refusal would have had.
    pub shadow_refusal: Option<String>,
    /// The route believes the end-user header.
    trust_end_user: bool,
    /// A `GET /tollgate/v1/quota` self-service request.
    quota: bool,
    body: Option<Value>,
    body_dirty: bool,
    extra_headers: Vec<(String, String)>,
    model_served: String,
    input_estimate: u64,
    output_requested: u64,
    clamp_tried: bool,
    reserve_attempts: u32,
    /// Admitted from this worker's quota lease, without a call.
    leased: bool,
    clamped_to: Option<u64>,
    fallback_used: bool,
    slot: Option<Slot>,
    /// Hide the usage chunk tollgate asked for from the client.
    strip_usage: bool,
    /// The route's provider takes `stream_options.include_usage`.
    inject_usage: bool,
    start_ms: u64,
    /// The failover target chosen (routes to a provider with targets).
    target: Option<upstream::Choice>,
    /// What the target answered, once its response headers came (or the
    /// request ended without them).
    target_outcome: Option<Outcome>,
    /// When the reserve call in flight was made.
    call_sent_ms: u64,
    /// The reserve was sent again once after a stalled worker missed its
    /// answer (see [`Self::stalled_timeout`]).
    stall_retried: bool,
}

impl RequestFlow {
    pub fn new(plugin: Rc<Plugin>, shared: Rc<RefCell<Worker>>) -> Self {
        RequestFlow {
            plugin,
            shared,
            phase: Phase::Start,
            request_id: String::new(),
            api: None,
            tenant: None,
            path: String::new(),
            info: None,
            user: None,
            provider: 0,
            key: None,
            scope: None,
            shadow_refusal: None,
            trust_end_user: false,
            quota: false,
            body: None,
            body_dirty: false,
            extra_headers: Vec::new(),
            model_served: String::new(),
            input_estimate: 0,
            output_requested: 0,
            clamp_tried: false,
            reserve_attempts: 0,
            leased: false,
            clamped_to: None,
            fallback_used: false,
            slot: None,
            strip_usage: false,
            inject_usage: false,
            start_ms: 0,
            target: None,
            target_outcome: None,
            call_sent_ms: 0,
            stall_retried: false,
        }
    }

    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    pub fn tenant(&self) -> Option<&crate::config::Tenant> {
        self.tenant.as_ref().and_then(|t| t.get(&self.plugin))
    }

    /// The counter a refusal of this request increments: by tenant (or
    /// `unknown`) and refusal code.
    pub fn refusal_metric(&self, reply: &LocalReply) -> String {
        let tenant = self.tenant().map(|t| self.plugin.metric_tenant(t));
        let code = reply.header("x-tollgate-error").unwrap_or("unknown");
        metrics::refused(tenant.as_deref().unwrap_or("unknown"), code)
    }

    /// The filter state of a refusal of this request (the access log's
    /// audit trail of refusals).
    pub fn refusal_properties(&self, reply: &LocalReply) -> Vec<(&'static str, String)> {
        record::refusal_properties(
            &self.plugin,
            self.tenant(),
            self.user.as_deref(),
            &self.request_id,
            self.api,
            self.info.as_ref().map_or(self.model_served.as_str(), |i| i.model.as_str()),
            reply.header("x-tollgate-error").unwrap_or("unknown"),
            reply.header("x-tollgate-limit"),
            self.key.as_ref().map(|k| &*k.id),
        )
    }

    fn family(&self) -> Family {
        self.api.map_or(Family::OpenAi, Api::family)
    }

    fn refuse(&mut self, refusal: &Refusal) -> LocalReply {
        self.phase = Phase::Refused;
        llm::render(self.family(), refusal, &self.request_id, None)
    }

    /// Request headers arrived. `new_request_id` is used when the request
    /// carries none.
    pub fn on_request_headers(
        &mut self,
        headers: &Headers,
        end_of_stream: bool,
        now_ms: u64,
        new_request_id: impl FnOnce() -> String,
    ) -> HeadersStep {
        self.on_request_headers_with(headers, end_of_stream, now_ms, None, new_request_id)
    }

    /// [`Self::on_request_headers`] with the payload Envoy's `jwt_authn`
    /// filter left in dynamic metadata, when the host contexts found one.
    pub fn on_request_headers_with(
        &mut self,
        headers: &Headers,
        end_of_stream: bool,
        now_ms: u64,
        jwt_authn_payload: Option<&[u8]>,
        new_request_id: impl FnOnce() -> String,
    ) -> HeadersStep {
        let plugin = Rc::clone(&self.plugin);
        self.start_ms = now_ms;
        self.request_id = api_key::header(headers, &plugin.request_id_header)
            .filter(|v| !v.is_empty() && v.len() <= 200)
            .map(str::to_string)
            .unwrap_or_else(new_request_id);
        self.path = api_key::header(headers, ":path").unwrap_or("/").to_string();

        let bare_path = self.path.split('?').next().unwrap_or_default();
        if bare_path == QUOTA_PATH {
            // Self-service quota: the caller's own levels, from a pure check
            // that charges nothing. Identified like any request.
            self.quota = true;
            self.api = Some(Api::OpenaiChat);
            return self.resolve(headers, end_of_stream, now_ms, jwt_authn_payload);
        }
        let Some(route) = plugin.route_for(&self.path) else {
            return match plugin.unmatched_routes {
                UnmatchedRoutes::Pass => {
                    // Not tollgate's request: nothing to log or settle.
                    self.phase = Phase::Done;
                    HeadersStep::PassThrough {
                        remove: headers
                            .iter()
                            .map(|(name, _)| name.to_ascii_lowercase())
                            .filter(|name| name.starts_with(header_plan::OWN_HEADER_PREFIX))
                            .collect(),
                    }
                }
                UnmatchedRoutes::Deny => HeadersStep::Reply(self.refuse(&Refusal::UnknownRoute)),
            };
        };
        self.api = Some(route.api);
        self.provider = route.provider;
        self.trust_end_user = route.trust_end_user_header;
        self.resolve(headers, end_of_stream, now_ms, jwt_authn_payload)
    }

    /// Identity, then the rest of the headers' step.
    fn resolve(
        &mut self,
        headers: &Headers,
        end_of_stream: bool,
        now_ms: u64,
        jwt_authn_payload: Option<&[u8]>,
    ) -> HeadersStep {
        let plugin = Rc::clone(&self.plugin);

        match resolve_identity(&plugin, headers, &self.path, jwt_authn_payload, now_ms / 1000) {
            Ok(Who::Known(t, user, key)) => {
                self.user = user;
                self.key = key;
                self.tenant = plugin.tenant_index(&t.id).map(TenantRef::Static);
            }
            Ok(Who::Registry(ask, user)) => {
                self.user = user;
                let cached = {
                    let mut w = self.shared.borrow_mut();
                    let w = &mut *w;
                    w.registry.resolve(&plugin, &ask, w.slots.as_ref(), now_ms)
                };
                match cached {
                    Cached::Hit(r) => {
                        self.tenant = Some(r.tenant);
                        self.key = r.key;
                    }
                    Cached::Refused(r) => return HeadersStep::Reply(self.refuse(&r)),
                    Cached::Lookup(path) => {
                        let Some(reg) = plugin.registry.as_ref() else {
                            return HeadersStep::Reply(self.refuse(&Refusal::InvalidApiKey));
                        };
                        self.phase = Phase::Resolving { ask, end_of_stream };
                        return HeadersStep::Lookup(LookupCall {
                            cluster: reg.cluster.clone(),
                            path,
                            authority: reg.authority.clone(),
                            timeout_ms: reg.timeout_ms,
                        });
                    }
                }
            }
            Err(r) => return HeadersStep::Reply(self.refuse(&r)),
        }
        self.after_identity(headers, end_of_stream, now_ms)
    }

    /// The registry's answer to the lookup of [`HeadersStep::Lookup`]
    /// (`status` and `body` `None`: no answer), with the request headers as
    /// they are now.
    pub fn on_lookup_answer(
        &mut self,
        headers: &Headers,
        status: Option<u32>,
        body: Option<&[u8]>,
        now_ms: u64,
    ) -> HeadersStep {
        let Phase::Resolving { ask, end_of_stream } = std::mem::replace(&mut self.phase, Phase::Start) else {
            return HeadersStep::Reply(self.refuse(&Refusal::Internal { detail: "unexpected lookup answer".into() }));
        };
        let plugin = Rc::clone(&self.plugin);
        let resolved = {
            let mut w = self.shared.borrow_mut();
            let w = &mut *w;
            w.registry.answered(&plugin, &ask, status, body, w.slots.as_ref(), now_ms)
        };
        match resolved {
            Ok(r) => {
                self.tenant = Some(r.tenant);
                self.key = r.key;
                self.after_identity(headers, end_of_stream, now_ms)
            }
            Err(r) => HeadersStep::Reply(self.refuse(&r)),
        }
    }

    /// Whether the request waits for the registry.
    pub fn resolving(&self) -> bool {
        matches!(self.phase, Phase::Resolving { .. })
    }

    /// The rest of the request headers' step, once the tenant is known.
    fn after_identity(&mut self, headers: &Headers, end_of_stream: bool, now_ms: u64) -> HeadersStep {
        let plugin = Rc::clone(&self.plugin);
        let tref = self.tenant.clone();
        let Some(tenant) = tref.as_ref().and_then(|t| t.get(&plugin)) else {
            return HeadersStep::Reply(self.refuse(&Refusal::Internal { detail: "tenant not resolved".into() }));
        };
        if !tenant.enabled {
            return HeadersStep::Reply(self.refuse(&Refusal::TenantDisabled));
        }
        if self.quota {
            return self.quota_call(headers);
        }
        // A WebSocket upgrade carries its traffic in frames tollgate cannot
        // meter: refused unless the tier lets it through (then one request,
        // reported unmetered), never passed silently.
        let websocket = is_websocket_upgrade(headers);
        if websocket && !tenant.policy.allow_websocket {
            return HeadersStep::Reply(self.refuse(&Refusal::WebSocketNotAllowed));
        }
        if !websocket && api_key::header(headers, ":method") != Some("POST") {
            return HeadersStep::Reply(self.refuse(&Refusal::MethodNotAllowed));
        }
        let Some(route_provider) = plugin.provider(self.provider) else {
            return HeadersStep::Reply(self.refuse(&Refusal::Internal { detail: "route names no provider".into() }));
        };
        let tier_targets = tenant.policy.targets.iter().find(|(g, _)| *g == self.provider).map(|(_, t)| Rc::clone(t));
        if !route_provider.targets.is_empty() || tier_targets.is_some() {
            let targets = match tier_targets.as_deref() {
                Some(list) => upstream::Targets { list, weighted: false },
                None => upstream::Targets::of(route_provider),
            };
            if let Err(reply) = self.pick_target(tenant, route_provider, targets, now_ms) {
                return HeadersStep::Reply(reply);
            }
        }
        let Some(provider) = plugin.provider(self.provider) else {
            return HeadersStep::Reply(self.refuse(&Refusal::Internal { detail: "target names no provider".into() }));
        };
        let Some(provider_key) = tenant.provider_keys.get(self.provider).and_then(Option::as_deref) else {
            return HeadersStep::Reply(
                self.refuse(&Refusal::ProviderNotConfigured { provider: provider.name.clone() }),
            );
        };
        if end_of_stream && !websocket {
            return HeadersStep::Reply(self.refuse(&Refusal::BodyRequired));
        }
        // The end user: a verified token's claim, else the platform's header
        // where the route trusts it (elsewhere the header is removed below).
        if let (None, true, Some(h)) = (&self.user, self.trust_end_user, plugin.end_user_header.as_deref()) {
            if let Some(v) = api_key::header(headers, h) {
                if !crate::config::valid_end_user(v) {
                    return HeadersStep::Reply(self.refuse(&Refusal::Custom {
                        status: 400,
                        code: "invalid_end_user".into(),
                        message: format!("The {h} header must be 1-128 visible ASCII characters."),
                    }));
                }
                self.user = Some(v.to_string());
            }
        }
        self.inject_usage = provider.inject_stream_usage;
        let limit = tenant.policy.max_request_bytes;
        if let Some(len) = api_key::header(headers, "content-length").and_then(|v| v.trim().parse::<u64>().ok()) {
            if len > limit {
                return HeadersStep::Reply(self.refuse(&Refusal::RequestTooLarge { limit }));
            }
        }
        let new_path = plugin
            .client_key_query_param
            .as_deref()
            .and_then(|param| header_plan::strip_query_param(&self.path, param));
        if let Some(p) = &new_path {
            self.path = p.clone();
        }
        let mut header_plan = header_plan::build(&plugin, tenant, provider, provider_key, headers, new_path.as_deref());
        header_plan.set.push((plugin.request_id_header.clone(), self.request_id.clone()));
        if self.target.is_some() {
            // Envoy routes a target by name (then removes the header).
            header_plan.set.push((header_plan::PROVIDER_HEADER.into(), provider.name.clone()));
        }
        if let (false, Some(h)) = (self.trust_end_user, plugin.end_user_header.as_ref()) {
            if api_key::header(headers, h).is_some() && !header_plan.remove.contains(h) {
                header_plan.remove.push(h.clone());
            }
        }
        if websocket {
            return self.admit_websocket(header_plan);
        }
        HeadersStep::ReadBody(header_plan)
    }

    /// A WebSocket upgrade the tier lets through: the model the handshake
    /// names (Realtime's `?model=`), if any, is checked like a body's; it is
    /// admitted as one request with no tokens or dollars, and its frames are
    /// neither read nor metered ([`inspect::Endpoint::WebSocket`]).
    fn admit_websocket(&mut self, plan: header_plan::HeaderPlan) -> HeadersStep {
        let plugin = Rc::clone(&self.plugin);
        let Some(tenant) = self.tenant.as_ref().and_then(|t| t.get(&plugin)) else {
            return HeadersStep::Reply(self.refuse(&Refusal::Internal { detail: "tenant not resolved".into() }));
        };
        let policy = &tenant.policy;
        let model = api_key::query_param(&self.path, "model").unwrap_or_default().to_string();
        if !model.is_empty() {
            if let Err(r) = inspect::check_model(policy, &model) {
                return HeadersStep::Reply(self.refuse(&r));
            }
            if self.key.as_ref().and_then(|k| k.models.as_ref()).is_some_and(|m| !m.allows(&model)) {
                return HeadersStep::Reply(self.refuse(&Refusal::ModelNotAllowed { model }));
            }
        }
        self.model_served = model.clone();
        self.info = Some(RequestInfo {
            model,
            stream: true,
            json_array_stream: false,
            max_output_tokens: None,
            include_usage: true,
            asked: Default::default(),
            endpoint: inspect::Endpoint::WebSocket,
        });
        self.output_requested = 0;
        let step = match &plugin.rate_limit {
            Some(rl) => {
                self.scope = self.scope_of(tenant, policy);
                if levels::has_limits(policy, self.scope.as_deref()) {
                    let check_only = rl.mode == RlsMode::CheckThenCharge;
                    self.reserve_call(check_only, 0, self.start_ms)
                } else {
                    self.forward()
                }
            }
            None => self.forward(),
        };
        match step {
            BodyStep::Call(call) => HeadersStep::Admit(plan, call),
            BodyStep::Forward { .. } => HeadersStep::Forward(plan),
            BodyStep::Reply(reply) => HeadersStep::Reply(reply),
            BodyStep::NeedMore => {
                HeadersStep::Reply(self.refuse(&Refusal::Internal { detail: "no body to wait for".into() }))
            }
        }
    }

    /// Picks the failover target of a route to `group` among `targets` (the
    /// provider's, or the tier's own): the request then goes as to that
    /// provider. Refused when the
    /// tenant holds no key for any target, or every one it has is down.
    fn pick_target(
        &mut self,
        tenant: &crate::config::Tenant,
        group: &crate::config::Provider,
        targets: upstream::Targets<'_>,
        now_ms: u64,
    ) -> Result<(), LocalReply> {
        let plugin = Rc::clone(&self.plugin);
        let picked = {
            let mut w = self.shared.borrow_mut();
            w.target_turn = w.target_turn.wrapping_add(1);
            upstream::pick(
                &plugin.providers,
                targets,
                w.target_turn,
                |i| tenant.provider_keys.get(i).and_then(Option::as_deref),
                w.slots.as_ref(),
                now_ms,
                &plugin.circuit,
            )
        };
        match picked {
            Picked::Target(choice) => {
                self.provider = choice.provider;
                self.target = Some(choice);
                if choice.probe {
                    self.circuit_changed(choice.provider, circuit::State::HalfOpen, None);
                }
                Ok(())
            }
            Picked::NoCredential => Err(self.refuse(&Refusal::ProviderNotConfigured { provider: group.name.clone() })),
            // Every target is up, but the provider throttled this tenant's
            // own key everywhere: its 429, not an outage.
            Picked::Unavailable { retry_after_ms, open: 0 } => Err(self.refuse_for(
                429,
                "provider_rate_limited",
                format!(
                    "The provider is rate limiting this account's key; retry after {} s.",
                    retry_after_ms.div_ceil(1000)
                ),
                retry_after_ms,
            )),
            Picked::Unavailable { retry_after_ms, .. } => Err(self.refuse_for(
                503,
                "provider_unavailable",
                format!(
                    "Every upstream serving '{}' is unavailable right now; retry after {} s.",
                    group.name,
                    retry_after_ms.div_ceil(1000)
                ),
                retry_after_ms,
            )),
        }
    }

    /// A refusal the client may retry after `retry_after_ms`, with the retry
    /// headers the SDKs read.
    fn refuse_for(&mut self, status: u16, code: &str, message: String, retry_after_ms: u64) -> LocalReply {
        let mut reply = self.refuse(&Refusal::Custom { status, code: code.into(), message });
        reply.headers.extend(llm::retry_headers(retry_after_ms, true));
        reply
    }

    /// A WebSocket upgrade (admitted from its headers): its request "body"
    /// is the client's frames, never read. `Some(false)`: hold them until
    /// the reserve's answer (letting a body chunk go would let the request
    /// go too); `Some(true)`: let them pass; `None`: not a WebSocket.
    pub fn unread_body(&self) -> Option<bool> {
        self.passes_body().then_some(!matches!(self.phase, Phase::Waiting(_)))
    }

    fn passes_body(&self) -> bool {
        self.info.as_ref().is_some_and(|i| i.endpoint == inspect::Endpoint::WebSocket)
    }

    /// A target's circuit changed: its gauge (on the next tick) and, for a
    /// real change, one log line from the worker that made it.
    fn circuit_changed(&self, provider: usize, state: circuit::State, why: Option<Transition>) {
        let Some(p) = self.plugin.provider(provider) else { return };
        match why {
            Some(Transition::Opened { for_ms, failures }) => log::warn!(
                "tollgate: provider target '{}' circuit opened for {} s after {} failure(s)",
                p.name,
                for_ms.div_ceil(1000),
                failures
            ),
            Some(Transition::Paused { for_ms }) => log::warn!(
                "tollgate: provider target '{}' paused for {} s by the provider's 429",
                p.name,
                for_ms.div_ceil(1000)
            ),
            Some(Transition::Closed) => log::warn!("tollgate: provider target '{}' circuit closed", p.name),
            None => {}
        }
        self.shared.borrow_mut().circuit_gauges.push((metrics::circuit_state(&p.name), state.gauge()));
    }

    /// Whether the upstream's answer matters to a circuit breaker (the host
    /// then hands over the response headers with [`Self::on_upstream_answer`]).
    pub fn watches_upstream(&self) -> bool {
        // Only a request that left: tollgate's own replies (a limit's 429,
        // the limiter's 503) pass through the same response callbacks, and
        // say nothing about the target.
        self.target.is_some() && self.target_outcome.is_none() && matches!(self.phase, Phase::Upstream(_))
    }

    /// The target's response headers (pairs encoding): its status and retry
    /// hint go to the target's circuit.
    pub fn on_upstream_answer(&mut self, raw_headers: &[u8], now_ms: u64) {
        let status = crate::envoy::pairs::status(raw_headers);
        let retry = (status == 429)
            .then(|| {
                let map = crate::envoy::pairs::decode(raw_headers)?;
                let find = |name: &str| {
                    map.iter().find(|(k, _)| *k == name.as_bytes()).and_then(|(_, v)| std::str::from_utf8(v).ok())
                };
                circuit::retry_after_ms(find("retry-after-ms"), find("retry-after"))
            })
            .flatten();
        self.report_target(Outcome::of_status(status, retry), now_ms);
    }

    fn report_target(&mut self, outcome: Outcome, now_ms: u64) {
        let Some(choice) = self.target else { return };
        if self.target_outcome.is_some() {
            return;
        }
        self.target_outcome = Some(outcome);
        let plugin = Rc::clone(&self.plugin);
        let (Some(p), Some(key)) = (
            plugin.provider(choice.provider),
            self.tenant().and_then(|t| t.provider_keys.get(choice.provider)).and_then(Option::as_deref),
        ) else {
            return;
        };
        let result = {
            let w = self.shared.borrow();
            let answer = circuit::Answer {
                outcome,
                probe: choice.probe,
                probe_token: choice.probe_token,
                clean: choice.clean,
                credential: key,
                scope: p.rate_limited_scope,
            };
            circuit::report(w.slots.as_ref(), &p.circuit_key, &answer, now_ms, &plugin.circuit)
        };
        match result {
            Ok(Some(t)) => {
                let state = if t == Transition::Closed { circuit::State::Closed } else { circuit::State::Open };
                self.circuit_changed(choice.provider, state, Some(t));
            }
            Ok(None) => {}
            Err(e) => log::debug!("tollgate: circuit record of '{}' not updated: {e:?}", p.name),
        }
    }

    /// The quota endpoint's pure check over the caller's own levels (its
    /// tenant, key and end user; never the shared pools).
    fn quota_call(&mut self, headers: &Headers) -> HeadersStep {
        if api_key::header(headers, ":method") != Some("GET") {
            return HeadersStep::Reply(self.refuse(&Refusal::MethodNotAllowed));
        }
        let plugin = Rc::clone(&self.plugin);
        let (Some(rl), Some(tenant)) = (plugin.rate_limit.as_ref(), self.tenant()) else {
            return HeadersStep::Reply(quota::reply(self.quota_who(), &[], &self.request_id));
        };
        let key = self.key.as_ref().filter(|k| !k.limits.is_empty()).map(|k| k.scope());
        let user = match (&self.user, &tenant.policy.users) {
            (Some(u), Some(l)) => Some((Rc::from(u.as_str()), Rc::clone(l))),
            _ => None,
        };
        let scope = Scope { key, user, pool: None };
        let scope = (!scope.is_empty()).then_some(scope);
        let (req, items) =
            reserve::build_reserve(&rl.domain, &tenant.id, &tenant.policy, scope.as_ref(), 0, Amounts::default(), true);
        if items.is_empty() {
            return HeadersStep::Reply(quota::reply(self.quota_who(), &[], &self.request_id));
        }
        self.phase = Phase::Waiting(Pending { items, estimate: Amounts::default(), lease: 0, replay: None });
        HeadersStep::Call(RlsCall {
            cluster: rl.cluster.clone(),
            message: req.encode_to_vec(),
            metadata: Vec::new(),
            timeout_ms: rl.timeout_ms,
        })
    }

    fn quota_who(&self) -> quota::Who<'_> {
        quota::Who {
            tenant: self.tenant().map_or("", |t| t.id.as_str()),
            tier: self.tenant().map_or("", |t| &*t.tier),
            key: self.key.as_ref().map(|k| &*k.id),
            user: self.user.as_deref(),
        }
    }

    /// A piece of the request body arrived; `buffered` is the total so far.
    /// `None` means the body is complete and within limits: call
    /// [`Self::on_request_body`] with it.
    pub fn on_request_body_size(&mut self, buffered: u64, end_of_stream: bool) -> Option<BodyStep> {
        if self.resolving() {
            // Held until the registry answers (the tenant's own limit is
            // checked then); never beyond the largest a tier may allow.
            if buffered > crate::config::MAX_REQUEST_BYTES_CEILING {
                let limit = crate::config::MAX_REQUEST_BYTES_CEILING;
                return Some(BodyStep::Reply(self.refuse(&Refusal::RequestTooLarge { limit })));
            }
            return Some(BodyStep::NeedMore);
        }
        let limit = self.tenant()?.policy.max_request_bytes;
        if buffered > limit {
            return Some(BodyStep::Reply(self.refuse(&Refusal::RequestTooLarge { limit })));
        }
        (!end_of_stream).then_some(BodyStep::NeedMore)
    }

    /// The whole body is here.
    pub fn on_request_body(&mut self, body: &[u8], now_ms: u64) -> BodyStep {
        let plugin = Rc::clone(&self.plugin);
        let (Some(api), Some(tref)) = (self.api, self.tenant.clone()) else {
            return BodyStep::Forward { body: None, set_headers: Vec::new() };
        };
        let tenant_idx = tref.slot();
        let Some(tenant) = tref.get(&plugin) else {
            return BodyStep::Forward { body: None, set_headers: Vec::new() };
        };
        let policy = &tenant.policy;
        if body.len() as u64 > policy.max_request_bytes {
            return BodyStep::Reply(self.refuse(&Refusal::RequestTooLarge { limit: policy.max_request_bytes }));
        }
        let (info, mut json) = match inspect::inspect(api, &self.path, body) {
            Ok(x) => x,
            Err(r) => return BodyStep::Reply(self.refuse(&r)),
        };
        self.model_served = info.model.clone();
        if let Err(r) = inspect::check_model(policy, &info.model) {
            return BodyStep::Reply(self.refuse(&r));
        }
        if self.key.as_ref().and_then(|k| k.models.as_ref()).is_some_and(|m| !m.allows(&info.model)) {
            return BodyStep::Reply(self.refuse(&Refusal::ModelNotAllowed { model: info.model.clone() }));
        }

        // Graceful degradation: past the configured share of a budget, serve
        // the tier's fallback model (priced and reserved at its rates).
        if let (Some(fallback), Some(at)) = (&policy.fallback_model, policy.fallback_at_permille) {
            let used = self.shared.borrow().budget_used.get(&tenant_idx).copied().unwrap_or(0);
            if used >= u64::from(at) && *fallback != info.model {
                match api.swap_model(&self.path, &mut json, &info.model, fallback) {
                    llm::ModelSwap::Path(new_path) => {
                        self.extra_headers.push((":path".into(), new_path.clone()));
                        self.path = new_path;
                    }
                    llm::ModelSwap::Body => self.body_dirty = true,
                    llm::ModelSwap::Unchanged => {}
                }
                self.model_served = fallback.clone();
                self.fallback_used = true;
            }
        }

        // The target's own name for the model (an Azure deployment); prices,
        // pools and metrics keep the name asked for.
        if let Some(to) = plugin.provider(self.provider).and_then(|p| p.mapped_model(&self.model_served)) {
            match api.swap_model(&self.path, &mut json, &self.model_served, to) {
                llm::ModelSwap::Path(new_path) => {
                    self.extra_headers.push((":path".into(), new_path.clone()));
                    self.path = new_path;
                }
                llm::ModelSwap::Body => self.body_dirty = true,
                llm::ModelSwap::Unchanged => {}
            }
        }

        // Usage for streams the client did not ask it for.
        if api == Api::OpenaiChat
            && info.stream
            && !info.include_usage
            && self.inject_usage
            && llm::openai_chat::inject_include_usage(&mut json)
        {
            self.strip_usage = true;
            self.body_dirty = true;
        }

        // In-flight cap across the Envoy's workers (see `inflight`). The slot
        // is taken now, before the reserve call, so concurrent requests cannot
        // all pass the check; every stream (reset or not) ends in
        // `on_stream_done`, which gives it back.
        if let Some(cap) = policy.max_concurrent_requests {
            let taken = self.shared.borrow_mut().acquire_slot(tenant_idx, &tenant.id, cap, now_ms);
            match taken {
                Ok(slot) => self.slot = Some(slot),
                Err(_) => {
                    let refusal = Refusal::Custom {
                        status: 429,
                        code: "concurrency_limited".into(),
                        message: format!(
                            "This account already has {cap} requests in flight; retry when one completes."
                        ),
                    };
                    self.phase = Phase::Refused;
                    let mut reply = llm::render(api.family(), &refusal, &self.request_id, Some("requests"));
                    reply.headers.extend(llm::retry_headers(1000, true));
                    return BodyStep::Reply(reply);
                }
            }
        }

        self.input_estimate = usage::estimate_tokens_from_bytes(body.len() as u64, plugin.metering.bytes_per_token);
        self.output_requested = info.max_output_tokens.unwrap_or(policy.default_max_output_tokens);
        let had_max = info.max_output_tokens.is_some();
        self.info = Some(info);
        self.body = Some(json);
        // With the clamp on, a request without a max-output field gets the
        // tier default written in, so the provider cannot produce more than
        // was reserved.
        if policy.clamp_max_output_tokens && !had_max && api != Api::OpenaiEmbeddings {
            self.clamp_output(self.output_requested);
            self.clamped_to = None;
        }

        let Some(rl) = &plugin.rate_limit else {
            return self.forward();
        };
        self.scope = self.scope_of(tenant, policy);
        if !levels::has_limits(policy, self.scope.as_deref()) {
            return self.forward();
        }
        let output = self.output_requested;
        self.reserve_call(rl.mode == RlsMode::CheckThenCharge, output, now_ms)
    }

    /// The key, user and pool levels of this request (`None`: the tenant's
    /// alone).
    fn scope_of(&self, tenant: &crate::config::Tenant, policy: &crate::config::Policy) -> Option<Rc<Scope>> {
        let key = self.key.as_ref().filter(|k| !k.limits.is_empty() || k.shadow).map(|k| k.scope());
        let user = match (&self.user, &policy.users) {
            (Some(u), Some(l)) => Some((Rc::from(u.as_str()), Rc::clone(l))),
            _ => None,
        };
        let pool = self.plugin.pool_for(self.provider, &self.model_served).map(|p| PoolScope {
            name: Rc::clone(&p.name),
            limits: Rc::clone(&p.limits),
            share: p.shares.get(&*tenant.tier).map(|l| (Rc::clone(&tenant.tier), Rc::clone(l))),
        });
        let scope = Scope { key, user, pool };
        (!scope.is_empty()).then(|| Rc::new(scope))
    }

    /// Whose quota this request draws on (leases are per account).
    fn account(&self) -> Option<Account> {
        Some(Account { slot: self.tenant.as_ref()?.slot(), scope: self.scope.clone() })
    }

    /// Shadow mode for this request: its tier, tenant or key says so.
    fn shadow(&self) -> bool {
        self.tenant().is_some_and(|t| t.policy.shadow) || self.key.as_ref().is_some_and(|k| k.shadow)
    }

    fn estimate_for(&self, output: u64) -> Amounts {
        if self.info.as_ref().is_some_and(|i| i.endpoint.is_free()) {
            // Token counting: one request, no tokens or dollars.
            return Amounts::default();
        }
        let usage = Usage {
            input_uncached: self.input_estimate,
            output,
            total: self.input_estimate.saturating_add(output),
            ..Usage::default()
        };
        // At the rates of the tier and speed asked for, and (by the price
        // table) of the estimated input's size.
        let asked = self.info.as_ref().map(|i| &i.asked);
        let micros = self
            .plugin
            .pricing
            .as_ref()
            .map_or(0, |p| p.cost_as(&self.model_served, &usage, asked.unwrap_or(&Default::default())).micros);
        Amounts { tokens: usage.total, input: self.input_estimate, output, micros }
    }

    fn reserve_call(&mut self, check_only: bool, output: u64, now_ms: u64) -> BodyStep {
        let plugin = Rc::clone(&self.plugin);
        let (Some(rl), Some(tref)) = (plugin.rate_limit.as_ref(), self.tenant.clone()) else {
            return self.forward();
        };
        let Some(tenant) = tref.get(&plugin) else {
            return self.forward();
        };
        let Some(acct) = self.account() else {
            return self.forward();
        };
        let estimate = self.estimate_for(output);
        // Quota leasing: admit from this worker's lease without a call, or
        // reserve a new lease along with this request while there is ample
        // room. A clamp retry (a tight budget) never leases, nor does shadow
        // mode (a lease would refuse nothing, but hold quota back).
        let mut lease = 0;
        let leasing = !check_only && self.reserve_attempts == 0 && !self.shadow() && rl.mode == RlsMode::Reserve;
        if leasing {
            let mut shared = self.shared.borrow_mut();
            let n = match tenant.policy.lease {
                LeaseSize::Off => 0,
                LeaseSize::Fixed(n) => n,
                LeaseSize::Auto => shared.leases.auto_size(&acct, rl.lease_ms, AUTO_LEASE_MAX, now_ms),
            };
            let refill =
                n > 0 && shared.leases.refill_due(&acct, n, now_ms) && shared.leases.room_for(&acct, n, estimate);
            if refill {
                // This request asks for the next lease; until it is
                // answered, the others draw from what is left, or reserve
                // for themselves alone.
                lease = n;
                let until = now_ms.saturating_add(rl.timeout_ms.saturating_mul(2)).saturating_add(100);
                shared.leases.refills.insert(acct.clone(), until);
            } else if let Some(states) = shared.leases.draw(&acct, estimate, now_ms) {
                drop(shared);
                self.leased = true;
                let reservation = Reservation {
                    estimate,
                    states,
                    charged: true,
                    fail_open: false,
                    replay: None,
                    lease: 0,
                    shadow: false,
                };
                return self.forward_with(Some(reservation));
            }
        }
        let total = times(estimate, 1 + lease);
        let (req, items) = reserve::build_reserve(
            &rl.domain,
            &tenant.id,
            &tenant.policy,
            self.scope.as_deref(),
            1 + lease,
            total,
            check_only,
        );
        let message = req.encode_to_vec();
        // A reservation carries an idempotency key (one per attempt: a clamp
        // retry is a new reservation), so that a reserve whose answer is lost
        // can be resolved later by sending it again.
        let (metadata, replay) = if check_only {
            (Vec::new(), None)
        } else {
            self.reserve_attempts += 1;
            let key = format!("{}:r{}", self.idempotency_base(), self.reserve_attempts);
            (vec![(rls::META_IDEMPOTENCY_KEY.to_string(), key.clone())], Some(Replay { message: message.clone(), key }))
        };
        self.phase = Phase::Waiting(Pending { items, estimate, lease, replay });
        self.call_sent_ms = now_ms;
        BodyStep::Call(RlsCall { cluster: rl.cluster.clone(), message, metadata, timeout_ms: rl.timeout_ms })
    }

    fn forward(&mut self) -> BodyStep {
        self.forward_with(None)
    }

    /// A reserve failed far later than its deadline: the timer could not
    /// fire on time because this worker's thread was busy, so the failure
    /// says nothing about the service. Envoy reports its call timeout as
    /// `UNAVAILABLE` (14, measured with Envoy 1.40), like a refused
    /// connection; a refused connection fails at once, so lateness is what
    /// tells them apart. Once per request.
    fn stalled_timeout(&self, status: u32, timeout_ms: u64, now_ms: u64) -> bool {
        const DEADLINE_EXCEEDED: u32 = 4;
        const UNAVAILABLE: u32 = 14;
        let late = now_ms.saturating_sub(self.call_sent_ms);
        matches!(status, DEADLINE_EXCEEDED | UNAVAILABLE)
            && !self.stall_retried
            && late >= timeout_ms.saturating_mul(3) / 2 + 50
    }

    /// Sends the request upstream under `reservation`.
    fn forward_with(&mut self, reservation: Option<Reservation>) -> BodyStep {
        self.phase = Phase::Upstream(Upstream { reservation, ..Upstream::default() });
        let body = if self.body_dirty { self.body.as_ref().and_then(|v| serde_json::to_vec(v).ok()) } else { None };
        let mut set_headers = std::mem::take(&mut self.extra_headers);
        if let Some(b) = &body {
            // The request headers are still held: the client's length (if
            // any) is replaced before they go upstream. An untouched body
            // keeps the client's framing.
            set_headers.push(("content-length".into(), b.len().to_string()));
        }
        BodyStep::Forward { body, set_headers }
    }

    /// Rewrites the request's max-output field to `n`.
    fn clamp_output(&mut self, n: u64) {
        let Some(api) = self.api else { return };
        if self.info.as_ref().is_some_and(|i| !i.endpoint.takes_max_output()) {
            return;
        }
        let Some(obj) = self.body.as_mut().and_then(Value::as_object_mut) else { return };
        if !api.clamp_output(obj, n) {
            return;
        }
        self.body_dirty = true;
        self.clamped_to = Some(n);
    }

    /// The reserve answer arrived: `Ok(message)`, or `Err(grpc_status)` when
    /// the call failed or timed out.
    pub fn on_rls_reply(&mut self, reply: Result<&[u8], u32>, now_ms: u64) -> BodyStep {
        let plugin = Rc::clone(&self.plugin);
        let pending = match std::mem::replace(&mut self.phase, Phase::Start) {
            Phase::Waiting(pending) => pending,
            // No reserve in flight: the request goes (keeping a reservation
            // it already has).
            Phase::Upstream(up) => return self.forward_with(up.reservation),
            _ => return self.forward(),
        };
        let (Some(tref), Some(rl)) = (self.tenant.clone(), plugin.rate_limit.as_ref()) else {
            return self.forward();
        };
        if let (Err(status), Some(replay)) = (reply, &pending.replay) {
            if self.stalled_timeout(status, rl.timeout_ms, now_ms) {
                // This worker was busy (a large configuration loading, say)
                // long past the deadline: the service may well have answered
                // in time. Ask again under the same idempotency key: a
                // reserve that was made is answered, not charged twice.
                self.stall_retried = true;
                self.call_sent_ms = now_ms;
                let mut w = self.shared.borrow_mut();
                w.stall_retries += 1;
                if pending.lease > 0 {
                    // This request still holds the lease refill's turn.
                    if let Some(acct) = self.account() {
                        let until = now_ms.saturating_add(rl.timeout_ms.saturating_mul(2)).saturating_add(100);
                        w.leases.refills.insert(acct, until);
                    }
                }
                drop(w);
                let call = RlsCall {
                    cluster: rl.cluster.clone(),
                    message: replay.message.clone(),
                    metadata: vec![(rls::META_IDEMPOTENCY_KEY.to_string(), replay.key.clone())],
                    timeout_ms: rl.timeout_ms,
                };
                self.phase = Phase::Waiting(pending);
                return BodyStep::Call(call);
            }
        }
        if self.quota {
            self.phase = Phase::Refused;
            let answer = match reply {
                Ok(bytes) => rls::RateLimitResponse::decode(bytes)
                    .map(|resp| match reserve::decide(&resp, &pending.items) {
                        Verdict::Admit(states) | Verdict::Refuse { states, .. } => Some(states),
                        Verdict::Unreadable(_) => None,
                    })
                    .ok()
                    .flatten(),
                Err(_) => None,
            };
            return BodyStep::Reply(match answer {
                Some(states) => quota::reply(self.quota_who(), &states, &self.request_id),
                None => self.refuse(&Refusal::Custom {
                    status: 503,
                    code: "rate_limiter_unavailable".into(),
                    message: "The rate limiter is unavailable; retry shortly.".into(),
                }),
            });
        }
        let tenant_idx = tref.slot();
        let Some(tenant) = tref.get(&plugin) else {
            return self.forward();
        };
        let Some(acct) = self.account() else {
            return self.forward();
        };
        let policy = &tenant.policy;
        if pending.lease > 0 {
            self.shared.borrow_mut().leases.refills.remove(&acct);
        }
        let verdict = match reply {
            Ok(bytes) => match rls::RateLimitResponse::decode(bytes) {
                Ok(resp) => reserve::decide(&resp, &pending.items),
                Err(e) => Verdict::Unreadable(e.to_string()),
            },
            Err(status) => Verdict::Unreadable(format!("grpc status {status}")),
        };
        if !matches!(verdict, Verdict::Unreadable(_)) {
            for line in self.shared.borrow_mut().rls_incident.success(now_ms) {
                log::info!("{line}");
            }
        }
        match verdict {
            Verdict::Admit(states) => {
                self.note_budget(tenant_idx, &acct, &states, now_ms);
                if pending.lease > 0 {
                    self.grant_lease(&tref, &acct, &pending, &states, now_ms);
                }
                self.forward_with(Some(Reservation {
                    estimate: pending.estimate,
                    states,
                    charged: rl.mode == RlsMode::Reserve,
                    fail_open: false,
                    replay: None,
                    lease: 0,
                    shadow: false,
                }))
            }
            Verdict::Refuse { states, hit } => {
                self.note_budget(tenant_idx, &acct, &states, now_ms);
                if pending.lease > 0 {
                    // The lease did not fit; this request alone may.
                    let output = self.output_requested;
                    return self.reserve_call(false, output, now_ms);
                }
                if policy.clamp_max_output_tokens && !self.clamp_tried && rl.mode == RlsMode::Reserve {
                    self.clamp_tried = true;
                    let input_micros = self.estimate_for(0).micros;
                    let base = self.estimate_for(0);
                    let this = &*self;
                    let price = |n: u64| this.estimate_for(n).micros.saturating_sub(base.micros);
                    if let Some(n) = reserve::affordable_output(
                        &states,
                        self.input_estimate,
                        input_micros,
                        &price,
                        self.output_requested,
                    ) {
                        if n < self.output_requested {
                            self.clamp_output(n);
                            if self.clamped_to.is_some() {
                                self.output_requested = n;
                                return self.reserve_call(false, n, now_ms);
                            }
                        }
                    }
                }
                if self.shadow() {
                    // Shadow mode: evaluated and counted, not refused. The
                    // service charged nothing (all or nothing), as it would
                    // not have for the refusal; so nothing is settled.
                    self.shadow_refusal = Some(hit.level.refusal_code(hit.kind));
                    return self.forward_with(Some(Reservation {
                        estimate: pending.estimate,
                        states,
                        charged: false,
                        fail_open: false,
                        replay: None,
                        lease: 0,
                        shadow: true,
                    }));
                }
                self.phase = Phase::Refused;
                BodyStep::Reply(headers::refusal_reply(self.family(), &self.request_id, &states, &hit))
            }
            Verdict::Unreadable(why) => {
                if let Some(line) = self.shared.borrow_mut().rls_incident.failure(&tenant.id, &why, now_ms) {
                    log::warn!("{line}");
                }
                match policy.failure_mode {
                    FailureMode::Closed => {
                        self.cancel_reservation(&pending, now_ms);
                        BodyStep::Reply(self.refuse(&Refusal::Custom {
                            status: 503,
                            code: "rate_limiter_unavailable".into(),
                            message: "The rate limiter is unavailable; the request was not sent. Retry shortly.".into(),
                        }))
                    }
                    FailureMode::Open => self.fail_open(&tref, pending, now_ms),
                }
            }
        }
    }

    /// Admits within this worker's local allowance while the service is down.
    fn fail_open(&mut self, tref: &TenantRef, pending: Pending, now_ms: u64) -> BodyStep {
        let estimate = pending.estimate;
        let plugin = Rc::clone(&self.plugin);
        let tenant_idx = tref.slot();
        let (Some(rl), Some(tenant)) = (plugin.rate_limit.as_ref(), tref.get(&plugin)) else {
            return self.forward();
        };
        let share = |limit: u64| limit.saturating_mul(rl.fail_open_permille).div_ceil(1000).max(1);
        let max_requests =
            tenant.policy.limits.get(LimitKind::RequestsPerMinute).map_or(rl.fail_open_default_rpm, share);
        let max_tokens = tenant.policy.limits.get(LimitKind::TokensPerMinute).map(share);
        let admitted =
            self.shared.borrow_mut().allowance.admit(tenant_idx, now_ms, max_requests, max_tokens, estimate.tokens);
        if !admitted {
            self.cancel_reservation(&pending, now_ms);
            let reset_ms = 60_000 - now_ms % 60_000;
            self.phase = Phase::Refused;
            let refusal = Refusal::Custom {
                status: 429,
                code: "local_allowance_exhausted".into(),
                message: "The rate limiter is unavailable and this account's local allowance is used up.".into(),
            };
            let mut reply = llm::render(self.family(), &refusal, &self.request_id, Some("requests"));
            reply.headers.extend(llm::retry_headers(reset_ms, true));
            return BodyStep::Reply(reply);
        }
        self.forward_with(Some(Reservation {
            estimate,
            states: Vec::new(),
            charged: false,
            fail_open: true,
            replay: pending.replay,
            lease: pending.lease,
            shadow: false,
        }))
    }

    fn note_budget(&self, tenant_idx: usize, acct: &Account, states: &[LimitState], now_ms: u64) {
        let used = states
            .iter()
            .filter(|s| s.kind.is_budget() && s.limit > 0)
            .map(|s| s.limit.saturating_sub(s.remaining).saturating_mul(1000) / s.limit)
            .max()
            .unwrap_or(0);
        let mut shared = self.shared.borrow_mut();
        shared.budget_used.insert(tenant_idx, used);
        shared.leases.last_states.insert(acct.clone(), (states.to_vec(), now_ms));
    }

    /// Keeps the extra quota a reserve took as this worker's lease; the rest
    /// of an older lease is given back.
    fn grant_lease(&mut self, tref: &TenantRef, acct: &Account, pending: &Pending, states: &[LimitState], now_ms: u64) {
        let Some(rl) = self.plugin.rate_limit.as_ref() else { return };
        let lease = Lease {
            requests: pending.lease,
            amounts: times(pending.estimate, pending.lease),
            expires_ms: now_ms.saturating_add(rl.lease_ms),
            refill_at_ms: now_ms.saturating_add(rl.lease_ms.saturating_mul(3) / 4),
            states: states.to_vec(),
            key: pending.replay.as_ref().map_or_else(|| self.idempotency_base(), |r| r.key.clone()),
            tenant: tref.clone(),
            scope: acct.scope.clone(),
        };
        let old = self.shared.borrow_mut().leases.grant(acct.clone(), lease);
        if let Some(old) = old {
            if let Some(e) = lease_refund(&self.plugin, &old, now_ms) {
                self.journal_push(e);
            }
        }
    }

    /// Response headers arrived.
    pub fn on_response_headers(&mut self, status: u16) -> ResponseHeadersStep {
        let mut step = ResponseHeadersStep::default();
        if self.request_id.is_empty() {
            return step;
        }
        step.set.push((self.plugin.request_id_header.clone(), self.request_id.clone()));
        let Phase::Upstream(up) = &mut self.phase else {
            return step;
        };
        up.status = status;
        if let Some(r) = &up.reservation {
            step.set.extend(headers::ratelimit_headers(&r.states));
        }
        if let Some(code) = &self.shadow_refusal {
            step.set.push(("x-tollgate-shadow-refusal".into(), code.clone()));
        }
        if let Some(n) = self.clamped_to {
            step.set.push(("x-tollgate-clamped-max-tokens".into(), n.to_string()));
        }
        if self.fallback_used {
            step.set.push(("x-tollgate-model-served".into(), self.model_served.clone()));
        }
        let (Some(api), Some(info)) = (self.api, self.info.as_ref()) else {
            return step;
        };
        if info.endpoint == inspect::Endpoint::WebSocket {
            // Frames, not a response body: nothing to meter.
            return step;
        }
        let meter = ResponseMeter::new(api, info.stream, MeterLimits::default());
        up.tap = Some(StreamTap::new(meter, self.strip_usage && (200..300).contains(&status)));
        up.hold_body = !info.stream && self.plugin.metering.usage_headers;
        step.hold_body = up.hold_body;
        step
    }

    /// A response body chunk passed (streams), or the whole body (held
    /// responses, at end of stream). Says what to forward in place of the
    /// chunk: almost always the chunk unchanged, so nothing is written back.
    pub fn on_response_body(&mut self, chunk: &[u8], end_of_stream: bool, now_ms: u64) -> (BodyOut, Option<Finish>) {
        let mut read = |from: usize, len: usize| {
            let end = from.saturating_add(len).min(chunk.len());
            chunk.get(from..end).map(<[u8]>::to_vec).unwrap_or_default()
        };
        let r = self.on_response_chunk(chunk.len(), end_of_stream, now_ms, &mut read);
        (r.out, r.finish)
    }

    /// [`RequestFlow::on_response_body`] for a chunk of `chunk_len` bytes
    /// held by the host, read through `read(from, len)` only as far as the
    /// tap needs ([`StreamTap::push_read`]: a large chunk of a chat stream
    /// is read near its edges). Nothing is read when the response is not
    /// metered. When [`ChunkEdit::needs_chunk_bytes`] says so and the
    /// chunk was not read in full, writing the edit back needs it whole.
    pub fn on_response_chunk(
        &mut self,
        chunk_len: usize,
        end_of_stream: bool,
        now_ms: u64,
        read: &mut dyn FnMut(usize, usize) -> Vec<u8>,
    ) -> ResponseChunk {
        let Phase::Upstream(up) = &mut self.phase else {
            return ResponseChunk::default();
        };
        if up.first_byte_ms.is_none() && chunk_len > 0 {
            up.first_byte_ms = Some(now_ms);
        }
        let mut taken = ResponseChunk::default();
        if let Some(t) = up.tap.as_mut() {
            let pushed = t.push_read(chunk_len, read);
            taken.out.edit = pushed.edit;
            taken.chunk = pushed.chunk;
            taken.read = pushed.read;
        }
        let (out, finish) = self.after_chunk(taken.out, end_of_stream, now_ms);
        taken.out = out;
        taken.finish = finish;
        taken
    }

    /// After a chunk went through the tap: settle at the end of the stream.
    fn after_chunk(&mut self, mut out: BodyOut, end_of_stream: bool, now_ms: u64) -> (BodyOut, Option<Finish>) {
        if !end_of_stream {
            return (out, None);
        }
        if let Phase::Upstream(Upstream { tap: Some(t), .. }) = &mut self.phase {
            out.append = t.end_stream();
        }
        let finish = self.finish(now_ms, true);
        out.append.extend_from_slice(&finish.append);
        (out, Some(finish))
    }

    /// The response ended without a body (headers-only end of stream).
    pub fn on_response_end(&mut self, now_ms: u64) -> Option<Finish> {
        matches!(self.phase, Phase::Upstream(_)).then(|| self.finish(now_ms, true))
    }

    /// Whether [`RequestFlow::on_stream_done`] has anything left to do (so
    /// the host contexts reads the clock only then).
    pub fn has_work_at_stream_end(&self) -> bool {
        matches!(self.phase, Phase::Upstream(_) | Phase::Waiting(_) | Phase::Resolving { .. })
            || (matches!(self.phase, Phase::Start) && !self.request_id.is_empty())
            || self.slot.is_some()
            || (self.target.is_some() && self.target_outcome.is_none())
    }

    /// The stream is over (`on_log`): settles what has not been settled,
    /// e.g. after a client disconnect or an upstream reset.
    pub fn on_stream_done(&mut self, now_ms: u64) -> Option<Finish> {
        // No answer reached the filter (refused, or the client left first):
        // a probe gives its turn back. A request that left and had no answer
        // for the probe timeout counts as the target's timeout (a hung
        // provider whose callers give up before Envoy's route timeout).
        let hung = matches!(self.phase, Phase::Upstream(_))
            && now_ms.saturating_sub(self.start_ms) >= self.plugin.circuit.probe_timeout_ms;
        self.report_target(if hung { Outcome::Timeout } else { Outcome::Abandoned }, now_ms);
        // The client left before the request went upstream (its body still
        // coming, its tenant being looked up, its reserve in flight): the
        // access log still gets its record, as `cancelled`.
        let left_early = matches!(self.phase, Phase::Start | Phase::Resolving { .. } | Phase::Waiting(_))
            && !self.request_id.is_empty();
        let mut out = matches!(self.phase, Phase::Upstream(_)).then(|| self.finish(now_ms, false));
        if left_early {
            let properties = record::refusal_properties(
                &self.plugin,
                self.tenant(),
                self.user.as_deref(),
                &self.request_id,
                self.api,
                self.info.as_ref().map_or(self.model_served.as_str(), |i| i.model.as_str()),
                record::CLIENT_CLOSED,
                None,
                self.key.as_ref().map(|k| &*k.id),
            );
            out = Some(Finish { properties, ..Finish::default() });
        }
        if self.resolving() {
            // Gone while its lookup was in flight: the answer is never read.
            self.phase = Phase::Done;
            self.shared.borrow_mut().registry.abandoned();
        }
        if matches!(self.phase, Phase::Waiting(_)) {
            // Gone while its reserve was in flight (client disconnect): the
            // answer will never be read, so the reservation is resolved later.
            if let Phase::Waiting(pending) = std::mem::replace(&mut self.phase, Phase::Done) {
                self.cancel_reservation(&pending, now_ms);
            }
        }
        if let (Some(slot), Some(idx)) = (self.slot.take(), self.tenant.as_ref().map(TenantRef::slot)) {
            self.shared.borrow_mut().release_slot(idx, slot, now_ms);
        }
        out
    }

    fn finish(&mut self, now_ms: u64, reached_end: bool) -> Finish {
        let up = match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Upstream(up) => up,
            _ => Upstream::default(),
        };
        let plugin = Rc::clone(&self.plugin);
        let Some(tref) = self.tenant.clone() else {
            return Finish::default();
        };
        let Some(tenant) = tref.get(&plugin) else {
            return Finish::default();
        };
        let metered = up.tap.map(StreamTap::finish).unwrap_or_default();
        // The budgets' remainder after the charge needs the usage: known
        // once `report` priced it; the headers and comment are built there.
        let weight = tenant.policy.cached_read_permille;
        let charged = up.reservation.as_ref().filter(|r| r.charged && r.states.iter().any(|s| s.kind.is_budget()));
        let after = |usage: &Usage, micros: u64| {
            charged.map_or_else(Vec::new, |r| {
                quota::remaining_after(&r.states, r.estimate, usage_amounts(usage, micros, weight))
            })
        };
        let label = plugin.metric_tenant(tenant);
        let names = self.shared.borrow_mut().metric_names(&label, &self.model_served);
        let facts = record::Facts {
            tenant,
            user: self.user.as_deref(),
            request_id: &self.request_id,
            api: self.api,
            model_requested: self.info.as_ref().map_or("", |i| i.model.as_str()),
            model_served: &self.model_served,
            input_estimate: self.input_estimate,
            upstream_status: up.status,
            start_ms: self.start_ms,
            first_byte_ms: up.first_byte_ms,
            now_ms,
            reached_end,
            leased: self.leased,
            usage_headers: up.hold_body,
            key: self.key.as_ref().map(|k| &*k.id),
            shadow_refusal: self.shadow_refusal.as_deref(),
            budgets_after: Some(&after),
            free: self.info.as_ref().is_some_and(|i| i.endpoint.is_free()),
            unmetered: self.passes_body(),
        };
        let (mut out, usage, micros, estimated) = record::report(&plugin, &facts, metered, &names);
        if let Some(p) = self.target.and_then(|c| plugin.provider(c.provider)) {
            let outcome = self.target_outcome.unwrap_or(Outcome::Abandoned);
            out.counters.extend(metrics::target_counters(&label, &p.name, outcome));
        }
        let row = self.ledger_row(now_ms, |r| {
            r.requests = 1;
            r.input_tokens = usage.input_uncached;
            r.cached_read_tokens = usage.cache_read;
            r.cache_write_tokens = usage.cache_write;
            r.output_tokens = usage.output;
            r.reasoning_tokens = usage.reasoning;
            r.cost_micro_usd = micros;
            r.estimated_requests = u64::from(estimated);
        });
        self.queue_settle(up.reservation, usage, micros, row, now_ms);
        out
    }

    /// This request's usage row for the ledger (`None`: the ledger is off or
    /// the tenant unknown), filled in by `fill`.
    fn ledger_row(&self, now_ms: u64, fill: impl FnOnce(&mut UsageRow)) -> Option<UsageRow> {
        if !self.plugin.rate_limit.as_ref().is_some_and(|rl| rl.ledger) {
            return None;
        }
        let tenant = self.tenant()?;
        let model = match (self.model_served.as_str(), self.info.as_ref()) {
            ("", Some(i)) if !i.model.is_empty() => i.model.as_str(),
            ("", _) => "unknown",
            (m, _) => m,
        };
        let mut row = UsageRow {
            tenant: tenant.id.clone(),
            time_zone: tenant.policy.time_zone.clone(),
            finished_at_ms: now_ms.max(1),
            api_key: self.key.as_ref().map(|k| k.id.to_string()),
            user: self.user.as_deref().map(ledger_text),
            model: ledger_text(model),
            ..UsageRow::default()
        };
        fill(&mut row);
        Some(row)
    }

    /// Counts a refusal of this request (a reply of status 300 or more) in
    /// the ledger, by its code.
    pub fn note_refusal(&mut self, reply: &LocalReply, now_ms: u64) {
        if reply.status < 300 {
            return;
        }
        let code = reply.header("x-tollgate-error").unwrap_or("refused");
        let code = if rls::ledger::valid_refusal_code(code) { code.to_string() } else { "refused".to_string() };
        let Some(row) = self.ledger_row(now_ms, |r| {
            r.refusals.insert(code, 1);
        }) else {
            return;
        };
        let Some(tref) = self.tenant.clone() else { return };
        let base = self.idempotency_base();
        let plugin = Rc::clone(&self.plugin);
        self.shared.borrow_mut().net_settle(
            &plugin,
            &tref,
            None,
            settle::SettleNet::default(),
            Some(row),
            || format!("{base}:refused"),
            now_ms,
        );
    }

    fn queue_settle(
        &mut self,
        reservation: Option<Reservation>,
        usage: Usage,
        micros: u64,
        row: Option<UsageRow>,
        now_ms: u64,
    ) {
        if self.plugin.rate_limit.is_none() {
            return;
        }
        let base = self.idempotency_base();
        let row = std::cell::Cell::new(row);
        // The row rides with this request's netted settle, or else on its own.
        let ledger_only = |this: &Self, row: Option<UsageRow>| {
            if let (Some(row), Some(tref)) = (row, &this.tenant) {
                let mut shared = this.shared.borrow_mut();
                let key = || format!("{base}:ledger");
                shared.net_settle(&this.plugin, tref, None, settle::SettleNet::default(), Some(row), key, now_ms);
            }
        };
        let Some(r) = reservation.filter(|r| !r.shadow) else {
            ledger_only(self, row.take());
            return;
        };
        let weight = self.tenant().map_or(1000, |t| t.policy.cached_read_permille);
        let actual = usage_amounts(&usage, micros, weight);
        let tenant_ref = self.tenant.clone();
        let settle = |reserved: Amounts, requests: (u64, u64), settle_mode: bool| {
            let net = settle::SettleNet::of_request(reserved, actual, requests);
            outbox::Settle::new(&self.plugin, tenant_ref.as_ref()?, self.scope.as_ref(), net)
                .map(|s| outbox::Entry::settle(s, format!("{base}:settle"), settle_mode, now_ms))
        };
        let net = |reserved: Amounts, requests: (u64, u64)| {
            let net = settle::SettleNet::of_request(reserved, actual, requests);
            if let Some(tref) = &tenant_ref {
                let mut shared = self.shared.borrow_mut();
                let key = || format!("{base}:settle");
                shared.net_settle(&self.plugin, tref, self.scope.as_ref(), net, row.take(), key, now_ms);
            }
        };
        let entry = if r.charged {
            // Netted with the tenant's other settles until the next tick.
            net(r.estimate, (1, 1));
            None
        } else if let (true, Some(replay)) = (r.fail_open, r.replay) {
            // The reserve's answer was lost: send it again; if the
            // reservation stands, settle the difference (and give back a
            // lease it took), else charge in full.
            let mut e = outbox::Entry::new(outbox::Call::Encoded(replay.message), replay.key, false, now_ms);
            e.then = Some(Box::new(outbox::Resolution {
                if_applied: settle(times(r.estimate, 1 + r.lease), (1 + r.lease, 1), true),
                if_refused: settle(Amounts::default(), (0, 1), true),
            }));
            Some(e)
        } else if r.fail_open {
            net(Amounts::default(), (0, 1));
            None
        } else {
            // check_then_charge: stock servers know no settle mode.
            settle(Amounts::default(), (0, 1), false)
        };
        if let Some(entry) = entry {
            self.journal_push(entry);
        }
        ledger_only(self, row.take());
    }

    fn journal_push(&self, entry: outbox::Entry) {
        let dropped = self.shared.borrow_mut().journal.push(entry);
        if dropped > 0 {
            log::warn!("tollgate: settle journal full; dropped {dropped} settles");
        }
    }

    /// A reservation whose answer was lost and whose request will not go
    /// upstream: send the reserve again (same idempotency key) and, if it
    /// stands, refund its tokens and dollars. Its request still counts.
    fn cancel_reservation(&mut self, pending: &Pending, now_ms: u64) {
        if let (true, Some(acct)) = (pending.lease > 0, self.account()) {
            self.shared.borrow_mut().leases.refills.remove(&acct);
        }
        let (Some(replay), true, Some(tref)) = (&pending.replay, self.plugin.rate_limit.is_some(), &self.tenant) else {
            return;
        };
        let reserved = times(pending.estimate, 1 + pending.lease);
        let requests = (1 + pending.lease, 1);
        let net = settle::SettleNet::of_request(reserved, Amounts::default(), requests);
        let refund = outbox::Settle::new(&self.plugin, tref, self.scope.as_ref(), net)
            .map(|s| outbox::Entry::settle(s, format!("{}:cancel", self.idempotency_base()), true, now_ms));
        let Some(refund) = refund else { return };
        let call = outbox::Call::Encoded(replay.message.clone());
        let mut e = outbox::Entry::new(call, replay.key.clone(), false, now_ms);
        e.then = Some(Box::new(outbox::Resolution { if_applied: Some(refund), if_refused: None }));
        self.journal_push(e);
    }

    /// The request's id stem for idempotency keys; the service takes 1-256
    /// visible ASCII characters.
    fn idempotency_base(&self) -> String {
        let id = &self.request_id;
        if id.len() <= 200 && id.bytes().all(|b| b.is_ascii_graphic()) {
            return id.clone();
        }
        id.chars().take(200).map(|c| if c.is_ascii_graphic() { c } else { '_' }).collect()
    }
}

/// A text field for the ledger: at most 128 bytes (cut at a character
/// boundary), control characters replaced.
fn ledger_text(s: &str) -> String {
    if !s.is_empty() && s.len() <= 128 && !s.chars().any(char::is_control) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len().min(128));
    for c in s.chars() {
        let c = if c.is_control() { '?' } else { c };
        if out.len() + c.len_utf8() > 128 {
            break;
        }
        out.push(c);
    }
    if out.is_empty() {
        out.push('?');
    }
    out
}

/// What a finished request's usage counts in each measure: cached-read
/// input tokens weigh `cached_read_permille` / 1000 in token limits.
/// Whether the request asks to become a WebSocket (`upgrade: websocket`,
/// any case; an HTTP/2 extended CONNECT says so in `:protocol`).
fn is_websocket_upgrade(headers: &Headers) -> bool {
    let says = |name: &str| {
        api_key::header(headers, name).is_some_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("websocket")))
    };
    says("upgrade") || says(":protocol")
}

pub(crate) fn usage_amounts(usage: &Usage, micros: u64, cached_read_permille: u64) -> Amounts {
    let cached = usage.cache_read.saturating_mul(cached_read_permille) / 1000;
    let input = usage.input_uncached.saturating_add(usage.cache_write).saturating_add(cached);
    let tokens = if cached_read_permille >= 1000 {
        // The provider's total when it gives one (it may count more than
        // the parts), as before weights existed.
        usage.total.max(usage.sum())
    } else {
        input.saturating_add(usage.output)
    };
    Amounts { tokens, input, output: usage.output, micros }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::inflight::SlotStore;
    use crate::config::tests::{sample, KEY_A, KEY_B};
    use crate::metering::record::format_usd;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn flow_with(plugin: Plugin) -> RequestFlow {
        RequestFlow::new(Rc::new(plugin), Rc::new(RefCell::new(Worker::new(100))))
    }

    fn flow() -> RequestFlow {
        flow_with(sample())
    }

    fn start(f: &mut RequestFlow, key: &str, path: &str) -> HeadersStep {
        let hs = h(&[(":path", path), (":method", "POST"), ("x-api-key", key)]);
        f.on_request_headers(&hs, false, 1000, || "rid".into())
    }

    #[test]
    fn identified_request_reads_body_with_plan() {
        let mut f = flow();
        let hs = h(&[
            (":path", "/v1/chat/completions"),
            (":method", "POST"),
            ("authorization", &format!("Bearer {KEY_A}")),
            ("x-request-id", "abc"),
        ]);
        let HeadersStep::ReadBody(plan) = f.on_request_headers(&hs, false, 0, || "new".into()) else {
            panic!("expected ReadBody")
        };
        assert_eq!(f.request_id, "abc");
        assert!(plan.set.contains(&("authorization".into(), "Bearer provider-key-for-ACME_OPENAI".into())));
        assert!(!plan.remove.contains(&"content-length".to_string()), "an untouched body keeps its length");
    }

    #[test]
    fn refusals_use_api_envelope() {
        let mut f = flow();
        let hs = h(&[(":path", "/v1/messages"), (":method", "POST")]);
        let HeadersStep::Reply(r) = f.on_request_headers(&hs, false, 0, || "rid".into()) else { panic!() };
        assert_eq!(r.status, 401);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["request_id"], "rid");
    }

    #[test]
    fn provider_without_key_is_403() {
        let mut f = flow();
        let HeadersStep::Reply(r) = start(&mut f, KEY_B, "/v1/messages") else { panic!() };
        assert_eq!((r.status, r.header("x-tollgate-error")), (403, Some("provider_not_configured")));
    }

    #[test]
    fn body_limits_and_model_policy() {
        let mut f = flow();
        assert!(matches!(start(&mut f, KEY_B, "/v1/chat/completions"), HeadersStep::ReadBody(_)));
        assert_eq!(f.on_request_body_size(100, false), Some(BodyStep::NeedMore));
        assert!(matches!(f.on_request_body_size(4097, false), Some(BodyStep::Reply(r)) if r.status == 413));
        let BodyStep::Reply(r) = f.on_request_body(br#"{"model":"gpt-4o"}"#, 0) else { panic!() };
        assert_eq!((r.status, r.header("x-tollgate-error")), (403, Some("model_not_allowed")));
        let BodyStep::Reply(r) = f.on_request_body(b"{oops", 0) else { panic!() };
        assert_eq!(r.status, 400);
    }

    #[test]
    fn gemini_query_key_is_removed_from_path() {
        let mut f = flow();
        let path = format!("/v1beta/models/gemini-2.0-flash:generateContent?key={KEY_A}");
        let hs = h(&[(":path", &path), (":method", "POST")]);
        let HeadersStep::ReadBody(plan) = f.on_request_headers(&hs, false, 0, || "r".into()) else { panic!() };
        assert!(plan.set.contains(&(":path".into(), "/v1beta/models/gemini-2.0-flash:generateContent".into())));
    }

    fn reply(code: rls::Code, statuses: Vec<(rls::Code, u32, i64)>) -> Vec<u8> {
        rls::RateLimitResponse {
            overall_code: code as i32,
            statuses: statuses
                .into_iter()
                .map(|(c, rem, s)| rls::DescriptorStatus {
                    code: c as i32,
                    current_limit: None,
                    limit_remaining: rem,
                    duration_until_reset: Some(rls::Duration { seconds: s, nanos: 0 }),
                })
                .collect(),
        }
        .encode_to_vec()
    }

    fn leasing_plugin() -> Rc<Plugin> {
        let mut plugin = sample();
        let idx = plugin.tenants.iter().position(|t| t.id == "globex").unwrap();
        let p = Rc::make_mut(&mut plugin.tenants[idx].policy);
        p.limits.set(crate::ratelimit::descriptors::LimitKind::RequestsPerMinute, Some(1000));
        p.lease = crate::config::LeaseSize::Fixed(5);
        Rc::new(plugin)
    }

    /// One request through reserve (if asked) to the end; answers the
    /// requests hits of its reserve call, or None when it drew from a lease.
    fn leased_request(
        plugin: &Rc<Plugin>,
        shared: &Rc<RefCell<Worker>>,
        answer: Option<Vec<u8>>,
        now: u64,
    ) -> Option<u64> {
        let mut f = RequestFlow::new(Rc::clone(plugin), Rc::clone(shared));
        start(&mut f, KEY_B, "/v1/chat/completions");
        let hits = match f.on_request_body(br#"{"model":"gpt-4o-mini","max_tokens":10}"#, now) {
            BodyStep::Call(call) => {
                let req = rls::RateLimitRequest::decode(call.message.as_slice()).unwrap();
                let hits = req.descriptors[0].hits_addend.as_ref().unwrap().value;
                let step = f.on_rls_reply(Ok(&answer.expect("a reserve call was not expected")), now);
                assert!(matches!(step, BodyStep::Forward { .. }), "{step:?}");
                Some(hits)
            }
            BodyStep::Forward { .. } => None,
            other => panic!("{other:?}"),
        };
        f.on_response_headers(200);
        let usage = br#"{"model":"gpt-4o-mini","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        assert!(f.on_response_body(usage, true, now + 1).1.is_some());
        hits
    }

    #[test]
    fn a_lease_is_taken_only_with_room_and_draws_need_no_call() {
        let plugin = leasing_plugin();
        let shared = Rc::new(RefCell::new(Worker::new(100)));
        let ok = |rem| Some(reply(rls::Code::Ok, vec![(rls::Code::Ok, rem, 60)]));
        // Nothing known yet: one request's worth.
        assert_eq!(leased_request(&plugin, &shared, ok(999), 0), Some(1));
        // Ample room: this request plus a lease of five.
        assert_eq!(leased_request(&plugin, &shared, ok(993), 10), Some(6));
        for i in 0..4 {
            assert_eq!(leased_request(&plugin, &shared, None, 20 + i), None, "draw {i} needs no call");
        }
        // Down to its last quarter (1 of 5): the next request asks for a
        // new lease; the old one's last request is given back.
        assert_eq!(leased_request(&plugin, &shared, ok(5), 30), Some(6));
        // Little room left (5 < 4 x 5): no more leases.
        assert_eq!(leased_request(&plugin, &shared, None, 40), None);
        for _ in 0..4 {
            leased_request(&plugin, &shared, None, 41);
        }
        assert_eq!(leased_request(&plugin, &shared, ok(4), 50), Some(1));
    }

    #[test]
    fn one_lease_refill_at_a_time_while_the_others_draw() {
        let plugin = leasing_plugin();
        let shared = Rc::new(RefCell::new(Worker::new(100)));
        let ok = |rem| reply(rls::Code::Ok, vec![(rls::Code::Ok, rem, 60)]);
        let body = br#"{"model":"gpt-4o-mini","max_tokens":10}"#;
        let hits = |c: &RlsCall| {
            rls::RateLimitRequest::decode(c.message.as_slice()).unwrap().descriptors[0]
                .hits_addend
                .as_ref()
                .unwrap()
                .value
        };
        let begin = |now: u64| {
            let mut f = RequestFlow::new(Rc::clone(&plugin), Rc::clone(&shared));
            start(&mut f, KEY_B, "/v1/chat/completions");
            let step = f.on_request_body(body, now);
            (f, step)
        };
        leased_request(&plugin, &shared, Some(ok(999)), 0);
        assert_eq!(leased_request(&plugin, &shared, Some(ok(993)), 10), Some(6));
        for i in 0..4 {
            assert_eq!(leased_request(&plugin, &shared, None, 20 + i), None);
        }
        // One left of five: the next request refills while another still
        // draws the last one.
        let (mut a, step) = begin(30);
        let BodyStep::Call(call) = step else { panic!("{step:?}") };
        assert_eq!(hits(&call), 6, "the refill: this request and a lease of five");
        assert!(matches!(begin(31).1, BodyStep::Forward { .. }), "drawn from the old lease");
        // The lease is empty and its refill is in flight: a request alone.
        let (_, step) = begin(33);
        let BodyStep::Call(call) = step else { panic!("{step:?}") };
        assert_eq!(hits(&call), 1, "no second lease while one is asked for");
        assert!(matches!(a.on_rls_reply(Ok(&ok(980)), 34), BodyStep::Forward { .. }));
        assert!(matches!(begin(35).1, BodyStep::Forward { .. }), "drawn from the new lease");

        // A refill whose client left gives the turn back at once.
        for now in 36..39 {
            assert!(matches!(begin(now).1, BodyStep::Forward { .. }));
        }
        let (mut b, step) = begin(40);
        assert!(matches!(step, BodyStep::Call(ref c) if hits(c) == 6), "{step:?}");
        // Gone with its refill in flight: only its cancelled record.
        assert!(b.on_stream_done(41).is_some_and(|fin| fin.counters.is_empty()));
        assert!(matches!(begin(42).1, BodyStep::Call(ref c) if hits(c) == 6));
        // One never answered nor cancelled stops counting after twice the
        // call timeout.
        let timeout = plugin.rate_limit.as_ref().unwrap().timeout_ms;
        assert!(matches!(begin(43).1, BodyStep::Forward { .. }), "the last one of the lease");
        assert!(matches!(begin(44).1, BodyStep::Call(ref c) if hits(c) == 1));
        assert!(matches!(begin(42 + 2 * timeout + 100).1, BodyStep::Call(ref c) if hits(c) == 6));
    }

    #[test]
    fn filter_state_fields_are_the_configured_ones() {
        let run = |fields: Option<Vec<String>>| {
            let mut plugin = sample();
            plugin.metering.filter_state = fields;
            let mut f = flow_with(plugin);
            start(&mut f, KEY_B, "/v1/chat/completions");
            let _ = f.on_request_body(br#"{"model":"gpt-4o-mini","max_tokens":10}"#, 0);
            let _ = f.on_rls_reply(Ok(&reply(rls::Code::Ok, vec![(rls::Code::Ok, 9, 60)])), 0);
            f.on_response_headers(200);
            let usage =
                br#"{"model":"gpt-4o-mini","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
            let fin = f.on_response_body(usage, true, 1).1.expect("finished");
            fin.properties
        };
        let all = run(None);
        let names: Vec<&str> = all.iter().map(|(k, _)| k.strip_prefix("tollgate_").unwrap()).collect();
        // `error` and `limit` are set for refusals only, `unmetered` for unmetered requests only.
        let finished: Vec<&str> = crate::config::FILTER_STATE_FIELDS
            .iter()
            .copied()
            .filter(|f| !["error", "limit", "unmetered"].contains(f))
            .collect();
        assert_eq!(names, finished, "every documented field, in order");
        let some = run(Some(vec!["cost_usd".into(), "tenant".into()]));
        assert_eq!(some, [("tollgate_tenant", "globex".to_string()), ("tollgate_cost_usd", all[14].1.clone())]);
        assert!(run(Some(Vec::new())).is_empty());
    }

    #[test]
    fn finished_requests_count_under_their_tenant_and_model() {
        let shared = Rc::new(RefCell::new(Worker::new(100)));
        let run = |model: &str| {
            let mut f = RequestFlow::new(Rc::new(sample()), Rc::clone(&shared));
            start(&mut f, KEY_A, "/v1/chat/completions");
            let body = format!(r#"{{"model":"{model}","max_tokens":10}}"#);
            let _ = f.on_request_body(body.as_bytes(), 0);
            let _ = f.on_rls_reply(Ok(&reply(rls::Code::Ok, vec![(rls::Code::Ok, 9, 60)])), 0);
            f.on_response_headers(200);
            let usage = br#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
            let fin = f.on_response_body(usage, true, 1).1.expect("finished");
            let names = |v: &[(Rc<str>, u64)]| v.iter().map(|(k, n)| (k.to_string(), *n)).collect::<Vec<_>>();
            (names(&fin.counters), names(&fin.histograms))
        };
        let (counters, histograms) = run("gpt-4o-mini");
        let m = "tollgate.tenant.acme.model.gpt-4o-mini";
        assert_eq!(counters[0], (format!("{m}.outcome.ok.requests"), 1));
        assert!(counters.contains(&(format!("{m}.tokens_input"), 3)), "{counters:?}");
        assert!(counters.contains(&(format!("{m}.tokens_output"), 4)), "{counters:?}");
        assert!(!counters.iter().any(|(k, _)| k.ends_with("tokens_reasoning")), "zero counts are not sent");
        let hist: Vec<&str> = histograms.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(hist, [format!("{m}.ttfb_ms"), format!("{m}.duration_ms")]);
        // The names are cached per tenant and model; past the cache's bound
        // they are still right (built per request).
        assert_eq!(run("gpt-4o-mini").0, counters);
        for i in 0..crate::metering::metrics::MAX_MODEL_LABELS + 5 {
            let (c, _) = run(&format!("m{i}"));
            let want =
                if i < crate::metering::metrics::MAX_MODEL_LABELS - 1 { format!("m{i}") } else { "other".to_string() };
            assert_eq!(c[0].0, format!("tollgate.tenant.acme.model.{want}.outcome.ok.requests"), "model {i}");
        }
    }

    #[test]
    fn a_lease_in_the_last_quarter_of_its_time_is_refilled() {
        let plugin = leasing_plugin();
        let shared = Rc::new(RefCell::new(Worker::new(100)));
        let ok = |rem| Some(reply(rls::Code::Ok, vec![(rls::Code::Ok, rem, 60)]));
        leased_request(&plugin, &shared, ok(999), 0);
        assert_eq!(leased_request(&plugin, &shared, ok(993), 10), Some(6));
        let lease_ms = plugin.rate_limit.as_ref().unwrap().lease_ms;
        assert_eq!(leased_request(&plugin, &shared, None, 10 + lease_ms * 3 / 4 - 1), None);
        assert_eq!(leased_request(&plugin, &shared, ok(990), 10 + lease_ms * 3 / 4), Some(6));
    }

    #[test]
    fn an_unused_lease_is_given_back_when_it_expires() {
        let plugin = leasing_plugin();
        let shared = Rc::new(RefCell::new(Worker::new(100)));
        let ok = |rem| Some(reply(rls::Code::Ok, vec![(rls::Code::Ok, rem, 60)]));
        leased_request(&plugin, &shared, ok(999), 0);
        assert_eq!(leased_request(&plugin, &shared, ok(993), 10), Some(6));
        assert_eq!(leased_request(&plugin, &shared, None, 20), None);
        let _ = shared.borrow_mut().journal.due(u64::MAX, 1000); // the requests' own settles
        shared.borrow_mut().expire_leases(&plugin, 10 + 999);
        assert_eq!(shared.borrow().journal.pending(), 0, "not expired yet");
        shared.borrow_mut().expire_leases(&plugin, 10 + 1000);
        let due = shared.borrow_mut().journal.due(u64::MAX, 10);
        assert_eq!(due.len(), 1);
        assert!(due[0].settle_mode && due[0].idempotency_key.ends_with(":r1:lease"), "{:?}", due[0].idempotency_key);
        let req = rls::RateLimitRequest::decode(&*due[0].encode().unwrap()).unwrap();
        let d = &req.descriptors[0];
        assert!(d.is_negative_hits);
        assert_eq!(d.hits_addend.as_ref().unwrap().value, 4, "four of five leased requests unused");
        // Once given back, the next request reserves again.
        assert_eq!(leased_request(&plugin, &shared, ok(990), 2000), Some(6));
    }

    #[test]
    fn a_removed_plugin_gives_back_leases_before_they_expire() {
        let plugin = leasing_plugin();
        let shared = Rc::new(RefCell::new(Worker::new(100)));
        let ok = |rem| Some(reply(rls::Code::Ok, vec![(rls::Code::Ok, rem, 60)]));
        leased_request(&plugin, &shared, ok(999), 0);
        assert_eq!(leased_request(&plugin, &shared, ok(993), 10), Some(6));
        let _ = shared.borrow_mut().journal.due(u64::MAX, 1000);
        assert_eq!(shared.borrow_mut().release_leases(&plugin, 20), 1);
        let due = shared.borrow_mut().journal.due(u64::MAX, 10);
        assert_eq!(due.len(), 1);
        let req = rls::RateLimitRequest::decode(&*due[0].encode().unwrap()).unwrap();
        assert_eq!(req.descriptors[0].hits_addend.as_ref().unwrap().value, 5, "all five leased requests unused");
        assert_eq!(shared.borrow_mut().release_leases(&plugin, 21), 0, "given back once");
        // What cannot be sent any more is dropped and counted.
        let mut j = crate::ratelimit::outbox::Journal::new(10);
        j.push(due[0].clone());
        assert_eq!((j.drop_queued(), j.pending(), j.dropped), (1, 0, 1));
    }

    #[test]
    fn a_lease_that_does_not_fit_falls_back_to_this_request_alone() {
        let plugin = leasing_plugin();
        let shared = Rc::new(RefCell::new(Worker::new(100)));
        leased_request(&plugin, &shared, Some(reply(rls::Code::Ok, vec![(rls::Code::Ok, 999, 60)])), 0);
        let mut f = RequestFlow::new(Rc::clone(&plugin), Rc::clone(&shared));
        start(&mut f, KEY_B, "/v1/chat/completions");
        let BodyStep::Call(call) = f.on_request_body(br#"{"model":"gpt-4o-mini","max_tokens":10}"#, 5) else {
            panic!()
        };
        let hits = |c: &RlsCall| {
            rls::RateLimitRequest::decode(c.message.as_slice()).unwrap().descriptors[0]
                .hits_addend
                .as_ref()
                .unwrap()
                .value
        };
        assert_eq!(hits(&call), 6);
        let over = reply(rls::Code::OverLimit, vec![(rls::Code::OverLimit, 3, 60)]);
        let BodyStep::Call(single) = f.on_rls_reply(Ok(&over), 6) else { panic!("expected a retry without the lease") };
        assert_eq!(hits(&single), 1);
        let ok = reply(rls::Code::Ok, vec![(rls::Code::Ok, 2, 60)]);
        assert!(matches!(f.on_rls_reply(Ok(&ok), 7), BodyStep::Forward { .. }));
    }

    #[test]
    fn a_provider_can_turn_off_usage_injection() {
        let mut plugin = sample();
        for p in &mut plugin.providers {
            p.inject_stream_usage = false;
        }
        let mut f = flow_with(plugin);
        start(&mut f, KEY_A, "/v1/chat/completions");
        let body = br#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#;
        match f.on_request_body(body, 0) {
            BodyStep::Forward { body, .. } => assert!(body.is_none(), "body must be left alone"),
            BodyStep::Call(_) => {
                let ok = reply(rls::Code::Ok, vec![(rls::Code::Ok, 10, 1)]);
                let BodyStep::Forward { body, .. } = f.on_rls_reply(Ok(&ok), 1) else { panic!() };
                assert!(body.is_none(), "body must be left alone");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reserve_then_settle_to_metered_usage() {
        // globex: free tier, requests_per_minute 20.
        let mut f = flow();
        start(&mut f, KEY_B, "/v1/chat/completions");
        let body = br#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let BodyStep::Call(call) = f.on_request_body(body, 0) else { panic!("expected a reserve call") };
        assert_eq!(call.cluster, "tollgate_rls");
        let req = rls::RateLimitRequest::decode(call.message.as_slice()).unwrap();
        assert_eq!(req.descriptors.len(), 1);
        let step = f.on_rls_reply(Ok(&reply(rls::Code::Ok, vec![(rls::Code::Ok, 19, 3)])), 5);
        let BodyStep::Forward { body: Some(new_body), set_headers } = step else { panic!("expected a rewritten body") };
        let v: Value = serde_json::from_slice(&new_body).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        // The rewritten body's own length goes upstream.
        assert!(set_headers.contains(&("content-length".into(), new_body.len().to_string())));
        let hs = f.on_response_headers(200);
        assert!(hs.set.contains(&("x-ratelimit-remaining-requests".into(), "19".into())));
        assert!(!hs.hold_body);
        let stream = concat!(
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
            "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":5,\"total_tokens\":17}}\n\n",
            "data: [DONE]\n\n"
        );
        let (out, fin) = f.on_response_body(stream.as_bytes(), true, 50);
        assert!(!out.is_unchanged());
        let out = String::from_utf8(out.bytes(stream.as_bytes())).unwrap();
        assert!(!out.contains("prompt_tokens"), "usage chunk must be hidden: {out}");
        assert!(out.contains("[DONE]"));
        let fin = fin.unwrap();
        let prop = |k: &str| fin.properties.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(prop("tollgate_tokens_output"), "5");
        assert_eq!(prop("tollgate_estimated"), "false");
        // Only a request-count limit: nothing to settle.
        assert_eq!(f.shared.borrow().journal.pending(), 0);
    }

    /// acme's chat goes to `openai` with failover to `azure-eu` (a
    /// deployment name for gpt-4o); globex holds no Azure key.
    fn failover_plugin() -> Rc<Plugin> {
        let mut v = crate::config::tests::sample_json();
        v["providers"]["openai"]["targets"] = serde_json::json!([{"provider": "openai"}, {"provider": "azure-eu"}]);
        v["providers"]["azure-eu"] =
            serde_json::json!({"credential_header": "api-key", "model_map": {"gpt-4o": "gpt4o-eu-deployment"}});
        v["providers"]["anthropic"]["targets"] = serde_json::json!([{"provider": "anthropic"}]);
        v["providers"]["anthropic"]["rate_limited_scope"] = "target".into();
        v["tenants"][0]["provider_key_env"]["azure-eu"] = "ACME_AZURE".into();
        v["circuit_breaker"] = serde_json::json!({"consecutive_failures": 2, "open_seconds": 5});
        v.as_object_mut().unwrap().remove("rate_limit");
        for t in v["tiers"].as_object_mut().unwrap().values_mut() {
            t.as_object_mut().unwrap().retain(|k, _| k == "models" || k == "max_request_bytes");
        }
        for t in v["tenants"].as_array_mut().unwrap() {
            t.as_object_mut().unwrap().remove("overrides");
            t["tier"] = "pro".into();
        }
        Rc::new(crate::config::load(v.to_string().as_bytes(), &crate::config::tests::env).unwrap())
    }

    /// One chat request of acme at `now` through to its answer `status`;
    /// the headers plan (or the reply) and the forwarded body.
    fn failover_request(
        plugin: &Rc<Plugin>,
        worker: &Rc<RefCell<Worker>>,
        key: &str,
        now: u64,
        answer: &[(&str, &str)],
    ) -> Result<(header_plan::HeaderPlan, Option<Vec<u8>>), LocalReply> {
        let mut f = RequestFlow::new(Rc::clone(plugin), Rc::clone(worker));
        let hs = h(&[(":path", "/v1/chat/completions"), (":method", "POST"), ("x-api-key", key)]);
        let plan = match f.on_request_headers(&hs, false, now, || "rid".into()) {
            HeadersStep::ReadBody(plan) => plan,
            HeadersStep::Reply(r) => {
                f.on_stream_done(now);
                return Err(r);
            }
            other => panic!("unexpected {other:?}"),
        };
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
        let BodyStep::Forward { body, .. } = f.on_request_body(body, now) else { panic!("expected forward") };
        let raw = crate::envoy::pairs::encode(answer);
        assert!(f.watches_upstream());
        f.on_upstream_answer(&raw, now);
        let status = crate::envoy::pairs::status(&raw);
        f.on_response_headers(status);
        let fin = f.on_response_body(b"{}", true, now).1.expect("finished");
        let counters: Vec<String> = fin.counters.iter().map(|(n, _)| n.to_string()).collect();
        assert!(counters.iter().any(|n| n.contains(".target.") && n.ends_with(".target_requests")), "{counters:?}");
        f.on_stream_done(now);
        Ok((plan, body))
    }

    fn target_of(plan: &header_plan::HeaderPlan) -> (String, String) {
        let get = |k: &str| plan.set.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default();
        let cred = if get("api-key").is_empty() { get("authorization") } else { get("api-key") };
        (get(header_plan::PROVIDER_HEADER), cred)
    }

    #[test]
    fn failing_targets_are_skipped_probed_and_taken_back() {
        let plugin = failover_plugin();
        let worker = Rc::new(RefCell::new(Worker::new(100)));
        let ok = [(":status", "200")];
        let down = [(":status", "503")];
        // Healthy: the first target, its credential, the model as asked.
        let (plan, body) = failover_request(&plugin, &worker, KEY_A, 0, &ok).unwrap();
        assert_eq!(target_of(&plan), ("openai".into(), "Bearer provider-key-for-ACME_OPENAI".into()));
        assert!(body.is_none(), "the body goes as sent");
        // Two 5xx open the first target's circuit (for 5 s).
        failover_request(&plugin, &worker, KEY_A, 10, &down).unwrap();
        failover_request(&plugin, &worker, KEY_A, 20, &down).unwrap();
        let (plan, body) = failover_request(&plugin, &worker, KEY_A, 30, &ok).unwrap();
        assert_eq!(target_of(&plan), ("azure-eu".into(), "provider-key-for-ACME_AZURE".into()));
        let sent: Value = serde_json::from_slice(&body.expect("the model is renamed")).unwrap();
        assert_eq!(sent["model"], "gpt4o-eu-deployment");
        // globex holds no Azure key: with openai open it has nowhere to go.
        let r = failover_request(&plugin, &worker, KEY_B, 40, &ok).unwrap_err();
        assert_eq!(r.status, 503);
        assert_eq!(r.header("x-tollgate-error"), Some("provider_unavailable"));
        assert_eq!(r.header("retry-after"), Some("5"));
        // Past the open period: one probe to openai; it succeeds and closes.
        let (plan, _) = failover_request(&plugin, &worker, KEY_A, 5_100, &ok).unwrap();
        assert_eq!(target_of(&plan).0, "openai");
        let (plan, _) = failover_request(&plugin, &worker, KEY_B, 5_200, &ok).unwrap();
        assert_eq!(target_of(&plan).0, "openai");
        let gauges = std::mem::take(&mut worker.borrow_mut().circuit_gauges);
        let states: Vec<u64> = gauges.iter().map(|(_, v)| *v).collect();
        assert_eq!(states, [1, 2, 0], "opened, half-open, closed: {gauges:?}");
        assert!(gauges.iter().all(|(n, _)| n == "tollgate.target.openai.target_circuit_state"));
    }

    #[test]
    fn circuit_gauges_follow_the_shared_records_over_time() {
        let plugin = failover_plugin();
        let worker = Rc::new(RefCell::new(Worker::new(100)));
        failover_request(&plugin, &worker, KEY_A, 0, &[(":status", "500")]).unwrap();
        failover_request(&plugin, &worker, KEY_A, 0, &[(":status", "500")]).unwrap();
        let mut w = worker.borrow_mut();
        w.circuit_gauges.clear();
        w.refresh_circuit_gauges(&plugin, 1_000);
        assert_eq!(w.circuit_gauges, [("tollgate.target.openai.target_circuit_state".to_string(), 1)]);
        // Not again within the second; then the open period has ended with
        // no traffic: half-open, though no request changed it.
        w.circuit_gauges.clear();
        w.refresh_circuit_gauges(&plugin, 1_500);
        assert!(w.circuit_gauges.is_empty());
        w.refresh_circuit_gauges(&plugin, 6_000);
        assert_eq!(w.circuit_gauges, [("tollgate.target.openai.target_circuit_state".to_string(), 2)]);
    }

    #[test]
    fn a_refused_probe_gives_its_turn_back() {
        let plugin = failover_plugin();
        let worker = Rc::new(RefCell::new(Worker::new(100)));
        let down = [(":status", "502")];
        failover_request(&plugin, &worker, KEY_A, 0, &down).unwrap();
        failover_request(&plugin, &worker, KEY_A, 0, &down).unwrap();
        // The probe is taken, then the request ends before any answer.
        let mut f = RequestFlow::new(Rc::clone(&plugin), Rc::clone(&worker));
        let hs = h(&[(":path", "/v1/chat/completions"), (":method", "POST"), ("x-api-key", KEY_A)]);
        assert!(matches!(f.on_request_headers(&hs, false, 6_000, || "r".into()), HeadersStep::ReadBody(_)));
        assert_eq!(f.target.map(|c| c.probe), Some(true));
        f.on_stream_done(6_001);
        // The next request can probe at once.
        let (plan, _) = failover_request(&plugin, &worker, KEY_A, 6_002, &[(":status", "200")]).unwrap();
        assert_eq!(target_of(&plan).0, "openai");
    }

    #[test]
    fn tollgates_own_refusal_of_a_probe_is_not_the_targets_answer() {
        let plugin = failover_plugin();
        let worker = Rc::new(RefCell::new(Worker::new(100)));
        failover_request(&plugin, &worker, KEY_A, 0, &[(":status", "500")]).unwrap();
        failover_request(&plugin, &worker, KEY_A, 0, &[(":status", "500")]).unwrap();
        // Half-open: this request takes the probe, then tollgate refuses it
        // (a body that is not JSON); its own 400 passes the response
        // callbacks but is not the target's answer.
        let mut f = RequestFlow::new(Rc::clone(&plugin), Rc::clone(&worker));
        let hs = h(&[(":path", "/v1/chat/completions"), (":method", "POST"), ("x-api-key", KEY_A)]);
        assert!(matches!(f.on_request_headers(&hs, false, 6_000, || "r".into()), HeadersStep::ReadBody(_)));
        assert_eq!(f.target.map(|c| c.probe), Some(true));
        let BodyStep::Reply(r) = f.on_request_body(b"not json", 6_000) else { panic!("expected a refusal") };
        assert_eq!(r.status, 400);
        assert!(!f.watches_upstream());
        f.on_stream_done(6_001);
        // The circuit is still half-open (not closed by a 400 that never
        // left), and the turn is free: the next request probes.
        let rec = {
            let w = worker.borrow();
            let (v, _) = w.slots.get("tollgate.circuit.openai").unwrap();
            circuit::Record::decode(&v.unwrap())
        };
        assert_eq!(rec.state(6_002), circuit::State::HalfOpen);
        assert_eq!(rec.probe_until, 0);
        let (plan, _) = failover_request(&plugin, &worker, KEY_A, 6_002, &[(":status", "200")]).unwrap();
        assert_eq!(target_of(&plan).0, "openai");
    }

    #[test]
    fn callers_giving_up_on_a_hung_target_count_as_its_timeouts() {
        let plugin = failover_plugin();
        let worker = Rc::new(RefCell::new(Worker::new(100)));
        let sent = |now: u64| {
            let mut f = RequestFlow::new(Rc::clone(&plugin), Rc::clone(&worker));
            let hs = h(&[(":path", "/v1/chat/completions"), (":method", "POST"), ("x-api-key", KEY_A)]);
            assert!(matches!(f.on_request_headers(&hs, false, now, || "r".into()), HeadersStep::ReadBody(_)));
            assert!(matches!(f.on_request_body(br#"{"model":"gpt-4o"}"#, now), BodyStep::Forward { .. }));
            f
        };
        // A client leaving early says nothing about the target.
        for _ in 0..3 {
            sent(0).on_stream_done(30_000);
        }
        let (plan, _) = failover_request(&plugin, &worker, KEY_A, 30_001, &[(":status", "200")]).unwrap();
        assert_eq!(target_of(&plan).0, "openai");
        // Two callers that waited the probe timeout (120 s) for nothing: the
        // circuit opens.
        let probe_timeout = plugin.circuit.probe_timeout_ms;
        for _ in 0..2 {
            let fin = sent(40_000).on_stream_done(40_000 + probe_timeout).expect("finished");
            assert!(fin.counters.iter().any(|(n, _)| n.ends_with("target.openai.target_timeouts")));
        }
        let (plan, _) =
            failover_request(&plugin, &worker, KEY_A, 40_001 + probe_timeout, &[(":status", "200")]).unwrap();
        assert_eq!(target_of(&plan).0, "azure-eu");
    }

    #[test]
    fn a_provider_429_pauses_only_the_credential_that_got_it() {
        let plugin = failover_plugin();
        let worker = Rc::new(RefCell::new(Worker::new(100)));
        let limited = [(":status", "429"), ("retry-after", "3")];
        failover_request(&plugin, &worker, KEY_A, 0, &limited).unwrap();
        let (plan, _) = failover_request(&plugin, &worker, KEY_A, 2_999, &[(":status", "200")]).unwrap();
        assert_eq!(target_of(&plan).0, "azure-eu");
        // globex's own key was not throttled.
        let (plan, _) = failover_request(&plugin, &worker, KEY_B, 2_999, &[(":status", "200")]).unwrap();
        assert_eq!(target_of(&plan).0, "openai");
        let (plan, _) = failover_request(&plugin, &worker, KEY_A, 3_000, &[(":status", "200")]).unwrap();
        assert_eq!(target_of(&plan).0, "openai");
        // globex's key throttled on its only target (OpenAI's retry-after-ms
        // read first): a 429 of its own, not an outage's 503.
        let limited = [(":status", "429"), ("retry-after-ms", "1500"), ("retry-after", "9")];
        failover_request(&plugin, &worker, KEY_B, 4_000, &limited).unwrap();
        let r = failover_request(&plugin, &worker, KEY_B, 4_100, &[(":status", "200")]).unwrap_err();
        assert_eq!((r.status, r.header("x-tollgate-error")), (429, Some("provider_rate_limited")));
        assert_eq!(r.header("retry-after-ms"), Some("1400"));
        assert!(failover_request(&plugin, &worker, KEY_B, 5_500, &[(":status", "200")]).is_ok());
    }

    #[test]
    fn a_passed_through_request_loses_the_routing_headers_a_client_forged() {
        let mut v = crate::config::tests::sample_json();
        v["unmatched_routes"] = "pass".into();
        let plugin = crate::config::load(v.to_string().as_bytes(), &crate::config::tests::env).unwrap();
        let mut f = flow_with(plugin);
        let hs = h(&[
            (":path", "/v1/models"),
            (":method", "GET"),
            ("X-Tollgate-Tier", "enterprise"),
            ("x-tollgate-provider", "azure-eu"),
            ("x-other", "kept"),
        ]);
        let step = f.on_request_headers(&hs, true, 0, || "r".into());
        assert_eq!(
            step,
            HeadersStep::PassThrough { remove: vec!["x-tollgate-tier".into(), "x-tollgate-provider".into()] }
        );
        assert!(!f.has_work_at_stream_end());
        assert!(f.on_stream_done(5).is_none());
    }

    #[test]
    fn a_client_leaving_before_the_upstream_is_in_the_access_log_as_cancelled() {
        let prop = |fin: &Finish, k: &str| fin.properties.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        // Its reserve in flight.
        let mut f = flow();
        start(&mut f, KEY_B, "/v1/chat/completions");
        assert!(matches!(f.on_request_body(br#"{"model":"gpt-4o-mini"}"#, 0), BodyStep::Call(_)));
        assert!(f.has_work_at_stream_end());
        let fin = f.on_stream_done(10).expect("a record");
        assert_eq!(prop(&fin, "tollgate_tenant").as_deref(), Some("globex"));
        assert_eq!(prop(&fin, "tollgate_outcome").as_deref(), Some("cancelled"));
        assert_eq!(prop(&fin, "tollgate_error").as_deref(), Some("client_closed_request"));
        assert_eq!(prop(&fin, "tollgate_model_requested").as_deref(), Some("gpt-4o-mini"));
        // Its body still coming.
        let mut f = flow();
        start(&mut f, KEY_B, "/v1/chat/completions");
        let fin = f.on_stream_done(10).expect("a record");
        assert_eq!(prop(&fin, "tollgate_outcome").as_deref(), Some("cancelled"));
        // A refused request keeps its refusal's record (written at the reply).
        let mut f = flow();
        start(&mut f, KEY_B, "/v1/chat/completions");
        assert!(matches!(f.on_request_body(b"{", 0), BodyStep::Reply(_)));
        assert!(f.on_stream_done(10).is_none());
    }

    #[test]
    fn a_tier_can_have_targets_of_its_own() {
        let mut v = crate::config::tests::sample_json();
        v["providers"]["azure-eu"] = serde_json::json!({"credential_header": "api-key"});
        v["tiers"]["pro"]["provider_targets"] = serde_json::json!({"openai": ["azure-eu", "openai"]});
        v["tenants"][0]["provider_key_env"]["azure-eu"] = "ACME_AZURE".into();
        let plugin = Rc::new(crate::config::load(v.to_string().as_bytes(), &crate::config::tests::env).unwrap());
        // acme (pro): the tier's dedicated target first.
        let mut f = RequestFlow::new(Rc::clone(&plugin), Rc::new(RefCell::new(Worker::new(100))));
        let HeadersStep::ReadBody(plan) = start(&mut f, KEY_A, "/v1/chat/completions") else { panic!() };
        assert_eq!(target_of(&plan), ("azure-eu".into(), "provider-key-for-ACME_AZURE".into()));
        // globex (free): the provider as configured, no target header.
        let mut f = RequestFlow::new(Rc::clone(&plugin), Rc::new(RefCell::new(Worker::new(100))));
        let HeadersStep::ReadBody(plan) = start(&mut f, KEY_B, "/v1/chat/completions") else { panic!() };
        assert_eq!(target_of(&plan), (String::new(), "Bearer provider-key-for-GLOBEX_OPENAI".into()));
        // A tenant's overrides may pin it too; mistakes name their field.
        let bad = |targets: Value, field: &str| {
            let mut v = crate::config::tests::sample_json();
            v["providers"]["azure-eu"] = serde_json::json!({"credential_header": "api-key"});
            v["tenants"][0]["overrides"] = serde_json::json!({"provider_targets": targets});
            let e = crate::config::load(v.to_string().as_bytes(), &crate::config::tests::env).unwrap_err();
            assert!(e.to_string().contains(field), "{e} should name {field}");
        };
        bad(serde_json::json!({"nope": ["openai"]}), "tenants[0].overrides.provider_targets.nope");
        bad(serde_json::json!({"openai": ["nope"]}), "provider_targets.openai[0]");
        bad(serde_json::json!({"openai": []}), "provider_targets.openai");
        bad(serde_json::json!({"openai": ["azure-eu", "azure-eu"]}), "provider_targets.openai[1]");
    }

    #[test]
    fn failover_configuration_mistakes_are_refused() {
        let bad = |edit: &dyn Fn(&mut Value), field: &str| {
            let mut v = crate::config::tests::sample_json();
            v["providers"]["azure"] = serde_json::json!({"credential_header": "api-key"});
            edit(&mut v);
            let e = crate::config::load(v.to_string().as_bytes(), &crate::config::tests::env).unwrap_err();
            assert!(e.to_string().contains(field), "{e} should name {field}");
        };
        bad(
            &|v| v["providers"]["openai"]["targets"] = serde_json::json!([{"provider": "nope"}]),
            "targets[0].provider",
        );
        bad(
            &|v| {
                v["providers"]["openai"]["targets"] = serde_json::json!([{"provider": "azure"}, {"provider": "azure"}])
            },
            "targets[1].provider",
        );
        bad(
            &|v| v["providers"]["openai"]["targets"] = serde_json::json!([{"provider": "azure", "weight": 2}]),
            "weight",
        );
        bad(
            &|v| {
                v["providers"]["openai"]["targets"] = serde_json::json!([{"provider": "azure"}]);
                v["providers"]["azure"]["targets"] = serde_json::json!([{"provider": "openai"}]);
            },
            "do not nest",
        );
        bad(&|v| v["providers"]["openai"]["selection"] = "weighted".into(), "selection");
        bad(&|v| v["providers"]["openai"]["selection"] = "random".into(), "random");
        bad(&|v| v["providers"]["azure"]["model_map"] = serde_json::json!({"gpt-4o": "a/b"}), "model_map");
        bad(&|v| v["circuit_breaker"] = serde_json::json!({"consecutive_failures": 0}), "consecutive_failures");
        bad(&|v| v["circuit_breaker"] = serde_json::json!({"open_seconds": 60, "max_open_seconds": 30}), "max_open");
        bad(&|v| v["circuit_breaker"] = serde_json::json!({"open_secs": 5}), "open_secs");
    }

    #[test]
    fn a_large_stream_chunk_is_read_near_its_edges() {
        // The whole stream in one chunk (Envoy read the upstream late): the
        // flow reads the head and the tail, and meters and strips exactly.
        let mut f = flow();
        start(&mut f, KEY_B, "/v1/chat/completions");
        let body = br#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let BodyStep::Call(_) = f.on_request_body(body, 0) else { panic!("expected a reserve call") };
        let step = f.on_rls_reply(Ok(&reply(rls::Code::Ok, vec![(rls::Code::Ok, 19, 3)])), 5);
        assert!(matches!(step, BodyStep::Forward { .. }));
        f.on_response_headers(200);
        let event = "data: {\"id\":\"c\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hello\"}}],\"usage\":null}\n\n";
        let usage = "data: {\"id\":\"c\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3000,\"total_tokens\":3012}}\n\n";
        let content = event.repeat(3000);
        let stream = format!("{content}{usage}data: [DONE]\n\n");
        let bytes = stream.as_bytes();
        let mut read = 0usize;
        let mut reader = |from: usize, len: usize| {
            read += len;
            bytes[from..from + len].to_vec()
        };
        let taken = f.on_response_chunk(bytes.len(), true, 50, &mut reader);
        assert!(read <= 4 * 16 * 1024, "read {read} of {}", bytes.len());
        assert_eq!(taken.read, read);
        assert!(taken.chunk.is_none());
        // Writing the removal back needs the chunk (the host contexts reads it then).
        assert!(taken.out.edit.needs_chunk_bytes(bytes.len()));
        assert_eq!(taken.out.bytes(bytes), format!("{content}data: [DONE]\n\n").into_bytes());
        let fin = taken.finish.expect("end of stream");
        let prop = |k: &str| fin.properties.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(prop("tollgate_tokens_output"), "3000");
        assert_eq!(prop("tollgate_estimated"), "false");
    }

    #[test]
    fn websocket_upgrades_are_refused_unless_the_tier_allows_them_then_one_unmetered_request() {
        let ws = |key: &str, path: &str| {
            h(&[
                (":path", path),
                (":method", "GET"),
                ("x-api-key", key),
                ("connection", "Upgrade"),
                ("upgrade", "WebSocket"),
                ("sec-websocket-version", "13"),
            ])
        };
        // Refused in the API's envelope, with a clear code (never a silent pass).
        let mut f = flow();
        let HeadersStep::Reply(r) = f.on_request_headers(&ws(KEY_B, "/v1/chat/completions"), true, 1000, || "r".into())
        else {
            panic!("refused")
        };
        assert_eq!((r.status, r.header("x-tollgate-error")), (403, Some("websocket_not_allowed")));
        let body: Value = serde_json::from_slice(&r.body).expect("json");
        assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("WebSocket")), "{body}");
        let mut f = flow();
        let HeadersStep::Reply(r) = f.on_request_headers(&ws(KEY_B, "/v1/messages"), true, 1000, || "r".into()) else {
            panic!("refused")
        };
        let body: Value = serde_json::from_slice(&r.body).expect("json");
        assert_eq!((body["type"].as_str(), body["error"]["type"].as_str()), (Some("error"), Some("permission_error")));

        // Allowed by the tier: one request, no tokens, reserved from the headers.
        let mut json = crate::config::tests::sample_json();
        json["tiers"]["free"]["allow_websocket"] = true.into();
        let plugin = crate::config::load(json.to_string().as_bytes(), &crate::config::tests::env).expect("config");
        let mut f = flow_with(plugin);
        // A model the tier does not allow is refused as in a body.
        let HeadersStep::Reply(r) =
            f.on_request_headers(&ws(KEY_B, "/v1/chat/completions?model=gpt-5"), false, 1000, || "r".into())
        else {
            panic!("refused")
        };
        assert_eq!(r.header("x-tollgate-error"), Some("model_not_allowed"));
        let mut f =
            flow_with(crate::config::load(json.to_string().as_bytes(), &crate::config::tests::env).expect("config"));
        let HeadersStep::Admit(plan, call) =
            f.on_request_headers(&ws(KEY_B, "/v1/chat/completions?model=gpt-4o-mini"), false, 1000, || "r".into())
        else {
            panic!("admitted from the headers")
        };
        assert!(plan.set.iter().any(|(k, v)| k == "authorization" && v.contains("GLOBEX_OPENAI")), "{plan:?}");
        let req = rls::RateLimitRequest::decode(call.message.as_slice()).expect("rls");
        let hits: Vec<u64> = req.descriptors.iter().filter_map(|d| d.hits_addend.as_ref().map(|v| v.value)).collect();
        assert_eq!(hits, [1], "one request, nothing else");
        assert_eq!(f.unread_body(), Some(false), "held until the answer");
        let BodyStep::Forward { body: None, .. } =
            f.on_rls_reply(Ok(&reply(rls::Code::Ok, vec![(rls::Code::Ok, 9, 60)])), 1000)
        else {
            panic!("let through")
        };
        assert_eq!(f.unread_body(), Some(true));
        assert!(!f.on_response_headers(101).hold_body);
        let (_, fin) = f.on_response_body(b"\x81\x05hello", true, 5000);
        let props = fin.expect("finished").properties;
        let get = |k: &str| props.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("tollgate_unmetered"), Some("websocket"));
        assert_eq!(get("tollgate_outcome"), Some("ok"));
        assert_eq!((get("tollgate_tokens_total"), get("tollgate_cost_usd")), (Some("0"), Some("0.000000")));
        assert_eq!(get("tollgate_estimated"), Some("false"));
        assert_eq!(get("tollgate_model_requested"), Some("gpt-4o-mini"));
    }

    #[test]
    fn over_limit_is_a_429_and_unavailable_is_a_503() {
        let mut f = flow();
        start(&mut f, KEY_B, "/v1/chat/completions");
        let _ = f.on_request_body(br#"{"model":"gpt-4o-mini"}"#, 0);
        let BodyStep::Reply(r) =
            f.on_rls_reply(Ok(&reply(rls::Code::OverLimit, vec![(rls::Code::OverLimit, 0, 7)])), 5)
        else {
            panic!()
        };
        assert_eq!((r.status, r.header("retry-after")), (429, Some("7")));
        let mut f = flow();
        start(&mut f, KEY_B, "/v1/chat/completions");
        let _ = f.on_request_body(br#"{"model":"gpt-4o-mini"}"#, 0);
        let BodyStep::Reply(r) = f.on_rls_reply(Err(14), 5) else { panic!() };
        assert_eq!((r.status, r.header("x-tollgate-error")), (503, Some("rate_limiter_unavailable")));
    }

    #[test]
    fn a_reserve_timed_out_by_a_stalled_worker_is_asked_again_once_under_its_key() {
        let timeout = sample().rate_limit.unwrap().timeout_ms;
        let reserve = |f: &mut RequestFlow| {
            start(f, KEY_B, "/v1/chat/completions");
            let BodyStep::Call(call) = f.on_request_body(br#"{"model":"gpt-4o-mini"}"#, 1_000) else { panic!() };
            call
        };
        // On time: a timeout is the service's, and the tier's failure mode
        // answers (globex: closed).
        let mut f = flow();
        reserve(&mut f);
        let BodyStep::Reply(r) = f.on_rls_reply(Err(14), 1_000 + timeout + 20) else { panic!() };
        assert_eq!(r.status, 503);
        // Far past the deadline (Envoy says UNAVAILABLE for its timeout):
        // the same reserve again, once.
        let mut f = flow();
        let first = reserve(&mut f);
        let late = 1_000 + timeout * 3;
        let BodyStep::Call(again) = f.on_rls_reply(Err(14), late) else { panic!("expected the reserve again") };
        assert_eq!((again.message.clone(), again.metadata.clone()), (first.message, first.metadata));
        let BodyStep::Reply(r) = f.on_rls_reply(Err(14), late + timeout * 3) else { panic!() };
        assert_eq!(r.header("x-tollgate-error"), Some("rate_limiter_unavailable"));
        // Other failures are not retried, late or not.
        let mut f = flow();
        reserve(&mut f);
        assert!(matches!(f.on_rls_reply(Err(13), late), BodyStep::Reply(_)));
    }

    #[test]
    fn fail_open_admits_within_local_allowance_and_journals_usage() {
        // acme: failure_mode open, usd_per_month only; default 10 rpm in fail-open.
        let shared = Rc::new(RefCell::new(Worker::new(100)));
        let plugin = Rc::new(sample());
        let mut admitted = 0;
        for _ in 0..15 {
            let mut f = RequestFlow::new(Rc::clone(&plugin), Rc::clone(&shared));
            start(&mut f, KEY_A, "/v1/chat/completions");
            let _ = f.on_request_body(br#"{"model":"gpt-4o","max_tokens":10}"#, 0);
            match f.on_rls_reply(Err(14), 10) {
                BodyStep::Forward { .. } => {
                    admitted += 1;
                    f.on_response_headers(200);
                    let (_, fin) = f.on_response_body(
                        br#"{"model":"gpt-4o","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
                        true,
                        1100,
                    );
                    assert!(fin.is_some());
                }
                BodyStep::Reply(r) => assert_eq!(r.header("x-tollgate-error"), Some("local_allowance_exhausted")),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(admitted, 10, "a tenant without requests_per_minute gets the default 10 per worker");
        // Every lost reserve is sent again under its key: the admitted ones
        // then settle (difference, or everything if the replay is refused);
        // the refused ones get their estimate refunded if it was charged.
        let due = shared.borrow_mut().journal.due(2000, 100);
        assert_eq!(due.len(), 15);
        assert!(due.iter().all(|e| !e.settle_mode && e.idempotency_key.ends_with(":r1")));
        let admitted_replays = due.iter().filter(|e| e.then.as_ref().unwrap().if_refused.is_some()).count();
        assert_eq!(admitted_replays, 10);
        for e in &due {
            let then = e.then.as_ref().unwrap();
            let applied = then.if_applied.as_ref().unwrap();
            assert!(applied.settle_mode);
            let req = rls::RateLimitRequest::decode(&*applied.encode().unwrap()).unwrap();
            if then.if_refused.is_some() {
                // Actual 7 tokens against the reserved estimate: a refund.
                assert!(applied.idempotency_key.ends_with(":settle"));
                assert!(req.descriptors.iter().all(|d| d.is_negative_hits));
            } else {
                assert!(applied.idempotency_key.ends_with(":cancel"));
                assert!(req.descriptors.iter().all(|d| d.is_negative_hits));
            }
        }
    }

    #[test]
    fn a_reserve_in_flight_when_the_client_leaves_is_resolved_later() {
        let mut f = flow();
        start(&mut f, KEY_A, "/v1/chat/completions");
        let BodyStep::Call(call) = f.on_request_body(br#"{"model":"gpt-4o","max_tokens":10}"#, 0) else { panic!() };
        let key = call.metadata.iter().find(|(k, _)| k == rls::META_IDEMPOTENCY_KEY).unwrap().1.clone();
        // The access log's cancelled record; nothing counted as a request.
        assert!(f.on_stream_done(5).is_some_and(|fin| fin.counters.is_empty()));
        let due = f.shared.borrow_mut().journal.due(5, 10);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].idempotency_key.as_str(), due[0].settle_mode), (key.as_str(), false));
        assert_eq!(due[0].call, outbox::Call::Encoded(call.message.clone()), "the same reserve, sent again");
        let then = due[0].then.as_ref().unwrap();
        assert!(then.if_refused.is_none(), "a refused reservation charged nothing");
        assert!(then.if_applied.as_ref().unwrap().idempotency_key.ends_with(":cancel"));
        assert!(f.on_stream_done(6).is_none());
        assert_eq!(f.shared.borrow().journal.pending(), 0, "resolved once");
    }

    #[test]
    fn settles_are_netted_per_tenant_as_the_journal_merge_would() {
        use prost::Message;
        let mut p = sample();
        let idx = p.tenants.iter().position(|t| t.id == "acme").unwrap();
        let policy = Rc::make_mut(&mut p.tenants[idx].policy);
        policy.limits.set(crate::ratelimit::descriptors::LimitKind::RequestsPerDay, Some(1000));
        policy.limits.set(crate::ratelimit::descriptors::LimitKind::TokensPerMinute, Some(10_000));
        policy.limits.set(crate::ratelimit::descriptors::LimitKind::TokensPerMonth, Some(1_000_000));
        let plugin = Rc::new(p);
        let tenant = &plugin.tenants[idx];
        let domain = &plugin.rate_limit.as_ref().unwrap().domain;
        // (reserved, actual, requests) of four requests: over, under, exact,
        // and a fail-open one charged in full.
        let a = |tokens, micros| Amounts { tokens, micros, ..Amounts::default() };
        let requests = [
            (a(100, 5_000), a(40, 2_000), (1, 1)),
            (a(10, 500), a(90, 4_500), (1, 1)),
            (a(7, 70), a(7, 70), (1, 1)),
            (a(0, 0), a(30, 300), (0, 1)),
        ];
        let shared = Rc::new(RefCell::new(Worker::new(100)));
        for (i, (r, u, n)) in requests.iter().enumerate() {
            let net = settle::SettleNet::of_request(*r, *u, *n);
            shared.borrow_mut().net_settle(
                &plugin,
                &TenantRef::Static(idx),
                None,
                net,
                None,
                || format!("k{i}:settle"),
                10 + i as u64,
            );
        }
        assert_eq!(shared.borrow().pending_settles(), 1, "one net per tenant");
        assert_eq!(shared.borrow().journal.pending(), 0, "nothing in the journal before the tick");
        assert_eq!(shared.borrow_mut().queue_settle_nets(), 0);
        let got = shared.borrow_mut().journal.due(u64::MAX, 10);
        let want = outbox::merge(
            requests
                .iter()
                .enumerate()
                .filter_map(|(i, (r, u, n))| {
                    outbox::Settle::new(
                        &plugin,
                        &TenantRef::Static(idx),
                        None,
                        settle::SettleNet::of_request(*r, *u, *n),
                    )
                    .map(|s| outbox::Entry::settle(s, format!("k{i}:settle"), true, 10 + i as u64))
                })
                .collect(),
        );
        // (The merge counts three settles: the exact one changes nothing.)
        assert_eq!(want.len(), 1);
        assert_eq!(got[0].call, want[0].call, "netted at the source as the journal merge nets");
        assert_eq!(got[0].encode(), want[0].encode());
        // The per-request settles as they were built one by one, netted by
        // descriptor: the same descriptors and hits.
        let mut by_descriptor: Vec<(rls::Descriptor, i128)> = Vec::new();
        for (r, u, n) in &requests {
            let Some(req) = settle::build_settle(domain, &tenant.id, &tenant.policy, *r, *u, *n) else { continue };
            for mut d in req.descriptors {
                let hits = i128::from(d.hits_addend.take().unwrap().value);
                let signed = if std::mem::take(&mut d.is_negative_hits) { -hits } else { hits };
                match by_descriptor.iter_mut().find(|(k, _)| *k == d) {
                    Some((_, h)) => *h += signed,
                    None => by_descriptor.push((d, signed)),
                }
            }
        }
        let one_by_one = rls::RateLimitRequest {
            domain: domain.clone(),
            descriptors: by_descriptor
                .into_iter()
                .filter(|(_, h)| *h != 0)
                .map(|(mut d, h)| {
                    d.is_negative_hits = h < 0;
                    d.hits_addend = Some(rls::UInt64Value { value: h.unsigned_abs() as u64 });
                    d
                })
                .collect(),
            hits_addend: 0,
        };
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].idempotency_key, "k0:settle+4");
        assert_eq!(got[0].next_attempt_ms, 10);
        // The same descriptors and hits; their order does not matter.
        let sorted = |mut r: rls::RateLimitRequest| {
            r.descriptors.sort_by(|x, y| x.entries[1].value.cmp(&y.entries[1].value));
            r
        };
        let decode = |e: &outbox::Entry| sorted(rls::RateLimitRequest::decode(&*e.encode().unwrap()).unwrap());
        assert_eq!(decode(&got[0]), sorted(one_by_one));
        assert_eq!(decode(&got[0]).descriptors.len(), 4, "requests/day, two token limits, dollars");
        // A zero net sends nothing.
        let zero = settle::SettleNet::of_request(a(5, 5), a(5, 5), (1, 1));
        shared.borrow_mut().net_settle(&plugin, &TenantRef::Static(idx), None, zero, None, || "z".into(), 50);
        shared.borrow_mut().queue_settle_nets();
        assert_eq!(shared.borrow().pending_settles(), 0);
    }

    #[test]
    fn client_disconnect_settles_a_flagged_estimate() {
        let mut f = flow();
        start(&mut f, KEY_A, "/v1/messages");
        let _ = f.on_request_body(br#"{"model":"claude-x","max_tokens":100,"stream":true}"#, 0);
        let _ = f.on_rls_reply(Ok(&reply(rls::Code::Ok, vec![(rls::Code::Ok, 100, 60)])), 1);
        f.on_response_headers(200);
        let (_, fin) = f.on_response_body(b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"hello world, this is text\"}}\n\n", false, 10);
        assert!(fin.is_none());
        let fin = f.on_stream_done(20).unwrap();
        let prop = |k: &str| fin.properties.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(prop("tollgate_estimated"), "true");
        assert_eq!(prop("tollgate_outcome"), "incomplete");
        assert!(prop("tollgate_tokens_output").parse::<u64>().unwrap() > 0);
        assert_eq!(f.shared.borrow().pending_settles(), 1);
        assert!(f.on_stream_done(30).is_none(), "finishes once");
    }

    #[test]
    fn disconnect_after_the_end_marker_and_usage_is_ok() {
        let anthropic: &[u8] = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-x\",\"usage\":{\"input_tokens\":9,\"output_tokens\":1}}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":4}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let chat: &[u8] = b"data: {\"model\":\"gpt-4o\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":4,\"total_tokens\":13}}\n\ndata: [DONE]\n\n";
        let chat_no_usage: &[u8] =
            b"data: {\"model\":\"gpt-4o\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n";
        let cases: [(&str, &str, &[u8], &str); 3] = [
            ("/v1/messages", r#"{"model":"claude-x","max_tokens":100,"stream":true}"#, anthropic, "ok"),
            (
                "/v1/chat/completions",
                r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}"#,
                chat,
                "ok",
            ),
            // The end marker without usage: still cut short of what it cost.
            (
                "/v1/chat/completions",
                r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}"#,
                chat_no_usage,
                "incomplete",
            ),
        ];
        for (path, body, stream, want) in cases {
            let mut f = flow();
            start(&mut f, KEY_A, path);
            let _ = f.on_request_body(body.as_bytes(), 0);
            let _ = f.on_rls_reply(Ok(&reply(rls::Code::Ok, vec![(rls::Code::Ok, 100, 60)])), 1);
            f.on_response_headers(200);
            let (_, fin) = f.on_response_body(stream, false, 10);
            assert!(fin.is_none());
            // The client hangs up before the upstream's end of stream.
            let fin = f.on_stream_done(20).unwrap();
            let prop = |k: &str| fin.properties.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()).unwrap();
            assert_eq!(prop("tollgate_outcome"), want, "{path}");
            if want == "ok" {
                assert_eq!(prop("tollgate_estimated"), "false", "{path}");
                assert_eq!(prop("tollgate_tokens_output"), "4", "{path}");
            }
        }
    }

    #[test]
    fn estimates_price_the_asked_tier_and_input_size_bills_the_served_tier() {
        let mut json = crate::config::tests::sample_json();
        json["pricing"]["models"]["gpt-4o"] = serde_json::json!({"input": 2, "output": 10,
            "long_context": {"above_input_tokens": 1000, "input": 4, "output": 20},
            "service_tiers": {"priority": {"multiplier": 2}, "flex": {"multiplier": 0.5}}});
        let plugin = || crate::config::load(json.to_string().as_bytes(), &crate::config::tests::env).unwrap();
        let estimate = |body: String| {
            let mut f = flow_with(plugin());
            start(&mut f, KEY_A, "/v1/chat/completions");
            let _ = f.on_request_body(body.as_bytes(), 0);
            (f.input_estimate, f.estimate_for(100).micros)
        };
        // About 100 input tokens: short rates; x2 when priority is asked for.
        let pad = "x".repeat(300);
        let (input, std) = estimate(format!(r#"{{"model":"gpt-4o","max_tokens":100,"pad":"{pad}"}}"#));
        assert!(input < 1000);
        assert_eq!(std, input * 2 + 100 * 10);
        let (input, prio) =
            estimate(format!(r#"{{"model":"gpt-4o","max_tokens":100,"service_tier":"priority","pad":"{pad}"}}"#));
        assert_eq!(prio, 2 * (input * 2 + 100 * 10));
        // Over 1000 estimated input tokens: never reserved at short rates.
        let long = format!(r#"{{"model":"gpt-4o","max_tokens":100,"pad":"{}"}}"#, "x".repeat(8000));
        let (input, long_micros) = estimate(long);
        assert!(input > 1000);
        assert_eq!(long_micros, input * 4 + 100 * 20);

        // The bill: the tier the response reports (flex), not the one asked for.
        let mut f = flow_with(plugin());
        start(&mut f, KEY_A, "/v1/chat/completions");
        let _ = f.on_request_body(br#"{"model":"gpt-4o","service_tier":"priority","messages":[]}"#, 0);
        let _ = f.on_rls_reply(Ok(&reply(rls::Code::Ok, vec![(rls::Code::Ok, 100, 60)])), 1);
        f.on_response_headers(200);
        let body = br#"{"model":"gpt-4o","service_tier":"flex","choices":[],"usage":{"prompt_tokens":100,"completion_tokens":10,"total_tokens":110}}"#;
        let (_, fin) = f.on_response_body(body, true, 10);
        let fin = fin.unwrap();
        let prop = |k: &str| fin.properties.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()).unwrap();
        // (100*2 + 10*10) x 0.5 = 150 µ$.
        assert_eq!(prop("tollgate_cost_usd"), "0.000150");
    }

    /// The sample configuration with globex capped at `cap` requests in flight.
    fn capped_plugin(cap: u64) -> Rc<Plugin> {
        let mut plugin = sample();
        let idx = plugin.tenants.iter().position(|t| t.id == "globex").unwrap();
        Rc::make_mut(&mut plugin.tenants[idx].policy).max_concurrent_requests = Some(cap);
        Rc::new(plugin)
    }

    #[test]
    fn concurrency_cap_is_released_when_streams_end() {
        let plugin = capped_plugin(1);
        let shared = Rc::new(RefCell::new(Worker::new(10)));
        let body = br#"{"model":"gpt-4o-mini"}"#;
        let ok = reply(rls::Code::Ok, vec![(rls::Code::Ok, 10, 1)]);
        let mut first = RequestFlow::new(Rc::clone(&plugin), Rc::clone(&shared));
        start(&mut first, KEY_B, "/v1/chat/completions");
        let _ = first.on_request_body(body, 0);
        assert!(matches!(first.on_rls_reply(Ok(&ok), 1), BodyStep::Forward { .. }));
        let mut second = RequestFlow::new(Rc::clone(&plugin), Rc::clone(&shared));
        start(&mut second, KEY_B, "/v1/chat/completions");
        let BodyStep::Reply(r) = second.on_request_body(body, 2) else { panic!() };
        assert_eq!(r.header("x-tollgate-error"), Some("concurrency_limited"));
        assert!(!second.has_work_at_stream_end(), "a refused request releases nothing");
        second.on_stream_done(3);
        assert!(first.has_work_at_stream_end());
        first.on_stream_done(4); // e.g. a reset stream
        assert!(!first.has_work_at_stream_end());
        let mut third = RequestFlow::new(Rc::clone(&plugin), Rc::clone(&shared));
        start(&mut third, KEY_B, "/v1/chat/completions");
        assert!(matches!(third.on_request_body(body, 5), BodyStep::Call(_)));
        // Finished at the end of its response, it still holds its slot
        // until the stream is done.
        assert!(matches!(third.on_rls_reply(Ok(&ok), 6), BodyStep::Forward { .. }));
        third.on_response_headers(200);
        let usage = br#"{"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
        assert!(third.on_response_body(usage, true, 7).1.is_some());
        assert!(third.has_work_at_stream_end(), "the slot is given back in on_log");
        assert!(third.on_stream_done(8).is_none());
        assert!(!third.has_work_at_stream_end());
    }

    #[test]
    fn requests_waiting_for_the_limiter_hold_their_slot() {
        // The slot is taken before the reserve call: two requests that both
        // wait for the service cannot both pass a cap of one.
        let plugin = capped_plugin(1);
        let shared = Rc::new(RefCell::new(Worker::new(10)));
        let body = br#"{"model":"gpt-4o-mini"}"#;
        let mut first = RequestFlow::new(Rc::clone(&plugin), Rc::clone(&shared));
        start(&mut first, KEY_B, "/v1/chat/completions");
        assert!(matches!(first.on_request_body(body, 0), BodyStep::Call(_)));
        let mut second = RequestFlow::new(Rc::clone(&plugin), Rc::clone(&shared));
        start(&mut second, KEY_B, "/v1/chat/completions");
        let BodyStep::Reply(r) = second.on_request_body(body, 1) else { panic!() };
        assert_eq!(r.header("x-tollgate-error"), Some("concurrency_limited"));
        // The first is refused by the limiter: its slot comes back at the end.
        let limited = reply(rls::Code::OverLimit, vec![(rls::Code::OverLimit, 10, 0)]);
        assert!(matches!(first.on_rls_reply(Ok(&limited), 2), BodyStep::Reply(_)));
        first.on_stream_done(3);
        second.on_stream_done(3);
        let mut third = RequestFlow::new(Rc::clone(&plugin), Rc::clone(&shared));
        start(&mut third, KEY_B, "/v1/chat/completions");
        assert!(matches!(third.on_request_body(body, 4), BodyStep::Call(_)));
    }

    #[test]
    fn workers_share_the_cap_through_one_table() {
        // Two VMs (workers) with their own `Worker` but one slot table.
        struct Both(Rc<crate::admission::inflight::LocalStore>);
        impl SlotStore for Both {
            fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), crate::admission::inflight::StoreError> {
                self.0.get(key)
            }
            fn set(&self, key: &str, v: &[u8], cas: Option<u32>) -> Result<(), crate::admission::inflight::StoreError> {
                self.0.set(key, v, cas)
            }
        }
        let plugin = capped_plugin(1);
        let table = Rc::new(crate::admission::inflight::LocalStore::default());
        let worker = |vm| {
            let mut s = Worker::new(10);
            s.slots = Box::new(Both(Rc::clone(&table)));
            s.vm_id = vm;
            Rc::new(RefCell::new(s))
        };
        let (w1, w2) = (worker(1), worker(2));
        let body = br#"{"model":"gpt-4o-mini"}"#;
        let mut first = RequestFlow::new(Rc::clone(&plugin), Rc::clone(&w1));
        start(&mut first, KEY_B, "/v1/chat/completions");
        assert!(matches!(first.on_request_body(body, 0), BodyStep::Call(_)));
        let mut second = RequestFlow::new(Rc::clone(&plugin), Rc::clone(&w2));
        start(&mut second, KEY_B, "/v1/chat/completions");
        let BodyStep::Reply(r) = second.on_request_body(body, 1) else { panic!() };
        assert_eq!(r.header("x-tollgate-error"), Some("concurrency_limited"));
        first.on_stream_done(2);
        let mut third = RequestFlow::new(Rc::clone(&plugin), Rc::clone(&w2));
        start(&mut third, KEY_B, "/v1/chat/completions");
        assert!(matches!(third.on_request_body(body, 3), BodyStep::Call(_)));
    }

    #[test]
    fn fallback_model_past_the_budget_share() {
        let mut plugin = sample();
        let idx = plugin.tenants.iter().position(|t| t.id == "acme").unwrap();
        Rc::make_mut(&mut plugin.tenants[idx].policy).fallback_model = Some("gpt-4o-mini".into());
        Rc::make_mut(&mut plugin.tenants[idx].policy).fallback_at_permille = Some(800);
        let plugin = Rc::new(plugin);
        let shared = Rc::new(RefCell::new(Worker::new(10)));
        let body = br#"{"model":"gpt-4o","max_tokens":10}"#;
        // 90% of the monthly dollar budget used, as the service reports.
        let limit =
            plugin.tenants[idx].policy.limits.get(crate::ratelimit::descriptors::LimitKind::UsdPerMonth).unwrap();
        let remaining = u32::try_from(limit / 10).unwrap();
        let first_reply = reply(rls::Code::Ok, vec![(rls::Code::Ok, remaining, 60)]);
        let mut first = RequestFlow::new(Rc::clone(&plugin), Rc::clone(&shared));
        start(&mut first, KEY_A, "/v1/chat/completions");
        let _ = first.on_request_body(body, 0);
        let BodyStep::Forward { body: None, .. } = first.on_rls_reply(Ok(&first_reply), 1) else {
            panic!("the first request is served as asked")
        };
        let mut second = RequestFlow::new(Rc::clone(&plugin), Rc::clone(&shared));
        start(&mut second, KEY_A, "/v1/chat/completions");
        let _ = second.on_request_body(body, 2);
        let BodyStep::Forward { body: Some(b), .. } = second.on_rls_reply(Ok(&first_reply), 3) else {
            panic!("the second request is rewritten")
        };
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["model"], "gpt-4o-mini");
        let hs = second.on_response_headers(200);
        assert!(hs.set.contains(&("x-tollgate-model-served".into(), "gpt-4o-mini".into())));
    }

    #[test]
    fn usd_formatting() {
        assert_eq!(format_usd(1_234_567), "1.234567");
        assert_eq!(format_usd(5), "0.000005");
    }

    /// The sample plugin with a named key of acme ("ci", $1/day, shadow as
    /// asked), 2 requests/minute per end user for pro, a gpt-4o pool with a
    /// 20 % share for pro, and a trusted end-user header on the chat route.
    fn levels_plugin(shadow: bool) -> Rc<Plugin> {
        let mut v = crate::config::tests::sample_json();
        v["tenants"][0]["keys"] = serde_json::json!([
            {"id": "ci", "sha256": crate::config::tests::sha("ci-key"), "limits": {"usd_per_day": 1.0}, "shadow": shadow}
        ]);
        v["tiers"]["pro"]["users"] = serde_json::json!({"requests_per_minute": 2});
        v["tiers"]["pro"]["lease_requests"] = 0.into();
        v["pools"] = serde_json::json!([{"name": "oa-4o", "provider": "openai", "models": ["gpt-4o*"],
            "limits": {"requests_per_minute": 100, "output_tokens_per_minute": 8000}, "tier_shares": {"pro": 0.2}}]);
        v["identity"] = serde_json::json!({"end_user_header": "x-end-user"});
        v["routes"][0]["trust_end_user_header"] = true.into();
        Rc::new(crate::config::load(v.to_string().as_bytes(), &crate::config::tests::env).unwrap())
    }

    fn levels_call(plugin: &Rc<Plugin>, user: Option<&str>, path: &str) -> (RequestFlow, rls::RateLimitRequest) {
        let mut f = RequestFlow::new(Rc::clone(plugin), Rc::new(RefCell::new(Worker::new(100))));
        let mut hs = h(&[(":path", path), (":method", "POST"), ("x-api-key", "ci-key")]);
        if let Some(u) = user {
            hs.push(("x-end-user".into(), u.into()));
        }
        let HeadersStep::ReadBody(plan) = f.on_request_headers(&hs, false, 0, || "rid".into()) else { panic!() };
        if path == "/v1/messages" {
            assert!(plan.remove.contains(&"x-end-user".to_string()), "an untrusted end-user header is dropped");
        }
        let body: &[u8] = if path == "/v1/messages" {
            br#"{"model":"claude-3-5-haiku","max_tokens":10,"messages":[]}"#
        } else {
            br#"{"model":"gpt-4o","max_tokens":10}"#
        };
        let BodyStep::Call(call) = f.on_request_body(body, 0) else { panic!("expected a reserve call") };
        (f, rls::RateLimitRequest::decode(call.message.as_slice()).unwrap())
    }

    fn shapes(req: &rls::RateLimitRequest) -> Vec<String> {
        req.descriptors
            .iter()
            .map(|d| {
                d.entries
                    .iter()
                    .filter(|e| !e.key.starts_with("tollgate."))
                    .map(|e| format!("{}={}", e.key, e.value))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect()
    }

    #[test]
    fn one_reserve_carries_tenant_key_user_and_pool_levels() {
        let plugin = levels_plugin(false);
        let (_, req) = levels_call(&plugin, Some("u-1"), "/v1/chat/completions");
        assert_eq!(
            shapes(&req),
            [
                "tenant=acme,limit=usd_per_month",
                "tenant=acme,key=ci,limit=usd_per_day",
                "tenant=acme,user=u-1,limit=requests_per_minute",
                "pool=oa-4o,limit=requests_per_minute",
                "pool=oa-4o,limit=output_tokens_per_minute",
                "pool=oa-4o,tier=pro,limit=requests_per_minute",
                "pool=oa-4o,tier=pro,limit=output_tokens_per_minute",
            ]
        );
        let out: Vec<u64> = req.descriptors.iter().map(|d| d.hits_addend.as_ref().unwrap().value).collect();
        assert_eq!(out[4], 10, "output tokens are the request's max_tokens");
        assert_eq!(out[5], 1);
        // An untrusted route: no user level, and no pool for another provider's model.
        let (_, req) = levels_call(&plugin, Some("u-1"), "/v1/messages");
        assert_eq!(shapes(&req), ["tenant=acme,limit=usd_per_month", "tenant=acme,key=ci,limit=usd_per_day"]);
    }

    #[test]
    fn a_refusal_names_its_level() {
        let plugin = levels_plugin(false);
        let (mut f, req) = levels_call(&plugin, Some("u-1"), "/v1/chat/completions");
        let mut statuses = vec![(rls::Code::Ok, 100, 60); req.descriptors.len()];
        statuses[2] = (rls::Code::OverLimit, 0, 20);
        let BodyStep::Reply(r) = f.on_rls_reply(Ok(&reply(rls::Code::OverLimit, statuses)), 0) else { panic!() };
        assert_eq!(r.header("x-tollgate-error"), Some("user_request_rate_limited"));
        assert_eq!(r.header("x-tollgate-limit"), Some("user.requests_per_minute"));
        assert_eq!(r.header("x-should-retry"), Some("true"));

        let (mut f, req) = levels_call(&plugin, None, "/v1/chat/completions");
        let mut statuses = vec![(rls::Code::Ok, 100, 60); req.descriptors.len()];
        statuses[1] = (rls::Code::OverLimit, 0, 3600);
        let BodyStep::Reply(r) = f.on_rls_reply(Ok(&reply(rls::Code::OverLimit, statuses)), 0) else { panic!() };
        assert_eq!(r.header("x-tollgate-error"), Some("key_daily_spend_budget_exhausted"));
        assert_eq!(r.header("x-should-retry"), Some("false"));

        let (mut f, req) = levels_call(&plugin, None, "/v1/chat/completions");
        let mut statuses = vec![(rls::Code::Ok, 100, 60); req.descriptors.len()];
        statuses[2] = (rls::Code::OverLimit, 0, 2);
        let BodyStep::Reply(r) = f.on_rls_reply(Ok(&reply(rls::Code::OverLimit, statuses)), 0) else { panic!() };
        assert_eq!(r.header("x-tollgate-error"), Some("provider_pool_request_rate_limited"));
        assert_eq!((r.header("retry-after"), r.header("x-should-retry")), (Some("2"), Some("true")));
    }

    #[test]
    fn shadow_mode_admits_marks_and_settles_nothing_for_a_would_be_refusal() {
        let plugin = levels_plugin(true);
        let (mut f, req) = levels_call(&plugin, None, "/v1/chat/completions");
        let mut statuses = vec![(rls::Code::Ok, 100, 60); req.descriptors.len()];
        statuses[1] = (rls::Code::OverLimit, 0, 3600);
        let step = f.on_rls_reply(Ok(&reply(rls::Code::OverLimit, statuses)), 0);
        assert!(matches!(step, BodyStep::Forward { .. }), "{step:?}");
        assert_eq!(f.shadow_refusal.as_deref(), Some("key_daily_spend_budget_exhausted"));
        let step = f.on_response_headers(200);
        assert!(step.set.contains(&("x-tollgate-shadow-refusal".into(), "key_daily_spend_budget_exhausted".into())));
        let usage = br#"{"model":"gpt-4o","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        assert!(f.on_response_body(usage, true, 5).1.is_some());
        let shared = Rc::clone(&f.shared);
        shared.borrow_mut().queue_settle_nets();
        let due = shared.borrow_mut().journal.due(u64::MAX, 10);
        // Nothing was charged, so nothing is settled: only its ledger row goes.
        assert_eq!(due.len(), 1);
        let req = rls::RateLimitRequest::decode(due[0].encode().unwrap().as_ref()).unwrap();
        assert!(req.descriptors.is_empty(), "{req:?}");
        assert!(due[0].metadata().iter().any(|(k, _)| k == rls::ledger::META_USAGE));
    }

    #[test]
    fn a_clients_end_user_header_is_ignored_where_not_trusted_and_checked_where_it_is() {
        let plugin = levels_plugin(false);
        let mut f = RequestFlow::new(Rc::clone(&plugin), Rc::new(RefCell::new(Worker::new(100))));
        let bad = "x".repeat(200);
        let hs =
            h(&[(":path", "/v1/chat/completions"), (":method", "POST"), ("x-api-key", "ci-key"), ("x-end-user", &bad)]);
        let HeadersStep::Reply(r) = f.on_request_headers(&hs, false, 0, || "rid".into()) else { panic!() };
        assert_eq!((r.status, r.header("x-tollgate-error")), (400, Some("invalid_end_user")));
        let (f, _) = levels_call(&plugin, Some("u-9"), "/v1/messages");
        assert_eq!(f.user, None);
    }

    #[test]
    fn automatic_leases_follow_the_recent_rate() {
        let mut plugin = sample();
        let idx = plugin.tenants.iter().position(|t| t.id == "globex").unwrap();
        let p = Rc::make_mut(&mut plugin.tenants[idx].policy);
        p.limits.set(crate::ratelimit::descriptors::LimitKind::RequestsPerMinute, Some(100_000));
        assert_eq!(p.lease, crate::config::LeaseSize::Auto, "leases are on by default");
        let plugin = Rc::new(plugin);
        let shared = Rc::new(RefCell::new(Worker::new(100)));
        let ok = || Some(reply(rls::Code::Ok, vec![(rls::Code::Ok, 99_000, 60)]));
        // Below four requests in a lease period: one call per request.
        for i in 0..3 {
            assert_eq!(leased_request(&plugin, &shared, ok(), i * 10), Some(1));
        }
        // The fourth shows a rate: a lease of four along with it.
        assert_eq!(leased_request(&plugin, &shared, ok(), 30), Some(5));
        for i in 0..3 {
            assert_eq!(leased_request(&plugin, &shared, None, 40 + i), None, "drawn from the lease");
        }
        // Ten requests in the last period: the next lease is ten.
        for i in 0..3 {
            leased_request(&plugin, &shared, ok(), 50 + i);
        }
        assert_eq!(leased_request(&plugin, &shared, ok(), 1000), Some(11));
        for i in 0..7 {
            assert_eq!(leased_request(&plugin, &shared, None, 1001 + i), None, "drawn from the lease");
        }
    }

    #[test]
    fn the_quota_endpoint_answers_the_callers_own_levels_from_a_pure_check() {
        let plugin = levels_plugin(false);
        let mut f = RequestFlow::new(Rc::clone(&plugin), Rc::new(RefCell::new(Worker::new(100))));
        let hs = h(&[(":path", QUOTA_PATH), (":method", "GET"), ("x-api-key", "ci-key")]);
        let HeadersStep::Call(call) = f.on_request_headers(&hs, true, 0, || "rid".into()) else { panic!() };
        let req = rls::RateLimitRequest::decode(call.message.as_slice()).unwrap();
        assert_eq!(shapes(&req), ["tenant=acme,limit=usd_per_month", "tenant=acme,key=ci,limit=usd_per_day"]);
        assert!(req.descriptors.iter().all(|d| d.hits_addend.as_ref().unwrap().value == 0), "charges nothing");
        let answer = reply(rls::Code::Ok, vec![(rls::Code::Ok, 90_000_000, 86_400), (rls::Code::Ok, 250_000, 3600)]);
        let BodyStep::Reply(r) = f.on_rls_reply(Ok(&answer), 5) else { panic!() };
        assert_eq!(r.status, 200);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!((v["tenant"].as_str(), v["key"].as_str()), (Some("acme"), Some("ci")));
        assert_eq!(v["limits"][1]["level"], "key");
        assert_eq!(v["limits"][1]["remaining"], 250_000);
        assert_eq!(v["limits"][1]["used"], 750_000);
        // Only GET; the service down is a 503; an unknown key is a 401.
        let mut f = RequestFlow::new(Rc::clone(&plugin), Rc::new(RefCell::new(Worker::new(100))));
        let hs = h(&[(":path", QUOTA_PATH), (":method", "POST"), ("x-api-key", "ci-key")]);
        assert!(matches!(f.on_request_headers(&hs, true, 0, || "r".into()), HeadersStep::Reply(r) if r.status == 405));
        let mut f = RequestFlow::new(Rc::clone(&plugin), Rc::new(RefCell::new(Worker::new(100))));
        let hs = h(&[(":path", QUOTA_PATH), (":method", "GET"), ("x-api-key", "ci-key")]);
        assert!(matches!(f.on_request_headers(&hs, true, 0, || "r".into()), HeadersStep::Call(_)));
        assert!(matches!(f.on_rls_reply(Err(14), 1), BodyStep::Reply(r) if r.status == 503));
        let mut f = RequestFlow::new(Rc::clone(&plugin), Rc::new(RefCell::new(Worker::new(100))));
        let hs = h(&[(":path", QUOTA_PATH), (":method", "GET"), ("x-api-key", "nope")]);
        assert!(matches!(f.on_request_headers(&hs, true, 0, || "r".into()), HeadersStep::Reply(r) if r.status == 401));
    }

    #[test]
    fn a_held_response_says_what_its_budgets_have_left_after_the_charge() {
        let plugin = levels_plugin(false);
        let (mut f, req) = levels_call(&plugin, None, "/v1/chat/completions");
        let mut statuses = vec![(rls::Code::Ok, 100, 60); req.descriptors.len()];
        statuses[0] = (rls::Code::Ok, 50_000_000, 86_400); // the tenant's month: $50 left
        statuses[1] = (rls::Code::Ok, 500_000, 3600); // the key's $1/day: $0.5 left after the reservation
        let step = f.on_rls_reply(Ok(&reply(rls::Code::Ok, statuses)), 0);
        assert!(matches!(step, BodyStep::Forward { .. }));
        f.on_response_headers(200);
        let usage = br#"{"model":"gpt-4o","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        let (_, finish) = f.on_response_body(usage, true, 5);
        let finish = finish.unwrap();
        let get = |k: &str| finish.headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("x-tollgate-budget-remaining-usd-limit").as_deref(), Some("key.usd_per_day"));
        let left: f64 = get("x-tollgate-budget-remaining-usd").unwrap().parse().unwrap();
        let cost: f64 = get("x-tollgate-cost-usd").unwrap().parse().unwrap();
        // Reserved: the estimate (input from the body, 10 output tokens);
        // used: 3 + 4 tokens of gpt-4o. The remainder is 0.5 + estimate - cost.
        assert!(left > 0.5 && left < 0.5 + 0.001, "{left}");
        assert!(cost > 0.0);
    }

    #[test]
    fn finished_and_refused_requests_reach_the_ledger_with_the_settles() {
        let plugin = levels_plugin(false);
        let shared = Rc::new(RefCell::new(Worker::new(100)));
        // A finished request: its row rides its netted settle.
        let mut f = RequestFlow::new(Rc::clone(&plugin), Rc::clone(&shared));
        let hs = h(&[(":path", "/v1/chat/completions"), (":method", "POST"), ("x-api-key", "ci-key")]);
        assert!(matches!(f.on_request_headers(&hs, false, 1_000, || "r1".into()), HeadersStep::ReadBody(_)));
        let BodyStep::Call(call) = f.on_request_body(br#"{"model":"gpt-4o","max_tokens":10}"#, 1_000) else { panic!() };
        let n = rls::RateLimitRequest::decode(call.message.as_slice()).unwrap().descriptors.len();
        let step = f.on_rls_reply(Ok(&reply(rls::Code::Ok, vec![(rls::Code::Ok, 1_000_000, 60); n])), 1_000);
        assert!(matches!(step, BodyStep::Forward { .. }));
        f.on_response_headers(200);
        let usage = br#"{"model":"gpt-4o","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        assert!(f.on_response_body(usage, true, 1_005).1.is_some());
        // A refused one (an unknown model for the tier is not a refusal of
        // the tenant's: use the wrong method instead).
        let mut g = RequestFlow::new(Rc::clone(&plugin), Rc::clone(&shared));
        let hs = h(&[(":path", "/v1/chat/completions"), (":method", "GET"), ("x-api-key", "ci-key")]);
        let HeadersStep::Reply(r) = g.on_request_headers(&hs, false, 1_010, || "r2".into()) else { panic!() };
        g.note_refusal(&r, 1_010);
        shared.borrow_mut().queue_settle_nets();
        let due = shared.borrow_mut().journal.due(u64::MAX, 10);
        let usage: Vec<_> = due
            .iter()
            .flat_map(|e| e.metadata())
            .filter(|(k, _)| k == rls::ledger::META_USAGE)
            .flat_map(|(_, v)| rls::ledger::decode(&v).unwrap())
            .collect();
        let finished = usage.iter().find(|r| r.requests == 1).expect("the finished request's row");
        assert_eq!(
            (finished.tenant.as_str(), finished.api_key.as_deref(), finished.model.as_str()),
            ("acme", Some("ci"), "gpt-4o")
        );
        assert_eq!((finished.input_tokens, finished.output_tokens, finished.finished_at_ms), (3, 4, 1_005));
        assert!(finished.cost_micro_usd > 0);
        let refused = usage.iter().find(|r| r.requests == 0).expect("the refusal's row");
        assert_eq!(refused.refusals.get("method_not_allowed"), Some(&1));
        // Every entry that carries rows has an idempotency key.
        assert!(due.iter().all(|e| !e.idempotency_key.is_empty() && e.encode().is_some()));
    }

    #[test]
    fn rows_never_ride_a_settle_that_starts_with_a_pool() {
        // globex (free: requests per minute only) draws on the gpt-4o pool,
        // which counts output tokens: its settle moves the pool's counter
        // alone, so its usage row goes in a ledger-only settle.
        let plugin = levels_plugin(false);
        let shared = Rc::new(RefCell::new(Worker::new(100)));
        let mut f = RequestFlow::new(Rc::clone(&plugin), Rc::clone(&shared));
        assert!(matches!(start(&mut f, KEY_B, "/v1/chat/completions"), HeadersStep::ReadBody(_)));
        let BodyStep::Call(call) = f.on_request_body(br#"{"model":"gpt-4o-mini","max_tokens":10}"#, 1_000) else {
            panic!()
        };
        let n = rls::RateLimitRequest::decode(call.message.as_slice()).unwrap().descriptors.len();
        let step = f.on_rls_reply(Ok(&reply(rls::Code::Ok, vec![(rls::Code::Ok, 1_000, 60); n])), 1_000);
        assert!(matches!(step, BodyStep::Forward { .. }));
        f.on_response_headers(200);
        let usage = br#"{"model":"gpt-4o-mini","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        assert!(f.on_response_body(usage, true, 1_005).1.is_some());
        shared.borrow_mut().queue_settle_nets();
        let due = shared.borrow_mut().journal.due(u64::MAX, 10);
        assert_eq!(due.len(), 2, "{due:?}");
        for e in &due {
            let req = rls::RateLimitRequest::decode(e.encode().unwrap().as_ref()).unwrap();
            let has_rows = e.metadata().iter().any(|(k, _)| k == rls::ledger::META_USAGE);
            match req.descriptors.first() {
                Some(d) => {
                    assert_eq!(d.entries[0].key, "pool");
                    assert!(!has_rows);
                }
                None => assert!(has_rows),
            }
        }
    }
}
