"""Signals: what the launcher receives reaches every rank's group; SIGINT/SIGTERM/SIGHUP/SIGQUIT end the
job (a second one at once), SIGUSR1/2 do not; the grace period is honoured; terminate() and
kill() from Python; and Ctrl-C in Python still works when nothing is forwarded."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from dslaunch import _core
from helpers.procs import HELPERS, PY, Launcher, alive, all_dead, proc_state, wait_until

N = 3
LONG_GRACE = 30.0


def _signal_ranks(tmp_path: Path, n: int = N, ignore: str = '') -> list[list[str]]:
    extra = ['--ignore', ignore] if ignore else []
    return [
        [PY, str(HELPERS / 'signal_rank.py'), str(tmp_path / f'sig{i}'), str(tmp_path / f'ready{i}'), *extra]
        for i in range(n)
    ]


def _wait_ready(tmp_path: Path, n: int = N) -> None:
    wait_until(lambda: all((tmp_path / f'ready{i}').exists() for i in range(n)), 15, 'ranks to install their handlers')


def _received(tmp_path: Path, i: int) -> list[int]:
    path = tmp_path / f'sig{i}'
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _all_received(tmp_path: Path, expected: list[int], n: int = N) -> bool:
    return all(_received(tmp_path, i) == expected for i in range(n))


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT], ids=lambda s: s.name)
def test_terminating_signal_to_launcher_reaches_every_rank_and_ends_the_job(
    tmp_path: Path, sig: signal.Signals
) -> None:
    spec = {'ranks': [{'argv': a} for a in _signal_ranks(tmp_path)], 'options': {'grace_period': LONG_GRACE}}
    with Launcher(spec) as launcher:
        started = launcher.event()
        _wait_ready(tmp_path)
        t0 = time.monotonic()
        os.kill(launcher.pid, sig)
        report = launcher.event(timeout=10)
        assert time.monotonic() - t0 < 5
        assert launcher.wait() == 128 + sig
    assert report['event'] == 'report'
    assert report['interrupted_by'] == sig and report['returncode'] == 128 + sig
    assert report['first_failure'] is None and not report['stopped']
    assert [r['returncode'] for r in report['ranks']] == [128 + sig] * N  # each rank's handler chose its exit
    assert _all_received(tmp_path, [sig])
    assert all_dead(started['pids'])


def test_usr_signals_are_forwarded_without_ending_the_job(tmp_path: Path) -> None:
    spec = {'ranks': [{'argv': a} for a in _signal_ranks(tmp_path)], 'options': {'grace_period': LONG_GRACE}}
    with Launcher(spec) as launcher:
        started = launcher.event()
        _wait_ready(tmp_path)
        os.kill(launcher.pid, signal.SIGUSR1)
        wait_until(lambda: _all_received(tmp_path, [signal.SIGUSR1]), 5, 'SIGUSR1 at every rank')
        os.kill(launcher.pid, signal.SIGUSR2)
        wait_until(lambda: _all_received(tmp_path, [signal.SIGUSR1, signal.SIGUSR2]), 5, 'SIGUSR2 at every rank')
        assert launcher.proc.poll() is None and all(alive(p) for p in started['pids']), 'the job goes on'
        os.kill(launcher.pid, signal.SIGTERM)
        report = launcher.event(timeout=10)
        assert launcher.wait() == 128 + signal.SIGTERM
    assert report['interrupted_by'] == signal.SIGTERM
    assert _all_received(tmp_path, [signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM])


def test_second_sigint_kills_at_once_despite_a_long_grace_period(tmp_path: Path) -> None:
    spec = {
        'ranks': [{'argv': a} for a in _signal_ranks(tmp_path, ignore='INT,TERM')],
        'options': {'grace_period': LONG_GRACE},
    }
    with Launcher(spec) as launcher:
        started = launcher.event()
        _wait_ready(tmp_path)
        os.kill(launcher.pid, signal.SIGINT)
        wait_until(lambda: _all_received(tmp_path, [signal.SIGINT]), 5, 'the first SIGINT at every rank')
        assert all(alive(p) for p in started['pids']), 'the ranks ignore it and are within the grace period'
        t0 = time.monotonic()
        os.kill(launcher.pid, signal.SIGINT)
        report = launcher.event(timeout=10)
        assert time.monotonic() - t0 < 5, 'the second SIGINT did not wait for the 30 s grace period'
        assert launcher.wait() == 130
    assert report['interrupted_by'] == signal.SIGINT and report['returncode'] == 130
    assert [r['returncode'] for r in report['ranks']] == [-signal.SIGKILL] * N


def test_rank_ignoring_sigterm_is_killed_when_the_grace_period_ends(tmp_path: Path) -> None:
    sup = _core.Supervisor(
        [_core.RankSpec(a) for a in _signal_ranks(tmp_path, n=2, ignore='TERM')], grace_period=1.0, forward_signals=[]
    )
    sup.start()
    _wait_ready(tmp_path, 2)
    t0 = time.time()
    sup.send_signal(signal.SIGTERM)
    report = sup.wait(timeout=15)
    assert report is not None and report.interrupted_by == signal.SIGTERM
    assert [r.returncode for r in report.ranks] == [-signal.SIGKILL] * 2
    assert _all_received(tmp_path, [signal.SIGTERM], n=2), 'SIGTERM came first'
    for r in report.ranks:
        assert 0.9 <= r.ended_at - t0 < 4, f'SIGKILL {r.ended_at - t0:.2f} s after SIGTERM, grace 1 s'


def test_terminate_from_python_honours_its_own_grace_period(tmp_path: Path) -> None:
    sup = _core.Supervisor(
        [_core.RankSpec(a) for a in _signal_ranks(tmp_path, n=2, ignore='TERM')],
        grace_period=LONG_GRACE,
        forward_signals=[],
    )
    sup.start()
    _wait_ready(tmp_path, 2)
    t0 = time.time()
    sup.terminate(grace_period=0.5)
    assert time.time() - t0 < 0.5, 'terminate() returns at once'
    assert not sup.done and sup.poll() is None
    report = sup.wait(timeout=15)
    assert report is not None and report.stopped and report.interrupted_by is None
    assert report.returncode == 128 + signal.SIGKILL and not report.success
    for r in report.ranks:
        assert r.returncode == -signal.SIGKILL and 0.45 <= r.ended_at - t0 < 4


def test_terminate_with_another_signal(tmp_path: Path) -> None:
    sup = _core.Supervisor(
        [_core.RankSpec(a) for a in _signal_ranks(tmp_path, n=2)], grace_period=LONG_GRACE, forward_signals=[]
    )
    sup.start()
    _wait_ready(tmp_path, 2)
    sup.terminate(signal=signal.SIGHUP)
    report = sup.wait(timeout=10)
    assert report is not None and report.stopped
    assert _all_received(tmp_path, [signal.SIGHUP], n=2)
    assert [r.returncode for r in report.ranks] == [128 + signal.SIGHUP] * 2


SLOW_TERM_RANK = ('import signal, sys, time\n'
                  "def bye(*_):\n    time.sleep(0.8)\n    open(sys.argv[1], 'w').close()\n    sys.exit(0)\n"
                  "signal.signal(signal.SIGTERM, bye)\nopen(sys.argv[2], 'w').close()\ntime.sleep(60)\n")


@pytest.mark.parametrize('how', ['stop', 'send_signal'])
def test_a_stop_from_outside_keeps_the_grace_period_of_a_job_already_ending(tmp_path: Path, how: str) -> None:
    """A multi-node runner tells every node to stop when a rank fails somewhere, the failing node
    included, which is already ending: `stop()` leaves that teardown as it is (the healthy rank's
    SIGTERM handler finishes its 0.8 s), where a second terminating signal kills at once."""
    done, ready = tmp_path / 'handler-done', tmp_path / 'ready'
    sup = _core.Supervisor([_core.RankSpec([PY, '-c', SLOW_TERM_RANK, str(done), str(ready)]),
                            _core.RankSpec(['sh', '-c', f'while [ ! -e {ready} ]; do sleep 0.01; done; exit 3'])],
                           grace_period=LONG_GRACE, forward_signals=[])  # fmt: skip
    sup.start()
    wait_until(lambda: sup.status()[1].state == 'failed', 15, 'rank 1 to fail')
    getattr(sup, how)(signal.SIGTERM)
    report = sup.wait(timeout=15)
    assert report is not None and report.returncode == 3 and report.first_failure.rank == 1
    if how == 'stop':
        assert done.exists() and report.ranks[0].returncode == 0
    else:
        assert not done.exists() and report.ranks[0].returncode == -signal.SIGKILL


def test_stop_is_the_signal_while_the_job_runs_and_sigkill_kills(tmp_path: Path) -> None:
    sup = _core.Supervisor([_core.RankSpec(a) for a in _signal_ranks(tmp_path, n=2)], grace_period=LONG_GRACE,
                           forward_signals=[])  # fmt: skip
    sup.start()
    _wait_ready(tmp_path, 2)
    sup.stop(signal.SIGUSR1)  # not a terminating one: forwarded, the job goes on
    wait_until(lambda: _all_received(tmp_path, [signal.SIGUSR1], n=2), 10, 'SIGUSR1 to reach the ranks')
    assert sup.poll() is None
    sup.stop(signal.SIGINT)
    report = sup.wait(timeout=10)
    assert report is not None and report.interrupted_by == signal.SIGINT and report.returncode == 128 + signal.SIGINT
    assert _all_received(tmp_path, [signal.SIGUSR1, signal.SIGINT], n=2)
    (tmp_path / 'x').mkdir()
    ignoring = _core.Supervisor([_core.RankSpec(a) for a in _signal_ranks(tmp_path / 'x', n=1, ignore='TERM')],
                                grace_period=LONG_GRACE, forward_signals=[])  # fmt: skip
    ignoring.start()
    _wait_ready(tmp_path / 'x', 1)
    ignoring.stop(signal.SIGTERM)
    time.sleep(0.3)
    assert ignoring.poll() is None  # the grace period runs
    ignoring.stop(signal.SIGKILL)
    report = ignoring.wait(timeout=10)
    assert report is not None and report.ranks[0].returncode == -signal.SIGKILL


def test_kill_from_python_is_immediate() -> None:
    sup = _core.Supervisor(
        [_core.RankSpec(['sleep', '60']) for _ in range(4)], grace_period=LONG_GRACE, forward_signals=[]
    )
    sup.start()
    t0 = time.monotonic()
    sup.kill()
    report = sup.wait(timeout=10)
    assert time.monotonic() - t0 < 5
    assert report is not None and report.stopped and report.returncode == 137
    assert [r.returncode for r in report.ranks] == [-signal.SIGKILL] * 4


def test_send_signal_from_python_forwards_to_every_group(tmp_path: Path) -> None:
    sup = _core.Supervisor(
        [_core.RankSpec(a) for a in _signal_ranks(tmp_path, n=2)], grace_period=LONG_GRACE, forward_signals=[]
    )
    with sup:
        _wait_ready(tmp_path, 2)
        sup.send_signal(signal.SIGUSR2)
        wait_until(lambda: _all_received(tmp_path, [signal.SIGUSR2], n=2), 5, 'SIGUSR2 at both ranks')
        assert not sup.done
        with pytest.raises(ValueError):
            sup.send_signal(0)
        sup.send_signal(signal.SIGTERM)
        report = sup.wait(timeout=10)
    assert report is not None and report.interrupted_by == signal.SIGTERM


def test_ctrl_c_in_python_still_works_and_the_with_block_tears_down() -> None:
    """forward_signals=[]: SIGINT to this (main-thread, waiting) process is Python's again: wait()
    raises KeyboardInterrupt, and leaving the `with` block ends the ranks."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    progress: list[str] = []
    t0 = time.monotonic()
    sup = _core.Supervisor([_core.RankSpec(['sleep', '60']) for _ in range(2)], forward_signals=[])
    with pytest.raises(KeyboardInterrupt), sup:
        pids = sup.pids
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        progress.append('waiting')
        sup.wait()
        progress.append('wait returned')
    assert progress == ['waiting'], 'KeyboardInterrupt came out of wait()'
    assert time.monotonic() - t0 < 5
    assert all_dead(pids), 'leaving the with block tore the ranks down'
    assert sup.done


def test_ctrl_c_in_a_launcher_process_with_nothing_forwarded(tmp_path: Path) -> None:
    spec = {
        'ranks': [{'argv': a} for a in _signal_ranks(tmp_path)],
        'options': {'forward_signals': [], 'grace_period': LONG_GRACE},
        'mode': 'with',
    }
    with Launcher(spec) as launcher:
        started = launcher.event()
        _wait_ready(tmp_path)
        os.kill(launcher.pid, signal.SIGINT)
        event = launcher.event(timeout=10)
        assert launcher.wait() == 98
    assert event == {'event': 'keyboard_interrupt', 'alive_after_with': []}
    assert _all_received(tmp_path, [signal.SIGTERM]), 'the ranks got the teardown SIGTERM, not the SIGINT'
    assert all_dead(started['pids'])


def test_forwarding_handlers_are_installed_for_the_job_and_restored_after() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    sup = _core.Supervisor([_core.RankSpec(['sleep', '0.3'])], stdout_fd=os.open(os.devnull, os.O_WRONLY))
    sup.start()
    try:
        assert all(isinstance(signal.getsignal(s), _core._SignalForwarder) for s in before)
    finally:
        report = sup.wait(timeout=10)
    assert report is not None and report.returncode == 0
    assert {s: signal.getsignal(s) for s in before} == before


def _pause(launcher: Launcher, ranks: list[int]) -> None:
    """Ctrl-Z to the launcher: it and every rank stop."""
    os.kill(launcher.pid, signal.SIGTSTP)
    wait_until(lambda: [proc_state(p) for p in [launcher.pid, *ranks]] == ['T'] * (len(ranks) + 1), 10,
               'the launcher and every rank to stop')  # fmt: skip


def test_ctrl_z_stops_every_rank_and_the_launcher_and_sigcont_resumes_them(tmp_path: Path) -> None:
    """Each rank is in its own process group, out of the terminal's reach: SIGTSTP to the launcher
    is passed on to every rank group, then the launcher stops itself (the shell waits for that);
    SIGCONT (`fg`, `bg`) resumes the launcher, which passes it on."""
    spec = {'ranks': [{'argv': a} for a in _signal_ranks(tmp_path)], 'options': {'grace_period': LONG_GRACE}}
    with Launcher(spec) as launcher:
        started = launcher.event()
        _wait_ready(tmp_path)
        _pause(launcher, started['pids'])
        os.kill(launcher.pid, signal.SIGCONT)
        wait_until(lambda: all(proc_state(p) in 'RS' for p in [launcher.pid, *started['pids']]), 10,
                   'the launcher and every rank to run again')  # fmt: skip
        os.kill(launcher.pid, signal.SIGTERM)
        report = launcher.event(timeout=10)
        assert launcher.wait() == 128 + signal.SIGTERM
    assert [r['returncode'] for r in report['ranks']] == [128 + signal.SIGTERM] * N
    assert _all_received(tmp_path, [signal.SIGTERM])  # TSTP and CONT are not recorded: default actions


def test_a_teardown_wakes_ranks_left_stopped(tmp_path: Path) -> None:
    """With SIGCONT not forwarded (a caller's choice), the ranks stay stopped after the launcher
    is continued. A teardown then sends SIGCONT after its SIGTERM: a stopped process acts on
    SIGTERM only once continued, and would otherwise wait out the grace period for SIGKILL."""
    options = {'grace_period': LONG_GRACE, 'forward_signals': [signal.SIGTSTP, signal.SIGTERM]}
    spec = {'ranks': [{'argv': a} for a in _signal_ranks(tmp_path)], 'options': options}
    with Launcher(spec) as launcher:
        started = launcher.event()
        _wait_ready(tmp_path)
        _pause(launcher, started['pids'])
        os.kill(launcher.pid, signal.SIGCONT)
        wait_until(lambda: proc_state(launcher.pid) in 'RS', 10, 'the launcher to run again')
        time.sleep(0.3)
        assert [proc_state(p) for p in started['pids']] == ['T'] * N, 'SIGCONT was not to be forwarded'
        t0 = time.monotonic()
        os.kill(launcher.pid, signal.SIGTERM)
        report = launcher.event(timeout=10)
        assert time.monotonic() - t0 < 5, 'the stopped ranks waited for the grace period'
        assert launcher.wait() == 128 + signal.SIGTERM
    assert [r['returncode'] for r in report['ranks']] == [128 + signal.SIGTERM] * N  # their handler, not SIGKILL
    assert _all_received(tmp_path, [signal.SIGTERM])
