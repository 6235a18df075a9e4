//! What is specific to Gemini (`models/{model}:generateContent` and
//! `:streamGenerateContent`): the model and method in the path, the
//! max-output field, how its usage adds up, and what each response document says.

use serde_json::{Map, Value};

use crate::llm::inspect::{u64_at, RequestInfo};
use crate::llm::observation::{
    canonical_tier, count, counts_of, json_len, modality_count, path, text_len, Observation, RawCounts, Served,
};
use crate::llm::{ModelSwap, Refusal};
use crate::metering::usage::Usage;

/// The Gemini model and method from a path like
/// `/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse`.
pub fn gemini_target(path: &str) -> Option<(&str, &str)> {
    let path = path.split(['?', '#']).next()?;
    let rest = path.rsplit_once("/models/")?.1;
    let (model, method) = rest.split_once(':')?;
    if model.is_empty() || model.contains('/') || method.is_empty() {
        return None;
    }
    Some((model, method))
}

/// The request facts: model and method from the path, a stream without
/// `alt=sse` is a JSON array; usage always comes.
pub(crate) fn request_facts(path: &str, json: &Value) -> Result<RequestInfo, Refusal> {
    let (model, method) = gemini_target(path).ok_or_else(|| Refusal::InvalidRequest {
        detail: "expected a path like /v1beta/models/{model}:generateContent".into(),
    })?;
    let stream = method == "streamGenerateContent";
    if !stream && method != "generateContent" && method != "countTokens" {
        return Err(Refusal::InvalidRequest { detail: format!("unsupported Gemini method '{method}'") });
    }
    let alt_sse = crate::identity::api_key::query_param(path, "alt") == Some("sse");
    Ok(RequestInfo {
        model: model.to_string(),
        stream,
        json_array_stream: stream && !alt_sse,
        max_output_tokens: u64_at(json, &["generationConfig", "maxOutputTokens"]),
        include_usage: true,
        asked: Default::default(),
        endpoint: Default::default(),
    })
}

/// Writes the max-output cap: `generationConfig.maxOutputTokens`.
pub(crate) fn clamp_output(obj: &mut Map<String, Value>, n: u64) {
    let gc = obj.entry("generationConfig").or_insert_with(|| Value::Object(Default::default()));
    if let Some(gc) = gc.as_object_mut() {
        gc.insert("maxOutputTokens".into(), n.into());
    }
}

/// The model is in the path: `/models/{from}:` becomes `/models/{to}:`.
pub(crate) fn swap_model(path: &str, from: &str, to: &str) -> ModelSwap {
    ModelSwap::Path(path.replacen(&format!("/models/{from}:"), &format!("/models/{to}:"), 1))
}

/// What a Gemini document says: a stream chunk (SSE event or array element)
/// or a whole body. A candidate's `finishReason` ends the response.
pub(crate) fn observe(doc: &Value) -> Observation<'_> {
    let mut text = 0u64;
    let mut complete = false;
    if let Some(Value::Array(cands)) = doc.get("candidates") {
        for c in cands {
            if c.get("finishReason").is_some_and(|r| !r.is_null()) {
                complete = true;
            }
            if let Some(Value::Array(parts)) = path(c, &["content", "parts"]) {
                for p in parts {
                    let n = text_len(p.get("text")).saturating_add(json_len(path(p, &["functionCall", "args"])));
                    text = text.saturating_add(n);
                }
            }
        }
    }
    Observation {
        counts: counts_of(doc.get("usageMetadata"), usage_counts),
        model: Observation::model_at(doc.get("modelVersion")),
        error: Observation::error_at(doc.get("error")),
        text_bytes: text,
        complete,
        // Vertex: `usageMetadata.trafficType` (provisioned throughput, priority, flex).
        served: Served {
            tier: Served::word(path(doc, &["usageMetadata", "trafficType"])).map(canonical_tier),
            ..Served::default()
        },
        iterations: None,
    }
}

/// A `usageMetadata` object's counters; audio from the per-modality lists
/// (`promptTokensDetails`, `cacheTokensDetails`, `candidatesTokensDetails`,
/// each of `{modality, tokenCount}`).
pub(crate) fn usage_counts(u: &Value) -> RawCounts {
    RawCounts {
        input: count(u.get("promptTokenCount")),
        cache_read: count(u.get("cachedContentTokenCount")),
        output: count(u.get("candidatesTokenCount")),
        reasoning: count(u.get("thoughtsTokenCount")),
        tool_prompt: count(u.get("toolUsePromptTokenCount")),
        total: count(u.get("totalTokenCount")),
        input_audio: modality_count(u.get("promptTokensDetails"), "AUDIO"),
        cached_audio: modality_count(u.get("cacheTokensDetails"), "AUDIO"),
        output_audio: modality_count(u.get("candidatesTokensDetails"), "AUDIO"),
        ..RawCounts::default()
    }
}

/// Gemini's convention: `promptTokenCount` includes the cached part;
/// `toolUsePromptTokenCount` is additional uncached input;
/// `candidatesTokenCount` excludes `thoughtsTokenCount`, so they are added.
pub(crate) fn normalise(raw: &RawCounts) -> Usage {
    let v = |x: Option<u64>| x.unwrap_or(0);
    let cr = v(raw.cache_read);
    let uncached = v(raw.input).saturating_sub(cr).saturating_add(v(raw.tool_prompt));
    let thoughts = v(raw.reasoning);
    raw.usage(uncached, cr, 0, v(raw.output).saturating_add(thoughts), thoughts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::inspect::inspect;
    use crate::llm::Api;
    use serde_json::json;

    #[test]
    fn gemini_from_path() {
        let body = br#"{"contents":[],"generationConfig":{"maxOutputTokens":64}}"#;
        let (i, _) =
            inspect(Api::Gemini, "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", body).unwrap();
        assert_eq!(i.model, "gemini-2.0-flash");
        assert!(i.stream && !i.json_array_stream);
        assert_eq!(i.max_output_tokens, Some(64));
        let (i, _) = inspect(Api::Gemini, "/v1beta/models/gemini-2.0-flash:streamGenerateContent", body).unwrap();
        assert!(i.json_array_stream);
        let (i, _) = inspect(Api::Gemini, "/v1beta/models/gemini-2.0-flash:generateContent", body).unwrap();
        assert!(!i.stream);
        assert!(inspect(Api::Gemini, "/v1beta/models/:generateContent", body).is_err());
        assert!(inspect(Api::Gemini, "/v1beta/models/x:deleteEverything", body).is_err());
    }

    #[test]
    fn chunk_observes_usage_model_text_and_finish() {
        let doc = json!({"candidates": [{"content": {"parts": [{"text": "hi"}, {"functionCall": {"args": {"a": 1}}}]}, "finishReason": "STOP"}], "usageMetadata": {"promptTokenCount": 10, "cachedContentTokenCount": 4, "candidatesTokenCount": 3, "thoughtsTokenCount": 2, "toolUsePromptTokenCount": 1}, "modelVersion": "gemini-2.5-flash"});
        let o = observe(&doc);
        assert!(o.complete);
        assert_eq!(o.model, Some("gemini-2.5-flash"));
        assert_eq!(o.text_bytes, 2 + 7);
        let u = normalise(&o.counts.expect("counts"));
        assert_eq!((u.input_uncached, u.cache_read, u.output, u.reasoning, u.total), (7, 4, 5, 2, 16));
        let err = json!({"error": {"code": 503, "status": "UNAVAILABLE"}});
        assert_eq!(observe(&err).error, Some(&err["error"]));
        assert!(!observe(&err).complete);
    }

    #[test]
    fn model_swap_rewrites_the_path() {
        let swap = swap_model("/v1beta/models/a:generateContent?alt=sse", "a", "b");
        assert_eq!(swap, ModelSwap::Path("/v1beta/models/b:generateContent?alt=sse".into()));
    }
}
