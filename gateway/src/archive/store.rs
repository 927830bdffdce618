//! The object store the archive lives in: the local disk by default, S3 (or any S3-compatible
//! store, e.g. Garage or MinIO) for `s3://bucket/prefix`, with endpoint, region and keys from
//! the usual `AWS_*` variables (`AWS_ENDPOINT_URL` for S3-compatible stores).
//!
//! On the local disk, a file is on disk before the archiver registers it: [`SyncedLocal`]
//! syncs each object it writes, and the directories up to the archive root, before `put`
//! returns (object_store's local store leaves that to the page cache, so a power cut could
//! lose a file the manifest already lists while the bus has moved past its events). The sync
//! runs on a background thread (`crate::priority`: idle CPU and I/O class), so the write-back
//! of archive files queues behind the bus log's commits instead of in front of them.
//!
//! Where the file system takes `O_DIRECT` (Linux: ext4, xfs, …) and the object is one buffer
//! (what the archiver and compaction hand over), [`put_direct`] writes it with direct I/O
//! instead, a [`crate::paced_io::PIECE`] at a time: the bytes reach the disk without being
//! copied into the page cache (the kernel's copy into fresh cache pages was ~5 % of the
//! archiver's CPU, docs/benchmarks.md) and leave no dirty pages to write back later. Same
//! staging, create-only link and syncs as the buffered path.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use object_store::{ClientOptions, ObjectStore, RetryConfig};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use archive {location:?}: {message}")]
    Config { location: String, message: String },
}

/// Opens the archive root named by `--archive`.
pub fn open(location: &str) -> Result<Arc<dyn ObjectStore>, StoreError> {
    let err = |message: String| StoreError::Config {
        location: location.into(),
        message,
    };
    if let Some(rest) = location.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(err("name a bucket: s3://bucket/prefix".into()));
        }
        // Fail a request within about half a minute instead of object_store's three minutes
        // of retries: the archiver keeps the events and retries the whole write itself, and
        // /readyz reports the error meanwhile.
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(Duration::from_secs(60))
                    .with_connect_timeout(Duration::from_secs(5)),
            )
            .with_retry(RetryConfig {
                max_retries: 4,
                retry_timeout: Duration::from_secs(30),
                ..Default::default()
            });
        if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL") {
            builder = builder
                .with_endpoint(&endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        let s3 = builder.build().map_err(|e| err(format!("{e}; set AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for S3-compatible stores)")))?;
        let prefix = prefix.trim_matches('/');
        return Ok(if prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(PrefixStore::new(s3, prefix))
        });
    }
    let dir = location.strip_prefix("file://").unwrap_or(location);
    std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create the directory: {e}")))?;
    let local = LocalFileSystem::new_with_prefix(dir).map_err(|e| err(e.to_string()))?;
    let root = std::fs::canonicalize(dir).map_err(|e| err(e.to_string()))?;
    Ok(Arc::new(SyncedLocal { inner: local, root }))
}

/// The local-disk store with every `put` synced to disk before it returns (see the module
/// doc). Multipart uploads (not used by the archive) are passed through unsynced.
#[derive(Debug)]
pub struct SyncedLocal {
    inner: LocalFileSystem,
    root: PathBuf,
}

impl std::fmt::Display for SyncedLocal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SyncedLocal({})", self.root.display())
    }
}

/// Syncs `file`, then each directory from its parent up to and including `root` (a new
/// object may have created every one of them).
fn sync_up_to(file: &std::path::Path, root: &std::path::Path) -> std::io::Result<()> {
    // In pieces: the bus's fsyncs on the same disk would otherwise wait for the whole file.
    crate::paced_io::sync_all(&std::fs::File::open(file)?)?;
    sync_dirs_up_to(file.parent(), root)
}

/// Syncs each directory from `dir` up to and including `root`.
fn sync_dirs_up_to(dir: Option<&std::path::Path>, root: &std::path::Path) -> std::io::Result<()> {
    let mut dir = dir;
    while let Some(d) = dir {
        std::fs::File::open(d)?.sync_all()?;
        if d == root || !d.starts_with(root) {
            break;
        }
        dir = d.parent();
    }
    Ok(())
}

use crate::paced_io::{DIRECT_ALIGN, open_direct};

/// A block-aligned buffer of up to a [`crate::paced_io::PIECE`] for [`put_direct`], kept
/// between objects (each is written on a new thread) so that its pages stay mapped.
struct Bounce(Vec<u8>);

static BOUNCE: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

impl Bounce {
    fn take() -> Self {
        let pooled = BOUNCE.lock().map(|mut p| p.pop()).unwrap_or(None);
        Self(pooled.unwrap_or_else(|| vec![0u8; crate::paced_io::PIECE as usize + DIRECT_ALIGN]))
    }

    /// The first `len` (at most a piece) bytes from the first block boundary of the buffer.
    fn aligned(&mut self, len: usize) -> &mut [u8] {
        let lead = self.0.as_ptr().align_offset(DIRECT_ALIGN);
        &mut self.0[lead..lead + len]
    }

    /// Returns the buffer to the pool (at most two are kept).
    fn give_back(self) {
        if let Ok(mut pool) = BOUNCE.lock()
            && pool.len() < 2
        {
            pool.push(self.0);
        }
    }
}

/// How [`put_direct`] ended.
#[derive(Debug)]
enum Direct {
    /// Written, synced and in place: the new file's metadata.
    Done(std::fs::Metadata),
    /// The file already exists (create-only).
    Exists,
    /// Not written with direct I/O (the file system refuses it, or the object is under one
    /// block): nothing was left behind, use the buffered path.
    Unsupported,
}

/// Writes `data` to `path` with direct I/O: into a staging file beside it (`<path>#<n>`, the
/// names object_store's local store uses, which its listings skip), a piece at a time, the
/// last partial block padded and the file cut back to size, `fsync`ed; then linked into
/// place (`create_only`: fails if `path` exists) or renamed over it, and the directories up
/// to `root` synced.
fn put_direct(
    path: &std::path::Path,
    data: &[u8],
    create_only: bool,
    root: &std::path::Path,
) -> std::io::Result<Direct> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::FileExt;
        if data.len() < DIRECT_ALIGN {
            return Ok(Direct::Unsupported);
        }
        let mut n = 1u32;
        let mut made_dirs = false;
        let (file, staging) = loop {
            let mut staging = path.as_os_str().to_owned();
            staging.push(format!("#{n}"));
            let staging = PathBuf::from(staging);
            match open_direct(
                std::fs::OpenOptions::new().write(true).create_new(true),
                &staging,
            ) {
                Ok(Some(f)) => break (f, staging),
                Ok(None) => return Ok(Direct::Unsupported),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !made_dirs => {
                    std::fs::create_dir_all(path.parent().unwrap_or(root))?;
                    made_dirs = true;
                }
                Err(e) => return Err(e),
            }
        };
        let written = (|| {
            // Direct I/O wants the memory block-aligned too; the allocator does not align
            // large buffers to pages (jemalloc offsets them within the first page), so each
            // piece goes through an aligned bounce buffer unless `data` happens to be aligned.
            let in_place = (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN);
            let mut bounce = Bounce::take();
            let piece = crate::paced_io::PIECE as usize;
            let mut at = 0;
            while at < data.len() {
                let end = (at + piece).min(data.len());
                let blocks = (end - at).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
                if in_place && end - at == blocks {
                    file.write_all_at(&data[at..end], at as u64)?;
                } else {
                    // The last partial block is padded with zeros, the file cut back after.
                    let buf = bounce.aligned(blocks);
                    buf[..end - at].copy_from_slice(&data[at..end]);
                    buf[end - at..].fill(0);
                    file.write_all_at(buf, at as u64)?;
                }
                at = end;
            }
            if !data.len().is_multiple_of(DIRECT_ALIGN) {
                file.set_len(data.len() as u64)?;
            }
            bounce.give_back();
            file.sync_all()
        })();
        match written {
            Ok(()) => {}
            Err(e) => {
                let _ = std::fs::remove_file(&staging);
                return if e.raw_os_error() == Some(libc::EINVAL) {
                    Ok(Direct::Unsupported)
                } else {
                    Err(e)
                };
            }
        }
        drop(file);
        let placed = if create_only {
            std::fs::hard_link(&staging, path)
        } else {
            std::fs::rename(&staging, path)
        };
        if create_only || placed.is_err() {
            let _ = std::fs::remove_file(&staging);
        }
        match placed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(Direct::Exists),
            Err(e) => return Err(e),
        }
        sync_dirs_up_to(path.parent(), root)?;
        Ok(Direct::Done(std::fs::metadata(path)?))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (path, data, create_only, root);
        Ok(Direct::Unsupported)
    }
}

/// object_store's local e-tag of a file (inode, modification time in µs and size, in hex), so
/// that a direct write reports the tag a later `head` or `get` of the object shows.
fn local_etag(metadata: &std::fs::Metadata) -> String {
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(metadata);
    #[cfg(not(unix))]
    let inode = 0u64;
    let mtime = metadata
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .unwrap_or_default()
        .as_micros();
    format!("{inode:x}-{mtime:x}-{:x}", metadata.len())
}

#[async_trait]
impl ObjectStore for SyncedLocal {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let failed = |message: String| object_store::Error::Generic {
            store: "SyncedLocal",
            source: message.into(),
        };
        let create_only = match opts.mode {
            object_store::PutMode::Create => Some(true),
            object_store::PutMode::Overwrite => Some(false),
            object_store::PutMode::Update(_) => None,
        };
        let mut chunks = payload.iter();
        if let (Some(create_only), Some(data), None, true) = (
            create_only,
            chunks.next(),
            chunks.next(),
            opts.attributes.is_empty(),
        ) {
            let file = self.inner.path_to_filesystem(location)?;
            let root = self.root.clone();
            let data = data.clone();
            let direct = tokio::task::spawn_blocking(move || {
                crate::priority::run_in_background("archive-sync", || {
                    put_direct(&file, &data, create_only, &root).map_err(|e| {
                        format!("could not write {} with direct I/O: {e}", file.display())
                    })
                })
            })
            .await
            .map_err(|e| failed(e.to_string()))?
            .and_then(|r| r)
            .map_err(failed)?;
            match direct {
                Direct::Done(metadata) => {
                    return Ok(PutResult {
                        e_tag: Some(local_etag(&metadata)),
                        version: None,
                    });
                }
                Direct::Exists => {
                    return Err(object_store::Error::AlreadyExists {
                        path: location.to_string(),
                        source: "the object exists (create-only write)".into(),
                    });
                }
                Direct::Unsupported => {}
            }
        }
        let result = self.inner.put_opts(location, payload, opts).await?;
        let file = self.inner.path_to_filesystem(location)?;
        let root = self.root.clone();
        let synced = tokio::task::spawn_blocking(move || {
            crate::priority::run_in_background("archive-sync", || sync_up_to(&file, &root))
        })
        .await;
        match synced {
            Ok(Ok(Ok(()))) => Ok(result),
            Ok(Ok(Err(e))) => Err(failed(format!(
                "wrote {location} but could not sync it to disk: {e}"
            ))),
            Ok(Err(e)) => Err(failed(e)),
            Err(e) => Err(failed(e.to_string())),
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;
    use object_store::{ObjectStoreExt, PutMode};

    #[tokio::test]
    async fn the_local_store_writes_create_only_reads_lists_and_deletes_through_the_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().display().to_string()).unwrap();
        assert!(store.to_string().starts_with("SyncedLocal("), "{store}");
        let path = Path::from("team=t/collection=c/date=2026-12-04/hour=06/a.parquet");
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        store
            .put_opts(&path, PutPayload::from_static(b"whole"), create.clone())
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(
                dir.path()
                    .join("team=t/collection=c/date=2026-12-04/hour=06/a.parquet")
            )
            .unwrap(),
            b"whole"
        );
        // Create-only still holds through the wrapper.
        assert!(matches!(
            store
                .put_opts(&path, PutPayload::from_static(b"other"), create)
                .await,
            Err(object_store::Error::AlreadyExists { .. })
        ));
        let got = store.get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(&got[..], b"whole");
        let listed: Vec<ObjectMeta> = store.list(None).try_collect().await.unwrap();
        assert_eq!(listed.len(), 1);
        store.delete(&path).await.unwrap();
        assert!(store.get(&path).await.is_err());
    }

    /// `data` in a buffer that starts on a block boundary, as the archiver's files do.
    fn aligned(data: &[u8]) -> bytes::Bytes {
        let mut v = vec![0u8; data.len() + DIRECT_ALIGN];
        let lead = v.as_ptr().align_offset(DIRECT_ALIGN);
        v[lead..lead + data.len()].copy_from_slice(data);
        bytes::Bytes::from(v).slice(lead..lead + data.len())
    }

    fn takes_direct_io(dir: &std::path::Path) -> bool {
        let probe = dir.join("probe");
        let opened = open_direct(std::fs::OpenOptions::new().write(true).create(true), &probe);
        let _ = std::fs::remove_file(&probe);
        matches!(opened, Ok(Some(_)))
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn aligned_objects_are_written_with_direct_io_whole_and_create_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        assert!(
            takes_direct_io(&root),
            "this test needs a file system with O_DIRECT (ext4, xfs) for its temp dir"
        );
        // Whole blocks, a partial last block, several pieces with a partial block; from an
        // aligned buffer (written in place) and from one that is not (through the bounce
        // buffer).
        for (len, shift) in [
            (3 * DIRECT_ALIGN, 0),
            (3 * DIRECT_ALIGN, 1),
            (3 * DIRECT_ALIGN + 123, 0),
            (3 * DIRECT_ALIGN + 123, 64),
            ((5 << 19) + 4096 + 5, 0),
            ((5 << 19) + 4096 + 5, 3),
        ] {
            let data = pattern(len);
            let path = root.join(format!("a/b/{len}-{shift}.parquet"));
            let mut padded = vec![0u8; shift];
            padded.extend_from_slice(&data);
            let buffer = aligned(&padded).slice(shift..);
            let done = put_direct(&path, &buffer, true, &root).unwrap();
            assert!(
                matches!(done, Direct::Done(ref m) if m.len() == len as u64),
                "{done:?}"
            );
            assert_eq!(std::fs::read(&path).unwrap(), data, "{len}");
            // Create-only: a second write leaves the first in place.
            let again = put_direct(&path, &aligned(&pattern(len + 1)), true, &root).unwrap();
            assert!(matches!(again, Direct::Exists), "{again:?}");
            assert_eq!(std::fs::read(&path).unwrap(), data);
            // Overwrite replaces it.
            let other = pattern(len + 4096);
            let over = put_direct(&path, &aligned(&other[1..]), false, &root).unwrap();
            assert!(matches!(over, Direct::Done(_)), "{over:?}");
            assert_eq!(std::fs::read(&path).unwrap(), &other[1..]);
        }
        // No staging file is left behind.
        let left: Vec<String> = std::fs::read_dir(root.join("a/b"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains('#'))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        // Small or unaligned buffers take the buffered path.
        let path = root.join("small");
        assert!(matches!(
            put_direct(&path, b"tiny", true, &root).unwrap(),
            Direct::Unsupported
        ));
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn the_store_writes_objects_directly_with_the_etag_readers_see() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().display().to_string()).unwrap();
        let path = Path::from("team=t/collection=c/date=2026-12-04/hour=07/0-9.parquet");
        let data = pattern(10 * DIRECT_ALIGN + 77);
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let put = store
            .put_opts(&path, PutPayload::from(aligned(&data)), create.clone())
            .await
            .unwrap();
        let head = store.head(&path).await.unwrap();
        assert_eq!(put.e_tag, head.e_tag);
        assert_eq!(head.size, data.len() as u64);
        let got = store.get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(&got[..], &data[..]);
        assert!(matches!(
            store
                .put_opts(&path, PutPayload::from(aligned(&data[..8192])), create)
                .await,
            Err(object_store::Error::AlreadyExists { .. })
        ));
        let listed: Vec<ObjectMeta> = store.list(None).try_collect().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].size, data.len() as u64);
    }

    #[test]
    fn syncing_stops_at_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f"), b"x").unwrap();
        sync_up_to(&root.join("a/b/f"), &root).unwrap();
        assert!(sync_up_to(&root.join("a/b/missing"), &root).is_err());
    }
}
