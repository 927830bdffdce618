//! One suite, every backend: what any [`Metastore`] must do. Runs on SQLite (a temp file) and
//! on PostgreSQL (`REWIND_TEST_POSTGRES_URL`, default the local server's `test` database; each
//! run gets a fresh database of its own, dropped afterwards).

use super::*;
use crate::auth::Scope;
use crate::ids::{new_id, now_micros};

fn token(team_id: &str, name: &str, scopes: &[Scope]) -> TokenRecord {
    let secret = crate::auth::tokens::generate();
    TokenRecord {
        id: new_id("tok"),
        team_id: team_id.into(),
        name: name.into(),
        hash: crate::auth::tokens::hash(&secret),
        prefix: secret[..7].into(),
        scopes: scopes.iter().copied().collect(),
        created_at: now_micros(),
        revoked_at: None,
    }
}

fn team(name: &str) -> Team {
    Team {
        id: new_id("tm"),
        name: name.into(),
        created_at: now_micros(),
    }
}

async fn contract_suite(store: &dyn Metastore) {
    store.ping().await.unwrap();

    // Teams come with an admin token, atomically.
    let a = team("team-a");
    let a_admin = token(&a.id, "admin", &[Scope::Admin]);
    store.create_team(&a, &a_admin).await.unwrap();
    let b = team("team-b");
    let b_admin = token(&b.id, "admin", &[Scope::Admin]);
    store.create_team(&b, &b_admin).await.unwrap();

    // A duplicate team name is refused, and its token is not left behind.
    let dup = team("team-a");
    let dup_token = token(&dup.id, "admin", &[Scope::Admin]);
    assert!(matches!(
        store.create_team(&dup, &dup_token).await,
        Err(MetaError::AlreadyExists { what: "team", .. })
    ));
    assert!(
        store
            .token_by_hash(&dup_token.hash)
            .await
            .unwrap()
            .is_none()
    );

    // Tokens: found by hash, listed per team only, revoked once.
    let ingest = token(&a.id, "ci", &[Scope::Ingest, Scope::Read]);
    store.create_token(&ingest).await.unwrap();
    let found = store.token_by_hash(&ingest.hash).await.unwrap().unwrap();
    assert_eq!(found, ingest);
    assert!(found.scopes.contains(Scope::Read) && !found.scopes.contains(Scope::Admin));
    let listed: Vec<String> = store
        .list_tokens(&a.id)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&ingest.id) && listed.contains(&a_admin.id));
    assert!(!listed.contains(&b_admin.id));

    // Team B cannot revoke team A's token.
    assert!(
        !store
            .revoke_token(&b.id, &ingest.id, now_micros())
            .await
            .unwrap()
    );
    assert!(
        store
            .token_by_hash(&ingest.hash)
            .await
            .unwrap()
            .unwrap()
            .revoked_at
            .is_none()
    );
    assert!(
        store
            .revoke_token(&a.id, &ingest.id, now_micros())
            .await
            .unwrap()
    );
    assert!(
        !store
            .revoke_token(&a.id, &ingest.id, now_micros())
            .await
            .unwrap()
    );
    assert!(
        store
            .token_by_hash(&ingest.hash)
            .await
            .unwrap()
            .unwrap()
            .revoked_at
            .is_some()
    );

    // Collections: names unique per team, not across teams; lookups never cross teams.
    let orders_a = Collection {
        id: new_id("col"),
        team_id: a.id.clone(),
        name: "orders".into(),
        created_at: now_micros(),
        search_window_secs: None,
    };
    store.create_collection(&orders_a).await.unwrap();
    let orders_b = Collection {
        id: new_id("col"),
        team_id: b.id.clone(),
        name: "orders".into(),
        created_at: now_micros(),
        search_window_secs: None,
    };
    store.create_collection(&orders_b).await.unwrap();
    let again = Collection {
        id: new_id("col"),
        ..orders_a.clone()
    };
    assert!(matches!(
        store.create_collection(&again).await,
        Err(MetaError::AlreadyExists {
            what: "collection",
            ..
        })
    ));
    assert_eq!(
        store.get_collection(&a.id, &orders_a.id).await.unwrap(),
        Some(orders_a.clone())
    );
    assert_eq!(
        store.get_collection(&a.id, "orders").await.unwrap(),
        Some(orders_a.clone())
    );
    assert_eq!(
        store.get_collection(&b.id, "orders").await.unwrap(),
        Some(orders_b.clone())
    );
    assert_eq!(
        store.get_collection(&b.id, &orders_a.id).await.unwrap(),
        None
    );
    let users = Collection {
        id: new_id("col"),
        team_id: a.id.clone(),
        name: "users".into(),
        created_at: now_micros(),
        search_window_secs: None,
    };
    store.create_collection(&users).await.unwrap();
    let names: Vec<String> = store
        .list_collections(&a.id)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, vec!["orders", "users"]);
    assert_eq!(
        store.list_collections(&b.id).await.unwrap(),
        vec![orders_b.clone()]
    );
    // Search windows: set and reset within the team only.
    assert!(
        !store
            .set_search_window(&b.id, &orders_a.id, Some(60))
            .await
            .unwrap()
    );
    assert!(
        store
            .set_search_window(&a.id, &orders_a.id, Some(3600))
            .await
            .unwrap()
    );
    let got = store
        .get_collection(&a.id, &orders_a.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.search_window_secs, Some(3600));
    assert!(
        store
            .all_collections()
            .await
            .unwrap()
            .iter()
            .any(|c| c.id == orders_b.id && c.search_window_secs.is_none())
    );
    store
        .set_search_window(&a.id, &orders_a.id, None)
        .await
        .unwrap();

    // The archive manifest: files and checkpoint in one step, listed by time, per team.
    let file = |min: i64, max: i64, pos: i64| ArchiveFile {
        id: new_id("af"),
        team_id: a.id.clone(),
        collection_id: orders_a.id.clone(),
        path: format!("team={}/collection={}/{pos}.parquet", a.id, orders_a.id),
        rows: 10,
        bytes: 100,
        min_received_at: min,
        max_received_at: max,
        min_position: pos,
        max_position: pos,
        schema_version: 1,
        created_at: now_micros(),
    };
    let col = |name: &str, ty: &str| StoredColumn {
        collection_id: orders_a.id.clone(),
        name: name.into(),
        type_name: ty.into(),
        first_seen: 1,
        widened_at: None,
        widened_from: None,
    };
    store
        .register_archive_files(
            &[file(100, 200, 1), file(300, 400, 2)],
            &orders_a.id,
            2,
            &[col("amount", "int64")],
        )
        .await
        .unwrap();
    store
        .register_archive_files(
            &[file(150, 250, 3)],
            &orders_a.id,
            3,
            &[StoredColumn {
                widened_at: Some(5),
                widened_from: Some("int64".into()),
                ..col("amount", "string")
            }],
        )
        .await
        .unwrap();
    assert_eq!(
        store.archive_checkpoints().await.unwrap(),
        vec![(orders_a.id.clone(), 3)]
    );
    let listed: Vec<i64> = store
        .list_archive_files(&a.id, &orders_a.id, 0, i64::MAX)
        .await
        .unwrap()
        .iter()
        .map(|f| f.min_received_at)
        .collect();
    assert_eq!(listed, vec![100, 150, 300]);
    let listed: Vec<i64> = store
        .list_archive_files(&a.id, &orders_a.id, 260, 301)
        .await
        .unwrap()
        .iter()
        .map(|f| f.min_received_at)
        .collect();
    assert_eq!(listed, vec![300]);
    assert!(
        store
            .list_archive_files(&b.id, &orders_a.id, 0, i64::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.archive_paths(&orders_a.id).await.unwrap().len(), 3);
    // Compaction: small, old files are candidates; a swap replaces them atomically, and a
    // swap naming a file that is gone changes nothing.
    let candidates = store.compaction_candidates(101, i64::MAX).await.unwrap();
    assert_eq!(candidates.len(), 3);
    assert!(
        store
            .compaction_candidates(100, i64::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .compaction_candidates(101, 0)
            .await
            .unwrap()
            .is_empty()
    );
    let merged = ArchiveFile {
        path: format!("team={}/collection={}/merged.parquet", a.id, orders_a.id),
        rows: 20,
        ..file(100, 250, 1)
    };
    let old = candidates[..2].to_vec();
    store
        .add_pending_objects(std::slice::from_ref(&merged.path), "gw1", 10)
        .await
        .unwrap();
    assert_eq!(
        store.pending_objects("gw1", 0).await.unwrap(),
        vec![(merged.path.clone(), false)]
    );
    assert!(
        store
            .replace_archive_files(&old, &merged, "gw1")
            .await
            .unwrap()
    );
    // The merged file is no longer pending; the replaced ones are, to be deleted.
    let mut pending = store.pending_objects("gw1", 0).await.unwrap();
    pending.sort();
    let mut expected: Vec<(String, bool)> = old.iter().map(|f| (f.path.clone(), false)).collect();
    expected.sort();
    assert_eq!(pending, expected);
    assert!(store.pending_objects("gw2", 0).await.unwrap().is_empty());
    assert_eq!(
        store.pending_objects("gw2", i64::MAX).await.unwrap().len(),
        2
    );
    let paths: Vec<String> = old.iter().map(|f| f.path.clone()).collect();
    store.remove_pending_objects(&paths).await.unwrap();
    assert!(
        store
            .pending_objects("gw1", i64::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    let stale = ArchiveFile {
        path: "elsewhere.parquet".into(),
        ..file(0, 1, 9)
    };
    assert!(
        !store
            .replace_archive_files(&old, &stale, "gw1")
            .await
            .unwrap()
    );
    let rows: Vec<i64> = store
        .list_archive_files(&a.id, &orders_a.id, 0, i64::MAX)
        .await
        .unwrap()
        .iter()
        .map(|f| f.rows)
        .collect();
    assert_eq!(rows, vec![20, 10]);
    let cols = store.collection_columns(Some(&orders_a.id)).await.unwrap();
    assert_eq!(cols.len(), 1);
    assert_eq!(
        (cols[0].type_name.as_str(), cols[0].widened_from.as_deref()),
        ("string", Some("int64"))
    );
    // A path registered twice is refused, and the checkpoint does not move.
    assert!(
        store
            .register_archive_files(&[file(1, 2, 3)], &orders_a.id, 9, &[])
            .await
            .is_err()
    );
    assert_eq!(
        store.archive_checkpoints().await.unwrap(),
        vec![(orders_a.id.clone(), 3)]
    );

    plugins_and_destinations(store, &a.id, &b.id, &orders_a.id).await;
    replays(store, &a.id, &b.id, &orders_a.id).await;
}

async fn replays(store: &dyn Metastore, a: &str, b: &str, orders_a: &str) {
    let now = now_micros();
    let r = ReplayRecord {
        id: new_id("rpl"),
        team_id: a.into(),
        collection_id: orders_a.into(),
        spec: "{}".into(),
        status: "pending".into(),
        total: None,
        delivered: 0,
        failed: 0,
        retried: 0,
        checkpoint: None,
        rate_milli: 0,
        error: None,
        owner: None,
        lease_until: 0,
        created_at: now,
        updated_at: now,
        started_at: None,
        finished_at: None,
    };
    store.create_replay(&r).await.unwrap();
    assert_eq!(store.get_replay(a, &r.id).await.unwrap(), Some(r.clone()));
    // Another team sees nothing of it.
    assert_eq!(store.get_replay(b, &r.id).await.unwrap(), None);
    assert!(store.list_replays(b, 10).await.unwrap().is_empty());
    assert!(
        !store
            .set_replay_status(b, &r.id, &["pending"], "cancelled", None)
            .await
            .unwrap()
    );
    assert_eq!(store.list_replays(a, 10).await.unwrap().len(), 1);

    // One gateway claims it; another cannot while the lease holds, can once it expired.
    let claimed = store
        .claim_replays("gw1", now, now + 1_000_000)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].owner.as_deref(), Some("gw1"));
    assert!(
        store
            .claim_replays("gw2", now, now + 1_000_000)
            .await
            .unwrap()
            .is_empty()
    );
    // Its own claims come back to the same gateway (a restart with the same instance id).
    assert_eq!(
        store
            .claim_replays("gw1", now, now + 1_000_000)
            .await
            .unwrap()
            .len(),
        1
    );

    assert!(
        store
            .set_replay_status(a, &r.id, &["pending"], "running", None)
            .await
            .unwrap()
    );
    assert_eq!(store.running_replays(a).await.unwrap(), 1);
    assert_eq!(store.running_replays(b).await.unwrap(), 0);
    let progress = ReplayProgress {
        total: Some(10),
        delivered: 4,
        failed: 1,
        retried: 2,
        checkpoint: Some((now, "01J".into())),
        rate_milli: 5000,
    };
    assert!(
        store
            .save_replay_progress(&r.id, "gw1", &progress, now + 2_000_000)
            .await
            .unwrap()
    );
    // A gateway that lost the lease cannot record progress.
    assert!(
        !store
            .save_replay_progress(&r.id, "gw2", &progress, now + 2_000_000)
            .await
            .unwrap()
    );
    let got = store.get_replay(a, &r.id).await.unwrap().unwrap();
    assert_eq!(
        (got.total, got.delivered, got.failed, got.retried),
        (Some(10), 4, 1, 2)
    );
    assert_eq!(got.checkpoint, Some((now, "01J".into())));
    assert!(got.started_at.is_some());
    // The lease runs out: another gateway takes over.
    let later = now + 3_000_000;
    let taken = store
        .claim_replays("gw2", later, later + 1_000_000)
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].checkpoint, Some((now, "01J".into())));
    store.release_replay(&r.id, "gw2").await.unwrap();
    assert_eq!(
        store.get_replay(a, &r.id).await.unwrap().unwrap().owner,
        None
    );

    // Transitions only from the named states; terminal ones set finished_at and the error.
    assert!(
        !store
            .set_replay_status(a, &r.id, &["paused"], "running", None)
            .await
            .unwrap()
    );
    assert!(
        store
            .set_replay_status(
                a,
                &r.id,
                &["running", "paused"],
                "failed",
                Some("too many failures")
            )
            .await
            .unwrap()
    );
    let got = store.get_replay(a, &r.id).await.unwrap().unwrap();
    assert_eq!(got.status, "failed");
    assert_eq!(got.error.as_deref(), Some("too many failures"));
    assert!(got.finished_at.is_some());
    // Finished replays are never claimed.
    assert!(
        store
            .claim_replays("gw3", later * 2, later * 2)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn plugins_and_destinations(store: &dyn Metastore, a: &str, b: &str, orders_a: &str) {
    let plugin = PluginRecord {
        id: new_id("plg"),
        team_id: a.into(),
        name: "webhook".into(),
        version: "1.0.0".into(),
        kind: "destination".into(),
        sha256: "ab".repeat(32),
        bytes: 1234,
        created_at: now_micros(),
    };
    store.create_plugin(&plugin).await.unwrap();
    // name@version is unique per team, not across teams.
    let again = PluginRecord {
        id: new_id("plg"),
        ..plugin.clone()
    };
    assert!(matches!(
        store.create_plugin(&again).await,
        Err(MetaError::AlreadyExists { .. })
    ));
    store
        .create_plugin(&PluginRecord {
            id: new_id("plg"),
            team_id: b.into(),
            ..plugin.clone()
        })
        .await
        .unwrap();
    assert_eq!(
        store.get_plugin(a, &plugin.id).await.unwrap(),
        Some(plugin.clone())
    );
    assert_eq!(
        store.get_plugin(a, "webhook@1.0.0").await.unwrap(),
        Some(plugin.clone())
    );
    assert_eq!(store.get_plugin(a, "webhook@2.0.0").await.unwrap(), None);
    // Another team's id is not found.
    assert_eq!(store.get_plugin(b, &plugin.id).await.unwrap(), None);
    assert_eq!(store.list_plugins(a).await.unwrap(), vec![plugin.clone()]);

    let dest = DestinationRecord {
        id: new_id("plg"),
        team_id: a.into(),
        name: "crm".into(),
        plugin_id: plugin.id.clone(),
        config: r#"{"url":"https://crm.example.com"}"#.into(),
        created_at: now_micros(),
    };
    store.create_destination(&dest).await.unwrap();
    assert!(
        store
            .create_destination(&DestinationRecord {
                id: new_id("plg"),
                ..dest.clone()
            })
            .await
            .is_err()
    );
    assert_eq!(
        store.get_destination(a, "crm").await.unwrap(),
        Some(dest.clone())
    );
    assert_eq!(store.get_destination(b, &dest.id).await.unwrap(), None);
    assert_eq!(
        store.list_destinations(a).await.unwrap(),
        vec![dest.clone()]
    );
    // A plugin in use is not deleted; once unused it is.
    assert_eq!(
        store.delete_plugin(a, &plugin.id).await.unwrap(),
        Err(vec!["destination crm".to_string()])
    );
    assert!(
        !store.delete_destination(b, &dest.id).await.unwrap(),
        "another team cannot delete it"
    );
    assert!(store.delete_destination(a, &dest.id).await.unwrap());
    // A pipeline that uses it holds it too.
    let steps = format!(
        r#"[{{"plugin_id":"{}","plugin":"webhook@1.0.0","config":{{}}}}]"#,
        plugin.id
    );
    store.set_pipeline(a, orders_a, Some(&steps)).await.unwrap();
    assert_eq!(
        store.get_pipeline(a, orders_a).await.unwrap(),
        Some(steps.clone())
    );
    assert_eq!(store.get_pipeline(b, orders_a).await.unwrap(), None);
    assert_eq!(
        store.delete_plugin(a, &plugin.id).await.unwrap(),
        Err(vec!["the pipeline of collection orders".to_string()])
    );
    store.set_pipeline(a, orders_a, None).await.unwrap();
    let hook = HookRecord {
        id: "hk_0123456789abcdef".into(),
        team_id: a.into(),
        name: "github".into(),
        plugin_id: plugin.id.clone(),
        collection_id: orders_a.into(),
        config: "{}".into(),
        created_at: now_micros(),
    };
    store.create_hook(&hook).await.unwrap();
    assert_eq!(
        store.hook_by_id(&hook.id).await.unwrap(),
        Some(hook.clone())
    );
    assert_eq!(store.list_hooks(b).await.unwrap(), vec![]);
    assert_eq!(
        store.delete_plugin(a, &plugin.id).await.unwrap(),
        Err(vec!["hook github".to_string()])
    );
    assert!(!store.delete_hook(b, "github").await.unwrap());
    assert!(store.delete_hook(a, "github").await.unwrap());
    assert_eq!(store.hook_by_id(&hook.id).await.unwrap(), None);
    let source = super::SourceRecord {
        id: "src_0123456789abcdef".into(),
        team_id: a.into(),
        name: "orders-bus".into(),
        plugin_id: plugin.id.clone(),
        collection_id: orders_a.into(),
        config: "{}".into(),
        url: "nats://10.0.0.1:4222".into(),
        subject: "orders.>".into(),
        created_at: now_micros(),
    };
    store.create_source(&source).await.unwrap();
    assert!(matches!(
        store.create_source(&source.clone()).await,
        Err(MetaError::AlreadyExists { .. })
    ));
    assert_eq!(store.list_sources(a).await.unwrap(), vec![source.clone()]);
    assert_eq!(store.list_sources(b).await.unwrap(), vec![]);
    assert!(store.all_sources().await.unwrap().contains(&source));
    assert_eq!(
        store.delete_plugin(a, &plugin.id).await.unwrap(),
        Err(vec!["source orders-bus".to_string()])
    );
    assert!(!store.delete_source(b, "orders-bus").await.unwrap());
    assert!(store.delete_source(a, &source.id).await.unwrap());
    assert_eq!(store.list_sources(a).await.unwrap(), vec![]);
    assert_eq!(store.get_pipeline(a, orders_a).await.unwrap(), None);
    assert_eq!(store.delete_plugin(a, &plugin.id).await.unwrap(), Ok(true));
    assert_eq!(store.get_plugin(a, &plugin.id).await.unwrap(), None);
}

#[tokio::test]
async fn sqlite_passes_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    let store = SqlMetastore::open_sqlite(&path).await.unwrap();
    contract_suite(&store).await;
    drop(store);
    // Reopening runs migrations again without error and keeps the data.
    let store = SqlMetastore::open_sqlite(&path).await.unwrap();
    assert_eq!(store.kind(), "sqlite");
    assert!(
        store
            .get_collection("nope", "orders")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn the_cache_passes_the_contract_and_forgets_revoked_tokens_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let inner: std::sync::Arc<dyn Metastore> = std::sync::Arc::new(
        SqlMetastore::open_sqlite(&dir.path().join("m.db"))
            .await
            .unwrap(),
    );
    let store = CachedMetastore::new(inner, None);
    contract_suite(&store).await;
    let t = team("cached");
    let tok = token(&t.id, "admin", &[Scope::Admin]);
    store.create_team(&t, &tok).await.unwrap();
    assert!(store.token_by_hash(&tok.hash).await.unwrap().is_some());
    assert!(
        store
            .revoke_token(&t.id, &tok.id, now_micros())
            .await
            .unwrap()
    );
    assert!(
        store
            .token_by_hash(&tok.hash)
            .await
            .unwrap()
            .unwrap()
            .revoked_at
            .is_some()
    );
}

#[tokio::test]
async fn postgres_passes_the_contract() {
    let base = std::env::var("REWIND_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    sqlx::any::install_default_drivers();
    let db = format!(
        "rewind_contract_{}",
        new_id("t").to_lowercase().replace('_', "")
    );
    let mut admin = <sqlx::AnyConnection as sqlx::Connection>::connect(&base)
        .await
        .expect("PostgreSQL must be reachable for this test (set REWIND_TEST_POSTGRES_URL)");
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let url = match base.rfind('/') {
        Some(i) => format!("{}/{db}", &base[..i]),
        None => unreachable!("a PostgreSQL URL has a path"),
    };
    let store = SqlMetastore::open_postgres(&url).await.unwrap();
    assert_eq!(store.kind(), "postgres");
    contract_suite(&store).await;
    drop(store);
    let _ = sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .execute(&mut admin)
        .await;
}
