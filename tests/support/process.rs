//! The real binary as a child process, its JSON logs collected.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

pub const BIN: &str = env!("CARGO_BIN_EXE_criteo-token-proxy");

/// A configuration for the binary: both listeners on `127.0.0.1:0`, the
/// stand-in as upstream, `main` as default tenant, and `tenants` (and
/// [`super::SHORT_TOKENS`] when the stand-in's tokens are short).
pub fn fake_config(fake: &super::FakeCriteo, tenants: &str) -> String {
    let refresh = if super::short_tokens(fake) {
        format!("[refresh]\n{}\n", super::SHORT_TOKENS)
    } else {
        String::new()
    };
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndefault_tenant = \"main\"\n\n\
         [upstream]\nurl = \"{}\"\ntoken_url = \"{}\"\n\n{refresh}{tenants}\n",
        fake.url(),
        fake.token_url()
    )
}

/// A loopback address whose port was free a moment ago (for a listener
/// whose address must be known before the process starts).
pub fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Writes `text` to `dir/name`.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

pub fn command() -> Command {
    let mut c = Command::new(BIN);
    c.env_remove("RUST_LOG")
        .env_remove("CRITEO_PROXY_CONFIG")
        .kill_on_drop(true);
    c
}

/// A running proxy process whose JSON log lines are collected.
pub struct Running {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    seen: watch::Receiver<usize>,
    pub proxy: String,
    pub admin: String,
}

impl Running {
    pub async fn start(config: &Path, rust_log: &str) -> Self {
        Self::start_with(&["--config", config.to_str().unwrap()], &[], rust_log).await
    }

    /// Starts the binary with `args` (and `--log-format json`) and `env`.
    pub async fn start_with(args: &[&str], env: &[(&str, &str)], rust_log: &str) -> Self {
        let mut cmd = command();
        cmd.args(args).args(["--log-format", "json"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, seen) = watch::channel(0usize);
        let sink = Arc::clone(&lines);
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let n = {
                    let mut l = sink.lock().unwrap();
                    l.push(line);
                    l.len()
                };
                tx.send_replace(n);
            }
        });
        let mut r = Running {
            child,
            lines,
            seen,
            proxy: String::new(),
            admin: String::new(),
        };
        let listening = r.wait_for_message("listening").await;
        r.proxy = format!("http://{}", listening["fields"]["proxy"].as_str().unwrap());
        r.admin = format!("http://{}", listening["fields"]["admin"].as_str().unwrap());
        r
    }

    /// Waits for a log line whose message is `message`.
    pub async fn wait_for_message(&mut self, message: &str) -> Value {
        let lines = Arc::clone(&self.lines);
        let find = || {
            lines.lock().unwrap().iter().find_map(|l| {
                let v: Value = serde_json::from_str(l).ok()?;
                (v["fields"]["message"] == message).then_some(v)
            })
        };
        let wait = async {
            loop {
                if let Some(v) = find() {
                    return v;
                }
                if self.seen.changed().await.is_err() {
                    panic!(
                        "the process ended before logging {message:?}: {:?}",
                        self.lines.lock().unwrap()
                    );
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .unwrap_or_else(|_| panic!("no {message:?} log line"))
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().unwrap().to_string();
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    pub async fn wait_exit(&mut self) -> i32 {
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the process exits")
            .unwrap()
            .code()
            .unwrap_or(-1)
    }

    pub fn all_logs(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

impl Running {
    /// Waits for the next log line (or the end of the process's output).
    pub async fn next_line(&mut self) {
        let _ = self.seen.changed().await;
    }

    /// `kill -9`: no chance to clean up.
    pub async fn kill9(&mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
    }
}

/// Two client-credentials tenants, as the reload tests add and remove them.
pub const MAIN: &str = "[tenants.main]\ngrant = \"client_credentials\"\nclient_id = \"main-id\"\nclient_secret = \"main-secret\"\n";
pub const OTHER: &str = "[tenants.other]\ngrant = \"client_credentials\"\nclient_id = \"other-id\"\nclient_secret = \"other-secret\"\n";

/// The status a request for `tenant` gets from the running proxy.
pub async fn status(proxy: &Running, tenant: &str) -> u16 {
    super::client()
        .get(format!("{}/x", proxy.proxy))
        .header("x-criteo-tenant", tenant)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}
