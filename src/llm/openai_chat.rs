//! What is specific to OpenAI chat completions (`/v1/chat/completions`, and
//! compatible servers such as Azure and vLLM): the request's fields, its
//! max-output field, how usage is asked for in a stream, and what each
//! response document says.

use serde_json::{Map, Value};

use crate::llm::inspect::{asked_conditions, body_model, body_stream, u64_at, RequestInfo};
use crate::llm::observation::{
    canonical_tier, count, counts_of, json_len, path, text_len, Observation, RawCounts, Served,
};
use crate::llm::{ModelSwap, Refusal};
use crate::metering::usage::Usage;

/// The request facts of a chat body. `include_usage` is whether a stream
/// already asks for usage (`stream_options.include_usage`); a non-streamed
/// response always carries it.
pub(crate) fn request_facts(json: &Value) -> Result<RequestInfo, Refusal> {
    let model = body_model(json)?;
    let stream = body_stream(json)?;
    let include_usage = !stream
        || json.get("stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool).unwrap_or(false);
    Ok(RequestInfo {
        model,
        stream,
        json_array_stream: false,
        max_output_tokens: u64_at(json, &["max_completion_tokens"]).or_else(|| u64_at(json, &["max_tokens"])),
        include_usage,
        asked: asked_conditions(json),
        endpoint: Default::default(),
    })
}

/// Writes the max-output cap: keeps the client's choice of field; newer
/// models accept only `max_completion_tokens`.
pub(crate) fn clamp_output(obj: &mut Map<String, Value>, n: u64) {
    let field = if obj.contains_key("max_tokens") && !obj.contains_key("max_completion_tokens") {
        "max_tokens"
    } else {
        "max_completion_tokens"
    };
    obj.insert(field.into(), n.into());
}

/// The model is the body's `model` field.
pub(crate) fn swap_model(body: &mut Value, to: &str) -> ModelSwap {
    ModelSwap::in_body(body, to)
}

/// What a chat (or embeddings) document says: a stream chunk or a whole body.
pub(crate) fn observe(doc: &Value) -> Observation<'_> {
    let mut text = 0u64;
    if let Some(Value::Array(choices)) = doc.get("choices") {
        for choice in choices {
            let Some(msg) = choice.get("delta").or_else(|| choice.get("message")) else {
                // Legacy completions put text directly on the choice.
                text = text.saturating_add(text_len(choice.get("text")));
                continue;
            };
            let mut n = text_len(msg.get("content"))
                .saturating_add(text_len(msg.get("reasoning_content")))
                .saturating_add(text_len(msg.get("reasoning")))
                .saturating_add(text_len(msg.get("refusal")));
            if let Some(Value::Array(calls)) = msg.get("tool_calls") {
                for call in calls {
                    n = n.saturating_add(json_len(path(call, &["function", "arguments"])));
                }
            }
            text = text.saturating_add(n);
        }
    }
    Observation::of_body(doc, usage_counts, text)
}

/// OpenAI usage, both naming families (chat's `prompt_tokens`, Responses'
/// `input_tokens`); Responses and embeddings read theirs with this too.
pub(crate) fn usage_counts(u: &Value) -> RawCounts {
    let input_details = u.get("prompt_tokens_details").or_else(|| u.get("input_tokens_details"));
    let output_details = u.get("completion_tokens_details").or_else(|| u.get("output_tokens_details"));
    let detail = |d: Option<&Value>, k: &str| d.and_then(|d| count(d.get(k)));
    RawCounts {
        input: count(u.get("prompt_tokens")).or_else(|| count(u.get("input_tokens"))),
        cache_read: detail(input_details, "cached_tokens")
            // DeepSeek-style compatible servers report cache hits at top level.
            .or_else(|| count(u.get("prompt_cache_hit_tokens"))),
        cache_write: detail(input_details, "cache_write_tokens"),
        output: count(u.get("completion_tokens")).or_else(|| count(u.get("output_tokens"))),
        reasoning: detail(output_details, "reasoning_tokens"),
        total: count(u.get("total_tokens")),
        input_audio: detail(input_details, "audio_tokens"),
        output_audio: detail(output_details, "audio_tokens"),
        // `accepted_prediction_tokens` and `rejected_prediction_tokens` are
        // inside `completion_tokens` and billed as output: nothing to add.
        ..RawCounts::default()
    }
}

/// OpenAI's inclusive convention (chat, Responses, embeddings): cached reads
/// and writes are inside the input count, so they are subtracted out.
pub(crate) fn normalise(raw: &RawCounts) -> Usage {
    let v = |x: Option<u64>| x.unwrap_or(0);
    let cr = v(raw.cache_read);
    let cw = v(raw.cache_write);
    let uncached = v(raw.input).saturating_sub(cr).saturating_sub(cw);
    raw.usage(uncached, cr, cw, v(raw.output), v(raw.reasoning))
}

/// Text bytes of an OpenAI chat chunk that carries nothing but deltas: no
/// usage, no error. `None` sends the chunk down the full path (a usage chunk,
/// an error, or a shape this reader does not know).
pub(crate) fn delta_text_len(data: &str) -> Option<u64> {
    use serde::de::IgnoredAny;
    use serde::Deserialize;
    use std::borrow::Cow;

    #[derive(Deserialize)]
    struct Chunk<'a> {
        #[serde(default)]
        usage: Option<IgnoredAny>,
        #[serde(default)]
        error: Option<IgnoredAny>,
        #[serde(default, borrow)]
        choices: Vec<Choice<'a>>,
    }
    #[derive(Deserialize)]
    struct Choice<'a> {
        #[serde(borrow)]
        delta: Delta<'a>,
    }
    #[derive(Deserialize)]
    struct Delta<'a> {
        #[serde(default, borrow)]
        content: Option<Cow<'a, str>>,
        #[serde(default, borrow)]
        reasoning_content: Option<Cow<'a, str>>,
        #[serde(default, borrow)]
        reasoning: Option<Cow<'a, str>>,
        #[serde(default, borrow)]
        refusal: Option<Cow<'a, str>>,
        #[serde(default)]
        tool_calls: Option<IgnoredAny>,
    }

    let chunk: Chunk<'_> = serde_json::from_str(data).ok()?;
    if chunk.usage.is_some() || chunk.error.is_some() {
        return None;
    }
    let len = |s: &Option<Cow<'_, str>>| s.as_ref().map_or(0, |s| s.len() as u64);
    let mut n = 0u64;
    for c in &chunk.choices {
        if c.delta.tool_calls.is_some() {
            return None;
        }
        n = n
            .saturating_add(len(&c.delta.content))
            .saturating_add(len(&c.delta.reasoning_content))
            .saturating_add(len(&c.delta.reasoning))
            .saturating_add(len(&c.delta.refusal));
    }
    Some(n)
}

/// What a whole OpenAI chat (or embeddings) body says, read without building
/// a JSON tree: the model, the usage object, and the text bytes of the
/// choices. The body's text and embeddings, usually most of it, are counted
/// or skipped in place. `None` sends the body down the full path
/// ([`observe`]), whose result this matches: an error, tool calls,
/// or a shape this reader does not take.
pub(crate) struct ChatBody {
    model: Option<String>,
    service_tier: Option<String>,
    usage: Option<Value>,
    text: u64,
}

impl ChatBody {
    /// What the body says, as [`observe`] would say it.
    pub(crate) fn observation(&self) -> Observation<'_> {
        Observation {
            counts: counts_of(self.usage.as_ref(), usage_counts),
            model: self.model.as_deref(),
            error: None,
            text_bytes: self.text,
            complete: false,
            served: Served { tier: self.service_tier.as_deref().map(canonical_tier), ..Served::default() },
            iterations: None,
        }
    }
}

pub(crate) fn read_chat_body(bytes: &[u8]) -> Option<ChatBody> {
    use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use serde::Deserialize;
    use std::borrow::Cow;
    use std::fmt;

    /// Visitor methods giving 0 for every scalar but a string.
    macro_rules! zero_for_scalars {
        ($t:ident) => {
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<$t, E> {
                Ok($t(0))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<$t, E> {
                Ok($t(0))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<$t, E> {
                Ok($t(0))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<$t, E> {
                Ok($t(0))
            }
            fn visit_unit<E: de::Error>(self) -> Result<$t, E> {
                Ok($t(0))
            }
        };
    }

    /// `text_len` of a value: a string's bytes, or the sum over an array's
    /// elements of their `text` (recursively); 0 for anything else.
    struct TextLen(u64);
    impl<'de> Deserialize<'de> for TextLen {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = TextLen;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("any JSON value")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<TextLen, E> {
                    Ok(TextLen(v.len() as u64))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TextLen, A::Error> {
                    let mut n = 0u64;
                    while let Some(part) = seq.next_element::<PartText>()? {
                        n = n.saturating_add(part.0);
                    }
                    Ok(TextLen(n))
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TextLen, A::Error> {
                    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                    Ok(TextLen(0))
                }
                zero_for_scalars!(TextLen);
            }
            d.deserialize_any(V)
        }
    }

    /// An element of a content array: the `text_len` of its `text` when it
    /// is an object, else 0. A repeated `text` key fails (the full path
    /// keeps the last one).
    struct PartText(u64);
    impl<'de> Deserialize<'de> for PartText {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = PartText;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("any JSON value")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PartText, A::Error> {
                    let mut text = None;
                    while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                        if key == "text" {
                            if text.is_some() {
                                return Err(de::Error::duplicate_field("text"));
                            }
                            text = Some(map.next_value::<TextLen>()?.0);
                        } else {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                    Ok(PartText(text.unwrap_or(0)))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PartText, A::Error> {
                    while seq.next_element::<IgnoredAny>()?.is_some() {}
                    Ok(PartText(0))
                }
                fn visit_str<E: de::Error>(self, _: &str) -> Result<PartText, E> {
                    Ok(PartText(0))
                }
                zero_for_scalars!(PartText);
            }
            d.deserialize_any(V)
        }
    }

    /// An object only: serde's derived structs also take a JSON array
    /// (fields by position), which the full path reads as no fields.
    struct Obj<T>(T);
    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V<T>(std::marker::PhantomData<T>);
            impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
                type Value = Obj<T>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Obj<T>, A::Error> {
                    T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Obj)
                }
            }
            d.deserialize_map(V(std::marker::PhantomData))
        }
    }

    /// A `message` or `delta` key: absent, `null`, or an object.
    #[derive(Default)]
    enum Slot<T> {
        #[default]
        Absent,
        Null,
        Present(T),
    }
    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Slot<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            Ok(match Option::<T>::deserialize(d)? {
                Some(t) => Slot::Present(t),
                None => Slot::Null,
            })
        }
    }

    #[derive(Deserialize)]
    struct Body<'a> {
        #[serde(default, borrow)]
        model: Option<Cow<'a, str>>,
        #[serde(default, borrow)]
        service_tier: Option<Cow<'a, str>>,
        #[serde(default)]
        usage: Option<Value>,
        #[serde(default)]
        error: Option<IgnoredAny>,
        #[serde(default)]
        choices: Option<Vec<Obj<Choice>>>,
    }
    #[derive(Deserialize)]
    struct Choice {
        #[serde(default)]
        delta: Slot<Obj<Message>>,
        #[serde(default)]
        message: Slot<Obj<Message>>,
        #[serde(default)]
        text: Option<TextLen>,
    }
    #[derive(Deserialize)]
    struct Message {
        #[serde(default)]
        content: Option<TextLen>,
        #[serde(default)]
        reasoning_content: Option<TextLen>,
        #[serde(default)]
        reasoning: Option<TextLen>,
        #[serde(default)]
        refusal: Option<TextLen>,
        #[serde(default)]
        tool_calls: Option<IgnoredAny>,
    }

    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let body: Body<'_> = serde_json::from_slice(bytes).ok()?;
    if body.error.is_some() {
        return None;
    }
    let len = |t: &Option<TextLen>| t.as_ref().map_or(0, |t| t.0);
    let mut text = 0u64;
    for Obj(choice) in body.choices.iter().flatten() {
        // As the full path: `delta` if the key is there (even null), else `message`.
        let msg = match (&choice.delta, &choice.message) {
            (Slot::Absent, Slot::Absent) => {
                text = text.saturating_add(len(&choice.text));
                continue;
            }
            (Slot::Absent, m) => m,
            (d, _) => d,
        };
        if let Slot::Present(Obj(m)) = msg {
            if m.tool_calls.is_some() {
                return None;
            }
            text = text
                .saturating_add(len(&m.content))
                .saturating_add(len(&m.reasoning_content))
                .saturating_add(len(&m.reasoning))
                .saturating_add(len(&m.refusal));
        }
    }
    Some(ChatBody {
        model: body.model.map(Cow::into_owned),
        service_tier: body.service_tier.filter(|t| !t.is_empty()).map(Cow::into_owned),
        usage: body.usage,
        text,
    })
}

/// Ask an OpenAI chat stream for usage on the client's behalf: set
/// `stream_options.include_usage` to `true` in a request body.
///
/// Returns `true` when the body was changed, i.e. when the client will not
/// expect the extra usage chunk and the response must go through a
/// [`crate::metering::tap::StreamTap`] that strips it. Returns `false` (body untouched) when the request
/// is not a stream (`"stream": true`; OpenAI rejects `stream_options`
/// otherwise), is not a JSON object, or already has `include_usage: true`.
///
/// A client that explicitly sent `include_usage: false` is treated like one
/// that sent nothing: the option is turned on (the filter needs the usage) and
/// `true` is returned, so the chunk is stripped and the client sees what it
/// asked for.
pub fn inject_include_usage(body: &mut Value) -> bool {
    let Some(obj) = body.as_object_mut() else {
        return false;
    };
    if obj.get("stream").and_then(Value::as_bool) != Some(true) {
        return false;
    }
    let opts = obj.entry("stream_options").or_insert_with(|| Value::Object(Map::new()));
    if !opts.is_object() {
        *opts = Value::Object(Map::new());
    }
    let Some(opts) = opts.as_object_mut() else {
        return false;
    };
    if opts.get("include_usage").and_then(Value::as_bool) == Some(true) {
        return false;
    }
    opts.insert("include_usage".to_string(), Value::Bool(true));
    true
}

/// Whether an OpenAI chat SSE `data` payload is the usage-only chunk that
/// `include_usage` adds: a non-null `usage` object and `"choices": []`, or
/// choices that say nothing (`[{"index":0,"delta":{}}]`, as some servers
/// send). Empty choices alone are not enough (Azure's first chunk has them
/// too); a choice with a finish reason, logprobs or any delta is content.
pub fn is_usage_only_chunk(data: &str) -> bool {
    // Cheap pre-check so ordinary content chunks are not parsed twice.
    if !data.contains("\"usage\"") || !data.contains("\"choices\"") {
        return false;
    }
    let Ok(doc) = serde_json::from_str::<Value>(data) else {
        return false;
    };
    let silent_choices = doc.get("choices").and_then(Value::as_array).is_some_and(|c| c.iter().all(says_nothing));
    silent_choices && doc.get("usage").is_some_and(Value::is_object)
}

/// A choice with nothing in it: an index, and an empty (or null) delta,
/// finish reason and logprobs.
fn says_nothing(choice: &Value) -> bool {
    let Some(obj) = choice.as_object() else {
        return false;
    };
    obj.iter().all(|(k, v)| match k.as_str() {
        "index" => true,
        "delta" => v.is_null() || v.as_object().is_some_and(Map::is_empty),
        "finish_reason" | "logprobs" => v.is_null(),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::inspect::inspect;
    use crate::llm::Api;
    use serde_json::json;

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
    fn clamp_keeps_the_clients_field() {
        let mut obj = json!({"max_tokens": 5}).as_object().cloned().unwrap();
        clamp_output(&mut obj, 9);
        assert_eq!(Value::Object(obj), json!({"max_tokens": 9}));
        let mut obj = Map::new();
        clamp_output(&mut obj, 9);
        assert_eq!(Value::Object(obj), json!({"max_completion_tokens": 9}));
    }

    #[test]
    fn chunk_observes_text_model_usage_and_error() {
        let doc = json!({"model": "gpt-4o", "choices": [{"delta": {"content": "abc", "tool_calls": [{"function": {"arguments": "{}"}}]}}, {"text": "zz"}], "usage": {"prompt_tokens": 7, "prompt_tokens_details": {"cached_tokens": 2}, "completion_tokens": 3}});
        let o = observe(&doc);
        assert_eq!(o.model, Some("gpt-4o"));
        assert_eq!(o.text_bytes, 3 + 2 + 2);
        assert_eq!(o.error, None);
        assert!(!o.complete);
        let u = normalise(&o.counts.expect("counts"));
        assert_eq!((u.input_uncached, u.cache_read, u.output, u.total), (5, 2, 3, 10));
        let err = json!({"error": {"message": "m"}, "usage": null});
        let o = observe(&err);
        assert_eq!((o.error, o.counts), (Some(&err["error"]), None));
    }

    #[test]
    fn delta_text_len_takes_only_plain_deltas() {
        assert_eq!(delta_text_len(r#"{"choices":[{"delta":{"content":"ab","reasoning":"c"}}]}"#), Some(3));
        assert_eq!(delta_text_len(r#"{"choices":[],"usage":{"prompt_tokens":1}}"#), None);
        assert_eq!(delta_text_len(r#"{"choices":[{"delta":{"tool_calls":[]}}]}"#), None);
    }

    #[test]
    fn lenient_counts() {
        let doc = json!({"prompt_tokens": 10.0, "completion_tokens": "7", "total_tokens": -1});
        let c = usage_counts(&doc);
        assert_eq!((c.input, c.output, c.total), (Some(10), Some(7), None));
    }

    #[test]
    fn cached_more_than_prompt_saturates() {
        let raw = RawCounts { input: Some(5), cache_read: Some(9), ..RawCounts::default() };
        let got = normalise(&raw);
        assert_eq!(got.input_uncached, 0);
        assert_eq!(got.cache_read, 9);
    }

    #[test]
    fn inject_when_client_did_not_ask() {
        let mut body = json!({"model": "gpt-4o", "stream": true, "messages": []});
        assert!(inject_include_usage(&mut body));
        assert_eq!(body["stream_options"], json!({"include_usage": true}));
    }

    #[test]
    fn no_injection_when_client_asked() {
        let mut body = json!({"stream": true, "stream_options": {"include_usage": true}});
        let before = body.clone();
        assert!(!inject_include_usage(&mut body));
        assert_eq!(body, before);
    }

    #[test]
    fn explicit_false_is_overridden_and_stripped() {
        let mut body =
            json!({"stream": true, "stream_options": {"include_usage": false, "continuous_usage_stats": false}});
        assert!(inject_include_usage(&mut body));
        assert_eq!(body["stream_options"], json!({"include_usage": true, "continuous_usage_stats": false}));
    }

    #[test]
    fn no_injection_without_stream() {
        for mut body in [json!({"model": "x"}), json!({"stream": false}), json!([1]), json!("s")] {
            let before = body.clone();
            assert!(!inject_include_usage(&mut body));
            assert_eq!(body, before);
        }
    }

    #[test]
    fn null_stream_options_are_replaced() {
        let mut body = json!({"stream": true, "stream_options": null});
        assert!(inject_include_usage(&mut body));
        assert_eq!(body["stream_options"], json!({"include_usage": true}));
    }

    #[test]
    fn usage_only_chunk_detection() {
        assert!(is_usage_only_chunk(r#"{"choices":[],"usage":{"prompt_tokens":1}}"#));
        // Azure's first chunk: empty choices, no usage.
        assert!(!is_usage_only_chunk(r#"{"choices":[],"prompt_filter_results":[]}"#));
        // vLLM continuous usage: usage on a content chunk, or on the last one.
        assert!(!is_usage_only_chunk(r#"{"choices":[{"delta":{"content":"a"}}],"usage":{"prompt_tokens":1}}"#));
        assert!(!is_usage_only_chunk(
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":1}}"#
        ));
        assert!(!is_usage_only_chunk(r#"{"choices":[{"index":0,"delta":{},"x":1}],"usage":{"prompt_tokens":1}}"#));
        assert!(!is_usage_only_chunk(r#"{"choices":[1],"usage":{"prompt_tokens":1}}"#));
        // A usage chunk whose one choice says nothing is still the usage chunk.
        assert!(is_usage_only_chunk(r#"{"choices":[{"index":0,"delta":{}}],"usage":{"prompt_tokens":1}}"#));
        assert!(is_usage_only_chunk(
            r#"{"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":null}],"usage":{"prompt_tokens":1}}"#
        ));
        assert!(!is_usage_only_chunk(r#"{"choices":[],"usage":null}"#));
        assert!(!is_usage_only_chunk("[DONE]"));
    }
}
