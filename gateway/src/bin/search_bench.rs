//! `rewind-bench --search-events N`: the search figures of `docs/benchmarks.md`.
//!
//! 1. Indexing: N realistic 1 KiB JSON events into the embedded index (the indexer's write
//!    path, batches of 20,000), events/s and per CPU-second.
//! 2. Latency through Rewind's REST API over those N events: filtered newest-first, free
//!    text, facets; p50/p99 of sequential queries.
//! 3. Ack → searchable: probe events under a background load, p50/p99/max.
//! 4. With `--meili URL`: the same filtered, sorted search through Rewind and sent to
//!    Meilisearch directly, in one run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rewind_gateway::search::{IndexDoc, SearchIndex};

use super::{Gateway, cpu_seconds, realistic_event, self_rss_mib};

struct Setup {
    team_id: String,
    collection_id: String,
    token: String,
}

async fn setup(gw: &Gateway) -> anyhow::Result<Setup> {
    let (token, collection_id, team_id) = gw.setup_with_team().await?;
    Ok(Setup {
        team_id,
        collection_id,
        token,
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// p50, p99 (ms) of `n` sequential GETs of `url` with `query`, after 10 warm-up calls;
/// also the number of events the last answer held.
async fn latency(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    query: &[(&str, &str)],
    n: usize,
) -> anyhow::Result<(f64, f64, usize)> {
    let mut times = Vec::with_capacity(n);
    let mut count = 0;
    for i in 0..n + 10 {
        let t = Instant::now();
        let resp = http.get(url).query(query).bearer_auth(token).send().await?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await?;
        anyhow::ensure!(status.is_success(), "{status}: {body}");
        if i >= 10 {
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        count = body["events"].as_array().map_or(0, Vec::len);
    }
    times.sort_by(f64::total_cmp);
    Ok((percentile(&times, 0.5), percentile(&times, 0.99), count))
}

fn dir_size(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.metadata().map_or(0, |m| m.len()))
                .sum()
        })
        .unwrap_or(0)
}

pub async fn run(
    events: usize,
    queries: usize,
    event_bytes: usize,
    secs: u64,
    meili: Option<String>,
) -> anyhow::Result<()> {
    println!("search benchmark: {events} events of ~{event_bytes} bytes");
    let gw = Gateway::start(&[]).await?;
    let s = setup(&gw).await?;
    let dir = gw.stop()?;

    // 1. Indexing, through the library, into the gateway's own index directory.
    let mut rng = rand::rng();
    let pool: Vec<String> = (0..5000)
        .map(|_| realistic_event(event_bytes.saturating_sub(30), &mut rng))
        .collect();
    let now = rewind_gateway::ids::now_micros();
    let span = 6 * 86_400 * 1_000_000i64; // spread over the last 6 days (inside the window)
    let index = rewind_gateway::search::embedded::EmbeddedIndex::open(
        &dir.path().join("search"),
        &Default::default(),
    )?;
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let mut payload_bytes = 0usize;
    const CHUNK: usize = 20_000;
    for start in (0..events).step_by(CHUNK) {
        let docs: Vec<IndexDoc> = (start..(start + CHUNK).min(events))
            .map(|i| {
                let base = &pool[i % pool.len()];
                let payload = format!("{{\"seq\":{i},{}", &base[1..]);
                payload_bytes += payload.len();
                let at = now - span + (span / events as i64) * i as i64;
                IndexDoc {
                    team_id: s.team_id.clone(),
                    collection_id: s.collection_id.clone(),
                    id: ulid::Ulid::from_parts((at / 1000) as u64, rand::random::<u128>())
                        .to_string(),
                    received_at: at,
                    content_type: "application/json".into(),
                    payload: payload.into(),
                    position: i as u64 + 1,
                }
            })
            .collect();
        index.index(docs).await?;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    println!(
        "indexing (embedded, library): {events} events, {:.0} MiB payload in {wall:.1} s: {:.0} events/s ({:.0} per CPU-second, {:.2} CPU-s/s); index {:.0} MiB on disk; bench process RSS {:.0} MiB",
        payload_bytes as f64 / 1048576.0,
        events as f64 / wall,
        events as f64 / cpu,
        cpu / wall,
        dir_size(&dir.path().join("search")) as f64 / 1048576.0,
        self_rss_mib()
    );
    drop(index);

    // 2. Queries through the API, over those events.
    let gw = Gateway::start_in(dir, &[]).await?;
    let http = reqwest::Client::new();
    let url = gw.url(&format!("/v1/collections/{}/events", s.collection_id));
    let cases: [(&str, Vec<(&str, &str)>); 6] = [
        ("newest 50, no filter", vec![("limit", "50")]),
        (
            "filtered newest-first: type = \"payment_failed\" AND amount > 500",
            vec![
                ("filter", "type = \"payment_failed\" AND amount > 500"),
                ("limit", "50"),
            ],
        ),
        (
            "selective filter: account.plan = enterprise AND currency = USD AND flags.beta = true",
            vec![
                (
                    "filter",
                    "account.plan = enterprise AND currency = USD AND flags.beta = true",
                ),
                ("limit", "50"),
            ],
        ),
        (
            "free text: q=declined",
            vec![("q", "declined"), ("limit", "50")],
        ),
        (
            "free text + filter: q=\"referral coupon\", region = eu-west-1",
            vec![
                ("q", "referral coupon"),
                ("filter", "account.region = eu-west-1"),
                ("limit", "50"),
            ],
        ),
        (
            "facet account.region over type = login",
            vec![
                ("filter", "type = login"),
                ("facet", "account.region"),
                ("limit", "20"),
            ],
        ),
    ];
    for (name, query) in &cases {
        let (p50, p99, n) = latency(&http, &url, &s.token, query, queries).await?;
        println!(
            "  {name}: p50 {p50:.2} ms, p99 {p99:.2} ms ({n} events per page, {queries} queries)"
        );
    }
    println!("gateway RSS after queries: {:.0} MiB", gw.rss_mib());
    drop(gw);

    // 3. Ack → searchable under a background load.
    ack_to_searchable(secs, event_bytes).await?;

    // 4. Meilisearch: Rewind's API against Meilisearch directly.
    if let Some(url) = meili {
        meili_compare(&url, queries, event_bytes).await?;
    }
    Ok(())
}

async fn ack_to_searchable(secs: u64, event_bytes: usize) -> anyhow::Result<()> {
    let gw = Gateway::start(&[]).await?;
    let s = setup(&gw).await?;
    let http = reqwest::Client::new();
    let events_url = gw.url(&format!("/v1/collections/{}/events", s.collection_id));
    let stop = Arc::new(AtomicBool::new(false));
    // Background: 10,000 events/s in batches of 500.
    let load = {
        let (http, url, token, stop) = (
            http.clone(),
            events_url.clone(),
            s.token.clone(),
            stop.clone(),
        );
        let mut rng = rand::rng();
        let body: String = (0..500)
            .map(|_| realistic_event(event_bytes, &mut rng) + "\n")
            .collect();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let _ = http
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/x-ndjson")
                    .body(body.clone())
                    .send()
                    .await;
            }
        })
    };
    let mut probes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut k = 0u64;
    while Instant::now() < deadline {
        k += 1;
        let (http, url, token) = (http.clone(), events_url.clone(), s.token.clone());
        probes.push(tokio::spawn(async move {
            let r = http
                .post(&url)
                .bearer_auth(&token)
                .json(&serde_json::json!({"probe": k}))
                .send()
                .await?;
            anyhow::ensure!(r.status().is_success(), "probe refused: {}", r.status());
            let acked = Instant::now();
            let filter = format!("probe = {k}");
            loop {
                let v: serde_json::Value = http
                    .get(&url)
                    .query(&[("filter", filter.as_str()), ("limit", "1")])
                    .bearer_auth(&token)
                    .send()
                    .await?
                    .json()
                    .await?;
                if v["events"].as_array().is_some_and(|e| !e.is_empty()) {
                    return Ok(acked.elapsed().as_secs_f64() * 1000.0);
                }
                anyhow::ensure!(
                    acked.elapsed() < Duration::from_secs(60),
                    "probe {k} not searchable in 60 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut lat = Vec::new();
    for p in probes {
        lat.push(p.await??);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = load.await;
    lat.sort_by(f64::total_cmp);
    println!(
        "ack → searchable (embedded, 10,000 events/s background, {} probes, polled every 20 ms): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN)
    );
    Ok(())
}

async fn meili_compare(url: &str, queries: usize, event_bytes: usize) -> anyhow::Result<()> {
    const N: usize = 100_000;
    let key = std::env::var("REWIND_MEILI_KEY").unwrap_or_default();
    let gw = Gateway::start_env(&["--search", url], &[("REWIND_MEILI_KEY", &key)]).await?;
    let s = setup(&gw).await?;
    let http = reqwest::Client::new();
    let events_url = gw.url(&format!("/v1/collections/{}/events", s.collection_id));
    let mut rng = rand::rng();
    let t0 = Instant::now();
    for _ in 0..N / 500 {
        let body: String = (0..500)
            .map(|_| realistic_event(event_bytes, &mut rng) + "\n")
            .collect();
        let r = http
            .post(&events_url)
            .bearer_auth(&s.token)
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "ingest: {}", r.status());
    }
    // Wait until Meilisearch has them all.
    loop {
        let v: serde_json::Value = http.get(gw.url("/readyz")).send().await?.json().await?;
        if v["backends"]["search"]["events_indexed"].as_u64() == Some(N as u64) {
            break;
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(900),
            "Meilisearch did not index {N} events in 15 minutes: {v}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "meilisearch: {N} events ingested and indexed in {:.1} s ({:.0} events/s end to end)",
        t0.elapsed().as_secs_f64(),
        N as f64 / t0.elapsed().as_secs_f64()
    );
    let filter = "type = \"payment_failed\" AND amount > 500";
    let (p50, p99, n) = latency(
        &http,
        &events_url,
        &s.token,
        &[("filter", filter), ("limit", "50")],
        queries,
    )
    .await?;
    println!("  through Rewind's API: p50 {p50:.2} ms, p99 {p99:.2} ms ({n} events)");
    // The same query as Rewind sends it, straight to Meilisearch.
    let expr = rewind_gateway::query::parse(filter)?.context("filter")?;
    let meili_filter = format!(
        "collection = \"{}\" AND ({})",
        s.collection_id,
        rewind_gateway::search::meili::translate(&expr).context("translate")?
    );
    let body = serde_json::json!({
        "filter": meili_filter,
        "sort": ["received_at:desc", "id:desc"],
        "limit": 102,
        "matchingStrategy": "all",
    });
    let search_url = format!(
        "{}/indexes/rewind-{}/search",
        url.trim_end_matches('/'),
        s.team_id
    );
    let mut times = Vec::new();
    let mut hits = 0;
    for i in 0..queries + 10 {
        let t = Instant::now();
        let v: serde_json::Value = http
            .post(&search_url)
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await?
            .json()
            .await?;
        if i >= 10 {
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        hits = v["hits"].as_array().map_or(0, Vec::len);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "  Meilisearch directly (same filter and sort, limit 102 as Rewind asks): p50 {:.2} ms, p99 {:.2} ms ({hits} hits)",
        percentile(&times, 0.5),
        percentile(&times, 0.99)
    );
    Ok(())
}
