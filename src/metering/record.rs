//! What does a finished request report? Its final usage (metered, or a
//! flagged estimate), its cost, and the filter state, counters, histograms,
//! headers and stream comment that carry them to the access log, the metrics
//! and the client.

use std::rc::Rc;

use crate::config::{Plugin, Tenant};
use crate::llm::Api;
use crate::metering::metrics::TenantModelNames;
use crate::metering::pricing::PricedBy;
use crate::metering::usage::{self, Metered, Usage};
use crate::request::effect::Finish;

/// What the request knew when it finished.
pub struct Facts<'a> {
    pub tenant: &'a Tenant,
    pub user: Option<&'a str>,
    pub request_id: &'a str,
    pub api: Option<Api>,
    pub model_requested: &'a str,
    pub model_served: &'a str,
    /// Input tokens estimated from the body size.
    pub input_estimate: u64,
    /// 0: no response arrived.
    pub upstream_status: u16,
    pub start_ms: u64,
    pub first_byte_ms: Option<u64>,
    pub now_ms: u64,
    /// The response reached its end (not cut off).
    pub reached_end: bool,
    /// Admitted from a quota lease.
    pub leased: bool,
    /// A non-streamed response held for the usage headers.
    pub usage_headers: bool,
    /// The named API key's id.
    pub key: Option<&'a str>,
    /// Shadow mode: the refusal this request would have had.
    pub shadow_refusal: Option<&'a str>,
    /// What each budget has left once this request's usage (and its cost in
    /// micro-dollars) replaced its reservation.
    pub budgets_after: Option<BudgetsAfter<'a>>,
    /// A free call (token counting): it used no tokens and costs nothing.
    pub free: bool,
    /// Its traffic was not read (an allowed WebSocket upgrade): reported
    /// with `unmetered` set, its 101 answer an `ok`.
    pub unmetered: bool,
}

/// See [`Facts::budgets_after`].
pub type BudgetsAfter<'a> = &'a dyn Fn(&Usage, u64) -> Vec<crate::ratelimit::descriptors::LimitState>;

/// The usage a finished request is settled and reported with, and whether
/// it is an estimate: the metered usage when complete; when a successful
/// response was cut off, its counts raised to what passed; with no usage
/// from a successful (or absent) response, an estimate from the body size
/// and the bytes that passed. A failed response without usage used nothing.
pub fn final_usage(metered: &Metered, upstream_status: u16, input_estimate: u64) -> (Usage, bool) {
    let ok_status = (200..300).contains(&upstream_status);
    match metered.usage {
        Some(u) if metered.complete || !ok_status => (u, false),
        Some(mut u) => {
            // Cut off: cumulative counts (Anthropic) stopped early.
            u.output = u.output.max(metered.estimated_output_tokens());
            u.total = u.input_total().saturating_add(u.output);
            (u, true)
        }
        None if !ok_status && upstream_status != 0 => (Usage::default(), false),
        None => {
            let output = metered.estimated_output_tokens();
            let u = Usage {
                input_uncached: input_estimate,
                output,
                total: input_estimate.saturating_add(output),
                ..Usage::default()
            };
            (u, true)
        }
    }
}

/// The outcome label of a finished request.
pub fn outcome(reached_end: bool, upstream_status: u16, stream_errors: bool) -> &'static str {
    if !reached_end {
        "incomplete"
    } else if (200..300).contains(&upstream_status) {
        if stream_errors {
            "stream_error"
        } else {
            "ok"
        }
    } else {
        "upstream_error"
    }
}

/// The filter state of a refused request, so the access log has the
/// refusals too: who (as far as known), outcome `refused`, the refusal code
/// (`x-tollgate-error`) and the limit that refused it, if one did.
#[allow(clippy::too_many_arguments)]
pub fn refusal_properties(
    plugin: &Plugin,
    tenant: Option<&Tenant>,
    user: Option<&str>,
    request_id: &str,
    api: Option<Api>,
    model_requested: &str,
    code: &str,
    limit: Option<&str>,
    key: Option<&str>,
) -> Vec<(&'static str, String)> {
    let mut p: Vec<(&'static str, String)> = vec![
        ("tollgate_tenant", tenant.map_or_else(String::new, |t| t.id.clone())),
        ("tollgate_tier", tenant.map_or_else(String::new, |t| t.tier.to_string())),
        ("tollgate_user", user.unwrap_or_default().to_string()),
        ("tollgate_request_id", request_id.to_string()),
        ("tollgate_api", api.map_or("", Api::as_str).to_string()),
        ("tollgate_model_requested", model_requested.to_string()),
        ("tollgate_outcome", if code == CLIENT_CLOSED { "cancelled" } else { "refused" }.to_string()),
        ("tollgate_error", code.to_string()),
        ("tollgate_limit", limit.unwrap_or_default().to_string()),
        ("tollgate_key", key.unwrap_or_default().to_string()),
    ];
    if let Some(keep) = &plugin.metering.filter_state {
        p.retain(|(k, _)| keep.iter().any(|f| k.strip_prefix("tollgate_") == Some(f.as_str())));
    }
    p
}

/// The `error` of a request whose client left before it went upstream (its
/// outcome is `cancelled`: neither a refusal nor a metered request, and the
/// ledger counts it as neither).
pub const CLIENT_CLOSED: &str = "client_closed_request";

/// Micro-dollars as a decimal dollar string: 1234567 -> "1.234567".
pub fn format_usd(micros: u64) -> String {
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

/// The report of a finished request: what it emits, and the usage, cost
/// (µ$) and whether the usage is an estimate, to settle and ledger.
pub fn report(plugin: &Plugin, f: &Facts, metered: Metered, names: &TenantModelNames) -> (Finish, Usage, u64, bool) {
    let mut out = Finish::default();
    let ok_status = (200..300).contains(&f.upstream_status);
    let (top, estimated) =
        if f.free { (Usage::default(), false) } else { final_usage(&metered, f.upstream_status, f.input_estimate) };
    let model_answered = metered.model_answered.clone().unwrap_or_else(|| f.model_served.to_string());
    // Billed as served: the tier, speed and region the response reports;
    // iterations outside the top-level totals (Anthropic compaction and
    // advisor) are added, each priced at its own model.
    let cost = plugin
        .pricing
        .as_ref()
        .filter(|_| !f.free)
        .map(|p| p.cost_with_iterations(&model_answered, &top, &metered.served, &metered.iterations));
    let usage = if f.free { top } else { metered.billed_usage(top) };
    let micros = cost.as_ref().map_or(0, |c| c.micros);
    let unpriced = cost.as_ref().is_some_and(|c| c.priced_by == PricedBy::Default);
    let ttfb = f.first_byte_ms.map(|t| t.saturating_sub(f.start_ms));
    let duration = f.now_ms.saturating_sub(f.start_ms);
    let stream_errors = !metered.errors.is_empty();
    // A stream whose end marker and usage both arrived is whole even if the
    // client then hung up before Envoy saw the upstream end (the OpenAI SDK
    // closes right after `[DONE]`).
    let whole = f.reached_end || (metered.complete && metered.usage.is_some());
    let outcome = match f.unmetered && f.upstream_status == 101 {
        // The upgrade was switched: the connection ran.
        true => "ok",
        false => outcome(whole, f.upstream_status, stream_errors),
    };

    let budgets_after = f.budgets_after.map(|after| after(&usage, micros)).unwrap_or_default();
    let p = &mut out.properties;
    let mut prop = |k: &'static str, v: String| p.push((k, v));
    prop("tollgate_tenant", f.tenant.id.clone());
    prop("tollgate_tier", f.tenant.tier.to_string());
    prop("tollgate_user", f.user.unwrap_or_default().to_string());
    prop("tollgate_request_id", f.request_id.to_string());
    prop("tollgate_api", f.api.map_or("", Api::as_str).to_string());
    prop("tollgate_model_requested", f.model_requested.to_string());
    prop("tollgate_model_served", f.model_served.to_string());
    prop("tollgate_model_answered", model_answered.clone());
    prop("tollgate_tokens_input", usage.input_uncached.to_string());
    prop("tollgate_tokens_cache_read", usage.cache_read.to_string());
    prop("tollgate_tokens_cache_write", usage.cache_write.to_string());
    prop("tollgate_tokens_output", usage.output.to_string());
    prop("tollgate_tokens_reasoning", usage.reasoning.to_string());
    prop("tollgate_tokens_total", usage.total.to_string());
    prop("tollgate_cost_usd", format_usd(micros));
    prop("tollgate_ttfb_ms", ttfb.map_or_else(String::new, |t| t.to_string()));
    prop("tollgate_duration_ms", duration.to_string());
    prop("tollgate_upstream_status", f.upstream_status.to_string());
    prop("tollgate_estimated", estimated.to_string());
    prop("tollgate_outcome", outcome.to_string());
    prop("tollgate_key", f.key.unwrap_or_default().to_string());
    prop("tollgate_shadow_refusal", f.shadow_refusal.unwrap_or_default().to_string());
    // The tier the response says served it (what it was billed at), canonical.
    prop("tollgate_service_tier", metered.served.tier.clone().unwrap_or_default());
    if f.unmetered {
        // Set only when true, so ordinary requests pay no host call for it.
        prop("tollgate_unmetered", "websocket".to_string());
    }
    if let Some(keep) = &plugin.metering.filter_state {
        p.retain(|(k, _)| keep.iter().any(|f| k.strip_prefix("tollgate_") == Some(f.as_str())));
    }

    let c = &mut out.counters;
    c.push((names.requests(outcome), 1));
    let amounts = [usage.input_uncached, usage.cache_read, usage.cache_write, usage.output, usage.reasoning, micros];
    for (name, v) in names.usage.iter().zip(amounts) {
        if v > 0 {
            c.push((Rc::clone(name), v));
        }
    }
    if estimated {
        c.push((Rc::clone(&names.usage_estimated), 1));
    }
    if f.leased {
        c.push((Rc::clone(&names.leased), 1));
    }
    if unpriced {
        c.push((Rc::clone(&names.unpriced), 1));
    }
    if stream_errors {
        c.push((Rc::clone(&names.stream_errors), 1));
    }
    if let Some(code) = f.shadow_refusal {
        let label = plugin.metric_tenant(f.tenant);
        c.push((Rc::from(crate::metering::metrics::shadow_refused(&label, code)), 1));
    }
    if let Some(t) = ttfb {
        out.histograms.push((Rc::clone(&names.ttfb_ms), t));
    }
    out.histograms.push((Rc::clone(&names.duration_ms), duration));

    if f.usage_headers {
        out.headers = vec![
            ("x-tollgate-usage-input-tokens".into(), usage.input_total().to_string()),
            ("x-tollgate-usage-output-tokens".into(), usage.output.to_string()),
            ("x-tollgate-usage-total-tokens".into(), usage.total.to_string()),
            ("x-tollgate-cost-usd".into(), format_usd(micros)),
            ("x-tollgate-usage-estimated".into(), estimated.to_string()),
        ];
        out.headers.extend(crate::ratelimit::quota::remaining_headers(&budgets_after));
    } else if plugin.metering.stream_usage_comment && f.reached_end && ok_status {
        let mut v = serde_json::json!({
            "tenant": f.tenant.id, "model": model_answered, "usage": usage,
            "cost_usd": format_usd(micros), "estimated": estimated,
        });
        if let (false, Some(obj)) = (budgets_after.is_empty(), v.as_object_mut()) {
            let left: Vec<_> = budgets_after.iter().map(crate::ratelimit::quota::limit_json).collect();
            obj.insert("budgets_remaining".into(), left.into());
        }
        out.append = usage::render_usage_comment(&v);
    }
    (out, usage, micros, estimated)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metered(usage: Option<Usage>, complete: bool) -> Metered {
        Metered { usage, complete, ..Metered::default() }
    }

    #[test]
    fn usage_is_metered_raised_when_cut_off_or_estimated() {
        let u = Usage { input_uncached: 10, output: 5, total: 15, ..Usage::default() };
        assert_eq!(final_usage(&metered(Some(u), true), 200, 99), (u, false));
        // A failed response's usage is taken as it is, complete or not.
        assert_eq!(final_usage(&metered(Some(u), false), 500, 99), (u, false));
        // A failed response without usage used nothing.
        assert_eq!(final_usage(&metered(None, false), 429, 99), (Usage::default(), false));
        // No response, or a success without usage: the body-size estimate.
        for status in [0, 200] {
            let (e, estimated) = final_usage(&metered(None, false), status, 99);
            assert!(estimated);
            assert_eq!(e.input_uncached, 99);
            assert_eq!(e.total, 99 + e.output);
        }
        let (cut, estimated) = final_usage(&metered(Some(u), false), 200, 99);
        assert!(estimated);
        assert!(cut.output >= u.output && cut.total == cut.input_total() + cut.output);
    }

    #[test]
    fn outcomes_and_dollars() {
        assert_eq!(outcome(false, 200, false), "incomplete");
        assert_eq!(outcome(true, 200, false), "ok");
        assert_eq!(outcome(true, 204, true), "stream_error");
        assert_eq!(outcome(true, 503, false), "upstream_error");
        assert_eq!(format_usd(1_234_567), "1.234567");
        assert_eq!(format_usd(4), "0.000004");
        assert_eq!(format_usd(0), "0.000000");
    }
}
