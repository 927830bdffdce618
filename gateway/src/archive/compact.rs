//! Compaction: merges the small files of an hour partition into files near the target size
//! and swaps them in the manifest atomically (the inputs leave and the merged file enters in
//! one metastore transaction), then deletes the inputs.
//!
//! A file is small when it holds less than half the target. Only files older than
//! `min_age` are touched (so a partition being written is left to settle), and inputs are
//! taken in bus-position order until the next one would pass the target. The merged file has
//! the union of the inputs' columns, each with the collection's current (widened) type; it is
//! streamed row group by row group, so memory is about one merged file. Readers going through
//! the manifest that meet a deleted input re-read the manifest and resume (see
//! [`super::read::spawn_scan`]); a crash after the swap but before the deletes leaves
//! unregistered inputs that the orphan cleanup removes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, new_null_array};
use arrow::compute::cast;
use arrow::datatypes::{Field, Schema};
use arrow::record_batch::RecordBatch;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::metadata::ParquetMetaDataReader;

use super::parquet::{FileWriter, arrow_type};
use super::schema::ColumnType;
use crate::ids::{new_id, now_micros};
use crate::meta::{ArchiveFile, Metastore};

#[derive(Debug, Clone)]
pub struct CompactOptions {
    /// Size merged files grow toward (bytes of Parquet).
    pub target_bytes: u64,
    /// Files younger than this are left alone.
    pub min_age: Duration,
    /// This gateway instance, as the owner of the objects it writes and deletes.
    pub owner: String,
}

impl Default for CompactOptions {
    fn default() -> Self {
        Self {
            target_bytes: 128 << 20,
            min_age: Duration::from_secs(300),
            owner: "default".into(),
        }
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CompactStats {
    pub merged_files: usize,
    pub input_files: usize,
    pub rows: u64,
}

/// The partition directory of an archive path (`team=…/…/hour=HH`).
fn partition_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

/// Runs of files (same collection and partition, position order) to merge.
fn plan(files: Vec<ArchiveFile>, target: u64) -> Vec<Vec<ArchiveFile>> {
    let mut by_partition: Vec<((String, String), Vec<ArchiveFile>)> = Vec::new();
    for f in files {
        let key = (f.collection_id.clone(), partition_of(&f.path).to_string());
        match by_partition.last_mut() {
            Some((k, v)) if *k == key => v.push(f),
            _ => by_partition.push((key, vec![f])),
        }
    }
    let mut runs = Vec::new();
    for (_, mut files) in by_partition {
        files.sort_by_key(|f| f.min_position);
        let mut run: Vec<ArchiveFile> = Vec::new();
        let mut bytes = 0u64;
        for f in files {
            if !run.is_empty() && bytes + f.bytes as u64 > target {
                if run.len() >= 2 {
                    runs.push(std::mem::take(&mut run));
                } else {
                    run.clear();
                }
                bytes = 0;
            }
            bytes += f.bytes as u64;
            run.push(f);
        }
        if run.len() >= 2 {
            runs.push(run);
        }
    }
    runs
}

/// One compaction pass over every collection.
pub async fn compact_once(
    store: &Arc<dyn ObjectStore>,
    meta: &Arc<dyn Metastore>,
    options: &CompactOptions,
) -> Result<CompactStats, String> {
    let before = now_micros() - options.min_age.as_micros() as i64;
    let candidates = meta
        .compaction_candidates((options.target_bytes / 2) as i64, before)
        .await
        .map_err(|e| format!("cannot list files to compact: {e}"))?;
    let mut stats = CompactStats::default();
    let mut types: HashMap<String, HashMap<String, ColumnType>> = HashMap::new();
    for run in plan(candidates, options.target_bytes) {
        let collection = run[0].collection_id.clone();
        if !types.contains_key(&collection) {
            let cols = meta
                .collection_columns(Some(&collection))
                .await
                .map_err(|e| e.to_string())?;
            types.insert(
                collection.clone(),
                cols.into_iter()
                    .filter_map(|c| Some((c.name, ColumnType::parse(&c.type_name)?)))
                    .collect(),
            );
        }
        match merge(store, meta, &run, &types[&collection], &options.owner).await {
            Ok(Some(rows)) => {
                stats.merged_files += 1;
                stats.input_files += run.len();
                stats.rows += rows;
            }
            Ok(None) => {}
            Err(e) => {
                return Err(format!(
                    "cannot compact {} files of {}: {e}",
                    run.len(),
                    partition_of(&run[0].path)
                ));
            }
        }
    }
    Ok(stats)
}

/// The Arrow schema of an archive file, from its footer (two ranged reads).
async fn file_schema(store: &Arc<dyn ObjectStore>, f: &ArchiveFile) -> Result<Schema, String> {
    let path = ObjectPath::from(f.path.as_str());
    let err = |e: String| format!("cannot read the footer of {}: {e}", f.path);
    let size = f.bytes as u64;
    if size < 12 {
        return Err(err("too small to be Parquet".into()));
    }
    let tail = store
        .get_range(&path, size - 8..size)
        .await
        .map_err(|e| err(e.to_string()))?;
    if &tail[4..] != b"PAR1" {
        return Err(err("no Parquet magic at the end".into()));
    }
    let len = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]) as u64;
    if len + 8 > size {
        return Err(err("footer length past the start of the file".into()));
    }
    let footer = store
        .get_range(&path, size - 8 - len..size - 8)
        .await
        .map_err(|e| err(e.to_string()))?;
    let meta = ParquetMetaDataReader::decode_metadata(&footer).map_err(|e| err(e.to_string()))?;
    parquet::arrow::parquet_to_arrow_schema(
        meta.file_metadata().schema_descr(),
        meta.file_metadata().key_value_metadata(),
    )
    .map_err(|e| err(e.to_string()))
}

/// Merges one run; `None` when the manifest changed under it (nothing swapped).
async fn merge(
    store: &Arc<dyn ObjectStore>,
    meta: &Arc<dyn Metastore>,
    run: &[ArchiveFile],
    types: &HashMap<String, ColumnType>,
    owner: &str,
) -> Result<Option<u64>, String> {
    // The merged schema: the archive's own columns, then the union of inferred columns in
    // order of first appearance, each with the collection's current type. Only the footers
    // are fetched for this.
    let mut fields: Vec<Field> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for f in run {
        for field in file_schema(store, f).await?.fields() {
            if seen.contains_key(field.name()) {
                continue;
            }
            let ty = types
                .get(field.name())
                .map_or(field.data_type().clone(), |t| arrow_type(*t));
            seen.insert(field.name().clone(), fields.len());
            fields.push(Field::new(field.name(), ty, field.is_nullable()));
        }
    }
    // Inferred columns appearing only in later files are nullable by construction; the
    // archive's own columns keep their (non-)nullability.
    let schema = Arc::new(Schema::new(
        fields
            .into_iter()
            .enumerate()
            .map(|(i, f)| if i >= 6 { f.with_nullable(true) } else { f })
            .collect::<Vec<_>>(),
    ));
    let mut writer = FileWriter::new(schema.clone(), Vec::new()).map_err(|e| e.to_string())?;
    let mut rows = 0u64;
    for f in run {
        // One input at a time (each under half the target), decoded in 8192-row batches.
        let data = store
            .get(&ObjectPath::from(f.path.as_str()))
            .await
            .map_err(|e| format!("cannot read {}: {e}", f.path))?
            .bytes()
            .await
            .map_err(|e| format!("cannot read {}: {e}", f.path))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(data)
            .and_then(|b| b.with_batch_size(8192).build())
            .map_err(|e| format!("cannot read {}: {e}", f.path))?;
        for batch in reader {
            let batch = batch.map_err(|e| format!("cannot read {}: {e}", f.path))?;
            let columns: Vec<ArrayRef> = schema
                .fields()
                .iter()
                .map(|field| match batch.column_by_name(field.name()) {
                    Some(col) if col.data_type() == field.data_type() => Ok(col.clone()),
                    Some(col) => cast(col, field.data_type()).map_err(|e| {
                        format!("cannot widen column {} of {}: {e}", field.name(), f.path)
                    }),
                    None => Ok(new_null_array(field.data_type(), batch.num_rows())),
                })
                .collect::<Result<_, String>>()?;
            let batch = RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())?;
            rows += batch.num_rows() as u64;
            tokio::task::block_in_place(|| writer.write_batch(&batch))
                .map_err(|e| e.to_string())?;
        }
    }
    let bytes = tokio::task::block_in_place(|| writer.finish()).map_err(|e| e.to_string())?;
    let first = run.iter().map(|f| f.min_position).min().unwrap_or(0);
    let last = run.iter().map(|f| f.max_position).max().unwrap_or(0);
    let merged_id = new_id("af");
    let path = format!(
        "{}/{first:020}-{last:020}-{}.parquet",
        partition_of(&run[0].path),
        merged_id.trim_start_matches("af_").to_lowercase()
    );
    let size = bytes.len() as i64;
    meta.add_pending_objects(std::slice::from_ref(&path), owner, now_micros())
        .await
        .map_err(|e| format!("cannot record the upload of {path}: {e}"))?;
    store
        .put_opts(
            &ObjectPath::from(path.as_str()),
            PutPayload::from(bytes),
            PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("cannot write {path}: {e}"))?;
    let merged = ArchiveFile {
        id: merged_id,
        team_id: run[0].team_id.clone(),
        collection_id: run[0].collection_id.clone(),
        path: path.clone(),
        rows: rows as i64,
        bytes: size,
        min_received_at: run.iter().map(|f| f.min_received_at).min().unwrap_or(0),
        max_received_at: run.iter().map(|f| f.max_received_at).max().unwrap_or(0),
        min_position: first,
        max_position: last,
        schema_version: run.iter().map(|f| f.schema_version).max().unwrap_or(0),
        created_at: now_micros(),
    };
    let expected: u64 = run.iter().map(|f| f.rows as u64).sum();
    if rows != expected {
        let _ = store.delete(&ObjectPath::from(path.as_str())).await;
        return Err(format!(
            "merged {rows} rows but the manifest lists {expected}; left the inputs in place"
        ));
    }
    let swapped = meta
        .replace_archive_files(run, &merged, owner)
        .await
        .map_err(|e| format!("cannot swap the manifest: {e}"))?;
    if !swapped {
        let _ = store.delete(&ObjectPath::from(path.as_str())).await;
        return Ok(None);
    }
    // The inputs are pending deletion since the swap: delete them, then forget them. A crash
    // in between leaves them to `recover_pending`.
    let mut deleted = Vec::new();
    for f in run {
        match store.delete(&ObjectPath::from(f.path.as_str())).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted.push(f.path.clone()),
            Err(e) => {
                tracing::warn!(path = %f.path, error = %e, "cannot delete a compacted input; will retry")
            }
        }
    }
    if let Err(e) = meta.remove_pending_objects(&deleted).await {
        tracing::warn!(error = %e, "cannot clear pending deletions; they will be retried");
    }
    tracing::info!(%path, inputs = run.len(), rows, bytes = size, "compacted");
    Ok(Some(rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(collection: &str, hour: &str, pos: i64, bytes: i64) -> ArchiveFile {
        ArchiveFile {
            id: format!("af_{pos}"),
            team_id: "t".into(),
            collection_id: collection.into(),
            path: format!(
                "team=t/collection={collection}/date=2026-11-25/hour={hour}/{pos}.parquet"
            ),
            rows: 1,
            bytes,
            min_received_at: 0,
            max_received_at: 0,
            min_position: pos,
            max_position: pos,
            schema_version: 0,
            created_at: 0,
        }
    }

    #[test]
    fn plans_runs_per_partition_up_to_the_target() {
        let runs = plan(
            vec![
                file("a", "01", 1, 40),
                file("a", "01", 2, 40),
                file("a", "01", 3, 40),
                file("a", "02", 4, 10),
                file("b", "01", 5, 10),
                file("b", "01", 6, 10),
            ],
            100,
        );
        let shape: Vec<Vec<i64>> = runs
            .iter()
            .map(|r| r.iter().map(|f| f.min_position).collect())
            .collect();
        // a/01: 40+40 fits, the third would pass 100 and is alone; a/02 alone; b/01 merges.
        assert_eq!(shape, vec![vec![1, 2], vec![5, 6]]);
    }
}
