//! Search over recent events: one trait, [`SearchIndex`], and two backends —
//! [`embedded::EmbeddedIndex`] (tantivy in the data dir; the default) and
//! [`meili::MeiliIndex`] (Meilisearch, an index per team). The [`indexer`] feeds either from
//! the bus; the REST/gRPC search calls read through [`SearchIndex::search`].
//!
//! Both backends answer with exactly the events the shared evaluator
//! ([`crate::query::Expr::matches`], [`crate::query::text`]) selects: each compiles a filter
//! to a query that selects the same events or, where its index cannot say (very long strings,
//! Meilisearch's own comparison rules), a superset that is then checked event by event. So the
//! index, the archive scan and replays always agree on what a filter means.
//!
//! Isolation: every query names its team and collection, and each backend turns them into a
//! mandatory restriction (a term on the embedded index; the team's own index plus a
//! collection filter on Meilisearch). There is no way to ask for "all teams".

pub mod directory;
pub mod embedded;
pub mod flatten;
pub mod indexer;
pub mod meili;

#[cfg(test)]
pub(crate) mod contract_tests;

use async_trait::async_trait;
use bytes::Bytes;

use crate::archive::read::ArchivedEvent;
use crate::query::Expr;

/// The search side of the gateway, as the API sees it.
pub struct SearchService {
    pub index: std::sync::Arc<dyn SearchIndex>,
    pub windows: std::sync::Arc<indexer::HotWindows>,
    pub status: std::sync::Arc<indexer::IndexStatus>,
    /// The indexer's bus consumer (its lag is the index lag).
    pub consumer: String,
}

/// The most events one search page returns; larger `limit`s are capped to it.
pub const MAX_LIMIT: usize = 1000;
/// Facet values returned for the chosen field, most frequent first.
pub const MAX_FACET_VALUES: usize = 100;

/// One event to index.
#[derive(Debug, Clone)]
pub struct IndexDoc {
    pub team_id: String,
    pub collection_id: String,
    pub id: String,
    pub received_at: i64,
    pub content_type: String,
    pub payload: Bytes,
    /// Its bus message's position (the embedded index keeps the highest it has committed).
    pub position: u64,
}

/// A position in newest-first order: results continue strictly after `(received_at, id)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub received_at: i64,
    pub id: String,
}

impl Cursor {
    /// The opaque form handed to clients (`<received_at µs>.<event id>`, base64url).
    pub fn encode(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{}.{}", self.received_at, self.id))
    }

    pub fn decode(text: &str) -> Result<Cursor, String> {
        use base64::Engine;
        let bad = || {
            format!(
                "`cursor` {text:?} is not a cursor this API returned; pass `next_cursor` from the previous page unchanged"
            )
        };
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| bad())?;
        let raw = String::from_utf8(raw).map_err(|_| bad())?;
        let (at, id) = raw.split_once('.').ok_or_else(bad)?;
        let received_at = at.parse::<i64>().map_err(|_| bad())?;
        if ulid::Ulid::from_string(id).is_err() {
            return Err(bad());
        }
        Ok(Cursor {
            received_at,
            id: id.to_string(),
        })
    }

    /// Whether an event comes after this cursor in newest-first order.
    pub fn is_before(&self, received_at: i64, id: &str) -> bool {
        (received_at, id) < (self.received_at, self.id.as_str())
    }
}

/// A search: always one team's collection.
#[derive(Debug, Clone)]
pub struct SearchRequest {
    pub team_id: String,
    pub collection_id: String,
    pub filter: Option<Expr>,
    /// Free text: every word must occur (see [`crate::query::text`]).
    pub q: Option<String>,
    /// `[from, to)` on `received_at`, µs.
    pub from: i64,
    pub to: i64,
    pub limit: usize,
    pub cursor: Option<Cursor>,
    /// Count the values of this field over every match (not only this page).
    pub facet: Option<String>,
}

/// One page of results, newest first.
#[derive(Debug, Clone, Default)]
pub struct SearchPage {
    pub events: Vec<ArchivedEvent>,
    /// Set when more events may follow.
    pub next_cursor: Option<Cursor>,
    /// Value → number of matching events, most frequent first.
    pub facets: Option<Vec<(String, u64)>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("the search index is unavailable: {0}")]
    Unavailable(String),
    #[error("the search index failed: {0}")]
    Internal(String),
}

/// What `/readyz` and `/metrics` show about the index.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SearchHealth {
    pub kind: &'static str,
    pub ready: bool,
    pub detail: String,
}

#[async_trait]
pub trait SearchIndex: Send + Sync {
    fn kind(&self) -> &'static str;

    /// Adds (or replaces, by event id) these events; returns once they are durable in the index
    /// and visible to searches.
    async fn index(&self, docs: Vec<IndexDoc>) -> Result<(), SearchError>;

    async fn search(&self, request: &SearchRequest) -> Result<SearchPage, SearchError>;

    /// Removes a collection's events received before `before` (the hot window's edge).
    async fn delete_before(
        &self,
        team_id: &str,
        collection_id: &str,
        before: i64,
    ) -> Result<(), SearchError>;

    async fn health(&self) -> SearchHealth;
}

/// Whether an event is selected by a request's filter, text and range (the reference that
/// backends' candidates are checked against).
pub fn selects(request: &SearchRequest, event: &ArchivedEvent) -> bool {
    if event.received_at < request.from || event.received_at >= request.to {
        return false;
    }
    if let Some(c) = &request.cursor
        && !c.is_before(event.received_at, &event.id)
    {
        return false;
    }
    if request.filter.is_none() && request.q.as_deref().is_none_or(str::is_empty) {
        return true;
    }
    let value = if event.content_type == "application/json" {
        serde_json::from_slice(&event.payload).unwrap_or(serde_json::Value::Null)
    } else {
        serde_json::Value::Null
    };
    if let Some(f) = &request.filter
        && !f.matches(&value)
    {
        return false;
    }
    match request.q.as_deref() {
        Some(q) if !q.trim().is_empty() => {
            crate::query::text::matches(q, &event.content_type, &event.payload, &value)
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = Cursor {
            received_at: 1_764_000_000_000_000,
            id: ulid::Ulid::new().to_string(),
        };
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        for bad in ["", "!!", "bm90YWN1cnNvcg", "MTIzLm5vdGF1bGlk"] {
            assert!(Cursor::decode(bad).is_err(), "{bad}");
        }
        assert!(c.is_before(c.received_at - 1, "ZZZ"));
        assert!(c.is_before(c.received_at, "0"));
        assert!(!c.is_before(c.received_at, &c.id));
    }
}
