#!/usr/bin/env bash
# Side by side, in one run: nginx adding a static Authorization header (what an
# infra engineer would run instead) against criteo-token-proxy, both in front of
# the same upstream (nginx serving a static token at /oauth2/token and static
# JSON elsewhere), loaded in turn with wrk over several alternating rounds.
#
#   benches/compare-nginx.sh                 # 5 rounds of 10 s, 64 connections
#   ROUNDS=3 DURATION=5s CONNS=64 benches/compare-nginx.sh
#   TENANTS=10000 benches/compare-nginx.sh          # 9,999 more tenants configured
#   TENANTS=10000 LAZY=1 benches/compare-nginx.sh   # ... with refresh.lazy = true
#   TLS=1 benches/compare-nginx.sh           # the upstream over HTTPS, HTTP/2 by ALPN
#   PROXY_BIN=/path/to/criteo-token-proxy ...       # that binary, no cargo build
#   PGO=1 benches/compare-nginx.sh           # the image's binary (deploy/pgo-build.sh)
#
# Prints requests/s, p50/p99 latency, non-2xx responses, CPU per request of
# each proxy process (user + system from /proc/PID/stat around each round),
# peak RSS, and the upstream connections each proxy opened (the upstream's
# stub_status "accepts" counter around each round: only the proxy under test
# talks to it then) and held at the round's end (ss, by pid), and the ratios.
# With TLS=1 the upstream nginx serves HTTPS with HTTP/2 offered by ALPN from
# a throwaway CA's certificate for 127.0.0.1; criteo-token-proxy trusts the CA
# through upstream.ca_file, nginx through proxy_ssl_trusted_certificate (and
# speaks HTTP/1.1 to it: nginx proxies never use HTTP/2 upstream).
# Installs nginx, wrk (and openssl) from Debian's packages if missing.
# Everything listens on 127.0.0.1 only.
set -euo pipefail

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
WRK_THREADS=${WRK_THREADS:-2}
TENANTS=${TENANTS:-1}
LAZY=${LAZY:-0}
# shellcheck source=benches/common.sh
source "$(dirname "$0")/common.sh"
need nginx wrk
if (( TLS )); then make_certs; fi
write_upstream_conf
write_nginx_proxy_conf "worker_processes auto;"
write_proxy_conf
# More tenants (the load still goes to "main"): what memory and the request
# path cost when many tenants are configured.
add_tenants "$TENANTS" "$LAZY"

start_upstream
"$NGINX" -p "$work/ngx" -c "$work/ngx/nginx.conf" -g 'daemon off;' 2>"$work/ngx/stderr" &
NGX_PID=$!; pids+=($NGX_PID)
RUST_LOG=warn ${PROXY_ENV:-} "$PROXY_BIN" --config "$work/proxy.toml" 2>"$work/proxy.log" &
CTP_PID=$!; pids+=($CTP_PID)

for _ in $(seq 1200); do   # up to 2 minutes: 10,000 tenants fetch 10,000 tokens
  if curl -fs "http://127.0.0.1:$ADM/readyz" >/dev/null 2>&1 &&
     curl -fs "http://127.0.0.1:$NGX/x" >/dev/null 2>&1; then break; fi
  sleep 0.1
done
curl -fs "http://127.0.0.1:$CTP/2024-10/advertisers/me" >/dev/null || { echo "proxy not serving" >&2; cat "$work/proxy.log" >&2; exit 1; }

# Peak resident memory (VmHWM) of a process and its children, in KiB.
peak_kib() {
  local total=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    total=$(( total + $(awk '/VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0) ))
  done
  echo "$total"
}

# CPU time (user and system, in clock ticks) of a process and its children.
cpu_ticks() {
  local user=0 sys=0 p u s
  for p in "$1" $(pgrep -P "$1" || true); do
    read -r u s < <(awk '{print $14, $15}' "/proc/$p/stat" 2>/dev/null || echo 0 0)
    user=$(( user + u )); sys=$(( sys + s ))
  done
  echo "$user $sys"
}

# One wrk run. Besides wrk's report, records the CPU ticks spent by the
# proxy under test (user, system), by the upstream, and by wrk itself
# (its subshell's reaped-children time), so the whole chain's cost per
# request is known.
run_wrk() { # name port round pid
  local out="$work/$1.$3.txt" pu0 ps0 pu1 ps1 uu0 us0 uu1 us1 a0 a1 held
  a0=$(up_accepts)
  read -r pu0 ps0 < <(cpu_ticks "$4"); read -r uu0 us0 < <(cpu_ticks "$UP_PID")
  (
    wrk -t"$WRK_THREADS" -c"$CONNS" -d"$DURATION" --latency "http://127.0.0.1:$2/2024-10/advertisers/me" > "$out" 2>&1
    local f; read -r -a f < "/proc/$BASHPID/stat"  # read here, not in a $(...) subshell
    echo "wrk_ticks $(( f[15] + f[16] ))" >> "$out"
  )
  read -r pu1 ps1 < <(cpu_ticks "$4"); read -r uu1 us1 < <(cpu_ticks "$UP_PID")
  held=$(up_conns "$4"); a1=$(up_accepts)
  echo "up_conns $(( a1 - a0 - 1 )) $held" >> "$out"
  echo "cpu_ticks $(( pu1 - pu0 )) $(( ps1 - ps0 )) $(( uu1 + us1 - uu0 - us0 )) $(getconf CLK_TCK)" >> "$out"
}

echo "machine: $(nproc) cores, $(uname -r); nginx $("$NGINX" -v 2>&1 | sed 's/.*\///'); $("$PROXY_BIN" --version)"
echo "load: wrk -t$WRK_THREADS -c$CONNS -d$DURATION, $ROUNDS alternating rounds; $TENANTS tenant(s) configured$( (( LAZY )) && echo ', refresh.lazy')"
if (( TLS )); then echo "upstream: HTTPS (TLS, HTTP/2 offered by ALPN), nginx proxy_pass https:// with keepalive 128"
else echo "upstream: plain HTTP/1.1, nginx proxy_pass http:// with keepalive 128"; fi
run_wrk warmup-nginx "$NGX" 0 "$NGX_PID" || true
run_wrk warmup-proxy "$CTP" 0 "$CTP_PID" || true
for r in $(seq "$ROUNDS"); do
  if (( r % 2 )); then run_wrk nginx "$NGX" "$r" "$NGX_PID"; run_wrk proxy "$CTP" "$r" "$CTP_PID";
  else run_wrk proxy "$CTP" "$r" "$CTP_PID"; run_wrk nginx "$NGX" "$r" "$NGX_PID"; fi
done

python3 - "$work" "$ROUNDS" "$(peak_kib "$NGX_PID")" "$(peak_kib "$CTP_PID")" <<'EOF'
import re, statistics, sys
work, rounds, ngx_kib, ctp_kib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
unit = {"us": 0.001, "ms": 1.0, "s": 1000.0}
def parse(path):
    t = open(path).read()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
    lat = {p: float(v) * unit[u] for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", t, re.M)}
    non2xx = int((re.search(r"Non-2xx or 3xx responses:\s+(\d+)", t) or [0, 0])[1])
    errs = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", t))
    reqs = int(re.search(r"(\d+) requests in", t).group(1))
    user, system, up, hz = map(int, re.search(r"cpu_ticks (\d+) (\d+) (\d+) (\d+)", t).groups())
    wrk_ticks = int(re.search(r"wrk_ticks (\d+)", t).group(1))
    opened, held = map(int, re.search(r"up_conns (-?\d+) (\d+)", t).groups())
    us = lambda ticks: ticks / hz * 1e6 / max(reqs, 1)
    return rps, lat["50"], lat["99"], non2xx, errs, us(user + system), us(user), us(system), us(up), us(wrk_ticks), opened, held
rows = {n: [parse(f"{work}/{n}.{r}.txt") for r in range(1, rounds + 1)] for n in ("nginx", "proxy")}
print(f"\n{'round':>5} {'':>20} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'errors':>7} {'CPU us/req':>10} {'up opened':>9} {'up held':>7}")
for r in range(rounds):
    for n, label in (("nginx", "nginx (static token)"), ("proxy", "criteo-token-proxy")):
        rps, p50, p99, bad, errs, cpu = rows[n][r][:6]
        opened, held = rows[n][r][10:12]
        print(f"{r+1:>5} {label:>20} {rps:>10.0f} {p50:>8.3f} {p99:>8.3f} {bad:>8} {errs:>7} {cpu:>10.1f} {opened:>9} {held:>7}")
def warm_opened(n):
    m = re.search(r"up_conns (-?\d+)", open(f"{work}/warmup-{n}.0.txt").read())
    return int(m.group(1)) if m else 0
med = {n: [statistics.median(x[i] for x in rows[n]) for i in range(12)] for n in rows}
tot = {n: (sum(x[3] for x in rows[n]), sum(x[4] for x in rows[n])) for n in rows}
print("\nmedian over rounds:")
for n, label, kib in (("nginx", "nginx (static token)", ngx_kib), ("proxy", "criteo-token-proxy", ctp_kib)):
    rps, p50, p99, cpu = (med[n][i] for i in (0, 1, 2, 5))
    print(f"  {label:>20}: {rps:>9.0f} req/s  p50 {p50:.3f} ms  p99 {p99:.3f} ms  non-2xx {tot[n][0]}  errors {tot[n][1]}  CPU {cpu:.1f} us/req  peak RSS {kib/1024:.1f} MiB")
print("\nupstream connections opened (warm-up round, then the measured rounds) and held at each round's end:")
for n, label in (("nginx", "nginx (static token)"), ("proxy", "criteo-token-proxy")):
    print(f"  {label:>20}: warm-up {warm_opened(n)}, measured rounds {sum(x[10] for x in rows[n])}; held {max(x[11] for x in rows[n])} at most")
print(f"\nratios (criteo-token-proxy / nginx): req/s {med['proxy'][0]/med['nginx'][0]:.2f}x  "
      f"p50 {med['proxy'][1]/med['nginx'][1]:.2f}x  p99 {med['proxy'][2]/med['nginx'][2]:.2f}x  "
      f"CPU/req {med['proxy'][5]/med['nginx'][5]:.2f}x  peak RSS {ctp_kib/max(ngx_kib,1):.2f}x")

# The cores are saturated (wrk, the upstream and the proxy share them), so
# req/s is about cores / (CPU per request of the whole chain).
print("\nwhere the CPU goes, median us per request:")
chain = {}
for n, label in (("nginx", "nginx (static token)"), ("proxy", "criteo-token-proxy")):
    user, system, up, wrk = med[n][6], med[n][7], med[n][8], med[n][9]
    chain[n] = user + system + up + wrk
    print(f"  {label:>20}: user {user:5.1f} + system {system:5.1f}  | upstream {up:5.1f}  wrk {wrk:5.1f}  | chain {chain[n]:5.1f}")
goal = chain["nginx"] / 1.2
left = goal - med["proxy"][8] - med["proxy"][9]
print(f"  1.2x nginx's req/s needs a chain of <= {goal:.1f} us/request, which leaves the proxy <= {left:.1f} us;\n"
      f"  the proxy's system time alone (the same loopback TCP work nginx does: same segments and syscalls) is {med['proxy'][7]:.1f} us.")
EOF
