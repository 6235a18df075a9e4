//! What does an LLM request ask for?
//!
//! Reading an LLM request: which model, streamed or not, and how much output
//! it may produce. Pure functions over the path and the JSON body; the
//! fields each API uses are read by its module (see [`crate::llm::Api`]).

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::Policy;
use crate::llm::{canonical_tier, Api, Refusal};
use crate::metering::usage::ServedAs;

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
    /// The service tier, speed and region the body asks for, to price the
    /// estimate with (the bill follows what the response reports).
    pub asked: ServedAs,
    /// Which call of its API the request is (by its path).
    pub endpoint: Endpoint,
}

/// Which call of an API a request is, by the end of its path: the ordinary
/// one that generates output, or one of the calls that differ in what is
/// billed and which fields they take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Endpoint {
    /// Generates output: metered, priced, capped by the max-output field.
    #[default]
    Generate,
    /// OpenAI `POST /v1/responses/compact`: billed from its usage (a
    /// `response.compaction` object names no model: the request's prices
    /// it); it takes no max-output field, so none is written in.
    Compact,
    /// Token counting (OpenAI `POST /v1/responses/input_tokens`, Anthropic
    /// `POST /v1/messages/count_tokens`, Gemini `models/{model}:countTokens`): free, so no tokens or dollars are
    /// reserved or charged, but it counts as one request against request
    /// limits; it takes no max-output field.
    CountTokens,
    /// A WebSocket upgrade (OpenAI Responses WebSocket mode, Realtime) that
    /// the tier lets through (`allow_websocket`): its frames are not read,
    /// so it is one request with no tokens or dollars, reported unmetered.
    WebSocket,
}

impl Endpoint {
    /// The endpoint of a request to `path` (its query ignored) on a route of `api`.
    pub fn of(api: Api, path: &str) -> Endpoint {
        let path = path.split('?').next().unwrap_or_default().trim_end_matches('/');
        match api {
            Api::OpenaiResponses if path.ends_with("/responses/compact") => Endpoint::Compact,
            Api::OpenaiResponses if path.ends_with("/responses/input_tokens") => Endpoint::CountTokens,
            Api::AnthropicMessages if path.ends_with("/messages/count_tokens") => Endpoint::CountTokens,
            Api::Gemini if gemini_target(path).is_some_and(|(_, method)| method == "countTokens") => {
                Endpoint::CountTokens
            }
            _ => Endpoint::Generate,
        }
    }

    /// Neither tokens nor dollars are charged (requests still count).
    pub fn is_free(self) -> bool {
        matches!(self, Endpoint::CountTokens | Endpoint::WebSocket)
    }

    /// The request takes its API's max-output field.
    pub fn takes_max_output(self) -> bool {
        self == Endpoint::Generate
    }
}

/// The conditions a body asks for: `service_tier` (canonical, see
/// [`crate::llm::canonical_tier`]; OpenAI's `fast` is served as `priority`),
/// `speed` and `inference_geo` (Anthropic). The ordinary tier and speed
/// (`auto`, `default`, `standard`, ...) are `None`.
pub(crate) fn asked_conditions(json: &Value) -> ServedAs {
    let word = |k: &str| json.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
    let tier = word("service_tier").map(|t| if t == "fast" { "priority" } else { canonical_tier(t) });
    ServedAs {
        tier: tier.filter(|t| *t != "standard").map(str::to_string),
        speed: word("speed").filter(|s| *s != "standard").map(str::to_string),
        geo: word("inference_geo").map(str::to_string),
    }
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
        asked: asked_conditions(json),
        endpoint: Endpoint::Generate,
    })
}

/// Parses the body and extracts what tollgate needs, refusing what no
/// provider would accept anyway. What each API reads is in its module.
pub fn inspect(api: Api, path: &str, body: &[u8]) -> Result<(RequestInfo, Value), Refusal> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Refusal::BodyRequired);
    }
    let json = match serde_json::from_slice::<Strict>(body) {
        Ok(Strict::Object(obj)) => Value::Object(obj),
        Ok(Strict::Other(_)) => return Err(Refusal::InvalidJson { detail: "the body must be a JSON object".into() }),
        Ok(Strict::Duplicate(key)) => {
            return Err(Refusal::InvalidRequest { detail: format!("duplicate key '{key}' in the request body") })
        }
        Err(e) => return Err(Refusal::InvalidJson { detail: e.to_string() }),
    };
    let info = api.request_facts(path, &json)?;
    Ok((info, json))
}

/// Objects whose keys tollgate reads (besides the top level): a duplicate in
/// them is refused as well.
const CHECKED_OBJECTS: &[&str] = &["stream_options", "generationConfig"];

/// A request body parsed in one pass, refusing a repeated key at the top level
/// or in [`CHECKED_OBJECTS`]. JSON parsers disagree on which copy wins
/// (serde keeps the last, others the first), so a body with two `model` keys
/// could be admitted for one model and served by another.
enum Strict {
    Object(Map<String, Value>),
    /// Not an object.
    Other(Value),
    /// The first repeated key.
    Duplicate(String),
}

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Strict;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
                let mut obj = Map::new();
                let mut dup: Option<String> = None;
                while let Some(key) = map.next_key::<String>()? {
                    let value = if CHECKED_OBJECTS.contains(&key.as_str()) {
                        match map.next_value::<Strict>()? {
                            Strict::Object(inner) => Value::Object(inner),
                            Strict::Duplicate(inner) => {
                                dup.get_or_insert(format!("{key}.{inner}"));
                                Value::Null
                            }
                            // Not an object: the API's reader judges it.
                            Strict::Other(v) => v,
                        }
                    } else {
                        map.next_value::<Value>()?
                    };
                    if obj.contains_key(&key) {
                        dup.get_or_insert(key.clone());
                    }
                    obj.insert(key, value);
                }
                Ok(match dup {
                    Some(k) => Strict::Duplicate(k),
                    None => Strict::Object(obj),
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
                let mut items = Vec::new();
                while let Some(v) = seq.next_element::<Value>()? {
                    items.push(v);
                }
                Ok(Strict::Other(Value::Array(items)))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Strict, E> {
                Ok(Strict::Other(Value::Bool(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Strict, E> {
                Ok(Strict::Other(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Strict, E> {
                Ok(Strict::Other(v.into()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Strict, E> {
                Ok(Strict::Other(v.into()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Strict, E> {
                Ok(Strict::Other(Value::String(v.to_string())))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Strict, E> {
                Ok(Strict::Other(Value::Null))
            }
        }
        d.deserialize_any(V)
    }
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

    #[test]
    fn duplicate_keys_are_refused() {
        let refused = |api: Api, path: &str, body: &str| match inspect(api, path, body.as_bytes()) {
            Err(Refusal::InvalidRequest { detail }) => detail,
            other => panic!("{body}: {other:?}"),
        };
        let chat = "/v1/chat/completions";
        // A disallowed model first, an allowed one last (serde keeps the last).
        let d = refused(Api::OpenaiChat, chat, r#"{"model":"gpt-5-pro","messages":[],"model":"gpt-4o-mini"}"#);
        assert!(d.contains("'model'"), "{d}");
        assert!(refused(Api::OpenaiChat, chat, r#"{"model":"m","stream":false,"stream":true}"#).contains("'stream'"));
        assert!(refused(Api::OpenaiChat, chat, r#"{"model":"m","max_tokens":1,"max_tokens":99999}"#)
            .contains("'max_tokens'"));
        let nested = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true,"include_usage":false}}"#;
        assert!(refused(Api::OpenaiChat, chat, nested).contains("'stream_options.include_usage'"));
        let gemini = r#"{"generationConfig":{"maxOutputTokens":1,"maxOutputTokens":9}}"#;
        assert!(refused(Api::Gemini, "/v1beta/models/g:generateContent", gemini).contains("maxOutputTokens"));
        refused(Api::AnthropicMessages, "/v1/messages", r#"{"model":"a","max_tokens":1,"model":"b"}"#);
        refused(Api::OpenaiResponses, "/v1/responses", r#"{"model":"a","model":"a"}"#);
        // Repeats deeper inside what tollgate does not read pass through.
        let ok = r#"{"model":"m","messages":[{"role":"user","content":"a","content":"b"}],"stream_options":{"include_usage":true}}"#;
        let (info, json) = inspect(Api::OpenaiChat, chat, ok.as_bytes()).expect("accepted");
        assert_eq!(info.model, "m");
        assert_eq!(json["stream_options"]["include_usage"], Value::Bool(true));
        // A non-object where an object is read is kept for the reader to judge.
        let (_, json) = inspect(Api::OpenaiChat, chat, br#"{"model":"m","stream_options":[1,"x"]}"#).expect("accepted");
        assert_eq!(json["stream_options"], serde_json::json!([1, "x"]));
        assert!(matches!(inspect(Api::OpenaiChat, chat, b"\"[1]\""), Err(Refusal::InvalidJson { .. })));
    }

    #[test]
    fn endpoints_by_path() {
        let of = Endpoint::of;
        assert_eq!(of(Api::OpenaiResponses, "/v1/responses"), Endpoint::Generate);
        assert_eq!(of(Api::OpenaiResponses, "/v1/responses/compact"), Endpoint::Compact);
        assert_eq!(of(Api::OpenaiResponses, "/openai/v1/responses/compact?x=1"), Endpoint::Compact);
        assert_eq!(of(Api::OpenaiResponses, "/v1/responses/input_tokens/"), Endpoint::CountTokens);
        assert_eq!(of(Api::AnthropicMessages, "/v1/messages/count_tokens"), Endpoint::CountTokens);
        assert_eq!(of(Api::AnthropicMessages, "/anthropic/v1/messages"), Endpoint::Generate);
        assert_eq!(of(Api::Gemini, "/v1beta/models/gemini-2.5-pro:countTokens"), Endpoint::CountTokens);
        assert_eq!(of(Api::Gemini, "/v1beta/models/gemini-2.5-pro:generateContent"), Endpoint::Generate);
        // Only within the API whose call it is.
        assert_eq!(of(Api::OpenaiChat, "/v1/messages/count_tokens"), Endpoint::Generate);
        assert!(Endpoint::CountTokens.is_free() && !Endpoint::Compact.is_free() && Endpoint::WebSocket.is_free());
        assert!(Endpoint::Generate.takes_max_output() && !Endpoint::Compact.takes_max_output());
        let body = br#"{"model": "claude-x", "messages": []}"#;
        let (info, _) = inspect(Api::AnthropicMessages, "/v1/messages/count_tokens", body).expect("accepted");
        assert_eq!((info.endpoint, info.model.as_str()), (Endpoint::CountTokens, "claude-x"));
    }
}
