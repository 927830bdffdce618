//! The bus on NATS JetStream: one stream (`REWIND_EVENTS`) over the subjects
//! `rewind.events.<team>.<collection>`, one message per ingest batch (split only where a batch
//! is larger than the server's `max_payload`), each published with a `Nats-Msg-Id` so a retried
//! publish inside the stream's duplicate window is stored once. The client's ack waits for the
//! JetStream publish ack.
//!
//! JetStream acknowledges a publish once it is in the server's memory, and by default syncs to
//! disk every two minutes (see the Jepsen NATS 2.12 report): a server crash or power loss can
//! lose acknowledged messages unless the server runs with `jetstream { sync_interval: always }`
//! (NATS 2.10+), which our docker-compose sets.
//!
//! If NATS is down when the gateway starts, the gateway still starts: it reports the bus not
//! ready, answers ingest with 503, and keeps trying to connect.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use async_trait::async_trait;
use futures::StreamExt;
use prost::Message as _;
use tokio::sync::watch;

use super::{
    AckHandle, Appended, Bus, BusBatch, BusError, BusHealth, Consumer, Delivery, SeenClientId,
    Tail, decode_batch,
};

pub const STREAM: &str = "REWIND_EVENTS";
pub const SUBJECT_PREFIX: &str = "rewind.events";
const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// The bytes one pull request of a consumer may bring in. The server drops a client as a
/// "slow consumer" (and with it every publish ack in flight: clients then see 503s after the
/// publish timeout) once more than its `max_pending` (64 MiB by default) waits to be sent
/// to it, and one gateway connection carries the archiver's, the indexer's and live tails'
/// deliveries. The client library's default pull (200 messages, no byte limit) is up to
/// 200 MiB of our packed batches. Always room for the largest possible message, or the pull
/// could never deliver it.
fn pull_bytes(max_payload: usize) -> usize {
    (8usize << 20).max(2 * max_payload + (64 << 10))
}

#[derive(Clone)]
struct Connected {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
}

pub struct NatsBus {
    url: String,
    state: watch::Receiver<Option<Connected>>,
    last_error: Arc<Mutex<String>>,
    closed: Arc<std::sync::atomic::AtomicBool>,
    consumers: Arc<Mutex<Vec<String>>>,
}

/// The subject events of one collection are published on.
pub fn subject(team_id: &str, collection_id: &str) -> String {
    format!("{SUBJECT_PREFIX}.{team_id}.{collection_id}")
}

async fn connect_once(url: &str) -> Result<Connected, String> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        .name("rewind-gateway")
        .connect(url)
        .await
        .map_err(|e| format!("cannot connect to NATS at {url}: {e}"))?;
    let mut js = jetstream::new(client.clone());
    js.set_timeout(PUBLISH_TIMEOUT);
    let stream = js
        .get_or_create_stream(stream::Config {
            name: STREAM.to_string(),
            subjects: vec![format!("{SUBJECT_PREFIX}.>")],
            storage: stream::StorageType::File,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("NATS at {url} is up but JetStream stream {STREAM} is not usable (is JetStream enabled, -js?): {e}"))?;
    Ok(Connected { client, js, stream })
}

impl NatsBus {
    /// Starts connecting in the background and returns at once; see [`NatsBus::wait_ready`].
    pub fn start(url: &str) -> Self {
        let (tx, rx) = watch::channel(None);
        let last_error = Arc::new(Mutex::new("connecting".to_string()));
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let bus = Self {
            url: url.to_string(),
            state: rx,
            last_error: last_error.clone(),
            closed: closed.clone(),
            consumers: Arc::new(Mutex::new(Vec::new())),
        };
        let url = url.to_string();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                if closed.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                match connect_once(&url).await {
                    Ok(connected) => {
                        tracing::info!(%url, "connected to NATS JetStream");
                        *last_error.lock().expect("lock") = String::new();
                        let _ = tx.send(Some(connected));
                        return;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "NATS bus not ready; retrying");
                        *last_error.lock().expect("lock") = e;
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
        bus
    }

    /// Waits up to `timeout` for the first connection.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.state.clone();
        tokio::time::timeout(timeout, rx.wait_for(|s| s.is_some()))
            .await
            .is_ok()
    }

    fn connected(&self) -> Result<Connected, BusError> {
        self.state.borrow().clone().ok_or_else(|| {
            BusError::Unavailable(format!(
                "not connected to NATS: {}",
                self.last_error.lock().expect("lock")
            ))
        })
    }

    async fn publish(
        &self,
        c: &Connected,
        subject: &str,
        body: Vec<u8>,
        id: &str,
    ) -> Result<Appended, BusError> {
        let publish = jetstream::message::PublishMessage::build()
            .payload(body.into())
            .message_id(id);
        let ack =
            c.js.send_publish(subject.to_string(), publish)
                .await
                .map_err(|e| BusError::Unavailable(format!("NATS publish failed: {e}")))?
                .await
                .map_err(|e| {
                    BusError::Unavailable(format!("NATS did not acknowledge the publish: {e}"))
                })?;
        Ok(Appended {
            position: ack.sequence,
            duplicate: ack.duplicate,
        })
    }
}

/// Splits a batch into pieces whose encoding fits in `max_payload` bytes.
fn split_batch(batch: &BusBatch, max_payload: usize) -> Result<Vec<Vec<u8>>, BusError> {
    let whole = batch.encode_to_vec();
    if whole.len() <= max_payload {
        return Ok(vec![whole]);
    }
    let mut pieces = Vec::new();
    let mut current = BusBatch {
        team_id: batch.team_id.clone(),
        collection_id: batch.collection_id.clone(),
        events: Vec::new(),
    };
    let base = current.encoded_len();
    let mut size = base;
    for event in &batch.events {
        let len = event.encoded_len() + 8;
        if base + len > max_payload {
            return Err(BusError::Rejected(format!(
                "event {} is {} bytes, more than the NATS server's max_payload ({max_payload}); raise max_payload in the NATS config",
                event.id,
                event.payload.len()
            )));
        }
        if size + len > max_payload {
            pieces.push(current.encode_to_vec());
            current.events.clear();
            size = base;
        }
        current.events.push(event.clone());
        size += len;
    }
    if !current.events.is_empty() {
        pieces.push(current.encode_to_vec());
    }
    Ok(pieces)
}

#[async_trait]
impl Bus for NatsBus {
    fn kind(&self) -> &'static str {
        "nats"
    }

    async fn append(&self, batch: &BusBatch, message_id: &str) -> Result<Appended, BusError> {
        if self.closed.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(BusError::Closed);
        }
        let c = self.connected()?;
        let subject = subject(&batch.team_id, &batch.collection_id);
        let max_payload = c.client.server_info().max_payload.max(1024);
        let pieces = split_batch(batch, max_payload)?;
        if pieces.len() == 1 {
            let body = pieces.into_iter().next().expect("one piece");
            return self.publish(&c, &subject, body, message_id).await;
        }
        // Pieces are published concurrently; each has its own id so each is deduplicated.
        let acks =
            futures::future::try_join_all(pieces.into_iter().enumerate().map(|(i, body)| {
                let id = format!("{message_id}.{i}");
                let (c, subject) = (c.clone(), subject.clone());
                async move { self.publish(&c, &subject, body, &id).await }
            }))
            .await?;
        Ok(Appended {
            position: acks.iter().map(|a| a.position).max().unwrap_or(0),
            duplicate: acks.iter().all(|a| a.duplicate),
        })
    }

    async fn consumer(&self, name: &str) -> Result<Box<dyn Consumer>, BusError> {
        let mut rx = self.state.clone();
        let c = rx
            .wait_for(|s| s.is_some())
            .await
            .map_err(|_| BusError::Closed)?
            .clone()
            .expect("connected");
        let durable = format!("rewind-{name}");
        let consumer: jetstream::consumer::Consumer<pull::Config> = c
            .stream
            .get_or_create_consumer(
                &durable,
                pull::Config {
                    durable_name: Some(durable.clone()),
                    filter_subject: format!("{SUBJECT_PREFIX}.>"),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(60),
                    max_ack_pending: 20_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| {
                BusError::Unavailable(format!("cannot open NATS consumer {durable}: {e}"))
            })?;
        let max_payload = c.client.server_info().max_payload.max(1024);
        let messages = consumer
            .stream()
            .max_messages_per_batch(1000)
            .max_bytes_per_batch(pull_bytes(max_payload))
            .heartbeat(Duration::from_secs(15))
            .messages()
            .await
            .map_err(|e| {
                BusError::Unavailable(format!("cannot read NATS consumer {durable}: {e}"))
            })?;
        self.consumers.lock().expect("lock").push(durable);
        Ok(Box::new(NatsConsumer { consumer, messages }))
    }

    async fn tail(&self, team_id: &str, collection_id: &str) -> Result<Box<dyn Tail>, BusError> {
        let c = self
            .state
            .borrow()
            .clone()
            .ok_or_else(|| BusError::Unavailable("not connected to NATS yet".into()))?;
        let max_payload = c.client.server_info().max_payload.max(1024);
        // An ephemeral ordered consumer on the collection's subject, from now on.
        let consumer = c
            .stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: subject(team_id, collection_id),
                deliver_policy: jetstream::consumer::DeliverPolicy::New,
                // Ordered pulls can only be bounded by count: as many of the largest
                // messages as fit in one consumer's share of the connection.
                max_batch: (pull_bytes(max_payload) / max_payload).max(1) as i64,
                ..Default::default()
            })
            .await
            .map_err(|e| BusError::Unavailable(format!("cannot follow the collection: {e}")))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| BusError::Unavailable(format!("cannot follow the collection: {e}")))?;
        Ok(Box::new(NatsTail { messages }))
    }

    async fn health(&self) -> BusHealth {
        let state = self.state.borrow().clone();
        let (ready, detail) = match &state {
            None => (false, self.last_error.lock().expect("lock").clone()),
            Some(c) => match c.client.connection_state() {
                async_nats::connection::State::Connected => {
                    (true, format!("connected to {}", self.url))
                }
                other => (
                    false,
                    format!("NATS connection is {other:?}; the client is reconnecting"),
                ),
            },
        };
        let mut consumer_lag = Vec::new();
        if let (true, Some(c)) = (ready, &state) {
            let names = self.consumers.lock().expect("lock").clone();
            for name in names {
                if let Ok(mut consumer) = c.stream.get_consumer::<pull::Config>(&name).await
                    && let Ok(info) = consumer.info().await
                {
                    consumer_lag.push((name, info.num_pending + info.num_ack_pending as u64));
                }
            }
        }
        BusHealth {
            kind: "nats",
            ready,
            detail,
            consumer_lag,
        }
    }

    async fn recent_client_ids(&self, _since_micros: i64) -> Result<Vec<SeenClientId>, BusError> {
        Ok(Vec::new())
    }

    async fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let state = self.state.borrow().clone();
        if let Some(c) = state {
            let _ = c.client.flush().await;
        }
    }
}

struct NatsTail {
    messages: pull::Ordered,
}

#[async_trait]
impl Tail for NatsTail {
    async fn next(&mut self) -> Result<BusBatch, BusError> {
        loop {
            match self.messages.next().await {
                Some(Ok(m)) => {
                    let position = m.info().map_or(0, |i| i.stream_sequence);
                    return decode_batch(position, m.payload.clone());
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "tail consumer error; continuing");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                None => return Err(BusError::Closed),
            }
        }
    }
}

struct NatsConsumer {
    consumer: jetstream::consumer::Consumer<pull::Config>,
    messages: pull::Stream,
}

#[async_trait]
impl Consumer for NatsConsumer {
    async fn next(&mut self) -> Result<Delivery, BusError> {
        loop {
            let mut message = match self.messages.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "NATS consumer error; continuing");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                None => return Err(BusError::Closed),
            };
            let position = message
                .info()
                .map_err(|e| BusError::Unavailable(format!("bad JetStream message metadata: {e}")))?
                .stream_sequence;
            let batch = decode_batch(position, std::mem::take(&mut message.message.payload))?;
            // The events' payloads point into the message's body; the ack needs only its
            // reply subject, so the body is freed once the consumer drops the events, not
            // when it acks.
            return Ok(Delivery {
                position,
                batch,
                ack: AckHandle::Nats(Box::new(message)),
            });
        }
    }

    async fn ack(&mut self, delivery: Delivery) -> Result<(), BusError> {
        match delivery.ack {
            AckHandle::Nats(message) => message
                .double_ack()
                .await
                .map_err(|e| BusError::Unavailable(format!("NATS ack failed: {e}"))),
            AckHandle::Local(_) => Err(BusError::Rejected("delivery is not from NATS".into())),
        }
    }

    async fn release(&mut self, delivery: Delivery) -> Result<(), BusError> {
        match delivery.ack {
            AckHandle::Nats(message) => message
                .ack_with(jetstream::AckKind::Nak(None))
                .await
                .map_err(|e| BusError::Unavailable(format!("NATS nak failed: {e}"))),
            AckHandle::Local(_) => Err(BusError::Rejected("delivery is not from NATS".into())),
        }
    }

    async fn commit(&mut self) -> Result<(), BusError> {
        // Acks are sent (and confirmed, double_ack) one by one; nothing is held back.
        Ok(())
    }

    async fn lag(&mut self) -> Result<u64, BusError> {
        let info =
            self.consumer.info().await.map_err(|e| {
                BusError::Unavailable(format!("cannot read NATS consumer info: {e}"))
            })?;
        Ok(info.num_pending + info.num_ack_pending as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1::Event;

    #[test]
    fn big_batches_split_under_max_payload_and_huge_events_are_refused() {
        let event = |i: usize, n: usize| Event {
            id: format!("e{i}"),
            payload: vec![b'x'; n].into(),
            ..Default::default()
        };
        let batch = BusBatch {
            team_id: "t".into(),
            collection_id: "c".into(),
            events: (0..100).map(|i| event(i, 1000)).collect(),
        };
        let pieces = split_batch(&batch, 10_000).unwrap();
        assert!(pieces.len() >= 10);
        assert!(pieces.iter().all(|p| p.len() <= 10_000));
        let total: usize = pieces
            .iter()
            .map(|p| decode_batch(0, p.clone().into()).unwrap().events.len())
            .sum();
        assert_eq!(total, 100);
        let huge = BusBatch {
            events: vec![event(0, 20_000)],
            ..batch
        };
        assert!(matches!(
            split_batch(&huge, 10_000),
            Err(BusError::Rejected(_))
        ));
    }
}
