//! Ingest-time pipelines: a collection's ordered chain of transforms, applied to each
//! request's events before they are appended to the bus — so the archive, the index, tails
//! and replays only ever see transformed events, and what `redact` removes is never stored.
//! Events a step fails go to the collection's dead-letter collection (`<name>.dead-letter`,
//! created on first use) with the plugin, the reason and the attempt.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};

use super::host::{Compiled, PluginEvent, PluginHost, TransformResult};
use super::{Limits, PluginKind};
use crate::meta::{Collection, Metastore, PluginRecord};

/// Most steps in one pipeline.
pub const MAX_STEPS: usize = 16;
/// How long a gateway trusts its cached copy of a pipeline (another gateway may change it).
const REFRESH: Duration = Duration::from_secs(10);

/// One stored step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StepSpec {
    pub plugin_id: String,
    /// `name@version`, for people.
    pub plugin: String,
    #[serde(default)]
    pub config: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_ms: Option<u64>,
}

impl StepSpec {
    pub fn limits(&self) -> Limits {
        let mut l = PluginKind::Transform.default_limits();
        if let Some(m) = self.memory_mib {
            l.memory_bytes = ((m as usize) << 20).min(super::MAX_MEMORY_BYTES);
        }
        if let Some(ms) = self.cpu_ms {
            l.cpu = Duration::from_millis(ms).min(super::MAX_CPU);
            l.wall = (l.cpu * 10).min(super::MAX_WALL);
        }
        l
    }
}

/// A step ready to run.
pub struct Step {
    pub spec: StepSpec,
    pub name: String,
    pub compiled: Arc<Compiled>,
    pub config: String,
    pub limits: Limits,
}

pub struct Pipeline {
    pub steps: Vec<Step>,
}

/// An event a step failed.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub event: crate::bus::Event,
    pub plugin: String,
    pub reason: String,
}

/// A collection's pipeline (or its absence) and when it was read.
type Cached = (Instant, Option<Arc<Pipeline>>);

/// Every collection's pipeline, cached.
pub struct Pipelines {
    host: Arc<PluginHost>,
    meta: Arc<dyn Metastore>,
    store: Arc<dyn object_store::ObjectStore>,
    cache: RwLock<HashMap<String, Cached>>,
}

/// Why a pipeline cannot be loaded or set.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unavailable(String),
}

impl Pipelines {
    pub fn new(
        host: Arc<PluginHost>,
        meta: Arc<dyn Metastore>,
        store: Arc<dyn object_store::ObjectStore>,
    ) -> Self {
        Self {
            host,
            meta,
            store,
            cache: RwLock::default(),
        }
    }

    /// A plugin's component, from the host's cache or the object store.
    pub async fn component(&self, p: &PluginRecord) -> Result<Arc<Compiled>, PipelineError> {
        let path =
            object_store::path::Path::from(format!("plugins/{}/{}.wasm", p.team_id, p.sha256));
        let bytes = self
            .store
            .get(&path)
            .await
            .map_err(|e| {
                PipelineError::Unavailable(format!(
                    "cannot read plugin {}@{}: {e}",
                    p.name, p.version
                ))
            })?
            .bytes()
            .await
            .map_err(|e| {
                PipelineError::Unavailable(format!(
                    "cannot read plugin {}@{}: {e}",
                    p.name, p.version
                ))
            })?;
        self.host
            .compile(&bytes)
            .await
            .map_err(|e| PipelineError::Invalid(format!("plugin {}@{}: {e}", p.name, p.version)))
    }

    pub async fn build(
        &self,
        team_id: &str,
        specs: Vec<StepSpec>,
    ) -> Result<Pipeline, PipelineError> {
        let mut steps = Vec::with_capacity(specs.len());
        for spec in specs {
            let p = self
                .meta
                .get_plugin(team_id, &spec.plugin_id)
                .await
                .map_err(|e| PipelineError::Unavailable(e.to_string()))?
                .ok_or_else(|| {
                    PipelineError::Invalid(format!("plugin {} not found", spec.plugin))
                })?;
            let compiled = self.component(&p).await?;
            steps.push(Step {
                name: format!("{}@{}", p.name, p.version),
                limits: spec.limits(),
                config: spec.config.to_string(),
                compiled,
                spec,
            });
        }
        Ok(Pipeline { steps })
    }

    /// The collection's pipeline (`None`: events pass unchanged).
    pub async fn get(
        &self,
        team_id: &str,
        collection_id: &str,
    ) -> Result<Option<Arc<Pipeline>>, PipelineError> {
        if let Some((at, p)) = self.cache.read().expect("lock").get(collection_id)
            && at.elapsed() < REFRESH
        {
            return Ok(p.clone());
        }
        let specs = self.load_specs(team_id, collection_id).await?;
        let pipeline = match specs {
            Some(specs) if !specs.is_empty() => Some(Arc::new(self.build(team_id, specs).await?)),
            _ => None,
        };
        self.cache.write().expect("lock").insert(
            collection_id.to_string(),
            (Instant::now(), pipeline.clone()),
        );
        Ok(pipeline)
    }

    /// The stored steps of a collection's pipeline.
    pub async fn load_specs(
        &self,
        team_id: &str,
        collection_id: &str,
    ) -> Result<Option<Vec<StepSpec>>, PipelineError> {
        let Some(text) = self
            .meta
            .get_pipeline(team_id, collection_id)
            .await
            .map_err(|e| PipelineError::Unavailable(e.to_string()))?
        else {
            return Ok(None);
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| PipelineError::Invalid(format!("stored pipeline is unreadable: {e}")))
    }

    /// Validates and stores a pipeline: each step names a transform plugin of the team that
    /// accepts its config. An empty list removes the pipeline.
    pub async fn set(
        &self,
        team_id: &str,
        collection_id: &str,
        specs: Vec<StepSpec>,
    ) -> Result<(), PipelineError> {
        if specs.len() > MAX_STEPS {
            return Err(PipelineError::Invalid(format!(
                "a pipeline has at most {MAX_STEPS} steps"
            )));
        }
        let pipeline = self.validate(team_id, specs.clone()).await?;
        let text =
            (!specs.is_empty()).then(|| serde_json::to_string(&specs).expect("specs serialize"));
        self.meta
            .set_pipeline(team_id, collection_id, text.as_deref())
            .await
            .map_err(|e| PipelineError::Unavailable(e.to_string()))?;
        let value = (!pipeline.steps.is_empty()).then(|| Arc::new(pipeline));
        self.cache
            .write()
            .expect("lock")
            .insert(collection_id.to_string(), (Instant::now(), value));
        Ok(())
    }

    /// Builds a chain of transforms and checks it: every step is a transform plugin of the
    /// team that accepts its config.
    pub async fn validate(
        &self,
        team_id: &str,
        specs: Vec<StepSpec>,
    ) -> Result<Pipeline, PipelineError> {
        let pipeline = self.build(team_id, specs).await?;
        for step in &pipeline.steps {
            if step.compiled.kind != PluginKind::Transform {
                return Err(PipelineError::Invalid(format!(
                    "{} is a {} plugin; pipeline steps must be transforms",
                    step.name,
                    step.compiled.kind.as_str()
                )));
            }
            self.host
                .init_only(&step.compiled, &step.name, &step.config, &step.limits)
                .await
                .map_err(|e| {
                    PipelineError::Invalid(format!("{} refused its config: {e}", step.name))
                })?;
        }
        Ok(pipeline)
    }

    /// Runs events through a pipeline: what is left to store, and what failed.
    pub async fn apply(
        &self,
        pipeline: &Pipeline,
        events: Vec<crate::bus::Event>,
    ) -> (Vec<crate::bus::Event>, Vec<DeadLetter>) {
        let mut current = events;
        let mut dead = Vec::new();
        for step in &pipeline.steps {
            if current.is_empty() {
                break;
            }
            let input: Vec<PluginEvent> = current.iter().map(to_plugin_event).collect();
            let results = self
                .host
                .transform(
                    &step.compiled,
                    &step.name,
                    &step.config,
                    &step.limits,
                    &input,
                )
                .await;
            let mut next = Vec::with_capacity(current.len());
            for (event, result) in current.into_iter().zip(results) {
                match result {
                    TransformResult::Failed(reason) => dead.push(DeadLetter {
                        event,
                        plugin: step.name.clone(),
                        reason,
                    }),
                    TransformResult::Events(outs) => {
                        for (k, out) in outs.into_iter().enumerate() {
                            next.push(from_plugin_event(&event, out, k));
                        }
                    }
                }
            }
            current = next;
        }
        (current, dead)
    }
}

fn to_plugin_event(e: &crate::bus::Event) -> PluginEvent {
    let mut headers: Vec<(String, String)> = e
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    headers.sort();
    if !e.headers.contains_key("content-type") {
        headers.insert(0, ("content-type".into(), e.content_type.clone()));
    }
    PluginEvent {
        id: e.id.clone(),
        received_at: e.received_at_micros,
        headers,
        payload: e.payload.clone(),
    }
}

/// The `k`-th output of an input event: the first keeps its id; more outputs get ids that
/// follow it (the same time, a fresh random part), so fan-out never reuses an id.
fn from_plugin_event(input: &crate::bus::Event, out: PluginEvent, k: usize) -> crate::bus::Event {
    let id = if k == 0 {
        input.id.clone()
    } else {
        let base = ulid::Ulid::from_string(&input.id).unwrap_or_else(|_| ulid::Ulid::new());
        ulid::Ulid::from_parts(base.timestamp_ms(), rand::random::<u128>()).to_string()
    };
    let mut headers: HashMap<String, String> = out.headers.into_iter().collect();
    let content_type = headers
        .remove("content-type")
        .unwrap_or_else(|| input.content_type.clone());
    crate::bus::Event {
        id,
        received_at_micros: input.received_at_micros,
        headers,
        payload: out.payload,
        content_type,
        client_id: if k == 0 {
            input.client_id.clone()
        } else {
            String::new()
        },
    }
}

impl Pipelines {
    /// The bus batch that stores dead letters of a collection in its dead-letter collection.
    pub async fn dead_letter_batch(
        &self,
        team_id: &str,
        collection_id: &str,
        dead: &[DeadLetter],
    ) -> Result<crate::bus::BusBatch, PipelineError> {
        let source = self
            .meta
            .get_collection(team_id, collection_id)
            .await
            .map_err(|e| PipelineError::Unavailable(e.to_string()))?
            .ok_or_else(|| {
                PipelineError::Unavailable(format!("collection {collection_id} vanished"))
            })?;
        let dlq = dead_letter_collection(self.meta.as_ref(), &source).await?;
        Ok(crate::bus::BusBatch {
            team_id: team_id.to_string(),
            collection_id: dlq.id,
            events: dead.iter().map(|d| dead_letter_event(d, &source)).collect(),
        })
    }
}

/// The dead-letter collection of a collection: `<name>.dead-letter`, created on first use.
pub async fn dead_letter_collection(
    meta: &dyn Metastore,
    source: &Collection,
) -> Result<Collection, PipelineError> {
    let name = format!("{}.dead-letter", source.name);
    let unavailable = |e: crate::meta::MetaError| PipelineError::Unavailable(e.to_string());
    if let Some(c) = meta
        .get_collection(&source.team_id, &name)
        .await
        .map_err(unavailable)?
    {
        return Ok(c);
    }
    let c = Collection {
        id: crate::ids::new_id("col"),
        team_id: source.team_id.clone(),
        name: name.clone(),
        created_at: crate::ids::now_micros(),
        search_window_secs: None,
    };
    match meta.create_collection(&c).await {
        Ok(()) => Ok(c),
        // Created concurrently: use that one.
        Err(crate::meta::MetaError::AlreadyExists { .. }) => meta
            .get_collection(&source.team_id, &name)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| PipelineError::Unavailable(format!("collection {name} vanished"))),
        Err(e) => Err(unavailable(e)),
    }
}

/// A dead letter as the event stored in the dead-letter collection: the failure and the
/// original event (its payload as JSON when it is JSON, else base64).
pub fn dead_letter_event(d: &DeadLetter, source: &Collection) -> crate::bus::Event {
    use base64::Engine;
    let payload = if d.event.content_type == "application/json" {
        serde_json::from_slice::<serde_json::Value>(&d.event.payload).ok()
    } else {
        None
    };
    let mut body = serde_json::json!({
        "event_id": d.event.id,
        "received_at": crate::ids::micros_to_rfc3339(d.event.received_at_micros),
        "collection": source.name,
        "plugin": d.plugin,
        "reason": d.reason,
        "attempt": 1,
        "content_type": d.event.content_type,
    });
    match payload {
        Some(p) => body["payload"] = p,
        None => {
            body["payload_base64"] = serde_json::Value::String(
                base64::engine::general_purpose::STANDARD.encode(&d.event.payload),
            )
        }
    }
    crate::bus::Event {
        id: ulid::Ulid::new().to_string(),
        received_at_micros: d.event.received_at_micros,
        headers: HashMap::new(),
        payload: bytes::Bytes::from(serde_json::to_vec(&body).expect("JSON serializes")),
        content_type: "application/json".into(),
        client_id: String::new(),
    }
}
