#!/usr/bin/env bash
# Builds the tollgate filter as a proxy-wasm module: build/tollgate.wasm.
#
#   ./wasm-build.sh          build/tollgate.wasm
#   ./wasm-build.sh --oci    also build/oci/: an OCI image layout of the filter
#                            in the form Istio pulls (see below)
#
# The OCI image is the "compat" variant of the Wasm image spec that Istio's
# agent reads (istio/istio pkg/wasm/imagefetcher.go): one layer of media type
# application/vnd.oci.image.layer.v1.tar+gzip, a tar holding plugin.wasm.
# (Istio's other accepted form, the "oci" variant with a
# application/vnd.module.wasm.content.layer.v1+wasm layer, must have exactly
# two layers, config included; the compat form is what registries and tools
# handle everywhere.) The layout is written by Python alone (tar, gzip,
# sha256), byte for byte reproducible: same wasm, same digests. Push it with
#   skopeo copy --preserve-digests oci:build/oci:<version> docker://REGISTRY/tollgate:<version>
# and pin the manifest digest printed here (also in build/oci/tollgate.sha256)
# as the WasmPlugin's sha256: for oci:// URLs Istio compares it with the
# image manifest digest (pkg/wasm/cache.go).
set -euo pipefail
cd "$(dirname "$0")"
oci=0
for arg in "$@"; do
  case "$arg" in
    --oci) oci=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "wasm-build: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
  echo "wasm-build: installing the wasm32-wasip1 target" >&2
  rustup target add wasm32-wasip1
fi
# SIMD (wasm simd128, supported by V8) speeds up the byte scanning of streams.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+simd128" cargo build --release --target wasm32-wasip1 --lib -p tollgate
mkdir -p build
cp "${CARGO_TARGET_DIR:-target}/wasm32-wasip1/release/tollgate.wasm" build/tollgate.wasm
size=$(stat -c %s build/tollgate.wasm)
echo "wasm-build: build/tollgate.wasm $((size / 1024)) KiB ($size bytes)" >&2

if [ "$oci" = 1 ]; then
  version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
  python3 - build/tollgate.wasm build/oci "$version" <<'PY'
import gzip, hashlib, io, json, os, shutil, sys, tarfile

wasm_path, out, version = sys.argv[1], sys.argv[2], sys.argv[3]
wasm = open(wasm_path, "rb").read()
if wasm[:4] != b"\0asm":
    sys.exit("wasm-build: %s is not a wasm module" % wasm_path)

# Layer: tar with one file, plugin.wasm; fixed metadata so it is reproducible.
raw_tar = io.BytesIO()
with tarfile.open(fileobj=raw_tar, mode="w", format=tarfile.PAX_FORMAT) as tar:
    info = tarfile.TarInfo("plugin.wasm")
    info.size, info.mode, info.mtime = len(wasm), 0o644, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(wasm))
layer_tar = raw_tar.getvalue()
gz = io.BytesIO()
with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, filename="") as f:
    f.write(layer_tar)
layer = gz.getvalue()

def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()

def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()

config = canonical({
    "architecture": "wasm",
    "os": "wasip1",
    "config": {},
    "rootfs": {"type": "layers", "diff_ids": [sha(layer_tar)]},
})
manifest = canonical({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
               "digest": sha(config), "size": len(config)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": sha(layer), "size": len(layer),
                "annotations": {"org.opencontainers.image.title": "plugin.wasm"}}],
    "annotations": {"org.opencontainers.image.title": "tollgate",
                    "org.opencontainers.image.version": version,
                    "org.opencontainers.image.description":
                        "tollgate proxy-wasm filter (wasm32-wasip1) for Envoy and Istio"},
})
index = canonical({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                   "digest": sha(manifest), "size": len(manifest),
                   "annotations": {"org.opencontainers.image.ref.name": version}}],
})

shutil.rmtree(out, ignore_errors=True)
blobs = os.path.join(out, "blobs", "sha256")
os.makedirs(blobs)
for blob in (layer, config, manifest):
    with open(os.path.join(blobs, hashlib.sha256(blob).hexdigest()), "wb") as f:
        f.write(blob)
with open(os.path.join(out, "oci-layout"), "wb") as f:
    f.write(canonical({"imageLayoutVersion": "1.0.0"}))
with open(os.path.join(out, "index.json"), "wb") as f:
    f.write(index)
digest = hashlib.sha256(manifest).hexdigest()
with open(os.path.join(out, "tollgate.sha256"), "w") as f:
    f.write(digest + "\n")
print("wasm-build: %s/ OCI image layout, tag %s" % (out, version), file=sys.stderr)
print("wasm-build: manifest digest sha256:%s" % digest, file=sys.stderr)
print("wasm-build: WasmPlugin sha256 (pin this): %s" % digest, file=sys.stderr)
PY
fi
