//! `rewind replay create|get|list|pause|resume|cancel`. `create --wait` follows the replay
//! to its end — a progress bar on a terminal, plain progress lines otherwise (CI logs) — and
//! exits 0 only when it completed.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::Remote;
use super::client::{Client, print};

#[derive(Debug, Subcommand)]
pub enum ReplayCommand {
    /// Start a replay of a collection's archive into a destination (or a collection).
    Create(Box<CreateArgs>),
    /// Show a replay's state and progress.
    Get { id: String },
    /// List the team's replays, newest first.
    List {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Pause a replay after its current batch.
    Pause { id: String },
    /// Resume a paused replay.
    Resume { id: String },
    /// Cancel a replay after its current batch.
    Cancel { id: String },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Source collection id or name.
    pub collection: String,
    /// Destination name or id (POST /v1/destinations); or use --to-collection.
    #[arg(long, short = 'd')]
    pub destination: Option<String>,
    /// Backfill this collection of the team instead of delivering to a destination.
    #[arg(long, conflicts_with = "destination")]
    pub to_collection: Option<String>,
    /// Start of the range on received_at (RFC 3339), inclusive [default: the beginning].
    #[arg(long)]
    pub from: Option<String>,
    /// End of the range (RFC 3339), exclusive [default: now].
    #[arg(long)]
    pub to: Option<String>,
    /// Only events matching this filter (docs/query.md).
    #[arg(long)]
    pub filter: Option<String>,
    /// At most this many events.
    #[arg(long)]
    pub limit: Option<i64>,
    /// Events per second.
    #[arg(long, conflicts_with = "original")]
    pub rate: Option<f64>,
    /// Keep the events' original gaps, --speed times faster.
    #[arg(long)]
    pub original: bool,
    /// With --original: how many times faster than real time.
    #[arg(long, requires = "original")]
    pub speed: Option<f64>,
    /// A transform applied before delivery, as `name@version` (repeatable); its config with
    /// --transform-config in the same order (JSON).
    #[arg(long = "transform")]
    pub transforms: Vec<String>,
    #[arg(long = "transform-config")]
    pub transform_configs: Vec<String>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub max_retries: Option<u32>,
    /// Fail the replay when more than this fraction of its events fail [default: 0.1].
    #[arg(long)]
    pub max_failure_ratio: Option<f64>,
    /// Count the selection and print a sample; deliver nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Follow the replay until it ends; exit 0 only if it completed.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: seconds between progress lines when not on a terminal.
    #[arg(long, default_value_t = 5)]
    pub progress_every: u64,
}

pub async fn run(remote: Remote, command: ReplayCommand) -> anyhow::Result<()> {
    let client = Client::new(&remote, None)?;
    use reqwest::Method;
    match command {
        ReplayCommand::Create(args) => create(&client, *args).await,
        ReplayCommand::Get { id } => {
            print(
                &client
                    .call(Method::GET, &format!("/v1/replays/{id}"), None)
                    .await?,
            );
            Ok(())
        }
        ReplayCommand::List { limit } => {
            let list = client
                .call(Method::GET, &format!("/v1/replays?limit={limit}"), None)
                .await?;
            for r in list["replays"].as_array().into_iter().flatten() {
                println!("{}", line(r));
            }
            Ok(())
        }
        ReplayCommand::Pause { id } => control(&client, &id, "pause").await,
        ReplayCommand::Resume { id } => control(&client, &id, "resume").await,
        ReplayCommand::Cancel { id } => control(&client, &id, "cancel").await,
    }
}

async fn control(client: &Client, id: &str, action: &str) -> anyhow::Result<()> {
    print(
        &client
            .call(
                reqwest::Method::POST,
                &format!("/v1/replays/{id}/{action}"),
                None,
            )
            .await?,
    );
    Ok(())
}

async fn create(client: &Client, args: CreateArgs) -> anyhow::Result<()> {
    if args.transform_configs.len() > args.transforms.len() {
        bail!("more --transform-config than --transform values");
    }
    let mut transforms = Vec::new();
    for (i, t) in args.transforms.iter().enumerate() {
        let config: Value = match args.transform_configs.get(i) {
            Some(c) => serde_json::from_str(c)
                .map_err(|e| anyhow::anyhow!("--transform-config {c:?} is not JSON: {e}"))?,
            None => json!({}),
        };
        transforms.push(json!({"plugin": t, "config": config}));
    }
    let destination = match (&args.destination, &args.to_collection) {
        (Some(d), _) => json!(d),
        (None, Some(c)) => json!({"collection": c}),
        (None, None) if args.dry_run => Value::Null,
        (None, None) => bail!("say where to deliver: --destination NAME or --to-collection NAME"),
    };
    let mut body = json!({
        "collection": args.collection,
        "from": args.from,
        "to": args.to,
        "filter": args.filter,
        "limit": args.limit,
        "destination": destination,
        "rate_per_sec": args.rate,
        "transforms": transforms,
        "batch_size": args.batch_size,
        "max_retries": args.max_retries,
        "max_failure_ratio": args.max_failure_ratio,
        "dry_run": args.dry_run,
    });
    if args.original {
        body["pace"] = json!("original");
        body["speed"] = json!(args.speed.unwrap_or(1.0));
    }
    let created = client
        .call(reqwest::Method::POST, "/v1/replays", Some(body))
        .await?;
    if args.dry_run || !args.wait {
        print(&created);
        return Ok(());
    }
    let id = created["id"].as_str().unwrap_or_default().to_string();
    eprintln!("replay {id} created");
    wait(client, &id, Duration::from_secs(args.progress_every.max(1))).await
}

/// One line of progress.
fn line(r: &Value) -> String {
    let total = r["total"].as_i64();
    let delivered = r["delivered"].as_i64().unwrap_or(0);
    let failed = r["failed"].as_i64().unwrap_or(0);
    let mut s = format!(
        "replay {} {}: {} delivered",
        r["id"].as_str().unwrap_or(""),
        r["status"].as_str().unwrap_or(""),
        delivered
    );
    if let Some(t) = total {
        s.push_str(&format!(
            " of {t} ({:.0}%)",
            100.0 * r["progress"].as_f64().unwrap_or(0.0)
        ));
    }
    s.push_str(&format!(
        ", {failed} failed, {} retried, {:.0} events/s",
        r["retried"].as_i64().unwrap_or(0),
        r["current_rate"].as_f64().unwrap_or(0.0)
    ));
    if let Some(eta) = r["eta_secs"].as_f64() {
        s.push_str(&format!(", ETA {eta:.0}s"));
    }
    s
}

fn bar(r: &Value) -> String {
    let width = 30;
    let p = r["progress"].as_f64().unwrap_or(0.0).clamp(0.0, 1.0);
    let filled = (p * width as f64).round() as usize;
    format!(
        "[{}{}] {:>3.0}% {}",
        "#".repeat(filled),
        "-".repeat(width - filled),
        p * 100.0,
        line(r)
    )
}

async fn wait(client: &Client, id: &str, every: Duration) -> anyhow::Result<()> {
    let tty = std::io::stderr().is_terminal() && std::env::var_os("CI").is_none();
    let mut last_line = Instant::now() - every;
    let mut last_status = String::new();
    loop {
        let r = client
            .call(reqwest::Method::GET, &format!("/v1/replays/{id}"), None)
            .await?;
        let status = r["status"].as_str().unwrap_or("").to_string();
        let done = matches!(status.as_str(), "completed" | "failed" | "cancelled");
        if tty {
            eprint!("\r\x1b[2K{}", bar(&r));
            if done {
                eprintln!();
            }
            let _ = std::io::stderr().flush();
        } else if done || status != last_status || last_line.elapsed() >= every {
            eprintln!("{}", line(&r));
            last_line = Instant::now();
        }
        last_status = status.clone();
        if done {
            print(&r);
            return match status.as_str() {
                "completed" => Ok(()),
                "failed" => bail!(
                    "replay {id} failed: {}",
                    r["error"].as_str().unwrap_or("no reason recorded")
                ),
                _ => bail!("replay {id} was cancelled"),
            };
        }
        tokio::time::sleep(Duration::from_millis(if tty { 300 } else { 1000 })).await;
    }
}
