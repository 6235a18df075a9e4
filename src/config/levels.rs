//! Which limits apply besides the tenant's? API keys with their own limits,
//! the shared provider pools with their tier shares, and the end-user header.

use std::rc::Rc;

use hashbrown::HashMap;

use super::compile::{invalid, ConfigError};
use super::spec::{KeySpec, LimitsSpec, PoolSpec};
use super::tiers::{compile_limits, ModelAllowlist};
use crate::ratelimit::descriptors::{KeyScope, Limits};

/// A client key with a name, and what it narrows or adds: its own model
/// list, limits and shadow mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: Rc<str>,
    pub models: Option<Rc<ModelAllowlist>>,
    pub limits: Rc<Limits>,
    pub shadow: bool,
}

impl KeyInfo {
    /// The key's level, for requests it makes.
    pub fn scope(&self) -> KeyScope {
        KeyScope { id: Rc::clone(&self.id), limits: Rc::clone(&self.limits), shadow: self.shadow }
    }
}

/// A key id: the same rule as tenant ids (1-128 of letters, digits, `-`,
/// `_`, `.`), so it is safe in limit keys, logs and the ledger.
pub fn valid_key_id(id: &str) -> bool {
    rls_contract::registry::valid_tenant_id(id)
}

/// Compiles a key's name, models, limits and shadow flag.
pub fn compile_key(
    path: &str,
    id: &str,
    models: Option<&[String]>,
    limits: Option<&LimitsSpec>,
    shadow: Option<bool>,
) -> Result<KeyInfo, ConfigError> {
    if !valid_key_id(id) {
        return Err(invalid(format!("{path}.id"), "key ids use 1-128 letters, digits, - _ . only"));
    }
    let models = match models {
        Some(m) => Some(Rc::new(ModelAllowlist::compile(&format!("{path}.models"), m)?)),
        None => None,
    };
    let limits = match limits {
        Some(l) => compile_limits(&format!("{path}.limits"), l)?,
        None => Limits::default(),
    };
    Ok(KeyInfo { id: Rc::from(id), models, limits: Rc::new(limits), shadow: shadow.unwrap_or(false) })
}

pub(super) fn compile_key_spec(path: &str, k: &KeySpec) -> Result<KeyInfo, ConfigError> {
    compile_key(path, &k.id, k.models.as_deref(), k.limits.as_ref(), k.shadow)
}

/// A shared provider pool, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub name: Rc<str>,
    /// Index into the plugin's providers.
    pub provider: usize,
    pub models: ModelAllowlist,
    pub limits: Rc<Limits>,
    /// Tier name to its share of every limit.
    pub shares: HashMap<String, Rc<Limits>>,
}

/// Compiles the pools; `provider_index` resolves provider names and
/// `tier_exists` checks tier names.
pub(super) fn compile_pools(
    pools: &[PoolSpec],
    provider_index: &dyn Fn(&str) -> Option<usize>,
    tier_exists: &dyn Fn(&str) -> bool,
) -> Result<Vec<Pool>, ConfigError> {
    let mut out: Vec<Pool> = Vec::with_capacity(pools.len());
    for (i, p) in pools.iter().enumerate() {
        let path = format!("pools[{i}]");
        if !valid_key_id(&p.name) {
            return Err(invalid(format!("{path}.name"), "pool names use 1-128 letters, digits, - _ . only"));
        }
        if out.iter().any(|o| *o.name == *p.name) {
            return Err(invalid(format!("{path}.name"), format!("duplicate pool name '{}'", p.name)));
        }
        let provider = provider_index(&p.provider)
            .ok_or_else(|| invalid(format!("{path}.provider"), format!("unknown provider '{}'", p.provider)))?;
        let models = ModelAllowlist::compile(&format!("{path}.models"), &p.models)?;
        let limits = compile_limits(&format!("{path}.limits"), &p.limits)?;
        if limits.is_empty() {
            return Err(invalid(format!("{path}.limits"), "a pool needs at least one limit"));
        }
        if let Some((kind, _)) = limits.iter().find(|(k, _)| !k.is_rate()) {
            return Err(invalid(
                format!("{path}.limits.{}", kind.name()),
                "pools hold the provider's rate limits (per minute or hour, requests or tokens); budgets belong to tenants, keys and users",
            ));
        }
        let mut shares = HashMap::new();
        for (tier, share) in &p.tier_shares {
            let spath = format!("{path}.tier_shares.{tier}");
            if !tier_exists(tier) {
                return Err(invalid(spath, format!("unknown tier '{tier}'")));
            }
            if !(share.is_finite() && *share > 0.0 && *share <= 1.0) {
                return Err(invalid(spath, "must be a share in (0, 1]"));
            }
            let permille = (share * 1000.0).round() as u64;
            shares.insert(tier.clone(), Rc::new(limits.share(permille.max(1))));
        }
        out.push(Pool { name: Rc::from(p.name.as_str()), provider, models, limits: Rc::new(limits), shares });
    }
    Ok(out)
}

/// An end user's id from a trusted header: 1-128 visible ASCII characters.
pub fn valid_end_user(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic())
}
