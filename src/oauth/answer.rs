//! Reading a 2xx token answer.
//!
//! Criteo has spent the presented refresh token the moment it answers 2xx,
//! so a new `refresh_token` is taken out first, on its own, before anything
//! else is judged: a bad `expires_in`, an odd `token_type`, an unusable
//! `access_token`, broken JSON after it or an oversized answer must not
//! cost the tenant its consent. The rest is then judged strictly, and every
//! complaint names the field and what is wrong with it, never its value (a
//! value may be a token).

use std::fmt;
use std::time::Duration;

use secrecy::SecretString;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};

use super::{GrantError, Granted};

/// The largest token answer read; Criteo's are a few hundred bytes.
pub(crate) const MAX_ANSWER: usize = 64 * 1024;
/// The longest access token accepted; it travels in every request's header.
pub(crate) const MAX_ACCESS_TOKEN: usize = 16 * 1024;
/// The longest lifetime believed; Criteo's tokens live 900 s.
pub(crate) const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Used when an answer omits `expires_in`: Criteo's lifetime.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(900);

/// A 2xx answer, judged in two parts.
pub(crate) struct Answer {
    /// The new refresh token, if the answer carried a usable one, whatever
    /// is wrong with the rest.
    pub refresh_token: Option<SecretString>,
    /// The access token, or why the rest of the answer is unusable.
    pub access: Result<Granted, GrantError>,
}

impl fmt::Debug for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Answer")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .field("access", &self.access)
            .finish()
    }
}

/// Reads a 2xx answer's `body`. `truncated`: the answer went on past
/// [`MAX_ANSWER`] (or broke off), so `body` is only its beginning.
/// `expires_in` is clamped to `min_lifetime ..= MAX_LIFETIME`.
pub(crate) fn parse(body: &[u8], truncated: Option<String>, min_lifetime: Duration) -> Answer {
    let refresh_token = find_refresh_token(body);
    let access = match truncated {
        Some(why) => Err(GrantError::Transient(why)),
        None => judge_rest(body, min_lifetime),
    };
    Answer {
        refresh_token,
        access,
    }
}

// === the refresh token, first ===

/// The last `refresh_token` member of the top-level object, if it is a
/// usable string. Every other value is skipped unread (so a number out of
/// range does not stop the search), and anything broken after the refresh
/// token does not lose it.
fn find_refresh_token(body: &[u8]) -> Option<SecretString> {
    let mut found = None;
    let mut de = serde_json::Deserializer::from_slice(body);
    let _ = de::Deserializer::deserialize_map(&mut de, Finder { found: &mut found });
    found.map(SecretString::from)
}

/// A refresh token worth keeping: non-empty, printable.
fn usable_refresh_token(s: &str) -> bool {
    !s.trim().is_empty() && !s.chars().any(char::is_control)
}

struct Finder<'a> {
    found: &'a mut Option<String>,
}

impl<'de> Visitor<'de> for Finder<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Key>()? {
            if key.0 {
                *self.found = map
                    .next_value_seed(StringOrNothing)?
                    .filter(|s| usable_refresh_token(s));
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// Whether a key is `refresh_token`.
struct Key(bool);

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key(v == "refresh_token"))
            }
        }
        d.deserialize_str(V)
    }
}

/// A string value, or `None` for any other value (skipped unread).
struct StringOrNothing;

impl<'de> DeserializeSeed<'de> for StringOrNothing {
    type Value = Option<String>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StringOrNothing {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Some(v))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

// === then the rest ===

fn unusable(why: &str) -> GrantError {
    GrantError::Transient(format!("the token endpoint's answer is unusable: {why}"))
}

fn judge_rest(body: &[u8], min_lifetime: Duration) -> Result<Granted, GrantError> {
    // serde's own messages quote the offending value; only its position
    // is kept.
    let fields: Map<String, Value> =
        serde_json::from_slice(body).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => unusable("it is not a JSON object"),
            _ => unusable(&format!(
                "broken JSON at line {} column {}",
                e.line(),
                e.column()
            )),
        })?;
    let access_token = access_token(fields.get("access_token"))?;
    match fields.get("token_type") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t.eq_ignore_ascii_case("bearer") => {}
        Some(Value::String(_)) => return Err(unusable("token_type is not Bearer")),
        Some(_) => return Err(unusable("token_type is not a string")),
    }
    let expires_in = lifetime(fields.get("expires_in"))?;
    Ok(Granted {
        access_token: SecretString::from(access_token.to_owned()),
        expires_in: clamp_lifetime(expires_in, min_lifetime),
    })
}

fn access_token(v: Option<&Value>) -> Result<&str, GrantError> {
    let t = match v {
        None | Some(Value::Null) => return Err(unusable("access_token is missing")),
        Some(Value::String(t)) => t.as_str(),
        Some(_) => return Err(unusable("access_token is not a string")),
    };
    if t.is_empty() {
        return Err(unusable("access_token is empty"));
    }
    if t.len() > MAX_ACCESS_TOKEN {
        return Err(unusable(&format!(
            "access_token is longer than {} KiB",
            MAX_ACCESS_TOKEN / 1024
        )));
    }
    // It becomes `Authorization: Bearer <token>`.
    if !t.bytes().all(|b| b.is_ascii_graphic() && b != b'"') {
        return Err(unusable(
            "access_token holds characters an HTTP header cannot carry",
        ));
    }
    Ok(t)
}

/// `expires_in` as given, in whole seconds (saturating); absent: 900 s.
fn lifetime(v: Option<&Value>) -> Result<Duration, GrantError> {
    let n = match v {
        None | Some(Value::Null) => return Ok(DEFAULT_LIFETIME),
        Some(Value::Number(n)) => n,
        Some(_) => return Err(unusable("expires_in is not a number")),
    };
    if let Some(secs) = n.as_u64() {
        return Ok(Duration::from_secs(secs));
    }
    match n.as_f64() {
        Some(f) if f < 0.0 => Err(unusable("expires_in is negative")),
        // A whole number too large for an integer (`1e19`): clamped below.
        Some(f) if f.is_finite() && f.fract() == 0.0 => Ok(Duration::from_secs(f as u64)),
        _ => Err(unusable("expires_in is not a whole number of seconds")),
    }
}

/// Brings a lifetime into `min ..= MAX_LIFETIME`, saying so when it was not.
fn clamp_lifetime(given: Duration, min: Duration) -> Duration {
    let clamped = given.clamp(min.min(MAX_LIFETIME), MAX_LIFETIME);
    if clamped != given {
        tracing::warn!(
            expires_in = given.as_secs(),
            used = clamped.as_secs(),
            "the token endpoint answered an implausible expires_in; using the nearest bound (refresh.min_token_lifetime, or one day)"
        );
    }
    clamped
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use secrecy::ExposeSecret;

    const MIN: Duration = Duration::from_secs(10);

    fn rt(a: &Answer) -> Option<&str> {
        a.refresh_token.as_ref().map(|s| s.expose_secret())
    }

    fn error(a: &Answer) -> String {
        a.access.as_ref().unwrap_err().to_string()
    }

    #[test]
    fn a_good_answer_is_read_whole() {
        let a = parse(
            br#"{"access_token":"abc.def","token_type":"Bearer","expires_in":900,"refresh_token":"r1"}"#,
            None,
            MIN,
        );
        assert_eq!(rt(&a), Some("r1"));
        let g = a.access.unwrap();
        assert_eq!(g.access_token.expose_secret(), "abc.def");
        assert_eq!(g.expires_in, Duration::from_secs(900));
    }

    #[test]
    fn the_refresh_token_survives_whatever_follows_it() {
        for body in [
            &br#"{"refresh_token":"r1","access_token":12}"#[..],
            br#"{"refresh_token":"r1","expires_in":"900","access_token":"a"}"#,
            br#"{"refresh_token":"r1","access_token":"a b"}"#,
            br#"{"refresh_token":"r1","access_token":"a","token_type":"mac"}"#,
            br#"{"refresh_token":"r1","access_token":"#,
            br#"{"refresh_token":"r1"} trailing"#,
            br#"{"expires_in":1e400,"refresh_token":"r1","access_token":"a"}"#,
            br#"{"nested":{"refresh_token":"no"},"refresh_token":"r1"}"#,
        ] {
            let a = parse(body, None, MIN);
            assert_eq!(rt(&a), Some("r1"), "{}", String::from_utf8_lossy(body));
            assert!(a.access.is_err(), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn a_truncated_answer_keeps_its_refresh_token_and_is_refused() {
        let a = parse(
            br#"{"refresh_token":"r1","padding":"xxxx"#,
            Some("too big".into()),
            MIN,
        );
        assert_eq!(rt(&a), Some("r1"));
        assert!(error(&a).contains("too big"));
    }

    #[test]
    fn unusable_refresh_tokens_are_not_kept() {
        for body in [
            &br#"{"refresh_token":"","access_token":"a"}"#[..],
            br#"{"refresh_token":"  ","access_token":"a"}"#,
            br#"{"refresh_token":"a\u0001b","access_token":"a"}"#,
            br#"{"refresh_token":42,"access_token":"a"}"#,
            br#"{"refresh_token":null,"access_token":"a"}"#,
            br#"["refresh_token","r1"]"#,
        ] {
            assert_eq!(rt(&parse(body, None, MIN)), None);
        }
    }

    #[test]
    fn each_bad_field_is_named_without_its_value() {
        for (body, says) in [
            (
                &br#"{"access_token":98765432123456789}"#[..],
                "access_token is not a string",
            ),
            (br#"{"token_type":"Bearer"}"#, "access_token is missing"),
            (br#"{"access_token":""}"#, "access_token is empty"),
            (br#"{"access_token":"secret\u0001x"}"#, "cannot carry"),
            (
                br#"{"access_token":"secretx","token_type":"secretx"}"#,
                "token_type is not Bearer",
            ),
            (
                br#"{"access_token":"secretx","token_type":7}"#,
                "token_type is not a string",
            ),
            (
                br#"{"access_token":"secretx","expires_in":"900"}"#,
                "expires_in is not a number",
            ),
            (
                br#"{"access_token":"secretx","expires_in":-5}"#,
                "expires_in is negative",
            ),
            (
                br#"{"access_token":"secretx","expires_in":899.5}"#,
                "whole number",
            ),
            (
                br#"{"access_token":"secretx","expires_in":1e400}"#,
                "broken JSON",
            ),
            (br#"["secretx"]"#, "not a JSON object"),
            (br#"{"access_token":"secretx"#, "broken JSON"),
        ] {
            let e = error(&parse(body, None, MIN));
            assert!(e.contains(says), "{e} should say {says}");
            assert!(!e.contains("secret") && !e.contains("98765"), "{e}");
        }
        let long = format!(
            r#"{{"access_token":"{}"}}"#,
            "a".repeat(MAX_ACCESS_TOKEN + 1)
        );
        assert!(error(&parse(long.as_bytes(), None, MIN)).contains("16 KiB"));
    }

    #[test]
    fn expires_in_is_clamped_to_its_bounds() {
        let life = |v: &str| {
            let body = format!(r#"{{"access_token":"a","expires_in":{v}}}"#);
            parse(body.as_bytes(), None, MIN).access.unwrap().expires_in
        };
        assert_eq!(life("0"), MIN);
        assert_eq!(life("900"), Duration::from_secs(900));
        assert_eq!(life("4294967296"), MAX_LIFETIME);
        assert_eq!(life("18446744073709551615"), MAX_LIFETIME);
        assert_eq!(life("1e19"), MAX_LIFETIME);
        assert_eq!(life("900.0"), Duration::from_secs(900));
        assert_eq!(life("null"), DEFAULT_LIFETIME);
    }

    /// Any JSON value, a few levels deep.
    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map(".{0,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A token value: long enough and distinctive enough that finding it
    /// in a message cannot be a coincidence.
    fn token() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._-]{12,40}".prop_map(|t| format!("tok{t}"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
            let a = parse(&body, None, MIN);
            let _ = a.access.map(|g| g.expires_in);
        }

        #[test]
        fn a_good_refresh_token_is_always_extracted_and_no_token_is_ever_echoed(
            mut object in prop::collection::btree_map(".{0,12}", json(), 0..6),
            refresh in token(),
            access in prop_oneof![token().prop_map(Value::from), json()],
            expires_in in prop::option::of(json()),
            token_type in prop::option::of(json()),
            truncated in any::<bool>(),
        ) {
            object.insert("access_token".into(), access.clone());
            if let Some(e) = expires_in {
                object.insert("expires_in".into(), e);
            }
            if let Some(t) = token_type {
                object.insert("token_type".into(), t);
            }
            object.insert("refresh_token".into(), Value::from(refresh.clone()));
            let text = Value::Object(object.into_iter().collect()).to_string();
            let (body, cut) = if truncated {
                // Everything up to the end of the refresh token's value.
                let end = text.find(&refresh).unwrap() + refresh.len() + 1;
                (&text.as_bytes()[..end], Some("cut short".to_owned()))
            } else {
                (text.as_bytes(), None)
            };
            let a = parse(body, cut, MIN);
            prop_assert_eq!(rt(&a), Some(refresh.as_str()));
            match &a.access {
                Ok(g) => {
                    prop_assert!(g.expires_in >= MIN && g.expires_in <= MAX_LIFETIME);
                    prop_assert_eq!(Some(g.access_token.expose_secret()), access.as_str());
                }
                Err(e) => {
                    let msg = e.to_string();
                    prop_assert!(!msg.contains(&refresh), "{}", msg);
                    if let Some(t) = access.as_str().filter(|t| t.starts_with("tok")) {
                        prop_assert!(!msg.contains(t), "{}", msg);
                    }
                }
            }
            let shown = format!("{a:?}");
            prop_assert!(!shown.contains(&refresh), "{}", shown);
        }
    }
}
