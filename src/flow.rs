//! The per-request state machine. The glue hands every host callback to a
//! [`RequestFlow`] and carries out what it answers; all decisions live here,
//! where plain `cargo test` reaches them.

use std::rc::Rc;

use crate::api::{self, Api, Family, LocalReply, Refusal};
use crate::config::{Plugin, UnmatchedRoutes};
use crate::identity::{self, Headers};
use crate::plan::{self, HeaderPlan};
use crate::request::{self, RequestInfo};

/// What the glue does after the request headers.
#[derive(Debug, PartialEq)]
pub enum HeadersStep {
    /// Send this reply and stop the request.
    Reply(LocalReply),
    /// Leave the request alone (unmatched path with `unmatched_routes: pass`).
    PassThrough,
    /// Apply the plan, clear the route cache, and wait for the whole body.
    ReadBody(HeaderPlan),
}

/// What the glue does after a piece of the request body.
#[derive(Debug, PartialEq)]
pub enum BodyStep {
    /// Keep buffering.
    NeedMore,
    /// Send this reply and stop the request.
    Reply(LocalReply),
    /// Let the request go upstream; `Some` replaces the body first.
    Forward(Option<Vec<u8>>),
}

/// State of one request.
pub struct RequestFlow {
    plugin: Rc<Plugin>,
    pub request_id: String,
    pub api: Option<Api>,
    pub tenant: Option<usize>,
    pub path: String,
    pub info: Option<RequestInfo>,
}

impl RequestFlow {
    pub fn new(plugin: Rc<Plugin>) -> Self {
        RequestFlow {
            plugin,
            request_id: String::new(),
            api: None,
            tenant: None,
            path: String::new(),
            info: None,
        }
    }

    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    pub fn tenant(&self) -> Option<&crate::config::Tenant> {
        self.tenant.and_then(|i| self.plugin.tenants.get(i))
    }

    fn family(&self) -> Family {
        self.api.map_or(Family::OpenAi, Api::family)
    }

    fn refuse(&self, refusal: &Refusal) -> LocalReply {
        api::render(self.family(), refusal, &self.request_id, None)
    }

    /// Request headers arrived. `new_request_id` is used when the request
    /// carries none.
    pub fn on_request_headers(
        &mut self,
        headers: &Headers,
        end_of_stream: bool,
        new_request_id: impl FnOnce() -> String,
    ) -> HeadersStep {
        let plugin = Rc::clone(&self.plugin);
        self.request_id = identity::header(headers, &plugin.request_id_header)
            .filter(|v| !v.is_empty() && v.len() <= 200)
            .map(str::to_string)
            .unwrap_or_else(new_request_id);
        self.path = identity::header(headers, ":path").unwrap_or("/").to_string();

        let Some(route) = plugin.route_for(&self.path) else {
            return match plugin.unmatched_routes {
                UnmatchedRoutes::Pass => HeadersStep::PassThrough,
                UnmatchedRoutes::Deny => HeadersStep::Reply(self.refuse(&Refusal::UnknownRoute)),
            };
        };
        self.api = Some(route.api);

        let tenant = match identity::resolve(&plugin, headers, &self.path) {
            Ok(t) => t,
            Err(r) => return HeadersStep::Reply(self.refuse(&r)),
        };
        self.tenant = plugin.tenants.iter().position(|t| t.id == tenant.id);

        if identity::header(headers, ":method") != Some("POST") {
            return HeadersStep::Reply(self.refuse(&Refusal::MethodNotAllowed));
        }
        let Some(provider) = plugin.provider(route.provider) else {
            return HeadersStep::Reply(self.refuse(&Refusal::Internal {
                detail: "route names no provider".into(),
            }));
        };
        let Some(provider_key) = tenant.provider_keys.get(route.provider).and_then(Option::as_deref)
        else {
            return HeadersStep::Reply(self.refuse(&Refusal::ProviderNotConfigured {
                provider: provider.name.clone(),
            }));
        };
        if end_of_stream {
            return HeadersStep::Reply(self.refuse(&Refusal::BodyRequired));
        }
        let limit = tenant.policy.max_request_bytes;
        if let Some(len) = identity::header(headers, "content-length").and_then(|v| v.trim().parse::<u64>().ok()) {
            if len > limit {
                return HeadersStep::Reply(self.refuse(&Refusal::RequestTooLarge { limit }));
            }
        }
        let new_path = plugin
            .client_key_query_param
            .as_deref()
            .and_then(|param| plan::strip_query_param(&self.path, param));
        if let Some(p) = &new_path {
            self.path = p.clone();
        }
        let mut header_plan = plan::build(&plugin, tenant, provider, provider_key, headers, new_path.as_deref());
        // The body may be rewritten (usage injection, output clamp), so the
        // client's length cannot be trusted upstream; Envoy recomputes it.
        header_plan.remove.push("content-length".into());
        header_plan
            .set
            .push((plugin.request_id_header.clone(), self.request_id.clone()));
        HeadersStep::ReadBody(header_plan)
    }

    /// A piece of the request body arrived; `buffered` is the total so far.
    pub fn on_request_body_size(&self, buffered: u64, end_of_stream: bool) -> Option<BodyStep> {
        let limit = self.tenant()?.policy.max_request_bytes;
        if buffered > limit {
            return Some(BodyStep::Reply(self.refuse(&Refusal::RequestTooLarge { limit })));
        }
        (!end_of_stream).then_some(BodyStep::NeedMore)
    }

    /// The whole body is here.
    pub fn on_request_body(&mut self, body: &[u8]) -> BodyStep {
        let (Some(api), Some(tenant)) = (self.api, self.tenant()) else {
            return BodyStep::Forward(None);
        };
        let limit = tenant.policy.max_request_bytes;
        if body.len() as u64 > limit {
            return BodyStep::Reply(self.refuse(&Refusal::RequestTooLarge { limit }));
        }
        let (info, _json) = match request::inspect(api, &self.path, body) {
            Ok(x) => x,
            Err(r) => return BodyStep::Reply(self.refuse(&r)),
        };
        if let Err(r) = request::check_model(&tenant.policy, &info.model) {
            return BodyStep::Reply(self.refuse(&r));
        }
        self.info = Some(info);
        BodyStep::Forward(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{sample, KEY_A, KEY_B};

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn flow() -> RequestFlow {
        RequestFlow::new(Rc::new(sample()))
    }

    #[test]
    fn identified_request_reads_body_with_plan() {
        let mut f = flow();
        let hs = h(&[
            (":path", "/v1/chat/completions"),
            (":method", "POST"),
            ("authorization", &format!("Bearer {KEY_A}")),
            ("x-request-id", "abc"),
        ]);
        let HeadersStep::ReadBody(plan) = f.on_request_headers(&hs, false, || "new".into()) else {
            panic!("expected ReadBody")
        };
        assert_eq!(f.request_id, "abc");
        assert!(plan.set.contains(&("authorization".into(), "Bearer provider-key-for-ACME_OPENAI".into())));
        assert!(plan.remove.contains(&"content-length".to_string()));
        let body = br#"{"model":"gpt-4o","messages":[]}"#;
        assert_eq!(f.on_request_body(body), BodyStep::Forward(None));
        assert_eq!(f.info.as_ref().unwrap().model, "gpt-4o");
    }

    #[test]
    fn refusals_use_api_envelope() {
        let mut f = flow();
        let hs = h(&[(":path", "/v1/messages"), (":method", "POST")]);
        let HeadersStep::Reply(r) = f.on_request_headers(&hs, false, || "rid".into()) else {
            panic!()
        };
        assert_eq!(r.status, 401);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["request_id"], "rid");
    }

    #[test]
    fn provider_without_key_is_403() {
        let mut f = flow();
        let hs = h(&[(":path", "/v1/messages"), (":method", "POST"), ("x-api-key", KEY_B)]);
        let HeadersStep::Reply(r) = f.on_request_headers(&hs, false, || "rid".into()) else {
            panic!()
        };
        assert_eq!((r.status, r.header("x-tollgate-error")), (403, Some("provider_not_configured")));
    }

    #[test]
    fn content_length_over_limit_is_413_early() {
        let mut f = flow();
        let hs = h(&[
            (":path", "/v1/chat/completions"),
            (":method", "POST"),
            ("x-api-key", KEY_B),
            ("content-length", "5000"),
        ]);
        let HeadersStep::Reply(r) = f.on_request_headers(&hs, false, || "rid".into()) else {
            panic!()
        };
        assert_eq!(r.status, 413);
    }

    #[test]
    fn body_limits_and_model_policy() {
        let mut f = flow();
        let hs = h(&[(":path", "/v1/chat/completions"), (":method", "POST"), ("x-api-key", KEY_B)]);
        assert!(matches!(f.on_request_headers(&hs, false, || "r".into()), HeadersStep::ReadBody(_)));
        assert_eq!(f.on_request_body_size(100, false), Some(BodyStep::NeedMore));
        assert!(matches!(f.on_request_body_size(4097, false), Some(BodyStep::Reply(r)) if r.status == 413));
        let BodyStep::Reply(r) = f.on_request_body(br#"{"model":"gpt-4o"}"#) else { panic!() };
        assert_eq!((r.status, r.header("x-tollgate-error")), (403, Some("model_not_allowed")));
        let BodyStep::Reply(r) = f.on_request_body(b"{oops") else { panic!() };
        assert_eq!(r.status, 400);
    }

    #[test]
    fn unmatched_path_is_denied_by_default() {
        let mut f = flow();
        let hs = h(&[(":path", "/admin"), (":method", "GET")]);
        let HeadersStep::Reply(r) = f.on_request_headers(&hs, true, || "r".into()) else { panic!() };
        assert_eq!(r.status, 404);
    }

    #[test]
    fn gemini_query_key_is_removed_from_path() {
        let mut f = flow();
        let path = format!("/v1beta/models/gemini-2.0-flash:generateContent?key={KEY_A}");
        let hs = h(&[(":path", &path), (":method", "POST")]);
        let HeadersStep::ReadBody(plan) = f.on_request_headers(&hs, false, || "r".into()) else { panic!() };
        assert!(plan.set.contains(&(":path".into(), "/v1beta/models/gemini-2.0-flash:generateContent".into())));
    }
}
