//! Where a replay's batches go — a destination plugin or another collection — and the
//! retry loop around it: retryable failures are tried again with exponential backoff and
//! full jitter (at least what the receiver asked for with `Retry-After`), up to the replay's
//! `max_retries`; permanent failures and exhausted retries come back as dead letters.

use std::sync::Arc;
use std::time::Duration;

use crate::ingest::{IncomingEvent, IngestError};
use crate::plugins::Limits;
use crate::plugins::host::{Compiled, DeliveryResult, DestinationCaps, PluginEvent, PluginHost};

/// First retry delay; each next one doubles, up to [`MAX_BACKOFF`].
pub const BASE_BACKOFF: Duration = Duration::from_millis(50);
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The longest a receiver's `Retry-After` is honoured.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

pub enum Sink {
    Plugin {
        host: Arc<PluginHost>,
        compiled: Arc<Compiled>,
        name: String,
        config: String,
        limits: Limits,
        caps: Arc<DestinationCaps>,
    },
    Collection {
        state: Arc<crate::api::AppState>,
        team_id: String,
        collection_id: String,
        /// The rate-limit key of the replay's ingest.
        key: String,
    },
}

impl Sink {
    /// Its name in dead letters and logs.
    pub fn name(&self) -> String {
        match self {
            Sink::Plugin { name, .. } => name.clone(),
            Sink::Collection { collection_id, .. } => format!("collection {collection_id}"),
        }
    }

    /// One result per event, and how many events were sent again inside the call (a plugin
    /// call that failed as a whole is retried on halves of the batch).
    async fn send(&self, events: &[PluginEvent]) -> (Vec<DeliveryResult>, usize) {
        match self {
            Sink::Plugin {
                host,
                compiled,
                name,
                config,
                limits,
                caps,
            } => {
                host.deliver_counting(compiled, name, config, limits, caps.clone(), events)
                    .await
            }
            Sink::Collection {
                state,
                team_id,
                collection_id,
                key,
            } => {
                let incoming: Vec<IncomingEvent> = events
                    .iter()
                    .map(|e| {
                        let mut headers: std::collections::HashMap<String, String> =
                            e.headers.iter().cloned().collect();
                        let content_type = headers
                            .remove("content-type")
                            .unwrap_or_else(|| "application/json".into());
                        // The same event of the same replay is stored once, however often
                        // it is delivered (resumes, retries).
                        let client_id = headers
                            .get("rewind-replay-id")
                            .map(|r| format!("{r}:{}", e.id));
                        IncomingEvent {
                            payload: e.payload.clone(),
                            content_type,
                            headers,
                            client_id,
                        }
                    })
                    .collect();
                let one = |r: DeliveryResult| (vec![r; events.len()], 0);
                match state
                    .ingest
                    .ingest(key, team_id, collection_id, incoming, "replay")
                    .await
                {
                    Ok(_) => one(DeliveryResult::Delivered),
                    Err(IngestError::RateLimited(wait)) => one(DeliveryResult::Retryable {
                        reason: "the target collection's ingest rate limit".into(),
                        retry_after: Some(wait),
                    }),
                    Err(
                        e @ (IngestError::Overloaded { .. }
                        | IngestError::Bus(_)
                        | IngestError::Pipeline(_)),
                    ) => one(DeliveryResult::Retryable {
                        reason: e.to_string(),
                        retry_after: None,
                    }),
                    Err(e) => one(DeliveryResult::Permanent(e.to_string())),
                }
            }
        }
    }
}

/// What became of a batch.
#[derive(Debug, Default)]
pub struct Outcome {
    pub delivered: usize,
    /// Events given up on: (index in the batch, reason, attempts).
    pub dead: Vec<(usize, String, u32)>,
    /// Attempts that were retried.
    pub retried: usize,
}

/// The delay before retry `attempt` (1-based): full jitter over an exponential ceiling, and
/// never less than the receiver's `Retry-After`.
pub fn backoff(attempt: u32, retry_after: Option<Duration>) -> Duration {
    let ceiling = BASE_BACKOFF
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    let jittered = ceiling.mul_f64(0.5 + rand::random::<f64>() * 0.5);
    jittered.max(retry_after.unwrap_or_default().min(MAX_RETRY_AFTER))
}

/// Delivers a batch, retrying what fails retryably. `cancelled` is checked between attempts
/// so a cancel does not wait out a long backoff; events not delivered then are returned as
/// neither delivered nor dead (`Err` with the outcome so far).
pub async fn deliver(
    sink: &Sink,
    events: &[PluginEvent],
    max_retries: u32,
    cancelled: impl Fn() -> bool,
) -> Result<Outcome, Outcome> {
    let mut out = Outcome::default();
    let mut todo: Vec<usize> = (0..events.len()).collect();
    let mut attempt = 1u32;
    loop {
        // The first attempt sends the batch as it is; retries send the events still to go.
        let (results, resent) = if todo.len() == events.len() {
            sink.send(events).await
        } else {
            let batch: Vec<PluginEvent> = todo.iter().map(|&i| events[i].clone()).collect();
            sink.send(&batch).await
        };
        out.retried += resent;
        let mut again = Vec::new();
        let mut wait_at_least = None;
        for (&i, r) in todo.iter().zip(results) {
            match r {
                DeliveryResult::Delivered => out.delivered += 1,
                DeliveryResult::Permanent(reason) => out.dead.push((i, reason, attempt)),
                DeliveryResult::Retryable {
                    reason,
                    retry_after,
                } => {
                    if attempt > max_retries {
                        out.dead.push((
                            i,
                            format!("gave up after {attempt} attempts: {reason}"),
                            attempt,
                        ));
                    } else {
                        again.push(i);
                        wait_at_least = wait_at_least.max(retry_after);
                    }
                }
            }
        }
        if again.is_empty() {
            return Ok(out);
        }
        out.retried += again.len();
        let delay = backoff(attempt, wait_at_least);
        tracing::debug!(events = again.len(), attempt, ?delay, "retrying deliveries");
        let until = tokio::time::Instant::now() + delay;
        while tokio::time::Instant::now() < until {
            if cancelled() {
                return Err(out);
            }
            tokio::time::sleep_until(
                until.min(tokio::time::Instant::now() + Duration::from_millis(100)),
            )
            .await;
        }
        todo = again;
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_jitters_and_honours_retry_after() {
        for attempt in 1..20 {
            let d = backoff(attempt, None);
            let ceiling = BASE_BACKOFF
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(MAX_BACKOFF);
            assert!(d <= ceiling && d >= ceiling / 2, "{attempt}: {d:?}");
        }
        assert!(backoff(1, Some(Duration::from_secs(2))) >= Duration::from_secs(2));
        assert!(backoff(1, Some(Duration::from_secs(3600))) <= MAX_RETRY_AFTER);
    }
}
