# Shared by the benchmark scripts (sourced, not run): installs what is
# missing, builds the proxy, and writes the configurations of the three
# parties: the upstream (nginx serving a static token at /oauth2/token and
# static JSON elsewhere), nginx as a proxy adding a static Authorization
# header, and criteo-token-proxy. Everything listens on 127.0.0.1 only.
#
# After sourcing: $NGINX, $PROXY_BIN, $work (removed on exit), pids (killed
# on exit), ports $UP $NGX $CTP $ADM $UPS, and the functions below.
#
# TLS=1 (before sourcing, then call make_certs): the upstream serves HTTPS
# with HTTP/2 offered by ALPN, from a certificate for 127.0.0.1 signed by a
# throwaway CA that both proxies trust. $UPS is the upstream's plain-HTTP
# stub_status listener (its "accepts" counter: connections opened to it).
# PROXY_BIN=path: use that binary instead of building. PGO=1: build the
# image's binary (deploy/pgo-build.sh, about twice a release build's time)
# and use it.

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# need TOOL... : installs the Debian packages for the tools that are missing.
need() {
  local missing=() tool
  for tool in "$@"; do
    case $tool in
      nginx) command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light) ;;
      *) command -v "$tool" >/dev/null || missing+=("$tool") ;;
    esac
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} from Debian's packages" >&2
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  NGINX=$(command -v nginx || echo /usr/sbin/nginx)
}

TLS=${TLS:-0}
if [ -z "${PROXY_BIN:-}" ] && [ "${PGO:-0}" = 1 ]; then
  deploy/pgo-build.sh
  PROXY_BIN=target/pgo/criteo-token-proxy
elif [ -z "${PROXY_BIN:-}" ]; then
  cargo build --release --quiet
  PROXY_BIN=target/release/criteo-token-proxy
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(free_port); NGX=$(free_port); CTP=$(free_port); ADM=$(free_port); UPS=$(free_port)
if (( TLS )); then UPSCHEME=https; else UPSCHEME=http; fi

# make_certs: $work/tls/ca.pem (a throwaway CA) and a leaf for IP 127.0.0.1
# signed by it (rustls refuses a self-signed leaf used as its own root).
make_certs() {
  need openssl
  local d="$work/tls"
  mkdir -p "$d"
  printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > "$d/leaf.ext"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$d/ca.key" -out "$d/ca.pem" \
    -days 2 -subj /CN=bench-ca 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout "$d/key.pem" -out "$d/leaf.csr" \
    -subj /CN=127.0.0.1 2>/dev/null
  openssl x509 -req -in "$d/leaf.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
    -out "$d/crt.pem" -days 2 -extfile "$d/leaf.ext" 2>/dev/null
}

# up_accepts: connections the upstream has accepted so far (stub_status; the
# query's own connection included).
up_accepts() { curl -fs "http://127.0.0.1:$UPS/status" | awk 'NR==3 {print $1}'; }

# up_conns PID: established TCP connections from PID (and its children) to
# the upstream's port, now.
up_conns() {
  local p n=0
  for p in "$1" $(pgrep -P "$1" || true); do
    n=$(( n + $(ss -tnpH state established "( dport = :$UP )" 2>/dev/null | grep -c "pid=$p," || true) ))
  done
  echo "$n"
}

TOKEN='eyJhbGciOiJSUzI1NiJ9.benchmark-token-of-realistic-shape.c2lnbmF0dXJl'
ANSWER='{"data":[{"id":"1234","type":"Advertiser","attributes":{"advertiserName":"bench","currency":"EUR"}}]}'

# The upstream: one nginx worker, a static token and a static answer.
write_upstream_conf() {
  mkdir -p "$work/up"
  cat > "$work/up/nginx.conf" <<EOC
worker_processes 1;
pid $work/up/nginx.pid;
error_log $work/up/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$UPS;
    location = /status { stub_status; }
  }
  server {
    $(if (( TLS )); then
      # nginx 1.22 (Debian 12) has no "http2 on;" (1.25.1+): the listen flag.
      echo "listen 127.0.0.1:$UP ssl http2;"
      echo "    ssl_certificate $work/tls/crt.pem;"
      echo "    ssl_certificate_key $work/tls/key.pem;"
      echo "    ssl_session_cache shared:up:1m;"
      echo "    http2_max_requests 100000000;"
      echo "    http2_max_concurrent_streams 1024;"
    else
      echo "listen 127.0.0.1:$UP;"
    fi)
    location = /oauth2/token {
      default_type application/json;
      return 200 '{"access_token":"$TOKEN","token_type":"Bearer","expires_in":900}';
    }
    location / {
      default_type application/json;
      return 200 '$ANSWER';
    }
  }
}
EOC
}

# nginx as the proxy, adding a static Authorization header, with upstream
# keep-alive. $1: the top-level process settings (workers, master).
write_nginx_proxy_conf() {
  mkdir -p "$work/ngx"
  cat > "$work/ngx/nginx.conf" <<EOC
$1
pid $work/ngx/nginx.pid;
error_log $work/ngx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  # keepalive_requests here: the upstream block's own, 1000 by default, would
  # close and reopen (with TLS: handshake) each connection every 1000 requests.
  upstream criteo { server 127.0.0.1:$UP; keepalive 128; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$NGX;
    location / {
      proxy_pass $UPSCHEME://criteo;
      proxy_http_version 1.1;$(if (( TLS )); then printf '%s' "
      proxy_ssl_trusted_certificate $work/tls/ca.pem;
      proxy_ssl_verify on;
      proxy_ssl_name 127.0.0.1;
      proxy_ssl_session_reuse on;"; fi)
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer $TOKEN";
    }
  }
}
EOC
}

# criteo-token-proxy with one client-credentials tenant, "main", the default.
write_proxy_conf() {
  cat > "$work/proxy.toml" <<EOC
[server]
listen = "127.0.0.1:$CTP"
admin_listen = "127.0.0.1:$ADM"
default_tenant = "main"
[upstream]
url = "$UPSCHEME://127.0.0.1:$UP"
token_url = "$UPSCHEME://127.0.0.1:$UP/oauth2/token"
$(if (( TLS )); then echo "ca_file = \"$work/tls/ca.pem\""; fi)
[tenants.main]
grant = "client_credentials"
client_id = "bench"
client_secret = "bench"
EOC
}

# add_tenants N LAZY: appends tenants t2..tN (client credentials) to
# $work/proxy.toml, and refresh.lazy = true when LAZY is 1.
add_tenants() {
  if (( $2 )); then printf '[refresh]\nlazy = true\n' >> "$work/proxy.toml"; fi
  local i
  for i in $(seq 2 "$1"); do
    printf '[tenants.t%d]\ngrant = "client_credentials"\nclient_id = "bench-%d"\nclient_secret = "bench"\n' "$i" "$i"
  done >> "$work/proxy.toml"
}

start_upstream() {
  "$NGINX" -p "$work/up" -c "$work/up/nginx.conf" -g 'daemon off;' 2>"$work/up/stderr" &
  UP_PID=$!; pids+=("$UP_PID")
}

# start_postgres: a throwaway PostgreSQL cluster in $work (Debian's
# package, installed if missing; run as the `postgres` user when this
# script runs as root, which initdb refuses), listening on 127.0.0.1:$PG.
# Sets $PG_URL.
start_postgres() {
  local bin
  bin=$(dirname "$(command -v initdb 2>/dev/null || ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | tail -1)")
  if [ ! -x "$bin/initdb" ]; then
    echo "installing postgresql from Debian's packages" >&2
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
    bin=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | tail -1)")
  fi
  local as=()
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    as=(runuser -u postgres --)
  fi
  PG=$(free_port)
  mkdir -p "$work/pg"
  [ "$(id -u)" -eq 0 ] && chown postgres "$work/pg" && chmod 755 "$work"
  "${as[@]}" "$bin/initdb" -D "$work/pg/data" -A trust -U criteo --no-sync >/dev/null
  "${as[@]}" "$bin/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w \
    -o "-k $work/pg -h 127.0.0.1 -p $PG -F" start >/dev/null
  pids+=("$(head -1 "$work/pg/data/postmaster.pid")")
  PG_URL="postgres://criteo@127.0.0.1:$PG/postgres?sslmode=disable"
}

# criteo-token-proxy whose default tenant is a refresh-token tenant kept in
# PostgreSQL (start_postgres first): the request path must cost what it
# costs for a client-credentials tenant, the database being touched only by
# the refresher.
write_proxy_conf_shared() {
  cat > "$work/proxy.toml" <<EOC
[server]
listen = "127.0.0.1:$CTP"
admin_listen = "127.0.0.1:$ADM"
default_tenant = "main"
[upstream]
url = "http://127.0.0.1:$UP"
token_url = "http://127.0.0.1:$UP/oauth2/token"
[store]
url = "$PG_URL"
[tenants.main]
grant = "refresh_token"
client_id = "bench"
client_secret = "bench"
redirect_uri = "http://127.0.0.1:$ADM/oauth/callback"
refresh_token = "bench-seed"
EOC
}
