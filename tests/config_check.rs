//! Runs the `tollgate-config-check` binary against good and bad fixtures in
//! `tests/fixtures/config/`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test and bench code: a failure should stop loudly

use std::process::{Command, Output};

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/config/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn check(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate-config-check"))
        .args(args)
        .env_remove("ACME_OPENAI_KEY")
        .env_remove("ACME_ANTHROPIC_KEY")
        .env_remove("GLOBEX_OPENAI_KEY")
        .output()
        .expect("run tollgate-config-check")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn assert_ok(name: &str, summary: &str) {
    let path = fixture(name);
    let out = check(&[&path]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{name}: {text}");
    assert!(text.contains(&format!("{path}: OK ({summary})")), "{name}: {text}");
}

fn assert_refused(name: &str, expected: &[&str]) {
    let path = fixture(name);
    let out = check(&[&path]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{name}: {text}");
    assert!(!text.contains(": OK"), "{name}: {text}");
    for e in expected {
        assert!(text.contains(e), "{name}: expected {e:?} in {text}");
    }
}

#[test]
fn plugin_json_passes() {
    assert_ok("good-plugin.json", "2 tenants, 2 routes");
}

#[test]
fn envoy_string_value_passes() {
    assert_ok("good-envoy.yaml", "2 tenants, 2 routes");
}

#[test]
fn envoy_struct_config_passes() {
    assert_ok("good-envoy-struct.json", "2 tenants, 2 routes");
}

#[test]
fn istio_manifest_checks_every_tollgate_document() {
    let path = fixture("good-istio.yaml");
    let out = check(&[&path]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("OK (2 configurations: 2 tenants, 2 routes)"), "{text}");
    // The WasmPlugin cannot carry allow_on_headers_stop_iteration.
    assert!(
        text.contains("[doc 1 WasmPlugin/tollgate spec.pluginConfig]: warning: Istio's WasmPlugin does not set allow_on_headers_stop_iteration"),
        "{text}"
    );
}

#[test]
fn unknown_tier_is_refused_with_its_field_path() {
    assert_refused(
        "bad-plugin-unknown-tier.json",
        &["bad-plugin-unknown-tier.json: tenants[1].tier: unknown tier 'gold'"],
    );
}

#[test]
fn plain_key_is_refused() {
    assert_refused("bad-plugin-plain-key.json", &["tenants[0].api_key_sha256[0]: must be a SHA-256 digest"]);
}

#[test]
fn missing_stop_iteration_flag_is_refused() {
    assert_refused(
        "bad-envoy-no-stop-iteration.yaml",
        &["http_filters[0].typed_config.config.allow_on_headers_stop_iteration]: must be true"],
    );
}

#[test]
fn buffer_limit_below_tier_body_limit_is_refused() {
    assert_refused(
        "bad-envoy-small-buffer.yaml",
        &["[static_resources.listeners[0].per_connection_buffer_limit_bytes]: is unset (Envoy's default 1048576), below the largest tier max_request_bytes 4194304"],
    );
}

#[test]
fn provider_key_not_passed_to_the_vm_is_refused() {
    assert_refused("bad-envoy-missing-env-key.yaml", &["does not list GLOBEX_OPENAI_KEY"]);
}

#[test]
fn bad_documents_in_a_manifest_are_located() {
    assert_refused(
        "bad-istio.yaml",
        &[
            "[doc 1 WasmPlugin/tollgate spec.pluginConfig]: tiers.pro.requests_per_minute:",
            "[doc 3 EnvoyFilter/tollgate spec.configPatches[0].patch.value.typed_config.config.vm_config.environment_variables.host_env_keys]: does not list ACME_OPENAI_KEY",
        ],
    );
}

#[test]
fn require_env_uses_the_real_environment() {
    let path = fixture("good-plugin.json");
    let out = check(&["--require-env", &path]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("ACME_ANTHROPIC_KEY"), "{}", stdout(&out));

    let out = Command::new(env!("CARGO_BIN_EXE_tollgate-config-check"))
        .args(["--require-env", &path])
        .env("ACME_OPENAI_KEY", "k1")
        .env("ACME_ANTHROPIC_KEY", "k2")
        .env("GLOBEX_OPENAI_KEY", "k3")
        .output()
        .expect("run tollgate-config-check");
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
}

#[test]
fn every_file_is_reported_and_any_error_fails() {
    let good = fixture("good-plugin.json");
    let bad = fixture("bad-plugin-unknown-tier.json");
    let out = check(&[&good, &bad]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(&format!("{good}: OK")), "{text}");
    assert!(text.contains(&format!("{bad}: tenants[1].tier")), "{text}");
}

#[test]
fn usage_and_unreadable_files_exit_2() {
    assert_eq!(check(&[]).status.code(), Some(2));
    assert_eq!(check(&["--bogus", "x"]).status.code(), Some(2));
    let out = check(&[&fixture("does-not-exist.json")]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(stdout(&out).contains("cannot read"));
}

#[test]
fn failover_targets_without_their_own_route_are_refused() {
    let good = format!("{}/envoy/production-envoy.yaml", env!("CARGO_MANIFEST_DIR"));
    let out = check(&[&good]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let text = std::fs::read_to_string(&good).unwrap();
    let dir = std::env::temp_dir().join(format!("tollgate-config-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The target's route names another target: its requests would take the
    // catch-all route to OpenAI with the Azure key.
    let unrouted = dir.join("unrouted.yaml");
    std::fs::write(&unrouted, text.replace("exact: azure-openai-eu }", "exact: azure-openai-us }")).unwrap();
    let out = check(&[unrouted.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("no route matches x-tollgate-provider: azure-openai-eu"), "{}", stdout(&out));
    // The routing header must be removed before the provider.
    let kept = dir.join("kept.yaml");
    std::fs::write(&kept, text.replace(", x-tollgate-provider]", "]")).unwrap();
    let out = check(&[kept.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("must list x-tollgate-provider"), "{}", stdout(&out));
    let _ = std::fs::remove_dir_all(&dir);
}
