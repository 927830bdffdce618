//! `rewind-bench`: the ingest benchmark. Starts a release `rewind serve` (from the same
//! directory as this binary) on a temp data dir, drives it from this process over loopback, and
//! prints the figures `docs/benchmarks.md` records:
//!
//! * HTTP, batches of 500 × 1 KiB JSON, embedded bus: events/s acknowledged;
//! * gRPC `PublishStream`, batches of 500: events/s;
//! * HTTP single-event requests: requests/s;
//! * p50/p99 ack latency of HTTP batches at half the peak batch rate, beside the bus's own
//!   append latency and the hypervisor's steal over the same window;
//! * the gateway's peak RSS over all of it;
//! * with `--nats URL`: raw JetStream publishing of single 1 KiB messages (the baseline) and
//!   the gateway on the NATS bus with batches of 500, in the same run.
//!
//! Run: `cargo build --release && target/release/rewind-bench [--secs 10] [--nats nats://127.0.0.1:4222]`

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;

// The gateway's allocator and settings: the archiver and the index run in this process
// for their benchmarks.
rewind_gateway::use_jemalloc!();
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rewind_gateway::proto::v1 as pb;

#[path = "search_bench.rs"]
mod search_bench;

#[path = "plugin_bench.rs"]
mod plugin_bench;

#[path = "replay_bench.rs"]
mod replay_bench;

#[derive(Parser)]
struct Args {
    /// Seconds per scenario.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Concurrent HTTP connections for batch scenarios.
    #[arg(long, default_value_t = 8)]
    http_conns: usize,
    /// Concurrent gRPC streams.
    #[arg(long, default_value_t = 4)]
    grpc_streams: usize,
    /// Concurrent connections for single-event requests.
    #[arg(long, default_value_t = 64)]
    single_conns: usize,
    /// Also benchmark the NATS bus: `spawn` starts a fresh nats-server (JetStream, temp
    /// store, free port) for the run; or the URL of a server to use (its REWIND_EVENTS stream
    /// keeps what earlier runs wrote, which slows it down over time).
    #[arg(long)]
    nats: Option<String>,
    /// Event size in bytes.
    #[arg(long, default_value_t = 1024)]
    event_bytes: usize,
    /// Archiver benchmark only: drain a backlog of this many events from a local bus into
    /// Parquet (through the library, no HTTP), and report throughput, size and memory.
    #[arg(long)]
    archive_events: Option<usize>,
    /// Archiver benchmark only: time from ingest ack to visible in export, with
    /// `--archive-flush-secs` of this value, for `--secs` under a background load.
    #[arg(long)]
    archive_latency_flush_secs: Option<u64>,
    /// Search benchmark only: index this many events into the embedded index, then measure
    /// searches through the API over them, and ack → searchable for `--secs`.
    #[arg(long)]
    search_events: Option<usize>,
    /// Plugin host benchmark: no-op and redact transforms through the host vs natively,
    /// instantiation time.
    #[arg(long)]
    plugins: bool,
    /// Replay benchmark: archive this many events and replay them unpaced to NATS and to a
    /// batched webhook; then the selective-filter run over --replay-scan-events.
    #[arg(long)]
    replay_events: Option<usize>,
    /// Events archived for the selective (0.1%) replay run, compared with DuckDB.
    #[arg(long, default_value_t = 10_000_000)]
    replay_scan_events: usize,
    /// Queries per search scenario.
    #[arg(long, default_value_t = 200)]
    search_queries: usize,
    /// Search benchmark: also compare Rewind's API with Meilisearch at this URL (key from
    /// REWIND_MEILI_KEY).
    #[arg(long)]
    meili: Option<String>,
}

/// Ack → visible in export: a probe event every 100 ms under a background load of 10,000
/// events/s (batches of 500), the export polled every 250 ms over its last 30 s.
async fn archive_latency_bench(
    flush_secs: u64,
    secs: u64,
    event_bytes: usize,
) -> anyhow::Result<()> {
    let gw = Gateway::start(&["--archive-flush-secs", &flush_secs.to_string()]).await?;
    let (token, col) = gw.setup().await?;
    let http = reqwest::Client::new();
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (http, url, token, stop) = (
            http.clone(),
            gw.url(&format!("/v1/collections/{col}/events")),
            token.clone(),
            stop.clone(),
        );
        let body: String = (0..BATCH).map(|i| event(i, event_bytes) + "\n").collect();
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
    let mut acked: Vec<(String, Instant)> = Vec::new();
    let mut seen: std::collections::HashMap<String, Instant> = Default::default();
    let started = Instant::now();
    let mut probe_tick = tokio::time::interval(Duration::from_millis(100));
    let mut poll_tick = tokio::time::interval(Duration::from_millis(250));
    let mut n = 0u64;
    let end = started + Duration::from_secs(secs);
    let drain_end = end + Duration::from_secs(flush_secs + 15);
    loop {
        tokio::select! {
            _ = probe_tick.tick(), if Instant::now() < end => {
                let resp: serde_json::Value = http
                    .post(gw.url(&format!("/v1/collections/{col}/events")))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({"probe": n}))
                    .send()
                    .await?
                    .json()
                    .await?;
                n += 1;
                let id = resp["ids"][0].as_str().context("probe id")?.to_string();
                acked.push((id, Instant::now()));
            }
            _ = poll_tick.tick() => {
                let from = chrono::Utc::now() - chrono::Duration::seconds(30 + flush_secs as i64);
                let text = http
                    .get(gw.url(&format!("/v1/collections/{col}/export")))
                    .query(&[("from", from.to_rfc3339()), ("filter", "probe EXISTS".into())])
                    .bearer_auth(&token)
                    .send()
                    .await?
                    .text()
                    .await?;
                let now = Instant::now();
                for line in text.lines() {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line)
                        && let Some(id) = v["id"].as_str()
                    {
                        seen.entry(id.to_string()).or_insert(now);
                    }
                }
                if Instant::now() >= end && acked.iter().all(|(id, _)| seen.contains_key(id)) {
                    break;
                }
                if Instant::now() >= drain_end {
                    break;
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = load.await;
    let mut lat: Vec<f64> = acked
        .iter()
        .filter_map(|(id, at)| seen.get(id).map(|s| s.duration_since(*at).as_secs_f64()))
        .collect();
    lat.sort_by(f64::total_cmp);
    let missing = acked.len() - lat.len();
    let q = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "| ack → visible in export (--archive-flush-secs {flush_secs}, 10k ev/s background) | {} probes: p50 {:.2} s, p99 {:.2} s, max {:.2} s; {missing} not visible within {} s (poll granularity 0.25 s) |",
        acked.len(),
        q(0.5),
        q(0.99),
        lat.last().copied().unwrap_or(f64::NAN),
        flush_secs + 15
    );
    Ok(())
}

/// A typical 1 KiB application event, the kind the archive is for: an e-commerce / product
/// analytics event with an event type, account, session, page and user agent, a cart of line
/// items from a catalogue, amounts, and a short human-written message. Values come from
/// realistic vocabularies (a few thousand SKUs and accounts, tens of pages and agents) plus
/// per-event random ids and times; no padding runs.
fn realistic_event(size: usize, rng: &mut impl rand::Rng) -> String {
    const TYPES: [&str; 6] = [
        "account_created",
        "login",
        "payment_succeeded",
        "payment_failed",
        "plan_changed",
        "checkout_started",
    ];
    const PLANS: [&str; 4] = ["free", "pro", "team", "enterprise"];
    const REGIONS: [&str; 5] = [
        "eu-west-1",
        "us-east-1",
        "us-west-2",
        "ap-south-1",
        "sa-east-1",
    ];
    const PAGES: [&str; 8] = [
        "/",
        "/pricing",
        "/checkout",
        "/cart",
        "/account/settings",
        "/docs/getting-started",
        "/blog/launch",
        "/products/search",
    ];
    const AGENTS: [&str; 4] = [
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0 Safari/537.36",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:132.0) Gecko/20100101 Firefox/132.0",
    ];
    const MESSAGES: [&str; 6] = [
        "customer completed checkout after applying a referral coupon",
        "payment declined by issuer, customer asked to retry with another card",
        "trial converted to a paid plan from the pricing page",
        "session resumed from a saved cart on a mobile device",
        "invoice generated and emailed to the billing contact",
        "plan downgraded at the end of the billing period",
    ];
    let items: Vec<serde_json::Value> = (0..rng.random_range(1..4))
        .map(|_| {
            serde_json::json!({
                "sku": format!("SKU-{:05}", rng.random_range(0..5000)),
                "qty": rng.random_range(1..5),
                "unit_price": rng.random_range(100..20_000) as f64 / 100.0,
            })
        })
        .collect();
    let mut e = serde_json::json!({
        "type": TYPES[rng.random_range(0..TYPES.len())],
        "occurred_at": format!("2026-11-25T{:02}:{:02}:{:02}.{:03}Z", rng.random_range(0..24), rng.random_range(0..60), rng.random_range(0..60), rng.random_range(0..1000)),
        "account": {"id": format!("acc_{}", rng.random_range(1..200_000)), "plan": PLANS[rng.random_range(0..4)], "region": REGIONS[rng.random_range(0..5)],
                    "email": format!("user{}@example{}.com", rng.random_range(0..100_000), rng.random_range(0..50))},
        "amount": rng.random_range(0..100_000) as f64 / 100.0,
        "currency": if rng.random_bool(0.7) { "EUR" } else { "USD" },
        "session": {"id": format!("s_{:012x}", rng.random::<u64>() >> 16),
                    "ip": format!("10.{}.{}.{}", rng.random_range(0..256), rng.random_range(0..256), rng.random_range(0..256)),
                    "user_agent": AGENTS[rng.random_range(0..AGENTS.len())],
                    "page": PAGES[rng.random_range(0..PAGES.len())],
                    "referrer": PAGES[rng.random_range(0..PAGES.len())]},
        "items": items,
        "message": MESSAGES[rng.random_range(0..MESSAGES.len())],
        "flags": {"beta": rng.random_bool(0.1), "mobile": rng.random_bool(0.4)},
    });
    // Up to `size`: more attributes drawn from the same vocabularies.
    let mut k = 0;
    while e.to_string().len() + 40 < size {
        e["attributes"][format!("attr_{k}")] = serde_json::Value::String(
            MESSAGES[rng.random_range(0..MESSAGES.len())][..24].to_string(),
        );
        k += 1;
    }
    e.to_string()
}

fn cpu_seconds() -> f64 {
    // utime + stime of this process, from /proc/self/stat (fields 14 and 15, in clock ticks).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn self_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn archive_bench(events: usize, event_bytes: usize) -> anyhow::Result<()> {
    use rewind_gateway::archive::archiver::{Archiver, ArchiverOptions};
    use rewind_gateway::bus::Bus;
    let dir = tempfile::tempdir()?;
    // Written the way the gateway writes it (`REWIND_BUS_DIRECT_IO=false`: buffered, so the
    // backlog is read back from the page cache instead of the disk).
    let bus: Arc<dyn Bus> = Arc::new(rewind_gateway::bus::local::LocalBus::open(
        &dir.path().join("bus"),
        rewind_gateway::bus::local::LocalBusOptions {
            direct_io: bus_direct_io(),
            // As in the gateway: the archiver's reads in the background.
            background_reads: true,
            ..Default::default()
        },
    )?);
    let meta: Arc<dyn rewind_gateway::meta::Metastore> =
        Arc::new(rewind_gateway::meta::SqlMetastore::open_sqlite(&dir.path().join("m.db")).await?);
    let store =
        rewind_gateway::archive::store::open(&dir.path().join("archive").display().to_string())?;
    // The backlog: batches of 500 realistic events, one team and collection.
    let mut rng = rand::rng();
    let pool: Vec<String> = (0..5000)
        .map(|_| realistic_event(event_bytes.saturating_sub(60), &mut rng))
        .collect();
    // Each payload is the pool entry plus `"event_id":"<32 hex>","seq":<i>,` and a newline.
    let raw_bytes: usize = (0..events)
        .map(|i| pool[i % pool.len()].len() + 1 + 53 + i.to_string().len())
        .sum();
    let t0 = Instant::now();
    let mut appends = Vec::new();
    for start in (0..events).step_by(BATCH) {
        let now = rewind_gateway::ids::now_micros();
        let batch = rewind_gateway::bus::BusBatch {
            team_id: "tm_bench".into(),
            collection_id: "col_bench".into(),
            events: (start..(start + BATCH).min(events))
                .map(|i| rewind_gateway::bus::Event {
                    id: ulid::Ulid::new().to_string(),
                    received_at_micros: now,
                    // Fresh high-entropy fields per event so no two payloads are equal.
                    payload: format!(
                        "{{\"event_id\":\"{:032x}\",\"seq\":{i},{}",
                        rand::random::<u128>(),
                        &pool[i % pool.len()][1..]
                    )
                    .into(),
                    content_type: "application/json".into(),
                    ..Default::default()
                })
                .collect(),
        };
        let bus = bus.clone();
        appends.push(tokio::spawn(async move { bus.append(&batch, "").await }));
        if appends.len() >= 64 {
            for a in appends.drain(..) {
                a.await??;
            }
        }
    }
    for a in appends {
        a.await??;
    }
    println!(
        "| backlog: {events} events, {:.0} MiB of NDJSON, appended in {:.1} s |",
        raw_bytes as f64 / 1048576.0,
        t0.elapsed().as_secs_f64()
    );

    if std::env::var_os("REWIND_BENCH_KEEP").is_some() {
        println!("| kept for inspection | {} |", dir.path().display());
    }
    let archiver = Archiver::new(
        bus.clone(),
        meta.clone(),
        store,
        ArchiverOptions {
            flush_after: Duration::from_secs(1),
            ..Default::default()
        },
    );
    let status = archiver.status.clone();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let cpu0 = cpu_seconds();
    let rss0 = self_rss_mib();
    let t0 = Instant::now();
    let task = tokio::spawn(archiver.run(stop_rx));
    let mut peak_rss: f64 = 0.0;
    // Peak RSS per tenth of the backlog drained: flat if memory does not grow with it.
    let mut by_tenth = [0f64; 10];
    while (status.events_archived.load(Ordering::Relaxed) as usize) < events {
        let rss = self_rss_mib();
        peak_rss = peak_rss.max(rss);
        let done = status.events_archived.load(Ordering::Relaxed) as usize;
        let tenth = (done * 10 / events.max(1)).min(9);
        by_tenth[tenth] = by_tenth[tenth].max(rss);
        tokio::time::sleep(Duration::from_millis(100)).await;
        if t0.elapsed() > Duration::from_secs(3600) {
            bail!("archiver did not finish");
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let _ = stop_tx.send(true);
    let _ = task.await;
    if std::env::var_os("REWIND_BENCH_KEEP").is_some() {
        let _ = dir.keep();
    }
    let files = meta
        .list_archive_files("tm_bench", "col_bench", i64::MIN, i64::MAX)
        .await?;
    let parquet_bytes: i64 = files.iter().map(|f| f.bytes).sum();
    println!(
        "| archiver: bus → registered Parquet | {:.0} events/s wall ({:.0} MiB/s), {:.0} events/s per CPU-second ({:.1} CPU-s over {:.1} s) |",
        events as f64 / wall,
        raw_bytes as f64 / 1048576.0 / wall,
        events as f64 / cpu,
        cpu,
        wall
    );
    println!(
        "| Parquet size | {} files, {:.1} MiB = {:.1}% of the NDJSON |",
        files.len(),
        parquet_bytes as f64 / 1048576.0,
        100.0 * parquet_bytes as f64 / raw_bytes as f64
    );
    println!(
        "| bench process RSS while draining | peak {:.0} MiB (before: {:.0} MiB); peak per tenth drained: {} MiB |",
        peak_rss,
        rss0,
        by_tenth
            .iter()
            .map(|m| format!("{m:.0}"))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    // Once the archiver is idle, the free pages it kept while draining go back to the system
    // (`allocator::BULK_IDLE`).
    let idle = rewind_gateway::allocator::BULK_IDLE * 3;
    tokio::time::sleep(idle).await;
    println!(
        "| bench process RSS {:.0} s after the drain | {:.0} MiB |",
        idle.as_secs_f64(),
        self_rss_mib()
    );
    Ok(())
}

const BATCH: usize = 500;
const ROOT: &str = "bench-root-token";

fn event(i: usize, size: usize) -> String {
    let head = format!(
        "{{\"type\":\"account_created\",\"account\":{i},\"amount\":{},\"region\":\"eu-west-1\",\"pad\":\"",
        i % 1000
    );
    let pad = size.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", "x".repeat(pad))
}

struct Gateway {
    child: Child,
    port: u16,
    dir: Option<tempfile::TempDir>,
}

impl Gateway {
    async fn start(extra: &[&str]) -> anyhow::Result<Gateway> {
        Self::start_full(tempfile::tempdir()?, extra, &[]).await
    }

    async fn start_env(extra: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Gateway> {
        Self::start_full(tempfile::tempdir()?, extra, env).await
    }

    /// Starts on an existing data dir (e.g. one a stopped gateway left).
    async fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> anyhow::Result<Gateway> {
        Self::start_full(dir, extra, &[]).await
    }

    /// SIGTERM, wait, and hand back the data dir.
    fn stop(mut self) -> anyhow::Result<tempfile::TempDir> {
        Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()?;
        self.child.wait()?;
        self.dir.take().context("data dir")
    }

    async fn start_full(
        dir: tempfile::TempDir,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Gateway> {
        let exe = std::env::current_exe()?.with_file_name("rewind");
        if !exe.exists() {
            bail!(
                "{} not found: run `cargo build --release` first",
                exe.display()
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(&exe)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--rate-limit-events-per-sec",
                "0",
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .args(extra)
            .env("REWIND_ROOT_TOKEN", ROOT)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let gw = Gateway {
            child,
            port,
            dir: Some(dir),
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http.get(gw.url("/readyz")).send().await
                && r.status() == 200
            {
                return Ok(gw);
            }
            if Instant::now() > deadline {
                bail!("gateway not ready in 20 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn data_dir(&self) -> &std::path::Path {
        self.dir.as_ref().expect("running").path()
    }

    /// Team, collection and an ingest token: `(token, collection id)`.
    async fn setup(&self) -> anyhow::Result<(String, String)> {
        let (token, collection, _) = self.setup_with_team().await?;
        Ok((token, collection))
    }

    /// [`Gateway::setup`], also returning the team id.
    async fn setup_with_team(&self) -> anyhow::Result<(String, String, String)> {
        let http = reqwest::Client::new();
        let team: serde_json::Value = http
            .post(self.url("/v1/teams"))
            .bearer_auth(ROOT)
            .json(&serde_json::json!({"name":"bench"}))
            .send()
            .await?
            .json()
            .await?;
        let admin = team["admin_token"].as_str().context("team")?.to_string();
        let col: serde_json::Value = http
            .post(self.url("/v1/collections"))
            .bearer_auth(&admin)
            .json(&serde_json::json!({"name":"events"}))
            .send()
            .await?
            .json()
            .await?;
        let tok: serde_json::Value = http
            .post(self.url("/v1/tokens"))
            .bearer_auth(&admin)
            .json(&serde_json::json!({"name":"bench","scopes":["ingest", "read"]}))
            .send()
            .await?
            .json()
            .await?;
        Ok((
            tok["token"].as_str().context("token")?.to_string(),
            col["id"].as_str().context("collection")?.to_string(),
            team["id"].as_str().context("team id")?.to_string(),
        ))
    }

    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The gateway's cumulative `rewind_bus_append_seconds` buckets: (upper bound, count).
/// Time the hypervisor ran something else while this VM's vCPUs wanted to run ("steal",
/// from the `cpu` lines of /proc/stat, in ticks of 10 ms), sampled every [`STEAL_SAMPLE`]
/// over a window: a vCPU taken away for tens of milliseconds delays every request on it,
/// whatever the gateway does, so the latency tail is read beside it.
struct StealWatch {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Option<(f64, u64, u64, u64)>>,
}

const STEAL_SAMPLE: Duration = Duration::from_millis(100);

/// (all ticks, steal ticks) of all CPUs, and the number of CPUs.
fn cpu_ticks() -> Option<(u64, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let mut lines = stat.lines();
    let all: Vec<u64> = lines
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .take(8)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let cpus = lines.filter(|l| l.starts_with("cpu")).count() as u64;
    Some((all.iter().sum(), *all.get(7)?, cpus))
}

impl StealWatch {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let (total0, steal0, cpus) = cpu_ticks()?;
            let (mut last, mut worst) = (steal0, 0);
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(STEAL_SAMPLE);
                let (_, steal, _) = cpu_ticks()?;
                worst = worst.max(steal - last);
                last = steal;
            }
            let (total, steal, _) = cpu_ticks()?;
            let pct = 100.0 * (steal - steal0) as f64 / (total - total0).max(1) as f64;
            // Ticks are 10 ms of one CPU.
            Some((pct, worst * 10, STEAL_SAMPLE.as_millis() as u64, cpus))
        });
        Self { stop, handle }
    }

    /// (steal % of all CPU time, worst sample's stolen vCPU-ms, sample ms, CPUs).
    fn finish(self) -> Option<(f64, u64, u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().ok().flatten()
    }
}

async fn append_histogram(gw: &Gateway) -> anyhow::Result<Vec<(f64, u64)>> {
    gateway_histogram(gw, "rewind_bus_append_seconds").await
}

/// The gateway's cumulative buckets of the histogram `name`: (upper bound, count).
async fn gateway_histogram(gw: &Gateway, name: &str) -> anyhow::Result<Vec<(f64, u64)>> {
    let text = reqwest::get(gw.url("/metrics")).await?.text().await?;
    let prefix = format!("{name}_bucket{{le=\"");
    Ok(text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(prefix.as_str())?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect())
}

/// p50 and p99 (ms, bucket upper bounds) of what a histogram of seconds gained between two
/// readings of its cumulative buckets.
fn window_p50_p99_ms(before: &[(f64, u64)], after: &[(f64, u64)]) -> (f64, f64) {
    let window: Vec<(f64, u64)> = after
        .iter()
        .zip(before)
        .map(|((le, n), (_, b))| (*le, n - b))
        .collect();
    (
        histogram_quantile(&window, 0.50) * 1e3,
        histogram_quantile(&window, 0.99) * 1e3,
    )
}

/// The upper bound of the bucket holding quantile `q` of cumulative buckets.
fn histogram_quantile(buckets: &[(f64, u64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0, |b| b.1);
    let want = (total as f64 * q).ceil() as u64;
    buckets
        .iter()
        .find(|b| b.1 >= want.max(1))
        .map_or(f64::NAN, |b| b.0)
}

/// Peak gateway RSS since the last [`take_scenario_peak`], in KiB.
static SCENARIO_PEAK_KIB: AtomicU64 = AtomicU64::new(0);

/// The gateway's peak RSS (MiB) since the previous call: one figure per scenario.
fn take_scenario_peak() -> f64 {
    SCENARIO_PEAK_KIB.swap(0, Ordering::Relaxed) as f64 / 1024.0
}

/// Peak anonymous (heap, stacks) and file-backed (mapped files: the search index's segments)
/// parts of the gateway's RSS over the whole run, in KiB.
static PEAK_ANON_KIB: AtomicU64 = AtomicU64::new(0);
static PEAK_FILE_KIB: AtomicU64 = AtomicU64::new(0);

/// Samples the gateway's RSS every 100 ms; returns the peak when stopped.
fn watch_rss(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<f64> {
    std::thread::spawn(move || {
        let mut peak: f64 = 0.0;
        while !stop.load(Ordering::Relaxed) {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let field = |name: &str| {
                status
                    .lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            };
            if let Some(kb) = field("VmRSS:") {
                peak = peak.max(kb as f64 / 1024.0);
                SCENARIO_PEAK_KIB.fetch_max(kb, Ordering::Relaxed);
            }
            PEAK_ANON_KIB.fetch_max(field("RssAnon:").unwrap_or(0), Ordering::Relaxed);
            PEAK_FILE_KIB.fetch_max(field("RssFile:").unwrap_or(0), Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(100));
        }
        peak
    })
}

/// The allocator's resident bytes at their highest sample over the run, and its live
/// (allocated) bytes in that sample, from the gateway's `/metrics`.
static PEAK_ALLOC_RESIDENT: AtomicU64 = AtomicU64::new(0);
static ALLOCATED_AT_PEAK: AtomicU64 = AtomicU64::new(0);

/// Reads the gateway's allocator figures from `/metrics` every 200 ms (a plain HTTP/1.1
/// request on a thread of its own, so the load generator's runtime is not involved).
fn watch_allocator(port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let mut text = String::new();
            if let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = conn.write_all(
                    b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                );
                let _ = conn.read_to_string(&mut text);
            }
            let bytes = |kind: &str| {
                let prefix = format!("rewind_allocator_bytes{{kind=\"{kind}\"}} ");
                text.lines()
                    .find_map(|l| l.strip_prefix(&prefix)?.trim().parse::<u64>().ok())
            };
            if let (Some(resident), Some(allocated)) = (bytes("resident"), bytes("allocated"))
                && resident > PEAK_ALLOC_RESIDENT.load(Ordering::Relaxed)
            {
                PEAK_ALLOC_RESIDENT.store(resident, Ordering::Relaxed);
                ALLOCATED_AT_PEAK.store(allocated, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn post(
    client: &HttpClient,
    url: &str,
    token: &str,
    content_type: &str,
    body: Bytes,
) -> anyhow::Result<()> {
    let req = hyper::Request::post(url)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", content_type)
        .body(Full::new(body))?;
    let resp = client.request(req).await?;
    let status = resp.status();
    let _ = resp.into_body().collect().await?;
    if status == 503 {
        // The bus did not acknowledge in time (e.g. JetStream saturated): what a client does
        // is retry; the request is not counted as acknowledged.
        RETRIED.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(50)).await;
        return Err(Retry.into());
    }
    if status != 202 {
        bail!("status {status}");
    }
    Ok(())
}

/// 503s seen (requests retried) across the run.
static RETRIED: AtomicU64 = AtomicU64::new(0);

#[derive(Debug)]
struct Retry;
impl std::fmt::Display for Retry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("503, retry")
    }
}
impl std::error::Error for Retry {}

/// Runs `conns` loops posting `body` for `secs`; returns requests completed per second.
async fn http_load(
    url: &str,
    token: &str,
    content_type: &str,
    body: Bytes,
    conns: usize,
    secs: u64,
) -> anyhow::Result<f64> {
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(conns)
        .build_http();
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (client, url, token, ct, body, done) = (
            client.clone(),
            url.to_string(),
            token.to_string(),
            content_type.to_string(),
            body.clone(),
            done.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                match post(&client, &url, &token, &ct, body.clone()).await {
                    Ok(()) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if e.is::<Retry>() => {}
                    Err(e) => return Err(e),
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Posts batches at a fixed rate (open loop) and records each ack's latency.
async fn paced_latency(
    url: &str,
    token: &str,
    body: Bytes,
    batches_per_sec: f64,
    secs: u64,
) -> anyhow::Result<(f64, f64, f64)> {
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http();
    let hist = Arc::new(std::sync::Mutex::new(hdrhistogram::Histogram::<u64>::new(
        3,
    )?));
    let interval = Duration::from_secs_f64(1.0 / batches_per_sec);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    while Instant::now() < deadline {
        ticker.tick().await;
        let (client, url, token, body, hist) = (
            client.clone(),
            url.to_string(),
            token.to_string(),
            body.clone(),
            hist.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            post(&client, &url, &token, "application/x-ndjson", body).await?;
            hist.lock()
                .expect("lock")
                .record(t0.elapsed().as_micros() as u64)?;
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let h = hist.lock().expect("lock");
    Ok((
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.len() as f64 / secs as f64,
    ))
}

async fn grpc_load(
    gw: &Gateway,
    token: &str,
    collection: &str,
    streams: usize,
    secs: u64,
    event_bytes: usize,
) -> anyhow::Result<f64> {
    let channel = tonic::transport::Channel::from_shared(gw.url(""))?
        .connect()
        .await?;
    let events: Vec<pb::PublishEvent> = (0..BATCH)
        .map(|i| pb::PublishEvent {
            payload: event(i, event_bytes).into(),
            ..Default::default()
        })
        .collect();
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let mut client = pb::ingest_service_client::IngestServiceClient::new(channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let (events, collection, done) = (events.clone(), collection.to_string(), done.clone());
        let header: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse()?;
        tasks.push(tokio::spawn(async move {
            let requests = futures::stream::iter(0u64..).map(move |seq| pb::PublishRequest {
                collection: collection.clone(),
                events: events.clone(),
                sequence: seq,
            });
            let requests = futures::StreamExt::take_while(requests, move |_| {
                futures::future::ready(Instant::now() < deadline)
            });
            let mut req = tonic::Request::new(requests);
            req.metadata_mut().insert("authorization", header);
            let mut acks = client.publish_stream(req).await?.into_inner();
            while let Some(ack) = acks.message().await? {
                done.fetch_add(ack.accepted as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

use futures::StreamExt as _;

/// The bus's write mode: direct unless `REWIND_BUS_DIRECT_IO` says `false` (the gateway the
/// bench starts inherits the same environment).
fn bus_direct_io() -> bool {
    !matches!(
        std::env::var("REWIND_BUS_DIRECT_IO").as_deref(),
        Ok("false" | "0")
    )
}

/// The disk's own fsync behaviour, as a baseline for the ack latency: `bytes` written and
/// `fdatasync`ed `per_sec` times a second for `secs`, in a temp dir on the same filesystem
/// the gateway's data dir uses, the way the bus writes (`direct`: `O_DIRECT` from an aligned
/// buffer, else buffered appends). Returns (p50, p99, max) in ms.
fn disk_probe(
    bytes: usize,
    per_sec: f64,
    secs: u64,
    direct: bool,
) -> anyhow::Result<(f64, f64, f64)> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const ALIGN: usize = 4096;
    let dir = tempfile::tempdir()?;
    let mut options = std::fs::OpenOptions::new();
    options.create(true).write(true);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    let file = options.open(dir.path().join("probe"))?;
    let len = bytes.div_ceil(ALIGN) * ALIGN;
    let mut mem = vec![b'x'; len + ALIGN];
    let lead = mem.as_ptr().align_offset(ALIGN);
    let buf = &mut mem[lead..lead + len];
    let mut offset = 0u64;
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let period = Duration::from_secs_f64(1.0 / per_sec);
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        let t0 = Instant::now();
        file.write_all_at(buf, offset)?;
        file.sync_data()?;
        offset += len as u64;
        let took = t0.elapsed();
        hist.record(took.as_micros() as u64)?;
        if took < period {
            std::thread::sleep(period - took);
        }
    }
    Ok((
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.max() as f64 / 1000.0,
    ))
}

/// Raw JetStream: single 1 KiB messages, each awaited for its publish ack, with up to 256 in
/// flight (async publishing, as a well-written client would).
async fn raw_jetstream(url: &str, secs: u64, event_bytes: usize) -> anyhow::Result<f64> {
    let client = async_nats::connect(url).await?;
    let js = async_nats::jetstream::new(client);
    let _ = js.delete_stream("BENCH_RAW").await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "BENCH_RAW".into(),
        subjects: vec!["bench.raw".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let payload = Bytes::from(event(0, event_bytes));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut done = 0u64;
    while Instant::now() < deadline {
        while in_flight.len() < 256 {
            in_flight.push(std::future::IntoFuture::into_future(
                js.publish("bench.raw", payload.clone()).await?,
            ));
        }
        if let Some(ack) = in_flight.next().await {
            ack?;
            done += 1;
        }
    }
    while let Some(ack) = in_flight.next().await {
        ack?;
        done += 1;
    }
    let rate = done as f64 / started.elapsed().as_secs_f64();
    let _ = js.delete_stream("BENCH_RAW").await;
    Ok(rate)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(events) = args.archive_events {
        return archive_bench(events, args.event_bytes).await;
    }
    if args.plugins {
        return plugin_bench::run(args.secs, args.event_bytes).await;
    }
    if let Some(events) = args.replay_events {
        return replay_bench::run(events, args.replay_scan_events).await;
    }
    if let Some(events) = args.search_events {
        return search_bench::run(
            events,
            args.search_queries,
            args.event_bytes,
            args.secs,
            args.meili.clone(),
        )
        .await;
    }
    if let Some(flush) = args.archive_latency_flush_secs {
        return archive_latency_bench(flush, args.secs, args.event_bytes).await;
    }
    let secs = args.secs;
    let batch_body = Bytes::from(
        (0..BATCH)
            .map(|i| event(i, args.event_bytes) + "\n")
            .collect::<String>(),
    );
    let single_body = Bytes::from(event(0, args.event_bytes));
    println!(
        "rewind-bench: {} s per scenario, {}-byte JSON events, batches of {BATCH}",
        secs, args.event_bytes
    );
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string())
            )
            .unwrap_or_default()
    );

    let gw = Gateway::start(&[]).await?;
    let (token, col) = gw.setup().await?;
    let stop = Arc::new(AtomicBool::new(false));
    let rss = watch_rss(gw.child.id(), stop.clone());
    let allocator = watch_allocator(gw.port, stop.clone());
    let url = gw.url(&format!("/v1/collections/{col}/events"));

    let batch_rps = http_load(
        &url,
        &token,
        "application/x-ndjson",
        batch_body.clone(),
        args.http_conns,
        secs,
    )
    .await?;
    let http_events = batch_rps * BATCH as f64;
    println!(
        "| HTTP batches of {BATCH}, local bus | {:.0} events/s ({:.0} requests/s, {} connections; gateway RSS peak {:.0} MiB) |",
        http_events,
        batch_rps,
        args.http_conns,
        take_scenario_peak()
    );

    let grpc_events =
        grpc_load(&gw, &token, &col, args.grpc_streams, secs, args.event_bytes).await?;
    println!(
        "| gRPC PublishStream, batches of {BATCH}, local bus | {:.0} events/s ({} streams; RSS peak {:.0} MiB) |",
        grpc_events,
        args.grpc_streams,
        take_scenario_peak()
    );

    let single = http_load(
        &url,
        &token,
        "application/json",
        single_body,
        args.single_conns,
        secs,
    )
    .await?;
    println!(
        "| HTTP single-event requests, local bus | {:.0} requests/s ({} connections; RSS peak {:.0} MiB) |",
        single,
        args.single_conns,
        take_scenario_peak()
    );

    let appends_before = append_histogram(&gw).await?;
    let handled_before = gateway_histogram(&gw, "rewind_ingest_request_seconds").await?;
    let steal = StealWatch::start();
    let (p50, p99, achieved) =
        paced_latency(&url, &token, batch_body.clone(), batch_rps / 2.0, secs).await?;
    let steal = steal.finish();
    let appends = append_histogram(&gw).await?;
    let handled = gateway_histogram(&gw, "rewind_ingest_request_seconds").await?;
    println!(
        "| ack latency at half the peak batch rate ({:.0} events/s offered, {:.0} achieved) | p50 {:.2} ms, p99 {:.2} ms (RSS peak {:.0} MiB) |",
        batch_rps / 2.0 * BATCH as f64,
        achieved * BATCH as f64,
        p50,
        p99,
        take_scenario_peak()
    );
    // The gateway's own histogram of append → durable (the bus writer's write + fdatasync)
    // over the same window: what of the tail is the disk, and what is waiting for a CPU.
    let (a50, a99) = window_p50_p99_ms(&appends_before, &appends);
    println!(
        "| of which the bus append (write + fdatasync) in the gateway, same window | p50 ≤ {a50:.1} ms, p99 ≤ {a99:.1} ms (histogram bucket bounds) |"
    );
    // The gateway's own time per request (headers in → response out), same window: the rest
    // of the client's latency is the connection, the client's own scheduling and the reply.
    let (h50, h99) = window_p50_p99_ms(&handled_before, &handled);
    println!(
        "| of which the gateway's handling of the request (body read, parsed, durable), same window | p50 ≤ {h50:.1} ms, p99 ≤ {h99:.1} ms (histogram bucket bounds) |"
    );
    if let Some((pct, worst_ms, window_ms, cpus)) = steal {
        println!(
            "| hypervisor steal, same window (/proc/stat) | {pct:.1} % of the {cpus} vCPUs' time; worst {window_ms} ms: {worst_ms} of {} vCPU-ms stolen |",
            window_ms * cpus
        );
    }
    let direct = bus_direct_io();
    let (d50, d99, dmax) = tokio::task::spawn_blocking(move || {
        disk_probe(BATCH * 1024, batch_rps / 2.0, secs, direct)
    })
    .await??;
    println!(
        "| disk baseline: {} KiB write + fdatasync at the same rate ({}, as the bus), no gateway requests | p50 {d50:.2} ms, p99 {d99:.2} ms, max {dmax:.0} ms |",
        BATCH,
        if direct { "direct I/O" } else { "buffered" }
    );
    stop.store(true, Ordering::Relaxed);
    let peak = rss.join().expect("rss thread");
    allocator.join().expect("allocator thread");
    // The disk baseline's seconds send the gateway no requests: what it holds then is its
    // background work (the archiver and the indexer working off the peak scenarios' backlog).
    let background_peak = take_scenario_peak();
    println!(
        "| gateway peak RSS (all scenarios above) | {:.0} MiB (during the disk baseline, background work only: {:.0} MiB; now {:.0} MiB; peaks of its parts: anonymous {:.0} MiB, mapped files {:.0} MiB; the allocator's resident peak {:.0} MiB, of which allocated {:.0} MiB) |",
        peak,
        background_peak,
        gw.rss_mib(),
        PEAK_ANON_KIB.load(Ordering::Relaxed) as f64 / 1024.0,
        PEAK_FILE_KIB.load(Ordering::Relaxed) as f64 / 1024.0,
        PEAK_ALLOC_RESIDENT.load(Ordering::Relaxed) as f64 / (1 << 20) as f64,
        ALLOCATED_AT_PEAK.load(Ordering::Relaxed) as f64 / (1 << 20) as f64,
    );
    drop(gw);

    // Kept alive (and killed on drop) for the NATS scenarios.
    let mut own_nats: Option<(Child, tempfile::TempDir)> = None;
    let spawned_url;
    let nats_url = match args.nats.as_deref() {
        Some("spawn") => {
            let store = tempfile::tempdir()?;
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let child = Command::new("/usr/sbin/nats-server")
                .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
                .arg(store.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot start /usr/sbin/nats-server")?;
            own_nats = Some((child, store));
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if Instant::now() > deadline {
                    bail!("nats-server did not start");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            spawned_url = format!("nats://127.0.0.1:{port}");
            Some(&spawned_url)
        }
        Some(_) => args.nats.as_ref(),
        None => None,
    };
    if let Some(nats) = nats_url {
        let raw = raw_jetstream(nats, secs, args.event_bytes).await?;
        println!(
            "| raw JetStream publish, single {}-byte messages (baseline) | {:.0} messages/s |",
            args.event_bytes, raw
        );
        let gw = Gateway::start(&["--bus", nats]).await?;
        let (token, col) = gw.setup().await?;
        let url = gw.url(&format!("/v1/collections/{col}/events"));
        let rps = http_load(
            &url,
            &token,
            "application/x-ndjson",
            batch_body,
            args.http_conns,
            secs,
        )
        .await?;
        let events = rps * BATCH as f64;
        println!(
            "| HTTP batches of {BATCH}, NATS bus | {:.0} events/s ({:.1}x the raw baseline; {} requests answered 503 and retried) |",
            events,
            events / raw,
            RETRIED.load(Ordering::Relaxed)
        );
    }
    if let Some((mut child, _store)) = own_nats.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
    Ok(())
}
