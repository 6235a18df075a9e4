//! What JSON does a binary `google.protobuf.Struct` stand for?
//!
//! Decoding of a binary `google.protobuf.Struct` into JSON.
//!
//! Envoy 1.40 hands a plugin configuration given as a `Struct` to the filter
//! as the Struct's binary protobuf encoding. tollgate accepts that form by
//! turning it into the JSON it stands for.

use prost::Message;
use prost_types::value::Kind;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StructError {
    #[error("not a protobuf Struct: {0}")]
    Decode(String),
    #[error("a number in the Struct is not finite")]
    NonFinite,
    #[error("the Struct is empty")]
    Empty,
}

/// Decodes `bytes` as a `google.protobuf.Struct` and returns its JSON form.
/// Strict, for configuration: an empty Struct or a non-finite number is an
/// error.
pub fn struct_to_json(bytes: &[u8]) -> Result<serde_json::Value, StructError> {
    let s = prost_types::Struct::decode(bytes).map_err(|e| StructError::Decode(e.to_string()))?;
    if s.fields.is_empty() {
        return Err(StructError::Empty);
    }
    Ok(serde_json::Value::Object(fields_to_json(&s, Numbers::Config)?))
}

/// Decodes `bytes` as a `google.protobuf.Struct` of JWT claims (the payload
/// Envoy's `jwt_authn` leaves in dynamic metadata) and returns its fields.
/// Lenient, as a claim the filter never reads must not spoil the others: an
/// empty Struct is an empty map and a non-finite number is `null`. Only bytes
/// that are not a Struct at all are an error.
pub fn struct_to_claims(bytes: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, StructError> {
    let s = prost_types::Struct::decode(bytes).map_err(|e| StructError::Decode(e.to_string()))?;
    fields_to_json(&s, Numbers::Claims)
}

/// How the doubles of a Struct become JSON numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Numbers {
    /// Non-finite numbers are an error.
    Config,
    /// Non-finite numbers are `null`, and `-0` stays a double, as serde_json
    /// reads the JSON text `-0` (so a claim renders the same whether the
    /// filter verified the token or `jwt_authn` did).
    Claims,
}

fn fields_to_json(
    s: &prost_types::Struct,
    numbers: Numbers,
) -> Result<serde_json::Map<String, serde_json::Value>, StructError> {
    let mut map = serde_json::Map::new();
    for (k, v) in &s.fields {
        map.insert(k.clone(), value_to_json(v, numbers)?);
    }
    Ok(map)
}

fn value_to_json(v: &prost_types::Value, numbers: Numbers) -> Result<serde_json::Value, StructError> {
    Ok(match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::NumberValue(n)) => number_to_json(*n, numbers)?,
        Some(Kind::StructValue(s)) => serde_json::Value::Object(fields_to_json(s, numbers)?),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.iter().map(|v| value_to_json(v, numbers)).collect::<Result<_, _>>()?)
        }
    })
}

fn number_to_json(n: f64, numbers: Numbers) -> Result<serde_json::Value, StructError> {
    if !n.is_finite() {
        return match numbers {
            Numbers::Config => Err(StructError::NonFinite),
            Numbers::Claims => Ok(serde_json::Value::Null),
        };
    }
    let negative_zero = n == 0.0 && n.is_sign_negative();
    // Struct numbers are doubles; integral values become JSON integers so
    // fields typed as integers deserialize.
    if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 && !(negative_zero && numbers == Numbers::Claims) {
        Ok(serde_json::Value::from(n as i64))
    } else {
        serde_json::Number::from_f64(n).map(serde_json::Value::Number).ok_or(StructError::NonFinite)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::{ListValue, Struct, Value};

    fn v(kind: Kind) -> Value {
        Value { kind: Some(kind) }
    }

    #[test]
    fn round_trips_nested_struct() {
        let mut inner = Struct::default();
        inner.fields.insert("n".into(), v(Kind::NumberValue(3.0)));
        inner.fields.insert("f".into(), v(Kind::NumberValue(0.5)));
        let mut s = Struct::default();
        s.fields.insert("a".into(), v(Kind::StructValue(inner)));
        s.fields.insert(
            "l".into(),
            v(Kind::ListValue(ListValue { values: vec![v(Kind::StringValue("x".into())), v(Kind::BoolValue(true))] })),
        );
        let json = struct_to_json(&s.encode_to_vec()).unwrap();
        assert_eq!(json, serde_json::json!({"a": {"n": 3, "f": 0.5}, "l": ["x", true]}));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(struct_to_json(b"\xff\xff\xff").is_err());
        assert_eq!(struct_to_json(b""), Err(StructError::Empty));
    }

    #[test]
    fn claims_are_decoded_leniently_with_the_same_number_rules() {
        let mut inner = Struct::default();
        inner.fields.insert("n".into(), v(Kind::NumberValue(42.0)));
        inner.fields.insert("inf".into(), v(Kind::NumberValue(f64::INFINITY)));
        let mut s = Struct::default();
        s.fields.insert("a".into(), v(Kind::StructValue(inner)));
        s.fields.insert("nan".into(), v(Kind::NumberValue(f64::NAN)));
        s.fields.insert("neg0".into(), v(Kind::NumberValue(-0.0)));
        s.fields.insert("half".into(), v(Kind::NumberValue(-0.5)));
        s.fields.insert("big".into(), v(Kind::NumberValue(1e300)));
        s.fields.insert(
            "l".into(),
            v(Kind::ListValue(ListValue {
                values: vec![v(Kind::NumberValue(f64::NEG_INFINITY)), Value { kind: None }],
            })),
        );
        let bytes = s.encode_to_vec();
        let claims = struct_to_claims(&bytes).unwrap();
        assert_eq!(
            serde_json::Value::Object(claims),
            serde_json::json!({
                "a": {"n": 42, "inf": null},
                "nan": null,
                "neg0": -0.0,
                "half": -0.5,
                "big": 1e300,
                "l": [null, null],
            })
        );
        assert!(struct_to_claims(&bytes).unwrap()["neg0"].as_f64().unwrap().is_sign_negative());
        // The same Struct is refused as configuration.
        assert_eq!(struct_to_json(&bytes), Err(StructError::NonFinite));
        let mut zero = Struct::default();
        zero.fields.insert("z".into(), v(Kind::NumberValue(-0.0)));
        assert_eq!(struct_to_json(&zero.encode_to_vec()).unwrap(), serde_json::json!({"z": 0}));
        // Empty is fine for claims, not for configuration; garbage is neither.
        assert_eq!(struct_to_claims(b""), Ok(serde_json::Map::new()));
        assert!(matches!(struct_to_claims(b"\xff\xff\xff"), Err(StructError::Decode(_))));
    }
}
