//! Which tenant does the registry say a key (or a JWT's tenant id) belongs
//! to? The per-worker cache of the rate-limit service's tenant registry,
//! sans-IO: it answers from memory or says which lookup to send, reads the
//! answers, and applies the change feed polled on the tick.
//!
//! Where things live:
//! - **Key records** (digest → tenant, expiry, revoked, models; no secret)
//!   are shared by the Envoy's workers through shared data
//!   (`tollgate.registry.key.<digest>`), so a key is looked up about once per
//!   Envoy. Each worker keeps its own copy in memory as well.
//! - **Tenant records and provider credentials** live in this worker's
//!   memory only: each worker fetches the credentials of the tenants it
//!   serves (one lookup per tenant and worker), and they are never written to
//!   shared data, logs, filter state or metrics.
//! - **Unknown answers** are remembered per worker for `negative_ttl_ms`
//!   and never shared, so random keys cannot fill the shared data.
//!
//! Freshness: the tick asks for the changes since the last version seen
//! every `poll_ms`. A changed key is dropped here and tombstoned in shared
//! data (so no worker reads the old record again), a changed tenant is
//! dropped with its credentials. A shared record is written only by a lookup
//! whose answer is at least as new as any tombstone there (the contract's
//! version is read before the records), so a slow lookup cannot bring a
//! revoked key back. When the registry cannot be reached, what is cached
//! keeps working for `grace_ms` after it last answered; uncached keys get
//! 503 `tenant_lookup_unavailable`: an unknown key is never admitted.

use std::collections::BTreeMap;
use std::rc::Rc;

use hashbrown::HashMap;
use serde::{Deserialize, Serialize};

use crate::admission::inflight::{self, SlotStore};
use crate::config::{compile_key, KeyInfo, Plugin, Registry, Tenant, TenantRef, REGISTRY_SLOT_BASE};
use crate::incident::Incident;
use crate::llm::Refusal;
use rls_contract::registry::{self as contract, Changes, KeyRecord, LookupAnswer, LookupStatus};

/// What a request needs the registry for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ask {
    /// A client key's SHA-256 digest the static configuration does not know.
    Key([u8; 32]),
    /// A (verified) JWT's tenant id the static configuration does not know.
    Tenant(String),
}

/// A request's identity as the registry gave it.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub tenant: TenantRef,
    /// The key's name, own model allowlist (within the tier's), limits
    /// and shadow mode.
    pub key: Option<Rc<KeyInfo>>,
}

/// The answer from memory.
#[derive(Debug)]
pub enum Cached {
    Hit(Resolved),
    Refused(Refusal),
    /// Send this lookup (path on the registry cluster) and wait.
    Lookup(String),
}

/// A key record as the worker keeps it.
#[derive(Debug, Clone)]
struct KeyEntry {
    tenant: String,
    expires_at: Option<u64>,
    revoked: bool,
    info: Option<Rc<KeyInfo>>,
    /// When it was read from the registry (ms).
    fetched_ms: u64,
}

/// A tenant as the worker keeps it: compiled, or why it cannot serve.
#[derive(Debug, Clone)]
struct TenantEntry {
    tenant: Result<TenantRef, String>,
    fetched_ms: u64,
}

/// The shared-data value of a key record: the registry version of the
/// answer it came from (or of the change that tombstoned it), when it was
/// written, and the record (`None`: tombstone).
#[derive(Debug, Serialize, Deserialize)]
struct SharedKey {
    v: u64,
    w: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    k: Option<KeyRecord>,
}

/// Counts of what the cache did, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RegistryStats {
    pub lookups: u64,
    pub lookup_failures: u64,
    pub shared_hits: u64,
    pub polls_failed: u64,
    pub resets: u64,
}

/// One worker's view of the registry.
#[derive(Debug)]
pub struct RegistryCache {
    keys: HashMap<[u8; 32], KeyEntry>,
    tenants: HashMap<String, TenantEntry>,
    /// Each registry tenant's slot for per-worker state, kept across
    /// refreshes of its record.
    slots: HashMap<String, usize>,
    /// Unknown keys and tenant ids, until (ms).
    unknown_keys: HashMap<[u8; 32], u64>,
    unknown_tenants: HashMap<String, u64>,
    in_flight: u64,
    /// The registry version as of the last change feed read.
    version: Option<u64>,
    /// When the change feed last answered (ms).
    last_poll_ok_ms: u64,
    poll_in_flight: bool,
    next_poll_ms: u64,
    /// Shared records written before this time (ms) are not trusted (the
    /// change feed was reset).
    floor_ms: u64,
    pub stats: RegistryStats,
    /// Failures to reach the registry, told once and then summarised.
    pub incident: Incident,
}

impl Default for RegistryCache {
    fn default() -> Self {
        RegistryCache {
            keys: HashMap::new(),
            tenants: HashMap::new(),
            slots: HashMap::new(),
            unknown_keys: HashMap::new(),
            unknown_tenants: HashMap::new(),
            in_flight: 0,
            version: None,
            last_poll_ok_ms: 0,
            poll_in_flight: false,
            next_poll_ms: 0,
            floor_ms: 0,
            stats: RegistryStats::default(),
            incident: Incident::new("tenant registry", crate::incident::SUMMARY_MS),
        }
    }
}

/// The shared-data key of a key record.
pub fn shared_key(digest: &[u8; 32]) -> String {
    format!("tollgate.registry.key.{}", hex::encode(digest))
}

fn unavailable() -> Refusal {
    Refusal::Custom {
        status: 503,
        code: "tenant_lookup_unavailable".into(),
        message: "The gateway cannot verify this API key right now; retry shortly.".into(),
    }
}

fn unknown_tenant() -> Refusal {
    Refusal::Custom {
        status: 403,
        code: "unknown_tenant".into(),
        message: "The token names a tenant this gateway does not know.".into(),
    }
}

fn misconfigured() -> Refusal {
    Refusal::Custom {
        status: 403,
        code: "tenant_misconfigured".into(),
        message: "This account's configuration cannot be served by this gateway; contact the operator.".into(),
    }
}

impl RegistryCache {
    /// Whether a record read at `fetched_ms` may still be used: the registry
    /// answered (a lookup or the change feed) within the grace period.
    fn trusted(&self, cfg: &Registry, fetched_ms: u64, now_ms: u64) -> bool {
        now_ms.saturating_sub(fetched_ms.max(self.last_poll_ok_ms)) <= cfg.grace_ms
    }

    /// A new plugin configuration: tenants compiled against the old tiers
    /// and providers (provider keys are by provider index) are dropped and
    /// fetched again; key records do not depend on the configuration.
    pub fn reconfigured(&mut self) {
        self.tenants.clear();
        self.unknown_tenants.clear();
    }

    /// Lookups in flight on this worker.
    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }

    /// Answers from memory (this worker's, then the shared key records) or
    /// names the lookup to send. A lookup counts as in flight until
    /// [`Self::answered`] or [`Self::abandoned`].
    pub fn resolve(&mut self, plugin: &Plugin, ask: &Ask, store: &dyn SlotStore, now_ms: u64) -> Cached {
        let Some(cfg) = plugin.registry.as_ref() else {
            return Cached::Refused(match ask {
                Ask::Key(_) => Refusal::InvalidApiKey,
                Ask::Tenant(_) => unknown_tenant(),
            });
        };
        let (tenant_id, key) = match ask {
            Ask::Key(digest) => {
                if self.unknown_keys.get(digest).is_some_and(|&until| now_ms < until) {
                    return Cached::Refused(Refusal::InvalidApiKey);
                }
                let entry = match self.keys.get(digest) {
                    Some(e) if self.trusted(cfg, e.fetched_ms, now_ms) => Some(e.clone()),
                    _ => self.shared_entry(cfg, digest, store, now_ms),
                };
                let Some(entry) = entry else {
                    return self.lookup(cfg, contract::key_path(&hex::encode(digest), true));
                };
                if let Err(r) = key_usable(&entry, now_ms) {
                    return Cached::Refused(r);
                }
                (entry.tenant.clone(), Some(entry))
            }
            Ask::Tenant(id) => {
                if self.unknown_tenants.get(id).is_some_and(|&until| now_ms < until) {
                    return Cached::Refused(unknown_tenant());
                }
                (id.clone(), None)
            }
        };
        if let Some(i) = plugin.tenant_index(&tenant_id) {
            let tref = TenantRef::Static(i);
            return match usable(&tref, plugin) {
                Ok(()) => Cached::Hit(Resolved { tenant: tref, key: key.and_then(|k| k.info) }),
                Err(r) => Cached::Refused(r),
            };
        }
        match self.tenants.get(&tenant_id) {
            Some(t) if self.trusted(cfg, t.fetched_ms, now_ms) => match &t.tenant {
                Ok(tref) => match usable(tref, plugin) {
                    Ok(()) => Cached::Hit(Resolved { tenant: tref.clone(), key: key.and_then(|k| k.info) }),
                    Err(r) => Cached::Refused(r),
                },
                Err(_) => Cached::Refused(misconfigured()),
            },
            // The key is known but not its tenant's record (or credentials)
            // on this worker: one tenant lookup brings both.
            _ => self.lookup(cfg, contract::tenant_path(&tenant_id, true)),
        }
    }

    fn lookup(&mut self, cfg: &Registry, path: String) -> Cached {
        if self.in_flight >= cfg.max_lookups_in_flight {
            self.stats.lookup_failures += 1;
            return Cached::Refused(unavailable());
        }
        self.in_flight += 1;
        self.stats.lookups += 1;
        Cached::Lookup(path)
    }

    /// A lookup that will never be answered (the request went away, or it
    /// could not be sent).
    pub fn abandoned(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// A valid shared record of `digest`, copied into this worker's memory.
    fn shared_entry(
        &mut self,
        cfg: &Registry,
        digest: &[u8; 32],
        store: &dyn SlotStore,
        now_ms: u64,
    ) -> Option<KeyEntry> {
        let (bytes, _) = store.get(&shared_key(digest)).ok()?;
        let shared: SharedKey = serde_json::from_slice(&bytes?).ok()?;
        if shared.w < self.floor_ms || !self.trusted(cfg, shared.w, now_ms) {
            return None;
        }
        let record = shared.k?;
        let entry = key_entry(&record, shared.w)?;
        self.stats.shared_hits += 1;
        self.remember_key(cfg, *digest, entry.clone());
        Some(entry)
    }

    fn remember_key(&mut self, cfg: &Registry, digest: [u8; 32], entry: KeyEntry) {
        if self.keys.len() >= cfg.max_cached && !self.keys.contains_key(&digest) {
            self.keys.clear();
        }
        self.keys.insert(digest, entry);
    }

    fn slot_of(&mut self, id: &str) -> usize {
        if let Some(&s) = self.slots.get(id) {
            return s;
        }
        let s = REGISTRY_SLOT_BASE.saturating_add(self.slots.len());
        self.slots.insert(id.to_string(), s);
        s
    }

    /// The answer to a lookup this worker sent for `ask`: `status` and
    /// `body` of the HTTP answer (`None`: no answer, e.g. a timeout).
    pub fn answered(
        &mut self,
        plugin: &Plugin,
        ask: &Ask,
        status: Option<u32>,
        body: Option<&[u8]>,
        store: &dyn SlotStore,
        now_ms: u64,
    ) -> Result<Resolved, Refusal> {
        self.in_flight = self.in_flight.saturating_sub(1);
        let Some(cfg) = plugin.registry.as_ref() else { return Err(unavailable()) };
        let answer = match (status, body) {
            (Some(200), Some(b)) => serde_json::from_slice::<LookupAnswer>(b).ok(),
            _ => None,
        };
        let Some(answer) = answer else {
            self.stats.lookup_failures += 1;
            let tenant = match ask {
                Ask::Tenant(id) => id.as_str(),
                Ask::Key(_) => "",
            };
            if let Some(line) = self.incident.failure(tenant, &format!("lookup answered {status:?}"), now_ms) {
                log::warn!("{line}");
            }
            return Err(unavailable());
        };
        for line in self.incident.success(now_ms) {
            log::info!("{line}");
        }
        match (answer.status, ask) {
            (LookupStatus::UnknownKey, Ask::Key(d)) | (LookupStatus::UnknownTenant, Ask::Key(d)) => {
                remember_unknown(&mut self.unknown_keys, cfg, *d, now_ms);
                return Err(Refusal::InvalidApiKey);
            }
            (LookupStatus::UnknownTenant, Ask::Tenant(id)) | (LookupStatus::UnknownKey, Ask::Tenant(id)) => {
                remember_unknown(&mut self.unknown_tenants, cfg, id.clone(), now_ms);
                return Err(unknown_tenant());
            }
            (LookupStatus::Found, _) => {}
        }
        let Some(record) = &answer.tenant else { return Err(unavailable()) };
        let mut key_info = None;
        match ask {
            Ask::Key(digest) => match answer.key.as_ref() {
                // A key lookup answers the key as well.
                Some(k) => {
                    if k.tenant != record.id || k.sha256 != hex::encode(digest) {
                        return Err(unavailable());
                    }
                    let Some(entry) = key_entry(k, now_ms) else {
                        log::warn!("tollgate: the registry's key record has an invalid id, model list or limits");
                        return Err(misconfigured());
                    };
                    self.share_key(digest, answer.version, k, store, now_ms);
                    self.remember_key(cfg, *digest, entry.clone());
                    key_usable(&entry, now_ms)?;
                    key_info = entry.info;
                }
                // A tenant lookup for a key this worker knows.
                None => {
                    let Some(e) = self.keys.get(digest).filter(|e| e.tenant == record.id) else {
                        return Err(unavailable());
                    };
                    key_usable(e, now_ms)?;
                    key_info = e.info.clone();
                }
            },
            Ask::Tenant(id) => {
                if *id != record.id {
                    return Err(unavailable());
                }
            }
        }
        // A key the registry gives to a tenant of the static configuration
        // serves that tenant as configured: the static configuration wins.
        if let Some(i) = plugin.tenant_index(&record.id) {
            let tref = TenantRef::Static(i);
            usable(&tref, plugin)?;
            return Ok(Resolved { tenant: tref, key: key_info });
        }
        let empty = BTreeMap::new();
        let credentials = answer.credentials.as_ref().unwrap_or(&empty);
        let compiled = plugin.registry_tenant(record, credentials);
        let entry = match compiled {
            Ok(t) => {
                if t.policy.max_concurrent_requests.is_some() {
                    let _ = inflight::create(store, &inflight::key(&t.id));
                }
                let slot = self.slot_of(&record.id);
                TenantEntry { tenant: Ok(TenantRef::Registry { slot, tenant: Rc::new(t) }), fetched_ms: now_ms }
            }
            Err(e) => {
                log::warn!("tollgate: registry tenant {} cannot be served: {e}", record.id);
                TenantEntry { tenant: Err(e.to_string()), fetched_ms: now_ms }
            }
        };
        if self.tenants.len() >= cfg.max_cached && !self.tenants.contains_key(&record.id) {
            self.tenants.clear();
        }
        self.tenants.insert(record.id.clone(), entry.clone());
        let tref = entry.tenant.map_err(|_| misconfigured())?;
        usable(&tref, plugin)?;
        Ok(Resolved { tenant: tref, key: key_info })
    }

    /// Writes a key record to shared data unless a newer change tombstoned
    /// (or a newer answer wrote) it.
    fn share_key(&self, digest: &[u8; 32], version: u64, record: &KeyRecord, store: &dyn SlotStore, now_ms: u64) {
        let name = shared_key(digest);
        let value = SharedKey { v: version, w: now_ms, k: Some(record.clone()) };
        let Ok(bytes) = serde_json::to_vec(&value) else { return };
        for _ in 0..3 {
            let Ok((old, cas)) = store.get(&name) else { return };
            let newer = old.and_then(|b| serde_json::from_slice::<SharedKey>(&b).ok()).is_some_and(|o| o.v > version);
            if newer {
                return;
            }
            if store.set(&name, &bytes, cas).is_ok() {
                return;
            }
        }
    }

    /// Marks a shared key record stale as of `version`.
    fn tombstone(&self, digest: &[u8; 32], version: u64, store: &dyn SlotStore, now_ms: u64) {
        let name = shared_key(digest);
        let Ok(bytes) = serde_json::to_vec(&SharedKey { v: version, w: now_ms, k: None }) else { return };
        for _ in 0..3 {
            let Ok((old, cas)) = store.get(&name) else { return };
            let Some(old) = old else { return };
            let newer = serde_json::from_slice::<SharedKey>(&old).ok().is_some_and(|o| o.v >= version);
            if newer || cas.is_none() {
                return;
            }
            if store.set(&name, &bytes, cas).is_ok() {
                return;
            }
        }
    }

    /// The change-feed path to ask now, if a poll is due.
    pub fn poll_due(&mut self, cfg: &Registry, now_ms: u64) -> Option<String> {
        if self.poll_in_flight || now_ms < self.next_poll_ms {
            return None;
        }
        self.poll_in_flight = true;
        self.next_poll_ms = now_ms.saturating_add(cfg.poll_ms);
        Some(contract::changes_path(self.version.unwrap_or(0)))
    }

    /// A poll could not be sent.
    pub fn poll_failed(&mut self) {
        self.poll_in_flight = false;
        self.stats.polls_failed += 1;
    }

    /// The change feed's answer.
    pub fn on_changes(&mut self, status: Option<u32>, body: Option<&[u8]>, store: &dyn SlotStore, now_ms: u64) {
        self.poll_in_flight = false;
        let changes = match (status, body) {
            (Some(200), Some(b)) => serde_json::from_slice::<Changes>(b).ok(),
            _ => None,
        };
        let Some(changes) = changes else {
            self.stats.polls_failed += 1;
            if let Some(line) = self.incident.failure("", &format!("change feed answered {status:?}"), now_ms) {
                log::warn!("{line}");
            }
            return;
        };
        for line in self.incident.success(now_ms) {
            log::info!("{line}");
        }
        let went_back = self.version.is_some_and(|v| changes.version < v);
        let first = self.version.is_none();
        if changes.reset || went_back {
            if !first {
                log::info!("tollgate: tenant registry changes cannot be listed; dropping every cached record");
            }
            self.stats.resets += u64::from(!first);
            self.keys.clear();
            self.tenants.clear();
            self.unknown_keys.clear();
            self.unknown_tenants.clear();
            self.floor_ms = now_ms;
        } else {
            for hex_digest in &changes.keys {
                let mut digest = [0u8; 32];
                if hex::decode_to_slice(hex_digest, &mut digest).is_err() {
                    continue;
                }
                self.keys.remove(&digest);
                self.unknown_keys.remove(&digest);
                self.tombstone(&digest, changes.version, store, now_ms);
            }
            for id in &changes.tenants {
                self.tenants.remove(id);
                self.unknown_tenants.remove(id);
            }
        }
        self.version = Some(changes.version);
        self.last_poll_ok_ms = now_ms;
    }
}

fn remember_unknown<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u64>, cfg: &Registry, k: K, now_ms: u64) {
    if cfg.negative_ttl_ms == 0 {
        return;
    }
    if map.len() >= cfg.max_cached {
        map.retain(|_, until| *until > now_ms);
        if map.len() >= cfg.max_cached {
            map.clear();
        }
    }
    map.insert(k, now_ms.saturating_add(cfg.negative_ttl_ms));
}

fn key_entry(k: &KeyRecord, fetched_ms: u64) -> Option<KeyEntry> {
    let info = if k.id.is_none() && k.limits.is_none() && k.shadow.is_none() && k.models.is_none() {
        None
    } else {
        // A key without a name is named by its digest's first 12 hex digits.
        let id = k.id.as_deref().or_else(|| k.sha256.get(..12))?;
        Some(Rc::new(compile_key("key", id, k.models.as_deref(), k.limits.as_ref(), k.shadow).ok()?))
    };
    Some(KeyEntry { tenant: k.tenant.clone(), expires_at: k.expires_at, revoked: k.revoked, info, fetched_ms })
}

fn key_usable(e: &KeyEntry, now_ms: u64) -> Result<(), Refusal> {
    if e.revoked || e.expires_at.is_some_and(|at| now_ms / 1000 >= at) {
        return Err(Refusal::InvalidApiKey);
    }
    Ok(())
}

/// Whether the reference holds (a disabled tenant is resolved: the caller
/// refuses it, naming it).
fn usable(tref: &TenantRef, plugin: &Plugin) -> Result<(), Refusal> {
    match tref.get(plugin) {
        Some(_) => Ok(()),
        None => Err(unavailable()),
    }
}

/// The tenant a resolved identity names (for tests and tools).
pub fn tenant_of<'a>(r: &'a Resolved, plugin: &'a Plugin) -> Option<&'a Tenant> {
    r.tenant.get(plugin)
}
