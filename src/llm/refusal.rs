//! How is a refusal written so that the client's SDK understands it?
//!
//! How a refusal is written: the catalogue of refusals, the local reply, the
//! error envelope of each API family, and the retry headers of a 429.

use crate::llm::Family;

/// Why tollgate refused a request. Each kind has a stable machine code that
/// appears in the body and in the `x-tollgate-error` response header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    MissingApiKey,
    InvalidApiKey,
    TenantDisabled,
    ProviderNotConfigured {
        provider: String,
    },
    UnknownRoute,
    MethodNotAllowed,
    BodyRequired,
    RequestTooLarge {
        limit: u64,
    },
    InvalidJson {
        detail: String,
    },
    InvalidRequest {
        detail: String,
    },
    ModelNotAllowed {
        model: String,
    },
    /// A WebSocket upgrade on a metered route, for a tier without
    /// `allow_websocket`.
    WebSocketNotAllowed,
    /// A refusal produced by another module (JWT, limits) with its own code.
    Custom {
        status: u16,
        code: String,
        message: String,
    },
    Internal {
        detail: String,
    },
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::MissingApiKey | Refusal::InvalidApiKey => 401,
            Refusal::TenantDisabled
            | Refusal::ModelNotAllowed { .. }
            | Refusal::ProviderNotConfigured { .. }
            | Refusal::WebSocketNotAllowed => 403,
            Refusal::UnknownRoute => 404,
            Refusal::MethodNotAllowed => 405,
            Refusal::RequestTooLarge { .. } => 413,
            Refusal::BodyRequired | Refusal::InvalidJson { .. } | Refusal::InvalidRequest { .. } => 400,
            Refusal::Custom { status, .. } => *status,
            Refusal::Internal { .. } => 500,
        }
    }

    pub fn code(&self) -> &str {
        match self {
            Refusal::MissingApiKey => "missing_api_key",
            Refusal::InvalidApiKey => "invalid_api_key",
            Refusal::TenantDisabled => "tenant_disabled",
            Refusal::ProviderNotConfigured { .. } => "provider_not_configured",
            Refusal::UnknownRoute => "unknown_route",
            Refusal::MethodNotAllowed => "method_not_allowed",
            Refusal::BodyRequired => "body_required",
            Refusal::RequestTooLarge { .. } => "request_too_large",
            Refusal::InvalidJson { .. } => "invalid_json",
            Refusal::InvalidRequest { .. } => "invalid_request",
            Refusal::ModelNotAllowed { .. } => "model_not_allowed",
            Refusal::WebSocketNotAllowed => "websocket_not_allowed",
            Refusal::Custom { code, .. } => code,
            Refusal::Internal { .. } => "internal_error",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Refusal::MissingApiKey => "No API key was provided.".into(),
            Refusal::InvalidApiKey => "The API key provided is not valid.".into(),
            Refusal::TenantDisabled => "This account is disabled.".into(),
            Refusal::ProviderNotConfigured { provider } => {
                format!("This account has no credentials for provider '{provider}'.")
            }
            Refusal::UnknownRoute => "No LLM API is served at this path.".into(),
            Refusal::MethodNotAllowed => "Only POST is accepted on this path.".into(),
            Refusal::BodyRequired => "A JSON request body is required.".into(),
            Refusal::RequestTooLarge { limit } => {
                format!("The request body exceeds this account's limit of {limit} bytes.")
            }
            Refusal::InvalidJson { detail } => {
                format!("The request body is not valid JSON: {detail}")
            }
            Refusal::InvalidRequest { detail } => detail.clone(),
            Refusal::ModelNotAllowed { model } => {
                format!("The model '{model}' is not available to this account.")
            }
            Refusal::WebSocketNotAllowed => "WebSocket connections are not enabled for this account: this gateway \
                cannot meter their traffic. Use HTTP requests (with \"stream\": true for streaming) instead."
                .into(),
            Refusal::Custom { message, .. } => message.clone(),
            Refusal::Internal { detail } => format!("Internal gateway error: {detail}"),
        }
    }
}

/// A complete local reply: status, headers and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl LocalReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

fn openai_type(status: u16) -> &'static str {
    match status {
        401 => "invalid_request_error",
        403 => "permission_error",
        404 => "invalid_request_error",
        429 => "rate_limit_error",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    }
}

fn anthropic_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 | 503 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    }
}

fn gemini_status(status: u16) -> &'static str {
    match status {
        400 | 413 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        405 => "INVALID_ARGUMENT",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}

/// Renders a refusal in the envelope of `family`.
///
/// `openai_type` lets the caller pick OpenAI's `error.type` where OpenAI has a
/// specific one (`requests`, `tokens`, `insufficient_quota` for 429s).
pub fn render(family: Family, refusal: &Refusal, request_id: &str, openai_type_override: Option<&str>) -> LocalReply {
    let status = refusal.status();
    let code = refusal.code();
    let message = refusal.message();
    let body = match family {
        Family::OpenAi => serde_json::json!({
            "error": {
                "message": message,
                "type": openai_type_override.unwrap_or(openai_type(status)),
                "param": null,
                "code": code,
            }
        }),
        Family::Anthropic => serde_json::json!({
            "type": "error",
            "error": {
                "type": anthropic_type(status),
                "message": message,
                "code": code,
            },
            "request_id": request_id,
        }),
        Family::Gemini => serde_json::json!({
            "error": {
                "code": status,
                "message": message,
                "status": gemini_status(status),
                "details": [{
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": code.to_ascii_uppercase(),
                    "domain": "tollgate",
                    "metadata": {"request_id": request_id},
                }],
            }
        }),
    };
    LocalReply {
        status,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("x-tollgate-error".into(), code.to_string()),
            ("x-request-id".into(), request_id.to_string()),
        ],
        body: body.to_string().into_bytes(),
    }
}

/// The retry headers of a 429 that can be retried after `ms` milliseconds
/// (at least 1): `retry-after` in whole seconds rounded up, `retry-after-ms`,
/// and `x-should-retry` (`false` when waiting will not help, e.g. an exhausted
/// budget). Appended after the envelope's own headers.
pub fn retry_headers(ms: u64, should_retry: bool) -> [(String, String); 3] {
    let ms = ms.max(1);
    [
        ("retry-after".into(), ms.div_ceil(1000).to_string()),
        ("retry-after-ms".into(), ms.to_string()),
        ("x-should-retry".into(), if should_retry { "true" } else { "false" }.into()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(reply: &LocalReply) -> serde_json::Value {
        serde_json::from_slice(&reply.body).unwrap()
    }

    #[test]
    fn openai_envelope() {
        let r = render(Family::OpenAi, &Refusal::InvalidApiKey, "rid", None);
        assert_eq!(r.status, 401);
        let v = json(&r);
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["param"].is_null());
        assert_eq!(r.header("x-tollgate-error"), Some("invalid_api_key"));
    }

    #[test]
    fn anthropic_envelope() {
        let r = render(Family::Anthropic, &Refusal::TenantDisabled, "rid-1", None);
        assert_eq!(r.status, 403);
        let v = json(&r);
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "permission_error");
        assert_eq!(v["request_id"], "rid-1");
    }

    #[test]
    fn gemini_envelope() {
        let r = render(Family::Gemini, &Refusal::RequestTooLarge { limit: 10 }, "r", None);
        assert_eq!(r.status, 413);
        let v = json(&r);
        assert_eq!(v["error"]["code"], 413);
        assert_eq!(v["error"]["status"], "INVALID_ARGUMENT");
        assert_eq!(v["error"]["details"][0]["reason"], "REQUEST_TOO_LARGE");
    }

    #[test]
    fn openai_type_override_for_quota() {
        let refusal = Refusal::Custom { status: 429, code: "budget_exceeded".into(), message: "m".into() };
        let r = render(Family::OpenAi, &refusal, "r", Some("insufficient_quota"));
        assert_eq!(json(&r)["error"]["type"], "insufficient_quota");
    }

    #[test]
    fn retry_headers_round_seconds_up() {
        let h = |ms, retry| retry_headers(ms, retry).map(|(k, v)| format!("{k}={v}"));
        assert_eq!(h(1000, true), ["retry-after=1", "retry-after-ms=1000", "x-should-retry=true"]);
        assert_eq!(h(1001, true), ["retry-after=2", "retry-after-ms=1001", "x-should-retry=true"]);
        assert_eq!(h(0, false), ["retry-after=1", "retry-after-ms=1", "x-should-retry=false"]);
        assert_eq!(h(59_999, true)[0], "retry-after=60");
    }
}
