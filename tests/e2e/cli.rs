//! The `rewind` CLI against a running gateway: team, token, collection, send.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::support::{Gateway, ROOT, rewind_bin};

fn rewind(gw: &Gateway, token: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(rewind_bin())
        .args(args)
        .env("REWIND_URL", gw.url(""))
        .env("REWIND_TOKEN", token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test]
async fn cli_manages_teams_tokens_collections_and_sends() {
    let mut gw = Gateway::start(&[]).await;
    let (ok, out, err) = rewind(&gw, ROOT, &["team", "create", "acme"], None);
    assert!(ok, "{err}");
    let team: Value = serde_json::from_str(&out).unwrap();
    let admin = team["admin_token"].as_str().unwrap();

    let (ok, out, err) = rewind(&gw, admin, &["collection", "create", "orders"], None);
    assert!(ok, "{err}");
    let col: Value = serde_json::from_str(&out).unwrap();
    let (ok, out, _) = rewind(&gw, admin, &["collection", "list"], None);
    assert!(ok && out.contains("orders"));
    let (ok, out, err) = rewind(
        &gw,
        admin,
        &["token", "create", "ci", "--scope", "ingest,read"],
        None,
    );
    assert!(ok, "{err}");
    let tok: Value = serde_json::from_str(&out).unwrap();
    let ingest = tok["token"].as_str().unwrap();
    let (ok, out, _) = rewind(&gw, admin, &["token", "list"], None);
    assert!(ok && out.contains("\"ci\"") && !out.contains(ingest));

    // send: 1,234 NDJSON lines from stdin in batches of 100.
    let input: String = (0..1234).map(|i| format!("{{\"i\":{i}}}\n")).collect();
    let (ok, out, err) = rewind(
        &gw,
        ingest,
        &["send", "orders", "--batch", "100", "--print-ids"],
        Some(&input),
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 1234);
    assert!(err.contains("1234 events stored"), "{err}");

    // Bad input: a malformed line is reported with its line number; a wrong token fails.
    let (ok, _, err) = rewind(&gw, ingest, &["send", "orders"], Some("{\"a\":1}\n{oops\n"));
    assert!(!ok);
    assert!(err.contains("line 2"), "{err}");
    let (ok, _, err) = rewind(&gw, "rw_nope", &["collection", "list"], None);
    assert!(!ok && err.contains("401"), "{err}");

    let id = tok["id"].as_str().unwrap();
    let (ok, _, err) = rewind(&gw, admin, &["token", "revoke", id], None);
    assert!(ok, "{err}");
    let (ok, _, err) = rewind(
        &gw,
        ingest,
        &["send", col["id"].as_str().unwrap()],
        Some("{}\n"),
    );
    assert!(!ok && err.contains("revoked"), "{err}");

    gw.terminate();
    assert_eq!(gw.bus_ids(&[]).len(), 1234);
}

#[test]
fn help_explains_every_command() {
    let out = Command::new(rewind_bin()).arg("--help").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for cmd in ["serve", "team", "token", "collection", "send", "bus"] {
        assert!(text.contains(cmd), "{cmd} missing from --help:\n{text}");
    }
    let out = Command::new(rewind_bin())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen",
        "--data-dir",
        "--bus",
        "--metastore",
        "--archive",
        "--search",
        "--archive-flush-secs",
        "--allow-private-destinations",
        "REWIND_LISTEN",
    ] {
        assert!(text.contains(flag), "{flag} missing from serve --help");
    }
}

#[tokio::test]
async fn cli_exports_with_a_time_range_and_a_filter() {
    let gw = Gateway::start(&["--archive-flush-secs", "1"]).await;
    let (admin, _col) = gw.team_with_collection("acme", "orders").await;
    let tok = gw.token(&admin, &["ingest", "read"]).await;
    let input: String = (0..300).map(|i| format!("{{\"i\":{i}}}\n")).collect();
    let (ok, _, err) = rewind(&gw, &tok, &["send", "orders"], Some(&input));
    assert!(ok, "{err}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let all = loop {
        let (ok, out, err) = rewind(&gw, &tok, &["export", "orders"], None);
        assert!(ok, "{err}");
        if out.lines().count() == 300 {
            break out;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} lines",
            out.lines().count()
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    // Oldest first, one JSON object a line.
    let first: Value = serde_json::from_str(all.lines().next().unwrap()).unwrap();
    assert!(first["id"].is_string() && first["received_at"].is_string());
    let (ok, out, err) = rewind(
        &gw,
        &tok,
        &["export", "orders", "--filter", "i >= 250 AND i != 260"],
        None,
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 49);
    let (ok, out, err) = rewind(
        &gw,
        &tok,
        &["export", "orders", "--to", "2000-01-01T00:00:00Z"],
        None,
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 0);
    // A bad filter fails with the server's message, pointing at the column.
    let (ok, _, err) = rewind(&gw, &tok, &["export", "orders", "--filter", "i >="], None);
    assert!(!ok);
    assert!(err.contains("column 5"), "{err}");
}

#[tokio::test]
async fn bus_forget_removes_a_stale_consumer_only_while_the_gateway_is_stopped() {
    let mut gw = Gateway::start(&[]).await;
    let (admin, col) = gw.team_with_collection("acme", "orders").await;
    let tok = gw.token(&admin, &["ingest"]).await;
    let resp = gw
        .send(
            &tok,
            &col,
            "application/json",
            r#"[{"a":1},{"a":2}]"#.to_string(),
        )
        .await;
    assert_eq!(resp.status(), 202);
    let forget = |gw: &Gateway, name: &str| {
        Command::new(rewind_bin())
            .args(["bus", "forget", name, "--data-dir"])
            .arg(&gw.data_dir)
            .env("REWIND_ROOT_TOKEN", ROOT)
            .output()
            .unwrap()
    };
    // While the gateway runs, the log is locked.
    let out = forget(&gw, "archiver");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(gw.terminate().success());
    // A consumer that read and acknowledged, then went away.
    let read = crate::support::bus_read(&gw.data_dir, &gw.args, &["--consumer", "audit", "--ack"]);
    assert_eq!(read.len(), 2);
    let offsets = gw.data_dir.join("bus/consumers/audit.offset");
    assert!(offsets.exists());
    let out = forget(&gw, "audit");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("forgot consumer audit (it was at position 1)")
    );
    assert!(!offsets.exists());
    // An unknown name is an error that says so.
    let out = forget(&gw, "audit");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no consumer named"));
}
