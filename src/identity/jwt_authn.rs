//! Who is calling, when Envoy's own `jwt_authn` filter already verified the
//! token and left its payload in dynamic metadata?

use serde_json::{Map, Value};

use super::jwt::{claim_as_id, numeric_date, ClaimPath, JwtError, VerifiedIdentity};

/// Provider name reported for identities taken from Envoy's `jwt_authn`.
pub const JWT_AUTHN_PROVIDER: &str = "envoy.filters.http.jwt_authn";

/// Extracts tenant and user from a payload that Envoy's `jwt_authn` filter
/// already verified and stored with `payload_in_metadata`.
///
/// The host contexts reads it with `get_property(["metadata", "filter_metadata",
/// "envoy.filters.http.jwt_authn", <payload_in_metadata>])`. Envoy answers a
/// `Struct` value at the end of a property path with the *binary protobuf*
/// of a `google.protobuf.Struct` (its `serializeValue` exports CEL maps that
/// way), so that is what this decodes; JSON text (first byte `{`) is also
/// accepted, for hosts or tests that hand over JSON. Numbers in a `Struct`
/// are doubles, so an integer tenant id `42` arrives as `42.0` and is
/// rendered `"42"`.
///
/// No signature or time checks happen here: that is `jwt_authn`'s job.
pub fn claims_from_jwt_authn_payload(
    payload: &[u8],
    tenant_claim: &str,
    user_claim: Option<&str>,
) -> Result<VerifiedIdentity, JwtError> {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace());
    let claims: Map<String, Value> = if first == Some(&b'{') {
        serde_json::from_slice(payload).map_err(|_| JwtError::Malformed("jwt_authn payload is not a JSON object"))?
    } else {
        crate::envoy::structs::struct_to_claims(payload)
            .map_err(|_| JwtError::Malformed("jwt_authn payload is not a protobuf Struct"))?
    };
    if claims.is_empty() {
        return Err(JwtError::MissingToken);
    }
    let tenant_path =
        ClaimPath::parse(tenant_claim).ok_or_else(|| JwtError::MissingTenantClaim(tenant_claim.to_string()))?;
    let tenant_id = tenant_path
        .lookup(&claims)
        .and_then(claim_as_id)
        .ok_or_else(|| JwtError::MissingTenantClaim(tenant_claim.to_string()))?;
    let user_id = user_claim.and_then(ClaimPath::parse).and_then(|p| p.lookup(&claims).and_then(claim_as_id));
    let exp = numeric_date(&claims, "exp", "`exp` is not a number").ok().flatten();
    Ok(VerifiedIdentity { provider: JWT_AUTHN_PROVIDER.to_string(), tenant_id, user_id, exp })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000;
    const ISS: &str = "https://idp.example.test/";

    fn code(r: Result<VerifiedIdentity, JwtError>) -> &'static str {
        match r {
            Ok(_) => "ok",
            Err(e) => e.code(),
        }
    }

    fn pv(kind: prost_types::value::Kind) -> prost_types::Value {
        prost_types::Value { kind: Some(kind) }
    }

    #[test]
    fn jwt_authn_payload_as_protobuf_struct() {
        use prost::Message as _;
        use prost_types::value::Kind;
        let mut app = prost_types::Struct::default();
        app.fields.insert("tenant_id".to_string(), pv(Kind::NumberValue(42.0)));
        let mut st = prost_types::Struct::default();
        st.fields.insert("iss".to_string(), pv(Kind::StringValue(ISS.to_string())));
        st.fields.insert("sub".to_string(), pv(Kind::StringValue("user-7".to_string())));
        st.fields.insert("exp".to_string(), pv(Kind::NumberValue((NOW + 60) as f64)));
        st.fields.insert("app_metadata".to_string(), pv(Kind::StructValue(app)));
        st.fields.insert(
            "roles".to_string(),
            pv(Kind::ListValue(prost_types::ListValue { values: vec![pv(Kind::NullValue(0))] })),
        );
        let bytes = st.encode_to_vec();
        let id = claims_from_jwt_authn_payload(&bytes, "app_metadata.tenant_id", Some("sub")).expect("claims");
        assert_eq!(
            id,
            VerifiedIdentity {
                provider: JWT_AUTHN_PROVIDER.to_string(),
                tenant_id: "42".to_string(),
                user_id: Some("user-7".to_string()),
                exp: Some(NOW + 60),
            }
        );
        assert_eq!(
            claims_from_jwt_authn_payload(&bytes, "tenant", None),
            Err(JwtError::MissingTenantClaim("tenant".to_string()))
        );
        assert_eq!(code(claims_from_jwt_authn_payload(&[0xff, 0xff, 0xff], "tenant", None)), "malformed");
        assert_eq!(code(claims_from_jwt_authn_payload(&[], "tenant", None)), "missing_token");
    }

    /// A `jwt_authn` payload `Struct` with `tenant` (and any other fields)
    /// set to the given values.
    fn authn_struct(fields: Vec<(&str, prost_types::value::Kind)>) -> Vec<u8> {
        use prost::Message as _;
        let mut st = prost_types::Struct::default();
        for (k, kind) in fields {
            st.fields.insert(k.to_string(), pv(kind));
        }
        st.encode_to_vec()
    }

    #[test]
    fn jwt_authn_struct_numbers_and_values_as_tenant_ids() {
        use prost_types::value::Kind;
        let tenant = |kind: Kind| {
            claims_from_jwt_authn_payload(&authn_struct(vec![("tenant", kind)]), "tenant", None).map(|id| id.tenant_id)
        };
        let missing = Err(JwtError::MissingTenantClaim("tenant".to_string()));
        // Struct numbers are doubles: integral ones are integer ids.
        assert_eq!(tenant(Kind::NumberValue(42.0)), Ok("42".to_string()));
        assert_eq!(tenant(Kind::NumberValue(0.0)), Ok("0".to_string()));
        assert_eq!(tenant(Kind::NumberValue(-7.0)), Ok("-7".to_string()));
        assert_eq!(tenant(Kind::NumberValue(-0.0)), Ok("-0".to_string()));
        assert_eq!(tenant(Kind::NumberValue(9_007_199_254_740_991.0)), Ok("9007199254740991".to_string()));
        assert_eq!(tenant(Kind::NumberValue(9_007_199_254_740_992.0)), Ok("9007199254740992".to_string()));
        assert_eq!(tenant(Kind::NumberValue(-9_007_199_254_740_992.0)), Ok("-9007199254740992".to_string()));
        // Beyond 2^53 a double does not name one integer.
        assert_eq!(tenant(Kind::NumberValue(9_007_199_254_740_994.0)), missing);
        assert_eq!(tenant(Kind::NumberValue(1e300)), missing);
        // Fractions, non-finite numbers and non-scalars are no ids.
        assert_eq!(tenant(Kind::NumberValue(1.5)), missing);
        assert_eq!(tenant(Kind::NumberValue(-0.25)), missing);
        assert_eq!(tenant(Kind::NumberValue(f64::NAN)), missing);
        assert_eq!(tenant(Kind::NumberValue(f64::INFINITY)), missing);
        assert_eq!(tenant(Kind::NumberValue(f64::NEG_INFINITY)), missing);
        assert_eq!(tenant(Kind::StringValue("acme".to_string())), Ok("acme".to_string()));
        assert_eq!(tenant(Kind::StringValue(" 7 ".to_string())), Ok(" 7 ".to_string()));
        assert_eq!(tenant(Kind::StringValue(String::new())), missing);
        assert_eq!(tenant(Kind::BoolValue(true)), missing);
        assert_eq!(tenant(Kind::BoolValue(false)), missing);
        assert_eq!(tenant(Kind::NullValue(0)), missing);
        let mut inner = prost_types::Struct::default();
        inner.fields.insert("id".to_string(), pv(Kind::NumberValue(5.0)));
        assert_eq!(tenant(Kind::StructValue(inner.clone())), missing);
        assert_eq!(
            tenant(Kind::ListValue(prost_types::ListValue { values: vec![pv(Kind::StringValue("acme".to_string()))] })),
            missing
        );
        assert_eq!(tenant(Kind::ListValue(prost_types::ListValue::default())), missing);
        // A dotted path reaches into nested Structs; a whole-name key wins.
        let bytes = authn_struct(vec![
            ("org", Kind::StructValue(inner.clone())),
            ("org.id", Kind::StringValue("whole".to_string())),
        ]);
        assert_eq!(
            claims_from_jwt_authn_payload(&bytes, "org.id", None).map(|id| id.tenant_id),
            Ok("whole".to_string())
        );
        let bytes = authn_struct(vec![("org", Kind::StructValue(inner))]);
        assert_eq!(claims_from_jwt_authn_payload(&bytes, "org.id", None).map(|id| id.tenant_id), Ok("5".to_string()));
    }

    #[test]
    fn jwt_authn_struct_odd_numbers_elsewhere_do_not_spoil_the_payload() {
        use prost_types::value::Kind;
        let with = |user: Kind, exp: Kind| {
            let bytes = authn_struct(vec![
                ("tenant", Kind::StringValue("acme".to_string())),
                ("sub", user),
                ("exp", exp),
                ("score", Kind::NumberValue(f64::NAN)),
                (
                    "weights",
                    Kind::ListValue(prost_types::ListValue {
                        values: vec![pv(Kind::NumberValue(f64::INFINITY)), pv(Kind::NumberValue(0.5))],
                    }),
                ),
            ]);
            claims_from_jwt_authn_payload(&bytes, "tenant", Some("sub")).map(|id| (id.tenant_id, id.user_id, id.exp))
        };
        let acme = || "acme".to_string();
        assert_eq!(
            with(Kind::NumberValue(12.0), Kind::NumberValue((NOW + 60) as f64)),
            Ok((acme(), Some("12".to_string()), Some(NOW + 60)))
        );
        // A fractional `exp` is cut to whole seconds; before 1970 is 0.
        assert_eq!(with(Kind::NumberValue(12.5), Kind::NumberValue(NOW as f64 + 0.75)), Ok((acme(), None, Some(NOW))));
        assert_eq!(with(Kind::BoolValue(true), Kind::NumberValue(-5.0)), Ok((acme(), None, Some(0))));
        // Unusable user and `exp` values are dropped, not errors.
        assert_eq!(with(Kind::NumberValue(f64::NAN), Kind::NumberValue(f64::INFINITY)), Ok((acme(), None, None)));
        assert_eq!(
            with(Kind::StringValue(String::new()), Kind::StringValue("soon".to_string())),
            Ok((acme(), None, None))
        );
        // An empty Struct carries no claims at all.
        assert_eq!(claims_from_jwt_authn_payload(&authn_struct(vec![]), "tenant", None), Err(JwtError::MissingToken));
    }

    #[test]
    fn jwt_authn_payload_as_json() {
        let json = br#" {"tenant_id": "acme", "sub": 12}"#;
        let id = claims_from_jwt_authn_payload(json, "tenant_id", Some("sub")).expect("claims");
        assert_eq!((id.tenant_id.as_str(), id.user_id.as_deref(), id.exp), ("acme", Some("12"), None));
        assert_eq!(code(claims_from_jwt_authn_payload(b"{not json", "tenant_id", None)), "malformed");
    }
}
