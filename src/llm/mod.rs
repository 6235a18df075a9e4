//! Which LLM APIs does tollgate front, and what is specific to each?
//!
//! The LLM APIs tollgate fronts, and the error envelopes their clients expect.
//!
//! Every refusal tollgate makes is written in the shape of the API the client
//! called, so the provider SDKs surface a readable error (and, for 429s, act
//! on the retry headers) instead of choking on an unfamiliar body.

pub mod anthropic;
pub mod gemini;
pub mod gemini_interactions;
pub mod inspect;
pub mod observation;
pub mod openai_chat;
pub mod openai_embeddings;
pub mod openai_responses;
pub mod refusal;

pub use observation::{canonical_tier, Observation, RawCounts, Served};
pub use refusal::{render, retry_headers, LocalReply, Refusal};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::llm::inspect::RequestInfo;
use crate::llm::openai_chat::ChatBody;
use crate::metering::usage::Usage;

/// An inbound API, as configured on a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// OpenAI (or compatible) `POST /v1/chat/completions`.
    OpenaiChat,
    /// OpenAI `POST /v1/responses`.
    OpenaiResponses,
    /// OpenAI `POST /v1/embeddings`.
    OpenaiEmbeddings,
    /// Anthropic `POST /v1/messages`.
    AnthropicMessages,
    /// Gemini `models/{model}:generateContent` and `:streamGenerateContent`.
    Gemini,
    /// Gemini's Interactions API, `POST /v1beta/interactions`.
    GeminiInteractions,
}

/// Which error envelope and conventions a client of an API expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    OpenAi,
    Anthropic,
    Gemini,
}

impl Api {
    pub fn family(self) -> Family {
        match self {
            Api::OpenaiChat | Api::OpenaiResponses | Api::OpenaiEmbeddings => Family::OpenAi,
            Api::AnthropicMessages => Family::Anthropic,
            Api::Gemini | Api::GeminiInteractions => Family::Gemini,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Api::OpenaiChat => "openai_chat",
            Api::OpenaiResponses => "openai_responses",
            Api::OpenaiEmbeddings => "openai_embeddings",
            Api::AnthropicMessages => "anthropic_messages",
            Api::Gemini => "gemini",
            Api::GeminiInteractions => "gemini_interactions",
        }
    }
}

/// Where a fallback model was written by [`Api::swap_model`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSwap {
    /// In the request path (Gemini): the new `:path`.
    Path(String),
    /// In the body's `model` field (the body changed).
    Body,
    /// Nowhere: the body is not a JSON object.
    Unchanged,
}

impl ModelSwap {
    /// Writes `to` into the body's `model` field.
    pub(crate) fn in_body(body: &mut Value, to: &str) -> ModelSwap {
        match body.as_object_mut() {
            Some(obj) => {
                obj.insert("model".into(), Value::String(to.to_string()));
                ModelSwap::Body
            }
            None => ModelSwap::Unchanged,
        }
    }
}

/// Everything that differs between APIs, dispatched to the API's module.
impl Api {
    /// The request facts of a parsed body (see [`inspect::inspect`]).
    pub(crate) fn request_facts(self, path: &str, json: &Value) -> Result<RequestInfo, Refusal> {
        let mut info = match self {
            Api::OpenaiChat => openai_chat::request_facts(json),
            Api::OpenaiResponses => openai_responses::request_facts(json),
            Api::OpenaiEmbeddings => openai_embeddings::request_facts(json),
            Api::AnthropicMessages => anthropic::request_facts(json),
            Api::Gemini => gemini::request_facts(path, json),
            Api::GeminiInteractions => gemini_interactions::request_facts(json),
        }?;
        info.endpoint = inspect::Endpoint::of(self, path);
        Ok(info)
    }

    /// Parses a request body and reads its facts.
    pub fn inspect(self, path: &str, body: &[u8]) -> Result<(RequestInfo, Value), Refusal> {
        inspect::inspect(self, path, body)
    }

    /// Writes `n` into the body's max-output field. `false` when the API has
    /// none (embeddings): the body is unchanged.
    pub fn clamp_output(self, body: &mut Map<String, Value>, n: u64) -> bool {
        match self {
            Api::OpenaiChat => openai_chat::clamp_output(body, n),
            Api::OpenaiResponses => openai_responses::clamp_output(body, n),
            Api::AnthropicMessages => anthropic::clamp_output(body, n),
            Api::Gemini => gemini::clamp_output(body, n),
            Api::GeminiInteractions => gemini_interactions::clamp_output(body, n),
            Api::OpenaiEmbeddings => return false,
        }
        true
    }

    /// Makes the request ask for model `to` instead of `from`.
    pub fn swap_model(self, path: &str, body: &mut Value, from: &str, to: &str) -> ModelSwap {
        match self {
            Api::OpenaiChat => openai_chat::swap_model(body, to),
            Api::OpenaiResponses => openai_responses::swap_model(body, to),
            Api::OpenaiEmbeddings => openai_embeddings::swap_model(body, to),
            Api::AnthropicMessages => anthropic::swap_model(body, to),
            Api::Gemini => gemini::swap_model(path, from, to),
            Api::GeminiInteractions => gemini_interactions::swap_model(body, to),
        }
    }

    /// What one JSON object of a response says: a stream chunk (`streamed`)
    /// or a whole body.
    #[inline]
    pub fn observe(self, doc: &Value, streamed: bool) -> Observation<'_> {
        match self {
            Api::OpenaiChat => openai_chat::observe(doc),
            Api::OpenaiResponses => openai_responses::observe(doc, streamed),
            Api::OpenaiEmbeddings => openai_embeddings::observe(doc),
            Api::AnthropicMessages => anthropic::observe(doc),
            Api::Gemini => gemini::observe(doc),
            Api::GeminiInteractions => gemini_interactions::observe(doc),
        }
    }

    /// The counters of a usage object.
    pub fn usage_counts(self, usage: &Value) -> RawCounts {
        match self {
            Api::OpenaiChat | Api::OpenaiResponses | Api::OpenaiEmbeddings => openai_chat::usage_counts(usage),
            Api::AnthropicMessages => anthropic::usage_counts(usage),
            Api::Gemini => gemini::usage_counts(usage),
            Api::GeminiInteractions => gemini_interactions::usage_counts(usage),
        }
    }

    /// The counters in the normalised [`Usage`] shape, by the API's convention.
    pub fn normalise(self, raw: &RawCounts) -> Usage {
        match self {
            Api::OpenaiChat | Api::OpenaiResponses | Api::OpenaiEmbeddings => openai_chat::normalise(raw),
            Api::AnthropicMessages => anthropic::normalise(raw),
            Api::Gemini | Api::GeminiInteractions => gemini::normalise(raw),
        }
    }

    /// The key of the usage object (to salvage it from a document's tail).
    pub fn usage_key(self) -> &'static [u8] {
        match self {
            Api::Gemini => b"\"usageMetadata\"",
            _ => b"\"usage\"",
        }
    }

    /// Whether a typed SSE event (not `message` or `error`) can matter.
    #[inline]
    pub fn wants_event(self, event: &str) -> bool {
        match self {
            Api::AnthropicMessages => anthropic::wants_event(event),
            Api::OpenaiResponses => openai_responses::wants_event(event),
            _ => true,
        }
    }

    /// Text bytes of a stream event that carries only deltas, read without a
    /// JSON tree; `None` for a full parse (and for APIs without this path).
    #[inline]
    pub(crate) fn delta_text_len(self, data: &str) -> Option<u64> {
        match self {
            Api::OpenaiChat => openai_chat::delta_text_len(data),
            _ => None,
        }
    }

    /// A whole body read without a JSON tree (chat and embeddings); `None`
    /// for a full parse.
    pub(crate) fn read_whole_body(self, bytes: &[u8]) -> Option<ChatBody> {
        match self {
            Api::OpenaiChat | Api::OpenaiEmbeddings => openai_chat::read_chat_body(bytes),
            _ => None,
        }
    }

    /// Whether a response may be a JSON array of chunks (Gemini without `alt=sse`).
    pub fn streams_json_array(self) -> bool {
        self == Api::Gemini
    }
}
