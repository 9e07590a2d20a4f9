//! A bounded fuzz of the configuration loader (proptest, run by `cargo
//! test`): TOML documents built from the real key names, each set to
//! arbitrary values (huge numbers and durations, odd strings, devices and
//! FIFOs as files, wrong types). Whatever the document:
//!
//! - loading it never panics;
//! - every problem reported names a key;
//! - a configuration that validates prints (`check-config`) to TOML that
//!   validates again, prints the same, and shows no secret.
//!
//! The key names are read from the raw structs themselves (a serde
//! deserializer that only records the fields it is asked for), so a key
//! added later is fuzzed too.

use std::cell::RefCell;
use std::fmt;
use std::path::PathBuf;

use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde_json::{Value, json};

use super::{Config, RawConfig};

// === the key names, from the raw structs ===

#[derive(Debug, Clone, Copy)]
enum Shape {
    Struct(&'static [&'static str]),
    /// A map keyed by name (`tenants`).
    Map,
    Leaf,
}

/// Stands in for the tenant name in key paths.
const NAME: &str = "NAME";

#[derive(Debug)]
struct Stop;

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("stop")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Stop
    }
}

/// Follows `path` into the raw structs and records the shape found there.
struct Probe<'a> {
    path: &'a [&'a str],
    found: &'a RefCell<Option<Shape>>,
}

impl<'a> Probe<'a> {
    fn record<T>(&self, shape: Shape) -> Result<T, Stop> {
        *self.found.borrow_mut() = Some(shape);
        Err(Stop)
    }

    fn enter<'de, V: Visitor<'de>>(self, visitor: V, shape: Shape) -> Result<V::Value, Stop> {
        match self.path.split_first() {
            None => self.record(shape),
            Some((key, rest)) => visitor.visit_map(One {
                key: Some(key),
                value: Some(Probe {
                    path: rest,
                    found: self.found,
                }),
            }),
        }
    }
}

impl<'de> de::Deserializer<'de> for Probe<'_> {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        if self.path.is_empty() {
            return self.record(Shape::Leaf);
        }
        Err(Stop)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        visitor.visit_some(self)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Stop> {
        self.enter(visitor, Shape::Struct(fields))
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        self.enter(visitor, Shape::Map)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct newtype_struct seq tuple tuple_struct
        enum identifier ignored_any
    }
}

/// A map of one entry: the next key of the path.
struct One<'a> {
    key: Option<&'a str>,
    value: Option<Probe<'a>>,
}

impl<'de> MapAccess<'de> for One<'_> {
    type Error = Stop;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Stop> {
        match self.key.take() {
            Some(k) => seed.deserialize(k.into_deserializer()).map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Stop> {
        seed.deserialize(self.value.take().ok_or(Stop)?)
    }
}

fn shape(path: &[&str]) -> Shape {
    let found = RefCell::new(None);
    let _ = RawConfig::deserialize(Probe {
        path,
        found: &found,
    });
    found.into_inner().unwrap_or(Shape::Leaf)
}

/// Every key path of the configuration, sections included, tenant names
/// as [`NAME`]: `["server"]`, `["server", "listen"]`, `["tenants", "NAME",
/// "grant"]`, …
fn key_paths() -> Vec<Vec<&'static str>> {
    fn walk(path: &mut Vec<&'static str>, out: &mut Vec<Vec<&'static str>>) {
        if !path.is_empty() {
            out.push(path.clone());
        }
        match shape(path) {
            Shape::Struct(fields) => {
                for f in fields {
                    path.push(f);
                    walk(path, out);
                    path.pop();
                }
            }
            Shape::Map => {
                path.push(NAME);
                walk(path, out);
                path.pop();
            }
            Shape::Leaf => {}
        }
    }
    let mut out = Vec::new();
    walk(&mut Vec::new(), &mut out);
    out
}

fn is_secret(path: &[&str]) -> bool {
    let last = path.last().copied().unwrap_or_default();
    !last.ends_with("_file") && (last.ends_with("secret") || last.ends_with("token"))
}

// === fixtures: files of every kind ===

struct Fixtures {
    _dir: tempfile::TempDir,
    /// Every kind of file, for any key.
    paths: Vec<String>,
    secret: String,
    ca: String,
    store: String,
}

impl Fixtures {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("secret"), "file-secret-0123456789\n").unwrap();
        std::fs::write(d.join("empty"), " \n").unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        std::fs::write(d.join("ca.pem"), ca.cert.pem()).unwrap();
        std::fs::File::create(d.join("big"))
            .unwrap()
            .set_len(200 * 1024 * 1024)
            .unwrap();
        let fifo = d.join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let show = |p: PathBuf| p.display().to_string();
        let paths = vec![
            show(d.join("secret")),
            show(d.join("empty")),
            show(d.join("ca.pem")),
            show(d.join("big")),
            show(fifo),
            show(d.join("tokens.json")),
            show(d.to_owned()),
            "/dev/zero".into(),
            "/dev/null".into(),
            "/nonexistent/x".into(),
        ];
        Self {
            secret: paths[0].clone(),
            ca: paths[2].clone(),
            store: paths[5].clone(),
            _dir: dir,
            paths,
        }
    }
}

// === documents ===

/// Inline secret values: none of them may ever be printed.
const SECRETS: [&str; 3] = [
    "SECRET-inline-0123456789",
    "SECRET-other-value-abcdef",
    "SECRET short",
];

fn secret_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        proptest::sample::select(SECRETS.to_vec()).prop_map(|s| json!(s)),
        Just(json!(98_765_432_109_876_543_i64)),
        Just(json!("")),
    ]
}

fn value(paths: Vec<String>) -> impl Strategy<Value = Value> {
    let texts = vec![
        "0s",
        "1ns",
        "500ms",
        "20s",
        "5m",
        "1day",
        "25h",
        "300000000000years",
        "18446744073709551615s",
        "0",
        "64KiB",
        "1MiB",
        "1 GiB",
        "16 EiB",
        "127.0.0.1:0",
        "[::1]:0",
        "0.0.0.0:9090",
        "localhost:80",
        "http://127.0.0.1:1",
        "https://api.criteo.com",
        "http://criteo.example",
        "ftp://x",
        "http://[::1]:1/?q#f",
        "not a url",
        "client_credentials",
        "refresh_token",
        "password",
        "main",
        "acme",
        "X-Criteo-Tenant",
        "bad header",
        "10.0.0.0/8",
        "",
        " ",
        "\u{7f}\u{0}\"\\",
    ];
    let leaf = prop_oneof![
        proptest::sample::select(texts).prop_map(|s| json!(s)),
        proptest::sample::select(paths).prop_map(|s| json!(s)),
        "\\PC{0,12}".prop_map(|s| json!(s)),
        any::<i64>().prop_map(|n| json!(n)),
        proptest::sample::select(vec![
            0_i64,
            -1,
            1,
            8191,
            1 << 31,
            1 << 32,
            1 << 61,
            1 << 62,
            i64::MAX,
            i64::MIN,
        ])
        .prop_map(|n| json!(n)),
        proptest::sample::select(vec![0.8, 0.0, 1.0, -0.5, 1e-300, 1e308, 0.999_999])
            .prop_map(|f| json!(f)),
        any::<bool>().prop_map(|b| json!(b)),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..2)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A change to the base document: set `path` (with `tenant` for `NAME`)
/// to a value, or remove it.
#[derive(Debug, Clone)]
struct Change {
    path: Vec<&'static str>,
    tenant: &'static str,
    value: Option<Value>,
}

fn change(keys: Vec<Vec<&'static str>>, paths: Vec<String>) -> impl Strategy<Value = Change> {
    (
        proptest::sample::select(keys),
        proptest::sample::select(vec!["main", "acme", "a.b", "Ünï", " ", ""]),
        any::<u8>(),
        value(paths),
        secret_value(),
    )
        .prop_map(|(path, tenant, dice, v, s)| {
            let value = match dice % 8 {
                0 => None,
                _ if is_secret(&path) => Some(s),
                _ => Some(v),
            };
            Change {
                path,
                tenant,
                value,
            }
        })
}

/// Valid configurations, the starting points of the documents: a minimal
/// one, and two that set every key (secrets inline, then in files).
fn bases(fx: &Fixtures) -> Vec<Value> {
    let minimal = json!({
        "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"},
        "tenants": {"main": {
            "grant": "client_credentials",
            "client_id": "id",
            "client_secret": SECRETS[0],
        }},
    });
    let every_key = |inline: bool| {
        let secret = |key: &str, value: &str| {
            if inline {
                (key.to_owned(), json!(value))
            } else {
                (format!("{key}_file"), json!(fx.secret))
            }
        };
        let pair = |(k, v): (String, Value)| Value::Object([(k, v)].into_iter().collect());
        let mut doc = json!({
            "server": {
                "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
                "tenant_header": "X-Tenant", "default_tenant": "acme",
                "max_replay_body": "2MiB", "shutdown_grace": "15s",
                "allowed_clients": ["127.0.0.0/8", "::1/128"], "workers": 2,
                "max_connections": 100, "max_header_bytes": "32KiB",
                "header_read_timeout": "10s",
            },
            "upstream": {
                "url": "https://api.criteo.com", "token_url": "https://api.criteo.com/oauth2/token",
                "consent_url": "https://consent.criteo.com/request",
                "connect_timeout": "2s", "timeout": "30s", "ca_file": fx.ca,
            },
            "refresh": {
                "at_fraction": 0.7, "wait_timeout": "1s", "token_timeout": "3s",
                "max_backoff": "10s", "rejected_backoff": "1m", "lazy": true,
            },
            "store": {"path": fx.store},
            "consent": {"signing_key": "public-key"},
            "tenants": {
                "main": {"grant": "client_credentials", "client_id": 42},
                "acme": {
                    "grant": "refresh_token", "client_id": "acme-id",
                    "redirect_uri": "https://app.example.com/cb",
                },
            },
        });
        for (path, field) in [
            (
                &["server"][..],
                pair(secret("admin_token", "SECRET-inline-0123456789")),
            ),
            (&["consent"][..], pair(secret("signing_secret", SECRETS[1]))),
            (
                &["tenants", "main"][..],
                pair(secret("client_secret", SECRETS[0])),
            ),
            (
                &["tenants", "acme"][..],
                pair(secret("client_secret", SECRETS[1])),
            ),
            (
                &["tenants", "acme"][..],
                pair(secret("refresh_token", SECRETS[2])),
            ),
        ] {
            let mut at = &mut doc;
            for k in path {
                at = &mut at[*k];
            }
            at.as_object_mut()
                .unwrap()
                .extend(field.as_object().unwrap().clone());
        }
        doc
    };
    vec![minimal, every_key(true), every_key(false)]
}

fn apply(doc: &mut Value, c: &Change) {
    let path: Vec<&str> = c
        .path
        .iter()
        .map(|k| if *k == NAME { c.tenant } else { k })
        .collect();
    let (last, parents) = path.split_last().expect("a key path is not empty");
    let mut at = doc;
    for k in parents {
        let map = at.as_object_mut().expect("an object");
        let next = map.entry(k.to_string()).or_insert_with(|| json!({}));
        if !next.is_object() {
            *next = json!({});
        }
        at = next;
    }
    let map = at.as_object_mut().expect("an object");
    match &c.value {
        None => {
            map.remove(*last);
        }
        Some(v) => {
            map.insert(last.to_string(), v.clone());
        }
    }
}

// === the property ===

fn names_a_key(problem: &str, sections: &[&str]) -> bool {
    problem
        .split_once(": ")
        .and_then(|(key, _)| key.split('.').next())
        .is_some_and(|first| sections.contains(&first))
}

fn check(text: &str, sections: &[&str]) -> Result<(), TestCaseError> {
    match Config::from_toml(text) {
        Err(e) => {
            prop_assert!(!e.problems.is_empty());
            for p in &e.problems {
                prop_assert!(names_a_key(p, sections), "{p:?} names no key\n{text}");
            }
        }
        Ok(config) => {
            let printed = config
                .redacted_toml()
                .map_err(|e| TestCaseError::fail(format!("cannot print: {e}\n{text}")))?;
            for s in SECRETS {
                prop_assert!(!printed.contains(s), "{s} printed:\n{printed}");
            }
            prop_assert!(!printed.contains("98765432109876543"), "{printed}");
            let again = Config::from_toml(&printed).map_err(|e| {
                TestCaseError::fail(format!("the printed config fails: {e}\n{printed}"))
            })?;
            prop_assert_eq!(again.redacted_toml().unwrap(), printed);
        }
    }
    Ok(())
}

#[test]
fn the_raw_structs_give_every_key_name() {
    let keys: Vec<String> = key_paths().iter().map(|p| p.join(".")).collect();
    for k in [
        "server",
        "server.listen",
        "server.admin_token_file",
        "upstream.ca_file",
        "refresh.lazy",
        "store.path",
        "consent.signing_secret",
        "tenants.NAME",
        "tenants.NAME.grant",
        "tenants.NAME.refresh_token_file",
    ] {
        assert!(keys.contains(&k.to_owned()), "{k} missing from {keys:?}");
    }
}

#[test]
fn arbitrary_documents_never_panic_name_their_keys_and_print_back() {
    let fixtures = Fixtures::new();
    let keys = key_paths();
    let sections: Vec<&str> = keys.iter().filter(|k| k.len() == 1).map(|k| k[0]).collect();
    for doc in bases(&fixtures) {
        let text = super::view::toml_text(&doc).unwrap();
        check(&text, &sections).unwrap();
        Config::from_toml(&text).unwrap_or_else(|e| panic!("a base is valid: {e}\n{text}"));
    }
    let docs = (
        proptest::sample::select(bases(&fixtures)),
        proptest::collection::vec(change(keys.clone(), fixtures.paths.clone()), 0..6),
    );
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 256,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let valid = std::cell::Cell::new(0);
    runner
        .run(&docs, |(mut doc, changes)| {
            for c in &changes {
                apply(&mut doc, c);
            }
            let text = super::view::toml_text(&doc).expect("a table");
            if Config::from_toml(&text).is_ok() {
                valid.set(valid.get() + 1);
            }
            check(&text, &sections)
        })
        .unwrap();
    // Both outcomes occur: the documents are neither all broken nor all fine.
    assert!(valid.get() > 0, "no generated document was valid");
}
