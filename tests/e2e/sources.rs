//! Sources end to end: a team's own NATS server (a real nats-server started by the test)
//! subscribed through the `cloudevents` ingress plugin into a collection; rejected messages
//! counted; the subscription survives a restart of the NATS server; another team sees none
//! of it; bad inputs and private addresses refused.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::archive::{export as export_query, wait_for_export};
use crate::support::{Gateway, Nats};
use rewind_gateway::plugins::fixtures;

async fn upload(gw: &Gateway, token: &str, name: &str, package: &str) {
    let resp = gw
        .http
        .post(gw.url("/v1/plugins"))
        .query(&[("name", name), ("version", "1.0.0")])
        .bearer_auth(token)
        .header("content-type", "application/wasm")
        .body(std::fs::read(fixtures::build(package)).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
}

/// Polls a source until its status satisfies `ok`.
async fn status_until(gw: &Gateway, admin: &str, name: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, v) = gw
            .call(Method::GET, &format!("/v1/sources/{name}"), admin, None)
            .await;
        assert_eq!(s, 200, "{v}");
        if ok(&v["status"]) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "source status never got there: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ce(id: &str, ty: &str) -> String {
    json!({"specversion": "1.0", "id": id, "source": "/shop", "type": ty, "data": {"id": id}})
        .to_string()
}

#[tokio::test]
async fn a_source_turns_nats_messages_into_events_of_its_collection() {
    let mut nats = Nats::start();
    let gw = Gateway::start(&["--allow-private-destinations", "--archive-flush-secs", "1"]).await;
    let (admin, _) = gw.team_with_collection("acme", "orders").await;
    let reader = gw.token(&admin, &["read"]).await;
    upload(&gw, &admin, "ce", "rewind-plugin-cloudevents").await;
    upload(&gw, &admin, "redact", "rewind-plugin-redact").await;

    let source = json!({"name": "shop-bus", "plugin": "ce@1.0.0", "collection": "orders",
                        "url": nats.url(), "subject": "shop.orders.>"});
    // Bad inputs, each with its reason.
    for (patch, status, needle) in [
        (
            json!({"subject": "shop..orders"}),
            400,
            "not a NATS subject",
        ),
        (json!({"subject": "shop.>.x"}), 400, "not a NATS subject"),
        (json!({"url": "http://127.0.0.1:4222"}), 400, "nats://"),
        (
            json!({"plugin": "redact@1.0.0", "config": {"paths": ["a"]}}),
            400,
            "needs an ingress plugin",
        ),
        (json!({"plugin": "nope@1.0.0"}), 404, "nope"),
        (json!({"collection": "nope"}), 404, "nope"),
        (json!({"config": []}), 400, "JSON object"),
        (json!({"name": "a b"}), 400, "source names"),
        (json!({"extra": 1}), 400, "extra"),
    ] {
        let mut body = source.clone();
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (s, v) = gw
            .call(Method::POST, "/v1/sources", &admin, Some(body))
            .await;
        assert_eq!(s, status, "{patch}: {v}");
        assert!(v.to_string().contains(needle), "{patch}: {v}");
    }

    let (s, created) = gw
        .call(Method::POST, "/v1/sources", &admin, Some(source.clone()))
        .await;
    assert_eq!(s, 201, "{created}");
    assert_eq!(created["plugin"], "ce@1.0.0");
    assert_eq!(created["collection"], "orders");
    let (s, v) = gw
        .call(Method::POST, "/v1/sources", &admin, Some(source.clone()))
        .await;
    assert_eq!(s, 409, "{v}");
    status_until(&gw, &admin, "shop-bus", |st| st["state"] == "subscribed").await;

    // Structured and binary mode, a message the plugin rejects, one outside the subject.
    let client = async_nats::connect(nats.url()).await.unwrap();
    for i in 0..3 {
        client
            .publish(
                "shop.orders.created",
                ce(&format!("s{i}"), "order.created").into(),
            )
            .await
            .unwrap();
    }
    let mut headers = async_nats::HeaderMap::new();
    for (k, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "b1"),
        ("ce-source", "/pos"),
        ("ce-type", "order.paid"),
        ("content-type", "application/json"),
    ] {
        headers.insert(k, v);
    }
    client
        .publish_with_headers("shop.orders.paid", headers, r#"{"total": 12.5}"#.into())
        .await
        .unwrap();
    client
        .publish(
            "shop.orders.created",
            r#"{"specversion":"1.0","id":"x"}"#.into(),
        )
        .await
        .unwrap();
    client
        .publish(
            "shop.returns.created",
            ce("elsewhere", "return.created").into(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();

    let events = wait_for_export(&gw, &reader, "orders", 4, 30).await;
    assert_eq!(events.len(), 4, "{events:?}");
    let mut ids: Vec<String> = events
        .iter()
        .map(|e| e["payload"]["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, ["b1", "s0", "s1", "s2"]);
    let paid = events.iter().find(|e| e["payload"]["id"] == "b1").unwrap();
    assert_eq!(paid["payload"]["data"]["total"], 12.5);
    assert_eq!(paid["payload"]["type"], "order.paid");
    let v = status_until(&gw, &admin, "shop-bus", |st| st["rejected"] == 1).await;
    assert_eq!(v["status"]["messages"], 5, "{v}");
    assert_eq!(v["status"]["events"], 4, "{v}");
    assert!(
        v["status"]["last_error"]
            .as_str()
            .unwrap()
            .contains("has no `source`"),
        "{v}"
    );

    // The NATS server restarts: the subscription comes back by itself.
    nats.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    while export_query(&gw, &reader, "orders", "").await.len() < 5 {
        assert!(Instant::now() < deadline, "no event after the NATS restart");
        if let Ok(c) = async_nats::connect(nats.url()).await {
            n += 1;
            c.publish(
                "shop.orders.created",
                ce(&format!("r{n}"), "order.created").into(),
            )
            .await
            .unwrap();
            c.flush().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Another team sees nothing of it and cannot touch it.
    let (other, _) = gw.team_with_collection("globex", "orders").await;
    let (s, v) = gw.call(Method::GET, "/v1/sources", &other, None).await;
    assert_eq!((s, v["sources"].as_array().unwrap().len()), (200, 0));
    for method in [Method::GET, Method::DELETE] {
        let (s, _) = gw.call(method, "/v1/sources/shop-bus", &other, None).await;
        assert_eq!(s, 404);
        let (s, _) = gw
            .call(
                Method::GET,
                &format!("/v1/sources/{}", created["id"].as_str().unwrap()),
                &other,
                None,
            )
            .await;
        assert_eq!(s, 404);
    }
    let (s, _) = gw
        .call(Method::POST, "/v1/sources", &other, Some(source.clone()))
        .await;
    assert_eq!(s, 404, "team A's plugin is not team B's");
    // Read tokens cannot manage sources.
    let (s, _) = gw.call(Method::GET, "/v1/sources", &reader, None).await;
    assert_eq!(s, 403);

    // The plugin is in use; deleting the source stops the subscription.
    let (s, v) = gw
        .call(Method::DELETE, "/v1/plugins/ce@1.0.0", &admin, None)
        .await;
    assert_eq!(s, 409, "{v}");
    assert!(v.to_string().contains("source shop-bus"), "{v}");
    let (s, _) = gw
        .call(Method::DELETE, "/v1/sources/shop-bus", &admin, None)
        .await;
    assert_eq!(s, 204);
    let c = async_nats::connect(nats.url()).await.unwrap();
    c.publish("shop.orders.created", ce("late", "order.created").into())
        .await
        .unwrap();
    c.flush().await.unwrap();
    // Well past the archive's 1 s flush: whatever was ingested is exported by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let events = export_query(&gw, &reader, "orders", "").await;
    assert!(events.len() >= 5);
    assert!(
        events.iter().all(|e| e["payload"]["id"] != "late"),
        "a deleted source ingested a message"
    );
    let (s, _) = gw
        .call(Method::DELETE, "/v1/plugins/ce@1.0.0", &admin, None)
        .await;
    assert_eq!(s, 204);
}

#[tokio::test]
async fn sources_may_not_reach_private_addresses_unless_the_operator_allows_it() {
    let gw = Gateway::start(&[]).await;
    let (admin, _) = gw.team_with_collection("acme", "orders").await;
    upload(&gw, &admin, "ce", "rewind-plugin-cloudevents").await;
    for url in [
        "nats://127.0.0.1:4222",
        "nats://169.254.169.254:4222",
        "nats://10.0.0.8",
        "nats://[::1]:4222",
        "nats://localhost:4222",
    ] {
        let (s, v) = gw
            .call(
                Method::POST,
                "/v1/sources",
                &admin,
                Some(
                    json!({"name": "s", "plugin": "ce@1.0.0", "collection": "orders",
                            "url": url, "subject": "a.>"}),
                ),
            )
            .await;
        assert_eq!(s, 400, "{url}: {v}");
        assert!(
            v.to_string().contains("--allow-private-destinations"),
            "{url}: {v}"
        );
    }
}
