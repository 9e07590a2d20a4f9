//! A real PostgreSQL for a test: `initdb` and `pg_ctl` from Debian's
//! `postgresql` package, a cluster in a temporary folder listening on
//! 127.0.0.1 at a free port (and on a Unix socket in that folder), stopped
//! and removed on drop. Never a mock.
//!
//! PostgreSQL refuses to run as root: then the cluster runs as the
//! `postgres` user (or `nobody`), which owns the folder.
//!
//! Shared by the integration tests (`tests/support`) and the unit tests
//! of the store (`src/store/postgres/mod.rs` includes this file).
#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A running (or stopped) PostgreSQL cluster.
#[derive(Debug)]
pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    /// (uid, gid) to run as, when this process is root.
    run_as: Option<(u32, u32)>,
    running: bool,
}

impl Postgres {
    /// A new cluster with a database `criteo`; `None` (after a loud
    /// message on stderr) when PostgreSQL's programs cannot be found.
    pub fn start() -> Option<Self> {
        let Some(bin) = find_bin() else {
            eprintln!("\n*** SKIPPED: PostgreSQL not installed (apt-get install postgresql) ***\n");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("pg")
            .tempdir()
            .expect("a temporary folder");
        let run_as = run_as();
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
        }
        let port = free_port();
        let mut pg = Self {
            bin,
            dir,
            port,
            run_as,
            running: false,
        };
        let data = pg.data();
        pg.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "--no-instructions",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        );
        pg.start_again();
        pg.sql("CREATE DATABASE criteo");
        Some(pg)
    }

    /// `postgres://postgres@127.0.0.1:PORT/criteo?sslmode=disable`.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/criteo?sslmode=disable",
            self.port
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (fast: every session is ended at once).
    pub fn stop(&mut self) {
        if self.running {
            let data = self.data();
            self.run(
                "pg_ctl",
                &[
                    "-D",
                    data.to_str().unwrap(),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
            );
            self.running = false;
        }
    }

    /// Starts it again: the same data and port.
    pub fn start_again(&mut self) {
        let (data, log) = (self.data(), self.dir.path().join("log"));
        let options = format!(
            "-F -c fsync=off -c listen_addresses=127.0.0.1 -p {} -k {}",
            self.port,
            self.dir.path().display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &options,
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
        self.running = true;
    }

    /// Serves TLS from now on with this certificate and key (PEM): they
    /// are written into the data folder, `ssl = on`, and the server is
    /// restarted.
    pub fn enable_tls(&mut self, cert_pem: &str, key_pem: &str) {
        use std::os::unix::fs::PermissionsExt;
        let data = self.data();
        for (name, pem) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = data.join(name);
            std::fs::write(&path, pem).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            if let Some((uid, gid)) = self.run_as {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
            }
        }
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str("\nssl = on\n");
        std::fs::write(&conf, text).unwrap();
        self.stop();
        self.start_again();
    }

    /// Runs `sql` with `psql` in the `criteo` database (or `postgres` for
    /// `CREATE DATABASE`); panics on failure. Returns what it printed
    /// (unaligned, tuples only).
    pub fn sql(&self, sql: &str) -> String {
        let db = if sql.starts_with("CREATE DATABASE") {
            "postgres"
        } else {
            "criteo"
        };
        let port = self.port.to_string();
        let out = self.run(
            "psql",
            &[
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .env("PGTZ", "UTC")
            .env_remove("PGPASSWORD")
            .env_remove("PGHOST")
            .env_remove("PGDATABASE");
        if let Some((uid, gid)) = self.run_as {
            // Supplementary groups are dropped too (std does when root).
            cmd.uid(uid).gid(gid);
        }
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        if !out.status.success() {
            let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
            panic!(
                "{program} {args:?} failed: {}\n{}\n{log}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let data = self.data();
            let mut cmd = Command::new(self.bin.join("pg_ctl"));
            cmd.args([
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
            if let Some((uid, gid)) = self.run_as {
                cmd.uid(uid).gid(gid);
            }
            let _ = cmd.status();
        }
    }
}

/// The folder holding `initdb` and `pg_ctl`: on `PATH`, else the newest
/// `/usr/lib/postgresql/*/bin` (Debian does not put them on `PATH`).
fn find_bin() -> Option<PathBuf> {
    let has_all = |dir: &Path| {
        ["initdb", "pg_ctl", "psql"]
            .iter()
            .all(|p| dir.join(p).is_file())
    };
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_all(&dir) {
                return Some(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, bin)| has_all(bin))
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// Root may not run PostgreSQL: the `postgres` user's ids, else `nobody`'s.
fn run_as() -> Option<(u32, u32)> {
    let me = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&me.stdout).trim() != "0" {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let ids = |user: &str| {
        passwd.lines().find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() > 3 && f[0] == user).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
        })
    };
    Some(
        ids("postgres")
            .or_else(|| ids("nobody"))
            .expect("a user other than root to run PostgreSQL as (postgres or nobody)"),
    )
}

/// A port free on 127.0.0.1 now (PostgreSQL binds it right after).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}
