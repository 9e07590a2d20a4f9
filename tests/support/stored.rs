//! Reads the token store's SQLite database the way an operator would with
//! `sqlite3`: what a test asserts was saved is what is on disk.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

/// A tenant's stored refresh token and rejected flag, if it has a row.
pub fn stored(path: &Path, tenant: &str) -> Option<(String, bool)> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.query_row(
        "SELECT refresh_token, rejected FROM tenants WHERE name = ?1",
        [tenant],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()
    .unwrap()
}

/// The tenant's stored refresh token.
pub fn stored_token(path: &Path, tenant: &str) -> String {
    stored(path, tenant).expect("the tenant has a row").0
}

/// Removes a tenant's row, as an operator might by hand.
pub fn remove(path: &Path, tenant: &str) {
    let conn = Connection::open(path).unwrap();
    conn.execute("DELETE FROM tenants WHERE name = ?1", [tenant])
        .unwrap();
}
