//! `tollgate-ratelimit`: the service binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tollgate_ratelimit::config::StaticLimits;
use tollgate_ratelimit::ledger::alerts::{parse_url, WebhookSecret, WebhookSettings};
use tollgate_ratelimit::ledger::LedgerSettings;
use tollgate_ratelimit::registry::admin_api::AdminTokens;
use tollgate_ratelimit::registry::crypto::KekRing;
use tollgate_ratelimit::registry::lookup_api::LookupLimits;
use tollgate_ratelimit::server::{self, RegistrySettings, Settings};
use tollgate_ratelimit::storage::redis::RedisTarget;

/// Envoy RLS v3 rate-limit service for tollgate, backed by Redis.
#[derive(Debug, Parser)]
#[command(name = "tollgate-ratelimit", version)]
struct Args {
    /// gRPC listen address (RLS v3 and grpc.health.v1).
    #[arg(long, env = "TOLLGATE_RLS_GRPC_ADDR", default_value = "0.0.0.0:8081")]
    grpc_addr: SocketAddr,
    /// HTTP listen address of the Prometheus endpoint (`/metrics`).
    #[arg(long, env = "TOLLGATE_RLS_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    metrics_addr: SocketAddr,
    /// Single-node Redis URL.
    #[arg(long, env = "TOLLGATE_RLS_REDIS_URL", conflicts_with = "redis_cluster_nodes")]
    redis_url: Option<String>,
    /// Redis Cluster seed nodes, comma separated (`host:port` or `redis://host:port`).
    #[arg(long, env = "TOLLGATE_RLS_REDIS_CLUSTER_NODES", value_delimiter = ',')]
    redis_cluster_nodes: Vec<String>,
    /// Timeout of every Redis call, in milliseconds.
    #[arg(long, env = "TOLLGATE_RLS_REDIS_TIMEOUT_MS", default_value_t = 250,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    redis_timeout_ms: u64,
    /// Static limits file (YAML or JSON) for callers that send no limit override.
    #[arg(long, env = "TOLLGATE_RLS_CONFIG")]
    config: Option<PathBuf>,
    /// How long a settle's idempotency key is remembered, in seconds: longer
    /// than a caller retries a settle (the filter: 600 s after its first attempt).
    #[arg(long, env = "TOLLGATE_RLS_IDEMPOTENCY_TTL_S", default_value_t = rls_contract::DEFAULT_IDEMPOTENCY_TTL_MS / 1000,
          value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    idempotency_ttl_s: u64,
    /// How long a reservation's idempotency key is remembered, in seconds:
    /// the window in which a caller can resolve a reserve whose answer it lost.
    #[arg(long, env = "TOLLGATE_RLS_RESERVE_IDEMPOTENCY_TTL_S", default_value_t = rls_contract::DEFAULT_IDEMPOTENCY_TTL_MS / 1000,
          value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    reserve_idempotency_ttl_s: u64,
    /// Filter-facing registry lookups (HTTP, no auth: expose to the gateways only); off if unset.
    #[arg(long, env = "TOLLGATE_RLS_REGISTRY_ADDR")]
    registry_addr: Option<SocketAddr>,
    /// Admin API (HTTP, bearer tokens); off if unset.
    #[arg(long, env = "TOLLGATE_RLS_ADMIN_ADDR")]
    admin_addr: Option<SocketAddr>,
    /// File of admin tokens, `name:token` entries (comma or newline separated).
    /// Else the env var TOLLGATE_ADMIN_TOKENS holds them.
    #[arg(long, env = "TOLLGATE_ADMIN_TOKENS_FILE")]
    admin_tokens_file: Option<PathBuf>,
    /// File of key-encryption keys, `<kid>:<base64 of 32 bytes>` entries; the first
    /// encrypts, all decrypt. Else the env var TOLLGATE_KEK holds them.
    #[arg(long, env = "TOLLGATE_KEK_FILE")]
    kek_file: Option<PathBuf>,
    /// A separate single-node Redis for the registry (default: the counters' Redis).
    #[arg(long, env = "TOLLGATE_RLS_REGISTRY_REDIS_URL")]
    registry_redis_url: Option<String>,
    /// Approximate cap of the audit stream (entries).
    #[arg(long, env = "TOLLGATE_RLS_AUDIT_MAX_LEN", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    audit_max_len: u64,
    /// Approximate cap of the registry change feed (entries).
    #[arg(long, env = "TOLLGATE_RLS_CHANGES_MAX_LEN", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1_000..=100_000_000))]
    changes_max_len: u64,
    /// Registry lookups served at once (more wait, then 503).
    #[arg(long, env = "TOLLGATE_RLS_REGISTRY_MAX_CONCURRENT", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    registry_max_concurrent: u64,
    /// Record usage rows in the ledger, keep the quota index and decide budget
    /// alerts (`--ledger false` turns all three off).
    #[arg(long, env = "TOLLGATE_RLS_LEDGER", default_value_t = true, action = clap::ArgAction::Set)]
    ledger: bool,
    /// Days a day's usage aggregates are kept.
    #[arg(long, env = "TOLLGATE_RLS_LEDGER_RETENTION_DAYS", default_value_t = 400,
          value_parser = clap::value_parser!(u64).range(1..=3_650))]
    ledger_retention_days: u64,
    /// Approximate bound of each tenant's usage event stream; 0 (default): no stream.
    #[arg(long, env = "TOLLGATE_RLS_USAGE_STREAM_MAX_LEN", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=100_000_000))]
    usage_stream_max_len: u64,
    /// Most entries of a tenant's quota index (distinct limits remembered).
    #[arg(long, env = "TOLLGATE_RLS_QUOTA_INDEX_MAX", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    quota_index_max: u64,
    /// Approximate bound of the alert event streams (global and per tenant).
    #[arg(long, env = "TOLLGATE_RLS_ALERT_STREAM_MAX_LEN", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    alert_stream_max_len: u64,
    /// Budget alert webhook (`http://host:port/path`); off if unset.
    #[arg(long, env = "TOLLGATE_RLS_ALERT_WEBHOOK_URL")]
    alert_webhook_url: Option<String>,
    /// File of the webhook signing secret; else the env var TOLLGATE_ALERT_WEBHOOK_SECRET.
    #[arg(long, env = "TOLLGATE_ALERT_WEBHOOK_SECRET_FILE")]
    alert_webhook_secret_file: Option<PathBuf>,
    /// Age after which an undelivered alert is dropped (logged `expired`), in seconds.
    #[arg(long, env = "TOLLGATE_RLS_ALERT_WEBHOOK_MAX_AGE_S", default_value_t = 259_200,
          value_parser = clap::value_parser!(u64).range(60..=2_592_000))]
    alert_webhook_max_age_s: u64,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "TOLLGATE_RLS_LOG_JSON")]
    log_json: bool,
}

fn settings(args: Args) -> Result<Settings, String> {
    let registry = registry_settings(&args)?;
    let redis = match (args.redis_url, args.redis_cluster_nodes.is_empty()) {
        (Some(url), true) => RedisTarget::Single(url),
        (None, false) => RedisTarget::Cluster(
            args.redis_cluster_nodes
                .iter()
                .map(|n| n.trim())
                .filter(|n| !n.is_empty())
                .map(|n| if n.contains("://") { n.to_owned() } else { format!("redis://{n}") })
                .collect(),
        ),
        (None, true) => RedisTarget::Single("redis://127.0.0.1:6379".to_owned()),
        (Some(_), false) => return Err("--redis-url and --redis-cluster-nodes are exclusive".into()),
    };
    let webhook = match &args.alert_webhook_url {
        None => None,
        Some(url) => {
            if parse_url(url).is_none() {
                return Err("--alert-webhook-url: expected http://host[:port]/path (no credentials)".into());
            }
            let secret = secret_text(args.alert_webhook_secret_file.as_ref(), "TOLLGATE_ALERT_WEBHOOK_SECRET")?
                .filter(|s| s.trim().len() >= 16)
                .ok_or("--alert-webhook-url needs a secret of at least 16 characters (--alert-webhook-secret-file or TOLLGATE_ALERT_WEBHOOK_SECRET)")?;
            let mut w = WebhookSettings::new(url.clone(), WebhookSecret::new(&secret));
            w.max_age = Duration::from_secs(args.alert_webhook_max_age_s);
            Some(w)
        }
    };
    let limits = match &args.config {
        Some(path) => StaticLimits::load(path).map_err(|e| e.to_string())?,
        None => StaticLimits::default(),
    };
    Ok(Settings {
        grpc_addr: args.grpc_addr,
        metrics_addr: args.metrics_addr,
        redis,
        redis_timeout: Duration::from_millis(args.redis_timeout_ms),
        limits: Arc::new(limits),
        idempotency_ttl: Duration::from_secs(args.idempotency_ttl_s),
        reserve_idempotency_ttl: Duration::from_secs(args.reserve_idempotency_ttl_s),
        registry,
        ledger: LedgerSettings {
            enabled: args.ledger,
            retention_days: args.ledger_retention_days,
            usage_stream_max_len: args.usage_stream_max_len,
            quota_index_cap: args.quota_index_max,
            alert_stream_max_len: args.alert_stream_max_len,
        },
        alert_stream_max_len: args.alert_stream_max_len,
        webhook,
    })
}

/// A secret list from `file`, else from the env var `var`; `None` if neither.
/// Errors name the source, never the content.
fn secret_text(file: Option<&PathBuf>, var: &str) -> Result<Option<String>, String> {
    match file {
        Some(path) => {
            std::fs::read_to_string(path).map(Some).map_err(|e| format!("cannot read {}: {e}", path.display()))
        }
        None => Ok(std::env::var(var).ok().filter(|v| !v.trim().is_empty())),
    }
}

fn registry_settings(args: &Args) -> Result<RegistrySettings, String> {
    let kek = match secret_text(args.kek_file.as_ref(), "TOLLGATE_KEK")? {
        Some(text) => KekRing::parse(&text).map_err(|e| format!("key-encryption keys: {e}"))?,
        None => KekRing::default(),
    };
    let admin_tokens = match secret_text(args.admin_tokens_file.as_ref(), "TOLLGATE_ADMIN_TOKENS")? {
        Some(text) => Some(Arc::new(AdminTokens::parse(&text).map_err(|e| format!("admin tokens: {e}"))?)),
        None => None,
    };
    if args.admin_addr.is_some() && admin_tokens.is_none() {
        return Err("--admin-addr needs admin tokens (--admin-tokens-file or TOLLGATE_ADMIN_TOKENS)".into());
    }
    Ok(RegistrySettings {
        redis: args.registry_redis_url.clone().map(RedisTarget::Single),
        registry_addr: args.registry_addr,
        admin_addr: args.admin_addr,
        admin_tokens,
        kek: Arc::new(kek),
        changes_max_len: args.changes_max_len,
        audit_max_len: args.audit_max_len,
        lookup_limits: LookupLimits {
            max_concurrent: usize::try_from(args.registry_max_concurrent).unwrap_or(256),
            deadline: Duration::from_millis(args.redis_timeout_ms.saturating_mul(4).max(1_000)),
        },
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if args.log_json {
        tracing_subscriber::fmt().json().with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    for (flag, ttl_s) in [
        ("--idempotency-ttl-s", args.idempotency_ttl_s),
        ("--reserve-idempotency-ttl-s", args.reserve_idempotency_ttl_s),
    ] {
        if ttl_s.saturating_mul(1000) < rls_contract::MIN_SAFE_IDEMPOTENCY_TTL_MS {
            tracing::warn!(
                "{flag} {ttl_s} is below {} s: the filter retries a call for up to {} s, so a late retry may apply twice",
                rls_contract::MIN_SAFE_IDEMPOTENCY_TTL_MS / 1000,
                rls_contract::IDEMPOTENCY_RETRY_HORIZON_MS / 1000
            );
        }
    }
    let settings = match settings(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tollgate-ratelimit: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tollgate-ratelimit: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(server::run(settings, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate-ratelimit: {e}");
            ExitCode::from(1)
        }
    }
}
