//! Scheduling priority of background work. The archiver's encoding runs in the background
//! always, so that on a busy machine the threads that acknowledge clients' requests (and
//! answer searches) get the CPU first and the archiver takes what they leave (it catches up
//! when the load drops; its memory is bounded by its own limits). The embedded search index
//! switches between the two (`search::embedded`): while it keeps up with the bus it indexes at
//! normal priority (freshness is a target of its own: tried in the background under a steady
//! search load, it fell far behind), and once it is a backlog behind it catches up in the
//! background, so that a burst of ingest is acknowledged first. The gateway's consumers of
//! the local bus (archiver, indexer) read a backlog (segments the writer has rolled) in the
//! background as well (`LocalBusOptions::background_reads`, each read only:
//! [`lower_for_a_while`]; never the active segment, whose inode lock the writer takes);
//! operator tools such as `rewind bus read` do not, as on a busy machine a background thread
//! can wait seconds for a CPU and a tool would take that for the end of the log.
//!
//! "Background" is Linux's `SCHED_IDLE` policy (and nice +10, which tools show): such a thread
//! runs only on a CPU no normal thread wants, and a normal thread that wakes up takes the CPU
//! from it at once. Nice +10 alone only shares the CPU in proportion (about 1 : 9) and, under
//! the EEVDF scheduler, does not guarantee that a waking thread preempts: under the ingest
//! benchmark the acknowledging threads waited 20-85 ms for a CPU after wake-ups while
//! background threads ran (`perf sched`), and the HTTP and gRPC rates were
//! 20-30 % lower than with `SCHED_IDLE` (docs/benchmarks.md). Linux applies both to one
//! thread; elsewhere these are no-ops.
//!
//! Background threads also get the idle I/O class (`ioprio_set`, `IOPRIO_CLASS_IDLE`): the
//! block layer's schedulers that know classes (mq-deadline, BFQ) send their reads and writes
//! (the archiver's file syncs, the index's commits, reads of the bus behind it) to the disk
//! when no normal-class request waits, so they queue behind the bus log's group commits
//! rather than in front of them.

/// The nice value of background threads (which also run under `SCHED_IDLE`).
pub const BACKGROUND_NICE: i32 = 10;

/// Moves the calling thread to the background (`SCHED_IDLE`, nice [`BACKGROUND_NICE`]; best
/// effort).
pub fn lower_current_thread() {
    #[cfg(target_os = "linux")]
    set_nice(current_tid(), BACKGROUND_NICE);
}

/// Whether this process may give a thread back its normal priority after lowering it (root,
/// `CAP_SYS_NICE` or an `RLIMIT_NICE` of 20). Without that, lowering is a one-way door, and
/// code that would switch back and forth keeps normal priority instead.
pub fn can_restore_priority() -> bool {
    #[cfg(target_os = "linux")]
    {
        static CAN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *CAN.get_or_init(|| {
            std::thread::spawn(|| {
                let tid = current_tid();
                set_nice(tid, BACKGROUND_NICE) && set_nice(tid, 0)
            })
            .join()
            .unwrap_or(false)
        })
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// The ids of this process's threads whose name starts with one of `prefixes` (Linux keeps
/// the first 15 bytes of a thread's name). Taken before and after a library starts its
/// threads, the difference is that library's threads.
pub fn threads_named(prefixes: &[&str]) -> std::collections::BTreeSet<i32> {
    #[cfg(target_os = "linux")]
    {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return Default::default();
        };
        tasks
            .flatten()
            .filter(|task| {
                std::fs::read_to_string(task.path().join("comm"))
                    .is_ok_and(|name| prefixes.iter().any(|p| name.starts_with(p)))
            })
            .filter_map(|task| task.file_name().to_str()?.parse::<i32>().ok())
            .collect()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = prefixes;
        Default::default()
    }
}

/// Sets the priority (as [`set_nice`]) of those of `tids` that are, right now, threads of this
/// process named with one of `prefixes`; returns how many were changed.
///
/// A saved thread id goes stale when its thread exits, and Linux hands ids out again once it
/// reaches `pid_max` (32768 by default; a busy gateway starts threads all the time: the
/// embedded index's writer alone starts new ones at every commit). A stale id may then name
/// another thread of this process (a tokio worker that answers clients) or a thread of another
/// process, which `setpriority` run as root would lower just the same. Checking the name first
/// leaves a window of a few microseconds between the check and the call.
pub fn set_threads(tids: &std::collections::BTreeSet<i32>, prefixes: &[&str], nice: i32) -> usize {
    #[cfg(target_os = "linux")]
    {
        let current = threads_named(prefixes);
        tids.intersection(&current)
            .filter(|tid| set_nice(**tid, nice))
            .count()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (tids, prefixes, nice);
        0
    }
}

/// The calling thread at background priority until this is dropped; see
/// [`lower_for_a_while`]. Holds the id of the thread it lowered and the nice value it had
/// before, if it lowered one.
#[must_use = "the thread goes back to its priority when this is dropped"]
pub struct Lowered(Option<(i32, i32)>);

/// Moves the calling thread (e.g. one of tokio's blocking pool, which other tasks reuse) to
/// the background until the returned guard is dropped, which gives the thread back the nice
/// value it had (a gateway started under `nice` keeps its threads' value) with the normal
/// policy. A thread already in the background, or one this process could not give its
/// priority back ([`can_restore_priority`]), is left as it is.
pub fn lower_for_a_while() -> Lowered {
    #[cfg(target_os = "linux")]
    if can_restore_priority() {
        let tid = current_tid();
        if let Some(before) = nice_now(tid)
            && before < BACKGROUND_NICE
        {
            return Lowered(set_nice(tid, BACKGROUND_NICE).then_some((tid, before)));
        }
    }
    Lowered(None)
}

impl Drop for Lowered {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Some((tid, before)) = self.0
            && !set_nice(tid, before)
        {
            tracing::warn!("cannot give a thread its priority back");
        }
    }
}

/// Thread `tid`'s nice value (`getpriority`), if it can be read.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // two libc calls taking and returning integers
fn nice_now(tid: i32) -> Option<i32> {
    if tid <= 0 {
        return None;
    }
    // getpriority returns -1 both for nice -1 and for an error: errno tells them apart.
    // SAFETY: __errno_location returns this thread's errno, which is written before the call.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: getpriority reads two integers and returns the nice value of thread `tid`.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
    // SAFETY: as above.
    let failed = nice == -1 && unsafe { *libc::__errno_location() } != 0;
    (!failed).then_some(nice)
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

/// Sets thread `tid`'s nice value, and its policy: `SCHED_IDLE` at [`BACKGROUND_NICE`] or
/// above, `SCHED_OTHER` below. Going back from `SCHED_IDLE` needs the same right as raising
/// the nice value (see [`can_restore_priority`]).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // three libc calls taking plain integers and a plain struct
fn set_nice(tid: i32, nice: i32) -> bool {
    if tid <= 0 {
        return false;
    }
    // SAFETY: setpriority reads its three integer arguments and changes the nice value of
    // thread `tid` of this process; no memory is passed.
    let niced = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) == 0 };
    let policy = if nice >= BACKGROUND_NICE {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads `param` (a plain struct on our stack) and changes the
    // policy of thread `tid` of this process.
    let scheduled = unsafe { libc::sched_setscheduler(tid, policy, &param) == 0 };
    // The I/O class follows: idle for background threads, else "none" (derived from the nice
    // value, best effort) again. Best effort: the CPU priority is what the result reports.
    let class = if nice >= BACKGROUND_NICE {
        IOPRIO_CLASS_IDLE
    } else {
        IOPRIO_CLASS_NONE
    };
    // SAFETY: ioprio_set takes three integers (who, which thread, class << 13) and changes
    // the I/O priority of thread `tid`; no memory is passed.
    unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            tid,
            class << IOPRIO_CLASS_SHIFT,
        );
    }
    niced && scheduled
}

#[cfg(target_os = "linux")]
const IOPRIO_WHO_PROCESS: libc::c_int = 1;
#[cfg(target_os = "linux")]
const IOPRIO_CLASS_SHIFT: libc::c_int = 13;
#[cfg(target_os = "linux")]
const IOPRIO_CLASS_NONE: libc::c_int = 0;
#[cfg(target_os = "linux")]
const IOPRIO_CLASS_IDLE: libc::c_int = 3;

/// A thread's I/O scheduling class (`ioprio_get`; 0 none, 1 real time, 2 best effort, 3 idle).
#[cfg(all(test, target_os = "linux"))]
#[allow(unsafe_code)] // one syscall taking integers
fn io_class_of(tid: i32) -> libc::c_long {
    // SAFETY: ioprio_get takes two integers and returns one; no memory is passed.
    let v = unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, tid) };
    v >> IOPRIO_CLASS_SHIFT
}

/// A thread's nice value (for tests).
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn nice_of_thread(tid: i32) -> Option<i32> {
    std::path::Path::new(&format!("/proc/self/task/{tid}"))
        .exists()
        .then(|| tests::nice_of(tid))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    pub(super) fn nice_of(tid: i32) -> i32 {
        // Field 19 of /proc/self/task/<tid>/stat (after the command in parentheses).
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split(' ').nth(16).unwrap().parse().unwrap()
    }

    /// Field 41 of /proc/self/task/<tid>/stat: the scheduling policy.
    pub(super) fn policy_of(tid: i32) -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split(' ').nth(38).unwrap().parse().unwrap()
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
        let (tid, nice, policy, io_class) = super::run_in_background("prio-test", || {
            let tid = super::current_tid();
            (tid, nice_of(tid), policy_of(tid), super::io_class_of(tid))
        })
        .unwrap();
        assert!(tid > 0);
        assert_eq!(nice, super::BACKGROUND_NICE);
        assert_eq!(policy, libc::SCHED_IDLE);
        assert_eq!(io_class, super::IOPRIO_CLASS_IDLE as libc::c_long);
        // This thread was not touched.
        assert_eq!(nice_of(super::current_tid()), 0);
        assert_eq!(policy_of(super::current_tid()), libc::SCHED_OTHER);
        assert_ne!(
            super::io_class_of(super::current_tid()),
            super::IOPRIO_CLASS_IDLE as libc::c_long
        );
    }

    #[test]
    fn a_thread_lowered_for_a_while_gets_its_priority_back() {
        if nice_of(super::current_tid()) != 0 || !super::can_restore_priority() {
            eprintln!("not checked: cannot give a thread its priority back here");
            return;
        }
        // On a thread of its own: the test harness's thread is left alone whatever happens.
        std::thread::spawn(|| {
            let tid = super::current_tid();
            {
                let _lowered = super::lower_for_a_while();
                assert_eq!(nice_of(tid), super::BACKGROUND_NICE);
                assert_eq!(policy_of(tid), libc::SCHED_IDLE);
                assert_eq!(
                    super::io_class_of(tid),
                    super::IOPRIO_CLASS_IDLE as libc::c_long
                );
            }
            assert_eq!(nice_of(tid), 0);
            assert_eq!(policy_of(tid), libc::SCHED_OTHER);
            assert_ne!(
                super::io_class_of(tid),
                super::IOPRIO_CLASS_IDLE as libc::c_long
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_niced_thread_lowered_for_a_while_gets_its_own_nice_value_back() {
        if nice_of(super::current_tid()) != 0 || !super::can_restore_priority() {
            eprintln!("not checked: cannot give a thread its priority back here");
            return;
        }
        std::thread::spawn(|| {
            let tid = super::current_tid();
            // As for a gateway started under `nice -n 5`.
            assert!(super::set_nice(tid, 5));
            {
                let _lowered = super::lower_for_a_while();
                assert_eq!(nice_of(tid), super::BACKGROUND_NICE);
                assert_eq!(policy_of(tid), libc::SCHED_IDLE);
            }
            assert_eq!(nice_of(tid), 5);
            assert_eq!(policy_of(tid), libc::SCHED_OTHER);
            // A thread already in the background is left there.
            assert!(super::set_nice(tid, super::BACKGROUND_NICE + 2));
            {
                let _lowered = super::lower_for_a_while();
                assert_eq!(nice_of(tid), super::BACKGROUND_NICE + 2);
            }
            assert_eq!(nice_of(tid), super::BACKGROUND_NICE + 2);
            assert_eq!(policy_of(tid), libc::SCHED_IDLE);
        })
        .join()
        .unwrap();
    }

    /// A named thread that waits until stopped (its id is what the tests change).
    struct ParkedThread {
        done: std::sync::mpsc::Sender<()>,
        handle: std::thread::JoinHandle<()>,
    }

    impl ParkedThread {
        fn start(name: &str) -> (i32, Self) {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (done, done_rx) = std::sync::mpsc::channel::<()>();
            let handle = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    ready_tx.send(super::current_tid()).unwrap();
                    let _ = done_rx.recv();
                })
                .unwrap();
            (ready_rx.recv().unwrap(), Self { done, handle })
        }

        fn stop(self) {
            self.done.send(()).unwrap();
            self.handle.join().unwrap();
        }
    }

    #[test]
    fn named_threads_change_priority_and_others_do_not() {
        if nice_of(super::current_tid()) != 0 || !super::can_restore_priority() {
            eprintln!("not checked: cannot give a thread its priority back here");
            return;
        }
        let (tid, worker) = ParkedThread::start("prio-named-worker");
        let named = super::threads_named(&["prio-named-"]);
        assert_eq!(named.iter().copied().collect::<Vec<_>>(), vec![tid]);
        assert!(super::threads_named(&["no-such-thread-"]).is_empty());
        let prefixes = ["prio-named-"];
        assert_eq!(
            super::set_threads(&named, &prefixes, super::BACKGROUND_NICE),
            1
        );
        assert_eq!(nice_of(tid), super::BACKGROUND_NICE);
        assert_eq!(policy_of(tid), libc::SCHED_IDLE);
        assert_eq!(nice_of(super::current_tid()), 0);
        assert_eq!(super::set_threads(&named, &prefixes, 0), 1);
        assert_eq!(nice_of(tid), 0);
        assert_eq!(policy_of(tid), libc::SCHED_OTHER);
        worker.stop();
    }

    #[test]
    fn a_saved_thread_id_now_naming_another_thread_is_left_alone() {
        if nice_of(super::current_tid()) != 0 {
            eprintln!(
                "not checked: the test itself runs at nice {}",
                nice_of(super::current_tid())
            );
            return;
        }
        // As if the id of an exited "prio-gone-" thread had been handed to a new thread with
        // another name (a tokio worker, say): the saved id must not change that thread.
        let (tid, other) = ParkedThread::start("prio-other");
        let saved: std::collections::BTreeSet<i32> = [tid].into();
        assert_eq!(
            super::set_threads(&saved, &["prio-gone-"], super::BACKGROUND_NICE),
            0
        );
        assert_eq!(nice_of(tid), 0);
        assert_eq!(policy_of(tid), libc::SCHED_OTHER);
        other.stop();
    }
}
