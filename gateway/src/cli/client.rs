//! The client side of the CLI: REST calls with clear errors, and `send` with retries that
//! honour `Retry-After`.

use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};

use super::{
    BusForgetArgs, BusReadArgs, CollectionCommand, ExportArgs, Remote, SearchArgs, SendArgs,
    TailArgs, TeamCommand, TokenCommand,
};

pub(super) struct Client {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Client {
    pub(super) fn new(remote: &Remote, token: Option<String>) -> anyhow::Result<Self> {
        let token = token.or_else(|| remote.token.clone()).ok_or_else(|| {
            anyhow!("no token: set REWIND_TOKEN (or pass --token) to a team token")
        })?;
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()?,
            url: remote.url.trim_end_matches('/').to_string(),
            token,
        })
    }

    pub(super) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        // A 429 is waited out (as long as its Retry-After says) a few times before failing.
        let mut attempts = 0;
        loop {
            match self.call_once(method.clone(), path, body.clone()).await {
                Err(e) if attempts < 10 => match e.downcast_ref::<RateLimited>() {
                    Some(RateLimited(wait)) => {
                        attempts += 1;
                        tokio::time::sleep(*wait).await;
                    }
                    None => return Err(e),
                },
                other => return other,
            }
        }
    }

    async fn call_once(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the gateway at {}", self.url))?;
        let status = resp.status();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            let wait = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1);
            return Err(RateLimited(Duration::from_secs(wait)).into());
        }
        let text = resp.text().await?;
        if !status.is_success() {
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or(text);
            bail!("{status}: {message}");
        }
        Ok(if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)?
        })
    }
}

/// The gateway said 429: wait this long.
#[derive(Debug)]
struct RateLimited(Duration);

impl std::fmt::Display for RateLimited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "429 Too Many Requests: the gateway asks to wait {}s",
            self.0.as_secs()
        )
    }
}

impl std::error::Error for RateLimited {}

pub(super) fn print(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

fn root_token(remote: &Remote) -> Option<String> {
    remote
        .token
        .clone()
        .or_else(|| {
            std::env::var("REWIND_ROOT_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
        })
        .or_else(|| {
            let dir = std::env::var("REWIND_DATA_DIR").unwrap_or_else(|_| "./rewind-data".into());
            std::fs::read_to_string(std::path::Path::new(&dir).join("root-token"))
                .ok()
                .map(|t| t.trim().to_string())
        })
}

pub async fn team(remote: Remote, command: TeamCommand) -> anyhow::Result<()> {
    let client = Client::new(&remote, root_token(&remote))?;
    match command {
        TeamCommand::Create { name } => {
            let team = client
                .call(
                    reqwest::Method::POST,
                    "/v1/teams",
                    Some(json!({"name": name})),
                )
                .await?;
            print(&team);
            eprintln!("Keep admin_token safe: it is shown only once.");
        }
    }
    Ok(())
}

pub async fn token(remote: Remote, command: TokenCommand) -> anyhow::Result<()> {
    let client = Client::new(&remote, None)?;
    match command {
        TokenCommand::Create { name, scopes } => {
            print(
                &client
                    .call(
                        reqwest::Method::POST,
                        "/v1/tokens",
                        Some(json!({"name": name, "scopes": scopes})),
                    )
                    .await?,
            );
            eprintln!("Keep the token safe: it is shown only once.");
        }
        TokenCommand::List => print(
            &client
                .call(reqwest::Method::GET, "/v1/tokens", None)
                .await?,
        ),
        TokenCommand::Revoke { id } => {
            client
                .call(reqwest::Method::DELETE, &format!("/v1/tokens/{id}"), None)
                .await?;
            eprintln!("revoked {id}");
        }
    }
    Ok(())
}

pub async fn collection(remote: Remote, command: CollectionCommand) -> anyhow::Result<()> {
    let client = Client::new(&remote, None)?;
    let value = match command {
        CollectionCommand::Create {
            name,
            search_window_secs,
        } => {
            client
                .call(
                    reqwest::Method::POST,
                    "/v1/collections",
                    Some(json!({"name": name, "search_window_secs": search_window_secs})),
                )
                .await?
        }
        CollectionCommand::SetWindow { id, secs } => {
            client
                .call(
                    reqwest::Method::PATCH,
                    &format!("/v1/collections/{id}"),
                    Some(json!({ "search_window_secs": secs })),
                )
                .await?
        }
        CollectionCommand::List => {
            client
                .call(reqwest::Method::GET, "/v1/collections", None)
                .await?
        }
        CollectionCommand::Get { id } => {
            client
                .call(reqwest::Method::GET, &format!("/v1/collections/{id}"), None)
                .await?
        }
    };
    print(&value);
    Ok(())
}

/// Posts one NDJSON batch, retrying 429/503 (honouring Retry-After) and connection errors.
async fn post_batch(
    client: &Client,
    path: &str,
    body: String,
    retries: u32,
) -> anyhow::Result<Vec<String>> {
    let mut attempt = 0;
    loop {
        let result = client
            .http
            .post(format!("{}{path}", client.url))
            .bearer_auth(&client.token)
            .header("content-type", "application/x-ndjson")
            .body(body.clone())
            .send()
            .await;
        let wait = match result {
            Ok(resp) if resp.status().is_success() => {
                let v: Value = resp.json().await?;
                return Ok(v["ids"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default());
            }
            Ok(resp) if matches!(resp.status().as_u16(), 429 | 503) => {
                let secs = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .unwrap_or(1);
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                eprintln!("rewind send: {status}, retrying in {secs}s: {text}");
                Duration::from_secs(secs)
            }
            Ok(resp) => {
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                let message = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                    .unwrap_or(text);
                bail!("{status}: {message}");
            }
            Err(e) => {
                eprintln!("rewind send: cannot reach {} ({e}), retrying", client.url);
                Duration::from_secs(1)
            }
        };
        attempt += 1;
        if attempt > retries {
            bail!("gave up after {retries} retries");
        }
        tokio::time::sleep(wait).await;
    }
}

pub async fn send(args: SendArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.remote, None)?;
    let path = format!("/v1/collections/{}/events", args.collection);
    let mut readers: Vec<Box<dyn BufRead>> = Vec::new();
    if args.files.is_empty() || args.files.iter().any(|f| f.as_os_str() == "-") {
        readers.push(Box::new(std::io::BufReader::new(std::io::stdin())));
    }
    for f in args.files.iter().filter(|f| f.as_os_str() != "-") {
        readers.push(Box::new(std::io::BufReader::new(
            std::fs::File::open(f).with_context(|| format!("cannot open {}", f.display()))?,
        )));
    }
    let batch_size = args.batch.max(1);
    let mut sent = 0usize;
    let mut stdout = std::io::stdout().lock();
    for reader in readers {
        let mut batch = String::new();
        let mut in_batch = 0;
        let mut line_no = 0usize;
        let mut batch_first_line = 1usize;
        let mut lines = reader.lines();
        loop {
            let line = lines.next().transpose()?;
            line_no += 1;
            if in_batch == 0 {
                batch_first_line = line_no;
            }
            if let Some(line) = &line
                && !line.trim().is_empty()
            {
                batch.push_str(line);
                batch.push('\n');
                in_batch += 1;
            }
            if in_batch > 0 && (in_batch == batch_size || line.is_none()) {
                let ids = post_batch(&client, &path, std::mem::take(&mut batch), args.retries)
                    .await
                    .with_context(|| {
                        format!("in the batch starting at input line {batch_first_line} (line numbers in the error count from there; blank lines are skipped); {sent} events were stored before it")
                    })?;
                sent += ids.len();
                in_batch = 0;
                if args.print_ids {
                    for id in ids {
                        writeln!(stdout, "{id}")?;
                    }
                }
            }
            if line.is_none() {
                break;
            }
        }
    }
    eprintln!("rewind send: {sent} events stored in {}", args.collection);
    Ok(())
}

pub fn bus_forget(args: BusForgetArgs) -> anyhow::Result<()> {
    let config = args.serve.resolve()?;
    if !matches!(config.bus, crate::config::BusConfig::Local) {
        anyhow::bail!(
            "`rewind bus forget` is for the local bus; on NATS, delete the durable consumer with the nats CLI"
        );
    }
    let bus = crate::bus::local::LocalBus::open(
        &config.data_dir.join("bus"),
        crate::bus::local::LocalBusOptions::default(),
    )?;
    let position = bus.forget_consumer(&args.consumer)?;
    eprintln!(
        "rewind bus: forgot consumer {} (it was at position {position})",
        args.consumer
    );
    Ok(())
}

pub async fn bus_read(args: BusReadArgs) -> anyhow::Result<()> {
    let config = args.serve.resolve()?;
    let bus = crate::server::open_bus(&config, crate::server::BusReader::Tool).await?;
    let mut consumer = bus.consumer(&args.consumer).await?;
    let idle = Duration::from_millis(args.idle_ms);
    let mut stdout = std::io::stdout().lock();
    loop {
        let delivery = match tokio::time::timeout(idle, consumer.next()).await {
            Err(_) => break,
            Ok(d) => d?,
        };
        for e in &delivery.batch.events {
            let line = json!({
                "position": delivery.position,
                "team": delivery.batch.team_id,
                "collection": delivery.batch.collection_id,
                "id": e.id,
                "client_id": e.client_id,
                "received_at": crate::ids::micros_to_rfc3339(e.received_at_micros),
                "bytes": e.payload.len(),
            });
            writeln!(stdout, "{line}")?;
        }
        if args.ack {
            consumer.ack(delivery).await?;
        }
    }
    consumer.commit().await?;
    drop(consumer);
    bus.close().await;
    Ok(())
}

/// `rewind search`: pages of events as NDJSON on stdout; what the gateway said about the page
/// on stderr.
pub async fn search(args: SearchArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.remote, None)?;
    let mut cursor = args.cursor.clone();
    let mut stdout = std::io::stdout().lock();
    let mut total = 0usize;
    loop {
        let mut query: Vec<(&str, String)> = vec![("limit", args.limit.to_string())];
        for (k, v) in [
            ("q", &args.q),
            ("filter", &args.filter),
            ("from", &args.from),
            ("to", &args.to),
            ("cursor", &cursor),
            ("facet", &args.facet),
        ] {
            if let Some(v) = v {
                query.push((k, v.clone()));
            }
        }
        let resp = client
            .http
            .get(format!(
                "{}/v1/collections/{}/events",
                client.url, args.collection
            ))
            .query(&query)
            .bearer_auth(&client.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the gateway at {}", client.url))?;
        let status = resp.status();
        let text = resp.text().await?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if !status.is_success() {
            let message = value["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or(text);
            bail!("{status}: {message}");
        }
        for e in value["events"].as_array().into_iter().flatten() {
            writeln!(stdout, "{e}")?;
            total += 1;
        }
        if let Some(facets) = value["facets"]["values"].as_array()
            && cursor == args.cursor
        {
            eprintln!("facet {}:", value["facets"]["field"].as_str().unwrap_or(""));
            for f in facets {
                eprintln!("  {:>8}  {}", f["count"], f["value"].as_str().unwrap_or(""));
            }
        }
        if value["limit_capped"] == true {
            eprintln!("rewind search: --limit was capped to {}", value["limit"]);
        }
        cursor = value["next_cursor"].as_str().map(str::to_string);
        if !args.all || cursor.is_none() {
            stdout.flush()?;
            eprintln!(
                "rewind search: {total} events (source: {}){}",
                value["source"].as_str().unwrap_or("?"),
                match &cursor {
                    Some(c) => format!("; more with --cursor {c}"),
                    None => String::new(),
                }
            );
            return Ok(());
        }
    }
}

/// `rewind tail`: NDJSON of matching events as they arrive, until interrupted.
pub async fn tail(args: TailArgs) -> anyhow::Result<()> {
    use futures::StreamExt;
    let client = Client::new(&args.remote, None)?;
    let mut query: Vec<(&str, String)> = Vec::new();
    if let Some(q) = &args.q {
        query.push(("q", q.clone()));
    }
    if let Some(f) = &args.filter {
        query.push(("filter", f.clone()));
    }
    let resp = client
        .http
        .get(format!(
            "{}/v1/collections/{}/tail",
            client.url, args.collection
        ))
        .query(&query)
        .bearer_auth(&client.token)
        .timeout(Duration::from_secs(365 * 24 * 3600))
        .send()
        .await
        .with_context(|| format!("cannot reach the gateway at {}", client.url))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(text);
        bail!("{status}: {message}");
    }
    eprintln!(
        "rewind tail: following {} (Ctrl-C to stop)",
        args.collection
    );
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("the gateway closed the tail; run it again")?;
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(&chunk)?;
        stdout.flush()?;
    }
    bail!("the gateway ended the tail (shutting down?); run it again")
}

pub async fn export(args: ExportArgs) -> anyhow::Result<()> {
    use futures::StreamExt;
    let client = Client::new(&args.remote, None)?;
    let mut query: Vec<(&str, String)> = Vec::new();
    if let Some(from) = &args.from {
        query.push(("from", from.clone()));
    }
    if let Some(to) = &args.to {
        query.push(("to", to.clone()));
    }
    if let Some(filter) = &args.filter {
        query.push(("filter", filter.clone()));
    }
    let resp = client
        .http
        .get(format!(
            "{}/v1/collections/{}/export",
            client.url, args.collection
        ))
        .query(&query)
        .bearer_auth(&client.token)
        .timeout(Duration::from_secs(24 * 3600))
        .send()
        .await
        .with_context(|| format!("cannot reach the gateway at {}", client.url))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(text);
        bail!("{status}: {message}");
    }
    let mut stdout = std::io::stdout().lock();
    let mut stream = resp.bytes_stream();
    let mut lines = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("the export was interrupted; rerun it")?;
        lines += chunk.iter().filter(|b| **b == b'\n').count();
        stdout.write_all(&chunk)?;
    }
    stdout.flush()?;
    eprintln!("rewind export: {lines} events");
    Ok(())
}
