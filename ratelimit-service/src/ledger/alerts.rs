//! How does a budget alert reach the operator? The decision script takes each
//! (counter, window, threshold) once (see [`crate::scripts::DECIDE`]); the
//! service then builds the event, appends it to the global alert stream and,
//! with a webhook configured, to a durable outbox in Redis. A delivery worker
//! (any replica; claims are leased) POSTs each event, signed, and retries with
//! exponential backoff until the receiver answers 2xx or the event is older
//! than the maximum age. Every attempt is logged in the delivery stream.
//!
//! ```text
//! tg:{tollgate-alerts}:events          stream  id, event (JSON)          MAXLEN ~ --alert-stream-max-len
//! tg:{tollgate-alerts}:seen:<id>       marker: enqueue is idempotent (7 days)
//! tg:{tollgate-alerts}:outbox:due      zset    id → next attempt (ms)
//! tg:{tollgate-alerts}:outbox:body     hash    id → event JSON
//! tg:{tollgate-alerts}:outbox:attempts hash    id → attempts so far
//! tg:{tollgate-alerts}:deliveries      stream  id, status, attempt, http_status, error, at   MAXLEN ~ 10000
//! ```

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use redis::Value;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::metrics::Metrics;
use crate::storage::redis::RedisStorage;
use crate::storage::StorageError;

pub const EVENTS_STREAM: &str = "tg:{tollgate-alerts}:events";
pub const OUTBOX_DUE: &str = "tg:{tollgate-alerts}:outbox:due";
pub const OUTBOX_BODY: &str = "tg:{tollgate-alerts}:outbox:body";
pub const OUTBOX_ATTEMPTS: &str = "tg:{tollgate-alerts}:outbox:attempts";
pub const DELIVERIES_STREAM: &str = "tg:{tollgate-alerts}:deliveries";
const SEEN_PREFIX: &str = "tg:{tollgate-alerts}:seen:";
const DELIVERIES_MAX_LEN: u64 = 10_000;

/// Header of the signature: `sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub const SIGNATURE_HEADER: &str = "x-tollgate-signature";
/// Header of the signing time, unix seconds.
pub const TIMESTAMP_HEADER: &str = "x-tollgate-timestamp";
/// Header of the event id (the receiver's deduplication key).
pub const EVENT_ID_HEADER: &str = "x-tollgate-event-id";

/// The id of an alert: unique per (counter key with its window, threshold).
pub fn event_id(counter_key: &str, percent: u32) -> String {
    let d = Sha256::digest(format!("{counter_key}:{percent}").as_bytes());
    hex::encode(d.get(..16).unwrap_or(&[]))
}

/// A webhook secret: never shown by `Debug`.
#[derive(Clone)]
pub struct WebhookSecret(Arc<Vec<u8>>);

impl WebhookSecret {
    pub fn new(secret: &str) -> Self {
        Self(Arc::new(secret.trim().as_bytes().to_vec()))
    }
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

/// `sha256=<hex>` of `"<timestamp>.<body>"`.
pub fn sign(secret: &WebhookSecret, timestamp: i64, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&secret.0) else {
        return String::new();
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Check a signature as a receiver would (constant time).
pub fn verify(secret: &WebhookSecret, timestamp: i64, body: &[u8], signature: &str) -> bool {
    let Some(hex_sig) = signature.strip_prefix("sha256=") else { return false };
    let Ok(given) = hex::decode(hex_sig) else { return false };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&secret.0) else { return false };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

/// Webhook delivery settings.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// `http://host:port/path` (plain HTTP: put TLS in a sidecar or proxy).
    pub url: String,
    pub secret: WebhookSecret,
    /// An event older than this is dropped (logged as `expired`).
    pub max_age: Duration,
    /// Time one POST may take.
    pub timeout: Duration,
    /// First retry delay; doubles per attempt up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// How often the worker looks for due events.
    pub poll: Duration,
}

impl WebhookSettings {
    pub fn new(url: String, secret: WebhookSecret) -> Self {
        Self {
            url,
            secret,
            max_age: Duration::from_secs(72 * 3600),
            timeout: Duration::from_secs(5),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            poll: Duration::from_millis(500),
        }
    }
}

/// Where alerts go.
#[derive(Debug, Clone)]
pub struct AlertSink {
    pub stream_max_len: u64,
    /// Enqueue for webhook delivery.
    pub webhook: bool,
}

const ENQUEUE: &str = r#"
-- KEYS[1] seen marker, KEYS[2] events stream, KEYS[3] outbox due, KEYS[4] outbox body
-- ARGV[1] id, ARGV[2] event JSON, ARGV[3] now ms, ARGV[4] stream MAXLEN, ARGV[5] '1' = webhook
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', 604800000) then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'id', ARGV[1], 'event', ARGV[2])
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
end
return 1
"#;

const CLAIM: &str = r#"
-- KEYS[1] due, KEYS[2] body, KEYS[3] attempts; ARGV[1] now, ARGV[2] lease ms, ARGV[3] batch
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local body = redis.call('HGET', KEYS[2], id)
  if body then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), id)
    out[#out + 1] = id
    out[#out + 1] = body
    out[#out + 1] = tonumber(redis.call('HGET', KEYS[3], id) or '0')
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"#;

/// Append an alert event to the global stream and (webhook on) the outbox.
/// Idempotent per event id.
pub async fn enqueue(
    storage: &RedisStorage,
    sink: &AlertSink,
    id: &str,
    event: &str,
    now_ms: i64,
) -> Result<bool, StorageError> {
    let keys = vec![format!("{SEEN_PREFIX}{id}"), EVENTS_STREAM.into(), OUTBOX_DUE.into(), OUTBOX_BODY.into()];
    let argv = vec![
        id.to_owned(),
        event.to_owned(),
        now_ms.to_string(),
        sink.stream_max_len.max(1).to_string(),
        if sink.webhook { "1" } else { "0" }.to_owned(),
    ];
    let sha = redis::Script::new(ENQUEUE).get_hash().to_owned();
    let v = storage.eval(ENQUEUE, &sha, &keys, &argv).await?;
    Ok(matches!(v, Value::Int(1)))
}

/// One claimed event.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: String,
    pub body: String,
    pub attempts: u64,
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// Claim due events for `lease`: other replicas skip them meanwhile.
pub async fn claim(
    storage: &RedisStorage,
    now_ms: i64,
    lease: Duration,
    batch: usize,
) -> Result<Vec<Claimed>, StorageError> {
    let keys = vec![OUTBOX_DUE.to_owned(), OUTBOX_BODY.to_owned(), OUTBOX_ATTEMPTS.to_owned()];
    let argv = vec![now_ms.to_string(), lease.as_millis().to_string(), batch.to_string()];
    let sha = redis::Script::new(CLAIM).get_hash().to_owned();
    let Value::Array(items) = storage.eval(CLAIM, &sha, &keys, &argv).await? else {
        return Err(StorageError::Reply("claim: expected an array".into()));
    };
    Ok(items
        .chunks_exact(3)
        .filter_map(|c| match c {
            [id, body, attempts] => Some(Claimed {
                id: text(id)?,
                body: text(body)?,
                attempts: text(attempts).and_then(|a| a.parse().ok()).unwrap_or(0),
            }),
            _ => None,
        })
        .collect())
}

/// The result of one POST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Delivered(u16),
    Failed { http_status: Option<u16>, error: String },
}

/// Record an attempt: delivered or expired events leave the outbox, failed
/// ones are due again after the backoff. Returns the status logged.
pub async fn record(
    storage: &RedisStorage,
    settings: &WebhookSettings,
    c: &Claimed,
    attempt: &Attempt,
    event_at_ms: i64,
    now_ms: i64,
) -> Result<&'static str, StorageError> {
    let n = c.attempts + 1;
    let mut pipe = redis::pipe();
    let (status, http_status, error) = match attempt {
        Attempt::Delivered(code) => ("delivered", Some(*code), String::new()),
        Attempt::Failed { http_status, error } => {
            let expired =
                now_ms.saturating_sub(event_at_ms) > i64::try_from(settings.max_age.as_millis()).unwrap_or(i64::MAX);
            (if expired { "expired" } else { "failed" }, *http_status, error.clone())
        }
    };
    if status == "failed" {
        let backoff = backoff(settings, n);
        pipe.cmd("HSET").arg(OUTBOX_ATTEMPTS).arg(&c.id).arg(n).ignore();
        pipe.cmd("ZADD")
            .arg(OUTBOX_DUE)
            .arg(now_ms + i64::try_from(backoff.as_millis()).unwrap_or(i64::MAX / 2))
            .arg(&c.id)
            .ignore();
    } else {
        pipe.cmd("ZREM").arg(OUTBOX_DUE).arg(&c.id).ignore();
        pipe.cmd("HDEL").arg(OUTBOX_BODY).arg(&c.id).ignore();
        pipe.cmd("HDEL").arg(OUTBOX_ATTEMPTS).arg(&c.id).ignore();
    }
    pipe.cmd("XADD")
        .arg(DELIVERIES_STREAM)
        .arg("MAXLEN")
        .arg("~")
        .arg(DELIVERIES_MAX_LEN)
        .arg("*")
        .arg("id")
        .arg(&c.id)
        .arg("status")
        .arg(status)
        .arg("attempt")
        .arg(n)
        .arg("http_status")
        .arg(http_status.map(|s| s.to_string()).unwrap_or_default())
        .arg("error")
        .arg(error)
        .arg("at")
        .arg(now_ms)
        .ignore();
    storage.query_pipeline(&pipe).await?;
    Ok(status)
}

/// Delay before attempt `n + 1` (after `n` failures): min_backoff · 2^(n-1), capped.
pub fn backoff(settings: &WebhookSettings, n: u64) -> Duration {
    let exp = u32::try_from(n.saturating_sub(1).min(20)).unwrap_or(20);
    settings.min_backoff.saturating_mul(1u32 << exp).min(settings.max_backoff)
}

/// A parsed `http://host[:port]/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
}

/// Parse a plain-HTTP webhook URL (`https` is refused: see the README).
pub fn parse_url(url: &str) -> Option<HttpUrl> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (rest.get(..i)?, rest.get(i..)?),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse().ok()?),
        _ => (authority, 80),
    };
    if host.is_empty() || path.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
        return None;
    }
    Some(HttpUrl { host: host.to_owned(), port, path: path.to_owned() })
}

/// POST one event, signed.
pub async fn post(settings: &WebhookSettings, id: &str, body: &str, now_s: i64) -> Attempt {
    let Some(url) = parse_url(&settings.url) else {
        return Attempt::Failed { http_status: None, error: "invalid webhook URL".into() };
    };
    let work = async {
        let stream = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| format!("connect: {}", e.kind()))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::post(url.path.as_str())
            .header("host", format!("{}:{}", url.host, url.port))
            .header("content-type", "application/json")
            .header("user-agent", "tollgate-ratelimit")
            .header(TIMESTAMP_HEADER, now_s.to_string())
            .header(SIGNATURE_HEADER, sign(&settings.secret, now_s, body.as_bytes()))
            .header(EVENT_ID_HEADER, id)
            .body(Full::new(Bytes::from(body.to_owned())))
            .map_err(|e| format!("request: {e}"))?;
        let resp = sender.send_request(req).await.map_err(|e| format!("send: {e}"))?;
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        Ok::<u16, String>(status)
    };
    match tokio::time::timeout(settings.timeout, work).await {
        Ok(Ok(s)) if (200..300).contains(&s) => Attempt::Delivered(s),
        Ok(Ok(s)) => Attempt::Failed { http_status: Some(s), error: "non-2xx answer".into() },
        Ok(Err(e)) => Attempt::Failed { http_status: None, error: e },
        Err(_) => Attempt::Failed { http_status: None, error: "timeout".into() },
    }
}

fn event_time(body: &str) -> Option<i64> {
    serde_json::from_str::<serde_json::Value>(body).ok()?.get("at_ms")?.as_i64()
}

/// Deliver due events until `stop` resolves; every replica may run one.
pub async fn run_worker(
    storage: Arc<RedisStorage>,
    settings: WebhookSettings,
    metrics: Arc<Metrics>,
    clock: Arc<dyn crate::clock::Clock>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let lease = settings.timeout * 3;
    loop {
        let now = clock.now_ms();
        let mut busy = false;
        match claim(&storage, now, lease, 16).await {
            Ok(batch) => {
                busy = !batch.is_empty();
                for c in batch {
                    let attempt = post(&settings, &c.id, &c.body, clock.now_ms() / 1000).await;
                    let at = event_time(&c.body).unwrap_or(now);
                    match record(&storage, &settings, &c, &attempt, at, clock.now_ms()).await {
                        Ok(status) => {
                            metrics.alert_delivery(status);
                            if status != "delivered" {
                                tracing::info!(event = %c.id, status, attempt = c.attempts + 1, ?attempt, "alert webhook not delivered");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, event = %c.id, "cannot record an alert delivery"),
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot claim alert deliveries"),
        }
        let pause = if busy { Duration::from_millis(10) } else { settings.poll };
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// An alert event (version 1), as delivered.
#[allow(clippy::too_many_arguments)]
pub fn event_json(
    id: &str,
    domain: &str,
    descriptor: &[(String, String)],
    unit: rls_contract::Unit,
    limit: u64,
    percent: u32,
    threshold: u64,
    used: u64,
    window: (i64, i64),
    at_ms: i64,
) -> String {
    let entries: serde_json::Map<String, serde_json::Value> =
        descriptor.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    let tenant = descriptor.iter().find(|(k, _)| k == "tenant").or(descriptor.first()).map(|(_, v)| v.clone());
    json!({
        "version": 1,
        "id": id,
        "type": "budget.threshold_reached",
        "domain": domain,
        "tenant": tenant,
        "level": super::read::level_of(descriptor),
        "limit_name": descriptor.iter().find(|(k, _)| k == "limit").map(|(_, v)| v.clone()),
        "descriptor": entries,
        "unit": unit.name(),
        "limit": limit,
        "threshold_percent": percent,
        "threshold": threshold,
        "used": used,
        "remaining": limit.saturating_sub(used),
        "window_start_ms": window.0,
        "window_end_ms": window.1,
        "at_ms": at_ms,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_tampering_does_not() {
        let s = WebhookSecret::new("whsec_0123456789");
        let sig = sign(&s, 1_700_000_000, b"{\"a\":1}");
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64);
        assert!(verify(&s, 1_700_000_000, b"{\"a\":1}", &sig));
        assert!(!verify(&s, 1_700_000_001, b"{\"a\":1}", &sig));
        assert!(!verify(&s, 1_700_000_000, b"{\"a\":2}", &sig));
        assert!(!verify(&WebhookSecret::new("other"), 1_700_000_000, b"{\"a\":1}", &sig));
        assert!(!format!("{s:?}").contains("whsec"));
    }

    #[test]
    fn urls_backoff_and_ids() {
        assert_eq!(
            parse_url("http://127.0.0.1:9000/hook?x=1"),
            Some(HttpUrl { host: "127.0.0.1".into(), port: 9000, path: "/hook?x=1".into() })
        );
        assert_eq!(parse_url("http://example.com").map(|u| (u.port, u.path)), Some((80, "/".into())));
        assert_eq!(parse_url("https://example.com/"), None);
        assert_eq!(parse_url("http://user:pw@example.com/"), None);
        assert_eq!(parse_url("http://:80/"), None);
        let s = WebhookSettings::new("http://x/".into(), WebhookSecret::new("k"));
        assert_eq!(backoff(&s, 1), Duration::from_secs(1));
        assert_eq!(backoff(&s, 4), Duration::from_secs(8));
        assert_eq!(backoff(&s, 40), Duration::from_secs(300));
        assert_eq!(event_id("k", 80), event_id("k", 80));
        assert_ne!(event_id("k", 80), event_id("k", 50));
    }
}
