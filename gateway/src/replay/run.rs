//! Running one replay on the gateway that holds its lease: wait for a slot in the team's
//! concurrency cap, scan the selection from the checkpoint, pace, transform, deliver with
//! retries, dead-letter what fails, save progress and the checkpoint after every batch, and
//! obey pause / resume / cancel between batches.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::sink::{self, Sink};
use super::{FAILURE_RATIO_MIN_EVENTS, LEASE, Pace, ReplaySpec, Replays, Status, Target};
use crate::api::AppState;
use crate::archive::read::{ArchivedEvent, Scan};
use crate::meta::{ReplayProgress, ReplayRecord};
use crate::plugins::PluginKind;
use crate::plugins::host::PluginEvent;

/// How a run ended, short of failing.
enum End {
    Completed,
    /// Cancelled, or finished elsewhere: nothing to record.
    Gone,
    /// The gateway is stopping: the lease is given up for another to continue.
    Stopping,
    /// Another gateway took the lease.
    LostLease,
}

/// Runs a claimed replay to its end (or until the gateway stops).
pub async fn run(
    state: Arc<AppState>,
    replays: Arc<Replays>,
    rec: ReplayRecord,
    stop: watch::Receiver<bool>,
) {
    let (team, id) = (rec.team_id.clone(), rec.id.clone());
    let mut runner = Runner {
        state: state.clone(),
        replays: replays.clone(),
        progress: ReplayProgress {
            total: rec.total,
            delivered: rec.delivered,
            failed: rec.failed,
            retried: rec.retried,
            checkpoint: rec.checkpoint.clone(),
            rate_milli: 0,
        },
        total: Arc::new(AtomicI64::new(rec.total.unwrap_or(-1))),
        rate_window: VecDeque::new(),
        last_lease: Instant::now(),
        paused_seen: false,
        rec,
        stop,
    };
    match runner.run().await {
        Ok(End::Completed) => {
            let _ = runner.save().await;
            match state
                .meta
                .set_replay_status(&team, &id, &["running"], "completed", None)
                .await
            {
                Ok(true) => {
                    tracing::info!(replay = %id, delivered = runner.progress.delivered, failed = runner.progress.failed, "replay completed")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(replay = %id, error = %e, "cannot record a completed replay; it runs again from its checkpoint")
                }
            }
        }
        Ok(End::Gone) | Ok(End::LostLease) => {}
        Ok(End::Stopping) => {
            let _ = runner.save().await;
            let _ = state.meta.release_replay(&id, &replays.owner).await;
        }
        Err(reason) => {
            let _ = runner.save().await;
            tracing::warn!(replay = %id, %reason, "replay failed");
            if let Err(e) = state
                .meta
                .set_replay_status(
                    &team,
                    &id,
                    &["pending", "running", "paused"],
                    "failed",
                    Some(&reason),
                )
                .await
            {
                tracing::error!(replay = %id, error = %e, "cannot record a failed replay");
            }
        }
    }
}

struct Runner {
    state: Arc<AppState>,
    replays: Arc<Replays>,
    rec: ReplayRecord,
    progress: ReplayProgress,
    /// Events selected, once counted (-1 until then); filled by a counting task.
    total: Arc<AtomicI64>,
    /// (when, delivered + failed) over the last seconds, for the current rate.
    rate_window: VecDeque<(Instant, i64)>,
    last_lease: Instant,
    stop: watch::Receiver<bool>,
    /// The last gate waited while the replay was paused.
    paused_seen: bool,
}

impl Runner {
    fn done(&self) -> i64 {
        self.progress.delivered + self.progress.failed
    }

    /// Records progress and renews the lease; `false` when the lease is lost.
    async fn save(&mut self) -> Result<bool, String> {
        let total = self.total.load(Ordering::Relaxed);
        if total >= 0 {
            self.progress.total = Some(total);
        }
        let now = Instant::now();
        let done = self.done();
        self.rate_window.push_back((now, done));
        while self
            .rate_window
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(5))
        {
            self.rate_window.pop_front();
        }
        self.progress.rate_milli = match (self.rate_window.front(), self.rate_window.back()) {
            (Some((t0, d0)), Some((t1, d1))) if t1 > t0 => {
                ((d1 - d0) as f64 * 1000.0 / t1.duration_since(*t0).as_secs_f64()) as i64
            }
            _ => 0,
        };
        self.last_lease = now;
        self.state
            .meta
            .save_replay_progress(
                &self.rec.id,
                &self.replays.owner,
                &self.progress,
                crate::ids::now_micros() + LEASE.as_micros() as i64,
            )
            .await
            .map_err(|e| format!("cannot save the replay's progress: {e}"))
    }

    async fn status(&self) -> Result<Status, String> {
        let r = self
            .state
            .meta
            .get_replay(&self.rec.team_id, &self.rec.id)
            .await
            .map_err(|e| format!("cannot read the replay's state: {e}"))?
            .ok_or("the replay was deleted")?;
        Status::parse(&r.status).ok_or_else(|| format!("unknown replay state {:?}", r.status))
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Waits until the replay may run: `Ok(None)` to go on, `Ok(Some(end))` to stop.
    async fn gate(&mut self) -> Result<Option<End>, String> {
        loop {
            let mut wait = Duration::from_millis(100);
            if self.stopping() {
                return Ok(Some(End::Stopping));
            }
            match self.status().await? {
                Status::Running => return Ok(None),
                s if s.is_terminal() => return Ok(Some(End::Gone)),
                Status::Paused => self.paused_seen = true,
                Status::Pending => {
                    wait = Duration::from_millis(500);
                    if self
                        .state
                        .meta
                        .start_replay(
                            &self.rec.team_id,
                            &self.rec.id,
                            i64::from(self.replays.options.max_running_per_team),
                        )
                        .await
                        .map_err(|e| e.to_string())?
                    {
                        return Ok(None);
                    }
                }
                _ => {}
            }
            if self.last_lease.elapsed() > Duration::from_secs(1) && !self.save().await? {
                return Ok(Some(End::LostLease));
            }
            tokio::time::sleep(wait).await;
        }
    }

    async fn sink(&self, spec: &ReplaySpec) -> Result<Sink, String> {
        let meta = &self.state.meta;
        let team = &self.rec.team_id;
        match &spec.target {
            Target::Destination { id, name } => {
                let d = meta
                    .get_destination(team, id)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("destination {name:?} was deleted"))?;
                let p = meta
                    .get_plugin(team, &d.plugin_id)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("the plugin of destination {name:?} was deleted"))?;
                let compiled = self
                    .state
                    .pipelines
                    .component(&p)
                    .await
                    .map_err(|e| format!("cannot load destination {name:?}: {e}"))?;
                let config: serde_json::Value = serde_json::from_str(&d.config).unwrap_or_default();
                // The destination's CPU budget is per call; a replay's batches may be far
                // larger than a test delivery, so it grows with the batch (20 µs an event).
                let mut limits = PluginKind::Destination.default_limits();
                limits.cpu = (limits.cpu
                    + Duration::from_micros(20) * spec.effective_batch() as u32)
                    .min(crate::plugins::MAX_CPU);
                Ok(Sink::Plugin {
                    host: self.state.plugins.clone(),
                    compiled,
                    name: format!("{}@{}", p.name, p.version),
                    config: d.config.clone(),
                    limits,
                    caps: Arc::new(crate::api::plugins::caps(&self.state, &config)),
                })
            }
            Target::Collection { id, name } => {
                meta.get_collection(team, id)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("target collection {name:?} was deleted"))?;
                Ok(Sink::Collection {
                    state: self.state.clone(),
                    team_id: team.clone(),
                    collection_id: id.clone(),
                    key: format!("replay:{}", self.rec.id),
                })
            }
        }
    }

    /// Counts the selection in the background (for progress and ETA) when that is cheap
    /// beside the delivery: without a filter (the manifest's row counts), or when the replay
    /// is paced (delivery, not scanning, is the limit). An unpaced filtered replay would scan
    /// the archive twice at once; its total is known when its own scan ends.
    fn count(&self, spec: &ReplaySpec, filter: Option<Arc<crate::query::Expr>>) {
        if self.total.load(Ordering::Relaxed) >= 0
            || (filter.is_some() && spec.pace == Pace::Unpaced)
        {
            return;
        }
        let total = self.total.clone();
        let (store, meta) = (self.state.archive.clone(), self.state.meta.clone());
        let scan = Scan {
            team_id: self.rec.team_id.clone(),
            collection_id: self.rec.collection_id.clone(),
            from: spec.from,
            to: spec.to,
            filter,
            after: None,
        };
        let limit = spec.limit;
        tokio::spawn(async move {
            match crate::archive::read::count(&store, meta.as_ref(), &scan).await {
                Ok(n) => {
                    let n = limit.map_or(n, |l| n.min(l));
                    // The runner may have finished (and set the exact total) first.
                    let _ = total.compare_exchange(-1, n, Ordering::Relaxed, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(error = %e, "cannot count a replay's selection"),
            }
        });
    }

    async fn run(&mut self) -> Result<End, String> {
        let spec: ReplaySpec = serde_json::from_str(&self.rec.spec)
            .map_err(|e| format!("the stored replay is unreadable: {e}"))?;
        if let Some(end) = self.gate().await? {
            return Ok(end);
        }
        let filter = spec.parsed_filter()?.map(Arc::new);
        self.count(&spec, filter.clone());
        let sink = self.sink(&spec).await?;
        let transforms = if spec.transforms.is_empty() {
            None
        } else {
            Some(
                self.state
                    .pipelines
                    .build(&self.rec.team_id, spec.transforms.clone())
                    .await
                    .map_err(|e| format!("the replay's transforms cannot run: {e}"))?,
            )
        };
        let team_quota = self.replays.quotas.of(&self.rec.team_id);
        let batch_size = spec.effective_batch();
        let own_rate = match spec.pace {
            Pace::Rate { per_sec } => Some(super::pace::Limiter::new(per_sec, batch_size as u32)),
            _ => None,
        };
        // Events already taken from the selection (for `limit`): every one of them was
        // delivered or dead-lettered, transforms aside.
        let mut taken = self.done();
        let mut scan = crate::archive::read::spawn_scan(
            self.state.archive.clone(),
            self.state.meta.clone(),
            Scan {
                team_id: self.rec.team_id.clone(),
                collection_id: self.rec.collection_id.clone(),
                from: spec.from,
                to: spec.to,
                filter,
                after: self.progress.checkpoint.clone(),
            },
        );
        let mut buffer: VecDeque<ArchivedEvent> = VecDeque::new();
        let mut scan_done = false;
        // Original pacing: the first event's time and the instant it went.
        let mut origin: Option<(i64, tokio::time::Instant)> = None;
        loop {
            // Wait for at least one event, then take what else is ready up to a batch: a
            // selective scan delivers its first events without waiting for a full batch.
            while !scan_done && buffer.len() < batch_size {
                let next = if buffer.is_empty() {
                    scan.recv().await
                } else {
                    match scan.try_recv() {
                        Ok(chunk) => Some(chunk),
                        Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                        Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => None,
                    }
                };
                match next {
                    Some(Ok(chunk)) => buffer.extend(chunk),
                    Some(Err(e)) => return Err(format!("cannot read the archive: {e}")),
                    None => scan_done = true,
                }
            }
            let room = spec.limit.map_or(i64::MAX, |l| l - taken);
            if buffer.is_empty() || room <= 0 {
                // Everything selected has been taken: that is the total.
                self.total.store(taken, Ordering::Relaxed);
                if let Some(reason) = self.over_threshold(&spec, true) {
                    return Err(reason);
                }
                return Ok(End::Completed);
            }
            let mut n = batch_size.min(buffer.len()).min(room as usize);
            if let Pace::Original { speed } = spec.pace {
                // A batch holds the events due within 20 ms of its first one.
                let first = buffer[0].received_at;
                let (t0, start) = *origin.get_or_insert((first, tokio::time::Instant::now()));
                let due = |t: i64| {
                    start + Duration::from_secs_f64(((t - t0).max(0) as f64 / 1e6) / speed)
                };
                let window = due(first) + Duration::from_millis(20);
                n = buffer
                    .iter()
                    .take(n)
                    .take_while(|e| due(e.received_at) <= window)
                    .count()
                    .max(1);
                self.sleep_until(due(first)).await?;
            }
            // Pause, cancel and stop take effect here, between batches.
            self.paused_seen = false;
            if let Some(end) = self.gate().await? {
                return Ok(end);
            }
            if self.paused_seen {
                // Original pacing starts over from here after a pause.
                origin = None;
            }
            if let Some(l) = &own_rate {
                l.acquire(n as u32).await;
            }
            if let Some(q) = &team_quota {
                q.acquire(n as u32).await;
            }
            let batch: Vec<ArchivedEvent> = buffer.drain(..n).collect();
            let last = batch.last().map(|e| (e.received_at, e.id.clone()));
            if !self
                .deliver(&spec, &sink, transforms.as_ref(), &batch)
                .await?
            {
                continue;
            }
            taken += n as i64;
            self.progress.checkpoint = last;
            if !self.save().await? {
                return Ok(End::LostLease);
            }
            if let Some(reason) = self.over_threshold(&spec, false) {
                return Err(reason);
            }
        }
    }

    /// The failure-ratio check: once [`FAILURE_RATIO_MIN_EVENTS`] events were tried (or the
    /// whole selection, when it is smaller), and at the end.
    fn over_threshold(&self, spec: &ReplaySpec, at_end: bool) -> Option<String> {
        let tried = self.done();
        let total = self.total.load(Ordering::Relaxed);
        let enough = at_end || tried >= FAILURE_RATIO_MIN_EVENTS || (total >= 0 && tried >= total);
        (enough && tried > 0 && self.progress.failed as f64 > spec.max_failure_ratio * tried as f64)
            .then(|| {
                format!(
                    "{} of {} events failed ({:.0}%), more than the replay's max_failure_ratio of {:.0}%; the failures are in collection {}.dead-letter",
                    self.progress.failed,
                    tried,
                    100.0 * self.progress.failed as f64 / tried as f64,
                    100.0 * spec.max_failure_ratio,
                    spec.collection
                )
            })
    }

    /// Sleeps until `at` (original pacing), returning early when the replay is no longer
    /// running or the gateway stops (the gate then decides).
    async fn sleep_until(&mut self, at: tokio::time::Instant) -> Result<(), String> {
        while tokio::time::Instant::now() < at {
            let step = at.min(tokio::time::Instant::now() + Duration::from_millis(200));
            tokio::time::sleep_until(step).await;
            if self.stopping() || self.status().await? != Status::Running {
                return Ok(());
            }
        }
        Ok(())
    }

    async fn deliver(
        &mut self,
        spec: &ReplaySpec,
        sink: &Sink,
        transforms: Option<&crate::plugins::pipeline::Pipeline>,
        batch: &[ArchivedEvent],
    ) -> Result<bool, String> {
        let mut dead: Vec<(crate::bus::Event, String, String, u32)> = Vec::new();
        let mut events: Vec<crate::bus::Event> = batch.iter().map(to_bus_event).collect();
        if let Some(p) = transforms {
            let (kept, failed) = self.state.pipelines.apply(p, events).await;
            events = kept;
            for d in failed {
                dead.push((d.event, d.plugin, d.reason, 1));
            }
        }
        let outgoing: Vec<PluginEvent> = events
            .iter()
            .map(|e| PluginEvent {
                id: e.id.clone(),
                received_at: e.received_at_micros,
                headers: vec![
                    ("content-type".into(), e.content_type.clone()),
                    ("rewind-replay-id".into(), self.rec.id.clone()),
                ],
                payload: e.payload.clone(),
            })
            .collect();
        let (team, id) = (self.rec.team_id.clone(), self.rec.id.clone());
        let meta = self.state.meta.clone();
        // A cancel during a long backoff is noticed by a status read at most every second.
        let cancel_seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let cancel_seen = cancel_seen.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if let Ok(Some(r)) = meta.get_replay(&team, &id).await
                        && r.status == "cancelled"
                    {
                        cancel_seen.store(true, Ordering::Relaxed);
                        return;
                    }
                }
            })
        };
        let outcome = sink::deliver(sink, &outgoing, spec.max_retries, || {
            cancel_seen.load(Ordering::Relaxed) || *self.stop.borrow()
        })
        .await;
        watcher.abort();
        let outcome = match outcome {
            Ok(o) => o,
            Err(partial) => {
                // Cancelled or stopping mid-batch: count what went, leave the checkpoint
                // where it was (the next gate ends the run).
                self.progress.delivered += partial.delivered as i64;
                self.progress.retried += partial.retried as i64;
                return Ok(false);
            }
        };
        let name = sink.name();
        for (i, reason, attempts) in outcome.dead {
            dead.push((events[i].clone(), name.clone(), reason, attempts));
        }
        self.progress.delivered += outcome.delivered as i64;
        self.progress.retried += outcome.retried as i64;
        if !dead.is_empty() {
            self.progress.failed += dead.len() as i64;
            self.dead_letter(spec, &dead).await?;
        }
        Ok(true)
    }

    /// Stores failed events in the source collection's dead-letter collection.
    async fn dead_letter(
        &self,
        spec: &ReplaySpec,
        dead: &[(crate::bus::Event, String, String, u32)],
    ) -> Result<(), String> {
        let source = self
            .state
            .meta
            .get_collection(&self.rec.team_id, &self.rec.collection_id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("collection {} was deleted", spec.collection))?;
        let dlq =
            crate::plugins::pipeline::dead_letter_collection(self.state.meta.as_ref(), &source)
                .await
                .map_err(|e| e.to_string())?;
        let events = dead
            .iter()
            .map(|(event, plugin, reason, attempts)| {
                let mut e = crate::plugins::pipeline::dead_letter_event(
                    &crate::plugins::pipeline::DeadLetter {
                        event: event.clone(),
                        plugin: plugin.clone(),
                        reason: reason.clone(),
                    },
                    &source,
                );
                // Name the replay and the attempts in the stored failure.
                if let Ok(mut body) = serde_json::from_slice::<serde_json::Value>(&e.payload) {
                    body["replay_id"] = serde_json::json!(self.rec.id);
                    body["attempt"] = serde_json::json!(attempts);
                    e.payload = bytes::Bytes::from(body.to_string());
                }
                e
            })
            .collect();
        let batch = crate::bus::BusBatch {
            team_id: self.rec.team_id.clone(),
            collection_id: dlq.id,
            events,
        };
        self.state
            .bus
            .append(&batch, &ulid::Ulid::new().to_string())
            .await
            .map_err(|e| format!("cannot store dead letters: {e}"))?;
        Ok(())
    }
}

fn to_bus_event(e: &ArchivedEvent) -> crate::bus::Event {
    crate::bus::Event {
        id: e.id.clone(),
        received_at_micros: e.received_at,
        headers: Default::default(),
        payload: e.payload.clone(),
        content_type: e.content_type.clone(),
        client_id: String::new(),
    }
}
