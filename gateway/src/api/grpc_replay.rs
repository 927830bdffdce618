//! gRPC `ReplayService`: the REST replay calls ([`super::replays`]) plus two streams —
//! `Watch` (progress until the replay ends) and `Stream` (the selected events, paced, to the
//! caller).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tonic::{Request, Response, Status};

use super::grpc::{Grpc, opt};
use super::replays::{Created, NewReplay};
use super::{ApiError, admin};
use crate::meta::ReplayRecord;
use crate::proto::v1 as pb;
use crate::replay::{Control, Status as ReplayStatus, replay_json};
use pb::replay_service_server::ReplayService;

fn replay_pb(r: &ReplayRecord) -> pb::Replay {
    let v = replay_json(r);
    pb::Replay {
        id: r.id.clone(),
        status: r.status.clone(),
        collection: v["collection"].as_str().unwrap_or_default().to_string(),
        total: r.total.unwrap_or(-1),
        delivered: r.delivered,
        failed: r.failed,
        retried: r.retried,
        current_rate: v["current_rate"].as_f64().unwrap_or(0.0),
        eta_secs: v["eta_secs"].as_f64().unwrap_or(-1.0),
        error: r.error.clone().unwrap_or_default(),
        json: v.to_string(),
    }
}

fn nonzero<T: PartialEq + Default>(v: T) -> Option<T> {
    (v != T::default()).then_some(v)
}

type WatchOut = Pin<Box<dyn Stream<Item = Result<pb::Replay, Status>> + Send>>;
type StreamOut = Pin<Box<dyn Stream<Item = Result<pb::ReplayEvent, Status>> + Send>>;

impl Grpc {
    async fn control(
        &self,
        request: Request<pb::ReplayRef>,
        c: Control,
    ) -> Result<Response<pb::Replay>, Status> {
        let who = self.principal(&request).await?;
        let caller = super::replays::caller(&self.0, &who)?;
        let r = super::replays::control(&self.0, &caller.team_id, &request.get_ref().id, c)
            .await
            .map_err(|e| {
                if e.code == "invalid_state" {
                    Status::failed_precondition(e.message)
                } else {
                    e.into()
                }
            })?;
        Ok(Response::new(replay_pb(&r)))
    }
}

#[tonic::async_trait]
impl ReplayService for Grpc {
    async fn create(
        &self,
        request: Request<pb::CreateReplayRequest>,
    ) -> Result<Response<pb::Replay>, Status> {
        let who = self.principal(&request).await?;
        let caller = super::replays::caller(&self.0, &who)?;
        let r = request.into_inner();
        let destination = match (opt(&r.destination), opt(&r.target_collection)) {
            (Some(d), None) => Some(serde_json::Value::String(d.to_string())),
            (None, Some(c)) => Some(serde_json::json!({"collection": c})),
            (None, None) => None,
            (Some(_), Some(_)) => {
                return Err(Status::invalid_argument(
                    "set either `destination` or `target_collection`, not both",
                ));
            }
        };
        let transforms = match opt(&r.transforms_json) {
            None => Vec::new(),
            Some(t) => serde_json::from_str(t).map_err(|e| {
                Status::invalid_argument(format!(
                    "`transforms_json` must be a JSON list of {{\"plugin\", \"config\"}}: {e}"
                ))
            })?,
        };
        let req = NewReplay {
            collection: r.collection,
            from: opt(&r.from).map(String::from),
            to: opt(&r.to).map(String::from),
            filter: opt(&r.filter).map(String::from),
            limit: nonzero(r.limit),
            destination,
            rate_per_sec: nonzero(r.rate_per_sec),
            pace: opt(&r.pace).map(String::from),
            speed: nonzero(r.speed),
            transforms,
            batch_size: nonzero(r.batch_size as usize),
            max_retries: nonzero(r.max_retries),
            max_failure_ratio: nonzero(r.max_failure_ratio),
            dry_run: false,
        };
        match super::replays::create(&self.0, caller, req).await? {
            Created::Replay(rec) => Ok(Response::new(replay_pb(&rec))),
            Created::DryRun(_) => Err(Status::internal("unexpected dry run")),
        }
    }

    async fn get(&self, request: Request<pb::ReplayRef>) -> Result<Response<pb::Replay>, Status> {
        let who = self.principal(&request).await?;
        let caller = super::replays::caller(&self.0, &who)?;
        let r = super::replays::find(&self.0, &caller.team_id, &request.get_ref().id).await?;
        Ok(Response::new(replay_pb(&r)))
    }

    async fn list(
        &self,
        request: Request<pb::ListReplaysRequest>,
    ) -> Result<Response<pb::ListReplaysResponse>, Status> {
        let who = self.principal(&request).await?;
        let caller = super::replays::caller(&self.0, &who)?;
        let limit = match request.get_ref().limit {
            0 => 50,
            n => i64::from(n).min(500),
        };
        let list = self
            .0
            .meta
            .list_replays(&caller.team_id, limit)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::ListReplaysResponse {
            replays: list.iter().map(replay_pb).collect(),
        }))
    }

    async fn pause(&self, request: Request<pb::ReplayRef>) -> Result<Response<pb::Replay>, Status> {
        self.control(request, Control::Pause).await
    }

    async fn resume(
        &self,
        request: Request<pb::ReplayRef>,
    ) -> Result<Response<pb::Replay>, Status> {
        self.control(request, Control::Resume).await
    }

    async fn cancel(
        &self,
        request: Request<pb::ReplayRef>,
    ) -> Result<Response<pb::Replay>, Status> {
        self.control(request, Control::Cancel).await
    }

    type WatchStream = WatchOut;

    async fn watch(
        &self,
        request: Request<pb::WatchReplayRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let who = self.principal(&request).await?;
        let caller = super::replays::caller(&self.0, &who)?;
        let r = request.into_inner();
        let team = caller.team_id.clone();
        let first = super::replays::find(&self.0, &team, &r.id).await?;
        let every = Duration::from_millis(match r.interval_ms {
            0 => 500,
            ms => u64::from(ms).clamp(100, 60_000),
        });
        let state = self.0.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last = first;
            if tx.send(Ok(replay_pb(&last))).await.is_err() {
                return;
            }
            loop {
                if ReplayStatus::parse(&last.status).is_some_and(ReplayStatus::is_terminal) {
                    return;
                }
                tokio::time::sleep(every).await;
                match state.meta.get_replay(&team, &last.id).await {
                    Ok(Some(now)) => {
                        if now != last {
                            if tx.send(Ok(replay_pb(&now))).await.is_err() {
                                return;
                            }
                            last = now;
                        }
                    }
                    Ok(None) => {
                        let _ = tx
                            .send(Err(Status::not_found("the replay was deleted")))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::unavailable(format!(
                                "cannot read the replay's progress: {e}; watch again"
                            ))))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type StreamStream = StreamOut;

    async fn stream(
        &self,
        request: Request<pb::StreamReplayRequest>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let who = self.principal(&request).await?;
        let caller = super::replays::caller(&self.0, &who)?;
        let r = request.into_inner();
        let team = caller.team_id.clone();
        let collection = admin::get_collection(self.0.meta.as_ref(), &team, &r.collection).await?;
        let now = crate::ids::now_micros();
        let parse = |name: &str, v: &str, default: i64| -> Result<i64, Status> {
            match opt(v) {
                None => Ok(default),
                Some(v) => chrono::DateTime::parse_from_rfc3339(v)
                    .map(|t| t.timestamp_micros())
                    .map_err(|e| {
                        Status::invalid_argument(format!(
                            "`{name}` must be an RFC 3339 time such as 2026-11-25T10:00:00Z: {e}"
                        ))
                    }),
            }
        };
        let from = parse("from", &r.from, 0)?;
        let to = parse("to", &r.to, now)?;
        if to <= from {
            return Err(Status::invalid_argument(
                "`to` must be after `from`: the range is [from, to)",
            ));
        }
        let filter = super::rest::parse_filter(opt(&r.filter))?;
        let original = match opt(&r.pace) {
            None | Some("rate") | Some("unpaced") => None,
            Some("original") => Some(if r.speed > 0.0 { r.speed } else { 1.0 }),
            Some(other) => {
                return Err(Status::invalid_argument(format!(
                    "`pace` must be \"\", \"rate\" or \"original\", got {other:?}"
                )));
            }
        };
        if r.rate_per_sec < 0.0 || r.limit < 0 {
            return Err(Status::invalid_argument(
                "`rate_per_sec` and `limit` must not be negative",
            ));
        }
        let own = (r.rate_per_sec > 0.0).then(|| {
            crate::replay::pace::Limiter::new(
                r.rate_per_sec,
                ((r.rate_per_sec / 10.0) as u32).max(1),
            )
        });
        let quota = self.0.replays.quotas.of(&team);
        let mut scan = crate::archive::read::spawn_scan(
            self.0.archive.clone(),
            self.0.meta.clone(),
            crate::archive::read::Scan {
                team_id: team.clone(),
                collection_id: collection.id.clone(),
                from,
                to,
                filter: filter.map(Arc::new),
                after: None,
            },
        );
        let limit = nonzero(r.limit);
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            let mut sent = 0i64;
            let mut origin: Option<(i64, tokio::time::Instant)> = None;
            while let Some(chunk) = scan.recv().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::unavailable(format!(
                                "cannot read the archive: {e}"
                            ))))
                            .await;
                        return;
                    }
                };
                for e in chunk {
                    if limit.is_some_and(|l| sent >= l) {
                        return;
                    }
                    if let Some(speed) = original {
                        let (t0, start) =
                            *origin.get_or_insert((e.received_at, tokio::time::Instant::now()));
                        let due = start
                            + Duration::from_secs_f64(
                                ((e.received_at - t0).max(0) as f64 / 1e6) / speed,
                            );
                        tokio::time::sleep_until(due).await;
                    }
                    if let Some(l) = &own {
                        l.acquire(1).await;
                    }
                    if let Some(q) = &quota {
                        q.acquire(1).await;
                    }
                    let event = pb::ReplayEvent {
                        id: e.id,
                        received_at_micros: e.received_at,
                        content_type: e.content_type,
                        payload: e.payload,
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        return; // the caller went away
                    }
                    sent += 1;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
