//! Thread-per-core serving of the proxy listener.
//!
//! Each worker is an OS thread running a single-threaded tokio runtime with
//! its own pool of upstream connections. A client connection, and the
//! upstream connections its requests use, live on one thread from accept to
//! close: no task hops between threads and no cross-thread wake-ups on the
//! request path. Measured on 2 cores, this cuts the CPU time per request by
//! about 40 % against one work-stealing runtime (see the README's
//! Performance section).
//! The acceptor hands connections out round-robin; tokens, tenants and
//! metrics are shared, lock-free.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot, watch};

use super::conn::{self, Drain, Timeouts};
use crate::config::UpstreamConfig;
use crate::proxy::{Proxy, ResponseBody};
use crate::upstream::Upstream;

/// A connection handed to a worker, with its place under
/// `server.max_connections` (given back when it closes).
struct Handoff {
    stream: std::net::TcpStream,
    permit: OwnedSemaphorePermit,
}

/// Inbound limits, from `[server]`.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) max_connections: usize,
    pub(crate) admin_max_connections: usize,
    pub(crate) max_header_bytes: usize,
    pub(crate) header_read_timeout: Duration,
    pub(crate) idle_timeout: Duration,
}

impl Limits {
    pub(crate) fn timeouts(&self) -> Timeouts {
        Timeouts {
            header_read: self.header_read_timeout,
            idle: self.idle_timeout,
        }
    }
}

/// The proxy's worker threads.
#[derive(Debug)]
pub(crate) struct Workers {
    senders: Vec<mpsc::UnboundedSender<Handoff>>,
    next: usize,
    stop: watch::Sender<bool>,
    done: Vec<oneshot::Receiver<()>>,
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff").finish_non_exhaustive()
    }
}

/// Requests in progress on one HTTP/2 connection; clients queue the others
/// on their side. Hyper's default, 200, times `server.max_connections`,
/// would not fit the memory limit (each costs a few KiB even while it
/// waits), and Criteo's rate limits leave no use for more.
const H2_MAX_STREAMS: u32 = 8;
/// What an HTTP/2 client may send on a stream before the proxy reads it.
/// The connection's window is the sum of its streams' windows, so that
/// streams whose bodies wait (for a token, for an upstream connection)
/// can never starve the one being forwarded. Hyper's 1 MiB windows, times
/// every connection, would not fit the memory limit.
const H2_STREAM_WINDOW: u32 = 8 * 1024;
const H2_CONNECTION_WINDOW: u32 = H2_MAX_STREAMS * H2_STREAM_WINDOW;
/// What may wait to be written to a client, per stream (hyper: 400 KB).
const H2_SEND_BUFFER: usize = 64 * 1024;

/// The HTTP/1.1 + HTTP/2 server settings both listeners use.
pub(crate) fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // A client that does not finish its headers in time is dropped
        // (slowloris) by the connection's watchdog (`conn.rs`), with one
        // timer per connection; hyper's would make one per request.
        .header_read_timeout(None)
        // Headers larger than the buffer get a 431.
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_send_buf_size(H2_SEND_BUFFER)
        .max_concurrent_streams(H2_MAX_STREAMS)
        // A peer silent for the idle time is pinged, and dropped if it
        // does not answer as long (a vanished client with streams open).
        .keep_alive_interval(limits.idle_timeout)
        .keep_alive_timeout(limits.idle_timeout);
    builder
}

impl Workers {
    /// Starts `count` workers, each with its own upstream pool.
    pub(crate) fn start(
        count: usize,
        proxy: &Proxy,
        upstream: &UpstreamConfig,
        grace: Duration,
        limits: &Limits,
    ) -> std::io::Result<Self> {
        let (stop, stop_rx) = watch::channel(false);
        // upstream.max_connections is shared equally by the workers, so
        // that memory does not grow with the CPU count.
        let mut upstream = upstream.clone();
        upstream.max_connections = upstream.max_connections.div_ceil(count.max(1));
        let mut senders = Vec::with_capacity(count);
        let mut done = Vec::with_capacity(count);
        for i in 0..count {
            let (tx, rx) = mpsc::unbounded_channel();
            let (done_tx, done_rx) = oneshot::channel();
            let proxy = proxy.clone();
            let upstream = upstream.clone();
            let stop_rx = stop_rx.clone();
            let limits = limits.clone();
            std::thread::Builder::new()
                .name(format!("proxy-worker-{i}"))
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start a worker runtime");
                            return;
                        }
                    };
                    rt.block_on(serve(rx, proxy, upstream, stop_rx, grace, limits));
                    drop(rt);
                    let _ = done_tx.send(());
                })?;
            senders.push(tx);
            done.push(done_rx);
        }
        Ok(Self {
            senders,
            next: 0,
            stop,
            done,
        })
    }

    /// Hands an accepted connection to the next worker.
    pub(crate) fn dispatch(&mut self, stream: tokio::net::TcpStream, permit: OwnedSemaphorePermit) {
        let Ok(stream) = stream.into_std() else {
            return;
        };
        let i = self.next % self.senders.len();
        self.next = self.next.wrapping_add(1);
        if let Err(mpsc::error::SendError(h)) = self.senders[i].send(Handoff { stream, permit }) {
            // That worker died; give the connection to one that runs.
            self.retry(h);
        }
    }

    fn retry(&mut self, h: Handoff) {
        for s in &self.senders {
            if !s.is_closed() {
                let _ = s.send(h);
                return;
            }
        }
        tracing::error!("no proxy worker is running; connection dropped");
    }

    /// Stops accepting on every worker and waits for their in-flight
    /// requests (each worker bounds its wait by the grace period).
    pub(crate) async fn shutdown(self) {
        let _ = self.stop.send(true);
        drop(self.senders);
        for d in self.done {
            let _ = d.await;
        }
    }
}

async fn serve(
    mut rx: mpsc::UnboundedReceiver<Handoff>,
    proxy: Proxy,
    upstream: UpstreamConfig,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
    limits: Limits,
) {
    // The pool is made on this thread, so its connections stay here.
    let proxy = match Upstream::new(&upstream) {
        Ok(u) => Arc::new(proxy.with_upstream(u)),
        Err(e) => {
            tracing::error!(error = %e, "cannot build the upstream client");
            return;
        }
    };
    let builder = http_builder(&limits);
    let timeouts = limits.timeouts();
    let drain = Drain::new();
    loop {
        let handoff = tokio::select! {
            h = rx.recv() => match h {
                Some(h) => h,
                None => break,
            },
            _ = stop.changed() => break,
        };
        let Ok(stream) = tokio::net::TcpStream::from_std(handoff.stream) else {
            continue;
        };
        let proxy = Arc::clone(&proxy);
        conn::spawn(&builder, stream, proxy, timeouts, &drain, handoff.permit);
    }
    tokio::select! {
        () = drain.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(?grace, "grace period over; closing remaining proxy connections");
        }
    }
}

impl conn::Handler for Arc<Proxy> {
    const LISTENER: &'static str = "proxy";
    type Body = ResponseBody;

    fn call(&self, req: Request<Incoming>) -> impl Future<Output = Response<ResponseBody>> + Send {
        self.handle(req)
    }
}

/// How many workers to run when `server.workers` is not set.
pub(crate) fn default_count() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}
