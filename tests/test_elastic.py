"""Elastic training (`--enable_elastic_training`, the runner's `--elastic_training`), with real
processes: per-node launchers on localhost meet at a torch c10d rendezvous and run
`examples/train_elastic.py` (gloo, CPU, checkpoints) through worker failures, late joins and node
deaths. Every test also proves (conftest) that nothing it started outlives it.

Timing knobs keep the suite short: a 1-2 s last call, 1 s keep-alives (a dead node is noticed
after 3 s), a few dozen tiny steps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
from dslaunch.world_info import encode_world_info
from helpers.procs import alive, proc_state, wait_until

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / 'examples' / 'train_elastic.py'
ENV_SCRIPT = ROOT / 'tests' / 'scripts' / 'elastic_env.py'
PY = sys.executable
FAST = 'last_call_timeout={last_call},keep_alive_interval=1,keep_alive_max_attempt=3'
START = re.compile(r'rank (\d+)/(\d+) start at step (\d+) .*restart (\d+), pid (\d+)\)')
FINISH = re.compile(r'rank (\d+)/(\d+) finished (\d+) steps, .*parameters identical: True')
TWO_NODES = {'node0': [0], 'node1': [0]}

pytestmark = pytest.mark.timeout(150)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(('127.0.0.1', port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f'nothing listens on port {port} after {timeout} s')


class Node:
    """One `python -m dslaunch.launch --enable_elastic_training` (or `-m dslaunch` runner) process,
    its output (stdout and stderr merged) collected line by line."""

    def __init__(self, argv: Sequence[str], env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                with self._cond:
                    self.lines.append(line.rstrip('\n'))
                    self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return '\n'.join(self.lines)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 60) -> re.Match[str]:
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    break
                self._cond.wait(min(left, 0.2))
        raise AssertionError(f'no line matching {rx.pattern!r} within {timeout} s; output:\n{self.output}')

    def finish(self, timeout: float = 90, *others: Node) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rest = ''.join(f'\n--- other node ---\n{o.output}' for o in others)
            raise AssertionError(f'node did not finish within {timeout} s; output:\n{self.output}{rest}') from None
        self._reader.join(5)
        return code

    def starts(self) -> list[tuple[int, int, int, int, int]]:
        """(rank, world, first step, restart count, pid) of every rank start seen so far."""
        return [tuple(map(int, m.groups())) for line in self.lines if (m := START.search(line))]  # type: ignore[misc]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)


class Job:
    """Nodes of one elastic job: a fresh port, run id and checkpoint directory."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.run_id = f'test-{uuid.uuid4().hex[:12]}'
        self.ckpt = tmp_path / 'ckpt'
        self.nodes: list[Node] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, ELASTIC_RUN_ID=self.run_id, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
        env.update(extra)
        return env

    def launch(
        self,
        node_rank: int,
        *,
        world: dict[str, list[int]] | None = None,
        min_nodes: int = 1,
        max_nodes: int = 2,
        last_call: int = 1,
        steps: int = 40,
        step_time: float = 0.1,
        flags: Sequence[str] = (),
        script: Path = EXAMPLE,
        script_args: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> Node:
        argv = [
            PY,
            '-u',
            '-m',
            'dslaunch.launch',
            f'--world_info={encode_world_info(world or TWO_NODES)}',
            f'--node_rank={node_rank}',
            '--master_addr=127.0.0.1',
            f'--master_port={self.port}',
            '--enable_elastic_training',
            f'--min_elastic_nodes={min_nodes}',
            f'--max_elastic_nodes={max_nodes}',
            f'--rdzv_conf={FAST.format(last_call=last_call)}',
            '--rdzv_timeout=60',
            '--grace_period=3',
            *flags,
            str(script),
        ]
        if script_args is None:
            script_args = ['--checkpoint_dir', str(self.ckpt), '--steps', str(steps), '--step_time', str(step_time)]
        node = Node(argv + list(script_args), env or self.env())
        self.nodes.append(node)
        return node

    def runner(self, args: Sequence[str], env: dict[str, str] | None = None) -> Node:
        node = Node([PY, '-u', '-m', 'dslaunch', *args], env or self.env())
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
def job(tmp_path: Path):
    j = Job(tmp_path)
    yield j
    j.stop()


def finals(node: Node) -> list[tuple[int, int, int]]:
    return [tuple(map(int, m.groups())) for line in node.lines if (m := FINISH.search(line))]  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# Whole jobs


def test_two_nodes_form_one_job_and_finish(job: Job) -> None:
    # A round completes as soon as max nodes joined; the long last call only covers a slow start.
    a = job.launch(0, last_call=10, steps=20, step_time=0.02)
    b = job.launch(1, last_call=10, steps=20, step_time=0.02)
    assert a.finish(90, b) == 0, a.output
    assert b.finish(90, a) == 0, b.output
    # One job of two nodes: the ranks that finished were ranks 0 and 1 of a world of 2.
    assert sorted(finals(a) + finals(b)) == [(0, 2, 20), (1, 2, 20)], a.output + b.output
    for node in (a, b):
        assert re.search(r'\[\d\]: rank \d/2 step 15 loss', node.output), node.output
        assert 'dslaunch: 1 rank finished OK' in node.output
    assert (job.ckpt / 'checkpoint.pt').is_file()


def test_worker_killed_mid_run_restarts_the_group_and_finishes(job: Job) -> None:
    a = job.launch(0, last_call=10, steps=40)
    b = job.launch(1, last_call=10, steps=40)
    b.wait_for(r'rank \d/2 step 5 ')
    victim = next(pid for rank, world, _, _, pid in b.starts() if world == 2)
    os.kill(victim, signal.SIGKILL)
    assert b.finish(90, a) == 0, b.output
    assert a.finish(90, b) == 0, a.output
    # B's agent saw its rank die and used one restart; the group resumed from a checkpoint.
    assert 'killed by SIGKILL' in b.output and 'restarting the ranks (restart 1 of 3)' in b.output, b.output
    resumed = [s for node in (a, b) for s in node.starts() if s[2] > 0]
    assert resumed, a.output + b.output
    assert sorted(finals(a) + finals(b)) == [(0, 2, 40), (1, 2, 40)], a.output + b.output
    assert not alive(victim)


def test_late_node_is_admitted_at_the_next_rendezvous(job: Job, tmp_path: Path) -> None:
    a = job.launch(0, steps=80)
    a.wait_for(r'rank 0/1 start at step 0 ')  # a job of one node is training
    # The second node comes through the runner (--no_ssh: start this host's share only).
    hostfile = tmp_path / 'hostfile'
    hostfile.write_text('node0 slots=1\nnode1 slots=1\n')
    b = job.runner(
        [
            '-H',
            str(hostfile),
            '--no_ssh',
            '--node_rank=1',
            '--master_addr=127.0.0.1',
            f'--master_port={job.port}',
            '--elastic_training',
            '--min_elastic_nodes=1',
            '--max_elastic_nodes=2',
            f'--rdzv_conf={FAST.format(last_call=1)}',
            '--rdzv_timeout=60',
            '--max_restarts=2',
            str(EXAMPLE),
            '--checkpoint_dir',
            str(job.ckpt),
            '--steps',
            '80',
            '--step_time',
            '0.1',
        ]
    )
    assert a.finish(90, b) == 0, a.output
    assert b.finish(90, a) == 0, b.output
    assert 'nodes are waiting to join' in a.output, a.output
    a_starts = a.starts()
    assert a_starts[0][:3] == (0, 1, 0), a.output  # alone at first
    assert any(s[1] == 2 for s in a_starts), a.output  # then together with the late node
    assert all(s[3] == 0 for s in a_starts), a.output  # a membership change is not a restart
    assert 'restart 0 of 2' in b.output, b.output  # the runner forwarded --max_restarts
    assert sorted(finals(a) + finals(b)) == [(0, 2, 80), (1, 2, 80)], a.output + b.output


def test_dead_node_leaves_a_job_that_goes_on_with_min_nodes(job: Job) -> None:
    a = job.launch(0, last_call=5, steps=40)
    wait_listening(job.port, 60)  # node 0 hosts the rendezvous store (it must outlive node 1)
    b = job.launch(1, last_call=5, steps=40)
    b.wait_for(r'rank \d/2 step 5 ')
    b_workers = [pid for _, world, _, _, pid in b.starts() if world == 2]
    b.proc.kill()  # the node dies: SIGKILL, no clean-up code runs in its launcher
    b.finish(10)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in b_workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in b_workers), 'the dead node left its ranks running'
    assert a.finish() == 0, a.output
    last = a.starts()[-1]
    assert last[:2] == (0, 1) and last[2] >= 5, a.output  # alone again, resumed from a checkpoint
    assert finals(a) == [(0, 1, 40)], a.output


def _two_sleeping_workers(job: Job, tmp_path: Path, seconds: float) -> tuple[Node, list[int]]:
    """One node with two workers that print their pids, then sleep `seconds`."""
    sleeper = tmp_path / 'sleeper.py'
    sleeper.write_text(f"import os, time\nprint(f'sleeping {{os.getpid()}}', flush=True)\ntime.sleep({seconds})\n")
    node = job.launch(0, world={'node0': [0, 1]}, max_nodes=1, script=sleeper, script_args=[])
    node.wait_for(r'\[0\]: sleeping')
    node.wait_for(r'\[1\]: sleeping')
    return node, [int(m.group(1)) for line in node.lines if (m := re.search(r'sleeping (\d+)', line))]


def test_ctrl_z_pauses_the_node_and_its_ranks(job: Job, tmp_path: Path) -> None:
    """SIGTSTP reaches the workers (each in its own process group), then the agent stops itself;
    SIGCONT resumes all of them; the job then finishes."""
    a, workers = _two_sleeping_workers(job, tmp_path, seconds=3)
    a.proc.send_signal(signal.SIGTSTP)
    everyone = [a.proc.pid, *workers]
    wait_until(lambda: [proc_state(p) for p in everyone] == ['T'] * 3, 10, 'all to stop')
    a.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: all(proc_state(p) in ('R', 'S') for p in everyone), 10, 'all to run again')
    assert a.finish(30) == 0, a.output


def test_sigterm_stops_the_node_and_its_ranks(job: Job, tmp_path: Path) -> None:
    a, workers = _two_sleeping_workers(job, tmp_path, seconds=600)
    a.proc.send_signal(signal.SIGTERM)
    assert a.finish(30) == 1, a.output  # DeepSpeed's launch.py: 1 after SIGINT/SIGTERM
    assert len(workers) == 2 and not any(alive(p) for p in workers)
    assert 'stopped by SIGTERM' in a.output, a.output


# --------------------------------------------------------------------------------------------
# Environment and restarts (ranks without torch: fast)


def test_runner_single_host_env_restart_and_no_local_rank(job: Job, tmp_path: Path) -> None:
    dump = tmp_path / 'dump'
    dump.mkdir()
    tmp = tmp_path / 'tmp'
    tmp.mkdir()
    node = job.runner(
        [
            '--num_gpus=2',
            '--master_addr=127.0.0.1',
            f'--master_port={job.port}',
            '--elastic_training',
            f'--rdzv_conf={FAST.format(last_call=1)}',
            str(ENV_SCRIPT),
            'a',
            'b',
        ],
        env=job.env(DUMP_DIR=str(dump), FAIL_RANK='1', FAIL_UNTIL_RESTART='1', TMPDIR=str(tmp)),
    )
    assert node.finish() == 0, node.output
    assert '[1]: rank 1 fails on purpose' in node.output
    assert 'restarting the ranks (restart 1 of 3)' in node.output
    got = {p.name: json.loads(p.read_text()) for p in dump.iterdir()}
    assert sorted(got) == ['rank0.restart0.json', 'rank0.restart1.json', 'rank1.restart0.json', 'rank1.restart1.json']
    for name, data in got.items():
        assert data['argv'] == ['a', 'b']  # no --local_rank, as DeepSpeed's elastic agent
        env = data['env']
        rank = int(env['RANK'])
        restart = int(name.split('restart')[1].split('.')[0])
        assert env['LOCAL_RANK'] == str(rank)
        assert {
            k: env[k] for k in ('WORLD_SIZE', 'LOCAL_SIZE', 'LOCAL_WORLD_SIZE', 'ROLE_WORLD_SIZE')
        } == dict.fromkeys(('WORLD_SIZE', 'LOCAL_SIZE', 'LOCAL_WORLD_SIZE', 'ROLE_WORLD_SIZE'), '2')
        assert (env['CROSS_RANK'], env['CROSS_SIZE'], env['GROUP_RANK'], env['GROUP_WORLD_SIZE']) == (
            '0',
            '1',
            '0',
            '1',
        )
        assert env['ROLE_RANK'] == str(rank) and env['ROLE_NAME'] == 'trainer'
        assert env['CUDA_VISIBLE_DEVICES'] == '0,1'
        assert env['MASTER_ADDR'] == '127.0.0.1' and env['MASTER_PORT'] != str(job.port)  # the ranks' own store
        assert env['TORCHELASTIC_RESTART_COUNT'] == str(restart)
        assert env['TORCHELASTIC_MAX_RESTARTS'] == '3'
        assert env['TORCHELASTIC_RUN_ID'] == job.run_id
        assert env['TORCHELASTIC_USE_AGENT_STORE'] == 'False'
        assert 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE' not in env  # the agent's switch stays in the agent
        assert env['DSLAUNCH_RUN_ID']
        # torch's layout: <tmp>/torchelastic_*/<run id>_*/attempt_<restart>/<local rank>/error.json
        error_file = Path(env['TORCHELASTIC_ERROR_FILE'])
        assert (error_file.name, error_file.parent.name, error_file.parents[1].name) == (
            'error.json', env['LOCAL_RANK'], f'attempt_{restart}')
        assert error_file.parents[2].name.startswith(f'{job.run_id}_') and error_file.parents[4] == tmp
        assert data['error_dir_exists']
    assert list(tmp.iterdir()) == []  # no rank wrote an error file (no @record): nothing is left
    # Each start is its own supervised job.
    assert got['rank0.restart0.json']['env']['DSLAUNCH_RUN_ID'] != got['rank0.restart1.json']['env']['DSLAUNCH_RUN_ID']


def test_record_writes_the_failed_ranks_error_file_and_it_is_named(job: Job, tmp_path: Path) -> None:
    """A rank using torch's `@record` fails: its exception is in its error file, which is kept
    and named after the report; the node exits with the rank's status (1 for an exception)."""
    logs = tmp_path / 'logs'
    node = job.launch(
        0,
        world={'node0': [0, 1]},
        max_nodes=1,
        flags=['--max_restarts=0', f'--enable_each_rank_log={logs}'],
        script=ROOT / 'tests' / 'scripts' / 'torch_record_rank.py',
        script_args=[],
        env=job.env(FAIL_RANK='1'),
    )
    assert node.finish(180) == 1, node.output
    named = [line for line in node.output.splitlines() if 'error files written by failed ranks' in line]
    assert len(named) == 1, node.output
    path = Path(named[0].split(': ')[-1])
    assert (path.parent.name, path.parents[1].name) == ('1', 'attempt_0') and logs in path.parents
    assert json.loads(path.read_text())['message']['message'] == 'RuntimeError: rank 1 gives up'
    # With rank log files a rank's stderr shares its stdout pipe (the files keep its write order):
    # the report quotes its last output lines, and its file has the traceback.
    assert 'dslaunch: last output lines of rank 1:' in node.output, node.output
    (log1,) = logs.glob('*_rank1.log')
    assert 'RuntimeError: rank 1 gives up' in log1.read_text()


def test_restarts_run_out_exit_with_the_ranks_status(job: Job, tmp_path: Path) -> None:
    dump = tmp_path / 'dump'
    dump.mkdir()
    node = job.launch(
        0,
        world={'node0': [0]},
        max_nodes=1,
        flags=['--max_restarts=1'],
        script=ENV_SCRIPT,
        script_args=[],
        env=job.env(DUMP_DIR=str(dump), FAIL_RANK='0', FAIL_CODE='7'),
    )
    assert node.finish() == 7, node.output
    assert sorted(p.name for p in dump.iterdir()) == ['rank0.restart0.json', 'rank0.restart1.json']
    assert 'no restarts left (--max_restarts 1): giving up' in node.output, node.output


def test_signal_while_waiting_for_the_rendezvous(job: Job) -> None:
    a = job.launch(0, world={'node0': [0]}, min_nodes=2, max_nodes=2)
    a.wait_for('joining rendezvous')
    wait_listening(job.port, 60)  # inside the rendezvous now (it hosts the store)
    a.proc.send_signal(signal.SIGINT)
    assert a.finish(30) == 1, a.output  # DeepSpeed's launch.py: 1 after SIGINT/SIGTERM
    assert 'stopped by SIGINT' in a.output
    assert not a.starts()


def test_second_signal_kills_ranks_that_ignore_the_first(job: Job, tmp_path: Path) -> None:
    stubborn = tmp_path / 'stubborn.py'
    stubborn.write_text(
        'import os, signal, time\n'
        'signal.signal(signal.SIGTERM, signal.SIG_IGN)\n'
        "print(f'stubborn {os.getpid()}', flush=True)\n"
        'time.sleep(600)\n'
    )
    a = job.launch(0, world={'node0': [0]}, max_nodes=1, flags=['--grace_period=60'], script=stubborn, script_args=[])
    pid = int(a.wait_for(r'stubborn (\d+)').group(1))
    a.proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    assert a.proc.poll() is None and alive(pid)  # the rank ignores SIGTERM; 60 s of grace
    a.proc.send_signal(signal.SIGTERM)
    assert a.finish(20) == 1, a.output  # DeepSpeed's launch.py: 1 after SIGINT/SIGTERM
    assert not alive(pid)


def test_stop_from_a_multinode_runner_stops_the_elastic_node(job: Job, tmp_path: Path) -> None:
    from dslaunch import jobchannel

    sleeper = tmp_path / 'sleeper.py'
    sleeper.write_text("import os, time\nprint(f'sleeping {os.getpid()}', flush=True)\ntime.sleep(600)\n")
    server = jobchannel.JobServer()
    try:
        a = job.launch(
            0,
            world={'node0': [0]},
            max_nodes=1,
            script=sleeper,
            script_args=[],
            env=job.env(**server.env_for('127.0.0.1')),
        )
        pid = int(a.wait_for(r'sleeping (\d+)').group(1))
        assert server.connected() == 1
        server.stop(signal.SIGTERM)  # e.g. another host failed, or Ctrl-C on the runner
        assert a.finish(30) == 0, a.output  # the runner stopped it and sets the job's status
        assert not alive(pid)
        deadline = time.monotonic() + 5
        while not server.done and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.done == {0: 128 + signal.SIGTERM}  # the job's status, as a shell shows it
    finally:
        server.close()


def test_hang_watchdog_stops_a_silent_round_and_the_group_restarts(job: Job) -> None:
    """--hang_timeout under elastic: the silent first round is reported and stopped, the agent
    restarts the group (a hang counts as a failure), the second round finishes; --collapse on
    prints the line every rank wrote once."""
    script = ROOT / 'tests' / 'scripts' / 'elastic_hang.py'
    a = job.launch(
        0,
        world={'node0': [0, 1]},
        max_nodes=1,
        script=script,
        script_args=[],
        flags=['--hang_timeout=2', '--collapse=on', '--max_restarts=1'],
    )
    assert a.finish(60) == 0, a.output
    assert 'dslaunch: HANG: no rank wrote output' in a.output, a.output
    assert 'restarting the ranks (restart 1 of 1)' in a.output, a.output
    assert '[0-1]: every rank says this' in a.output, a.output
    assert '[0]: rank 0 done after restart' in a.output and '[1]: rank 1 done after restart' in a.output
