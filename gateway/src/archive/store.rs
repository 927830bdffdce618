//! The object store the archive lives in: the local disk by default, S3 (or any S3-compatible
//! store, e.g. Garage or MinIO) for `s3://bucket/prefix`, with endpoint, region and keys from
//! the usual `AWS_*` variables (`AWS_ENDPOINT_URL` for S3-compatible stores).

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;

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
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
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
