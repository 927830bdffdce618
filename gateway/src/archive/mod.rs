//! The archive: every event in plain, Hive-partitioned Parquet on object storage
//! (`team=…/collection=…/date=…/hour=…/<first>-<last>.parquet`), registered in the metastore's
//! manifest. The archiver ([`archiver`]) writes it from the bus; [`read`] reads it back for
//! exports and look-ups by id; [`schema`] infers each collection's typed columns.

pub mod archiver;
pub mod compact;
pub mod json_leaves;
pub mod parquet;
mod payload_column;
pub mod read;
pub mod schema;
pub mod select;
pub mod store;
mod string_column;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::meta::Metastore;

/// Removes the objects a crash left behind: those recorded as pending (about to be written,
/// or replaced by compaction) that are not registered. At start-up, before its archiver runs,
/// a gateway passes its own `owner` id (everything of its own is a leftover then); the
/// periodic pass passes no owner and only takes rows older than `stale_after`, which no
/// running writer still has in flight. Returns how many objects were deleted.
pub async fn recover_pending(
    store: &Arc<dyn ObjectStore>,
    meta: &Arc<dyn Metastore>,
    owner: &str,
    stale_after: Duration,
) -> Result<usize, String> {
    let stale_before = crate::ids::now_micros() - stale_after.as_micros() as i64;
    let pending = meta
        .pending_objects(owner, stale_before)
        .await
        .map_err(|e| format!("cannot read pending archive objects: {e}"))?;
    let mut done = Vec::new();
    let mut removed = 0;
    for (path, registered) in pending {
        if !registered {
            match store.delete(&path.as_str().into()).await {
                Ok(()) => {
                    tracing::info!(%path, "removed an archive object left by a crash");
                    removed += 1;
                }
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(format!("cannot delete {path}: {e}")),
            }
        }
        done.push(path);
    }
    meta.remove_pending_objects(&done)
        .await
        .map_err(|e| e.to_string())?;
    Ok(removed)
}

/// Deletes objects that were written but never registered (a crash between upload and
/// registration, or a flush that failed after uploading), once they are older than `min_age`
/// (so an upload whose registration is in flight is never touched). Returns how many went.
pub async fn cleanup_orphans(
    store: &Arc<dyn ObjectStore>,
    meta: &Arc<dyn Metastore>,
    min_age: Duration,
) -> Result<usize, String> {
    let objects: Vec<_> = store
        .list(None)
        .try_collect()
        .await
        .map_err(|e| format!("cannot list the archive: {e}"))?;
    let cutoff = chrono::Utc::now() - chrono::Duration::from_std(min_age).unwrap_or_default();
    let mut registered: HashMap<String, HashSet<String>> = HashMap::new();
    let mut removed = 0;
    for object in objects {
        let path = object.location.to_string();
        if !path.ends_with(".parquet") || object.last_modified > cutoff {
            continue;
        }
        let Some(collection) = path
            .split('/')
            .find_map(|part| part.strip_prefix("collection="))
            .map(str::to_string)
        else {
            continue;
        };
        if !registered.contains_key(&collection) {
            let paths = meta
                .archive_paths(&collection)
                .await
                .map_err(|e| e.to_string())?;
            registered.insert(collection.clone(), paths.into_iter().collect());
        }
        if !registered[&collection].contains(&path) {
            tracing::info!(%path, "removing an archive object that was never registered");
            store
                .delete(&object.location)
                .await
                .map_err(|e| format!("cannot delete {path}: {e}"))?;
            removed += 1;
        }
    }
    Ok(removed)
}
