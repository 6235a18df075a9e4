//! Redis storage: single node (multiplexed `ConnectionManager`) or Redis Cluster
//! (`cluster_async`), one `EVALSHA` of [`crate::scripts::DECIDE`] per request
//! (on a cluster, per hash tag of the request: [`super::slots`]).

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{ErrorKind, RedisError, ServerErrorKind, Value};
use tokio::sync::Mutex;

use super::{slots, AlertHit, Algorithm, Batch, CounterState, LedgerOp, LedgerWrite, Outcome, Storage, StorageError};
use crate::scripts;

/// Where to connect.
#[derive(Debug, Clone)]
pub enum RedisTarget {
    /// `redis://host:port[/db]`
    Single(String),
    /// Seed nodes of a cluster, `redis://host:port` each.
    Cluster(Vec<String>),
}

enum Backend {
    Single(ConnectionManager),
    // Connected lazily so the service starts (and answers UNAVAILABLE) while the
    // cluster is down, and connects once it is up.
    Cluster(Box<ClusterBackend>),
}

struct ClusterBackend {
    client: redis::cluster::ClusterClient,
    conn: Mutex<Option<ClusterConnection>>,
}

pub struct RedisStorage {
    backend: Backend,
    timeout: Duration,
    sha: String,
}

impl RedisStorage {
    /// Build the client; does not need Redis to be up.
    pub fn new(target: &RedisTarget, timeout: Duration) -> Result<Self, StorageError> {
        let backend = match target {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str())?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(2)
                    .set_min_delay(Duration::from_millis(10))
                    .set_max_delay(Duration::from_millis(200));
                Backend::Single(ConnectionManager::new_lazy_with_config(client, config)?)
            }
            RedisTarget::Cluster(nodes) => {
                let client = redis::cluster::ClusterClient::builder(nodes.iter().map(String::as_str))
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(2)
                    .min_retry_wait(10)
                    .max_retry_wait(200)
                    .build()?;
                Backend::Cluster(Box::new(ClusterBackend { client, conn: Mutex::new(None) }))
            }
        };
        Ok(Self { backend, timeout, sha: redis::Script::new(scripts::DECIDE).get_hash().to_owned() })
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Cluster(_))
    }

    async fn cluster_conn(
        client: &redis::cluster::ClusterClient,
        slot: &Mutex<Option<ClusterConnection>>,
    ) -> Result<ClusterConnection, RedisError> {
        let mut guard = slot.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let c = client.get_async_connection().await?;
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Run one command on whichever backend, bounded by the timeout.
    async fn run<F, Fut>(&self, f: F) -> Result<Value, StorageError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<Value, RedisError>>,
    {
        let work = async {
            let conn = match &self.backend {
                Backend::Single(m) => Conn::Single(m.clone()),
                Backend::Cluster(c) => Conn::Cluster(Self::cluster_conn(&c.client, &c.conn).await?),
            };
            f(conn).await
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(StorageError::Timeout(self.timeout.as_millis() as u64)),
        }
    }
    /// One command (the registry's reads), bounded by the timeout.
    pub async fn query(&self, cmd: &redis::Cmd) -> Result<Value, StorageError> {
        self.run(|mut conn| async move { conn.query(cmd).await }).await
    }

    /// Several commands in one round trip, executed in order; in a cluster
    /// their keys must share a hash slot. A server error in any reply is an error.
    pub async fn query_pipeline(&self, pipe: &redis::Pipeline) -> Result<Vec<Value>, StorageError> {
        let value = self
            .run(|conn| async move {
                let values = match conn {
                    Conn::Single(mut c) => c.req_packed_commands(pipe, 0, pipe.len()).await?,
                    Conn::Cluster(mut c) => c.req_packed_commands(pipe, 0, pipe.len()).await?,
                };
                let values = values.into_iter().map(Value::extract_error).collect::<Result<Vec<_>, _>>()?;
                Ok(Value::Array(values))
            })
            .await?;
        match value {
            Value::Array(v) => Ok(v),
            other => Err(StorageError::Reply(format!("expected an array, got {other:?}"))),
        }
    }

    /// `EVALSHA` of `script` (whose SHA-1 is `sha`), falling back to `EVAL` on `NOSCRIPT`.
    pub async fn eval(&self, script: &str, sha: &str, keys: &[String], argv: &[String]) -> Result<Value, StorageError> {
        let mut evalsha = redis::cmd("EVALSHA");
        evalsha.arg(sha).arg(keys.len()).arg(keys).arg(argv);
        self.run(|mut conn| async move {
            match conn.query(&evalsha).await {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    let mut eval = redis::cmd("EVAL");
                    eval.arg(script).arg(keys.len()).arg(keys).arg(argv);
                    conn.query(&eval).await
                }
                other => other,
            }
        })
        .await
    }
}

/// A connection of either kind.
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn query(&mut self, cmd: &redis::Cmd) -> Result<Value, RedisError> {
        let value = match self {
            Conn::Single(c) => c.req_packed_command(cmd).await?,
            Conn::Cluster(c) => c.req_packed_command(cmd).await?,
        };
        // Server errors (NOSCRIPT, script errors) arrive as values; make them errors.
        value.extract_error()
    }
}

/// Script arguments for a batch (keys, argv).
pub fn script_args(batch: &Batch) -> (Vec<String>, Vec<String>) {
    let mut keys: Vec<String> = batch.counters.iter().map(|c| c.key.clone()).collect();
    let mut argv = Vec::with_capacity(4 + 5 * batch.counters.len());
    argv.push(batch.now_ms.to_string());
    argv.push(if batch.settle { "1" } else { "0" }.to_owned());
    match &batch.idempotency {
        Some(i) => {
            keys.push(i.key.clone());
            keys.push(i.legacy_key.clone());
            argv.push(i.ttl_ms.to_string());
        }
        None => argv.push("0".to_owned()),
    }
    argv.push(batch.counters.len().to_string());
    for c in &batch.counters {
        let (kind, param) = match c.algorithm {
            Algorithm::Gcra { period_ms } => ("1", period_ms),
            // at least 1 ms: PX 0 is an error
            Algorithm::Calendar { end_ms, .. } => ("2", (end_ms - batch.now_ms).max(1) as u64),
        };
        argv.push(kind.to_owned());
        argv.push(c.limit.to_string());
        argv.push(c.hits.to_string());
        argv.push(if c.refund { "1" } else { "0" }.to_owned());
        argv.push(param.to_string());
    }
    if let Some(l) = &batch.ledger {
        ledger_args(l, batch.counters.len(), &mut keys, &mut argv);
    }
    (keys, argv)
}

/// The ledger section of the script's arguments (see [`scripts::DECIDE`]).
fn ledger_args(l: &LedgerWrite, n: usize, keys: &mut Vec<String>, argv: &mut Vec<String>) {
    keys.extend(l.keys.iter().cloned());
    // KEYS positions are 1-based after the counters and idempotency keys.
    let pos = |k: usize| (k + 1).to_string();
    let (qi, qcap) = l.quota_index.map_or(("0".to_owned(), 0), |(k, cap)| (pos(k), cap));
    let (si, smax) = l.alert_stream.map_or(("0".to_owned(), 0), |(k, max)| (pos(k), max));
    argv.extend([qi, qcap.to_string(), si, smax.to_string()]);
    let note = |i: usize| l.notes.get(i);
    argv.push((0..n).map(|i| note(i).map_or("", |x| x.index.as_str())).collect::<Vec<_>>().join(";"));
    let alerts: Vec<String> = (0..n)
        .map(|i| {
            let a = note(i).map(|x| x.alerts.as_slice()).unwrap_or(&[]);
            a.iter().map(|(p, t)| format!("{p}:{t}")).collect::<Vec<_>>().join(",")
        })
        .collect();
    argv.push(if alerts.iter().all(String::is_empty) { String::new() } else { alerts.join(";") });
    argv.push(l.ops.len().to_string());
    for op in &l.ops {
        match op {
            LedgerOp::HashIncr { key, ttl_ms, pairs } => {
                argv.extend(["H".to_owned(), pos(*key), ttl_ms.max(&1).to_string(), pairs.len().to_string()]);
                for (f, v) in pairs {
                    argv.push(f.clone());
                    argv.push(v.to_string());
                }
            }
            LedgerOp::IndexAdd { key, ttl_ms, score, member, trim_below } => {
                argv.extend([
                    "Z".to_owned(),
                    pos(*key),
                    ttl_ms.max(&1).to_string(),
                    score.to_string(),
                    member.clone(),
                    trim_below.to_string(),
                ]);
            }
            LedgerOp::StreamAdd { key, ttl_ms, max_len, fields } => {
                argv.extend([
                    "X".to_owned(),
                    pos(*key),
                    ttl_ms.max(&1).to_string(),
                    max_len.max(&1).to_string(),
                    fields.len().to_string(),
                ]);
                for (f, v) in fields {
                    argv.push(f.clone());
                    argv.push(v.clone());
                }
            }
        }
    }
}

/// Parse the script's reply.
pub fn parse_reply(value: Value, n: usize) -> Result<Outcome, StorageError> {
    let Value::Array(items) = value else {
        return Err(StorageError::Reply(format!("expected an array, got {value:?}")));
    };
    let (head, alerts) = items.split_at(items.len().min(2 + 2 * n));
    if head.len() != 2 + 2 * n {
        return Err(StorageError::Reply(format!("expected {} items, got {}", 2 + 2 * n, items.len())));
    }
    let int = |v: &Value| match v {
        Value::Int(i) => Ok(*i),
        other => Err(StorageError::Reply(format!("expected an integer, got {other:?}"))),
    };
    let [overall, replay, rest @ ..] = head else {
        return Err(StorageError::Reply(format!("expected {} items, got {}", 2 + 2 * n, items.len())));
    };
    let overall = int(overall)?;
    let replay = int(replay)? == 1;
    let mut counters = Vec::with_capacity(n);
    for pair in rest.chunks_exact(2) {
        let [fits, used] = pair else { continue };
        counters.push(CounterState { fits: int(fits)? == 1, used: u64::try_from(int(used)?).unwrap_or(0) });
    }
    let mut taken = Vec::new();
    if let [count, triples @ ..] = alerts {
        if triples.len() != 3 * usize::try_from(int(count)?).unwrap_or(0) {
            return Err(StorageError::Reply(format!("expected {} alert items, got {}", int(count)?, triples.len())));
        }
        for t in triples.chunks_exact(3) {
            let [counter, percent, used] = t else { continue };
            taken.push(AlertHit {
                counter: usize::try_from(int(counter)?).unwrap_or(usize::MAX),
                percent: u32::try_from(int(percent)?).unwrap_or(0),
                used: u64::try_from(int(used)?).unwrap_or(0),
            });
        }
    }
    Ok(Outcome { allowed: overall == 1, replay, counters, alerts: taken })
}

impl RedisStorage {
    /// One `EVALSHA` of [`scripts::DECIDE`] for `batch`, whose keys must share a
    /// slot on a cluster.
    async fn decide(&self, batch: &Batch) -> Result<Outcome, StorageError> {
        let (keys, argv) = script_args(batch);
        let mut evalsha = redis::cmd("EVALSHA");
        evalsha.arg(&self.sha).arg(keys.len()).arg(&keys).arg(&argv);
        let value = self
            .run(|mut conn| async move {
                match conn.query(&evalsha).await {
                    // First call on a node (or after a restart / SCRIPT FLUSH): EVAL
                    // runs the script and caches it for the next EVALSHA.
                    Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                        let mut eval = redis::cmd("EVAL");
                        eval.arg(scripts::DECIDE).arg(keys.len()).arg(&keys).arg(&argv);
                        conn.query(&eval).await
                    }
                    other => other,
                }
            })
            .await?;
        parse_reply(value, batch.counters.len())
    }
}

impl Storage for RedisStorage {
    async fn apply(&self, batch: &Batch) -> Result<Outcome, StorageError> {
        if batch.counters.is_empty() && batch.ledger.is_none() {
            return Ok(Outcome { allowed: true, replay: false, counters: vec![], alerts: vec![] });
        }
        // One script may only touch keys of one slot. On a single node one script
        // decides everything (exact); on a cluster a batch spanning hash tags
        // (a tenant's and a pool's counters) runs one script per tag.
        if self.is_cluster() && slots::spans_slots(batch) {
            return slots::apply_groups(batch, |group| async move { self.decide(&group).await }).await;
        }
        self.decide(batch).await
    }

    async fn ping(&self) -> Result<(), StorageError> {
        let ping = redis::cmd("PING");
        self.run(|mut conn| async move { conn.query(&ping).await }).await?;
        Ok(())
    }
}
