//! End-to-end tests: each starts the real `rewind` binary (and real NATS / PostgreSQL where
//! the test is about them) and talks to it over the network like a user would.

mod support;

mod admin;
mod archive;
mod cli;
mod durability;
mod grpc;
mod ingest;
mod nats;
mod plugins;
mod replays;
mod s3;
mod search;
mod sources;
