//! What is specific to OpenAI Responses (`/v1/responses`): the request's
//! fields, its max-output field, which stream events matter, and what each
//! response document says.

use serde_json::{Map, Value};

use crate::llm::inspect::{body_facts, RequestInfo};
use crate::llm::observation::{json_len, text_len, Observation};
use crate::llm::openai_chat::usage_counts;
use crate::llm::{ModelSwap, Refusal};

/// The request facts of a Responses body; usage always comes.
pub(crate) fn request_facts(json: &Value) -> Result<RequestInfo, Refusal> {
    body_facts(json, "max_output_tokens")
}

/// Writes the max-output cap: `max_output_tokens`.
pub(crate) fn clamp_output(obj: &mut Map<String, Value>, n: u64) {
    obj.insert("max_output_tokens".into(), n.into());
}

/// The model is the body's `model` field.
pub(crate) fn swap_model(body: &mut Value, to: &str) -> ModelSwap {
    ModelSwap::in_body(body, to)
}

/// Whether a typed stream event can matter, to skip parsing the rest (such
/// as `response.output_item.done`, which repeats whole outputs).
pub(crate) fn wants_event(event: &str) -> bool {
    event.starts_with("response.created")
        || matches!(event, "response.completed" | "response.incomplete" | "response.failed")
        || (event.ends_with(".delta") && !event.starts_with("response.audio"))
}

/// What a Responses document says: a stream event (`streamed`) or a whole body.
pub(crate) fn observe(doc: &Value, streamed: bool) -> Observation<'_> {
    let kind = doc.get("type").and_then(Value::as_str).unwrap_or("");
    if kind == "error" {
        return Observation {
            error: Some(Observation::error_at(doc.get("error")).unwrap_or(doc)),
            ..Observation::default()
        };
    }
    if let Some(resp) = doc.get("response").filter(|r| r.is_object()) {
        // A lifecycle event wrapping the response object.
        let terminal = matches!(kind, "response.completed" | "response.incomplete" | "response.failed");
        return Observation { complete: terminal, ..response_object(resp, false) };
    }
    if kind.ends_with(".delta") {
        let text_bytes = if kind.starts_with("response.audio") { 0 } else { text_len(doc.get("delta")) };
        return Observation { text_bytes, ..Observation::default() };
    }
    if !streamed || doc.get("object").and_then(Value::as_str) == Some("response") {
        // A non-streamed body is the response object itself.
        if let Some(err) = Observation::error_at(doc.get("error")) {
            if doc.get("object").is_none() && doc.get("usage").is_none() {
                return Observation { error: Some(err), ..Observation::default() };
            }
        }
        return response_object(doc, true);
    }
    Observation::default()
}

/// The response object: model, usage, error, and (`count_text`) the text of
/// its output items.
fn response_object(resp: &Value, count_text: bool) -> Observation<'_> {
    let mut text = 0u64;
    if count_text {
        if let Some(Value::Array(items)) = resp.get("output") {
            for item in items {
                let mut n = json_len(item.get("arguments"));
                for key in ["content", "summary"] {
                    if let Some(Value::Array(parts)) = item.get(key) {
                        for part in parts {
                            n = n
                                .saturating_add(text_len(part.get("text")))
                                .saturating_add(text_len(part.get("refusal")));
                        }
                    }
                }
                text = text.saturating_add(n);
            }
        }
    }
    Observation::of_body(resp, usage_counts, text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::inspect::inspect;
    use crate::llm::Api;
    use serde_json::json;

    #[test]
    fn responses_max_tokens() {
        let (i, _) =
            inspect(Api::OpenaiResponses, "/v1/responses", br#"{"model":"o3","max_output_tokens":9}"#).unwrap();
        assert_eq!(i.max_output_tokens, Some(9));
    }

    #[test]
    fn terminal_event_reports_usage_and_completes() {
        let doc = json!({"type": "response.completed", "response": {"model": "o4", "usage": {"input_tokens": 5, "output_tokens": 2}, "output": [{"content": [{"text": "not counted"}]}]}});
        let o = observe(&doc, true);
        assert!(o.complete);
        assert_eq!(o.model, Some("o4"));
        let c = o.counts.expect("counts");
        assert_eq!((c.input, c.output), (Some(5), Some(2)));
        assert_eq!(o.text_bytes, 0);
    }

    #[test]
    fn deltas_and_errors() {
        let delta = json!({"type": "response.output_text.delta", "delta": "abc"});
        let o = observe(&delta, true);
        assert_eq!((o.text_bytes, o.counts, o.complete), (3, None, false));
        assert_eq!(observe(&json!({"type": "response.audio.delta", "delta": "abc"}), true).text_bytes, 0);
        let err = json!({"type": "error", "code": "x", "message": "m"});
        assert_eq!(observe(&err, true).error, Some(&err));
        let body = json!({"error": {"message": "bad"}});
        assert_eq!(observe(&body, false).error, Some(&body["error"]));
        assert_eq!(observe(&json!({"type": "response.in_progress"}), true), Observation::default());
    }
}
