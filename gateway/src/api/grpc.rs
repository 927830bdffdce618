//! gRPC services of `rewind.v1` (tonic): thin adapters over [`super::admin`] and the
//! ingestor, authenticated from the `authorization` metadata with the same tokens as REST.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::service::Routes;
use tonic::{Request, Response, Status, Streaming};

use super::{ApiError, AppState, admin};
use crate::auth::{Principal, Scope, Scopes};
use crate::ingest::IncomingEvent;
use crate::meta::{Collection, TokenRecord};
use crate::proto::v1 as pb;
use pb::collection_service_server::{CollectionService, CollectionServiceServer};
use pb::ingest_service_server::{IngestService, IngestServiceServer};
use pb::search_service_server::{SearchService, SearchServiceServer};
use pb::team_service_server::{TeamService, TeamServiceServer};
use pb::token_service_server::{TokenService, TokenServiceServer};

/// How many batches of one `PublishStream` may be in flight at once (acks stay in order). Each
/// holds its request and its encoded bus record until durable, and a decoded request holds
/// its memory before the in-flight budget admits it: 4 covers the group commit's latency.
/// Under the ingest benchmark (docs/benchmarks.md, "The background reads, only for the
/// backlog") 8 put the gRPC scenario's RSS peak at 300-307 MiB against 262-279 with 4, for
/// ~6 % more rate (16 raised the peak further without raising the rate).
const STREAM_PIPELINE: usize = 4;

/// Full names of the services, as they appear in gRPC paths.
pub const SERVICES: [&str; 6] = [
    "rewind.v1.ReplayService",
    "rewind.v1.SearchService",
    "rewind.v1.TeamService",
    "rewind.v1.TokenService",
    "rewind.v1.CollectionService",
    "rewind.v1.IngestService",
];

/// All services, each with the decode limit set explicitly.
pub fn routes(state: Arc<AppState>) -> Routes {
    let limit = state.max_message_bytes;
    let svc = Grpc(state);
    Routes::new(TeamServiceServer::new(svc.clone()).max_decoding_message_size(limit))
        .add_service(TokenServiceServer::new(svc.clone()).max_decoding_message_size(limit))
        .add_service(CollectionServiceServer::new(svc.clone()).max_decoding_message_size(limit))
        .add_service(IngestServiceServer::new(svc.clone()).max_decoding_message_size(limit))
        .add_service(SearchServiceServer::new(svc.clone()).max_decoding_message_size(limit))
        .add_service(
            pb::replay_service_server::ReplayServiceServer::new(svc)
                .max_decoding_message_size(limit),
        )
        .clone()
}

#[derive(Clone)]
pub struct Grpc(pub(super) Arc<AppState>);

impl Grpc {
    pub(super) async fn principal<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.0
            .auth
            .authenticate_header(header)
            .await
            .map_err(|e| ApiError::from(e).into())
    }
}

fn scope_from_pb(s: i32) -> Result<Scope, Status> {
    match pb::Scope::try_from(s) {
        Ok(pb::Scope::Admin) => Ok(Scope::Admin),
        Ok(pb::Scope::Ingest) => Ok(Scope::Ingest),
        Ok(pb::Scope::Read) => Ok(Scope::Read),
        Ok(pb::Scope::Replay) => Ok(Scope::Replay),
        _ => Err(Status::invalid_argument(format!(
            "unknown scope {s}: use ADMIN, INGEST, READ or REPLAY"
        ))),
    }
}

fn scopes_to_pb(scopes: Scopes) -> Vec<i32> {
    scopes
        .list()
        .into_iter()
        .map(|s| match s {
            Scope::Admin => pb::Scope::Admin,
            Scope::Ingest => pb::Scope::Ingest,
            Scope::Read => pb::Scope::Read,
            Scope::Replay => pb::Scope::Replay,
        } as i32)
        .collect()
}

fn collection_pb(c: Collection) -> pb::Collection {
    pb::Collection {
        id: c.id,
        name: c.name,
        created_at_micros: c.created_at,
    }
}

fn token_pb(t: TokenRecord) -> pb::TokenInfo {
    pb::TokenInfo {
        id: t.id,
        name: t.name,
        scopes: scopes_to_pb(t.scopes),
        prefix: t.prefix,
        created_at_micros: t.created_at,
        revoked_at_micros: t.revoked_at.unwrap_or(0),
    }
}

#[tonic::async_trait]
impl TeamService for Grpc {
    async fn create_team(
        &self,
        request: Request<pb::CreateTeamRequest>,
    ) -> Result<Response<pb::CreateTeamResponse>, Status> {
        let who = self.principal(&request).await?;
        let (team, token) =
            admin::create_team(self.0.meta.as_ref(), &who, &request.get_ref().name).await?;
        Ok(Response::new(pb::CreateTeamResponse {
            id: team.id,
            name: team.name,
            admin_token: token.secret,
        }))
    }
}

#[tonic::async_trait]
impl TokenService for Grpc {
    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let who = self.principal(&request).await?;
        let req = request.get_ref();
        let scopes: Scopes = req
            .scopes
            .iter()
            .map(|s| scope_from_pb(*s))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .collect();
        if scopes.bits() == 0 {
            return Err(Status::invalid_argument("a token needs at least one scope"));
        }
        let created = admin::create_token(self.0.meta.as_ref(), &who, &req.name, scopes).await?;
        Ok(Response::new(pb::CreateTokenResponse {
            id: created.record.id,
            token: created.secret,
            scopes: scopes_to_pb(created.record.scopes),
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let who = self.principal(&request).await?;
        let tokens = admin::list_tokens(self.0.meta.as_ref(), &who).await?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: tokens.into_iter().map(token_pb).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let who = self.principal(&request).await?;
        admin::revoke_token(self.0.meta.as_ref(), &who, &request.get_ref().id).await?;
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }
}

#[tonic::async_trait]
impl CollectionService for Grpc {
    async fn create_collection(
        &self,
        request: Request<pb::CreateCollectionRequest>,
    ) -> Result<Response<pb::Collection>, Status> {
        let who = self.principal(&request).await?;
        let c = admin::create_collection(self.0.meta.as_ref(), &who, &request.get_ref().name, None)
            .await?;
        Ok(Response::new(collection_pb(c)))
    }

    async fn get_collection(
        &self,
        request: Request<pb::GetCollectionRequest>,
    ) -> Result<Response<pb::Collection>, Status> {
        let who = self.principal(&request).await?;
        let caller = who.team().map_err(ApiError::from)?;
        let c = admin::get_collection(self.0.meta.as_ref(), &caller.team_id, &request.get_ref().id)
            .await?;
        Ok(Response::new(collection_pb(c)))
    }

    async fn list_collections(
        &self,
        request: Request<pb::ListCollectionsRequest>,
    ) -> Result<Response<pb::ListCollectionsResponse>, Status> {
        let who = self.principal(&request).await?;
        let list = admin::list_collections(self.0.meta.as_ref(), &who).await?;
        Ok(Response::new(pb::ListCollectionsResponse {
            collections: list.into_iter().map(collection_pb).collect(),
        }))
    }
}

/// Validates and stores one publish request for an authenticated caller.
async fn publish(
    state: &AppState,
    who: &Principal,
    req: pb::PublishRequest,
) -> Result<pb::PublishResponse, Status> {
    let caller = who.require(Scope::Ingest).map_err(ApiError::from)?;
    let collection =
        admin::get_collection(state.meta.as_ref(), &caller.team_id, &req.collection).await?;
    let mut events = Vec::with_capacity(req.events.len());
    for (i, e) in req.events.into_iter().enumerate() {
        let content_type = if e.content_type.is_empty() {
            "application/json".to_string()
        } else {
            e.content_type
        };
        if content_type == "application/json"
            && let Err(err) = serde_json::from_slice::<serde::de::IgnoredAny>(&e.payload)
        {
            return Err(Status::invalid_argument(format!(
                "event {i}: malformed JSON at line {}, column {}: {err}; set content_type for non-JSON payloads",
                err.line(),
                err.column()
            )));
        }
        events.push(IncomingEvent {
            payload: e.payload,
            content_type,
            headers: e.headers,
            client_id: (!e.client_id.is_empty()).then_some(e.client_id),
        });
    }
    let bytes: usize = events.iter().map(|e| e.payload.len()).sum();
    let _admitted = state.ingest.admit(bytes).await.map_err(ApiError::from)?;
    let ids = state
        .ingest
        .ingest(
            &caller.token_id,
            &caller.team_id,
            &collection.id,
            events,
            "grpc",
        )
        .await
        .map_err(ApiError::from)?;
    Ok(pb::PublishResponse {
        sequence: req.sequence,
        accepted: ids.len() as u32,
        ids,
    })
}

type PublishStreamOut = Pin<Box<dyn Stream<Item = Result<pb::PublishResponse, Status>> + Send>>;

#[tonic::async_trait]
impl IngestService for Grpc {
    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let who = self.principal(&request).await?;
        Ok(Response::new(
            publish(&self.0, &who, request.into_inner()).await?,
        ))
    }

    type PublishStreamStream = PublishStreamOut;

    async fn publish_stream(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let who = Arc::new(self.principal(&request).await?);
        let state = self.0.clone();
        let inbound = request.into_inner();
        // Batches are stored concurrently (up to STREAM_PIPELINE), acks come back in order.
        let acks = inbound
            .map(move |item| {
                let (state, who) = (state.clone(), who.clone());
                async move {
                    match item {
                        Ok(req) => publish(&state, &who, req).await,
                        Err(status) => Err(status),
                    }
                }
            })
            .buffered(STREAM_PIPELINE);
        // The stream ends after its first error; batches acknowledged before it stay stored.
        let mut failed = false;
        let out = acks.take_while(move |r| {
            let go = !failed;
            failed |= r.is_err();
            futures::future::ready(go)
        });
        Ok(Response::new(Box::pin(out)))
    }
}

pub(super) fn opt(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn event_pb(e: crate::archive::read::ArchivedEvent) -> pb::SearchEvent {
    pb::SearchEvent {
        id: e.id,
        received_at_micros: e.received_at,
        content_type: e.content_type,
        payload: e.payload,
    }
}

type TailOut = Pin<Box<dyn Stream<Item = Result<pb::SearchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl SearchService for Grpc {
    async fn search(
        &self,
        request: Request<pb::SearchRequest>,
    ) -> Result<Response<pb::SearchResponse>, Status> {
        let who = self.principal(&request).await?;
        let caller = who.require(Scope::Read).map_err(ApiError::from)?;
        let r = request.into_inner();
        let collection =
            admin::get_collection(self.0.meta.as_ref(), &caller.team_id, &r.collection).await?;
        let (request, capped) = super::rest::search_request(
            &caller.team_id,
            &collection.id,
            opt(&r.q),
            opt(&r.filter),
            opt(&r.from),
            opt(&r.to),
            (r.limit > 0).then_some(r.limit as usize),
            opt(&r.cursor),
            opt(&r.facet),
        )?;
        let limit = request.limit;
        let outcome = super::search::search(&self.0, request, capped).await?;
        Ok(Response::new(pb::SearchResponse {
            events: outcome.page.events.into_iter().map(event_pb).collect(),
            next_cursor: outcome
                .page
                .next_cursor
                .map(|c| c.encode())
                .unwrap_or_default(),
            source: outcome.source.as_str().to_string(),
            index_from_micros: outcome.index_from,
            facets: outcome
                .page
                .facets
                .unwrap_or_default()
                .into_iter()
                .map(|(value, count)| pb::FacetValue { value, count })
                .collect(),
            limit: limit as u32,
        }))
    }

    type TailStream = TailOut;

    async fn tail(
        &self,
        request: Request<pb::TailRequest>,
    ) -> Result<Response<Self::TailStream>, Status> {
        let who = self.principal(&request).await?;
        let caller = who.require(Scope::Read).map_err(ApiError::from)?;
        let r = request.into_inner();
        let collection =
            admin::get_collection(self.0.meta.as_ref(), &caller.team_id, &r.collection).await?;
        let filter = super::rest::parse_filter(opt(&r.filter))?;
        let q = opt(&r.q)
            .filter(|q| !q.trim().is_empty())
            .map(str::to_string);
        let rx = super::search::tail(&self.0, &caller.team_id, &collection.id, filter, q).await?;
        let out = tokio_stream::wrappers::ReceiverStream::new(rx).map(|item| match item {
            Ok(e) => Ok(event_pb(e)),
            Err(e) => Err(Status::unavailable(format!(
                "the bus stopped: {e}; follow again"
            ))),
        });
        Ok(Response::new(Box::pin(out)))
    }
}
