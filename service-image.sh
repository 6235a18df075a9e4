#!/usr/bin/env bash
# Builds the container image of the rate-limit service (tollgate-ratelimit)
# without docker: build/service-oci/, an OCI image layout.
#
#   ./service-image.sh              build the static binary, then the image
#   ./service-image.sh --no-build   package the binary already built
#   ./service-image.sh --quick      build without LTO and with parallel codegen
#                                   (the test command's build: the same code,
#                                   about half the build time, a little slower
#                                   binary); release images use the default
#
# The binary is built for x86_64-unknown-linux-musl: statically linked, so
# the image holds nothing else (no libc, no shell, no package manager). The
# layer is one gzipped tar with /usr/local/bin/tollgate-ratelimit and the
# /etc/passwd and /etc/group entries of its user, 65532 ("nonroot"); the
# config sets the entrypoint, that user and the exposed ports (8081 gRPC,
# 8082 admin, 8083 registry, 9090 metrics). Python alone writes the layout
# with fixed metadata (mtime 0, uid 0, sorted JSON), so the same binary gives
# the same digests. Push it with
#   skopeo copy --preserve-digests oci:build/service-oci:<version> docker://REGISTRY/tollgate-ratelimit:<version>
# and pin the manifest digest printed here (also in
# build/service-oci/tollgate-ratelimit.sha256) in the Deployment's image.
set -euo pipefail
cd "$(dirname "$0")"
build=1
quick=0
for arg in "$@"; do
  case "$arg" in
    --no-build) build=0 ;;
    --quick) quick=1 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "service-image: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done
target=x86_64-unknown-linux-musl
binary="${CARGO_TARGET_DIR:-target}/$target/release/tollgate-ratelimit"
if [ "$build" = 1 ]; then
  if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    echo "service-image: installing the $target target" >&2
    rustup target add "$target"
  fi
  # Rust's musl target links its own copy of musl (self-contained): no
  # musl-gcc needed, as long as no dependency compiles C.
  if [ "$quick" = 1 ]; then
    export CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
  fi
  cargo build --release --target "$target" -p tollgate-ratelimit --bin tollgate-ratelimit
fi
[ -x "$binary" ] || { echo "service-image: $binary is missing (run without --no-build)" >&2; exit 1; }
version=$(sed -n 's/^version = "\(.*\)"/\1/p' ratelimit-service/Cargo.toml | head -n 1)
python3 - "$binary" build/service-oci "$version" <<'PY'
import gzip, hashlib, io, json, os, shutil, struct, sys, tarfile

binary_path, out, version = sys.argv[1], sys.argv[2], sys.argv[3]
binary = open(binary_path, "rb").read()
if binary[:4] != b"\x7fELF" or binary[4] != 2 or binary[18:20] != struct.pack("<H", 62):
    sys.exit("service-image: %s is not an x86-64 ELF binary" % binary_path)
# A dynamically linked binary has a PT_INTERP program header (the loader);
# the image has no loader and no libc, so refuse one.
phoff, = struct.unpack_from("<Q", binary, 32)
phentsize, phnum = struct.unpack_from("<HH", binary, 54)
for i in range(phnum):
    if struct.unpack_from("<I", binary, phoff + i * phentsize)[0] == 3:
        sys.exit("service-image: %s is dynamically linked; build it for x86_64-unknown-linux-musl" % binary_path)

USER = 65532
ENTRYPOINT = "/usr/local/bin/tollgate-ratelimit"
PORTS = (8081, 8082, 8083, 9090)


def entry(name, data=None, mode=0o755):
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    if data is None:
        info.type, info.mode = tarfile.DIRTYPE, mode
        return info, None
    info.size, info.mode = len(data), mode
    return info, io.BytesIO(data)


files = [
    entry("etc/"),
    entry("etc/group", b"root:x:0:\nnonroot:x:%d:\n" % USER, 0o644),
    entry("etc/passwd", b"root:x:0:0:root:/root:/sbin/nologin\n"
                        b"nonroot:x:%d:%d:nonroot:/nonexistent:/sbin/nologin\n" % (USER, USER), 0o644),
    entry("usr/"),
    entry("usr/local/"),
    entry("usr/local/bin/"),
    entry(ENTRYPOINT.lstrip("/"), binary, 0o755),
]
raw_tar = io.BytesIO()
with tarfile.open(fileobj=raw_tar, mode="w", format=tarfile.PAX_FORMAT) as tar:
    for info, data in files:
        tar.addfile(info, data)
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
    "architecture": "amd64",
    "os": "linux",
    "created": "1970-01-01T00:00:00Z",
    "config": {
        "User": "%d:%d" % (USER, USER),
        "Entrypoint": [ENTRYPOINT],
        "Cmd": [],
        "Env": ["PATH=/usr/local/bin"],
        "WorkingDir": "/",
        "ExposedPorts": {"%d/tcp" % p: {} for p in PORTS},
        "Labels": {"org.opencontainers.image.title": "tollgate-ratelimit",
                   "org.opencontainers.image.version": version},
    },
    "rootfs": {"type": "layers", "diff_ids": [sha(layer_tar)]},
    "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "service-image.sh"}],
})
manifest = canonical({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
               "digest": sha(config), "size": len(config)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": sha(layer), "size": len(layer)}],
    "annotations": {"org.opencontainers.image.title": "tollgate-ratelimit",
                    "org.opencontainers.image.version": version,
                    "org.opencontainers.image.description":
                        "tollgate rate-limit service (Envoy RLS v3, tenant registry), static linux/amd64"},
})
index = canonical({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                   "digest": sha(manifest), "size": len(manifest),
                   "platform": {"architecture": "amd64", "os": "linux"},
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
with open(os.path.join(out, "tollgate-ratelimit.sha256"), "w") as f:
    f.write(digest + "\n")
print("service-image: %s/ OCI image layout, tag %s, %d KiB layer" % (out, version, len(layer) // 1024),
      file=sys.stderr)
print("service-image: manifest digest sha256:%s" % digest, file=sys.stderr)
PY
