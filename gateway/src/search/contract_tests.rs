//! One contract suite for every [`SearchIndex`] backend: ordering, pagination, filters, free
//! text, facets, ranges, team isolation, idempotent re-indexing, hot-window deletes, and a
//! property test that random filters select exactly the events the shared evaluator (the one
//! the archive scan and replays use) selects.
//!
//! The embedded index runs it always; Meilisearch when `REWIND_TEST_MEILI_URL` is set.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use super::{IndexDoc, SearchIndex, SearchRequest, selects};
use crate::archive::read::ArchivedEvent;

const T0: i64 = 1_764_000_000_000_000;

fn doc(team: &str, collection: &str, at: i64, payload: Value, position: u64) -> IndexDoc {
    IndexDoc {
        team_id: team.into(),
        collection_id: collection.into(),
        id: ulid::Ulid::from_parts((at / 1000) as u64, rand::random::<u128>()).to_string(),
        received_at: at,
        content_type: "application/json".into(),
        payload: Bytes::from(payload.to_string()),
        position,
    }
}

fn event(d: &IndexDoc) -> ArchivedEvent {
    ArchivedEvent {
        id: d.id.clone(),
        received_at: d.received_at,
        content_type: d.content_type.clone(),
        payload: d.payload.clone(),
    }
}

fn request(team: &str, collection: &str) -> SearchRequest {
    SearchRequest {
        team_id: team.into(),
        collection_id: collection.into(),
        filter: None,
        q: None,
        from: i64::MIN,
        to: i64::MAX,
        limit: 1000,
        cursor: None,
        facet: None,
    }
}

/// What the evaluator selects from `docs`, newest first.
fn expected(req: &SearchRequest, docs: &[IndexDoc]) -> Vec<String> {
    let mut hits: Vec<&IndexDoc> = docs
        .iter()
        .filter(|d| {
            d.team_id == req.team_id
                && d.collection_id == req.collection_id
                && selects(req, &event(d))
        })
        .collect();
    hits.sort_by(|a, b| (b.received_at, &b.id).cmp(&(a.received_at, &a.id)));
    hits.into_iter().map(|d| d.id.clone()).collect()
}

async fn ids(index: &dyn SearchIndex, req: &SearchRequest) -> Vec<String> {
    index
        .search(req)
        .await
        .unwrap()
        .events
        .into_iter()
        .map(|e| e.id)
        .collect()
}

/// Runs the suite; `unique` keeps runs against a shared server apart; `strict_types` limits
/// the property test to payloads where every field keeps one JSON type (Meilisearch compares
/// numbers held in strings by its own rules, see `docs/query.md`).
pub async fn run(index: Arc<dyn SearchIndex>, unique: &str, strict_types: bool) {
    let team_a = format!("tm_a{unique}");
    let team_b = format!("tm_b{unique}");
    let orders = format!("col_orders{unique}");
    let users = format!("col_users{unique}");

    // 40 orders of team A (10 share one received_at), a few users, and team B's events in a
    // collection with the same id (which must never show up in A's results).
    let mut docs = Vec::new();
    for i in 0..40i64 {
        let at = if i < 10 { T0 } else { T0 + i * 1_000_000 };
        docs.push(doc(
            &team_a,
            &orders,
            at,
            json!({"type": if i % 3 == 0 { "account_created" } else { "order_paid" },
                   "amount": i * 10, "user": {"plan": if i % 2 == 0 { "pro" } else { "free" }},
                   "note": format!("order number {i} from Lisbon")}),
            i as u64 + 1,
        ));
    }
    for i in 0..5i64 {
        docs.push(doc(
            &team_a,
            &users,
            T0 + i,
            json!({"type": "signup"}),
            100 + i as u64,
        ));
        docs.push(doc(
            &team_b,
            &orders,
            T0 + i,
            json!({"type": "account_created", "amount": 5000}),
            200 + i as u64,
        ));
    }
    index.index(docs.clone()).await.unwrap();
    // Redelivery after a crash: the same events again must not appear twice.
    index.index(docs[..15].to_vec()).await.unwrap();

    // Order and pagination: every page newest first, all pages together = everything once.
    let all = expected(&request(&team_a, &orders), &docs);
    assert_eq!(all.len(), 40);
    assert_eq!(ids(index.as_ref(), &request(&team_a, &orders)).await, all);
    let mut paged = Vec::new();
    let mut req = request(&team_a, &orders);
    req.limit = 7;
    loop {
        let page = index.search(&req).await.unwrap();
        assert!(page.events.len() <= 7);
        paged.extend(page.events.into_iter().map(|e| e.id));
        match page.next_cursor {
            Some(c) => req.cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(paged, all, "cursor pagination");

    // Filters, text, ranges.
    let cases: &[(&str, Option<&str>)] = &[
        (r#"type = "account_created" AND amount >= 100"#, None),
        ("amount > 150 AND amount <= 300", None),
        ("user.plan = pro", None),
        ("user.plan != pro", None),
        ("type IN [order_paid, nothing]", None),
        ("NOT (amount < 200 OR type = order_paid)", None),
        ("missing EXISTS", None),
        ("user EXISTS", None),
        ("", Some("lisbon")),
        ("amount < 100", Some("ORDER number")),
        ("", Some("madrid")),
    ];
    for (filter, q) in cases {
        let mut req = request(&team_a, &orders);
        req.filter = crate::query::parse(filter).unwrap();
        req.q = q.map(str::to_string);
        assert_eq!(
            ids(index.as_ref(), &req).await,
            expected(&req, &docs),
            "filter {filter:?} q {q:?}"
        );
    }
    let mut req = request(&team_a, &orders);
    req.from = T0 + 20_000_000;
    req.to = T0 + 30_000_000;
    let got = ids(index.as_ref(), &req).await;
    assert_eq!(got.len(), 10);
    assert_eq!(got, expected(&req, &docs));

    // Facets count every match, not only the page.
    let mut req = request(&team_a, &orders);
    req.limit = 1;
    req.facet = Some("user.plan".into());
    req.filter = crate::query::parse("amount >= 100").unwrap();
    let facets: HashMap<String, u64> = index
        .search(&req)
        .await
        .unwrap()
        .facets
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(facets.get("pro"), Some(&15));
    assert_eq!(facets.get("free"), Some(&15));

    // Isolation: team B's collection with the same id holds only B's events, and the other
    // team's index never answers.
    let b = ids(index.as_ref(), &request(&team_b, &orders)).await;
    assert_eq!(b.len(), 5);
    assert!(b.iter().all(|id| !all.contains(id)));
    assert!(
        ids(index.as_ref(), &request(&team_b, &users))
            .await
            .is_empty()
    );
    assert_eq!(
        ids(index.as_ref(), &request(&team_a, &users)).await.len(),
        5
    );

    // The hot window: everything before T0 + 30 s goes from team A's orders only.
    index
        .delete_before(&team_a, &orders, T0 + 30_000_000)
        .await
        .unwrap();
    let left = ids(index.as_ref(), &request(&team_a, &orders)).await;
    assert_eq!(left, all[..10].to_vec());
    assert_eq!(
        ids(index.as_ref(), &request(&team_b, &orders)).await.len(),
        5
    );

    property(index, unique, strict_types).await;
}

fn random_payload(rng: &mut StdRng, strict_types: bool) -> Value {
    let mut m = serde_json::Map::new();
    let words = [
        "alpha", "beta", "gamma", "delta", "Beta", "100", "7.5", "true",
    ];
    if rng.random_bool(0.9) {
        let w = if strict_types {
            &words[..5]
        } else {
            &words[..]
        };
        m.insert("type".into(), json!(w[rng.random_range(0..w.len())]));
    }
    if rng.random_bool(0.8) {
        let n = rng.random_range(-50..250);
        let v = match rng.random_range(0..4) {
            0 if !strict_types => json!(n.to_string()),
            1 => json!(n as f64 + 0.5),
            _ => json!(n),
        };
        m.insert("amount".into(), v);
    }
    if rng.random_bool(0.6) {
        let plan = ["free", "pro", "team"][rng.random_range(0..3)];
        let age = rng.random_range(10..90);
        m.insert("user".into(), json!({"plan": plan, "age": age}));
    }
    if rng.random_bool(0.5) {
        let tags: Vec<&str> = (0..rng.random_range(0..4))
            .map(|_| ["x", "y", "z", "w"][rng.random_range(0..4)])
            .collect();
        m.insert("tags".into(), json!(tags));
    }
    if rng.random_bool(0.4) {
        m.insert("flag".into(), json!(rng.random_bool(0.5)));
    }
    if rng.random_bool(0.1) {
        m.insert("gone".into(), Value::Null);
    }
    Value::Object(m)
}

fn random_atom(rng: &mut StdRng, strict_types: bool) -> String {
    let n = rng.random_range(-60..260);
    let ops = ["=", "!=", ">", ">=", "<", "<="];
    let op = ops[rng.random_range(0..ops.len())];
    match rng.random_range(0..9) {
        0 => format!("amount {op} {n}"),
        1 => format!("amount {op} {}.5", n),
        2 => format!(
            "type {} {}",
            if strict_types {
                ["=", "!="][rng.random_range(0..2)]
            } else {
                op
            },
            ["alpha", "beta", "Beta", "100", "gamma", "zeta"][rng.random_range(0..6)]
        ),
        3 => format!(
            "user.plan {} [{}]",
            ["IN", "NOT IN"][rng.random_range(0..2)],
            ["free", "pro, team", "free, pro"][rng.random_range(0..3)]
        ),
        4 => format!(
            "{} {}",
            ["user", "user.age", "tags", "gone", "flag", "nothing"][rng.random_range(0..6)],
            ["EXISTS", "NOT EXISTS"][rng.random_range(0..2)]
        ),
        5 => format!("tags = {}", ["x", "y", "z"][rng.random_range(0..3)]),
        6 => format!("flag = {}", ["true", "false"][rng.random_range(0..2)]),
        7 => format!("user.age {op} {}", rng.random_range(0..100)),
        _ => format!("tags != {}", ["x", "w"][rng.random_range(0..2)]),
    }
}

fn random_filter(rng: &mut StdRng, depth: u32, strict_types: bool) -> String {
    if depth == 0 || rng.random_bool(0.4) {
        return random_atom(rng, strict_types);
    }
    match rng.random_range(0..3) {
        0 => format!(
            "({}) AND ({})",
            random_filter(rng, depth - 1, strict_types),
            random_filter(rng, depth - 1, strict_types)
        ),
        1 => format!(
            "({}) OR ({})",
            random_filter(rng, depth - 1, strict_types),
            random_filter(rng, depth - 1, strict_types)
        ),
        _ => format!("NOT ({})", random_filter(rng, depth - 1, strict_types)),
    }
}

/// Random events and random filters: the index must select exactly what the evaluator does.
async fn property(index: Arc<dyn SearchIndex>, unique: &str, strict_types: bool) {
    let seed = std::env::var("REWIND_PROPTEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let mut rng = StdRng::seed_from_u64(seed);
    let team = format!("tm_p{unique}");
    let collection = format!("col_p{unique}");
    let docs: Vec<IndexDoc> = (0..300)
        .map(|i| {
            let p = random_payload(&mut rng, strict_types);
            doc(&team, &collection, T0 + i * 1000, p, 1000 + i as u64)
        })
        .collect();
    index.index(docs.clone()).await.unwrap();
    for _ in 0..200 {
        let filter = random_filter(&mut rng, 3, strict_types);
        let mut req = request(&team, &collection);
        req.filter = crate::query::parse(&filter).unwrap();
        let (got, want) = (ids(index.as_ref(), &req).await, expected(&req, &docs));
        if got != want {
            let extra: Vec<_> = got.iter().filter(|i| !want.contains(i)).collect();
            let missing: Vec<_> = want.iter().filter(|i| !got.contains(i)).collect();
            let payload = |id: &String| {
                docs.iter()
                    .find(|d| &d.id == id)
                    .map(|d| String::from_utf8_lossy(&d.payload).into_owned())
            };
            panic!(
                "filter {filter:?} selects different events (REWIND_PROPTEST_SEED={seed}): \
                 {} extra, e.g. {:?}; {} missing, e.g. {:?}; order differs: {}",
                extra.len(),
                extra.first().and_then(|i| payload(i)),
                missing.len(),
                missing.first().and_then(|i| payload(i)),
                extra.is_empty() && missing.is_empty()
            );
        }
    }
}

fn open_embedded(dir: &std::path::Path) -> super::embedded::EmbeddedIndex {
    super::embedded::EmbeddedIndex::open(dir, &super::embedded::EmbeddedOptions::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_index_passes_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let index = open_embedded(dir.path());
    run(Arc::new(index), "", false).await;
}

/// Facet counts read from the index's terms equal those counted on the payloads (as the
/// archive scan does), for every kind of scalar: numbers, numeric strings, booleans, strings,
/// arrays of them, with and without a filter, and across several segments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_facets_equal_counts_over_the_payloads() {
    let dir = tempfile::tempdir().unwrap();
    let index = open_embedded(dir.path());
    let mut rng = StdRng::seed_from_u64(7);
    let mut docs = Vec::new();
    for i in 0..600u64 {
        let v = match rng.random_range(0..7) {
            0 => json!(rng.random_range(0..5)),
            1 => json!(rng.random_range(0..5) as f64 + 0.5),
            2 => json!(rng.random_range(0..5).to_string()),
            3 => json!(rng.random_bool(0.5)),
            4 => Value::Array(
                [json!("a"), json!("b"), json!("a"), json!(3)][..rng.random_range(0..4)].to_vec(),
            ),
            5 => json!({"inner": 1}),
            _ => Value::Null,
        };
        docs.push(doc(
            "tm_f",
            "col_f",
            T0 + i as i64,
            json!({"v": v, "i": i}),
            i + 1,
        ));
    }
    for part in docs.chunks(150) {
        index.index(part.to_vec()).await.unwrap();
    }
    for filter in [None, Some("i < 300"), Some("v EXISTS")] {
        let mut req = request("tm_f", "col_f");
        req.limit = 1;
        req.facet = Some("v".into());
        req.filter = filter.map(|f| crate::query::parse(f).unwrap().unwrap());
        let got: HashMap<String, u64> = index
            .search(&req)
            .await
            .unwrap()
            .facets
            .unwrap()
            .into_iter()
            .collect();
        let mut want: HashMap<String, u64> = HashMap::new();
        for d in &docs {
            if !super::selects(&req, &event(d)) {
                continue;
            }
            let value: Value = serde_json::from_slice(&d.payload).unwrap();
            for f in super::flatten::flatten(&value).facets {
                if let Some(v) = f.strip_prefix(&format!("v{}", super::flatten::SEP)) {
                    *want.entry(v.to_string()).or_default() += 1;
                }
            }
        }
        assert!(want.len() > 10, "{want:?}");
        assert_eq!(got, want, "filter {filter:?}");
    }
}

/// A batch far behind the bus is indexed with tantivy's threads at background priority; once
/// a batch is current again they are back at normal priority, and the events of both are found.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_index_catches_up_at_background_priority() {
    use crate::priority::{BACKGROUND_NICE, can_restore_priority, nice_of_thread};
    if !can_restore_priority() || nice_of_thread(std::process::id() as i32) != Some(0) {
        eprintln!("not checked: this process cannot switch thread priorities back and forth");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let index = open_embedded(dir.path());
    let at_start = index.writer_thread_nices();
    // Indexing threads (one per core, at most 2), merge threads, the segment updater.
    assert!(at_start.len() >= 3, "{at_start:?}");
    assert!(at_start.iter().all(|n| *n == 0), "{at_start:?}");
    let now = crate::ids::now_micros();
    let old = doc("tm_p", "col_p", now - 60_000_000, json!({"a": 1}), 1);
    index.index(vec![old.clone()]).await.unwrap();
    let behind = index.writer_thread_nices();
    assert!(behind.iter().all(|n| *n == BACKGROUND_NICE), "{behind:?}");
    // /readyz shows it.
    let health = index.health().await;
    assert!(health.detail.contains("catching up"), "{}", health.detail);
    // Still behind (over the caught-up bound): stays in the background.
    let late = doc("tm_p", "col_p", now - 3_500_000, json!({"a": 2}), 2);
    index.index(vec![late.clone()]).await.unwrap();
    let still = index.writer_thread_nices();
    assert!(still.iter().all(|n| *n == BACKGROUND_NICE), "{still:?}");
    // tantivy starts new indexing threads at every commit; those of a catching-up index are
    // in the background too. (Checked under nextest only, where this test has the process to
    // itself: other tests' indexes would have indexing threads of their own.)
    if std::env::var_os("NEXTEST_RUN_ID").is_some() {
        let mut nices = Vec::new();
        for _ in 0..100 {
            nices = crate::priority::threads_named(&["thrd-tantivy-in"])
                .into_iter()
                .filter_map(nice_of_thread)
                .collect();
            if !nices.is_empty() && nices.iter().all(|n| *n == BACKGROUND_NICE) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            !nices.is_empty() && nices.iter().all(|n| *n == BACKGROUND_NICE),
            "indexing threads started by the last commit: {nices:?}"
        );
    }
    let fresh = doc(
        "tm_p",
        "col_p",
        crate::ids::now_micros(),
        json!({"a": 3}),
        3,
    );
    index.index(vec![fresh.clone()]).await.unwrap();
    let caught_up = index.writer_thread_nices();
    assert!(caught_up.iter().all(|n| *n == 0), "{caught_up:?}");
    assert!(!index.health().await.detail.contains("catching up"));
    assert_eq!(
        ids(&index, &request("tm_p", "col_p")).await,
        vec![fresh.id, late.id, old.id]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_index_reopens_with_its_events() {
    let dir = tempfile::tempdir().unwrap();
    let options = super::embedded::EmbeddedOptions::default();
    let d = doc("tm_r", "col_r", T0, json!({"a": 1}), 5);
    {
        let index = super::embedded::EmbeddedIndex::open(dir.path(), &options).unwrap();
        index.index(vec![d.clone()]).await.unwrap();
    }
    let index = super::embedded::EmbeddedIndex::open(dir.path(), &options).unwrap();
    // Redelivered after the restart: replaced, not doubled.
    index.index(vec![d.clone()]).await.unwrap();
    assert_eq!(ids(&index, &request("tm_r", "col_r")).await, vec![d.id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meilisearch_passes_the_contract() {
    let Ok(url) = std::env::var("REWIND_TEST_MEILI_URL") else {
        eprintln!(
            "SKIPPED: REWIND_TEST_MEILI_URL is not set; the Meilisearch contract suite needs a running Meilisearch"
        );
        return;
    };
    let key = std::env::var("REWIND_TEST_MEILI_KEY").ok();
    let index = super::meili::MeiliIndex::new(&url, key.as_deref()).unwrap();
    let unique = ulid::Ulid::new().to_string().to_lowercase();
    run(Arc::new(index), &unique, true).await;
}
