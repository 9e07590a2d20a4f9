#!/usr/bin/env bash
# Sidecar economics: what criteo-token-proxy costs at rest, in every pod.
# For each configuration (1 tenant; 10,000 tenants with refresh.lazy off, then
# on), starts the release binary in front of the benchmarks' upstream (nginx
# serving a static token), times start to /readyz 200, then samples it while
# nothing is sent to it for $IDLE seconds. nginx as the proxy (same setup as
# compare-nginx.sh) is measured the same way, for reference.
#
#   benches/idle.sh                 # IDLE=60s per configuration
#   IDLE=10s benches/idle.sh        # a quick run
#   TLS=1 benches/idle.sh           # the upstream over HTTPS (HTTP/2 by ALPN)
#   PROXY_BIN=/path/to/criteo-token-proxy benches/idle.sh   # no cargo build
#
# Measures, per process (all its threads; nginx: master and workers):
#   ready       seconds from exec to the first /readyz 200 (polled every 10 ms)
#   CPU ms/s    user + system over the idle window, per second: from
#               /proc/PID/stat (clock ticks, 10 ms resolution: 0 means less
#               than one tick in the window) and from the per-thread
#               /proc/PID/task/*/schedstat (nanoseconds, same figure, finer)
#   wake-ups/s  voluntary + nonvoluntary context switches summed over
#               /proc/PID/task/*/status, per second
#   threads     at the end of the window
#   peak RSS    VmHWM at the end of the window (start-up included)
# and the size of the binary, as built and stripped (a copy is stripped).
# Installs nginx (and openssl for TLS=1) from Debian's packages if missing.
set -euo pipefail

IDLE=${IDLE:-60s}
IDLE_S=${IDLE%s}
# shellcheck source=benches/common.sh
source "$(dirname "$0")/common.sh"
need nginx strip
if (( TLS )); then make_certs; fi
write_upstream_conf
start_upstream

# counters PID: "ticks ns switches threads" summed over the process, its
# children, and all their threads.
counters() {
  local ticks=0 ns=0 sw=0 th=0 p t
  for p in "$1" $(pgrep -P "$1" || true); do
    ticks=$(( ticks + $(awk '{print $14 + $15}' "/proc/$p/stat") ))
    for t in /proc/"$p"/task/*; do
      ns=$(( ns + $(awk '{print $1}' "$t/schedstat" 2>/dev/null || echo 0) ))
      sw=$(( sw + $(awk '/ctxt_switches/ {s += $2} END {print s + 0}' "$t/status" 2>/dev/null || echo 0) ))
      th=$(( th + 1 ))
    done
  done
  echo "$ticks $ns $sw $th"
}
peak_kib() {
  local total=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    total=$(( total + $(awk '/VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0) ))
  done
  echo "$total"
}

# measure LABEL PID READY_S: one row, after $IDLE seconds at rest.
hz=$(getconf CLK_TCK)
measure() {
  local t0 n0 s0 th t1 n1 s1
  read -r t0 n0 s0 _ < <(counters "$2")
  sleep "$IDLE_S"
  read -r t1 n1 s1 th < <(counters "$2")
  python3 -c "
import sys
label, ready, idle, hz, dt, dn, ds, th, kib = sys.argv[1:]
idle, hz = float(idle), int(hz)
print(f'{label:>42} {ready:>8} {int(dt) * 1000 / hz / idle:>10.3f} {int(dn) / 1e6 / idle:>12.3f} {int(ds) / idle:>11.2f} {th:>7} {int(kib) / 1024:>9.1f}')
" "$1" "$3" "$IDLE_S" "$hz" $(( t1 - t0 )) $(( n1 - n0 )) $(( s1 - s0 )) "$th" "$(peak_kib "$2")"
}

# proxy_case TENANTS LAZY: a fresh proxy on fresh ports, measured, stopped.
proxy_case() {
  CTP=$(free_port); ADM=$(free_port)
  write_proxy_conf
  add_tenants "$1" "$2"
  local start ready pid i
  start=$(date +%s.%N)
  RUST_LOG=warn "$PROXY_BIN" --config "$work/proxy.toml" 2>"$work/proxy.$1.$2.log" &
  pid=$!; pids+=("$pid")
  for i in $(seq 12000); do   # up to 2 minutes
    if curl -fs "http://127.0.0.1:$ADM/readyz" >/dev/null 2>&1; then break; fi
    sleep 0.01
  done
  curl -fs "http://127.0.0.1:$ADM/readyz" >/dev/null || { echo "proxy not ready" >&2; cat "$work/proxy.$1.$2.log" >&2; exit 1; }
  ready=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$start" "$(date +%s.%N)")
  measure "criteo-token-proxy, $1 tenant(s)$( (( $2 )) && echo ', lazy')" "$pid" "$ready"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

bin_size=$(stat -c %s "$PROXY_BIN")
cp "$PROXY_BIN" "$work/stripped"; strip "$work/stripped"
echo "machine: $(nproc) cores, $(uname -r); nginx $("$NGINX" -v 2>&1 | sed 's/.*\///'); $("$PROXY_BIN" --version)"
echo "binary: $(( bin_size / 1024 )) KiB as built, $(( $(stat -c %s "$work/stripped") / 1024 )) KiB stripped"
echo "idle window: ${IDLE_S} s per process after ready; upstream $( (( TLS )) && echo 'HTTPS, HTTP/2 by ALPN' || echo 'plain HTTP/1.1')"
echo
printf '%42s %8s %10s %12s %11s %7s %9s\n' "" "ready s" "CPU ms/s" "CPU ms/s" "wake-ups/s" "threads" "peak RSS"
printf '%42s %8s %10s %12s %11s %7s %9s\n' "" "" "(ticks)" "(schedstat)" "" "" "MiB"
proxy_case 1 0
proxy_case 10000 0
proxy_case 10000 1

write_nginx_proxy_conf "worker_processes auto;"
"$NGINX" -p "$work/ngx" -c "$work/ngx/nginx.conf" -g 'daemon off;' 2>"$work/ngx/stderr" &
NGX_PID=$!; pids+=("$NGX_PID")
for _ in $(seq 500); do curl -fs "http://127.0.0.1:$NGX/x" >/dev/null 2>&1 && break; sleep 0.01; done
measure "nginx (static token), master+workers" "$NGX_PID" "-"
