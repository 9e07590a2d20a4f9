#!/usr/bin/env python3
"""Peak memory of the proxy under the loads that used to blow its budget.

    cargo build --release && benches/memory.py [--tls] [--workers N] [--server 'key = value'] [--only posts,h2,...]

Starts target/release/criteo-token-proxy with its default limits against a
stand-in for Criteo in this process (a token endpoint and an API that
answers slowly; over TLS with HTTP/1.1 with --tls, the costliest upstream
connections), runs each scenario, and prints the proxy's peak RSS
(VmHWM, reset between scenarios through /proc/PID/clear_refs) and the
answers' statuses. Nothing leaves 127.0.0.1.

Scenarios:
  posts   200 concurrent 1 MiB POSTs, answered 2 s after their body arrived
  gets    as many concurrent GETs as server.max_connections allows, against
          an upstream that answers after 3 s
  heads   as many connections as server.max_connections allows, each
          sending 60 KB of a request head and then nothing
  slowrd  as many connections as upstream.max_connections allows, each
          fetching a 4 MiB answer and reading none of it
  h2      server.max_connections HTTP/2 connections, each with as many GETs
          as the proxy lets a connection have in progress (--h2-streams),
          against an upstream that answers after 3 s (benches/h2load.rs)
  h2posts the same with 1 MiB POSTs, answered 2 s after their body arrived
"""

import argparse
import asyncio
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time

TOKEN = b'{"access_token":"memory-bench-token","token_type":"Bearer","expires_in":900}'


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def reset_peak(pid):
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


async def read_head(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    m = re.search(rb"content-length:\s*(\d+)", head, re.I)
    if m:
        length = int(m.group(1))
    return head, length


# === the stand-in for Criteo ===

async def upstream(reader, writer):
    try:
        while True:
            head, length = await read_head(reader)
            if length:
                await reader.readexactly(length)
            path = head.split(b" ", 2)[1]
            if path.startswith(b"/oauth2/token"):
                body = TOKEN
            elif path.startswith(b"/big"):
                size = 4 << 20
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
                chunk = b"b" * (64 << 10)
                for _ in range(size // len(chunk)):
                    writer.write(chunk)
                    await writer.drain()
                continue
            else:
                m = re.search(rb"ms=(\d+)", path)
                await asyncio.sleep(int(m.group(1)) / 1000 if m else 0)
                body = b'{"ok":true}'
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


# === the clients ===

async def request(port, raw, statuses, read_body=True):
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        head, length = await read_head(reader)
        statuses.append(int(head.split(b" ", 2)[1]))
        if read_body and length:
            await reader.readexactly(length)
        writer.close()
    except Exception as e:  # noqa: BLE001 - counted, not fatal
        statuses.append(type(e).__name__)


async def posts(port, n=200, size=1 << 20):
    statuses = []
    body = b"p" * size
    raw = (b"POST /2024-10/upload?ms=2000 HTTP/1.1\r\nhost: x\r\n"
           b"content-length: %d\r\n\r\n%s" % (size, body))
    await asyncio.gather(*(request(port, raw, statuses) for _ in range(n)))
    return statuses


async def gets(port, n):
    statuses = []
    raw = b"GET /2024-10/slow?ms=3000 HTTP/1.1\r\nhost: x\r\n\r\n"
    await asyncio.gather(*(request(port, raw, statuses) for _ in range(n)))
    return statuses


async def heads(port, n, pid):
    conns = []
    for _ in range(n):
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError as e:
            return [type(e).__name__]
        w.write(b"GET /x HTTP/1.1\r\nhost: x\r\nx-filler: " + b"h" * 60_000)
        conns.append((r, w))
    await asyncio.gather(*(w.drain() for _, w in conns), return_exceptions=True)
    await asyncio.sleep(2)  # let the proxy read what was sent (load, not synchronisation)
    statuses = [f"open at peak: {len(conns)}"]
    for _, w in conns:
        w.close()
    return statuses


async def slow_readers(port, n):
    statuses = []
    raw = b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n"
    conns = []
    for _ in range(n):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(raw)
        conns.append((r, w))
    await asyncio.sleep(5)  # the answers pile up where they can (load, not synchronisation)
    for r, w in conns:
        try:
            head, _ = await asyncio.wait_for(read_head(r), 1)
            statuses.append(int(head.split(b" ", 2)[1]))
        except Exception as e:  # noqa: BLE001
            statuses.append(type(e).__name__)
        w.close()
    return statuses


def build_h2load():
    """Builds benches/h2load.rs and returns the path of its binary."""
    import json
    out = subprocess.run(
        ["cargo", "build", "--release", "--bench", "h2load", "--message-format=json"],
        check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "h2load":
            return msg["executable"]
    raise SystemExit("benches/h2load.rs built no binary")


async def h2(port, h2load, conns, streams, path="/2024-10/slow?ms=3000", body=0):
    """`conns` HTTP/2 connections with `streams` requests each, sent by
    benches/h2load.rs."""
    proc = await asyncio.create_subprocess_exec(
        h2load, f"127.0.0.1:{port}", str(conns), str(streams), path, str(body),
        stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return [out.decode().strip()]


def summary(statuses):
    counts = {}
    for s in statuses:
        counts[s] = counts.get(s, 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=str))


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="target/release/criteo-token-proxy")
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--max-connections", type=int, default=256,
                    help="the server.max_connections in effect (for the loads)")
    ap.add_argument("--upstream-max-connections", type=int, default=128)
    ap.add_argument("--h2load", help="the HTTP/2 load client (default: build benches/h2load.rs)")
    ap.add_argument("--h2-streams", type=int, default=8,
                    help="requests per HTTP/2 connection (the proxy serves 8 at a time)")
    ap.add_argument("--posts", type=int, default=200, help="concurrent 1 MiB POSTs")
    ap.add_argument("--only", default="posts,gets,heads,slowrd,h2,h2posts")
    ap.add_argument("--server", action="append", default=[], help="extra [server] line")
    ap.add_argument("--upstream", action="append", default=[], help="extra [upstream] line")
    args = ap.parse_args()
    if any(s.startswith("h2") for s in args.only.split(",")) and not args.h2load:
        args.h2load = build_h2load()

    work = tempfile.mkdtemp()
    ctx = None
    scheme = "http"
    ca_line = ""
    if args.tls:
        # A CA and a leaf for 127.0.0.1 (a self-signed leaf is refused).
        ca, ca_key = os.path.join(work, "ca.pem"), os.path.join(work, "ca.key")
        crt, key = os.path.join(work, "crt.pem"), os.path.join(work, "key.pem")
        csr, ext = os.path.join(work, "leaf.csr"), os.path.join(work, "leaf.ext")
        with open(ext, "w") as f:
            f.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
        for cmd in (
            ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
             "-days", "1", "-subj", "/CN=memory-bench-ca"],
            ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
             "-subj", "/CN=127.0.0.1"],
            ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", crt, "-days", "1", "-extfile", ext],
        ):
            subprocess.run(["openssl", *cmd], check=True, capture_output=True)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(crt, key)
        ctx.set_alpn_protocols(["http/1.1"])
        scheme = "https"
        ca_line = f'ca_file = "{ca}"\n'
    up = await asyncio.start_server(upstream, "127.0.0.1", 0, ssl=ctx, backlog=4096)
    up_port = up.sockets[0].getsockname()[1]

    def free_port():
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        return p

    port, admin = free_port(), free_port()
    workers = f"workers = {args.workers}\n" if args.workers else ""
    extra_server = "".join(line + "\n" for line in args.server)
    extra_upstream = "".join(line + "\n" for line in args.upstream)
    config = os.path.join(work, "proxy.toml")
    with open(config, "w") as f:
        f.write(f"""[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
default_tenant = "main"
{workers}{extra_server}
[upstream]
url = "{scheme}://127.0.0.1:{up_port}"
token_url = "{scheme}://127.0.0.1:{up_port}/oauth2/token"
{ca_line}{extra_upstream}
[tenants.main]
grant = "client_credentials"
client_id = "id"
client_secret = "secret"
""")
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "warn")
    proxy = subprocess.Popen([args.binary, "--config", config], env=env)
    try:
        for _ in range(100):
            try:
                r, w = await asyncio.open_connection("127.0.0.1", admin)
                w.write(b"GET /readyz HTTP/1.1\r\nhost: x\r\n\r\n")
                head, _ = await read_head(r)
                w.close()
                if b" 200 " in head:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.1)
        else:
            raise SystemExit("the proxy never got ready")
        print(f"idle: peak RSS {peak_rss_kib(proxy.pid) / 1024:.1f} MiB")
        scenarios = {
            "posts": lambda: posts(port, args.posts),
            "gets": lambda: gets(port, args.max_connections),
            "heads": lambda: heads(port, args.max_connections, proxy.pid),
            "h2": lambda: h2(port, args.h2load, args.max_connections, args.h2_streams),
            "h2posts": lambda: h2(port, args.h2load, args.max_connections, args.h2_streams,
                                  "/2024-10/upload?ms=2000", 1 << 20),
            "slowrd": lambda: slow_readers(port, args.upstream_max_connections),
        }
        for name in args.only.split(","):
            reset_peak(proxy.pid)
            started = time.monotonic()
            statuses = await scenarios[name]()
            took = time.monotonic() - started
            print(f"{name}: peak RSS {peak_rss_kib(proxy.pid) / 1024:.1f} MiB "
                  f"({took:.1f} s; {summary(statuses)})")
            await asyncio.sleep(1)
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.wait()
        up.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
