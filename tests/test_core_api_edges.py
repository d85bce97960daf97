"""The public `_core` API at its edges, as a third-party tool might drive it: infinite and huge
timeouts, bad descriptors, a supervisor inherited by a forked child, Ctrl-C while a `with` block
tears down, and the RankSpec getters' types. Each case crashed, hung or misled before."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from dslaunch import _core
from helpers.procs import PY, all_dead, wait_until

NULL = os.open(os.devnull, os.O_WRONLY)


def test_infinite_timeouts_wait_and_restore_the_wakeup_fd() -> None:
    sup = _core.Supervisor([_core.RankSpec(['/bin/true'])], stdout_fd=NULL)
    sup.start()
    before = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(before)
    report = sup.wait(timeout=float('inf'))
    assert report is not None and report.returncode == 0
    assert signal.set_wakeup_fd(before) == before, 'wait() left its own wakeup fd installed'
    sup = _core.Supervisor([_core.RankSpec(['sleep', '0.2'])], stdout_fd=NULL)
    sup.start()
    assert [r.rank for r in sup.wait_exits(timeout=float('inf'))] == [0]
    assert sup.wait(timeout=10) is not None


@pytest.mark.parametrize('grace', [float('inf'), 1e19, 1e300])
def test_a_huge_grace_period_means_never_and_does_not_break_the_loop(grace: float) -> None:
    sup = _core.Supervisor([_core.RankSpec(['sleep', '30']) for _ in range(2)], grace_period=grace, stdout_fd=NULL)
    sup.start()
    pids = sup.pids
    sup.terminate(grace_period=grace)  # sleep dies of the SIGTERM: the job ends, no SIGKILL needed
    report = sup.wait(timeout=15)
    assert report is not None and [r.returncode for r in report.ranks] == [-signal.SIGTERM] * 2
    assert all_dead(pids)


def test_kill_tree_with_an_infinite_grace_period() -> None:
    proc = subprocess.Popen(['sleep', '30'])
    assert _core.kill_tree(proc.pid, float('inf')) == 1
    assert proc.wait(timeout=10) == -signal.SIGTERM


def test_a_negative_descriptor_is_a_value_error() -> None:
    with pytest.raises(ValueError, match='file descriptors'):
        _core.Supervisor([_core.RankSpec(['/bin/true'])], stdout_fd=-1)


def test_a_forked_child_can_drop_its_copy_of_a_running_supervisor() -> None:
    code = r"""
import gc, os, sys
from dslaunch import _core
sup = _core.Supervisor([_core.RankSpec(['sleep', '2'])], forward_signals=[], stdout_fd=os.open(os.devnull, os.O_WRONLY))
sup.start()
pid = os.fork()
if pid == 0:
    del sup
    gc.collect()
    os._exit(0)
_, status = os.waitpid(pid, 0)
report = sup.wait(timeout=20)
print('child', os.waitstatus_to_exitcode(status), 'job', report.returncode if report else None)
"""
    proc = subprocess.run([PY, '-c', code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert 'Panic' not in proc.stderr and 'panicked' not in proc.stderr, proc.stderr
    assert proc.stdout.split() == ['child', '0', 'job', '0'], 'the parent still owns and finishes its job'


def test_ctrl_c_while_the_with_block_tears_down_kills_at_once() -> None:
    # the ranks ignore the teardown SIGTERM: without a second signal they would live out the grace period
    ignore = 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'
    sup = _core.Supervisor([_core.RankSpec([PY, '-c', ignore]) for _ in range(2)], grace_period=30, stdout_fd=NULL)
    t0 = time.monotonic()
    with sup:
        pids = sup.pids
        wait_until(lambda: all(_ignores_sigterm(p) for p in pids), 15, 'the ranks to ignore SIGTERM')
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    assert time.monotonic() - t0 < 15, 'the Ctrl-C during the teardown was not seen'
    assert all_dead(pids)


def _ignores_sigterm(pid: int) -> bool:
    try:
        with open(f'/proc/{pid}/status') as f:
            ign = next(int(line.split()[1], 16) for line in f if line.startswith('SigIgn:'))
    except (OSError, StopIteration):
        return False
    return bool(ign & (1 << (signal.SIGTERM - 1)))


def test_rank_spec_getters_return_the_strings_given() -> None:
    spec = _core.RankSpec(['python', '-c', ''], env={'A': ''}, cwd='/tmp', log_file='x.log')
    assert spec.argv == ['python', '-c', '']
    assert spec.env == {'A': ''}
    assert (spec.cwd, spec.log_file) == ('/tmp', 'x.log')
    assert all(type(a) is str for a in spec.argv)


if __name__ == '__main__':
    sys.exit(pytest.main([__file__]))
