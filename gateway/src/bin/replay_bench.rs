//! `rewind-bench --replay-events N [--replay-scan-events M]`: the replay figures of
//! `docs/benchmarks.md`, against a release gateway on a NATS bus (a nats-server of its own).
//!
//! 1. N realistic ~1 KiB JSON events are archived (through the library's archiver, into the
//!    gateway's data dir), then replayed unpaced to NATS (the `nats-publish` plugin) and to a
//!    batched HTTP webhook (`http-webhook`, `mode: batch`) on loopback: events/s.
//! 2. M events of which 0.1% have `tier = "rare"` are archived in another collection; a
//!    replay of `tier = "rare"` to NATS: time to the first delivered event and the scan speed
//!    of the whole selection, beside DuckDB running the same filter over the same files
//!    (sorted the same way) in the same run.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::{Gateway, ROOT, realistic_event};

struct Nats {
    child: Child,
    _store: tempfile::TempDir,
    port: u16,
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_nats() -> anyhow::Result<Nats> {
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
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nats-server did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Nats {
        child,
        _store: store,
        port,
    })
}

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("{path}: {status} {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn upload(&self, token: &str, name: &str, package: &str) -> anyhow::Result<()> {
        let bytes = std::fs::read(rewind_gateway::plugins::fixtures::build(package))?;
        let resp = self
            .http
            .post(format!(
                "{}/v1/plugins?name={name}&version=1.0.0",
                self.base
            ))
            .bearer_auth(token)
            .body(bytes)
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("upload {name}: {}", resp.text().await?);
        }
        Ok(())
    }
}

/// Archives `n` events into the gateway's data dir (stopped), through a local bus and the
/// archiver, as the gateway itself would. Every `rare_every`-th event has `tier = "rare"`.
async fn fill(
    dir: &std::path::Path,
    team: &str,
    col: &str,
    n: usize,
    rare_every: usize,
) -> anyhow::Result<f64> {
    use rewind_gateway::archive::archiver::{Archiver, ArchiverOptions};
    use rewind_gateway::bus::Bus;
    let scratch = tempfile::tempdir_in(dir)?;
    let bus: Arc<dyn Bus> = Arc::new(rewind_gateway::bus::local::LocalBus::open(
        &scratch.path().join("bus"),
        Default::default(),
    )?);
    let meta: Arc<dyn rewind_gateway::meta::Metastore> =
        Arc::new(rewind_gateway::meta::SqlMetastore::open_sqlite(&dir.join("metastore.db")).await?);
    let store = rewind_gateway::archive::store::open(&dir.join("archive").display().to_string())?;
    let mut rng = rand::rng();
    let pool: Vec<String> = (0..5000).map(|_| realistic_event(960, &mut rng)).collect();
    let t0 = Instant::now();
    let mut appends = Vec::new();
    for start in (0..n).step_by(500) {
        let now = rewind_gateway::ids::now_micros();
        let batch = rewind_gateway::bus::BusBatch {
            team_id: team.into(),
            collection_id: col.into(),
            events: (start..(start + 500).min(n))
                .map(|i| rewind_gateway::bus::Event {
                    id: ulid::Ulid::new().to_string(),
                    received_at_micros: now,
                    payload: format!(
                        "{{\"seq\":{i},\"tier\":\"{}\",{}",
                        if i % rare_every == 0 {
                            "rare"
                        } else {
                            "common"
                        },
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
    let task = tokio::spawn(archiver.run(stop_rx));
    while (status.events_archived.load(Ordering::Relaxed) as usize) < n {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop_tx.send(true);
    let _ = task.await;
    bus.close().await;
    Ok(t0.elapsed().as_secs_f64())
}

/// Runs a replay and waits for it: (replay JSON, seconds from create to completed).
async fn replay(api: &Api, token: &str, body: Value) -> anyhow::Result<(Value, f64)> {
    let t0 = Instant::now();
    let r = api
        .call(reqwest::Method::POST, "/v1/replays", token, Some(body))
        .await?;
    let id = r["id"].as_str().context("replay id")?.to_string();
    loop {
        let v = api
            .call(
                reqwest::Method::GET,
                &format!("/v1/replays/{id}"),
                token,
                None,
            )
            .await?;
        match v["status"].as_str() {
            Some("completed") => return Ok((v, t0.elapsed().as_secs_f64())),
            Some("failed") | Some("cancelled") => bail!("replay ended: {v}"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

pub async fn run(events: usize, scan_events: usize) -> anyhow::Result<()> {
    let nats = start_nats().await?;
    let nats_url = format!("nats://127.0.0.1:{}", nats.port);
    let flags = [
        "--bus",
        nats_url.as_str(),
        "--allow-private-destinations",
        "--replay-team-rate",
        "0",
        "--replay-api-rate",
        "1000",
    ];
    let gw = Gateway::start(&flags).await?;
    let api = Api {
        http: reqwest::Client::new(),
        base: gw.url(""),
    };
    let team = api
        .call(
            reqwest::Method::POST,
            "/v1/teams",
            ROOT,
            Some(json!({"name": "bench"})),
        )
        .await?;
    let admin = team["admin_token"].as_str().context("admin")?.to_string();
    let team_id = team["id"].as_str().context("team")?.to_string();
    let token = api
        .call(
            reqwest::Method::POST,
            "/v1/tokens",
            &admin,
            Some(json!({"name": "r", "scopes": ["replay", "read"]})),
        )
        .await?["token"]
        .as_str()
        .context("token")?
        .to_string();
    let mut cols = Vec::new();
    for name in ["events", "big"] {
        let c = api
            .call(
                reqwest::Method::POST,
                "/v1/collections",
                &admin,
                Some(json!({"name": name})),
            )
            .await?;
        cols.push(c["id"].as_str().context("collection")?.to_string());
    }
    api.upload(&admin, "nats", "rewind-plugin-nats-publish")
        .await?;
    api.upload(&admin, "webhook", "rewind-plugin-http-webhook")
        .await?;

    // The HTTP receiver: counts the events of batched deliveries.
    let received = Arc::new(AtomicU64::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    {
        let received = received.clone();
        let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
            let received = received.clone();
            async move {
                let n = serde_json::from_slice::<Vec<&serde_json::value::RawValue>>(&body)
                    .map(|v| v.len())
                    .unwrap_or(1);
                received.fetch_add(n as u64, Ordering::Relaxed);
                axum::http::StatusCode::OK
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
    }
    for (name, config) in [
        ("nats", json!({"subject": "bench.replay"})),
        ("rare", json!({"subject": "bench.rare"})),
        (
            "hook",
            json!({"url": format!("http://127.0.0.1:{port}/in"), "allow_hosts": ["127.0.0.1"], "mode": "batch"}),
        ),
    ] {
        let plugin = if name == "hook" {
            "webhook@1.0.0"
        } else {
            "nats@1.0.0"
        };
        api.call(
            reqwest::Method::POST,
            "/v1/destinations",
            &admin,
            Some(json!({"name": name, "plugin": plugin, "config": config})),
        )
        .await?;
    }
    let dir = gw.stop()?;
    let secs = fill(dir.path(), &team_id, &cols[0], events, usize::MAX).await?;
    println!(
        "| archive for the delivery runs | {events} events of ~1 KiB archived in {secs:.1} s |"
    );
    let secs = fill(dir.path(), &team_id, &cols[1], scan_events, 1000).await?;
    println!(
        "| archive for the selective run | {scan_events} events of ~1 KiB, 0.1% with tier = \"rare\", archived in {secs:.1} s |"
    );
    let gw = Gateway::start_in(dir, &flags).await?;
    let api = Api {
        http: reqwest::Client::new(),
        base: gw.url(""),
    };

    // 1. Unpaced to NATS.
    let client = async_nats::connect(&nats_url).await?;
    let mut sub = client.subscribe("bench.replay").await?;
    let nats_seen = Arc::new(AtomicU64::new(0));
    {
        let seen = nats_seen.clone();
        tokio::spawn(async move {
            while futures::StreamExt::next(&mut sub).await.is_some() {
                seen.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    client.flush().await?;
    let (v, secs) = replay(
        &api,
        &token,
        json!({"collection": "events", "destination": "nats", "batch_size": 5000}),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "| unpaced replay → NATS (nats-publish plugin), batches of 5000 | {} events in {secs:.2} s: **{:.0} events/s**; the subscriber received {} |",
        v["delivered"],
        events as f64 / secs,
        nats_seen.load(Ordering::Relaxed)
    );

    // 2. Unpaced to the batched webhook.
    let (v, secs) = replay(
        &api,
        &token,
        json!({"collection": "events", "destination": "hook", "batch_size": 1000}),
    )
    .await?;
    println!(
        "| unpaced replay → HTTP webhook on loopback (http-webhook, mode batch), batches of 1000 | {} events in {secs:.2} s: **{:.0} events/s**; the receiver counted {} |",
        v["delivered"],
        events as f64 / secs,
        received.load(Ordering::Relaxed)
    );

    // 3. Selective filter over the big collection.
    let mut rare = client.subscribe("bench.rare").await?;
    client.flush().await?;
    let t0 = Instant::now();
    let first = tokio::spawn(async move {
        futures::StreamExt::next(&mut rare).await;
        t0.elapsed()
    });
    let (v, secs) = replay(
        &api,
        &token,
        json!({"collection": "big", "destination": "rare", "filter": "tier = \"rare\""}),
    )
    .await?;
    let first = first.await?;
    let rewind_speed = scan_events as f64 / secs;
    println!(
        "| selective replay (0.1%: tier = \"rare\") over {scan_events} archived events → NATS | first event delivered after **{:.0} ms**; {} events, whole selection in {secs:.2} s = **{:.0} events scanned/s** |",
        first.as_secs_f64() * 1000.0,
        v["delivered"],
        rewind_speed
    );
    let glob = format!(
        "{}/archive/team={team_id}/collection={}/**/*.parquet",
        gw.data_dir().display(),
        cols[1]
    );
    let script = format!(
        "import duckdb, time\n\
         c = duckdb.connect()\n\
         c.execute('SET enable_progress_bar = false')\n\
         t = time.time()\n\
         n = len(c.execute(\"SELECT id, received_at, payload FROM read_parquet('{glob}') WHERE tier = 'rare' ORDER BY received_at, id\").fetchall())\n\
         print(n, time.time() - t)\n"
    );
    match Command::new("python3").arg("-c").arg(&script).output() {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let mut parts = text.lines().last().unwrap_or("").split_whitespace();
            let rows: u64 = parts.next().unwrap_or("0").parse().unwrap_or(0);
            let duck: f64 = parts.next().unwrap_or("0").parse().unwrap_or(0.0);
            let duck_speed = scan_events as f64 / duck;
            println!(
                "| DuckDB, same filter, same files, sorted the same (threads: default) | {rows} rows in {duck:.2} s = {:.0} events scanned/s; Rewind/DuckDB = **{:.2}** |",
                duck_speed,
                rewind_speed / duck_speed
            );
        }
        Ok(out) => println!(
            "| DuckDB | could not run: {} (pip install duckdb) |",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ),
        Err(e) => println!("| DuckDB | could not run python3: {e} |"),
    }
    drop(gw);
    drop(nats);
    Ok(())
}
