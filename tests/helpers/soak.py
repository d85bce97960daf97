"""The soak: many consecutive jobs through `_core.Supervisor` in this one process.

    soak.py JOBS RANKS SEED

Each job picks a scenario at random (seeded): every rank succeeds; one rank fails with a code;
one rank dies of a signal; a rank leaves a background process behind; the caller stops the job
(terminate). Each job's report is checked against the scenario at once. Prints one JSON object:
{"fds_before", "fds_after", "zombies", "marked_left", "elapsed", "scenarios": {name: count},
 "mismatches": [...], "processes": total ranks started, "threads_before", "threads_after"}.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

from dslaunch import _core


def count_fds() -> int:
    return len(os.listdir('/proc/self/fd')) - 1  # minus the listing's own


def zombie_children() -> list[int]:
    me = os.getpid()
    out = []
    for d in os.listdir('/proc'):
        if d.isdigit():
            try:
                with open(f'/proc/{d}/stat', 'rb') as f:
                    fields = f.read().rsplit(b')', 1)[1].split()
            except OSError:
                continue
            if fields[0] == b'Z' and int(fields[1]) == me:
                out.append(int(d))
    return out


def job(rng: random.Random, n: int, null: int) -> tuple[str, str | None]:
    """Runs one job; returns (scenario, mismatch or None)."""
    scenario = rng.choice(['ok', 'fail', 'signal', 'leftover', 'stop'])
    bad = rng.randrange(n)
    code = rng.randrange(1, 120)
    ranks = []
    for r in range(n):
        if scenario == 'ok':
            argv = ['true']
        elif scenario == 'leftover':
            argv = ['/bin/sh', '-c', 'sleep 30 & exit 0'] if r == bad else ['true']
        elif r == bad and scenario == 'fail':
            argv = ['/bin/sh', '-c', f'exit {code}']
        elif r == bad and scenario == 'signal':
            argv = ['/bin/sh', '-c', 'kill -KILL $$']
        else:
            argv = ['sleep', '30']
        ranks.append(_core.RankSpec(argv))
    sup = _core.Supervisor(ranks, stdout_fd=null, stderr_fd=null, forward_signals=[], grace_period=5.0)
    sup.start()
    if scenario == 'stop':
        sup.terminate()
    report = sup.wait(timeout=60)
    if report is None:
        sup.kill()
        sup.wait()
        return scenario, 'did not end within 60 s'
    ff = report.first_failure
    want: dict[str, object] = {
        'ok': {'rc': 0, 'ff': None, 'leftovers': 0},
        'leftover': {'rc': 0, 'ff': None, 'leftovers': 1},
        'fail': {'rc': code, 'ff': bad, 'leftovers': 0},
        'signal': {'rc': 128 + signal.SIGKILL, 'ff': bad, 'leftovers': 0},
        'stop': {'rc': 128 + signal.SIGTERM, 'ff': None, 'leftovers': 0},
    }[scenario]  # type: ignore[assignment]
    got = {'rc': report.returncode, 'ff': None if ff is None else ff.rank, 'leftovers': report.leftovers_killed}
    if got != want:
        return scenario, f'{scenario}: got {got}, want {want}'
    if not report.ranks or any(r.state == 'running' for r in report.ranks):
        return scenario, f'{scenario}: a rank still running in the final report'
    left = _core.find_marked(f'{_core.RUN_ID_VAR}={report.run_id}')
    if left:
        return scenario, f'{scenario}: {len(left)} processes of run {report.run_id} alive after wait()'
    return scenario, None


def main() -> None:
    jobs, n, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    null = os.open(os.devnull, os.O_WRONLY)
    # Warm-up job: lazily imported modules and one-time fds (the subreaper, signal plumbing) are
    # set up by the first job; the leak check compares job 1 with job N+1.
    job(random.Random(0), 2, null)
    fds_before = count_fds()
    threads_before = len(os.listdir('/proc/self/task'))
    scenarios: dict[str, int] = {}
    mismatches = []
    t0 = time.monotonic()
    for _ in range(jobs):
        name, problem = job(rng, n, null)
        scenarios[name] = scenarios.get(name, 0) + 1
        if problem:
            mismatches.append(problem)
    elapsed = time.monotonic() - t0
    tag = os.environ.get('DSLAUNCH_TEST_TAG')
    result = {
        'fds_before': fds_before,
        'fds_after': count_fds(),
        'threads_before': threads_before,
        'threads_after': len(os.listdir('/proc/self/task')),
        'zombies': zombie_children(),
        'marked_left': [
            (p, Path(f'/proc/{p}/cmdline').read_bytes().replace(b'\0', b' ').decode(errors='replace'))
            for p in (_core.find_marked(f'DSLAUNCH_TEST_TAG={tag}') if tag else [])
            if p not in (os.getpid(), os.getppid())
        ],
        'elapsed': elapsed,
        'scenarios': scenarios,
        'mismatches': mismatches,
        'processes': jobs * n,
    }
    print(json.dumps(result))


if __name__ == '__main__':
    main()
