//! Scheduling priority of background work. The archiver's encoding runs at nice +10, so that
//! on a busy machine the threads that acknowledge clients' requests (and answer searches) get
//! the CPU first and the archiver takes what they leave (it catches up when the load drops;
//! its memory is bounded by its own limits). The search indexer stays at normal priority
//! (one thread building documents; extra builder threads run at +10, `search::embedded`):
//! tried at +10, it fell far behind under a steady search load, and its freshness is a
//! target of its own. Linux applies a nice value to one thread; elsewhere these are no-ops.

/// The nice value of background threads.
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's priority to [`BACKGROUND_NICE`] (best effort).
pub fn lower_current_thread() {
    #[cfg(target_os = "linux")]
    set_nice(current_tid(), BACKGROUND_NICE);
}

/// Runs `f` on a new thread at background priority and waits for it.
pub fn run_in_background<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T, String> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn_scoped(scope, || {
                lower_current_thread();
                f()
            })
            .map_err(|e| format!("cannot start a {name} thread: {e}"))?
            .join()
            .map_err(|_| format!("the {name} thread panicked"))
    })
}

#[cfg(target_os = "linux")]
fn current_tid() -> i32 {
    // /proc/thread-self is this thread's /proc/<pid>/task/<tid>.
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse().ok())
        .unwrap_or(0)
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // one libc call taking plain integers; nothing else in the crate is unsafe
fn set_nice(tid: i32, nice: i32) {
    if tid <= 0 {
        return;
    }
    // SAFETY: setpriority reads its three integer arguments and changes the nice value of
    // thread `tid` of this process; no memory is passed.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice);
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    fn nice_of(tid: i32) -> i32 {
        // Field 19 of /proc/self/task/<tid>/stat (after the command in parentheses).
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split(' ').nth(16).unwrap().parse().unwrap()
    }

    #[test]
    fn background_threads_run_at_a_lower_priority() {
        let base = nice_of(super::current_tid());
        if base != 0 {
            // Under `nice`, absolute values differ (and may not be lowered back): nothing to
            // compare against.
            eprintln!("not checked: the test itself runs at nice {base}");
            return;
        }
        let (tid, nice) = super::run_in_background("prio-test", || {
            let tid = super::current_tid();
            (tid, nice_of(tid))
        })
        .unwrap();
        assert!(tid > 0);
        assert_eq!(nice, super::BACKGROUND_NICE);
        // This thread was not touched.
        assert_eq!(nice_of(super::current_tid()), 0);
    }
}
