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
    let mut dir = file.parent();
    while let Some(d) = dir {
        std::fs::File::open(d)?.sync_all()?;
        if d == root || !d.starts_with(root) {
            break;
        }
        dir = d.parent();
    }
    Ok(())
}

#[async_trait]
impl ObjectStore for SyncedLocal {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let result = self.inner.put_opts(location, payload, opts).await?;
        let file = self.inner.path_to_filesystem(location)?;
        let root = self.root.clone();
        let synced = tokio::task::spawn_blocking(move || {
            crate::priority::run_in_background("archive-sync", || sync_up_to(&file, &root))
        })
        .await;
        let failed = |message: String| object_store::Error::Generic {
            store: "SyncedLocal",
            source: message.into(),
        };
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
