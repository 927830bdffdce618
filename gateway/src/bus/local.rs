//! The embedded bus: an append-only log under `<data-dir>/bus`.
//!
//! * Segments `NNNNNNNNNNNNNNNNNNNN.log` (20-digit base offset), rolled at `segment_bytes`.
//! * Records: `magic(1) len(4) crc32(4) offset(8) body(len)`, little-endian; the CRC covers the
//!   offset and the body, so a record read from the wrong place is caught too.
//! * One writer thread does group commit: it takes every append waiting, writes them with one
//!   `write`, calls `fdatasync`, and only then answers them; the more clients wait, the more
//!   each fsync carries.
//! * On Linux the writer uses direct I/O (`O_DIRECT`) where the file system allows it: a group
//!   is written from a 4 KiB-aligned buffer that starts with the segment's last partial block
//!   (its bytes written again, unchanged) and ends zero-padded to a whole block. That takes the
//!   copy into the page cache (and the page allocations behind it) off the acknowledgement
//!   path: on the 2-vCPU benchmark VM, buffered `write` + `fdatasync` of 512 KiB cost 0.9–2.6
//!   ns of CPU per byte, direct 0.2 (docs/benchmarks.md). The padding past the durable end is
//!   never read: readers stop at each segment's durable length, a rolled segment is cut to
//!   its length, and recovery cuts it like any torn tail. Where direct I/O is refused
//!   (tmpfs, some network file systems), plain appends are used.
//! * On open, the last segment is scanned and cut at the first record that is short or fails its
//!   CRC (a torn tail from a crash). Nothing past it was ever acknowledged, because
//!   acknowledgement follows the fsync.
//! * A failed write or fsync poisons the log: after a failed fsync the kernel may have dropped
//!   the dirty pages, so retrying could acknowledge data that is not on disk. Appends then fail
//!   (503 to clients) until the gateway restarts and recovers from what is really on disk.
//! * Consumers keep their progress in `consumers/<name>.offset` (every offset below it is
//!   acknowledged), saved atomically every 200 ms of acks, on `commit` and on drop.
//! * A lock file keeps a second process from opening the same log.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prost::Message;
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    AckHandle, Appended, Bus, BusBatch, BusError, BusHealth, Consumer, Delivery, Position,
    SeenClientId, Tail, decode_batch,
};

const MAGIC: u8 = 0xB5;
const HEADER_LEN: usize = 1 + 4 + 4 + 8;
/// Largest record body accepted when reading; anything longer is a torn or corrupt header.
const MAX_RECORD: usize = 1 << 30;
/// Most bytes one group commit writes before it fsyncs.
const MAX_GROUP_BYTES: usize = 16 << 20;
const COMMIT_EVERY: Duration = Duration::from_millis(200);

/// Tuning of the local log.
#[derive(Debug, Clone)]
pub struct LocalBusOptions {
    pub segment_bytes: u64,
    /// Write with `O_DIRECT` where the file system allows it (see the module doc).
    pub direct_io: bool,
    /// Consumers read segments the writer has rolled (a backlog) at background priority
    /// (`crate::priority::lower_for_a_while`); the active segment is always read at normal
    /// priority (see `LocalConsumer::next`). The gateway sets it for its own consumers
    /// (archiver, indexer), whose catching up should wait for the threads that acknowledge
    /// clients. Off by default, and off for operator tools such as `rewind bus read`: a
    /// background read can wait seconds for a CPU on a busy machine, and a tool that stops
    /// after an idle timeout would take that for an empty bus.
    pub background_reads: bool,
}

impl Default for LocalBusOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 128 << 20,
            direct_io: true,
            background_reads: false,
        }
    }
}

#[derive(Debug, Clone)]
struct Segment {
    base: Position,
    path: PathBuf,
    /// Bytes of the segment that are durable (whole records); readers never read past it.
    /// Grows after each group commit of the active segment; fixed once it is rolled.
    len: Arc<AtomicU64>,
}

use crate::paced_io::{DIRECT_ALIGN as ALIGN, open_direct};

struct AppendRequest {
    body: Vec<u8>,
    reply: oneshot::Sender<Result<Position, BusError>>,
}

struct Shared {
    dir: PathBuf,
    segments: RwLock<Vec<Segment>>,
    /// Error that poisoned the writer, if any.
    poisoned: Mutex<Option<String>>,
    /// Consumers open in this process (one per name).
    open_consumers: Mutex<HashSet<String>>,
    /// Readers use direct I/O too (`LocalBusOptions::direct_io`).
    direct_io: bool,
    /// `LocalBusOptions::background_reads`.
    background_reads: bool,
}

/// The embedded, file-backed bus.
pub struct LocalBus {
    shared: Arc<Shared>,
    sender: Mutex<Option<mpsc::UnboundedSender<AppendRequest>>>,
    /// Offset of the next record: every record below it is durable.
    durable: watch::Receiver<Position>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    _lock: File,
}

fn segment_path(dir: &Path, base: Position) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> BusError {
    BusError::Unavailable(format!("{what} {}: {e}", path.display()))
}

fn list_segments(dir: &Path) -> Result<Vec<Segment>, BusError> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_err("cannot list", dir, e))? {
        let entry = entry.map_err(|e| io_err("cannot list", dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(base) = name
            .strip_suffix(".log")
            .and_then(|b| b.parse::<u64>().ok())
        {
            let len = entry
                .metadata()
                .map_err(|e| io_err("cannot stat", &entry.path(), e))?
                .len();
            segments.push(Segment {
                base,
                path: entry.path(),
                len: Arc::new(AtomicU64::new(len)),
            });
        }
    }
    segments.sort_by_key(|s| s.base);
    Ok(segments)
}

/// A reader of records: appends a record's body to a fresh buffer.
trait ReadBody: Read {
    /// Appends exactly `n` bytes to `out`. By default the buffer is filled with zeros first,
    /// then read into.
    fn read_body(&mut self, out: &mut Vec<u8>, n: usize) -> std::io::Result<()> {
        let start = out.len();
        // Not `vec![0; len]`: jemalloc zeroes a large calloc'ed block of reused memory by
        // handing its pages back to the kernel (`MADV_DONTNEED`), so every page of every
        // record was faulted in anew (about half the archiver's page faults, each costly
        // on a VM); filling a plain allocation keeps the pages it reuses.
        out.resize(start + n, 0);
        self.read_exact(&mut out[start..])
    }
}

impl ReadBody for BufReader<&File> {}
impl ReadBody for BufReader<File> {}

impl ReadBody for BufReader<Durable> {
    /// What the buffer holds, then straight from the direct-I/O window: the body is written
    /// once, not zeroed and then copied over (the zeroing was 2 % of the archiver's CPU).
    fn read_body(&mut self, out: &mut Vec<u8>, n: usize) -> std::io::Result<()> {
        let buffered = self.buffer().len().min(n);
        out.extend_from_slice(&self.buffer()[..buffered]);
        std::io::BufRead::consume(self, buffered);
        self.get_mut().append(out, n - buffered)
    }
}

/// Reads one record at the reader's position. `Ok(None)` at a clean end of file; `Err` with a
/// reason when the bytes there are not a whole, valid record.
fn read_record<R: ReadBody>(reader: &mut R) -> Result<Option<(Position, Vec<u8>)>, String> {
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match reader.read(&mut header[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(format!("short header ({filled} of {HEADER_LEN} bytes)")),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    if header[0] != MAGIC {
        return Err(format!("bad magic byte {:#x}", header[0]));
    }
    let len = u32::from_le_bytes(header[1..5].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[5..9].try_into().expect("4 bytes"));
    let offset = u64::from_le_bytes(header[9..17].try_into().expect("8 bytes"));
    if len > MAX_RECORD {
        return Err(format!("record length {len} is implausible"));
    }
    let mut body = Vec::with_capacity(len);
    reader
        .read_body(&mut body, len)
        .map_err(|e| format!("short body ({e})"))?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[9..17]);
    hasher.update(&body);
    if hasher.finalize() != crc {
        return Err("CRC mismatch".into());
    }
    Ok(Some((offset, body)))
}

fn encode_record(out: &mut Vec<u8>, offset: Position, body: &[u8]) {
    let offset_bytes = offset.to_le_bytes();
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&offset_bytes);
    hasher.update(body);
    out.push(MAGIC);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&hasher.finalize().to_le_bytes());
    out.extend_from_slice(&offset_bytes);
    out.extend_from_slice(body);
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Scans the last segment, cuts a torn tail, and returns the next offset and the file length.
fn recover_tail(segment: &Segment) -> Result<(Position, u64), BusError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&segment.path)
        .map_err(|e| io_err("cannot open", &segment.path, e))?;
    let total = file
        .metadata()
        .map_err(|e| io_err("cannot stat", &segment.path, e))?
        .len();
    let mut reader = BufReader::with_capacity(1 << 20, &file);
    let mut next = segment.base;
    let mut good_len = 0u64;
    loop {
        match read_record(&mut reader) {
            Ok(None) => break,
            Ok(Some((offset, body))) => {
                if offset != next {
                    tracing::warn!(segment = %segment.path.display(), expected = next, found = offset,
                        "record out of sequence; treating the rest of the segment as a torn tail");
                    break;
                }
                next += 1;
                good_len += (HEADER_LEN + body.len()) as u64;
            }
            Err(reason) => {
                tracing::warn!(segment = %segment.path.display(), at = good_len, %reason,
                    "torn tail in the bus log; cutting it (it was never acknowledged)");
                break;
            }
        }
    }
    drop(reader);
    if good_len < total {
        tracing::warn!(segment = %segment.path.display(), dropped_bytes = total - good_len, "truncating bus log");
        file.set_len(good_len)
            .map_err(|e| io_err("cannot truncate", &segment.path, e))?;
        file.sync_all()
            .map_err(|e| io_err("cannot sync", &segment.path, e))?;
    }
    Ok((next, good_len))
}

impl LocalBus {
    /// Opens (creating if needed) the log in `dir`, recovering from a crash.
    pub fn open(dir: &Path, options: LocalBusOptions) -> Result<Self, BusError> {
        std::fs::create_dir_all(dir.join("consumers"))
            .map_err(|e| io_err("cannot create", dir, e))?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_err("cannot open", &lock_path, e))?;
        lock.try_lock().map_err(|_| {
            BusError::Unavailable(format!(
                "the bus log in {} is in use by another process (a running gateway?); stop it first",
                dir.display()
            ))
        })?;

        let mut segments = list_segments(dir)?;
        if segments.is_empty() {
            let path = segment_path(dir, 0);
            File::create(&path).map_err(|e| io_err("cannot create", &path, e))?;
            sync_dir(dir).map_err(|e| io_err("cannot sync", dir, e))?;
            segments.push(Segment {
                base: 0,
                path,
                len: Arc::new(AtomicU64::new(0)),
            });
        }
        let last = segments.last().expect("one segment").clone();
        let (next, len) = recover_tail(&last)?;
        last.len.store(len, Ordering::Release);
        tracing::info!(dir = %dir.display(), segments = segments.len(), next_offset = next, "bus log opened");

        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            segments: RwLock::new(segments),
            poisoned: Mutex::new(None),
            open_consumers: Mutex::new(HashSet::new()),
            direct_io: options.direct_io,
            background_reads: options.background_reads,
        });
        let (durable_tx, durable_rx) = watch::channel(next);
        let (tx, rx) = mpsc::unbounded_channel();
        let (file, direct) = open_for_append(&last.path, options.direct_io)
            .map_err(|e| io_err("cannot open", &last.path, e))?;
        if options.direct_io && !direct {
            tracing::info!(dir = %dir.display(), "the file system refuses direct I/O; the bus log uses buffered appends");
        }
        let tail = if direct {
            read_partial_block(&last.path, len).map_err(|e| io_err("cannot read", &last.path, e))?
        } else {
            Vec::new()
        };
        let writer = Writer {
            shared: shared.clone(),
            file,
            direct,
            tail,
            file_len: len,
            segment_len: last.len.clone(),
            next,
            segment_bytes: options.segment_bytes,
            durable: durable_tx,
        };
        let handle = std::thread::Builder::new()
            .name("rewind-bus-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| BusError::Unavailable(format!("cannot start the bus writer: {e}")))?;
        Ok(Self {
            shared,
            sender: Mutex::new(Some(tx)),
            durable: durable_rx,
            writer: Mutex::new(Some(handle)),
            _lock: lock,
        })
    }

    /// Deletes closed segments that every consumer (every offset file in `consumers/`) has
    /// committed past and that were last written before `older_than`. With no consumer at
    /// all, nothing goes. Returns how many segments were deleted.
    pub fn apply_retention(&self, older_than: std::time::SystemTime) -> Result<usize, BusError> {
        let dir = self.shared.dir.join("consumers");
        let mut min_committed: Option<Position> = None;
        for entry in std::fs::read_dir(&dir).map_err(|e| io_err("cannot list", &dir, e))? {
            let entry = entry.map_err(|e| io_err("cannot list", &dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(consumer) = name.strip_suffix(".offset") else {
                continue;
            };
            let committed = self.read_committed(consumer)?;
            min_committed = Some(min_committed.map_or(committed, |m| m.min(committed)));
        }
        let Some(min_committed) = min_committed else {
            return Ok(0);
        };
        let doomed: Vec<Segment> = {
            let mut segments = self.shared.segments.write().expect("lock");
            let mut doomed = Vec::new();
            // Never the last (active) segment; only a prefix, so the kept ones stay contiguous.
            while segments.len() > 1 {
                let end = segments[1].base;
                let old_enough = std::fs::metadata(&segments[0].path)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t < older_than);
                if end <= min_committed && old_enough {
                    doomed.push(segments.remove(0));
                } else {
                    break;
                }
            }
            doomed
        };
        for seg in &doomed {
            std::fs::remove_file(&seg.path).map_err(|e| io_err("cannot delete", &seg.path, e))?;
            tracing::info!(segment = %seg.path.display(), "bus segment removed by retention");
        }
        Ok(doomed.len())
    }

    /// Deletes a durable consumer's saved position (it must not be open); returns where it
    /// was. A consumer opened later under that name starts at the oldest record kept.
    pub fn forget_consumer(&self, name: &str) -> Result<Position, BusError> {
        if self
            .shared
            .open_consumers
            .lock()
            .expect("lock")
            .contains(name)
        {
            return Err(BusError::ConsumerBusy(name.into()));
        }
        let path = self.consumer_offset_path(name);
        if !path.exists() {
            return Err(BusError::Rejected(format!(
                "the bus has no consumer named {name:?} (no {})",
                path.display()
            )));
        }
        let position = self.read_committed(name)?;
        std::fs::remove_file(&path).map_err(|e| io_err("cannot delete", &path, e))?;
        Ok(position)
    }

    /// Offset of the next record to be written; every lower offset is durable.
    pub fn durable_head(&self) -> Position {
        *self.durable.borrow()
    }

    fn consumer_offset_path(&self, name: &str) -> PathBuf {
        self.shared
            .dir
            .join("consumers")
            .join(format!("{name}.offset"))
    }

    fn read_committed(&self, name: &str) -> Result<Position, BusError> {
        let path = self.consumer_offset_path(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse().map_err(|_| {
                BusError::Unavailable(format!(
                    "consumer offset file {} is corrupt",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io_err("cannot read", &path, e)),
        }
    }
}

/// Opens a segment for the writer: with `O_DIRECT` where the file system takes it (then
/// writes are positioned, `true`) when `direct` asks for it, else for plain appends (`false`).
fn open_for_append(path: &Path, direct: bool) -> std::io::Result<(File, bool)> {
    if direct && let Some(file) = open_direct(OpenOptions::new().write(true), path)? {
        return Ok((file, true));
    }
    Ok((OpenOptions::new().append(true).open(path)?, false))
}

/// The bytes of the last, partial [`ALIGN`] block of a file `len` bytes long (a direct write
/// starts at the block's beginning and writes them again).
fn read_partial_block(path: &Path, len: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let partial = (len % ALIGN as u64) as usize;
    let mut tail = vec![0u8; partial];
    File::open(path)?.read_exact_at(&mut tail, len - partial as u64)?;
    Ok(tail)
}

struct Writer {
    shared: Arc<Shared>,
    file: File,
    /// `file` was opened with `O_DIRECT`: writes are whole aligned blocks at `block_start`.
    direct: bool,
    /// With `direct`: the bytes of the last partial block (`file_len % ALIGN` of them).
    tail: Vec<u8>,
    /// Durable bytes in the active segment (the file may hold zero padding past it).
    file_len: u64,
    /// The active segment's published durable length, for readers.
    segment_len: Arc<AtomicU64>,
    next: Position,
    segment_bytes: u64,
    durable: watch::Sender<Position>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<AppendRequest>) {
        let mut buf = Vec::with_capacity(1 << 20);
        while let Some(first) = rx.blocking_recv() {
            let mut group = vec![first];
            let mut bytes = group[0].body.len();
            while bytes < MAX_GROUP_BYTES {
                match rx.try_recv() {
                    Ok(req) => {
                        bytes += req.body.len();
                        group.push(req);
                    }
                    Err(_) => break,
                }
            }
            if let Some(reason) = self.shared.poisoned.lock().expect("lock").clone() {
                for req in group {
                    let _ = req.reply.send(Err(BusError::Unavailable(reason.clone())));
                }
                continue;
            }
            match self.write_group(&mut buf, &group) {
                Ok(first_offset) => {
                    self.durable.send_replace(self.next);
                    for (i, req) in group.into_iter().enumerate() {
                        let _ = req.reply.send(Ok(first_offset + i as u64));
                    }
                }
                Err(reason) => {
                    tracing::error!(%reason, "bus log write failed; refusing further appends until restart");
                    *self.shared.poisoned.lock().expect("lock") = Some(format!(
                        "the local log could not be written ({reason}); fix the disk and restart the gateway"
                    ));
                    for req in group {
                        let _ = req.reply.send(Err(BusError::Unavailable(reason.clone())));
                    }
                }
            }
        }
        // Cut the padding of the last direct write, so that the file ends at its last record.
        if self.direct
            && let Err(e) = self.file.set_len(self.file_len)
        {
            tracing::error!(error = %e, "cannot cut the bus log's padding (recovery will)");
        }
        if let Err(e) = self.file.sync_all() {
            tracing::error!(error = %e, "final bus log sync failed");
        }
    }

    fn write_group(
        &mut self,
        buf: &mut Vec<u8>,
        group: &[AppendRequest],
    ) -> Result<Position, String> {
        if self.file_len >= self.segment_bytes {
            self.roll()
                .map_err(|e| format!("cannot start a new segment: {e}"))?;
        }
        let first = self.next;
        let records: usize = group.iter().map(|r| HEADER_LEN + r.body.len()).sum();
        let written = if self.direct {
            // [lead: up to the first aligned address][tail][records][zeros to a whole block]
            let need = ALIGN + self.tail.len() + records + ALIGN;
            if buf.capacity() < need {
                *buf = Vec::with_capacity(need.max(1 << 20));
            }
            buf.clear();
            let lead = buf.as_ptr().align_offset(ALIGN);
            if lead >= ALIGN {
                return Err("cannot align the write buffer".into());
            }
            buf.resize(lead, 0);
            buf.extend_from_slice(&self.tail);
            for (i, req) in group.iter().enumerate() {
                encode_record(buf, first + i as u64, &req.body);
            }
            let data = buf.len() - lead;
            buf.resize(lead + data.div_ceil(ALIGN) * ALIGN, 0);
            let block_start = self.file_len - self.tail.len() as u64;
            match std::os::unix::fs::FileExt::write_all_at(&self.file, &buf[lead..], block_start) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // Some file systems take O_DIRECT at open and refuse the writes.
                    tracing::warn!(error = %e, "direct writes refused; the bus log switches to buffered appends");
                    self.leave_direct_io().map_err(|e| e.to_string())?;
                    return self.write_group(buf, group);
                }
                Err(e) => return Err(e.to_string()),
            }
            let whole = data / ALIGN * ALIGN;
            self.tail.clear();
            self.tail.extend_from_slice(&buf[lead + whole..lead + data]);
            records
        } else {
            buf.clear();
            for (i, req) in group.iter().enumerate() {
                encode_record(buf, first + i as u64, &req.body);
            }
            self.file.write_all(buf).map_err(|e| e.to_string())?;
            buf.len()
        };
        self.file.sync_data().map_err(|e| e.to_string())?;
        self.file_len += written as u64;
        self.segment_len.store(self.file_len, Ordering::Release);
        self.next += group.len() as u64;
        if buf.capacity() > 4 * MAX_GROUP_BYTES {
            *buf = Vec::with_capacity(1 << 20);
        }
        Ok(first)
    }

    /// Leaves direct I/O for the rest of this process: cuts any padding and reopens the active
    /// segment for plain appends.
    fn leave_direct_io(&mut self) -> std::io::Result<()> {
        self.file.set_len(self.file_len)?;
        let path = segment_path(&self.shared.dir, self.segment_base());
        self.file = OpenOptions::new().append(true).open(path)?;
        self.direct = false;
        self.tail.clear();
        Ok(())
    }

    fn segment_base(&self) -> Position {
        self.shared
            .segments
            .read()
            .expect("lock")
            .last()
            .map_or(0, |s| s.base)
    }

    fn roll(&mut self) -> std::io::Result<()> {
        let path = segment_path(&self.shared.dir, self.next);
        // A closed segment ends at its last record (no padding), and is on disk before the
        // next one exists: recovery only ever looks at the last segment.
        if self.direct {
            self.file.set_len(self.file_len)?;
        }
        self.file.sync_all()?;
        File::create_new(&path)?;
        sync_dir(&self.shared.dir)?;
        let (file, direct) = open_for_append(&path, self.direct)?;
        self.file = file;
        self.direct = direct;
        self.tail.clear();
        self.file_len = 0;
        self.segment_len = Arc::new(AtomicU64::new(0));
        self.shared.segments.write().expect("lock").push(Segment {
            base: self.next,
            path,
            len: self.segment_len.clone(),
        });
        Ok(())
    }
}

/// Bytes a direct read asks for at a time.
const DIRECT_READ: usize = 1 << 20;

/// What a [`LogReader`] reads through: a segment's file, never past its durable length (the
/// file may hold a direct write's zero padding, or bytes of a group not yet synced).
///
/// With direct I/O the segment is read with `O_DIRECT` into a reused aligned buffer, a
/// megabyte at a time: records the writer wrote with direct I/O are not in the page cache,
/// and reading them through it would allocate and fill a fresh page for every 4 KiB read
/// (the archiver spent ~16 % more CPU per event that way than reading from the page cache).
/// Bytes of the buffer at or past the durable length seen when it was filled are never
/// served: they may be padding, or older than what the writer has put there since.
struct Durable {
    file: File,
    at: u64,
    len: Arc<AtomicU64>,
    direct: Option<DirectBuf>,
}

struct DirectBuf {
    /// `DIRECT_READ + ALIGN` bytes; the aligned window starts at `lead`.
    mem: Vec<u8>,
    lead: usize,
    /// File offset of the window's first byte, and the end of what it may serve.
    start: u64,
    end: u64,
}

impl Durable {
    fn open(path: &Path, len: Arc<AtomicU64>, direct: bool) -> std::io::Result<Self> {
        if direct && let Some(file) = open_direct(OpenOptions::new().read(true), path)? {
            let mem = vec![0u8; DIRECT_READ + ALIGN];
            let lead = mem.as_ptr().align_offset(ALIGN);
            if lead < ALIGN {
                return Ok(Self {
                    file,
                    at: 0,
                    len,
                    direct: Some(DirectBuf {
                        mem,
                        lead,
                        start: 0,
                        end: 0,
                    }),
                });
            }
        }
        Ok(Self {
            file: File::open(path)?,
            at: 0,
            len,
            direct: None,
        })
    }
}

impl Durable {
    /// The bytes the direct-I/O window holds from `self.at` on (refilled when it does not
    /// hold that offset), at most up to `durable`; empty at the durable end. `None` when
    /// reads are not direct, or stopped being (the file system refused the flag).
    fn window(&mut self, durable: u64) -> std::io::Result<Option<&[u8]>> {
        if !self.fill(durable)? {
            return Ok(None);
        }
        let d = self.direct.as_ref().expect("direct reads");
        if !(d.start..d.end).contains(&self.at) {
            return Ok(Some(&[]));
        }
        let from = (self.at - d.start) as usize;
        let n = (d.end.min(durable) - self.at) as usize;
        Ok(Some(&d.mem[d.lead + from..d.lead + from + n]))
    }

    /// Refills the window when it does not hold `self.at`; false when reads are not direct.
    fn fill(&mut self, durable: u64) -> std::io::Result<bool> {
        use std::os::unix::fs::FileExt;
        let Some(d) = &mut self.direct else {
            return Ok(false);
        };
        if !(d.start..d.end).contains(&self.at) {
            let block = self.at / ALIGN as u64 * ALIGN as u64;
            let window = &mut d.mem[d.lead..d.lead + DIRECT_READ];
            let n = match self.file.read_at(window, block) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // Refused after all (some file systems take the flag at open only).
                    self.direct = None;
                    return Ok(false);
                }
                Err(e) => return Err(e),
            };
            d.start = block;
            d.end = (block + n as u64).min(durable);
        }
        Ok(true)
    }

    /// Appends exactly `n` bytes from `self.at` on to `out`.
    fn append(&mut self, out: &mut Vec<u8>, mut n: usize) -> std::io::Result<()> {
        while n > 0 {
            let durable = self.len.load(Ordering::Acquire);
            let take = match self.window(durable)? {
                Some(w) if !w.is_empty() => {
                    let take = n.min(w.len());
                    out.extend_from_slice(&w[..take]);
                    take
                }
                Some(_) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                None => {
                    let start = out.len();
                    out.resize(start + n, 0);
                    return self.read_exact(&mut out[start..]);
                }
            };
            self.at += take as u64;
            n -= take;
        }
        Ok(())
    }
}

impl Read for Durable {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let durable = self.len.load(Ordering::Acquire);
        let left = durable.saturating_sub(self.at);
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = match self.window(durable)? {
            Some(w) => {
                let n = want.min(w.len());
                buf[..n].copy_from_slice(&w[..n]);
                n
            }
            None => self.file.read_at(&mut buf[..want], self.at)?,
        };
        self.at += n as u64;
        Ok(n)
    }
}

/// Sequential reader over the segments, starting at any offset.
struct LogReader {
    shared: Arc<Shared>,
    next: Position,
    /// The open segment (by base offset: retention may remove earlier segments meanwhile).
    current: Option<(Position, BufReader<Durable>)>,
}

impl LogReader {
    fn new(shared: Arc<Shared>, start: Position) -> Self {
        Self {
            shared,
            next: start,
            current: None,
        }
    }

    /// Opens the segment holding `self.next` and skips to it.
    fn open_at_next(&mut self, segments: &[Segment]) -> Result<(), BusError> {
        if let Some(first) = segments.first()
            && self.next < first.base
        {
            // Removed by retention (every consumer had passed it): a reader starting there
            // (a new consumer) begins with the oldest record still kept.
            tracing::info!(
                from = self.next,
                to = first.base,
                "bus records before the oldest kept segment were removed by retention; starting at the oldest kept"
            );
            self.next = first.base;
        }
        let index = segments
            .iter()
            .rposition(|s| s.base <= self.next)
            .ok_or_else(|| BusError::Corrupt {
                position: self.next,
                detail: "no segment holds this offset".into(),
            })?;
        let seg = &segments[index];
        let durable = Durable::open(&seg.path, seg.len.clone(), self.shared.direct_io)
            .map_err(|e| io_err("cannot open", &seg.path, e))?;
        // Direct reads keep a buffer of their own: a second one would only copy.
        let capacity = if durable.direct.is_some() {
            HEADER_LEN
        } else {
            256 << 10
        };
        let mut reader = BufReader::with_capacity(capacity, durable);
        let mut at = seg.base;
        while at < self.next {
            match read_record(&mut reader) {
                Ok(Some(_)) => at += 1,
                Ok(None) | Err(_) => {
                    return Err(BusError::Corrupt {
                        position: at,
                        detail: format!(
                            "cannot skip to offset {} in {}",
                            self.next,
                            seg.path.display()
                        ),
                    });
                }
            }
        }
        self.current = Some((seg.base, reader));
        Ok(())
    }

    /// Reads records from `self.next` up to (not including) `limit`, at most `max` of them.
    /// Reads records below `limit`: at most `max` of them, and stops once `max_bytes` have
    /// been read (at least one record is always returned when one is there).
    fn read(
        &mut self,
        limit: Position,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<(Position, Vec<u8>)>, BusError> {
        let segments = self.shared.segments.read().expect("lock").clone();
        self.read_in(&segments, limit, max, max_bytes)
    }

    /// As [`Self::read`], with the segment list taken by the caller: it must be taken after
    /// `limit` was (a segment is listed before any of its records is durable), and it lets
    /// a reader at background priority read without touching the lock the bus writer takes
    /// at every roll.
    fn read_in(
        &mut self,
        segments: &[Segment],
        limit: Position,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<(Position, Vec<u8>)>, BusError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while self.next < limit && out.len() < max && bytes < max_bytes {
            if self.current.is_none() {
                self.open_at_next(segments)?;
            }
            let (_, reader) = self.current.as_mut().expect("opened");
            match read_record(reader) {
                Ok(Some((offset, body))) => {
                    if offset != self.next {
                        return Err(BusError::Corrupt {
                            position: self.next,
                            detail: format!(
                                "found offset {offset} where {} was expected",
                                self.next
                            ),
                        });
                    }
                    self.next += 1;
                    bytes += body.len();
                    out.push((offset, body));
                }
                Ok(None) => {
                    // End of this segment: the next one must start here.
                    match segments.iter().find(|seg| seg.base == self.next) {
                        Some(_) => self.current = None,
                        None => {
                            return Err(BusError::Corrupt {
                                position: self.next,
                                detail: "segment ended before the durable head".into(),
                            });
                        }
                    }
                }
                Err(detail) => {
                    return Err(BusError::Corrupt {
                        position: self.next,
                        detail,
                    });
                }
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl Bus for LocalBus {
    fn kind(&self) -> &'static str {
        "local"
    }

    async fn append(&self, batch: &BusBatch, _message_id: &str) -> Result<Appended, BusError> {
        let (reply, rx) = oneshot::channel();
        let body = batch.encode_to_vec();
        {
            let sender = self.sender.lock().expect("lock");
            let sender = sender.as_ref().ok_or(BusError::Closed)?;
            sender
                .send(AppendRequest { body, reply })
                .map_err(|_| BusError::Closed)?;
        }
        let position = rx.await.map_err(|_| BusError::Closed)??;
        Ok(Appended {
            position,
            duplicate: false,
        })
    }

    async fn consumer(&self, name: &str) -> Result<Box<dyn Consumer>, BusError> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(BusError::Rejected(format!(
                "consumer name {name:?}: use letters, digits, '-' and '_'"
            )));
        }
        if !self
            .shared
            .open_consumers
            .lock()
            .expect("lock")
            .insert(name.to_string())
        {
            return Err(BusError::ConsumerBusy(name.into()));
        }
        // Records removed by retention cannot be read: a consumer behind them (a new one)
        // starts at the oldest record kept.
        let oldest = self
            .shared
            .segments
            .read()
            .expect("lock")
            .first()
            .map_or(0, |s| s.base);
        let committed = self.read_committed(name)?.max(oldest);
        let offset_path = self.consumer_offset_path(name);
        let new_consumer = !offset_path.exists();
        let mut consumer = LocalConsumer {
            name: name.into(),
            offset_path,
            shared: self.shared.clone(),
            reading: Arc::new(Mutex::new((
                LogReader::new(self.shared.clone(), committed),
                VecDeque::new(),
            ))),
            durable: self.durable.clone(),
            committed,
            saved: committed,
            acked: BTreeSet::new(),
            last_save: Instant::now(),
        };
        // A consumer exists from its first open: its offset file is written at once, so
        // retention keeps what it has not read and `/readyz` reports its lag before its
        // first acknowledgement.
        if new_consumer {
            consumer.saved = Position::MAX;
            if let Err(e) = consumer.save() {
                self.shared
                    .open_consumers
                    .lock()
                    .expect("lock")
                    .remove(name);
                return Err(e);
            }
        }
        Ok(Box::new(consumer))
    }

    async fn health(&self) -> BusHealth {
        let poisoned = self.shared.poisoned.lock().expect("lock").clone();
        let head = self.durable_head();
        let mut consumer_lag = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.shared.dir.join("consumers")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if let Some(name) = name.strip_suffix(".offset")
                    && let Ok(committed) = self.read_committed(name)
                {
                    consumer_lag.push((name.to_string(), head.saturating_sub(committed)));
                }
            }
        }
        consumer_lag.sort();
        BusHealth {
            kind: "local",
            ready: poisoned.is_none() && self.sender.lock().expect("lock").is_some(),
            detail: poisoned
                .unwrap_or_else(|| format!("{} messages in {}", head, self.shared.dir.display())),
            consumer_lag,
        }
    }

    async fn retain_before(&self, older_than: std::time::SystemTime) -> Result<usize, BusError> {
        self.apply_retention(older_than)
    }

    async fn recent_client_ids(&self, since_micros: i64) -> Result<Vec<SeenClientId>, BusError> {
        // Only segments written to since the window began can hold such events.
        let since = std::time::UNIX_EPOCH + Duration::from_micros(since_micros.max(0) as u64);
        let segments = self.shared.segments.read().expect("lock").clone();
        let start = segments
            .iter()
            .find(|s| {
                std::fs::metadata(&s.path)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t >= since)
            })
            .map(|s| s.base);
        let Some(start) = start else {
            return Ok(Vec::new());
        };
        let shared = self.shared.clone();
        let limit = self.durable_head();
        tokio::task::spawn_blocking(move || {
            let mut reader = LogReader::new(shared, start);
            let mut seen = Vec::new();
            loop {
                let records = reader.read(limit, 1024, READ_AHEAD_BYTES)?;
                if records.is_empty() {
                    return Ok(seen);
                }
                for (position, body) in records {
                    let batch = decode_batch(position, body.into())?;
                    for event in batch.events {
                        if !event.client_id.is_empty() && event.received_at_micros >= since_micros {
                            seen.push(SeenClientId {
                                team_id: batch.team_id.clone(),
                                collection_id: batch.collection_id.clone(),
                                client_id: event.client_id,
                                event_id: event.id,
                                received_at_micros: event.received_at_micros,
                            });
                        }
                    }
                }
            }
        })
        .await
        .map_err(|e| BusError::Unavailable(e.to_string()))?
    }

    async fn tail(&self, team_id: &str, collection_id: &str) -> Result<Box<dyn Tail>, BusError> {
        let head = self.durable_head();
        Ok(Box::new(LocalTail {
            reading: Arc::new(Mutex::new((
                LogReader::new(self.shared.clone(), head),
                VecDeque::new(),
            ))),
            durable: self.durable.clone(),
            team_id: team_id.to_string(),
            collection_id: collection_id.to_string(),
        }))
    }

    async fn close(&self) {
        // Dropping the sender lets the writer finish what is queued, sync and exit.
        self.sender.lock().expect("lock").take();
        let handle = self.writer.lock().expect("lock").take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

/// A reader and the records it read that `next` has not handed out yet.
type ReaderAndBuffer = (LogReader, VecDeque<(Position, Vec<u8>)>);

/// How much a consumer reads ahead of what it has handed out.
const READ_AHEAD_BYTES: usize = 4 << 20;

/// A reader from the durable head on, keeping only one collection's batches.
struct LocalTail {
    reading: Arc<Mutex<ReaderAndBuffer>>,
    durable: watch::Receiver<Position>,
    team_id: String,
    collection_id: String,
}

#[async_trait]
impl Tail for LocalTail {
    async fn next(&mut self) -> Result<BusBatch, BusError> {
        loop {
            let (next_offset, popped) = {
                let mut reading = self.reading.lock().expect("lock");
                let popped = reading.1.pop_front();
                (reading.0.next, popped)
            };
            if let Some((position, body)) = popped {
                let batch = decode_batch(position, body.into())?;
                if batch.team_id == self.team_id && batch.collection_id == self.collection_id {
                    return Ok(batch);
                }
                continue;
            }
            let head = *self.durable.borrow_and_update();
            if head <= next_offset {
                self.durable.changed().await.map_err(|_| BusError::Closed)?;
                continue;
            }
            let reading = self.reading.clone();
            tokio::task::spawn_blocking(move || {
                let mut reading = reading.lock().expect("lock");
                let records = reading.0.read(head, 512, READ_AHEAD_BYTES)?;
                reading.1.extend(records);
                Ok::<_, BusError>(())
            })
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))??;
        }
    }
}

struct LocalConsumer {
    name: String,
    offset_path: PathBuf,
    shared: Arc<Shared>,
    /// The reader and what it has read but not yet handed out, shared with the blocking read
    /// task: if `next` is cancelled (a `select!` elsewhere won), the task still finishes and
    /// its records wait here, so cancelling `next` never loses a message.
    reading: Arc<Mutex<ReaderAndBuffer>>,
    durable: watch::Receiver<Position>,
    /// Every offset below this is acknowledged.
    committed: Position,
    /// What the offset file says.
    saved: Position,
    /// Acknowledged offsets above `committed` (acks may arrive out of order).
    acked: BTreeSet<Position>,
    last_save: Instant,
}

impl LocalConsumer {
    fn save(&mut self) -> Result<(), BusError> {
        if self.saved == self.committed {
            return Ok(());
        }
        let tmp = self.offset_path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(self.committed.to_string().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.offset_path)?;
            Ok(())
        };
        write().map_err(|e| io_err("cannot save consumer offset", &self.offset_path, e))?;
        self.saved = self.committed;
        self.last_save = Instant::now();
        Ok(())
    }
}

#[async_trait]
impl Consumer for LocalConsumer {
    async fn next(&mut self) -> Result<Delivery, BusError> {
        loop {
            let (next_offset, popped) = {
                let mut reading = self.reading.lock().expect("lock");
                let popped = reading.1.pop_front();
                (reading.0.next, popped)
            };
            if let Some((position, body)) = popped {
                let batch = decode_batch(position, body.into())?;
                return Ok(Delivery {
                    position,
                    batch,
                    ack: AckHandle::Local(position),
                });
            }
            let head = *self.durable.borrow_and_update();
            if head <= next_offset {
                self.durable.changed().await.map_err(|_| BusError::Closed)?;
                continue;
            }
            let reading = self.reading.clone();
            tokio::task::spawn_blocking(move || {
                let mut reading = reading.lock().expect("lock");
                // The gateway's consumers (archiver, indexer) read segments the writer has
                // rolled in the background, so that catching up with a backlog waits for the
                // acknowledging threads instead of running beside them. The active segment is
                // read at normal priority: a direct read holds the file's inode lock (shared)
                // until its I/O completes and the thread runs again, and the writer's appends
                // can take that lock exclusively (ext4 does for writes that extend the file),
                // so a reader in the background there could hold up every acknowledgement
                // behind a thread that waits for an idle CPU (docs/benchmarks.md, "The
                // background reads, only for the backlog"). A read that starts in a rolled
                // segment stops where the active one begins. The segment list is taken first,
                // so that a lowered thread never holds the lock the bus writer takes at a
                // roll.
                let segments = reading.0.shared.segments.read().expect("lock").clone();
                let active_base = segments.last().map_or(0, |s| s.base);
                let catching_up = reading.0.shared.background_reads && reading.0.next < active_base;
                let limit = if catching_up {
                    head.min(active_base)
                } else {
                    head
                };
                let _background = catching_up.then(crate::priority::lower_for_a_while);
                // A backlog's records are bulk work: their buffers are allocated and freed
                // over and over while it is read, and kept in the bulk arena meanwhile
                // instead of being faulted in anew (`allocator::enter_bulk_arena`).
                let _bulk = catching_up.then(crate::allocator::enter_bulk_arena);
                // Read-ahead is bounded in bytes, not only in records: a record can be a
                // batch of thousands of events.
                let records = reading.0.read_in(&segments, limit, 512, READ_AHEAD_BYTES)?;
                reading.1.extend(records);
                Ok::<_, BusError>(())
            })
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))??;
        }
    }

    async fn ack(&mut self, delivery: Delivery) -> Result<(), BusError> {
        let AckHandle::Local(position) = delivery.ack else {
            return Err(BusError::Rejected(
                "delivery is not from the local bus".into(),
            ));
        };
        if position >= self.committed {
            self.acked.insert(position);
        }
        while self.acked.remove(&self.committed) {
            self.committed += 1;
        }
        if self.last_save.elapsed() >= COMMIT_EVERY {
            self.save()?;
        }
        Ok(())
    }

    async fn release(&mut self, delivery: Delivery) -> Result<(), BusError> {
        // Not acked, so never committed past: the reopened consumer reads it again.
        drop(delivery);
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), BusError> {
        self.save()
    }

    async fn lag(&mut self) -> Result<u64, BusError> {
        Ok(self.durable.borrow().saturating_sub(self.committed))
    }
}

impl Drop for LocalConsumer {
    fn drop(&mut self) {
        if let Err(e) = self.save() {
            tracing::warn!(consumer = %self.name, error = %e, "could not save consumer offset on close");
        }
        self.shared
            .open_consumers
            .lock()
            .expect("lock")
            .remove(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::bus::test_batch as batch;

    async fn drain(consumer: &mut Box<dyn Consumer>, n: usize) -> Vec<Delivery> {
        let mut out = Vec::new();
        while out.len() < n {
            out.push(
                tokio::time::timeout(Duration::from_secs(5), consumer.next())
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        out
    }

    #[tokio::test]
    async fn retention_deletes_only_segments_every_consumer_passed() {
        let dir = tempfile::tempdir().unwrap();
        let bus = LocalBus::open(
            dir.path(),
            LocalBusOptions {
                segment_bytes: 4096,
                ..Default::default()
            },
        )
        .unwrap();
        for i in 0..150 {
            bus.append(&batch(3, &i.to_string()), "").await.unwrap();
        }
        let segments_before = list_segments(dir.path()).unwrap().len();
        assert!(segments_before >= 4);
        let future = std::time::SystemTime::now() + Duration::from_secs(3600);
        // No consumer yet: nothing goes.
        assert_eq!(bus.apply_retention(future).unwrap(), 0);
        // A consumer at 100 and one at 40: only what both passed may go.
        let mut fast = bus.consumer("fast").await.unwrap();
        for d in drain(&mut fast, 100).await {
            fast.ack(d).await.unwrap();
        }
        fast.commit().await.unwrap();
        let mut slow = bus.consumer("slow").await.unwrap();
        for d in drain(&mut slow, 40).await {
            slow.ack(d).await.unwrap();
        }
        slow.commit().await.unwrap();
        // Too young: kept.
        let past = std::time::SystemTime::now() - Duration::from_secs(3600);
        assert_eq!(bus.apply_retention(past).unwrap(), 0);
        let removed = bus.apply_retention(future).unwrap();
        assert!(removed >= 1, "a segment below offset 40 should go");
        let kept = list_segments(dir.path()).unwrap();
        assert_eq!(kept.len(), segments_before - removed);
        assert!(
            kept[0].base <= 40,
            "the slow consumer's next record is kept"
        );
        // Both consumers go on where they were, across the deletion.
        let rest = drain(&mut slow, 110).await;
        assert_eq!(rest.first().unwrap().position, 40);
        assert_eq!(rest.last().unwrap().position, 149);
        let rest = drain(&mut fast, 50).await;
        assert_eq!(rest.first().unwrap().position, 100);
        // A new consumer starts at the oldest record kept.
        let mut fresh = bus.consumer("fresh").await.unwrap();
        let first = drain(&mut fresh, 1).await;
        assert_eq!(first[0].position, kept[0].base);
    }

    #[tokio::test]
    async fn a_backlog_read_in_the_background_is_whole_and_in_order_up_to_the_head() {
        // As the gateway's consumers read: rolled segments in the background, each read
        // stopping where the active segment begins, then the active one at normal priority.
        let dir = tempfile::tempdir().unwrap();
        let bus = LocalBus::open(
            dir.path(),
            LocalBusOptions {
                segment_bytes: 4096,
                background_reads: true,
                ..Default::default()
            },
        )
        .unwrap();
        for i in 0..200 {
            bus.append(&batch(3, &i.to_string()), "").await.unwrap();
        }
        assert!(list_segments(dir.path()).unwrap().len() >= 5);
        let mut consumer = bus.consumer("archiver").await.unwrap();
        let got = drain(&mut consumer, 200).await;
        assert_eq!(
            got.iter().map(|d| d.position).collect::<Vec<_>>(),
            (0..200).collect::<Vec<_>>()
        );
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d.batch.events.len(), 3);
            assert_eq!(d.batch.events[0].id, format!("{i}-0"));
        }
        // At the head: appended after the reader caught up, read from the active segment.
        for i in 200..210 {
            bus.append(&batch(3, &i.to_string()), "").await.unwrap();
        }
        let more = drain(&mut consumer, 10).await;
        assert_eq!(
            more.iter().map(|d| d.position).collect::<Vec<_>>(),
            (200..210).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn appends_are_read_back_in_order_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let bus = LocalBus::open(
            dir.path(),
            LocalBusOptions {
                segment_bytes: 4096,
                ..Default::default()
            },
        )
        .unwrap();
        let mut handles = Vec::new();
        let bus = Arc::new(bus);
        // Half one at a time (each its own group commit, rolling segments), half at once.
        for i in 0..100 {
            assert_eq!(
                bus.append(&batch(3, &i.to_string()), "")
                    .await
                    .unwrap()
                    .position,
                i
            );
        }
        for i in 100..200 {
            let bus = bus.clone();
            handles.push(tokio::spawn(async move {
                bus.append(&batch(3, &i.to_string()), "")
                    .await
                    .unwrap()
                    .position
            }));
        }
        let mut positions: Vec<u64> = futures::future::join_all(handles)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        positions.sort();
        assert_eq!(positions, (100..200).collect::<Vec<_>>());
        assert!(
            list_segments(dir.path()).unwrap().len() >= 3,
            "segments rolled"
        );

        let mut consumer = bus.consumer("archiver").await.unwrap();
        let got = drain(&mut consumer, 200).await;
        assert_eq!(
            got.iter().map(|d| d.position).collect::<Vec<_>>(),
            (0..200).collect::<Vec<_>>()
        );
        assert!(matches!(
            bus.consumer("archiver").await,
            Err(BusError::ConsumerBusy(_))
        ));
        // Ack the first 150 out of order; the committed offset is the contiguous prefix.
        let mut rest = Vec::new();
        for d in got.into_iter().rev() {
            if d.position < 150 {
                consumer.ack(d).await.unwrap()
            } else {
                rest.push(d)
            }
        }
        assert_eq!(consumer.lag().await.unwrap(), 50);
        drop(consumer);
        bus.close().await;
        drop(bus);

        // Reopen: the consumer resumes at 150 (the unacked are delivered again).
        let bus = LocalBus::open(
            dir.path(),
            LocalBusOptions {
                segment_bytes: 4096,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(bus.durable_head(), 200);
        let mut consumer = bus.consumer("archiver").await.unwrap();
        let again = drain(&mut consumer, 50).await;
        assert_eq!(again[0].position, 150);
        assert_eq!(again[0].batch.events.len(), 3);
        let seen = bus.recent_client_ids(0).await.unwrap();
        assert_eq!(seen.len(), 600);
    }

    /// A batch whose encoded size varies with `i` (from a few bytes to several blocks), so
    /// groups end anywhere inside an aligned block.
    fn odd_batch(i: usize) -> BusBatch {
        let mut b = batch(1 + i % 3, &"x".repeat((i * 977) % 9000));
        b.events[0].payload = vec![(i % 251) as u8; (i * 389) % 5000].into();
        for e in &mut b.events {
            e.received_at_micros = i as i64;
        }
        b
    }

    /// Appends `n` odd-sized batches starting at `from`, reading each back through a consumer
    /// right after its acknowledgement (a reader always at the durable head, as the archiver
    /// is under load), and checks every one.
    async fn append_and_follow(
        bus: &LocalBus,
        consumer: &mut Box<dyn Consumer>,
        from: usize,
        n: usize,
    ) {
        for i in from..from + n {
            let sent = odd_batch(i);
            let at = bus.append(&sent, "").await.unwrap().position;
            assert_eq!(at, i as u64);
            let got = drain(consumer, 1).await.remove(0);
            assert_eq!(got.position, at);
            assert_eq!(got.batch.events, sent.events, "record {i}");
            consumer.ack(got).await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_reader_at_the_head_sees_every_record_whole_with_and_without_direct_io() {
        for direct_io in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let options = LocalBusOptions {
                segment_bytes: 64 << 10,
                direct_io,
                // The gateway's consumers read in the background: both ways are checked.
                background_reads: direct_io,
            };
            let bus = LocalBus::open(dir.path(), options.clone()).unwrap();
            let mut consumer = bus.consumer("follower").await.unwrap();
            append_and_follow(&bus, &mut consumer, 0, 120).await;
            assert!(
                list_segments(dir.path()).unwrap().len() >= 3,
                "segments rolled"
            );
            // Rolled segments end at their last record: no padding left behind.
            for seg in list_segments(dir.path()).unwrap().iter().rev().skip(1) {
                let mut reader = BufReader::new(File::open(&seg.path).unwrap());
                while read_record(&mut reader).unwrap().is_some() {}
            }
            let active = list_segments(dir.path()).unwrap().pop().unwrap();
            let on_disk = std::fs::metadata(&active.path).unwrap().len();
            if direct_io {
                // The direct writes are whole blocks: the file runs past the durable end.
                assert_eq!(on_disk % ALIGN as u64, 0, "{on_disk}");
                assert!(
                    on_disk
                        > bus
                            .shared
                            .segments
                            .read()
                            .unwrap()
                            .last()
                            .unwrap()
                            .len
                            .load(Ordering::Acquire)
                );
            }
            drop(consumer);
            bus.close().await;
            drop(bus);
            // Closed cleanly: the padding is cut.
            let mut reader = BufReader::new(File::open(&active.path).unwrap());
            while read_record(&mut reader).unwrap().is_some() {}

            // A crash right after a direct write leaves zeros past the last record: recovery
            // cuts them, and writing (and following) goes on from the record after, in the
            // other mode too (a log written one way is read and extended the other way after
            // an upgrade or a configuration change).
            let f = OpenOptions::new().append(true).open(&active.path).unwrap();
            let len = f.metadata().unwrap().len();
            f.set_len(len.div_ceil(ALIGN as u64) * ALIGN as u64 + ALIGN as u64)
                .unwrap();
            drop(f);
            let options = LocalBusOptions {
                direct_io: !direct_io,
                ..options
            };
            let bus = LocalBus::open(dir.path(), options).unwrap();
            assert_eq!(bus.durable_head(), 120);
            let mut consumer = bus.consumer("follower").await.unwrap();
            append_and_follow(&bus, &mut consumer, 120, 40).await;
            drop(consumer);
            // A new reader from the start gets all 160, in order and whole.
            let mut all = bus.consumer("from-start").await.unwrap();
            for (i, d) in drain(&mut all, 160).await.into_iter().enumerate() {
                assert_eq!(d.position, i as u64);
                assert_eq!(
                    d.batch.events,
                    odd_batch(i).events,
                    "record {i} after reopening"
                );
            }
            bus.close().await;
        }
    }

    #[tokio::test]
    async fn recovery_cuts_a_torn_tail_and_keeps_everything_before_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let bus = LocalBus::open(dir.path(), LocalBusOptions::default()).unwrap();
            for i in 0..10 {
                bus.append(&batch(2, &i.to_string()), "").await.unwrap();
            }
            bus.close().await;
        }
        let seg = segment_path(dir.path(), 0);
        let full = std::fs::metadata(&seg).unwrap().len();
        // A crash mid-write: half a record at the end, then garbage.
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        let mut rec = Vec::new();
        encode_record(&mut rec, 10, b"never acknowledged");
        f.write_all(&rec[..rec.len() / 2]).unwrap();
        drop(f);
        let bus = LocalBus::open(dir.path(), LocalBusOptions::default()).unwrap();
        assert_eq!(bus.durable_head(), 10);
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), full);
        // And appending continues after the cut.
        assert_eq!(bus.append(&batch(1, "x"), "").await.unwrap().position, 10);
        bus.close().await;
        drop(bus);

        // A flipped bit in the last record fails its CRC: that record is cut too.
        let mut bytes = std::fs::read(&seg).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0xff;
        std::fs::write(&seg, &bytes).unwrap();
        let bus = LocalBus::open(dir.path(), LocalBusOptions::default()).unwrap();
        assert_eq!(bus.durable_head(), 10);
    }

    #[tokio::test]
    async fn cancelling_next_loses_no_message() {
        let dir = tempfile::tempdir().unwrap();
        let bus = LocalBus::open(dir.path(), LocalBusOptions::default()).unwrap();
        for i in 0..2000 {
            bus.append(&batch(1, &i.to_string()), "").await.unwrap();
        }
        let mut consumer = bus.consumer("c").await.unwrap();
        let mut got = Vec::new();
        // Most of these calls are cancelled mid-read, as a select! losing to a timer does.
        for _ in 0..5000 {
            if let Ok(Ok(d)) =
                tokio::time::timeout(Duration::from_micros(50), consumer.next()).await
            {
                got.push(d.position);
            }
        }
        while got.len() < 2000 {
            got.push(
                tokio::time::timeout(Duration::from_secs(5), consumer.next())
                    .await
                    .unwrap()
                    .unwrap()
                    .position,
            );
        }
        assert_eq!(got, (0..2000).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_second_process_cannot_open_the_same_log() {
        let dir = tempfile::tempdir().unwrap();
        let _bus = LocalBus::open(dir.path(), LocalBusOptions::default()).unwrap();
        let err = LocalBus::open(dir.path(), LocalBusOptions::default())
            .err()
            .unwrap();
        assert!(err.to_string().contains("in use"), "{err}");
    }
}
