"""The job channel at the rank: `launcher_helper` under a dslaunch runner (MPI and Slurm backends),
and the per-node launcher (PDSH).

Real processes: the helper runs a real script, mapping Slurm's variables (any engine's would do),
and talks to a real `JobServer` in this process over TCP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dslaunch.channel_vars import REPORT_TO_ENV, TOKEN_ENV
from dslaunch.jobchannel import JobServer
from helpers.procs import alive, proc_state, wait_until

SCRIPT = """
import json, os, sys, time
out = sys.argv[1]
with open(out + '.tmp', 'w') as f:
    json.dump({'pid': os.getpid(), 'env': dict(os.environ)}, f)
os.replace(out + '.tmp', out)
if sys.argv[2] == 'sleep':
    time.sleep(60)
sys.exit(int(sys.argv[2]))
"""


def start_helper(tmp_path: Path, server: JobServer | None, what: str, rank: int = 3,
                 **extra: str) -> tuple[subprocess.Popen[str], Path]:
    script = tmp_path / 'rank.py'
    script.write_text(SCRIPT)
    out = tmp_path / f'rank{rank}.json'
    env = {**os.environ, 'SLURM_PROCID': str(rank), 'SLURM_LOCALID': '1', 'SLURM_NTASKS': '4', **extra}
    if server is not None:
        env.update(server.env_for('localhost'))
    proc = subprocess.Popen([sys.executable, '-m', 'dslaunch.launcher_helper', '--launcher', 'slurm', str(script),
                             str(out), what], env=env, stderr=subprocess.PIPE if server is None else None,
                            text=True)  # fmt: skip
    return proc, out


def wait_file(path: Path, proc: subprocess.Popen[str], timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f'{path} not written'
        time.sleep(0.01)
    return json.loads(path.read_text())


@pytest.fixture
def server():
    failures: list[dict] = []
    s = JobServer(on_failure=failures.append)
    s.failures = failures  # type: ignore[attr-defined]
    yield s
    s.close()


def test_a_failing_rank_is_reported_with_its_own_code(server: JobServer, tmp_path: Path) -> None:
    proc, out = start_helper(tmp_path, server, '7')
    rank = wait_file(out, proc)
    assert proc.wait(20) == 7
    assert server.wait_idle(5)
    assert server.first_failure is not None
    assert {k: server.first_failure[k] for k in ('rank', 'exit_status', 'returncode')} == {
        'rank': 3, 'exit_status': 7, 'returncode': 7}  # fmt: skip
    assert server.first_failure['host'] and server.failures == [server.first_failure]  # type: ignore[attr-defined]
    # the channel is the helper's, not the script's
    assert REPORT_TO_ENV not in rank['env'] and TOKEN_ENV not in rank['env']
    assert rank['env']['RANK'] == '3' and rank['env']['LOCAL_RANK'] == '1'


def test_success_reports_nothing(server: JobServer, tmp_path: Path) -> None:
    proc, _ = start_helper(tmp_path, server, '0')
    assert proc.wait(20) == 0
    assert server.wait_idle(5) and server.first_failure is None


def test_a_stop_from_the_runner_ends_the_script_at_once_and_the_helper_exits_0(server: JobServer,
                                                                              tmp_path: Path) -> None:
    """Exit 0: the runner sets the job's status; a non-zero one would start the engine's slow abort."""
    proc, out = start_helper(tmp_path, server, 'sleep')
    pid = wait_file(out, proc)['pid']
    while server.connected() < 1:
        time.sleep(0.01)
    stopped = time.monotonic()
    server.stop(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert time.monotonic() - stopped < 1.0 and not alive(pid)
    assert server.wait_idle(5) and server.first_failure is None  # a stopped rank is not a root cause


def test_a_stop_that_came_first_reaches_a_late_rank(server: JobServer, tmp_path: Path) -> None:
    server.stop(signal.SIGTERM)  # e.g. Ctrl-C while the engine was still starting this rank
    proc, _ = start_helper(tmp_path, server, 'sleep')
    assert proc.wait(20) == 0


def test_the_runner_gone_ends_the_script(server: JobServer, tmp_path: Path) -> None:
    proc, out = start_helper(tmp_path, server, 'sleep')
    pid = wait_file(out, proc)['pid']
    while server.connected() < 1:
        time.sleep(0.01)
    server.close()  # as when the runner is SIGKILLed: the connection drops
    assert proc.wait(10) == 0 and not alive(pid)


def test_an_unreachable_runner_is_one_line(tmp_path: Path) -> None:
    proc, out = start_helper(tmp_path, None, '0', **{REPORT_TO_ENV: '127.0.0.1:1', TOKEN_ENV: 'x'})
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and not out.exists()
    assert err.strip().splitlines() == [
        'launcher_helper: cannot reach the dslaunch runner at 127.0.0.1:1: Connection refused']


# ---- the per-node launcher (PDSH) under a runner ------------------------------------------------


def start_node(tmp_path: Path, server: JobServer) -> tuple[subprocess.Popen[str], Path]:
    """`python -m dslaunch.launch` for one node of one rank, as pdsh starts it under a runner."""
    script = tmp_path / 'rank.py'
    script.write_text(SCRIPT)
    out = tmp_path / 'rank0.json'
    world_info = 'eyJsb2NhbGhvc3QiOiBbMF19'  # {"localhost": [0]}
    env = {**os.environ, **server.env_for('localhost')}
    env.pop('CUDA_VISIBLE_DEVICES', None)
    proc = subprocess.Popen([sys.executable, '-u', '-m', 'dslaunch.launch', f'--world_info={world_info}',
                             '--master_addr=127.0.0.1', '--master_port=29555', '--no_local_rank', str(script), str(out),
                             'sleep'],
                            env=env, text=True)  # fmt: skip
    return proc, out


def test_a_node_the_runner_stopped_exits_0(server: JobServer, tmp_path: Path) -> None:
    """The runner sets the job's status; a non-zero exit here only makes pdsh print a line
    `ssh exited with exit code 1` for a host that did nothing wrong."""
    proc, out = start_node(tmp_path, server)
    pid = wait_file(out, proc)['pid']
    while server.connected() < 1:
        time.sleep(0.01)
    server.stop(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert not alive(pid)
    assert server.done == {0: 128 + signal.SIGTERM}  # the job's own status, told to the runner


def test_a_node_whose_runner_is_gone_exits_as_after_sigterm(server: JobServer, tmp_path: Path) -> None:
    """No runner to set the status: 1, DeepSpeed's launch.py status after SIGTERM."""
    proc, out = start_node(tmp_path, server)
    pid = wait_file(out, proc)['pid']
    while server.connected() < 1:
        time.sleep(0.01)
    server.close()  # as when the runner is SIGKILLed: the connection drops
    assert proc.wait(10) == 1
    assert not alive(pid)


@pytest.mark.parametrize('side', ['helper', 'node'])
def test_the_runners_ctrl_z_pauses_the_ranks_and_fg_resumes_them(server: JobServer, tmp_path: Path, side: str) -> None:
    """`JobServer.signal`: SIGTSTP stops the rank (the helper sends SIGSTOP: engines start ranks in
    orphaned process groups, where a SIGTSTP is discarded) while the helper or launcher stays up to
    hear the SIGCONT, which resumes it."""
    proc, out = start_helper(tmp_path, server, 'sleep') if side == 'helper' else start_node(tmp_path, server)
    pid = wait_file(out, proc)['pid']
    while server.connected() < 1:
        time.sleep(0.01)
    server.signal(signal.SIGTSTP)
    wait_until(lambda: proc_state(pid) == 'T', 10, 'the rank to stop')
    assert proc_state(proc.pid) in ('R', 'S')
    server.signal(signal.SIGCONT)
    wait_until(lambda: proc_state(pid) in ('R', 'S'), 10, 'the rank to run again')
    server.stop(signal.SIGTERM)
    assert proc.wait(10) == 0 and not alive(pid)


def test_a_stop_reaches_a_script_the_runners_ctrl_z_left_stopped(server: JobServer, tmp_path: Path) -> None:
    """Another host fails while this one is paused: the helper's SIGTERM comes with a SIGCONT, so
    the script ends at once instead of waiting, stopped, for the runner's SIGKILL."""
    proc, out = start_helper(tmp_path, server, 'sleep')
    pid = wait_file(out, proc)['pid']
    while server.connected() < 1:
        time.sleep(0.01)
    server.signal(signal.SIGTSTP)
    wait_until(lambda: proc_state(pid) == 'T', 10, 'the rank to stop')
    server.stop(signal.SIGTERM)
    assert proc.wait(10) == 0 and not alive(pid)
