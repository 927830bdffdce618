//! The archive on a real S3-compatible store: a Garage node of the test's own on loopback
//! ports. Export, look-up by id, compaction, DuckDB over the objects,
//! the store going down under load, and kill -9 of the gateway.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;

use crate::archive::{
    archive_objects, copy_out, duckdb, export, ids, kill_9_scenario, wait_for_export,
};
use crate::support::{Garage, Gateway};

async fn gateway_on(garage: &Garage, extra: &[&str]) -> Gateway {
    let mut args = vec!["--archive", "s3://rewind/lake", "--archive-flush-secs", "1"];
    args.extend_from_slice(extra);
    let env = garage.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Gateway::start_with_env(&args, &env).await
}

fn ids_of(v: &Value) -> Vec<String> {
    v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn archive_on_garage_exports_compacts_and_is_readable_by_duckdb() {
    let garage = Garage::start();
    let gw = gateway_on(&garage, &["--archive-compact-secs", "2"]).await;
    let (admin, col) = gw.team_with_collection("acme", "orders").await;
    let tok = gw.token(&admin, &["ingest", "read"]).await;
    let mut sent = Vec::new();
    for batch in 0..3 {
        let body: String = (0..20)
            .map(|i| format!("{{\"batch\":{batch},\"i\":{i},\"type\":\"t{}\"}}\n", i % 2))
            .collect();
        let v: Value = gw
            .send(&tok, &col, "application/x-ndjson", body)
            .await
            .json()
            .await
            .unwrap();
        sent.extend(ids_of(&v));
        wait_for_export(&gw, &tok, &col, sent.len(), 30).await;
    }
    // Objects live under the prefix, in the Hive layout.
    let objects = archive_objects(&gw, Some(&garage)).await;
    assert!(!objects.is_empty());
    assert!(
        objects.iter().all(|p| p.starts_with("lake/team=")
            && p.contains("/collection=")
            && p.contains("/hour=")),
        "{objects:?}"
    );
    // Look-up by id reads the object back.
    let (s, one) = gw
        .call(
            Method::GET,
            &format!("/v1/collections/{col}/events/{}", sent[7]),
            &tok,
            None,
        )
        .await;
    assert_eq!(s, 200, "{one}");
    assert_eq!(one["payload"]["i"], 7);

    // Compaction merges the three files of each hour partition into one.
    let partitions: HashSet<String> = objects
        .iter()
        .map(|p| p.rsplit_once('/').unwrap().0.to_string())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(40);
    let objects = loop {
        let objects = archive_objects(&gw, Some(&garage)).await;
        if objects.len() == partitions.len() {
            break objects;
        }
        assert!(
            Instant::now() < deadline,
            "{} objects in {} partitions:\n{}",
            objects.len(),
            partitions.len(),
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let lines = export(&gw, &tok, &col, "").await;
    let mut exported = ids(&lines);
    exported.sort();
    let mut expected = sent.clone();
    expected.sort();
    assert_eq!(exported, expected);

    // DuckDB reads the objects as they are (copied out with their keys: no network
    // extension is needed that way).
    let local = copy_out(&garage, &objects).await;
    let out = duckdb(
        &local.path().join("lake"),
        &[
            "select count(*) from {glob}",
            "select count(*) from {glob} where type = 't1'",
        ],
    );
    assert_eq!(out, vec!["60", "30"]);
}

#[tokio::test]
async fn garage_down_under_load_keeps_ingesting_reports_behind_and_drains_after() {
    let mut garage = Garage::start();
    let gw = gateway_on(&garage, &[]).await;
    let (admin, col) = gw.team_with_collection("acme", "orders").await;
    let tok = gw.token(&admin, &["ingest", "read"]).await;
    let mut acked = Vec::new();
    let v: Value = gw
        .send(&tok, &col, "application/json", r#"[{"n":0}]"#.to_string())
        .await
        .json()
        .await
        .unwrap();
    acked.extend(ids_of(&v));
    wait_for_export(&gw, &tok, &col, 1, 30).await;

    garage.stop();
    // Ingestion goes on while the store is down: every request is acknowledged.
    let until = Instant::now() + Duration::from_secs(4);
    let mut n = 1;
    while Instant::now() < until {
        let body: String = (0..50).map(|i| format!("{{\"n\":{}}}\n", n + i)).collect();
        n += 50;
        let resp = gw.send(&tok, &col, "application/x-ndjson", body).await;
        assert_eq!(resp.status(), 202);
        acked.extend(ids_of(&resp.json().await.unwrap()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // /readyz says the archive is behind, with the store's error and the lag.
    let deadline = Instant::now() + Duration::from_secs(90);
    let ready = loop {
        let (_, ready) = gw.call(Method::GET, "/readyz", "", None).await;
        if ready["backends"]["archive"]["behind"] == true {
            break ready;
        }
        assert!(Instant::now() < deadline, "never reported behind: {ready}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let archive = &ready["backends"]["archive"];
    assert!(
        archive["detail"].as_str().unwrap().contains("archive"),
        "{archive}"
    );
    assert!(
        archive["buffered_events"].as_u64().unwrap() > 0
            || archive["lag_messages"].as_u64().unwrap() > 0,
        "{archive}"
    );

    // The store returns: the backlog drains, and every acknowledged id is there exactly once.
    garage.restart();
    let lines = wait_for_export(&gw, &tok, &col, acked.len(), 120).await;
    let exported = ids(&lines);
    let unique: HashSet<&String> = exported.iter().collect();
    assert_eq!(unique.len(), exported.len(), "an event was archived twice");
    assert_eq!(exported.len(), acked.len());
    assert!(acked.iter().all(|id| unique.contains(id)));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, ready) = gw.call(Method::GET, "/readyz", "", None).await;
        if ready["backends"]["archive"]["behind"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "still behind: {ready}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn kill_9_on_garage_leaves_no_loss_and_no_duplicates() {
    let garage = Garage::start();
    kill_9_scenario(Some(&garage)).await;
}
