//! Scheduling priority of background work. The archiver's encoding and the search index's
//! writing run at nice +10, so that on a busy machine the threads that acknowledge clients'
//! requests get the CPU first and background work takes what they leave (it catches up when
//! the load drops; its memory is bounded by its own limits). Linux applies a nice value to
//! one thread; elsewhere these are no-ops.

/// The nice value of background threads.
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's priority to [`BACKGROUND_NICE`] (best effort).
pub fn lower_current_thread() {
    #[cfg(target_os = "linux")]
    set_nice(std::process::id() as i32, current_tid(), BACKGROUND_NICE);
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

/// Lowers the priority of this process's threads whose name starts with one of `prefixes`
/// (threads a library spawns, such as tantivy's indexing and merge threads).
pub fn lower_threads_named(prefixes: &[&str]) {
    #[cfg(target_os = "linux")]
    {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return;
        };
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) else {
                continue;
            };
            if prefixes.iter().any(|p| comm.trim_end().starts_with(p)) {
                set_nice(std::process::id() as i32, tid, BACKGROUND_NICE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = prefixes;
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
fn set_nice(_pid: i32, tid: i32, nice: i32) {
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
        // Threads found by name.
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::Builder::new()
            .name("named-worker-1".into())
            .spawn(move || {
                tx.send(super::current_tid()).unwrap();
                done_rx.recv().unwrap();
            })
            .unwrap();
        let tid = rx.recv().unwrap();
        assert_eq!(nice_of(tid), 0);
        super::lower_threads_named(&["named-worker"]);
        assert_eq!(nice_of(tid), super::BACKGROUND_NICE);
        done_tx.send(()).unwrap();
        t.join().unwrap();
        // This thread was not touched.
        assert_eq!(nice_of(super::current_tid()), 0);
    }
}
