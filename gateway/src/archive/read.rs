//! Reading the archive back: always through the manifest (registered files only), never by
//! listing the object store, so a file written but not registered is never seen.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use object_store::ObjectStore;

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
    /// The object is gone (replaced by compaction since the manifest was read).
    pub not_found: bool,
}

/// What to read from a collection's archive.
#[derive(Clone)]
pub struct Scan {
    pub team_id: String,
    pub collection_id: String,
    /// `[from, to)` on `received_at`, in µs.
    pub from: i64,
    pub to: i64,
    pub filter: Option<Arc<crate::query::Expr>>,
    /// Start after this event (received_at µs, id): a resumed replay's checkpoint.
    pub after: Option<(i64, String)>,
}

/// Streams the selected events, oldest first (`received_at`, then id), in chunks, through
/// the manifest. Memory is bounded by one group of overlapping files. When a file has been
/// replaced by compaction since the manifest was read, the scan re-reads the manifest and
/// resumes after the last event it sent, so nothing is skipped or sent twice.
pub fn spawn_scan(
    store: Arc<dyn ObjectStore>,
    meta: Arc<dyn crate::meta::Metastore>,
    scan: Scan,
) -> tokio::sync::mpsc::Receiver<Result<Vec<ArchivedEvent>, String>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        if let Err(e) = run_scan(&store, meta.as_ref(), &scan, &tx).await {
            let _ = tx.send(Err(e)).await;
        }
    });
    rx
}

async fn run_scan(
    store: &Arc<dyn ObjectStore>,
    meta: &dyn crate::meta::Metastore,
    scan: &Scan,
    tx: &tokio::sync::mpsc::Sender<Result<Vec<ArchivedEvent>, String>>,
) -> Result<(), String> {
    // The last event sent: everything up to it (in scan order) is done.
    let mut cursor: Option<(i64, String)> = scan.after.clone();
    let mut replans = 0;
    // With fields that got no column, an absent column proves nothing about a file's rows.
    let capped = meta
        .collection_columns(Some(&scan.collection_id))
        .await
        .map_err(|e| e.to_string())?
        .len()
        >= super::schema::MAX_COLUMNS;
    'plan: loop {
        let from = cursor.as_ref().map_or(scan.from, |c| c.0);
        let files = meta
            .list_archive_files(&scan.team_id, &scan.collection_id, from, scan.to)
            .await
            .map_err(|e| e.to_string())?;
        // Two groups are read at once (decoding takes a core each); they are sent in order.
        let filter = scan.filter.clone();
        let mut reads = futures::stream::iter(overlapping_groups(files).into_iter().map(|group| {
            let filter = filter.clone();
            async move {
                let mut events = Vec::new();
                for file in &group {
                    let (mut e, _) = super::select::read_selected(
                        store,
                        file,
                        from,
                        scan.to,
                        filter.clone(),
                        capped,
                    )
                    .await?;
                    events.append(&mut e);
                }
                Ok::<_, ReadError>(events)
            }
        }))
        .buffered(2);
        while let Some(read) = reads.next().await {
            let mut events = match read {
                Ok(events) => events,
                Err(e) if e.not_found && replans < 10 => {
                    tracing::debug!(path = %e.path, "archive file replaced during a scan; re-reading the manifest");
                    replans += 1;
                    continue 'plan;
                }
                Err(e) => return Err(e.to_string()),
            };
            events.retain(|e| {
                cursor
                    .as_ref()
                    .is_none_or(|(t, id)| (e.received_at, e.id.as_str()) > (*t, id.as_str()))
            });
            events.sort_by(|a, b| (a.received_at, &a.id).cmp(&(b.received_at, &b.id)));
            if let Some(last) = events.last() {
                cursor = Some((last.received_at, last.id.clone()));
            }
            for chunk in events.chunks(4096) {
                if tx.send(Ok(chunk.to_vec())).await.is_err() {
                    return Ok(()); // the reader went away
                }
            }
        }
        return Ok(());
    }
}

/// Counts a selection's events. Without a filter, files entirely inside `[from, to)` count by
/// their manifest rows and only the files at the edges are read; with one, every file is
/// read with the filter pushed down. `after` is ignored.
pub async fn count(
    store: &Arc<dyn ObjectStore>,
    meta: &dyn crate::meta::Metastore,
    scan: &Scan,
) -> Result<i64, String> {
    let capped = meta
        .collection_columns(Some(&scan.collection_id))
        .await
        .map_err(|e| e.to_string())?
        .len()
        >= super::schema::MAX_COLUMNS;
    // A file replaced by compaction while counting: count again from a fresh manifest.
    'plan: for _ in 0..10 {
        let files = meta
            .list_archive_files(&scan.team_id, &scan.collection_id, scan.from, scan.to)
            .await
            .map_err(|e| e.to_string())?;
        let mut n = 0i64;
        for file in &files {
            if scan.filter.is_none()
                && file.min_received_at >= scan.from
                && file.max_received_at < scan.to
            {
                n += file.rows;
                continue;
            }
            match super::select::read_selected(
                store,
                file,
                scan.from,
                scan.to,
                scan.filter.clone(),
                capped,
            )
            .await
            {
                Ok((events, _)) => n += events.len() as i64,
                Err(e) if e.not_found => continue 'plan,
                Err(e) => return Err(e.to_string()),
            }
        }
        return Ok(n);
    }
    Err("the archive kept changing under the count; retry".into())
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
