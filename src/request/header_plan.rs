//! Which request headers does tollgate remove and set before a request leaves?
//!
//! The header plan: exactly which request headers tollgate removes and sets
//! before a request leaves for the provider.
//!
//! Isolation rules, in order:
//! 1. every header a client credential can travel in is removed, for every
//!    configured source and every provider's credential header;
//! 2. every header claiming an identity (`x-tollgate-*` and the configured
//!    list) is removed;
//! 3. the tenant's own provider key is written in that provider's header;
//! 4. trusted `x-tollgate-tenant` and `x-tollgate-tier` are set, so Envoy
//!    routes can send a tenant or tier to its own cluster.
//!
//! The plan is made from the request's full header list, so it removes only
//! the headers the request has: each removal is a host call, about 2 us of
//! Envoy's CPU. A header that is set is still removed first when present, so
//! no second client value can survive next to the one set.

use crate::config::{Plugin, Provider, Tenant};
use crate::identity::api_key::Headers;

/// Prefix of the headers tollgate owns. Client-sent copies are always dropped.
pub const OWN_HEADER_PREFIX: &str = "x-tollgate-";
pub const TENANT_HEADER: &str = "x-tollgate-tenant";
pub const TIER_HEADER: &str = "x-tollgate-tier";
/// The failover target a request goes to (routes to a provider with
/// targets), for Envoy's route match; removed by the router like the others.
pub const PROVIDER_HEADER: &str = "x-tollgate-provider";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderPlan {
    /// Headers to remove, all values.
    pub remove: Vec<String>,
    /// Headers to set (replacing any value), applied after the removals.
    pub set: Vec<(String, String)>,
}

impl HeaderPlan {
    fn remove(&mut self, name: &str) {
        if !self.remove.iter().any(|h| h == name) {
            self.remove.push(name.to_string());
        }
    }
}

/// Builds the plan for an identified request to `provider`.
pub fn build(
    plugin: &Plugin,
    tenant: &Tenant,
    provider: &Provider,
    provider_key: &str,
    headers: &Headers,
    new_path: Option<&str>,
) -> HeaderPlan {
    let mut plan = HeaderPlan::default();
    let removable = plugin
        .client_key_headers
        .iter()
        .chain(plugin.providers.iter().map(|p| &p.credential_header))
        .chain(&plugin.strip_request_headers)
        .chain(&plugin.jwt_strip_headers);
    for h in removable {
        if headers.iter().any(|(name, _)| name.eq_ignore_ascii_case(h)) {
            plan.remove(&h.to_ascii_lowercase());
        }
    }
    for (name, _) in headers {
        let lower = name.to_ascii_lowercase();
        if lower.starts_with(OWN_HEADER_PREFIX) {
            plan.remove(&lower);
        }
    }
    plan.set.push((provider.credential_header.clone(), format!("{}{}", provider.credential_prefix, provider_key)));
    plan.set.push((TENANT_HEADER.into(), tenant.id.clone()));
    plan.set.push((TIER_HEADER.into(), tenant.tier.to_string()));
    // The response is parsed for usage, so it must arrive uncompressed.
    plan.set.push(("accept-encoding".into(), "identity".into()));
    if let Some(path) = new_path {
        plan.set.push((":path".into(), path.to_string()));
    }
    plan
}

/// Removes the client-key query parameter from `path`, returning the new path
/// when something was removed.
pub fn strip_query_param(path: &str, param: &str) -> Option<String> {
    let (base, rest) = path.split_once('?')?;
    let (query, fragment) = match rest.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (rest, None),
    };
    let mut removed = false;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let key = pair.split_once('=').map_or(*pair, |(k, _)| k);
            let drop = key == param;
            removed |= drop;
            !drop && !pair.is_empty()
        })
        .collect();
    if !removed {
        return None;
    }
    let mut out = base.to_string();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::sample;

    #[test]
    fn plan_removes_every_credential_and_claim() {
        let p = sample();
        let tenant = p.tenant_by_id("acme").unwrap();
        let provider = p.providers.iter().find(|x| x.name == "anthropic").unwrap();
        let mut headers: Vec<(String, String)> = [
            ("x-tollgate-tenant", "globex"),
            ("X-Tollgate-Tier", "enterprise"),
            ("x-user-id", "u1"),
            ("Authorization", "Bearer sk-tg-mallory"),
            ("x-api-key", "sk-tg-other"),
            ("api-key", "a"),
            ("x-goog-api-key", "b"),
            ("content-type", "application/json"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        headers.push(("authorization".into(), "Bearer second".into()));
        let plan = build(&p, tenant, provider, "sk-ant-acme", &headers, None);
        let mut removed = plan.remove.clone();
        removed.sort();
        assert_eq!(
            removed,
            [
                "api-key",
                "authorization",
                "x-api-key",
                "x-goog-api-key",
                "x-tollgate-tenant",
                "x-tollgate-tier",
                "x-user-id"
            ]
        );
        for h in ["x-api-key", "x-tollgate-tenant", "x-tollgate-tier"] {
            assert_eq!(plan.set.iter().filter(|(n, _)| n == h).count(), 1, "{h} set once");
        }
        // Headers the request does not have cost no removal.
        let bare = build(&p, tenant, provider, "sk-ant-acme", &headers[7..8], None);
        assert!(bare.remove.is_empty(), "{:?}", bare.remove);
        assert!(plan.set.contains(&("x-api-key".into(), "sk-ant-acme".into())));
        assert!(plan.set.contains(&("x-tollgate-tenant".into(), "acme".into())));
        assert!(plan.set.contains(&("x-tollgate-tier".into(), "pro".into())));
        assert!(plan.set.contains(&("accept-encoding".into(), "identity".into())));
    }

    #[test]
    fn openai_credential_gets_bearer_prefix() {
        let p = sample();
        let tenant = p.tenant_by_id("acme").unwrap();
        let provider = p.providers.iter().find(|x| x.name == "openai").unwrap();
        let plan = build(&p, tenant, provider, "sk-oa", &[], Some("/x"));
        assert!(plan.set.contains(&("authorization".into(), "Bearer sk-oa".into())));
        assert!(plan.set.contains(&(":path".into(), "/x".into())));
    }

    #[test]
    fn query_key_is_stripped() {
        assert_eq!(strip_query_param("/m:g?key=abc&alt=sse", "key").as_deref(), Some("/m:g?alt=sse"));
        assert_eq!(strip_query_param("/m:g?alt=sse&key=abc", "key").as_deref(), Some("/m:g?alt=sse"));
        assert_eq!(strip_query_param("/m:g?key=abc", "key").as_deref(), Some("/m:g"));
        assert_eq!(strip_query_param("/m:g?alt=sse", "key"), None);
        assert_eq!(strip_query_param("/m:g", "key"), None);
        assert_eq!(strip_query_param("/m?keyx=1&key=2", "key").as_deref(), Some("/m?keyx=1"));
    }
}
