#!/usr/bin/env bash
# Fixed-rate latency: a sidecar never runs saturated, so what users feel is
# the latency it adds at ordinary load. In one run: nginx adding a static
# Authorization header and criteo-token-proxy, in front of the same upstream
# as compare-nginx.sh (common.sh's configurations). First nginx's saturation
# rate is measured (wrk, as compare-nginx.sh loads it); then at 25 %, 50 % and
# 75 % of that rate each proxy is driven in turn at a fixed rate, over
# alternating rounds, and its p50 / p99 / p99.9 latency reported.
#
#   benches/fixed-rate.sh                    # 5 rounds, 10 s per step: ~7 minutes
#   GENERATOR=oha benches/fixed-rate.sh      # oha drives the load (see below)
#   ROUNDS=1 DURATION=3s benches/fixed-rate.sh      # a quick check of the script
#   LOADS="10 50 90" benches/fixed-rate.sh   # other fractions of nginx's rate, in %
#   TLS=1 benches/fixed-rate.sh              # the upstream over HTTPS, HTTP/2 by ALPN
#   PROXY_BIN=/path/to/criteo-token-proxy ...       # that binary, no cargo build
#   OHA=/path/to/oha ...                     # that oha, no cargo install
#   SATURATION_BY=oha benches/fixed-rate.sh  # nginx's rate under oha instead
#   TWIN=1 LOADS=25 ROUNDS=20 benches/fixed-rate.sh # + nginx against a copy of itself
#
# The load generator (GENERATOR) is benches/openloop.rs by default, built by
# this script: one thread, oha's scheduling model (below), records kept in a
# vector sized for the whole run. On two cores the generator shares the CPU
# with the parties it measures; oha costs about 18 us of CPU per request
# where wrk costs about 9, and it stalls whenever its vector of results
# doubles: slow answers bunched up at the same second of every run (6.78 s
# at 9,663 req/s: the 65,536th record) for both proxies, and made most of the
# p99. With GENERATOR=oha, 75 % of the rate nginx reaches under wrk keeps the
# machine about 95 % busy, so that step measures queueing on a saturated
# machine more than either proxy. SATURATION_BY=oha takes the fractions of
# the rate nginx reaches under oha itself: loads the machine carries.
#
# GENERATOR=oha: oha $OHA_VERSION (`-q RATE --latency-correction`),
# installed with `cargo install --locked` under ~/.cache if missing. Why oha
# (and openloop, which schedules as it does) and not h2load: h2load --rps starts each request's clock when it sends it,
# and an HTTP/1.1 connection sends its next request only once the previous
# response is in, so a late response delays the requests queued behind it and
# their wait is never counted (coordinated omission). oha's scheduler stamps
# each request when its turn in the fixed-rate schedule comes and queues it
# for the first free connection; with --latency-correction the latency runs
# from that stamp, so the queueing a slow response causes is counted.
# (oha stamps when its timer fires, not at the ideal time: its own lag is
# not counted, so it is measured: "lag" below.) Checked here: 2,000 req/s on
# 64 connections to an nginx stopped (SIGSTOP) for 0.5 s of 3 s, so 1/6 of
# the requests fall due during the stop: oha --latency-correction reports
# p90 240 ms, p95 378 ms; h2load --h1 --rps, from its --log-file, 2.1 and 2.2;
# openloop p90 213 ms, p95 359 ms, p99 474 ms (a request falling due t ms
# into the stop waits 500 - t ms: 200, 350 and 470 expected). openloop costs
# 14 and 12 us of CPU per request at 10,000 and 20,000 req/s, oha 25 and 17
# (same nginx, 4 s windows, one run each).
#
# oha runs one tokio worker thread (OHA_THREADS=1): it shares the two cores
# with the parties it measures, and with one thread it costs less (measured
# here, 50,000 requests at 10,000/s to a static nginx, 3 runs each: 18 us of
# CPU and 0.12 voluntary context switches per request, against 23 us and
# 0.44 with two threads); its lag shows whether one thread keeps up.
#
# Each step runs $CONNS connections (the same for both proxies; each takes the
# next due request when free) for WARMUP + DURATION + TAIL seconds and keeps
# the generator's per-request records (openloop's CSV, oha's --db-url
# SQLite): only requests due in the
# DURATION window count, so connection set-up (WARMUP) is left out and the
# requests due at the window's end still have TAIL seconds to finish.
# Reported per step: achieved rate (responses to requests due in the window,
# per second), p50 / p99 / p99.9 latency (nearest rank), non-2xx responses,
# errors (failed connections or requests, or no answer within 10 s), the
# generator's lag behind its schedule (p99.9; "~" past 2 ms), and the CPU used
# over the window, in % of the whole machine: all of it (busy), the
# generator's, the proxy's.
# A step whose achieved rate falls more than 1 % short of the target, or that
# had errors, is marked "!" and makes the script fail: a generator (or proxy)
# that cannot keep up must not pass for a lower rate.
# The final table gives, per load and proxy, the median over rounds and the
# min-max spread, and the proxy/nginx ratio per percentile (median and spread
# of each round's ratio: the two were measured one after the other).
# TWIN=1 adds a third party: a second nginx with the same configuration on
# its own port ("nginx twin"), measured in the same rounds (the order rotates).
# Its ratio to nginx is what this machine makes of two identical proxies: the
# noise floor against which the proxy's ratio is read. Each ratio line ends
# with the number of rounds whose p99 ratio is at or under 1.0x.
# Installs nginx, wrk (and openssl) from Debian's packages if missing.
# Everything listens on 127.0.0.1 only.
set -euo pipefail

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-1s}
TAIL=${TAIL:-1s}
CONNS=${CONNS:-64}
LOADS=${LOADS:-25 50 75}
SATURATION=${SATURATION:-5s}
SATURATION_BY=${SATURATION_BY:-wrk}
case $SATURATION_BY in oha|wrk) ;; *) echo "SATURATION_BY=$SATURATION_BY: oha or wrk" >&2; exit 2;; esac
GENERATOR=${GENERATOR:-openloop}
case $GENERATOR in oha|openloop) ;; *) echo "GENERATOR=$GENERATOR: openloop or oha" >&2; exit 2;; esac
WRK_THREADS=${WRK_THREADS:-2}
TWIN=${TWIN:-0}
case $TWIN in 0|1) ;; *) echo "TWIN=$TWIN: 0 or 1" >&2; exit 2;; esac
OHA_THREADS=${OHA_THREADS:-1}
OHA_VERSION=1.16.0
# Whole seconds (the measured window is cut from oha's records in seconds),
# checked before common.sh builds anything.
secs() { case $1 in *[!0-9]*s|*[!0-9s]*|s|'') echo "$2=$1: whole seconds, like 10s" >&2; exit 2;; esac; echo "${1%s}"; }
D=$(secs "$DURATION" DURATION); W=$(secs "$WARMUP" WARMUP); T=$(secs "$TAIL" TAIL)
# shellcheck source=benches/common.sh
source "$(dirname "$0")/common.sh"
need nginx wrk

# openloop: built here (a bench target: `cargo bench` alone runs it idle).
if [ "$GENERATOR" = openloop ] && [ -z "${OPENLOOP:-}" ]; then
  OPENLOOP=$(cargo build --release --quiet --bench openloop --message-format=json |
    python3 -c 'import json, sys
for m in map(json.loads, sys.stdin):
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "openloop" and m.get("executable"):
        print(m["executable"])' | tail -1)
  [ -x "$OPENLOOP" ] || { echo "could not build benches/openloop.rs" >&2; exit 1; }
fi
# oha, pinned (its command line and its scheduler are what this script relies
# on); cargo install builds it once, in a few minutes.
if [ -z "${OHA:-}" ] && { [ "$GENERATOR" = oha ] || [ "$SATURATION_BY" = oha ]; }; then
  oha_root=${XDG_CACHE_HOME:-$HOME/.cache}/criteo-token-proxy-bench/oha-$OHA_VERSION
  OHA=$oha_root/bin/oha
  if [ ! -x "$OHA" ]; then
    echo "installing oha $OHA_VERSION with cargo install into $oha_root" >&2
    cargo install oha --version "$OHA_VERSION" --locked --quiet --root "$oha_root"
  fi
fi

if (( TLS )); then make_certs; fi
write_upstream_conf
write_nginx_proxy_conf "worker_processes auto;"
write_proxy_conf
start_upstream
"$NGINX" -p "$work/ngx" -c "$work/ngx/nginx.conf" -g 'daemon off;' 2>"$work/ngx/stderr" &
NGX_PID=$!; pids+=("$NGX_PID")
RUST_LOG=warn "$PROXY_BIN" --config "$work/proxy.toml" 2>"$work/proxy.log" &
CTP_PID=$!; pids+=("$CTP_PID")
if (( TWIN )); then
  # The same nginx.conf but for its port and its own files.
  NGX2=$(free_port)
  mkdir -p "$work/ngx2"
  sed -e "s|127.0.0.1:$NGX;|127.0.0.1:$NGX2;|" -e "s|$work/ngx/|$work/ngx2/|g" "$work/ngx/nginx.conf" > "$work/ngx2/nginx.conf"
  "$NGINX" -p "$work/ngx2" -c "$work/ngx2/nginx.conf" -g 'daemon off;' 2>"$work/ngx2/stderr" &
  NGX2_PID=$!; pids+=("$NGX2_PID")
fi
for _ in $(seq 300); do
  if curl -fs "http://127.0.0.1:$ADM/readyz" >/dev/null 2>&1 &&
     curl -fs "http://127.0.0.1:$NGX/x" >/dev/null 2>&1 &&
     { (( ! TWIN )) || curl -fs "http://127.0.0.1:$NGX2/x" >/dev/null 2>&1; }; then break; fi
  sleep 0.1
done
URL_PATH=/2024-10/advertisers/me
curl -fs "http://127.0.0.1:$CTP$URL_PATH" >/dev/null || { echo "proxy not serving" >&2; cat "$work/proxy.log" >&2; exit 1; }
curl -fs "http://127.0.0.1:$NGX$URL_PATH" >/dev/null || { echo "nginx not serving" >&2; cat "$work/ngx/error.log" >&2; exit 1; }
if (( TWIN )); then
  curl -fs "http://127.0.0.1:$NGX2$URL_PATH" >/dev/null || { echo "nginx twin not serving" >&2; cat "$work/ngx2/error.log" >&2; exit 1; }
fi

# An nginx's master and its workers (the proxy's threads are counted in its stat).
nginx_pids() { echo "$1" $(pgrep -P "$1"); }
# The parties, in the order of the first step; each step after rotates it.
PARTY_NAMES=(nginx proxy); PARTY_PORTS=("$NGX" "$CTP"); PARTY_PIDS=("$(nginx_pids "$NGX_PID")" "$CTP_PID")
if (( TWIN )); then
  PARTY_NAMES+=(twin); PARTY_PORTS+=("$NGX2"); PARTY_PIDS+=("$(nginx_pids "$NGX2_PID")")
fi
echo "machine: $(nproc) cores, $(uname -r); nginx $("$NGINX" -v 2>&1 | sed 's/.*\///'); $("$PROXY_BIN" --version)$([ -z "${OHA:-}" ] || echo "; $("$OHA" --version)")"
if (( TLS )); then echo "upstream: HTTPS (TLS, HTTP/2 offered by ALPN), nginx proxy_pass https:// with keepalive 128"
else echo "upstream: plain HTTP/1.1, nginx proxy_pass http:// with keepalive 128"; fi

# Warm-up (both proxies open their upstream connections), then nginx's
# saturation rate (SATURATION_BY: wrk by default, see above).
wrk_rps() { # port duration
  wrk -t"$WRK_THREADS" -c"$CONNS" -d"$2" "http://127.0.0.1:$1$URL_PATH" | awk '/^Requests\/sec:/ {print int($2)}'
}
# oha as fast as it can (no -q): 2xx answers per second of its run.
oha_rps() { # port duration
  TOKIO_WORKER_THREADS=$OHA_THREADS "$OHA" -c "$CONNS" -z "$2" --no-tui --output-format json "http://127.0.0.1:$1$URL_PATH" 2>/dev/null |
    python3 -c 'import json, sys; d = json.load(sys.stdin); print(int(sum(v for k, v in d["statusCodeDistribution"].items() if k.startswith("2")) / d["summary"]["total"]))'
}
wrk_rps "$NGX" 2s >/dev/null
wrk_rps "$CTP" 2s >/dev/null
if (( TWIN )); then wrk_rps "$NGX2" 2s >/dev/null; fi
SAT=$("${SATURATION_BY}_rps" "$NGX" "$SATURATION")
(( SAT > 0 )) || { echo "$SATURATION_BY measured no rate against nginx" >&2; exit 1; }
if [ "$SATURATION_BY" = oha ]; then echo "nginx saturation: $SAT req/s (oha -c$CONNS -z$SATURATION, TOKIO_WORKER_THREADS=$OHA_THREADS)"
else echo "nginx saturation: $SAT req/s (wrk -t$WRK_THREADS -c$CONNS -d$SATURATION)"; fi
if [ "$GENERATOR" = oha ]; then GEN_LABEL="oha $OHA_VERSION -c$CONNS -q RATE --latency-correction (TOKIO_WORKER_THREADS=$OHA_THREADS)"
else GEN_LABEL="benches/openloop.rs, $CONNS connections, one thread"; fi
echo "fixed rate: $GEN_LABEL, $ROUNDS alternating rounds;" \
     "per step ${W}s warm-up + ${D}s measured + ${T}s tail; loads ${LOADS// /, } % of nginx's rate"

# cpu_sample PID...: CPU ticks of each process (its threads included), then
# the machine's total and idle ticks (all cores, /proc/stat).
cpu_sample() {
  local p
  for p in "$@"; do awk '{printf "%d ", $14 + $15}' "/proc/$p/stat"; done
  awk '/^cpu / {print $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $5 + $6}' /proc/stat
}

# One fixed-rate step: the generator's summary (JSON: errors), its per-request
# records (openloop: CSV; oha: SQLite) and the CPU used during the measured
# window by the machine, the generator and the proxy under test, in
# $work/NAME.ROUND.LOAD.{json,csv|db,cpu}.
run_step() { # name port round load rate proxy-pid...
  local f="$work/$1.$3.$4" port=$2 rate=$5 gen a b
  shift 5
  if [ "$GENERATOR" = oha ]; then
    TOKIO_WORKER_THREADS=$OHA_THREADS "$OHA" -c "$CONNS" -q "$rate" --latency-correction \
      -z "$(( W + D + T ))s" -w -t 10s --no-tui --output-format json -o "$f.json" --db-url "$f.db" \
      "http://127.0.0.1:$port$URL_PATH" 2>"$f.err" &
  else
    "$OPENLOOP" "127.0.0.1:$port" "$URL_PATH" "$rate" "$CONNS" "$(( W + D + T ))" "$f" 2>"$f.err" &
  fi
  gen=$!
  sleep "$W"; a=$(cpu_sample "$gen" "$@")
  sleep "$D"; b=$(cpu_sample "$gen" "$@")
  wait "$gen" || { echo "$GENERATOR failed:" >&2; cat "$f.err" >&2; exit 1; }
  echo "$a" "$b" > "$f.cpu"
}

i=0
for r in $(seq "$ROUNDS"); do
  for load in $LOADS; do
    rate=$(( SAT * load / 100 ))
    echo "round $r/$ROUNDS: $load % = $rate req/s" >&2
    n=${#PARTY_NAMES[@]}
    for j in $(seq 0 $(( n - 1 ))); do
      k=$(( (i + j) % n ))
      # shellcheck disable=SC2086 # a party's PIDs, split on purpose
      run_step "${PARTY_NAMES[k]}" "${PARTY_PORTS[k]}" "$r" "$load" "$rate" ${PARTY_PIDS[k]}
    done
    i=$(( i + 1 ))
  done
done

python3 - "$work" "$ROUNDS" "$SAT" "$W" "$D" "$LOADS" "$GENERATOR" "${PARTY_NAMES[*]}" <<'EOF'
import csv, json, math, sqlite3, statistics, sys
work, rounds, sat, w, d, loads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), [int(x) for x in sys.argv[6].split()]
gen = sys.argv[7]
LABELS = {"nginx": "nginx (static token)", "proxy": "criteo-token-proxy", "twin": "nginx twin"}
PARTIES = tuple((n, LABELS[n]) for n in sys.argv[8].split())  # nginx first: the ratios' reference
PCTS = (50.0, 99.0, 99.9)
LAG_MS = 2.0  # tokio's timer ticks every millisecond: a generator's own lag is normally under 1 ms

def rank(sorted_values, p):  # nearest rank
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)] if sorted_values else float("nan")

def step(name, r, load):
    rate = sat * load // 100
    base = f"{work}/{name}.{r}.{load}"
    if gen == "oha":
        rows = sqlite3.connect(f"{base}.db").execute(
            "SELECT start_latency_correction, duration, status FROM oha ORDER BY start_latency_correction").fetchall()
        # oha's k-th due request (in schedule order) was due at k / rate: how late its stamp came.
        lag = sorted(s - k / rate for k, (s, _, _) in enumerate(rows) if w <= s < w + d)
        errors = sum(v for k, v in json.load(open(f"{base}.json"))["errorDistribution"].items()
                     if k != "aborted due to deadline")
    else:
        with open(f"{base}.csv") as f:
            recs = [(float(r["due"]), float(r["stamp"]), float(r["latency"]), int(r["status"])) for r in csv.DictReader(f)]
        rows = [(s, lat, st) for _, s, lat, st in recs]
        lag = sorted(s - due for due, s, _, _ in recs if w <= s < w + d)
        errors = json.load(open(f"{base}.json"))["errors"]
    win = [(lat, st) for s, lat, st in rows if w <= s < w + d]
    lat = sorted(x for x, _ in win)
    achieved = len(win) / d
    ok = achieved >= 0.99 * rate and errors == 0
    ms = [rank(lat, p) * 1000 for p in PCTS]
    # CPU over the measured window, in % of the whole machine (all cores).
    c = [int(x) for x in open(f"{base}.cpu").read().split()]
    a, b = c[:len(c) // 2], c[len(c) // 2:]
    total = b[-2] - a[-2]
    cpu = [100 * (total - (b[-1] - a[-1])) / total, 100 * (b[0] - a[0]) / total,
           100 * sum(b[i] - a[i] for i in range(1, len(a) - 2)) / total]
    return dict(rate=rate, achieved=achieved, ms=ms, non2xx=sum(1 for _, st in win if not 200 <= st < 300),
                errors=errors, lag=rank(lag, 99.9) * 1000, ok=ok, cpu=cpu)

res = {(n, r, l): step(n, r, l) for n, _ in PARTIES for r in range(1, rounds + 1) for l in loads}

print(f"\n{'round':>5} {'load':>5} {'target/s':>8} {'':>20} {'achieved/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>8} {'non-2xx':>7} {'errors':>6} {'lag ms':>6} {'busy %':>6} {'gen %':>5} {'proxy %':>7}")
for r in range(1, rounds + 1):
    for l in loads:
        for n, label in PARTIES:
            s = res[n, r, l]
            print(f"{r:>5} {l:>4}% {s['rate']:>8} {label:>20} {s['achieved']:>10.0f} {s['ms'][0]:>8.3f} {s['ms'][1]:>8.3f} {s['ms'][2]:>8.3f} "
                  f"{s['non2xx']:>7} {s['errors']:>6} {s['lag']:>6.2f} {s['cpu'][0]:>6.0f} {s['cpu'][1]:>5.0f} {s['cpu'][2]:>7.0f}"
                  f"{'' if s['ok'] else ' !'}{' ~' if s['lag'] > LAG_MS else ''}")

def cell(xs, fmt):
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"

print(f"\nmedian over {rounds} round(s) (min-max):")
print(f"{'load':>5} {'target/s':>8} {'':>20} {'achieved/s':>10} {'p50 ms':>21} {'p99 ms':>21} {'p99.9 ms':>21} {'non-2xx':>7} {'errors':>6} {'proxy CPU %':>13}")
for l in loads:
    for n, label in PARTIES:
        ss = [res[n, r, l] for r in range(1, rounds + 1)]
        print(f"{l:>4}% {ss[0]['rate']:>8} {label:>20} {statistics.median(s['achieved'] for s in ss):>10.0f} "
              + " ".join(f"{cell([s['ms'][i] for s in ss], '{:.3f}'):>21}" for i in range(3))
              + f" {sum(s['non2xx'] for s in ss):>7} {sum(s['errors'] for s in ss):>6} {cell([s['cpu'][2] for s in ss], '{:.0f}'):>13}")
    for n, label in PARTIES[1:]:
        ratios = [[res[n, r, l]['ms'][i] / res['nginx', r, l]['ms'][i] for r in range(1, rounds + 1)] for i in range(3)]
        under = f"  p99 <= 1.0x in {sum(x <= 1 for x in ratios[1])}/{rounds} rounds"
        print(f"{'':>5} {'':>8} {n + ' / nginx':>20} {'':>10} " + " ".join(f"{cell(x, '{:.2f}') + 'x':>21}" for x in ratios) + under)

late = [f"{n} round {r} at {l} %" for (n, r, l), s in res.items() if s["lag"] > LAG_MS]
if late:
    print(f"\nwarning (~): {gen} fell behind its schedule by more than {LAG_MS:.0f} ms (p99.9) in: "
          + ("every step" if len(late) == len(res) else ", ".join(late))
          + "\n(its clock starts when a request's stamp is taken: that lag is not in the percentiles; a busy machine?)")
bad = [f"{n} round {r} at {l} %" for (n, r, l), s in res.items() if not s["ok"]]
if bad:
    print("\nFAILED: achieved rate more than 1 % under the target, or errors, in: " + ", ".join(bad)
          + "\n(the figures of those steps do not describe the target rate)")
    sys.exit(1)
EOF
