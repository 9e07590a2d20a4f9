//! The tables, created on first start and migrated in one transaction
//! under an advisory lock, so that replicas starting together do not race.
//! A database of a newer schema (written by a newer release) is refused.

use tokio_postgres::Client;

/// The schema this release writes.
pub(crate) const VERSION: i32 = 2;

/// Any constant shared by every replica: the advisory lock migrations
/// hold ("criteo" in ASCII).
const LOCK: i64 = 0x6372_6974_656f;

/// Migration `n` (1-based) takes the schema from version `n - 1` to `n`.
const MIGRATIONS: [&str; VERSION as usize] = [
    r#"
CREATE SEQUENCE criteo_proxy_generation;

CREATE TABLE criteo_proxy_tenants (
    name                text NOT NULL,
    client_id           text NOT NULL,
    refresh_token       text NOT NULL,
    rejected            boolean NOT NULL DEFAULT false,
    -- the generation a rejection was written against (the fencing exception)
    rejected_from       bigint NULL,
    -- from the one sequence: rising across tenants, so the change feed
    -- polls WHERE generation > the last one seen
    generation          bigint NOT NULL,
    access_token        text NULL,
    access_requested_at timestamptz NULL,
    access_lifetime_ms  bigint NULL,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, client_id)
);
CREATE INDEX criteo_proxy_tenants_generation ON criteo_proxy_tenants (generation);

-- SHA-256 (hex) of every seed refresh token ever presented
CREATE TABLE criteo_proxy_presented_seeds (
    hash text PRIMARY KEY
);

-- one row per tenant being refreshed: who, which session, until when
CREATE TABLE criteo_proxy_leases (
    name       text NOT NULL,
    client_id  text NOT NULL,
    holder     text NOT NULL,
    holder_pid integer NOT NULL,
    until      timestamptz NOT NULL,
    PRIMARY KEY (name, client_id)
);

-- every committed write, announced to every replica; a payload too long
-- for NOTIFY carries the generation alone (the listeners then poll)
CREATE FUNCTION criteo_proxy_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    payload text := json_build_object('g', NEW.generation, 'n', NEW.name, 'c', NEW.client_id)::text;
BEGIN
    IF octet_length(payload) > 7000 THEN
        payload := json_build_object('g', NEW.generation)::text;
    END IF;
    PERFORM pg_notify('criteo_proxy_changed', payload);
    RETURN NULL;
END $$;
CREATE TRIGGER criteo_proxy_changed AFTER INSERT OR UPDATE ON criteo_proxy_tenants
    FOR EACH ROW EXECUTE FUNCTION criteo_proxy_changed();

-- a released lease wakes the replicas waiting for it
CREATE FUNCTION criteo_proxy_lease_freed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('criteo_proxy_changed', '{"lease":true}');
    RETURN NULL;
END $$;
CREATE TRIGGER criteo_proxy_lease_freed AFTER DELETE ON criteo_proxy_leases
    FOR EACH ROW EXECUTE FUNCTION criteo_proxy_lease_freed();
"#,
    r#"
-- one row per running replica, its heartbeat refreshing `seen`: replicas
-- seen lately share each tenant's rate limit equally
CREATE TABLE criteo_proxy_replicas (
    id   text PRIMARY KEY,
    seen timestamptz NOT NULL
);
"#,
];

/// Creates or migrates the schema; an error says what to do.
pub(super) async fn migrate(client: &mut Client) -> Result<(), String> {
    let sql = |e: tokio_postgres::Error| e.to_string();
    let tx = client.transaction().await.map_err(sql)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK])
        .await
        .map_err(sql)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS criteo_proxy_schema (version integer NOT NULL)")
        .await
        .map_err(|e| {
            format!("cannot create the schema (the database user needs CREATE on it, or the tables created beforehand): {e}")
        })?;
    let found: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM criteo_proxy_schema",
            &[],
        )
        .await
        .map_err(sql)?
        .get(0);
    if found > VERSION {
        return Err(format!(
            "the database holds the token store's schema version {found}, written by a newer release (this one knows version {VERSION}): run that release, or a newer one"
        ));
    }
    if found == VERSION {
        return Ok(()); // the transaction rolls back: nothing was changed
    }
    for (n, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.batch_execute(migration)
            .await
            .map_err(|e| format!("cannot migrate the schema to version {}: {e}", n + 1))?;
    }
    tx.execute("DELETE FROM criteo_proxy_schema", &[])
        .await
        .map_err(sql)?;
    tx.execute(
        "INSERT INTO criteo_proxy_schema (version) VALUES ($1)",
        &[&VERSION],
    )
    .await
    .map_err(sql)?;
    tx.commit().await.map_err(sql)?;
    tracing::info!(
        version = VERSION,
        from = found,
        "token store schema migrated"
    );
    Ok(())
}
