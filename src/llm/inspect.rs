//! Reading an LLM request: which model, streamed or not, and how much output
//! it may produce. Pure functions over the path and the JSON body.

use serde_json::Value;

use crate::llm::{Api, Refusal};
use crate::config::Policy;

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

fn u64_at(v: &Value, path: &[&str]) -> Option<u64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_u64()
}

/// Parses the body and extracts what tollgate needs, refusing what no
/// provider would accept anyway.
pub fn inspect(api: Api, path: &str, body: &[u8]) -> Result<(RequestInfo, Value), Refusal> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Refusal::BodyRequired);
    }
    let json: Value = serde_json::from_slice(body).map_err(|e| Refusal::InvalidJson {
        detail: e.to_string(),
    })?;
    if !json.is_object() {
        return Err(Refusal::InvalidJson {
            detail: "the body must be a JSON object".into(),
        });
    }
    let info = match api {
        Api::Gemini => {
            let (model, method) = gemini_target(path).ok_or_else(|| Refusal::InvalidRequest {
                detail: "expected a path like /v1beta/models/{model}:generateContent".into(),
            })?;
            let stream = method == "streamGenerateContent";
            if !stream && method != "generateContent" && method != "countTokens" {
                return Err(Refusal::InvalidRequest {
                    detail: format!("unsupported Gemini method '{method}'"),
                });
            }
            let alt_sse = crate::identity::api_key::query_param(path, "alt") == Some("sse");
            RequestInfo {
                model: model.to_string(),
                stream,
                json_array_stream: stream && !alt_sse,
                max_output_tokens: u64_at(&json, &["generationConfig", "maxOutputTokens"]),
                include_usage: true,
            }
        }
        _ => {
            let model = match json.get("model") {
                Some(Value::String(m)) if !m.trim().is_empty() => m.clone(),
                Some(_) => {
                    return Err(Refusal::InvalidRequest {
                        detail: "'model' must be a non-empty string".into(),
                    })
                }
                None => {
                    return Err(Refusal::InvalidRequest {
                        detail: "'model' is required".into(),
                    })
                }
            };
            let stream = match json.get("stream") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(Refusal::InvalidRequest {
                        detail: "'stream' must be a boolean".into(),
                    })
                }
            };
            if api == Api::OpenaiEmbeddings && stream {
                return Err(Refusal::InvalidRequest {
                    detail: "embeddings cannot be streamed".into(),
                });
            }
            let max_output_tokens = match api {
                Api::OpenaiChat => u64_at(&json, &["max_completion_tokens"])
                    .or_else(|| u64_at(&json, &["max_tokens"])),
                Api::OpenaiResponses => u64_at(&json, &["max_output_tokens"]),
                Api::AnthropicMessages => u64_at(&json, &["max_tokens"]),
                _ => None,
            };
            let include_usage = api != Api::OpenaiChat
                || !stream
                || json
                    .get("stream_options")
                    .and_then(|o| o.get("include_usage"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
            RequestInfo {
                model,
                stream,
                json_array_stream: false,
                max_output_tokens,
                include_usage,
            }
        }
    };
    Ok((info, json))
}

/// Refuses a model outside the tenant's allowlist.
pub fn check_model(policy: &Policy, model: &str) -> Result<(), Refusal> {
    if policy.models.allows(model) {
        Ok(())
    } else {
        Err(Refusal::ModelNotAllowed {
            model: model.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_chat_fields() {
        let body = br#"{"model":"gpt-4o","stream":true,"max_completion_tokens":50,"messages":[]}"#;
        let (info, _) = inspect(Api::OpenaiChat, "/v1/chat/completions", body).unwrap();
        assert_eq!(info.model, "gpt-4o");
        assert!(info.stream);
        assert_eq!(info.max_output_tokens, Some(50));
        assert!(!info.include_usage);
        let body = br#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}"#;
        assert!(inspect(Api::OpenaiChat, "/", body).unwrap().0.include_usage);
    }

    #[test]
    fn anthropic_and_responses_max_tokens() {
        let (i, _) = inspect(Api::AnthropicMessages, "/v1/messages", br#"{"model":"claude","max_tokens":7}"#).unwrap();
        assert_eq!(i.max_output_tokens, Some(7));
        let (i, _) = inspect(Api::OpenaiResponses, "/v1/responses", br#"{"model":"o3","max_output_tokens":9}"#).unwrap();
        assert_eq!(i.max_output_tokens, Some(9));
    }

    #[test]
    fn gemini_from_path() {
        let body = br#"{"contents":[],"generationConfig":{"maxOutputTokens":64}}"#;
        let (i, _) = inspect(Api::Gemini, "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", body).unwrap();
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
