//! A lean open-loop HTTP/1.1 load generator for `benches/fixed-rate.sh`
//! (which builds and runs it): `openloop ADDR PATH RATE CONNS SECONDS OUT`
//! sends GET PATH to ADDR at RATE requests per second for SECONDS over
//! CONNS keep-alive connections, and writes every answered request to
//! OUT.csv (`due,stamp,latency,status`, in seconds from the start) and the
//! failures to OUT.json. Run by `cargo bench` without arguments, it does
//! nothing.
//!
//! Why not oha alone: on this 2-core machine the generator shares the CPU
//! with what it measures. oha costs about 18 µs of CPU per request, and it
//! stalls for milliseconds whenever its vector of results doubles (at
//! 65,536 records, 6.78 s into a run at 9,663 req/s, slow answers bunch up
//! for both proxies in every run): its own pauses made most of the p99.
//! This one runs on one thread, keeps its records in a vector sized for the
//! whole run before it starts, and writes the same bytes for every request.
//!
//! The model is oha's `-q RATE --latency-correction` (and wrk2's): request k
//! falls due at k / RATE. Every millisecond (tokio's timer tick) the
//! requests that have fallen due are stamped and queued; a free connection
//! takes the oldest. A request's latency runs from its stamp to the end of
//! its answer, so a request that waited for a connection (all busy with
//! slow answers) has that wait counted: no coordinated omission. The stamp
//! is taken when the tick fires, up to a millisecond after the request fell
//! due; that lag is the generator's, is left out of the latency, and is
//! reported (`stamp - due`) so that a generator falling behind shows.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// An answer not complete within this is an error (as oha's `-t 10s`).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// An answer's head must fit in this (the proxies answer a few hundred bytes).
const MAX_HEAD: usize = 16 * 1024;
/// The schedule's tick: tokio's timer resolution.
const TICK: Duration = Duration::from_millis(1);
/// At most this many requests per run: their records (32 bytes each) are
/// allocated before it starts.
const MAX_REQUESTS: f64 = 50_000_000.0;

struct Args {
    addr: String,
    path: String,
    rate: f64,
    conns: usize,
    seconds: f64,
    out: String,
}

/// One answered request, in seconds from the start.
struct Record {
    due: f64,
    stamp: f64,
    latency: f64,
    status: u16,
}

/// What the schedule and the connections share (one thread: no lock).
struct Shared {
    start: Instant,
    /// Stamps of the requests fallen due that no connection has taken yet,
    /// with when they fell due.
    queue: VecDeque<(f64, Instant)>,
    records: Vec<Record>,
    errors: u64,
    first_error: Option<String>,
}

impl Shared {
    fn failed(&mut self, what: String) {
        self.errors += 1;
        self.first_error.get_or_insert(what);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(args) = parse(&args) else {
        eprintln!(
            "usage: openloop ADDR PATH RATE CONNS SECONDS OUT (run by benches/fixed-rate.sh)"
        );
        return;
    };
    if args.rate * args.seconds > MAX_REQUESTS {
        eprintln!("openloop: RATE x SECONDS over {MAX_REQUESTS} requests");
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let local = tokio::task::LocalSet::new();
    let shared = local.block_on(&rt, run(&args));
    write_out(&args.out, &shared).expect("writing the records");
}

fn parse(args: &[String]) -> Option<Args> {
    let [addr, path, rate, conns, seconds, out] = args else {
        return None;
    };
    Some(Args {
        addr: addr.clone(),
        path: path.clone(),
        rate: rate.parse().ok().filter(|r: &f64| *r > 0.0)?,
        conns: conns.parse().ok().filter(|c: &usize| *c > 0)?,
        seconds: seconds.parse().ok().filter(|s: &f64| *s > 0.0)?,
        out: out.clone(),
    })
}

async fn run(args: &Args) -> Shared {
    let total = (args.rate * args.seconds) as usize;
    let shared = Rc::new(RefCell::new(Shared {
        start: Instant::now(),
        // A backlog beyond this only grows when nothing keeps up anyway.
        queue: VecDeque::with_capacity(64 * 1024),
        // Sized for the whole run before it starts: no copy while measuring.
        records: Vec::with_capacity(total + total / 20 + 1024),
        errors: 0,
        first_error: None,
    }));
    let due = Rc::new(Notify::new());
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: openloop\r\n\r\n",
        args.path, args.addr
    )
    .into_bytes();
    let request: Rc<[u8]> = request.into();
    for _ in 0..args.conns {
        let (shared, due, request, addr) = (
            Rc::clone(&shared),
            Rc::clone(&due),
            Rc::clone(&request),
            args.addr.clone(),
        );
        tokio::task::spawn_local(async move { connection(&addr, &request, &shared, &due).await });
    }
    let start = Instant::now();
    shared.borrow_mut().start = start;
    let end = start + Duration::from_secs_f64(args.seconds);
    let mut released = 0usize;
    let mut tick = start;
    while tick < end {
        tick += TICK;
        tokio::time::sleep_until(tick.into()).await;
        let now = Instant::now();
        let fallen = ((now - start).as_secs_f64() * args.rate) as usize;
        let fallen = fallen.min(total);
        let mut s = shared.borrow_mut();
        for k in released..fallen {
            s.queue.push_back((k as f64 / args.rate, now));
            due.notify_one();
        }
        released = fallen;
    }
    // What is still in flight at the end is left out (as oha's -z deadline).
    std::mem::replace(
        &mut *shared.borrow_mut(),
        Shared {
            start,
            queue: VecDeque::new(),
            records: Vec::new(),
            errors: 0,
            first_error: None,
        },
    )
}

/// One keep-alive connection: takes the oldest due request whenever free.
async fn connection(addr: &str, request: &[u8], shared: &RefCell<Shared>, due: &Notify) {
    let mut buf = Vec::with_capacity(MAX_HEAD);
    let mut stream: Option<TcpStream> = None;
    loop {
        let next = shared.borrow_mut().queue.pop_front();
        let Some((due_at, stamp)) = next else {
            due.notified().await;
            continue;
        };
        let conn = match &mut stream {
            Some(s) => s,
            None => match TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    stream.insert(s)
                }
                Err(e) => {
                    shared.borrow_mut().failed(format!("connect: {e}"));
                    continue;
                }
            },
        };
        buf.clear();
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange(conn, request, &mut buf)).await {
            Ok(Ok(status)) => {
                let done = Instant::now();
                let mut s = shared.borrow_mut();
                let start = s.start;
                s.records.push(Record {
                    due: due_at,
                    stamp: (stamp - start).as_secs_f64(),
                    latency: (done - stamp).as_secs_f64(),
                    status,
                });
            }
            Ok(Err(e)) => {
                shared.borrow_mut().failed(e);
                stream = None;
            }
            Err(_) => {
                shared
                    .borrow_mut()
                    .failed(format!("no answer within {REQUEST_TIMEOUT:?}"));
                stream = None;
            }
        }
    }
}

/// Writes the request and reads one answer (its head, then a body of
/// `Content-Length` bytes); returns its status.
async fn exchange(conn: &mut TcpStream, request: &[u8], buf: &mut Vec<u8>) -> Result<u16, String> {
    conn.write_all(request)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let (status, head, length) = loop {
        read_some(conn, buf).await?;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(buf) {
            Ok(httparse::Status::Complete(head)) => {
                let status = resp.code.unwrap_or(0);
                let length = content_length(resp.headers)?;
                break (status, head, length);
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => return Err("answer head too large".into()),
            Err(e) => return Err(format!("bad answer: {e}")),
        }
    };
    while buf.len() < head + length {
        read_some(conn, buf).await?;
    }
    Ok(status)
}

async fn read_some(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    match conn.read_buf(buf).await {
        Ok(0) => Err("connection closed".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("read: {e}")),
    }
}

fn content_length(headers: &[httparse::Header<'_>]) -> Result<usize, String> {
    let value = headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .ok_or("an answer without Content-Length (chunked answers are not read)")?
        .value;
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "bad Content-Length".into())
}

fn write_out(out: &str, s: &Shared) -> std::io::Result<()> {
    let mut csv = String::with_capacity(s.records.len() * 40 + 32);
    csv.push_str("due,stamp,latency,status\n");
    for r in &s.records {
        let _ = writeln!(
            csv,
            "{:.6},{:.6},{:.7},{}",
            r.due, r.stamp, r.latency, r.status
        );
    }
    std::fs::write(format!("{out}.csv"), csv)?;
    let error = s
        .first_error
        .as_deref()
        .unwrap_or("")
        .replace(['"', '\\'], "'");
    std::fs::write(
        format!("{out}.json"),
        format!(
            "{{\"errors\": {}, \"first_error\": \"{error}\"}}\n",
            s.errors
        ),
    )
}
