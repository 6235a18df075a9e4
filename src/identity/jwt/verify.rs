//! How is a bearer JWT checked, from the request header to a verified
//! identity? The compiled config, token extraction, unverified parsing, and
//! the signature, time, audience and claim checks in order.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::cache::TokenCache;
use super::claims::{claim_as_id, numeric_date, ClaimPath, ProviderSelector, VerifiedIdentity};
use super::config::{JwksSource, JwtAlgorithm, JwtConfig, JwtProvider, RemoteJwks, TokenSource};
use super::error::{JwksError, JwtConfigError, JwtError};
use super::jwks::{keyset_from_value, parse_jwks, KeySet};
use super::keys::{KeyStore, RefreshOutcome};

enum ProviderKeys {
    Hmac(DecodingKey),
    Static(KeySet),
    Remote { remote: RemoteJwks, store: KeyStore },
}

struct CompiledProvider {
    name: String,
    issuers: Vec<String>,
    audiences: Vec<String>,
    allow_any_audience: bool,
    source: TokenSource,
    algorithms: Vec<JwtAlgorithm>,
    keys: ProviderKeys,
    leeway_s: u64,
    max_token_bytes: usize,
    tenant_claim: ClaimPath,
    user_claim: Option<ClaimPath>,
    require_exp: bool,
}

/// A JWKS fetch the host contexts should dispatch (`GET path` to `cluster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksFetch {
    /// Pass back to [`JwtVerifier::complete_jwks_fetch`].
    pub provider_index: usize,
    /// Envoy cluster to send the request to.
    pub cluster: String,
    /// `:path`.
    pub path: String,
    /// `:authority`.
    pub authority: String,
    /// Timeout for the call.
    pub timeout_ms: u64,
}

/// Compiled JWT config plus its per-worker state (remote keys and the
/// verified-token cache). One per Envoy worker (root context).
pub struct JwtVerifier {
    providers: Vec<CompiledProvider>,
    cache: TokenCache,
    max_token_bytes_any: usize,
    signature_checks: u64,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("providers", &self.providers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>())
            .field("cached", &self.cache.len())
            .finish()
    }
}

fn non_empty(path: &str, value: &str) -> Result<(), JwtConfigError> {
    if value.trim().is_empty() {
        return Err(JwtConfigError::Empty { path: path.to_string() });
    }
    Ok(())
}

fn invalid(path: String, reason: impl Into<String>) -> JwtConfigError {
    JwtConfigError::Invalid { path, reason: reason.into() }
}

impl JwtConfig {
    /// Checks the meaning of the config and builds the verifier. `env` reads
    /// environment variables (in the VM: `std::env::var(..).ok()`), for
    /// `hmac_secret_env`. Errors name the field, e.g.
    /// `jwt.providers[0].algorithms: HS256 requires hmac_secret_env`.
    pub fn compile(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<JwtVerifier, JwtConfigError> {
        // jsonwebtoken picks its crypto backend from crate features and
        // installs a panicking one if both backends end up enabled through
        // feature unification. Pin the pure-Rust one (the only one that
        // builds for wasm); an Err only means a provider is already set.
        let _ =
            jsonwebtoken::crypto::CryptoProvider::install_default(&jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER);
        if self.providers.is_empty() {
            return Err(JwtConfigError::Empty { path: "jwt.providers".to_string() });
        }
        let mut providers: Vec<CompiledProvider> = Vec::with_capacity(self.providers.len());
        for (i, p) in self.providers.iter().enumerate() {
            let compiled = compile_provider(i, p, env)?;
            for (j, earlier) in providers.iter().enumerate() {
                if earlier.name == compiled.name {
                    return Err(JwtConfigError::Duplicate {
                        path: format!("jwt.providers[{i}].name"),
                        what: "name",
                        value: compiled.name.clone(),
                        other: j,
                    });
                }
                if let Some(iss) = compiled.issuers.iter().find(|iss| earlier.issuers.contains(iss)) {
                    return Err(JwtConfigError::Duplicate {
                        path: format!("jwt.providers[{i}].issuers"),
                        what: "issuer",
                        value: iss.clone(),
                        other: j,
                    });
                }
            }
            providers.push(compiled);
        }
        let max_token_bytes_any = providers.iter().map(|p| p.max_token_bytes).max().unwrap_or(0);
        Ok(JwtVerifier {
            providers,
            cache: TokenCache::new(self.cache_max_entries, self.cache_max_ttl_s),
            max_token_bytes_any,
            signature_checks: 0,
        })
    }
}

fn compile_provider(
    i: usize,
    p: &JwtProvider,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<CompiledProvider, JwtConfigError> {
    let at = |field: &str| format!("jwt.providers[{i}].{field}");
    non_empty(&at("name"), &p.name)?;
    if p.issuers.is_empty() {
        return Err(JwtConfigError::Empty { path: at("issuers") });
    }
    for (k, iss) in p.issuers.iter().enumerate() {
        non_empty(&at(&format!("issuers[{k}]")), iss)?;
    }
    if p.audiences.is_empty() && !p.allow_any_audience {
        return Err(invalid(at("audiences"), "must not be empty unless allow_any_audience is true"));
    }
    for (k, aud) in p.audiences.iter().enumerate() {
        non_empty(&at(&format!("audiences[{k}]")), aud)?;
    }
    match &p.from {
        TokenSource::Authorization => {}
        TokenSource::Header { name, prefix } => {
            non_empty(&at("from.header.name"), name)?;
            if prefix.as_deref() == Some("") {
                return Err(invalid(at("from.header.prefix"), "must not be empty; omit it instead"));
            }
        }
        TokenSource::Cookie { name } => non_empty(&at("from.cookie.name"), name)?,
    }
    if p.max_token_bytes == 0 {
        return Err(invalid(at("max_token_bytes"), "must be greater than 0"));
    }
    let tenant_claim = ClaimPath::parse(&p.tenant_claim).ok_or_else(|| {
        invalid(at("tenant_claim"), "must be a dotted claim path like `tenant_id` or `app_metadata.tenant_id`")
    })?;
    let user_claim = match &p.user_claim {
        None => None,
        Some(c) => Some(
            ClaimPath::parse(c).ok_or_else(|| invalid(at("user_claim"), "must be a dotted claim path like `sub`"))?,
        ),
    };

    if p.algorithms.is_empty() {
        return Err(JwtConfigError::Empty { path: at("algorithms") });
    }
    let mut algorithms: Vec<JwtAlgorithm> = Vec::new();
    for a in &p.algorithms {
        if !algorithms.contains(a) {
            algorithms.push(*a);
        }
    }
    let hmac_alg = algorithms.iter().copied().find(|a| a.is_hmac());
    let asym_alg = algorithms.iter().copied().find(|a| !a.is_hmac());

    let keys = match hmac_alg {
        Some(h) => {
            if let Some(a) = asym_alg {
                return Err(JwtConfigError::HmacMixed {
                    path: at("algorithms"),
                    alg: h.as_str(),
                    other: a.as_str().to_string(),
                });
            }
            if p.jwks.is_some() {
                return Err(JwtConfigError::HmacMixed {
                    path: at("algorithms"),
                    alg: h.as_str(),
                    other: "jwks".to_string(),
                });
            }
            let var = p
                .hmac_secret_env
                .as_deref()
                .ok_or(JwtConfigError::HmacWithoutSecret { path: at("algorithms"), alg: h.as_str() })?;
            non_empty(&at("hmac_secret_env"), var)?;
            let secret = env(var)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| JwtConfigError::MissingEnv { path: at("hmac_secret_env"), var: var.to_string() })?;
            let needed = algorithms.iter().map(|a| a.hmac_min_secret_bytes()).max().unwrap_or(32);
            if secret.len() < needed {
                return Err(invalid(
                    at("hmac_secret_env"),
                    format!(
                        "the secret in `{var}` is {} bytes; the allowed algorithms need at least {needed}",
                        secret.len()
                    ),
                ));
            }
            ProviderKeys::Hmac(DecodingKey::from_secret(secret.as_bytes()))
        }
        None => {
            if p.hmac_secret_env.is_some() {
                return Err(invalid(at("hmac_secret_env"), "is set but no HS256/HS384/HS512 algorithm is allowed"));
            }
            match &p.jwks {
                None => return Err(invalid(at("jwks"), "is required for RS*/PS*/ES*/EdDSA algorithms")),
                Some(JwksSource::Inline(doc)) => {
                    let path = at("jwks.inline");
                    let set = match doc {
                        Value::String(text) => parse_jwks(text.as_bytes()),
                        other => keyset_from_value(other),
                    }
                    .map_err(|source| JwtConfigError::Jwks { path: path.clone(), source })?;
                    if let Some(a) = algorithms.iter().find(|a| !set.supports(**a)) {
                        // Not fatal in the protocol, but an allowed algorithm
                        // that no key can verify is almost surely a mistake.
                        return Err(invalid(path, format!("no key can verify {}, which is in algorithms", a.as_str())));
                    }
                    ProviderKeys::Static(set)
                }
                Some(JwksSource::Remote(r)) => {
                    non_empty(&at("jwks.remote.cluster"), &r.cluster)?;
                    if !r.path.starts_with('/') {
                        return Err(invalid(at("jwks.remote.path"), "must start with `/`"));
                    }
                    if let Some(a) = &r.authority {
                        non_empty(&at("jwks.remote.authority"), a)?;
                    }
                    if r.refresh_interval_s < 10 {
                        return Err(invalid(at("jwks.remote.refresh_interval_s"), "must be at least 10"));
                    }
                    if r.timeout_ms == 0 || r.timeout_ms > 60_000 {
                        return Err(invalid(at("jwks.remote.timeout_ms"), "must be between 1 and 60000"));
                    }
                    ProviderKeys::Remote { remote: r.clone(), store: KeyStore::new(r.refresh_interval_s, r.timeout_ms) }
                }
            }
        }
    };

    Ok(CompiledProvider {
        name: p.name.clone(),
        issuers: p.issuers.clone(),
        audiences: p.audiences.clone(),
        allow_any_audience: p.allow_any_audience,
        source: p.from.clone(),
        algorithms,
        keys,
        leeway_s: p.leeway_s,
        max_token_bytes: p.max_token_bytes,
        tenant_claim,
        user_claim,
        require_exp: p.require_exp,
    })
}

/// Reads the token for `source` through `header` (a lookup of a request
/// header by lowercase name). `None` when absent or empty.
pub fn extract_token(source: &TokenSource, header: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let token = match source {
        TokenSource::Authorization => {
            let value = header("authorization")?;
            let value = value.trim();
            let (scheme, rest) = value.split_once(' ')?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return None;
            }
            rest.trim().to_string()
        }
        TokenSource::Header { name, prefix } => {
            let value = header(&name.to_ascii_lowercase())?;
            let value = value.trim();
            match prefix {
                None => value.to_string(),
                Some(prefix) => {
                    let head = value.get(..prefix.len())?;
                    if !head.eq_ignore_ascii_case(prefix) {
                        return None;
                    }
                    value.get(prefix.len()..)?.trim().to_string()
                }
            }
        }
        TokenSource::Cookie { name } => {
            let cookies = header("cookie")?;
            cookies.split(';').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                (k.trim() == name).then(|| v.trim().trim_matches('"').to_string())
            })?
        }
    };
    (!token.is_empty()).then_some(token)
}

struct Parsed<'a> {
    alg: JwtAlgorithm,
    kid: Option<String>,
    claims: Map<String, Value>,
    token: &'a str,
}

fn is_b64url_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Splits and decodes a compact JWS without verifying it.
fn parse_unverified(token: &str) -> Result<Parsed<'_>, JwtError> {
    if !token.bytes().all(|b| is_b64url_char(b) || b == b'.') {
        return Err(JwtError::Malformed("token contains characters outside base64url"));
    }
    let mut parts = token.split('.');
    let (header_b64, payload_b64, sig_b64) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s), None) => (h, p, s),
        _ => return Err(JwtError::Malformed("token must have three dot-separated parts")),
    };
    if header_b64.is_empty() || payload_b64.is_empty() {
        return Err(JwtError::Malformed("empty header or payload"));
    }
    let header_bytes =
        URL_SAFE_NO_PAD.decode(header_b64).map_err(|_| JwtError::Malformed("header is not base64url"))?;
    let header: Map<String, Value> =
        serde_json::from_slice(&header_bytes).map_err(|_| JwtError::Malformed("header is not a JSON object"))?;
    let alg_name = header.get("alg").and_then(Value::as_str).ok_or(JwtError::Malformed("header has no `alg`"))?;
    let alg = JwtAlgorithm::from_name(alg_name)
        .ok_or_else(|| JwtError::DisallowedAlgorithm(alg_name.chars().take(16).collect()))?;
    if sig_b64.is_empty() {
        // An unsigned token dressed up with a real `alg`.
        return Err(JwtError::BadSignature);
    }
    if URL_SAFE_NO_PAD.decode(sig_b64).is_err() {
        return Err(JwtError::Malformed("signature is not base64url"));
    }
    if header.contains_key("crit") {
        // RFC 7515 4.1.11: extensions we do not understand must be refused.
        return Err(JwtError::Malformed("header has unsupported `crit` extensions"));
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(JwtError::Malformed("`kid` is not a string")),
    };
    let payload_bytes =
        URL_SAFE_NO_PAD.decode(payload_b64).map_err(|_| JwtError::Malformed("payload is not base64url"))?;
    let claims: Map<String, Value> =
        serde_json::from_slice(&payload_bytes).map_err(|_| JwtError::Malformed("payload is not a JSON object"))?;
    Ok(Parsed { alg, kid, claims, token })
}

fn map_jsonwebtoken_error(e: &jsonwebtoken::errors::Error) -> JwtError {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm => JwtError::DisallowedAlgorithm("(key mismatch)".to_string()),
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
            JwtError::Malformed("token rejected by the JWS decoder")
        }
        // Wrong signature, or a key the backend cannot use for it.
        _ => JwtError::BadSignature,
    }
}

impl JwtVerifier {
    /// Names of the providers, in config order (index = position).
    pub fn provider_names(&self) -> Vec<&str> {
        self.providers.iter().map(|p| p.name.as_str()).collect()
    }

    /// Index of the provider called `name`.
    pub fn provider_index(&self, name: &str) -> Option<usize> {
        self.providers.iter().position(|p| p.name == name)
    }

    /// How many signature checks were run (cache hits do not count).
    pub fn signature_checks(&self) -> u64 {
        self.signature_checks
    }

    /// Number of tokens in the verified-token cache.
    pub fn cached_tokens(&self) -> usize {
        self.cache.len()
    }

    /// Finds the token in the request: for `Index(i)` where provider `i`
    /// reads it; for `Auto`, the first source (in provider order) that has
    /// one.
    pub fn extract_token(&self, selector: ProviderSelector, header: &dyn Fn(&str) -> Option<String>) -> Option<String> {
        match selector {
            ProviderSelector::Index(i) => extract_token(&self.providers.get(i)?.source, header),
            ProviderSelector::Auto => {
                let mut tried: Vec<&TokenSource> = Vec::new();
                for p in &self.providers {
                    if tried.contains(&&p.source) {
                        continue;
                    }
                    tried.push(&p.source);
                    if let Some(t) = extract_token(&p.source, header) {
                        return Some(t);
                    }
                }
                None
            }
        }
    }

    /// [`Self::extract_token`] then [`Self::verify`]; no token is
    /// `MissingToken`.
    pub fn verify_request(
        &mut self,
        selector: ProviderSelector,
        header: &dyn Fn(&str) -> Option<String>,
        now_unix_s: u64,
    ) -> Result<VerifiedIdentity, JwtError> {
        let token = self.extract_token(selector, header).ok_or(JwtError::MissingToken)?;
        self.verify(selector, &token, now_unix_s)
    }

    /// Verifies a compact JWS at time `now_unix_s` and extracts the identity.
    /// Repeated tokens are answered from the cache (still checked against
    /// `now` for expiry) without another signature check.
    pub fn verify(
        &mut self,
        selector: ProviderSelector,
        token: &str,
        now_unix_s: u64,
    ) -> Result<VerifiedIdentity, JwtError> {
        if let ProviderSelector::Index(i) = selector {
            if i >= self.providers.len() {
                return Err(JwtError::ProviderNotConfigured(i));
            }
        }
        let token = token.trim();
        if token.is_empty() {
            return Err(JwtError::MissingToken);
        }
        if token.len() > self.max_token_bytes_any {
            return Err(JwtError::TokenTooLarge { limit: self.max_token_bytes_any });
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(hit) = self.cache.lookup(&digest, selector, now_unix_s) {
            return Ok(hit);
        }

        let parsed = parse_unverified(token)?;
        let iss = parsed.claims.get("iss").and_then(Value::as_str).ok_or(JwtError::WrongIssuer)?;
        let index = match selector {
            ProviderSelector::Index(i) => i,
            ProviderSelector::Auto => {
                self.providers.iter().position(|p| p.issuers.iter().any(|x| x == iss)).ok_or(JwtError::WrongIssuer)?
            }
        };
        let provider = self.providers.get(index).ok_or(JwtError::ProviderNotConfigured(index))?;
        if !provider.issuers.iter().any(|x| x == iss) {
            return Err(JwtError::WrongIssuer);
        }
        if token.len() > provider.max_token_bytes {
            return Err(JwtError::TokenTooLarge { limit: provider.max_token_bytes });
        }
        if !provider.algorithms.contains(&parsed.alg) {
            return Err(JwtError::DisallowedAlgorithm(parsed.alg.as_str().to_string()));
        }
        let key = match &provider.keys {
            ProviderKeys::Hmac(secret) => secret,
            ProviderKeys::Static(set) => set.select(parsed.kid.as_deref(), parsed.alg)?,
            ProviderKeys::Remote { store, .. } => match store.keys() {
                Some(set) => set.select(parsed.kid.as_deref(), parsed.alg)?,
                None => return Err(JwtError::KeysUnavailable(provider.name.clone())),
            },
        };

        // Pinned to the one algorithm already checked against the allow-list
        // and the key's type; jsonwebtoken checks it again against the
        // header. Its clock-based checks are off: time comes from the caller.
        let mut validation = Validation::new(parsed.alg.to_jsonwebtoken());
        validation.algorithms = vec![parsed.alg.to_jsonwebtoken()];
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        validation.leeway = 0;
        self.signature_checks = self.signature_checks.saturating_add(1);
        jsonwebtoken::decode::<Value>(parsed.token, key, &validation).map_err(|e| map_jsonwebtoken_error(&e))?;

        let claims = &parsed.claims;
        let leeway = provider.leeway_s;
        let exp = numeric_date(claims, "exp", "`exp` is not a number")?;
        let nbf = numeric_date(claims, "nbf", "`nbf` is not a number")?;
        let iat = numeric_date(claims, "iat", "`iat` is not a number")?;
        match exp {
            None if provider.require_exp => return Err(JwtError::Malformed("token has no `exp`")),
            Some(exp) if now_unix_s >= exp.saturating_add(leeway) => return Err(JwtError::Expired),
            _ => {}
        }
        for not_before in [nbf, iat].into_iter().flatten() {
            if now_unix_s.saturating_add(leeway) < not_before {
                return Err(JwtError::NotYetValid);
            }
        }
        if !provider.allow_any_audience {
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => provider.audiences.contains(a),
                Some(Value::Array(list)) => {
                    list.iter().filter_map(Value::as_str).any(|a| provider.audiences.iter().any(|x| x == a))
                }
                _ => false,
            };
            if !ok {
                return Err(JwtError::WrongAudience);
            }
        }
        let tenant_id = provider
            .tenant_claim
            .lookup(claims)
            .and_then(claim_as_id)
            .ok_or_else(|| JwtError::MissingTenantClaim(provider.tenant_claim.whole.clone()))?;
        let user_id = provider.user_claim.as_ref().and_then(|c| c.lookup(claims)).and_then(claim_as_id);
        let identity = VerifiedIdentity { provider: provider.name.clone(), tenant_id, user_id, exp };
        let expires_at = exp.map(|e| e.saturating_add(leeway));
        self.cache.insert(digest, index, identity.clone(), expires_at, now_unix_s);
        Ok(identity)
    }

    /// Whether any provider fetches its keys remotely, i.e. whether the host contexts
    /// needs a tick to call [`Self::plan_jwks_fetches`].
    pub fn has_remote_jwks(&self) -> bool {
        self.providers.iter().any(|p| matches!(p.keys, ProviderKeys::Remote { .. }))
    }

    /// Remote JWKS fetches due at `now`, marked as in flight. The host contexts
    /// dispatches each (HTTP GET through the cluster) and reports the result
    /// with [`Self::complete_jwks_fetch`], including when dispatching fails.
    /// Call it from a tick (once a second is plenty) and right after
    /// configuration; each worker fetches for itself, as each has its own VM.
    pub fn plan_jwks_fetches(&mut self, now_unix_s: u64) -> Vec<JwksFetch> {
        let mut due = Vec::new();
        for (provider_index, p) in self.providers.iter_mut().enumerate() {
            if let ProviderKeys::Remote { remote, store } = &mut p.keys {
                if store.is_refresh_due(now_unix_s) {
                    store.begin_refresh(now_unix_s);
                    due.push(JwksFetch {
                        provider_index,
                        cluster: remote.cluster.clone(),
                        path: remote.path.clone(),
                        authority: remote.authority.clone().unwrap_or_else(|| remote.cluster.clone()),
                        timeout_ms: remote.timeout_ms,
                    });
                }
            }
        }
        due
    }

    /// Reports a JWKS fetch: `http_status` is `None` when the call failed
    /// (timeout, reset, dispatch error). A 200 with a usable document
    /// replaces the keys; anything else keeps the last good keys. When the
    /// keys change, cached tokens of that provider are dropped.
    pub fn complete_jwks_fetch(
        &mut self,
        provider_index: usize,
        http_status: Option<u32>,
        body: Option<&[u8]>,
        now_unix_s: u64,
    ) -> Option<RefreshOutcome> {
        let provider = self.providers.get_mut(provider_index)?;
        let ProviderKeys::Remote { store, .. } = &mut provider.keys else {
            return None;
        };
        let result = match (http_status, body) {
            (Some(200), Some(body)) => parse_jwks(body),
            (Some(200), None) => Err(JwksError::FetchFailed("empty body".to_string())),
            (Some(status), _) => Err(JwksError::FetchFailed(format!("HTTP status {status}"))),
            (None, _) => Err(JwksError::FetchFailed("no response".to_string())),
        };
        let outcome = store.complete_refresh(result, now_unix_s);
        if outcome == (RefreshOutcome::Updated { changed: true }) {
            self.cache.remove_provider(provider_index);
        }
        Some(outcome)
    }

    /// The remote key store of a provider (for status reporting and tests).
    pub fn key_store(&self, provider_index: usize) -> Option<&KeyStore> {
        match &self.providers.get(provider_index)?.keys {
            ProviderKeys::Remote { store, .. } => Some(store),
            _ => None,
        }
    }
}
