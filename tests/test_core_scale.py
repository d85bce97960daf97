"""Scale: 1,024 ranks on a small machine, a launcher whose fd soft limit was lowered, and running
out of fds altogether (a clean OSError, nothing left running)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

from dslaunch import _core
from helpers.procs import HELPERS, PY, Launcher, marked


def test_1024_ranks_all_run_and_every_line_is_accounted_for(tmp_path: Path, run_id: str) -> None:
    n = 1024
    out = tmp_path / 'out'
    fd = os.open(out, os.O_WRONLY | os.O_CREAT)
    ranks = [_core.RankSpec(['/bin/sh', '-c', 'echo rank $R; echo err $R >&2'], env={'R': str(r)}) for r in range(n)]
    try:
        report = _core.Supervisor(ranks, run_id=run_id, stdout_fd=fd, stderr_fd=fd).run()
    finally:
        os.close(fd)
    assert report.returncode == 0, [r for r in report.ranks if r.returncode][:3]
    assert len(report.ranks) == n and len({r.pid for r in report.ranks}) == n
    assert all(r.state == 'exited' and r.output_lines == 2 for r in report.ranks)
    lines = out.read_text().splitlines()
    assert sorted(lines) == sorted([f'[{r}]: rank {r}' for r in range(n)] + [f'[{r}]: err {r}' for r in range(n)])
    assert marked(f'DSLAUNCH_RUN_ID={run_id}') == []


def test_lowered_soft_fd_limit_is_raised_for_300_ranks(tmp_path: Path) -> None:
    """Soft RLIMIT_NOFILE 256 (hard limit untouched): the core raises the soft limit as far as the
    job needs (3 fds a rank) and all 300 ranks run."""
    n = 300
    hard = subprocess.run(
        [PY, '-c', 'import resource; print(resource.getrlimit(resource.RLIMIT_NOFILE)[1])'],
        capture_output=True,
        text=True,
        check=False,
    )
    hard_limit = int(hard.stdout)
    assert hard_limit >= 4 * n + 64, 'this machine cannot run the test: hard fd limit too low'
    console = tmp_path / 'console'
    spec = {
        'ranks': [{'argv': ['/bin/sh', '-c', f'echo rank {r}']} for r in range(n)],
        'console': str(console),
        'nofile': [256, hard_limit],
    }
    with Launcher(spec) as launcher:
        started = launcher.event()
        report = launcher.event()
        assert launcher.wait() == 0
    assert started['event'] == 'started', started
    assert 3 * n < started['nofile'][0] <= hard_limit, 'the soft limit was raised, but only as far as needed'
    assert report['returncode'] == 0
    assert sorted(console.read_text().splitlines()) == sorted(f'[{r}]: rank {r}' for r in range(n))


def test_too_low_hard_fd_limit_is_a_clean_os_error(tmp_path: Path, run_id: str) -> None:
    """Hard RLIMIT_NOFILE 256 cannot hold 300 ranks: start() raises OSError(EMFILE) and none of the
    ranks it had started survives."""
    spec = {
        'ranks': [{'argv': ['sleep', '30']} for _ in range(300)],
        'options': {'run_id': run_id},
        'nofile': [256, 256],
    }
    with Launcher(spec) as launcher:
        event = launcher.event()
        assert launcher.wait() == 97
    assert event['event'] == 'error' and event['type'] == 'OSError' and event['errno'] == errno.EMFILE, event
    assert 'Too many open files' in event['message']
    assert marked(f'DSLAUNCH_RUN_ID={run_id}') == []


def test_running_out_of_fds_fails_cleanly() -> None:
    """The same job under every hard fd limit from nearly none to enough: each start() either
    works or raises OSError(EMFILE), and in no case is a process of the job left running (the
    spawn of rank k failing, and also the pipes and thread set up after the last rank)."""
    proc = subprocess.run(
        [PY, str(HELPERS / 'fd_sweep.py'), '8'], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)['results']
    outcomes = {outcome for _, outcome in results}
    assert not [r for r in results if 'LEAK' in r[1]], [r for r in results if 'LEAK' in r[1]]
    assert outcomes == {'ok', f'OSError:{errno.EMFILE}'}, outcomes
    first_ok = min(limit for limit, outcome in results if outcome == 'ok')
    assert all(outcome == 'ok' for limit, outcome in results if limit >= first_ok), 'more fds never fail'
