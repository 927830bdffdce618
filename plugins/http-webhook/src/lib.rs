//! `http-webhook`: delivers events to an HTTP endpoint, one POST per event (or one per batch),
//! signed in the Standard Webhooks format.
//!
//! Config:
//! ```json
//! {"url": "https://hooks.example.com/in", "allow_hosts": ["hooks.example.com"],
//!  "mode": "event", "headers": {"x-team": "payments"}, "secret": "whsec_…", "timeout_ms": 5000}
//! ```
//! - `mode`: `event` (default; the body is the event's payload as received) or `batch` (a
//!   JSON array of the payloads; non-JSON payloads as base64 strings).
//! - `secret` (optional, `whsec_` + base64): each request carries `webhook-id` (the event id,
//!   the same on every attempt, so a receiver can drop duplicates), `webhook-timestamp` and
//!   `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.
//! - Every request carries `rewind-event-id` and the event's `rewind-*` headers (a replay's
//!   `rewind-replay-id`).
//! - Results: 2xx delivered; 429, 408 and 5xx retryable (honouring `Retry-After` seconds);
//!   3xx and other 4xx permanent (redirects are not followed); timeouts and connection errors
//!   retryable; an address the gateway refuses (allow-list, private ranges) permanent.

use base64::Engine;
use hmac::{Hmac, Mac};
use rewind_plugin_sdk::host::{HttpRequest, HttpResponse, http_send};
use rewind_plugin_sdk::{Config, Delivery, Destination, Event};

pub struct Webhook {
    url: String,
    batch: bool,
    headers: Vec<(String, String)>,
    key: Option<Vec<u8>>,
    timeout_ms: Option<u32>,
}

/// `v1,<signature>` of the Standard Webhooks specification.
pub fn sign(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// What an HTTP answer means for delivery.
pub fn classify(resp: &HttpResponse) -> Delivery {
    let s = resp.status;
    if (200..300).contains(&s) {
        return Delivery::Delivered;
    }
    let retry_after_ms = resp
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
        .and_then(|(_, v)| v.trim().parse::<u32>().ok())
        .map(|secs| secs.saturating_mul(1000));
    let snippet = String::from_utf8_lossy(&resp.body[..resp.body.len().min(200)]).into_owned();
    if s == 429 || s == 408 || s >= 500 {
        Delivery::Retryable {
            reason: format!("HTTP {s}: {snippet}"),
            retry_after_ms,
        }
    } else if (300..400).contains(&s) {
        Delivery::Permanent(format!(
            "HTTP {s}: redirects are not followed; point `url` at the final address"
        ))
    } else {
        Delivery::Permanent(format!("HTTP {s}: {snippet}"))
    }
}

/// A transport error from the host: refusals are permanent, the rest retryable.
pub fn classify_error(reason: String) -> Delivery {
    if reason.contains("allow-list")
        || reason.contains("may not reach")
        || reason.contains("invalid URL")
    {
        Delivery::Permanent(reason)
    } else {
        Delivery::Retryable {
            reason,
            retry_after_ms: None,
        }
    }
}

/// The body of a batch: a JSON array of the payloads. JSON payloads are spliced in as they
/// are (no re-serialization); anything else becomes a base64 string.
pub fn batch_body(events: &[Event<'_>]) -> Vec<u8> {
    // JSON payloads (validated when they were ingested) are spliced in as they are; the
    // rest become base64 strings.
    let mut body =
        Vec::with_capacity(events.iter().map(|e| e.payload.len() + 1).sum::<usize>() + 2);
    body.push(b'[');
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        let json = e
            .header("content-type")
            .is_none_or(|ct| ct.starts_with("application/json"))
            && serde_json::from_slice::<&serde_json::value::RawValue>(e.payload).is_ok();
        if json {
            body.extend_from_slice(e.payload);
        } else {
            let text = base64::engine::general_purpose::STANDARD.encode(e.payload);
            body.extend_from_slice(
                serde_json::to_string(&text)
                    .expect("a string serializes")
                    .as_bytes(),
            );
        }
    }
    body.push(b']');
    body
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Webhook {
    fn request(
        &self,
        id: &str,
        events: &[Event<'_>],
        body: Vec<u8>,
        content_type: &str,
    ) -> HttpRequest {
        let mut headers = vec![
            ("content-type".to_string(), content_type.to_string()),
            ("rewind-event-id".to_string(), id.to_string()),
        ];
        if let Some(first) = events.first() {
            for (k, v) in first.headers() {
                if k.starts_with("rewind-") && !k.eq_ignore_ascii_case("rewind-event-id") {
                    headers.push((k.to_string(), v.to_string()));
                }
            }
        }
        headers.extend(self.headers.iter().cloned());
        if let Some(key) = &self.key {
            let ts = now_secs();
            headers.push(("webhook-id".into(), id.to_string()));
            headers.push(("webhook-timestamp".into(), ts.to_string()));
            headers.push(("webhook-signature".into(), sign(key, id, ts, &body)));
        }
        HttpRequest {
            method: "POST".into(),
            url: self.url.clone(),
            headers,
            body,
            timeout_ms: self.timeout_ms,
        }
    }

    fn send(&self, req: &HttpRequest) -> Delivery {
        match http_send(req) {
            Ok(resp) => classify(&resp),
            Err(reason) => classify_error(reason),
        }
    }
}

impl Destination for Webhook {
    fn new(config: Config) -> Result<Self, String> {
        let url = config.str("url")?.to_string();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!("config `url` must be an http(s) URL, got {url:?}"));
        }
        let batch = match config.opt_str("mode")?.unwrap_or("event") {
            "event" => false,
            "batch" => true,
            other => {
                return Err(format!(
                    "config `mode` must be \"event\" or \"batch\", got {other:?}"
                ));
            }
        };
        let mut headers = Vec::new();
        if let Some(h) = config.get("headers") {
            let obj = h
                .as_object()
                .ok_or("config `headers` must be an object of strings")?;
            for (k, v) in obj {
                let v = v
                    .as_str()
                    .ok_or_else(|| format!("config `headers.{k}` must be a string"))?;
                headers.push((k.clone(), v.to_string()));
            }
        }
        let key = match config.opt_str("secret")? {
            None => None,
            Some(s) => {
                let b64 = s.strip_prefix("whsec_").unwrap_or(s);
                Some(
                    base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map_err(|_| {
                            "config `secret` must be `whsec_` followed by base64".to_string()
                        })?,
                )
            }
        };
        let timeout_ms = config
            .opt_u64("timeout_ms")?
            .map(|t| t.min(u32::MAX as u64) as u32);
        Ok(Self {
            url,
            batch,
            headers,
            key,
            timeout_ms,
        })
    }

    fn deliver(&mut self, event: &Event<'_>) -> Delivery {
        let ct = event.header("content-type").unwrap_or("application/json");
        let req = self.request(
            event.id,
            std::slice::from_ref(event),
            event.payload.to_vec(),
            ct,
        );
        self.send(&req)
    }

    fn deliver_batch(&mut self, events: &[Event<'_>]) -> Vec<Delivery> {
        if !self.batch {
            return events.iter().map(|e| self.deliver(e)).collect();
        }
        if events.is_empty() {
            return Vec::new();
        }
        let body = batch_body(events);
        let id = format!("{}-{}", events[0].id, events[events.len() - 1].id);
        let req = self.request(&id, events, body, "application/json");
        let result = self.send(&req);
        vec![result; events.len()]
    }
}

rewind_plugin_sdk::export_destination!(Webhook);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The example of the Standard Webhooks specification.
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn answers_are_classified() {
        let resp = |status: u16, headers: Vec<(String, String)>| HttpResponse {
            status,
            headers,
            body: b"no".to_vec(),
        };
        assert_eq!(classify(&resp(204, vec![])), Delivery::Delivered);
        assert!(matches!(
            classify(&resp(503, vec![])),
            Delivery::Retryable { .. }
        ));
        assert_eq!(
            classify(&resp(429, vec![("Retry-After".into(), "3".into())])),
            Delivery::Retryable {
                reason: "HTTP 429: no".into(),
                retry_after_ms: Some(3000)
            }
        );
        assert!(matches!(
            classify(&resp(400, vec![])),
            Delivery::Permanent(_)
        ));
        assert!(
            matches!(classify(&resp(302, vec![])), Delivery::Permanent(r) if r.contains("redirects"))
        );
        assert!(matches!(
            classify_error("x is not on this destination's allow-list".into()),
            Delivery::Permanent(_)
        ));
        assert!(matches!(
            classify_error("timed out".into()),
            Delivery::Retryable { .. }
        ));
    }

    #[test]
    fn batch_bodies_splice_json_and_encode_the_rest() {
        let mut w = rewind_plugin_sdk::codec::BatchWriter::new();
        w.push(
            "a",
            1,
            [("content-type", "application/json")],
            br#"{"n": 1}"#,
        );
        w.push(
            "b",
            2,
            [("content-type", "application/octet-stream")],
            &[0, 255],
        );
        w.push("c", 3, [("content-type", "application/json")], b"{broken");
        let buf = w.finish();
        let events: Vec<Event<'_>> = rewind_plugin_sdk::codec::BatchReader::new(&buf)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let body = batch_body(&events);
        assert_eq!(body, br#"[{"n": 1},"AP8=","e2Jyb2tlbg=="]"#.to_vec());
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v[0]["n"], 1);
    }

    #[test]
    fn config_is_checked() {
        let c = |s: &str| Webhook::new(Config::parse(s).unwrap()).err().unwrap();
        assert!(c(r#"{}"#).contains("`url` is required"));
        assert!(c(r#"{"url":"ftp://x"}"#).contains("http(s)"));
        assert!(c(r#"{"url":"http://x","mode":"all"}"#).contains("mode"));
        assert!(c(r#"{"url":"http://x","secret":"whsec_!!"}"#).contains("base64"));
    }
}
