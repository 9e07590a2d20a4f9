#!/usr/bin/env bash
# The container image's size, as far as it can be computed without Docker
# (no daemon, no registry here): deploy/Dockerfile is not built; its two
# layers are reproduced from this machine instead, and each figure says
# whether it was measured or estimated.
#
#   benches/image-size.sh                      # builds the image's binary (deploy/pgo-build.sh)
#   PROXY_BIN=/path/to/criteo-token-proxy benches/image-size.sh
#
# 1. The binary layer (MEASURED): the release binary, stripped as the
#    Dockerfile's build stage does (`strip`), packed as the layer it becomes
#    (a tar of usr/local/bin/criteo-token-proxy), raw and gzip-compressed as
#    a registry stores it. Faithful when this machine builds like the
#    Dockerfile's stage (same Rust, Debian 12's glibc: both are printed).
# 2. The runtime base, gcr.io/distroless/cc-debian12 (ESTIMATED): the same
#    Debian 12 packages distroless puts in it (static: base-files, netbase,
#    tzdata, media-types and the CA bundle; base: libc6, libssl3; cc:
#    libgcc-s1, libgomp1, libstdc++6, gcc-12-base), fetched with
#    `apt-get download` and unpacked with `dpkg-deb -x`; from ca-certificates
#    only the concatenated bundle, as distroless keeps it. Distroless pins
#    its own package versions and adds a few tiny files (passwd, group,
#    os-release, nsswitch.conf): the figure is close, not exact.
# Then checks, without Docker, that the Dockerfile still builds what it
# should: what it copies exists, the binary it copies is the one Cargo
# builds under that name, and the base provides every library the binary
# needs at a glibc version it has.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in apt-get dpkg-deb strip readelf gzip tar; do
  command -v "$tool" >/dev/null || { echo "image-size.sh needs $tool (Debian)" >&2; exit 1; }
done
dockerfile=deploy/Dockerfile
bin_name=$(sed -n '/^\[\[bin\]\]/,/^\[/ s/^name = "\(.*\)"/\1/p' Cargo.toml | head -1)
if [ -z "${PROXY_BIN:-}" ]; then
  deploy/pgo-build.sh   # what the Dockerfile's build stage runs
  PROXY_BIN=target/pgo/$bin_name
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mib() { python3 -c "import sys; print(f'{int(sys.argv[1]) / 1048576:.1f}')" "$1"; }
# layer DIR: "raw gzip" bytes of DIR packed as an image layer (tar, gzip -6
# as docker push compresses).
layer() {
  tar -C "$1" --sort=name --owner=0 --group=0 --numeric-owner -cf "$work/layer.tar" .
  echo "$(stat -c %s "$work/layer.tar") $(gzip -6 -c "$work/layer.tar" | wc -c)"
}

# === 1. the binary layer (measured) ===
mkdir -p "$work/app/usr/local/bin"
cp "$PROXY_BIN" "$work/app/usr/local/bin/criteo-token-proxy"
strip "$work/app/usr/local/bin/criteo-token-proxy"
stripped=$(stat -c %s "$work/app/usr/local/bin/criteo-token-proxy")
read -r app_raw app_gz < <(layer "$work/app")

# === 2. the distroless/cc-debian12 base (estimated) ===
packages=(base-files netbase tzdata media-types libc6 libssl3 libgcc-s1 libgomp1 libstdc++6 gcc-12-base)
mkdir -p "$work/debs" "$work/base" "$work/ca"
(cd "$work/debs" && apt-get download -qq "${packages[@]}" ca-certificates 2>/dev/null) || {
  echo "apt-get download failed; run apt-get update first" >&2; exit 1; }
for p in "${packages[@]}"; do dpkg-deb -x "$work/debs/${p}"_*.deb "$work/base"; done
dpkg-deb -x "$work/debs"/ca-certificates_*.deb "$work/ca"
mkdir -p "$work/base/etc/ssl/certs"
find "$work/ca/usr/share/ca-certificates" -name '*.crt' -print0 | sort -z |
  xargs -0 cat > "$work/base/etc/ssl/certs/ca-certificates.crt"
read -r base_raw base_gz < <(layer "$work/base")
versions=$(cd "$work/debs" && ls ./*.deb | sed 's|^\./||; s|_[^_]*\.deb$||; s|_| |' | tr '\n' ',' | sed 's/,$//; s/,/, /g')

echo "machine: $(uname -m), $(. /etc/os-release && echo "$PRETTY_NAME"), $(ldd --version | head -1 | sed 's/.* //') glibc; $(rustc --version 2>/dev/null || echo 'rustc ?')"
echo "Dockerfile: build $(sed -n 's/^FROM \([^ ]*\) AS build.*/\1/p' "$dockerfile"), runtime $(sed -n 's/^FROM \([^ ]*\)$/\1/p' "$dockerfile")"
echo
printf '%-58s %10s %10s\n' "" "raw MiB" "gzip MiB"
printf '%-58s %10s %10s\n' "binary as built ($(basename "$PROXY_BIN"))" "$(mib "$(stat -c %s "$PROXY_BIN")")" "-"
printf '%-58s %10s %10s\n' "binary stripped (MEASURED)" "$(mib "$stripped")" "-"
printf '%-58s %10s %10s\n' "binary layer, stripped, as a tar (MEASURED)" "$(mib "$app_raw")" "$(mib "$app_gz")"
printf '%-58s %10s %10s\n' "distroless/cc-debian12 base (ESTIMATED, Debian 12 packages)" "$(mib "$base_raw")" "$(mib "$base_gz")"
printf '%-58s %10s %10s\n' "image (ESTIMATED: base + binary layer)" \
  "$(mib $(( base_raw + app_raw )))" "$(mib $(( base_gz + app_gz )))"
echo
echo "base packages: $versions (ca-certificates: its bundle only)"

# === checks on the Dockerfile (no Docker) ===
echo
problems=0
check() { if eval "$2"; then echo "ok    $1"; else echo "FAIL  $1"; problems=$(( problems + 1 )); fi; }
copied=$(sed -n 's/^COPY \([^-].*\) [^ ]*$/\1/p' "$dockerfile" | tr ' ' '\n')
for path in $copied; do check "the build stage's COPY $path exists" "[ -e '$path' ]"; done
for bench in $(sed -n '/^\[\[bench\]\]/,/^$/ s/^name = "\(.*\)"/\1/p' Cargo.toml); do
  check "bench target benches/$bench.rs (Cargo.toml names it) is copied" \
    "[ -e benches/$bench.rs ] && grep -qx benches <<< \"\$copied\""
done
check "the build context leaves out target/ (.dockerignore)" "grep -qx 'target/\\?' .dockerignore 2>/dev/null"
check "build.rs absent, or copied" "[ ! -e build.rs ] || grep -qx build.rs <<< \"\$copied\""
check "the build stage runs deploy/pgo-build.sh, which builds --bin $bin_name (Cargo.toml's [[bin]])" \
  "grep -q '^RUN deploy/pgo-build.sh' '$dockerfile' && grep -q -- '--bin $bin_name' deploy/pgo-build.sh"
check "the runtime stage copies target/pgo/$bin_name, where that script puts it" \
  "grep -q '^COPY --from=build /src/target/pgo/$bin_name ' '$dockerfile' && grep -q 'target/pgo' deploy/pgo-build.sh"
check "the build context keeps deploy/pgo-build.sh (.dockerignore)" "! grep -qx 'deploy/\\?' .dockerignore"
rv=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)
image_rust=$(sed -n 's/^FROM rust:\([0-9.]*\)-.*/\1/p' "$dockerfile")
check "the build image's Rust ($image_rust) is at least rust-version ($rv)" \
  "[ \"\$(printf '%s\n' '$rv' '$image_rust' | sort -V | head -1)\" = '$rv' ]"
for lib in $(readelf -d "$PROXY_BIN" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
  check "the base provides $lib (the binary's NEEDED)" \
    "find '$work/base' -name '$lib' | grep -q ."
done
need_glibc=$(readelf -V "$PROXY_BIN" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
have_glibc=$(ls "$work/debs"/libc6_*.deb | sed 's/.*libc6_\([0-9.]*\).*/\1/')
check "the base's glibc ($have_glibc) has $need_glibc" \
  "[ \"\$(printf '%s\n' '${need_glibc#GLIBC_}' '$have_glibc' | sort -V | tail -1)\" = '$have_glibc' ]"
exit "$problems"
