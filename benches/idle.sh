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
#   WARM=1 benches/idle.sh          # at rest after serving: 16 requests
#                                   # (new connections, so every worker
#                                   # holds upstream connections) first
#
# Measures, per process (all its threads; nginx: master and workers):
#   ready       seconds from exec to the first /readyz 200 (polled every 10 ms)
#   CPU ms/s    user + system over the idle window, per second: from
#               /proc/PID/stat (clock ticks, 10 ms resolution: 0 means less
#               than one tick in the window) and from the per-thread
#               /proc/PID/task/*/schedstat (nanoseconds, same figure, finer)
#   wake-ups/s  voluntary + nonvoluntary context switches summed over
#               /proc/PID/task/*/status, per second; then per thread name
#               (main: the main thread, tokio-rt-worker: tokio's blocking
#               pool, proxy-worker-N: the proxy's workers, notify-rs: the
#               file watcher's thread)
#   threads     at the end of the window
#   peak RSS    VmHWM at the end of the window (start-up included)
# and the size of the binary, as built and stripped (a copy is stripped).
# Installs nginx (and openssl for TLS=1) from Debian's packages if missing.
set -euo pipefail

IDLE=${IDLE:-60s}
IDLE_S=${IDLE%s}
WARM=${WARM:-0}
# shellcheck source=benches/common.sh
source "$(dirname "$0")/common.sh"
need nginx strip
if (( TLS )); then make_certs; fi
write_upstream_conf
start_upstream

# snapshot PID: one line per process (the process, its children) with its
# CPU clock ticks (exited threads included), then one per thread with its
# CPU nanoseconds, context switches and name.
snapshot() {
  local p t
  for p in "$1" $(pgrep -P "$1" || true); do
    echo "P $p $(awk '{print $14 + $15}' "/proc/$p/stat")"
    for t in /proc/"$p"/task/*; do
      echo "T ${t##*/} $(awk '{print $1}' "$t/schedstat" 2>/dev/null || echo 0)" \
        "$(awk '/ctxt_switches/ {s += $2} END {print s + 0}' "$t/status" 2>/dev/null || echo 0)" \
        "$(cat "$t/comm" 2>/dev/null || echo '?')"
    done
  done
}
peak_kib() {
  local total=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    total=$(( total + $(awk '/VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0) ))
  done
  echo "$total"
}

# measure LABEL PID READY_S: one row after $IDLE seconds at rest, then the
# wake-ups per second of each kind of thread (by name; a worker's number
# dropped), so that the report says where they come from. A thread that
# exits during the window is left out (its count goes with it) and counted.
hz=$(getconf CLK_TCK)
# The snapshots are kept in memory: a file written in $work, the folder of
# the proxy's configuration, would wake its file watcher.
measure() {
  local before after
  before=$(snapshot "$2")
  sleep "$IDLE_S"
  after=$(snapshot "$2")
  python3 - "$1" "$3" "$IDLE_S" "$hz" "$(peak_kib "$2")" "$2" "$before" "$after" <<'EOP'
import re, sys
label, ready, idle, hz, kib, main_pid, before, after = sys.argv[1:]
idle, hz = float(idle), int(hz)
def read(text):
    ticks, threads = 0, {}
    for line in text.splitlines():
        kind, rest = line.split(' ', 1)
        if kind == 'P':
            ticks += int(rest.split()[1])
        else:
            tid, ns, sw, name = rest.split(' ', 3)
            threads[tid] = (int(ns), int(sw), name)
    return ticks, threads
t0, a = read(before)
t1, b = read(after)
ns = sw = 0
groups = {}
for tid, (n1, s1, name) in b.items():
    n0, s0, _ = a.get(tid, (0, 0, name))
    ns, sw = ns + n1 - n0, sw + s1 - s0
    # The main thread is named after the binary; workers by their number.
    kind = 'main' if tid == main_pid else re.sub(r'-\d+$', '-N', name)
    groups[kind] = groups.get(kind, 0) + s1 - s0
gone = len(set(a) - set(b))
print(f'{label:>42} {ready:>8} {(t1 - t0) * 1000 / hz / idle:>10.3f} {ns / 1e6 / idle:>12.3f}'
      f' {sw / idle:>11.2f} {len(b):>7} {int(kib) / 1024:>9.1f}')
by = ', '.join(f'{k} {v / idle:.2f}' for k, v in sorted(groups.items(), key=lambda g: -g[1]))
print(f'{"":>44}wake-ups/s by thread: {by}' + (f' ({gone} thread(s) exited)' if gone else ''))
EOP
}

# warm PORT: 16 requests through the proxy on PORT, each on a connection of
# its own (spread over the workers), so that the window then shows what
# kept-alive upstream connections cost at rest.
warm() {
  local i
  for i in $(seq 16); do
    curl -fs -o /dev/null "http://127.0.0.1:$1/x" || { echo "a warm-up request failed" >&2; exit 1; }
  done
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
  if (( WARM )); then warm "$CTP"; fi
  measure "criteo-token-proxy, $1 tenant(s)$( (( $2 )) && echo ', lazy')" "$pid" "$ready"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

bin_size=$(stat -c %s "$PROXY_BIN")
cp "$PROXY_BIN" "$work/stripped"; strip "$work/stripped"
echo "machine: $(nproc) cores, $(uname -r); nginx $("$NGINX" -v 2>&1 | sed 's/.*\///'); $("$PROXY_BIN" --version)"
echo "binary: $(( bin_size / 1024 )) KiB as built, $(( $(stat -c %s "$work/stripped") / 1024 )) KiB stripped"
echo "idle window: ${IDLE_S} s per process after ready$( (( WARM )) && echo ' and 16 requests'); upstream $( (( TLS )) && echo 'HTTPS, HTTP/2 by ALPN' || echo 'plain HTTP/1.1')"
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
if (( WARM )); then warm "$NGX"; fi
measure "nginx (static token), master+workers" "$NGX_PID" "-"
