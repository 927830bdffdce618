//! `github-webhook`: receives GitHub webhooks on a hook URL, verifies their signature and
//! stores each delivery as one event.
//!
//! Config: `{"secret": "<the webhook's secret>"}`. A request without a valid
//! `X-Hub-Signature-256` (`sha256=` + hex HMAC-SHA256 of the body, compared in constant time)
//! is rejected with 401; a body that is not JSON with 400. The event's payload is the body as
//! GitHub sent it; its headers carry `github-event` and `github-delivery`.

use hmac::{Hmac, Mac};
use rewind_plugin_sdk::{Config, Ingress, NewEvent, Rejection, Request};
use subtle::ConstantTimeEq;

pub struct GithubWebhook {
    secret: Vec<u8>,
}

/// Verifies `sha256=<hex>` against the body.
pub fn verify(secret: &[u8], signature: Option<&str>, body: &[u8]) -> bool {
    let Some(hex_sig) = signature.and_then(|s| s.strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(given) = hex::decode(hex_sig.trim()) else {
        return false;
    };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    let expected = mac.finalize().into_bytes();
    given.len() == expected.len() && bool::from(given.ct_eq(&expected))
}

impl Ingress for GithubWebhook {
    fn new(config: Config) -> Result<Self, String> {
        let secret = config.str("secret")?;
        if secret.is_empty() {
            return Err("config `secret` must not be empty".into());
        }
        Ok(Self {
            secret: secret.as_bytes().to_vec(),
        })
    }

    fn handle(&mut self, request: &Request) -> Result<Vec<NewEvent>, Rejection> {
        if !verify(
            &self.secret,
            request.header("x-hub-signature-256"),
            &request.body,
        ) {
            return Err(Rejection::new(
                401,
                "missing or invalid X-Hub-Signature-256: check the webhook's secret",
            ));
        }
        if serde_json::from_slice::<serde_json::Value>(&request.body).is_err() {
            return Err(Rejection::new(
                400,
                "the body is not JSON: set the webhook's content type to application/json",
            ));
        }
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        for (from, to) in [
            ("x-github-event", "github-event"),
            ("x-github-delivery", "github-delivery"),
        ] {
            if let Some(v) = request.header(from) {
                headers.push((to.to_string(), v.to_string()));
            }
        }
        Ok(vec![NewEvent {
            headers,
            payload: request.body.clone(),
        }])
    }
}

rewind_plugin_sdk::export_ingress!(GithubWebhook);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_checked() {
        // GitHub's documented example.
        let body = b"Hello, World!";
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(verify(b"It's a Secret to Everybody", Some(sig), body));
        assert!(!verify(b"wrong", Some(sig), body));
        assert!(!verify(b"It's a Secret to Everybody", None, body));
        assert!(!verify(
            b"It's a Secret to Everybody",
            Some("sha1=abc"),
            body
        ));
        assert!(!verify(
            b"It's a Secret to Everybody",
            Some("sha256=zz"),
            body
        ));
    }
}
