//! An HTTP/2 load client for `benches/memory.py` (which builds and runs
//! it): `h2load ADDR CONNS STREAMS PATH BODY_BYTES` opens CONNS cleartext
//! HTTP/2 connections to ADDR, sends STREAMS concurrent requests on each
//! (a GET, or a POST of BODY_BYTES), and prints how many answers had each
//! status. Run by `cargo bench` without arguments, it does nothing.

use std::collections::BTreeMap;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, conns, streams, path, body] = args.as_slice() else {
        eprintln!("usage: h2load ADDR CONNS STREAMS PATH BODY_BYTES (run by benches/memory.py)");
        return;
    };
    let (conns, streams, body): (usize, usize, usize) = (
        conns.parse().expect("CONNS"),
        streams.parse().expect("STREAMS"),
        body.parse().expect("BODY_BYTES"),
    );
    let payload = Bytes::from(vec![b'p'; body]);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (addr, path, payload) = (addr.clone(), path.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            connection(&addr, streams, &path, payload).await
        }));
    }
    let mut counts = BTreeMap::new();
    for t in tasks {
        for s in t.await.unwrap() {
            *counts.entry(s).or_insert(0) += 1;
        }
    }
    println!("{counts:?}");
}

/// One connection's statuses (or errors).
async fn connection(addr: &str, streams: usize, path: &str, payload: Bytes) -> Vec<String> {
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return vec!["connect failed".into()];
    };
    let io = TokioIo::new(tcp);
    let Ok((tx, conn)) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await
    else {
        return vec!["handshake failed".into()];
    };
    tokio::spawn(conn);
    let mut requests = Vec::new();
    for _ in 0..streams {
        let mut tx = tx.clone();
        let method = if payload.is_empty() { "GET" } else { "POST" };
        let req = http::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .body(Full::new(payload.clone()))
            .unwrap();
        requests.push(tokio::spawn(async move {
            match tx.send_request(req).await {
                Ok(resp) => {
                    let status = resp.status().as_u16().to_string();
                    let _ = resp.into_body().collect().await;
                    status
                }
                Err(e) => format!("error: {e}"),
            }
        }));
    }
    let mut out = Vec::with_capacity(streams);
    for r in requests {
        out.push(r.await.unwrap());
    }
    out
}
