//! What is specific to Anthropic Messages (`/v1/messages`): the request's
//! fields, its max-output field, which stream events matter, how its usage
//! adds up, and what each response document says.

use serde_json::{Map, Value};

use crate::llm::inspect::{body_facts, RequestInfo};
use crate::llm::observation::{canonical_tier, count, counts_of, json_len, text_len, Observation, RawCounts, Served};
use crate::llm::{ModelSwap, Refusal};
use crate::metering::usage::{Iteration, IterationKind, Usage};

/// Most `usage.iterations` entries read from one report (a bound on the
/// work and memory a hostile body can cause; real responses have a few).
pub const MAX_ITERATIONS: usize = 256;
/// Longest model name kept for an iteration.
const MAX_MODEL_LEN: usize = 256;

/// The request facts of a Messages body; usage always comes.
pub(crate) fn request_facts(json: &Value) -> Result<RequestInfo, Refusal> {
    body_facts(json, "max_tokens")
}

/// Writes the max-output cap: `max_tokens`.
pub(crate) fn clamp_output(obj: &mut Map<String, Value>, n: u64) {
    obj.insert("max_tokens".into(), n.into());
}

/// The model is the body's `model` field.
pub(crate) fn swap_model(body: &mut Value, to: &str) -> ModelSwap {
    ModelSwap::in_body(body, to)
}

/// Whether a typed stream event can matter (pings and block starts/stops do not).
pub(crate) fn wants_event(event: &str) -> bool {
    matches!(event, "message_start" | "message_delta" | "content_block_delta" | "message_stop")
}

/// What a Messages document says: a stream event or a whole body. Stream
/// usage is cumulative: `message_delta` repeats the counts so far.
pub(crate) fn observe(doc: &Value) -> Observation<'_> {
    let kind = doc.get("type").and_then(Value::as_str).unwrap_or("");
    match kind {
        "message_start" => match doc.get("message") {
            Some(msg) => Observation {
                counts: counts_of(msg.get("usage"), usage_counts),
                model: Observation::model_at(msg.get("model")),
                served: served(msg.get("usage")),
                iterations: iterations_at(msg.get("usage")),
                ..Observation::default()
            },
            None => Observation::default(),
        },
        "message_delta" => Observation {
            counts: counts_of(doc.get("usage"), usage_counts),
            served: served(doc.get("usage")),
            iterations: iterations_at(doc.get("usage")),
            ..Observation::default()
        },
        "message_stop" => Observation { complete: true, ..Observation::default() },
        "content_block_delta" => Observation {
            text_bytes: doc.get("delta").map_or(0, |d| {
                text_len(d.get("text"))
                    .saturating_add(text_len(d.get("partial_json")))
                    .saturating_add(text_len(d.get("thinking")))
            }),
            ..Observation::default()
        },
        "error" => Observation { error: Some(doc.get("error").unwrap_or(doc)), ..Observation::default() },
        // A non-streamed body (`"type": "message"`) or an unknown shape.
        _ => {
            let mut text = 0u64;
            if let Some(Value::Array(blocks)) = doc.get("content") {
                for b in blocks {
                    let n = text_len(b.get("text"))
                        .saturating_add(text_len(b.get("thinking")))
                        .saturating_add(json_len(b.get("input")));
                    text = text.saturating_add(n);
                }
            }
            Observation {
                served: served(doc.get("usage")),
                iterations: iterations_at(doc.get("usage")),
                ..Observation::of_body(doc, usage_counts, text)
            }
        }
    }
}

/// A usage object's counters (`message_start`'s `message.usage`, the
/// cumulative `message_delta` usage, a whole body's). `cache_creation` splits
/// the writes by lifetime; `server_tool_use` counts billed tool requests;
/// `output_tokens_details.thinking_tokens` is the reasoning inside output.
pub(crate) fn usage_counts(u: &Value) -> RawCounts {
    let split = u.get("cache_creation");
    let in_split = |k: &str| split.and_then(|c| count(c.get(k)));
    let (w5m, w1h) = (in_split("ephemeral_5m_input_tokens"), in_split("ephemeral_1h_input_tokens"));
    let tools = |k: &str| u.get("server_tool_use").and_then(|t| count(t.get(k)));
    // A split without the total (not seen from Anthropic) still counts.
    let split_sum = match (w5m, w1h) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
    };
    RawCounts {
        input: count(u.get("input_tokens")),
        cache_read: count(u.get("cache_read_input_tokens")),
        cache_write: count(u.get("cache_creation_input_tokens")).or(split_sum),
        cache_write_1h: w1h,
        output: count(u.get("output_tokens")),
        reasoning: u.get("output_tokens_details").and_then(|d| count(d.get("thinking_tokens"))),
        web_search: tools("web_search_requests"),
        web_fetch: tools("web_fetch_requests"),
        ..RawCounts::default()
    }
}

/// A usage object's `iterations` array, when it has one.
fn iterations_at(usage: Option<&Value>) -> Option<&Value> {
    usage.and_then(|u| u.get("iterations")).filter(|v| v.is_array())
}

/// The entries of a `usage.iterations` array that are *not* in the
/// top-level totals, each with its own usage and model. Anthropic's API
/// reference: a `compaction` entry's tokens are not included in the
/// top-level `usage` fields (and the entry has no `model`: it runs on the
/// request's); an `advisor_message` entry is an advisor sub-inference,
/// billed at the advisor model's rates and outside the executor's totals.
/// `message` and `fallback_message` entries are the sampling iterations the
/// top-level totals already add up, and unknown types are taken to be
/// inside them too (summing them could count work twice).
pub(crate) fn extra_iterations(v: &Value) -> Vec<Iteration> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .take(MAX_ITERATIONS)
        .filter_map(|item| {
            let kind = match item.get("type").and_then(Value::as_str)? {
                "compaction" => IterationKind::Compaction,
                "advisor_message" => IterationKind::Advisor,
                _ => return None,
            };
            let model =
                item.get("model").and_then(Value::as_str).filter(|m| !m.is_empty()).map(|m| truncate(m, MAX_MODEL_LEN));
            Some(Iteration { kind, model, usage: normalise(&usage_counts(item)) })
        })
        .collect()
}

/// `s` cut to at most `max` bytes at a character boundary.
fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    s.get(..end).unwrap_or_default().to_string()
}

/// The conditions in a usage object: `service_tier`, `speed`, `inference_geo`.
fn served(usage: Option<&Value>) -> Served<'_> {
    let Some(u) = usage else {
        return Served::default();
    };
    Served {
        tier: Served::word(u.get("service_tier")).map(canonical_tier),
        speed: Served::word(u.get("speed")),
        geo: Served::word(u.get("inference_geo")),
    }
}

/// Anthropic's additive convention: `input_tokens` excludes cache reads and
/// writes, which are billed on top. The writes are at least the 1-hour
/// ones (a final total larger than the split is priced as 5-minute writes).
pub(crate) fn normalise(raw: &RawCounts) -> Usage {
    let v = |x: Option<u64>| x.unwrap_or(0);
    let writes = v(raw.cache_write).max(v(raw.cache_write_1h));
    raw.usage(v(raw.input), v(raw.cache_read), writes, v(raw.output), v(raw.reasoning))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::inspect::inspect;
    use crate::llm::Api;
    use serde_json::json;

    #[test]
    fn anthropic_max_tokens() {
        let (i, _) = inspect(Api::AnthropicMessages, "/v1/messages", br#"{"model":"claude","max_tokens":7}"#).unwrap();
        assert_eq!(i.max_output_tokens, Some(7));
    }

    #[test]
    fn stream_events_observe_counts_text_and_end() {
        let start = json!({"type": "message_start", "message": {"model": "claude-x", "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 1}}});
        let o = observe(&start);
        assert_eq!(o.model, Some("claude-x"));
        assert_eq!(o.counts.map(|c| (c.input, c.cache_read, c.output)), Some((Some(10), Some(5), Some(1))));
        let delta = json!({"type": "message_delta", "usage": {"output_tokens": 30}});
        assert_eq!(observe(&delta).counts.and_then(|c| c.output), Some(30));
        let text = json!({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hey"}});
        assert_eq!(observe(&text).text_bytes, 3);
        assert!(observe(&json!({"type": "message_stop"})).complete);
        let err = json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
        assert_eq!(observe(&err).error, Some(&err["error"]));
    }

    #[test]
    fn cache_counts_are_added_to_input() {
        let raw = usage_counts(
            &json!({"input_tokens": 25, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 7, "output_tokens": 3}),
        );
        let u = normalise(&raw);
        assert_eq!((u.input_uncached, u.cache_read, u.cache_write, u.output, u.total), (25, 100, 7, 3, 135));
    }
}
