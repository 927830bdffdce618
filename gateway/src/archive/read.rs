//! Reading the archive back: always through the manifest (registered files only), never by
//! listing the object store, so a file written but not registered is never seen.

use std::sync::Arc;

use arrow::array::{Array, BinaryArray, StringArray, TimestampMicrosecondArray};
use bytes::Bytes;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::meta::ArchiveFile;

/// One event as read from the archive.
#[derive(Debug, Clone)]
pub struct ArchivedEvent {
    pub id: String,
    pub received_at: i64,
    pub content_type: String,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read archive file {path}: {message}")]
pub struct ReadError {
    pub path: String,
    pub message: String,
}

/// Reads the events of one file whose `received_at` is in `[from, to)`.
pub async fn read_file(
    store: &Arc<dyn ObjectStore>,
    file: &ArchiveFile,
    from: i64,
    to: i64,
) -> Result<Vec<ArchivedEvent>, ReadError> {
    let err = |message: String| ReadError {
        path: file.path.clone(),
        message,
    };
    // Files are bounded by the archiver's target size, so reading one whole is bounded too.
    let bytes = store
        .get(&file.path.as_str().into())
        .await
        .map_err(|e| err(e.to_string()))?
        .bytes()
        .await
        .map_err(|e| err(e.to_string()))?;
    let batches = tokio::task::spawn_blocking(move || {
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
        let mask = ProjectionMask::columns(
            builder.metadata().file_metadata().schema_descr(),
            ["id", "received_at", "content_type", "payload"],
        );
        builder
            .with_projection(mask)
            .with_batch_size(8192)
            .build()?
            .collect::<Result<Vec<_>, _>>()
            .map_err(parquet::errors::ParquetError::from)
    })
    .await
    .map_err(|e| err(e.to_string()))?
    .map_err(|e| err(e.to_string()))?;
    let mut out = Vec::new();
    for batch in batches {
        let col = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| err(format!("column {name} missing")))
        };
        let ids = col("id")?
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| err("id is not a string column".into()))?;
        let times = col("received_at")?
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .ok_or_else(|| err("received_at is not a timestamp column".into()))?;
        let types = col("content_type")?
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| err("bad content_type".into()))?;
        let payloads = col("payload")?
            .as_any()
            .downcast_ref::<BinaryArray>()
            .ok_or_else(|| err("bad payload".into()))?;
        for i in 0..batch.num_rows() {
            let t = times.value(i);
            if t < from || t >= to {
                continue;
            }
            out.push(ArchivedEvent {
                id: ids.value(i).to_string(),
                received_at: t,
                content_type: if types.is_null(i) {
                    String::new()
                } else {
                    types.value(i).to_string()
                },
                payload: Bytes::copy_from_slice(payloads.value(i)),
            });
        }
    }
    Ok(out)
}

/// Groups files (sorted by `min_received_at`) whose time ranges overlap, so each group can be
/// merged in memory and groups streamed one after the other, oldest first.
pub fn overlapping_groups(files: Vec<ArchiveFile>) -> Vec<Vec<ArchiveFile>> {
    let mut groups: Vec<Vec<ArchiveFile>> = Vec::new();
    let mut group_max = i64::MIN;
    for f in files {
        match groups.last_mut() {
            Some(g) if f.min_received_at <= group_max => {
                group_max = group_max.max(f.max_received_at);
                g.push(f);
            }
            _ => {
                group_max = f.max_received_at;
                groups.push(vec![f]);
            }
        }
    }
    groups
}

/// An export line: `{"id","received_at","payload"}`; JSON payloads verbatim, others base64
/// with `"payload_encoding":"base64"`.
pub fn export_line(e: &ArchivedEvent) -> Vec<u8> {
    use base64::Engine;
    let received = crate::ids::micros_to_rfc3339(e.received_at);
    let mut line = format!(
        "{{\"id\":\"{}\",\"received_at\":\"{received}\",\"payload\":",
        e.id
    )
    .into_bytes();
    if e.content_type == "application/json" {
        line.extend_from_slice(&e.payload);
    } else {
        let b64 = base64::engine::general_purpose::STANDARD.encode(&e.payload);
        line.extend_from_slice(
            format!(
                "\"{b64}\",\"payload_encoding\":\"base64\",\"content_type\":{}",
                serde_json::Value::String(e.content_type.clone())
            )
            .as_bytes(),
        );
    }
    line.extend_from_slice(b"}\n");
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(min: i64, max: i64) -> ArchiveFile {
        ArchiveFile {
            id: String::new(),
            team_id: String::new(),
            collection_id: String::new(),
            path: format!("{min}-{max}"),
            rows: 0,
            bytes: 0,
            min_received_at: min,
            max_received_at: max,
            min_position: 0,
            max_position: 0,
            schema_version: 0,
            created_at: 0,
        }
    }

    #[test]
    fn groups_overlapping_ranges() {
        let groups = overlapping_groups(vec![
            file(0, 10),
            file(5, 20),
            file(21, 30),
            file(30, 31),
            file(40, 50),
        ]);
        let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![2, 2, 1]);
    }

    #[test]
    fn export_lines_keep_json_and_encode_bytes() {
        let e = ArchivedEvent {
            id: "01A".into(),
            received_at: 0,
            content_type: "application/json".into(),
            payload: Bytes::from_static(b"{\"a\": 1}"),
        };
        let v: serde_json::Value = serde_json::from_slice(&export_line(&e)).unwrap();
        assert_eq!(v["payload"]["a"], 1);
        let e = ArchivedEvent {
            content_type: "application/octet-stream".into(),
            payload: Bytes::from_static(&[0, 255]),
            ..e
        };
        let v: serde_json::Value = serde_json::from_slice(&export_line(&e)).unwrap();
        assert_eq!(v["payload"], "AP8=");
        assert_eq!(v["payload_encoding"], "base64");
    }
}
