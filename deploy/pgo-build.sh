#!/usr/bin/env bash
# The release binary the image ships: built twice, the second time with the
# profile of a training load (profile-guided optimisation, PGO). On the
# benchmarks' request path it runs about a quarter fewer instructions per
# request than a plain `cargo build --release` (README, "Performance").
#
#   deploy/pgo-build.sh             # -> target/pgo/criteo-token-proxy
#   TRAIN=20s deploy/pgo-build.sh   # each training load for 20 s (default 10 s)
#
# 1. An instrumented build (-Cprofile-generate), in target/pgo/gen.
# 2. Training: the instrumented proxy in front of a local nginx that plays
#    Criteo (the benchmarks' upstream, benches/common.sh), loaded by wrk
#    with GETs, and with JSON POSTs for a tenant whose rate limit paces
#    them (far from reached), first over plain HTTP/1.1, then over
#    HTTPS with HTTP/2 by ALPN (Criteo's own path). 127.0.0.1 only; nothing
#    leaves the machine.
# 3. llvm-profdata (the one of rustc's own LLVM version) merges the
#    profiles; a second build (-Cprofile-use), in target/pgo/use, is copied
#    to target/pgo/criteo-token-proxy.
#
# The code is the same as the plain build's: only inlining, block layout
# and branch weights follow the profile, so paths the training never takes
# (onboarding, refresh, errors) are compiled as rarely used, not left out.
# Installs what is missing from Debian's packages: llvm-N (llvm-profdata
# for rustc's LLVM N), nginx, wrk, openssl, curl and python3 (the training's
# helpers).
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN=${TRAIN:-10s}
out=$PWD/target/pgo

install_debian() {
  echo "installing $* from Debian's packages" >&2
  local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# llvm-profdata must read what rustc's LLVM writes: the same major version.
llvm=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
find_profdata() {
  local c
  for c in "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-profdata \
           "/usr/lib/llvm-$llvm/bin/llvm-profdata" "$(command -v "llvm-profdata-$llvm" || true)"; do
    [ -x "$c" ] && "$c" --version 2>/dev/null | grep -q "LLVM version $llvm\." && { echo "$c"; return; }
  done
  return 0
}
profdata=$(find_profdata)
if [ -z "$profdata" ]; then
  install_debian "llvm-$llvm" || true
  profdata=$(find_profdata)
fi
if [ -z "$profdata" ]; then
  echo "error: no llvm-profdata for LLVM $llvm (rustc's); install Debian's llvm-$llvm or rustup's llvm-tools" >&2
  exit 1
fi
# benches/common.sh picks its ports with python3 as it is sourced, before
# its own `need` could install anything.
command -v python3 >/dev/null || install_debian python3

build() { # target dir, extra rustc flag
  RUSTFLAGS="${RUSTFLAGS:-} $2" cargo build --release --locked --quiet \
    --bin criteo-token-proxy --target-dir "$1"
}

echo "1/3 instrumented build (target/pgo/gen)" >&2
build "$out/gen" "-Cprofile-generate=$out/profiles"
rm -rf "$out/profiles" "$out/merged.profdata"

# serve TLS BINARY DURATION: BINARY in front of the stand-in, checked with one
# request, then (unless DURATION is 0) loaded with GETs and with POSTs; it
# exits on SIGTERM, and an instrumented binary writes its profile then.
serve() {
  (
    TLS=$1 PROXY_BIN=$2
    # shellcheck source=benches/common.sh
    source benches/common.sh
    need nginx wrk curl
    if (( TLS )); then make_certs; fi
    write_upstream_conf
    write_proxy_conf
    # The POSTs go to a tenant with a rate limit far from reached, so that
    # pacing's path is in the profile too.
    printf '[tenants.paced]\ngrant = "client_credentials"\nclient_id = "paced"\nclient_secret = "bench"\nrate_limit = "1000000/sec"\n' >> "$work/proxy.toml"
    start_upstream
    RUST_LOG=warn "$PROXY_BIN" --config "$work/proxy.toml" 2>"$work/proxy.log" &
    local proxy=$!
    pids+=("$proxy")
    for _ in $(seq 300); do
      curl -fs "http://127.0.0.1:$CTP/2024-10/advertisers/me" >/dev/null 2>&1 && break
      sleep 0.1
    done
    curl -fs "http://127.0.0.1:$CTP/2024-10/advertisers/me" >/dev/null ||
      { echo "error: $PROXY_BIN does not serve" >&2; cat "$work/proxy.log" >&2; exit 1; }
    cat > "$work/post.lua" <<'EOL'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Criteo-Tenant"] = "paced"
wrk.body = '{"data":{"type":"Report","attributes":{"advertiserIds":"1234","startDate":"2024-10-01","endDate":"2024-10-31","format":"json","dimensions":["AdsetId","Day"],"metrics":["Clicks","Displays","AdvertiserCost"],"currency":"EUR","timezone":"UTC"}}}'
EOL
    local url="http://127.0.0.1:$CTP/2025-01/statistics/report" method opts
    for method in GET POST; do
      [ "$3" = 0 ] && break
      opts=()
      [ "$method" = POST ] && opts=(-s "$work/post.lua")
      wrk -t2 -c64 -d"$3" "${opts[@]}" "$url" > "$work/wrk.txt"
      if grep -q 'Non-2xx' "$work/wrk.txt"; then
        echo "error: the training load got error answers" >&2; cat "$work/wrk.txt" >&2; exit 1
      fi
      echo "   $( ((TLS)) && echo HTTPS || echo HTTP) $method: $(awk '/Requests\/sec/ {print $2}' "$work/wrk.txt") req/s" >&2
    done
    kill -TERM "$proxy"
    wait "$proxy" || { echo "error: $PROXY_BIN did not exit cleanly" >&2; exit 1; }
  )
}
echo "2/3 training, ${TRAIN} per load" >&2
gen=$out/gen/release/criteo-token-proxy
serve 0 "$gen" "$TRAIN"
serve 1 "$gen" "$TRAIN"
ls "$out"/profiles/*.profraw >/dev/null 2>&1 ||
  { echo "error: the training wrote no profile" >&2; exit 1; }
"$profdata" merge -o "$out/merged.profdata" "$out/profiles"

echo "3/3 optimised build (target/pgo/use)" >&2
build "$out/use" "-Cprofile-use=$out/merged.profdata"
serve 1 "$out/use/release/criteo-token-proxy" 0
cp "$out/use/release/criteo-token-proxy" "$out/criteo-token-proxy"
echo "built $out/criteo-token-proxy" >&2
