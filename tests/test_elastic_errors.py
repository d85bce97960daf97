"""Elastic training: bad input and rendezvous failures are one clear line on stderr, a non-zero
exit, and nothing left running (conftest checks the last part). Plus the pure parts: option
resolution, the per-rank environment, and the runner's forwarding."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from dslaunch import elastic, runner
from dslaunch.errors import UsageError
from dslaunch.world_info import encode_world_info

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'tests' / 'scripts' / 'elastic_env.py'
PY = sys.executable
ONE_NODE = encode_world_info({'node0': [0]})

pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return int(s.getsockname()[1])


def run(argv: list[str], *, timeout: float = 45, **env: str) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, ELASTIC_RUN_ID=f'test-{uuid.uuid4().hex[:12]}', DUMP_DIR='/nonexistent', **env)
    return subprocess.run(argv, check=False, capture_output=True, text=True, env=full, cwd=ROOT, timeout=timeout)


def launch(*flags: str, port: int | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    argv = [
        PY,
        '-m',
        'dslaunch.launch',
        f'--world_info={ONE_NODE}',
        '--master_addr=127.0.0.1',
        f'--master_port={port or free_port()}',
        '--enable_elastic_training',
        *flags,
        str(SCRIPT),
    ]
    return run(argv, **env)


def one_error_line(proc: subprocess.CompletedProcess[str], prog: str = 'dslaunch.launch') -> str:
    lines = [line for line in proc.stderr.splitlines() if not line.startswith('dslaunch: elastic: ')]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f'{prog}: error: '), proc.stderr
    assert 'Traceback' not in proc.stderr + proc.stdout
    return lines[0]


@pytest.mark.parametrize(
    'flags, message',
    [
        (
            ['--min_elastic_nodes=3', '--max_elastic_nodes=2'],
            '--min_elastic_nodes 3 is larger than --max_elastic_nodes 2',
        ),
        (['--min_elastic_nodes=0'], 'must be positive'),
        (['--max_restarts=-1'], '--max_restarts must be >= 0'),
        (['--rdzv_timeout=0'], '--rdzv_timeout must be a positive number'),
        (['--rdzv_conf=join_timeout=abc'], 'join_timeout must be a positive whole number'),
        (['--rdzv_conf=bogus=1'], "unknown key 'bogus'"),
        (['--no_local_rank'], '--no_local_rank argument is not supported in Elastic training'),
    ],
)
def test_launch_rejects_bad_elastic_flags(flags: list[str], message: str) -> None:
    proc = launch(*flags)
    assert proc.returncode == 1
    assert message in one_error_line(proc)


def test_launch_without_torch_says_so(tmp_path: Path) -> None:
    fake = tmp_path / 'torch'
    fake.mkdir()
    (fake / '__init__.py').write_text("raise ImportError('no torch here')\n")
    proc = launch(PYTHONPATH=f'{tmp_path}:{os.environ.get("PYTHONPATH", "")}')
    assert proc.returncode == 1
    assert 'needs torch' in one_error_line(proc)


def test_rendezvous_that_cannot_form_times_out() -> None:
    start = time.monotonic()
    proc = launch('--min_elastic_nodes=2', '--max_elastic_nodes=2', '--rdzv_timeout=2')
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert 'did not form within 2 s (needs at least 2 node(s)' in line, line
    assert time.monotonic() - start < 30


def test_unreachable_rendezvous_store() -> None:
    port = free_port()  # nobody listens, and this node is told not to host the store
    proc = launch('--rdzv_conf=is_host=false,read_timeout=2', port=port)
    assert proc.returncode == 1
    assert 'cannot reach the elastic rendezvous' in one_error_line(proc)


def test_master_addr_that_does_not_resolve_is_one_line_at_once() -> None:
    start = time.monotonic()
    argv = [PY, '-m', 'dslaunch.launch', f'--world_info={ONE_NODE}', '--master_addr=nohost.invalid',
            f'--master_port={free_port()}', '--enable_elastic_training', str(SCRIPT)]
    proc = run(argv)
    assert proc.returncode == 1
    assert "cannot resolve --master_addr 'nohost.invalid'" in one_error_line(proc)
    assert time.monotonic() - start < 30  # not the 600 s rendezvous timeout


def test_runner_rejects_elastic_with_a_backend_that_starts_ranks_itself(tmp_path: Path) -> None:
    hostfile = tmp_path / 'hostfile'
    hostfile.write_text('worker-0 slots=1\nworker-1 slots=1\n')
    for launcher in ('openmpi', 'slurm', 'mpich', 'impi', 'mvapich'):
        proc = run(
            [
                PY,
                '-m',
                'dslaunch',
                '-H',
                str(hostfile),
                '--launcher',
                launcher,
                '--elastic_training',
                '--master_addr=10.0.0.1',
                str(SCRIPT),
            ]
        )
        assert proc.returncode == 1, proc.stderr
        assert '--elastic_training needs per-node launchers: use --launcher pdsh' in one_error_line(proc, 'dslaunch')


@pytest.mark.parametrize(
    'flags, message',
    [
        (['--rdzv_timeout=2'], '--rdzv_timeout only apply with --elastic_training'),
        (['--max_restarts=2'], '--elastic_training'),
        (
            ['--elastic_training', '--master_addr=127.0.0.1', '--min_elastic_nodes=3', '--max_elastic_nodes=1'],
            '--min_elastic_nodes 3 is larger than --max_elastic_nodes 1',
        ),
        (['--elastic_training', '--master_addr=127.0.0.1', '--rdzv_conf=nope'], 'expected KEY=VALUE'),
    ],
)
def test_runner_rejects_bad_elastic_flags(flags: list[str], message: str) -> None:
    proc = run([PY, '-m', 'dslaunch', *flags, str(SCRIPT)])
    assert proc.returncode == 1
    assert message in one_error_line(proc, 'dslaunch')


# --------------------------------------------------------------------------------------------
# Pure parts


def _launch_args(*flags: str):
    from dslaunch import launch as launch_mod

    return launch_mod.parse_args(['--enable_elastic_training', '--master_port=29500', *flags, 'train.py'])


def test_resolve_defaults_as_deepspeed() -> None:
    cfg = elastic.resolve(_launch_args(), {}, n_hosts=4)
    assert (cfg.min_nodes, cfg.max_nodes, cfg.max_restarts) == (1, 4, 3)  # min 1, max = world_info hosts
    assert cfg.run_id == '123456789' and cfg.endpoint == '127.0.0.1:29500'
    assert cfg.rdzv_conf == {'join_timeout': '600', 'read_timeout': '60'}
    cfg = elastic.resolve(
        _launch_args('--max_restarts=0', '--rdzv_timeout=5', '--rdzv_conf=last_call_timeout=2,is_host=true'),
        {'ELASTIC_RUN_ID': 'job7'},
        n_hosts=1,
    )
    assert (cfg.max_restarts, cfg.run_id) == (0, 'job7')
    assert cfg.rdzv_conf == {'join_timeout': '5', 'read_timeout': '5', 'last_call_timeout': '2', 'is_host': 'true'}


def test_parse_rdzv_conf_errors() -> None:
    assert elastic.parse_rdzv_conf(' keep_alive_interval=1 , ,read_timeout=3') == {
        'keep_alive_interval': '1',
        'read_timeout': '3',
    }
    for bad in ('x', '=1', 'is_host=maybe', 'last_call_timeout=-1', 'last_call_timeout=0'):
        with pytest.raises(UsageError):
            elastic.parse_rdzv_conf(bad)


def test_worker_env_is_deepspeeds_plus_torchelastics() -> None:
    env = elastic.worker_env(
        static={'CUDA_VISIBLE_DEVICES': '2,3'},
        local_rank=1,
        global_rank=5,
        role_rank=5,
        world_size=6,
        role_world_size=6,
        group_rank=2,
        group_world_size=3,
        local_world_size=2,
        master_addr='10.0.0.1',
        master_port=41000,
        restart_count=1,
        max_restarts=3,
        run_id='r',
        use_agent_store=False,
        environ={},
    )
    assert env == {
        'CUDA_VISIBLE_DEVICES': '2,3',
        'RANK': '5',
        'LOCAL_RANK': '1',
        'WORLD_SIZE': '6',
        'LOCAL_SIZE': '2',
        'CROSS_RANK': '2',
        'CROSS_SIZE': '3',
        'MASTER_ADDR': '10.0.0.1',
        'MASTER_PORT': '41000',
        'GROUP_RANK': '2',
        'ROLE_RANK': '5',
        'ROLE_NAME': 'trainer',
        'LOCAL_WORLD_SIZE': '2',
        'GROUP_WORLD_SIZE': '3',
        'ROLE_WORLD_SIZE': '6',
        'TORCHELASTIC_RESTART_COUNT': '1',
        'TORCHELASTIC_MAX_RESTARTS': '3',
        'TORCHELASTIC_RUN_ID': 'r',
        'TORCHELASTIC_USE_AGENT_STORE': 'False',
        'TORCH_NCCL_ASYNC_ERROR_HANDLING': '1',
    }


class _Probes:
    def device_count(self) -> int:
        return 0

    def ssh_reachable(self, host: str, port: int | None) -> bool:
        return True

    def hostname_i(self, host: str, port: int | None) -> str:
        return '10.0.0.1'

    def backend_exists(self, name: str) -> bool:
        return True

    def port_free(self, addr: str, port: int) -> bool:
        return False  # taken: by another node's agent hosting the rendezvous, for an elastic job

    def free_port(self) -> int:
        return 40000


def test_runner_forwards_elastic_options_only_when_set(tmp_path: Path) -> None:
    base = ['--elastic_training', '--master_addr=127.0.0.1', '--master_port=29511', 'train.py', '--x']
    plan = runner.plan(runner.parse_args(base), {}, _Probes(), cwd=str(tmp_path))
    assert plan.argv is not None
    assert not any(a.startswith(('--max_restarts', '--rdzv_')) for a in plan.argv)
    args = runner.parse_args(['--max_restarts=5', '--rdzv_timeout=30', '--rdzv_conf=last_call_timeout=2', *base])
    plan = runner.plan(args, {}, _Probes(), cwd=str(tmp_path))
    assert plan.argv is not None
    at = plan.argv.index('--enable_elastic_training')
    assert plan.argv[at : at + 3] == ['--enable_elastic_training', '--max_elastic_nodes=-1', '--min_elastic_nodes=-1']
    assert plan.argv[-5:] == [
        '--max_restarts=5',
        '--rdzv_timeout=30',
        '--rdzv_conf=last_call_timeout=2',
        'train.py',
        '--x',
    ]
    # and the per-node launcher parses them back
    from dslaunch import launch as launch_mod

    node = launch_mod.parse_args(plan.argv[4:])
    assert (node.max_restarts, node.rdzv_timeout, node.rdzv_conf) == (5, 30, 'last_call_timeout=2')
