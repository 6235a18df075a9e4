//! Does an operator's configuration load, and is every mistake refused with its field named?
//!
//! The sample configuration here is shared with the other modules' tests.

use super::*;
use crate::llm::Api;

pub const KEY_A: &str = "sk-tenant-a";
pub const KEY_B: &str = "sk-tenant-b";
pub const KEY_OFF: &str = "sk-tenant-off";

pub fn sha(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

pub fn sample_json() -> serde_json::Value {
    serde_json::json!({
        "strip_request_headers": ["x-user-id"],
        "rate_limit": {"cluster": "tollgate_rls"},
        "pricing": {
            "models": {"gpt-4o": {"input": 2.5, "cached_input": 1.25, "output": 10.0}},
            "prefix_match": true,
            "default": {"input": 1.0, "output": 4.0}
        },
        "providers": {
            "openai": {"credential_header": "authorization"},
            "anthropic": {"credential_header": "x-api-key"},
            "gemini": {"credential_header": "x-goog-api-key"}
        },
        "routes": [
            {"path": "/v1/chat/completions", "api": "openai_chat", "provider": "openai"},
            {"path": "/v1/messages", "api": "anthropic_messages", "provider": "anthropic"},
            {"path_prefix": "/v1beta/models/", "api": "gemini", "provider": "gemini"}
        ],
        "tiers": {
            "free": {"models": ["gpt-4o-mini", "claude-3-5-haiku*", "gemini-2.0-flash"],
                     "max_request_bytes": 4096, "requests_per_minute": 10},
            "pro": {"models": ["*"], "usd_per_month": 100.5, "failure_mode": "open"}
        },
        "tenants": [
            {"id": "acme", "tier": "pro", "api_key_sha256": [sha(KEY_A)],
             "provider_key_env": {"openai": "ACME_OPENAI", "anthropic": "ACME_ANTHROPIC",
                                  "gemini": "ACME_GEMINI"}},
            {"id": "globex", "tier": "free", "api_key_sha256": [sha(KEY_B)],
             "provider_key_env": {"openai": "GLOBEX_OPENAI"},
             "overrides": {"requests_per_minute": 20}},
            {"id": "initech", "tier": "free", "enabled": false,
             "api_key_sha256": [sha(KEY_OFF)]}
        ]
    })
}

pub fn env(name: &str) -> Option<String> {
    Some(format!("provider-key-for-{name}"))
}

pub fn sample() -> Plugin {
    load(sample_json().to_string().as_bytes(), &env).unwrap()
}

fn load_err(v: serde_json::Value) -> String {
    load(v.to_string().as_bytes(), &env).unwrap_err().to_string()
}

#[test]
fn sample_compiles_with_overrides_and_defaults() {
    let p = sample();
    let acme = p.tenant_by_id("acme").unwrap();
    assert_eq!(acme.policy.limits.get(crate::ratelimit::descriptors::LimitKind::UsdPerMonth), Some(100_500_000));
    assert_eq!(acme.policy.failure_mode, FailureMode::Open);
    assert_eq!(acme.policy.max_request_bytes, DEFAULT_MAX_REQUEST_BYTES);
    let globex = p.tenant_by_id("globex").unwrap();
    assert_eq!(globex.policy.limits.get(crate::ratelimit::descriptors::LimitKind::RequestsPerMinute), Some(20));
    assert_eq!(globex.policy.max_request_bytes, 4096);
    assert!(globex.policy.models.allows("claude-3-5-haiku-20241022"));
    assert!(!globex.policy.models.allows("gpt-4o"));
    assert_eq!(p.providers.iter().find(|x| x.name == "openai").unwrap().credential_prefix, "Bearer ");
    assert_eq!(p.client_key_query_param.as_deref(), Some("key"));
}

#[test]
fn routes_prefer_exact_then_longest_prefix() {
    let p = sample();
    assert_eq!(p.route_for("/v1/chat/completions?x=1").unwrap().api, Api::OpenaiChat);
    assert_eq!(p.route_for("/v1beta/models/gemini-2.0-flash:generateContent").unwrap().api, Api::Gemini);
    assert!(p.route_for("/v1/chat/completions/extra").is_none());
}

#[test]
fn unknown_field_is_refused() {
    let mut v = sample_json();
    v["tiers"]["free"]["requests_per_minite"] = 5.into();
    let e = load_err(v);
    assert!(e.contains("unknown field `requests_per_minite`"), "{e}");
}

#[test]
fn unknown_tier_is_refused() {
    let mut v = sample_json();
    v["tenants"][0]["tier"] = "platinum".into();
    assert_eq!(load_err(v), "tenants[0].tier: unknown tier 'platinum'");
}

#[test]
fn duplicate_digest_is_refused() {
    let mut v = sample_json();
    v["tenants"][1]["api_key_sha256"] = serde_json::json!([sha(KEY_A)]);
    let e = load_err(v);
    assert!(e.starts_with("tenants[1].api_key_sha256[0]: duplicate key digest"), "{e}");
    assert!(e.contains("acme"), "{e}");
}

#[test]
fn plain_key_instead_of_digest_is_refused() {
    let mut v = sample_json();
    v["tenants"][1]["api_key_sha256"] = serde_json::json!(["sk-live-123"]);
    assert!(load_err(v).contains("SHA-256 digest"));
}

#[test]
fn missing_env_var_is_refused() {
    let v = sample_json();
    let e = load(v.to_string().as_bytes(), &|name| (name != "GLOBEX_OPENAI").then(|| "k".to_string()))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("tenants[1].provider_key_env.openai: environment variable 'GLOBEX_OPENAI'"), "{e}");
}

#[test]
fn empty_model_list_and_zero_limit_are_refused() {
    let mut v = sample_json();
    v["tiers"]["free"]["models"] = serde_json::json!([]);
    assert!(load_err(v).starts_with("tiers.free.models: the model list is empty"));
    let mut v = sample_json();
    v["tiers"]["pro"]["tokens_per_day"] = 0.into();
    assert!(load_err(v).starts_with("tiers.pro.tokens_per_day: a limit of 0"));
    let mut v = sample_json();
    v["tenants"][1]["overrides"]["requests_per_minute"] = 0.into();
    assert!(load_err(v).starts_with("tenants[1].overrides.requests_per_minute"));
}

#[test]
fn filter_state_fields_are_checked() {
    let mut v = sample_json();
    v["metering"] = serde_json::json!({"filter_state": ["tenant", "cost_usd"]});
    let p = load(v.to_string().as_bytes(), &env).unwrap();
    assert_eq!(p.metering.filter_state.as_deref(), Some(&["tenant".to_string(), "cost_usd".to_string()][..]));
    v["metering"] = serde_json::json!({"filter_state": ["tenant", "cost"]});
    let e = load_err(v);
    assert!(e.starts_with("metering.filter_state[1]") && e.contains("unknown field 'cost'"), "{e}");
}

#[test]
fn leases_need_the_reserve_mode() {
    let mut v = sample_json();
    v["tiers"]["pro"]["lease_requests"] = 20.into();
    assert_eq!(load(v.to_string().as_bytes(), &env).unwrap().rate_limit.unwrap().lease_ms, 1000);
    v["rate_limit"]["mode"] = "check_then_charge".into();
    assert!(load_err(v.clone()).contains("lease_requests: quota leases need the reserve mode"));
    v["rate_limit"]["mode"] = "reserve".into();
    v["rate_limit"]["lease_ms"] = 5.into();
    assert!(load_err(v).starts_with("rate_limit.lease_ms"));
}

#[test]
fn bad_values_are_refused() {
    for (field, value, needle) in [
        ("usd_per_day", serde_json::json!(-1.0), "usd_per_day"),
        ("usd_per_day", serde_json::json!(0.0000001), "usd_per_day"),
        ("billing_anchor_day", serde_json::json!(32), "billing_anchor_day"),
        ("max_request_bytes", serde_json::json!(1u64 << 40), "max_request_bytes"),
        ("time_zone", serde_json::json!("Not a zone!"), "time_zone"),
        ("failure_mode", serde_json::json!("sometimes"), "unknown variant"),
        ("lease_requests", serde_json::json!(5000), "lease_requests: must be between 0 (off) and 1000"),
        ("cached_read_token_weight", serde_json::json!(1.5), "cached_read_token_weight: must be between 0 and 1"),
        ("tokens_per_week", serde_json::json!(0), "tokens_per_week: a limit of 0 would refuse everything"),
        (
            "alert_thresholds",
            serde_json::json!([0.8, 0.5]),
            "alert_thresholds: at most 8 thresholds, strictly increasing",
        ),
        ("alert_thresholds", serde_json::json!([0.0]), "alert_thresholds[0]: must be a share"),
    ] {
        let mut v = sample_json();
        v["tiers"]["pro"][field] = value;
        let e = load_err(v);
        assert!(e.contains(needle), "{field}: {e}");
    }
}

#[test]
fn route_to_unknown_provider_is_refused() {
    let mut v = sample_json();
    v["routes"][0]["provider"] = "azure".into();
    assert_eq!(load_err(v), "routes[0].provider: unknown provider 'azure'");
}

#[test]
fn limits_need_the_service_and_dollars_need_prices() {
    let mut v = sample_json();
    v.as_object_mut().unwrap().remove("rate_limit");
    assert!(load_err(v).contains("no rate_limit section"));
    let mut v = sample_json();
    v.as_object_mut().unwrap().remove("pricing");
    assert!(load_err(v).contains("no pricing table"));
    let mut v = sample_json();
    v["rate_limit"]["timeout_ms"] = 0.into();
    assert!(load_err(v).starts_with("rate_limit.timeout_ms"));
}

#[test]
fn fallback_model_must_be_allowed() {
    let mut v = sample_json();
    v["tiers"]["free"]["fallback_model"] = "gpt-4o".into();
    v["tiers"]["free"]["fallback_at_budget_share"] = 0.8.into();
    assert!(load_err(v).contains("fallback_model"));
}

#[test]
fn empty_and_garbage_configs_are_refused() {
    assert!(matches!(load(b"", &env), Err(ConfigError::Encoding(_))));
    assert!(matches!(load(b"{not json", &env), Err(ConfigError::Shape(_))));
    assert!(matches!(load(b"\xff\xfe\x00", &env), Err(ConfigError::Encoding(_))));
}

#[test]
fn every_tenant_is_found_by_id_and_key_at_its_own_index() {
    let p = sample();
    for (i, t) in p.tenants.iter().enumerate() {
        assert_eq!(p.tenant_index(&t.id), Some(i));
        assert_eq!(p.tenant_by_id(&t.id).map(|x| &x.id), Some(&t.id));
    }
    assert_eq!(p.tenant_index("nobody"), None);
}

#[test]
fn metrics_label_tenants_as_configured() {
    let with = |label: serde_json::Value| {
        let mut j = sample_json();
        j["metering"] = serde_json::json!({ "tenant_label": label });
        load(j.to_string().as_bytes(), &env)
    };
    let p = sample();
    let t = &p.tenants[0];
    // A small configuration labels by tenant by default.
    assert_eq!(p.tenant_label, TenantLabel::Tenant);
    assert_eq!(p.metric_tenant(t), t.id.as_str());
    let p = with("tier".into()).unwrap();
    assert_eq!(p.metric_tenant(&p.tenants[0]), format!("tier-{}", p.tenants[0].tier));
    let p = with("none".into()).unwrap();
    assert_eq!(p.metric_tenant(&p.tenants[0]), "all");
    let first = sample().tenants[0].id.clone();
    let p = with(serde_json::json!({ "only": [first] })).unwrap();
    assert_eq!(p.metric_tenant(&p.tenants[0]), first.as_str());
    assert_eq!(p.metric_tenant(&p.tenants[1]), "other");
    let e = with(serde_json::json!({ "only": ["ghost"] })).unwrap_err().to_string();
    assert!(e.contains("metering.tenant_label.only[0]") && e.contains("ghost"), "{e}");
    assert!(with("everyone".into()).is_err());
}

#[test]
fn many_tenants_are_labelled_by_tier_by_default() {
    let mut j = sample_json();
    let tier = j["tenants"][0]["tier"].clone();
    let tenants: Vec<serde_json::Value> = (0..=AUTO_TENANT_LABEL_MAX)
        .map(|i| serde_json::json!({ "id": format!("t{i}"), "tier": tier, "api_key_sha256": [format!("{i:064x}")] }))
        .collect();
    j["tenants"] = serde_json::Value::Array(tenants);
    let p = load(j.to_string().as_bytes(), &env).unwrap();
    assert_eq!(p.tenant_label, TenantLabel::Tier);
}

#[test]
fn a_provider_named_twice_for_a_tenant_is_refused() {
    let raw = sample_json().to_string().replacen(
        r#""provider_key_env":{"openai":"GLOBEX_OPENAI"}"#,
        r#""provider_key_env":{"openai":"GLOBEX_OPENAI","openai":"OTHER"}"#,
        1,
    );
    assert!(raw.contains(r#""openai":"OTHER""#), "{raw}");
    let e = load(raw.as_bytes(), &env).unwrap_err().to_string();
    assert!(e.contains("provider 'openai' is named twice"), "{e}");
}

#[test]
fn named_keys_pools_and_the_end_user_header_compile() {
    let mut v = sample_json();
    v["tenants"][0]["keys"] = serde_json::json!([
        {"id": "ci", "sha256": sha("ci-key"), "models": ["gpt-4o"],
         "limits": {"usd_per_day": 5.0, "requests_per_minute": 30}, "shadow": true}
    ]);
    v["tiers"]["pro"]["users"] = serde_json::json!({"requests_per_minute": 20, "usd_per_day": 5.0});
    v["pools"] = serde_json::json!([
        {"name": "openai-4o", "provider": "openai", "models": ["gpt-4o*"],
         "limits": {"requests_per_minute": 500, "input_tokens_per_minute": 30000},
         "tier_shares": {"free": 0.2}}
    ]);
    v["identity"] = serde_json::json!({"end_user_header": "X-End-User"});
    v["routes"][0]["trust_end_user_header"] = true.into();
    let p = load(v.to_string().as_bytes(), &env).unwrap();
    let info = p.key_info(&crate::identity::api_key::digest("ci-key")).unwrap();
    assert_eq!(&*info.id, "ci");
    assert!(info.shadow);
    assert_eq!(info.limits.get(crate::ratelimit::descriptors::LimitKind::UsdPerDay), Some(5_000_000));
    assert_eq!(p.tenant_by_key_digest(&crate::identity::api_key::digest("ci-key")).unwrap().id, "acme");
    let pool = p.pool_for(p.routes[0].provider, "gpt-4o-2024-08-06").unwrap();
    let share = pool.shares.get("free").unwrap();
    assert_eq!(share.get(crate::ratelimit::descriptors::LimitKind::RequestsPerMinute), Some(100));
    assert!(p.pool_for(p.routes[0].provider, "gpt-4.1").is_none());
    assert_eq!(p.end_user_header.as_deref(), Some("x-end-user"));
    assert!(p.routes[0].trust_end_user_header);
}

#[test]
fn level_mistakes_are_refused_with_their_path() {
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|v| v["tenants"][0]["keys"] = serde_json::json!([{"id": "a b", "sha256": sha("k1")}])),
            "tenants[0].keys[0].id",
        ),
        (
            Box::new(|v| {
                v["tenants"][0]["keys"] =
                    serde_json::json!([{"id": "a", "sha256": sha("k1")}, {"id": "a", "sha256": sha("k2")}])
            }),
            "duplicate key id 'a'",
        ),
        (
            Box::new(|v| v["tenants"][0]["keys"] = serde_json::json!([{"id": "a", "sha256": sha(KEY_B)}])),
            "duplicate key digest",
        ),
        (
            Box::new(|v| {
                v["tenants"][1]["keys"] = serde_json::json!([{"id": "a", "sha256": sha("k1"), "models": ["gpt-4o"]}])
            }),
            "not in the tenant's model list",
        ),
        (
            Box::new(|v| {
                v["pools"] = serde_json::json!([{"name": "p", "provider": "openai", "models": ["*"],
                    "limits": {"usd_per_day": 5.0}}])
            }),
            "pools[0].limits.usd_per_day: pools hold the provider's rate limits",
        ),
        (
            Box::new(|v| {
                v["pools"] = serde_json::json!([{"name": "p", "provider": "openai", "models": ["*"],
                    "limits": {"requests_per_minute": 5}, "tier_shares": {"gold": 0.5}}])
            }),
            "pools[0].tier_shares.gold: unknown tier 'gold'",
        ),
        (
            Box::new(|v| {
                v["pools"] = serde_json::json!([{"name": "p", "provider": "openai", "models": ["*"],
                    "limits": {"requests_per_minute": 5}, "tier_shares": {"free": 1.5}}])
            }),
            "must be a share in (0, 1]",
        ),
        (
            Box::new(|v| {
                v["pools"] = serde_json::json!([{"name": "p", "provider": "openai", "models": ["*"], "limits": {}}])
            }),
            "a pool needs at least one limit",
        ),
        (
            Box::new(|v| v["routes"][0]["trust_end_user_header"] = true.into()),
            "identity.end_user_header names no header",
        ),
        (
            Box::new(|v| v["identity"] = serde_json::json!({"end_user_header": "bad header"})),
            "identity.end_user_header: not a valid header name",
        ),
        (
            Box::new(|v| v["tiers"]["pro"]["users"] = serde_json::json!({"requests_per_minute": 0})),
            "tiers.pro.users.requests_per_minute",
        ),
        (Box::new(|v| v["tiers"]["pro"]["users"] = serde_json::json!({"rpm": 5})), "unknown field"),
    ];
    for (edit, needle) in cases {
        let mut v = sample_json();
        edit(&mut v);
        let e = load_err(v);
        assert!(e.contains(needle), "{needle}: {e}");
    }
}
