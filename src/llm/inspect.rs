//! What does an LLM request ask for?
//!
//! Reading an LLM request: which model, streamed or not, and how much output
//! it may produce. Pure functions over the path and the JSON body; the
//! fields each API uses are read by its module (see [`crate::llm::Api`]).

use serde_json::Value;

use crate::config::Policy;
use crate::llm::{Api, Refusal};

/// What tollgate needs to know about a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestInfo {
    /// The model the client asked for.
    pub model: String,
    /// Whether the response will be streamed.
    pub stream: bool,
    /// Gemini `streamGenerateContent` without `alt=sse`: a JSON array
    /// streamed in pieces rather than server-sent events.
    pub json_array_stream: bool,
    /// The client's own cap on output tokens, from whichever field its API
    /// uses, if it set one.
    pub max_output_tokens: Option<u64>,
    /// Whether an OpenAI chat stream already asks for usage.
    pub include_usage: bool,
}

pub use crate::llm::gemini::gemini_target;

pub(crate) fn u64_at(v: &Value, path: &[&str]) -> Option<u64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_u64()
}

/// The body's `model` (every API but Gemini, whose model is in the path).
pub(crate) fn body_model(json: &Value) -> Result<String, Refusal> {
    match json.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => Ok(m.clone()),
        Some(_) => Err(Refusal::InvalidRequest { detail: "'model' must be a non-empty string".into() }),
        None => Err(Refusal::InvalidRequest { detail: "'model' is required".into() }),
    }
}

/// The body's `stream` flag (every API but Gemini, which streams by method).
pub(crate) fn body_stream(json: &Value) -> Result<bool, Refusal> {
    match json.get("stream") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(Refusal::InvalidRequest { detail: "'stream' must be a boolean".into() }),
    }
}

/// The facts of a body whose API always reports usage and caps its output
/// with one top-level field (`max_output_field`): Anthropic Messages, OpenAI
/// Responses.
pub(crate) fn body_facts(json: &Value, max_output_field: &str) -> Result<RequestInfo, Refusal> {
    Ok(RequestInfo {
        model: body_model(json)?,
        stream: body_stream(json)?,
        json_array_stream: false,
        max_output_tokens: u64_at(json, &[max_output_field]),
        include_usage: true,
    })
}

/// Parses the body and extracts what tollgate needs, refusing what no
/// provider would accept anyway. What each API reads is in its module.
pub fn inspect(api: Api, path: &str, body: &[u8]) -> Result<(RequestInfo, Value), Refusal> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Refusal::BodyRequired);
    }
    let json: Value = serde_json::from_slice(body).map_err(|e| Refusal::InvalidJson { detail: e.to_string() })?;
    if !json.is_object() {
        return Err(Refusal::InvalidJson { detail: "the body must be a JSON object".into() });
    }
    let info = api.request_facts(path, &json)?;
    Ok((info, json))
}

/// Refuses a model outside the tenant's allowlist.
pub fn check_model(policy: &Policy, model: &str) -> Result<(), Refusal> {
    if policy.models.allows(model) {
        Ok(())
    } else {
        Err(Refusal::ModelNotAllowed { model: model.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_bodies() {
        assert!(matches!(inspect(Api::OpenaiChat, "/", b"{"), Err(Refusal::InvalidJson { .. })));
        assert!(matches!(inspect(Api::OpenaiChat, "/", b"[1]"), Err(Refusal::InvalidJson { .. })));
        assert_eq!(inspect(Api::OpenaiChat, "/", b"  "), Err(Refusal::BodyRequired));
        assert!(matches!(inspect(Api::OpenaiChat, "/", b"{}"), Err(Refusal::InvalidRequest { .. })));
        assert!(matches!(
            inspect(Api::OpenaiChat, "/", br#"{"model":"m","stream":"yes"}"#),
            Err(Refusal::InvalidRequest { .. })
        ));
    }
}
