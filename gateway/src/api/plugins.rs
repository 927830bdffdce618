//! The plugin registry and destinations over REST: `POST/GET /v1/plugins`,
//! `GET/DELETE /v1/plugins/{id}`, `POST/GET /v1/destinations`, `GET/DELETE
//! /v1/destinations/{id}`, `POST /v1/destinations/{id}/test`. Plugins are team-scoped and
//! content-addressed: the component is validated and compiled by the host on upload, then
//! stored in the object store under `plugins/<team>/<sha256>.wasm`.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use object_store::ObjectStoreExt;
use serde::Deserialize;
use serde_json::{Value, json};

use super::rest::{Auth, JsonBody};
use super::{ApiError, AppState};
use crate::auth::Scope;
use crate::ids::{micros_to_rfc3339, new_id, now_micros};
use crate::meta::{DestinationRecord, MetaError, PluginRecord};
use crate::plugins::host::{Compiled, DeliveryResult, DestinationCaps, PluginEvent};
use crate::plugins::{MAX_UPLOAD_BYTES, PluginError, PluginKind};

type St = State<(Arc<AppState>, usize)>;

/// Reading plugins, destinations and pipelines takes `read` or `admin`.
fn read_or_admin(who: &crate::auth::Principal) -> Result<&crate::auth::TeamCaller, ApiError> {
    match who.require(Scope::Read) {
        Ok(c) => Ok(c),
        Err(_) => Ok(who.require(Scope::Admin)?),
    }
}

fn plugin_json(p: &PluginRecord) -> Value {
    json!({
        "id": p.id,
        "name": p.name,
        "version": p.version,
        "ref": format!("{}@{}", p.name, p.version),
        "kind": p.kind,
        "sha256": p.sha256,
        "bytes": p.bytes,
        "created_at": micros_to_rfc3339(p.created_at),
    })
}

fn destination_json(d: &DestinationRecord, plugin: Option<&PluginRecord>) -> Value {
    json!({
        "id": d.id,
        "name": d.name,
        "plugin_id": d.plugin_id,
        "plugin": plugin.map(|p| format!("{}@{}", p.name, p.version)),
        "config": serde_json::from_str::<Value>(&d.config).unwrap_or(Value::Null),
        "created_at": micros_to_rfc3339(d.created_at),
    })
}

fn plugin_error(e: PluginError) -> ApiError {
    let status = match e {
        PluginError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        PluginError::Host(_) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    ApiError::new(status, "invalid_plugin", e.to_string())
}

fn storage_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_unavailable",
        format!("the plugin store cannot be reached: {e}; retry shortly"),
    )
}

/// Plugin and version names: 1–64 of letters, digits, `_ - .`.
pub(crate) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
}

fn object_path(team_id: &str, sha256: &str) -> object_store::path::Path {
    object_store::path::Path::from(format!("plugins/{team_id}/{sha256}.wasm"))
}

#[derive(Deserialize)]
pub struct UploadQuery {
    name: Option<String>,
    version: Option<String>,
}

/// `POST /v1/plugins?name=&version=` with the component as the body.
pub async fn upload(
    State((state, _)): St,
    Auth(who): Auth,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = who.require(Scope::Admin)?;
    let (Some(name), Some(version)) = (q.name, q.version) else {
        return Err(ApiError::bad_request(
            "give the plugin's name and version: POST /v1/plugins?name=my-plugin&version=1.0.0",
        ));
    };
    if !valid_name(&name) || !valid_name(&version) {
        return Err(ApiError::bad_request(
            "plugin names and versions are 1-64 letters, digits, `_`, `-` or `.`",
        ));
    }
    // Oversized uploads are drained (up to 256 MiB) so the client reliably reads the 413.
    let Some(bytes) = super::rest::read_body_draining(body, MAX_UPLOAD_BYTES, 256 << 20).await?
    else {
        return Err(plugin_error(PluginError::TooLarge(MAX_UPLOAD_BYTES + 1)));
    };
    let compiled = state.plugins.compile(&bytes).await.map_err(plugin_error)?;
    if let Some(existing) = state
        .meta
        .get_plugin(&caller.team_id, &format!("{name}@{version}"))
        .await?
    {
        if existing.sha256 == compiled.sha256 {
            return Ok((StatusCode::OK, Json(plugin_json(&existing))).into_response());
        }
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_exists",
            format!("{name}@{version} exists with different content: publish a new version"),
        ));
    }
    // Content-addressed: the same bytes are the same object.
    let path = object_path(&caller.team_id, &compiled.sha256);
    state
        .archive
        .put(&path, object_store::PutPayload::from_bytes(bytes))
        .await
        .map_err(storage_error)?;
    let record = PluginRecord {
        id: new_id("plg"),
        team_id: caller.team_id.clone(),
        name,
        version,
        kind: compiled.kind.as_str().to_string(),
        sha256: compiled.sha256.clone(),
        bytes: compiled.bytes as i64,
        created_at: now_micros(),
    };
    match state.meta.create_plugin(&record).await {
        Ok(()) => Ok((StatusCode::CREATED, Json(plugin_json(&record))).into_response()),
        Err(MetaError::AlreadyExists { name, .. }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_exists",
            format!("{name} was uploaded concurrently: publish a new version"),
        )),
        Err(e) => Err(e.into()),
    }
}

pub async fn list(State((state, _)): St, Auth(who): Auth) -> Result<Json<Value>, ApiError> {
    let caller = read_or_admin(&who)?;
    let plugins = state.meta.list_plugins(&caller.team_id).await?;
    Ok(Json(
        json!({"plugins": plugins.iter().map(plugin_json).collect::<Vec<_>>()}),
    ))
}

pub(crate) async fn find_plugin(
    state: &AppState,
    team_id: &str,
    r: &str,
) -> Result<PluginRecord, ApiError> {
    state
        .meta
        .get_plugin(team_id, r)
        .await?
        .ok_or_else(|| ApiError::not_found(&format!("plugin {r:?}")))
}

pub async fn get(
    State((state, _)): St,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let caller = read_or_admin(&who)?;
    Ok(Json(plugin_json(
        &find_plugin(&state, &caller.team_id, &id).await?,
    )))
}

pub async fn delete(
    State((state, _)): St,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let caller = who.require(Scope::Admin)?;
    let p = find_plugin(&state, &caller.team_id, &id).await?;
    match state.meta.delete_plugin(&caller.team_id, &p.id).await? {
        Err(users) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "in_use",
            format!(
                "{}@{} is in use by {}: remove those first",
                p.name,
                p.version,
                users.join(", ")
            ),
        )),
        Ok(false) => Err(ApiError::not_found(&format!("plugin {id:?}"))),
        Ok(true) => {
            // The object is shared by every version with the same bytes.
            let others = state.meta.list_plugins(&caller.team_id).await?;
            if !others.iter().any(|o| o.sha256 == p.sha256) {
                let _ = state
                    .archive
                    .delete(&object_path(&caller.team_id, &p.sha256))
                    .await;
            }
            Ok(StatusCode::NO_CONTENT)
        }
    }
}

/// Loads a team's plugin component (from the host's cache, else the object store).
pub async fn load(state: &AppState, p: &PluginRecord) -> Result<Arc<Compiled>, ApiError> {
    let bytes = state
        .archive
        .get(&object_path(&p.team_id, &p.sha256))
        .await
        .map_err(storage_error)?
        .bytes()
        .await
        .map_err(storage_error)?;
    state.plugins.compile(&bytes).await.map_err(plugin_error)
}

#[derive(Deserialize)]
pub struct NewDestination {
    name: String,
    plugin: String,
    #[serde(default)]
    config: Value,
}

/// What a destination may reach, from its config: `allow_hosts` for HTTP, `nats_subjects`
/// (or the plugin's `subject`) for NATS.
pub fn caps(state: &AppState, config: &Value) -> DestinationCaps {
    let list = |k: &str| -> Vec<String> {
        config
            .get(k)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut nats_subjects = list("nats_subjects");
    if nats_subjects.is_empty()
        && let Some(s) = config.get("subject").and_then(Value::as_str)
    {
        nats_subjects.push(s.to_string());
    }
    DestinationCaps {
        allow_hosts: list("allow_hosts"),
        allow_private: state.allow_private_destinations,
        http: Some(state.destination_http.clone()),
        nats: state.nats.clone(),
        nats_subjects,
    }
}

pub async fn create_destination(
    State((state, _)): St,
    Auth(who): Auth,
    JsonBody(d): JsonBody<NewDestination>,
) -> Result<Response, ApiError> {
    let caller = who.require(Scope::Admin)?;
    if !valid_name(&d.name) {
        return Err(ApiError::bad_request(
            "destination names are 1-64 letters, digits, `_`, `-` or `.`",
        ));
    }
    let config = match d.config {
        Value::Null => json!({}),
        Value::Object(_) => d.config,
        _ => return Err(ApiError::bad_request("`config` must be a JSON object")),
    };
    let p = find_plugin(&state, &caller.team_id, &d.plugin).await?;
    if p.kind != PluginKind::Destination.as_str() {
        return Err(ApiError::bad_request(format!(
            "{}@{} is a {} plugin; a destination needs a destination plugin",
            p.name, p.version, p.kind
        )));
    }
    // The plugin must accept its config (its `init` runs; nothing is delivered).
    let compiled = load(&state, &p).await?;
    let text = config.to_string();
    if let Err(e) = state
        .plugins
        .init_only(
            &compiled,
            &p.name,
            &text,
            &PluginKind::Destination.default_limits(),
        )
        .await
    {
        return Err(ApiError::bad_request(format!(
            "the plugin refused its config: {e}"
        )));
    }
    let record = DestinationRecord {
        id: new_id("dst"),
        team_id: caller.team_id.clone(),
        name: d.name,
        plugin_id: p.id.clone(),
        config: text,
        created_at: now_micros(),
    };
    match state.meta.create_destination(&record).await {
        Ok(()) => Ok((
            StatusCode::CREATED,
            Json(destination_json(&record, Some(&p))),
        )
            .into_response()),
        Err(MetaError::AlreadyExists { name, .. }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_exists",
            format!("destination {name:?} already exists"),
        )),
        Err(e) => Err(e.into()),
    }
}

pub async fn list_destinations(
    State((state, _)): St,
    Auth(who): Auth,
) -> Result<Json<Value>, ApiError> {
    let caller = read_or_admin(&who)?;
    let ds = state.meta.list_destinations(&caller.team_id).await?;
    Ok(Json(
        json!({"destinations": ds.iter().map(|d| destination_json(d, None)).collect::<Vec<_>>()}),
    ))
}

async fn find_destination(
    state: &AppState,
    team_id: &str,
    id: &str,
) -> Result<DestinationRecord, ApiError> {
    state
        .meta
        .get_destination(team_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found(&format!("destination {id:?}")))
}

pub async fn get_destination(
    State((state, _)): St,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let caller = read_or_admin(&who)?;
    let d = find_destination(&state, &caller.team_id, &id).await?;
    let p = state.meta.get_plugin(&caller.team_id, &d.plugin_id).await?;
    Ok(Json(destination_json(&d, p.as_ref())))
}

pub async fn delete_destination(
    State((state, _)): St,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let caller = who.require(Scope::Admin)?;
    let d = find_destination(&state, &caller.team_id, &id).await?;
    state
        .meta
        .delete_destination(&caller.team_id, &d.id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default)]
pub struct TestRequest {
    /// Payloads to deliver; one sample event when absent.
    #[serde(default)]
    events: Vec<Value>,
}

/// `POST /v1/destinations/{id}/test`: delivers the given events (or one sample) through the
/// destination now and reports each result; nothing is recorded.
pub async fn test_destination(
    State((state, _)): St,
    Auth(who): Auth,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let Some(body) = super::rest::read_body_limited(body, 1 << 20).await? else {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "a destination test body may be at most 1 MiB",
        ));
    };
    let request: TestRequest = if body.iter().all(u8::is_ascii_whitespace) {
        TestRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "invalid JSON body: {e}; send {{\"events\": [{{…}}, …]}} or nothing"
            ))
        })?
    };
    let caller = who.require(Scope::Admin)?;
    let d = find_destination(&state, &caller.team_id, &id).await?;
    let p = state
        .meta
        .get_plugin(&caller.team_id, &d.plugin_id)
        .await?
        .ok_or_else(|| ApiError::not_found("the destination's plugin"))?;
    let compiled = load(&state, &p).await?;
    let mut payloads = request.events;
    if payloads.is_empty() {
        payloads.push(json!({"type": "rewind.test", "message": "a test delivery from Rewind"}));
    }
    if payloads.len() > 100 {
        return Err(ApiError::bad_request("test at most 100 events at a time"));
    }
    let now = now_micros();
    let events: Vec<PluginEvent> = payloads
        .iter()
        .map(|v| PluginEvent {
            id: ulid::Ulid::new().to_string(),
            received_at: now,
            headers: vec![("content-type".into(), "application/json".into())],
            payload: bytes::Bytes::from(v.to_string()),
        })
        .collect();
    let config: Value = serde_json::from_str(&d.config).unwrap_or(json!({}));
    let caps = Arc::new(caps(&state, &config));
    let results = state
        .plugins
        .deliver(
            &compiled,
            &p.name,
            &d.config,
            &PluginKind::Destination.default_limits(),
            caps,
            &events,
        )
        .await;
    let results: Vec<Value> = events
        .iter()
        .zip(results)
        .map(|(e, r)| match r {
            DeliveryResult::Delivered => json!({"id": e.id, "result": "delivered"}),
            DeliveryResult::Retryable {
                reason,
                retry_after,
            } => json!({
                "id": e.id, "result": "retryable", "reason": reason,
                "retry_after_ms": retry_after.map(|d| d.as_millis() as u64),
            }),
            DeliveryResult::Permanent(reason) => {
                json!({"id": e.id, "result": "permanent", "reason": reason})
            }
        })
        .collect();
    let delivered = results
        .iter()
        .filter(|r| r["result"] == "delivered")
        .count();
    Ok(Json(
        json!({"delivered": delivered, "events": results.len(), "results": results}),
    ))
}

#[derive(Deserialize)]
pub struct PipelineBody {
    steps: Vec<StepBody>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepBody {
    /// `name@version` or a plugin id.
    pub plugin: String,
    #[serde(default)]
    pub config: Value,
    pub memory_mib: Option<u64>,
    pub cpu_ms: Option<u64>,
}

/// Resolves the plugins of transform steps (`name@version` or id) in the caller's team.
/// `what` names the list in errors (`steps`, `transforms`).
pub async fn step_specs(
    state: &AppState,
    team_id: &str,
    steps: Vec<StepBody>,
    what: &str,
) -> Result<Vec<crate::plugins::pipeline::StepSpec>, ApiError> {
    let mut specs = Vec::with_capacity(steps.len());
    for (i, step) in steps.into_iter().enumerate() {
        let config = match step.config {
            Value::Null => json!({}),
            c @ Value::Object(_) => c,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "{what}[{i}].config must be a JSON object"
                )));
            }
        };
        let p = find_plugin(state, team_id, &step.plugin).await?;
        specs.push(crate::plugins::pipeline::StepSpec {
            plugin_id: p.id.clone(),
            plugin: format!("{}@{}", p.name, p.version),
            config,
            memory_mib: step.memory_mib,
            cpu_ms: step.cpu_ms,
        });
    }
    Ok(specs)
}

fn pipeline_json(collection: &str, steps: &[crate::plugins::pipeline::StepSpec]) -> Value {
    json!({
        "collection": collection,
        "steps": steps.iter().map(|s| json!({
            "plugin": s.plugin,
            "plugin_id": s.plugin_id,
            "config": s.config,
            "memory_mib": s.memory_mib,
            "cpu_ms": s.cpu_ms,
        })).collect::<Vec<_>>(),
    })
}

pub(crate) fn pipeline_error(e: crate::plugins::pipeline::PipelineError) -> ApiError {
    match e {
        crate::plugins::pipeline::PipelineError::Invalid(m) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_pipeline", m)
        }
        crate::plugins::pipeline::PipelineError::Unavailable(m) => storage_error(m),
    }
}

/// `PUT /v1/collections/{id}/pipeline`: sets the collection's transforms (an empty list
/// removes them). Each step must name one of the team's transform plugins that accepts its
/// config.
pub async fn put_pipeline(
    State((state, _)): St,
    Auth(who): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<PipelineBody>,
) -> Result<Json<Value>, ApiError> {
    let caller = who.require(Scope::Admin)?;
    let collection =
        super::admin::get_collection(state.meta.as_ref(), &caller.team_id, &id).await?;
    let specs = step_specs(&state, &caller.team_id, body.steps, "steps").await?;
    state
        .pipelines
        .set(&caller.team_id, &collection.id, specs.clone())
        .await
        .map_err(pipeline_error)?;
    Ok(Json(pipeline_json(&collection.name, &specs)))
}

/// `GET /v1/collections/{id}/pipeline`.
pub async fn get_pipeline(
    State((state, _)): St,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let caller = read_or_admin(&who)?;
    let collection =
        super::admin::get_collection(state.meta.as_ref(), &caller.team_id, &id).await?;
    let specs = state
        .pipelines
        .load_specs(&caller.team_id, &collection.id)
        .await
        .map_err(pipeline_error)?
        .unwrap_or_default();
    Ok(Json(pipeline_json(&collection.name, &specs)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewHook {
    name: String,
    plugin: String,
    collection: String,
    #[serde(default)]
    config: Value,
}

fn hook_json(h: &crate::meta::HookRecord, plugin: &str, collection: &str) -> Value {
    json!({
        "id": h.id,
        "name": h.name,
        "url": format!("/v1/hooks/{}", h.id),
        "plugin": plugin,
        "collection": collection,
        "config": serde_json::from_str::<Value>(&h.config).unwrap_or(Value::Null),
        "created_at": micros_to_rfc3339(h.created_at),
    })
}

/// A step's `config`: a JSON object (`{}` when absent).
pub(crate) fn object_config(config: Value) -> Result<Value, ApiError> {
    match config {
        Value::Null => Ok(json!({})),
        c @ Value::Object(_) => Ok(c),
        _ => Err(ApiError::bad_request("`config` must be a JSON object")),
    }
}

/// The team's ingress plugin `r` (for `what`: "a hook", "a source"), checked to accept
/// `config`; with the config as the text it is stored as.
pub(crate) async fn ingress_plugin(
    state: &AppState,
    team_id: &str,
    r: &str,
    config: &Value,
    what: &str,
) -> Result<(PluginRecord, String), ApiError> {
    let p = find_plugin(state, team_id, r).await?;
    if p.kind != PluginKind::Ingress.as_str() {
        return Err(ApiError::bad_request(format!(
            "{}@{} is a {} plugin; {what} needs an ingress plugin",
            p.name, p.version, p.kind
        )));
    }
    let compiled = load(state, &p).await?;
    let text = config.to_string();
    if let Err(e) = state
        .plugins
        .init_only(
            &compiled,
            &p.name,
            &text,
            &PluginKind::Ingress.default_limits(),
        )
        .await
    {
        return Err(ApiError::bad_request(format!(
            "the plugin refused its config: {e}"
        )));
    }
    Ok((p, text))
}

/// Events an ingress plugin made, as ingest takes them (`content-type` from their headers,
/// JSON when absent).
pub(crate) fn incoming_from_plugin(
    events: Vec<crate::plugins::host::NewEvent>,
) -> Vec<crate::ingest::IncomingEvent> {
    events
        .into_iter()
        .map(|(headers, payload)| {
            let mut headers: std::collections::HashMap<String, String> =
                headers.into_iter().collect();
            let content_type = headers
                .remove("content-type")
                .unwrap_or_else(|| "application/json".into());
            crate::ingest::IncomingEvent {
                payload,
                content_type,
                headers,
                client_id: None,
            }
        })
        .collect()
}

/// `POST /v1/hooks`: binds a public URL, `POST /v1/hooks/{id}`, to an ingress plugin and a
/// collection. The id (128 random bits) is the URL's secret; the plugin verifies senders
/// (e.g. `github-webhook` checks `X-Hub-Signature-256`).
pub async fn create_hook(
    State((state, _)): St,
    Auth(who): Auth,
    JsonBody(h): JsonBody<NewHook>,
) -> Result<Response, ApiError> {
    let caller = who.require(Scope::Admin)?;
    if !valid_name(&h.name) {
        return Err(ApiError::bad_request(
            "hook names are 1-64 letters, digits, `_`, `-` or `.`",
        ));
    }
    let config = object_config(h.config)?;
    let collection =
        super::admin::get_collection(state.meta.as_ref(), &caller.team_id, &h.collection).await?;
    let (p, text) = ingress_plugin(&state, &caller.team_id, &h.plugin, &config, "a hook").await?;
    let record = crate::meta::HookRecord {
        id: format!("hk_{}", hex::encode(rand::random::<[u8; 16]>())),
        team_id: caller.team_id.clone(),
        name: h.name,
        plugin_id: p.id.clone(),
        collection_id: collection.id.clone(),
        config: text,
        created_at: now_micros(),
    };
    match state.meta.create_hook(&record).await {
        Ok(()) => Ok((
            StatusCode::CREATED,
            Json(hook_json(
                &record,
                &format!("{}@{}", p.name, p.version),
                &collection.name,
            )),
        )
            .into_response()),
        Err(MetaError::AlreadyExists { name, .. }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_exists",
            format!("hook {name:?} already exists"),
        )),
        Err(e) => Err(e.into()),
    }
}

pub async fn list_hooks(State((state, _)): St, Auth(who): Auth) -> Result<Json<Value>, ApiError> {
    let caller = who.require(Scope::Admin)?;
    let hooks = state.meta.list_hooks(&caller.team_id).await?;
    let mut out = Vec::new();
    for h in &hooks {
        let p = state.meta.get_plugin(&caller.team_id, &h.plugin_id).await?;
        let c = state
            .meta
            .get_collection(&caller.team_id, &h.collection_id)
            .await?;
        out.push(hook_json(
            h,
            &p.map(|p| format!("{}@{}", p.name, p.version))
                .unwrap_or_default(),
            &c.map(|c| c.name).unwrap_or_default(),
        ));
    }
    Ok(Json(json!({"hooks": out})))
}

pub async fn delete_hook(
    State((state, _)): St,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let caller = who.require(Scope::Admin)?;
    if state.meta.delete_hook(&caller.team_id, &id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(&format!("hook {id:?}")))
    }
}

/// `POST /v1/hooks/{id}`: public. The hook's ingress plugin turns the request into events
/// (or rejects it with its status), which are ingested into the hook's collection.
pub async fn receive_hook(
    State((state, body_limit)): St,
    Path(id): Path<String>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::not_found("hook");
    if !id.starts_with("hk_") || id.len() > 64 {
        return Err(not_found());
    }
    let hook = state.meta.hook_by_id(&id).await?.ok_or_else(not_found)?;
    let p = state
        .meta
        .get_plugin(&hook.team_id, &hook.plugin_id)
        .await?
        .ok_or_else(not_found)?;
    let (parts, body) = request.into_parts();
    let Some(body) = super::rest::read_body_limited(body, body_limit).await? else {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the request body is over the {body_limit}-byte limit"),
        ));
    };
    let path = parts
        .uri
        .path_and_query()
        .map(|pq| {
            pq.as_str()
                .trim_start_matches(&format!("/v1/hooks/{id}"))
                .to_string()
        })
        .unwrap_or_default();
    use crate::plugins::bindings::ingress::rewind::plugin::types::{Inbound, InboundRequest};
    let inbound = InboundRequest {
        method: parts.method.to_string(),
        path,
        headers: parts
            .headers
            .iter()
            .filter(|(k, _)| {
                *k != axum::http::header::AUTHORIZATION && *k != axum::http::header::COOKIE
            })
            .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect(),
        body: body.to_vec(),
    };
    let compiled = load(&state, &p).await?;
    let name = format!("{}@{}", p.name, p.version);
    let events = match state
        .plugins
        .ingress(
            &compiled,
            &name,
            &hook.config,
            &PluginKind::Ingress.default_limits(),
            Inbound::Request(inbound),
        )
        .await
    {
        Ok(events) => events,
        Err((status, reason)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
            let code = if status.is_server_error() {
                "plugin_failed"
            } else {
                "rejected"
            };
            return Err(ApiError::new(status, code, format!("{name}: {reason}")));
        }
    };
    let incoming = incoming_from_plugin(events);
    let n = incoming.len();
    let ids = if n == 0 {
        Vec::new()
    } else {
        state
            .ingest
            .ingest(
                &format!("hook:{}", hook.id),
                &hook.team_id,
                &hook.collection_id,
                incoming,
                "hook",
            )
            .await?
    };
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"accepted": n, "ids": ids})),
    )
        .into_response())
}
