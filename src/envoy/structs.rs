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
pub fn struct_to_json(bytes: &[u8]) -> Result<serde_json::Value, StructError> {
    let s = prost_types::Struct::decode(bytes).map_err(|e| StructError::Decode(e.to_string()))?;
    if s.fields.is_empty() {
        return Err(StructError::Empty);
    }
    fields_to_json(&s)
}

fn fields_to_json(s: &prost_types::Struct) -> Result<serde_json::Value, StructError> {
    let mut map = serde_json::Map::new();
    for (k, v) in &s.fields {
        map.insert(k.clone(), value_to_json(v)?);
    }
    Ok(serde_json::Value::Object(map))
}

fn value_to_json(v: &prost_types::Value) -> Result<serde_json::Value, StructError> {
    Ok(match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::NumberValue(n)) => {
            // Struct numbers are doubles; integral values become JSON integers
            // so fields typed as integers deserialize.
            if !n.is_finite() {
                return Err(StructError::NonFinite);
            }
            if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
                serde_json::Value::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n)
                    .map(serde_json::Value::Number)
                    .ok_or(StructError::NonFinite)?
            }
        }
        Some(Kind::StructValue(s)) => fields_to_json(s)?,
        Some(Kind::ListValue(l)) => serde_json::Value::Array(
            l.values.iter().map(value_to_json).collect::<Result<_, _>>()?,
        ),
    })
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
            v(Kind::ListValue(ListValue {
                values: vec![v(Kind::StringValue("x".into())), v(Kind::BoolValue(true))],
            })),
        );
        let json = struct_to_json(&s.encode_to_vec()).unwrap();
        assert_eq!(json, serde_json::json!({"a": {"n": 3, "f": 0.5}, "l": ["x", true]}));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(struct_to_json(b"\xff\xff\xff").is_err());
        assert_eq!(struct_to_json(b""), Err(StructError::Empty));
    }
}
