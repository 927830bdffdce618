//! The embedded search backend: one tantivy index in `<data-dir>/search`.
//!
//! Fields: `scope` (team + collection, a mandatory term of every query), `id`,
//! `received_at` (fast, for ranges and newest-first order), the id's 128 bits as two fast
//! fields (ties on `received_at` are ordered by id), `kw` (the payload's path terms from
//! [`super::flatten`], which also give facet counts: a value's postings intersected with the
//! matches), `text` (the words of [`crate::query::text`]), and the stored `content_type` and
//! `payload`.
//!
//! Indexing cost is per term, so a document carries as few as the query language needs: no
//! exists term for scalars (a path exists when it has any term) and no separate facet column.
//! The term dictionary is tantivy's SSTable one (feature `quickwit`): most terms of event
//! payloads are unique (ids, timestamps, addresses), and an SSTable is far cheaper to write
//! and merge than an FST.
//!
//! Each batch is committed with the highest bus position it holds as the commit payload. An
//! event at or below that position may be in the index already (the bus redelivers after a
//! crash), so it replaces any copy by id; newer events are simply added.

use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tantivy::collector::{Collector, SegmentCollector, TopDocs};
use tantivy::query::{
    AllQuery, BooleanQuery, EmptyQuery, InvertedIndexRangeQuery, Occur, Query, RangeQuery,
    TermQuery,
};
use tantivy::schema::{
    BytesOptions, FAST, Field, INDEXED, IndexRecordOption, NumericOptions, STORED, STRING, Schema,
    TextFieldIndexing, TextOptions, Value,
};
use tantivy::{
    DocAddress, DocId, Index, IndexReader, IndexWriter, ReloadPolicy, SegmentReader,
    TantivyDocument, Term,
};

use super::flatten::{self, SEP};
use super::{
    Cursor, IndexDoc, MAX_FACET_VALUES, SearchError, SearchHealth, SearchIndex, SearchPage,
    SearchRequest,
};
use crate::archive::read::ArchivedEvent;
use crate::query::{CmpOp, Expr, Literal};

/// Segments of about one size that tantivy merges into one.
const MERGE_MIN_SEGMENTS: usize = 16;

/// An index this far behind the bus (the oldest event of a batch, by `received_at`) catches
/// up at background priority: the acknowledging threads go first, and the indexer takes what
/// they leave. Back at normal priority once a batch is within [`CAUGHT_UP_LAG`].
const CATCH_UP_LAG: Duration = Duration::from_secs(5);
const CAUGHT_UP_LAG: Duration = Duration::from_secs(2);

/// Names of the threads tantivy starts for a writer: indexing, merging and the segment
/// bookkeeping (as Linux keeps them: the first 15 bytes).
const TANTIVY_THREADS: [&str; 3] = ["thrd-tantivy-in", "merge_thread_", "segment_updater"];

/// A facet field with more distinct values than this (in one index segment) is not counted.
const MAX_FACET_DISTINCT: usize = 100_000;

#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Memory tantivy may use for documents not yet written to a segment, over all its
    /// indexing threads (at least 15 MiB per thread).
    pub writer_memory_bytes: usize,
    /// Indexing threads (default: up to 2, as many as there are cores).
    pub writer_threads: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            writer_memory_bytes: 64 << 20,
            writer_threads: std::thread::available_parallelism().map_or(1, |n| n.get().min(2)),
        }
    }
}

#[derive(Clone, Copy)]
struct Fields {
    scope: Field,
    id: Field,
    received_at: Field,
    id_hi: Field,
    id_lo: Field,
    kw: Field,
    text: Field,
    content_type: Field,
    payload: Field,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let raw = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer("raw")
            .set_index_option(IndexRecordOption::Basic),
    );
    let fields = Fields {
        scope: b.add_text_field("scope", raw.clone()),
        id: b.add_text_field("id", STRING | STORED),
        received_at: b.add_i64_field(
            "received_at",
            NumericOptions::default()
                .set_indexed()
                .set_fast()
                .set_stored(),
        ),
        id_hi: b.add_u64_field("id_hi", FAST),
        id_lo: b.add_u64_field("id_lo", FAST),
        kw: b.add_text_field("kw", raw),
        text: b.add_text_field(
            "text",
            TextOptions::default().set_indexing_options(
                TextFieldIndexing::default()
                    .set_tokenizer(crate::query::text::ANALYZER)
                    .set_index_option(IndexRecordOption::Basic),
            ),
        ),
        content_type: b.add_text_field("content_type", STORED),
        payload: b.add_bytes_field("payload", BytesOptions::default().set_stored()),
    };
    let _ = INDEXED;
    (b.build(), fields)
}

fn scope_key(team_id: &str, collection_id: &str) -> String {
    format!("{team_id}/{collection_id}")
}

fn id_bits(id: &str) -> (u64, u64) {
    let v = ulid::Ulid::from_string(id).map(u128::from).unwrap_or(0);
    ((v >> 64) as u64, v as u64)
}

fn internal(e: impl std::fmt::Display) -> SearchError {
    SearchError::Internal(e.to_string())
}

pub struct EmbeddedIndex {
    index: Index,
    reader: IndexReader,
    writer: Arc<Mutex<IndexWriter>>,
    fields: Fields,
    /// Highest bus position committed to the index.
    checkpoint: Arc<AtomicU64>,
    dir: std::path::PathBuf,
    /// Threads that build documents in a write (as many as tantivy indexes with).
    threads: usize,
    /// Whether the writer's threads may switch between normal and background priority (it
    /// needs the right to give a thread its priority back; without it they stay normal).
    adaptive_priority: bool,
    /// True while catching up at background priority ([`CATCH_UP_LAG`]).
    catching_up: Arc<AtomicBool>,
    /// The threads tantivy started for this index's writer.
    writer_tids: Arc<std::collections::BTreeSet<i32>>,
}

impl EmbeddedIndex {
    /// Opens (or creates) the index in `dir`.
    pub fn open(dir: &Path, options: &EmbeddedOptions) -> Result<Self, SearchError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            SearchError::Unavailable(format!(
                "cannot create the search index directory {}: {e}",
                dir.display()
            ))
        })?;
        let (schema, fields) = schema();
        let directory = super::directory::PacedMmapDirectory::open(dir).map_err(internal)?;
        let index = Index::open_or_create(directory, schema).map_err(|e| {
            SearchError::Internal(format!(
                "cannot open the search index in {}: {e}. If it was written by another Rewind version, stop the gateway, delete that directory and start again (recent events are re-indexed from the bus as far as it retains them)",
                dir.display()
            ))
        })?;
        index
            .tokenizers()
            .register(crate::query::text::ANALYZER, crate::query::text::analyzer());
        let checkpoint = index
            .load_metas()
            .map_err(internal)?
            .payload
            .and_then(|p| p.parse::<u64>().ok())
            .unwrap_or(0);
        // Opening two indexes at once (tests do) must not mix up their threads.
        static OPENING: Mutex<()> = Mutex::new(());
        let opening = OPENING.lock().unwrap_or_else(|e| e.into_inner());
        let threads_before = crate::priority::threads_named(&TANTIVY_THREADS);
        let writer = index
            .writer_with_num_threads(
                options.writer_threads.max(1),
                (options.writer_memory_bytes / options.writer_threads.max(1)).max(15 << 20)
                    * options.writer_threads.max(1),
            )
            .map_err(|e| {
                SearchError::Unavailable(format!(
                    "cannot open the search index for writing ({e}); is another gateway using the data dir {}?",
                    dir.display()
                ))
            })?;
        // A new thread names itself once it runs: wait (briefly) until tantivy's threads
        // (indexing ones, the segment updater, merge threads) have names and their count
        // holds still.
        let mut writer_tids = std::collections::BTreeSet::new();
        for _ in 0..100 {
            let now: std::collections::BTreeSet<i32> =
                crate::priority::threads_named(&TANTIVY_THREADS)
                    .difference(&threads_before)
                    .copied()
                    .collect();
            let settled = now.len() >= options.writer_threads.max(1) + 2 && now == writer_tids;
            writer_tids = now;
            if settled {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        drop(opening);
        // Merge 16 segments of a size at a time instead of tantivy's 8: each document is
        // rewritten fewer times (~7 % less CPU per indexed event in A/B runs), for twice as
        // many small segments (queries over 1M events measured as fast as with the default).
        let mut policy = tantivy::indexer::LogMergePolicy::default();
        policy.set_min_num_segments(MERGE_MIN_SEGMENTS);
        writer.set_merge_policy(Box::new(policy));
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(internal)?;
        Ok(Self {
            index,
            reader,
            writer: Arc::new(Mutex::new(writer)),
            fields,
            checkpoint: Arc::new(AtomicU64::new(checkpoint)),
            dir: dir.to_path_buf(),
            threads: options.writer_threads.max(1),
            adaptive_priority: crate::priority::can_restore_priority(),
            catching_up: Arc::new(AtomicBool::new(false)),
            writer_tids: Arc::new(writer_tids),
        })
    }

    /// Decides, from how far behind the bus a batch is, whether it is indexed at background
    /// priority, and sets tantivy's threads accordingly.
    fn pace(&self, docs: &[IndexDoc]) -> bool {
        if !self.adaptive_priority {
            return false;
        }
        let oldest = docs.iter().map(|d| d.received_at).min().unwrap_or(i64::MAX);
        let lag =
            Duration::from_micros(crate::ids::now_micros().saturating_sub(oldest).max(0) as u64);
        let was = self.catching_up.load(Ordering::Relaxed);
        let now = if was {
            lag > CAUGHT_UP_LAG
        } else {
            lag > CATCH_UP_LAG
        };
        if now != was {
            self.catching_up.store(now, Ordering::Relaxed);
            tracing::info!(
                lag_secs = lag.as_secs_f64(),
                "search index {} the bus; indexing at {} priority",
                if now { "is behind" } else { "caught up with" },
                if now { "background" } else { "normal" }
            );
            let nice = if now {
                crate::priority::BACKGROUND_NICE
            } else {
                0
            };
            crate::priority::set_threads(&self.writer_tids, &TANTIVY_THREADS, nice);
        }
        now
    }

    /// Adds documents and commits (the blocking half of `index`). Documents are built (JSON
    /// parsed, terms and words collected) on up to as many threads as tantivy indexes with,
    /// each handing its documents to the writer as it goes, so building and indexing overlap.
    fn write(&self, docs: Vec<IndexDoc>) -> Result<(), SearchError> {
        let checkpoint = self.checkpoint.load(Ordering::Acquire);
        let max_position = docs.iter().map(|d| d.position).max().unwrap_or(0);
        let writer = self.writer.lock().expect("index writer lock");
        let threads = self.threads.clamp(1, docs.len().div_ceil(256).max(1));
        let catching_up = self.pace(&docs);
        // Threads take 64 documents at a time from a shared counter. The first builds at
        // normal priority (unless the index is catching up); the others at background
        // priority, so they use a core the acknowledging threads leave idle but never take it
        // from them (search never slows ingestion), and the first one does their share when
        // they starve.
        let next = std::sync::atomic::AtomicUsize::new(0);
        const TAKE: usize = 64;
        let added: Result<(), tantivy::TantivyError> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let (writer, docs, next) = (&*writer, &docs, &next);
                    // Named: an unnamed thread takes its creator's name (a tokio worker's),
                    // which makes per-thread tools (top -H, /proc) misleading.
                    std::thread::Builder::new()
                        .name(format!("index-build-{t}"))
                        .spawn_scoped(scope, move || {
                            if t > 0 || catching_up {
                                crate::priority::lower_current_thread();
                            }
                            let mut scratch = flatten::PayloadTerms::default();
                            loop {
                                let from = next.fetch_add(TAKE, Ordering::Relaxed);
                                if from >= docs.len() {
                                    return Ok(());
                                }
                                for d in &docs[from..(from + TAKE).min(docs.len())] {
                                    if d.position <= checkpoint {
                                        // Maybe indexed before a crash: replace any copy.
                                        writer.delete_term(term(self.fields.id, &d.id));
                                    }
                                    writer.add_document(self.document(d, &mut scratch))?;
                                }
                            }
                        })
                        .expect("cannot start an index builder thread")
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().expect("document builder panicked"))
        });
        let mut writer = writer;
        // tantivy has its own copies now: free the events (and the bus records their payloads
        // point into) before the commit, the longest part of the write.
        drop(docs);
        if let Err(e) = added {
            let _ = writer.rollback();
            return Err(internal(e));
        }
        let new_checkpoint = max_position.max(self.checkpoint.load(Ordering::Acquire));
        // tantivy starts the indexing threads for the next batch inside `prepare_commit`, and
        // a new thread inherits its creator's priority: commit on a thread at the priority
        // this batch was indexed at, or a catching-up index would index at normal priority
        // from its second batch on (measured: 1.5 cores at nice 0 under an ingest burst).
        let writer_ref: &mut IndexWriter = &mut writer;
        let committed: Result<(), SearchError> = std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("index-commit".into())
                .spawn_scoped(scope, move || {
                    if catching_up {
                        crate::priority::lower_current_thread();
                    }
                    let mut prepared = match writer_ref.prepare_commit() {
                        Ok(p) => p,
                        Err(e) => {
                            let _ = writer_ref.rollback();
                            return Err(internal(e));
                        }
                    };
                    prepared.set_payload(&new_checkpoint.to_string());
                    prepared.commit().map(drop).map_err(internal)
                })
                .expect("cannot start the index commit thread")
                .join()
                .expect("index commit thread panicked")
        });
        committed?;
        drop(writer);
        self.checkpoint.store(new_checkpoint, Ordering::Release);
        self.reader.reload().map_err(internal)
    }

    /// The tantivy document of an event (`scratch` keeps the payload reader's buffers).
    fn document(&self, d: &IndexDoc, scratch: &mut flatten::PayloadTerms) -> TantivyDocument {
        let f = &self.fields;
        let mut doc = TantivyDocument::new();
        doc.add_text(f.scope, scope_key(&d.team_id, &d.collection_id));
        doc.add_text(f.id, &d.id);
        doc.add_i64(f.received_at, d.received_at);
        let (hi, lo) = id_bits(&d.id);
        doc.add_u64(f.id_hi, hi);
        doc.add_u64(f.id_lo, lo);
        doc.add_text(f.content_type, &d.content_type);
        doc.add_bytes(f.payload, &d.payload);
        scratch.read(&d.content_type, &d.payload);
        for t in scratch.terms() {
            doc.add_text(f.kw, t);
        }
        doc.add_text(f.text, &scratch.text);
        doc
    }
}

/// The width of the next time slice of a newest-first search, from what the last one found:
/// sized by the match rate it saw to hold the rest of the page (with half again to spare),
/// ×8 when it found nothing, and at least ×2 so that a sparse tail is crossed in few passes.
/// Each pass costs about as much as walking the filter's postings once, so fewer passes is
/// what makes selective filters fast.
fn next_width(width: i64, found: usize, still_wanted: usize) -> i64 {
    let factor = if found == 0 {
        8.0
    } else {
        (still_wanted as f64 / found as f64 * 1.5).clamp(2.0, 64.0)
    };
    (width as f64 * factor).min(i64::MAX as f64 / 2.0) as i64
}

/// A compiled filter: the query and whether it selects exactly what the filter does (else it
/// selects a superset, to be checked event by event).
struct Compiled {
    query: Box<dyn Query>,
    exact: bool,
}

fn term(f: Field, text: &str) -> Term {
    Term::from_field_text(f, text)
}

fn term_query(f: Field, text: &str) -> Box<dyn Query> {
    Box::new(TermQuery::new(term(f, text), IndexRecordOption::Basic))
}

fn any_of(queries: Vec<Box<dyn Query>>) -> Box<dyn Query> {
    match queries.len() {
        0 => Box::new(EmptyQuery),
        1 => queries.into_iter().next().expect("one"),
        _ => Box::new(BooleanQuery::new(
            queries.into_iter().map(|q| (Occur::Should, q)).collect(),
        )),
    }
}

fn negate(inner: Compiled) -> Compiled {
    if !inner.exact {
        return Compiled {
            query: Box::new(AllQuery),
            exact: false,
        };
    }
    Compiled {
        query: Box::new(BooleanQuery::new(vec![
            (Occur::Must, Box::new(AllQuery)),
            (Occur::MustNot, inner.query),
        ])),
        exact: true,
    }
}

fn equals(kw: Field, path: &str, lit: &Literal) -> Compiled {
    if let Some(n) = lit.number {
        return Compiled {
            query: any_of(
                flatten::NUMBER_KINDS
                    .iter()
                    .map(|kind| term_query(kw, &flatten::number_term(path, kind, n)))
                    .collect(),
            ),
            exact: true,
        };
    }
    let exact = lit.text.len() < flatten::MAX_TERM_TEXT;
    let mut options = vec![term_query(kw, &flatten::string_term(path, &lit.text))];
    if lit.text == "true" || lit.text == "false" {
        options.push(term_query(
            kw,
            &flatten::bool_term(path, lit.text == "true"),
        ));
    }
    Compiled {
        query: any_of(options),
        exact,
    }
}

fn compare(kw: Field, path: &str, op: CmpOp, lit: &Literal) -> Compiled {
    if lit.text.len() >= flatten::MAX_TERM_TEXT && lit.number.is_none() {
        // Bounds cannot be expressed on cut terms: every string of the field is a candidate.
        let (lo, hi) = flatten::kind_bounds(path, "s:");
        return Compiled {
            query: Box::new(InvertedIndexRangeQuery::new(
                Bound::Included(term(kw, &lo)),
                Bound::Excluded(term(kw, &hi)),
            )),
            exact: false,
        };
    }
    Compiled {
        query: any_of(
            kind_ranges(path, op, lit)
                .into_iter()
                .map(|(lower, upper)| {
                    Box::new(InvertedIndexRangeQuery::new(
                        lower.map(|t| term(kw, &t)),
                        upper.map(|t| term(kw, &t)),
                    )) as Box<dyn Query>
                })
                .collect(),
        ),
        exact: true,
    }
}

/// The term ranges a comparison selects: one per term kind it compares with (numbers and
/// numeric strings for a number, strings for a text).
fn kind_ranges(path: &str, op: CmpOp, lit: &Literal) -> Vec<(Bound<String>, Bound<String>)> {
    let kinds: Vec<(&str, String)> = match lit.number {
        Some(n) => flatten::NUMBER_KINDS
            .iter()
            .map(|k| (*k, flatten::encode_f64(n)))
            .collect(),
        None => vec![("s:", lit.text.clone())],
    };
    kinds
        .into_iter()
        .map(|(kind, value)| {
            let (lo, hi) = flatten::kind_bounds(path, kind);
            let at = format!("{path}{SEP}{kind}{value}");
            match op {
                CmpOp::Gt => (Bound::Excluded(at), Bound::Excluded(hi)),
                CmpOp::Ge => (Bound::Included(at), Bound::Excluded(hi)),
                CmpOp::Lt => (Bound::Included(lo), Bound::Excluded(at)),
                CmpOp::Le => (Bound::Included(lo), Bound::Included(at)),
                CmpOp::Eq | CmpOp::Ne => unreachable!("handled by equals"),
            }
        })
        .collect()
}

/// The share of the index's documents a range comparison on the payload selects, estimated
/// from the term dictionary (document frequencies of the terms in range, no postings read).
/// `None` when it is not a plain range.
fn range_share(searcher: &tantivy::Searcher, kw: Field, expr: &Expr) -> Option<f64> {
    let ranges = match expr {
        Expr::Exists(path) => {
            let (lo, hi) = flatten::path_bounds(path);
            vec![(Bound::Included(lo), Bound::Excluded(hi))]
        }
        Expr::Cmp(path, op, lit)
            if !matches!(op, CmpOp::Eq | CmpOp::Ne)
                && (lit.number.is_some() || lit.text.len() < flatten::MAX_TERM_TEXT) =>
        {
            kind_ranges(path, *op, lit)
        }
        _ => return None,
    };
    let docs = searcher.num_docs().max(1);
    // Past this many matches the range is broad: no need to read the rest of the dictionary.
    let enough = (docs as f64 * DEMOTE_RANGE_SHARE) as u64 + 1;
    let mut matched = 0u64;
    for seg in searcher.segment_readers() {
        let index = seg.inverted_index(kw).ok()?;
        for (lower, upper) in &ranges {
            let dict = index.terms();
            let mut range = dict.range();
            range = match lower {
                Bound::Included(t) => range.ge(t.as_bytes()),
                Bound::Excluded(t) => range.gt(t.as_bytes()),
                Bound::Unbounded => range,
            };
            range = match upper {
                Bound::Included(t) => range.le(t.as_bytes()),
                Bound::Excluded(t) => range.lt(t.as_bytes()),
                Bound::Unbounded => range,
            };
            let mut stream = range.into_stream().ok()?;
            while stream.advance() {
                matched += u64::from(stream.value().doc_freq);
                if matched >= enough {
                    return Some(1.0);
                }
            }
        }
    }
    Some(matched as f64 / docs as f64)
}

/// Ranges selecting more than this share of the index are checked on the payloads of the
/// time slice's candidates instead of being intersected as a (whole-index) term range.
const DEMOTE_RANGE_SHARE: f64 = 0.2;

/// The filter the index runs: top-level `AND` parts that are broad ranges are left to the
/// verification step (a superset is still selected). `(filter, exact)`.
fn index_filter(searcher: &tantivy::Searcher, kw: Field, filter: &Expr) -> (Option<Expr>, bool) {
    let broad = |e: &Expr| range_share(searcher, kw, e).is_some_and(|s| s > DEMOTE_RANGE_SHARE);
    match filter {
        Expr::And(parts) => {
            let kept: Vec<Expr> = parts.iter().filter(|p| !broad(p)).cloned().collect();
            let exact = kept.len() == parts.len();
            match kept.len() {
                0 => (None, exact),
                1 => (kept.into_iter().next(), exact),
                _ => (Some(Expr::And(kept)), exact),
            }
        }
        e if broad(e) => (None, false),
        e => (Some(e.clone()), true),
    }
}

fn compile(kw: Field, expr: &Expr) -> Compiled {
    match expr {
        Expr::And(parts) | Expr::Or(parts) => {
            let occur = if matches!(expr, Expr::And(_)) {
                Occur::Must
            } else {
                Occur::Should
            };
            let compiled: Vec<Compiled> = parts.iter().map(|p| compile(kw, p)).collect();
            let exact = compiled.iter().all(|c| c.exact);
            Compiled {
                query: Box::new(BooleanQuery::new(
                    compiled.into_iter().map(|c| (occur, c.query)).collect(),
                )),
                exact,
            }
        }
        Expr::Not(inner) => negate(compile(kw, inner)),
        Expr::Exists(path) => {
            let (lo, hi) = flatten::path_bounds(path);
            Compiled {
                query: Box::new(InvertedIndexRangeQuery::new(
                    Bound::Included(term(kw, &lo)),
                    Bound::Excluded(term(kw, &hi)),
                )),
                exact: true,
            }
        }
        Expr::Cmp(path, CmpOp::Eq, lit) => equals(kw, path, lit),
        Expr::Cmp(path, CmpOp::Ne, lit) => negate(equals(kw, path, lit)),
        Expr::Cmp(path, op, lit) => compare(kw, path, *op, lit),
        Expr::In(path, lits) => {
            let compiled: Vec<Compiled> = lits.iter().map(|l| equals(kw, path, l)).collect();
            let exact = compiled.iter().all(|c| c.exact);
            Compiled {
                query: any_of(compiled.into_iter().map(|c| c.query).collect()),
                exact,
            }
        }
    }
}

/// Newest-first sort key: `(received_at, id)`; events at or after the cursor sort last.
type SortKey = (i64, u64, u64);
const EXCLUDED: SortKey = (i64::MIN, 0, 0);

/// Counts a facet field's values over every matching document: the matches of a segment are
/// gathered in a bit set, then each value's postings (the field's `s:`, `n:` and `b:` terms)
/// are walked and counted against it. A low-cardinality field (the kind facets are for) costs
/// one pass over the postings of the documents that have it.
struct FacetCollector {
    kw: Field,
    path: String,
}

struct FacetSegment {
    kw: Field,
    path: String,
    segment: SegmentReader,
    /// One bit per document of the segment.
    matches: Vec<u64>,
    any: bool,
}

impl Collector for FacetCollector {
    type Fruit = Result<Vec<(String, u64)>, String>;
    type Child = FacetSegment;

    fn for_segment(&self, _: u32, segment: &SegmentReader) -> tantivy::Result<FacetSegment> {
        Ok(FacetSegment {
            kw: self.kw,
            path: self.path.clone(),
            segment: segment.clone(),
            matches: vec![0; (segment.max_doc() as usize).div_ceil(64)],
            any: false,
        })
    }

    fn requires_scoring(&self) -> bool {
        false
    }

    fn merge_fruits(
        &self,
        fruits: Vec<Result<Vec<(String, u64)>, String>>,
    ) -> tantivy::Result<Self::Fruit> {
        let mut total: std::collections::HashMap<String, u64> = Default::default();
        for fruit in fruits {
            match fruit {
                Ok(values) => {
                    for (v, n) in values {
                        *total.entry(v).or_default() += n;
                    }
                }
                Err(e) => return Ok(Err(e)),
            }
        }
        let mut out: Vec<(String, u64)> = total.into_iter().collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out.truncate(MAX_FACET_VALUES);
        Ok(Ok(out))
    }
}

impl FacetSegment {
    fn count(&self) -> Result<Vec<(String, u64)>, String> {
        let mut out = Vec::new();
        if !self.any {
            return Ok(out);
        }
        let index = self
            .segment
            .inverted_index(self.kw)
            .map_err(|e| e.to_string())?;
        let (lo, hi) = flatten::path_bounds(&self.path);
        let mut stream = index
            .terms()
            .range()
            .ge(lo.as_bytes())
            .lt(hi.as_bytes())
            .into_stream()
            .map_err(|e| e.to_string())?;
        let mut distinct = 0usize;
        while stream.advance() {
            let Some(value) = flatten::facet_of_term(&stream.key()[lo.len()..]) else {
                continue;
            };
            distinct += 1;
            if distinct > MAX_FACET_DISTINCT {
                return Err(format!(
                    "the field has more than {MAX_FACET_DISTINCT} distinct values; facet counts are for fields with fewer"
                ));
            }
            let mut postings = index
                .read_block_postings_from_terminfo(stream.value(), IndexRecordOption::Basic)
                .map_err(|e| e.to_string())?;
            let mut n = 0u64;
            loop {
                let docs = postings.docs();
                if docs.is_empty() {
                    break;
                }
                n += docs
                    .iter()
                    .filter(|&&d| self.matches[d as usize / 64] >> (d % 64) & 1 == 1)
                    .count() as u64;
                postings.advance();
            }
            if n > 0 {
                out.push((value, n));
            }
        }
        Ok(out)
    }
}

impl SegmentCollector for FacetSegment {
    type Fruit = Result<Vec<(String, u64)>, String>;

    fn collect(&mut self, doc: DocId, _: f32) {
        self.matches[doc as usize / 64] |= 1 << (doc % 64);
        self.any = true;
    }

    fn harvest(self) -> Self::Fruit {
        self.count()
    }
}

impl EmbeddedIndex {
    /// The oldest and newest `received_at` in the index and its live document count (over
    /// all collections: a density estimate for slicing, not an exact figure).
    fn time_span(&self, searcher: &tantivy::Searcher) -> (i64, i64, u64) {
        let (mut oldest, mut newest, mut docs) = (i64::MAX, i64::MIN, 0u64);
        for seg in searcher.segment_readers() {
            if seg.num_docs() == 0 {
                continue;
            }
            if let Ok(col) = seg.fast_fields().i64("received_at") {
                oldest = oldest.min(col.min_value());
                newest = newest.max(col.max_value());
                docs += u64::from(seg.num_docs());
            }
        }
        (oldest, newest, docs)
    }

    fn run_search(&self, request: &SearchRequest) -> Result<SearchPage, SearchError> {
        let f = self.fields;
        let searcher = self.reader.searcher();
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = vec![(
            Occur::Must,
            term_query(
                f.scope,
                &scope_key(&request.team_id, &request.collection_id),
            ),
        )];
        let mut to = request.to;
        if let Some(c) = &request.cursor {
            to = to.min(c.received_at.saturating_add(1));
        }
        if request.from > i64::MIN || to < i64::MAX {
            clauses.push((
                Occur::Must,
                Box::new(RangeQuery::new(
                    Bound::Included(Term::from_field_i64(f.received_at, request.from)),
                    Bound::Excluded(Term::from_field_i64(f.received_at, to)),
                )),
            ));
        }
        let mut exact = true;
        if let Some(filter) = &request.filter {
            // Facet counts run over every match of the index query: it must be the whole filter.
            let (index_filter, all_in_index) = if request.facet.is_some() {
                (Some(filter.clone()), true)
            } else {
                index_filter(&searcher, f.kw, filter)
            };
            exact = all_in_index;
            if let Some(filter) = index_filter {
                let c = compile(f.kw, &filter);
                exact &= c.exact;
                clauses.push((Occur::Must, c.query));
            }
        }
        if let Some(q) = &request.q {
            for w in crate::query::text::words(q) {
                clauses.push((Occur::Must, term_query(f.text, &w)));
            }
        }
        let query = BooleanQuery::new(clauses);
        let cursor = request.cursor.as_ref().map(|c| {
            let (hi, lo) = id_bits(&c.id);
            (c.received_at, hi, lo)
        });
        let facets = match &request.facet {
            Some(field) => {
                match searcher
                    .search(
                        &query,
                        &FacetCollector {
                            kw: f.kw,
                            path: field.clone(),
                        },
                    )
                    .map_err(internal)?
                {
                    Ok(v) => Some(v),
                    Err(e) => return Err(SearchError::Internal(e)),
                }
            }
            None => None,
        };

        // Newest first, slice by slice: the query runs on [upper - w, upper) with `w` sized
        // from the index's density to hold about a page, and widens (×4) until the page is
        // full or the range is exhausted, so a page costs what is in its slice, not every
        // match in the collection. Exact: one pass of limit + 1 per slice; superset: pages
        // of candidates, each checked.
        let want = request.limit + 1;
        let mut events: Vec<ArchivedEvent> = Vec::with_capacity(want);
        let (oldest, newest, docs) = self.time_span(&searcher);
        let lower_bound = request.from.max(oldest);
        let mut upper = to.min(newest.saturating_add(1));
        // Docs per µs (an empty index has nothing to slice: the loop below does not run).
        let density = docs as f64 / (newest.saturating_sub(oldest).max(1) as f64);
        let mut width = ((want as f64 * 2.0 / density.max(1e-12)) as i64).max(1_000_000);
        let base_query = query;
        while upper > lower_bound && events.len() < want {
            let slice_from = upper.saturating_sub(width).max(lower_bound);
            let query = BooleanQuery::new(vec![
                (Occur::Must, Box::new(base_query.clone()) as Box<dyn Query>),
                (
                    Occur::Must,
                    Box::new(RangeQuery::new(
                        Bound::Included(Term::from_field_i64(f.received_at, slice_from)),
                        Bound::Excluded(Term::from_field_i64(f.received_at, upper)),
                    )),
                ),
            ]);
            let want = want - events.len();
            let mut slice_events = Vec::new();
            let mut after = cursor;
            loop {
                let fetch = if exact { want } else { (want * 4).max(64) };
                let top = TopDocs::with_limit(fetch).custom_score(move |seg: &SegmentReader| {
                    let ff = seg.fast_fields();
                    let ra = ff
                        .i64("received_at")
                        .expect("received_at is a fast field")
                        .first_or_default_col(0);
                    let hi = ff
                        .u64("id_hi")
                        .expect("id_hi is a fast field")
                        .first_or_default_col(0);
                    let lo = ff
                        .u64("id_lo")
                        .expect("id_lo is a fast field")
                        .first_or_default_col(0);
                    move |doc: DocId| {
                        let key = (ra.get_val(doc), hi.get_val(doc), lo.get_val(doc));
                        match after {
                            Some(c) if key >= c => EXCLUDED,
                            _ => key,
                        }
                    }
                });
                let hits: Vec<(SortKey, DocAddress)> =
                    searcher.search(&query, &top).map_err(internal)?;
                let fetched = hits.len();
                let mut last = None;
                for (key, addr) in hits {
                    if key == EXCLUDED {
                        last = None;
                        break;
                    }
                    last = Some(key);
                    let doc: TantivyDocument = searcher.doc(addr).map_err(internal)?;
                    let event = ArchivedEvent {
                        id: doc
                            .get_first(f.id)
                            .and_then(|v| v.as_str())
                            .unwrap_or_default()
                            .to_string(),
                        received_at: key.0,
                        content_type: doc
                            .get_first(f.content_type)
                            .and_then(|v| v.as_str())
                            .unwrap_or_default()
                            .to_string(),
                        payload: Bytes::copy_from_slice(
                            doc.get_first(f.payload)
                                .and_then(|v| v.as_bytes())
                                .unwrap_or_default(),
                        ),
                    };
                    if exact || super::selects(request, &event) {
                        slice_events.push(event);
                        if slice_events.len() == want {
                            break;
                        }
                    }
                }
                if exact || slice_events.len() == want || fetched < fetch || last.is_none() {
                    break;
                }
                after = last;
            }
            let found = slice_events.len();
            events.append(&mut slice_events);
            upper = slice_from;
            width = next_width(
                width,
                found,
                request.limit + 1 - events.len().min(request.limit + 1),
            );
        }
        let mut next_cursor = None;
        if events.len() > request.limit {
            events.truncate(request.limit);
            let last = events.last().expect("limit >= 1");
            next_cursor = Some(Cursor {
                received_at: last.received_at,
                id: last.id.clone(),
            });
        }
        Ok(SearchPage {
            events,
            next_cursor,
            facets,
        })
    }
}

#[async_trait]
impl SearchIndex for EmbeddedIndex {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    async fn index(&self, docs: Vec<IndexDoc>) -> Result<(), SearchError> {
        if docs.is_empty() {
            return Ok(());
        }
        let this = self.clone_handles();
        // The priority the batch is built and indexed at is chosen in `write` (`pace`).
        tokio::task::spawn_blocking(move || this.write(docs))
            .await
            .map_err(internal)?
    }

    async fn search(&self, request: &SearchRequest) -> Result<SearchPage, SearchError> {
        let this = self.clone_handles();
        let request = request.clone();
        tokio::task::spawn_blocking(move || this.run_search(&request))
            .await
            .map_err(internal)?
    }

    async fn delete_before(
        &self,
        team_id: &str,
        collection_id: &str,
        before: i64,
    ) -> Result<(), SearchError> {
        let this = self.clone_handles();
        let scope = scope_key(team_id, collection_id);
        tokio::task::spawn_blocking(move || {
            let f = this.fields;
            let query = BooleanQuery::new(vec![
                (Occur::Must, term_query(f.scope, &scope)),
                (
                    Occur::Must,
                    Box::new(RangeQuery::new(
                        Bound::Unbounded,
                        Bound::Excluded(Term::from_field_i64(f.received_at, before)),
                    )),
                ),
            ]);
            let mut writer = this.writer.lock().expect("index writer lock");
            writer.delete_query(Box::new(query)).map_err(internal)?;
            let mut prepared = writer.prepare_commit().map_err(internal)?;
            prepared.set_payload(&this.checkpoint.load(Ordering::Acquire).to_string());
            prepared.commit().map_err(internal)?;
            drop(writer);
            this.reader.reload().map_err(internal)
        })
        .await
        .map_err(internal)?
    }

    async fn health(&self) -> SearchHealth {
        SearchHealth {
            kind: "embedded",
            ready: true,
            detail: format!(
                "tantivy index in {}{}",
                self.dir.display(),
                if self.catching_up.load(Ordering::Relaxed) {
                    "; catching up with the bus at background priority"
                } else {
                    ""
                }
            ),
        }
    }
}

impl EmbeddedIndex {
    /// A cheap handle sharing the index, reader and writer (for blocking tasks).
    fn clone_handles(&self) -> EmbeddedIndex {
        EmbeddedIndex {
            index: self.index.clone(),
            reader: self.reader.clone(),
            writer: self.writer.clone(),
            fields: self.fields,
            checkpoint: self.checkpoint.clone(),
            dir: self.dir.clone(),
            threads: self.threads,
            adaptive_priority: self.adaptive_priority,
            catching_up: self.catching_up.clone(),
            writer_tids: self.writer_tids.clone(),
        }
    }

    /// The nice values of the threads tantivy started for this index's writer (for tests).
    #[cfg(all(test, target_os = "linux"))]
    pub(crate) fn writer_thread_nices(&self) -> Vec<i32> {
        self.writer_tids
            .iter()
            .filter_map(|tid| crate::priority::nice_of_thread(*tid))
            .collect()
    }

    /// Number of documents (live) in the index, for tests and the benchmark.
    pub fn num_docs(&self) -> u64 {
        self.reader.searcher().num_docs()
    }
}

#[cfg(test)]
mod tests {
    use super::next_width;

    #[test]
    fn slices_widen_by_the_match_rate_they_saw() {
        // Nothing found: ×8.
        assert_eq!(next_width(1_000, 0, 51), 8_000);
        // 10 found, 41 still wanted: 41 / 10 × 1.5 = ×6.15.
        assert!((6_149..=6_150).contains(&next_width(1_000, 10, 41)));
        // Nearly full: at least ×2; very sparse: at most ×64.
        assert_eq!(next_width(1_000, 50, 1), 2_000);
        assert_eq!(next_width(1_000, 1, 1_000), 64_000);
        // Never overflows.
        assert!(next_width(i64::MAX / 4, 0, 51) > 0);
    }
}
