#!/usr/bin/env python3
"""Run-queue delay per thread of a running process, by thread name and scheduling class
(docs/benchmarks.md, issue 3: where the half-peak ack tail waits).

    scripts/schedwatch.py PID START_SECONDS DURATION_SECONDS

Waits START_SECONDS, then for DURATION_SECONDS reads every thread's /proc schedstat about
every 10 ms. For each class of threads (name + `/idle` for SCHED_IDLE or `/n<nice>`) it
prints the CPU used (percent of one CPU) and the distribution of the time a thread spent
runnable but not running per sampling interval in which it ran or waited. Linux only;
Python standard library only.
"""
import sys, os, time
from collections import defaultdict
pid, start, dur = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
time.sleep(start)
def snap():
    d = {}
    for tid in os.listdir(f'/proc/{pid}/task'):
        try:
            name = open(f'/proc/{pid}/task/{tid}/comm').read().strip()
            st = open(f'/proc/{pid}/task/{tid}/stat').read().rsplit(')', 1)[1].split()
            name += '/idle' if st[38] == '5' else ('/n%s' % st[16])
            run, wait, sl = map(int, open(f'/proc/{pid}/task/{tid}/schedstat').read().split())
            d[tid] = (name, run, wait)
        except Exception:
            pass
    return d
prev = snap(); t0 = time.time(); per = defaultdict(list); cpu = defaultdict(int)
while time.time() - t0 < dur:
    time.sleep(0.01)
    cur = snap()
    for tid, (n, r, w) in cur.items():
        if tid in prev and prev[tid][0] == n:
            cpu[n] += r - prev[tid][1]
            if r - prev[tid][1] > 0 or w - prev[tid][2] > 0:
                per[n].append((w - prev[tid][2]) / 1e6)
    prev = cur
el = time.time() - t0
for n, v in sorted(per.items(), key=lambda kv: -cpu[kv[0]])[:12]:
    v.sort(); k = len(v)
    print(f'{n:18s} cpu {cpu[n]/el/1e7:5.1f}%  run-queue wait per thread per ~10 ms it was runnable: p50 {v[k//2]:.2f} p99 {v[int(k*0.99)]:.2f} max {v[-1]:.2f} ms  (>5 ms in {sum(1 for x in v if x > 5)} of {k})')
