//! The durable bus: where an event is made durable before its client gets an ack, and where
//! the archiver, the indexer and the live tail read from. One trait, [`Bus`], two backends:
//! [`local::LocalBus`] (an fsync'ed, CRC-checked log in the data dir; the default) and
//! [`nats::NatsBus`] (NATS JetStream). Consumers get at-least-once delivery with explicit acks
//! and resume after a restart where their acks left off; redelivery is normal, so whatever a
//! consumer writes must be idempotent by event id.

pub mod local;
pub mod nats;
mod wire;

use async_trait::async_trait;

pub use crate::proto::v1::{BusBatch, Event};

/// A message's place on the bus: the log offset (local) or the stream sequence (NATS).
pub type Position = u64;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Writes cannot be made durable right now; the caller should retry later. Nothing was
    /// acknowledged.
    #[error("the bus is unavailable: {0}")]
    Unavailable(String),
    /// The message cannot be stored however often it is retried.
    #[error("the bus refused the message: {0}")]
    Rejected(String),
    #[error("a message on the bus is corrupt at position {position}: {detail}")]
    Corrupt { position: Position, detail: String },
    #[error("consumer {0:?} is already running in this process")]
    ConsumerBusy(String),
    #[error("the bus is shutting down")]
    Closed,
}

/// What `append` reports once the batch is durable.
#[derive(Debug, Clone, Copy)]
pub struct Appended {
    /// Position of the (last) message written.
    pub position: Position,
    /// True when the bus recognised the message as a retry it already holds (NATS `Nats-Msg-Id`).
    pub duplicate: bool,
}

/// Readiness of the bus, for `/readyz` and `/metrics`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BusHealth {
    pub kind: &'static str,
    pub ready: bool,
    pub detail: String,
    /// Messages not yet acknowledged, per known consumer.
    pub consumer_lag: Vec<(String, u64)>,
}

/// A client id seen recently, for rebuilding the ingest de-duplication index after a restart.
#[derive(Debug, Clone)]
pub struct SeenClientId {
    pub team_id: String,
    pub collection_id: String,
    pub client_id: String,
    pub event_id: String,
    pub received_at_micros: i64,
}

#[async_trait]
pub trait Bus: Send + Sync {
    fn kind(&self) -> &'static str;

    /// Appends one batch (all events of one team's collection) and returns once it is durable.
    /// `message_id` identifies the batch so a retried append can be recognised (NATS dedupe).
    async fn append(&self, batch: &BusBatch, message_id: &str) -> Result<Appended, BusError>;

    /// Opens (or resumes) the named durable consumer.
    async fn consumer(&self, name: &str) -> Result<Box<dyn Consumer>, BusError>;

    async fn health(&self) -> BusHealth;

    /// Client ids of events appended since `since_micros`, when the backend can list them
    /// cheaply (the local log can; JetStream relies on its own `Nats-Msg-Id` window instead).
    async fn recent_client_ids(&self, since_micros: i64) -> Result<Vec<SeenClientId>, BusError>;

    /// Deletes what every consumer has passed and that is older than `older_than`, where the
    /// backend keeps history itself (the local log); JetStream applies its stream limits.
    /// Returns how many units (segments) went.
    async fn retain_before(&self, _older_than: std::time::SystemTime) -> Result<usize, BusError> {
        Ok(0)
    }

    /// Follows one collection from now on (for `rewind tail`): no durable state, no acks;
    /// only what is appended after the call.
    async fn tail(&self, team_id: &str, collection_id: &str) -> Result<Box<dyn Tail>, BusError>;

    /// Stops taking appends, finishes those in flight, and flushes.
    async fn close(&self);
}

/// A live, non-durable view of one collection's new messages.
#[async_trait]
pub trait Tail: Send {
    /// The next batch appended to the collection, waiting until there is one.
    async fn next(&mut self) -> Result<BusBatch, BusError>;
}

/// One message handed to a consumer.
pub struct Delivery {
    pub position: Position,
    pub batch: BusBatch,
    pub(crate) ack: AckHandle,
}

pub(crate) enum AckHandle {
    Local(Position),
    Nats(Box<async_nats::jetstream::Message>),
}

/// A durable consumer: at-least-once, explicit acks, resumes after a restart.
#[async_trait]
pub trait Consumer: Send {
    /// The next message, waiting until there is one.
    async fn next(&mut self) -> Result<Delivery, BusError>;
    /// Marks a delivered message as processed. Messages never acked are delivered again after
    /// the consumer is reopened.
    async fn ack(&mut self, delivery: Delivery) -> Result<(), BusError>;
    /// Hands a delivered message back unprocessed, to be delivered again: on NATS at once (to
    /// this consumer or another of its group), on the local bus once the consumer is reopened
    /// (it reads on from its last committed position).
    async fn release(&mut self, delivery: Delivery) -> Result<(), BusError>;
    /// Saves the consumer's progress now (it is also saved periodically and on drop).
    async fn commit(&mut self) -> Result<(), BusError>;
    /// Messages on the bus this consumer has not acknowledged yet.
    async fn lag(&mut self) -> Result<u64, BusError>;
}

/// Decodes a bus record. Payloads are slices of `bytes` (no copy).
pub fn decode_batch(position: Position, bytes: bytes::Bytes) -> Result<BusBatch, BusError> {
    wire::decode_batch(bytes).map_err(|e| BusError::Corrupt {
        position,
        detail: e.to_string(),
    })
}

/// A batch of `n` small JSON events for tests (`{tag}-{i}` ids, client ids `c-{tag}-{i}`).
#[cfg(test)]
pub(crate) fn test_batch(n: usize, tag: &str) -> BusBatch {
    BusBatch {
        team_id: "tm_1".into(),
        collection_id: "col_1".into(),
        events: (0..n)
            .map(|i| Event {
                id: format!("{tag}-{i}"),
                received_at_micros: crate::ids::now_micros(),
                payload: bytes::Bytes::from(format!("{{\"i\":{i}}}")),
                content_type: "application/json".into(),
                client_id: format!("c-{tag}-{i}"),
                ..Default::default()
            })
            .collect(),
    }
}
