//! Replays end to end: the real gateway reads its archive and delivers through the shipped
//! destination plugins to an HTTP receiver started here and to a real NATS server — exact
//! counts and order, filters, retries, dead letters and the failure threshold, pause /
//! resume / cancel, pacing, kill -9 and resume, team quotas, the CLI's `--wait`, gRPC Watch
//! and Stream, backfilling another collection, and bad input.

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{Gateway, Nats, rewind_bin};
use rewind_gateway::plugins::fixtures;

/// One request the receiver saw.
#[derive(Clone, Debug)]
struct Hit {
    event_id: String,
    replay_id: String,
    body: Vec<u8>,
    at: Instant,
    status: u16,
}

/// An HTTP receiver that answers each request with what `answer(body)` says.
struct Receiver {
    port: u16,
    hits: Arc<Mutex<Vec<Hit>>>,
}

impl Receiver {
    async fn start(answer: impl Fn(&[u8]) -> u16 + Send + Sync + 'static) -> Receiver {
        let hits = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(answer);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = {
            let hits = hits.clone();
            axum::Router::new().fallback(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let (hits, answer) = (hits.clone(), answer.clone());
                    async move {
                        let status = answer(&body);
                        let h = |k: &str| {
                            headers
                                .get(k)
                                .map(|v| v.to_str().unwrap().to_string())
                                .unwrap_or_default()
                        };
                        hits.lock().unwrap().push(Hit {
                            event_id: h("rewind-event-id"),
                            replay_id: h("rewind-replay-id"),
                            body: body.to_vec(),
                            at: Instant::now(),
                            status,
                        });
                        axum::http::StatusCode::from_u16(status).unwrap()
                    }
                },
            )
        };
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { port, hits }
    }

    fn delivered(&self) -> Vec<Hit> {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.status < 300)
            .cloned()
            .collect()
    }
}

/// A gateway that archives within a second and may reach loopback receivers.
async fn gateway(extra: &[&str]) -> Gateway {
    let mut args = vec!["--allow-private-destinations", "--archive-flush-secs", "1"];
    args.extend_from_slice(extra);
    Gateway::start(&args).await
}

/// Uploads a plugin built from `package` as `name@1.0.0`.
async fn upload(gw: &Gateway, admin: &str, name: &str, package: &str) {
    let resp = gw
        .http
        .post(gw.url("/v1/plugins"))
        .query(&[("name", name), ("version", "1.0.0")])
        .bearer_auth(admin)
        .body(std::fs::read(fixtures::build(package)).unwrap())
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
}

/// A team with collection `orders`, the webhook plugin and a destination `hook` pointing at
/// the receiver. Returns (admin token, replay token, collection id).
async fn setup(gw: &Gateway, team: &str, rx: &Receiver) -> (String, String, String) {
    let (admin, col) = gw.team_with_collection(team, "orders").await;
    let replay = gw.token(&admin, &["replay", "read", "ingest"]).await;
    upload(gw, &admin, "webhook", "rewind-plugin-http-webhook").await;
    let (s, v) = gw
        .call(
            Method::POST,
            "/v1/destinations",
            &admin,
            Some(
                json!({"name": "hook", "plugin": "webhook@1.0.0", "config": {
                    "url": format!("http://127.0.0.1:{}/in", rx.port),
                    "allow_hosts": ["127.0.0.1"],
                }}),
            ),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    (admin, replay, col)
}

/// Ingests `n` events `{"type", "n", "bucket": n % 100, "bad"}` in NDJSON batches; returns
/// their ids in order.
async fn ingest(
    gw: &Gateway,
    token: &str,
    col: &str,
    n: usize,
    bad: impl Fn(usize) -> bool,
) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let end = (i + 10_000).min(n);
        let body: String = (i..end)
            .map(|k| {
                let t = if k % 2 == 0 {
                    "account_created"
                } else {
                    "order_placed"
                };
                format!(
                    "{}\n",
                    json!({"type": t, "n": k, "bucket": k % 100, "bad": bad(k)})
                )
            })
            .collect();
        let resp = gw.send(token, col, "application/x-ndjson", body).await;
        assert_eq!(resp.status(), 202);
        let v: Value = resp.json().await.unwrap();
        ids.extend(
            v["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_string()),
        );
        i = end;
    }
    ids
}

/// Waits until the archive holds `n` events of the collection (dry run count).
async fn archived(gw: &Gateway, token: &str, col: &str, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (s, v) = gw
            .call(
                Method::POST,
                "/v1/replays",
                token,
                Some(json!({"collection": col, "dry_run": true})),
            )
            .await;
        if s == 200 && v["count"] == n {
            return;
        }
        assert!(Instant::now() < deadline, "archive never held {n}: {s} {v}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn create(gw: &Gateway, token: &str, body: Value) -> Value {
    let (s, v) = gw
        .call(Method::POST, "/v1/replays", token, Some(body))
        .await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["status"], "pending");
    v
}

async fn get(gw: &Gateway, token: &str, id: &str) -> Value {
    let (s, v) = gw
        .call(Method::GET, &format!("/v1/replays/{id}"), token, None)
        .await;
    assert_eq!(s, 200, "{v}");
    v
}

/// Polls a replay until it is completed, failed or cancelled.
async fn finished(gw: &Gateway, token: &str, id: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let v = get(gw, token, id).await;
        if ["completed", "failed", "cancelled"].contains(&v["status"].as_str().unwrap()) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "replay not finished in {within:?}: {v}\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_filtered_slice_is_delivered_exactly_and_in_order() {
    let gw = gateway(&[]).await;
    let rx = Receiver::start(|_| 200).await;
    let (_, token, col) = setup(&gw, "acme", &rx).await;
    let ids = ingest(&gw, &token, &col, 100_000, |_| false).await;
    archived(&gw, &token, &col, 100_000).await;

    // 1% of the events: bucket 7.
    let expected: Vec<String> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 100 == 7)
        .map(|(_, id)| id.clone())
        .collect();
    let (s, dry) = gw
        .call(
            Method::POST,
            "/v1/replays",
            &token,
            Some(json!({"collection": "orders", "filter": "bucket = 7", "dry_run": true})),
        )
        .await;
    assert_eq!(s, 200, "{dry}");
    assert_eq!(dry["count"], 1000);
    assert_eq!(dry["sample"].as_array().unwrap().len(), 10);
    assert_eq!(dry["sample"][0]["id"], expected[0].as_str());
    assert!(
        rx.hits.lock().unwrap().is_empty(),
        "a dry run delivers nothing"
    );

    let r = create(
        &gw,
        &token,
        json!({"collection": "orders", "filter": "bucket = 7", "destination": "hook"}),
    )
    .await;
    let id = r["id"].as_str().unwrap();
    let done = finished(&gw, &token, id, Duration::from_secs(120)).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["total"], 1000);
    assert_eq!(done["delivered"], 1000);
    assert_eq!(done["failed"], 0);
    assert_eq!(done["progress"], 1.0);
    let hits = rx.delivered();
    let all: Vec<String> = hits.iter().map(|h| h.event_id.clone()).collect();
    // Exactly the selected events in received_at (then id) order: the ingest order, as ids
    // are ULIDs minted in arrival order. Each once — unless a batch was retried (a delivery
    // that ran past its deadline on an overloaded machine is sent again: at least once,
    // as documented), which the replay then reports.
    let mut seen = std::collections::HashSet::new();
    let got: Vec<String> = all.iter().filter(|id| seen.insert(*id)).cloned().collect();
    assert_eq!(got, expected);
    if all.len() != got.len() {
        assert!(
            done["retried"].as_i64().unwrap() > 0,
            "{} duplicates without a retry: {done}",
            all.len() - got.len()
        );
    }
    assert!(hits.iter().all(|h| h.replay_id == id));
    let body: Value = serde_json::from_slice(&hits[0].body).unwrap();
    assert_eq!(body["bucket"], 7);

    // A time range and a limit: the replay sends what the dry run of the same selection
    // shows first. `from` is the received_at of the second request's events, `to` excludes
    // the last request's.
    let at = |i: usize| {
        let gw = &gw;
        let (token, col, id) = (token.clone(), col.clone(), ids[i].clone());
        async move {
            let (s, e) = gw
                .call(
                    Method::GET,
                    &format!("/v1/collections/{col}/events/{id}"),
                    &token,
                    None,
                )
                .await;
            assert_eq!(s, 200, "{e}");
            e["received_at"].as_str().unwrap().to_string()
        }
    };
    let (from, to) = (at(10_000).await, at(90_000).await);
    let selection = json!({"collection": "orders", "filter": "bucket = 7", "from": from, "to": to});
    let mut dry = selection.clone();
    dry["dry_run"] = json!(true);
    let (s, dry) = gw
        .call(Method::POST, "/v1/replays", &token, Some(dry))
        .await;
    assert_eq!(s, 200, "{dry}");
    assert_eq!(dry["count"], 800, "requests 2 to 9 of 10: {dry}");
    let first5: Vec<&str> = dry["sample"].as_array().unwrap()[..5]
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        first5,
        expected[100..105]
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
    );
    let before = rx.hits.lock().unwrap().len();
    let mut body = selection.clone();
    body["limit"] = json!(5);
    body["destination"] = json!("hook");
    let r = create(&gw, &token, body).await;
    let done = finished(
        &gw,
        &token,
        r["id"].as_str().unwrap(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        (done["delivered"].as_i64(), done["total"].as_i64()),
        (Some(5), Some(5)),
        "{done}"
    );
    let hits = rx.hits.lock().unwrap()[before..].to_vec();
    let got: Vec<&str> = hits.iter().map(|h| h.event_id.as_str()).collect();
    assert_eq!(got, first5);
}

#[tokio::test]
async fn retryable_failures_are_retried_until_every_event_arrives() {
    let gw = gateway(&[]).await;
    // 30% of requests fail with 503, at random.
    let rx = Receiver::start(|_| {
        if rand::random::<f64>() < 0.3 {
            503
        } else {
            200
        }
    })
    .await;
    let (_, token, col) = setup(&gw, "acme", &rx).await;
    let ids = ingest(&gw, &token, &col, 500, |_| false).await;
    archived(&gw, &token, &col, 500).await;
    let r = create(
        &gw,
        &token,
        json!({"collection": "orders", "destination": "hook", "batch_size": 50, "max_retries": 30}),
    )
    .await;
    let done = finished(
        &gw,
        &token,
        r["id"].as_str().unwrap(),
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["delivered"], 500);
    assert_eq!(done["failed"], 0);
    let retried = done["retried"].as_i64().unwrap();
    let failures = rx
        .hits
        .lock()
        .unwrap()
        .iter()
        .filter(|h| h.status == 503)
        .count() as i64;
    assert!(failures > 50, "about 30% of requests failed: {failures}");
    assert_eq!(
        retried, failures,
        "every 503 was retried, and the count says so"
    );
    let got: HashSet<String> = rx.delivered().into_iter().map(|h| h.event_id).collect();
    assert_eq!(got, ids.into_iter().collect::<HashSet<_>>());
}

#[tokio::test]
async fn permanent_failures_are_dead_lettered_and_fail_the_replay_past_the_threshold() {
    let gw = gateway(&[]).await;
    let rx = Receiver::start(|body| {
        let v: Value = serde_json::from_slice(body).unwrap();
        if v["bad"] == true { 400 } else { 200 }
    })
    .await;
    let (_, token, col) = setup(&gw, "acme", &rx).await;
    // 5% bad among n < 200, 30% bad among n >= 200.
    ingest(&gw, &token, &col, 300, |k| {
        if k < 200 { k % 20 == 0 } else { k % 10 < 3 }
    })
    .await;
    archived(&gw, &token, &col, 300).await;

    // Under the threshold: completes, with the failures dead-lettered.
    let r = create(
        &gw,
        &token,
        json!({"collection": "orders", "filter": "n < 200", "destination": "hook", "max_failure_ratio": 0.1}),
    )
    .await;
    let id = r["id"].as_str().unwrap().to_string();
    let done = finished(&gw, &token, &id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        (done["delivered"].as_i64(), done["failed"].as_i64()),
        (Some(190), Some(10))
    );
    assert_eq!(done["dead_letter_collection"], "orders.dead-letter");

    // The dead letters carry the reason, the replay and the original event.
    let deadline = Instant::now() + Duration::from_secs(30);
    let dead = loop {
        let (s, v) = gw
            .call(
                Method::GET,
                "/v1/collections/orders.dead-letter/events?limit=100",
                &token,
                None,
            )
            .await;
        if s == 200 && v["events"].as_array().unwrap().len() == 10 {
            break v["events"].as_array().unwrap().clone();
        }
        assert!(Instant::now() < deadline, "dead letters: {s} {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for d in &dead {
        let p = &d["payload"];
        assert_eq!(p["replay_id"], id.as_str(), "{p}");
        assert!(p["reason"].as_str().unwrap().contains("HTTP 400"), "{p}");
        assert_eq!(p["payload"]["bad"], true);
        assert_eq!(p["plugin"], "webhook@1.0.0");
    }

    // Past the threshold: the replay fails and says why.
    let r = create(
        &gw,
        &token,
        json!({"collection": "orders", "filter": "n >= 200", "destination": "hook", "max_failure_ratio": 0.1, "batch_size": 10}),
    )
    .await;
    let done = finished(
        &gw,
        &token,
        r["id"].as_str().unwrap(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(done["status"], "failed", "{done}");
    let error = done["error"].as_str().unwrap();
    assert!(
        error.contains("max_failure_ratio") && error.contains("orders.dead-letter"),
        "{error}"
    );
    assert!(done["delivered"].as_i64().unwrap() + done["failed"].as_i64().unwrap() < 100);
}

#[tokio::test]
async fn pause_resume_and_cancel_take_effect_between_batches() {
    let gw = gateway(&[]).await;
    let rx = Receiver::start(|_| 200).await;
    let (_, token, col) = setup(&gw, "acme", &rx).await;
    ingest(&gw, &token, &col, 1000, |_| false).await;
    archived(&gw, &token, &col, 1000).await;
    let r = create(
        &gw,
        &token,
        json!({"collection": "orders", "destination": "hook", "rate_per_sec": 100}),
    )
    .await;
    let id = r["id"].as_str().unwrap().to_string();
    wait_for("deliveries start", Duration::from_secs(20), || {
        rx.delivered().len() >= 30
    })
    .await;

    let (s, v) = gw
        .call(
            Method::POST,
            &format!("/v1/replays/{id}/pause"),
            &token,
            None,
        )
        .await;
    assert_eq!((s, v["status"].as_str()), (200, Some("paused")), "{v}");
    // At most the batch in flight (10 events at 100/s) arrives after the pause.
    let at_pause = rx.delivered().len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let paused = rx.delivered().len();
    assert!(paused <= at_pause + 10, "{at_pause} → {paused}");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        rx.delivered().len(),
        paused,
        "nothing is delivered while paused"
    );
    let v = get(&gw, &token, &id).await;
    assert_eq!(v["status"], "paused");
    assert_eq!(v["delivered"].as_i64().unwrap() as usize, paused);

    let (s, v) = gw
        .call(
            Method::POST,
            &format!("/v1/replays/{id}/resume"),
            &token,
            None,
        )
        .await;
    assert_eq!((s, v["status"].as_str()), (200, Some("running")), "{v}");
    wait_for("deliveries resume", Duration::from_secs(10), || {
        rx.delivered().len() >= paused + 30
    })
    .await;

    let (s, v) = gw
        .call(
            Method::POST,
            &format!("/v1/replays/{id}/cancel"),
            &token,
            None,
        )
        .await;
    assert_eq!((s, v["status"].as_str()), (200, Some("cancelled")), "{v}");
    let at_cancel = rx.delivered().len();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after = rx.delivered().len();
    assert!(
        after <= at_cancel + 10 && after < 1000,
        "{at_cancel} → {after}"
    );
    // Finished replays cannot be resumed.
    let (s, v) = gw
        .call(
            Method::POST,
            &format!("/v1/replays/{id}/resume"),
            &token,
            None,
        )
        .await;
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cancelled"),
        "{v}"
    );
    // Every delivered event arrived once, in order.
    let hits = rx.delivered();
    let unique: HashSet<&str> = hits.iter().map(|h| h.event_id.as_str()).collect();
    assert_eq!(unique.len(), hits.len());
}

#[tokio::test]
async fn rate_per_sec_paces_the_replay_and_original_pace_keeps_the_gaps() {
    let gw = gateway(&[]).await;
    let rx = Receiver::start(|_| 200).await;
    let (admin, token, col) = setup(&gw, "acme", &rx).await;
    ingest(&gw, &token, &col, 2500, |_| false).await;
    archived(&gw, &token, &col, 2500).await;
    // A batched webhook (one request per batch of 50): the pace, not the receiver or a
    // loaded test machine, is what limits the replay.
    let batched = Receiver::start(|_| 200).await;
    let (s, v) = gw
        .call(
            Method::POST,
            "/v1/destinations",
            &admin,
            Some(
                json!({"name": "batched", "plugin": "webhook@1.0.0", "config": {
                    "url": format!("http://127.0.0.1:{}/in", batched.port),
                    "allow_hosts": ["127.0.0.1"],
                    "mode": "batch",
                }}),
            ),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let started = Instant::now();
    let r = create(
        &gw,
        &token,
        json!({"collection": "orders", "destination": "batched", "rate_per_sec": 500}),
    )
    .await;
    let done = finished(
        &gw,
        &token,
        r["id"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(done["delivered"], 2500, "{done}");
    let hits = batched.delivered();
    let events: usize = hits
        .iter()
        .map(|h| serde_json::from_slice::<Vec<Value>>(&h.body).unwrap().len())
        .sum();
    assert_eq!(events, 2500);
    assert!(hits.iter().all(|h| h.body.len() > 2), "batches of events");
    let span = hits.last().unwrap().at - hits.first().unwrap().at;
    // 2,500 events at 500/s: 5 s within ±10% (the first batch of 50 goes at once).
    assert!(
        span >= Duration::from_millis(4500) && span <= Duration::from_millis(5500),
        "first to last delivery took {span:?}"
    );
    // From the create call to seeing `completed` (start-up and polling included).
    assert!(took <= Duration::from_millis(7500), "{took:?}");

    // Original pace: three bursts ingested 600 ms apart, replayed at speed 2 → ~300 ms apart.
    let col2 = "orders";
    let before = rx.hits.lock().unwrap().len();
    let mut marks = Vec::new();
    for burst in 0..3 {
        let resp = gw
            .send(
                &token,
                col2,
                "application/json",
                json!({"burst": burst}).to_string(),
            )
            .await;
        assert_eq!(resp.status(), 202);
        marks.push(
            resp.json::<Value>().await.unwrap()["ids"][0]
                .as_str()
                .unwrap()
                .to_string(),
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    archived(&gw, &token, col2, 2503).await;
    let r = create(
        &gw,
        &token,
        json!({"collection": "orders", "filter": "burst EXISTS", "destination": "hook", "pace": "original", "speed": 2}),
    )
    .await;
    let done = finished(
        &gw,
        &token,
        r["id"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done["delivered"], 3, "{done}");
    let hits = rx.hits.lock().unwrap()[before..].to_vec();
    assert_eq!(
        hits.iter().map(|h| h.event_id.clone()).collect::<Vec<_>>(),
        marks
    );
    for w in hits.windows(2) {
        let gap = w[1].at - w[0].at;
        assert!(
            gap >= Duration::from_millis(200) && gap <= Duration::from_millis(550),
            "gap {gap:?} (originally ~600 ms, at speed 2 ~300 ms)"
        );
    }
}

#[tokio::test]
async fn a_replay_resumes_from_its_checkpoint_after_kill_9() {
    let mut gw = gateway(&[]).await;
    let rx = Receiver::start(|_| 200).await;
    let (_, token, col) = setup(&gw, "acme", &rx).await;
    let ids = ingest(&gw, &token, &col, 1000, |_| false).await;
    archived(&gw, &token, &col, 1000).await;
    let r = create(
        &gw,
        &token,
        json!({"collection": "orders", "destination": "hook", "rate_per_sec": 250}),
    )
    .await;
    let id = r["id"].as_str().unwrap().to_string();
    wait_for("half way", Duration::from_secs(20), || {
        rx.delivered().len() >= 400
    })
    .await;
    gw.kill9();
    let at_kill = rx.delivered().len();
    assert!(at_kill < 1000);
    gw.restart().await;
    let done = finished(&gw, &token, &id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "completed", "{done}");
    let hits = rx.delivered();
    let got: HashSet<&str> = hits.iter().map(|h| h.event_id.as_str()).collect();
    assert_eq!(
        got.len(),
        1000,
        "every selected event arrived at least once"
    );
    assert_eq!(got, ids.iter().map(String::as_str).collect::<HashSet<_>>());
    // At-least-once: what was in flight at the kill may arrive twice — at most one batch
    // (25 events at 250/s).
    let dupes = hits.len() - got.len();
    assert!(dupes <= 25, "{dupes} duplicates");
    // The resumed part continues in order after the checkpoint.
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for h in &hits {
        *counts.entry(&h.event_id).or_default() += 1;
    }
    assert!(counts.values().all(|&c| c <= 2));
}

#[tokio::test]
async fn each_team_replays_within_its_quota() {
    let gw = gateway(&["--replay-team-rate", "200", "--replay-max-running", "1"]).await;
    let rx_a = Receiver::start(|_| 200).await;
    let rx_b = Receiver::start(|_| 200).await;
    let (_, token_a, col_a) = setup(&gw, "acme", &rx_a).await;
    let (_, token_b, col_b) = setup(&gw, "globex", &rx_b).await;
    ingest(&gw, &token_a, &col_a, 600, |_| false).await;
    ingest(&gw, &token_b, &col_b, 600, |_| false).await;
    archived(&gw, &token_a, &col_a, 600).await;
    archived(&gw, &token_b, &col_b, 600).await;
    // Unpaced replays of both teams at once; a second one of team A waits for the first.
    let a = create(
        &gw,
        &token_a,
        json!({"collection": "orders", "destination": "hook"}),
    )
    .await;
    let b = create(
        &gw,
        &token_b,
        json!({"collection": "orders", "destination": "hook"}),
    )
    .await;
    let a2 = create(
        &gw,
        &token_a,
        json!({"collection": "orders", "destination": "hook", "limit": 10}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        get(&gw, &token_a, a2["id"].as_str().unwrap()).await["status"],
        "pending"
    );
    let da = finished(
        &gw,
        &token_a,
        a["id"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    let db = finished(
        &gw,
        &token_b,
        b["id"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        (da["delivered"].as_i64(), db["delivered"].as_i64()),
        (Some(600), Some(600))
    );
    for rx in [&rx_a, &rx_b] {
        let hits = rx.delivered();
        let span = (hits[599].at - hits[0].at).as_secs_f64();
        let rate = 580.0 / span;
        // Each team gets its own 200/s: never above its quota, and not starved by the other
        // (the lower bound leaves room for a loaded test machine).
        assert!(
            (100.0..=230.0).contains(&rate),
            "rate {rate:.0}/s over {span:.2}s"
        );
    }
    let d2 = finished(
        &gw,
        &token_a,
        a2["id"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(d2["status"], "completed");
    assert_eq!(d2["delivered"], 10);
}

#[tokio::test]
async fn bad_requests_and_other_teams_ids_are_refused_clearly() {
    let gw = gateway(&["--replay-api-rate", "5"]).await;
    let rx = Receiver::start(|_| 200).await;
    let (admin, token, col) = setup(&gw, "acme", &rx).await;
    let (_, other_token, _) = setup(&gw, "globex", &rx).await;
    ingest(&gw, &token, &col, 10, |_| false).await;
    let reader = gw.token(&admin, &["read"]).await;
    let post = |body: Value| {
        let gw = &gw;
        let token = token.clone();
        async move {
            gw.call(Method::POST, "/v1/replays", &token, Some(body))
                .await
        }
    };
    let msg = |v: &Value| {
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };

    let (s, v) = post(json!({"collection": "orders", "destination": "hook",
        "from": "2026-11-25T10:00:00Z", "to": "2026-11-25T09:00:00Z"}))
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(
        msg(&v).contains("`to`") && msg(&v).contains("[from, to)"),
        "{v}"
    );
    let (s, v) = post(json!({"collection": "orders", "destination": "nowhere"})).await;
    assert_eq!(s, 400, "{v}");
    assert!(
        msg(&v).contains("\"nowhere\"") && msg(&v).contains("/v1/destinations"),
        "{v}"
    );
    let (s, v) =
        post(json!({"collection": "orders", "destination": "hook", "filter": "type = = 3"})).await;
    assert_eq!(s, 400, "{v}");
    assert!(
        msg(&v).contains("column"),
        "the error points at the position: {v}"
    );
    let (s, v) = post(json!({"collection": "orders"})).await;
    assert_eq!(s, 400, "{v}");
    assert!(msg(&v).contains("`destination` is required"), "{v}");
    let (s, v) = post(json!({"collection": "nope", "destination": "hook"})).await;
    assert_eq!(s, 404, "{v}");
    let (s, v) =
        post(json!({"collection": "orders", "destination": "hook", "rate_per_sec": -1})).await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = post(json!({"collection": "orders", "destination": "hook", "pace": "original", "rate_per_sec": 5})).await;
    assert_eq!(s, 400, "{v}");
    let (s, v) =
        post(json!({"collection": "orders", "destination": {"collection": "orders"}})).await;
    assert_eq!(s, 400, "{v}");
    let (s, v) =
        post(json!({"collection": "orders", "destination": "hook", "colour": "red"})).await;
    assert_eq!(s, 400, "unknown fields are refused: {v}");
    let resp = gw
        .http
        .post(gw.url("/v1/replays"))
        .bearer_auth(&token)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // Rate limited per team: wait out the burst first.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = create(
        &gw,
        &token,
        json!({"collection": "orders", "destination": "hook"}),
    )
    .await;
    let id = r["id"].as_str().unwrap();
    // Another team's replay: 404, never a hint that it exists.
    for path in [
        format!("/v1/replays/{id}"),
        format!("/v1/replays/{id}/cancel"),
    ] {
        let method = if path.ends_with("cancel") {
            Method::POST
        } else {
            Method::GET
        };
        let (s, v) = gw.call(method, &path, &other_token, None).await;
        assert_eq!(s, 404, "{v}");
    }
    // Without the replay scope: 403.
    let (s, _) = gw
        .call(Method::GET, &format!("/v1/replays/{id}"), &reader, None)
        .await;
    assert_eq!(s, 403);
    // No token: 401.
    let resp = gw.http.get(gw.url("/v1/replays")).send().await.unwrap();
    assert_eq!(resp.status(), 401);

    let mut limited = None;
    for _ in 0..30 {
        let resp = gw
            .http
            .get(gw.url(&format!("/v1/replays/{id}")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        if resp.status() == 429 {
            limited = Some(resp);
            break;
        }
    }
    let resp = limited.expect("the replay API is rate limited per team");
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    // The other team is not limited by it.
    let (s, _) = gw
        .call(Method::GET, "/v1/replays", &other_token, None)
        .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn replays_publish_to_real_nats_with_ids_in_the_headers() {
    let nats = Nats::start();
    let gw = Gateway::start(&["--bus", &nats.url(), "--archive-flush-secs", "1"]).await;
    let (admin, col) = gw.team_with_collection("acme", "orders").await;
    let token = gw.token(&admin, &["replay", "ingest"]).await;
    upload(&gw, &admin, "nats", "rewind-plugin-nats-publish").await;
    let (s, v) = gw
        .call(
            Method::POST,
            "/v1/destinations",
            &admin,
            Some(json!({"name": "bus", "plugin": "nats@1.0.0", "config": {"subject": "replayed.orders"}})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let ids = ingest(&gw, &token, &col, 500, |_| false).await;
    archived(&gw, &token, &col, 500).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut sub = client.subscribe("replayed.orders").await.unwrap();
    client.flush().await.unwrap();
    let r = create(
        &gw,
        &token,
        json!({"collection": "orders", "destination": "bus", "filter": "type = account_created"}),
    )
    .await;
    let id = r["id"].as_str().unwrap().to_string();
    let done = finished(&gw, &token, &id, Duration::from_secs(60)).await;
    assert_eq!(done["delivered"], 250, "{done}");
    let mut got = Vec::new();
    while got.len() < 250 {
        let msg = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut sub))
            .await
            .expect("every replayed event is published")
            .unwrap();
        let headers = msg.headers.unwrap();
        assert_eq!(headers.get("rewind-replay-id").unwrap().as_str(), id);
        got.push(headers.get("rewind-event-id").unwrap().as_str().to_string());
    }
    let expected: Vec<String> = ids.iter().step_by(2).cloned().collect();
    assert_eq!(got, expected);
}

#[tokio::test]
async fn a_collection_can_be_backfilled_from_another() {
    let gw = gateway(&[]).await;
    let (admin, col) = gw.team_with_collection("acme", "orders").await;
    let token = gw.token(&admin, &["replay", "ingest", "read"]).await;
    let (s, _) = gw
        .call(
            Method::POST,
            "/v1/collections",
            &admin,
            Some(json!({"name": "orders-copy"})),
        )
        .await;
    assert_eq!(s, 201);
    ingest(&gw, &token, &col, 300, |_| false).await;
    archived(&gw, &token, &col, 300).await;
    let r = create(
        &gw,
        &token,
        json!({"collection": "orders", "filter": "n < 100", "destination": {"collection": "orders-copy"}}),
    )
    .await;
    let done = finished(
        &gw,
        &token,
        r["id"].as_str().unwrap(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        (done["status"].as_str(), done["delivered"].as_i64()),
        (Some("completed"), Some(100)),
        "{done}"
    );
    archived(&gw, &token, "orders-copy", 100).await;
    let text = gw
        .http
        .get(gw.url("/v1/collections/orders-copy/export"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let ns: Vec<i64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["payload"]["n"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(ns, (0..100).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_waits_for_the_replay_and_exits_by_its_outcome() {
    let gw = gateway(&[]).await;
    let rx = Receiver::start(|body| {
        let v: Value = serde_json::from_slice(body).unwrap();
        if v["bad"] == true { 400 } else { 200 }
    })
    .await;
    let (_, token, col) = setup(&gw, "acme", &rx).await;
    ingest(&gw, &token, &col, 200, |k| k >= 100).await;
    archived(&gw, &token, &col, 200).await;
    let cli = |args: &[&str]| {
        Command::new(rewind_bin())
            .arg("replay")
            .args(args)
            .env("REWIND_URL", gw.url(""))
            .env("REWIND_TOKEN", &token)
            .env("CI", "true")
            .output()
            .unwrap()
    };
    let out = tokio::task::block_in_place(|| {
        cli(&[
            "create",
            "orders",
            "--destination",
            "hook",
            "--filter",
            "n < 100",
            "--wait",
            "--progress-every",
            "1",
        ])
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("completed: 100 delivered of 100 (100%)"),
        "plain progress lines in CI: {stderr}"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["delivered"], 100);

    let out = tokio::task::block_in_place(|| {
        cli(&[
            "create",
            "orders",
            "--destination",
            "hook",
            "--filter",
            "n >= 100",
            "--wait",
        ])
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a failed replay fails the build: {stderr}"
    );
    assert!(
        stderr.contains("failed") && stderr.contains("max_failure_ratio"),
        "{stderr}"
    );

    let out = tokio::task::block_in_place(|| {
        cli(&["create", "orders", "--filter", "n < 5", "--dry-run"])
    });
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["count"], 5);
    let out =
        tokio::task::block_in_place(|| cli(&["create", "orders", "--destination", "nowhere"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nowhere"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_watch_follows_progress_and_stream_sends_the_events() {
    use rewind_gateway::proto::v1 as pb;
    use tonic::metadata::MetadataValue;
    let gw = gateway(&[]).await;
    let rx = Receiver::start(|_| 200).await;
    let (_, token, col) = setup(&gw, "acme", &rx).await;
    let ids = ingest(&gw, &token, &col, 300, |_| false).await;
    archived(&gw, &token, &col, 300).await;
    fn authed_as<T>(token: &str, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
        );
        req
    }
    macro_rules! authed {
        ($m:expr) => {
            authed_as(&token, $m)
        };
    }
    let channel = tonic::transport::Channel::from_shared(gw.url(""))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = pb::replay_service_client::ReplayServiceClient::new(channel);
    let created = client
        .create(authed!(pb::CreateReplayRequest {
            collection: "orders".into(),
            destination: "hook".into(),
            rate_per_sec: 300.0,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let mut watch = client
        .watch(authed!(pb::WatchReplayRequest {
            id: created.id.clone(),
            interval_ms: 100,
        }))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(p) = watch.message().await.unwrap() {
        seen.push(p);
    }
    let last = seen.last().unwrap();
    assert_eq!(last.status, "completed");
    assert_eq!(last.delivered, 300);
    assert_eq!(last.total, 300);
    assert!(
        seen.len() >= 4,
        "progress was streamed as it went: {}",
        seen.len()
    );
    assert!(seen.windows(2).all(|w| w[0].delivered <= w[1].delivered));
    assert!(
        seen.iter()
            .any(|p| p.status == "running" && p.delivered > 0 && p.delivered < 300)
    );

    // Stream: the selection to the caller, paced.
    let started = Instant::now();
    let mut stream = client
        .stream(authed!(pb::StreamReplayRequest {
            collection: "orders".into(),
            filter: "n < 100".into(),
            rate_per_sec: 200.0,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(e) = stream.message().await.unwrap() {
        got.push(e.id);
    }
    assert_eq!(got, ids[..100].to_vec());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(350),
        "paced at 200/s: {took:?}"
    );
    // Bad input over gRPC.
    let err = client
        .stream(authed!(pb::StreamReplayRequest {
            collection: "orders".into(),
            filter: "n <".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = client
        .get(authed!(pb::ReplayRef {
            id: "rpl_nope".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn replay_time_transforms_run_before_delivery_and_their_failures_are_dead_letters() {
    let gw = gateway(&[]).await;
    let rx = Receiver::start(|_| 200).await;
    let (admin, token, col) = setup(&gw, "acme", &rx).await;
    upload(&gw, &admin, "redact", "rewind-plugin-redact").await;
    upload(&gw, &admin, "hostile", "hostile-transform").await;
    let body: String = (0..100)
        .map(|i| {
            let note = if i % 10 == 0 { "poison" } else { "ok" };
            format!(
                "{}\n",
                json!({"n": i, "email": format!("u{i}@example.com"), "note": note})
            )
        })
        .collect();
    assert_eq!(
        gw.send(&token, &col, "application/x-ndjson", body)
            .await
            .status(),
        202
    );
    archived(&gw, &token, &col, 100).await;

    // A destination plugin is no transform: refused before anything runs.
    let (s, v) = gw
        .call(
            Method::POST,
            "/v1/replays",
            &token,
            Some(json!({"collection": "orders", "destination": "hook",
                "transforms": [{"plugin": "webhook@1.0.0", "config": {}}]})),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("transform"),
        "{v}"
    );

    let r = create(
        &gw,
        &token,
        json!({"collection": "orders", "destination": "hook", "max_failure_ratio": 0.2,
        "transforms": [
            {"plugin": "redact@1.0.0", "config": {"paths": ["email"]}},
            {"plugin": "hostile@1.0.0", "config": {"mode": "poison"}},
        ]}),
    )
    .await;
    let done = finished(
        &gw,
        &token,
        r["id"].as_str().unwrap(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        (done["delivered"].as_i64(), done["failed"].as_i64()),
        (Some(90), Some(10))
    );
    let hits = rx.delivered();
    assert_eq!(hits.len(), 90);
    for h in &hits {
        let v: Value = serde_json::from_slice(&h.body).unwrap();
        assert_eq!(v["email"], "[REDACTED]", "{v}");
        assert_eq!(v["note"], "ok");
    }
    assert_eq!(done["transforms"][0]["plugin"], "redact@1.0.0");
}

/// Two gateways share a PostgreSQL metastore, a NATS bus and an archive; the one running a
/// replay is killed, and the other takes the replay over once its lease has run out.
#[tokio::test]
async fn another_gateway_takes_a_replay_over_when_its_gateway_dies() {
    let base = std::env::var("REWIND_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let db = format!("rewind_e2e_takeover_{}", std::process::id());
    let psql = |sql: &str| {
        let out = Command::new("psql")
            .arg(&base)
            .args(["-c", sql])
            .output()
            .expect("psql must be installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    psql(&format!("DROP DATABASE IF EXISTS {db}"));
    psql(&format!("CREATE DATABASE {db}"));
    let url = format!("{}/{db}", &base[..base.rfind('/').unwrap()]);
    let nats = Nats::start();
    let archive = tempfile::tempdir().unwrap();
    let archive_path = archive.path().display().to_string();
    let flags = [
        "--bus",
        &nats.url(),
        "--metastore",
        &url,
        "--archive",
        &archive_path,
        "--archive-flush-secs",
        "1",
        "--allow-private-destinations",
    ];
    let mut a = Gateway::start(&flags).await;
    let mut b = Gateway::start(&flags).await;
    let rx = Receiver::start(|_| 200).await;
    let (_, token, col) = setup(&a, "acme", &rx).await;
    let ids = ingest(&a, &token, &col, 600, |_| false).await;
    archived(&a, &token, &col, 600).await;
    let r = create(
        &a,
        &token,
        json!({"collection": "orders", "destination": "hook", "rate_per_sec": 100}),
    )
    .await;
    let id = r["id"].as_str().unwrap().to_string();
    wait_for("deliveries start", Duration::from_secs(20), || {
        rx.delivered().len() >= 100
    })
    .await;
    let owner = get(&a, &token, &id).await["gateway"]
        .as_str()
        .unwrap()
        .to_string();
    let instance = |gw: &Gateway| {
        std::fs::read_to_string(gw.data_dir.join("instance-id"))
            .unwrap()
            .trim()
            .to_string()
    };
    let (a_id, b_id) = (instance(&a), instance(&b));
    assert!(
        owner == a_id || owner == b_id,
        "{owner} is one of the two gateways"
    );
    // Kill the one running it; ask the survivor.
    let survivor = if owner == a_id {
        a.kill9();
        &b
    } else {
        b.kill9();
        &a
    };
    let killed_at = Instant::now();
    let done = finished(survivor, &token, &id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_ne!(done["gateway"], owner.as_str());
    // Nothing was delivered while the dead gateway's lease (15 s) still held.
    let resumed = rx
        .delivered()
        .into_iter()
        .filter(|h| h.at > killed_at + Duration::from_secs(1))
        .map(|h| h.at)
        .min()
        .expect("deliveries after the kill");
    assert!(
        resumed - killed_at >= Duration::from_secs(10),
        "the survivor took over after {:?}",
        resumed - killed_at
    );
    let got: HashSet<String> = rx.delivered().into_iter().map(|h| h.event_id).collect();
    assert_eq!(
        got,
        ids.into_iter().collect::<HashSet<_>>(),
        "every event arrived"
    );
    drop((a, b));
    psql(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"));
}

/// SIGTERM mid-replay: the gateway finishes its batch, records the checkpoint and gives the
/// lease up; after the restart the replay goes on from there.
#[tokio::test]
async fn a_graceful_restart_resumes_from_the_checkpoint_without_resending() {
    let mut gw = gateway(&[]).await;
    let rx = Receiver::start(|_| 200).await;
    let (_, token, col) = setup(&gw, "acme", &rx).await;
    let ids = ingest(&gw, &token, &col, 600, |_| false).await;
    archived(&gw, &token, &col, 600).await;
    let r = create(
        &gw,
        &token,
        json!({"collection": "orders", "destination": "hook", "rate_per_sec": 200}),
    )
    .await;
    let id = r["id"].as_str().unwrap().to_string();
    wait_for("half way", Duration::from_secs(20), || {
        rx.delivered().len() >= 200
    })
    .await;
    let status = gw.terminate();
    assert!(status.success(), "a clean exit: {status:?}\n{}", gw.log());
    let at_stop = rx.delivered().len();
    gw.restart().await;
    let v = get(&gw, &token, &id).await;
    // The checkpoint covers what was delivered before the stop.
    assert!(
        v["delivered"].as_i64().unwrap() as usize >= at_stop.saturating_sub(20),
        "{v} vs {at_stop}"
    );
    let done = finished(&gw, &token, &id, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "completed", "{done}");
    let hits = rx.delivered();
    let got: HashSet<&str> = hits.iter().map(|h| h.event_id.as_str()).collect();
    assert_eq!(got, ids.iter().map(String::as_str).collect::<HashSet<_>>());
    // A clean stop re-sends nothing: the batch in flight finished and was checkpointed. The
    // only extra deliveries allowed are the replay's own reported retries (a plugin call that
    // overran its time limit on a loaded machine is retried whole, including the events it
    // had already posted: at-least-once, and counted in `retried`).
    let extra = hits.len() - 600;
    let retried = done["retried"].as_u64().unwrap() as usize;
    assert!(
        extra <= retried,
        "{} deliveries of 600 events, {retried} reported as retried: the stop re-sent events\n{}",
        hits.len(),
        gw.log()
    );
}
