//! Which forged, confused, tampered, expired, malformed or oversized tokens
//! must be refused, and with which error?

use super::*;

#[test]
fn alg_none_is_always_refused() {
    let mut v = main_verifier();
    let payload = claims().to_string();
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = json!({"alg": alg, "typ": "JWT"});
        let unsigned = format!("{}.{}.", b64(header.to_string().as_bytes()), b64(payload.as_bytes()));
        assert_eq!(code(v.verify(ProviderSelector::Auto, &unsigned, NOW)), "disallowed_algorithm", "{alg}");
        let with_sig = format!("{unsigned}c2ln");
        assert_eq!(code(v.verify(ProviderSelector::Auto, &with_sig, NOW)), "disallowed_algorithm", "{alg}");
    }
    // A real alg with the signature stripped.
    let t = mint(Algorithm::RS256, Some("rsa-1"), &rsa1(), &claims());
    let stripped = &t[..t.rfind('.').expect("dot") + 1];
    assert_eq!(code(v.verify(ProviderSelector::Auto, stripped, NOW)), "bad_signature");
    assert_eq!(v.signature_checks(), 0);
}

#[test]
fn hs256_signed_with_the_rsa_public_key_is_refused() {
    // The classic algorithm confusion: the attacker knows the public key
    // and uses its PEM as an HMAC secret.
    let mut v = main_verifier();
    let forged = mint(Algorithm::HS256, Some("rsa-1"), &EncodingKey::from_secret(RSA1_PUB_PEM), &claims());
    assert_eq!(code(v.verify(ProviderSelector::Auto, &forged, NOW)), "disallowed_algorithm");
    // Even naming the HMAC provider explicitly: its issuer differs.
    assert_eq!(code(v.verify(ProviderSelector::Index(1), &forged, NOW)), "wrong_issuer");
    // And an HMAC-only provider whose secret is not that PEM refuses it.
    let mut c = claims();
    c["iss"] = json!("https://internal.example.test/");
    let forged = mint(Algorithm::HS256, Some("rsa-1"), &EncodingKey::from_secret(RSA1_PUB_PEM), &c);
    assert_eq!(code(v.verify(ProviderSelector::Auto, &forged, NOW)), "bad_signature");
    // The raw DER/JWK forms of the key as secret fare no better.
    let n = b64url(jwks_value(JWKS)["keys"][0]["n"].as_str().expect("n")).expect("n");
    let forged = mint(Algorithm::HS256, Some("rsa-1"), &EncodingKey::from_secret(&n), &claims());
    assert_eq!(code(v.verify(ProviderSelector::Auto, &forged, NOW)), "disallowed_algorithm");
}

#[test]
fn forged_kid_and_embedded_keys_are_refused() {
    let mut v = main_verifier();
    let t = mint(Algorithm::RS256, Some("attacker-key"), &rsa2(), &claims());
    assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW)), "unknown_key_id");
    for kid in ["../../etc/passwd", "rsa-1' OR '1'='1", ""] {
        let t = mint(Algorithm::RS256, Some(kid), &rsa1(), &claims());
        assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW)), "unknown_key_id", "{kid}");
    }
    // `jwk` / `jku` in the header are ignored: only configured keys count.
    let jwk2 = jwks_value(JWKS_ROTATED)["keys"][0].clone();
    let header = json!({"alg": "RS256", "kid": "rsa-1", "jwk": jwk2, "jku": "https://evil.example/jwks"});
    let t = sign_raw(&header, claims().to_string().as_bytes(), &rsa2(), Algorithm::RS256);
    assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW)), "bad_signature");
    // `kid` of the wrong type.
    let header = json!({"alg": "RS256", "kid": 1});
    let t = sign_raw(&header, claims().to_string().as_bytes(), &rsa1(), Algorithm::RS256);
    assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW)), "malformed");
    // Header says PS256, signature is RS256 (same key).
    let header = json!({"alg": "PS256", "kid": "rsa-1"});
    let rs =
        sign_raw(&json!({"alg": "RS256", "kid": "rsa-1"}), claims().to_string().as_bytes(), &rsa1(), Algorithm::RS256);
    let sig = rs.rsplit('.').next().expect("sig");
    let t = format!("{}.{}.{sig}", b64(header.to_string().as_bytes()), b64(claims().to_string().as_bytes()));
    assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW)), "bad_signature");
    // Unknown critical extension.
    let header = json!({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]});
    let t = sign_raw(&header, claims().to_string().as_bytes(), &rsa1(), Algorithm::RS256);
    assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW)), "malformed");
}

#[test]
fn expired_and_not_yet_valid_tokens_are_refused() {
    let mut v = main_verifier();
    let mut c = claims();
    c["exp"] = json!(NOW - 3600);
    let t = mint(Algorithm::EdDSA, Some("ed-1"), &ed25519(), &c);
    let err = v.verify(ProviderSelector::Auto, &t, NOW).expect_err("expired");
    assert_eq!((err.code(), err.http_status()), ("expired", 401));
    let mut c = claims();
    c["nbf"] = json!(NOW + 3600);
    let t = mint(Algorithm::EdDSA, Some("ed-1"), &ed25519(), &c);
    assert_eq!(v.verify(ProviderSelector::Auto, &t, NOW), Err(JwtError::NotYetValid));
    // Neither error is given before the signature checks out.
    let mut c = claims();
    c["exp"] = json!(NOW - 3600);
    let t = mint(Algorithm::EdDSA, Some("ed-1"), &ed25519(), &c);
    let (message, sig) = t.rsplit_once('.').expect("dot");
    let mut raw = URL_SAFE_NO_PAD.decode(sig).expect("sig");
    raw[0] ^= 0x80;
    let forged = format!("{message}.{}", b64(&raw));
    assert_eq!(code(v.verify(ProviderSelector::Auto, &forged, NOW)), "bad_signature");
}

#[test]
fn wrong_issuer_and_wrong_audience_are_refused() {
    let mut v = main_verifier();
    for iss in [json!("https://evil.example/"), json!(null), json!(["x"]), json!(ISS.trim_end_matches('/'))] {
        let mut c = claims();
        c["iss"] = iss.clone();
        let t = mint(Algorithm::RS256, Some("rsa-1"), &rsa1(), &c);
        assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW)), "wrong_issuer", "{iss}");
    }
    let mut c = claims();
    c["aud"] = json!("someone-else");
    let t = mint(Algorithm::RS256, Some("rsa-1"), &rsa1(), &c);
    assert_eq!(v.verify(ProviderSelector::Auto, &t, NOW), Err(JwtError::WrongAudience));
}

#[test]
fn tampered_tokens_are_refused() {
    let mut v = main_verifier();
    for (alg, kid, key) in [
        (Algorithm::RS256, "rsa-1", rsa1()),
        (Algorithm::PS256, "rsa-1", rsa1()),
        (Algorithm::ES256, "ec256-1", ec256()),
        (Algorithm::ES384, "ec384-1", ec384()),
        (Algorithm::EdDSA, "ed-1", ed25519()),
    ] {
        let t = mint(alg, Some(kid), &key, &claims());
        let (message, sig) = t.rsplit_once('.').expect("dot");
        let mut raw = URL_SAFE_NO_PAD.decode(sig).expect("sig");
        raw[3] ^= 0x01;
        let flipped = format!("{message}.{}", b64(&raw));
        assert_eq!(code(v.verify(ProviderSelector::Auto, &flipped, NOW)), "bad_signature", "{alg:?}");
        // Shortened signature.
        let short = format!("{message}.{}", b64(&raw[..raw.len() / 2]));
        assert_eq!(code(v.verify(ProviderSelector::Auto, &short, NOW)), "bad_signature", "{alg:?}");
        // Payload changed, signature kept.
        let mut c = claims();
        c["tenant_id"] = json!("victim");
        let (header, _) = message.split_once('.').expect("dot");
        let swapped = format!("{header}.{}.{sig}", b64(c.to_string().as_bytes()));
        assert_eq!(code(v.verify(ProviderSelector::Auto, &swapped, NOW)), "bad_signature", "{alg:?}");
    }
}

#[test]
fn malformed_tokens_are_refused() {
    let mut v = main_verifier();
    let t = mint(Algorithm::RS256, Some("rsa-1"), &rsa1(), &claims());
    let mut bad: Vec<String> = vec![
        "abc".to_string(),
        "a.b".to_string(),
        "a.b.c.d".to_string(),
        "..".to_string(),
        format!("{t}.extra"),
        t.replacen('.', "..", 1),
        format!("{}!{}", &t[..10], &t[11..]),
        format!("%%%.{}", &t[t.find('.').expect("dot") + 1..]),
        format!("{}.e30", b64(b"not json")),
    ];
    // Truncated at every offset inside the payload.
    let first_dot = t.find('.').expect("dot");
    let second_dot = t.rfind('.').expect("dot");
    for cut in (first_dot + 1..second_dot).step_by(7) {
        bad.push(t[..cut].to_string());
    }
    for token in &bad {
        let c = code(v.verify(ProviderSelector::Auto, token, NOW));
        assert!(c == "malformed" || c == "bad_signature", "{token}: {c}");
    }
    // Truncated signature: still three parts. Cut to a length that is not
    // base64 it is malformed; cut to one that is, the signature fails.
    assert_eq!(code(v.verify(ProviderSelector::Auto, &t[..t.len() - 5], NOW)), "malformed");
    assert_eq!(code(v.verify(ProviderSelector::Auto, &t[..t.len() - 4], NOW)), "bad_signature");

    // Correctly signed, but the payload is not JSON / not an object.
    let header = json!({"alg": "RS256", "kid": "rsa-1"});
    for payload in [&b"not json at all"[..], b"[1,2,3]", b"\"str\"", b"{\"iss\": "] {
        let t = sign_raw(&header, payload, &rsa1(), Algorithm::RS256);
        assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW)), "malformed");
    }
    // Header not JSON.
    let t = format!("{}.{}.{}", b64(b"{alg"), b64(claims().to_string().as_bytes()), b64(b"sig"));
    assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW)), "malformed");
    // Header without alg.
    let t = format!("{}.{}.{}", b64(b"{}"), b64(claims().to_string().as_bytes()), b64(b"sig"));
    assert_eq!(code(v.verify(ProviderSelector::Auto, &t, NOW)), "malformed");
    // Only the well-formed truncated signature reached the crypto.
    assert_eq!(v.signature_checks(), 1);
}

#[test]
fn oversized_and_empty_tokens_are_refused() {
    let mut v = verifier(vec![provider(json!({"max_token_bytes": 2048}))]);
    let mut c = claims();
    c["padding"] = json!("x".repeat(3000));
    let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
    assert_eq!(v.verify(ProviderSelector::Auto, &t, NOW), Err(JwtError::TokenTooLarge { limit: 2048 }));
    assert_eq!(
        v.verify(ProviderSelector::Auto, &"a".repeat(1 << 20), NOW),
        Err(JwtError::TokenTooLarge { limit: 2048 })
    );
    assert_eq!(v.verify(ProviderSelector::Auto, "", NOW), Err(JwtError::MissingToken));
    assert_eq!(v.verify(ProviderSelector::Auto, "  ", NOW), Err(JwtError::MissingToken));
    // The limit of the matched provider applies when providers differ.
    let mut v = verifier(vec![provider(json!({"max_token_bytes": 600})), {
        let mut p = hmac_provider();
        p["max_token_bytes"] = json!(100_000);
        p
    }]);
    let t = mint(Algorithm::ES256, Some("ec256-1"), &ec256(), &c);
    assert_eq!(v.verify(ProviderSelector::Auto, &t, NOW), Err(JwtError::TokenTooLarge { limit: 600 }));
}
