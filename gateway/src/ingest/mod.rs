//! Ingest: from parsed events to an acknowledgement. Shared by REST and gRPC so both enforce
//! the same limits, rate limits and de-duplication:
//! rate limit (per token) → de-duplicate client ids → assign ULIDs and `received_at` →
//! append to the bus → answer once the bus says durable.

pub mod dedupe;
pub mod parse;
pub mod ratelimit;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::bus::{Bus, BusBatch, BusError, Event};
use crate::config::Limits;
use crate::ids::now_micros;
use crate::metrics::Metrics;
use dedupe::{DedupeIndex, Lookup};
use ratelimit::{Limited, TokenRateLimiter};

/// One event as a client sent it.
#[derive(Debug, Clone, Default)]
pub struct IncomingEvent {
    pub payload: Bytes,
    pub content_type: String,
    pub headers: HashMap<String, String>,
    pub client_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("rate limit exceeded: retry in {:.1}s", .0.as_secs_f64())]
    RateLimited(Duration),
    #[error(
        "a request of {events} events can never pass the rate limit (burst {burst}): send smaller batches"
    )]
    LargerThanBurst { events: usize, burst: u32 },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    TooLarge(String),
    #[error(
        "the gateway has {limit} bytes of events in flight already and this request waited {waited:?} for room: retry shortly"
    )]
    Overloaded { limit: usize, waited: Duration },
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(
        "the collection's pipeline cannot run: {0}. Nothing from this request was acknowledged; retry shortly"
    )]
    Pipeline(String),
}

impl IngestError {
    /// Worth retrying the same events later (rate limit, overload, the bus or the pipeline
    /// being unavailable); the others will fail again.
    pub fn is_temporary(&self) -> bool {
        matches!(
            self,
            Self::RateLimited(_) | Self::Overloaded { .. } | Self::Bus(_) | Self::Pipeline(_)
        )
    }
}

/// Room for a request's bytes in the gateway's in-flight budget; released on drop.
pub struct Admission(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

/// How long a request waits for room before it is turned away with a 503.
pub const ADMISSION_WAIT: Duration = Duration::from_secs(2);

/// The bus message id of a batch (`Nats-Msg-Id` on JetStream). When every event carries a
/// client id, the id is derived from them, so a client's retry that reaches another gateway
/// (whose de-duplication index has not seen it) is still dropped by JetStream's duplicate
/// window; otherwise it is the first event's fresh ULID.
fn message_id(team_id: &str, collection_id: &str, events: &[Event]) -> String {
    use sha2::{Digest, Sha256};
    if events.iter().any(|e| e.client_id.is_empty()) {
        return events[0].id.clone();
    }
    let mut h = Sha256::new();
    for part in [team_id, collection_id] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    for e in events {
        h.update(e.client_id.as_bytes());
        h.update([0]);
    }
    format!("c-{}", hex::encode(&h.finalize()[..16]))
}

/// The ingest path, shared by every transport.
pub struct Ingestor {
    bus: Arc<dyn Bus>,
    limits: Limits,
    /// The in-flight budget in KiB (see [`Ingestor::admit`]).
    inflight: Arc<tokio::sync::Semaphore>,
    limiter: TokenRateLimiter,
    dedupe: Arc<DedupeIndex>,
    metrics: Arc<Metrics>,
    id_field: Option<String>,
    /// Collections' ingest-time pipelines (transforms before the bus).
    pipelines: Option<Arc<crate::plugins::pipeline::Pipelines>>,
}

impl Ingestor {
    /// Applies collections' pipelines to their events before they are stored.
    pub fn with_pipelines(mut self, pipelines: Arc<crate::plugins::pipeline::Pipelines>) -> Self {
        self.pipelines = Some(pipelines);
        self
    }

    pub fn new(
        bus: Arc<dyn Bus>,
        limits: Limits,
        limiter: TokenRateLimiter,
        dedupe: Arc<DedupeIndex>,
        metrics: Arc<Metrics>,
        id_field: Option<String>,
    ) -> Self {
        let kib = (limits.max_inflight_bytes / 1024).clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        Self {
            bus,
            inflight: Arc::new(tokio::sync::Semaphore::new(kib)),
            limits,
            limiter,
            dedupe,
            metrics,
            id_field,
            pipelines: None,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Takes room for `bytes` in the in-flight budget (`--max-inflight-bytes`), waiting up to
    /// [`ADMISSION_WAIT`]. Overload then turns into 503s instead of unbounded memory: the
    /// permit is held while the request is read, parsed and waits for the bus.
    pub async fn admit(&self, bytes: usize) -> Result<Admission, IngestError> {
        let total = self.limits.max_inflight_bytes / 1024;
        let kib = bytes.div_ceil(1024).clamp(1, total.max(1)) as u32;
        match tokio::time::timeout(
            ADMISSION_WAIT,
            self.inflight.clone().acquire_many_owned(kib),
        )
        .await
        {
            Ok(Ok(permit)) => Ok(Admission(permit)),
            _ => {
                self.metrics.ingest_overloaded.inc();
                Err(IngestError::Overloaded {
                    limit: self.limits.max_inflight_bytes,
                    waited: ADMISSION_WAIT,
                })
            }
        }
    }

    pub fn rate_limit_burst(&self) -> u32 {
        self.limiter.burst
    }

    /// Reloads the client ids of the de-duplication window from the bus (after a restart).
    pub async fn rebuild_dedupe(&self, window: Duration) -> Result<usize, BusError> {
        let since = now_micros() - window.as_micros() as i64;
        let seen = self.bus.recent_client_ids(since).await?;
        let n = seen.len();
        for s in seen {
            self.dedupe.insert_stored(
                dedupe::key(&s.team_id, &s.collection_id, &s.client_id),
                s.event_id,
                s.received_at_micros,
            );
        }
        Ok(n)
    }

    /// The client id of an event: its explicit one, or the configured JSON field's string value.
    fn client_id_of(&self, event: &IncomingEvent) -> Option<String> {
        if let Some(id) = &event.client_id {
            return (!id.is_empty()).then(|| id.clone());
        }
        let field = self.id_field.as_deref()?;
        if event.content_type != "application/json" {
            return None;
        }
        #[derive(serde::Deserialize)]
        struct Fields<'a>(#[serde(borrow)] HashMap<&'a str, &'a serde_json::value::RawValue>);
        let fields: Fields = serde_json::from_slice(&event.payload).ok()?;
        let raw = fields.0.get(field)?;
        match serde_json::from_str::<serde_json::Value>(raw.get()).ok()? {
            serde_json::Value::String(s) if !s.is_empty() => Some(s),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }

    /// Checks limits that the transport may not have checked (gRPC gets here unparsed).
    fn check_limits(&self, events: &[IncomingEvent]) -> Result<(), IngestError> {
        if events.is_empty() {
            return Err(IngestError::Invalid(
                "the batch is empty: send at least one event".into(),
            ));
        }
        if events.len() > self.limits.max_batch_events {
            return Err(IngestError::TooLarge(format!(
                "the request holds {} events, over the {}-event batch limit: split it",
                events.len(),
                self.limits.max_batch_events
            )));
        }
        for (i, e) in events.iter().enumerate() {
            if e.payload.len() > self.limits.max_event_bytes {
                return Err(IngestError::TooLarge(format!(
                    "event {i} is {} bytes, over the {}-byte event limit",
                    e.payload.len(),
                    self.limits.max_event_bytes
                )));
            }
        }
        Ok(())
    }

    /// Stores a batch for one collection and returns the event ids (in request order) once
    /// every event is durable. A retried client id returns the id it was first stored under.
    pub async fn ingest(
        &self,
        token_id: &str,
        team_id: &str,
        collection_id: &str,
        events: Vec<IncomingEvent>,
        transport: &'static str,
    ) -> Result<Vec<String>, IngestError> {
        self.check_limits(&events)?;
        match self.limiter.check(token_id, events.len() as u32) {
            Ok(()) => {}
            Err(Limited::RetryAfter(wait)) => {
                self.metrics.rate_limited.inc();
                return Err(IngestError::RateLimited(wait));
            }
            Err(Limited::TooLarge { burst }) => {
                return Err(IngestError::LargerThanBurst {
                    events: events.len(),
                    burst,
                });
            }
        }

        let received_at = now_micros();
        let mut idgen = ulid::Generator::new();
        let client_ids: Vec<Option<String>> = events.iter().map(|e| self.client_id_of(e)).collect();
        let mut ids: Vec<String> = Vec::with_capacity(events.len());
        for _ in 0..events.len() {
            ids.push(
                idgen
                    .generate()
                    .unwrap_or_else(|_| ulid::Ulid::new())
                    .to_string(),
            );
        }

        loop {
            // Which events are new? Those without a client id, and those whose id is new.
            let keyed: Vec<(usize, String)> = client_ids
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    c.as_ref()
                        .map(|c| (i, dedupe::key(team_id, collection_id, c)))
                })
                .collect();
            let mut store = vec![true; events.len()];
            let mut first_of_key: HashMap<&str, usize> = HashMap::new();
            let mut lookups_for = Vec::new();
            for (i, key) in &keyed {
                match first_of_key.get(key.as_str()) {
                    // The same client id twice in one request: one event, one id.
                    Some(&first) => {
                        store[*i] = false;
                        ids[*i] = ids[first].clone();
                    }
                    None => {
                        first_of_key.insert(key, *i);
                        lookups_for.push((*i, key.clone()));
                    }
                }
            }
            let query: Vec<(String, String)> = lookups_for
                .iter()
                .map(|(i, k)| (k.clone(), ids[*i].clone()))
                .collect();
            let (results, reservation) = self.dedupe.lookup(&query);
            let mut wait = None;
            for ((i, _), lookup) in lookups_for.iter().zip(results) {
                match lookup {
                    Lookup::Reserved => {}
                    Lookup::Stored(id) => {
                        store[*i] = false;
                        ids[*i] = id;
                    }
                    Lookup::InFlight(rx) => wait = Some(rx),
                }
            }
            // Re-point in-request duplicates at whatever id their first occurrence ended with.
            for (i, key) in &keyed {
                let first = first_of_key[key.as_str()];
                if first != *i {
                    ids[*i] = ids[first].clone();
                }
            }
            if let Some(mut rx) = wait {
                // Let the other request finish, then look again (its outcome decides ours).
                drop(reservation);
                let _ = rx.wait_for(|v| v.is_some()).await;
                continue;
            }

            let new_events: Vec<Event> = events
                .iter()
                .enumerate()
                .filter(|(i, _)| store[*i])
                .map(|(i, e)| Event {
                    id: ids[i].clone(),
                    received_at_micros: received_at,
                    headers: e.headers.clone(),
                    payload: e.payload.clone(),
                    content_type: e.content_type.clone(),
                    client_id: client_ids[i].clone().unwrap_or_default(),
                })
                .collect();
            if new_events.is_empty() {
                drop(reservation);
                return Ok(ids);
            }
            // The pipeline runs before anything is stored: failed events go to the dead-letter
            // collection (appended first, so a dead letter is never lost for an acked event).
            let new_events = match &self.pipelines {
                None => new_events,
                Some(pipelines) => {
                    let pipeline = match pipelines.get(team_id, collection_id).await {
                        Ok(p) => p,
                        Err(e) => {
                            drop(reservation);
                            return Err(IngestError::Pipeline(e.to_string()));
                        }
                    };
                    match pipeline {
                        None => new_events,
                        Some(pipeline) => {
                            let (kept, dead) = pipelines.apply(&pipeline, new_events).await;
                            if !dead.is_empty() {
                                let batch = match pipelines
                                    .dead_letter_batch(team_id, collection_id, &dead)
                                    .await
                                {
                                    Ok(b) => b,
                                    Err(e) => {
                                        drop(reservation);
                                        return Err(IngestError::Pipeline(e.to_string()));
                                    }
                                };
                                let message_id =
                                    message_id(&batch.team_id, &batch.collection_id, &batch.events);
                                if let Err(e) = self.bus.append(&batch, &message_id).await {
                                    drop(reservation);
                                    return Err(IngestError::Bus(e));
                                }
                            }
                            if kept.is_empty() {
                                reservation.complete(true, received_at);
                                return Ok(ids);
                            }
                            kept
                        }
                    }
                }
            };
            let bytes: usize = new_events.iter().map(|e| e.payload.len()).sum();
            let count = new_events.len();
            let message_id = message_id(team_id, collection_id, &new_events);
            let batch = BusBatch {
                team_id: team_id.to_string(),
                collection_id: collection_id.to_string(),
                events: new_events,
            };
            // The append runs to completion even if the client goes away, so the dedupe
            // index always learns the outcome.
            let bus = self.bus.clone();
            let started = std::time::Instant::now();
            let outcome = tokio::spawn(async move { bus.append(&batch, &message_id).await })
                .await
                .map_err(|e| {
                    IngestError::Bus(BusError::Unavailable(format!("append task failed: {e}")))
                })
                .and_then(|r| r.map_err(IngestError::Bus));
            self.metrics
                .append_seconds
                .observe(started.elapsed().as_secs_f64());
            reservation.complete(outcome.is_ok(), received_at);
            outcome?;
            self.metrics
                .events_accepted
                .get_or_create(&crate::metrics::TransportLabel { transport })
                .inc_by(count as u64);
            self.metrics.ingest_bytes.inc_by(bytes as u64);
            return Ok(ids);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str, client: &str) -> Event {
        Event {
            id: id.into(),
            client_id: client.into(),
            ..Default::default()
        }
    }

    #[test]
    fn message_ids_follow_client_ids_when_every_event_has_one() {
        let a = message_id("t", "c", &[ev("01A", "k1"), ev("01B", "k2")]);
        let b = message_id("t", "c", &[ev("01X", "k1"), ev("01Y", "k2")]);
        assert_eq!(a, b, "a retry with fresh ULIDs keeps its message id");
        assert_ne!(
            a,
            message_id("t", "other", &[ev("01A", "k1"), ev("01B", "k2")])
        );
        assert_eq!(
            message_id("t", "c", &[ev("01A", "k1"), ev("01B", "")]),
            "01A"
        );
    }
}
