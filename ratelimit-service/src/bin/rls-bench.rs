//! Load generator for `bench/bench.sh` (not a test).
//!
//! - `rls-bench run --grpc-addr A --concurrency N --duration-s S`: N workers, each
//!   looping reserve → settle of a typical LLM request (five descriptors of one
//!   tenant: rpm, tpm, tokens/day, usd/day, usd/month) for a bounded time, then
//!   prints `RESULT` lines.
//! - `rls-bench script`: the Lua decide script (for `SCRIPT LOAD`).
//! - `rls-bench evalsha-args`: the EVALSHA arguments of the same reserve, one per
//!   line, for `redis-benchmark`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test and bench code: a failure should stop loudly

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{Entry, RateLimitOverride};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::google::protobuf::UInt64Value;
use rls_contract::ledger::UsageRow;
use tollgate_ratelimit::config::StaticLimits;
use tollgate_ratelimit::plan::{self, PlanSettings, RequestMeta};
use tollgate_ratelimit::scripts;
use tollgate_ratelimit::storage::redis::script_args;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Run {
        #[arg(long, default_value = "127.0.0.1:8081")]
        grpc_addr: String,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 4)]
        connections: usize,
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=120))]
        duration_s: u64,
        #[arg(long, default_value_t = 64)]
        tenants: usize,
        /// Settles carry one ledger usage row (`x-tollgate-usage`) and the
        /// budget descriptors carry `tollgate.alerts`, as the filter sends them.
        #[arg(long)]
        usage: bool,
        /// Limit levels per request: 1 (the tenant's five limits) or 4 (plus
        /// an API key's budget, an end user's rate, a provider pool's rate
        /// and the tier's share of it: nine descriptors).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=4))]
        levels: u8,
        /// Idempotency keys as the filter makes them: a reserve keyed
        /// `<request id>:r1` and its settle `<request id>:settle`, the
        /// request id a UUID as Envoy's `x-request-id` (36 characters).
        /// Without it reserves carry no key and settles a short one.
        #[arg(long)]
        filter_keys: bool,
        /// Stop after this many reserve + settle pairs in all (0: run for
        /// `duration_s`).
        #[arg(long, default_value_t = 0)]
        requests: u64,
    },
    /// Fill the ledger through settles: every tenant gets one row per day
    /// (two keys, two models alternating) for the last `days` days.
    SeedLedger {
        #[arg(long, default_value = "127.0.0.1:8081")]
        grpc_addr: String,
        #[arg(long, default_value_t = 10_000)]
        tenants: usize,
        #[arg(long, default_value_t = 30)]
        days: u64,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
    Script,
    EvalshaArgs,
}

/// Ledger-only settles carrying `days` rows per tenant, 16 per settle.
async fn seed_ledger(grpc_addr: String, tenants: usize, days: u64, concurrency: usize) -> Result<(), String> {
    let channel = Channel::from_shared(format!("http://{grpc_addr}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {grpc_addr}: {e}"))?;
    let now = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(1);
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let mut client = RateLimitServiceClient::new(channel.clone());
        let (next, errors) = (next.clone(), errors.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let t = next.fetch_add(1, Ordering::Relaxed) as usize;
                if t >= tenants {
                    return;
                }
                let rows: Vec<UsageRow> = (0..days)
                    .map(|d| UsageRow {
                        tenant: format!("tenant-{t}"),
                        time_zone: None,
                        finished_at_ms: now - d * 86_400_000,
                        api_key: Some(format!("key-{}", d % 2)),
                        model: if d % 3 == 0 { "gpt-4o".into() } else { "gpt-4o-mini".into() },
                        requests: 10,
                        input_tokens: 12_000,
                        output_tokens: 3_000,
                        cost_micro_usd: 23_000,
                        ..UsageRow::default()
                    })
                    .collect();
                let Ok(chunks) = rls_contract::ledger::encode_chunks(&rows) else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                for (i, chunk) in chunks.into_iter().enumerate() {
                    let mut settle = tonic::Request::new(RateLimitRequest {
                        domain: "tollgate".into(),
                        descriptors: vec![],
                        hits_addend: 0,
                    });
                    let md = settle.metadata_mut();
                    md.insert("x-tollgate-mode", tonic::metadata::MetadataValue::from_static("settle"));
                    if let (Ok(k), Ok(v)) = (format!("seed-{t}-{i}").parse(), chunk.parse()) {
                        md.insert("x-tollgate-idempotency-key", k);
                        md.insert(rls_contract::ledger::META_USAGE, v);
                    }
                    if client.should_rate_limit(settle).await.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await.map_err(|e| e.to_string())?;
    }
    println!("RESULT ledger_seed_rows={}", tenants as u64 * days);
    println!("RESULT ledger_seed_s={:.1}", started.elapsed().as_secs_f64());
    println!("RESULT ledger_seed_errors={}", errors.load(Ordering::Relaxed));
    Ok(())
}

/// The typical request: limits high enough that every request is admitted
/// (the cost of a decision, not of refusals, is measured).
fn typical(tenant: &str, tokens: u64, micros: u64, refund: bool) -> RateLimitRequest {
    typical_with(tenant, tokens, micros, refund, false, 1)
}

fn typical_with(tenant: &str, tokens: u64, micros: u64, refund: bool, alerts: bool, levels: u8) -> RateLimitRequest {
    let d = |name: &str, limit: u64, unit: i32, hits: u64| RateLimitDescriptor {
        entries: {
            let mut e = vec![
                Entry { key: "tenant".into(), value: tenant.into() },
                Entry { key: "limit".into(), value: name.into() },
                Entry { key: "tollgate.limit".into(), value: limit.to_string() },
            ];
            if alerts && (unit == 4 || unit == 5) {
                e.push(Entry { key: "tollgate.alerts".into(), value: "50,80,100".into() });
            }
            e
        },
        limit: Some(RateLimitOverride { requests_per_unit: u32::try_from(limit).unwrap_or(u32::MAX), unit }),
        hits_addend: Some(UInt64Value { value: hits }),
        is_negative_hits: refund,
    };
    let mut descriptors = vec![
        d("rpm", 1_000_000_000, 2, if refund { 0 } else { 1 }),
        d("tpm", 1_000_000_000_000, 2, tokens),
        d("tokens_per_day", 1_000_000_000_000_000, 4, tokens),
        d("usd_per_day", 1_000_000_000_000_000, 4, micros),
        d("usd_per_month", 1_000_000_000_000_000, 5, micros),
    ];
    if levels > 1 {
        // The filter's other levels: key, user, pool and the tier's share.
        let level = |pairs: &[(&str, &str)], limit: u64, unit: i32, hits: u64| RateLimitDescriptor {
            entries: pairs
                .iter()
                .map(|(k, v)| Entry { key: (*k).into(), value: (*v).into() })
                .chain(std::iter::once(Entry { key: "tollgate.limit".into(), value: limit.to_string() }))
                .collect(),
            limit: Some(RateLimitOverride { requests_per_unit: u32::try_from(limit).unwrap_or(u32::MAX), unit }),
            hits_addend: Some(UInt64Value { value: hits }),
            is_negative_hits: refund,
        };
        let req = if refund { 0 } else { 1 };
        descriptors.push(level(
            &[("tenant", tenant), ("key", "ci"), ("limit", "usd_per_day")],
            1_000_000_000_000_000,
            4,
            micros,
        ));
        descriptors.push(level(
            &[("tenant", tenant), ("user", "u-1"), ("limit", "requests_per_minute")],
            1_000_000_000,
            2,
            req,
        ));
        descriptors.push(level(&[("pool", "bench-pool"), ("limit", "requests_per_minute")], 1_000_000_000, 2, req));
        descriptors.push(level(
            &[("pool", "bench-pool"), ("tier", "pro"), ("limit", "requests_per_minute")],
            1_000_000_000,
            2,
            req,
        ));
    }
    RateLimitRequest { domain: "tollgate".into(), descriptors, hits_addend: 0 }
}

/// A random request id shaped as Envoy's `x-request-id` (a UUID v4).
fn request_id() -> String {
    let x: u128 = rand::random();
    let h = format!("{x:032x}");
    format!("{}-{}-4{}-a{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

#[allow(clippy::too_many_arguments)] // the command line's flags, one by one
async fn run(
    grpc_addr: String,
    concurrency: usize,
    connections: usize,
    duration_s: u64,
    tenants: usize,
    usage: bool,
    levels: u8,
    filter_keys: bool,
    requests: u64,
) -> Result<(), String> {
    let budget = Arc::new(AtomicU64::new(0));
    let mut channels = Vec::new();
    for _ in 0..connections.max(1) {
        let c = Channel::from_shared(format!("http://{grpc_addr}"))
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {grpc_addr}: {e}"))?;
        channels.push(c);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let mut client = RateLimitServiceClient::new(channels[w % channels.len()].clone());
        let stop = stop.clone();
        let errors = errors.clone();
        let budget = budget.clone();
        let tenants = tenants.max(1);
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            let mut i: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                if requests > 0 && budget.fetch_add(1, Ordering::Relaxed) >= requests {
                    break;
                }
                i += 1;
                // with --filter-keys, each request goes to the next tenant
                // (the filter nets settles per tenant and tick: spread over
                // many tenants, one settle per request)
                let tenant = if filter_keys {
                    format!("tenant-{}", (i as usize * concurrency + w) % tenants)
                } else {
                    format!("tenant-{}", w % tenants)
                };
                let request_id = filter_keys.then(request_id);
                // reserve an estimate, then settle the difference (refund) idempotently
                let mut reserve = tonic::Request::new(typical_with(&tenant, 2_000, 3_000, false, usage, levels));
                if let Some(Ok(v)) = request_id.as_ref().map(|id| format!("{id}:r1").parse()) {
                    reserve.metadata_mut().insert("x-tollgate-idempotency-key", v);
                }
                let t = Instant::now();
                let ok = client.should_rate_limit(reserve).await.is_ok();
                lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                let mut settle = tonic::Request::new(typical_with(&tenant, 500, 700, true, usage, levels));
                if usage {
                    let row = UsageRow {
                        tenant: tenant.clone(),
                        time_zone: Some("Europe/Paris".into()),
                        finished_at_ms: u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(1),
                        api_key: Some(format!("key-{}", w % 4)),
                        user: None,
                        model: "gpt-4o-mini".into(),
                        requests: 1,
                        input_tokens: 1_200,
                        cached_read_tokens: 200,
                        output_tokens: 300,
                        cost_micro_usd: 2_300,
                        ..UsageRow::default()
                    };
                    if let Ok(v) = rls_contract::ledger::encode(&[row]).unwrap_or_default().parse() {
                        settle.metadata_mut().insert(rls_contract::ledger::META_USAGE, v);
                    }
                }
                settle.metadata_mut().insert("x-tollgate-mode", tonic::metadata::MetadataValue::from_static("settle"));
                let key = request_id.as_ref().map_or_else(|| format!("w{w}-{i}"), |id| format!("{id}:settle"));
                if let Ok(v) = key.parse() {
                    settle.metadata_mut().insert("x-tollgate-idempotency-key", v);
                }
                let t = Instant::now();
                let ok = client.should_rate_limit(settle).await.is_ok();
                lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            lat
        }));
    }
    let started = Instant::now();
    if requests == 0 {
        tokio::time::sleep(Duration::from_secs(duration_s)).await;
        stop.store(true, Ordering::Relaxed);
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.map_err(|e| e.to_string())?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    println!("RESULT service_decisions_per_s={:.0}", all.len() as f64 / elapsed);
    println!("RESULT service_p50_ms={:.3}", pct(&all, 0.50));
    println!("RESULT service_p99_ms={:.3}", pct(&all, 0.99));
    println!("RESULT service_errors={}", errors.load(Ordering::Relaxed));
    println!("RESULT service_concurrency={concurrency}");
    Ok(())
}

fn evalsha_args() -> Result<Vec<String>, String> {
    let r = typical("tenant-0", 2_000, 3_000, false);
    let now = chrono::Utc::now().timestamp_millis();
    let p = plan::build(
        &r,
        &RequestMeta::default(),
        &StaticLimits::default(),
        PlanSettings { idempotency_ttl_ms: 1, reserve_idempotency_ttl_ms: 1, ..PlanSettings::default() },
        now,
    )
    .map_err(|e| e.to_string())?;
    let (keys, argv) = script_args(&p.batch);
    let mut out = vec![redis::Script::new(scripts::DECIDE).get_hash().to_owned(), keys.len().to_string()];
    out.extend(keys);
    out.extend(argv);
    Ok(out)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let result = match args.cmd {
        Cmd::SeedLedger { grpc_addr, tenants, days, concurrency } => {
            match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt.block_on(seed_ledger(grpc_addr, tenants, days, concurrency)),
                Err(e) => Err(e.to_string()),
            }
        }
        Cmd::Script => {
            print!("{}", scripts::DECIDE);
            Ok(())
        }
        Cmd::EvalshaArgs => evalsha_args().map(|a| {
            for x in a {
                println!("{x}");
            }
        }),
        Cmd::Run { grpc_addr, concurrency, connections, duration_s, tenants, usage, levels, filter_keys, requests } => {
            match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt.block_on(run(
                    grpc_addr,
                    concurrency,
                    connections,
                    duration_s,
                    tenants,
                    usage,
                    levels,
                    filter_keys,
                    requests,
                )),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rls-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
