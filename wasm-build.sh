#!/usr/bin/env bash
# Builds the tollgate filter as a proxy-wasm module: build/tollgate.wasm.
set -euo pipefail
cd "$(dirname "$0")"
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
  echo "wasm-build: installing the wasm32-wasip1 target" >&2
  rustup target add wasm32-wasip1
fi
cargo build --release --target wasm32-wasip1 --lib -p tollgate
mkdir -p build
cp target/wasm32-wasip1/release/tollgate.wasm build/tollgate.wasm
size=$(stat -c %s build/tollgate.wasm)
echo "wasm-build: build/tollgate.wasm $((size / 1024)) KiB ($size bytes)" >&2
