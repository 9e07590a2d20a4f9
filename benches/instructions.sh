#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: a figure
# that does not move with the machine's noise (wall-clock figures on a shared
# 2-core VM swing by 20 % between runs), so it can tell a 3 % change from
# none. It counts only what runs in the process, not the kernel's work.
#
#   benches/instructions.sh            # criteo-token-proxy, then nginx for reference
#   PGO=1 benches/instructions.sh      # the image's binary (deploy/pgo-build.sh)
#   DURATION=30s benches/instructions.sh
#   PACED=1 benches/instructions.sh          # also the tenant with a rate limit
#                                            # far from reached (pacing's cost)
#   STORE=postgres benches/instructions.sh   # also a refresh-token tenant kept
#                                            # in PostgreSQL (the request path
#                                            # must not touch the database)
#
# The same upstream as compare-nginx.sh (nginx: a static token and static JSON);
# the proxy and nginx (one worker, adding a static Authorization header) each
# run under callgrind in turn; wrk sends a warm-up, counters are zeroed, wrk
# loads 16 connections for DURATION, and the count is divided by the
# requests completed. (A fixed request count would be neater, but under
# callgrind a few connections can stall after the counters are zeroed, and
# wrk would wait for them; idle waiting costs next to no instructions.) Installs
# valgrind, nginx and wrk from Debian's packages if missing. 127.0.0.1 only.
set -euo pipefail

DURATION=${DURATION:-20s}
# shellcheck source=benches/common.sh
source "$(dirname "$0")/common.sh"
need valgrind nginx wrk
write_upstream_conf
write_nginx_proxy_conf "worker_processes 1;
master_process off;"
write_proxy_conf
start_upstream

count() { # label port command...
  local label=$1 port=$2; shift 2
  valgrind --tool=callgrind --callgrind-out-file="$work/$label.%p" --dump-instr=no "$@" 2>"$work/$label.vg" &
  local vg=$!; pids+=($vg)
  for _ in $(seq 300); do curl -fs "http://127.0.0.1:$port/warm" >/dev/null 2>&1 && break; sleep 0.2; done
  wrk -t1 -c16 -d3s "http://127.0.0.1:$port/2024-10/advertisers/me" >/dev/null
  callgrind_control -z "$vg" >/dev/null 2>&1
  local out; out=$(wrk -t1 -c16 -d"$DURATION" "http://127.0.0.1:$port/2024-10/advertisers/me")
  callgrind_control -d "$vg" >/dev/null 2>&1
  local reqs non2xx ir file
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
  for _ in $(seq 50); do file=$(ls -t "$work/$label".* 2>/dev/null | grep -v '\.vg$' | head -1); [ -n "$file" ] && grep -q '^totals:' "$file" && break; sleep 0.2; done
  ir=$(awk '/^totals:/ {print $2; exit}' "$file")
  kill "$vg" 2>/dev/null || true
  if [ -n "${non2xx:-}" ]; then echo "$label: $non2xx non-2xx answers; the count is not valid" >&2; exit 1; fi
  printf '%-22s %8d requests  %7d instructions per request\n' "$label" "$reqs" $(( ir / reqs ))
}

echo "user-space instructions per request (callgrind), wrk -t1 -c16 -d$DURATION"
RUST_LOG=warn count criteo-token-proxy "$CTP" "$PROXY_BIN" --config "$work/proxy.toml"
if [ -n "${PACED:-}" ]; then
  CTP=$(free_port); ADM=$(free_port); write_proxy_conf
  printf 'rate_limit = "1000000/sec"\n' >> "$work/proxy.toml"
  RUST_LOG=warn count ctp-rate-limited "$CTP" "$PROXY_BIN" --config "$work/proxy.toml"
fi
if [ "${STORE:-}" = postgres ]; then
  start_postgres
  CTP=$(free_port); ADM=$(free_port); write_proxy_conf_shared
  RUST_LOG=error count ctp-refresh-token-pg "$CTP" "$PROXY_BIN" --config "$work/proxy.toml"
fi
count nginx "$NGX" "$NGINX" -p "$work/ngx" -c "$work/ngx/nginx.conf" -g 'daemon off;'
