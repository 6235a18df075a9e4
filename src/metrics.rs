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

/// Per tenant and model: `tollgate.tenant.<t>.model.<m>.<name>`.
pub fn tenant_model(tenant: &str, model: &str, name: &str) -> String {
    format!("tollgate.tenant.{}.model.{}.{}", label(tenant), label(model), name)
}

/// Requests by outcome: `tollgate.tenant.<t>.model.<m>.outcome.<o>.requests`.
pub fn requests(tenant: &str, model: &str, outcome: &str) -> String {
    format!(
        "tollgate.tenant.{}.model.{}.outcome.{}.requests",
        label(tenant),
        label(model),
        label(outcome)
    )
}

/// Refusals by limit or reason: `tollgate.tenant.<t>.limit.<code>.refused`.
pub fn refused(tenant: &str, code: &str) -> String {
    format!("tollgate.tenant.{}.limit.{}.refused", label(tenant), label(code))
}

/// Per tenant only: `tollgate.tenant.<t>.<name>`.
pub fn tenant(tenant: &str, name: &str) -> String {
    format!("tollgate.tenant.{}.{}", label(tenant), name)
}

/// Filter-wide: `tollgate.<name>`.
pub fn global(name: &str) -> String {
    format!("tollgate.{name}")
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
}
