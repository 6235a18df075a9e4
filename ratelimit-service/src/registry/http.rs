//! How do the registry's HTTP APIs say no? One JSON error envelope
//! (`{"error":{"code","message","field"?}}`), a strict JSON body extractor
//! (content type, size, unknown fields named) and query-string parsing.
//! Messages never echo a request's values: a value may be a secret.

use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::model::FieldError;
use super::store::StoreError;

/// Largest admin request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), field: None }
    }

    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            message: message.into(),
            field: Some(field.to_owned()),
        }
    }

    pub fn unavailable() -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the registry storage is unavailable; retry")
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        Self::invalid(&e.field, e.message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        use super::crypto::SealError;
        match e {
            StoreError::Unavailable(err) => {
                tracing::warn!(error = %err, "registry storage unavailable");
                Self::unavailable()
            }
            StoreError::NotFound(what) => Self::new(StatusCode::NOT_FOUND, "not_found", format!("{what} not found")),
            StoreError::Conflict(what) => Self::new(StatusCode::CONFLICT, "conflict", format!("{what} already exists")),
            StoreError::Contended => {
                Self::new(StatusCode::CONFLICT, "conflict", "the record changed concurrently; retry")
            }
            StoreError::Seal(SealError::NoKek) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_kek",
                "credentials cannot be stored: the service has no key-encryption key (--kek-file or TOLLGATE_KEK)",
            ),
            StoreError::Seal(err) => {
                tracing::error!(error = %err, "a stored credential does not open");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "credential_unreadable",
                    "a stored credential does not open",
                )
            }
            StoreError::Corrupt(err) => {
                tracing::error!(error = %err, "unreadable registry record");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "a stored registry record is unreadable")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut err = json!({"code": self.code, "message": self.message});
        if let (Some(field), Some(obj)) = (self.field, err.as_object_mut()) {
            obj.insert("field".into(), json!(field));
        }
        let mut resp = (self.status, Json(json!({ "error": err }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// serde's message without the offending value (`invalid type: string "x", expected u64`
/// → `invalid type, expected u64`).
fn sanitize(msg: &str) -> String {
    for kind in ["invalid type", "invalid value", "unknown variant", "invalid length"] {
        if msg.starts_with(kind) {
            let expected = msg.find(", expected").map_or("", |i| msg.get(i..).unwrap_or(""));
            let expected = expected.split(" at line ").next().unwrap_or("");
            return format!("{kind}{expected}");
        }
    }
    msg.split(" at line ").next().unwrap_or(msg).to_owned()
}

/// JSON numbers with a zero fraction that fit an integer become integers
/// (`1.0` is the integer 1 in JSON and JSON Schema; serde's u64 would refuse it).
fn integral(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64() {
                // 2^64 and -2^63 bound what u64 and i64 hold.
                if f.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&f) {
                    *v = serde_json::Value::from(f as u64);
                } else if f.fract() == 0.0 && (-9_223_372_036_854_775_808.0..0.0).contains(&f) {
                    *v = serde_json::Value::from(f as i64);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(integral),
        serde_json::Value::Object(map) => map.values_mut().for_each(integral),
        _ => {}
    }
}

/// Parse a JSON object, naming the field at fault.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|_| ApiError::invalid("body", "the body is not valid JSON"))?;
    if !value.is_object() {
        return Err(ApiError::invalid("body", "the body must be a JSON object"));
    }
    integral(&mut value);
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.into_inner().to_string();
        let named =
            |name: &str| if path == "." || path.is_empty() { name.to_owned() } else { format!("{path}.{name}") };
        let between = |s: &str| s.split('`').nth(1).map(str::to_owned);
        let field = if msg.starts_with("unknown field") {
            between(&msg).map(|f| if path.ends_with(&f) { path.clone() } else { named(&f) })
        } else if msg.starts_with("missing field") {
            between(&msg).map(|f| named(&f))
        } else if path == "." || path == "?" {
            None
        } else {
            Some(path.clone())
        };
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            message: sanitize(&msg),
            field: Some(field.unwrap_or_else(|| "body".into())),
        }
    })
}

/// A JSON body: `application/json`, at most [`MAX_BODY_BYTES`], fields checked by serde.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let json_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
        if !json_type {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be application/json",
            ));
        }
        let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES).await.map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body exceeds {MAX_BODY_BYTES} bytes"),
            )
        })?;
        Ok(Self(parse_json(&bytes)?))
    }
}

/// The query string as (name, value) pairs.
pub fn query_pairs(raw: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_str(raw.unwrap_or("")).map_err(|_| ApiError::invalid("query", "malformed query string"))
}

/// The value of query parameter `name` (the last one if repeated).
pub fn query_get<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// `limit`: 1..=1000, default 100.
pub fn query_limit(pairs: &[(String, String)]) -> Result<usize, ApiError> {
    match query_get(pairs, "limit") {
        None => Ok(100),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => Ok(n),
            _ => Err(ApiError::invalid("limit", "must be an integer in 1..=1000")),
        },
    }
}

/// A `404` for paths that are not routes.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::model::{CreateTenant, SetCredential};

    #[test]
    fn errors_name_the_field_and_never_echo_values() {
        let e = parse_json::<CreateTenant>(br#"{"id":"a","tier":"t","bogus":1}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("bogus"));
        let e = parse_json::<CreateTenant>(br#"{"id":"a"}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("tier"));
        let e = parse_json::<CreateTenant>(br#"{"id":"a","tier":5}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("tier"));
        let e = parse_json::<CreateTenant>(br#"{"id":"a","tier":"t","overrides":{"rpm":1}}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("overrides.rpm"));
        let e = parse_json::<CreateTenant>(br#"{"id":"a","tier":"t","overrides":{"requests_per_minute":"x"}}"#)
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("overrides.requests_per_minute"));
        let e = parse_json::<SetCredential>(br#"{"secret":["sk-leak-me"]}"#).unwrap_err();
        assert!(!e.message.contains("sk-leak-me"), "{}", e.message);
        let e = parse_json::<CreateTenant>(br#"{"id":"a","tier":"t","enabled":"sk-leak-me"}"#).unwrap_err();
        assert!(!e.message.contains("sk-leak-me"), "{}", e.message);
        assert_eq!(parse_json::<CreateTenant>(b"{").unwrap_err().field.as_deref(), Some("body"));
        assert_eq!(parse_json::<CreateTenant>(br#"["a","t"]"#).unwrap_err().field.as_deref(), Some("body"));
        let e = parse_json::<CreateTenant>(br#"{"id":"a","tier":"t","overrides":[null,null]}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("overrides"));
        let k: crate::registry::model::IssueKey = parse_json(br#"{"label":"a","expires_at":5.0}"#).unwrap();
        assert_eq!(k.expires_at, Some(5));
        assert!(parse_json::<crate::registry::model::IssueKey>(br#"{"label":"a","expires_at":5.5}"#).is_err());
    }
}
