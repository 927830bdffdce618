//! The indexer: a bus consumer that feeds the search index in batches and acks the bus only
//! once the index has the events, plus the hot window ([`HotWindows`]): how long each
//! collection's events stay indexed, and the background job that removes older ones.
//!
//! Search never slows ingestion: the indexer reads the bus at its own pace. When the index is
//! down it keeps its current batch, retries with backoff and stops reading (the bus holds the
//! backlog; `/readyz` shows the lag), then catches up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::{IndexDoc, SearchIndex};
use crate::bus::{Bus, Delivery};
use crate::ids::now_micros;
use crate::meta::Metastore;

/// The durable consumer's name. An embedded index is per gateway, so with a shared bus (NATS)
/// each gateway reads every event under its own name (`indexer-<instance>`); Meilisearch is
/// shared, so gateways share one consumer and split the work.
pub const CONSUMER: &str = "indexer";

#[derive(Debug, Clone)]
pub struct IndexerOptions {
    pub consumer: String,
    /// Most events per index write.
    pub batch_events: usize,
    /// Longest an event waits in the indexer before its batch is written.
    pub max_wait: Duration,
}

impl Default for IndexerOptions {
    fn default() -> Self {
        Self {
            consumer: CONSUMER.into(),
            batch_events: 20_000,
            max_wait: Duration::from_millis(500),
        }
    }
}

/// What `/readyz` and `/metrics` show about the indexer.
#[derive(Default)]
pub struct IndexStatus {
    pub last_error: Mutex<Option<String>>,
    pub events_indexed: AtomicU64,
    /// Events older than their collection's window when they reached the indexer.
    pub events_skipped: AtomicU64,
    pub running: AtomicBool,
}

impl IndexStatus {
    fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().expect("lock") = e;
    }
}

/// Each collection's search window, refreshed from the metastore (every gateway sees another's
/// change within [`HotWindows::REFRESH`]; its own at once).
pub struct HotWindows {
    default: Duration,
    overrides: RwLock<HashMap<String, Duration>>,
}

impl HotWindows {
    pub const REFRESH: Duration = Duration::from_secs(30);

    pub fn new(default: Duration) -> Self {
        Self {
            default,
            overrides: RwLock::default(),
        }
    }

    pub fn default_window(&self) -> Duration {
        self.default
    }

    pub fn window(&self, collection_id: &str) -> Duration {
        self.overrides
            .read()
            .expect("lock")
            .get(collection_id)
            .copied()
            .unwrap_or(self.default)
    }

    /// The oldest `received_at` (µs) still kept in the index for a collection.
    pub fn cutoff(&self, collection_id: &str) -> i64 {
        now_micros().saturating_sub(self.window(collection_id).as_micros() as i64)
    }

    pub fn set(&self, collection_id: &str, secs: Option<i64>) {
        let mut map = self.overrides.write().expect("lock");
        match secs {
            Some(s) => map.insert(collection_id.into(), Duration::from_secs(s.max(0) as u64)),
            None => map.remove(collection_id),
        };
    }

    /// Reloads every override from the metastore.
    pub async fn refresh(
        &self,
        meta: &dyn Metastore,
    ) -> Result<Vec<crate::meta::Collection>, String> {
        let all = meta.all_collections().await.map_err(|e| e.to_string())?;
        let map = all
            .iter()
            .filter_map(|c| {
                c.search_window_secs
                    .map(|s| (c.id.clone(), Duration::from_secs(s.max(0) as u64)))
            })
            .collect();
        *self.overrides.write().expect("lock") = map;
        Ok(all)
    }
}

/// Removes, for every collection, the indexed events older than its window; once a minute.
pub async fn run_window_job(
    index: Arc<dyn SearchIndex>,
    meta: Arc<dyn Metastore>,
    windows: Arc<HotWindows>,
    every: Duration,
) {
    let mut last_delete = Instant::now() - every;
    loop {
        match windows.refresh(meta.as_ref()).await {
            Ok(collections) if last_delete.elapsed() >= every => {
                last_delete = Instant::now();
                for c in collections {
                    let cutoff = windows.cutoff(&c.id);
                    if let Err(e) = index.delete_before(&c.team_id, &c.id, cutoff).await {
                        tracing::warn!(collection = %c.id, error = %e, "removing events past the search window failed; will retry");
                    }
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read search windows; will retry"),
        }
        tokio::time::sleep(HotWindows::REFRESH.min(every)).await;
    }
}

pub struct Indexer {
    bus: Arc<dyn Bus>,
    index: Arc<dyn SearchIndex>,
    windows: Arc<HotWindows>,
    options: IndexerOptions,
    pub status: Arc<IndexStatus>,
}

async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

impl Indexer {
    pub fn new(
        bus: Arc<dyn Bus>,
        index: Arc<dyn SearchIndex>,
        windows: Arc<HotWindows>,
        options: IndexerOptions,
    ) -> Self {
        Self {
            bus,
            index,
            windows,
            options,
            status: Arc::new(IndexStatus::default()),
        }
    }

    /// Runs until `shutdown` fires; what is not yet indexed is redelivered after a restart.
    pub async fn run(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        self.status.running.store(true, Ordering::Relaxed);
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.run_once(&mut shutdown).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::error!(error = %e, "indexer stopped; restarting it");
                    self.status.set_error(Some(e));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stopped(&mut shutdown) => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        self.status.running.store(false, Ordering::Relaxed);
    }

    async fn run_once(
        &self,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), String> {
        let mut consumer = self
            .bus
            .consumer(&self.options.consumer)
            .await
            .map_err(|e| e.to_string())?;
        // One batch is written while the next one collects: an event that arrives during a
        // write waits for that write or its own batch's wait, whichever is longer, not both.
        let mut writing: Option<Writing> = None;
        let result = self.pump(consumer.as_mut(), &mut writing, shutdown).await;
        if let Some(w) = writing {
            // Stopped by an error: let the write end before a new consumer redelivers its
            // events, so two writes of the same events never overlap (not acked: redelivered).
            let _ = w.task.await;
        }
        result
    }

    async fn pump(
        &self,
        consumer: &mut dyn crate::bus::Consumer,
        writing: &mut Option<Writing>,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), String> {
        let mut pending: Vec<Delivery> = Vec::new();
        let mut docs: Vec<IndexDoc> = Vec::new();
        let mut oldest = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let full = docs.len() >= self.options.batch_events;
            let due = !pending.is_empty() && (full || oldest.elapsed() >= self.options.max_wait);
            if due && writing.is_none() {
                *writing = Some(Writing {
                    task: tokio::spawn(write_until_done(
                        self.index.clone(),
                        std::mem::take(&mut docs),
                        self.status.clone(),
                        shutdown.clone(),
                    )),
                    deliveries: std::mem::take(&mut pending),
                });
                continue;
            }
            tokio::select! {
                _ = stopped(shutdown) => {
                    // A write under way finishes (or gives up at once if it was retrying);
                    // what it wrote is acked, the rest is redelivered after a restart.
                    if let Some(w) = writing.take() {
                        w.finish(consumer).await?;
                    }
                    let _ = consumer.commit().await;
                    return Ok(());
                }
                done = async { (&mut writing.as_mut().expect("guarded").task).await }, if writing.is_some() => {
                    let w = writing.take().expect("guarded");
                    let written = done.map_err(|e| format!("the index writer task failed: {e}"))?;
                    if !written {
                        return Ok(());
                    }
                    w.ack(consumer).await?;
                }
                delivery = consumer.next(), if !full => {
                    let delivery = delivery.map_err(|e| e.to_string())?;
                    if pending.is_empty() {
                        oldest = Instant::now();
                    }
                    let batch = &delivery.batch;
                    let cutoff = self.windows.cutoff(&batch.collection_id);
                    for e in &batch.events {
                        if e.received_at_micros < cutoff {
                            self.status.events_skipped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        docs.push(IndexDoc {
                            team_id: batch.team_id.clone(),
                            collection_id: batch.collection_id.clone(),
                            id: e.id.clone(),
                            received_at: e.received_at_micros,
                            content_type: e.content_type.clone(),
                            payload: e.payload.clone(),
                            position: delivery.position,
                        });
                    }
                    pending.push(delivery);
                }
                _ = tick.tick() => {}
            }
        }
    }
}

/// A batch being written to the index and the bus messages it came from.
struct Writing {
    task: tokio::task::JoinHandle<bool>,
    deliveries: Vec<Delivery>,
}

impl Writing {
    /// Acks the batch's bus messages (once the index has its events).
    async fn ack(self, consumer: &mut dyn crate::bus::Consumer) -> Result<(), String> {
        for d in self.deliveries {
            consumer.ack(d).await.map_err(|e| e.to_string())?;
        }
        consumer.commit().await.map_err(|e| e.to_string())
    }

    /// Waits for the write and acks it if it went through.
    async fn finish(mut self, consumer: &mut dyn crate::bus::Consumer) -> Result<(), String> {
        if (&mut self.task).await.unwrap_or(false) {
            self.ack(consumer).await?;
        }
        Ok(())
    }
}

/// Writes a batch to the index, retrying with backoff until it succeeds (true) or the gateway
/// stops first (false: nothing of it is acked, the bus redelivers it after a restart).
async fn write_until_done(
    index: Arc<dyn SearchIndex>,
    docs: Vec<IndexDoc>,
    status: Arc<IndexStatus>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> bool {
    let mut backoff = Duration::from_millis(200);
    loop {
        match index.index(docs.clone()).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, events = docs.len(), "indexing failed; keeping the batch and retrying");
                status.set_error(Some(e.to_string()));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopped(&mut shutdown) => return false,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    status.set_error(None);
    status
        .events_indexed
        .fetch_add(docs.len() as u64, Ordering::Relaxed);
    true
}
