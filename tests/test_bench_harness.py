"""The benchmark harness's own bookkeeping (benches/bench.py), where a bug would skew results.

The harness is its trials' subreaper: one thread reaps every child, launchers and re-parented
orphans alike, and a trial takes its launcher's status from it. Pids wrap (pid_max is 32,768 on
many machines, and a 1,024-rank trial uses about 2,000), so a later launcher can be given the
pid of an orphan reaped earlier: it must get its own status, not the orphan's.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.procs import marked, wait_until

ROOT = Path(__file__).resolve().parent.parent
NS_LAST_PID = Path('/proc/sys/kernel/ns_last_pid')

# Runs in a child interpreter: becoming a subreaper is for good, and not for pytest's process.
# An orphan (a grandchild whose parent has exited) gets SIGKILLed and is reaped by the harness's
# reaper; then a launcher is started on that same pid (ns_last_pid) and exits 0. Prints the
# launcher's pid, the orphan's pid and the status the trial reported.
SCRIPT = r"""
import os, signal, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
import bench

assert bench.Reaper.become_subreaper()
bench.REAPER = bench.Reaper()
bench.REAPER.start()
# The orphan: a shell that starts a sleeper in the background and exits at once.
out = subprocess.run(['/bin/sh', '-c', 'sleep 60 >/dev/null 2>&1 & echo $!'], capture_output=True, text=True, check=True)
orphan = int(out.stdout)
os.kill(orphan, signal.SIGKILL)
while os.path.exists(f'/proc/{orphan}'):  # gone once the reaper thread has reaped it
    time.sleep(0.01)
for attempt in range(20):
    with open('/proc/sys/kernel/ns_last_pid', 'w') as f:
        f.write(str(orphan - 1))
    t = bench.Trial(['/bin/true'], dict(os.environ))
    t.start()
    o = t.wait(30.0)
    if t.pid == orphan:
        break
print(t.pid, orphan, o.returncode)
"""


@pytest.mark.skipif(not os.access(NS_LAST_PID, os.W_OK), reason='needs root to choose the next pid (ns_last_pid)')
def test_a_launcher_on_a_reused_pid_gets_its_own_status_not_an_orphans() -> None:
    proc = subprocess.run([sys.executable, '-c', SCRIPT, str(ROOT / 'benches')], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    launcher, orphan, status = (int(x) for x in proc.stdout.split())
    if launcher != orphan:
        pytest.skip('another process took the pid every time (a busy machine)')
    # The orphan died of SIGKILL (137 in the shell's terms); the launcher, /bin/true, exited 0.
    assert status == 0


@pytest.fixture(scope='module')
def corefloor() -> Path:
    """benches/corefloor.rs, built as the harness builds it but in the debug profile (quick)."""
    if shutil.which('cargo') is None:
        pytest.skip('cargo not installed')
    subprocess.run(['cargo', 'build', '-q', '--example', 'corefloor'], cwd=ROOT, check=True, timeout=600)
    return ROOT / 'target' / 'debug' / 'examples' / 'corefloor'


def test_the_core_floor_tears_its_ranks_and_their_children_down_on_sigterm(corefloor: Path) -> None:
    """A reference line must do the job it is measured on: every rank and grandchild gone, then
    the process ends by the signal, having said so."""
    value = f'{os.getpid()}-{id(corefloor)}'
    entry = f'COREFLOOR_TEST={value}'
    tree = 'echo up; sleep 60 & wait'  # a rank with a child of its own, as rankprog's `tree`
    proc = subprocess.Popen([str(corefloor), '3', '/bin/sh', '-c', tree], env=dict(os.environ, COREFLOOR_TEST=value),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert sorted(lines) == ['[0]: up\n', '[1]: up\n', '[2]: up\n']
        wait_until(lambda: len(set(marked(entry)) - {proc.pid}) == 6, 10, 'three ranks and their sleepers')
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGTERM
    assert err.strip().splitlines()[-1] == f'corefloor: stopped by signal {int(signal.SIGTERM)}'
    assert marked(entry) == []


def test_the_core_floor_ends_with_a_failed_ranks_code(corefloor: Path) -> None:
    proc = subprocess.run([str(corefloor), '2', '/bin/sh', '-c', 'exit $((RANK + 3))'], capture_output=True,
                          text=True, timeout=30, check=False)  # fmt: skip
    assert proc.returncode in (3, 4)  # the first rank to fail: fail-fast ends the other
    assert proc.stderr.strip().splitlines()[-1] == f'corefloor: 2 ranks ended, exit code {proc.returncode}'
