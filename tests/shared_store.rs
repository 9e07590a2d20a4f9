//! The proxy on the shared store (`store.url`): a real PostgreSQL started
//! by the test (`support/postgres.rs`); skipped, loudly, without one.

mod support;

use support::postgres::Postgres;
use support::{FakeCriteo, TestProxy};

const ACME_ID: &str = "acme-id";
const ACME_SECRET: &str = "acme-secret";

#[tokio::test]
async fn a_refresh_token_tenant_rotates_into_postgresql_and_serves() {
    let Some(pg) = tokio::task::spawn_blocking(Postgres::start).await.unwrap() else {
        return;
    };
    let fake = FakeCriteo::builder()
        .client(ACME_ID, ACME_SECRET)
        .start()
        .await;
    let seed = fake.issue_refresh_token(ACME_ID);
    let url = pg.url().replace("postgres@", "postgres:hunter2@");
    let proxy = TestProxy::builder(&fake)
        .without_main()
        .server("default_tenant = \"acme\"")
        .tenant(
            "acme",
            &format!(
                "grant = \"refresh_token\"\nclient_id = \"{ACME_ID}\"\nclient_secret = \"{ACME_SECRET}\"\n\
                 redirect_uri = \"{{admin}}/oauth/callback\"\nrefresh_token = \"{seed}\"\n"
            ),
        )
        .section(&format!("[store]\nurl = \"{url}\""))
        .start()
        .await;
    proxy.wait_ready().await;
    assert_eq!(proxy.get("/x").await.status(), 200);

    let row = pg.sql(
        "SELECT refresh_token, rejected FROM criteo_proxy_tenants WHERE name = 'acme' AND client_id = 'acme-id'",
    );
    let newest = fake.newest_refresh_token(ACME_ID).unwrap();
    assert_eq!(
        row,
        format!("{newest}|f"),
        "the newest token is in the database"
    );
    let seeds = pg.sql("SELECT count(*) FROM criteo_proxy_presented_seeds");
    assert_eq!(seeds, "1", "the seed is recorded as presented");
    let sessions = pg
        .sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'criteo-token-proxy'");
    assert_eq!(sessions, "1", "one connection, named");
    assert!(!proxy.metrics().await.contains("hunter2"));
    proxy.stop().await;
}

#[tokio::test]
async fn the_proxy_starts_without_its_database_and_client_credentials_tenants_serve() {
    let fake = FakeCriteo::builder()
        .client(ACME_ID, ACME_SECRET)
        .start()
        .await;
    // Nothing listens there: connecting fails at once, again and again.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let proxy = TestProxy::builder(&fake)
        .tenant(
            "acme",
            &format!(
                "grant = \"refresh_token\"\nclient_id = \"{ACME_ID}\"\nclient_secret = \"{ACME_SECRET}\"\n\
                 redirect_uri = \"{{admin}}/oauth/callback\"\n"
            ),
        )
        .section(&format!(
            "[store]\nurl = \"postgres://proxy:hunter2@127.0.0.1:{port}/criteo?sslmode=disable\""
        ))
        .start()
        .await;
    assert_eq!(
        proxy.get("/x").await.status(),
        200,
        "the default tenant serves"
    );
    let metrics = proxy.metrics().await;
    assert!(!metrics.contains("hunter2"));
    proxy.stop().await;
}
