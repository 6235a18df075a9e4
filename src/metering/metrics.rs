//! Which metric names does tollgate report, and how are their labels bounded?
//!
//! Metric names.
//!
//! proxy-wasm metrics have no labels, so labels are encoded in the name and
//! Envoy's `stats_config.stats_tags` extracts them (see [`STATS_TAGS`]).
//! A custom metric named `tollgate.x` appears as `wasmcustom.tollgate.x` in
//! `/stats`, and as `tollgate_x{...}` in `/stats/prometheus` once the tags
//! are extracted.
//!
//! Cardinality: every distinct name lives as long as Envoy. Tenant ids are
//! bounded by the configuration; model names are what clients send, so only
//! models that passed the tenant's allowlist are used as label values, and
//! after [`MAX_MODEL_LABELS`] distinct models per VM further ones are folded
//! into `other`. Label values are sanitised to `[A-Za-z0-9_-]`.

/// Distinct model label values kept per VM before folding into `other`.
pub const MAX_MODEL_LABELS: usize = 200;

/// `stats_tags` entries for the Envoy bootstrap, as (tag_name, regex).
/// The regexes match the full `wasmcustom.` name.
pub const STATS_TAGS: &[(&str, &str)] = &[
    ("tenant", r"^wasmcustom\.tollgate\.(tenant\.([^.]+)\.)"),
    ("model", r"^wasmcustom\.tollgate\.(?:tenant\.[^.]+\.)?(model\.([^.]+)\.)"),
    ("outcome", r"^wasmcustom\.tollgate\.(?:tenant\.[^.]+\.)?(?:model\.[^.]+\.)?(outcome\.([^.]+)\.)"),
    ("limit", r"^wasmcustom\.tollgate\.(?:tenant\.[^.]+\.)?(limit\.([^.]+)\.)"),
    ("target", r"^wasmcustom\.tollgate\.(?:tenant\.[^.]+\.)?(target\.([^.]+)\.)"),
];

/// Replaces every character that would break tag extraction.
pub fn label(value: &str) -> String {
    let mut out: String = value
        .chars()
        .take(64)
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    if out.is_empty() {
        out.push_str("unknown");
    }
    out
}

use std::rc::Rc;

/// Per tenant and model: `tollgate.tenant.<t>.model.<m>.<name>`.
pub fn tenant_model(tenant: &str, model: &str, name: &str) -> String {
    format!("tollgate.tenant.{}.model.{}.{}", label(tenant), label(model), name)
}

/// Requests by outcome: `tollgate.tenant.<t>.model.<m>.outcome.<o>.requests`.
pub fn requests(tenant: &str, model: &str, outcome: &str) -> String {
    format!("tollgate.tenant.{}.model.{}.outcome.{}.requests", label(tenant), label(model), label(outcome))
}

/// Refusals by limit or reason: `tollgate.tenant.<t>.limit.<code>.refused`.
pub fn refused(tenant: &str, code: &str) -> String {
    format!("tollgate.tenant.{}.limit.{}.refused", label(tenant), label(code))
}

/// Requests shadow mode let through that enforcement would have refused,
/// by the refusal code they would have had.
pub fn shadow_refused(tenant: &str, code: &str) -> String {
    format!("tollgate.tenant.{}.limit.{}.shadow_refused", label(tenant), label(code))
}

/// Per tenant only: `tollgate.tenant.<t>.<name>`.
pub fn tenant(tenant: &str, name: &str) -> String {
    format!("tollgate.tenant.{}.{}", label(tenant), name)
}

/// A failover target's requests and failures, per tenant:
/// `tollgate.tenant.<t>.target.<p>.target_requests`, and one of
/// `target_rate_limited` (provider 429s), `target_errors` (5xx),
/// `target_timeouts` (504s). In Prometheus: `tollgate_target_requests{tenant,target}`.
pub fn target_counters(tenant: &str, target: &str, outcome: crate::upstream::circuit::Outcome) -> Vec<(Rc<str>, u64)> {
    use crate::upstream::circuit::Outcome;
    let name = |what: &str| -> Rc<str> {
        Rc::from(format!("tollgate.tenant.{}.target.{}.{what}", label(tenant), label(target)).as_str())
    };
    let mut out = vec![(name("target_requests"), 1)];
    let failure = match outcome {
        Outcome::RateLimited { .. } => Some("target_rate_limited"),
        Outcome::Error => Some("target_errors"),
        Outcome::Timeout => Some("target_timeouts"),
        Outcome::Success | Outcome::Abandoned => None,
    };
    out.extend(failure.map(|f| (name(f), 1)));
    out
}

/// A failover target's circuit (0 closed, 1 open, 2 half-open), a gauge:
/// `tollgate.target.<p>.target_circuit_state` (`tollgate_target_circuit_state{target}`).
pub fn circuit_state(target: &str) -> String {
    format!("tollgate.target.{}.target_circuit_state", label(target))
}

/// Filter-wide: `tollgate.<name>`.
pub fn global(name: &str) -> String {
    format!("tollgate.{name}")
}

/// The metric names of one tenant and model, built once per VM and shared
/// by its requests (a request's metrics otherwise cost a dozen string
/// formats).
#[derive(Debug)]
pub struct TenantModelNames {
    tenant_id: String,
    model_label: String,
    /// `requests` by outcome: ok, incomplete, stream_error, upstream_error.
    requests: [Rc<str>; 4],
    /// tokens_input, tokens_cache_read, tokens_cache_write, tokens_output,
    /// tokens_reasoning, cost_micro_usd (the order of [`USAGE_COUNTERS`]).
    pub usage: [Rc<str>; 6],
    pub ttfb_ms: Rc<str>,
    pub duration_ms: Rc<str>,
    pub usage_estimated: Rc<str>,
    pub leased: Rc<str>,
    pub stream_errors: Rc<str>,
    pub unpriced: Rc<str>,
}

/// The usage counters per tenant and model, in [`TenantModelNames::usage`] order.
pub const USAGE_COUNTERS: [&str; 6] =
    ["tokens_input", "tokens_cache_read", "tokens_cache_write", "tokens_output", "tokens_reasoning", "cost_micro_usd"];

const OUTCOMES: [&str; 4] = ["ok", "incomplete", "stream_error", "upstream_error"];

impl TenantModelNames {
    /// Names for `tenant` and a model already turned into a bounded label.
    pub fn new(tenant_id: &str, model_label: &str) -> Self {
        let tm = |name: &str| Rc::<str>::from(tenant_model(tenant_id, model_label, name));
        TenantModelNames {
            tenant_id: tenant_id.to_string(),
            model_label: model_label.to_string(),
            requests: OUTCOMES.map(|o| Rc::from(requests(tenant_id, model_label, o))),
            usage: USAGE_COUNTERS.map(tm),
            ttfb_ms: tm("ttfb_ms"),
            duration_ms: tm("duration_ms"),
            usage_estimated: Rc::from(tenant(tenant_id, "usage_estimated")),
            leased: Rc::from(tenant(tenant_id, "leased")),
            stream_errors: Rc::from(tenant(tenant_id, "stream_errors")),
            unpriced: Rc::from(global(&format!("model.{model_label}.unpriced"))),
        }
    }

    /// The `requests` counter of an outcome (one of ok, incomplete,
    /// stream_error, upstream_error; any other is built on the spot).
    pub fn requests(&self, outcome: &str) -> Rc<str> {
        match OUTCOMES.iter().position(|o| *o == outcome).and_then(|i| self.requests.get(i)) {
            Some(name) => Rc::clone(name),
            None => Rc::from(requests(&self.tenant_id, &self.model_label, outcome)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_tag_safe() {
        assert_eq!(
            tenant_model("acme.eu", "gpt-4.1", "tokens_output"),
            "tollgate.tenant.acme_eu.model.gpt-4_1.tokens_output"
        );
        assert_eq!(label(""), "unknown");
        assert_eq!(label("a/b c"), "a_b_c");
        assert_eq!(refused("t", "tokens_per_minute"), "tollgate.tenant.t.limit.tokens_per_minute.refused");
    }

    #[test]
    fn cached_names_are_the_names() {
        let n = TenantModelNames::new("acme", "gpt-4o");
        for (i, name) in USAGE_COUNTERS.iter().enumerate() {
            assert_eq!(&*n.usage[i], tenant_model("acme", "gpt-4o", name));
        }
        for o in ["ok", "incomplete", "stream_error", "upstream_error", "other_outcome"] {
            assert_eq!(&*n.requests(o), requests("acme", "gpt-4o", o));
        }
        assert_eq!(&*n.ttfb_ms, "tollgate.tenant.acme.model.gpt-4o.ttfb_ms");
        assert_eq!(&*n.duration_ms, "tollgate.tenant.acme.model.gpt-4o.duration_ms");
        assert_eq!(&*n.leased, "tollgate.tenant.acme.leased");
        assert_eq!(&*n.usage_estimated, "tollgate.tenant.acme.usage_estimated");
        assert_eq!(&*n.stream_errors, "tollgate.tenant.acme.stream_errors");
        assert_eq!(&*n.unpriced, "tollgate.model.gpt-4o.unpriced");
    }
}
