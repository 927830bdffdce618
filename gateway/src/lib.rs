//! The Rewind gateway as a library: the `rewind` binary, the benchmark and the end-to-end tests
//! all build on these modules. The module tree follows the path of one event:
//! `api` (REST + gRPC surface) → `auth` (tokens, scopes) → `ingest` (parse, limit, dedupe) →
//! `bus` (durable log: local or NATS JetStream), with `meta` (the metastore) beside them.

pub mod api;
pub mod archive;
pub mod auth;
pub mod bus;
pub mod cli;
pub mod config;
pub mod ids;
pub mod ingest;
pub mod meta;
pub mod metrics;
pub mod proto;
pub mod query;
pub mod server;

/// Allocator tuning for the binaries (they use mimalloc as the global allocator): freed memory
/// is returned to the OS after 250 ms instead of mimalloc's 10 ms. The archiver allocates and
/// frees buffers of megabytes per flush; returning them at once made the kernel zero fresh
/// pages on every flush (a quarter of the archiver's CPU in profiles). Never returning them
/// was a little faster still but kept RSS at its high-water mark; 250 ms keeps most of the
/// gain (see docs/benchmarks.md).
///
/// `MIMALLOC_PURGE_DELAY` in the environment (milliseconds; mimalloc's own variable) wins.
#[allow(unsafe_code)] // one FFI call into the allocator, see below
pub fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // mi_option_purge_delay (15 in mimalloc 2.x and 3.x), in milliseconds.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets a process-wide mimalloc option; valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 250) };
}
