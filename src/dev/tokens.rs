//! What a stand-in for Criteo's token endpoint must remember, written once
//! for the `--dev` sandbox and the tests' fake: the tokens it issued, and the
//! grants of `POST /oauth2/token` as Criteo's behave (client credentials;
//! single-use refresh tokens that rotate at every renewal, presenting a spent
//! one is `invalid_grant`; authorization codes good once for 30 s).
//!
//! It holds no lock and does no I/O: each stand-in keeps a [`Ledger`] behind
//! its own mutex and adds its own routes (the sandbox its API, the fake its
//! test knobs) around [`Ledger::grant`] and [`Ledger::check`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, Response, StatusCode};
use http_body_util::Full;
use rand::RngCore;
use serde_json::{Value, json};

use super::errors::{GrantError, Refusal};
use crate::error::json_response;

/// How long an authorization code can be exchanged.
const CODE_LIFETIME: Duration = Duration::from_secs(30);

/// Tokens and codes a stand-in issued, by client id.
#[derive(Debug)]
pub struct Ledger {
    /// Every token starts with it (`sandbox-access-…`, `fake-refresh-…`), so
    /// a log or a test can tell where a token came from.
    prefix: &'static str,
    access: HashMap<String, Access>,
    refresh: HashMap<String, Refresh>,
    codes: HashMap<String, Code>,
    /// Tokens and codes issued so far; numbers each one.
    issued: u64,
}

#[derive(Debug)]
struct Access {
    client: String,
    seq: u64,
    expires_at: Instant,
    revoked: bool,
}

#[derive(Debug)]
struct Refresh {
    client: String,
    seq: u64,
    spent: bool,
    revoked: bool,
}

#[derive(Debug)]
struct Code {
    client: String,
    redirect_uri: String,
    issued_at: Instant,
    used: bool,
}

/// A granted token request: what the answer carries.
#[derive(Debug, Clone)]
pub struct Grant {
    pub client_id: String,
    pub grant_type: String,
    pub access_token: String,
    /// The next refresh token, for the refresh and code grants.
    pub refresh_token: Option<String>,
    pub expires_in: Duration,
}

// === impl Ledger ===

impl Ledger {
    pub fn new(prefix: &'static str) -> Self {
        Self {
            prefix,
            access: HashMap::new(),
            refresh: HashMap::new(),
            codes: HashMap::new(),
            issued: 0,
        }
    }

    /// `{prefix}-{kind}-{n}-{random}`: numbered, so tests can name the
    /// first one; random, so no two stand-ins agree on a token.
    fn fresh(&mut self, kind: &str) -> (String, u64) {
        let mut random = [0u8; 12];
        rand::rng().fill_bytes(&mut random);
        self.issued += 1;
        let n = self.issued;
        (
            format!("{}-{kind}-{n}-{}", self.prefix, hex::encode(random)),
            n,
        )
    }

    /// A new refresh token for `client`, as a consent gives.
    pub fn issue_refresh(&mut self, client: &str) -> String {
        let (token, seq) = self.fresh("refresh");
        let record = Refresh {
            client: client.to_owned(),
            seq,
            spent: false,
            revoked: false,
        };
        self.refresh.insert(token.clone(), record);
        token
    }

    /// An authorization code for `client`, as the consent page hands out.
    pub fn issue_code(&mut self, client: &str, redirect_uri: &str) -> String {
        let (code, _) = self.fresh("code");
        let record = Code {
            client: client.to_owned(),
            redirect_uri: redirect_uri.to_owned(),
            issued_at: Instant::now(),
            used: false,
        };
        self.codes.insert(code.clone(), record);
        code
    }

    /// A new access token for `client`, living `lifetime`.
    pub fn issue_access(&mut self, client: &str, lifetime: Duration) -> String {
        let (token, seq) = self.fresh("access");
        let now = Instant::now();
        let record = Access {
            client: client.to_owned(),
            seq,
            // A lifetime past what `Instant` holds is "never" here.
            expires_at: now
                .checked_add(lifetime)
                .unwrap_or(now + Duration::from_secs(1 << 40)),
            revoked: false,
        };
        self.access.insert(token.clone(), record);
        token
    }

    /// The client whose valid access token `token` is.
    pub fn check(&self, token: Option<&str>) -> Result<&str, Refusal> {
        match token.and_then(|t| self.access.get(t)) {
            None => Err(Refusal::Invalid),
            Some(a) if a.expires_at <= Instant::now() => Err(Refusal::Expired),
            Some(a) if a.revoked => Err(Refusal::Invalid),
            Some(a) => Ok(&a.client),
        }
    }

    /// Revokes every access token (refresh tokens stay valid); how many
    /// were still unrevoked.
    pub fn revoke_access(&mut self) -> usize {
        let live = self.access.values_mut().filter(|a| !a.revoked);
        live.map(|a| a.revoked = true).count()
    }

    /// The consenting user left: every refresh token of `client` dies.
    pub fn revoke_refresh(&mut self, client: &str) {
        for r in self.refresh.values_mut().filter(|r| r.client == client) {
            r.revoked = true;
        }
    }

    /// Every access token issued, revoked or not.
    pub fn access_tokens(&self) -> impl Iterator<Item = &str> {
        self.access.keys().map(String::as_str)
    }

    /// Whether `client`'s newest access token has expired (false if none).
    pub fn newest_access_expired(&self, client: &str) -> bool {
        self.access
            .values()
            .filter(|a| a.client == client)
            .max_by_key(|a| a.seq)
            .is_some_and(|a| a.expires_at <= Instant::now())
    }

    /// The one refresh token of `client` still usable, if any.
    pub fn newest_refresh(&self, client: &str) -> Option<String> {
        self.refresh
            .iter()
            .filter(|(_, r)| r.client == client && !r.spent && !r.revoked)
            .max_by_key(|(_, r)| r.seq)
            .map(|(t, _)| t.clone())
    }

    /// `POST /oauth2/token` with its parsed form, the client checked by
    /// `authentic(client_id, client_secret)`: a refresh token or code
    /// presented is spent even if the answer never arrives.
    pub fn grant(
        &mut self,
        form: &HashMap<String, String>,
        authentic: impl FnOnce(&str, &str) -> bool,
        lifetime: Duration,
    ) -> Result<Grant, GrantError> {
        let field = |k: &str| form.get(k).map(String::as_str);
        let client = field("client_id").unwrap_or("");
        match field("client_secret") {
            Some(secret) if authentic(client, secret) => {}
            _ => return Err(GrantError::InvalidClient),
        }
        let grant_type = field("grant_type").unwrap_or("");
        let refresh_token = match grant_type {
            "client_credentials" => None,
            "refresh_token" => {
                self.spend_refresh(client, field("refresh_token").unwrap_or(""))?;
                Some(self.issue_refresh(client))
            }
            "authorization_code" => {
                let code = field("code").unwrap_or("");
                self.use_code(client, code, field("redirect_uri").unwrap_or(""))?;
                Some(self.issue_refresh(client))
            }
            _ => return Err(GrantError::UnsupportedGrantType),
        };
        Ok(Grant {
            client_id: client.to_owned(),
            grant_type: grant_type.to_owned(),
            access_token: self.issue_access(client, lifetime),
            refresh_token,
            expires_in: lifetime,
        })
    }

    fn spend_refresh(&mut self, client: &str, token: &str) -> Result<(), GrantError> {
        match self.refresh.get_mut(token) {
            None => Err(GrantError::UnknownRefreshToken),
            Some(r) if r.client != client => Err(GrantError::NotThisClientsToken),
            Some(r) if r.spent => Err(GrantError::RefreshTokenSpent),
            Some(r) if r.revoked => Err(GrantError::ConsentRevoked),
            Some(r) => {
                r.spent = true;
                Ok(())
            }
        }
    }

    fn use_code(&mut self, client: &str, code: &str, redirect: &str) -> Result<(), GrantError> {
        match self.codes.get_mut(code) {
            None => Err(GrantError::UnknownCode),
            Some(c) if c.used => Err(GrantError::CodeUsed),
            Some(c) if c.issued_at.elapsed() > CODE_LIFETIME => Err(GrantError::CodeExpired),
            Some(c) if c.client != client || c.redirect_uri != redirect => {
                Err(GrantError::CodeMismatch)
            }
            Some(c) => {
                c.used = true;
                Ok(())
            }
        }
    }
}

/// Whether a token request's body is a form, as Criteo requires.
pub fn form_encoded(headers: &HeaderMap) -> Result<(), GrantError> {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"))
        .then_some(())
        .ok_or(GrantError::NotAForm)
}

// === impl Grant ===

impl Grant {
    /// The answer's fields, the refresh token (if any) first, as Criteo
    /// sends them.
    pub fn fields(&self) -> Vec<(&'static str, Value)> {
        let mut fields = Vec::with_capacity(4);
        if let Some(rt) = &self.refresh_token {
            fields.push(("refresh_token", json!(rt)));
        }
        fields.extend([
            ("access_token", json!(self.access_token)),
            ("token_type", json!("Bearer")),
            ("expires_in", json!(self.expires_in.as_secs())),
        ]);
        fields
    }

    /// The token endpoint's 200.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let answer = self.fields().into_iter().map(|(k, v)| (k.to_owned(), v));
        json_response(StatusCode::OK, &Value::Object(answer.collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn access_tokens_expire_and_can_be_revoked() {
        let mut t = Ledger::new("t");
        let a = t.issue_access("demo", MINUTE);
        assert!(a.starts_with("t-access-1-"), "{a}");
        assert_eq!(t.check(Some(&a)), Ok("demo"));
        assert_eq!(t.check(Some("nope")), Err(Refusal::Invalid));
        assert_eq!(t.check(None), Err(Refusal::Invalid));
        assert_eq!(t.revoke_access(), 1);
        assert_eq!(t.check(Some(&a)), Err(Refusal::Invalid));
        let gone = t.issue_access("demo", Duration::ZERO);
        assert_eq!(t.check(Some(&gone)), Err(Refusal::Expired));
        assert!(t.newest_access_expired("demo"));
    }

    #[test]
    fn refresh_tokens_are_single_use_and_rotate() {
        let mut t = Ledger::new("t");
        let first = t.issue_refresh("acme");
        let grant = |rt: &str| {
            form(&[
                ("grant_type", "refresh_token"),
                ("client_id", "acme"),
                ("client_secret", "s"),
                ("refresh_token", rt),
            ])
        };
        let ok = |id: &str, s: &str| id == "acme" && s == "s";
        let next = t.grant(&grant(&first), ok, MINUTE).unwrap();
        let second = next.refresh_token.clone().unwrap();
        assert_eq!(t.newest_refresh("acme").as_ref(), Some(&second));
        assert_eq!(
            t.grant(&grant(&first), ok, MINUTE).unwrap_err(),
            GrantError::RefreshTokenSpent
        );
        t.revoke_refresh("acme");
        assert_eq!(
            t.grant(&grant(&second), ok, MINUTE).unwrap_err(),
            GrantError::ConsentRevoked
        );
        let wrong = |_: &str, _: &str| false;
        assert_eq!(
            t.grant(&grant(&second), wrong, MINUTE).unwrap_err(),
            GrantError::InvalidClient
        );
    }

    #[test]
    fn a_code_is_good_once_for_its_redirect_uri() {
        let mut t = Ledger::new("t");
        let code = t.issue_code("acme", "http://127.0.0.1/cb");
        let exchange = |redirect: &str| {
            form(&[
                ("grant_type", "authorization_code"),
                ("client_id", "acme"),
                ("client_secret", "s"),
                ("code", &code),
                ("redirect_uri", redirect),
            ])
        };
        let ok = |_: &str, _: &str| true;
        let wrong = t.grant(&exchange("http://elsewhere/"), ok, MINUTE);
        assert_eq!(wrong.unwrap_err(), GrantError::CodeMismatch);
        assert!(
            t.grant(&exchange("http://127.0.0.1/cb"), ok, MINUTE)
                .is_ok()
        );
        let again = t.grant(&exchange("http://127.0.0.1/cb"), ok, MINUTE);
        assert_eq!(again.unwrap_err(), GrantError::CodeUsed);
    }
}
