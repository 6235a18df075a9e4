//! What is a response's usage, in one shape for every API?
//!
//! Token usage of LLM responses: the normalised [`Usage`] shape, what a
//! finished meter reports ([`Metered`]) and its bounds ([`MeterLimits`]), the
//! estimate used when a provider sends no usage, and the usage comment
//! appended to a stream.
//!
//! Reading usage out of a body is [`crate::metering::meter`]'s (framing) and
//! each API module's under [`crate::llm`] (what a document says).

use serde::Serialize;
use serde_json::Value;

/// Token usage of one response, normalised across providers.
///
/// Billable input is `input_uncached + cache_read + cache_write`; the three
/// never overlap, whatever the provider's own convention:
/// - OpenAI (chat, Responses, embeddings): `prompt_tokens`/`input_tokens`
///   include cached reads (and cache writes), which are subtracted out here.
/// - Anthropic: `input_tokens` already excludes `cache_read_input_tokens` and
///   `cache_creation_input_tokens`, which are additional.
/// - Gemini: `promptTokenCount` includes `cachedContentTokenCount`;
///   `toolUsePromptTokenCount` is additional input and is counted as uncached.
///
/// `output` is every generated token, reasoning included. Gemini's
/// `candidatesTokenCount` excludes `thoughtsTokenCount`, so the two are added.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Input tokens billed at the plain input price.
    pub input_uncached: u64,
    /// Input tokens read from the provider's prompt cache.
    pub cache_read: u64,
    /// Input tokens written to the provider's prompt cache.
    pub cache_write: u64,
    /// All output tokens, reasoning included.
    pub output: u64,
    /// The part of `output` that was reasoning/thinking (informational; it is
    /// already inside `output` and is not billed twice). As reported by the
    /// provider, so a buggy server could make it exceed `output`.
    pub reasoning: u64,
    /// The provider's total when it reports one (never recomputed, because
    /// some servers' totals are not the sum of the parts); otherwise
    /// `input_uncached + cache_read + cache_write + output`.
    pub total: u64,
    /// The part of `cache_write` written for one hour (Anthropic
    /// `cache_creation.ephemeral_1h_input_tokens`, dearer); the rest of the
    /// writes are 5-minute ones. A write total larger than the split (server
    /// tools) is priced as 5-minute writes.
    #[serde(skip_serializing_if = "is_zero")]
    pub cache_write_1h: u64,
    /// The part of `input_uncached` that was audio (priced apart).
    #[serde(skip_serializing_if = "is_zero")]
    pub input_audio: u64,
    /// The part of `output` that was audio (priced apart).
    #[serde(skip_serializing_if = "is_zero")]
    pub output_audio: u64,
    /// Server-side web searches, billed per request.
    #[serde(skip_serializing_if = "is_zero")]
    pub web_search_requests: u64,
    /// Server-side web fetches, billed per request.
    #[serde(skip_serializing_if = "is_zero")]
    pub web_fetch_requests: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Usage {
    /// All input tokens, cached or not.
    pub fn input_total(&self) -> u64 {
        self.input_uncached.saturating_add(self.cache_read).saturating_add(self.cache_write)
    }

    /// Input plus output, computed (unlike `total`, which follows the provider).
    pub fn sum(&self) -> u64 {
        self.input_total().saturating_add(self.output)
    }

    /// Adds `other` field by field (saturating): usage reported apart from
    /// the top-level totals, such as Anthropic's compaction iterations.
    pub fn add(&mut self, other: &Usage) {
        let fields = [
            (&mut self.input_uncached, other.input_uncached),
            (&mut self.cache_read, other.cache_read),
            (&mut self.cache_write, other.cache_write),
            (&mut self.output, other.output),
            (&mut self.reasoning, other.reasoning),
            (&mut self.total, other.total),
            (&mut self.cache_write_1h, other.cache_write_1h),
            (&mut self.input_audio, other.input_audio),
            (&mut self.output_audio, other.output_audio),
            (&mut self.web_search_requests, other.web_search_requests),
            (&mut self.web_fetch_requests, other.web_fetch_requests),
        ];
        for (mine, theirs) in fields {
            *mine = mine.saturating_add(theirs);
        }
    }
}

/// Which kind of work an [`Iteration`] was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IterationKind {
    /// Anthropic `compaction`: the server-side summary of a closed context.
    Compaction,
    /// Anthropic `advisor_message`: an advisor sub-inference, on the advisor's model.
    Advisor,
}

/// Usage a response reports apart from its top-level totals (Anthropic
/// `usage.iterations[]` entries of type `compaction` and `advisor_message`):
/// added to the request's usage, and priced at its own model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iteration {
    pub kind: IterationKind,
    /// The model that did the work; `None` (compaction entries carry none)
    /// means the response's model.
    pub model: Option<String>,
    pub usage: Usage,
}

/// Bytes of UTF-8 text per token assumed when a provider sends no usage.
/// English averages about 4 bytes per token with current BPE vocabularies;
/// code and non-Latin scripts use fewer bytes per token, so estimates for them
/// come out low. Every caller must flag such numbers as estimates.
pub const DEFAULT_BYTES_PER_TOKEN: u64 = 4;

/// Estimate a token count from a byte count, rounding up (so any non-empty
/// text costs at least one token). A ratio of 0 is treated as 1.
pub fn estimate_tokens_from_bytes(bytes: u64, bytes_per_token: u64) -> u64 {
    let ratio = bytes_per_token.max(1);
    bytes.div_ceil(ratio)
}

/// Memory bounds of one [`crate::metering::meter::ResponseMeter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeterLimits {
    /// Largest single SSE event or JSON-array element kept for parsing.
    pub max_event_bytes: usize,
    /// Largest non-streamed body kept for parsing.
    pub max_body_bytes: usize,
    /// How much of the end of an oversized event or body is kept to salvage a
    /// usage object from it (usage sits at the end of these documents).
    pub salvage_tail_bytes: usize,
}

impl Default for MeterLimits {
    fn default() -> Self {
        MeterLimits {
            max_event_bytes: crate::metering::sse::DEFAULT_MAX_EVENT_BYTES,
            max_body_bytes: 8 * 1024 * 1024,
            salvage_tail_bytes: 64 * 1024,
        }
    }
}

/// What a finished [`crate::metering::meter::ResponseMeter`] saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metered {
    /// Normalised usage, `None` when the provider reported none.
    pub usage: Option<Usage>,
    /// The model the provider says answered (`model`, Gemini `modelVersion`).
    pub model_answered: Option<String>,
    /// Response body bytes seen.
    pub bytes_seen: u64,
    /// Approximate bytes of generated text (content, reasoning, tool
    /// arguments) seen, for estimating output tokens when usage is missing.
    pub output_text_bytes: u64,
    /// Content events counted without being parsed (the SSE fast path of an
    /// OpenAI chat stream: single-line `data: {...}` events with no usage and
    /// no error). Each counts as one output token in the estimate.
    pub skimmed_events: u64,
    /// Bytes of the body passed over without being framed or parsed (edge
    /// scanning of large chunks of an OpenAI chat stream, see
    /// [`crate::metering::tap`]). Included in `bytes_seen`; their events are in neither
    /// `events` nor `skimmed_events`.
    pub passed_over_bytes: u64,
    /// Errors reported inside the body (mid-stream error events, error bodies).
    pub errors: Vec<String>,
    /// SSE events, JSON-array elements or whole JSON bodies parsed.
    pub events: u64,
    /// Events or bodies skipped for exceeding the meter's bounds.
    pub oversized: u64,
    /// Events or bodies that were not the JSON expected.
    pub malformed: u64,
    /// Usage came (at least partly) from the tail of an oversized event or body.
    pub usage_salvaged: bool,
    /// The response reached its normal end marker (`[DONE]`, `message_stop`,
    /// `response.completed`/`incomplete`/`failed`, a Gemini `finishReason`, or
    /// a complete non-streamed body). False means the stream was cut off, so
    /// usage (e.g. Anthropic's output count) may be an undercount.
    pub complete: bool,
    /// The service tier, speed and region the response says served it.
    pub served: ServedAs,
    /// Work the response reports outside its top-level usage (Anthropic
    /// compaction and advisor iterations), from the latest report. Not in
    /// `usage`: [`Metered::billed_usage`] adds them.
    pub iterations: Vec<Iteration>,
}

/// The conditions a response was served under, as the provider reported them
/// (the tier made canonical, see [`crate::llm::canonical_tier`]); `None` when
/// not reported. They choose the rates in [`crate::metering::pricing`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServedAs {
    /// Service tier (`standard`, `priority`, `flex`, `batch`, `provisioned`, ...).
    pub tier: Option<String>,
    /// Speed mode (Anthropic `fast`).
    pub speed: Option<String>,
    /// Inference region (Anthropic `inference_geo`).
    pub geo: Option<String>,
}

impl Metered {
    /// `usage` (the top-level totals, or an estimate in their place) with
    /// every [`Metered::iterations`] entry added: what the request used.
    pub fn billed_usage(&self, top: Usage) -> Usage {
        let mut all = top;
        for it in &self.iterations {
            all.add(&it.usage);
        }
        all
    }

    /// Output tokens estimated from the generated text seen, for when `usage`
    /// is `None` (or cut short). Always an estimate: flag it as one.
    ///
    /// Parsed events contribute their text at [`DEFAULT_BYTES_PER_TOKEN`];
    /// skimmed content events one token each (OpenAI-compatible chat servers
    /// stream about one token per chunk, and the JSON envelope around the text
    /// is far bigger than the text, so raw bytes would overcharge). Passed-over
    /// bytes count as content events of the average size of the events framed
    /// ([`Metered::passed_over_events`]), one token each.
    pub fn estimated_output_tokens(&self) -> u64 {
        estimate_tokens_from_bytes(self.output_text_bytes, DEFAULT_BYTES_PER_TOKEN)
            .saturating_add(self.skimmed_events)
            .saturating_add(self.passed_over_events())
    }

    /// Events estimated in the passed-over bytes: those bytes divided by the
    /// average size of the events that were framed (rounded up), or, with no
    /// event framed, [`estimate_tokens_from_bytes`] of them. An estimate.
    pub fn passed_over_events(&self) -> u64 {
        let passed = self.passed_over_bytes;
        if passed == 0 {
            return 0;
        }
        let framed = self.bytes_seen.saturating_sub(passed);
        if self.events == 0 || framed == 0 {
            return estimate_tokens_from_bytes(passed, DEFAULT_BYTES_PER_TOKEN);
        }
        let n = u128::from(passed).saturating_mul(u128::from(self.events)).div_ceil(u128::from(framed));
        u64::try_from(n).unwrap_or(u64::MAX)
    }
}

/// An SSE comment line carrying `value` as JSON, to append at the end of a
/// stream: `: tollgate-usage {...}\n\n`. Clients ignore comments. JSON
/// serialisation escapes CR and LF, so the comment stays on one line.
pub fn render_usage_comment(value: &Value) -> Vec<u8> {
    let json = serde_json::to_string(value).unwrap_or_else(|_| "{}".to_string());
    let mut out = Vec::with_capacity(json.len().saturating_add(20));
    out.extend_from_slice(b": tollgate-usage ");
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(b"\n\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    fn u(input_uncached: u64, cache_read: u64, cache_write: u64, output: u64, reasoning: u64, total: u64) -> Usage {
        Usage { input_uncached, cache_read, cache_write, output, reasoning, total, ..Usage::default() }
    }

    use crate::metering::sse::SseParser;

    #[test]
    fn estimate_rounds_up() {
        assert_eq!(estimate_tokens_from_bytes(0, 4), 0);
        assert_eq!(estimate_tokens_from_bytes(1, 4), 1);
        assert_eq!(estimate_tokens_from_bytes(8, 4), 2);
        assert_eq!(estimate_tokens_from_bytes(9, 4), 3);
        assert_eq!(estimate_tokens_from_bytes(9, 0), 9);
        assert_eq!(estimate_tokens_from_bytes(u64::MAX, 1), u64::MAX);
    }

    #[test]
    fn usage_comment_is_an_sse_comment() {
        let usage = u(1, 2, 3, 4, 0, 10);
        let value = serde_json::to_value(usage).expect("value");
        let line = render_usage_comment(&json!({"usage": value, "note": "a\nb\r"}));
        let text = String::from_utf8(line.clone()).expect("utf8");
        assert!(text.starts_with(": tollgate-usage {"));
        assert!(text.ends_with("}\n\n"));
        assert_eq!(text.matches('\n').count(), 2);
        let mut p = SseParser::new(1024);
        p.push(&line);
        p.finish();
        assert_eq!(p.next_event(), None);
    }
}
