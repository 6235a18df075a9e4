//! How long the filter takes to compile a plugin configuration: the code
//! `on_configure` runs (`tollgate::config::load`), timed on a file.
//!
//!   cargo run --release -p tollgate-stream-bench --bin config-bench FILE [ROUNDS]
//!   as wasm under Node's V8 (the engine Envoy's Wasm uses), with the file's
//!   directory opened to the program:
//!   WASI_PREOPEN=/tmp node bench/run-wasi.mjs config-bench.wasm /tmp/plugin.json
//!
//! Prints `RESULT config_load_ms_first` (a fresh VM's load: its memory
//! grows), `_min`, `_median` and the tenant count. The
//! file is read once, outside the timing; each round compiles it again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // bench code: a failure should stop loudly

use std::time::Instant;

fn main() {
    let path = std::env::args().nth(1).expect("usage: config-bench FILE [ROUNDS]");
    let rounds: usize = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let raw = std::fs::read(&path).expect("cannot read the configuration");
    let env = |_: &str| Some("bench".to_string());
    let mut ms = Vec::new();
    let mut tenants = 0;
    for _ in 0..rounds.max(1) {
        let t = Instant::now();
        let plugin = tollgate::config::load(&raw, &env).expect("configuration refused");
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        tenants = plugin.tenants.len();
        drop(plugin);
    }
    let first = ms[0];
    ms.sort_by(f64::total_cmp);
    println!("RESULT config_bytes={}", raw.len());
    println!("RESULT config_tenants={tenants}");
    // the first round also grows the (wasm) memory, as a fresh VM's load does
    println!("RESULT config_load_ms_first={first:.0}");
    println!("RESULT config_load_ms_min={:.0}", ms[0]);
    println!("RESULT config_load_ms_median={:.0}", ms[ms.len() / 2]);
}
