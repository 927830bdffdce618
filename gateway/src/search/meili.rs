//! The Meilisearch backend (meilisearch-sdk): one index per team, `rewind-<team_id>`, so a
//! query can only ever reach its own team's documents; the collection is a mandatory filter.
//!
//! A document is `{id, collection, received_at (µs), content_type, raw, p}`: `p` is the JSON
//! payload (Meilisearch flattens it to dotted fields, the same paths the filter language
//! uses), `raw` the original bytes (text, or base64 for non-JSON) so results return exactly
//! what was received. Settings: `p`, `collection` and `received_at` filterable (declaring the
//! parent makes every payload field filterable, including fields that appear later, without
//! a settings change and the re-index it would cost), `received_at` sortable, only `p`
//! searchable, typo tolerance off (free text means the words occur).
//!
//! Filters are translated to Meilisearch's syntax, and every hit is checked again with the
//! shared evaluator, so results never include an event the filter does not select. Where
//! Meilisearch reads a condition more broadly (text equality ignores case) or cannot express
//! it (`<`/`>` on text), the translation selects a superset and never negates it. Where its
//! rules are narrower (`"100" > 99` on a field holding numbers as strings does not match), an
//! event can be missing; `docs/query.md` lists these.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use meilisearch_sdk::client::Client;
use meilisearch_sdk::errors::{Error as MeiliError, ErrorCode};
use meilisearch_sdk::search::{MatchingStrategies, Selectors};
use meilisearch_sdk::settings::{
    FacetingSettings, PaginationSetting, Settings, TypoToleranceSettings,
};
use meilisearch_sdk::tasks::Task;
use serde::{Deserialize, Serialize};

use super::{
    Cursor, IndexDoc, MAX_FACET_VALUES, SearchError, SearchHealth, SearchIndex, SearchPage,
    SearchRequest,
};
use crate::archive::read::ArchivedEvent;
use crate::query::{CmpOp, Expr, Literal};

/// Longest any single call to Meilisearch may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest an indexing task may take before the batch is retried.
const TASK_TIMEOUT: Duration = Duration::from_secs(60);

pub struct MeiliIndex {
    client: Client,
    url: String,
    /// Teams whose index exists with our settings.
    ready_teams: Mutex<HashSet<String>>,
}

#[derive(Serialize, Deserialize)]
struct Doc {
    id: String,
    collection: String,
    received_at: i64,
    content_type: String,
    /// The original payload: UTF-8 text as is, anything else base64.
    raw: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    raw_base64: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    p: Option<serde_json::Value>,
}

fn unavailable(e: impl std::fmt::Display) -> SearchError {
    SearchError::Unavailable(format!("Meilisearch: {e}"))
}

async fn timed<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, MeiliError>>,
) -> Result<T, MeiliError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => Err(MeiliError::Other(
            format!("{what} did not answer within {CALL_TIMEOUT:?}").into(),
        )),
    }
}

/// A search refused because our own attributes are not filterable/sortable yet: the index
/// exists but its settings task has not finished.
fn settings_pending(e: &meilisearch_sdk::errors::MeilisearchError) -> bool {
    matches!(
        e.error_code,
        ErrorCode::InvalidSearchFilter | ErrorCode::InvalidSearchSort
    ) && (e.error_message.contains("not filterable") || e.error_message.contains("not sortable"))
        && ["`collection`", "`received_at`", "`id`"]
            .iter()
            .any(|a| e.error_message.contains(a))
}

fn index_uid(team_id: &str) -> String {
    format!("rewind-{team_id}")
}

fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fn attribute(path: &str) -> String {
    let full = format!("p.{path}");
    if full
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        full
    } else {
        quote(&full)
    }
}

fn value(lit: &Literal) -> String {
    match lit.number {
        Some(_) => lit.text.clone(),
        None => quote(&lit.text),
    }
}

/// The filter in Meilisearch's syntax, selecting the same events or a superset; `None` when
/// it cannot narrow anything (every event of the collection is a candidate).
pub fn translate(expr: &Expr) -> Option<String> {
    translate_exact(expr).0
}

/// The translation and whether Meilisearch reads it as we do (only exact parts may be negated).
fn translate_exact(expr: &Expr) -> (Option<String>, bool) {
    match expr {
        Expr::And(parts) => {
            let parts: Vec<_> = parts.iter().map(translate_exact).collect();
            let exact = parts.iter().all(|p| p.1);
            let kept: Vec<String> = parts
                .into_iter()
                .filter_map(|p| p.0.map(|s| format!("({s})")))
                .collect();
            if kept.is_empty() {
                (None, exact)
            } else {
                (Some(kept.join(" AND ")), exact)
            }
        }
        Expr::Or(parts) => {
            let parts: Vec<_> = parts.iter().map(translate_exact).collect();
            let exact = parts.iter().all(|p| p.1);
            if parts.iter().any(|p| p.0.is_none()) {
                return (None, false);
            }
            let joined = parts
                .into_iter()
                .filter_map(|p| p.0.map(|s| format!("({s})")))
                .collect::<Vec<_>>()
                .join(" OR ");
            (Some(joined), exact)
        }
        Expr::Not(inner) => match translate_exact(inner) {
            (Some(s), true) => (Some(format!("NOT ({s})")), true),
            _ => (None, false),
        },
        Expr::Exists(path) => (Some(format!("{} EXISTS", attribute(path))), true),
        // Meilisearch compares text case-insensitively: `= "Beta"` also finds "beta", a
        // superset that may not be negated. Numbers compare exactly.
        Expr::Cmp(path, CmpOp::Eq, lit) => (
            Some(format!("{} = {}", attribute(path), value(lit))),
            lit.number.is_some(),
        ),
        Expr::Cmp(path, CmpOp::Ne, lit) if lit.number.is_some() => {
            (Some(format!("{} != {}", attribute(path), value(lit))), true)
        }
        Expr::Cmp(_, CmpOp::Ne, _) => (None, false),
        // Meilisearch orders numbers only: a text bound becomes "has the field" (a superset).
        Expr::Cmp(path, _, lit) if lit.number.is_none() => {
            (Some(format!("{} EXISTS", attribute(path))), false)
        }
        Expr::Cmp(path, op, lit) => (
            Some(format!("{} {} {}", attribute(path), op.symbol(), lit.text)),
            true,
        ),
        Expr::In(path, lits) => (
            Some(format!(
                "{} IN [{}]",
                attribute(path),
                lits.iter().map(value).collect::<Vec<_>>().join(", ")
            )),
            lits.iter().all(|l| l.number.is_some()),
        ),
    }
}

impl MeiliIndex {
    pub fn new(url: &str, key: Option<&str>) -> Result<Self, SearchError> {
        let client = Client::new(url.trim_end_matches('/'), key).map_err(|e| {
            SearchError::Unavailable(format!(
                "cannot set up the Meilisearch client for {url}: {e}; check --search and REWIND_MEILI_KEY"
            ))
        })?;
        Ok(Self {
            client,
            url: url.to_string(),
            ready_teams: Mutex::default(),
        })
    }

    async fn wait(&self, task: meilisearch_sdk::task_info::TaskInfo) -> Result<(), SearchError> {
        let done = self
            .client
            .wait_for_task(task, Some(Duration::from_millis(20)), Some(TASK_TIMEOUT))
            .await
            .map_err(unavailable)?;
        match done {
            Task::Failed { content } => Err(SearchError::Internal(format!(
                "Meilisearch task failed: {}",
                content.error.error_message
            ))),
            _ => Ok(()),
        }
    }

    /// Creates the team's index and applies our settings, once per process.
    /// (Searches that arrive between the two see [`settings_pending`] errors.)
    async fn prepare_team(&self, team_id: &str) -> Result<(), SearchError> {
        if self.ready_teams.lock().expect("lock").contains(team_id) {
            return Ok(());
        }
        let uid = index_uid(team_id);
        match timed("create index", self.client.create_index(&uid, Some("id"))).await {
            Ok(task) => self.wait(task).await.or_else(|e| match e {
                SearchError::Internal(m) if m.contains("already exists") => Ok(()),
                other => Err(other),
            })?,
            Err(MeiliError::Meilisearch(e)) if e.error_code == ErrorCode::IndexAlreadyExists => {}
            Err(e) => return Err(unavailable(e)),
        }
        let settings = Settings::new()
            .with_filterable_attributes(["p", "collection", "received_at"])
            .with_sortable_attributes(["received_at", "id"])
            .with_searchable_attributes(["p"])
            .with_typo_tolerance(TypoToleranceSettings {
                enabled: Some(false),
                disable_on_attributes: None,
                disable_on_words: None,
                min_word_size_for_typos: None,
                disable_on_numbers: None,
            })
            .with_pagination(PaginationSetting {
                max_total_hits: 100_000,
            })
            .with_faceting(FacetingSettings {
                max_values_per_facet: MAX_FACET_VALUES,
                sort_facet_values_by: None,
            });
        let task = timed(
            "update settings",
            self.client.index(&uid).set_settings(&settings),
        )
        .await
        .map_err(unavailable)?;
        self.wait(task).await?;
        self.ready_teams
            .lock()
            .expect("lock")
            .insert(team_id.to_string());
        Ok(())
    }

    fn to_doc(d: &IndexDoc) -> Doc {
        use base64::Engine;
        let json = d.content_type == "application/json";
        let (raw, raw_base64) = match std::str::from_utf8(&d.payload) {
            Ok(text) => (text.to_string(), None),
            Err(_) => (
                base64::engine::general_purpose::STANDARD.encode(&d.payload),
                Some(true),
            ),
        };
        Doc {
            id: d.id.clone(),
            collection: d.collection_id.clone(),
            received_at: d.received_at,
            content_type: d.content_type.clone(),
            raw,
            raw_base64,
            p: if json {
                serde_json::from_slice(&d.payload).ok()
            } else {
                None
            },
        }
    }

    fn to_event(d: Doc) -> ArchivedEvent {
        use base64::Engine;
        let payload = if d.raw_base64 == Some(true) {
            base64::engine::general_purpose::STANDARD
                .decode(d.raw.as_bytes())
                .unwrap_or_default()
        } else {
            d.raw.into_bytes()
        };
        ArchivedEvent {
            id: d.id,
            received_at: d.received_at,
            content_type: d.content_type,
            payload: Bytes::from(payload),
        }
    }
}

#[async_trait]
impl SearchIndex for MeiliIndex {
    fn kind(&self) -> &'static str {
        "meilisearch"
    }

    async fn index(&self, docs: Vec<IndexDoc>) -> Result<(), SearchError> {
        let mut by_team: std::collections::BTreeMap<&str, Vec<Doc>> = Default::default();
        for d in &docs {
            by_team.entry(&d.team_id).or_default().push(Self::to_doc(d));
        }
        for (team, docs) in by_team {
            self.prepare_team(team).await?;
            // Upserts by id: a redelivered event replaces its own copy.
            let task = timed(
                "add documents",
                self.client
                    .index(index_uid(team))
                    .add_or_replace(&docs, Some("id")),
            )
            .await
            .map_err(unavailable)?;
            self.wait(task).await?;
        }
        Ok(())
    }

    async fn search(&self, request: &SearchRequest) -> Result<SearchPage, SearchError> {
        let index = self.client.index(index_uid(&request.team_id));
        let mut clauses = vec![format!("collection = {}", quote(&request.collection_id))];
        if request.from > i64::MIN {
            clauses.push(format!("received_at >= {}", request.from));
        }
        let mut to = request.to;
        if let Some(c) = &request.cursor {
            // Ties on received_at are dropped below, by id.
            to = to.min(c.received_at.saturating_add(1));
        }
        if to < i64::MAX {
            clauses.push(format!("received_at < {to}"));
        }
        if let Some(f) = request.filter.as_ref().and_then(translate) {
            clauses.push(format!("({f})"));
        }
        let filter = clauses.join(" AND ");
        let sort = ["received_at:desc", "id:desc"];
        let facet_fields: Vec<String> = request.facet.iter().map(|f| format!("p.{f}")).collect();
        let facet_refs: Vec<&str> = facet_fields.iter().map(String::as_str).collect();
        let want = request.limit + 1;
        let page_size = (want * 2).clamp(20, 1000);
        let mut events = Vec::with_capacity(want);
        let mut facets = None;
        let mut offset = 0;
        loop {
            let mut query = index.search();
            query
                .with_filter(&filter)
                .with_sort(&sort)
                .with_limit(page_size)
                .with_offset(offset)
                .with_matching_strategy(MatchingStrategies::ALL);
            if let Some(q) = &request.q {
                query.with_query(q);
            }
            if offset == 0 && !facet_refs.is_empty() {
                query.with_facets(Selectors::Some(&facet_refs));
            }
            let result = match timed("search", query.execute::<Doc>()).await {
                Ok(r) => r,
                Err(MeiliError::Meilisearch(e))
                    if e.error_code == ErrorCode::IndexNotFound || settings_pending(&e) =>
                {
                    // No index yet, or created by another call whose settings are still being
                    // applied: documents are only added after them, so there is nothing to find.
                    return Ok(SearchPage {
                        facets: request.facet.as_ref().map(|_| Vec::new()),
                        ..SearchPage::default()
                    });
                }
                Err(e) => return Err(unavailable(e)),
            };
            if offset == 0 && request.facet.is_some() {
                let mut values: Vec<(String, u64)> = result
                    .facet_distribution
                    .as_ref()
                    .and_then(|d| d.get(&facet_fields[0]))
                    .map(|m| m.iter().map(|(k, v)| (k.clone(), *v as u64)).collect())
                    .unwrap_or_default();
                values.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                facets = Some(values);
            }
            let fetched = result.hits.len();
            for hit in result.hits {
                let event = Self::to_event(hit.result);
                if super::selects(request, &event) {
                    events.push(event);
                    if events.len() == want {
                        break;
                    }
                }
            }
            if events.len() == want || fetched < page_size || offset + fetched >= 100_000 {
                break;
            }
            offset += fetched;
        }
        let mut next_cursor = None;
        if events.len() > request.limit {
            events.truncate(request.limit);
            let last = events.last().expect("limit >= 1");
            next_cursor = Some(Cursor {
                received_at: last.received_at,
                id: last.id.clone(),
            });
        }
        Ok(SearchPage {
            events,
            next_cursor,
            facets,
        })
    }

    async fn delete_before(
        &self,
        team_id: &str,
        collection_id: &str,
        before: i64,
    ) -> Result<(), SearchError> {
        let index = self.client.index(index_uid(team_id));
        let filter = format!(
            "collection = {} AND received_at < {before}",
            quote(collection_id)
        );
        let mut query = meilisearch_sdk::documents::DocumentDeletionQuery::new(&index);
        query.with_filter(&filter);
        match timed("delete documents", index.delete_documents_with(&query)).await {
            Ok(task) => self.wait(task).await,
            Err(MeiliError::Meilisearch(e)) if e.error_code == ErrorCode::IndexNotFound => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn health(&self) -> SearchHealth {
        match timed("health", self.client.health()).await {
            Ok(h) => SearchHealth {
                kind: "meilisearch",
                ready: h.status == "available",
                detail: format!("{} is {}", self.url, h.status),
            },
            Err(e) => SearchHealth {
                kind: "meilisearch",
                ready: false,
                detail: format!("{} is unreachable: {e}", self.url),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_translate_to_meilisearch_syntax() {
        let e = crate::query::parse(
            r#"type = "a\"b" AND (amount >= 100 OR tags IN [x, 2]) AND NOT name < bob AND `we ird` EXISTS"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            translate(&e).unwrap(),
            r#"(p.type = "a\"b") AND ((p.amount >= 100) OR (p.tags IN ["x", 2])) AND ("p.we ird" EXISTS)"#
        );
        // A text bound cannot be negated: the whole filter is left to the event check.
        let e = crate::query::parse("NOT name < bob").unwrap().unwrap();
        assert_eq!(translate(&e), None);
    }
}
