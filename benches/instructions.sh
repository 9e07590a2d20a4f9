#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: a figure
# that does not move with the machine's noise (wall-clock figures on a shared
# 2-core VM swing by 20 % between runs), so it can tell a 3 % change from
# none. It counts only what runs in the process, not the kernel's work.
#
#   benches/instructions.sh            # criteo-token-proxy, then nginx for reference
#   DURATION=30s benches/instructions.sh
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
cd "$(dirname "$0")/.."

missing=()
command -v valgrind >/dev/null || missing+=(valgrind)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v wrk >/dev/null || missing+=(wrk)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} from Debian's packages" >&2
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

cargo build --release --quiet
PROXY_BIN=target/release/criteo-token-proxy

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(free_port); NGX=$(free_port); CTP=$(free_port); ADM=$(free_port)
TOKEN='eyJhbGciOiJSUzI1NiJ9.benchmark-token-of-realistic-shape.c2lnbmF0dXJl'
ANSWER='{"data":[{"id":"1234","type":"Advertiser","attributes":{"advertiserName":"bench","currency":"EUR"}}]}'

mkdir -p "$work/up" "$work/ngx"
cat > "$work/up/nginx.conf" <<EOF
worker_processes 1;
pid $work/up/nginx.pid;
error_log $work/up/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$UP;
    location = /oauth2/token {
      default_type application/json;
      return 200 '{"access_token":"$TOKEN","token_type":"Bearer","expires_in":900}';
    }
    location / { default_type application/json; return 200 '$ANSWER'; }
  }
}
EOF
cat > "$work/ngx/nginx.conf" <<EOF
worker_processes 1;
master_process off;
pid $work/ngx/nginx.pid;
error_log $work/ngx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream criteo { server 127.0.0.1:$UP; keepalive 128; }
  server {
    listen 127.0.0.1:$NGX;
    location / {
      proxy_pass http://criteo;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer $TOKEN";
    }
  }
}
EOF
cat > "$work/proxy.toml" <<EOF
[server]
listen = "127.0.0.1:$CTP"
admin_listen = "127.0.0.1:$ADM"
default_tenant = "main"
[upstream]
url = "http://127.0.0.1:$UP"
token_url = "http://127.0.0.1:$UP/oauth2/token"
[tenants.main]
grant = "client_credentials"
client_id = "bench"
client_secret = "bench"
EOF

"$NGINX" -p "$work/up" -c "$work/up/nginx.conf" -g 'daemon off;' 2>"$work/up/stderr" &
pids+=($!)

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
count nginx "$NGX" "$NGINX" -p "$work/ngx" -c "$work/ngx/nginx.conf" -g 'daemon off;'
