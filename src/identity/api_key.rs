//! Which tenant does a client API key belong to?
//!
//! Tenant identity from a client API key.
//!
//! The key is read from the configured headers (or query parameter), hashed
//! with SHA-256 and looked up in the digest index built at configure time. The
//! plain key is never stored, and nothing the client says about its own tenant
//! is believed.

use sha2::{Digest, Sha256};

use crate::config::{Plugin, Tenant};
use crate::llm::Refusal;

/// Request headers as the host gives them: lower-case names.
pub type Headers = [(String, String)];

/// Returns the first value of header `name` (case-insensitive).
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// Value of query parameter `name` in `path`, percent-decoding not applied
/// (API keys are URL-safe).
pub fn query_param<'a>(path: &'a str, name: &str) -> Option<&'a str> {
    let query = path.split_once('?')?.1;
    let query = query.split('#').next().unwrap_or(query);
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// The client key from the configured sources, if any.
///
/// `authorization` must use the Bearer scheme; any other scheme counts as no
/// key. Sources are tried in configuration order; an empty value is skipped.
pub fn client_key<'a>(plugin: &Plugin, headers: &'a Headers, path: &'a str) -> Option<&'a str> {
    for name in &plugin.client_key_headers {
        let Some(value) = header(headers, name) else {
            continue;
        };
        let value = value.trim();
        let key = if name == "authorization" {
            match value.split_once(' ') {
                Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
                _ => continue,
            }
        } else {
            value
        };
        if !key.is_empty() {
            return Some(key);
        }
    }
    let param = plugin.client_key_query_param.as_deref()?;
    query_param(path, param).filter(|k| !k.is_empty())
}

/// SHA-256 of a client key, as stored in the configuration.
pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Resolves the tenant of a request from its API key.
pub fn resolve<'p>(plugin: &'p Plugin, headers: &Headers, path: &str) -> Result<&'p Tenant, Refusal> {
    let key = client_key(plugin, headers, path).ok_or(Refusal::MissingApiKey)?;
    let tenant = plugin.tenant_by_key_digest(&digest(key)).ok_or(Refusal::InvalidApiKey)?;
    if !tenant.enabled {
        return Err(Refusal::TenantDisabled);
    }
    Ok(tenant)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{sample, KEY_A, KEY_B, KEY_OFF};

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn bearer_key_resolves_tenant() {
        let p = sample();
        let hs = h(&[("authorization", &format!("Bearer {KEY_A}"))]);
        assert_eq!(resolve(&p, &hs, "/v1/chat/completions").unwrap().id, "acme");
    }

    #[test]
    fn each_key_header_works() {
        let p = sample();
        for name in ["x-api-key", "api-key", "x-goog-api-key"] {
            let hs = h(&[(name, KEY_B)]);
            assert_eq!(resolve(&p, &hs, "/").unwrap().id, "globex", "{name}");
        }
    }

    #[test]
    fn query_key_works_for_gemini_clients() {
        let p = sample();
        let path = format!("/v1beta/models/g:generateContent?alt=sse&key={KEY_A}");
        assert_eq!(resolve(&p, &[], &path).unwrap().id, "acme");
    }

    #[test]
    fn missing_unknown_disabled() {
        let p = sample();
        assert_eq!(resolve(&p, &[], "/").unwrap_err(), Refusal::MissingApiKey);
        let basic = h(&[("authorization", "Basic abc")]);
        assert_eq!(resolve(&p, &basic, "/").unwrap_err(), Refusal::MissingApiKey);
        let unknown = h(&[("x-api-key", "sk-nope")]);
        assert_eq!(resolve(&p, &unknown, "/").unwrap_err(), Refusal::InvalidApiKey);
        let off = h(&[("x-api-key", KEY_OFF)]);
        assert_eq!(resolve(&p, &off, "/").unwrap_err(), Refusal::TenantDisabled);
    }

    #[test]
    fn client_tenant_header_is_not_identity() {
        let p = sample();
        let hs = h(&[("x-tollgate-tenant", "acme")]);
        assert_eq!(resolve(&p, &hs, "/").unwrap_err(), Refusal::MissingApiKey);
    }

    #[test]
    fn query_param_parsing() {
        assert_eq!(query_param("/a?key=1&b=2", "key"), Some("1"));
        assert_eq!(query_param("/a?b=2&key=", "key"), Some(""));
        assert_eq!(query_param("/a?bkey=2", "key"), None);
        assert_eq!(query_param("/a", "key"), None);
    }
}
