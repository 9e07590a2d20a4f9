//! The whole request path in-process: client → proxy → upstream, one
//! request at a time over kept-alive loopback connections, against the same
//! client talking to the upstream directly (the floor) in the same run.
//! The difference is what the proxy costs per request.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use criteo_token_proxy::{App, Config, Listeners, Newer};
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

const TOKEN: &str = r#"{"access_token":"bench-token","token_type":"Bearer","expires_in":900}"#;
const ANSWER: &str =
    r#"{"data":[{"id":"1234","type":"Advertiser","attributes":{"name":"bench"}}]}"#;

/// A minimal stand-in for Criteo: a static token and a static answer.
async fn upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let body = if req.uri().path() == "/oauth2/token" {
                        TOKEN
                    } else {
                        ANSWER
                    };
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                        body.as_bytes(),
                    ))))
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

async fn proxy(upstream: &str) -> String {
    let config = Config::from_toml(&format!(
        "[server]\ndefault_tenant = \"main\"\n[upstream]\nurl = \"{upstream}\"\ntoken_url = \"{upstream}/oauth2/token\"\n\
         [tenants.main]\ngrant = \"client_credentials\"\nclient_id = \"id\"\nclient_secret = \"secret\"\n\
         [tenants.paced]\ngrant = \"client_credentials\"\nclient_id = \"id\"\nclient_secret = \"secret\"\n\
         rate_limit = \"1000000/sec\"\n"
    ))
    .unwrap();
    let listeners = Listeners {
        proxy: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    let url = format!("http://{}", listeners.proxy.local_addr().unwrap());
    let app = App::new(config).unwrap();
    let tenants = app.tenants();
    tokio::spawn(async move {
        app.run(listeners, std::future::pending())
            .await
            .expect("the proxy starts")
    });
    for t in tenants.iter() {
        t.tokens
            .wait_usable(Newer::Any, Duration::from_secs(10))
            .await
            .unwrap();
    }
    url
}

async fn get(client: &Client<HttpConnector, Empty<Bytes>>, uri: &Uri) {
    get_as(client, uri, None).await;
}

/// With `tenant`: the `paced` tenant has a limit far from reached, so its
/// requests take the lock-free reservation and never wait.
async fn get_as(client: &Client<HttpConnector, Empty<Bytes>>, uri: &Uri, tenant: Option<&str>) {
    let mut req = hyper::Request::get(uri.clone());
    if let Some(t) = tenant {
        req = req.header("X-Criteo-Tenant", t);
    }
    let resp = client
        .request(req.body(Empty::new()).unwrap())
        .await
        .unwrap();
    assert!(resp.status().is_success());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), ANSWER.len());
}

fn request_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (direct, proxied) = rt.block_on(async {
        let upstream = upstream().await;
        let proxy = proxy(&upstream).await;
        let path = "/2024-10/advertisers/me";
        (
            format!("{upstream}{path}").parse::<Uri>().unwrap(),
            format!("{proxy}{path}").parse::<Uri>().unwrap(),
        )
    });
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();

    let mut group = c.benchmark_group("request_path");
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("direct_to_upstream", |b| {
        b.to_async(&rt).iter(|| get(&client, &direct));
    });
    group.bench_function("through_proxy", |b| {
        b.to_async(&rt).iter(|| get(&client, &proxied));
    });
    group.bench_function("through_proxy_rate_limited_under_budget", |b| {
        b.to_async(&rt)
            .iter(|| get_as(&client, &proxied, Some("paced")));
    });
    group.finish();
}

criterion_group!(benches, request_path);
criterion_main!(benches);
