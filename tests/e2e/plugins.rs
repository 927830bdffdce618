//! Plugins end to end, through the real gateway: uploads (and the ones refused), team
//! isolation, ingest-time pipelines with the shipped transforms and dead letters, hostile
//! transforms contained while other teams' traffic flows on, and destinations delivering
//! to a real HTTP receiver and to real NATS — with the address rules enforced.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{Gateway, Nats};
use rewind_gateway::plugins::fixtures;

fn wasm(package: &str) -> Vec<u8> {
    std::fs::read(fixtures::build(package)).unwrap()
}

async fn upload(
    gw: &Gateway,
    token: &str,
    name: &str,
    version: &str,
    bytes: Vec<u8>,
) -> (u16, Value) {
    let resp = gw
        .http
        .post(gw.url("/v1/plugins"))
        .query(&[("name", name), ("version", version)])
        .bearer_auth(token)
        .header("content-type", "application/wasm")
        .body(bytes)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn export(gw: &Gateway, token: &str, collection: &str) -> Vec<Value> {
    let text = gw
        .http
        .get(gw.url(&format!("/v1/collections/{collection}/export")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Polls a collection's search until it holds `n` events.
async fn searched(gw: &Gateway, token: &str, collection: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, v) = gw
            .call(
                Method::GET,
                &format!("/v1/collections/{collection}/events?limit=1000"),
                token,
                None,
            )
            .await;
        if s == 200 && v["events"].as_array().unwrap().len() == n {
            return v["events"].as_array().unwrap().clone();
        }
        assert!(
            Instant::now() < deadline,
            "{collection}: not {n} events in 20 s: {s} {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn uploads_are_validated_and_kept_to_their_team() {
    let gw = Gateway::start(&[]).await;
    let (admin, _) = gw.team_with_collection("acme", "orders").await;
    let (other, other_col) = gw.team_with_collection("globex", "orders").await;
    let hostile = wasm("hostile-transform");

    let (s, p) = upload(&gw, &admin, "hostile", "1.0.0", hostile.clone()).await;
    assert_eq!(s, 201, "{p}");
    assert_eq!(p["kind"], "transform");
    assert_eq!(p["ref"], "hostile@1.0.0");
    assert_eq!(p["sha256"].as_str().unwrap().len(), 64);
    // The same bytes again: the same plugin. Other bytes under the same version: refused.
    let (s, again) = upload(&gw, &admin, "hostile", "1.0.0", hostile.clone()).await;
    assert_eq!((s, &again["id"]), (200, &p["id"]));
    let (s, v) = upload(
        &gw,
        &admin,
        "hostile",
        "1.0.0",
        wasm("rewind-plugin-redact"),
    )
    .await;
    assert_eq!(s, 409, "{v}");
    let (s, v) = gw
        .call(Method::GET, "/v1/plugins/hostile@1.0.0", &admin, None)
        .await;
    assert_eq!((s, &v["id"]), (200, &p["id"]));

    // Bad uploads, each with its reason.
    let (s, v) = upload(&gw, &admin, "x", "1", b"#!/bin/sh\n".to_vec()).await;
    assert_eq!(s, 422, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not WebAssembly"),
        "{v}"
    );
    let (s, v) = upload(&gw, &admin, "x", "1", b"\0asm\x01\0\0\0".to_vec()).await;
    assert_eq!(s, 422);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("core WebAssembly module"),
        "{v}"
    );
    let (s, v) = upload(
        &gw,
        &admin,
        "x",
        "1",
        wat::parse_str("(component)").unwrap(),
    )
    .await;
    assert_eq!(s, 422);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not implement a Rewind world"),
        "{v}"
    );
    let (s, v) = upload(&gw, &admin, "x", "1", vec![0u8; 100 << 20]).await;
    assert_eq!(s, 413, "{v}");
    let (s, _) = upload(&gw, &admin, "bad name!", "1", hostile.clone()).await;
    assert_eq!(s, 400);
    let ingest_only = gw.token(&admin, &["ingest"]).await;
    let (s, _) = upload(&gw, &ingest_only, "y", "1", hostile.clone()).await;
    assert_eq!(s, 403);

    // Another team sees none of it and cannot use it.
    let (s, v) = gw.call(Method::GET, "/v1/plugins", &other, None).await;
    assert_eq!((s, v["plugins"].as_array().unwrap().len()), (200, 0));
    let (s, _) = gw
        .call(
            Method::GET,
            &format!("/v1/plugins/{}", p["id"].as_str().unwrap()),
            &other,
            None,
        )
        .await;
    assert_eq!(s, 404);
    let (s, v) = gw
        .call(
            Method::PUT,
            &format!("/v1/collections/{other_col}/pipeline"),
            &other,
            Some(json!({"steps": [{"plugin": p["id"]}]})),
        )
        .await;
    assert_eq!(s, 404, "team B must not reach team A's plugin: {v}");
    let (s, _) = gw
        .call(
            Method::DELETE,
            &format!("/v1/plugins/{}", p["id"].as_str().unwrap()),
            &other,
            None,
        )
        .await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn pipelines_transform_before_storage_and_dead_letter_failures() {
    let gw = Gateway::start(&["--archive-flush-secs", "1"]).await;
    let (admin, col) = gw.team_with_collection("acme", "users").await;
    let token = gw.token(&admin, &["ingest", "read"]).await;
    let (s, _) = upload(&gw, &admin, "redact", "1.0.0", wasm("rewind-plugin-redact")).await;
    assert_eq!(s, 201);
    let (s, _) = upload(&gw, &admin, "hostile", "1.0.0", wasm("hostile-transform")).await;
    assert_eq!(s, 201);
    // A config the plugin refuses is refused with its reason.
    let (s, v) = gw
        .call(
            Method::PUT,
            &format!("/v1/collections/{col}/pipeline"),
            &admin,
            Some(json!({"steps": [{"plugin": "redact@1.0.0", "config": {"paths": []}}]})),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at least one field"),
        "{v}"
    );
    let (s, v) = gw
        .call(
            Method::PUT,
            &format!("/v1/collections/{col}/pipeline"),
            &admin,
            Some(json!({"steps": [
                {"plugin": "redact@1.0.0", "config": {"paths": ["email"]}},
                {"plugin": "hostile@1.0.0", "config": {"mode": "fail"}},
            ]})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["steps"].as_array().unwrap().len(), 2);
    let body = [
        json!({"user": 1, "email": "a@example.com"}),
        json!({"user": 2, "email": "b@example.com", "note": "bad"}),
        json!({"user": 3}),
    ]
    .iter()
    .map(|v| format!("{v}\n"))
    .collect::<String>();
    let r = gw.send(&token, &col, "application/x-ndjson", body).await;
    assert_eq!(r.status(), 202);
    let ids: Vec<String> = r.json::<Value>().await.unwrap()["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();

    // The collection holds the redacted events, never the address.
    let events = searched(&gw, &token, &col, 2).await;
    for e in &events {
        assert_ne!(e["payload"]["email"], "a@example.com");
        assert!(!e.to_string().contains("@example.com"), "{e}");
    }
    let first = events.iter().find(|e| e["payload"]["user"] == 1).unwrap();
    assert_eq!(first["payload"]["email"], "[REDACTED]");
    assert_eq!(
        first["id"],
        ids[0].as_str(),
        "a transformed event keeps its id"
    );
    // The failed one is in the dead-letter collection, with plugin, reason and attempt,
    // searchable like any other.
    let dl = searched(&gw, &token, "users.dead-letter", 1).await;
    let letter = &dl[0]["payload"];
    assert_eq!(letter["event_id"], ids[1].as_str());
    assert_eq!(letter["plugin"], "hostile@1.0.0");
    assert_eq!(letter["reason"], format!("event {} is bad", ids[1]));
    assert_eq!(letter["attempt"], 1);
    assert_eq!(
        letter["payload"]["email"], "[REDACTED]",
        "dead letters hold what the failing step got"
    );
    // The archive agrees.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lines = export(&gw, &token, &col).await;
        if lines.len() == 2 {
            assert!(!lines.iter().any(|l| l.to_string().contains("@example.com")));
            break;
        }
        assert!(Instant::now() < deadline, "archive: {lines:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (s, v) = gw
        .call(
            Method::GET,
            &format!("/v1/collections/{col}/pipeline"),
            &token,
            None,
        )
        .await;
    assert_eq!(
        (s, v["steps"][0]["plugin"].as_str()),
        (200, Some("redact@1.0.0"))
    );
    // In use: the plugin cannot be deleted.
    let (s, v) = gw
        .call(Method::DELETE, "/v1/plugins/redact@1.0.0", &admin, None)
        .await;
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("pipeline of collection users"),
        "{v}"
    );
    // Removing the pipeline frees it.
    let (s, _) = gw
        .call(
            Method::PUT,
            &format!("/v1/collections/{col}/pipeline"),
            &admin,
            Some(json!({"steps": []})),
        )
        .await;
    assert_eq!(s, 200);
    let (s, _) = gw
        .call(Method::DELETE, "/v1/plugins/redact@1.0.0", &admin, None)
        .await;
    assert_eq!(s, 204);
}

#[tokio::test]
async fn hostile_transforms_are_contained_and_other_teams_flow_on() {
    let gw = Gateway::start(&[]).await;
    let (admin, col) = gw.team_with_collection("evil", "stream").await;
    let token = gw.token(&admin, &["ingest", "read"]).await;
    let (good_admin, good_col) = gw.team_with_collection("good", "orders").await;
    let good = gw.token(&good_admin, &["ingest", "read"]).await;
    let (s, _) = upload(&gw, &admin, "hostile", "1.0.0", wasm("hostile-transform")).await;
    assert_eq!(s, 201);

    for (mode, reason) in [
        ("loop", "CPU limit"),
        ("grow", "memory limit"),
        ("amplify", "16× the input"),
        ("trap", "trapped"),
        ("recurse", "out of bounds"),
    ] {
        let (s, v) = gw
            .call(
                Method::PUT,
                &format!("/v1/collections/{col}/pipeline"),
                &admin,
                // Only `loop` is about the CPU limit: the others get a generous one so the
                // limit under test is what stops them, however loaded the machine is.
                Some(
                    json!({"steps": [{"plugin": "hostile@1.0.0", "config": {"mode": mode},
                                       "cpu_ms": if mode == "loop" { 50 } else { 2000 }}]}),
                ),
            )
            .await;
        assert_eq!(s, 200, "{mode}: {v}");
        let payload =
            format!("{{\"mode\":\"{mode}\",\"pad\":\"{}\"}}\n", "x".repeat(2000)).repeat(3);
        let t = Instant::now();
        let r = gw.send(&token, &col, "application/x-ndjson", payload).await;
        assert_eq!(r.status(), 202, "{mode}: the request is answered");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{mode}: took {:?}",
            t.elapsed()
        );
        // Meanwhile another team's ingest is untouched.
        let r = gw
            .send(&good, &good_col, "application/json", r#"{"ok":true}"#)
            .await;
        assert_eq!(r.status(), 202);
        let (s, _) = gw.call(Method::GET, "/healthz", &good, None).await;
        assert_eq!(s, 200, "{mode}: the gateway stays healthy");
        let _ = reason;
    }
    // Every hostile event is a dead letter with the reason of its mode.
    let letters = searched(&gw, &token, "stream.dead-letter", 15).await;
    for (mode, reason) in [
        ("loop", "CPU limit of 50 ms"),
        ("grow", "memory limit of 32 MiB"),
        ("amplify", "16× the input"),
        ("trap", "trapped"),
        ("recurse", "out of bounds"),
    ] {
        let of_mode: Vec<&Value> = letters
            .iter()
            .filter(|l| l["payload"]["payload"]["mode"] == mode)
            .collect();
        assert_eq!(of_mode.len(), 3, "{mode}");
        for l in of_mode {
            let r = l["payload"]["reason"].as_str().unwrap();
            assert!(r.contains(reason), "{mode}: {r}");
        }
    }
    searched(&gw, &good, &good_col, 5).await;
    let (s, v) = gw.call(Method::GET, "/readyz", &good, None).await;
    assert_eq!(s, 200, "{v}");
}

/// A request the receiver saw: headers and body.
type Seen = (axum::http::HeaderMap, Vec<u8>);

/// A receiver that records requests and answers with the statuses it is given, in turn.
struct Receiver {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

async fn receiver(statuses: Vec<u16>) -> Receiver {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let statuses = Arc::new(Mutex::new(statuses.into_iter()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = {
        let seen = seen.clone();
        axum::Router::new().fallback(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let seen = seen.clone();
                let statuses = statuses.clone();
                async move {
                    seen.lock().unwrap().push((headers, body.to_vec()));
                    let status = statuses.lock().unwrap().next().unwrap_or(200);
                    axum::http::StatusCode::from_u16(status).unwrap()
                }
            },
        )
    };
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Receiver { port, seen }
}

#[tokio::test]
async fn webhook_destinations_deliver_signed_and_respect_the_address_rules() {
    // Loopback receivers need --allow-private-destinations; a second gateway without it
    // checks that the rules hold.
    let gw = Gateway::start(&["--allow-private-destinations"]).await;
    let (admin, _) = gw.team_with_collection("acme", "orders").await;
    let (s, v) = upload(
        &gw,
        &admin,
        "webhook",
        "1.0.0",
        wasm("rewind-plugin-http-webhook"),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["kind"], "destination");
    let rx = receiver(vec![200, 503, 400]).await;
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let (s, d) = gw
        .call(
            Method::POST,
            "/v1/destinations",
            &admin,
            Some(json!({
                "name": "crm",
                "plugin": "webhook@1.0.0",
                "config": {
                    "url": format!("http://127.0.0.1:{}/hook", rx.port),
                    "allow_hosts": ["127.0.0.1"],
                    "secret": secret,
                    "headers": {"x-team": "acme"},
                },
            })),
        )
        .await;
    assert_eq!(s, 201, "{d}");
    // A config the plugin refuses.
    let (s, v) = gw
        .call(
            Method::POST,
            "/v1/destinations",
            &admin,
            Some(
                json!({"name": "broken", "plugin": "webhook@1.0.0", "config": {"url": "ftp://x"}}),
            ),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("http(s)"),
        "{v}"
    );

    let (s, v) = gw
        .call(
            Method::POST,
            "/v1/destinations/crm/test",
            &admin,
            Some(json!({"events": [{"n": 1}, {"n": 2}, {"n": 3}]})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let results = v["results"].as_array().unwrap();
    assert_eq!(results[0]["result"], "delivered");
    assert_eq!(results[1]["result"], "retryable", "503 is retryable: {v}");
    assert_eq!(results[2]["result"], "permanent", "400 is permanent: {v}");
    let seen = rx.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    let (headers, body) = &seen[0];
    assert_eq!(body, br#"{"n":1}"#);
    assert_eq!(headers["x-team"], "acme");
    let id = headers["webhook-id"].to_str().unwrap();
    assert_eq!(headers["rewind-event-id"].to_str().unwrap(), id);
    let ts: u64 = headers["webhook-timestamp"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // The signature verifies with the secret (Standard Webhooks).
    use base64::Engine;
    use hmac::Mac;
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    assert_eq!(headers["webhook-signature"].to_str().unwrap(), expected);

    // Off the allow-list: refused before any connection.
    let (s, _) = gw
        .call(
            Method::POST,
            "/v1/destinations",
            &admin,
            Some(json!({"name": "elsewhere", "plugin": "webhook@1.0.0",
                        "config": {"url": format!("http://127.0.0.1:{}/", rx.port), "allow_hosts": ["api.example.com"]}})),
        )
        .await;
    assert_eq!(s, 201);
    let (_, v) = gw
        .call(
            Method::POST,
            "/v1/destinations/elsewhere/test",
            &admin,
            None,
        )
        .await;
    assert_eq!(v["results"][0]["result"], "permanent", "{v}");
    assert!(
        v["results"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("allow-list"),
        "{v}"
    );
    assert_eq!(rx.seen.lock().unwrap().len(), 3, "nothing was sent");

    // A gateway without --allow-private-destinations refuses loopback and metadata
    // addresses even when they are on the allow-list, and names that resolve to them.
    let strict = Gateway::start(&[]).await;
    let (admin, _) = strict.team_with_collection("acme", "orders").await;
    let (s, _) = upload(
        &strict,
        &admin,
        "webhook",
        "1.0.0",
        wasm("rewind-plugin-http-webhook"),
    )
    .await;
    assert_eq!(s, 201);
    for (name, url, host, why) in [
        (
            "loopback",
            format!("http://127.0.0.1:{}/", rx.port),
            "127.0.0.1",
            "loopback",
        ),
        (
            "metadata",
            "http://169.254.169.254/latest/meta-data/".to_string(),
            "169.254.169.254",
            "metadata",
        ),
        (
            "named",
            format!("http://localhost:{}/", rx.port),
            "localhost",
            "loopback",
        ),
        (
            "mapped",
            format!("http://[::ffff:127.0.0.1]:{}/", rx.port),
            "::ffff:127.0.0.1",
            "IPv4-mapped",
        ),
    ] {
        let (s, v) = strict
            .call(
                Method::POST,
                "/v1/destinations",
                &admin,
                Some(json!({"name": name, "plugin": "webhook@1.0.0", "config": {"url": url, "allow_hosts": [host]}})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        let (_, v) = strict
            .call(
                Method::POST,
                &format!("/v1/destinations/{name}/test"),
                &admin,
                None,
            )
            .await;
        assert_eq!(v["results"][0]["result"], "permanent", "{name}: {v}");
        assert!(
            v["results"][0]["reason"].as_str().unwrap().contains(why),
            "{name}: {v}"
        );
    }
    assert_eq!(
        rx.seen.lock().unwrap().len(),
        3,
        "nothing reached the receiver"
    );
}

#[tokio::test]
async fn nats_destinations_publish_to_their_subject_only() {
    let nats = Nats::start();
    let gw = Gateway::start(&["--bus", &nats.url()]).await;
    let (admin, _) = gw.team_with_collection("acme", "orders").await;
    let (s, _) = upload(
        &gw,
        &admin,
        "nats",
        "1.0.0",
        wasm("rewind-plugin-nats-publish"),
    )
    .await;
    assert_eq!(s, 201);
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut sub = client.subscribe("replayed.orders").await.unwrap();
    client.flush().await.unwrap();
    let (s, v) = gw
        .call(
            Method::POST,
            "/v1/destinations",
            &admin,
            Some(json!({"name": "bus", "plugin": "nats@1.0.0", "config": {"subject": "replayed.orders"}})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = gw
        .call(
            Method::POST,
            "/v1/destinations/bus/test",
            &admin,
            Some(json!({"events": [{"n": 7}]})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["results"][0]["result"], "delivered", "{v}");
    let msg = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut sub))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&msg.payload[..], br#"{"n":7}"#);
    let headers = msg.headers.unwrap();
    let id = v["results"][0]["id"].as_str().unwrap();
    assert_eq!(headers.get("Nats-Msg-Id").unwrap().as_str(), id);
    assert_eq!(headers.get("rewind-event-id").unwrap().as_str(), id);
    // A wildcard subject in the config is refused by the plugin.
    let (s, v) = gw
        .call(
            Method::POST,
            "/v1/destinations",
            &admin,
            Some(
                json!({"name": "wild", "plugin": "nats@1.0.0", "config": {"subject": "rewind.>"}}),
            ),
        )
        .await;
    assert_eq!(s, 400, "{v}");
}

#[tokio::test]
async fn webhook_ingress_verifies_senders_and_stores_events() {
    let gw = Gateway::start(&[]).await;
    let (admin, col) = gw.team_with_collection("acme", "github").await;
    let token = gw.token(&admin, &["read"]).await;
    let (s, _) = upload(
        &gw,
        &admin,
        "github",
        "1.0.0",
        wasm("rewind-plugin-github-webhook"),
    )
    .await;
    assert_eq!(s, 201);
    let (s, _) = upload(
        &gw,
        &admin,
        "ce",
        "1.0.0",
        wasm("rewind-plugin-cloudevents"),
    )
    .await;
    assert_eq!(s, 201);
    // An ingress plugin needs its config.
    let (s, v) = gw
        .call(
            Method::POST,
            "/v1/hooks",
            &admin,
            Some(json!({"name": "gh", "plugin": "github@1.0.0", "collection": "github"})),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    let (s, hook) = gw
        .call(
            Method::POST,
            "/v1/hooks",
            &admin,
            Some(
                json!({"name": "gh", "plugin": "github@1.0.0", "collection": "github",
                        "config": {"secret": "It's a Secret to Everybody"}}),
            ),
        )
        .await;
    assert_eq!(s, 201, "{hook}");
    let url = gw.url(hook["url"].as_str().unwrap());
    let body = r#"{"action":"opened","number":7}"#;
    use hmac::Mac;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(b"It's a Secret to Everybody").unwrap();
    mac.update(body.as_bytes());
    let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    // No token needed; the signature is what counts.
    let r = gw
        .http
        .post(&url)
        .header("x-hub-signature-256", &sig)
        .header("x-github-event", "pull_request")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let r = gw
        .http
        .post(&url)
        .header("x-hub-signature-256", "sha256=00")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("X-Hub-Signature-256"),
        "{v}"
    );
    let r = gw
        .http
        .post(gw.url("/v1/hooks/hk_00000000000000000000000000000000"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let events = searched(&gw, &token, &col, 1).await;
    assert_eq!(events[0]["payload"]["number"], 7);

    // CloudEvents, batched mode, into another collection.
    let (s, _) = gw
        .call(
            Method::POST,
            "/v1/collections",
            &admin,
            Some(json!({"name": "ce"})),
        )
        .await;
    assert_eq!(s, 201);
    let (s, hook) = gw
        .call(
            Method::POST,
            "/v1/hooks",
            &admin,
            Some(json!({"name": "ce", "plugin": "ce@1.0.0", "collection": "ce"})),
        )
        .await;
    assert_eq!(s, 201, "{hook}");
    let url = gw.url(hook["url"].as_str().unwrap());
    let batch = json!([
        {"specversion": "1.0", "id": "a", "source": "/shop", "type": "order.created", "data": {"n": 1}},
        {"specversion": "1.0", "id": "b", "source": "/shop", "type": "order.paid", "data": {"n": 2}},
    ]);
    let r = gw
        .http
        .post(&url)
        .header("content-type", "application/cloudevents-batch+json")
        .body(batch.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let bad = json!([{"specversion": "1.0", "id": "c", "source": "/shop"}]);
    let r = gw
        .http
        .post(&url)
        .header("content-type", "application/cloudevents-batch+json")
        .body(bad.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let (s, v) = gw
        .call(
            Method::GET,
            "/v1/collections/ce/events?filter=type%20%3D%20order.paid",
            &token,
            None,
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut v = v;
    while v["events"].as_array().is_none_or(|e| e.is_empty()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        v = gw
            .call(
                Method::GET,
                "/v1/collections/ce/events?filter=type%20%3D%20order.paid",
                &token,
                None,
            )
            .await
            .1;
    }
    assert_eq!(s, 200);
    assert_eq!(v["events"][0]["payload"]["data"]["n"], 2, "{v}");
    // The plugin is in use by the hooks.
    let (s, _) = gw
        .call(Method::DELETE, "/v1/plugins/ce@1.0.0", &admin, None)
        .await;
    assert_eq!(s, 409);
}

/// The tutorial's path, with the CLI: `rewind plugin new` → `build` → `push`, then a
/// destination of it delivers to a real receiver.
#[tokio::test]
async fn a_plugin_from_the_template_builds_uploads_and_delivers() {
    let gw = Gateway::start(&["--allow-private-destinations"]).await;
    let (admin, _) = gw.team_with_collection("acme", "orders").await;
    let work = tempfile::tempdir().unwrap();
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target"))
        })
        .join("plugins");
    let rewind = |args: &[&str], dir: &std::path::Path| {
        let out = std::process::Command::new(crate::support::rewind_bin())
            .args(args)
            .current_dir(dir)
            .env("REWIND_URL", gw.url(""))
            .env("REWIND_TOKEN", &admin)
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rewind {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    rewind(
        &["plugin", "new", "my-webhook", "--kind", "destination"],
        work.path(),
    );
    let dir = work.path().join("my-webhook");
    let built = rewind(&["plugin", "build"], &dir);
    assert!(built.trim().ends_with("my_webhook.wasm"), "{built}");
    let pushed = rewind(
        &[
            "plugin",
            "push",
            "--name",
            "my-webhook",
            "--version",
            "0.1.0",
        ],
        &dir,
    );
    let pushed: Value = serde_json::from_str(&pushed).unwrap();
    assert_eq!(pushed["kind"], "destination");
    // The ingress template (HTTP requests and bus messages) builds and uploads as well.
    rewind(
        &["plugin", "new", "my-adapter", "--kind", "ingress"],
        work.path(),
    );
    let adapter = work.path().join("my-adapter");
    rewind(&["plugin", "build"], &adapter);
    let pushed = rewind(
        &[
            "plugin",
            "push",
            "--name",
            "my-adapter",
            "--version",
            "0.1.0",
        ],
        &adapter,
    );
    let pushed: Value = serde_json::from_str(&pushed).unwrap();
    assert_eq!(pushed["kind"], "ingress");

    let rx = receiver(vec![]).await;
    let (s, v) = gw
        .call(
            Method::POST,
            "/v1/destinations",
            &admin,
            Some(json!({"name": "mine", "plugin": "my-webhook@0.1.0",
                        "config": {"url": format!("http://127.0.0.1:{}/in", rx.port), "allow_hosts": ["127.0.0.1"]}})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (_, v) = gw
        .call(
            Method::POST,
            "/v1/destinations/mine/test",
            &admin,
            Some(json!({"events": [{"hello": "world"}]})),
        )
        .await;
    assert_eq!(v["delivered"], 1, "{v}");
    assert_eq!(rx.seen.lock().unwrap()[0].1, br#"{"hello":"world"}"#);
}

#[tokio::test]
async fn rename_and_filter_plugins_shape_a_collection() {
    let gw = Gateway::start(&[]).await;
    let (admin, col) = gw.team_with_collection("acme", "clicks").await;
    let token = gw.token(&admin, &["ingest", "read"]).await;
    for (name, package) in [
        ("rename", "rewind-plugin-rename"),
        ("filter", "rewind-plugin-filter"),
    ] {
        let (s, v) = upload(&gw, &admin, name, "1.0.0", wasm(package)).await;
        assert_eq!((s, v["kind"].as_str()), (201, Some("transform")), "{v}");
    }
    let (s, v) = gw
        .call(
            Method::PUT,
            &format!("/v1/collections/{col}/pipeline"),
            &admin,
            Some(json!({"steps": [
                {"plugin": "rename@1.0.0", "config": {"fields": {"uid": "user.id"}}},
                {"plugin": "filter@1.0.0", "config": {"filter": "type != heartbeat"}},
            ]})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let body = "{\"type\":\"click\",\"uid\":1}\n{\"type\":\"heartbeat\",\"uid\":2}\n{\"type\":\"click\",\"uid\":3}\n";
    let r = gw.send(&token, &col, "application/x-ndjson", body).await;
    assert_eq!(r.status(), 202);
    let events = searched(&gw, &token, &col, 2).await;
    for e in &events {
        assert_eq!(e["payload"]["type"], "click");
        assert!(e["payload"]["user"]["id"].is_number(), "{e}");
        assert!(e["payload"].get("uid").is_none(), "{e}");
    }
    // A filter that does not parse is refused when the pipeline is set, with its column.
    let (s, v) = gw
        .call(
            Method::PUT,
            &format!("/v1/collections/{col}/pipeline"),
            &admin,
            Some(json!({"steps": [{"plugin": "filter@1.0.0", "config": {"filter": "type ="}}]})),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("column"),
        "{v}"
    );
}

/// Bad input to the plugin APIs: each answered with a 4xx that says what is wrong.
#[tokio::test]
async fn bad_plugin_api_input_is_refused_with_reasons() {
    let gw = Gateway::start(&[]).await;
    let (admin, col) = gw.team_with_collection("acme", "orders").await;
    let (s, _) = upload(&gw, &admin, "hostile", "1.0.0", wasm("hostile-transform")).await;
    assert_eq!(s, 201);
    let (s, _) = upload(
        &gw,
        &admin,
        "webhook",
        "1.0.0",
        wasm("rewind-plugin-http-webhook"),
    )
    .await;
    assert_eq!(s, 201);
    let pipeline = format!("/v1/collections/{col}/pipeline");
    let msg = |v: &Value| {
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };

    // A destination plugin in a pipeline, a config that is not an object, an unknown key,
    // an unknown plugin.
    let (s, v) = gw
        .call(
            Method::PUT,
            &pipeline,
            &admin,
            Some(json!({"steps": [{"plugin": "webhook@1.0.0", "config": {"url": "http://x"}}]})),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(msg(&v).contains("must be transforms"), "{v}");
    let (s, v) = gw
        .call(
            Method::PUT,
            &pipeline,
            &admin,
            Some(json!({"steps": [{"plugin": "hostile@1.0.0", "config": [1]}]})),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(msg(&v).contains("config must be a JSON object"), "{v}");
    let (s, _) = gw
        .call(
            Method::PUT,
            &pipeline,
            &admin,
            Some(json!({"steps": [{"plugin": "hostile@1.0.0", "cpu": 5}]})),
        )
        .await;
    assert_eq!(s, 400);
    let (s, _) = gw
        .call(
            Method::PUT,
            &pipeline,
            &admin,
            Some(json!({"steps": [{"plugin": "nope@1.0.0"}]})),
        )
        .await;
    assert_eq!(s, 404);

    // Destinations and hooks need plugins of their kind.
    let (s, v) = gw
        .call(
            Method::POST,
            "/v1/destinations",
            &admin,
            Some(json!({"name": "d", "plugin": "hostile@1.0.0"})),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(msg(&v).contains("needs a destination plugin"), "{v}");
    let (s, v) = gw
        .call(
            Method::POST,
            "/v1/hooks",
            &admin,
            Some(json!({"name": "h", "plugin": "hostile@1.0.0", "collection": "orders"})),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(msg(&v).contains("needs an ingress plugin"), "{v}");

    // The test endpoint: malformed JSON, too many events.
    let (s, _) = gw
        .call(
            Method::POST,
            "/v1/destinations",
            &admin,
            Some(json!({"name": "crm", "plugin": "webhook@1.0.0", "config": {"url": "https://crm.example.com/"}})),
        )
        .await;
    assert_eq!(s, 201);
    let r = gw
        .http
        .post(gw.url("/v1/destinations/crm/test"))
        .bearer_auth(&admin)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(msg(&v).contains("invalid JSON body"), "{v}");
    let many: Vec<Value> = (0..101).map(|i| json!({"n": i})).collect();
    let (s, v) = gw
        .call(
            Method::POST,
            "/v1/destinations/crm/test",
            &admin,
            Some(json!({"events": many})),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(msg(&v).contains("at most 100"), "{v}");
}
