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

/// What the allocator holds right now, in bytes (jemalloc's statistics; the binaries build
/// jemalloc with them). `allocated`: live allocations; `resident`: pages the allocator has
/// in memory (live data, its metadata, and freed pages not yet returned), which is most of the
/// process's anonymous RSS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub allocated: u64,
    pub active: u64,
    pub resident: u64,
    pub retained: u64,
}

/// Reads [`Usage`] (refreshing jemalloc's cached statistics first); `None` when they cannot
/// be read.
pub fn usage() -> Option<Usage> {
    use tikv_jemalloc_ctl::{epoch, stats};
    epoch::advance().ok()?;
    Some(Usage {
        allocated: stats::allocated::read().ok()? as u64,
        active: stats::active::read().ok()? as u64,
        resident: stats::resident::read().ok()? as u64,
        retained: stats::retained::read().ok()? as u64,
    })
}

/// How long an arena of [`use_bulk_arena`] keeps freed pages before returning them.
pub const BULK_DECAY_MS: isize = 2_000;

/// Moves the calling thread's allocations to an arena for bulk work (the archiver's Parquet
/// encoding): one arena shared by such threads, created on first use, that keeps freed pages
/// for [`BULK_DECAY_MS`] instead of 50 ms. The encoder allocates and frees the same large
/// buffers every flush, on a new thread each time; with the global 50 ms the pages were
/// returned between flushes and faulted in again (~10 % of the archiver's CPU). Its memory
/// is bounded by the archiver's own budget. Does nothing when jemalloc is not the allocator
/// in use (library tests) beyond setting up an unused arena.
#[allow(unsafe_code)] // jemalloc's mallctl, with the value types its manual gives
pub fn use_bulk_arena() {
    static ARENA: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    let arena = *ARENA.get_or_init(|| {
        // SAFETY: `arenas.create` yields an `unsigned` (u32) and
        // `arena.<i>.dirty_decay_ms` takes an `ssize_t` (isize); names are NUL-terminated.
        unsafe {
            let arena: u32 = tikv_jemalloc_ctl::raw::read(b"arenas.create\0").ok()?;
            let decay = format!("arena.{arena}.dirty_decay_ms\0");
            tikv_jemalloc_ctl::raw::write(decay.as_bytes(), BULK_DECAY_MS).ok()?;
            Some(arena)
        }
    });
    // SAFETY: `thread.arena` takes an `unsigned` (u32) naming an existing arena.
    if let Some(arena) = arena
        && let Err(e) = unsafe { tikv_jemalloc_ctl::raw::write(b"thread.arena\0", arena) }
    {
        tracing::debug!(error = %e, "cannot move a thread to the bulk arena");
    }
}

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
