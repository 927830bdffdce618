//! Searching a collection's events for REST (`GET /v1/collections/{id}/events`), gRPC
//! (`SearchService.Search`) and the CLI: the index answers for its hot window; when the caller
//! gives a `from` before the window, that part of the range is read from the archive,
//! transparently, and the answer says which sources it used. Without `from` a search covers
//! the window only (a search for a rare event must not scan years of archive by accident).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::{ApiError, AppState};
use crate::archive::read::ArchivedEvent;
use crate::search::{Cursor, MAX_FACET_VALUES, MAX_LIMIT, SearchPage, SearchRequest};

/// `limit` when the caller gives none.
pub const DEFAULT_LIMIT: usize = 50;

/// What a search read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Index,
    Archive,
    IndexAndArchive,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Index => "index",
            Source::Archive => "archive",
            Source::IndexAndArchive => "index+archive",
        }
    }
}

pub struct Outcome {
    pub page: SearchPage,
    pub source: Source,
    /// Events at or after this time (µs) come from the index; earlier ones from the archive.
    pub index_from: i64,
    /// The `limit` asked for was above [`MAX_LIMIT`] and was capped.
    pub limit_capped: bool,
}

/// Caps a requested limit: `(limit, capped)`.
pub fn cap_limit(limit: Option<usize>) -> (usize, bool) {
    match limit {
        None | Some(0) => (DEFAULT_LIMIT, false),
        Some(n) if n > MAX_LIMIT => (MAX_LIMIT, true),
        Some(n) => (n, false),
    }
}

/// Runs a search (the request already names the caller's team and a collection it owns).
pub async fn search(
    state: &AppState,
    request: SearchRequest,
    limit_capped: bool,
) -> Result<Outcome, ApiError> {
    let index_from = state.search.windows.cutoff(&request.collection_id);
    let upper = match &request.cursor {
        Some(c) => request.to.min(c.received_at.saturating_add(1)),
        None => request.to,
    };
    let mut used_index = false;
    let mut page = SearchPage::default();
    if request.from == i64::MIN && upper <= index_from {
        // Past the window with no `from`: nothing to search.
        return Ok(Outcome {
            page,
            source: Source::Index,
            index_from,
            limit_capped,
        });
    }
    if upper > index_from.max(request.from) {
        let mut r = request.clone();
        r.from = request.from.max(index_from);
        page = state.search.index.search(&r).await.map_err(|e| {
            ApiError::new(
                http::StatusCode::SERVICE_UNAVAILABLE,
                "search_unavailable",
                format!("{e}; retry shortly (ingestion is not affected)"),
            )
        })?;
        used_index = true;
        if page.next_cursor.is_some() || request.from >= index_from || request.from == i64::MIN {
            return Ok(Outcome {
                page,
                source: Source::Index,
                index_from,
                limit_capped,
            });
        }
    }
    // The rest comes from before the window: the archive, newest first.
    let want = request.limit - page.events.len();
    let archive_to = request.to.min(index_from);
    let (older, facets) = scan_archive_newest(state, &request, archive_to, want + 1).await?;
    page.events.extend(older);
    page.next_cursor = None;
    if page.events.len() > request.limit {
        page.events.truncate(request.limit);
        let last = page.events.last().expect("limit >= 1");
        page.next_cursor = Some(Cursor {
            received_at: last.received_at,
            id: last.id.clone(),
        });
    }
    if let Some(archive_facets) = facets {
        let mut total: HashMap<String, u64> =
            page.facets.take().unwrap_or_default().into_iter().collect();
        for (v, n) in archive_facets {
            *total.entry(v).or_default() += n;
        }
        let mut merged: Vec<(String, u64)> = total.into_iter().collect();
        merged.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        merged.truncate(MAX_FACET_VALUES);
        page.facets = Some(merged);
    }
    Ok(Outcome {
        page,
        source: if used_index {
            Source::IndexAndArchive
        } else {
            Source::Archive
        },
        index_from,
        limit_capped,
    })
}

/// The newest `keep` selected events of the archive in `[request.from, to)` (after the cursor),
/// newest first, and the facet counts over every selected event. Memory: `keep` events.
async fn scan_archive_newest(
    state: &AppState,
    request: &SearchRequest,
    to: i64,
    keep: usize,
) -> Result<(Vec<ArchivedEvent>, Option<Vec<(String, u64)>>), ApiError> {
    let mut rx = crate::archive::read::spawn_scan(
        state.archive.clone(),
        state.meta.clone(),
        crate::archive::read::Scan {
            team_id: request.team_id.clone(),
            collection_id: request.collection_id.clone(),
            from: request.from,
            to,
            // Filter, text and cursor are checked below, with the facets.
            filter: None,
            after: None,
        },
    );
    let request = Arc::new(request.clone());
    let mut newest: VecDeque<ArchivedEvent> = VecDeque::with_capacity(keep.min(4096));
    let mut facets: Option<HashMap<String, u64>> = request.facet.as_ref().map(|_| HashMap::new());
    while let Some(batch) = rx.recv().await {
        let batch = batch.map_err(|e| {
            ApiError::new(
                http::StatusCode::SERVICE_UNAVAILABLE,
                "archive_unavailable",
                format!("{e}; retry shortly"),
            )
        })?;
        for e in batch {
            if !crate::search::selects(&request, &e) {
                continue;
            }
            if let (Some(counts), Some(field)) = (facets.as_mut(), request.facet.as_deref()) {
                count_facet(counts, field, &e);
            }
            if newest.len() == keep {
                newest.pop_front();
            }
            newest.push_back(e);
        }
    }
    let facets = facets.map(|m| m.into_iter().collect());
    Ok((newest.into_iter().rev().collect(), facets))
}

fn count_facet(counts: &mut HashMap<String, u64>, field: &str, e: &ArchivedEvent) {
    if e.content_type != "application/json" {
        return;
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&e.payload) else {
        return;
    };
    let prefix = format!("{field}{}", crate::search::flatten::SEP);
    for f in crate::search::flatten::flatten(&value).facets {
        if let Some(v) = f.strip_prefix(&prefix) {
            *counts.entry(v.to_string()).or_default() += 1;
        }
    }
}

/// Follows a collection from now on (through the bus), sending the events that match `filter`
/// and `q`. The task ends when the receiver is dropped or the bus closes.
pub async fn tail(
    state: &AppState,
    team_id: &str,
    collection_id: &str,
    filter: Option<crate::query::Expr>,
    q: Option<String>,
) -> Result<tokio::sync::mpsc::Receiver<Result<ArchivedEvent, String>>, ApiError> {
    let mut follow = state.bus.tail(team_id, collection_id).await.map_err(|e| {
        ApiError::new(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "bus_unavailable",
            format!("cannot follow the collection: {e}; retry shortly"),
        )
    })?;
    let request = SearchRequest {
        team_id: team_id.to_string(),
        collection_id: collection_id.to_string(),
        filter,
        q,
        from: i64::MIN,
        to: i64::MAX,
        limit: 1,
        cursor: None,
        facet: None,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            let batch = tokio::select! {
                b = follow.next() => b,
                _ = tx.closed() => return,
            };
            match batch {
                Ok(batch) => {
                    for e in batch.events {
                        let event = ArchivedEvent {
                            id: e.id,
                            received_at: e.received_at_micros,
                            content_type: e.content_type,
                            payload: e.payload,
                        };
                        if crate::search::selects(&request, &event)
                            && tx.send(Ok(event)).await.is_err()
                        {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string())).await;
                    return;
                }
            }
        }
    });
    Ok(rx)
}
