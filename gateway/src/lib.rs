//! The Rewind gateway as a library: the `rewind` binary, the benchmark and the end-to-end tests
//! all build on these modules. The module tree follows the path of one event:
//! `api` (REST + gRPC surface) → `auth` (tokens, scopes) → `ingest` (parse, limit, dedupe) →
//! `bus` (durable log: local or NATS JetStream), with `meta` (the metastore) beside them.

pub mod allocator;
pub mod api;
pub mod archive;
pub mod auth;
pub mod bus;
pub mod cli;
pub mod config;
pub mod http_server;
pub mod ids;
pub mod ingest;
pub mod meta;
pub mod metrics;
pub mod paced_io;
pub mod plugins;
pub mod priority;
pub mod proto;
pub mod query;
pub mod replay;
pub mod search;
pub mod server;
pub mod sources;
