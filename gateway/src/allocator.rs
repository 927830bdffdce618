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
//! Bulk work (the archiver's encoding, bus backlog reads) runs in an arena of its own that
//! keeps its free pages until that work has stopped ([`enter_bulk_arena`]).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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

/// How long the bulk arena has had no thread in it before its free pages go back to the
/// system (checked twice as often).
pub const BULK_IDLE: Duration = Duration::from_secs(1);

/// The bulk arena: one jemalloc arena for bulk work (the archiver's Parquet encoding, and the
/// reads of a bus backlog that feed it), whose free pages are kept while that work goes on
/// and returned once it has stopped for [`BULK_IDLE`], instead of being returned by time
/// decay. Such work frees and allocates the same large buffers over and over (bus records of
/// hundreds of KiB, column chunks, whole files); with the global 50 ms decay, and still with a
/// 2 s decay for this arena, their pages went back to the system and were faulted in again:
/// 210,000-230,000 page faults per million archived events, ~10 % of the archiver's CPU
/// (docs/benchmarks.md, "The bulk arena"). What it keeps while busy is bounded by what the
/// work itself holds at once, which the archiver's own limits bound.
struct Bulk {
    arena: u32,
    /// Threads in the arena now ([`BulkArena`] guards alive).
    inside: AtomicUsize,
    /// When the last guard was dropped (milliseconds since `epoch`), and whether the arena
    /// was used since its last purge.
    left_at_ms: AtomicU64,
    used: AtomicBool,
    epoch: Instant,
}

static BULK: OnceLock<Option<Bulk>> = OnceLock::new();

/// The bulk arena, created (with time decay off) and its keeper thread started on first use;
/// `None` when jemalloc refuses (it is then never retried).
#[allow(unsafe_code)] // jemalloc's mallctl, with the value types its manual gives
fn bulk() -> Option<&'static Bulk> {
    BULK.get_or_init(|| {
        // SAFETY: `arenas.create` yields an `unsigned` (u32); `arena.<i>.dirty_decay_ms` and
        // `arena.<i>.muzzy_decay_ms` take an `ssize_t` (isize), -1 meaning "never by time".
        // Names are NUL-terminated.
        let arena = unsafe {
            let arena: u32 = tikv_jemalloc_ctl::raw::read(b"arenas.create\0").ok()?;
            for kind in ["dirty", "muzzy"] {
                let name = format!("arena.{arena}.{kind}_decay_ms\0");
                tikv_jemalloc_ctl::raw::write(name.as_bytes(), -1isize).ok()?;
            }
            arena
        };
        std::thread::Builder::new()
            .name("bulk-arena".into())
            .spawn(move || keep_bulk_arena(arena))
            .ok()?;
        Some(Bulk {
            arena,
            inside: AtomicUsize::new(0),
            left_at_ms: AtomicU64::new(0),
            used: AtomicBool::new(false),
            epoch: Instant::now(),
        })
    })
    .as_ref()
}

/// The keeper: returns the bulk arena's free pages once no thread has been in it for
/// [`BULK_IDLE`]. It stays in the arena itself: jemalloc purges an arena whole when the last
/// thread leaves it (`thread.arena`), which would happen at every guard's drop otherwise.
#[allow(unsafe_code)] // jemalloc's mallctl, with the value types its manual gives
fn keep_bulk_arena(arena: u32) {
    // SAFETY: `thread.arena` takes an `unsigned` (u32) naming an existing arena.
    if let Err(e) = unsafe { tikv_jemalloc_ctl::raw::write(b"thread.arena\0", arena) } {
        tracing::debug!(error = %e, "the bulk arena's keeper cannot enter it");
    }
    loop {
        std::thread::sleep(BULK_IDLE / 2);
        let Some(Some(b)) = BULK.get() else { continue };
        let idle_ms = (b.epoch.elapsed().as_millis() as u64)
            .saturating_sub(b.left_at_ms.load(Ordering::Acquire));
        if b.inside.load(Ordering::Acquire) == 0
            && idle_ms >= BULK_IDLE.as_millis() as u64
            && b.used.swap(false, Ordering::AcqRel)
        {
            purge_arena(arena);
        }
    }
}

/// Returns every free page of `arena` to the system now.
#[allow(unsafe_code)] // jemalloc's mallctl, a command without values
fn purge_arena(arena: u32) {
    let name = format!("arena.{arena}.purge\0");
    // SAFETY: `arena.<i>.purge` reads and writes nothing; the name is NUL-terminated and
    // names an existing arena.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        tracing::debug!(rc, arena, "cannot purge the bulk arena");
    }
}

/// While alive, the thread that made it allocates in the bulk arena (see [`Bulk`]); dropping
/// it puts the thread back in the arena it was in. Does nothing (beyond setting the arena up)
/// when jemalloc is not the allocator in use, as in library tests.
#[must_use = "the thread leaves the bulk arena when this is dropped"]
pub struct BulkArena {
    previous: Option<u32>,
}

/// Moves the calling thread's allocations to the bulk arena until the guard is dropped.
#[allow(unsafe_code)] // jemalloc's mallctl, with the value types its manual gives
pub fn enter_bulk_arena() -> BulkArena {
    let Some(b) = bulk() else {
        return BulkArena { previous: None };
    };
    b.inside.fetch_add(1, Ordering::AcqRel);
    b.used.store(true, Ordering::Release);
    // SAFETY: `thread.arena` reads and takes an `unsigned` (u32) naming an existing arena.
    let previous = unsafe {
        match tikv_jemalloc_ctl::raw::update(b"thread.arena\0", b.arena) {
            Ok(previous) => Some(previous),
            Err(e) => {
                tracing::debug!(error = %e, "cannot move a thread to the bulk arena");
                None
            }
        }
    };
    BulkArena { previous }
}

impl Drop for BulkArena {
    #[allow(unsafe_code)] // jemalloc's mallctl, with the value types its manual gives
    fn drop(&mut self) {
        let Some(b) = bulk() else { return };
        if let Some(previous) = self.previous {
            // SAFETY: as in `enter_bulk_arena`; `previous` is the arena the thread was in.
            let _ = unsafe { tikv_jemalloc_ctl::raw::write(b"thread.arena\0", previous) };
        }
        b.left_at_ms
            .store(b.epoch.elapsed().as_millis() as u64, Ordering::Release);
        b.inside.fetch_sub(1, Ordering::AcqRel);
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

#[cfg(test)]
#[allow(unsafe_code)] // jemalloc's mallctl and its arena-addressed allocation calls
mod tests {
    use super::*;

    fn thread_arena() -> u32 {
        // SAFETY: `thread.arena` is an `unsigned`.
        unsafe { tikv_jemalloc_ctl::raw::read(b"thread.arena\0").expect("thread.arena") }
    }

    /// Free pages the arena holds (jemalloc's `pdirty`, in pages).
    fn free_pages(arena: u32) -> usize {
        tikv_jemalloc_ctl::epoch::advance().expect("epoch");
        let name = format!("stats.arenas.{arena}.pdirty\0");
        // SAFETY: `stats.arenas.<i>.pdirty` is a `size_t`.
        unsafe { tikv_jemalloc_ctl::raw::read::<usize>(name.as_bytes()).expect("pdirty") }
    }

    /// Allocates `n` buffers of 4 MiB in `arena` (library tests do not run on jemalloc, so
    /// the arena is named), writes every page, and frees them.
    fn churn(arena: u32, n: usize) {
        use tikv_jemalloc_sys::{MALLOCX_ARENA, MALLOCX_TCACHE_NONE, mallocx, sdallocx};
        let size = 4 << 20;
        let flags = MALLOCX_ARENA(arena as usize) | MALLOCX_TCACHE_NONE;
        let buffers: Vec<_> = (0..n)
            .map(|_| {
                // SAFETY: a plain allocation of `size` bytes, written whole, freed below
                // with the same size and flags.
                unsafe {
                    let p = mallocx(size, flags);
                    assert!(!p.is_null());
                    std::ptr::write_bytes(p.cast::<u8>(), 1, size);
                    p
                }
            })
            .collect();
        for p in buffers {
            // SAFETY: allocated above with this size and these flags.
            unsafe { sdallocx(p, size, flags) }
        }
    }

    #[test]
    fn the_bulk_arena_keeps_free_pages_while_in_use_and_returns_them_once_idle() {
        let before = thread_arena();
        let guard = enter_bulk_arena();
        let arena = bulk().expect("jemalloc makes the arena").arena;
        assert_ne!(arena, before);
        assert_eq!(thread_arena(), arena, "the guard moves the thread");
        churn(arena, 8);
        let pages = 8 * (4 << 20) / 4096;
        // In use, past the idle time: nothing is returned by time or by the keeper.
        std::thread::sleep(BULK_IDLE * 2);
        assert!(free_pages(arena) >= pages, "{}", free_pages(arena));
        drop(guard);
        assert_eq!(
            thread_arena(),
            before,
            "dropping the guard moves the thread back"
        );
        // Idle: the keeper returns them.
        let t0 = Instant::now();
        while free_pages(arena) > 0 {
            assert!(
                t0.elapsed() < BULK_IDLE * 10,
                "{} free pages kept",
                free_pages(arena)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            t0.elapsed() >= BULK_IDLE / 2,
            "returned before the arena was idle"
        );
        // A nested guard (a thread already inside) keeps the thread inside until the outer
        // one goes.
        let outer = enter_bulk_arena();
        let inner = enter_bulk_arena();
        drop(inner);
        assert_eq!(thread_arena(), arena);
        drop(outer);
        assert_eq!(thread_arena(), before);
    }
}
