//! Replays (docs/replays.md): a slice of a collection's archive — `[from, to)` on
//! `received_at`, an optional filter and limit — delivered in `received_at` order (ties by
//! id) through a destination plugin or into another collection, paced, with retries,
//! dead letters and a failure threshold.
//!
//! This module owns what a replay *is* ([`ReplaySpec`], its states, its JSON view) and the
//! scheduler ([`Replays`]) that leases unfinished replays from the metastore and runs each on
//! one gateway ([`run`]); [`sink`] delivers batches with retries; [`pace`] holds the rate
//! limiters (per replay and the team's quota). Progress and a checkpoint are saved after
//! every batch, so a replay resumes where it stopped after a crash: delivery is
//! at-least-once, with at most the batch in flight delivered twice.

pub mod pace;
pub mod run;
pub mod sink;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::ids::micros_to_rfc3339;
use crate::meta::ReplayRecord;
use crate::plugins::pipeline::StepSpec;

/// How long a gateway's lease on a replay lasts without being renewed (renewed every batch
/// and every second while waiting).
pub const LEASE: Duration = Duration::from_secs(15);
/// Most events in one delivery batch.
pub const MAX_BATCH: usize = 5_000;
/// Default events per batch: a destination call must finish within its wall-clock limit
/// (10 s), and a webhook in `event` mode makes one request per event.
pub const DEFAULT_BATCH: usize = 100;
pub const DEFAULT_MAX_RETRIES: u32 = 10;
pub const DEFAULT_MAX_FAILURE_RATIO: f64 = 0.1;
/// The failure ratio is judged once this many events were tried (or at the end).
pub const FAILURE_RATIO_MIN_EVENTS: i64 = 20;

/// Operator settings (`rewind serve --replay-*`).
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayOptions {
    pub max_running_per_team: u32,
    /// Events per second across a team's replays; `None`: no cap.
    pub team_rate: Option<u32>,
    /// Replay API requests per second per team.
    pub api_rate: u32,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self {
            max_running_per_team: 4,
            team_rate: Some(100_000),
            api_rate: 20,
        }
    }
}

/// Where a replay delivers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// A destination (a destination plugin with its config).
    Destination { id: String, name: String },
    /// Another collection of the team (a backfill): events are ingested there.
    Collection { id: String, name: String },
}

/// How fast a replay goes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Pace {
    /// As fast as the destination takes it (within the team's quota).
    Unpaced,
    /// At most this many events per second.
    Rate { per_sec: f64 },
    /// With the gaps the events originally had between them, `speed` times faster.
    Original { speed: f64 },
}

/// What to replay, as stored with the replay.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReplaySpec {
    /// The source collection's name, for people.
    pub collection: String,
    /// `[from, to)` on received_at, µs.
    pub from: i64,
    pub to: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
    pub target: Target,
    pub pace: Pace,
    #[serde(default)]
    pub transforms: Vec<StepSpec>,
    pub batch_size: usize,
    pub max_retries: u32,
    pub max_failure_ratio: f64,
}

impl ReplaySpec {
    /// The batch size actually used: paced replays send about ten batches a second so the
    /// pace is smooth.
    pub fn effective_batch(&self) -> usize {
        match self.pace {
            Pace::Rate { per_sec } => ((per_sec / 10.0).floor() as usize).clamp(1, self.batch_size),
            _ => self.batch_size,
        }
    }

    pub fn parsed_filter(&self) -> Result<Option<crate::query::Expr>, String> {
        match &self.filter {
            None => Ok(None),
            Some(f) => crate::query::parse(f).map_err(|e| e.to_string()),
        }
    }
}

/// A replay's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pending,
    Running,
    Paused,
    Completed,
    Failed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        [
            Status::Pending,
            Status::Running,
            Status::Paused,
            Status::Completed,
            Status::Failed,
            Status::Cancelled,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }
}

/// A control request on a replay, and the states it applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Pause,
    Resume,
    Cancel,
}

impl Control {
    pub fn transition(self) -> (&'static [&'static str], Status) {
        match self {
            Control::Pause => (&["pending", "running"], Status::Paused),
            Control::Resume => (&["paused"], Status::Running),
            Control::Cancel => (&["pending", "running", "paused"], Status::Cancelled),
        }
    }

    pub fn verb(self) -> &'static str {
        match self {
            Control::Pause => "pause",
            Control::Resume => "resume",
            Control::Cancel => "cancel",
        }
    }
}

/// The JSON of a replay in the API (`GET /v1/replays/{id}`).
pub fn replay_json(r: &ReplayRecord) -> Value {
    let spec: Option<ReplaySpec> = serde_json::from_str(&r.spec).ok();
    let rate = r.rate_milli as f64 / 1000.0;
    let done = r.delivered + r.failed;
    let mut v = json!({
        "id": r.id,
        "status": r.status,
        "collection_id": r.collection_id,
        "total": r.total,
        "delivered": r.delivered,
        "failed": r.failed,
        "retried": r.retried,
        "current_rate": (rate * 10.0).round() / 10.0,
        "error": r.error,
        "created_at": micros_to_rfc3339(r.created_at),
        "started_at": r.started_at.map(micros_to_rfc3339),
        "finished_at": r.finished_at.map(micros_to_rfc3339),
        "checkpoint": r.checkpoint.as_ref().map(|(t, id)| json!({"received_at": micros_to_rfc3339(*t), "id": id})),
        // The gateway (instance id) holding the replay's lease, while it is unfinished.
        "gateway": r.owner,
    });
    if let Some(total) = r.total {
        v["progress"] = json!(if total == 0 {
            1.0
        } else {
            ((done as f64 / total as f64).min(1.0) * 1000.0).round() / 1000.0
        });
        if r.status == "running" && rate > 0.0 {
            v["eta_secs"] = json!((((total - done).max(0) as f64 / rate) * 10.0).round() / 10.0);
        }
    }
    if let Some(s) = spec {
        v["collection"] = json!(s.collection);
        v["from"] = json!(micros_to_rfc3339(s.from));
        v["to"] = json!(micros_to_rfc3339(s.to));
        v["filter"] = json!(s.filter);
        v["limit"] = json!(s.limit);
        v["destination"] = match &s.target {
            Target::Destination { id, name } => {
                json!({"kind": "destination", "id": id, "name": name})
            }
            Target::Collection { id, name } => {
                json!({"kind": "collection", "id": id, "name": name})
            }
        };
        match s.pace {
            Pace::Unpaced => v["pace"] = json!("unpaced"),
            Pace::Rate { per_sec } => {
                v["pace"] = json!("rate");
                v["rate_per_sec"] = json!(per_sec);
            }
            Pace::Original { speed } => {
                v["pace"] = json!("original");
                v["speed"] = json!(speed);
            }
        }
        v["transforms"] = json!(
            s.transforms
                .iter()
                .map(|t| json!({"plugin": t.plugin, "config": t.config}))
                .collect::<Vec<_>>()
        );
        v["batch_size"] = json!(s.effective_batch());
        v["max_retries"] = json!(s.max_retries);
        v["max_failure_ratio"] = json!(s.max_failure_ratio);
        v["dead_letter_collection"] = json!(format!("{}.dead-letter", s.collection));
    }
    v
}

/// The replay scheduler of one gateway: leases unfinished replays and runs them.
pub struct Replays {
    pub owner: String,
    pub options: ReplayOptions,
    pub quotas: pace::TeamQuotas,
    /// Replays with a runner in this process.
    running: Mutex<HashSet<String>>,
    /// Wakes the scheduler (a replay was created or resumed).
    pub wake: tokio::sync::Notify,
    /// The replay API's per-team request limiter.
    pub api_limiter: pace::ApiLimiter,
}

impl Replays {
    pub fn new(owner: String, options: ReplayOptions) -> Arc<Self> {
        Arc::new(Self {
            owner,
            quotas: pace::TeamQuotas::new(options.team_rate),
            api_limiter: pace::ApiLimiter::new(options.api_rate),
            options,
            running: Mutex::default(),
            wake: tokio::sync::Notify::new(),
        })
    }

    /// Runs the scheduler until `stop`: claims replays (its own after a restart, those
    /// without an owner, and those whose owner's lease ran out) and starts a runner for each.
    /// On stop, runners finish their batch, save their checkpoint and give their lease up.
    pub async fn run(
        self: Arc<Self>,
        state: Arc<crate::api::AppState>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            let now = crate::ids::now_micros();
            match state
                .meta
                .claim_replays(&self.owner, now, now + LEASE.as_micros() as i64)
                .await
            {
                Ok(claimed) => {
                    for rec in claimed {
                        if !self.running.lock().expect("lock").insert(rec.id.clone()) {
                            continue;
                        }
                        tracing::info!(replay = %rec.id, status = %rec.status, "running replay");
                        let (me, state, stop) = (self.clone(), state.clone(), stop.clone());
                        tasks.spawn(async move {
                            // Forgets the runner even if it panicked, so the replay is
                            // picked up again.
                            let _running = Running(me.clone(), rec.id.clone());
                            run::run(state, me, rec, stop).await;
                        });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot claim replays; retrying"),
            }
            while tasks.try_join_next().is_some() {}
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// A replay with a runner in this process, until dropped.
struct Running(Arc<Replays>, String);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.lock().expect("lock").remove(&self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paced_replays_send_small_batches() {
        let mut s = ReplaySpec {
            collection: "c".into(),
            from: 0,
            to: 1,
            filter: None,
            limit: None,
            target: Target::Collection {
                id: "x".into(),
                name: "x".into(),
            },
            pace: Pace::Rate { per_sec: 500.0 },
            transforms: vec![],
            batch_size: 500,
            max_retries: 3,
            max_failure_ratio: 0.1,
        };
        assert_eq!(s.effective_batch(), 50);
        s.pace = Pace::Rate { per_sec: 2.0 };
        assert_eq!(s.effective_batch(), 1);
        s.pace = Pace::Unpaced;
        assert_eq!(s.effective_batch(), 500);
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<ReplaySpec>(&text).unwrap(), s);
    }

    #[test]
    fn controls_move_between_the_documented_states() {
        assert_eq!(Control::Pause.transition().1, Status::Paused);
        assert!(Control::Resume.transition().0.contains(&"paused"));
        assert!(!Control::Cancel.transition().0.contains(&"completed"));
        assert!(Status::parse("cancelled").unwrap().is_terminal());
        assert!(!Status::Paused.is_terminal());
    }
}
