//! The indexer: a bus consumer that feeds the search index in batches and acks the bus only
//! once the index has the events, plus the hot window ([`HotWindows`]): how long each
//! collection's events stay indexed, and the background job that removes older ones.
//!
//! Search never slows ingestion: the indexer reads the bus at its own pace. When the index is
//! down it hands its batch back to the bus, waits (backing off) and reads it again (the bus
//! holds the backlog; `/readyz` shows the lag), then catches up.
//!
//! A batch's documents are handed to the index, not copied: their payloads point into the bus
//! records, and the index drops them as soon as it has built its own documents, so a record is
//! freed while the index is still committing rather than when the batch is acked. What the
//! indexer keeps of a delivery until its ack is only what the ack needs.

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
    /// Longest an event waits in the indexer before its batch is written (while the indexer
    /// keeps up with the bus; see [`BEHIND`]).
    pub max_wait: Duration,
}

/// While a batch is being written, the next one collects at most this fraction of
/// `batch_events`; it reads the rest once the write is done. Two full batches in memory at
/// once (one being written, one collected) were the largest item of the gateway's heap while
/// it worked off a backlog; reading the rest after the write costs the catch-up a few percent.
const COLLECT_WHILE_WRITING: usize = 4;

/// A batch whose oldest event is older than this is behind the bus (a backlog): it is written
/// when it is full or when the bus has nothing more to give for [`IDLE`], not after `max_wait`,
/// so that a backlog is indexed in whole batches (fewer, larger commits and segments) even
/// though each batch collected during a write has waited longer than `max_wait`.
const BEHIND: Duration = Duration::from_secs(5);
const IDLE: Duration = Duration::from_millis(50);

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
    /// Events read from the bus and held for the next index write.
    pub events_collected: AtomicU64,
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
        const FIRST_BACKOFF: Duration = Duration::from_millis(500);
        let mut backoff = FIRST_BACKOFF;
        loop {
            let indexed = self.status.events_indexed.load(Ordering::Relaxed);
            match self.run_once(&mut shutdown).await {
                Ok(()) => break,
                Err(e) => {
                    if self.status.events_indexed.load(Ordering::Relaxed) > indexed {
                        // It made progress since the last failure: not the same outage.
                        backoff = FIRST_BACKOFF;
                    }
                    tracing::error!(error = %e, retry_in = ?backoff, "indexer stopped; restarting it");
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
        // `received_at` of the batch's oldest event, and when the bus last gave (or could
        // have given) the indexer something.
        let mut oldest_received = i64::MAX;
        let mut last_delivery = Instant::now();
        // When the last write ended (a batch cannot be written before that).
        let mut free_since = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let batch_events = self.options.batch_events.max(1);
        loop {
            let full = docs.len() >= batch_events;
            let cap = if writing.is_some() {
                batch_events.div_ceil(COLLECT_WHILE_WRITING)
            } else {
                batch_events
            };
            let reading = docs.len() < cap;
            let waited = oldest.elapsed();
            let behind = now_micros().saturating_sub(oldest_received) > BEHIND.as_micros() as i64;
            // However busy the bus, a batch starts at most ten times `max_wait` after the
            // previous write is done.
            let due = !pending.is_empty()
                && (full
                    || (waited >= self.options.max_wait
                        && (!behind
                            || last_delivery.elapsed() >= IDLE
                            || free_since.elapsed() >= self.options.max_wait * 10)));
            if due && writing.is_none() {
                oldest_received = i64::MAX;
                self.status.events_collected.store(0, Ordering::Relaxed);
                *writing = Some(Writing {
                    task: tokio::spawn(write_batch(
                        self.index.clone(),
                        std::mem::take(&mut docs),
                        self.status.clone(),
                    )),
                    deliveries: std::mem::take(&mut pending),
                });
                continue;
            }
            tokio::select! {
                _ = stopped(shutdown) => {
                    // A write under way finishes; what it wrote is acked, the rest is
                    // redelivered after a restart.
                    if let Some(w) = writing.take() {
                        w.finish(consumer).await?;
                    }
                    let _ = consumer.commit().await;
                    return Ok(());
                }
                done = async { (&mut writing.as_mut().expect("guarded").task).await }, if writing.is_some() => {
                    let w = writing.take().expect("guarded");
                    let written = done.map_err(|e| format!("the index writer task failed: {e}"))?;
                    if let Err(e) = written {
                        // Its documents are gone: hand its messages (and the next batch's)
                        // back to the bus, to be read again once the consumer is reopened.
                        for d in w.deliveries.into_iter().chain(pending) {
                            if let Err(e) = consumer.release(d).await {
                                tracing::debug!(error = %e, "cannot hand a message back; it is redelivered after its ack wait");
                            }
                        }
                        return Err(e);
                    }
                    w.ack(consumer).await?;
                    // Reading was held back during the write: give the bus a moment to show
                    // whether more is waiting before a partial batch counts as the last one.
                    last_delivery = Instant::now();
                    free_since = Instant::now();
                }
                delivery = consumer.next(), if reading => {
                    let mut delivery = delivery.map_err(|e| e.to_string())?;
                    last_delivery = Instant::now();
                    if pending.is_empty() {
                        oldest = Instant::now();
                    }
                    // The documents take the events; the delivery keeps its ack handle.
                    let batch = std::mem::take(&mut delivery.batch);
                    let cutoff = self.windows.cutoff(&batch.collection_id);
                    for e in batch.events {
                        if e.received_at_micros < cutoff {
                            self.status.events_skipped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        oldest_received = oldest_received.min(e.received_at_micros);
                        docs.push(IndexDoc {
                            team_id: batch.team_id.clone(),
                            collection_id: batch.collection_id.clone(),
                            id: e.id,
                            received_at: e.received_at_micros,
                            content_type: e.content_type,
                            payload: e.payload,
                            position: delivery.position,
                        });
                    }
                    pending.push(delivery);
                    self.status.events_collected.store(docs.len() as u64, Ordering::Relaxed);
                }
                _ = tick.tick() => {}
            }
        }
    }
}

/// A batch being written to the index and the bus messages it came from.
struct Writing {
    task: tokio::task::JoinHandle<Result<(), String>>,
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
        if matches!((&mut self.task).await, Ok(Ok(()))) {
            self.ack(consumer).await?;
        }
        Ok(())
    }
}

/// Writes a batch to the index. The index owns the documents from here on (it frees them as
/// soon as it has built its own), so a failed write cannot be retried from them: the caller
/// reads the batch again from the bus.
async fn write_batch(
    index: Arc<dyn SearchIndex>,
    docs: Vec<IndexDoc>,
    status: Arc<IndexStatus>,
) -> Result<(), String> {
    let events = docs.len();
    match index.index(docs).await {
        Ok(()) => {
            status.set_error(None);
            status
                .events_indexed
                .fetch_add(events as u64, Ordering::Relaxed);
            Ok(())
        }
        Err(e) => {
            let e =
                format!("indexing {events} events failed: {e}; they are read again from the bus");
            status.set_error(Some(e.clone()));
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::local::{LocalBus, LocalBusOptions};
    use crate::bus::test_batch as batch;
    use crate::search::{SearchError, SearchHealth, SearchPage, SearchRequest};
    use async_trait::async_trait;

    /// An index for these tests: it refuses its first `failures` writes, then records each
    /// write's size and ids; with a `gate`, each write waits until the test lets it through.
    #[derive(Default)]
    struct TestIndex {
        failures: Mutex<usize>,
        gate: Option<tokio::sync::Semaphore>,
        ids: Mutex<Vec<String>>,
        sizes: Mutex<Vec<usize>>,
    }

    #[async_trait]
    impl SearchIndex for TestIndex {
        fn kind(&self) -> &'static str {
            "test"
        }
        async fn index(&self, docs: Vec<IndexDoc>) -> Result<(), SearchError> {
            {
                let mut failures = self.failures.lock().unwrap();
                if *failures > 0 {
                    *failures -= 1;
                    return Err(SearchError::Unavailable("down for the test".into()));
                }
            }
            self.sizes.lock().unwrap().push(docs.len());
            if let Some(gate) = &self.gate {
                gate.acquire().await.unwrap().forget();
            }
            let mut ids = self.ids.lock().unwrap();
            ids.extend(docs.into_iter().map(|d| d.id));
            Ok(())
        }
        async fn search(&self, _: &SearchRequest) -> Result<SearchPage, SearchError> {
            Err(SearchError::Unavailable("not searched in this test".into()))
        }
        async fn delete_before(&self, _: &str, _: &str, _: i64) -> Result<(), SearchError> {
            Ok(())
        }
        async fn health(&self) -> SearchHealth {
            SearchHealth {
                kind: "test",
                ready: true,
                detail: String::new(),
            }
        }
    }

    /// Runs an indexer of `bus` into `index` (batches of `batch_events`, `max_wait` 20 ms):
    /// its status, the sender that stops it, and its task.
    fn start(
        bus: &Arc<dyn Bus>,
        index: &Arc<TestIndex>,
        batch_events: usize,
    ) -> (
        Arc<IndexStatus>,
        tokio::sync::watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ) {
        let options = IndexerOptions {
            batch_events,
            max_wait: Duration::from_millis(20),
            ..Default::default()
        };
        let indexer = Indexer::new(
            bus.clone(),
            index.clone(),
            Arc::new(HotWindows::new(Duration::from_secs(3600))),
            options,
        );
        let status = indexer.status.clone();
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        (status, stop, tokio::spawn(indexer.run(shutdown)))
    }

    /// Writes that fail hand their batch back to the bus: once the index takes writes again,
    /// every event is indexed exactly once, the error shown meanwhile is cleared, and the bus
    /// has nothing left for the indexer.
    #[tokio::test]
    async fn a_failed_write_is_read_again_from_the_bus_and_indexed_once() {
        let dir = tempfile::tempdir().unwrap();
        let bus: Arc<dyn Bus> =
            Arc::new(LocalBus::open(dir.path(), LocalBusOptions::default()).unwrap());
        for b in 0..5 {
            bus.append(&batch(100, &format!("b{b}")), &format!("m{b}"))
                .await
                .unwrap();
        }
        let index = Arc::new(TestIndex {
            failures: Mutex::new(2),
            ..Default::default()
        });
        let (status, stop, task) = start(&bus, &index, 150);

        let deadline = Instant::now() + Duration::from_secs(20);
        let mut saw_error = false;
        while index.ids.lock().unwrap().len() < 500 {
            saw_error |= status
                .last_error
                .lock()
                .unwrap()
                .as_deref()
                .is_some_and(|e| e.contains("read again from the bus"));
            assert!(Instant::now() < deadline, "the indexer did not catch up");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.send(true).unwrap();
        task.await.unwrap();

        assert!(saw_error, "the failed writes were not shown in the status");
        assert_eq!(*index.failures.lock().unwrap(), 0);
        let mut ids = index.ids.lock().unwrap().clone();
        ids.sort();
        let before = ids.len();
        ids.dedup();
        assert_eq!((before, ids.len()), (500, 500), "indexed twice or lost");
        assert_eq!(status.events_indexed.load(Ordering::Relaxed), 500);
        assert!(status.last_error.lock().unwrap().is_none());
        // Everything was acked: a reopened consumer has nothing to deliver.
        let mut consumer = bus.consumer(CONSUMER).await.unwrap();
        let next = tokio::time::timeout(Duration::from_millis(300), consumer.next()).await;
        assert!(next.is_err(), "a message was left unacked");
    }

    /// A backlog (events older than [`BEHIND`]) is indexed in whole batches although every
    /// batch after the first has waited longer than `max_wait`, and while a batch is being
    /// written the indexer holds at most a quarter of the next one.
    #[tokio::test]
    async fn a_backlog_is_indexed_in_whole_batches_holding_little_during_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let bus: Arc<dyn Bus> =
            Arc::new(LocalBus::open(dir.path(), LocalBusOptions::default()).unwrap());
        let old = now_micros() - 60_000_000;
        for b in 0..10 {
            let mut batch = batch(100, &format!("b{b}"));
            for e in &mut batch.events {
                e.received_at_micros = old;
            }
            bus.append(&batch, &format!("m{b}")).await.unwrap();
        }
        let index = Arc::new(TestIndex {
            gate: Some(tokio::sync::Semaphore::new(0)),
            ..Default::default()
        });
        let (status, stop, task) = start(&bus, &index, 400);

        let deadline = Instant::now() + Duration::from_secs(20);
        for write in 1..=3 {
            while index.sizes.lock().unwrap().len() < write {
                assert!(Instant::now() < deadline, "write {write} never started");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // The write is held; the indexer reads on, but only up to a quarter of a batch
            // (one 100-event message here).
            tokio::time::sleep(Duration::from_millis(200)).await;
            let collected = status.events_collected.load(Ordering::Relaxed);
            let expected = if write < 3 { 100 } else { 0 };
            assert_eq!(
                collected,
                expected,
                "held during write {write}; sizes {:?}",
                index.sizes.lock().unwrap()
            );
            index.gate.as_ref().unwrap().add_permits(1);
        }
        while status.events_indexed.load(Ordering::Relaxed) < 1000 {
            assert!(Instant::now() < deadline, "the indexer did not finish");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.send(true).unwrap();
        task.await.unwrap();
        assert_eq!(*index.sizes.lock().unwrap(), vec![400, 400, 200]);
    }
}
