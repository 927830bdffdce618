//! Ingest over REST: every body format, every limit, idempotency and the rate limit.

use std::collections::HashSet;

use serde_json::Value;

use crate::support::{Gateway, event_of_size};

async fn json_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn formats_limits_and_bad_input() {
    let gw = Gateway::start(&[
        "--max-event-bytes",
        "2048",
        "--max-request-bytes",
        "65536",
        "--max-batch-events",
        "20",
    ])
    .await;
    let (admin, col) = gw.team_with_collection("acme", "orders").await;
    let tok = gw.token(&admin, &["ingest"]).await;

    // One object, an array, NDJSON, raw bytes; by id and by name.
    let (s, b) = json_of(
        gw.send(&tok, &col, "application/json", r#"{"type":"a","n":1}"#)
            .await,
    )
    .await;
    assert_eq!((s, b["accepted"].as_u64()), (202, Some(1)), "{b}");
    let (s, b) = json_of(
        gw.send(
            &tok,
            "orders",
            "application/json; charset=utf-8",
            r#"[{"n":1},{"n":2},{"n":3}]"#,
        )
        .await,
    )
    .await;
    assert_eq!((s, b["accepted"].as_u64()), (202, Some(3)), "{b}");
    let ids: HashSet<&str> = b["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "ids are distinct");
    assert!(ids.iter().all(|id| id.len() == 26), "ULIDs: {ids:?}");
    let (s, b) = json_of(
        gw.send(
            &tok,
            &col,
            "application/x-ndjson",
            "{\"n\":1}\n\n{\"n\":2}\n",
        )
        .await,
    )
    .await;
    assert_eq!((s, b["accepted"].as_u64()), (202, Some(2)), "{b}");
    let (s, b) = json_of(
        gw.send(
            &tok,
            &col,
            "application/octet-stream",
            vec![0u8, 159, 146, 150],
        )
        .await,
    )
    .await;
    assert_eq!((s, b["accepted"].as_u64()), (202, Some(1)), "{b}");

    // Malformed JSON: 400 naming the line.
    let (s, b) = json_of(
        gw.send(
            &tok,
            &col,
            "application/x-ndjson",
            "{\"n\":1}\n{\"n\":2}\n{\"n\":}\n",
        )
        .await,
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(b["error"]["code"], "malformed_json");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("line 3"),
        "{b}"
    );
    let (s, b) = json_of(
        gw.send(
            &tok,
            &col,
            "application/json",
            "[\n{\"a\":1},\n{\"a\" 2}\n]",
        )
        .await,
    )
    .await;
    assert_eq!(s, 400);
    assert!(
        b["error"]["message"].as_str().unwrap().contains("line 3"),
        "{b}"
    );
    let (s, b) = json_of(
        gw.send(&tok, &col, "application/json", "\"just a string\"")
            .await,
    )
    .await;
    assert_eq!(s, 400, "{b}");
    // Empty body: 400.
    let (s, b) = json_of(gw.send(&tok, &col, "application/json", "").await).await;
    assert_eq!((s, b["error"]["code"].as_str()), (400, Some("empty_body")));
    // Wrong content type: 415 listing the accepted ones.
    let (s, b) = json_of(gw.send(&tok, &col, "text/plain", "{}").await).await;
    assert_eq!(s, 415);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("application/x-ndjson"),
        "{b}"
    );
    // Oversized event: 413 naming it. Oversized body: 413. Too many events: 413.
    let big = format!("[{},{}]", event_of_size(0, 100), event_of_size(1, 4000));
    let (s, b) = json_of(gw.send(&tok, &col, "application/json", big).await).await;
    assert_eq!(s, 413);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("element 1"),
        "{b}"
    );
    let huge: String = (0..100).map(|i| event_of_size(i, 1000) + "\n").collect();
    let (s, b) = json_of(gw.send(&tok, &col, "application/x-ndjson", huge).await).await;
    assert_eq!(s, 413, "{b}");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("65536"),
        "{b}"
    );
    let many: String = (0..21).map(|i| format!("{{\"i\":{i}}}\n")).collect();
    let (s, b) = json_of(gw.send(&tok, &col, "application/x-ndjson", many).await).await;
    assert_eq!(s, 413);
    assert!(
        b["error"]["message"].as_str().unwrap().contains("20-event"),
        "{b}"
    );
    // Unknown collection: 404.
    let (s, _) = json_of(
        gw.send(&tok, "no-such-collection", "application/json", "{}")
            .await,
    )
    .await;
    assert_eq!(s, 404);
    // A read-only token cannot ingest: 403.
    let reader = gw.token(&admin, &["read"]).await;
    let (s, _) = json_of(gw.send(&reader, &col, "application/json", "{}").await).await;
    assert_eq!(s, 403);
}

#[tokio::test]
async fn client_ids_make_retries_idempotent() {
    let mut gw = Gateway::start(&["--id-field", "event_id"]).await;
    let (admin, col) = gw.team_with_collection("acme", "orders").await;
    let tok = gw.token(&admin, &["ingest"]).await;

    let (http, events_url) = (
        gw.http.clone(),
        gw.url(&format!("/v1/collections/{col}/events")),
    );
    let send_keyed = |key: &'static str| {
        http.post(&events_url)
            .bearer_auth(&tok)
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(r#"{"type":"payment"}"#)
            .send()
    };
    let (_, first) = json_of(send_keyed("pay-1").await.unwrap()).await;
    let (s, again) = json_of(send_keyed("pay-1").await.unwrap()).await;
    assert_eq!(s, 202);
    assert_eq!(first["ids"], again["ids"], "a retry returns the first id");

    // The configured id field, in a batch, with a duplicate inside the batch too.
    let batch = r#"[{"event_id":"e1","v":1},{"event_id":"e2","v":2},{"event_id":"e1","v":1}]"#;
    let (_, b1) = json_of(gw.send(&tok, &col, "application/json", batch).await).await;
    assert_eq!(b1["ids"][0], b1["ids"][2]);
    let (_, b2) = json_of(gw.send(&tok, &col, "application/json", batch).await).await;
    assert_eq!(b1["ids"], b2["ids"]);

    // Concurrent retries of one key: stored once, all answered with the same id.
    let futures: Vec<_> = (0..8).map(|_| send_keyed("pay-2")).collect();
    let answers = futures::future::join_all(futures).await;
    let mut ids = HashSet::new();
    for a in answers {
        let (s, b) = json_of(a.unwrap()).await;
        assert_eq!(s, 202);
        ids.insert(b["ids"][0].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 1);

    // Survives a restart: the key window is rebuilt from the bus.
    gw.terminate();
    gw.restart().await;
    let (_, after) = json_of(send_keyed("pay-1").await.unwrap()).await;
    assert_eq!(after["ids"], first["ids"]);

    // On the bus: pay-1, e1, e2, pay-2 — once each.
    gw.terminate();
    let on_bus = gw.bus_ids(&[]);
    assert_eq!(on_bus.len(), 4, "{on_bus:?}");
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after_and_ratelimit_headers() {
    let gw = Gateway::start(&[
        "--rate-limit-events-per-sec",
        "5",
        "--rate-limit-burst",
        "10",
    ])
    .await;
    let (admin, col) = gw.team_with_collection("acme", "orders").await;
    let tok = gw.token(&admin, &["ingest"]).await;
    let other = gw.token(&admin, &["ingest"]).await;
    let ten: String = (0..10).map(|i| format!("{{\"i\":{i}}}\n")).collect();
    assert_eq!(
        gw.send(&tok, &col, "application/x-ndjson", ten.clone())
            .await
            .status(),
        202
    );
    let resp = gw.send(&tok, &col, "application/json", "{}").await;
    assert_eq!(resp.status(), 429);
    let h = resp.headers();
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "{retry}");
    assert!(h["ratelimit-policy"].to_str().unwrap().contains("q=10"));
    assert!(h["ratelimit"].to_str().unwrap().contains("r=0"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    // Per token: another token is not limited.
    assert_eq!(
        gw.send(&other, &col, "application/json", "{}")
            .await
            .status(),
        202
    );
    // A batch larger than the burst can never pass: 413, not an endless 429.
    let eleven: String = (0..11).map(|i| format!("{{\"i\":{i}}}\n")).collect();
    assert_eq!(
        gw.send(&other, &col, "application/x-ndjson", eleven)
            .await
            .status(),
        413
    );
    // After waiting, the token may send again.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(
        gw.send(&tok, &col, "application/json", "{}").await.status(),
        202
    );
    let metrics = gw
        .http
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("rewind_rate_limited_total 1"), "{metrics}");
    // Every ingest request above (202, 429 and 413 alike) was timed, and nothing else was.
    assert!(
        metrics.contains("rewind_ingest_request_seconds_count 5\n"),
        "{metrics}"
    );
    // The allocator's own figures: the gateway holds some megabytes, live and resident.
    let bytes = |kind: &str| -> u64 {
        let prefix = format!("rewind_allocator_bytes{{kind=\"{kind}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {metrics}"))
            .parse()
            .unwrap()
    };
    assert!(bytes("allocated") > 1 << 20, "{metrics}");
    assert!(bytes("resident") >= bytes("allocated"), "{metrics}");
}

/// Sends one raw HTTP/1.1 request on `conn` and reads the response head (status line and
/// headers, lower-cased) and body.
async fn raw_request(
    conn: &mut tokio::net::TcpStream,
    head: &str,
    body: &[u8],
) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(head.as_bytes()).await.unwrap();
    // The server may answer (and stop reading) before the body is all sent.
    let _ = conn.write_all(body).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("response in time")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = text[..end].to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            if got.len() >= end + 4 + len {
                return (head, text[end + 4..end + 4 + len].to_string());
            }
        }
    }
    let text = String::from_utf8_lossy(&got).to_string();
    (text.to_ascii_lowercase(), String::new())
}

#[tokio::test]
async fn a_refused_body_closes_the_connection_and_a_read_one_keeps_it() {
    let gw = Gateway::start(&["--max-request-bytes", "65536", "--max-event-bytes", "2048"]).await;
    let (admin, col) = gw.team_with_collection("acme", "orders").await;
    let tok = gw.token(&admin, &["ingest"]).await;
    let path = format!("/v1/collections/{col}/events");
    let head = |token: &str, len: usize| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
        )
    };
    let connect = || tokio::net::TcpStream::connect(("127.0.0.1", gw.port));

    // A body read to its end: keep-alive, and the same connection takes a second request.
    let mut conn = connect().await.unwrap();
    let body = br#"{"n":1}"#;
    for _ in 0..2 {
        let (h, b) = raw_request(&mut conn, &head(&tok, body.len()), body).await;
        assert!(h.starts_with("http/1.1 202"), "{h}\n{b}");
        assert!(!h.contains("connection: close"), "{h}");
    }

    // 10 MiB against a 64 KiB limit: the handler drains it (so the client, still sending,
    // reads the 413), and the connection stays usable.
    let big = vec![b' '; 10 << 20];
    let mut conn = connect().await.unwrap();
    let (h, b) = raw_request(&mut conn, &head(&tok, big.len()), &big).await;
    assert!(h.starts_with("http/1.1 413"), "{h}\n{b}");
    assert!(!h.contains("connection: close"), "{h}");

    // Refused before the body is read (a wrong token): hyper will not read the rest, so the
    // answer tells the client not to reuse the connection.
    let mut conn = connect().await.unwrap();
    let (h, b) = raw_request(&mut conn, &head("rw_wrong", 1 << 20), &vec![b' '; 1 << 20]).await;
    assert!(h.starts_with("http/1.1 401"), "{h}\n{b}");
    assert!(h.contains("connection: close"), "{h}");

    // A client that pools connections gets no broken pipe after such a refusal.
    let client = reqwest::Client::new();
    for _ in 0..5 {
        let s = client
            .post(gw.url(&path))
            .bearer_auth("rw_wrong")
            .header("content-type", "application/json")
            .body(vec![b' '; 4096])
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(s, 401);
        let s = client
            .post(gw.url(&path))
            .bearer_auth(&tok)
            .header("content-type", "application/json")
            .body(r#"{"n":2}"#)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(s, 202);
    }
}
