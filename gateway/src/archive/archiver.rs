//! The archiver: a bus consumer that batches events per collection, writes them to Parquet in
//! the object store, registers the files in the metastore manifest, and only then acks the bus
//! messages.
//!
//! Exactly-once into the manifest, the way Quickwit publishes splits: a collection's files and
//! its checkpoint (the highest bus position archived) are registered in one metastore
//! transaction. After a crash the bus redelivers what was not acked; messages at or below the
//! collection's checkpoint are skipped, the rest are archived again. Objects are named after the
//! bus position range they hold and written create-only, so a retried upload cannot make a
//! second copy; an object written but never registered is invisible to readers (they go through
//! the manifest) and is removed by [`super::cleanup_orphans`].
//!
//! Flush policy: a collection's buffer is written when it holds `target_bytes` of payload or
//! when its oldest event has waited `flush_after`. Memory is bounded by `max_buffered_bytes`:
//! above it the archiver stops reading the bus until a flush succeeds (the bus holds the
//! backlog), so an object store outage costs disk on the bus, not memory.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};

use super::parquet::{CHUNK_ROWS, FileWriter, Row, file_schema, high_cardinality};
use super::schema::{CollectionSchema, Column, ColumnType, FieldBuffer, Scalar};
use crate::bus::{Bus, Consumer, Delivery};
use crate::ids::{new_id, now_micros};
use crate::meta::{ArchiveFile, Metastore, StoredColumn};

pub const CONSUMER: &str = "archiver";

#[derive(Debug, Clone)]
pub struct ArchiverOptions {
    pub flush_after: Duration,
    pub target_bytes: usize,
    pub max_buffered_bytes: usize,
    /// This gateway instance, as the owner of the objects it is about to write.
    pub owner: String,
}

impl Default for ArchiverOptions {
    fn default() -> Self {
        Self {
            flush_after: Duration::from_secs(60),
            target_bytes: 16 << 20,
            max_buffered_bytes: 64 << 20,
            owner: "default".into(),
        }
    }
}

/// What `/readyz` and `/metrics` show about the archiver.
#[derive(Default)]
pub struct ArchiveStatus {
    pub last_error: Mutex<Option<String>>,
    pub files_written: AtomicU64,
    pub events_archived: AtomicU64,
    pub buffered_events: AtomicU64,
    pub buffered_bytes: AtomicU64,
    pub running: AtomicBool,
}

struct Buffer {
    team_id: String,
    deliveries: Vec<Delivery>,
    positions: HashSet<u64>,
    bytes: usize,
    events: usize,
    oldest: Instant,
}

pub struct Archiver {
    bus: Arc<dyn Bus>,
    meta: Arc<dyn Metastore>,
    store: Arc<dyn ObjectStore>,
    options: ArchiverOptions,
    pub status: Arc<ArchiveStatus>,
    /// The field buffer every flush reads its events into, kept from one flush to the next.
    fields: Mutex<FieldBuffer>,
}

/// `team=T/collection=C/date=YYYY-MM-DD/hour=HH/<first>-<last>.parquet`
pub fn object_path(
    team: &str,
    collection: &str,
    received_at_micros: i64,
    first: u64,
    last: u64,
) -> String {
    let t = chrono::DateTime::from_timestamp_micros(received_at_micros).unwrap_or_default();
    format!(
        "team={team}/collection={collection}/date={}/hour={}/{first:020}-{last:020}.parquet",
        t.format("%Y-%m-%d"),
        t.format("%H")
    )
}

/// Resolves once shutdown is signalled (the watch guard never outlives this future).
async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// One encoded Parquet file of a flush, before upload.
struct EncodedFile {
    bytes: bytes::Bytes,
    rows: usize,
    min_t: i64,
    max_t: i64,
    /// Bus positions of the first and last message it holds events of.
    first: u64,
    last: u64,
}

/// Reads a buffer's JSON, extends the collection's schema (new and widened columns go to
/// `changed`) and encodes one Parquet file per hour partition, rows in bus order.
fn encode_groups(
    buf: &Buffer,
    schema: &mut CollectionSchema,
    kept: &mut FieldBuffer,
    now: i64,
    changed: &mut Vec<String>,
) -> Result<Vec<EncodedFile>, String> {
    // Every event's fields, in bus order, in one buffer (kept between flushes); `ends[i]`:
    // where the i-th event's fields end. Invalid JSON has no fields.
    let mut fields = kept.take();
    let mut owned = 0;
    let mut ends = Vec::with_capacity(buf.deliveries.iter().map(|d| d.batch.events.len()).sum());
    for event in buf.deliveries.iter().flat_map(|d| &d.batch.events) {
        if event.content_type == "application/json" {
            owned += schema
                .observe_json_into(&event.payload, now, changed, &mut fields)
                .unwrap_or(0);
        }
        ends.push(fields.len());
    }
    let out = encode_rows(buf, schema, &fields, &ends);
    kept.keep(fields, owned);
    out
}

/// The second half of [`encode_groups`]: the events with their fields (`fields[ends[i - 1]..
/// ends[i]]` for the i-th event in bus order) grouped by hour partition, one file each.
fn encode_rows(
    buf: &Buffer,
    schema: &CollectionSchema,
    fields: &[(u32, Scalar<'_>)],
    ends: &[usize],
) -> Result<Vec<EncodedFile>, String> {
    // Rows grouped by hour partition; within a group, in bus order.
    let mut groups: std::collections::BTreeMap<i64, (Vec<Row<'_>>, u64, u64)> = Default::default();
    let mut start = 0;
    let mut ends = ends.iter();
    for d in &buf.deliveries {
        for event in &d.batch.events {
            let end = *ends.next().expect("one end per event");
            let g = groups.entry(hour_of(event.received_at_micros)).or_insert((
                Vec::new(),
                u64::MAX,
                0,
            ));
            g.0.push(Row {
                event,
                fields: &fields[start..end],
            });
            start = end;
            g.1 = g.1.min(d.position);
            g.2 = g.2.max(d.position);
        }
    }
    let mut out = Vec::new();
    for (_, (rows, first, last)) in groups {
        let min_t = rows
            .iter()
            .map(|r| r.event.received_at_micros)
            .min()
            .unwrap_or(0);
        let max_t = rows
            .iter()
            .map(|r| r.event.received_at_micros)
            .max()
            .unwrap_or(0);
        let row_count = rows.len();
        let payload_bytes: usize = rows.iter().map(|r| r.event.payload.len()).sum();
        // The file's inferred columns: those of the schema that occur in its rows, in
        // schema order.
        let mut present = vec![false; schema.columns.len()];
        for row in &rows {
            for (col, _) in row.fields {
                present[*col as usize] = true;
            }
        }
        let mut slot_of = vec![None; schema.columns.len()];
        let mut columns: Vec<(&str, ColumnType)> = Vec::new();
        for (i, c) in schema.columns.iter().enumerate() {
            if present[i] {
                slot_of[i] = Some(columns.len() as u32);
                columns.push((c.name.as_str(), c.ty));
            }
        }
        let arrow_schema = file_schema(&columns);
        let types: Vec<ColumnType> = schema.columns.iter().map(|c| c.ty).collect();
        let plain: Vec<String> = high_cardinality(&rows, &types)
            .into_iter()
            .map(|c| schema.columns[c].name.clone())
            .collect();
        // Arrow batches of CHUNK_ROWS rows, each dropped once encoded. Files come out at
        // about a fifth of the payload; a little more avoids regrowing.
        let encode = || {
            let mut writer = FileWriter::with_capacity(
                arrow_schema,
                slot_of,
                payload_bytes / 4 + (1 << 20),
                &plain,
            )?;
            let mut rows = rows.into_iter();
            loop {
                let chunk: Vec<Row<'_>> = rows.by_ref().take(CHUNK_ROWS).collect();
                if chunk.is_empty() {
                    break;
                }
                writer.write(&chunk)?;
            }
            writer.finish()
        };
        let bytes = encode().map_err(|e| format!("cannot encode Parquet: {e}"))?;
        out.push(EncodedFile {
            bytes,
            rows: row_count,
            min_t,
            max_t,
            first,
            last,
        });
    }
    Ok(out)
}

fn hour_of(micros: i64) -> i64 {
    micros.div_euclid(3_600_000_000)
}

impl Archiver {
    pub fn new(
        bus: Arc<dyn Bus>,
        meta: Arc<dyn Metastore>,
        store: Arc<dyn ObjectStore>,
        options: ArchiverOptions,
    ) -> Self {
        Self {
            bus,
            meta,
            store,
            options,
            status: Arc::new(ArchiveStatus::default()),
            fields: Mutex::default(),
        }
    }

    fn set_error(&self, e: Option<String>) {
        *self.status.last_error.lock().expect("lock") = e;
    }

    /// Runs until `shutdown` fires, then flushes what it holds (best effort) and returns.
    pub async fn run(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        self.status.running.store(true, Ordering::Relaxed);
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.run_once(&mut shutdown).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::error!(error = %e, "archiver stopped; restarting it");
                    self.set_error(Some(e));
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
            .consumer(CONSUMER)
            .await
            .map_err(|e| e.to_string())?;
        let mut checkpoints: HashMap<String, u64> = self
            .meta
            .archive_checkpoints()
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(c, p)| (c, p as u64))
            .collect();
        let mut schemas: HashMap<String, CollectionSchema> = HashMap::new();
        for c in self
            .meta
            .collection_columns(None)
            .await
            .map_err(|e| e.to_string())?
        {
            let col = Column {
                name: c.name,
                ty: ColumnType::parse(&c.type_name).unwrap_or(ColumnType::Utf8),
                first_seen: c.first_seen,
                widened_at: c.widened_at,
                widened_from: c.widened_from.as_deref().and_then(ColumnType::parse),
            };
            let schema = schemas.entry(c.collection_id).or_default();
            let mut cols = std::mem::take(&mut schema.columns);
            cols.push(col);
            *schema = CollectionSchema::from_columns(cols);
        }
        let mut buffers: HashMap<String, Buffer> = HashMap::new();
        let mut total_bytes = 0usize;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            let full = total_bytes >= self.options.max_buffered_bytes;
            tokio::select! {
                _ = stopped(shutdown) => {
                    let names: Vec<String> = buffers.keys().cloned().collect();
                    for c in names {
                        if let Some(buf) = buffers.remove(&c) {
                            let _ = self.flush(&c, buf, &mut schemas, &mut checkpoints, consumer.as_mut()).await;
                        }
                    }
                    let _ = consumer.commit().await;
                    return Ok(());
                }
                delivery = consumer.next(), if !full => {
                    let delivery = delivery.map_err(|e| e.to_string())?;
                    let collection = delivery.batch.collection_id.clone();
                    if checkpoints.get(&collection).is_some_and(|cp| delivery.position <= *cp) {
                        // Archived before a restart: only the ack was lost.
                        consumer.ack(delivery).await.map_err(|e| e.to_string())?;
                        continue;
                    }
                    let buf = buffers.entry(collection.clone()).or_insert_with(|| Buffer {
                        team_id: delivery.batch.team_id.clone(),
                        deliveries: Vec::new(),
                        positions: HashSet::new(),
                        bytes: 0,
                        events: 0,
                        oldest: Instant::now(),
                    });
                    if !buf.positions.insert(delivery.position) {
                        continue; // redelivered while still buffered (NATS ack_wait)
                    }
                    let bytes: usize = delivery.batch.events.iter().map(|e| e.payload.len()).sum();
                    buf.bytes += bytes;
                    buf.events += delivery.batch.events.len();
                    total_bytes += bytes;
                    buf.deliveries.push(delivery);
                    if buf.bytes >= self.options.target_bytes {
                        let buf = buffers.remove(&collection).expect("present");
                        total_bytes -= buf.bytes;
                        if let Some(back) = self.flush(&collection, buf, &mut schemas, &mut checkpoints, consumer.as_mut()).await {
                            total_bytes += back.bytes;
                            buffers.insert(collection, back);
                        }
                    }
                }
                _ = tick.tick() => {
                    let due: Vec<String> = buffers
                        .iter()
                        .filter(|(_, b)| b.oldest.elapsed() >= self.options.flush_after || total_bytes >= self.options.max_buffered_bytes)
                        .map(|(c, _)| c.clone())
                        .collect();
                    for c in due {
                        let buf = buffers.remove(&c).expect("present");
                        total_bytes -= buf.bytes;
                        if let Some(back) = self.flush(&c, buf, &mut schemas, &mut checkpoints, consumer.as_mut()).await {
                            total_bytes += back.bytes;
                            buffers.insert(c, back);
                        }
                    }
                }
            }
            self.status
                .buffered_bytes
                .store(total_bytes as u64, Ordering::Relaxed);
            self.status.buffered_events.store(
                buffers.values().map(|b| b.events as u64).sum(),
                Ordering::Relaxed,
            );
        }
    }

    /// Writes and registers one collection's buffer, then acks its messages. On failure the
    /// buffer is handed back (to be retried at the next tick) and the error recorded.
    async fn flush(
        &self,
        collection: &str,
        buf: Buffer,
        schemas: &mut HashMap<String, CollectionSchema>,
        checkpoints: &mut HashMap<String, u64>,
        consumer: &mut dyn Consumer,
    ) -> Option<Buffer> {
        let schema_before = schemas.get(collection).cloned().unwrap_or_default();
        match self.write_and_register(collection, &buf, schemas).await {
            Ok(max_position) => {
                checkpoints.insert(collection.to_string(), max_position);
                self.status
                    .events_archived
                    .fetch_add(buf.events as u64, Ordering::Relaxed);
                for d in buf.deliveries {
                    if let Err(e) = consumer.ack(d).await {
                        tracing::warn!(error = %e, "bus ack failed after archiving; the message will be skipped on redelivery");
                    }
                }
                // Save the consumer's progress now (not only every so often), so the bus can
                // drop what is archived and a restart does not re-read it.
                if let Err(e) = consumer.commit().await {
                    tracing::warn!(error = %e, "saving the archiver's bus position failed; it will be retried");
                }
                self.set_error(None);
                None
            }
            Err(e) => {
                tracing::warn!(collection, error = %e, "archive flush failed; keeping the events and retrying");
                self.set_error(Some(e));
                schemas.insert(collection.to_string(), schema_before);
                let mut buf = buf;
                // Retry after the next tick, not in a tight loop.
                buf.oldest = Instant::now() - self.options.flush_after
                    + Duration::from_secs(1).min(self.options.flush_after);
                Some(buf)
            }
        }
    }

    async fn write_and_register(
        &self,
        collection: &str,
        buf: &Buffer,
        schemas: &mut HashMap<String, CollectionSchema>,
    ) -> Result<u64, String> {
        let now = now_micros();
        let schema = schemas.entry(collection.to_string()).or_default();
        let mut changed = Vec::new();
        // The CPU-heavy part — reading the JSON, inferring the schema, encoding Parquet — runs
        // on a thread of its own at a lower scheduling priority, so that on a busy machine
        // ingest requests (whose acks clients wait for) go first and the archiver takes the
        // CPU they leave; the async worker only waits for it.
        let encoded = tokio::task::block_in_place(|| {
            crate::priority::run_in_background("archive-encode", || {
                let _bulk = crate::allocator::enter_bulk_arena();
                let mut kept = self.fields.lock().expect("lock");
                encode_groups(buf, schema, &mut kept, now, &mut changed)
            })
        })??;
        let max_position = buf.deliveries.iter().map(|d| d.position).max().unwrap_or(0);
        let mut files = Vec::new();
        for f in encoded {
            let path = object_path(&buf.team_id, collection, f.min_t, f.first, f.last);
            let size = f.bytes.len() as i64;
            // Recorded first, so that after a crash before registration the object is removed
            // (see `archive::recover_pending`) instead of lingering for outside readers.
            self.meta
                .add_pending_objects(std::slice::from_ref(&path), &self.options.owner, now)
                .await
                .map_err(|e| format!("cannot record the upload of {path}: {e}"))?;
            let put = self
                .store
                .put_opts(
                    &ObjectPath::from(path.as_str()),
                    PutPayload::from(f.bytes),
                    PutOptions {
                        mode: PutMode::Create,
                        ..Default::default()
                    },
                )
                .await;
            match put {
                Ok(_) if std::env::var_os("REWIND_TEST_CRASH_AFTER_ARCHIVE_PUT").is_some() => {
                    // Fault injection for the end-to-end tests: die between upload and registration.
                    tracing::error!(%path, "REWIND_TEST_CRASH_AFTER_ARCHIVE_PUT is set: aborting after the upload");
                    std::process::abort();
                }
                Ok(_) => {}
                // Written whole by an attempt that died before registering it: same position
                // range, same events.
                Err(object_store::Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(format!("cannot write {path} to the archive: {e}")),
            }
            files.push(ArchiveFile {
                id: new_id("af"),
                team_id: buf.team_id.clone(),
                collection_id: collection.to_string(),
                path,
                rows: f.rows as i64,
                bytes: size,
                min_received_at: f.min_t,
                max_received_at: f.max_t,
                min_position: f.first as i64,
                max_position: f.last as i64,
                schema_version: schema.columns.len() as i64,
                created_at: now,
            });
        }
        changed.sort();
        changed.dedup();
        let columns: Vec<StoredColumn> = changed
            .iter()
            .filter_map(|name| schema.get(name))
            .map(|c| StoredColumn {
                collection_id: collection.to_string(),
                name: c.name.clone(),
                type_name: c.ty.name().to_string(),
                first_seen: c.first_seen,
                widened_at: c.widened_at,
                widened_from: c.widened_from.map(|t| t.name().to_string()),
            })
            .collect();
        self.meta
            .register_archive_files(&files, collection, max_position as i64, &columns)
            .await
            .map_err(|e| format!("cannot register archive files: {e}"))?;
        self.status
            .files_written
            .fetch_add(files.len() as u64, Ordering::Relaxed);
        tracing::debug!(
            collection,
            files = files.len(),
            events = buf.events,
            "archived"
        );
        Ok(max_position)
    }
}
