//! What is specific to OpenAI embeddings (`/v1/embeddings`): a request that
//! cannot be streamed and has no output to cap, read like a chat body.

use serde_json::Value;

use crate::llm::inspect::{body_model, body_stream, RequestInfo};
use crate::llm::observation::Observation;
use crate::llm::{openai_chat, ModelSwap, Refusal};

/// The request facts of an embeddings body; streaming is refused.
pub(crate) fn request_facts(json: &Value) -> Result<RequestInfo, Refusal> {
    let model = body_model(json)?;
    let stream = body_stream(json)?;
    if stream {
        return Err(Refusal::InvalidRequest { detail: "embeddings cannot be streamed".into() });
    }
    Ok(RequestInfo {
        model,
        stream,
        json_array_stream: false,
        max_output_tokens: None,
        include_usage: true,
        asked: Default::default(),
        endpoint: Default::default(),
    })
}

/// The model is the body's `model` field.
pub(crate) fn swap_model(body: &mut Value, to: &str) -> crate::llm::ModelSwap {
    ModelSwap::in_body(body, to)
}

/// An embeddings body has the chat body's `model` and `usage` (no choices).
pub(crate) fn observe(doc: &Value) -> Observation<'_> {
    openai_chat::observe(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::inspect::inspect;
    use crate::llm::Api;
    use serde_json::json;

    #[test]
    fn streaming_is_refused() {
        let r = inspect(Api::OpenaiEmbeddings, "/v1/embeddings", br#"{"model":"e","stream":true}"#);
        assert!(matches!(r, Err(Refusal::InvalidRequest { .. })));
        let (i, _) = inspect(Api::OpenaiEmbeddings, "/v1/embeddings", br#"{"model":"e","max_tokens":3}"#).unwrap();
        assert_eq!((i.max_output_tokens, i.include_usage), (None, true));
    }

    #[test]
    fn body_observes_model_and_usage() {
        let doc = json!({"object": "list", "data": [{"embedding": [0.1]}], "model": "text-embedding-3-small", "usage": {"prompt_tokens": 8, "total_tokens": 8}});
        let o = observe(&doc);
        assert_eq!(o.model, Some("text-embedding-3-small"));
        let u = openai_chat::normalise(&o.counts.expect("counts"));
        assert_eq!((u.input_uncached, u.output, u.total), (8, 0, 8));
        assert_eq!(o.text_bytes, 0);
    }
}
