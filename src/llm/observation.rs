//! What does one response document say about usage?
//!
//! What one response document says about usage, as a value: the vocabulary
//! each API's reader returns and the meter ([`crate::metering::meter`]) folds.

use serde_json::Value;

use crate::metering::usage::Usage;

/// Provider-native counters of one usage object, each `None` when it does not
/// report it. The meter keeps the latest report of each field: stream usage
/// is cumulative (Anthropic `message_delta`, vLLM continuous usage), never
/// summed. How the fields add up to billable input is the API's convention
/// (see [`crate::llm::Api::normalise`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawCounts {
    pub input: Option<u64>,
    pub cache_read: Option<u64>,
    pub cache_write: Option<u64>,
    /// Anthropic `cache_creation.ephemeral_1h_input_tokens` (part of the writes).
    pub cache_write_1h: Option<u64>,
    pub output: Option<u64>,
    pub reasoning: Option<u64>,
    pub tool_prompt: Option<u64>,
    pub total: Option<u64>,
    /// Audio tokens inside the input count (OpenAI `prompt_tokens_details.audio_tokens`,
    /// Gemini's `AUDIO` entry of `promptTokensDetails`).
    pub input_audio: Option<u64>,
    /// Audio tokens of the input read from the cache (Gemini `cacheTokensDetails`).
    pub cached_audio: Option<u64>,
    /// Audio tokens inside the output count.
    pub output_audio: Option<u64>,
    /// Server-side web searches (Anthropic `server_tool_use.web_search_requests`).
    pub web_search: Option<u64>,
    /// Server-side web fetches (Anthropic `server_tool_use.web_fetch_requests`).
    pub web_fetch: Option<u64>,
}

impl RawCounts {
    /// Takes every field `newer` reports, keeps the others.
    pub fn merge(&mut self, newer: RawCounts) {
        fn latest(old: &mut Option<u64>, new: Option<u64>) {
            if new.is_some() {
                *old = new;
            }
        }
        latest(&mut self.input, newer.input);
        latest(&mut self.cache_read, newer.cache_read);
        latest(&mut self.cache_write, newer.cache_write);
        latest(&mut self.output, newer.output);
        latest(&mut self.reasoning, newer.reasoning);
        latest(&mut self.tool_prompt, newer.tool_prompt);
        latest(&mut self.total, newer.total);
        latest(&mut self.cache_write_1h, newer.cache_write_1h);
        latest(&mut self.input_audio, newer.input_audio);
        latest(&mut self.cached_audio, newer.cached_audio);
        latest(&mut self.output_audio, newer.output_audio);
        latest(&mut self.web_search, newer.web_search);
        latest(&mut self.web_fetch, newer.web_fetch);
    }

    pub fn is_empty(&self) -> bool {
        *self == RawCounts::default()
    }

    /// A [`Usage`] of these parts, with the provider's total when it reported
    /// one (never recomputed), else their sum. The details every API reports
    /// the same way are filled in here, each bounded by the count it is part
    /// of: 1-hour cache writes by the writes, uncached input audio (input
    /// audio less cached audio) by the uncached input, output audio by the
    /// output.
    pub(crate) fn usage(
        &self,
        input_uncached: u64,
        cache_read: u64,
        cache_write: u64,
        output: u64,
        reasoning: u64,
    ) -> Usage {
        let v = |x: Option<u64>| x.unwrap_or(0);
        let mut usage = Usage {
            input_uncached,
            cache_read,
            cache_write,
            output,
            reasoning,
            total: 0,
            cache_write_1h: v(self.cache_write_1h).min(cache_write),
            input_audio: v(self.input_audio).saturating_sub(v(self.cached_audio)).min(input_uncached),
            output_audio: v(self.output_audio).min(output),
            web_search_requests: v(self.web_search),
            web_fetch_requests: v(self.web_fetch),
        };
        usage.total = self.total.unwrap_or_else(|| usage.sum());
        usage
    }
}

/// The conditions a response says it was served under, as reported (the
/// price table maps them to rates; see [`crate::metering::pricing`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Served<'a> {
    /// The service tier that served the request, canonical: `standard`
    /// (OpenAI `default`, Gemini `ON_DEMAND`), `priority`, `flex`, `batch`,
    /// `scale`, `provisioned` (Gemini `PROVISIONED_THROUGHPUT`), or the
    /// provider's own word as given.
    pub tier: Option<&'a str>,
    /// Anthropic `usage.speed` (`standard`, `fast`).
    pub speed: Option<&'a str>,
    /// Anthropic `usage.inference_geo` (`us`, `global`, `not_available`, ...).
    pub geo: Option<&'a str>,
}

impl<'a> Served<'a> {
    /// The string at `v`, when it is a non-empty one.
    pub(crate) fn word(v: Option<&'a Value>) -> Option<&'a str> {
        v.and_then(Value::as_str).filter(|s| !s.is_empty())
    }
}

/// A service tier as the price table names it: the providers' synonyms for
/// the ordinary tier become `standard`, Gemini's traffic types become tiers.
/// Known names come back `'static`; others as given (matched exactly).
pub fn canonical_tier(tier: &str) -> &str {
    match tier {
        "default" | "standard" | "auto" | "standard_only" | "ON_DEMAND" | "TRAFFIC_TYPE_UNSPECIFIED" => "standard",
        "priority" | "ON_DEMAND_PRIORITY" => "priority",
        "flex" | "ON_DEMAND_FLEX" => "flex",
        "PROVISIONED_THROUGHPUT" => "provisioned",
        other => other,
    }
}

/// What one JSON document of a response (a stream event, an array element or
/// a whole body) says. Borrows from the document: reading it allocates nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Observation<'a> {
    /// The counters of the usage object it carries, if any.
    pub counts: Option<RawCounts>,
    /// The model it says answered (empty strings are ignored by the fold).
    pub model: Option<&'a str>,
    /// An error it reports (an object or a string, described by the fold).
    pub error: Option<&'a Value>,
    /// Approximate bytes of generated text in it (content, reasoning, tool
    /// arguments), for the estimate when usage is missing.
    pub text_bytes: u64,
    /// It is the response's normal end marker.
    pub complete: bool,
    /// The service tier, speed and region it reports.
    pub served: Served<'a>,
    /// Anthropic `usage.iterations`: the per-iteration breakdown, read by
    /// [`crate::llm::anthropic::extra_iterations`] (the latest array wins).
    pub iterations: Option<&'a Value>,
}

impl<'a> Observation<'a> {
    /// `v` as the model, when it is a string.
    pub(crate) fn model_at(v: Option<&'a Value>) -> Option<&'a str> {
        v.and_then(Value::as_str)
    }

    /// A non-null error at `v`.
    pub(crate) fn error_at(v: Option<&'a Value>) -> Option<&'a Value> {
        v.filter(|e| !e.is_null())
    }

    /// What a whole (non-streamed) body says: its top-level `usage`, read
    /// by `read`, its `model` and `error`, and `text_bytes` of text.
    pub(crate) fn of_body(doc: &'a Value, read: fn(&Value) -> RawCounts, text_bytes: u64) -> Self {
        Observation {
            counts: counts_of(doc.get("usage"), read),
            model: Observation::model_at(doc.get("model")),
            error: Observation::error_at(doc.get("error")),
            text_bytes,
            complete: false,
            served: Served { tier: Served::word(doc.get("service_tier")).map(canonical_tier), ..Served::default() },
            iterations: None,
        }
    }
}

/// The counts of a list of `{modality, tokenCount}` entries (Gemini) for
/// `modality`; `None` when the list is absent or has no such entry.
pub(crate) fn modality_count(list: Option<&Value>, modality: &str) -> Option<u64> {
    let Some(Value::Array(items)) = list else {
        return None;
    };
    items
        .iter()
        .filter(|i| i.get("modality").and_then(Value::as_str) == Some(modality))
        .filter_map(|i| count(i.get("tokenCount")))
        .reduce(u64::saturating_add)
}

/// The counters of `v` when it is a usage object, read by `read`.
pub(crate) fn counts_of(v: Option<&Value>, read: fn(&Value) -> RawCounts) -> Option<RawCounts> {
    match v {
        Some(u @ Value::Object(_)) => Some(read(u)),
        _ => None,
    }
}

/// A JSON number as a token count; tolerant of floats and numeric strings that
/// compatible servers emit. Negative, NaN and non-numbers read as absent.
pub(crate) fn count(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                // `as` saturates for floats beyond u64::MAX.
                .map(|f| f.round() as u64)
        }),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    }
}

pub(crate) fn path<'a>(v: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().try_fold(v, |cur, k| cur.get(k))
}

/// Bytes of text at `v`: a string, or the `text` of each part of an array.
pub(crate) fn text_len(v: Option<&Value>) -> u64 {
    match v {
        Some(Value::String(s)) => s.len() as u64,
        // Content given as an array of parts (`[{"type":"text","text":...}]`).
        Some(Value::Array(parts)) => parts.iter().map(|p| text_len(p.get("text"))).fold(0, u64::saturating_add),
        _ => 0,
    }
}

/// Approximate size of a tool-call argument that is a JSON object, not text.
pub(crate) fn json_len(v: Option<&Value>) -> u64 {
    match v {
        None | Some(Value::Null) => 0,
        Some(Value::String(s)) => s.len() as u64,
        Some(other) => serde_json::to_string(other).map_or(0, |s| s.len() as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn later_reports_overwrite_field_by_field() {
        let mut raw = RawCounts { input: Some(10), output: Some(1), ..RawCounts::default() };
        raw.merge(RawCounts { output: Some(9), ..RawCounts::default() });
        assert_eq!((raw.input, raw.output), (Some(10), Some(9)));
        assert!(!raw.is_empty());
        assert!(RawCounts::default().is_empty());
    }

    #[test]
    fn text_in_strings_and_parts() {
        let v = json!(["ab", {"text": "cde"}, {"text": [{"text": "f"}]}]);
        assert_eq!(text_len(Some(&v)), 4);
        assert_eq!(text_len(Some(&json!("xyz"))), 3);
        assert_eq!(json_len(Some(&json!({"a": 1}))), 7);
        assert_eq!(json_len(Some(&Value::Null)), 0);
    }
}
