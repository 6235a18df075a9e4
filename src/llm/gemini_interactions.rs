//! What is specific to Gemini's Interactions API (`POST /v1beta/interactions`):
//! the request's fields, its max-output field, and what each response document
//! (a stream event or the interaction itself) says about usage.
//!
//! Shapes from google-genai's `_interactions` types: the request names a
//! `model` (or an `agent`), `stream` and `generation_config.max_output_tokens`;
//! a stream is server-sent events discriminated by `event_type`
//! (`interaction.start`, `content.delta` / `step.delta`, `interaction.complete`,
//! `error`), and the completed interaction carries `usage` with
//! `total_input_tokens`, `total_cached_tokens`, `total_output_tokens`,
//! `total_thought_tokens`, `total_tool_use_tokens` and `total_tokens` (the SDK
//! also accepts their camelCase aliases, read here too).
//!
//! How they add up, by the SDK's field descriptions, which are those of
//! generateContent's `usageMetadata`: `total_cached_tokens` is "the cached
//! part of the prompt", so it is inside `total_input_tokens` (as
//! `cachedContentTokenCount` is inside `promptTokenCount`); thought and
//! tool-use tokens are on top of output and input. So the usage is
//! normalised exactly as Gemini's ([`crate::llm::gemini::normalise`]).

use serde_json::{Map, Value};

use crate::llm::inspect::{asked_conditions, body_stream, u64_at, RequestInfo};
use crate::llm::observation::{count, counts_of, path, text_len, Observation, RawCounts};
use crate::llm::{ModelSwap, Refusal};

/// The two spellings of the request's generation config object.
const CONFIG_KEYS: [&str; 2] = ["generation_config", "generationConfig"];

/// The request facts: the `model` (or, for an agent interaction, the
/// `agent`, which the tier's model list then names), `stream`, and
/// `generation_config.max_output_tokens`; usage always comes.
pub(crate) fn request_facts(json: &Value) -> Result<RequestInfo, Refusal> {
    let named = |k: &str| match json.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(m)) if !m.trim().is_empty() => Ok(Some(m.clone())),
        Some(_) => Err(Refusal::InvalidRequest { detail: format!("'{k}' must be a non-empty string") }),
    };
    let model = match (named("model")?, named("agent")?) {
        (Some(m), _) | (None, Some(m)) => m,
        (None, None) => return Err(Refusal::InvalidRequest { detail: "'model' or 'agent' is required".into() }),
    };
    let max_output_tokens = CONFIG_KEYS
        .iter()
        .find_map(|c| u64_at(json, &[c, "max_output_tokens"]).or_else(|| u64_at(json, &[c, "maxOutputTokens"])));
    Ok(RequestInfo {
        model,
        stream: body_stream(json)?,
        json_array_stream: false,
        max_output_tokens,
        include_usage: true,
        asked: asked_conditions(json),
        endpoint: Default::default(),
    })
}

/// Writes the max-output cap into the generation config the body has (both,
/// if it has both spellings), or a new `generation_config`.
pub(crate) fn clamp_output(obj: &mut Map<String, Value>, n: u64) {
    let mut wrote = false;
    for key in CONFIG_KEYS {
        if let Some(Value::Object(gc)) = obj.get_mut(key) {
            gc.remove("maxOutputTokens");
            gc.insert("max_output_tokens".into(), n.into());
            wrote = true;
        }
    }
    if !wrote {
        let mut gc = Map::new();
        gc.insert("max_output_tokens".into(), n.into());
        obj.insert("generation_config".into(), Value::Object(gc));
    }
}

/// The model is the body's `model` field.
pub(crate) fn swap_model(body: &mut Value, to: &str) -> ModelSwap {
    ModelSwap::in_body(body, to)
}

/// What an Interactions document says: a stream event, or the interaction
/// itself (a non-streamed body).
pub(crate) fn observe(doc: &Value) -> Observation<'_> {
    let kind = doc.get("event_type").and_then(Value::as_str).unwrap_or("");
    match kind {
        "interaction.start" | "interaction.complete" | "interaction.completed" => match doc.get("interaction") {
            Some(i) => Observation { complete: kind != "interaction.start", ..interaction(i) },
            None => Observation { complete: kind != "interaction.start", ..Observation::default() },
        },
        "content.delta" | "step.delta" => Observation {
            text_bytes: doc.get("delta").map_or(0, |d| {
                text_len(d.get("text"))
                    .saturating_add(text_len(d.get("partial_arguments")))
                    .saturating_add(text_len(path(d, &["content", "text"])))
            }),
            ..Observation::default()
        },
        "error" => Observation { error: Some(doc.get("error").unwrap_or(doc)), ..Observation::default() },
        "" => interaction(doc),
        // Status updates, content and step starts and stops say nothing about usage.
        _ => Observation::default(),
    }
}

/// What an interaction object says: its `usage`, `model`, an `error`, and the
/// text of its `outputs`.
fn interaction(i: &Value) -> Observation<'_> {
    let mut text = 0u64;
    if let Some(Value::Array(outputs)) = i.get("outputs") {
        for o in outputs {
            text = text.saturating_add(text_len(o.get("text")));
        }
    }
    Observation {
        counts: counts_of(i.get("usage"), usage_counts),
        model: Observation::model_at(i.get("model")),
        error: Observation::error_at(i.get("error")),
        text_bytes: text,
        ..Observation::default()
    }
}

/// A field by its snake_case name or its camelCase alias.
fn either<'a>(u: &'a Value, snake: &str, camel: &str) -> Option<&'a Value> {
    u.get(snake).or_else(|| u.get(camel))
}

/// Tokens of `modality` in a list of `{modality, tokens}` entries.
fn by_modality(list: Option<&Value>, modality: &str) -> Option<u64> {
    let Some(Value::Array(items)) = list else {
        return None;
    };
    items
        .iter()
        .filter(|i| i.get("modality").and_then(Value::as_str).is_some_and(|m| m.eq_ignore_ascii_case(modality)))
        .filter_map(|i| count(i.get("tokens")))
        .reduce(u64::saturating_add)
}

/// A `usage` object's counters, in the shape Gemini's are read into
/// (see the module's notes on how they add up).
pub(crate) fn usage_counts(u: &Value) -> RawCounts {
    RawCounts {
        input: count(either(u, "total_input_tokens", "totalInputTokens")),
        cache_read: count(either(u, "total_cached_tokens", "totalCachedTokens")),
        output: count(either(u, "total_output_tokens", "totalOutputTokens")),
        reasoning: count(either(u, "total_thought_tokens", "totalThoughtTokens")),
        tool_prompt: count(either(u, "total_tool_use_tokens", "totalToolUseTokens")),
        total: count(either(u, "total_tokens", "totalTokens")),
        input_audio: by_modality(either(u, "input_tokens_by_modality", "inputTokensByModality"), "audio"),
        cached_audio: by_modality(either(u, "cached_tokens_by_modality", "cachedTokensByModality"), "audio"),
        output_audio: by_modality(either(u, "output_tokens_by_modality", "outputTokensByModality"), "audio"),
        ..RawCounts::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::inspect::inspect;
    use crate::llm::Api;
    use serde_json::json;

    #[test]
    fn request_fields() {
        let path = "/v1beta/interactions";
        let body = br#"{"model": "gemini-3-pro", "input": "hi", "stream": true, "generation_config": {"max_output_tokens": 64}}"#;
        let (i, _) = inspect(Api::GeminiInteractions, path, body).expect("accepted");
        assert_eq!((i.model.as_str(), i.stream, i.max_output_tokens), ("gemini-3-pro", true, Some(64)));
        let (i, _) =
            inspect(Api::GeminiInteractions, path, br#"{"agent": "deep-research-pro-preview-12-2025", "input": "x"}"#)
                .expect("accepted");
        assert_eq!(
            (i.model.as_str(), i.stream, i.max_output_tokens),
            ("deep-research-pro-preview-12-2025", false, None)
        );
        assert!(inspect(Api::GeminiInteractions, path, br#"{"input": "x"}"#).is_err());
        let mut obj = Map::new();
        clamp_output(&mut obj, 9);
        assert_eq!(Value::Object(obj.clone()), json!({"generation_config": {"max_output_tokens": 9}}));
        let mut obj = json!({"generationConfig": {"maxOutputTokens": 100, "temperature": 0.1}});
        if let Some(o) = obj.as_object_mut() {
            clamp_output(o, 9);
        }
        assert_eq!(obj, json!({"generationConfig": {"max_output_tokens": 9, "temperature": 0.1}}));
    }

    #[test]
    fn cached_tokens_are_inside_the_input_total() {
        let u = json!({"total_input_tokens": 1000, "total_cached_tokens": 400, "total_output_tokens": 50,
                       "total_thought_tokens": 30, "total_tool_use_tokens": 20, "total_tokens": 1100});
        let usage = crate::llm::gemini::normalise(&usage_counts(&u));
        assert_eq!(
            (usage.input_uncached, usage.cache_read, usage.output, usage.reasoning, usage.total),
            (620, 400, 80, 30, 1100)
        );
        // The camelCase aliases read the same.
        let camel = json!({"totalInputTokens": 1000, "totalCachedTokens": 400, "totalOutputTokens": 50,
                           "totalThoughtTokens": 30, "totalToolUseTokens": 20, "totalTokens": 1100});
        assert_eq!(usage_counts(&camel), usage_counts(&u));
    }

    #[test]
    fn stream_events_say_model_text_errors_and_the_end() {
        let start = json!({"event_type": "interaction.start", "interaction": {"id": "i", "model": "gemini-3-pro", "status": "in_progress"}});
        let o = observe(&start);
        assert_eq!((o.model, o.complete, o.counts), (Some("gemini-3-pro"), false, None));
        let delta = json!({"event_type": "step.delta", "index": 0, "delta": {"type": "arguments_delta", "partial_arguments": "{\"a\":1}"}});
        assert_eq!(observe(&delta).text_bytes, 7);
        let thought = json!({"event_type": "content.delta", "index": 0, "delta": {"type": "thought_summary", "content": {"type": "text", "text": "hmm"}}});
        assert_eq!(observe(&thought).text_bytes, 3);
        let err = json!({"event_type": "error", "error": {"code": "overloaded", "message": "try later"}});
        assert_eq!(observe(&err).error, Some(&err["error"]));
        assert_eq!(
            observe(&json!({"event_type": "interaction.status_update", "status": "in_progress"})),
            Observation::default()
        );
        let done = json!({"event_type": "interaction.complete", "interaction": {"model": "gemini-3-pro", "usage": {"total_input_tokens": 3}}});
        let o = observe(&done);
        assert!(o.complete);
        assert_eq!(o.counts.and_then(|c| c.input), Some(3));
    }
}
