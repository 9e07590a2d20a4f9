//! Consent: the authorization-code consent URL and its `state`, Criteo's
//! signed consent URLs for client-credentials apps, and the signature on
//! its consent callback. Every comparison of a secret value is constant
//! time.

use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Sha256, Sha512};
use url::Url;
use url::form_urlencoded::byte_serialize;

type HmacSha512 = Hmac<Sha512>;
type HmacSha256 = Hmac<Sha256>;

/// How long an onboarding `state` is valid.
pub const STATE_TTL: Duration = Duration::from_secs(600);

// === authorization-code consent ===

/// `consent_url?response_type=code&client_id=…&redirect_uri=…&state=…`.
pub(crate) fn authorize_url(
    consent_url: &Url,
    client_id: &str,
    redirect_uri: &str,
    state: &str,
) -> Url {
    let mut url = consent_url.clone();
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", client_id)
        .append_pair("redirect_uri", redirect_uri)
        .append_pair("state", state);
    url
}

/// What a valid `state` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StateClaims {
    pub tenant: String,
    pub expires_at: u64,
    /// 128 random bits, hex: what makes the state single-use.
    pub nonce: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum StateError {
    #[error("the state is malformed")]
    Malformed,
    #[error("the state was not issued by this proxy")]
    Forged,
    #[error("the state has expired")]
    Expired,
    #[error("the state is for another tenant")]
    WrongTenant,
}

/// A self-verifying `state`: `<tenant-hex>.<expiry>.<nonce>.<mac>`, where
/// the MAC is HMAC-SHA256 under a key only this proxy knows. It carries
/// 128 random bits and 256 bits of MAC, binds the tenant and the expiry,
/// and lets `consent-url` (another process) issue states that the running
/// proxy accepts. Single use is enforced by the caller, by nonce.
pub fn issue_state(key: &[u8], tenant: &str, now_unix: u64, ttl: Duration) -> String {
    let mut nonce = [0u8; 16];
    rand::rng().fill_bytes(&mut nonce);
    let body = format!(
        "{}.{}.{}",
        hex::encode(tenant.as_bytes()),
        now_unix + ttl.as_secs(),
        hex::encode(nonce)
    );
    let mac = state_mac(key, &body).finalize().into_bytes();
    format!("{body}.{}", hex::encode(mac))
}

/// Checks a state's MAC (in constant time) and expiry.
pub(crate) fn verify_state(
    key: &[u8],
    state: &str,
    now_unix: u64,
) -> Result<StateClaims, StateError> {
    let (body, mac_hex) = state.rsplit_once('.').ok_or(StateError::Malformed)?;
    let mac = hex::decode(mac_hex).map_err(|_| StateError::Malformed)?;
    state_mac(key, body)
        .verify_slice(&mac)
        .map_err(|_| StateError::Forged)?;
    let mut parts = body.split('.');
    let (Some(tenant), Some(exp), Some(nonce), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(StateError::Malformed);
    };
    let tenant = String::from_utf8(hex::decode(tenant).map_err(|_| StateError::Malformed)?)
        .map_err(|_| StateError::Malformed)?;
    let expires_at: u64 = exp.parse().map_err(|_| StateError::Malformed)?;
    if now_unix >= expires_at {
        return Err(StateError::Expired);
    }
    Ok(StateClaims {
        tenant,
        expires_at,
        nonce: nonce.to_owned(),
    })
}

fn state_mac(key: &[u8], body: &str) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"criteo-token-proxy/state/v1\0");
    mac.update(body.as_bytes());
    mac
}

// === signed consent URLs (client-credentials apps) ===

/// The signed query text: `?key=…&timestamp=…&state=…&redirect-uri=…`,
/// values percent-encoded, exactly as it appears in the URL.
pub(crate) fn consent_query(key: &str, timestamp: u64, state: &str, redirect_uri: &str) -> String {
    let enc = |v: &str| byte_serialize(v.as_bytes()).collect::<String>();
    format!(
        "?key={}&timestamp={timestamp}&state={}&redirect-uri={}",
        enc(key),
        enc(state),
        enc(redirect_uri)
    )
}

/// Lowercase hex HMAC-SHA512 of `text` under `secret`.
pub(crate) fn hmac_sha512_hex(secret: &[u8], text: &[u8]) -> String {
    let mut mac = HmacSha512::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(text);
    hex::encode(mac.finalize().into_bytes())
}

/// `consent_url` + the signed query + `&signature=<hex>`.
pub(crate) fn signed_consent_url(
    consent_url: &Url,
    key: &str,
    secret: &[u8],
    timestamp: u64,
    state: &str,
    redirect_uri: &str,
) -> String {
    let mut base = consent_url.clone();
    base.set_query(None);
    base.set_fragment(None);
    let query = consent_query(key, timestamp, state, redirect_uri);
    let signature = hmac_sha512_hex(secret, query.as_bytes());
    format!("{base}{query}&signature={signature}")
}

/// Checks Criteo's `x-criteo-hmac-sha512` header against the raw body,
/// in constant time. Upper- or lowercase hex is accepted.
pub(crate) fn verify_callback(secret: &[u8], body: &[u8], signature_hex: &str) -> bool {
    let Ok(sig) = hex::decode(signature_hex.trim()) else {
        return false;
    };
    let mut mac = HmacSha512::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"signing-secret-xyz";

    /// Computed independently with Python:
    /// `hmac.new(b"signing-secret-xyz", q.encode(), hashlib.sha512).hexdigest()`.
    const URL_SIGNATURE: &str = "153ba124099df08ae12099acb764fdf00a3e29062d46199d6e150d037874b63aee16af2c6bd5f911d9799067ce4b539e67d30268dccf12b35fa30418d0cb01c6";
    const BODY: &[u8] =
        br#"{"Type":"ConsentGranted","State":"user-42","AcceptedScopes":["Advertisers/1234"]}"#;
    const BODY_SIGNATURE: &str = "6518a0b15165fd47156e0e6fcad40f0d4389a314beb5495f70e7c4252524e33cbe6cbed1d3490924e88f9cb22fcfda8bb47a3d4c415c37320d631d609181e6d2";

    #[test]
    fn the_signed_consent_url_matches_an_independent_hmac() {
        let base = Url::parse("https://consent.criteo.com/request").unwrap();
        let url = signed_consent_url(
            &base,
            "pub-key-123",
            SECRET,
            1_700_000_000,
            "user-42",
            "https://app.example.com/criteo/callback",
        );
        assert_eq!(
            url,
            format!(
                "https://consent.criteo.com/request?key=pub-key-123&timestamp=1700000000&state=user-42\
                 &redirect-uri=https%3A%2F%2Fapp.example.com%2Fcriteo%2Fcallback&signature={URL_SIGNATURE}"
            )
        );
    }

    #[test]
    fn the_callback_signature_is_checked_against_the_raw_body() {
        assert!(verify_callback(SECRET, BODY, BODY_SIGNATURE));
        assert!(verify_callback(
            SECRET,
            BODY,
            &BODY_SIGNATURE.to_uppercase()
        ));
        assert!(!verify_callback(SECRET, b"{}", BODY_SIGNATURE));
        assert!(!verify_callback(b"other", BODY, BODY_SIGNATURE));
        assert!(!verify_callback(SECRET, BODY, "not hex"));
        assert!(!verify_callback(SECRET, BODY, &BODY_SIGNATURE[..64]));
        assert_eq!(hmac_sha512_hex(SECRET, BODY), BODY_SIGNATURE);
    }

    #[test]
    fn a_state_is_bound_to_its_tenant_and_expires() {
        let key = b"k";
        let s = issue_state(key, "acme", 1000, STATE_TTL);
        let claims = verify_state(key, &s, 1000).unwrap();
        assert_eq!(claims.tenant, "acme");
        assert_eq!(claims.expires_at, 1600);
        assert_eq!(claims.nonce.len(), 32, "128 random bits");
        assert_eq!(verify_state(key, &s, 1600), Err(StateError::Expired));
        assert_eq!(verify_state(b"other", &s, 1000), Err(StateError::Forged));
        // Changing the tenant breaks the MAC.
        let forged = s.replacen(&hex::encode("acme"), &hex::encode("evil"), 1);
        assert_eq!(verify_state(key, &forged, 1000), Err(StateError::Forged));
        assert_eq!(
            verify_state(key, "garbage", 1000),
            Err(StateError::Malformed)
        );
        assert_ne!(
            issue_state(key, "acme", 1000, STATE_TTL),
            s,
            "fresh every time"
        );
    }

    #[test]
    fn the_authorize_url_carries_the_four_parameters() {
        let base = Url::parse("https://consent.criteo.com/request").unwrap();
        let u = authorize_url(&base, "cid", "https://app/cb", "st");
        assert_eq!(
            u.as_str(),
            "https://consent.criteo.com/request?response_type=code&client_id=cid&redirect_uri=https%3A%2F%2Fapp%2Fcb&state=st"
        );
    }
}
