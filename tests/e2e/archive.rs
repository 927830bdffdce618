//! The archive end to end: Parquet files on the local disk that DuckDB reads, export and
//! look-up by id from them, schema inference and evolution, and completeness after crashes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::durability::sustained_load;
use crate::support::{Garage, Gateway};

pub(crate) async fn export(gw: &Gateway, token: &str, collection: &str, query: &str) -> Vec<Value> {
    let resp = gw
        .http
        .get(gw.url(&format!("/v1/collections/{collection}/export{query}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad export line {l:?}: {e}")))
        .collect()
}

/// Waits until the export holds `n` events (or fails after `secs`).
pub(crate) async fn wait_for_export(
    gw: &Gateway,
    token: &str,
    collection: &str,
    n: usize,
    secs: u64,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let lines = export(gw, token, collection, "").await;
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "archive has {} of {n} events after {secs}s:\n{}",
            lines.len(),
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

pub(crate) fn ids(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn archive_holds_every_event_in_parquet_that_duckdb_reads() {
    let gw = Gateway::start(&[
        "--archive-flush-secs",
        "1",
        "--max-event-bytes",
        "2000000",
        "--max-request-bytes",
        "8000000",
    ])
    .await;
    let (admin, col) = gw.team_with_collection("acme", "orders").await;
    let tok = gw.token(&admin, &["ingest", "read"]).await;
    let ingest_only = gw.token(&admin, &["ingest"]).await;

    let mut sent = Vec::new();
    let send = |body: String, ct: &'static str| {
        let fut = gw.send(&tok, &col, ct, body);
        async move {
            let resp = fut.await;
            assert_eq!(resp.status(), 202);
            let v: Value = resp.json().await.unwrap();
            v["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    // 300 ordinary events, a third of them account_created.
    let batch: String = (0..300)
        .map(|i| json!({"type": if i % 3 == 0 {"account_created"} else {"login"}, "amount": i, "user": {"id": i, "plan": "pro"}}).to_string() + "\n")
        .collect();
    sent.extend(send(batch, "application/x-ndjson").await);
    // Type conflicts: a number, then a string, then an object, for the same field.
    sent.extend(
        send(
            r#"[{"amount": 1.5}, {"amount": "lots"}, {"amount": {"v": 1}}]"#.into(),
            "application/json",
        )
        .await,
    );
    // 10,000 distinct field names in one event; deep nesting; unicode keys; a 1 MiB event.
    let wide: serde_json::Map<String, Value> = (0..10_000)
        .map(|i| (format!("field_{i}"), json!(i)))
        .collect();
    sent.extend(send(Value::Object(wide).to_string(), "application/json").await);
    let mut deep = json!("bottom");
    for _ in 0..64 {
        deep = json!({ "level": deep });
    }
    sent.extend(send(deep.to_string(), "application/json").await);
    sent.extend(
        send(
            json!({"名前": "テスト", "emoji 🎉": true, "ключ": 1}).to_string(),
            "application/json",
        )
        .await,
    );
    sent.extend(
        send(
            json!({"blob": "x".repeat(1 << 20)}).to_string(),
            "application/json",
        )
        .await,
    );
    let raw_ids = send(
        "\u{0}raw bytes, not JSON".into(),
        "application/octet-stream",
    )
    .await;
    sent.extend(raw_ids.clone());

    let lines = wait_for_export(&gw, &tok, &col, sent.len(), 30).await;
    let exported = ids(&lines);
    assert_eq!(exported.len(), sent.len(), "no duplicates");
    assert_eq!(
        exported.iter().collect::<HashSet<_>>(),
        sent.iter().collect::<HashSet<_>>()
    );
    // Oldest first.
    let times: Vec<&str> = lines
        .iter()
        .map(|l| l["received_at"].as_str().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "export is oldest first"
    );
    // Payloads come back exactly.
    let unicode = lines
        .iter()
        .find(|l| l["payload"]["名前"] == "テスト")
        .expect("unicode event");
    assert_eq!(unicode["payload"]["emoji 🎉"], true);
    let big = lines
        .iter()
        .find(|l| l["payload"]["blob"].is_string())
        .unwrap();
    assert_eq!(big["payload"]["blob"].as_str().unwrap().len(), 1 << 20);

    // One event by id, JSON and raw.
    let (s, one) = gw
        .call(
            Method::GET,
            &format!("/v1/collections/{col}/events/{}", sent[0]),
            &tok,
            None,
        )
        .await;
    assert_eq!(s, 200, "{one}");
    assert_eq!(one["payload"]["type"], "account_created");
    let (s, raw) = gw
        .call(
            Method::GET,
            &format!("/v1/collections/{col}/events/{}", raw_ids[0]),
            &tok,
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(raw["payload_encoding"], "base64");
    let (s, _) = gw
        .call(
            Method::GET,
            &format!("/v1/collections/{col}/events/01ARZ3NDEKTSV4RRFFQ69G5FAV"),
            &tok,
            None,
        )
        .await;
    assert_eq!(s, 404);
    let (s, _) = gw
        .call(
            Method::GET,
            &format!("/v1/collections/{col}/events/not-an-id"),
            &tok,
            None,
        )
        .await;
    assert_eq!(s, 400);

    // Schema: inferred, widened and recorded, bounded.
    let (s, schema) = gw
        .call(
            Method::GET,
            &format!("/v1/collections/{col}/schema"),
            &tok,
            None,
        )
        .await;
    assert_eq!(s, 200);
    let columns = schema["columns"].as_array().unwrap();
    let amount = columns.iter().find(|c| c["name"] == "amount").unwrap();
    assert_eq!(amount["type"], "string", "{amount}");
    assert!(amount["widened_from"].is_string());
    assert!(columns.iter().any(|c| c["name"] == "user.plan"));
    assert!(columns.len() <= 6 + 512, "{} columns", columns.len());
    assert!(
        schema["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["change"] == "widened")
    );

    // Bad input: read scope, time range, another team.
    let (s, _) = gw
        .call(
            Method::GET,
            &format!("/v1/collections/{col}/export"),
            &ingest_only,
            None,
        )
        .await;
    assert_eq!(s, 403);
    let (s, b) = gw
        .call(
            Method::GET,
            &format!("/v1/collections/{col}/export?from=yesterday"),
            &tok,
            None,
        )
        .await;
    assert_eq!(s, 400, "{b}");
    let (other_admin, _) = gw.team_with_collection("other", "things").await;
    let other = gw.token(&other_admin, &["read"]).await;
    let (s, _) = gw
        .call(
            Method::GET,
            &format!("/v1/collections/{col}/export"),
            &other,
            None,
        )
        .await;
    assert_eq!(s, 404);
    let (s, _) = gw
        .call(
            Method::GET,
            &format!("/v1/collections/{col}/events/{}", sent[0]),
            &other,
            None,
        )
        .await;
    assert_eq!(s, 404);

    // A time range selects a subset.
    let first_t = lines[0]["received_at"].as_str().unwrap();
    let after = export(&gw, &tok, &col, &format!("?from={}", urlencode(first_t))).await;
    assert_eq!(after.len(), lines.len());
    let none = export(&gw, &tok, &col, &format!("?to={}", urlencode(first_t))).await;
    assert!(none.is_empty());

    // An outside reader: DuckDB over the Hive layout.
    let archive = gw.data_dir.join("archive");
    let created = lines
        .iter()
        .filter(|l| l["payload"]["type"] == "account_created")
        .count();
    let script = format!(
        "import duckdb\n\
         glob = '{}/**/*.parquet'\n\
         con = duckdb.connect()\n\
         print(con.execute(f\"select count(*) from read_parquet('{{glob}}', hive_partitioning = true, union_by_name = true)\").fetchone()[0])\n\
         print(con.execute(f\"select count(*) from read_parquet('{{glob}}', hive_partitioning = true, union_by_name = true) where type = 'account_created'\").fetchone()[0])\n\
         print(con.execute(f\"select count(distinct collection) from read_parquet('{{glob}}', hive_partitioning = true, union_by_name = true)\").fetchone()[0])\n\
         print(con.execute(f\"select string_agg(id, ',' order by id) from read_parquet('{{glob}}', hive_partitioning = true, union_by_name = true) where type = 'account_created' and \\\"user.id\\\" >= 150\").fetchone()[0])\n",
        archive.display()
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "duckdb failed (pip install duckdb): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines_out: Vec<&str> = stdout.lines().collect();
    let counts: Vec<usize> = lines_out[..3]
        .iter()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(counts, vec![sent.len(), created, 1]);
    // The same filter through Rewind's export selects the same events as DuckDB's WHERE.
    let filtered = export(
        &gw,
        &tok,
        &col,
        &format!(
            "?filter={}",
            urlencode_all(r#"type = "account_created" AND user.id >= 150"#)
        ),
    )
    .await;
    let mut ours = ids(&filtered);
    ours.sort();
    assert_eq!(ours.len(), 50, "{filtered:?}");
    assert_eq!(ours.join(","), lines_out[3].trim());
    // A filter with a syntax error is a 400 that points at the column.
    let (s, b) = gw
        .call(
            Method::GET,
            &format!(
                "/v1/collections/{col}/export?filter={}",
                urlencode_all("type = 'x' AND (amount > 3")
            ),
            &tok,
            None,
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["error"]["code"], "invalid_filter");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("column 27"),
        "{b}"
    );
    // An unknown field selects nothing; it is not an error.
    let none = export(
        &gw,
        &tok,
        &col,
        &format!("?filter={}", urlencode_all("nope = 1")),
    )
    .await;
    assert!(none.is_empty());
}

fn urlencode_all(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn urlencode(s: &str) -> String {
    s.replace(':', "%3A").replace('+', "%2B")
}

#[tokio::test]
async fn kill_9_between_upload_and_registration_and_mid_batch_leaves_no_loss_and_no_duplicates() {
    kill_9_scenario(None).await;
}

/// Parquet objects in the archive: on the local disk, or in Garage's bucket.
pub(crate) async fn archive_objects(gw: &Gateway, garage: Option<&Garage>) -> Vec<String> {
    match garage {
        None => walk(&gw.data_dir.join("archive"))
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        Some(g) => {
            use futures::TryStreamExt;
            let store = g.store();
            let objects: Vec<_> = store.list(None).try_collect().await.unwrap();
            objects
                .into_iter()
                .map(|o| o.location.to_string())
                .filter(|p| p.ends_with(".parquet"))
                .collect()
        }
    }
}

/// Kill -9 between upload and registration, then mid-batch under load: afterwards the export
/// holds every acknowledged event exactly once. On the local disk, or on Garage.
pub(crate) async fn kill_9_scenario(garage: Option<&Garage>) {
    // First life: the archiver aborts the process right after its first upload, before it
    // registers the file.
    let mut args = vec!["--archive-flush-secs", "1"];
    if garage.is_some() {
        args.extend(["--archive", "s3://rewind/lake"]);
    }
    let mut env: Vec<(String, String)> = garage.map(Garage::env).unwrap_or_default();
    env.push(("REWIND_TEST_CRASH_AFTER_ARCHIVE_PUT".into(), "1".into()));
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut gw = Gateway::start_with_env(&args, &env_refs).await;
    let (admin, col) = gw.team_with_collection("acme", "orders").await;
    let tok = gw.token(&admin, &["ingest", "read"]).await;
    let ten: String = (0..10).map(|i| format!("{{\"i\":{i}}}\n")).collect();
    let first: Value = gw
        .send(&tok, &col, "application/x-ndjson", ten)
        .await
        .json()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while gw.child.as_mut().unwrap().try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the fault was not injected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.child = None;
    let orphans = archive_objects(&gw, garage).await;
    assert_eq!(orphans.len(), 1, "one file written, never registered");

    // Second life, normal, under sustained load; then kill -9 mid-batch.
    gw.env
        .retain(|(k, _)| k != "REWIND_TEST_CRASH_AFTER_ARCHIVE_PUT");
    gw.restart().await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn(sustained_load(
        gw.url(""),
        tok.clone(),
        col.clone(),
        4,
        50,
        false,
        stop,
    ));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    gw.kill9();
    let mut acked = load.await.unwrap();
    acked.extend(
        first["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string()),
    );

    // Third life: the archive catches up with the bus.
    let on_bus: HashSet<String> = gw.bus_ids(&["--consumer", "audit"]).into_iter().collect();
    gw.restart().await;
    let lines = wait_for_export(&gw, &tok, &col, on_bus.len(), 60).await;
    let exported = ids(&lines);
    let unique: HashSet<&String> = exported.iter().collect();
    assert_eq!(unique.len(), exported.len(), "an event was archived twice");
    assert_eq!(exported.len(), on_bus.len());
    assert!(
        acked.iter().all(|id| unique.contains(id)),
        "an acknowledged event is missing from the archive"
    );
    // The objects themselves hold no second copy (the first life's upload was re-done under
    // the same name, not beside it): DuckDB over every object counts each event once.
    let rows = archive_rows_by_duckdb(&gw, garage).await;
    assert_eq!(
        rows,
        exported.len(),
        "objects hold {rows} rows for {} events",
        exported.len()
    );
}

/// Copies Garage's objects under their keys into a temporary directory (so DuckDB reads
/// them without a network extension).
pub(crate) async fn copy_out(garage: &Garage, keys: &[String]) -> tempfile::TempDir {
    use object_store::ObjectStoreExt;
    let local = tempfile::tempdir().unwrap();
    let store = garage.store();
    for key in keys {
        let bytes = store
            .get(&object_store::path::Path::from(key.as_str()))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let path = local.path().join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    local
}

/// Rows in every archive object, counted by DuckDB (objects in Garage are copied out first).
pub(crate) async fn archive_rows_by_duckdb(gw: &Gateway, garage: Option<&Garage>) -> usize {
    let copied;
    let root = match garage {
        None => gw.data_dir.join("archive"),
        Some(g) => {
            copied = copy_out(g, &archive_objects(gw, garage).await).await;
            copied.path().to_path_buf()
        }
    };
    duckdb(&root, &["select count(*) from {glob}"])[0]
        .parse()
        .unwrap()
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    out
}

/// Runs DuckDB over the archive directory and returns the printed lines of `queries` (each a
/// SQL with `{glob}` standing for the Parquet files).
pub(crate) fn duckdb(archive: &std::path::Path, queries: &[&str]) -> Vec<String> {
    let mut script = format!(
        "import duckdb\ncon = duckdb.connect()\nsrc = \"read_parquet('{}/**/*.parquet', hive_partitioning = true, union_by_name = true)\"\n",
        archive.display()
    );
    for q in queries {
        script.push_str(&format!(
            "print(con.execute({:?}.replace('{{glob}}', src)).fetchone()[0])\n",
            q
        ));
    }
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "duckdb failed (pip install duckdb): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn compaction_merges_small_files_with_widened_columns_and_loses_nothing() {
    let gw = Gateway::start(&["--archive-flush-secs", "1", "--archive-compact-secs", "2"]).await;
    let (admin, col) = gw.team_with_collection("acme", "small-files").await;
    let tok = gw.token(&admin, &["ingest", "read"]).await;
    // Five flushes, so five small files; the schema changes between them: `amount` is an
    // integer, then a float, then a string; `extra` appears in the fourth.
    let bodies = [
        r#"[{"k":"a","amount":1},{"k":"a","amount":2}]"#,
        r#"[{"k":"b","amount":2.5}]"#,
        r#"[{"k":"c","amount":"lots"},{"k":"c","amount":3}]"#,
        r#"[{"k":"d","extra":{"x":true}}]"#,
        r#"[{"k":"e","amount":4}]"#,
    ];
    let mut sent = Vec::new();
    for body in bodies {
        let v: Value = gw
            .send(&tok, &col, "application/json", body.to_string())
            .await
            .json()
            .await
            .unwrap();
        sent.extend(
            v["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_str().unwrap().to_string()),
        );
        // Wait for this batch's file so each batch is its own file.
        wait_for_export(&gw, &tok, &col, sent.len(), 30).await;
    }
    let archive = gw.data_dir.join("archive");
    let partitions: HashSet<std::path::PathBuf> = walk(&archive)
        .iter()
        .map(|p| p.parent().unwrap().to_path_buf())
        .collect();
    // Compaction runs every 2 s on files at least 2 s old: wait for one file per partition.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let files = walk(&archive);
        if files.len() == partitions.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {} files in {} partitions:\n{}",
            files.len(),
            partitions.len(),
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let lines = export(&gw, &tok, &col, "").await;
    let mut exported = ids(&lines);
    exported.sort();
    let mut expected = sent.clone();
    expected.sort();
    assert_eq!(exported, expected, "export after compaction");
    // Look-up by id reads the merged file.
    let (status, one) = gw
        .call(
            Method::GET,
            &format!("/v1/collections/{col}/events/{}", sent[3]),
            &tok,
            None,
        )
        .await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["id"], sent[3]);
    // The payloads are the original bytes, and the merged file has the widened column.
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["payload"]["amount"] == "lots")
            .count(),
        1
    );
    let out = duckdb(
        &archive,
        &[
            "select count(*) from {glob}",
            "select count(*) from {glob} where amount = '2.5'",
            "select count(*) from {glob} where \"extra.x\"",
        ],
    );
    assert_eq!(out, vec!["7", "1", "1"]);
    // And the filter path agrees.
    let filtered = export(
        &gw,
        &tok,
        &col,
        &format!("?filter={}", urlencode_all("amount >= 2 AND k != c")),
    )
    .await;
    assert_eq!(filtered.len(), 3, "{filtered:?}");
    assert!(gw.log().contains("compacted"), "{}", gw.log());
}

#[tokio::test]
async fn bus_segments_the_archiver_has_passed_are_deleted_and_nothing_is_lost() {
    let mut gw = Gateway::start(&[
        "--archive-flush-secs",
        "1",
        "--bus-segment-bytes",
        "65536",
        "--bus-retention-secs",
        "1",
    ])
    .await;
    let (admin, col) = gw.team_with_collection("acme", "orders").await;
    let tok = gw.token(&admin, &["ingest", "read"]).await;
    let segments = |gw: &Gateway| {
        std::fs::read_dir(gw.data_dir.join("bus"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".log")
            })
            .count()
    };
    let mut sent = 0;
    for b in 0..20 {
        let body: String = (0..50)
            .map(|i| format!("{{\"b\":{b},\"i\":{i},\"pad\":\"{}\"}}\n", "y".repeat(500)))
            .collect();
        let resp = gw.send(&tok, &col, "application/x-ndjson", body).await;
        assert_eq!(resp.status(), 202);
        sent += 50;
    }
    let written = segments(&gw);
    assert!(written >= 5, "{written} segments");
    // The archiver passes them; retention (every second here) deletes all but the last.
    wait_for_export(&gw, &tok, &col, sent, 30).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while segments(&gw) > 2 {
        assert!(
            Instant::now() < deadline,
            "{} segments left of {written}:\n{}",
            segments(&gw),
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // After a restart the log opens with its prefix gone, ingest goes on, nothing is lost
    // or repeated in the archive.
    assert!(gw.terminate().success());
    gw.restart().await;
    let resp = gw
        .send(
            &tok,
            &col,
            "application/json",
            r#"{"after":"restart"}"#.to_string(),
        )
        .await;
    assert_eq!(resp.status(), 202);
    let lines = wait_for_export(&gw, &tok, &col, sent + 1, 30).await;
    let exported = ids(&lines);
    let unique: HashSet<&String> = exported.iter().collect();
    assert_eq!(unique.len(), sent + 1);
    assert_eq!(exported.len(), sent + 1);
}
