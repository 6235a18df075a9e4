//! Which RLS v3 messages, with which field numbers, go between filter and service?
//!
//! `envoy-types` cannot build for wasm32, so the few messages the filter needs
//! are declared here by hand, with their field numbers; a native test checks
//! them against `envoy-types`. The service itself decodes with `envoy-types`
//! (it needs the tonic server), so these declarations are what the filter puts
//! on the wire and reads back.

/// The gRPC service the filter calls.
pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
/// Its one method.
pub const METHOD: &str = "ShouldRateLimit";

/// `RateLimitResponse.Code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Code {
    Unknown = 0,
    Ok = 1,
    OverLimit = 2,
}

/// `RateLimitDescriptor.Entry`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Entry {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `RateLimitDescriptor.RateLimitOverride`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LimitOverride {
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    /// A [`crate::Unit`] by its RLS v3 number (`RateLimitUnit`; an enum is
    /// an int32 on the wire).
    #[prost(int32, tag = "2")]
    pub unit: i32,
}

/// `google.protobuf.UInt64Value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UInt64Value {
    #[prost(uint64, tag = "1")]
    pub value: u64,
}

/// `RateLimitDescriptor`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Descriptor {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<Entry>,
    #[prost(message, optional, tag = "2")]
    pub limit: Option<LimitOverride>,
    #[prost(message, optional, tag = "3")]
    pub hits_addend: Option<UInt64Value>,
    #[prost(bool, tag = "4")]
    pub is_negative_hits: bool,
}

/// `RateLimitRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimitRequest {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(message, repeated, tag = "2")]
    pub descriptors: Vec<Descriptor>,
    #[prost(uint32, tag = "3")]
    pub hits_addend: u32,
}

/// `RateLimitResponse.RateLimit`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimit {
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    #[prost(int32, tag = "2")]
    pub unit: i32,
    #[prost(string, tag = "3")]
    pub name: String,
}

/// `google.protobuf.Duration`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Duration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl Duration {
    /// Whole milliseconds, rounded up; negative parts count as zero.
    pub fn as_millis(&self) -> u64 {
        let s = u64::try_from(self.seconds).unwrap_or(0);
        let n = u64::try_from(self.nanos).unwrap_or(0);
        s.saturating_mul(1000).saturating_add(n.div_ceil(1_000_000))
    }
}

/// `RateLimitResponse.DescriptorStatus`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DescriptorStatus {
    #[prost(enumeration = "Code", tag = "1")]
    pub code: i32,
    #[prost(message, optional, tag = "2")]
    pub current_limit: Option<RateLimit>,
    #[prost(uint32, tag = "3")]
    pub limit_remaining: u32,
    #[prost(message, optional, tag = "4")]
    pub duration_until_reset: Option<Duration>,
}

/// `RateLimitResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimitResponse {
    #[prost(enumeration = "Code", tag = "1")]
    pub overall_code: i32,
    #[prost(message, repeated, tag = "2")]
    pub statuses: Vec<DescriptorStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Unit;
    use prost::Message;

    #[test]
    fn request_matches_envoy_types_field_numbers() {
        use envoy_types::pb::envoy::service::ratelimit::v3 as pb;
        let ours = RateLimitRequest {
            domain: "tollgate".into(),
            descriptors: vec![Descriptor {
                entries: vec![Entry { key: "tenant".into(), value: "acme".into() }],
                limit: Some(LimitOverride { requests_per_unit: 7, unit: Unit::Minute as i32 }),
                hits_addend: Some(UInt64Value { value: 42 }),
                is_negative_hits: true,
            }],
            hits_addend: 3,
        };
        let theirs = pb::RateLimitRequest::decode(ours.encode_to_vec().as_slice()).unwrap();
        assert_eq!(theirs.domain, "tollgate");
        assert_eq!(theirs.hits_addend, 3);
        let d = &theirs.descriptors[0];
        assert_eq!(d.entries[0].key, "tenant");
        assert_eq!(d.entries[0].value, "acme");
        let limit = d.limit.as_ref().unwrap();
        assert_eq!((limit.requests_per_unit, limit.unit), (7, 2));
        assert_eq!(d.hits_addend.as_ref().map(|v| v.value), Some(42));
        assert!(d.is_negative_hits);
        // Same bytes both ways: nothing of ours is lost or added.
        assert_eq!(theirs.encode_to_vec(), ours.encode_to_vec());
    }

    #[test]
    fn response_matches_envoy_types_field_numbers() {
        use envoy_types::pb::envoy::service::ratelimit::v3 as pb;
        let theirs = pb::RateLimitResponse {
            overall_code: 2,
            statuses: vec![pb::rate_limit_response::DescriptorStatus {
                code: 2,
                current_limit: Some(pb::rate_limit_response::RateLimit {
                    name: "rpm".into(),
                    requests_per_unit: 10,
                    unit: 2,
                }),
                limit_remaining: 4,
                duration_until_reset: Some(envoy_types::pb::google::protobuf::Duration {
                    seconds: 6,
                    nanos: 500_000_000,
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let ours = RateLimitResponse::decode(theirs.encode_to_vec().as_slice()).unwrap();
        assert_eq!(ours.overall_code, Code::OverLimit as i32);
        let s = &ours.statuses[0];
        assert_eq!(s.limit_remaining, 4);
        let current = s.current_limit.as_ref().unwrap();
        assert_eq!((current.requests_per_unit, current.unit, current.name.as_str()), (10, Unit::Minute as i32, "rpm"));
        assert_eq!(s.duration_until_reset.as_ref().unwrap().as_millis(), 6500);
    }

    #[test]
    fn codes_and_units_have_the_protocol_numbers() {
        use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit as PbUnit;
        use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code as PbCode;
        assert_eq!(Code::Ok as i32, PbCode::Ok as i32);
        assert_eq!(Code::OverLimit as i32, PbCode::OverLimit as i32);
        for (ours, theirs) in [
            (Unit::Second, PbUnit::Second),
            (Unit::Minute, PbUnit::Minute),
            (Unit::Hour, PbUnit::Hour),
            (Unit::Day, PbUnit::Day),
            (Unit::Month, PbUnit::Month),
            (Unit::Year, PbUnit::Year),
        ] {
            assert_eq!(ours as i32, theirs as i32, "{ours:?}");
        }
        assert_eq!(Unit::from_proto(PbUnit::Unknown as i32), None);
        assert_eq!(crate::RESPONSE_UNIT_WEEK, PbUnit::Week as i32);
        assert_eq!(Unit::from_proto(crate::RESPONSE_UNIT_WEEK), None, "requests have no WEEK");
    }
}
