//! Sources: subscriptions the gateway keeps on teams' own NATS servers. Each message goes
//! through the source's ingress plugin (`handle` with a bus message) and the events the
//! plugin makes are ingested into the source's collection like any other event (same
//! limits, same pipeline, same archive).
//!
//! A source's task connects to the address its URL resolves to (checked like a destination's:
//! no loopback, private, link-local or metadata addresses unless the operator allows them,
//! servers the NATS server advertises are ignored), subscribes in a queue group named after
//! the source (several gateways on one metastore share the messages), and reconnects with
//! backoff. Core NATS is at-most-once: messages published while no gateway is subscribed are
//! not seen (docs/plugins.md#sources). Every gateway reconciles its subscriptions with the
//! metastore every [`RECONCILE`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;

use crate::api::AppState;
use crate::ids::now_micros;
use crate::ingest::{IncomingEvent, IngestError};
use crate::meta::SourceRecord;
use crate::plugins::PluginKind;
use crate::plugins::bindings::ingress::rewind::plugin::types::{Inbound, InboundMessage};

/// How often each gateway compares its subscriptions with the metastore.
pub const RECONCILE: Duration = Duration::from_secs(10);
/// Connecting to a source's server may take at most this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Backoff between connection attempts: from the first to the last value, doubling.
const BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));
/// Attempts to ingest one message's events when ingestion is temporarily refused.
const INGEST_ATTEMPTS: u32 = 6;

/// What a source is doing, for `GET /v1/sources`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceStatus {
    /// `connecting`, `subscribed`, or `error` (see `last_error`; it retries).
    pub state: &'static str,
    pub last_error: Option<String>,
    /// Messages received, events ingested from them, messages the plugin rejected, messages
    /// whose events could not be ingested.
    pub messages: u64,
    pub events: u64,
    pub rejected: u64,
    pub failed: u64,
    /// Microseconds since the epoch.
    pub last_message_at: Option<i64>,
}

struct Running {
    task: tokio::task::JoinHandle<()>,
    status: Arc<Mutex<SourceStatus>>,
}

/// The running sources of this gateway.
pub struct Sources {
    running: Mutex<HashMap<String, Running>>,
    allow_private: bool,
}

/// Why a source URL cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SourceUrlError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Refused(String),
}

/// A source URL, checked: where to connect and with which credentials.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub user: Option<(String, String)>,
}

/// The URL as it may be shown: the password replaced.
pub fn display_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => url.to_string(),
    }
}

/// Checks a `nats://` URL and resolves it to an address a source may connect to.
pub async fn resolve(url: &str, allow_private: bool) -> Result<Target, SourceUrlError> {
    let u = reqwest::Url::parse(url)
        .map_err(|e| SourceUrlError::Invalid(format!("invalid source URL {url:?}: {e}")))?;
    if u.scheme() != "nats" {
        return Err(SourceUrlError::Invalid(format!(
            "source URLs are nats://[user:password@]host[:port], not {}://",
            u.scheme()
        )));
    }
    let host = u
        .host_str()
        .ok_or_else(|| SourceUrlError::Invalid(format!("{url} has no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = u.port().unwrap_or(4222);
    let user = (!u.username().is_empty()).then(|| {
        let dec = |s: &str| percent_decode(s);
        (dec(u.username()), dec(u.password().unwrap_or("")))
    });
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::lookup_host((host.as_str(), port)),
        )
        .await
        .map_err(|_| SourceUrlError::Refused(format!("resolving {host} timed out")))?
        .map_err(|e| SourceUrlError::Refused(format!("cannot resolve {host}: {e}")))?
        .collect(),
    };
    let mut why = None;
    for addr in addrs {
        match crate::plugins::net::forbidden(addr.ip()) {
            Some(reason) if !allow_private => why = Some((addr.ip(), reason)),
            _ => return Ok(Target { addr, user }),
        }
    }
    Err(SourceUrlError::Refused(match why {
        Some((ip, reason)) => format!(
            "{host} is {ip}, {reason}; sources may not connect to it (an operator can allow it with --allow-private-destinations)"
        ),
        None => format!("{host} resolves to no address"),
    }))
}

/// `%XX` escapes of a URL's user or password, decoded.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks a NATS subject a source subscribes to (wildcards allowed).
pub fn check_subject(subject: &str) -> Result<(), String> {
    let bad = subject.is_empty()
        || subject.len() > 256
        || subject.chars().any(|c| c.is_whitespace() || c.is_control())
        || subject.split('.').any(str::is_empty)
        || subject
            .split('.')
            .enumerate()
            .any(|(i, t)| t == ">" && i != subject.split('.').count() - 1)
        || subject
            .split('.')
            .any(|t| t.len() > 1 && (t.contains('*') || t.contains('>')));
    if bad {
        return Err(format!(
            "{subject:?} is not a NATS subject: dot-separated non-empty tokens without spaces, `*` for one token, `>` as the last"
        ));
    }
    Ok(())
}

impl Sources {
    pub fn new(allow_private: bool) -> Arc<Self> {
        Arc::new(Self {
            running: Mutex::default(),
            allow_private,
        })
    }

    /// A running source's status (`None` when this gateway does not run it).
    pub fn status(&self, id: &str) -> Option<SourceStatus> {
        let running = self.running.lock().expect("lock");
        running
            .get(id)
            .map(|r| r.status.lock().expect("lock").clone())
    }

    /// Starts a source's subscription (nothing when it already runs).
    pub fn start(&self, state: Arc<AppState>, source: SourceRecord) {
        let mut running = self.running.lock().expect("lock");
        if running
            .get(&source.id)
            .is_some_and(|r| !r.task.is_finished())
        {
            return;
        }
        let status = Arc::new(Mutex::new(SourceStatus {
            state: "connecting",
            ..Default::default()
        }));
        let id = source.id.clone();
        let task = tokio::spawn(run(state, source, status.clone(), self.allow_private));
        running.insert(id, Running { task, status });
    }

    /// Stops a source's subscription.
    pub fn stop(&self, id: &str) {
        if let Some(r) = self.running.lock().expect("lock").remove(id) {
            r.task.abort();
        }
    }

    /// Stops every subscription (shutdown).
    pub fn stop_all(&self) {
        for (_, r) in self.running.lock().expect("lock").drain() {
            r.task.abort();
        }
    }

    /// Runs what the metastore lists and stops what it no longer does, every [`RECONCILE`],
    /// until `stop` turns true.
    pub async fn run(
        self: Arc<Self>,
        state: Arc<AppState>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            match state.meta.all_sources().await {
                Ok(all) => {
                    let ids: std::collections::HashSet<String> =
                        all.iter().map(|s| s.id.clone()).collect();
                    let gone: Vec<String> = self
                        .running
                        .lock()
                        .expect("lock")
                        .keys()
                        .filter(|id| !ids.contains(*id))
                        .cloned()
                        .collect();
                    for id in gone {
                        self.stop(&id);
                    }
                    for s in all {
                        self.start(state.clone(), s);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot list sources; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(RECONCILE) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        self.stop_all();
    }
}

fn set(status: &Mutex<SourceStatus>, f: impl FnOnce(&mut SourceStatus)) {
    f(&mut status.lock().expect("lock"));
}

/// One source: connect, subscribe, handle messages; on any failure record it and retry.
async fn run(
    state: Arc<AppState>,
    source: SourceRecord,
    status: Arc<Mutex<SourceStatus>>,
    allow_private: bool,
) {
    let mut backoff = BACKOFF.0;
    loop {
        set(&status, |s| s.state = "connecting");
        match subscribe(&state, &source, &status, allow_private).await {
            Ok(()) => {
                // The subscription ended (the connection was closed for good).
                set(&status, |s| {
                    s.state = "error";
                    s.last_error = Some("the NATS connection closed; reconnecting".into());
                });
            }
            Err(e) => {
                tracing::warn!(source = %source.id, team = %source.team_id, error = %e, "source failed; retrying");
                set(&status, |s| {
                    s.state = "error";
                    s.last_error = Some(e);
                });
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

async fn subscribe(
    state: &Arc<AppState>,
    source: &SourceRecord,
    status: &Arc<Mutex<SourceStatus>>,
    allow_private: bool,
) -> Result<(), String> {
    let plugin = state
        .meta
        .get_plugin(&source.team_id, &source.plugin_id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "the source's plugin no longer exists".to_string())?;
    let compiled = crate::api::plugins::load(state, &plugin)
        .await
        .map_err(|e| {
            format!(
                "cannot load plugin {}@{}: {}",
                plugin.name, plugin.version, e.message
            )
        })?;
    let target = resolve(&source.url, allow_private)
        .await
        .map_err(|e| e.to_string())?;
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!("rewind-source-{}", source.id))
        .connection_timeout(CONNECT_TIMEOUT)
        // The server may advertise other cluster members: never follow them (they have not
        // been checked against the address rules).
        .ignore_discovered_servers();
    if let Some((user, pass)) = &target.user {
        opts = opts.user_and_password(user.clone(), pass.clone());
    }
    let client = opts
        .connect(format!("nats://{}", target.addr))
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", display_url(&source.url)))?;
    let mut sub = client
        .queue_subscribe(source.subject.clone(), format!("rewind-{}", source.id))
        .await
        .map_err(|e| format!("cannot subscribe to {}: {e}", source.subject))?;
    // A round trip: the server has the subscription before the source says it is subscribed.
    client
        .flush()
        .await
        .map_err(|e| format!("cannot subscribe to {}: {e}", source.subject))?;
    set(status, |s| {
        s.state = "subscribed";
        s.last_error = None;
    });
    tracing::info!(source = %source.id, team = %source.team_id, subject = %source.subject, "source subscribed");
    let name = format!("{}@{}", plugin.name, plugin.version);
    let limits = PluginKind::Ingress.default_limits();
    while let Some(msg) = sub.next().await {
        set(status, |s| {
            s.messages += 1;
            s.last_message_at = Some(now_micros());
        });
        let headers = msg
            .headers
            .as_ref()
            .map(|h| {
                h.iter()
                    .flat_map(|(k, vs)| {
                        vs.iter()
                            .map(move |v| (k.to_string(), v.as_str().to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let input = Inbound::Message(InboundMessage {
            bus: "nats".into(),
            subject: msg.subject.to_string(),
            headers,
            body: msg.payload.to_vec(),
        });
        let events = match state
            .plugins
            .ingress(&compiled, &name, &source.config, &limits, input)
            .await
        {
            Ok(events) => events,
            Err((code, reason)) => {
                set(status, |s| {
                    if code >= 500 {
                        s.failed += 1;
                    } else {
                        s.rejected += 1;
                    }
                    s.last_error = Some(format!(
                        "{name} refused a message on {}: {reason}",
                        msg.subject
                    ));
                });
                continue;
            }
        };
        let n = events.len() as u64;
        if n == 0 {
            continue;
        }
        let incoming = crate::api::plugins::incoming_from_plugin(events);
        match ingest(state, source, incoming).await {
            Ok(()) => set(status, |s| s.events += n),
            Err(e) => set(status, |s| {
                s.failed += 1;
                s.last_error = Some(format!(
                    "events of a message on {} were not ingested: {e}",
                    msg.subject
                ));
            }),
        }
    }
    Ok(())
}

/// Ingests one message's events, waiting out rate limits and overload a few times.
async fn ingest(
    state: &AppState,
    source: &SourceRecord,
    events: Vec<IncomingEvent>,
) -> Result<(), IngestError> {
    let mut wait = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        let r = state
            .ingest
            .ingest(
                &format!("source:{}", source.id),
                &source.team_id,
                &source.collection_id,
                events.clone(),
                "source",
            )
            .await;
        match r {
            Ok(_) => return Ok(()),
            Err(e) if attempt < INGEST_ATTEMPTS && e.is_temporary() => {
                let pause = match &e {
                    IngestError::RateLimited(d) => *d,
                    _ => wait,
                };
                tokio::time::sleep(pause).await;
                wait *= 2;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects() {
        for ok in [
            "orders",
            "orders.created",
            "orders.*",
            "orders.>",
            ">",
            "a.*.c",
        ] {
            assert!(check_subject(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a..b", ".a", "a.", "a b", "a.>.b", "a*", "a.b>", "a\tb"] {
            assert!(check_subject(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn urls_are_checked_like_destinations() {
        let t = resolve("nats://u%40x:p%3Aw@127.0.0.1:4333", true)
            .await
            .unwrap();
        assert_eq!(t.addr, "127.0.0.1:4333".parse().unwrap());
        assert_eq!(t.user, Some(("u@x".into(), "p:w".into())));
        assert_eq!(
            resolve("nats://10.1.2.3", true).await.unwrap().addr.port(),
            4222
        );
        for (url, want) in [
            ("nats://127.0.0.1:4222", "loopback"),
            ("nats://169.254.169.254", "metadata"),
            ("nats://10.0.0.1", "private"),
            (
                "nats://[::ffff:127.0.0.1]:4222",
                "--allow-private-destinations",
            ),
            ("nats://localhost:4222", "--allow-private-destinations"),
        ] {
            let e = resolve(url, false).await.unwrap_err().to_string();
            assert!(e.contains(want), "{url}: {e}");
        }
        for bad in ["http://example.com", "nats://", "not a url"] {
            assert!(
                matches!(resolve(bad, true).await, Err(SourceUrlError::Invalid(_))),
                "{bad}"
            );
        }
        assert_eq!(
            display_url("nats://user:secret@host:4222"),
            "nats://user:***@host:4222"
        );
    }
}
