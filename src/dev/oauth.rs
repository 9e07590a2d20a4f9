//! The sandbox's token endpoint: the shared [`Ledger`]'s grants for the
//! sandbox's two apps, their tokens living [`TOKEN_LIFETIME`].

use std::collections::HashMap;

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body_util::Full;

use super::tokens::form_encoded;
use super::{APPS, Stand, TOKEN_LIFETIME};

impl Stand {
    /// `POST /oauth2/token`.
    pub(super) fn token(&self, headers: &HeaderMap, body: &[u8]) -> Response<Full<Bytes>> {
        if let Err(e) = form_encoded(headers) {
            return e.response();
        }
        let form: HashMap<String, String> =
            url::form_urlencoded::parse(body).into_owned().collect();
        let known = |id: &str, secret: &str| {
            APPS.iter()
                .any(|a| a.client_id == id && a.client_secret == secret)
        };
        match self.lock_tokens().grant(&form, known, TOKEN_LIFETIME) {
            Ok(grant) => grant.response(),
            Err(e) => e.response(),
        }
    }
}
