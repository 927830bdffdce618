//! Prometheus metrics, rendered as text on `GET /metrics`: requests by route and status,
//! events and bytes accepted, append latency, rate-limit refusals, and (read at scrape time)
//! bus consumer lag and readiness, and what the allocator holds.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AllocatorLabel {
    /// `allocated`, `active`, `resident` or `retained` (see `allocator::Usage`).
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabel {
    pub consumer: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub events_accepted: Family<TransportLabel, Counter>,
    pub ingest_bytes: Counter,
    pub rate_limited: Counter,
    pub ingest_overloaded: Counter,
    pub append_seconds: Histogram,
    pub ingest_request_seconds: Histogram,
    pub bus_lag: Family<ConsumerLabel, Gauge>,
    pub bus_ready: Gauge,
    pub search_indexed: Gauge,
    pub search_ready: Gauge,
    pub allocator_bytes: Family<AllocatorLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("rewind");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP and gRPC requests by route and status",
            requests.clone(),
        );
        let events_accepted = Family::<TransportLabel, Counter>::default();
        registry.register(
            "events_accepted",
            "Events acknowledged (durable on the bus)",
            events_accepted.clone(),
        );
        let ingest_bytes = Counter::default();
        registry.register(
            "ingest_bytes",
            "Payload bytes acknowledged",
            ingest_bytes.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "rate_limited",
            "Ingest requests refused by the per-token rate limit",
            rate_limited.clone(),
        );
        let ingest_overloaded = Counter::default();
        registry.register(
            "ingest_overloaded",
            "Ingest requests turned away (503) because --max-inflight-bytes stayed full",
            ingest_overloaded.clone(),
        );
        let append_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "bus_append_seconds",
            "Time from append to durable on the bus",
            append_seconds.clone(),
        );
        let ingest_request_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "ingest_request_seconds",
            "Time the gateway spends on a REST ingest request (POST …/events), from its headers to its response: reading the body, parsing it, making it durable",
            ingest_request_seconds.clone(),
        );
        let bus_lag = Family::<ConsumerLabel, Gauge>::default();
        registry.register(
            "bus_lag_messages",
            "Bus messages a consumer has not acknowledged yet",
            bus_lag.clone(),
        );
        let bus_ready = Gauge::default();
        registry.register(
            "bus_ready",
            "1 when the bus takes writes",
            bus_ready.clone(),
        );
        let search_indexed = Gauge::default();
        registry.register(
            "search_events_indexed",
            "Events the indexer has written to the search index since the gateway started",
            search_indexed.clone(),
        );
        let search_ready = Gauge::default();
        registry.register(
            "search_ready",
            "1 when the search index answers and the indexer has no pending error",
            search_ready.clone(),
        );
        let allocator_bytes = Family::<AllocatorLabel, Gauge>::default();
        registry.register(
            "allocator_bytes",
            "Memory held by the allocator: allocated (live), active, resident (in RAM, including freed pages not yet returned), retained (address space kept for reuse)",
            allocator_bytes.clone(),
        );
        Self {
            registry,
            requests,
            events_accepted,
            ingest_bytes,
            rate_limited,
            ingest_overloaded,
            append_seconds,
            ingest_request_seconds,
            bus_lag,
            bus_ready,
            search_indexed,
            search_ready,
            allocator_bytes,
        }
    }

    /// Reads the allocator's statistics into [`Self::allocator_bytes`].
    pub fn refresh_allocator(&self) {
        if let Some(u) = crate::allocator::usage() {
            for (kind, v) in [
                ("allocated", u.allocated),
                ("active", u.active),
                ("resident", u.resident),
                ("retained", u.retained),
            ] {
                self.allocator_bytes
                    .get_or_create(&AllocatorLabel { kind })
                    .set(v as i64);
            }
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}
