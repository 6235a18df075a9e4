//! Where does the registry live, and how does one change land atomically?
//!
//! Every registry key shares the hash tag `{tollgate-registry}`, so the whole
//! registry sits on one Redis Cluster shard and one Lua script ([`COMMIT`])
//! can check preconditions, write records, bump the version, append the
//! change feed and the audit trail in one atomic step (fine up to ~1M keys;
//! the counters keep spreading over the cluster).
//!
//! ```text
//! {tollgate-registry}:version              integer: the registry version
//! {tollgate-registry}:changes              stream, IDs <version>-<n>, fields kind (tenant|key), id
//! {tollgate-registry}:audit                stream, fields at, actor, action, target, changes (JSON)
//! {tollgate-registry}:tenants              sorted set (score 0, by id): every tenant id
//! {tollgate-registry}:tenant:<id>          JSON model::Tenant
//! {tollgate-registry}:tenant-keys:<id>     sorted set (score 0, by digest): the tenant's keys
//! {tollgate-registry}:creds:<id>           hash provider → JSON model::StoredCredential (sealed)
//! {tollgate-registry}:key:<sha256>         JSON model::ApiKey
//! ```
//!
//! Reads take the version first, then the records (the contract's
//! invariant). Read-modify-writes (patches) are compare-and-set: the script
//! writes only if the record is still the one read, and the store retries.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use redis::Value;
use rls_contract::registry::{Changes, LookupAnswer, LookupStatus, MAX_CHANGES_PER_ANSWER};
use serde::Serialize;
use serde_json::json;

use super::crypto::{KekRing, SealError};
use super::model::{
    ApiKey, CreateTenant, CredentialInfo, ImportKey, IssueKey, PatchKey, PatchTenant, StoredCredential, Tenant,
};
use crate::clock::Clock;
use crate::storage::redis::RedisStorage;
use crate::storage::StorageError;

const P: &str = "{tollgate-registry}";

fn version_key() -> String {
    format!("{P}:version")
}
fn changes_key() -> String {
    format!("{P}:changes")
}
fn audit_key() -> String {
    format!("{P}:audit")
}
fn tenants_key() -> String {
    format!("{P}:tenants")
}
fn tenant_key(id: &str) -> String {
    format!("{P}:tenant:{id}")
}
fn tenant_keys_key(id: &str) -> String {
    format!("{P}:tenant-keys:{id}")
}
fn creds_key(id: &str) -> String {
    format!("{P}:creds:{id}")
}
fn key_prefix() -> String {
    format!("{P}:key:")
}
fn key_key(digest: &str) -> String {
    format!("{P}:key:{digest}")
}

/// Apply one registry change atomically.
///
/// KEYS[1] version, KEYS[2] changes stream, KEYS[3] audit stream,
/// KEYS[3+i] the i-th record key the plan refers to (all under the one hash tag).
///
/// ARGV[1] the plan, JSON (numbers as strings, Lua numbers being doubles):
///   expect  [[cond, i, arg?], ...]  cond: "absent" | "present" (key i exists),
///           "equals" (GET of key i == arg), "hpresent" (field arg of hash i exists)
///   ops     [[op, i, a?, b?], ...]  "set" i a | "del" i | "zadd" i member |
///           "zrem" i member | "hset" i field value | "hdel" i field |
///           "del_members" i prefix kind: delete the record `prefix..member` of every
///           member of sorted set i, record a change (kind, member) each, delete i
///   changes [[kind, id], ...]        change-feed entries (besides del_members')
///   base    version to start from when there is none (service clock, ms: a
///           flushed registry restarts above every version a filter has seen)
///   changes_max, audit_max  approximate stream caps
///   audit   {at, actor, action, target, changes}
///
/// Returns {0, n} when expectation n (1-based) failed (nothing written), or
/// {1, version} after the change. All checks run before the first write.
pub const COMMIT: &str = r#"
local plan = cjson.decode(ARGV[1])
local function k(i) return KEYS[3 + i] end
for n, c in ipairs(plan.expect) do
  local cond, key = c[1], k(c[2])
  if cond == 'absent' then
    if redis.call('EXISTS', key) == 1 then return {0, n} end
  elseif cond == 'present' then
    if redis.call('EXISTS', key) == 0 then return {0, n} end
  elseif cond == 'equals' then
    if redis.call('GET', key) ~= c[3] then return {0, n} end
  elseif cond == 'hpresent' then
    if redis.call('HEXISTS', key, c[3]) == 0 then return {0, n} end
  else
    return redis.error_reply('unknown condition')
  end
end
local v = tonumber(redis.call('GET', KEYS[1]) or plan.base)
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
if last then
  local major = tonumber(string.match(last[1], '^(%d+)-'))
  if major and major > v then v = major end
end
v = v + 1
local changes = {}
for _, op in ipairs(plan.ops) do
  local name, key = op[1], k(op[2])
  if name == 'set' then redis.call('SET', key, op[3])
  elseif name == 'del' then redis.call('DEL', key)
  elseif name == 'zadd' then redis.call('ZADD', key, 0, op[3])
  elseif name == 'zrem' then redis.call('ZREM', key, op[3])
  elseif name == 'hset' then redis.call('HSET', key, op[3], op[4])
  elseif name == 'hdel' then redis.call('HDEL', key, op[3])
  elseif name == 'del_members' then
    for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
      redis.call('DEL', op[3] .. m)
      table.insert(changes, {op[4], m})
    end
    redis.call('DEL', key)
  end
end
for _, c in ipairs(plan.changes) do table.insert(changes, c) end
redis.call('SET', KEYS[1], string.format('%d', v))
for n, c in ipairs(changes) do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', plan.changes_max, string.format('%d-%d', v, n - 1),
    'kind', c[1], 'id', c[2])
end
local a = plan.audit
redis.call('XADD', KEYS[3], 'MAXLEN', '~', plan.audit_max, '*',
  'at', a.at, 'actor', a.actor, 'action', a.action, 'target', a.target, 'changes', a.changes)
return {1, v}
"#;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("registry storage unavailable: {0}")]
    Unavailable(#[from] StorageError),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0} already exists")]
    Conflict(&'static str),
    #[error("the record changed concurrently too often; retry")]
    Contended,
    #[error("a stored registry record is unreadable: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Seal(#[from] SealError),
}

/// A tenant with what the admin API shows of its credentials.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TenantView {
    #[serde(flatten)]
    pub tenant: Tenant,
    pub credentials: Vec<CredentialInfo>,
}

/// One audit entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    pub id: String,
    pub at: u64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub changes: serde_json::Value,
}

/// Who did what, for the audit trail (never a secret in `changes`).
struct Audit<'a> {
    actor: &'a str,
    action: &'a str,
    target: String,
    changes: serde_json::Value,
}

/// A change to commit: record keys, expectations, operations, feed entries.
#[derive(Default)]
struct Plan {
    keys: Vec<String>,
    expect: Vec<serde_json::Value>,
    ops: Vec<serde_json::Value>,
    changes: Vec<serde_json::Value>,
}

impl Plan {
    /// Index of `key` in the plan's keys (1-based, as the script counts).
    fn key(&mut self, key: String) -> usize {
        if let Some(i) = self.keys.iter().position(|k| *k == key) {
            return i + 1;
        }
        self.keys.push(key);
        self.keys.len()
    }
    fn expect(&mut self, cond: &str, key: String, arg: Option<&str>) -> &mut Self {
        let i = self.key(key);
        self.expect.push(match arg {
            Some(a) => json!([cond, i, a]),
            None => json!([cond, i]),
        });
        self
    }
    fn op(&mut self, op: &str, key: String, args: &[&str]) -> &mut Self {
        let i = self.key(key);
        let mut v = vec![json!(op), json!(i)];
        v.extend(args.iter().map(|a| json!(a)));
        self.ops.push(serde_json::Value::Array(v));
        self
    }
    fn change(&mut self, kind: &str, id: &str) -> &mut Self {
        self.changes.push(json!([kind, id]));
        self
    }
}

/// What a commit did.
enum Committed {
    /// Written, with a new registry version.
    Done,
    /// Expectation n (1-based) did not hold; nothing was written.
    Failed(usize),
}

/// The tenant registry on Redis.
pub struct RegistryStore {
    redis: Arc<RedisStorage>,
    kek: Arc<KekRing>,
    clock: Arc<dyn Clock>,
    commit_sha: String,
    changes_max_len: u64,
    audit_max_len: u64,
}

fn to_json<T: Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn opt_string(v: Value) -> Result<Option<String>, StoreError> {
    redis::from_redis_value(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn strings(v: Value) -> Result<Vec<String>, StoreError> {
    redis::from_redis_value(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn hash(v: Value) -> Result<BTreeMap<String, String>, StoreError> {
    redis::from_redis_value(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn version_of(v: Value) -> Result<u64, StoreError> {
    Ok(opt_string(v)?.and_then(|s| s.parse().ok()).unwrap_or(0))
}

/// A stream entry: (id, fields).
type StreamEntry = (String, BTreeMap<String, String>);

fn stream_entries(v: Value) -> Result<Vec<StreamEntry>, StoreError> {
    let Value::Array(items) = v else { return Err(StoreError::Corrupt("stream reply is not an array".into())) };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let (id, fields): (String, Vec<String>) =
            redis::from_redis_value(item).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let map = fields.chunks_exact(2).filter_map(|p| Some((p.first()?.clone(), p.get(1)?.clone()))).collect();
        out.push((id, map));
    }
    Ok(out)
}

/// `<major>-<minor>` of a stream id.
fn stream_id(id: &str) -> Option<(u64, u64)> {
    let (a, b) = id.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Valid stream-id cursor (`before` of the audit listing).
pub fn valid_stream_id(id: &str) -> bool {
    stream_id(id).is_some() && id.bytes().all(|b| b.is_ascii_digit() || b == b'-')
}

/// The first 16 hex characters of a digest: enough to find a key in the audit
/// trail, too few to brute-force a weak imported key from.
fn digest_prefix(d: &str) -> &str {
    d.get(..16).unwrap_or(d)
}

impl RegistryStore {
    pub fn new(
        redis: Arc<RedisStorage>,
        kek: Arc<KekRing>,
        clock: Arc<dyn Clock>,
        changes_max_len: u64,
        audit_max_len: u64,
    ) -> Self {
        let commit_sha = redis::Script::new(COMMIT).get_hash().to_owned();
        Self { redis, kek, clock, commit_sha, changes_max_len, audit_max_len }
    }

    pub fn kek(&self) -> &KekRing {
        &self.kek
    }

    fn now_s(&self) -> u64 {
        u64::try_from(self.clock.now_ms() / 1000).unwrap_or(0)
    }

    async fn commit(&self, plan: Plan, audit: Audit<'_>) -> Result<Committed, StoreError> {
        let now_ms = self.clock.now_ms().max(0);
        let arg = json!({
            "expect": plan.expect,
            "ops": plan.ops,
            "changes": plan.changes,
            "base": now_ms.to_string(),
            "changes_max": self.changes_max_len.to_string(),
            "audit_max": self.audit_max_len.to_string(),
            "audit": {
                "at": now_ms.to_string(),
                "actor": audit.actor,
                "action": audit.action,
                "target": audit.target,
                "changes": audit.changes.to_string(),
            },
        });
        let mut keys = vec![version_key(), changes_key(), audit_key()];
        keys.extend(plan.keys);
        let reply = self.redis.eval(COMMIT, &self.commit_sha, &keys, &[arg.to_string()]).await?;
        let (ok, n): (i64, i64) = redis::from_redis_value(reply).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(if ok == 1 { Committed::Done } else { Committed::Failed(usize::try_from(n).unwrap_or(0)) })
    }

    /// The registry version now (0 before the first change).
    pub async fn version(&self) -> Result<u64, StoreError> {
        version_of(self.redis.query(redis::cmd("GET").arg(version_key())).await?)
    }

    async fn credentials_of(&self, tenant: &str) -> Result<BTreeMap<String, StoredCredential>, StoreError> {
        let raw = hash(self.redis.query(redis::cmd("HGETALL").arg(creds_key(tenant))).await?)?;
        raw.into_iter().map(|(p, v)| Ok((p, from_json::<StoredCredential>("credential", &v)?))).collect()
    }

    /// The tenant and, when asked, its credentials opened; `None` if unknown.
    async fn tenant_with_secrets(
        &self,
        id: &str,
        credentials: bool,
    ) -> Result<Option<(Tenant, Option<BTreeMap<String, String>>)>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(tenant_key(id)).cmd("HGETALL").arg(creds_key(id));
        let mut replies = self.redis.query_pipeline(&pipe).await?.into_iter();
        let (Some(t), Some(c)) = (replies.next(), replies.next()) else {
            return Err(StoreError::Corrupt("short pipeline reply".into()));
        };
        let Some(t) = opt_string(t)? else { return Ok(None) };
        let tenant: Tenant = from_json("tenant", &t)?;
        if !credentials {
            return Ok(Some((tenant, None)));
        }
        let mut open = BTreeMap::new();
        for (provider, v) in hash(c)? {
            let stored: StoredCredential = from_json("credential", &v)?;
            open.insert(provider.clone(), self.kek.open(id, &provider, &stored.sealed)?);
        }
        Ok(Some((tenant, Some(open))))
    }

    /// The filter's key lookup.
    pub async fn lookup_key(&self, digest: &str, credentials: bool) -> Result<LookupAnswer, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(version_key()).cmd("GET").arg(key_key(digest));
        let mut replies = self.redis.query_pipeline(&pipe).await?.into_iter();
        let (Some(v), Some(k)) = (replies.next(), replies.next()) else {
            return Err(StoreError::Corrupt("short pipeline reply".into()));
        };
        let version = version_of(v)?;
        let unknown = |status| LookupAnswer { version, status, tenant: None, key: None, credentials: None };
        let Some(k) = opt_string(k)? else { return Ok(unknown(LookupStatus::UnknownKey)) };
        let key: ApiKey = from_json("key", &k)?;
        let Some((tenant, creds)) = self.tenant_with_secrets(&key.tenant, credentials).await? else {
            return Ok(unknown(LookupStatus::UnknownTenant));
        };
        Ok(LookupAnswer {
            version,
            status: LookupStatus::Found,
            tenant: Some(tenant.record()),
            key: Some(key.record()),
            credentials: creds,
        })
    }

    /// The filter's tenant lookup.
    pub async fn lookup_tenant(&self, id: &str, credentials: bool) -> Result<LookupAnswer, StoreError> {
        let version = self.version().await?;
        Ok(match self.tenant_with_secrets(id, credentials).await? {
            None => LookupAnswer {
                version,
                status: LookupStatus::UnknownTenant,
                tenant: None,
                key: None,
                credentials: None,
            },
            Some((tenant, creds)) => LookupAnswer {
                version,
                status: LookupStatus::Found,
                tenant: Some(tenant.record()),
                key: None,
                credentials: creds,
            },
        })
    }

    /// The change feed after `since`.
    pub async fn changes(&self, since: u64) -> Result<Changes, StoreError> {
        let version = self.version().await?;
        let reset = |version| Changes { version, reset: true, tenants: vec![], keys: vec![] };
        if since > version {
            return Ok(reset(version));
        }
        if since == version {
            return Ok(Changes { version, reset: false, tenants: vec![], keys: vec![] });
        }
        let first = stream_entries(
            self.redis.query(redis::cmd("XRANGE").arg(changes_key()).arg("-").arg("+").arg("COUNT").arg(1)).await?,
        )?;
        // The entry of version since+1 must still be there, whole (first part `-0`).
        match first.first().and_then(|(id, _)| stream_id(id)) {
            Some(first) if first <= (since.saturating_add(1), 0) => {}
            _ => return Ok(reset(version)),
        }
        let (mut tenants, mut keys) = (BTreeSet::new(), BTreeSet::new());
        let page = MAX_CHANGES_PER_ANSWER + 1;
        let mut start = format!("{}-0", since.saturating_add(1));
        // Bounded: at most 10 pages of entries per answer, else a reset.
        for _ in 0..10 {
            let entries = stream_entries(
                self.redis
                    .query(redis::cmd("XRANGE").arg(changes_key()).arg(&start).arg(version).arg("COUNT").arg(page))
                    .await?,
            )?;
            let n = entries.len();
            for (id, fields) in &entries {
                match (fields.get("kind").map(String::as_str), fields.get("id")) {
                    (Some("tenant"), Some(t)) => {
                        tenants.insert(t.clone());
                    }
                    (Some("key"), Some(k)) => {
                        keys.insert(k.clone());
                    }
                    _ => {}
                }
                start = format!("({id}");
            }
            if tenants.len() + keys.len() > MAX_CHANGES_PER_ANSWER {
                return Ok(reset(version));
            }
            if n < page {
                return Ok(Changes {
                    version,
                    reset: false,
                    tenants: tenants.into_iter().collect(),
                    keys: keys.into_iter().collect(),
                });
            }
        }
        Ok(reset(version))
    }

    // ---- admin: tenants ----

    pub async fn create_tenant(&self, actor: &str, req: CreateTenant) -> Result<TenantView, StoreError> {
        let now = self.now_s();
        let tenant = Tenant {
            id: req.id,
            tier: req.tier,
            enabled: req.enabled,
            overrides: req.overrides,
            labels: req.labels,
            created_at: now,
            updated_at: now,
        };
        let mut plan = Plan::default();
        plan.expect("absent", tenant_key(&tenant.id), None)
            .op("set", tenant_key(&tenant.id), &[&to_json(&tenant)?])
            .op("zadd", tenants_key(), &[&tenant.id])
            .change("tenant", &tenant.id);
        let audit = Audit {
            actor,
            action: "tenant.create",
            target: format!("tenant:{}", tenant.id),
            changes: json!({"tier": tenant.tier, "enabled": tenant.enabled, "overrides": tenant.overrides, "labels": tenant.labels}),
        };
        match self.commit(plan, audit).await? {
            Committed::Done => Ok(TenantView { tenant, credentials: vec![] }),
            Committed::Failed(_) => Err(StoreError::Conflict("tenant")),
        }
    }

    async fn tenant_raw(&self, id: &str) -> Result<Option<(String, Tenant)>, StoreError> {
        match opt_string(self.redis.query(redis::cmd("GET").arg(tenant_key(id))).await?)? {
            Some(raw) => {
                let t = from_json("tenant", &raw)?;
                Ok(Some((raw, t)))
            }
            None => Ok(None),
        }
    }

    fn infos(creds: BTreeMap<String, StoredCredential>) -> Vec<CredentialInfo> {
        creds
            .into_iter()
            .map(|(provider, c)| CredentialInfo { provider, kid: c.kid, updated_at: c.updated_at })
            .collect()
    }

    pub async fn get_tenant(&self, id: &str) -> Result<TenantView, StoreError> {
        let (_, tenant) = self.tenant_raw(id).await?.ok_or(StoreError::NotFound("tenant"))?;
        let credentials = Self::infos(self.credentials_of(id).await?);
        Ok(TenantView { tenant, credentials })
    }

    /// Tenants by id after `cursor` (exclusive), at most `limit`; the next cursor if more.
    pub async fn list_tenants(
        &self,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<(Vec<TenantView>, Option<String>), StoreError> {
        let start = cursor.map_or_else(|| "-".to_owned(), |c| format!("({c}"));
        let ids = strings(
            self.redis
                .query(
                    redis::cmd("ZRANGE")
                        .arg(tenants_key())
                        .arg(start)
                        .arg("+")
                        .arg("BYLEX")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(limit + 1),
                )
                .await?,
        )?;
        let more = ids.len() > limit;
        let ids: Vec<String> = ids.into_iter().take(limit).collect();
        let mut out = Vec::with_capacity(ids.len());
        if !ids.is_empty() {
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("GET").arg(tenant_key(id)).cmd("HGETALL").arg(creds_key(id));
            }
            let replies = self.redis.query_pipeline(&pipe).await?;
            let mut it = replies.into_iter();
            while let (Some(t), Some(c)) = (it.next(), it.next()) {
                // A tenant deleted between the two reads is skipped.
                let Some(t) = opt_string(t)? else { continue };
                let tenant: Tenant = from_json("tenant", &t)?;
                let creds = hash(c)?
                    .into_iter()
                    .map(|(p, v)| Ok((p, from_json::<StoredCredential>("credential", &v)?)))
                    .collect::<Result<BTreeMap<_, _>, StoreError>>()?;
                out.push(TenantView { tenant, credentials: Self::infos(creds) });
            }
        }
        let next = if more { ids.last().cloned() } else { None };
        Ok((out, next))
    }

    pub async fn patch_tenant(&self, actor: &str, id: &str, patch: PatchTenant) -> Result<TenantView, StoreError> {
        for _ in 0..5 {
            let (raw, old) = self.tenant_raw(id).await?.ok_or(StoreError::NotFound("tenant"))?;
            let new = patch.apply(&old, self.now_s());
            let mut plan = Plan::default();
            plan.expect("equals", tenant_key(id), Some(&raw))
                .op("set", tenant_key(id), &[&to_json(&new)?])
                .change("tenant", id);
            let mut changes = serde_json::Map::new();
            if let Some(t) = &patch.tier {
                changes.insert("tier".into(), json!({"from": old.tier, "to": t}));
            }
            if let Some(e) = patch.enabled {
                changes.insert("enabled".into(), json!({"from": old.enabled, "to": e}));
            }
            if let Some(o) = &patch.overrides {
                changes.insert("overrides".into(), json!({"from": old.overrides, "to": o}));
            }
            if let Some(l) = &patch.labels {
                changes.insert("labels".into(), json!({"from": old.labels, "to": l}));
            }
            let action =
                match (patch.enabled, patch.tier.is_none() && patch.overrides.is_none() && patch.labels.is_none()) {
                    (Some(false), true) => "tenant.disable",
                    (Some(true), true) => "tenant.enable",
                    _ => "tenant.update",
                };
            let audit = Audit { actor, action, target: format!("tenant:{id}"), changes: changes.into() };
            if let Committed::Done = self.commit(plan, audit).await? {
                let credentials = Self::infos(self.credentials_of(id).await?);
                return Ok(TenantView { tenant: new, credentials });
            }
        }
        Err(StoreError::Contended)
    }

    /// Delete a tenant with its keys and credentials (a key change per key).
    pub async fn delete_tenant(&self, actor: &str, id: &str) -> Result<(), StoreError> {
        let mut plan = Plan::default();
        plan.expect("present", tenant_key(id), None)
            .op("del", tenant_key(id), &[])
            .op("zrem", tenants_key(), &[id])
            .op("del", creds_key(id), &[])
            .op("del_members", tenant_keys_key(id), &[&key_prefix(), "key"])
            .change("tenant", id);
        let audit = Audit { actor, action: "tenant.delete", target: format!("tenant:{id}"), changes: json!({}) };
        match self.commit(plan, audit).await? {
            Committed::Done => Ok(()),
            Committed::Failed(_) => Err(StoreError::NotFound("tenant")),
        }
    }

    // ---- admin: keys ----

    async fn add_key(&self, actor: &str, action: &str, key: &ApiKey) -> Result<(), StoreError> {
        let mut plan = Plan::default();
        plan.expect("present", tenant_key(&key.tenant), None)
            .expect("absent", key_key(&key.sha256), None)
            .op("set", key_key(&key.sha256), &[&to_json(key)?])
            .op("zadd", tenant_keys_key(&key.tenant), &[&key.sha256])
            .change("key", &key.sha256);
        let audit = Audit {
            actor,
            action,
            target: format!("key:{}", digest_prefix(&key.sha256)),
            changes: json!({"tenant": key.tenant, "label": key.label, "expires_at": key.expires_at, "models": key.models}),
        };
        match self.commit(plan, audit).await? {
            Committed::Done => Ok(()),
            Committed::Failed(1) => Err(StoreError::NotFound("tenant")),
            Committed::Failed(_) => Err(StoreError::Conflict("key")),
        }
    }

    /// Issue a new random key: returns the plain key (shown once) and its record.
    pub async fn issue_key(&self, actor: &str, tenant: &str, req: IssueKey) -> Result<(String, ApiKey), StoreError> {
        let plain = super::new_client_key();
        let key = ApiKey {
            sha256: super::sha256_hex(plain.as_bytes()),
            tenant: tenant.to_owned(),
            label: req.label,
            created_at: self.now_s(),
            expires_at: req.expires_at,
            revoked: false,
            models: req.models,
            name: req.name,
            limits: super::model::round_limits(req.limits),
            shadow: req.shadow,
        };
        self.add_key(actor, "key.issue", &key).await?;
        Ok((plain, key))
    }

    pub async fn import_key(&self, actor: &str, tenant: &str, req: ImportKey) -> Result<ApiKey, StoreError> {
        let key = ApiKey {
            sha256: req.sha256,
            tenant: tenant.to_owned(),
            label: req.label,
            created_at: self.now_s(),
            expires_at: req.expires_at,
            revoked: false,
            models: req.models,
            name: req.name,
            limits: super::model::round_limits(req.limits),
            shadow: req.shadow,
        };
        self.add_key(actor, "key.import", &key).await?;
        Ok(key)
    }

    async fn key_raw(&self, digest: &str) -> Result<(String, ApiKey), StoreError> {
        let raw = opt_string(self.redis.query(redis::cmd("GET").arg(key_key(digest))).await?)?
            .ok_or(StoreError::NotFound("key"))?;
        let key = from_json("key", &raw)?;
        Ok((raw, key))
    }

    pub async fn get_key(&self, digest: &str) -> Result<ApiKey, StoreError> {
        Ok(self.key_raw(digest).await?.1)
    }

    pub async fn list_keys(
        &self,
        tenant: &str,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<(Vec<ApiKey>, Option<String>), StoreError> {
        let mut pipe = redis::pipe();
        let start = cursor.map_or_else(|| "-".to_owned(), |c| format!("({c}"));
        pipe.cmd("EXISTS").arg(tenant_key(tenant));
        pipe.cmd("ZRANGE")
            .arg(tenant_keys_key(tenant))
            .arg(start)
            .arg("+")
            .arg("BYLEX")
            .arg("LIMIT")
            .arg(0)
            .arg(limit + 1);
        let mut replies = self.redis.query_pipeline(&pipe).await?.into_iter();
        let (Some(exists), Some(digests)) = (replies.next(), replies.next()) else {
            return Err(StoreError::Corrupt("short pipeline reply".into()));
        };
        if !matches!(exists, Value::Int(1)) {
            return Err(StoreError::NotFound("tenant"));
        }
        let digests = strings(digests)?;
        let more = digests.len() > limit;
        let digests: Vec<String> = digests.into_iter().take(limit).collect();
        let mut out = Vec::with_capacity(digests.len());
        if !digests.is_empty() {
            let mut mget = redis::cmd("MGET");
            for d in &digests {
                mget.arg(key_key(d));
            }
            let values: Vec<Option<String>> = redis::from_redis_value(self.redis.query(&mget).await?)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            for v in values.into_iter().flatten() {
                out.push(from_json("key", &v)?);
            }
        }
        let next = if more { digests.last().cloned() } else { None };
        Ok((out, next))
    }

    async fn update_key(
        &self,
        actor: &str,
        digest: &str,
        action: &str,
        change: impl Fn(&ApiKey) -> (ApiKey, serde_json::Value),
    ) -> Result<ApiKey, StoreError> {
        for _ in 0..5 {
            let (raw, old) = self.key_raw(digest).await?;
            let (new, changes) = change(&old);
            let mut plan = Plan::default();
            plan.expect("equals", key_key(digest), Some(&raw))
                .op("set", key_key(digest), &[&to_json(&new)?])
                .change("key", digest);
            let audit = Audit { actor, action, target: format!("key:{}", digest_prefix(digest)), changes };
            if let Committed::Done = self.commit(plan, audit).await? {
                return Ok(new);
            }
        }
        Err(StoreError::Contended)
    }

    pub async fn patch_key(&self, actor: &str, digest: &str, patch: PatchKey) -> Result<ApiKey, StoreError> {
        self.update_key(actor, digest, "key.update", |old| {
            let mut changes = serde_json::Map::new();
            if let Some(l) = &patch.label {
                changes.insert("label".into(), json!({"from": old.label, "to": l}));
            }
            if let Some(e) = &patch.expires_at {
                changes.insert("expires_at".into(), json!({"from": old.expires_at, "to": e}));
            }
            if let Some(m) = &patch.models {
                changes.insert("models".into(), json!({"from": old.models, "to": m}));
            }
            if let Some(n) = &patch.name {
                changes.insert("name".into(), json!({"from": old.name, "to": n}));
            }
            if let Some(l) = &patch.limits {
                changes.insert("limits".into(), json!({"from": old.limits, "to": l}));
            }
            if let Some(sh) = &patch.shadow {
                changes.insert("shadow".into(), json!({"from": old.shadow, "to": sh}));
            }
            (patch.apply(old), changes.into())
        })
        .await
    }

    pub async fn revoke_key(&self, actor: &str, digest: &str) -> Result<ApiKey, StoreError> {
        self.update_key(actor, digest, "key.revoke", |old| {
            let mut new = old.clone();
            new.revoked = true;
            (new, json!({"revoked": {"from": old.revoked, "to": true}}))
        })
        .await
    }

    pub async fn delete_key(&self, actor: &str, digest: &str) -> Result<(), StoreError> {
        for _ in 0..5 {
            let (raw, old) = self.key_raw(digest).await?;
            let mut plan = Plan::default();
            plan.expect("equals", key_key(digest), Some(&raw))
                .op("del", key_key(digest), &[])
                .op("zrem", tenant_keys_key(&old.tenant), &[digest])
                .change("key", digest);
            let audit = Audit {
                actor,
                action: "key.delete",
                target: format!("key:{}", digest_prefix(digest)),
                changes: json!({"tenant": old.tenant}),
            };
            if let Committed::Done = self.commit(plan, audit).await? {
                return Ok(());
            }
        }
        Err(StoreError::Contended)
    }

    // ---- admin: credentials ----

    pub async fn set_credential(
        &self,
        actor: &str,
        tenant: &str,
        provider: &str,
        secret: &str,
    ) -> Result<CredentialInfo, StoreError> {
        let (sealed, kid) = self.kek.seal(tenant, provider, secret)?;
        let stored = StoredCredential { sealed, kid: kid.clone(), updated_at: self.now_s() };
        let mut plan = Plan::default();
        plan.expect("present", tenant_key(tenant), None)
            .op("hset", creds_key(tenant), &[provider, &to_json(&stored)?])
            .change("tenant", tenant);
        let audit = Audit {
            actor,
            action: "credential.set",
            target: format!("tenant:{tenant}"),
            changes: json!({"provider": provider, "kid": kid}),
        };
        match self.commit(plan, audit).await? {
            Committed::Done => Ok(CredentialInfo { provider: provider.to_owned(), kid, updated_at: stored.updated_at }),
            Committed::Failed(_) => Err(StoreError::NotFound("tenant")),
        }
    }

    pub async fn delete_credential(&self, actor: &str, tenant: &str, provider: &str) -> Result<(), StoreError> {
        let mut plan = Plan::default();
        plan.expect("present", tenant_key(tenant), None)
            .expect("hpresent", creds_key(tenant), Some(provider))
            .op("hdel", creds_key(tenant), &[provider])
            .change("tenant", tenant);
        let audit = Audit {
            actor,
            action: "credential.delete",
            target: format!("tenant:{tenant}"),
            changes: json!({"provider": provider}),
        };
        match self.commit(plan, audit).await? {
            Committed::Done => Ok(()),
            Committed::Failed(1) => Err(StoreError::NotFound("tenant")),
            Committed::Failed(_) => Err(StoreError::NotFound("credential")),
        }
    }

    // ---- admin: audit ----

    /// Newest first, before `before` (exclusive), at most `limit`.
    pub async fn audit(
        &self,
        limit: usize,
        before: Option<&str>,
    ) -> Result<(Vec<AuditEntry>, Option<String>), StoreError> {
        // Nothing is before the first possible id (and Redis refuses `(0-0`).
        if before.and_then(stream_id) == Some((0, 0)) {
            return Ok((vec![], None));
        }
        let end = before.map_or_else(|| "+".to_owned(), |b| format!("({b}"));
        let raw = stream_entries(
            self.redis
                .query(redis::cmd("XREVRANGE").arg(audit_key()).arg(end).arg("-").arg("COUNT").arg(limit + 1))
                .await?,
        )?;
        let more = raw.len() > limit;
        let entries: Vec<AuditEntry> = raw
            .into_iter()
            .take(limit)
            .map(|(id, f)| AuditEntry {
                at: f.get("at").and_then(|s| s.parse().ok()).unwrap_or(0),
                actor: f.get("actor").cloned().unwrap_or_default(),
                action: f.get("action").cloned().unwrap_or_default(),
                target: f.get("target").cloned().unwrap_or_default(),
                changes: f.get("changes").and_then(|c| serde_json::from_str(c).ok()).unwrap_or_else(|| json!({})),
                id,
            })
            .collect();
        let next = if more { entries.last().map(|e| e.id.clone()) } else { None };
        Ok((entries, next))
    }
}
