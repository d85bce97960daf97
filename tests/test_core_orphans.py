"""No orphans: a SIGKILLed launcher's job dies with it (the orphan guard), the guard itself never
lingers, and `kill_tree` ends a whole tree, setsid grandchildren included."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from dslaunch import _core
from helpers.procs import HELPERS, PY, Launcher, alive, all_dead, marked, read_json_when_ready, wait_until

KINDS = 'plain,setsid,doublefork,pgrp,nested'


def _guards(run_id: str) -> list[int]:
    """Orphan guards of this run: `/bin/sh -c SCRIPT dslaunch-orphan-guard DSLAUNCH_RUN_ID=<id>`."""
    out = []
    for d in os.listdir('/proc'):
        if d.isdigit() and alive(int(d)):
            try:
                argv = Path(f'/proc/{d}/cmdline').read_bytes().split(b'\0')
            except OSError:
                continue
            if b'dslaunch-orphan-guard' in argv and f'DSLAUNCH_RUN_ID={run_id}'.encode() in argv:
                out.append(int(d))
    return out


def _tree_ranks(tmp_path: Path, n: int, extra: list[str] | None = None) -> list[dict[str, object]]:
    return [
        {'argv': [PY, str(HELPERS / 'tree.py'), str(tmp_path / f'tree{i}.json'), '--kinds', KINDS, *(extra or [])]}
        for i in range(n)
    ]


@pytest.mark.parametrize('extra', [[], ['--ignore-term']], ids=['plain', 'ignores-sigterm'])
def test_sigkilled_launcher_takes_its_whole_job_along(tmp_path: Path, run_id: str, extra: list[str]) -> None:
    spec = {'ranks': _tree_ranks(tmp_path, 3, extra), 'options': {'run_id': run_id}}
    with Launcher(spec) as launcher:
        started = launcher.event()
        assert started['event'] == 'started' and started['run_id'] == run_id
        trees = [read_json_when_ready(tmp_path / f'tree{i}.json') for i in range(3)]
        pids = [p for t in trees for p in t.values()]
        assert len(pids) == 3 * 7 and all(alive(p) for p in pids)
        assert len(_guards(run_id)) == 1
        os.kill(launcher.pid, signal.SIGKILL)
        assert launcher.wait() == -signal.SIGKILL
    wait_until(lambda: all_dead(pids), 1.0, 'every process of the job to die')
    assert _core.find_marked(f'DSLAUNCH_RUN_ID={run_id}') == []
    assert marked(f'DSLAUNCH_RUN_ID={run_id}') == []
    wait_until(lambda: _guards(run_id) == [], 2.0, 'the guard to exit once its job is gone')


def test_without_the_guard_the_job_would_survive(tmp_path: Path, run_id: str) -> None:
    """The control for the test above: the same job with orphan_guard=False outlives the launcher."""
    spec = {'ranks': _tree_ranks(tmp_path, 1), 'options': {'run_id': run_id, 'orphan_guard': False}}
    with Launcher(spec) as launcher:
        launcher.event()
        tree = read_json_when_ready(tmp_path / 'tree0.json')
        assert _guards(run_id) == []
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
    try:
        time.sleep(0.3)  # give a (nonexistent) guard time it would need; the job must still be there
        assert all(alive(p) for p in tree.values())
    finally:
        for pid in _core.find_marked(f'DSLAUNCH_RUN_ID={run_id}'):
            os.kill(pid, signal.SIGKILL)


def test_guard_exits_with_a_normal_job(run_id: str) -> None:
    null = os.open(os.devnull, os.O_WRONLY)
    sup = _core.Supervisor([_core.RankSpec(['sleep', '0.2'])], run_id=run_id, stdout_fd=null)
    sup.start()
    assert len(_guards(run_id)) == 1
    report = sup.wait(timeout=10)
    assert report is not None and report.returncode == 0
    assert _guards(run_id) == []


# ---- kill_tree ----------------------------------------------------------------------------------


def _start_tree(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    pidfile = tmp_path / 'tree.json'
    proc = subprocess.Popen([PY, str(HELPERS / 'tree.py'), str(pidfile), *extra], stdout=subprocess.DEVNULL)
    return proc, read_json_when_ready(pidfile)


def test_kill_tree_kills_setsid_and_regrouped_descendants(tmp_path: Path) -> None:
    proc, pids = _start_tree(tmp_path, '--kinds', 'plain,setsid,pgrp,nested')
    assert all(alive(p) for p in pids.values())
    n = _core.kill_tree(proc.pid, 5.0)
    assert proc.wait(5) == -signal.SIGTERM
    assert n == len(pids) == 6
    wait_until(lambda: all_dead(pids.values()), 1.0, 'the tree to be gone')


def test_kill_tree_follows_reparented_descendants(tmp_path: Path) -> None:
    """The root dies of the SIGTERM at once; its descendants ignore SIGTERM and are re-parented
    away from it. They must still get the SIGKILL when the grace period ends (not before)."""
    proc, pids = _start_tree(tmp_path, '--kinds', 'plain,setsid,pgrp,nested', '--ignore-term')
    t0 = time.monotonic()
    _core.kill_tree(proc.pid, 0.5)
    elapsed = time.monotonic() - t0
    wait_until(lambda: all_dead(pids.values()), 1.0, 'the SIGTERM-ignoring descendants to be killed')
    assert 0.45 <= elapsed < 5, elapsed
    assert proc.wait(5) == -signal.SIGTERM


def test_kill_tree_refuses_dangerous_pids_and_ignores_missing_ones() -> None:
    for pid in (0, 1, os.getpid()):
        with pytest.raises(ValueError):
            _core.kill_tree(pid)
    proc = subprocess.Popen(['true'])
    proc.wait()
    assert _core.kill_tree(proc.pid, 0.1) == 0


def test_guard_catches_processes_in_the_middle_of_execve(tmp_path: Path) -> None:
    """A rank that keeps re-executing itself is now and then inside execve, where its environ (the
    marker) reads empty (about 5% of the time for this one). One launcher runs 40 independent
    jobs of such a rank, each with its own orphan guard, and is SIGKILLed: every guard must still
    find and kill its rank. (A guard that stopped at its first empty scan let a few percent
    escape, so 40 of them caught it most of the time.)"""
    go = tmp_path / 'go'
    rank = {'argv': ['/bin/sh', str(HELPERS / 'reexec.sh'), '1000000', str(go)]}
    with Launcher({'ranks': [rank], 'jobs': 40}) as launcher:
        rank_pids = launcher.event()['pids']
        assert len(rank_pids) == 40
        go.touch()
        time.sleep(0.2)  # the scenario: let the ranks get into their exec loop
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
    # A rank keeps its pid across execs, so this does not depend on reading its environ.
    try:
        # Generous: 40 guards and 40 exec loops share the CPUs; an escaped rank never dies at all.
        wait_until(lambda: all_dead(rank_pids), 15.0, 'every re-executing rank to be killed by its guard')
    finally:
        for pid in rank_pids:  # escaped ones (the failure) must not outlive the test either
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
