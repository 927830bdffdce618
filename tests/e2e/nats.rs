//! The NATS JetStream bus against real nats-server processes the tests start and stop.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::durability::sustained_load;
use crate::support::{Gateway, Nats, free_port};

async fn ready(gw: &Gateway) -> (u16, Value) {
    let resp = gw.http.get(gw.url("/readyz")).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test]
async fn nats_down_at_start_means_not_ready_and_503_until_it_comes_up() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let gw = Gateway::start(&["--bus", &url]).await;
    let (s, body) = ready(&gw).await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(body["backends"]["bus"]["ready"], false);
    assert!(
        body["backends"]["bus"]["detail"]
            .as_str()
            .unwrap()
            .contains("cannot connect to NATS"),
        "{body}"
    );
    assert!(gw.log().contains("NATS"), "the log says why: {}", gw.log());

    let (admin, col) = gw.team_with_collection("acme", "orders").await;
    let tok = gw.token(&admin, &["ingest"]).await;
    let resp = gw.send(&tok, &col, "application/json", "{}").await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"].as_str().unwrap().contains("retry"),
        "{body}"
    );

    // NATS comes up: the gateway connects by itself.
    let _nats = Nats::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(20);
    while ready(&gw).await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "gateway did not become ready after NATS started"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        gw.send(&tok, &col, "application/json", "{}").await.status(),
        202
    );
}

#[tokio::test]
async fn nats_restart_mid_load_loses_nothing_acknowledged() {
    let mut nats = Nats::start();
    let gw = Gateway::start(&["--bus", &nats.url(), "--id-field", "event_id"]).await;
    let (admin, col) = gw.team_with_collection("acme", "orders").await;
    let tok = gw.token(&admin, &["ingest"]).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn(sustained_load(
        gw.url(""),
        tok.clone(),
        col.clone(),
        4,
        50,
        true,
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nats.stop();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // While NATS is down the gateway says so.
    let (s, _) = ready(&gw).await;
    assert_eq!(s, 503);
    nats.restart();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = load.await.unwrap();
    assert!(acked.len() > 500, "{} acked", acked.len());
    let (s, body) = ready(&gw).await;
    assert_eq!(s, 200, "{body}");

    // Read the stream back through a durable consumer: every acknowledged id is there.
    let on_bus: HashSet<String> = gw.bus_ids(&["--consumer", "verify"]).into_iter().collect();
    let missing = acked.iter().filter(|id| !on_bus.contains(*id)).count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} acknowledged events missing after a NATS restart",
        acked.len()
    );
}

#[tokio::test]
async fn nats_bus_publishes_per_collection_subjects_and_dedupes_retries() {
    let nats = Nats::start();
    let gw = Gateway::start(&["--bus", &nats.url()]).await;
    let (admin, col) = gw.team_with_collection("acme", "orders").await;
    let tok = gw.token(&admin, &["ingest"]).await;
    let (s, body) = ready(&gw).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["backends"]["bus"]["kind"], "nats");
    for _ in 0..3 {
        let resp = gw
            .http
            .post(gw.url(&format!("/v1/collections/{col}/events")))
            .bearer_auth(&tok)
            .header("content-type", "application/json")
            .header("idempotency-key", "k1")
            .body("{\"a\":1}")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
    }
    // A batch bigger than NATS's default max_payload (1 MiB) is split and stored whole.
    let big: String = (0..3000)
        .map(|i| crate::support::event_of_size(i, 1000) + "\n")
        .collect();
    let resp = gw.send(&tok, &col, "application/x-ndjson", big).await;
    assert_eq!(resp.status(), 202);
    let lines = crate::support::bus_read(&gw.data_dir, &gw.args, &["--consumer", "check"]);
    assert_eq!(lines.len(), 3001);
    let team = lines[0]["team"].as_str().unwrap();
    assert!(team.starts_with("tm_"));
    assert_eq!(lines[0]["collection"], col.as_str());
    // The subject carries team and collection.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("REWIND_EVENTS").await.unwrap();
    let info = stream.info().await.unwrap();
    assert!(info.state.messages >= 2);
    let msg = stream
        .get_last_raw_message_by_subject(&format!("rewind.events.{team}.{col}"))
        .await
        .unwrap();
    assert!(msg.sequence >= 2);
}

#[tokio::test]
async fn a_full_inflight_budget_turns_requests_away_with_503_instead_of_queueing_memory() {
    let mut nats = Nats::start();
    let gw = Gateway::start(&[
        "--bus",
        &nats.url(),
        "--max-event-bytes",
        "1048576",
        "--max-request-bytes",
        "1048576",
        "--max-inflight-bytes",
        "1048576",
    ])
    .await;
    let (admin, col) = gw.team_with_collection("acme", "orders").await;
    let tok = gw.token(&admin, &["ingest"]).await;
    // With the bus gone, admitted requests hold their room while they wait for an ack.
    nats.stop();
    let body: String = (0..600)
        .map(|i| format!("{{\"i\":{i},\"pad\":\"{}\"}}\n", "x".repeat(1000)))
        .collect();
    let sends: Vec<_> = (0..4)
        .map(|_| {
            let (http, url, tok, body) = (
                gw.http.clone(),
                gw.url(&format!("/v1/collections/{col}/events")),
                tok.clone(),
                body.clone(),
            );
            tokio::spawn(async move {
                let resp = http
                    .post(url)
                    .bearer_auth(tok)
                    .header("content-type", "application/x-ndjson")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                let retry_after = resp.headers().get("retry-after").is_some();
                let v: Value = resp.json().await.unwrap();
                (status, retry_after, v)
            })
        })
        .collect();
    let mut overloaded = 0;
    for s in sends {
        let (status, retry_after, v) = s.await.unwrap();
        assert_eq!(status, 503, "{v}");
        assert!(retry_after, "{v}");
        if v["error"]["code"] == "overloaded" {
            overloaded += 1;
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("in flight"),
                "{v}"
            );
        }
    }
    assert!(overloaded >= 1, "no request was turned away for the budget");
    let metrics = gw
        .http
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("rewind_ingest_overloaded_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
    // The budget is given back: with the bus back, the same request is accepted.
    nats.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let resp = gw
            .send(&tok, &col, "application/x-ndjson", body.clone())
            .await;
        if resp.status() == 202 {
            break;
        }
        assert!(Instant::now() < deadline, "still {}", resp.status());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The archiver and the indexer pull from JetStream over the gateway's one connection. A pull
/// that asks for more than the server will queue for a client (`max_pending`) gets the
/// gateway dropped as a "slow consumer" — and with it every publish ack in flight, so clients
/// see 503s. With a backlog of ~500 KiB messages, the client library's default pull (200
/// messages) asks for ~100 MB; the gateway bounds its pulls by bytes.
#[tokio::test]
async fn draining_a_large_backlog_does_not_get_the_gateway_dropped_as_a_slow_consumer() {
    use prost::Message;
    let nats = Nats::start_with_config("max_pending: 40MB\n");
    let mut gw = Gateway::start(&["--bus", &nats.url(), "--archive-flush-secs", "1"]).await;
    let (admin, col) = gw.team_with_collection("acme", "orders").await;
    let tok = gw.token(&admin, &["ingest", "read"]).await;
    let resp = gw
        .send(&tok, &col, "application/json", "{\"first\":true}")
        .await;
    assert_eq!(resp.status(), 202);
    gw.terminate();
    // The backlog, published while the gateway is down: 160 messages of 500 events of ~1 KiB
    // (~80 MB, twice the server's max_pending for one client).
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let lines = crate::support::bus_read(&gw.data_dir, &gw.args, &["--consumer", "peek"]);
    let team = lines[0]["team"].as_str().unwrap().to_string();
    let subject = format!("rewind.events.{team}.{col}");
    let mut expected = 1;
    for m in 0..160 {
        let batch = rewind_gateway::bus::BusBatch {
            team_id: team.clone(),
            collection_id: col.clone(),
            events: (0..500)
                .map(|i| rewind_gateway::bus::Event {
                    id: ulid::Ulid::new().to_string(),
                    received_at_micros: rewind_gateway::ids::now_micros(),
                    payload: crate::support::event_of_size(m * 500 + i, 1000).into(),
                    content_type: "application/json".into(),
                    ..Default::default()
                })
                .collect(),
        };
        expected += batch.events.len();
        js.publish(subject.clone(), batch.encode_to_vec().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    gw.restart().await;
    let archived = crate::archive::wait_for_export(&gw, &tok, &col, expected, 120).await;
    assert_eq!(archived.len(), expected);
    // A live tail (an ordered consumer, its pulls bounded by count) follows new events.
    let resp = gw
        .http
        .get(gw.url(&format!("/v1/collections/{col}/tail")))
        .bearer_auth(&tok)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let body: String = (0..3).map(|i| format!("{{\"tail\":{i}}}\n")).collect();
    let resp_send = gw.send(&tok, &col, "application/x-ndjson", body).await;
    assert_eq!(resp_send.status(), 202);
    let mut stream = resp.bytes_stream();
    let mut lines = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    use futures::StreamExt;
    while lines.lines().count() < 3 {
        let chunk = tokio::time::timeout_at(deadline.into(), stream.next())
            .await
            .expect("the tail delivered too little")
            .unwrap()
            .unwrap();
        lines.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    for (i, line) in lines.lines().enumerate() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["payload"]["tail"], i, "{line}");
    }
    let log = nats.log();
    assert!(
        !log.contains("Slow Consumer"),
        "the server dropped the gateway as a slow consumer:\n{log}"
    );
}
