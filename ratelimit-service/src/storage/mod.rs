//! Storage behind a trait: the decision for a whole batch is one atomic call
//! (on Redis Cluster, one per hash slot, see [`slots`]).

pub mod redis;
pub mod slots;

use std::future::Future;

/// How a counter is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Smooth rate (GCRA). State: a level in hit·ms that drains by `limit` per ms,
    /// capacity `limit * period_ms` (burst = the full limit).
    Gcra { period_ms: u64 },
    /// Calendar window `[start_ms, end_ms)`; the key expires at its end.
    Calendar { start_ms: i64, end_ms: i64 },
}

/// One counter to check and charge.
#[derive(Debug, Clone, PartialEq)]
pub struct Counter {
    pub key: String,
    /// The `{...}` hash tag of `key`.
    pub hash_tag: String,
    pub algorithm: Algorithm,
    /// The full limit, at most [`rls_contract::MAX_EXACT`].
    pub limit: u64,
    /// Hits to charge (or refund); 0 = pure check.
    pub hits: u64,
    /// Give `hits` back instead of charging them; never below zero.
    pub refund: bool,
}

/// At-most-once application of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Idempotency {
    /// The Redis key, in the first counter's slot.
    pub key: String,
    /// The same key as the service named it before (read when `key` is
    /// absent, never written; see [`crate::keys::legacy_idempotency_key`]).
    pub legacy_key: String,
    /// The caller's key as it came (`x-tollgate-idempotency-key`): on Redis
    /// Cluster each further slot of the batch gets its own Redis key from it.
    pub request_key: String,
    pub ttl_ms: u64,
}

impl Idempotency {
    /// The idempotency of a call keyed `request_key` in `mode`, in the slot of
    /// hash tag `tag`.
    pub fn new(tag: &str, mode: rls_contract::Mode, request_key: &str, ttl_ms: u64) -> Self {
        Idempotency {
            key: crate::keys::idempotency_key(tag, mode, request_key),
            legacy_key: crate::keys::legacy_idempotency_key(tag, mode, request_key),
            request_key: request_key.to_owned(),
            ttl_ms,
        }
    }

    /// The key of the undo of this call (Redis Cluster, see
    /// [`crate::storage::slots::undo`]).
    pub fn undo(&self) -> Self {
        Idempotency { key: format!("{}:u", self.key), legacy_key: format!("{}:undo", self.legacy_key), ..self.clone() }
    }
}

/// All counters of one request: decided and charged together.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Service clock; storage never reads its own time.
    pub now_ms: i64,
    /// Apply unconditionally (settle) instead of all-or-nothing.
    pub settle: bool,
    pub counters: Vec<Counter>,
    pub idempotency: Option<Idempotency>,
    /// The ledger, quota index and alert writes that ride with the decision
    /// (same script, same round trip, same idempotency): all in the tenant's
    /// hash tag, which is the first counter's when there are counters.
    pub ledger: Option<LedgerWrite>,
}

/// What the decision script writes besides the counters, only when the batch
/// is applied and is not a replay. See [`crate::ledger`] for the layout.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LedgerWrite {
    /// The tenant's `{...}` hash tag: every key below carries it.
    pub hash_tag: String,
    /// Keys the writes name (`KeyRef` indexes into this list).
    pub keys: Vec<String>,
    /// The per-tenant quota index (a hash: counter identity → limit and
    /// window) and its most entries.
    pub quota_index: Option<(KeyRef, u64)>,
    /// The per-tenant alert stream and its approximate length bound.
    pub alert_stream: Option<(KeyRef, u64)>,
    /// One per counter, in counter order (may be shorter: the rest have none).
    pub notes: Vec<CounterNote>,
    /// Ledger writes (usage rows).
    pub ops: Vec<LedgerOp>,
}

/// An index into [`LedgerWrite::keys`].
pub type KeyRef = usize;

/// What to remember about one counter when it is charged.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CounterNote {
    /// Quota index parameters `<unit letter>|<window start>|<tz>|<anchor>`
    /// (`-` for a rate's window), for an entry written when the charge
    /// creates the counter (a new window or rate bucket); empty: not indexed.
    /// The script derives the field and the rest of the value from the
    /// counter's key and arguments (see [`crate::ledger::QuotaEntry`]).
    pub index: String,
    /// Alert thresholds `(percent, threshold in hits)`, calendar counters only.
    pub alerts: Vec<(u32, u64)>,
}

/// One ledger write.
#[derive(Debug, Clone, PartialEq)]
pub enum LedgerOp {
    /// HINCRBY each field, then PEXPIRE.
    HashIncr { key: KeyRef, ttl_ms: u64, pairs: Vec<(String, u64)> },
    /// ZADD `member` with `score`, drop members scored below `trim_below`, PEXPIRE.
    IndexAdd { key: KeyRef, ttl_ms: u64, score: i64, member: String, trim_below: i64 },
    /// XADD with `MAXLEN ~ max_len`, then PEXPIRE.
    StreamAdd { key: KeyRef, ttl_ms: u64, max_len: u64, fields: Vec<(String, String)> },
}

/// A threshold a charge made a counter reach, decided once per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlertHit {
    /// Index of the counter in the batch.
    pub counter: usize,
    pub percent: u32,
    /// Usage in the window after the charge.
    pub used: u64,
}

/// The state of one counter after the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterState {
    /// The request's hits fit under this counter's limit.
    pub fits: bool,
    /// Calendar: usage in the window. GCRA: level in hit·ms (see [`Algorithm::Gcra`]).
    /// After the charge if the batch was applied, before it otherwise.
    pub used: u64,
}

/// The result of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Charged (true) or refused with nothing charged (false).
    pub allowed: bool,
    /// An idempotent retry: nothing charged, `allowed` is the first decision and
    /// `counters` are the current states.
    pub replay: bool,
    pub counters: Vec<CounterState>,
    /// Thresholds crossed by this batch (each at most once per window, across
    /// every replica).
    pub alerts: Vec<AlertHit>,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage did not answer within {0} ms")]
    Timeout(u64),
    #[error("storage error: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("unexpected storage reply: {0}")]
    Reply(String),
}

impl StorageError {
    /// Transient errors (Redis down, slow, failing over) answer gRPC UNAVAILABLE.
    /// Every storage error is one: a request is never refused for where its
    /// counters live (a batch spanning Redis Cluster slots is split, see [`slots`]).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Timeout(_) | Self::Redis(_) | Self::Reply(_) => true,
        }
    }
}

/// Where counters live.
pub trait Storage: Send + Sync + 'static {
    /// Decide and (if allowed, or settle) charge all counters of `batch` atomically.
    fn apply(&self, batch: &Batch) -> impl Future<Output = Result<Outcome, StorageError>> + Send;
    /// Cheap liveness probe for health reporting.
    fn ping(&self) -> impl Future<Output = Result<(), StorageError>> + Send;
}
