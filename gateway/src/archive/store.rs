//! The object store the archive lives in: the local disk by default, S3 (or any S3-compatible
//! store, e.g. Garage or MinIO) for `s3://bucket/prefix`, with endpoint, region and keys from
//! the usual `AWS_*` variables (`AWS_ENDPOINT_URL` for S3-compatible stores).

use std::sync::Arc;
use std::time::Duration;

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
    Ok(Arc::new(local))
}
