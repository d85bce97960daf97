"""The benchmark harness's own bookkeeping (benches/bench.py), where a bug would skew results.

The harness is its trials' subreaper: one thread reaps every child, launchers and re-parented
orphans alike, and a trial takes its launcher's status from it. Pids wrap (pid_max is 32,768 on
many machines, and a 1,024-rank trial uses about 2,000), so a later launcher can be given the
pid of an orphan reaped earlier: it must get its own status, not the orphan's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
