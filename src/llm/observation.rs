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
    pub output: Option<u64>,
    pub reasoning: Option<u64>,
    pub tool_prompt: Option<u64>,
    pub total: Option<u64>,
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
    }

    pub fn is_empty(&self) -> bool {
        *self == RawCounts::default()
    }

    /// A [`Usage`] of these parts, with the provider's total when it reported
    /// one (never recomputed), else their sum.
    pub(crate) fn usage(
        &self,
        input_uncached: u64,
        cache_read: u64,
        cache_write: u64,
        output: u64,
        reasoning: u64,
    ) -> Usage {
        let mut usage = Usage { input_uncached, cache_read, cache_write, output, reasoning, total: 0 };
        usage.total = self.total.unwrap_or_else(|| usage.sum());
        usage
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
        }
    }
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
