//! Does the verifier accept exactly the tokens it should? Config checks,
//! every algorithm family, key selection, remote keys and rotation, the
//! cache, time claims, claim paths, token extraction and error codes. The
//! tokens an attacker would send are in `tests/attacks.rs`.

use super::jwks::b64url;
use super::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::Algorithm;
use serde_json::Value;

mod attacks;

use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

const NOW: u64 = 1_700_000_000;
const ISS: &str = "https://idp.example.test/";
const AUD: &str = "tollgate";
const HMAC_SECRET: &str = "0123456789abcdef0123456789abcdef-test-only";

const JWKS: &[u8] = include_bytes!("../../../tests/fixtures/jwt/jwks.json");
const JWKS_ROTATED: &[u8] = include_bytes!("../../../tests/fixtures/jwt/jwks_rotated.json");
const JWKS_RSA1_NO_KID: &[u8] = include_bytes!("../../../tests/fixtures/jwt/jwks_rsa1_no_kid.json");
const RSA1_PUB_PEM: &[u8] = include_bytes!("../../../tests/fixtures/jwt/rsa1.pub.pem");

fn rsa1() -> EncodingKey {
    EncodingKey::from_rsa_der(include_bytes!("../../../tests/fixtures/jwt/rsa1.key.der"))
}
fn rsa2() -> EncodingKey {
    EncodingKey::from_rsa_der(include_bytes!("../../../tests/fixtures/jwt/rsa2.key.der"))
}
fn ec256() -> EncodingKey {
    EncodingKey::from_ec_der(include_bytes!("../../../tests/fixtures/jwt/ec256.key.der"))
}
fn ec384() -> EncodingKey {
    EncodingKey::from_ec_der(include_bytes!("../../../tests/fixtures/jwt/ec384.key.der"))
}
fn ed25519() -> EncodingKey {
    EncodingKey::from_ed_der(include_bytes!("../../../tests/fixtures/jwt/ed25519.key.der"))
}

fn claims() -> Value {
    json!({
        "iss": ISS,
        "aud": AUD,
        "sub": "user-1",
        "tenant_id": "acme",
        "iat": NOW - 10,
        "exp": NOW + 600,
    })
}

fn mint(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, key).expect("encode")
}

fn b64(v: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(v)
}

/// Signs arbitrary header and payload bytes, for tokens jsonwebtoken's
/// encoder would not produce.
fn sign_raw(header: &Value, payload: &[u8], key: &EncodingKey, alg: Algorithm) -> String {
    let message = format!("{}.{}", b64(header.to_string().as_bytes()), b64(payload));
    let sig = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).expect("sign");
    format!("{message}.{sig}")
}

fn jwks_value(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("fixture JWKS")
}

fn provider(extra: Value) -> Value {
    let mut p = json!({
        "name": "main",
        "issuers": [ISS],
        "audiences": [AUD],
        "algorithms": ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"],
        "jwks": {"inline": jwks_value(JWKS)},
        "tenant_claim": "tenant_id",
    });
    for (k, v) in extra.as_object().expect("object") {
        p[k] = v.clone();
    }
    p
}

fn hmac_provider() -> Value {
    json!({
        "name": "internal",
        "issuers": ["https://internal.example.test/"],
        "audiences": [AUD],
        "algorithms": ["HS256"],
        "hmac_secret_env": "TOLLGATE_JWT_SECRET",
        "tenant_claim": "tenant_id",
    })
}

fn env(name: &str) -> Option<String> {
    (name == "TOLLGATE_JWT_SECRET").then(|| HMAC_SECRET.to_string())
}

fn config(providers: Vec<Value>) -> JwtConfig {
    serde_json::from_value(json!({ "providers": providers })).expect("config shape")
}

fn verifier(providers: Vec<Value>) -> JwtVerifier {
    config(providers).compile(&env).expect("compile")
}

fn main_verifier() -> JwtVerifier {
    verifier(vec![provider(json!({})), hmac_provider()])
}

fn compile_err(providers: Vec<Value>) -> String {
    config(providers).compile(&env).expect_err("should not compile").to_string()
}

fn code(r: Result<VerifiedIdentity, JwtError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(e) => e.code(),
    }
}

// ---- config ----------------------------------------------------------

#[test]
fn documented_example_config_parses_and_compiles() {
    let text = r#"{
      "providers": [
        {
          "name": "auth0",
          "issuers": ["https://tenant.eu.auth0.com/"],
          "audiences": ["https://api.example.com"],
          "from": "authorization",
          "algorithms": ["RS256"],
          "jwks": {
            "remote": {
              "cluster": "auth0_jwks",
              "path": "/.well-known/jwks.json",
              "authority": "tenant.eu.auth0.com",
              "refresh_interval_s": 600,
              "timeout_ms": 3000
            }
          },
          "leeway_s": 30,
          "max_token_bytes": 8192,
          "tenant_claim": "https://example.com/tenant_id",
          "user_claim": "sub",
          "require_exp": true
        },
        {
          "name": "internal",
          "issuers": ["tollgate-internal"],
          "allow_any_audience": true,
          "from": {"header": {"name": "x-internal-token", "prefix": "Bearer "}},
          "algorithms": ["HS256"],
          "hmac_secret_env": "TOLLGATE_JWT_SECRET",
          "tenant_claim": "app_metadata.tenant_id"
        },
        {
          "name": "static",
          "issuers": ["https://static.example.test/"],
          "audiences": ["tollgate"],
          "from": {"cookie": {"name": "id_token"}},
          "algorithms": ["ES256"],
          "jwks": {"inline": "{\"keys\":[{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU\",\"y\":\"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0\"}]}"},
          "tenant_claim": "tenant_id",
          "user_claim": null
        }
      ],
      "cache_max_entries": 512,
      "cache_max_ttl_s": 120
    }"#;
    let cfg: JwtConfig = serde_json::from_str(text).expect("parse");
    assert_eq!(cfg.providers[1].leeway_s, 60);
    assert_eq!(cfg.providers[1].max_token_bytes, 8192);
    assert_eq!(cfg.providers[1].user_claim.as_deref(), Some("sub"));
    assert!(cfg.providers[1].require_exp);
    assert_eq!(cfg.providers[2].user_claim, None);
    let v = cfg.compile(&env).expect("compile");
    assert_eq!(v.provider_names(), vec!["auth0", "internal", "static"]);
    assert_eq!(v.provider_index("static"), Some(2));
}

#[test]
fn unknown_fields_are_rejected() {
    let mut p = provider(json!({}));
    p["tenant_clam"] = json!("x");
    assert!(serde_json::from_value::<JwtConfig>(json!({"providers": [p]})).is_err());
    let p = provider(json!({"from": {"header": {"name": "x", "prefx": "B "}}}));
    assert!(serde_json::from_value::<JwtConfig>(json!({"providers": [p]})).is_err());
    let p = provider(json!({"jwks": {"remote": {"cluster": "c", "path": "/j", "refresh": 5}}}));
    assert!(serde_json::from_value::<JwtConfig>(json!({"providers": [p]})).is_err());
    assert!(serde_json::from_value::<JwtConfig>(json!({"providers": [], "cache": 1})).is_err());
    let p = provider(json!({"algorithms": ["none"]}));
    assert!(serde_json::from_value::<JwtConfig>(json!({"providers": [p]})).is_err());
}

#[test]
fn compile_errors_name_the_field() {
    let mut hs = hmac_provider();
    hs.as_object_mut().expect("object").remove("hmac_secret_env");
    assert_eq!(compile_err(vec![hs]), "jwt.providers[0].algorithms: HS256 requires hmac_secret_env");

    let mut hs = hmac_provider();
    hs["jwks"] = json!({"inline": jwks_value(JWKS)});
    assert_eq!(
        compile_err(vec![hs]),
        "jwt.providers[0].algorithms: HS256 cannot be combined with jwks; use a separate provider"
    );

    let p = provider(json!({"algorithms": ["RS256", "HS256"], "hmac_secret_env": "TOLLGATE_JWT_SECRET"}));
    assert_eq!(
        compile_err(vec![p]),
        "jwt.providers[0].algorithms: HS256 cannot be combined with RS256; use a separate provider"
    );

    let mut hs = hmac_provider();
    hs["hmac_secret_env"] = json!("NOT_SET");
    assert_eq!(
        compile_err(vec![provider(json!({})), hs]),
        "jwt.providers[1].hmac_secret_env: environment variable `NOT_SET` is not set or is empty"
    );

    let short = config(vec![hmac_provider()]).compile(&|_| Some("short".to_string())).expect_err("short secret");
    assert_eq!(short.path(), "jwt.providers[0].hmac_secret_env");

    let mut hs512 = hmac_provider();
    hs512["algorithms"] = json!(["HS256", "HS512"]);
    // 42 bytes is enough for HS256 but not HS512.
    assert!(compile_err(vec![hs512]).contains("need at least 64"));

    let p = provider(json!({"audiences": []}));
    assert_eq!(compile_err(vec![p]), "jwt.providers[0].audiences: must not be empty unless allow_any_audience is true");
    assert!(verifier(vec![provider(json!({"audiences": [], "allow_any_audience": true}))])
        .provider_index("main")
        .is_some());

    let dup = provider(json!({"name": "other"}));
    assert_eq!(
        compile_err(vec![provider(json!({})), dup]),
        format!("jwt.providers[1].issuers: issuer `{ISS}` is already used by providers[0]")
    );
    let dup = provider(json!({"issuers": ["x"]}));
    assert!(compile_err(vec![provider(json!({})), dup]).starts_with("jwt.providers[1].name: name `main`"));

    assert_eq!(compile_err(vec![]), "jwt.providers: must not be empty");
    assert_eq!(
        compile_err(vec![provider(json!({"algorithms": []}))]),
        "jwt.providers[0].algorithms: must not be empty"
    );
    assert_eq!(compile_err(vec![provider(json!({"issuers": []}))]), "jwt.providers[0].issuers: must not be empty");

    let p = provider(json!({"hmac_secret_env": "TOLLGATE_JWT_SECRET"}));
    assert!(compile_err(vec![p]).starts_with("jwt.providers[0].hmac_secret_env: is set but no HS256"));

    let mut p = provider(json!({}));
    p.as_object_mut().expect("object").remove("jwks");
    assert_eq!(compile_err(vec![p]), "jwt.providers[0].jwks: is required for RS*/PS*/ES*/EdDSA algorithms");

    let p = provider(json!({"jwks": {"inline": {"keys": []}}}));
    assert!(compile_err(vec![p]).starts_with("jwt.providers[0].jwks.inline: JWKS has no usable signing key"));
    let p = provider(json!({"jwks": {"inline": {"nokeys": 1}}}));
    assert!(compile_err(vec![p]).starts_with("jwt.providers[0].jwks.inline: JWKS document is not"));
    let p = provider(json!({"jwks": {"inline": jwks_value(JWKS_ROTATED)}, "algorithms": ["RS256", "ES512x"]}));
    assert!(serde_json::from_value::<JwtConfig>(json!({"providers": [p]})).is_err());
    let p = provider(json!({"jwks": {"inline": jwks_value(JWKS_RSA1_NO_KID)}, "algorithms": ["RS256", "ES256"]}));
    assert_eq!(compile_err(vec![p]), "jwt.providers[0].jwks.inline: no key can verify ES256, which is in algorithms");

    let p = provider(json!({"jwks": {"remote": {"cluster": "idp", "path": "jwks.json"}}}));
    assert_eq!(compile_err(vec![p]), "jwt.providers[0].jwks.remote.path: must start with `/`");
    let p = provider(json!({"jwks": {"remote": {"cluster": "idp", "path": "/j", "refresh_interval_s": 1}}}));
    assert_eq!(compile_err(vec![p]), "jwt.providers[0].jwks.remote.refresh_interval_s: must be at least 10");
    let p = provider(json!({"jwks": {"remote": {"cluster": "", "path": "/j"}}}));
    assert_eq!(compile_err(vec![p]), "jwt.providers[0].jwks.remote.cluster: must not be empty");

    for bad in ["", "a..b", ".a", "a."] {
        let p = provider(json!({"tenant_claim": bad}));
        assert!(compile_err(vec![p]).starts_with("jwt.providers[0].tenant_claim:"), "{bad}");
    }
    let p = provider(json!({"from": {"header": {"name": " "}}}));
    assert_eq!(compile_err(vec![p]), "jwt.providers[0].from.header.name: must not be empty");
}

// ---- algorithm families ------------------------------------------------

#[test]
fn every_rsa_algorithm_verifies() {
    let mut v = main_verifier();
    for alg in
        [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512, Algorithm::PS256, Algorithm::PS384, Algorithm::PS512]
    {
        let token = mint(alg, Some("rsa-1"), &rsa1(), &claims());
        let id = v.verify(ProviderSelector::Auto, &token, NOW).unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(
            id,
            VerifiedIdentity {
                provider: "main".to_string(),
                tenant_id: "acme".to_string(),
                user_id: Some("user-1".to_string()),
                exp: Some(NOW + 600),
            }
        );
    }
    assert_eq!(v.signature_checks(), 6);
}

#[test]
fn ec_ed_and_hmac_verify() {
    let mut v = main_verifier();
    let cases = [
        (Algorithm::ES256, Some("ec256-1"), ec256()),
        (Algorithm::ES384, Some("ec384-1"), ec384()),
        (Algorithm::EdDSA, Some("ed-1"), ed25519()),
        // Only one Ed25519 key in the set: a token without kid is fine.
        (Algorithm::EdDSA, None, ed25519()),
    ];
    for (alg, kid, key) in cases {
        let token = mint(alg, kid, &key, &claims());
        let id = v.verify(ProviderSelector::Auto, &token, NOW).unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(id.tenant_id, "acme");
    }

    let mut c = claims();
    c["iss"] = json!("https://internal.example.test/");
    let token = mint(Algorithm::HS256, None, &EncodingKey::from_secret(HMAC_SECRET.as_bytes()), &c);
    let id = v.verify(ProviderSelector::Auto, &token, NOW).expect("hs256");
    assert_eq!(id.provider, "internal");
    let wrong = mint(Algorithm::HS256, None, &EncodingKey::from_secret(b"another-secret-another-secret-xx"), &c);
    assert_eq!(code(v.verify(ProviderSelector::Auto, &wrong, NOW)), "bad_signature");
    // HS384 is not in that provider's list.
    let hs384 = mint(Algorithm::HS384, None, &EncodingKey::from_secret(HMAC_SECRET.as_bytes()), &c);
    assert_eq!(code(v.verify(ProviderSelector::Auto, &hs384, NOW)), "disallowed_algorithm");
}

#[test]
fn algorithm_not_in_the_provider_list_is_refused() {
    let mut v = verifier(vec![provider(json!({"algorithms": ["ES256"]}))]);
    let token = mint(Algorithm::RS256, Some("rsa-1"), &rsa1(), &claims());
    assert_eq!(v.verify(ProviderSelector::Auto, &token, NOW), Err(JwtError::DisallowedAlgorithm("RS256".to_string())));
    assert_eq!(v.signature_checks(), 0);
}

// ---- key selection -----------------------------------------------------

#[test]
fn kid_selects_the_key() {
    let mut v = main_verifier();
    // EC key ids exist but cannot verify RS256.
    let token = mint(Algorithm::RS256, Some("ec256-1"), &rsa1(), &claims());
    assert_eq!(code(v.verify(ProviderSelector::Auto, &token, NOW)), "unknown_key_id");
    // ES256 with the P-384 key's id: wrong curve for the algorithm.
    let token = mint(Algorithm::ES256, Some("ec384-1"), &ec256(), &claims());
    assert_eq!(code(v.verify(ProviderSelector::Auto, &token, NOW)), "unknown_key_id");
    // rsa-1's id on a token signed by rsa2.
    let token = mint(Algorithm::RS256, Some("rsa-1"), &rsa2(), &claims());
    assert_eq!(code(v.verify(ProviderSelector::Auto, &token, NOW)), "bad_signature");
}

#[test]
fn token_without_kid_needs_exactly_one_candidate_key() {
    let mut v =
        verifier(vec![provider(json!({"jwks": {"inline": jwks_value(JWKS_RSA1_NO_KID)}, "algorithms": ["RS256"]}))]);
    let token = mint(Algorithm::RS256, None, &rsa1(), &claims());
    assert_eq!(code(v.verify(ProviderSelector::Auto, &token, NOW)), "ok");
    // A kid the set does not have is refused even though the set has a
    // kid-less key that would verify.
    let token = mint(Algorithm::RS256, Some("rsa-1"), &rsa1(), &claims());
    assert_eq!(code(v.verify(ProviderSelector::Auto, &token, NOW)), "unknown_key_id");

    // Two RSA keys and no kid: ambiguous.
    let mut two = jwks_value(JWKS_ROTATED);
    let extra = jwks_value(JWKS)["keys"][0].clone();
    two["keys"].as_array_mut().expect("keys").push(extra);
    let mut v = verifier(vec![provider(json!({"jwks": {"inline": two}}))]);
    let token = mint(Algorithm::RS256, None, &rsa1(), &claims());
    assert_eq!(code(v.verify(ProviderSelector::Auto, &token, NOW)), "unknown_key_id");
}

#[test]
fn jwk_alg_pins_the_algorithm() {
    let mut set = jwks_value(JWKS);
    set["keys"][0]["alg"] = json!("PS256");
    // rsa-2 (unpinned) keeps RS256 verifiable, as the config check wants.
    let rsa2_jwk = jwks_value(JWKS_ROTATED)["keys"][0].clone();
    set["keys"].as_array_mut().expect("keys").push(rsa2_jwk);
    let mut v = verifier(vec![provider(json!({"jwks": {"inline": set}}))]);
    let rs = mint(Algorithm::RS256, Some("rsa-1"), &rsa1(), &claims());
    assert_eq!(code(v.verify(ProviderSelector::Auto, &rs, NOW)), "unknown_key_id");
    let ps = mint(Algorithm::PS256, Some("rsa-1"), &rsa1(), &claims());
    assert_eq!(code(v.verify(ProviderSelector::Auto, &ps, NOW)), "ok");
}

#[test]
fn jwks_parsing_skips_unusable_keys() {
    let mut doc = jwks_value(JWKS);
    let keys = doc["keys"].as_array_mut().expect("keys");
    keys.push(json!({"kty": "oct", "kid": "sym", "k": "c2VjcmV0"}));
    keys.push(json!({"kty": "RSA", "kid": "enc", "use": "enc", "n": keys[0]["n"], "e": "AQAB"}));
    keys.push(json!({"kty": "RSA", "kid": "small", "n": b64(&[0xC5; 128]), "e": "AQAB"}));
    keys.push(json!({"kty": "OKP", "kid": "short-ed", "crv": "Ed25519", "x": b64(&[1; 16])}));
    keys.push(json!({"kty": "OKP", "kid": "x448", "crv": "Ed448", "x": b64(&[1; 57])}));
    keys.push(json!({"kty": "EC", "kid": "p521", "crv": "P-521", "x": b64(&[1; 66]), "y": b64(&[1; 66])}));
    keys.push(json!({"kty": "EC", "kid": "short-ec", "crv": "P-256", "x": b64(&[1; 31]), "y": b64(&[1; 32])}));
    keys.push(json!({"kty": "RSA", "kid": "oaep", "alg": "RSA-OAEP", "n": keys[0]["n"], "e": "AQAB"}));
    keys.push(json!({"kty": "RSA", "kid": "hs-alg", "alg": "HS256", "n": keys[0]["n"], "e": "AQAB"}));
    keys.push(
        json!({"kty": "EC", "kid": "mismatch", "alg": "RS256", "crv": "P-256", "x": b64(&[1; 32]), "y": b64(&[1; 32])}),
    );
    keys.push(json!({"kty": "RSA", "kid": "not-b64", "n": "!!!", "e": "AQAB"}));
    keys.push(json!("not an object"));
    let set = parse_jwks(doc.to_string().as_bytes()).expect("parse");
    assert_eq!(set.len(), 4);
    assert_eq!(set.skipped(), 12);
    assert_eq!(set.kids(), vec![Some("rsa-1"), Some("ec256-1"), Some("ec384-1"), Some("ed-1")]);

    assert!(matches!(parse_jwks(b"not json"), Err(JwksError::NotJwks(_))));
    assert!(matches!(parse_jwks(b"[1,2]"), Err(JwksError::NotJwks(_))));
    assert_eq!(parse_jwks(br#"{"keys":[{"kty":"oct","k":"AA"}]}"#), Err(JwksError::NoUsableKeys { skipped: 1 }));
    assert_eq!(parse_jwks(&vec![b' '; MAX_JWKS_BYTES + 1]), Err(JwksError::TooLarge));
}

// ---- remote keys and rotation -----------------------------------------

fn remote_verifier() -> JwtVerifier {
    verifier(vec![provider(json!({
        "jwks": {"remote": {"cluster": "idp", "path": "/.well-known/jwks.json", "refresh_interval_s": 300, "timeout_ms": 2000}}
    }))])
}

#[test]
fn remote_keys_unavailable_until_first_fetch() {
    assert!(!main_verifier().has_remote_jwks());
    let mut with_authority = verifier(vec![provider(json!({
        "jwks": {"remote": {"cluster": "outbound|443||idp", "path": "/keys", "authority": "idp.example.test"}}
    }))]);
    assert!(with_authority.has_remote_jwks());
    let planned = with_authority.plan_jwks_fetches(NOW);
    assert_eq!(
        planned.iter().map(|f| (f.authority.as_str(), f.timeout_ms)).collect::<Vec<_>>(),
        vec![("idp.example.test", 5000)]
    );

    let mut v = remote_verifier();
    let token = mint(Algorithm::RS256, Some("rsa-1"), &rsa1(), &claims());
    let err = v.verify(ProviderSelector::Auto, &token, NOW).expect_err("no keys yet");
    assert_eq!((err.code(), err.http_status()), ("keys_unavailable", 503));

    let fetches = v.plan_jwks_fetches(NOW);
    assert_eq!(
        fetches,
        vec![JwksFetch {
            provider_index: 0,
            cluster: "idp".to_string(),
            path: "/.well-known/jwks.json".to_string(),
            authority: "idp".to_string(),
            timeout_ms: 2000,
        }]
    );
    // In flight: not planned again until the in-flight timeout (2 x 2 s).
    assert!(v.plan_jwks_fetches(NOW + 1).is_empty());
    let outcome = v.complete_jwks_fetch(0, None, None, NOW + 2);
    assert!(matches!(outcome, Some(RefreshOutcome::Failed { kept_last_good: false, .. })));
    assert_eq!(code(v.verify(ProviderSelector::Auto, &token, NOW + 2)), "keys_unavailable");
    // Retry after 5 s backoff.
    assert!(v.plan_jwks_fetches(NOW + 6).is_empty());
    assert_eq!(v.plan_jwks_fetches(NOW + 7).len(), 1);
    assert_eq!(
        v.complete_jwks_fetch(0, Some(200), Some(JWKS), NOW + 7),
        Some(RefreshOutcome::Updated { changed: true })
    );
    assert_eq!(code(v.verify(ProviderSelector::Auto, &token, NOW + 7)), "ok");
}

#[test]
fn rotation_replaces_keys_and_failed_refresh_keeps_the_last_good_ones() {
    let mut v = remote_verifier();
    assert_eq!(v.plan_jwks_fetches(NOW).len(), 1);
    v.complete_jwks_fetch(0, Some(200), Some(JWKS), NOW);
    let old = mint(Algorithm::RS256, Some("rsa-1"), &rsa1(), &claims());
    let new = mint(Algorithm::RS256, Some("rsa-2"), &rsa2(), &claims());
    assert_eq!(code(v.verify(ProviderSelector::Auto, &old, NOW)), "ok");
    assert_eq!(code(v.verify(ProviderSelector::Auto, &new, NOW)), "unknown_key_id");
    assert_eq!(v.cached_tokens(), 1);

    // Not due before the refresh interval.
    assert!(v.plan_jwks_fetches(NOW + 299).is_empty());
    assert_eq!(v.plan_jwks_fetches(NOW + 300).len(), 1);
    // Same keys again: nothing changes, the cache stays.
    assert_eq!(
        v.complete_jwks_fetch(0, Some(200), Some(JWKS), NOW + 300),
        Some(RefreshOutcome::Updated { changed: false })
    );
    assert_eq!(v.cached_tokens(), 1);

    // Rotation: rsa-1 is gone, so its (cached) token is refused.
    assert_eq!(v.plan_jwks_fetches(NOW + 600).len(), 1);
    assert_eq!(
        v.complete_jwks_fetch(0, Some(200), Some(JWKS_ROTATED), NOW + 400),
        Some(RefreshOutcome::Updated { changed: true })
    );
    assert_eq!(v.cached_tokens(), 0);
    assert_eq!(code(v.verify(ProviderSelector::Auto, &old, NOW + 400)), "unknown_key_id");
    assert_eq!(code(v.verify(ProviderSelector::Auto, &new, NOW + 400)), "ok");

    // Failed refreshes (HTTP error, garbage, no response) keep rsa-2.
    assert_eq!(v.plan_jwks_fetches(NOW + 700).len(), 1);
    let failed = v.complete_jwks_fetch(0, Some(503), Some(b"oops"), NOW + 700);
    assert!(matches!(failed, Some(RefreshOutcome::Failed { kept_last_good: true, .. })));
    assert_eq!(v.plan_jwks_fetches(NOW + 705).len(), 1);
    let failed = v.complete_jwks_fetch(0, Some(200), Some(b"<html>"), NOW + 705);
    assert!(matches!(failed, Some(RefreshOutcome::Failed { kept_last_good: true, .. })));
    // Backoff doubles: 5 s, then 10 s.
    assert!(v.plan_jwks_fetches(NOW + 714).is_empty());
    assert_eq!(v.plan_jwks_fetches(NOW + 715).len(), 1);
    v.complete_jwks_fetch(0, None, None, NOW + 715);
    let fresh = mint(
        Algorithm::RS256,
        Some("rsa-2"),
        &rsa2(),
        &json!({"iss": ISS, "aud": AUD, "tenant_id": "t2", "exp": NOW + 2000}),
    );
    assert_eq!(code(v.verify(ProviderSelector::Auto, &fresh, NOW + 716)), "ok");
    assert_eq!(
        v.key_store(0).and_then(KeyStore::keys).map(KeySet::kids),
        Some(vec![Some("rsa-2"), Some("ec256-1"), Some("ec384-1"), Some("ed-1")])
    );
    // Not a remote provider / no such provider.
    assert_eq!(v.complete_jwks_fetch(7, Some(200), Some(JWKS), NOW), None);
}

#[test]
fn key_store_backoff_is_capped_by_the_refresh_interval() {
    let mut s = KeyStore::new(20, 1000);
    assert!(s.is_refresh_due(0));
    let mut now = 0;
    for expected in [5, 10, 20, 20, 20] {
        s.begin_refresh(now);
        s.complete_refresh(Err(JwksError::FetchFailed("x".to_string())), now);
        assert!(!s.is_refresh_due(now + expected - 1));
        assert!(s.is_refresh_due(now + expected));
        now += expected;
    }
    // A host that never answers does not block refreshes forever.
    s.begin_refresh(now);
    assert!(!s.is_refresh_due(now + 1));
    assert!(s.is_refresh_due(now + 2));
}

// ---- cache -------------------------------------------------------------

#[test]
fn cache_hit_skips_the_signature_check_but_not_expiry() {
    let mut v = main_verifier();
    let token = mint(Algorithm::RS256, Some("rsa-1"), &rsa1(), &claims());
    let first = v.verify(ProviderSelector::Auto, &token, NOW).expect("first");
    for t in 0..5 {
        assert_eq!(v.verify(ProviderSelector::Auto, &token, NOW + t), Ok(first.clone()));
    }
    assert_eq!(v.signature_checks(), 1);
    // exp = NOW + 600, leeway 60: fine at +659, expired at +660.
    assert_eq!(code(v.verify(ProviderSelector::Auto, &token, NOW + 250)), "ok");
    assert_eq!(v.signature_checks(), 1);
    // The cache TTL (300 s) forces a re-check after it.
    assert_eq!(code(v.verify(ProviderSelector::Auto, &token, NOW + 301)), "ok");
    assert_eq!(v.signature_checks(), 2);
    assert_eq!(code(v.verify(ProviderSelector::Auto, &token, NOW + 659)), "ok");
    assert_eq!(v.verify(ProviderSelector::Auto, &token, NOW + 660), Err(JwtError::Expired));
    assert_eq!(v.verify(ProviderSelector::Auto, &token, NOW + 660), Err(JwtError::Expired));
}

#[test]
fn cache_respects_an_explicit_provider_and_is_bounded() {
    let mut v = config(vec![provider(json!({})), hmac_provider()]).compile(&env).expect("compile");
    let token = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &claims());
    assert_eq!(code(v.verify(ProviderSelector::Index(0), &token, NOW)), "ok");
    // Cached for provider 0; provider 1 must not get it from the cache.
    assert_eq!(code(v.verify(ProviderSelector::Index(1), &token, NOW)), "wrong_issuer");
    assert_eq!(code(v.verify(ProviderSelector::Index(2), &token, NOW)), "provider_not_configured");

    let mut small: JwtConfig =
        serde_json::from_value(json!({"providers": [provider(json!({}))], "cache_max_entries": 3})).expect("cfg");
    small.cache_max_ttl_s = 1000;
    let mut v = small.compile(&env).expect("compile");
    let tokens: Vec<String> = (0..10)
        .map(|i| {
            let mut c = claims();
            c["tenant_id"] = json!(format!("t{i}"));
            mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c)
        })
        .collect();
    for t in &tokens {
        assert_eq!(code(v.verify(ProviderSelector::Auto, t, NOW)), "ok");
        assert!(v.cached_tokens() <= 3);
    }
    assert_eq!(v.signature_checks(), 10);
    // The newest three are cached, the oldest were evicted.
    for t in &tokens[7..] {
        assert_eq!(code(v.verify(ProviderSelector::Auto, t, NOW)), "ok");
    }
    assert_eq!(v.signature_checks(), 10);
    assert_eq!(code(v.verify(ProviderSelector::Auto, &tokens[0], NOW)), "ok");
    assert_eq!(v.signature_checks(), 11);

    let mut off: JwtConfig =
        serde_json::from_value(json!({"providers": [provider(json!({}))], "cache_max_entries": 0})).expect("cfg");
    off.cache_max_ttl_s = 10;
    let mut v = off.compile(&env).expect("compile");
    v.verify(ProviderSelector::Auto, &tokens[0], NOW).expect("ok");
    v.verify(ProviderSelector::Auto, &tokens[0], NOW).expect("ok");
    assert_eq!((v.signature_checks(), v.cached_tokens()), (2, 0));
}

// ---- time --------------------------------------------------------------

#[test]
fn time_claims_use_the_leeway() {
    let mut v = verifier(vec![provider(json!({"leeway_s": 10}))]);
    let mut c = claims();
    c["exp"] = json!(NOW);
    let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
    assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW + 9)), "ok");
    assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW + 10)), "expired");

    let mut c = claims();
    c["nbf"] = json!(NOW + 100);
    let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
    assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW + 89)), "not_yet_valid");
    assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW + 90)), "ok");

    let mut c = claims();
    c["iat"] = json!(NOW + 100);
    let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
    assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW)), "not_yet_valid");

    // Fractional NumericDate is fine; a string is not.
    let mut c = claims();
    c["exp"] = json!((NOW + 100) as f64 + 0.5);
    let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
    assert_eq!(v.verify(ProviderSelector::Auto, &t, NOW).map(|i| i.exp), Ok(Some(NOW + 100)));
    let mut c = claims();
    c["exp"] = json!("tomorrow");
    let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
    assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW)), "malformed");
}

#[test]
fn exp_is_required_unless_disabled() {
    let mut c = claims();
    c.as_object_mut().expect("object").remove("exp");
    let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
    let mut v = main_verifier();
    assert_eq!(v.verify(ProviderSelector::Auto, &t, NOW), Err(JwtError::Malformed("token has no `exp`")));
    let mut v = verifier(vec![provider(json!({"require_exp": false}))]);
    let id = v.verify(ProviderSelector::Auto, &t, NOW).expect("no exp allowed");
    assert_eq!(id.exp, None);
    // Cached, but only for the cache TTL.
    v.verify(ProviderSelector::Auto, &t, NOW + 299).expect("cached");
    assert_eq!(v.signature_checks(), 1);
    v.verify(ProviderSelector::Auto, &t, NOW + 300).expect("re-verified");
    assert_eq!(v.signature_checks(), 2);
}

// ---- claims ------------------------------------------------------------

#[test]
fn tenant_and_user_claims_by_path() {
    let mut v = verifier(vec![provider(
        json!({"tenant_claim": "app_metadata.tenant_id", "user_claim": "app_metadata.user.id"}),
    )]);
    let mut c = claims();
    c["app_metadata"] = json!({"tenant_id": 42, "user": {"id": "u-9"}});
    let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
    let id = v.verify(ProviderSelector::Auto, &t, NOW).expect("ok");
    assert_eq!((id.tenant_id.as_str(), id.user_id.as_deref()), ("42", Some("u-9")));

    let mut v = verifier(vec![provider(json!({"tenant_claim": "https://example.com/tenant", "user_claim": "email"}))]);
    let mut c = claims();
    c["https://example.com/tenant"] = json!("globex");
    let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
    let id = v.verify(ProviderSelector::Auto, &t, NOW).expect("ok");
    assert_eq!((id.tenant_id.as_str(), id.user_id), ("globex", None));
}

#[test]
fn missing_or_unusable_tenant_claim_is_403() {
    let mut v = main_verifier();
    for bad in [json!(null), json!(""), json!(1.5), json!(["a"]), json!({"id": "a"}), json!(true)] {
        let mut c = claims();
        c["tenant_id"] = bad.clone();
        let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
        let err = v.verify(ProviderSelector::Auto, &t, NOW).expect_err("tenant");
        assert_eq!((err.code(), err.http_status()), ("missing_tenant_claim", 403), "{bad}");
    }
    let mut c = claims();
    c.as_object_mut().expect("object").remove("tenant_id");
    let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
    assert_eq!(v.verify(ProviderSelector::Auto, &t, NOW), Err(JwtError::MissingTenantClaim("tenant_id".to_string())));
}

#[test]
fn audience_may_be_a_string_or_a_list() {
    let mut v = main_verifier();
    for (aud, expected) in [
        (json!(AUD), "ok"),
        (json!(["other", AUD]), "ok"),
        (json!("other"), "wrong_audience"),
        (json!(["other", 7]), "wrong_audience"),
        (json!([]), "wrong_audience"),
        (json!(null), "wrong_audience"),
    ] {
        let mut c = claims();
        c["aud"] = aud.clone();
        let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
        assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW)), expected, "{aud}");
    }
    let mut v = verifier(vec![provider(json!({"audiences": [], "allow_any_audience": true}))]);
    let mut c = claims();
    c.as_object_mut().expect("object").remove("aud");
    let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
    assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW)), "ok");
}

// ---- token extraction ----------------------------------------------------

#[test]
fn token_extraction() {
    let headers = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    };
    let auth = TokenSource::Authorization;
    assert_eq!(
        extract_token(&auth, &headers(&[("authorization", "Bearer abc.def.ghi")])),
        Some("abc.def.ghi".to_string())
    );
    assert_eq!(extract_token(&auth, &headers(&[("authorization", "  bearer   abc ")])), Some("abc".to_string()));
    assert_eq!(extract_token(&auth, &headers(&[("authorization", "Basic dXNlcjpwYXNz")])), None);
    assert_eq!(extract_token(&auth, &headers(&[("authorization", "Bearer")])), None);
    assert_eq!(extract_token(&auth, &headers(&[("authorization", "Bearer ")])), None);
    assert_eq!(extract_token(&auth, &headers(&[])), None);

    let h = TokenSource::Header { name: "X-Token".to_string(), prefix: Some("Token ".to_string()) };
    assert_eq!(extract_token(&h, &headers(&[("x-token", "token a.b.c")])), Some("a.b.c".to_string()));
    assert_eq!(extract_token(&h, &headers(&[("x-token", "a.b.c")])), None);
    assert_eq!(extract_token(&h, &headers(&[("x-token", "é")])), None);
    let h = TokenSource::Header { name: "x-token".to_string(), prefix: None };
    assert_eq!(extract_token(&h, &headers(&[("x-token", " a.b.c ")])), Some("a.b.c".to_string()));

    let c = TokenSource::Cookie { name: "id_token".to_string() };
    assert_eq!(extract_token(&c, &headers(&[("cookie", "a=1; id_token=x.y.z; b=2")])), Some("x.y.z".to_string()));
    assert_eq!(extract_token(&c, &headers(&[("cookie", "xid_token=1; id_token_2=3")])), None);

    let mut v = verifier(vec![provider(json!({"from": {"cookie": {"name": "id_token"}}})), hmac_provider()]);
    let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &claims());
    let cookie = format!("id_token={t}");
    let lookup = |name: &str| (name == "cookie").then(|| cookie.clone());
    assert_eq!(code(v.verify_request(ProviderSelector::Auto, &lookup, NOW)), "ok");
    assert_eq!(code(v.verify_request(ProviderSelector::Index(1), &lookup, NOW)), "missing_token");
    assert_eq!(code(v.verify_request(ProviderSelector::Auto, &|_: &str| None, NOW)), "missing_token");
}

// ---- errors --------------------------------------------------------------

#[test]
fn error_codes_and_statuses_are_stable() {
    let table = [
        (JwtError::Expired, "expired", 401),
        (JwtError::NotYetValid, "not_yet_valid", 401),
        (JwtError::WrongIssuer, "wrong_issuer", 401),
        (JwtError::WrongAudience, "wrong_audience", 401),
        (JwtError::BadSignature, "bad_signature", 401),
        (JwtError::UnknownKeyId, "unknown_key_id", 401),
        (JwtError::MissingTenantClaim("t".to_string()), "missing_tenant_claim", 403),
        (JwtError::DisallowedAlgorithm("none".to_string()), "disallowed_algorithm", 401),
        (JwtError::TokenTooLarge { limit: 1 }, "token_too_large", 401),
        (JwtError::Malformed("x"), "malformed", 401),
        (JwtError::MissingToken, "missing_token", 401),
        (JwtError::KeysUnavailable("p".to_string()), "keys_unavailable", 503),
        (JwtError::ProviderNotConfigured(3), "provider_not_configured", 500),
    ];
    for (err, c, status) in table {
        assert_eq!((err.code(), err.http_status()), (c, status));
    }
    assert_eq!(JwtError::MissingToken.www_authenticate(), Some("Bearer"));
    assert_eq!(JwtError::Expired.www_authenticate(), Some("Bearer error=\"invalid_token\""));
    assert_eq!(JwtError::KeysUnavailable("p".to_string()).www_authenticate(), None);
    // The attacker-chosen alg is cut short in messages.
    let mut v = main_verifier();
    let header = json!({"alg": "x".repeat(500)});
    let t = format!("{}.{}.c2ln", b64(header.to_string().as_bytes()), b64(b"{}"));
    assert_eq!(v.verify(ProviderSelector::Auto, &t, NOW), Err(JwtError::DisallowedAlgorithm("x".repeat(16))));
}
