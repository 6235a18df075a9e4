//! The Envoy RLS v3 wire messages the filter sends and reads.
//!
//! `envoy-types` cannot build for wasm32, so the few messages tollgate needs
//! are declared here with their field numbers (checked against `envoy-types`
//! in a native test). tollgate's conventions on top of RLS v3 (see
//! `ratelimit-service/README.md`):
//! - entries whose key starts with `tollgate.` are parameters, not part of the
//!   counter key: `tollgate.limit` (full u64 limit), `tollgate.anchor_day`,
//!   `tollgate.tz`;
//! - gRPC metadata `x-tollgate-mode: settle` applies charges unconditionally,
//!   and `x-tollgate-idempotency-key` makes a call apply at most once.

pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";
pub const META_MODE: &str = "x-tollgate-mode";
pub const META_IDEMPOTENCY_KEY: &str = "x-tollgate-idempotency-key";
/// `META_MODE` of a settle (refunds and extra charges, never refused).
pub const MODE_SETTLE: &str = "settle";
pub const KEY_LIMIT: &str = "tollgate.limit";
pub const KEY_ANCHOR_DAY: &str = "tollgate.anchor_day";
pub const KEY_TZ: &str = "tollgate.tz";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Unit {
    Unknown = 0,
    Second = 1,
    Minute = 2,
    Hour = 3,
    Day = 4,
    Month = 5,
    Year = 6,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Code {
    Unknown = 0,
    Ok = 1,
    OverLimit = 2,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Entry {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LimitOverride {
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    #[prost(enumeration = "Unit", tag = "2")]
    pub unit: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct UInt64Value {
    #[prost(uint64, tag = "1")]
    pub value: u64,
}

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

#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimitRequest {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(message, repeated, tag = "2")]
    pub descriptors: Vec<Descriptor>,
    #[prost(uint32, tag = "3")]
    pub hits_addend: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimit {
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    #[prost(int32, tag = "2")]
    pub unit: i32,
    #[prost(string, tag = "3")]
    pub name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Duration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl Duration {
    pub fn as_millis(&self) -> u64 {
        let s = u64::try_from(self.seconds).unwrap_or(0);
        let n = u64::try_from(self.nanos).unwrap_or(0);
        s.saturating_mul(1000).saturating_add(n.div_ceil(1_000_000))
    }
}

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
                duration_until_reset: Some(envoy_types::pb::google::protobuf::Duration { seconds: 6, nanos: 500_000_000 }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let ours = RateLimitResponse::decode(theirs.encode_to_vec().as_slice()).unwrap();
        assert_eq!(ours.overall_code, Code::OverLimit as i32);
        let s = &ours.statuses[0];
        assert_eq!(s.limit_remaining, 4);
        assert_eq!(s.current_limit.as_ref().unwrap().requests_per_unit, 10);
        assert_eq!(s.duration_until_reset.as_ref().unwrap().as_millis(), 6500);
    }
}
