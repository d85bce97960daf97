"""Fail fast and whole-tree teardown: the first failing rank is the root cause, the rest of the job
(grandchildren that called setsid, double-forked or changed group included) is gone when wait()
returns, and so is whatever a successful job left running."""

from __future__ import annotations

import os
import resource
import signal
import time
from pathlib import Path

import pytest
from dslaunch import _core
from helpers.procs import HELPERS, PY, alive, all_dead, marked, read_json_when_ready

KINDS = 'plain,setsid,doublefork,pgrp,nested'
DESCENDANTS = ['plain', 'setsid', 'doublefork', 'pgrp', 'nested', 'nested_grandchild']
GRACE = 30.0  # long on purpose: every "fast" below proves the job did not wait for it


@pytest.fixture(autouse=True)
def _no_core_files() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))


def _null() -> int:
    return os.open(os.devnull, os.O_WRONLY)


def _wait_for_file(path: Path) -> str:
    return f'while [ ! -e {path} ]; do sleep 0.02; done'


@pytest.mark.parametrize(
    ('death', 'code'),
    [('exit 3', 3), ('kill -SEGV $$', 128 + signal.SIGSEGV), ('kill -KILL $$', 128 + signal.SIGKILL)],
    ids=['exit3', 'sigsegv', 'sigkill'],
)
def test_first_failure_ends_the_job_fast(death: str, code: int, tmp_path: Path) -> None:
    ranks = [_core.RankSpec(['sleep', '60']) for _ in range(3)]
    ranks.insert(1, _core.RankSpec(['/bin/sh', '-c', f'sleep 0.2; {death}'], cwd=tmp_path))
    sup = _core.Supervisor(ranks, grace_period=GRACE, stdout_fd=_null())
    t0 = time.monotonic()
    report = sup.run()
    elapsed = time.monotonic() - t0
    assert elapsed < 5, f'teardown took {elapsed:.1f} s (grace period {GRACE} s)'
    assert report.returncode == code and not report.success
    assert report.first_failure is not None and report.first_failure.rank == 1
    assert report.first_failure.exit_status == code
    assert report.interrupted_by is None and not report.stopped
    others = [r for r in report.ranks if r.rank != 1]
    assert [(r.returncode, r.state) for r in others] == [(-signal.SIGTERM, 'killed')] * 3
    assert all(r.ended_at >= report.first_failure.ended_at for r in others)



def test_teardown_of_hundreds_of_ranks_signals_every_one_and_their_escapees(tmp_path: Path, run_id: str) -> None:
    """The first signal goes out in turns of groups (SIGNAL_TURN in supervisor.rs): every one of
    300 ranks still gets SIGTERM (not the grace period's SIGKILL), and the escaped tree of the
    last rank, signalled in the last turn, is gone too when wait() returns."""
    n = 300
    pidfile = tmp_path / 'tree.json'
    ranks = [_core.RankSpec(['sleep', '60']) for _ in range(n - 2)]
    ranks.append(_core.RankSpec([PY, str(HELPERS / 'tree.py'), str(pidfile), '--kinds', KINDS]))
    ranks.insert(0, _core.RankSpec(['/bin/sh', '-c', f'{_wait_for_file(pidfile)}; exit 3']))
    sup = _core.Supervisor(ranks, run_id=run_id, grace_period=GRACE, stdout_fd=_null())
    sup.start()
    pids = read_json_when_ready(pidfile)
    report = sup.wait(timeout=20)
    assert report is not None and report.returncode == 3 and report.first_failure is not None
    assert report.first_failure.rank == 0
    assert [r.rank for r in report.ranks if (r.state, r.returncode) != ('killed', -signal.SIGTERM)] == [0]
    assert {k: p for k, p in pids.items() if alive(p)} == {}
    assert marked(f'DSLAUNCH_RUN_ID={run_id}') == []

def test_all_ranks_failing_at_once_names_one_of_them() -> None:
    ranks = [_core.RankSpec(['/bin/sh', '-c', f'exit {10 + i}']) for i in range(6)]
    report = _core.Supervisor(ranks, grace_period=GRACE, stdout_fd=_null()).run()
    ff = report.first_failure
    assert ff is not None and ff.rank in range(6)
    assert report.returncode == 10 + ff.rank == ff.returncode
    assert all(r.state in ('failed', 'killed') for r in report.ranks)


def test_rank_exiting_zero_early_is_not_a_failure() -> None:
    ranks = [_core.RankSpec(['/bin/sh', '-c', 'exit 0']), _core.RankSpec(['/bin/sh', '-c', 'sleep 0.5; exit 0'])]
    report = _core.Supervisor(ranks, stdout_fd=_null()).run()
    assert report.returncode == 0 and report.success and report.first_failure is None
    assert [(r.state, r.returncode) for r in report.ranks] == [('exited', 0), ('exited', 0)]
    assert report.ranks[1].ended_at - report.ranks[0].ended_at > 0.3, 'rank 1 ran its course'


def test_without_fail_fast_the_others_run_to_completion() -> None:
    ranks = [_core.RankSpec(['/bin/sh', '-c', 'exit 4']), _core.RankSpec(['/bin/sh', '-c', 'sleep 0.5; exit 0'])]
    report = _core.Supervisor(ranks, fail_fast=False, stdout_fd=_null()).run()
    assert report.returncode == 4 and report.first_failure is not None and report.first_failure.rank == 0
    assert [(r.state, r.returncode) for r in report.ranks] == [('failed', 4), ('exited', 0)]


@pytest.mark.parametrize('ignore_term', [False, True], ids=['polite', 'ignores-sigterm'])
def test_failure_teardown_kills_escaped_grandchildren(tmp_path: Path, run_id: str, ignore_term: bool) -> None:
    """Rank 0 grows a tree that left its process group every way it can; rank 1 fails once the
    tree is up. When wait() returns every process of the tree is gone (SIGKILLed after the grace
    period when it ignores SIGTERM)."""
    pidfile = tmp_path / 'tree.json'
    tree = [PY, str(HELPERS / 'tree.py'), str(pidfile), '--kinds', KINDS] + (['--ignore-term'] if ignore_term else [])
    grace = 1.0 if ignore_term else GRACE
    ranks = [_core.RankSpec(tree), _core.RankSpec(['/bin/sh', '-c', f'{_wait_for_file(pidfile)}; exit 2'])]
    sup = _core.Supervisor(ranks, run_id=run_id, grace_period=grace, stdout_fd=_null())
    sup.start()
    pids = read_json_when_ready(pidfile)
    t0 = time.monotonic()
    report = sup.wait(timeout=20)
    elapsed = time.monotonic() - t0
    assert report is not None
    assert report.returncode == 2 and report.first_failure is not None and report.first_failure.rank == 1
    assert set(pids) == {'root', *DESCENDANTS}
    survivors = {k: p for k, p in pids.items() if alive(p)}
    assert survivors == {}, 'wait() returned while part of the tree still ran'
    assert marked(f'DSLAUNCH_RUN_ID={run_id}') == []
    assert report.leftovers_killed >= 3  # setsid, doublefork and pgrp left the rank's group at least
    if ignore_term:
        assert 0.8 < elapsed < 6, f'SIGKILL after {elapsed:.2f} s, grace 1 s'
    else:
        assert elapsed < 5


def test_escaped_grandchild_is_signalled_while_its_rank_lingers(tmp_path: Path, run_id: str) -> None:
    """The first signal of a teardown reaches the rank groups at once and the descendants that
    left them shortly after: a rank busy past SIGTERM (a long checkpoint) does not keep its
    setsid'd helper waiting for the grace period."""
    got, ready = tmp_path / 'got', tmp_path / 'ready'
    helper = (f'import os, signal, time\n'
              f'signal.signal(signal.SIGTERM, lambda *a: (open({str(got)!r}, "w").close(), os._exit(0)))\n'
              f'open({str(ready)!r}, "w").close()\n'
              f'time.sleep(60)\n')
    rank = (f'import signal, subprocess, sys, time\n'
            f'signal.signal(signal.SIGTERM, signal.SIG_IGN)\n'
            f'subprocess.Popen([sys.executable, "-c", {helper!r}], start_new_session=True)\n'
            f'time.sleep(60)\n')
    ranks = [_core.RankSpec([PY, '-c', rank]), _core.RankSpec(['/bin/sh', '-c', f'{_wait_for_file(ready)}; exit 2'])]
    sup = _core.Supervisor(ranks, run_id=run_id, grace_period=6.0, stdout_fd=_null())
    sup.start()
    try:
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready.exists(), 'the helper never started'
        t0 = time.monotonic()
        while not got.exists() and time.monotonic() - t0 < 3:
            time.sleep(0.01)
        assert got.exists(), 'the escaped helper got no SIGTERM within 3 s of the failure'
        assert sup.poll() is None, 'the lingering rank is still in its grace period'
    finally:
        report = sup.wait(timeout=30)
    assert report is not None and report.returncode == 2
    assert report.ranks[0].state == 'killed'
    assert marked(f'DSLAUNCH_RUN_ID={run_id}') == []


def test_successful_job_kills_what_it_left_running(tmp_path: Path, run_id: str) -> None:
    pidfile = tmp_path / 'tree.json'
    rank = _core.RankSpec([PY, str(HELPERS / 'tree.py'), str(pidfile), '--kinds', KINDS, '--exit', '0'])
    t0 = time.monotonic()
    report = _core.Supervisor([rank], run_id=run_id, grace_period=GRACE, stdout_fd=_null()).run()
    assert time.monotonic() - t0 < 5
    pids = read_json_when_ready(pidfile, timeout=0)
    assert report.returncode == 0 and report.success, 'leftovers do not make a successful job fail'
    assert report.ranks[0].state == 'exited'
    assert report.leftovers_killed == len(DESCENDANTS)
    assert all_dead(pids.values())
    assert marked(f'DSLAUNCH_RUN_ID={run_id}') == []


def test_kill_leftovers_false_leaves_them_running(tmp_path: Path, run_id: str) -> None:
    pidfile = tmp_path / 'tree.json'
    rank = _core.RankSpec([PY, str(HELPERS / 'tree.py'), str(pidfile), '--kinds', 'plain,setsid', '--exit', '0'])
    report = _core.Supervisor([rank], run_id=run_id, kill_leftovers=False, stdout_fd=_null()).run()
    pids = read_json_when_ready(pidfile, timeout=0)
    try:
        assert report.returncode == 0 and report.leftovers_killed == 0
        assert alive(pids['plain']) and alive(pids['setsid'])
    finally:
        for key in ('plain', 'setsid'):
            os.kill(pids[key], signal.SIGKILL)
