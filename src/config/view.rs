//! What `check-config` prints: the validated [`Config`] turned back into
//! the raw structs the file is read into, serialised as TOML.
//!
//! The conversion names every field of every raw struct (no
//! `..Default::default()`), so a key added to the raw structs and left out
//! here is a compile error, and the printed config is always valid input
//! again. Secrets print as `"<redacted>"` (by the raw structs'
//! `serialize_with`, whatever the field holds), files as their paths.

use std::collections::BTreeMap;
use std::fmt::Write;

use secrecy::SecretString;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use super::raw::{
    RawConfig, RawConsent, RawRateLimit, RawRefresh, RawServer, RawStore, RawTenant, RawUpstream,
};
use super::{Config, SecretSource, TenantLimit};

/// What a secret prints as.
pub(crate) const REDACTED: &str = "<redacted>";

pub(super) fn redacted_toml(config: &Config) -> Result<String, String> {
    toml_text(&raw(config))
}

/// The raw form of `secret`: (inline, file). An inline secret is replaced
/// by the placeholder before it is even serialised.
fn split(secret: Option<&SecretSource>) -> (Option<SecretString>, Option<std::path::PathBuf>) {
    match secret {
        None => (None, None),
        Some(SecretSource::Inline(_)) => (Some(SecretString::from(REDACTED)), None),
        Some(SecretSource::File(p)) => (None, Some(p.clone())),
    }
}

fn raw(c: &Config) -> RawConfig {
    let s = &c.server;
    let (admin_token, admin_token_file) = split(s.admin_token.as_ref());
    let u = &c.upstream;
    let r = &c.refresh;
    RawConfig {
        server: RawServer {
            listen: s.listen,
            admin_listen: s.admin_listen,
            tenant_header: s.tenant_header.as_str().to_owned(),
            default_tenant: s.default_tenant.clone(),
            max_replay_body: bytesize::ByteSize::b(s.max_replay_body as u64),
            shutdown_grace: s.shutdown_grace,
            allowed_clients: s.allowed_clients.clone(),
            workers: s.workers,
            max_connections: s.max_connections,
            max_header_bytes: bytesize::ByteSize::b(s.max_header_bytes as u64),
            header_read_timeout: s.header_read_timeout,
            idle_timeout: s.idle_timeout,
            body_read_timeout: s.body_read_timeout,
            admin_max_connections: s.admin_max_connections,
            replay_budget: bytesize::ByteSize::b(s.replay_budget as u64),
            admin_token,
            admin_token_file,
        },
        upstream: RawUpstream {
            url: u.url.to_string(),
            token_url: u.token_url.to_string(),
            consent_url: u.consent_url.to_string(),
            connect_timeout: u.connect_timeout,
            timeout: u.timeout,
            max_connections: u.max_connections,
            ca_file: u.extra_roots.as_ref().map(|r| r.path.clone()),
        },
        refresh: RawRefresh {
            at_fraction: r.at_fraction,
            wait_timeout: r.wait_timeout,
            token_timeout: r.token_timeout,
            rotation_timeout: r.rotation_timeout,
            min_token_lifetime: r.min_token_lifetime,
            max_backoff: r.max_backoff,
            rejected_backoff: r.rejected_backoff,
            lazy: r.lazy,
        },
        store: {
            let (url, url_file) = match &c.store.url {
                None => (None, None),
                // Shown with its password redacted by `RawStore`'s serializer.
                Some(SecretSource::Inline(u)) => (Some(u.clone()), None),
                Some(SecretSource::File(p)) => (None, Some(p.clone())),
            };
            RawStore {
                path: c.store.path.clone(),
                url,
                url_file,
                lease: c.store.lease,
                poll_interval: c.store.poll_interval,
            }
        },
        rate_limit: {
            let l = &c.rate_limit;
            let show = |r: Option<crate::pacing::Rate>| r.map(|r| r.to_string());
            RawRateLimit {
                max_wait: l.max_wait,
                client_credentials: show(l.client_credentials),
                refresh_token: show(l.refresh_token),
                reporting: show(l.reporting),
                reporting_paths: l.reporting_paths.as_strings(),
            }
        },
        consent: c.consent.as_ref().map(|k| {
            let (signing_secret, signing_secret_file) = split(Some(&k.signing_secret));
            RawConsent {
                signing_key: Some(k.signing_key.clone()),
                signing_secret,
                signing_secret_file,
            }
        }),
        tenants: c
            .tenants
            .iter()
            .map(|t| {
                let (client_secret, client_secret_file) = split(Some(&t.client_secret));
                let (refresh_token, refresh_token_file) = split(t.seed_refresh_token.as_ref());
                let raw = RawTenant {
                    grant: t.grant,
                    client_id: Some(t.client_id.clone()),
                    client_secret,
                    client_secret_file,
                    redirect_uri: t.redirect_uri.clone(),
                    refresh_token,
                    refresh_token_file,
                    rate_limit: match t.rate_limit {
                        TenantLimit::Inherit => None,
                        TenantLimit::Off => Some("off".to_owned()),
                        TenantLimit::Own(rate) => Some(rate.to_string()),
                    },
                };
                (t.name.clone(), raw)
            })
            .collect::<BTreeMap<_, _>>(),
    }
}

// === TOML text ===

/// A serialised value with its tables in field order (`serde_json::Value`
/// would sort them): `[server]` first, `listen` first, as people write it.
#[derive(Debug)]
enum Node {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Node>),
    Table(Vec<(String, Node)>),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Node, E> {
        Ok(Node::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Node, E> {
        Ok(Node::Number(n.into()))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Node, E> {
        Ok(Node::Number(n.into()))
    }
    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Node, E> {
        serde_json::Number::from_f64(n)
            .map(Node::Number)
            .ok_or_else(|| E::custom("a number that is not finite"))
    }
    fn visit_str<E>(self, s: &str) -> Result<Node, E> {
        Ok(Node::String(s.to_owned()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(Node::Table(entries))
    }
}

/// `value` (a table) as a TOML document: each table's plain keys, then its
/// sub-tables as `[a.b]` sections, in the order serialised. Nulls (unset
/// options) are left out.
pub(super) fn toml_text<T: Serialize>(value: &T) -> Result<String, String> {
    let json = serde_json::to_string(value).map_err(|e| e.to_string())?;
    let node: Node = serde_json::from_str(&json).map_err(|e| e.to_string())?;
    let Node::Table(root) = node else {
        return Err("the configuration is not a table".into());
    };
    let mut out = String::new();
    table(&mut out, &[], &root)?;
    Ok(out)
}

fn table(out: &mut String, path: &[&str], entries: &[(String, Node)]) -> Result<(), String> {
    let is_plain = |v: &Node| !matches!(v, Node::Null | Node::Table(_));
    if !path.is_empty() && entries.iter().any(|(_, v)| is_plain(v)) {
        if !out.is_empty() {
            out.push('\n');
        }
        let header: Vec<String> = path.iter().map(|k| key(k)).collect();
        let _ = writeln!(out, "[{}]", header.join("."));
    }
    for (k, v) in entries.iter().filter(|(_, v)| is_plain(v)) {
        let _ = writeln!(out, "{} = {}", key(k), inline(v)?);
    }
    for (k, v) in entries {
        if let Node::Table(sub) = v {
            let mut p = path.to_vec();
            p.push(k);
            table(out, &p, sub)?;
        }
    }
    Ok(())
}

fn inline(v: &Node) -> Result<String, String> {
    Ok(match v {
        Node::Null => return Err("a null inside an array".into()),
        Node::Bool(b) => b.to_string(),
        // serde_json writes integers plainly and floats in their shortest
        // exact form (`0.8`, `1e-7`), which TOML reads back identically.
        Node::Number(n) => n.to_string(),
        Node::String(s) => quote(s),
        Node::Array(items) => {
            let items: Result<Vec<_>, _> = items.iter().map(inline).collect();
            format!("[{}]", items?.join(", "))
        }
        Node::Table(entries) => {
            let fields: Result<Vec<_>, String> = entries
                .iter()
                .filter(|(_, v)| !matches!(v, Node::Null))
                .map(|(k, v)| Ok(format!("{} = {}", key(k), inline(v)?)))
                .collect();
            format!("{{ {} }}", fields?.join(", "))
        }
    })
}

/// A bare key when TOML allows one, else a quoted one.
fn key(k: &str) -> String {
    if !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        k.to_owned()
    } else {
        quote(k)
    }
}

/// A TOML basic string: `"` and `\` escaped, every control character
/// (DEL included, which TOML forbids raw) as `\uXXXX`.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::{Format, Toml};
    use serde_json::{Value, json};

    #[test]
    fn odd_strings_and_keys_survive_a_round_trip_through_toml() {
        let doc = json!({
            "server": {"tenant_header": "a\"b\\c\u{7f}\u{1}\n\té", "workers": 2, "x": 0.8, "on": true},
            "tenants": {"a.b": {"grant": "g", "list": ["x", "y"]}, "plain": {"n": -3}},
            "empty": {},
            "skipped": null,
        });
        let text = toml_text(&doc).unwrap();
        let back: Value = figment::Figment::from(Toml::string(&text))
            .extract()
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        let mut want = doc.clone();
        want.as_object_mut().unwrap().remove("skipped");
        want.as_object_mut().unwrap().remove("empty");
        assert_eq!(back, want, "{text}");
    }

    #[test]
    fn sections_and_keys_print_in_the_order_they_are_declared() {
        let c = Config::from_toml(
            "[tenants.main]\ngrant = \"client_credentials\"\nclient_id = \"id\"\nclient_secret = \"s\"\n",
        )
        .unwrap();
        let text = redacted_toml(&c).unwrap();
        let headers: Vec<&str> = text.lines().filter(|l| l.starts_with('[')).collect();
        assert_eq!(
            headers,
            [
                "[server]",
                "[upstream]",
                "[refresh]",
                "[store]",
                "[rate_limit]",
                "[tenants.main]"
            ],
            "{text}"
        );
        assert!(text.starts_with("[server]\nlisten = "), "{text}");
    }
}
