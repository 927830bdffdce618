//! The process allocator of the `rewind` binaries: jemalloc, with its settings compiled in.
//!
//! Why jemalloc and these settings: the gateway allocates and frees hundreds of MB per second
//! under load (request bodies, bus records read by the archiver and the indexer, Parquet and
//! index buffers). In the ingest benchmark (docs/benchmarks.md, 2026-12-03) mimalloc held
//! 600 MiB of peak RSS for a live heap under 200 MB; jemalloc with freed pages returned after
//! 50 ms (by its background threads, not on the allocating threads) and two arenas held
//! 376–410 MiB at the same throughput.
//!
//! The settings can be overridden at run time with jemalloc's own variable, e.g.
//! `_RJEM_MALLOC_CONF=dirty_decay_ms:10000` (keep freed pages longer: less CPU, more RSS).

/// jemalloc's compiled-in options (its `malloc_conf`, NUL-terminated): freed pages go back
/// to the system after 50 ms, by background threads; two arenas.
pub const MALLOC_CONF: &[u8; 68] =
    b"background_thread:true,dirty_decay_ms:50,muzzy_decay_ms:0,narenas:2\0";

/// Makes jemalloc the global allocator of a binary, with [`MALLOC_CONF`]. Invoke once, at the
/// top level of the binary's root module.
#[macro_export]
macro_rules! use_jemalloc {
    () => {
        #[global_allocator]
        static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

        /// Read by jemalloc at start-up (the prefixed name of its `malloc_conf`).
        #[allow(non_upper_case_globals)]
        #[unsafe(export_name = "_rjem_malloc_conf")]
        pub static _rjem_malloc_conf: &[u8; 68] = $crate::allocator::MALLOC_CONF;
    };
}
