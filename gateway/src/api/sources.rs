//! `/v1/sources`: a team's subscriptions on its own NATS server, each bound to an ingress
//! plugin and a collection (docs/plugins.md#sources). Admin scope; a team sees only its own.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::rest::{Auth, JsonBody};
use super::{ApiError, AppState};
use crate::auth::Scope;
use crate::ids::{micros_to_rfc3339, now_micros};
use crate::meta::{MetaError, SourceRecord};
use crate::sources::{SourceUrlError, check_subject, display_url, resolve};

type St = State<(Arc<AppState>, usize)>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSource {
    name: String,
    /// `name@version` of an ingress plugin.
    plugin: String,
    collection: String,
    /// `nats://[user:password@]host[:port]`.
    url: String,
    subject: String,
    #[serde(default)]
    config: Value,
}

async fn source_json(state: &AppState, s: &SourceRecord) -> Result<Value, ApiError> {
    let p = state.meta.get_plugin(&s.team_id, &s.plugin_id).await?;
    let c = state
        .meta
        .get_collection(&s.team_id, &s.collection_id)
        .await?;
    let status = state.sources.status(&s.id);
    Ok(json!({
        "id": s.id,
        "name": s.name,
        "plugin": p.map(|p| format!("{}@{}", p.name, p.version)).unwrap_or_default(),
        "collection": c.map(|c| c.name).unwrap_or_default(),
        "url": display_url(&s.url),
        "subject": s.subject,
        "config": serde_json::from_str::<Value>(&s.config).unwrap_or(Value::Null),
        "created_at": micros_to_rfc3339(s.created_at),
        "status": status.map(|st| serde_json::to_value(st).unwrap_or(Value::Null)),
    }))
}

/// `POST /v1/sources`: checks the plugin (an ingress plugin that accepts the config), the
/// collection, the subject and the URL (which must resolve to an address sources may reach),
/// saves the source and subscribes.
pub async fn create_source(
    State((state, _)): St,
    Auth(who): Auth,
    JsonBody(s): JsonBody<NewSource>,
) -> Result<Response, ApiError> {
    let caller = who.require(Scope::Admin)?;
    if !super::plugins::valid_name(&s.name) {
        return Err(ApiError::bad_request(
            "source names are 1-64 letters, digits, `_`, `-` or `.`",
        ));
    }
    check_subject(&s.subject).map_err(ApiError::bad_request)?;
    let config = super::plugins::object_config(s.config)?;
    match resolve(&s.url, state.allow_private_destinations).await {
        Ok(_) => {}
        Err(SourceUrlError::Invalid(e) | SourceUrlError::Refused(e)) => {
            return Err(ApiError::bad_request(e));
        }
    }
    let collection =
        super::admin::get_collection(state.meta.as_ref(), &caller.team_id, &s.collection).await?;
    let (p, text) =
        super::plugins::ingress_plugin(&state, &caller.team_id, &s.plugin, &config, "a source")
            .await?;
    let record = SourceRecord {
        id: format!("src_{}", hex::encode(rand::random::<[u8; 12]>())),
        team_id: caller.team_id.clone(),
        name: s.name,
        plugin_id: p.id.clone(),
        collection_id: collection.id.clone(),
        config: text,
        url: s.url,
        subject: s.subject,
        created_at: now_micros(),
    };
    match state.meta.create_source(&record).await {
        Ok(()) => {}
        Err(MetaError::AlreadyExists { name, .. }) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "already_exists",
                format!("source {name:?} already exists"),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    state.sources.start(state.clone(), record.clone());
    Ok((
        StatusCode::CREATED,
        Json(source_json(&state, &record).await?),
    )
        .into_response())
}

pub async fn list_sources(State((state, _)): St, Auth(who): Auth) -> Result<Json<Value>, ApiError> {
    let caller = who.require(Scope::Admin)?;
    let mut out = Vec::new();
    for s in state.meta.list_sources(&caller.team_id).await? {
        out.push(source_json(&state, &s).await?);
    }
    Ok(Json(json!({"sources": out})))
}

async fn find(state: &AppState, team_id: &str, id: &str) -> Result<SourceRecord, ApiError> {
    state
        .meta
        .list_sources(team_id)
        .await?
        .into_iter()
        .find(|s| s.id == id || s.name == id)
        .ok_or_else(|| ApiError::not_found(&format!("source {id:?}")))
}

pub async fn get_source(
    State((state, _)): St,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let caller = who.require(Scope::Admin)?;
    let s = find(&state, &caller.team_id, &id).await?;
    Ok(Json(source_json(&state, &s).await?))
}

pub async fn delete_source(
    State((state, _)): St,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let caller = who.require(Scope::Admin)?;
    let s = find(&state, &caller.team_id, &id).await?;
    if state.meta.delete_source(&caller.team_id, &s.id).await? {
        state.sources.stop(&s.id);
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(&format!("source {id:?}")))
    }
}
