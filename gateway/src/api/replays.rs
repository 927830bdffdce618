//! The replay API (docs/replays.md): `POST /v1/replays` (create, or `dry_run`),
//! `GET /v1/replays[/{id}]`, `POST /v1/replays/{id}/pause|resume|cancel`. Every call needs the
//! `replay` scope and counts against the team's replay API rate (429 + `Retry-After`). The
//! checks and the create logic here are shared with gRPC `ReplayService`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::rest::{Auth, JsonBody};
use super::{ApiError, AppState};
use crate::auth::{Principal, Scope, TeamCaller};
use crate::ids::now_micros;
use crate::meta::ReplayRecord;
use crate::replay::{
    Control, DEFAULT_BATCH, DEFAULT_MAX_FAILURE_RATIO, DEFAULT_MAX_RETRIES, MAX_BATCH, Pace,
    ReplaySpec, Target, replay_json,
};

type St = State<(Arc<AppState>, usize)>;

/// Most events a dry run returns as its sample.
const SAMPLE: usize = 10;

/// The body of `POST /v1/replays`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NewReplay {
    pub collection: String,
    /// RFC 3339; default: the beginning of the archive.
    #[serde(default)]
    pub from: Option<String>,
    /// RFC 3339; default: now.
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub filter: Option<String>,
    #[serde(default)]
    pub limit: Option<i64>,
    /// A destination's name or id, or `{"collection": "<name or id>"}`.
    #[serde(default)]
    pub destination: Option<Value>,
    #[serde(default)]
    pub rate_per_sec: Option<f64>,
    /// `unpaced` (default, or `rate` when `rate_per_sec` is set) or `original`.
    #[serde(default)]
    pub pace: Option<String>,
    /// With `pace: original`: how many times faster than the original gaps (default 1).
    #[serde(default)]
    pub speed: Option<f64>,
    #[serde(default)]
    pub transforms: Vec<super::plugins::StepBody>,
    #[serde(default)]
    pub batch_size: Option<usize>,
    #[serde(default)]
    pub max_retries: Option<u32>,
    #[serde(default)]
    pub max_failure_ratio: Option<f64>,
    #[serde(default)]
    pub dry_run: bool,
}

/// A caller of the replay API: the `replay` scope, within the team's API rate.
pub fn caller<'a>(state: &AppState, who: &'a Principal) -> Result<&'a TeamCaller, ApiError> {
    let caller = who.require(Scope::Replay)?;
    if let Err(wait) = state.replays.api_limiter.check(&caller.team_id) {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "too many replay API requests for your team (at most {} a second): retry in {:.1}s",
                state.replays.options.api_rate,
                wait.as_secs_f64()
            ),
        );
        e.retry_after = Some(wait);
        e.rate_limit_burst = Some(state.replays.options.api_rate * 2);
        return Err(e);
    }
    Ok(caller)
}

fn time(name: &str, value: Option<&str>, default: i64) -> Result<i64, ApiError> {
    match value {
        None | Some("") => Ok(default),
        Some(v) => chrono::DateTime::parse_from_rfc3339(v)
            .map(|t| t.timestamp_micros())
            .map_err(|e| {
                ApiError::bad_request(format!(
                    "`{name}` must be an RFC 3339 time such as 2026-11-25T10:00:00Z, got {v:?}: {e}"
                ))
            }),
    }
}

/// What a create request turned into.
pub enum Created {
    Replay(Box<ReplayRecord>),
    DryRun(Value),
}

/// Validates a replay request and stores it as `pending` (or answers a dry run).
pub async fn create(
    state: &Arc<AppState>,
    caller: &TeamCaller,
    req: NewReplay,
) -> Result<Created, ApiError> {
    let team = &caller.team_id;
    let collection =
        super::admin::get_collection(state.meta.as_ref(), team, &req.collection).await?;
    let from = time("from", req.from.as_deref(), 0)?;
    let to = time("to", req.to.as_deref(), now_micros())?;
    if to <= from {
        return Err(ApiError::bad_request(format!(
            "`to` ({}) must be after `from` ({}): a replay covers [from, to)",
            crate::ids::micros_to_rfc3339(to),
            crate::ids::micros_to_rfc3339(from)
        )));
    }
    let filter = req.filter.filter(|f| !f.trim().is_empty());
    let expr = super::rest::parse_filter(filter.as_deref())?;
    if let Some(l) = req.limit
        && l <= 0
    {
        return Err(ApiError::bad_request(
            "`limit` must be a positive number of events",
        ));
    }
    if req.dry_run {
        return dry_run(state, team, &collection.id, from, to, expr, req.limit).await;
    }
    let target = match &req.destination {
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request(
                "`destination` is required: the name or id of a destination (GET /v1/destinations lists them) or {\"collection\": \"<name>\"} to backfill another collection",
            ));
        }
        Some(Value::String(d)) => {
            let dest = state.meta.get_destination(team, d).await?.ok_or_else(|| {
                ApiError::bad_request(format!(
                    "destination {d:?} not found in your team: create it with POST /v1/destinations or list them with GET /v1/destinations"
                ))
            })?;
            Target::Destination {
                id: dest.id,
                name: dest.name,
            }
        }
        Some(Value::Object(o))
            if o.len() == 1 && o.get("collection").is_some_and(Value::is_string) =>
        {
            let name = o["collection"].as_str().unwrap_or_default();
            let c = state.meta.get_collection(team, name).await?.ok_or_else(|| {
                ApiError::bad_request(format!(
                    "destination collection {name:?} not found in your team: create it with POST /v1/collections"
                ))
            })?;
            if c.id == collection.id {
                return Err(ApiError::bad_request(
                    "a replay cannot deliver into the collection it reads from",
                ));
            }
            Target::Collection {
                id: c.id,
                name: c.name,
            }
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "`destination` must be a destination's name or id, or {{\"collection\": \"<name>\"}}; got {other}"
            )));
        }
    };
    let pace = match (req.pace.as_deref(), req.rate_per_sec, req.speed) {
        (Some("original"), None, speed) => {
            let speed = speed.unwrap_or(1.0);
            if !(speed > 0.0 && speed <= 1e6) {
                return Err(ApiError::bad_request(
                    "`speed` must be above 0 (and at most 1000000)",
                ));
            }
            Pace::Original { speed }
        }
        (Some("original"), Some(_), _) => {
            return Err(ApiError::bad_request(
                "`pace: original` and `rate_per_sec` exclude each other: choose one",
            ));
        }
        (None | Some("rate") | Some("unpaced"), rate, None) => match rate {
            Some(r) if r > 0.0 && r <= 1e7 => Pace::Rate { per_sec: r },
            Some(r) => {
                return Err(ApiError::bad_request(format!(
                    "`rate_per_sec` must be above 0 (and at most 10000000), got {r}"
                )));
            }
            None if req.pace.as_deref() == Some("rate") => {
                return Err(ApiError::bad_request("`pace: rate` needs `rate_per_sec`"));
            }
            None => Pace::Unpaced,
        },
        (None | Some("rate") | Some("unpaced"), _, Some(_)) => {
            return Err(ApiError::bad_request(
                "`speed` applies to `pace: original` only",
            ));
        }
        (Some(other), _, _) => {
            return Err(ApiError::bad_request(format!(
                "`pace` must be \"unpaced\", \"rate\" or \"original\", got {other:?}"
            )));
        }
    };
    let batch_size = req.batch_size.unwrap_or(DEFAULT_BATCH);
    if !(1..=MAX_BATCH).contains(&batch_size) {
        return Err(ApiError::bad_request(format!(
            "`batch_size` must be 1 to {MAX_BATCH}"
        )));
    }
    let max_retries = req.max_retries.unwrap_or(DEFAULT_MAX_RETRIES);
    if max_retries > 100 {
        return Err(ApiError::bad_request("`max_retries` is at most 100"));
    }
    let max_failure_ratio = req.max_failure_ratio.unwrap_or(DEFAULT_MAX_FAILURE_RATIO);
    if !(0.0..=1.0).contains(&max_failure_ratio) {
        return Err(ApiError::bad_request(
            "`max_failure_ratio` is a fraction from 0 to 1 (0.1 fails the replay when more than 10% of its events fail)",
        ));
    }
    if req.transforms.len() > crate::plugins::pipeline::MAX_STEPS {
        return Err(ApiError::bad_request(format!(
            "a replay has at most {} transforms",
            crate::plugins::pipeline::MAX_STEPS
        )));
    }
    let transforms = super::plugins::step_specs(state, team, req.transforms, "transforms").await?;
    if !transforms.is_empty() {
        state
            .pipelines
            .validate(team, transforms.clone())
            .await
            .map_err(super::plugins::pipeline_error)?;
    }
    let spec = ReplaySpec {
        collection: collection.name.clone(),
        from,
        to,
        filter,
        limit: req.limit,
        target,
        pace,
        transforms,
        batch_size,
        max_retries,
        max_failure_ratio,
    };
    let now = now_micros();
    let rec = ReplayRecord {
        id: crate::ids::new_id("rpl"),
        team_id: team.clone(),
        collection_id: collection.id.clone(),
        spec: serde_json::to_string(&spec).expect("a spec serializes"),
        status: "pending".into(),
        total: None,
        delivered: 0,
        failed: 0,
        retried: 0,
        checkpoint: None,
        rate_milli: 0,
        error: None,
        owner: None,
        lease_until: 0,
        created_at: now,
        updated_at: now,
        started_at: None,
        finished_at: None,
    };
    state.meta.create_replay(&rec).await?;
    state.replays.wake.notify_one();
    tracing::info!(replay = %rec.id, team = %team, collection = %collection.name, "replay created");
    Ok(Created::Replay(Box::new(rec)))
}

async fn dry_run(
    state: &Arc<AppState>,
    team: &str,
    collection_id: &str,
    from: i64,
    to: i64,
    filter: Option<crate::query::Expr>,
    limit: Option<i64>,
) -> Result<Created, ApiError> {
    let mut rx = crate::archive::read::spawn_scan(
        state.archive.clone(),
        state.meta.clone(),
        crate::archive::read::Scan {
            team_id: team.to_string(),
            collection_id: collection_id.to_string(),
            from,
            to,
            filter: filter.map(Arc::new),
            after: None,
        },
    );
    let mut count = 0i64;
    let mut sample = Vec::new();
    while let Some(chunk) = rx.recv().await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "archive_unavailable",
                format!("cannot read the archive: {e}; retry shortly"),
            )
        })?;
        for e in &chunk {
            if sample.len() < SAMPLE {
                sample.push(
                    serde_json::from_slice::<Value>(&crate::archive::read::export_line(e))
                        .unwrap_or(Value::Null),
                );
            }
        }
        count += chunk.len() as i64;
        if limit.is_some_and(|l| count >= l) {
            count = count.min(limit.unwrap_or(count));
            break;
        }
    }
    Ok(Created::DryRun(json!({
        "dry_run": true,
        "count": count,
        "sample": sample,
        "from": crate::ids::micros_to_rfc3339(from),
        "to": crate::ids::micros_to_rfc3339(to),
    })))
}

/// A replay of the caller's team, or 404 (also for another team's).
pub async fn find(state: &AppState, team: &str, id: &str) -> Result<ReplayRecord, ApiError> {
    state.meta.get_replay(team, id).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("replay {id:?} not found in your team: list them with GET /v1/replays"),
        )
    })
}

/// Applies pause / resume / cancel; 409 when the replay is in a state it does not apply to.
pub async fn control(
    state: &AppState,
    team: &str,
    id: &str,
    control: Control,
) -> Result<ReplayRecord, ApiError> {
    let current = find(state, team, id).await?;
    let (from, to) = control.transition();
    if current.status == to.as_str() {
        return Ok(current);
    }
    if !state
        .meta
        .set_replay_status(team, id, from, to.as_str(), None)
        .await?
    {
        let now = find(state, team, id).await?;
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_state",
            format!(
                "cannot {} replay {id}: it is {} (only a replay that is {} can be)",
                control.verb(),
                now.status,
                from.join(" or ")
            ),
        ));
    }
    if control == Control::Resume {
        state.replays.wake.notify_one();
    }
    find(state, team, id).await
}

pub async fn create_replay(
    State((state, _)): St,
    Auth(who): Auth,
    JsonBody(req): JsonBody<NewReplay>,
) -> Result<Response, ApiError> {
    let caller = caller(&state, &who)?;
    Ok(match create(&state, caller, req).await? {
        Created::Replay(rec) => (StatusCode::ACCEPTED, Json(replay_json(&rec))).into_response(),
        Created::DryRun(v) => Json(v).into_response(),
    })
}

#[derive(Deserialize)]
pub struct ListQuery {
    limit: Option<i64>,
}

pub async fn list_replays(
    State((state, _)): St,
    Auth(who): Auth,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let caller = caller(&state, &who)?;
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let list = state.meta.list_replays(&caller.team_id, limit).await?;
    Ok(Json(
        json!({"replays": list.iter().map(replay_json).collect::<Vec<_>>()}),
    ))
}

pub async fn get_replay(
    State((state, _)): St,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let caller = caller(&state, &who)?;
    Ok(Json(replay_json(
        &find(&state, &caller.team_id, &id).await?,
    )))
}

pub async fn control_replay(
    State((state, _)): St,
    Auth(who): Auth,
    Path((id, action)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let caller = caller(&state, &who)?;
    let c = match action.as_str() {
        "pause" => Control::Pause,
        "resume" => Control::Resume,
        "cancel" => Control::Cancel,
        other => {
            return Err(ApiError::not_found(&format!(
                "replay action {other:?} (use pause, resume or cancel)"
            )));
        }
    };
    Ok(Json(replay_json(
        &control(&state, &caller.team_id, &id, c).await?,
    )))
}
