//! Teams, tokens, collections and the auth rules around them, over REST, on SQLite and on
//! PostgreSQL.

use reqwest::Method;
use serde_json::json;

use crate::support::{Gateway, ROOT};

async fn admin_flow(gw: &Gateway) {
    // Health and readiness.
    let (s, body) = gw.call(Method::GET, "/readyz", "", None).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["backends"]["metastore"]["ready"], true);
    assert_eq!(body["backends"]["bus"]["ready"], true);

    let (admin_a, orders_a) = gw.team_with_collection("team-a", "orders").await;
    let (admin_b, orders_b) = gw.team_with_collection("team-b", "orders").await;
    assert_ne!(orders_a, orders_b);

    // Duplicate names: 409.
    let (s, body) = gw
        .call(
            Method::POST,
            "/v1/teams",
            ROOT,
            Some(json!({"name": "team-a"})),
        )
        .await;
    assert_eq!(s, 409, "{body}");
    assert_eq!(body["error"]["code"], "already_exists");
    let (s, _) = gw
        .call(
            Method::POST,
            "/v1/collections",
            &admin_a,
            Some(json!({"name": "orders"})),
        )
        .await;
    assert_eq!(s, 409);
    // Bad names and bodies: 400.
    let (s, body) = gw
        .call(
            Method::POST,
            "/v1/collections",
            &admin_a,
            Some(json!({"name": "a b"})),
        )
        .await;
    assert_eq!(s, 400, "{body}");
    let (s, body) = gw
        .call(
            Method::POST,
            "/v1/collections",
            &admin_a,
            Some(json!({"nom": "x"})),
        )
        .await;
    assert_eq!(s, 400, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("name"),
        "{body}"
    );

    // Tokens: shown once, listed without secrets.
    let (s, created) = gw
        .call(
            Method::POST,
            "/v1/tokens",
            &admin_a,
            Some(json!({"name": "ci", "scopes": ["ingest", "read"]})),
        )
        .await;
    assert_eq!(s, 201, "{created}");
    let ingest = created["token"].as_str().unwrap().to_string();
    assert!(ingest.starts_with("rw_") && ingest.len() >= 31);
    assert_eq!(created["scopes"], json!(["ingest", "read"]));
    let (s, list) = gw.call(Method::GET, "/v1/tokens", &admin_a, None).await;
    assert_eq!(s, 200);
    let text = list.to_string();
    assert!(
        !text.contains(&ingest) && !text.contains(&admin_a),
        "secrets must not be listed: {text}"
    );
    assert_eq!(list["tokens"].as_array().unwrap().len(), 2);
    let (s, body) = gw
        .call(
            Method::POST,
            "/v1/tokens",
            &admin_a,
            Some(json!({"name": "x", "scopes": ["god"]})),
        )
        .await;
    assert_eq!(s, 400, "{body}");

    // Missing scope: 403. Root token outside team management: 403. Team token on /v1/teams: 403.
    let (s, body) = gw
        .call(
            Method::POST,
            "/v1/collections",
            &ingest,
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!(s, 403, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("admin"),
        "{body}"
    );
    let (s, _) = gw.call(Method::GET, "/v1/collections", ROOT, None).await;
    assert_eq!(s, 403);
    let (s, _) = gw
        .call(
            Method::POST,
            "/v1/teams",
            &admin_a,
            Some(json!({"name": "t3"})),
        )
        .await;
    assert_eq!(s, 403);

    // Unknown, malformed, mistyped tokens and no token at all: 401.
    let (s, body) = gw.call(Method::GET, "/v1/collections", "", None).await;
    assert_eq!(s, 401, "{body}");
    let mut typo = ingest.clone().into_bytes();
    typo[6] = if typo[6] == b'a' { b'b' } else { b'a' };
    let (s, body) = gw
        .call(
            Method::GET,
            "/v1/collections",
            std::str::from_utf8(&typo).unwrap(),
            None,
        )
        .await;
    assert_eq!(s, 401);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("checksum"),
        "{body}"
    );
    let fresh_unknown = rewind_gateway::auth::tokens::generate();
    let (s, body) = gw
        .call(Method::GET, "/v1/collections", &fresh_unknown, None)
        .await;
    assert_eq!(s, 401);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown or revoked"),
        "{body}"
    );
    let resp = gw
        .http
        .get(gw.url("/v1/collections"))
        .header("authorization", format!("Basic {ingest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // Isolation: team A's tokens never see team B's collection, by id or by name.
    let (s, body) = gw
        .call(
            Method::GET,
            &format!("/v1/collections/{orders_b}"),
            &admin_a,
            None,
        )
        .await;
    assert_eq!(s, 404, "{body}");
    assert!(!body.to_string().contains("team-b"));
    let resp = gw
        .send(&ingest, &orders_b, "application/json", r#"{"x":1}"#)
        .await;
    assert_eq!(resp.status(), 404);
    let text = resp.text().await.unwrap();
    assert!(!text.contains("team-b"), "{text}");
    let (s, list) = gw
        .call(Method::GET, "/v1/collections", &admin_a, None)
        .await;
    assert_eq!(s, 200);
    assert!(!list.to_string().contains(&orders_b), "{list}");
    assert_eq!(list["collections"][0]["id"], orders_a.as_str());
    // B cannot revoke A's token either.
    let token_id = created["id"].as_str().unwrap();
    let (s, _) = gw
        .call(
            Method::DELETE,
            &format!("/v1/tokens/{token_id}"),
            &admin_b,
            None,
        )
        .await;
    assert_eq!(s, 404);

    // Revocation takes effect on the next request.
    assert_eq!(
        gw.send(&ingest, &orders_a, "application/json", r#"{"x":1}"#)
            .await
            .status(),
        202
    );
    let (s, _) = gw
        .call(
            Method::DELETE,
            &format!("/v1/tokens/{token_id}"),
            &admin_a,
            None,
        )
        .await;
    assert_eq!(s, 204);
    let resp = gw
        .send(&ingest, &orders_a, "application/json", r#"{"x":1}"#)
        .await;
    assert_eq!(resp.status(), 401);
    let (s, list) = gw.call(Method::GET, "/v1/tokens", &admin_a, None).await;
    assert_eq!(s, 200);
    assert!(
        list["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == token_id && !t["revoked_at"].is_null())
    );

    // Unknown routes: JSON 404.
    let (s, body) = gw.call(Method::GET, "/v2/nothing", &admin_a, None).await;
    assert_eq!(s, 404);
    assert_eq!(body["error"]["code"], "not_found");

    // The log never contains a token.
    let log = gw.log();
    assert!(
        !log.contains(&ingest) && !log.contains(&admin_a) && !log.contains(ROOT),
        "a token leaked into the log"
    );
}

#[tokio::test]
async fn admin_and_auth_on_sqlite() {
    let gw = Gateway::start(&[]).await;
    admin_flow(&gw).await;
}

#[tokio::test]
async fn admin_and_auth_on_postgres() {
    let base = std::env::var("REWIND_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let db = format!("rewind_e2e_{}", std::process::id());
    let admin = std::process::Command::new("psql")
        .arg(&base)
        .args([
            "-c",
            &format!("DROP DATABASE IF EXISTS {db}"),
            "-c",
            &format!("CREATE DATABASE {db}"),
        ])
        .output()
        .expect("psql must be installed");
    assert!(
        admin.status.success(),
        "{}",
        String::from_utf8_lossy(&admin.stderr)
    );
    let url = format!("{}/{db}", &base[..base.rfind('/').unwrap()]);
    let gw = Gateway::start(&["--metastore", &url]).await;
    admin_flow(&gw).await;
    let (_, ready) = gw.call(Method::GET, "/readyz", "", None).await;
    assert_eq!(ready["backends"]["metastore"]["kind"], "postgres");
    drop(gw);
    let _ = std::process::Command::new("psql")
        .arg(&base)
        .args(["-c", &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")])
        .output();
}

#[tokio::test]
async fn bad_configuration_fails_at_start_naming_the_setting() {
    let out = std::process::Command::new(crate::support::rewind_bin())
        .args(["serve", "--bus", "kafka://nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`bus`") && err.contains("nats://"), "{err}");
}
