//! The public surface: REST (axum) and gRPC (tonic) served on one port. Both authenticate
//! through [`crate::auth::Authenticator`], call the same admin functions in [`admin`] and the
//! same [`crate::ingest::Ingestor`], and fail with the same [`ApiError`].

pub mod admin;
pub mod error;
pub mod grpc;
pub mod grpc_replay;
pub mod plugins;
pub mod replays;
pub mod rest;
pub mod search;
pub mod sources;

use std::sync::Arc;

use axum::Router;

use crate::auth::Authenticator;
use crate::bus::Bus;
use crate::ingest::Ingestor;
use crate::meta::Metastore;
use crate::metrics::Metrics;

pub use error::ApiError;

/// Everything a request handler may need.
pub struct AppState {
    pub meta: Arc<dyn Metastore>,
    pub auth: Authenticator,
    pub ingest: Ingestor,
    pub bus: Arc<dyn Bus>,
    pub metrics: Arc<Metrics>,
    /// The archive's object store and the archiver's status.
    pub archive: Arc<dyn object_store::ObjectStore>,
    pub archive_status: Arc<crate::archive::archiver::ArchiveStatus>,
    /// The search index, its hot windows and the indexer's status.
    pub search: crate::search::SearchService,
    /// The gRPC decode limit (bytes), the same as the REST body limit.
    pub max_message_bytes: usize,
    /// The WASM plugin host, and what destinations may reach.
    pub plugins: Arc<crate::plugins::host::PluginHost>,
    pub pipelines: Arc<crate::plugins::pipeline::Pipelines>,
    pub allow_private_destinations: bool,
    pub destination_http: reqwest::Client,
    pub nats: Option<async_nats::Client>,
    /// The replay scheduler, its quotas and API limiter.
    pub replays: Arc<crate::replay::Replays>,
    /// The NATS subscriptions of sources.
    pub sources: Arc<crate::sources::Sources>,
}

/// REST and gRPC on one router.
pub fn router(state: Arc<AppState>) -> Router {
    // Each gRPC service's paths go to tonic's router; everything else is REST (whose fallback
    // answers unknown paths with a JSON 404).
    let grpc = grpc::routes(state.clone());
    let mut router = rest::router(state.clone());
    for service in grpc::SERVICES {
        router = router.route_service(&format!("/{service}/{{method}}"), grpc.clone());
    }
    router
        .layer(axum::middleware::from_fn(
            crate::http_server::close_if_body_unread,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state,
            rest::track_requests,
        ))
}
