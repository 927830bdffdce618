//! REST handlers (axum). Plain async functions: an [`Auth`] extractor authenticates, the
//! functions in [`super::admin`] and the ingestor do the work, [`ApiError`] renders failures.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequestParts, MatchedPath, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AppState, admin};
use crate::api::ApiError;
use crate::auth::{Principal, Scope};
use crate::ids::micros_to_rfc3339;
use crate::ingest::IncomingEvent;
use crate::ingest::parse::{ACCEPTED_CONTENT_TYPES, BodyFormat, parse_body};
use crate::meta::{Collection, TokenRecord};
use crate::metrics::RequestLabels;

pub fn router(state: Arc<AppState>) -> Router {
    let body_limit = state.ingest.limits().max_request_bytes;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/teams", post(create_team))
        .route("/v1/tokens", post(create_token).get(list_tokens))
        .route("/v1/tokens/{id}", delete(revoke_token))
        .route(
            "/v1/collections",
            post(create_collection).get(list_collections),
        )
        .route(
            "/v1/collections/{id}",
            get(get_collection).patch(patch_collection),
        )
        .route(INGEST_ROUTE, post(ingest_events).get(search_events))
        .route("/v1/collections/{id}/events/{event_id}", get(get_event))
        .route("/v1/collections/{id}/export", get(export))
        .route("/v1/collections/{id}/tail", get(tail))
        .route("/v1/collections/{id}/schema", get(schema))
        .route(
            "/v1/collections/{id}/pipeline",
            get(super::plugins::get_pipeline).put(super::plugins::put_pipeline),
        )
        .route(
            "/v1/plugins",
            post(super::plugins::upload).get(super::plugins::list),
        )
        .route(
            "/v1/plugins/{id}",
            get(super::plugins::get).delete(super::plugins::delete),
        )
        .route(
            "/v1/destinations",
            post(super::plugins::create_destination).get(super::plugins::list_destinations),
        )
        .route(
            "/v1/destinations/{id}",
            get(super::plugins::get_destination).delete(super::plugins::delete_destination),
        )
        .route(
            "/v1/destinations/{id}/test",
            post(super::plugins::test_destination),
        )
        .route(
            "/v1/hooks",
            post(super::plugins::create_hook).get(super::plugins::list_hooks),
        )
        .route(
            "/v1/hooks/{id}",
            post(super::plugins::receive_hook).delete(super::plugins::delete_hook),
        )
        .route(
            "/v1/sources",
            post(super::sources::create_source).get(super::sources::list_sources),
        )
        .route(
            "/v1/sources/{id}",
            get(super::sources::get_source).delete(super::sources::delete_source),
        )
        .route(
            "/v1/replays",
            post(super::replays::create_replay).get(super::replays::list_replays),
        )
        .route("/v1/replays/{id}", get(super::replays::get_replay))
        .route(
            "/v1/replays/{id}/{action}",
            post(super::replays::control_replay),
        )
        // Bodies are read by the handlers with their own limit and error message.
        .layer(DefaultBodyLimit::disable())
        .fallback(not_found)
        .with_state((state, body_limit))
}

type St = State<(Arc<AppState>, usize)>;

/// The authenticated caller of a REST request.
pub struct Auth(pub Principal);

impl FromRequestParts<(Arc<AppState>, usize)> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        (state, _): &(Arc<AppState>, usize),
    ) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        Ok(Auth(state.auth.authenticate_header(header).await?))
    }
}

/// JSON bodies of admin calls: errors become our 400s rather than axum's plain text.
pub struct JsonBody<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::to_bytes(req.into_body(), 1 << 20)
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    "admin request bodies are limited to 1 MiB",
                )
            })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
    }
}

/// The REST ingest route (its requests are also timed, see `ingest_request_seconds`).
const INGEST_ROUTE: &str = "/v1/collections/{id}/events";

/// Counts every request (REST and gRPC) by route and status.
pub async fn track_requests(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| {
            if request.uri().path().starts_with("/rewind.v1.") {
                request.uri().path().to_string()
            } else {
                "unmatched".into()
            }
        });
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    if method == "POST" && route == INGEST_ROUTE {
        state
            .metrics
            .ingest_request_seconds
            .observe(started.elapsed().as_secs_f64());
    }
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            method,
            route,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint: see the API in docs/api.md",
    )
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State((state, _)): St) -> Response {
    let meta = match state.meta.ping().await {
        Ok(()) => json!({"ready": true, "kind": state.meta.kind()}),
        Err(e) => json!({"ready": false, "kind": state.meta.kind(), "detail": e.to_string()}),
    };
    let bus = state.bus.health().await;
    let ready = meta["ready"] == true && bus.ready;
    let archive_lag = bus
        .consumer_lag
        .iter()
        .find(|(n, _)| n == crate::archive::archiver::CONSUMER)
        .map_or(0, |(_, l)| *l);
    let archive_error = state
        .archive_status
        .last_error
        .lock()
        .expect("lock")
        .clone();
    let status = &state.archive_status;
    use std::sync::atomic::Ordering::Relaxed;
    let archive = json!({
        "ready": archive_error.is_none(),
        "behind": archive_error.is_some(),
        "detail": archive_error,
        "lag_messages": archive_lag,
        "buffered_events": status.buffered_events.load(Relaxed),
        "files_written": status.files_written.load(Relaxed),
        "events_archived": status.events_archived.load(Relaxed),
    });
    let search_health = state.search.index.health().await;
    let search_error = state.search.status.last_error.lock().expect("lock").clone();
    let search_lag = bus
        .consumer_lag
        .iter()
        .find(|(n, _)| *n == state.search.consumer)
        .map_or(0, |(_, l)| *l);
    let search = json!({
        "ready": search_health.ready && search_error.is_none(),
        "kind": search_health.kind,
        "detail": search_error.unwrap_or(search_health.detail),
        "behind": search_error_is_some_or_lag(&state, search_lag),
        "lag_messages": search_lag,
        "events_indexed": state.search.status.events_indexed.load(Relaxed),
        "events_collected": state.search.status.events_collected.load(Relaxed),
        "default_window_secs": state.search.windows.default_window().as_secs(),
    });
    let lag: serde_json::Map<String, Value> = bus
        .consumer_lag
        .iter()
        .map(|(n, l)| (n.clone(), json!(l)))
        .collect();
    let body = json!({
        "ready": ready,
        "backends": {
            "metastore": meta,
            "bus": {"ready": bus.ready, "kind": bus.kind, "detail": bus.detail, "consumer_lag": lag},
            "archive": archive,
            "search": search,
        }
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// The index is behind when the indexer has an error or more than a few messages to catch up.
fn search_error_is_some_or_lag(state: &AppState, lag: u64) -> bool {
    state
        .search
        .status
        .last_error
        .lock()
        .expect("lock")
        .is_some()
        || lag > 100
}

async fn metrics(State((state, _)): St) -> Response {
    let search = state.search.index.health().await;
    let search_ok = state
        .search
        .status
        .last_error
        .lock()
        .expect("lock")
        .is_none();
    state
        .metrics
        .search_ready
        .set((search.ready && search_ok) as i64);
    state.metrics.search_indexed.set(
        state
            .search
            .status
            .events_indexed
            .load(std::sync::atomic::Ordering::Relaxed) as i64,
    );
    state.metrics.refresh_allocator();
    let health = state.bus.health().await;
    state.metrics.bus_ready.set(health.ready as i64);
    for (consumer, lag) in health.consumer_lag {
        state
            .metrics
            .bus_lag
            .get_or_create(&crate::metrics::ConsumerLabel { consumer })
            .set(lag as i64);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

#[derive(Deserialize)]
struct NameBody {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CollectionBody {
    name: String,
    #[serde(default)]
    search_window_secs: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CollectionPatch {
    search_window_secs: Option<i64>,
}

async fn create_team(
    State((state, _)): St,
    Auth(who): Auth,
    JsonBody(body): JsonBody<NameBody>,
) -> Result<impl IntoResponse, ApiError> {
    let (team, token) = admin::create_team(state.meta.as_ref(), &who, &body.name).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": team.id, "name": team.name, "admin_token": token.secret})),
    ))
}

#[derive(Deserialize)]
struct CreateTokenBody {
    name: String,
    scopes: Vec<String>,
}

fn token_json(t: &TokenRecord) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "scopes": t.scopes.names(),
        "prefix": t.prefix,
        "created_at": micros_to_rfc3339(t.created_at),
        "revoked_at": t.revoked_at.map(micros_to_rfc3339),
    })
}

async fn create_token(
    State((state, _)): St,
    Auth(who): Auth,
    JsonBody(body): JsonBody<CreateTokenBody>,
) -> Result<impl IntoResponse, ApiError> {
    let scopes = admin::parse_scopes(body.scopes.iter().map(String::as_str))?;
    let created = admin::create_token(state.meta.as_ref(), &who, &body.name, scopes).await?;
    let mut out = token_json(&created.record);
    out["token"] = json!(created.secret);
    Ok((StatusCode::CREATED, Json(out)))
}

async fn list_tokens(State((state, _)): St, Auth(who): Auth) -> Result<Json<Value>, ApiError> {
    let tokens = admin::list_tokens(state.meta.as_ref(), &who).await?;
    Ok(Json(
        json!({"tokens": tokens.iter().map(token_json).collect::<Vec<_>>()}),
    ))
}

async fn revoke_token(
    State((state, _)): St,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    admin::revoke_token(state.meta.as_ref(), &who, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn collection_json(c: &Collection) -> Value {
    json!({"id": c.id, "name": c.name, "created_at": micros_to_rfc3339(c.created_at),
           "search_window_secs": c.search_window_secs})
}

async fn create_collection(
    State((state, _)): St,
    Auth(who): Auth,
    JsonBody(body): JsonBody<CollectionBody>,
) -> Result<impl IntoResponse, ApiError> {
    let c = admin::create_collection(
        state.meta.as_ref(),
        &who,
        &body.name,
        body.search_window_secs,
    )
    .await?;
    state.search.windows.set(&c.id, c.search_window_secs);
    Ok((StatusCode::CREATED, Json(collection_json(&c))))
}

/// `PATCH /v1/collections/{id}` `{"search_window_secs": N | null}`.
async fn patch_collection(
    State((state, _)): St,
    Auth(who): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<CollectionPatch>,
) -> Result<Json<Value>, ApiError> {
    let c =
        admin::set_search_window(state.meta.as_ref(), &who, &id, body.search_window_secs).await?;
    state.search.windows.set(&c.id, c.search_window_secs);
    Ok(Json(collection_json(&c)))
}

async fn list_collections(State((state, _)): St, Auth(who): Auth) -> Result<Json<Value>, ApiError> {
    let list = admin::list_collections(state.meta.as_ref(), &who).await?;
    Ok(Json(
        json!({"collections": list.iter().map(collection_json).collect::<Vec<_>>()}),
    ))
}

async fn get_collection(
    State((state, _)): St,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let caller = who.team()?;
    let c = admin::get_collection(state.meta.as_ref(), &caller.team_id, &id).await?;
    Ok(Json(collection_json(&c)))
}

/// Reads a body of at most `limit` bytes. An oversized body is still read (and discarded) up to
/// a cap, so the client, which is usually still sending, reliably receives the 413 instead of
/// a connection reset; `None` means "too large".
pub(super) async fn read_body_limited(
    body: Body,
    limit: usize,
) -> Result<Option<bytes::Bytes>, ApiError> {
    read_body_draining(body, limit, limit.saturating_mul(4).max(64 << 20)).await
}

/// [`read_body_limited`] that drains an oversized body up to `drain_cap` bytes.
pub(super) async fn read_body_draining(
    body: Body,
    limit: usize,
    drain_cap: usize,
) -> Result<Option<bytes::Bytes>, ApiError> {
    use axum::body::HttpBody as _;
    use http_body_util::BodyExt;
    let mut body = body;
    // Sized up front from `Content-Length` (capped at the limit): growing from empty copied
    // a batch's bytes about once more, in reallocations, on the request path.
    let expected = body
        .size_hint()
        .exact()
        .map_or(0, |n| n.min(limit as u64) as usize);
    let mut buf = bytes::BytesMut::with_capacity(expected);
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::bad_request(format!("could not read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len();
        if seen <= limit {
            buf.extend_from_slice(&data);
        } else {
            buf = bytes::BytesMut::new();
            if seen > drain_cap {
                break;
            }
        }
    }
    Ok((seen <= limit).then(|| buf.freeze()))
}

async fn ingest_events(
    State((state, body_limit)): St,
    Auth(who): Auth,
    Path(id): Path<String>,
    request: Request<Body>,
) -> Result<impl IntoResponse, ApiError> {
    let caller = who.require(Scope::Ingest)?;
    let collection = admin::get_collection(state.meta.as_ref(), &caller.team_id, &id).await?;
    let headers = request.headers();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let format = BodyFormat::from_content_type(content_type.as_deref()).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_content_type",
            format!(
                "Content-Type {:?} is not accepted: send {ACCEPTED_CONTENT_TYPES}",
                content_type.as_deref().unwrap_or("(none)")
            ),
        )
    })?;
    let idempotency_key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "the request body is over the {body_limit}-byte limit: split it into smaller requests"
            ),
        )
    };
    // Admission: room for the declared length (or 1 MiB when it is not declared) before the
    // body is read, topped up to the real size after.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let first = declared.unwrap_or(1 << 20).min(body_limit);
    let _admitted = state.ingest.admit(first).await.map_err(ApiError::from)?;
    let body = read_body_limited(request.into_body(), body_limit)
        .await?
        .ok_or_else(too_large)?;
    let _topped_up = if body.len() > first {
        Some(
            state
                .ingest
                .admit(body.len() - first)
                .await
                .map_err(ApiError::from)?,
        )
    } else {
        None
    };
    let parsed = parse_body(&body, format, state.ingest.limits())?;
    if idempotency_key.is_some() && parsed.len() > 1 {
        return Err(ApiError::bad_request(
            "the Idempotency-Key header applies to a single event; for batches, give each event its own id field",
        ));
    }
    let events: Vec<IncomingEvent> = parsed
        .into_iter()
        .map(|p| IncomingEvent {
            payload: p.payload,
            content_type: if p.is_json {
                "application/json".into()
            } else {
                "application/octet-stream".into()
            },
            headers: Default::default(),
            client_id: idempotency_key.clone(),
        })
        .collect();
    let ids = state
        .ingest
        .ingest(
            &caller.token_id,
            &caller.team_id,
            &collection.id,
            events,
            "http",
        )
        .await
        .map_err(|e| {
            let mut err = ApiError::from(e);
            if err.status == StatusCode::TOO_MANY_REQUESTS {
                err.rate_limit_burst = Some(state.ingest.rate_limit_burst());
            }
            err
        })?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"accepted": ids.len(), "ids": ids})),
    ))
}

#[derive(Deserialize)]
struct RangeQuery {
    from: Option<String>,
    to: Option<String>,
    filter: Option<String>,
}

fn parse_time(name: &str, value: Option<&str>, default: i64) -> Result<i64, ApiError> {
    match value {
        None | Some("") => Ok(default),
        Some(v) => chrono::DateTime::parse_from_rfc3339(v)
            .map(|t| t.timestamp_micros())
            .map_err(|e| {
                ApiError::bad_request(format!(
                    "`{name}` must be an RFC 3339 time such as 2026-11-25T10:00:00Z: {e}"
                ))
            }),
    }
}

/// Parses the `filter` parameter; a syntax error is a 400 naming the column.
pub(crate) fn parse_filter(filter: Option<&str>) -> Result<Option<crate::query::Expr>, ApiError> {
    crate::query::parse(filter.unwrap_or("")).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_filter",
            format!(
                "{e}. Filters look like: type = \"account_created\" AND amount >= 100 (see docs/query.md)"
            ),
        )
    })
}

#[derive(Deserialize)]
struct SearchQuery {
    q: Option<String>,
    filter: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
    facet: Option<String>,
}

/// Builds a [`crate::search::SearchRequest`] from API parameters (shared with gRPC); the
/// collection must already be the caller's.
#[allow(clippy::too_many_arguments)]
pub(crate) fn search_request(
    team_id: &str,
    collection_id: &str,
    q: Option<&str>,
    filter: Option<&str>,
    from: Option<&str>,
    to: Option<&str>,
    limit: Option<usize>,
    cursor: Option<&str>,
    facet: Option<&str>,
) -> Result<(crate::search::SearchRequest, bool), ApiError> {
    let filter = parse_filter(filter)?;
    let from = parse_time("from", from, i64::MIN)?;
    let to = parse_time("to", to, i64::MAX)?;
    if from >= to {
        return Err(ApiError::bad_request(
            "`from` must be before `to` (the range is [from, to))",
        ));
    }
    let cursor = match cursor {
        None | Some("") => None,
        Some(c) => Some(
            crate::search::Cursor::decode(c)
                .map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, "invalid_cursor", m))?,
        ),
    };
    let facet = facet.filter(|f| !f.is_empty()).map(str::to_string);
    let (limit, capped) = super::search::cap_limit(limit);
    Ok((
        crate::search::SearchRequest {
            team_id: team_id.to_string(),
            collection_id: collection_id.to_string(),
            filter,
            q: q.filter(|q| !q.trim().is_empty()).map(str::to_string),
            from,
            to,
            limit,
            cursor,
            facet,
        },
        capped,
    ))
}

/// `GET /v1/collections/{id}/events`: newest first, from the search index within the
/// collection's window and from the archive before it.
async fn search_events(
    State((state, _)): St,
    Auth(who): Auth,
    Path(id): Path<String>,
    axum::extract::Query(p): axum::extract::Query<SearchQuery>,
) -> Result<Response, ApiError> {
    let caller = who.require(Scope::Read)?;
    let collection = admin::get_collection(state.meta.as_ref(), &caller.team_id, &id).await?;
    let limit =
        match p.limit.as_deref() {
            None | Some("") => None,
            Some(l) => Some(l.parse::<usize>().map_err(|_| {
                ApiError::bad_request(format!("`limit` {l:?} is not a whole number"))
            })?),
        };
    let (request, capped) = search_request(
        &caller.team_id,
        &collection.id,
        p.q.as_deref(),
        p.filter.as_deref(),
        p.from.as_deref(),
        p.to.as_deref(),
        limit,
        p.cursor.as_deref(),
        p.facet.as_deref(),
    )?;
    let facet_field = request.facet.clone();
    let limit = request.limit;
    let outcome = super::search::search(&state, request, capped).await?;
    // Events are written as export lines (payload bytes verbatim), the rest with serde.
    let mut body = Vec::with_capacity(
        256 + outcome
            .page
            .events
            .iter()
            .map(|e| e.payload.len() + 96)
            .sum::<usize>(),
    );
    body.extend_from_slice(b"{\"events\":[");
    for (i, e) in outcome.page.events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        let line = crate::archive::read::export_line(e);
        body.extend_from_slice(&line[..line.len() - 1]);
    }
    body.extend_from_slice(b"],");
    let mut tail = json!({
        "next_cursor": outcome.page.next_cursor.as_ref().map(|c| c.encode()),
        "source": outcome.source.as_str(),
        "index_from": micros_to_rfc3339(outcome.index_from),
        "limit": limit,
    });
    if outcome.limit_capped {
        tail["limit_capped"] = json!(true);
    }
    if let (Some(field), Some(values)) = (facet_field, outcome.page.facets) {
        tail["facets"] = json!({
            "field": field,
            "values": values.iter().map(|(v, n)| json!({"value": v, "count": n})).collect::<Vec<_>>(),
        });
    }
    let tail = serde_json::to_vec(&tail)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    body.extend_from_slice(&tail[1..]);
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

#[derive(Deserialize)]
struct TailQuery {
    q: Option<String>,
    filter: Option<String>,
}

/// `GET /v1/collections/{id}/tail`: NDJSON of the events appended from now on that match,
/// one export line each, until the client disconnects.
async fn tail(
    State((state, _)): St,
    Auth(who): Auth,
    Path(id): Path<String>,
    axum::extract::Query(p): axum::extract::Query<TailQuery>,
) -> Result<Response, ApiError> {
    let caller = who.require(Scope::Read)?;
    let collection = admin::get_collection(state.meta.as_ref(), &caller.team_id, &id).await?;
    let filter = parse_filter(p.filter.as_deref())?;
    let q = p.q.filter(|q| !q.trim().is_empty());
    let rx = super::search::tail(&state, &caller.team_id, &collection.id, filter, q).await?;
    let lines =
        futures::StreamExt::map(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            |item| match item {
                Ok(e) => Ok::<_, std::io::Error>(bytes::Bytes::from(
                    crate::archive::read::export_line(&e),
                )),
                Err(e) => Err(std::io::Error::other(e)),
            },
        );
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(lines),
    )
        .into_response())
}

/// `GET /v1/collections/{id}/export`: every archived event in `[from, to)`, oldest first, as
/// NDJSON, streamed file group by file group.
async fn export(
    State((state, _)): St,
    Auth(who): Auth,
    Path(id): Path<String>,
    axum::extract::Query(q): axum::extract::Query<RangeQuery>,
) -> Result<Response, ApiError> {
    let caller = who.require(Scope::Read)?;
    let collection = admin::get_collection(state.meta.as_ref(), &caller.team_id, &id).await?;
    let filter = parse_filter(q.filter.as_deref())?;
    let from = parse_time("from", q.from.as_deref(), i64::MIN)?;
    let to = parse_time("to", q.to.as_deref(), i64::MAX)?;
    if from >= to {
        return Err(ApiError::bad_request(
            "`from` must be before `to` (the range is [from, to))",
        ));
    }
    let mut events = crate::archive::read::spawn_scan(
        state.archive.clone(),
        state.meta.clone(),
        crate::archive::read::Scan {
            team_id: caller.team_id.clone(),
            collection_id: collection.id.clone(),
            from,
            to,
            filter: filter.map(std::sync::Arc::new),
            after: None,
        },
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(8);
    tokio::spawn(async move {
        let mut chunk = Vec::with_capacity(1 << 20);
        while let Some(batch) = events.recv().await {
            match batch {
                Ok(batch) => {
                    for e in &batch {
                        chunk.extend_from_slice(&crate::archive::read::export_line(e));
                    }
                    if chunk.len() >= 1 << 20
                        && tx
                            .send(Ok(std::mem::take(&mut chunk).into()))
                            .await
                            .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    // The status line is gone already: end the stream with an error so the
                    // client sees a broken transfer instead of a silently short export.
                    tracing::error!(error = %e, "export aborted");
                    if !chunk.is_empty() {
                        let _ = tx.send(Ok(std::mem::take(&mut chunk).into())).await;
                    }
                    let _ = tx.send(Err(std::io::Error::other(e))).await;
                    return;
                }
            }
        }
        if !chunk.is_empty() {
            let _ = tx.send(Ok(chunk.into())).await;
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

/// `GET /v1/collections/{id}/events/{event_id}`: one event, read from the archive. The ULID's
/// timestamp narrows the search to the files around it.
async fn get_event(
    State((state, _)): St,
    Auth(who): Auth,
    Path((id, event_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let caller = who.require(Scope::Read)?;
    let collection = admin::get_collection(state.meta.as_ref(), &caller.team_id, &id).await?;
    let ulid = ulid::Ulid::from_string(&event_id).map_err(|_| {
        ApiError::bad_request(format!(
            "{event_id:?} is not an event id (a 26-character ULID)"
        ))
    })?;
    let at = ulid.timestamp_ms() as i64 * 1000;
    let slack = 300_000_000; // ids are made right after received_at is taken
    // A file compacted away between listing and reading: list again (a few times at most).
    let mut attempts = 0;
    let found = 'search: loop {
        let files = state
            .meta
            .list_archive_files(&caller.team_id, &collection.id, at - slack, at + slack)
            .await?;
        for file in &files {
            match crate::archive::select::read_selected(
                &state.archive,
                file,
                i64::MIN,
                i64::MAX,
                None,
                false,
            )
            .await
            {
                Ok((events, _)) => {
                    if let Some(e) = events.into_iter().find(|e| e.id == event_id) {
                        break 'search Some(e);
                    }
                }
                Err(e) if e.not_found && attempts < 3 => {
                    attempts += 1;
                    continue 'search;
                }
                Err(e) => {
                    return Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "archive_unavailable",
                        format!("{e}; retry shortly"),
                    ));
                }
            }
        }
        break None;
    };
    if let Some(e) = found {
        let v: Value =
            serde_json::from_slice(&crate::archive::read::export_line(&e)).map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })?;
        return Ok(Json(v));
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "event {event_id} is not in the archive of this collection (recent events appear within --archive-flush-secs)"
        ),
    ))
}

/// `GET /v1/collections/{id}/schema`: inferred columns with first-seen times and widenings.
async fn schema(
    State((state, _)): St,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let caller = who.require(Scope::Read)?;
    let collection = admin::get_collection(state.meta.as_ref(), &caller.team_id, &id).await?;
    let columns = state.meta.collection_columns(Some(&collection.id)).await?;
    let fixed = json!([
        {"name": "id", "type": "string"},
        {"name": "received_at", "type": "timestamp[us, UTC]"},
        {"name": "content_type", "type": "string"},
        {"name": "client_id", "type": "string"},
        {"name": "headers", "type": "string (JSON)"},
        {"name": "payload", "type": "binary (the original bytes)"},
    ]);
    let inferred: Vec<Value> = columns
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "type": c.type_name,
                "first_seen": micros_to_rfc3339(c.first_seen),
                "widened_at": c.widened_at.map(micros_to_rfc3339),
                "widened_from": c.widened_from,
            })
        })
        .collect();
    let mut history: Vec<Value> = columns
        .iter()
        .flat_map(|c| {
            let mut h = vec![json!({"at": micros_to_rfc3339(c.first_seen), "change": "added", "column": c.name})];
            if let (Some(at), Some(from)) = (c.widened_at, &c.widened_from) {
                h.push(json!({"at": micros_to_rfc3339(at), "change": "widened", "column": c.name, "from": from, "to": c.type_name}));
            }
            h
        })
        .collect();
    history.sort_by(|a, b| a["at"].as_str().cmp(&b["at"].as_str()));
    Ok(Json(json!({
        "collection": collection.id,
        "columns": fixed.as_array().into_iter().flatten().cloned().chain(inferred).collect::<Vec<_>>(),
        "max_inferred_columns": crate::archive::schema::MAX_COLUMNS,
        "history": history,
    })))
}
