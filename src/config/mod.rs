//! What may an operator configure, and what does it compile to?
//!
//! Loading has two steps. serde checks the shape (`spec`: every struct
//! refuses unknown fields, so a typo is an error rather than a silently
//! ignored setting), then [`compile()`] checks meaning: references between
//! sections, digests, limits (`tiers`), environment variables. Any error
//! makes `on_configure` return false, so Envoy refuses the configuration and
//! logs the message, which names the field.
//!
//! The configuration arrives as JSON text (a `google.protobuf.StringValue` in
//! Envoy, or Istio's `WasmPlugin.pluginConfig`). A `google.protobuf.Struct`
//! given directly in an Envoy config reaches the filter as binary protobuf; that
//! form is decoded too (see [`decode_plugin_config`]).

mod compile;
mod levels;
mod spec;
mod tiers;

#[cfg(test)]
pub(crate) mod tests;

pub use compile::{
    compile, decode_plugin_config, load, ConfigError, JwtSlot, PathMatch, Plugin, Provider, RateLimit, RecordError,
    Registry, Route, Target, Tenant, TenantLabel, TenantRef, REGISTRY_SLOT_BASE,
};
pub use levels::{compile_key, valid_end_user, KeyInfo, Pool};
pub use spec::{
    FailureMode, IdentitySpec, JwtAuthnSpec, KeySpec, LimitsSpec, MeteringSpec, PluginConfig, PoolSpec, ProviderSpec,
    RateLimitSpec, RegistrySpec, RlsMode, RouteSpec, TenantLabelSpec, TenantSpec, TierSpec, UnmatchedRoutes,
    AUTO_TENANT_LABEL_MAX, FILTER_STATE_FIELDS,
};
pub use tiers::{
    compile_limits, usd_to_micros, LeaseSize, ModelAllowlist, Policy, AUTO_LEASE_MAX, DEFAULT_MAX_OUTPUT_TOKENS,
    DEFAULT_MAX_REQUEST_BYTES, MAX_LEASE_REQUESTS, MAX_REQUEST_BYTES_CEILING,
};
