//! Who is calling? The tenant (and end user) of a request, from an API key,
//! Envoy's `jwt_authn` or the filter's own JWT verifier; nothing the client
//! says about itself is believed.

pub mod api_key;
pub mod jwt;
pub mod jwt_authn;
pub mod registry;

use std::rc::Rc;

use crate::config::{KeyInfo, Plugin, Tenant};
use crate::identity::api_key::Headers;
use crate::llm::Refusal;

fn jwt_refusal(e: &jwt::JwtError) -> Refusal {
    Refusal::Custom { status: e.http_status(), code: e.code().to_string(), message: e.to_string() }
}

/// Who a request is from: a tenant of the static configuration, or one to
/// resolve through the tenant registry (see [`registry`]). The tenant may be
/// disabled: the caller refuses it, naming it in the access log.
#[derive(Debug)]
pub enum Who<'p> {
    /// The tenant, the end user (a verified token's) and the named key.
    Known(&'p Tenant, Option<String>, Option<Rc<KeyInfo>>),
    Registry(registry::Ask, Option<String>),
}

fn unknown_tenant() -> Refusal {
    Refusal::Custom {
        status: 403,
        code: "unknown_tenant".into(),
        message: "The token names a tenant this gateway does not know.".into(),
    }
}

fn tenant_for_claims(plugin: &Plugin, id: jwt::VerifiedIdentity) -> Result<Who<'_>, Refusal> {
    let Some(tenant) = plugin.tenant_by_id(&id.tenant_id) else {
        if plugin.registry.is_some() && rls_contract::registry::valid_tenant_id(&id.tenant_id) {
            return Ok(Who::Registry(registry::Ask::Tenant(id.tenant_id), id.user_id));
        }
        return Err(unknown_tenant());
    };
    // A disabled tenant is refused by the caller, which knows the tenant
    // then (the access log names it).
    Ok(Who::Known(tenant, id.user_id, None))
}

/// A compact JWS: three dot-separated parts, the first a JSON header.
fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.split('.').count() == 3
}

/// Resolves the tenant (and user) of a request. Precedence, first match
/// wins: Envoy `jwt_authn`'s verified payload, a JWT verified here, an API
/// key. A key or tenant id the static configuration does not know goes to
/// the registry when one is configured (the static configuration wins).
pub fn resolve_identity<'p>(
    plugin: &'p Plugin,
    headers: &Headers,
    path: &str,
    jwt_authn_payload: Option<&[u8]>,
    now_s: u64,
) -> Result<Who<'p>, Refusal> {
    if let (Some(spec), Some(payload)) = (&plugin.identity.jwt_authn, jwt_authn_payload) {
        if !payload.is_empty() {
            // Envoy hands a metadata map to wasm in its pairs encoding; JSON
            // and protobuf Struct forms are accepted too.
            let id = match crate::envoy::pairs::lookup(payload, &spec.tenant_claim) {
                Some(tenant_id) => jwt::VerifiedIdentity {
                    provider: "jwt_authn".into(),
                    tenant_id,
                    user_id: spec.user_claim.as_deref().and_then(|c| crate::envoy::pairs::lookup(payload, c)),
                    exp: None,
                },
                None if crate::envoy::pairs::decode(payload).is_some() => {
                    return Err(jwt_refusal(&jwt::JwtError::MissingTenantClaim(spec.tenant_claim.clone())))
                }
                None => jwt::claims_from_jwt_authn_payload(payload, &spec.tenant_claim, spec.user_claim.as_deref())
                    .map_err(|e| jwt_refusal(&e))?,
            };
            return tenant_for_claims(plugin, id);
        }
    }
    if let Some(slot) = &plugin.jwt {
        let lookup = |name: &str| api_key::header(headers, name).map(str::to_string);
        if let Ok(mut verifier) = slot.0.try_borrow_mut() {
            if let Some(token) = verifier.extract_token(jwt::ProviderSelector::Auto, &lookup) {
                if looks_like_jwt(&token) || !plugin.identity.api_keys {
                    let id =
                        verifier.verify(jwt::ProviderSelector::Auto, &token, now_s).map_err(|e| jwt_refusal(&e))?;
                    return tenant_for_claims(plugin, id);
                }
            }
        }
    }
    if !plugin.identity.api_keys {
        return Err(Refusal::Custom {
            status: 401,
            code: "missing_token".into(),
            message: "A bearer token is required.".into(),
        });
    }
    let key = api_key::client_key(plugin, headers, path).ok_or(Refusal::MissingApiKey)?;
    let digest = api_key::digest(key);
    match plugin.tenant_by_key_digest(&digest) {
        Some(t) => Ok(Who::Known(t, None, plugin.key_info(&digest).cloned())),
        None if plugin.registry.is_some() => Ok(Who::Registry(registry::Ask::Key(digest), None)),
        None => Err(Refusal::InvalidApiKey),
    }
}
