"""Differential property tests: the runner's launch decision, dslaunch against DeepSpeed's ``runner.main()``.

The installed DeepSpeed (0.19.8) is the oracle, run at test time on the same hypothesis-generated input
as ``dslaunch.runner.plan`` (nothing of DeepSpeed is copied here). An input is a hostfile (1-4 hosts,
0-4 slots; or none, with 0-4 local devices and maybe ``CUDA_VISIBLE_DEVICES``), ``--include/--exclude``
specs, ``--num_nodes/--num_gpus``, ``--master_addr/--master_port``, ``--launcher`` (the six backends,
other spellings, an unknown name), ``--launcher_args``, ``--force_multi``, ``--no_ssh [--node_rank]``,
``--no_ssh_check``, ``--ssh_port``, the per-node launcher flags, a user script and arguments, the
runner's environment (``NCCL_*``, ``PYTHON*``, ``UCX_*``, ``AISC_JOB_NAME``, batch-job variables, ...),
``.deepspeed_env`` files (home directory, working directory, ``DS_ENV_FILE`` as a name or an absolute
path), which hosts answer ssh and what ``hostname -I`` prints.

DeepSpeed's ``main()`` runs with its side effects replaced, in its own modules only (``_deepspeed_sandbox``):
``subprocess`` in ``runner`` and ``multinode_runner`` is a recorder (the ssh check and ``hostname -I``
are answered from the input, ``mpiname`` says MVAPICH2-GDR, ``Popen`` stops ``main()`` and keeps the
command and its environment), ``shutil.which`` finds every backend, the accelerator is DeepSpeed's CUDA
accelerator with a fixed device count, the MVAPICH hostfile goes to a temp path, and ``os.environ``, the
working directory and the env-file locations are the input's. dslaunch gets the same input through
``runner.parse_args``, ``runner.plan`` with fake probes, and ``runner.backend_runner_command``.

The contract, checked in dslaunch's own order of decisions (``expected_outcome``):

1. Refusals: where DeepSpeed stops before or in the filters (hostfile, conflicts, ``--num_nodes``, bad
   ``--include/--exclude``), dslaunch raises a ``DslaunchError`` with DeepSpeed's text; later refusals
   (unknown launcher, ``--node_rank``, the backends' own checks, ssh, ``hostname -I``) are DeepSpeed's
   where DeepSpeed has them, and each of the others is a row of docs/compatibility.md or
   docs/compatibility-backends.md, named by a tag below.
2. Otherwise the decoded world (host order and slots, via the exact ``--world_info`` string), the
   master address and port, local vs multi-node, the environment the command runs with, the exports
   (in order, values raw), the ssh probes, and the command: local mode word for word DeepSpeed's
   ``deepspeed.launcher.launch`` line with the documented substitutions, multi-node the backend command
   through the substitutions of docs/compatibility-backends.md (reused from tests/test_golden_runner_cmd.py).
3. Documented deviations are applied by giving DeepSpeed the documented equivalent input (``_expect``), or
   by the documented substitution in its command, never by skipping a comparison: no GPUs is DeepSpeed with
   one device; ``CUDA_VISIBLE_DEVICES=0,..,k-1`` is DeepSpeed on a k-device machine without the variable, and
   other ids (generated without filters) are DeepSpeed's ``--include=localhost:<ids>``; an env file is
   DeepSpeed's reading of the same file without blank/comment lines, ``export`` prefixes and surrounding
   quotes; an inherited variable no shell can export (``PYTHON-FOO``) is left out of DeepSpeed's exports; a
   local job is DeepSpeed with ``--launcher pdsh`` where DeepSpeed's backend vetoed it; OpenMPI's filtered
   worlds are checked against the command shape of tests/test_golden_runner_cmd.py. DeepSpeed is then also
   run on the original input: where only one side refuses, the difference must carry its documented tag.

Two fixed tests add what the generator leaves out: ``CUDA_VISIBLE_DEVICES=1,3`` under each backend (the MPI
engines place ranks by count, so a world of chosen device ids must be refused, as DeepSpeed does) and an
unbalanced ``--launcher_args`` quote (refused exactly when the job is multi-node, as in DeepSpeed).
"""

from __future__ import annotations

import argparse
import base64
import builtins
import contextlib
import io
import itertools
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

_ENV_BEFORE = set(os.environ)
deepspeed = pytest.importorskip('deepspeed', reason='DeepSpeed is the oracle of these tests (make install)')
hypothesis = pytest.importorskip('hypothesis')
import test_golden_runner_cmd as backend_rules  # the documented DeepSpeed -> dslaunch backend substitutions
from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator
from deepspeed.launcher import multinode_runner as ds_backends
from deepspeed.launcher import runner as ds_runner
from dslaunch import runner
from dslaunch.backends.quoting import is_shell_name
from dslaunch.errors import (
    DslaunchError,
    EnvFileError,
    LauncherError,
    ResourceFilterError,
    UnknownLauncherError,
    UsageError,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

for _name in set(os.environ) - _ENV_BEFORE:  # `import deepspeed` sets PYTORCH_NVML_BASED_CUDA_CHECK
    del os.environ[_name]

# Derandomized: the same examples every run, so the suite never fails on an example an earlier
# run did not try (runs of 2,000-4,000 random examples per test found nothing more).
SETTINGS = settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

CVD = 'CUDA_VISIBLE_DEVICES'
GOOD_HOSTNAME_I = '10.1.2.3 172.17.0.1\n'
FREE_PORT = 45678
HOSTFILE = 'hostfile'
NO_HOSTFILE = 'no_such_hostfile'
DS_LAUNCH = [sys.executable, '-u', '-m', 'deepspeed.launcher.launch']
OUR_LAUNCH = [sys.executable, '-u', '-m', 'dslaunch.launch']
DS_HELPER = os.path.join(os.path.dirname(os.path.realpath(ds_backends.__file__)), 'launcher_helper.py')

# Tags: the row of the compatibility docs that explains a difference (docs/compatibility.md unless noted).
CPU_RANKS = 'no hostfile, no GPUs'
CUDA_IDS = 'CUDA_VISIBLE_DEVICES=... (the visible ids are the local slots)'
NUM_GPUS_BOUND = '--num_gpus N larger than the slots'
EMPTY = '--exclude removes every slot'
UNKNOWN_LAUNCHER = 'unknown --launcher and the job runs locally'
ASSERT_AS_ERROR = '--no_ssh with a bad --node_rank'
MASTER_ADDR = 'user --master_addr without hostfile'
PORT_ZERO = '--master_port 0'
SSH_WHERE_USED = 'ssh reachability probe and ssh <host> hostname -I'
EMPTY_MASTER_ADDR = 'empty --master_addr where dslaunch does not ssh'
HOSTNAME_EMPTY = 'hostname -I prints nothing'
BACKEND_LOCAL = "backend's check of the filtered world (asked only when that backend starts the job)"
ENV_FILE = '.deepspeed_env blank/comment/export/quotes/no "=" lines'
BAD_NAMES = 'compatibility-backends.md: bad export names'
INHERITED_NAMES = 'compatibility-backends.md: bad export names (a name inherited from the environment)'
OPENMPI_FILTERS = 'compatibility-backends.md, OpenMPI: --include / --exclude / --num_nodes / --num_gpus'


# ---- DeepSpeed's side: main() in a sandbox -----------------------------------------------------------------
class _Launched(Exception):
    """DeepSpeed's main() called Popen: the command it would have started."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None) -> None:
        super().__init__('launched')
        self.cmd, self.env = list(cmd), dict(env) if env is not None else None


@dataclass
class DSRun:
    """What DeepSpeed's main() did with one input."""

    error: BaseException | None = None
    cmd: list[str] | None = None
    env: dict[str, str] | None = None
    args: argparse.Namespace | None = None
    filtered: dict[str, list[int]] | None = None  # parse_inclusion_exclusion's result
    limited: dict[str, list[int]] | None = None  # apply_num_nodes_and_gpus's result
    world_info: str | None = None
    ssh: list[tuple[str, str, int | None]] = field(default_factory=list)
    exports: list[tuple[str, str, str]] = field(default_factory=list)  # (source, key, value) as add_export got them
    reading_env_files: bool = False
    mvapich_hostfile: str | None = None


def _ssh_port(cmd: list[str]) -> int | None:
    return int(cmd[cmd.index('-p') + 1]) if '-p' in cmd else None


class _Machine:
    """The machine as DeepSpeed's runner modules see it (their ``subprocess``), and the record of main()."""

    CalledProcessError = subprocess.CalledProcessError
    DEVNULL = subprocess.DEVNULL

    def __init__(self) -> None:
        self.run = DSRun()
        self.devices = 1
        self.unreachable: frozenset[str] = frozenset()
        self.hostname_i = GOOD_HOSTNAME_I
        self.accelerator = CUDA_Accelerator()  # exports NCCL, CUDA_VISIBLE_DEVICES, MV2_USE_CUDA: a GPU host
        self.accelerator.device_count = lambda: self.devices

    def check_call(self, cmd: list[str], **_: Any) -> int:  # the reachability check: ssh ... HOST hostname
        host = cmd[-2]
        self.run.ssh.append(('ssh', host, _ssh_port(cmd)))
        if host in self.unreachable:
            raise subprocess.CalledProcessError(255, cmd)
        return 0

    def check_output(self, cmd: list[str], **_: Any) -> bytes:
        if cmd == ['mpiname']:  # MVAPICH's backend_exists
            return b'MVAPICH2-GDR 2.3.7\n'
        self.run.ssh.append(('hostname -I', cmd[-3], _ssh_port(cmd)))  # ssh [-p P] HOST hostname -I
        return self.hostname_i.encode()

    def Popen(self, cmd: list[str], env: dict[str, str] | None = None, **_: Any) -> None:
        raise _Launched(cmd, env)

    def open(self, file: str, *args: Any, **kwargs: Any) -> Any:  # `open` as runner.py sees it
        if sys._getframe(1).f_code.co_name == 'main':  # not fetch_hostfile: the env-file loop has begun
            self.run.reading_env_files = True
        return builtins.open(file, *args, **kwargs)


MACHINE = _Machine()


@pytest.fixture(scope='module', autouse=True)
def _deepspeed_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """DeepSpeed's main() without processes, ssh, GPUs or logging (all undone after the module)."""
    real = {name: getattr(ds_runner, name) for name in ('parse_args', 'parse_inclusion_exclusion')}
    real_apply, real_encode = ds_runner.apply_num_nodes_and_gpus, ds_runner.encode_world_info
    real_add_export = ds_backends.MultiNodeRunner.add_export

    def parse_args(args: Any = None) -> argparse.Namespace:
        MACHINE.run.args = real['parse_args'](args)
        return MACHINE.run.args

    def parse_inclusion_exclusion(*args: Any) -> Any:
        result = real['parse_inclusion_exclusion'](*args)
        MACHINE.run.filtered = {host: list(slots) for host, slots in result.items()}
        return result

    def apply_num_nodes_and_gpus(*args: Any) -> Any:
        result = real_apply(*args)
        MACHINE.run.limited = {host: list(slots) for host, slots in result.items()}
        return result

    def encode_world_info(world: Any) -> str:
        MACHINE.run.world_info = real_encode(world)
        return MACHINE.run.world_info

    def add_export(self: Any, key: str, var: str) -> None:
        main = sys._getframe(1).f_code.co_name == 'main'
        source = ('file' if MACHINE.run.reading_env_files else 'env') if main else 'backend'
        MACHINE.run.exports.append((source, key, var))
        real_add_export(self, key, var)

    mvapich = tmp_path_factory.mktemp('ds-mvapich') / 'hostfile'
    with pytest.MonkeyPatch.context() as mp:
        for module in (ds_runner, ds_backends):
            mp.setattr(module, 'subprocess', MACHINE)
            mp.setattr(module, 'get_accelerator', lambda: MACHINE.accelerator)
        mp.setattr(ds_backends, 'shutil', types.SimpleNamespace(which=lambda name, *a, **k: f'/usr/bin/{name}'))
        mp.setattr(ds_backends, 'MVAPICH_TMP_HOSTFILE', str(mvapich))
        mp.setattr(ds_runner, 'open', MACHINE.open, raising=False)
        mp.setattr(ds_runner, 'set_log_level_from_string', lambda *a, **k: None)
        mp.setattr(ds_runner.logger, 'disabled', True)
        mp.setattr(ds_runner, 'parse_args', parse_args)
        mp.setattr(ds_runner, 'parse_inclusion_exclusion', parse_inclusion_exclusion)
        mp.setattr(ds_runner, 'apply_num_nodes_and_gpus', apply_num_nodes_and_gpus)
        mp.setattr(ds_runner, 'encode_world_info', encode_world_info)
        mp.setattr(ds_backends.MultiNodeRunner, 'add_export', add_export)
        yield


def run_deepspeed(
    argv: list[str],
    env: dict[str, str],
    *,
    devices: int,
    home: str,
    unreachable: frozenset[str] = frozenset(),
    hostname_i: str = GOOD_HOSTNAME_I,
) -> DSRun:
    """DeepSpeed's ``runner.main(argv)`` in the current directory with ``os.environ == env``."""
    MACHINE.run = run = DSRun()
    MACHINE.devices, MACHINE.unreachable, MACHINE.hostname_i = devices, unreachable, hostname_i
    mvapich = ds_backends.MVAPICH_TMP_HOSTFILE
    saved = dict(os.environ)
    with pytest.MonkeyPatch.context() as mp:
        # DeepSpeed reads DS_ENV_FILE and HOME when runner.py is imported; this is what that import would
        # have found under `env` (docs/compatibility.md, DS_ENV_FILE: dslaunch reads it when it reads the files)
        mp.setattr(ds_runner, 'DEEPSPEED_ENVIRONMENT_NAME', env.get('DS_ENV_FILE', '.deepspeed_env'))
        mp.setattr(ds_runner, 'DEEPSPEED_ENVIRONMENT_PATHS', [home, '.'])
        os.environ.clear()
        os.environ.update(env)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the VISIBLE_DEVICES notes, IMPI's command
                ds_runner.main(argv)
        except _Launched as launched:
            run.cmd, run.env = launched.cmd, launched.env
        except (Exception, SystemExit) as exc:  # noqa: BLE001 (the oracle's answer is whatever it raised)
            run.error = exc
        else:
            raise AssertionError(f'DeepSpeed returned without starting anything: {argv}')
        finally:
            os.environ.clear()
            os.environ.update(saved)
    if os.path.exists(mvapich):
        with open(mvapich, encoding='utf-8') as f:
            run.mvapich_hostfile = f.read()
        os.unlink(mvapich)
    return run


# ---- dslaunch's side ---------------------------------------------------------------------------------------
class Probes:
    """runner.Probes answering as the input says; records the ssh calls (made in parallel)."""

    def __init__(self, devices: int, unreachable: frozenset[str], hostname_i: str) -> None:
        self.devices, self.unreachable, self.output = devices, unreachable, hostname_i
        self.calls: list[tuple[str, str, int | None]] = []

    def device_count(self) -> int:
        return self.devices

    def ssh_reachable(self, host: str, port: int | None) -> bool:
        self.calls.append(('ssh', host, port))
        return host not in self.unreachable

    def hostname_i(self, host: str, port: int | None) -> str:
        self.calls.append(('hostname -I', host, port))
        return self.output

    def backend_exists(self, name: str) -> bool:
        return True

    def port_free(self, addr: str, port: int) -> bool:
        return True

    def free_port(self) -> int:
        return FREE_PORT


@dataclass
class Ours:
    """dslaunch's answer: a refusal, or the plan (and for multi-node the backend command)."""

    error: DslaunchError | None = None
    plan: runner.Plan | None = None
    env_in: dict[str, str] | None = None  # the plan's environment before the backend saw it
    cmd: list[str] | None = None
    backend: Any = None
    probes: Probes | None = None


def run_dslaunch(argv: list[str], env: dict[str, str], probes: Probes, cwd: str) -> Ours:
    args = runner.parse_args(argv, prog='deepspeed')
    ours = Ours(probes=probes)
    try:
        ours.plan = runner.plan(args, env, probes, cwd=cwd, python=sys.executable, pid=os.getpid())
        if ours.plan.mode == 'multinode':
            ours.env_in = dict(ours.plan.env)
            ours.cmd, ours.backend = runner.backend_runner_command(ours.plan)
    except DslaunchError as exc:
        ours.error = exc
    return ours


# ---- inputs ------------------------------------------------------------------------------------------------
HOST_NAMES = ('worker-0', 'worker-1', 'node-a', 'gpu7', 'localhost', 'root@10.0.0.5')
LAUNCHERS = (None, None, None, 'pdsh', 'openmpi', 'mpich', 'impi', 'mvapich', 'slurm', 'OpenMPI', 'PDSH', 'bogus')
LAUNCHER_ARGS = (
    '',
    '',
    '-l alice',
    '--mca btl_tcp_if_include eth1',
    '-K0',
    '-launcher ssh',
    '--mca plm rsh',
    '--label "a b"',
)
ENV_POOL: dict[str, tuple[str, ...]] = {
    'NCCL_DEBUG': ('INFO',),
    'NCCL_IB_HCA': ('mlx5_0',),
    'NCCL_SOCKET_IFNAME': (' eth0 ', 'eth0'),
    'NCCL_X': ('say "hi" $HOME', 'two\nlines\tand a tab'),
    'PYTHONPATH': ('/opt/lib', ''),
    'PYTHONUNBUFFERED': ('1',),
    'PYTHON-FOO': ('1',),
    'UCX_NET_DEVICES': ('mlx5_0:1',),
    'UCX_TLS': ('rc',),
    'MV2_DEBUG': ('1',),
    'MLFLOW_TRACKING_URI': ('http://mlflow:5000/a b', "it's"),
    'HF_HOME': ('/data/hf',),
    'OMP_NUM_THREADS': ('4',),
    'AISC_JOB_NAME': ('job-1',),
    'SLURM_JOB_ID': ('42',),
    'SLURM_JOB_NODELIST': ('gpu07,gpu08',),
    'HYDRA_BOOTSTRAP': ('ssh',),
    'OMPI_MCA_plm_rsh_agent': ('ssh',),
    'PDSH_SSH_ARGS_APPEND': ('-o BatchMode=yes',),
}
ENV_LINES = (
    'NCCL_DEBUG=WARN',
    'FOO=bar',
    'SPACED = a b ',
    'QUOTED="eth0"',
    "SQUOTED='x y'",
    'DOLLAR=$HOME/x',
    'EQ=a=b',
    'PCT=100%',
    'EMPTY=',
    'PYTHONPATH=/from/file',
    'HASH=a # b',
    'CRLF=1\r',
    'export EXPORTED=1',
    '',
    '   ',
    '# a comment',
    'A B=1',
    'NOEQUALS',
    '=nokey',
)
USER_ARGS = (
    '--lr',
    '0.1',
    'a b',
    'say "hi"',
    "it's",
    '100%',
    '%n',
    '$HOME',
    '',
    '--deepspeed_config=ds.json',
    'x;y',
    '*.json',
)
EXPORT_PREFIXES = ('MLFLOW', 'PYTHON', 'MV2', 'UCX', 'NCCL')  # DeepSpeed's + its CUDA accelerator's
BATCH_JOB_VARS = ('SLURM_JOB_ID', 'SLURM_JOBID', 'PBS_JOBID', 'LSB_JOBID', 'PE_HOSTFILE', 'COBALT_JOBID', 'FLUX_URI')
FLAGS = ('--module', '--no_python', '--no_local_rank', '--save_pid', '--bind_cores_to_rank', '--quiet')


@dataclass(frozen=True)
class Job:
    """One generated input."""

    hosts: tuple[tuple[str, int], ...] | None  # the hostfile; None: run on local devices
    hostfile: str  # how --hostfile names it: HOSTFILE, '<absolute>', or (no hostfile) NO_HOSTFILE or '.'
    decorated: bool  # the hostfile with a comment line, tabs, zero-padded counts and trailing comments
    devices: int
    options: tuple[str, ...]  # runner options before the script (all `--name=value` or flags)
    script: str
    user_args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    env_file: str  # 'default', 'renamed', 'absolute' or 'empty' (DS_ENV_FILE)
    files: tuple[tuple[str, str], ...]  # ('home' | 'cwd' | 'absolute' | 'decoy', text)
    unreachable: frozenset[str]
    hostname_i: str

    def argv(self, launcher: str | None = None) -> list[str]:
        options = [o for o in self.options if launcher is None or not o.startswith('--launcher=')]
        hostfile = os.path.join(os.getcwd(), HOSTFILE) if self.hostfile == '<absolute>' else self.hostfile
        chosen = [f'--launcher={launcher}'] if launcher is not None else []
        return [f'--hostfile={hostfile}', *options, *chosen, self.script, *self.user_args]


def _spec(hosts: list[str]) -> st.SearchStrategy[str]:
    piece = st.tuples(
        st.sampled_from([*hosts, *hosts, *hosts, 'ghost']),
        st.none() | st.lists(st.sampled_from((0, 0, 1, 1, 2, 3)), min_size=1, max_size=3),
    ).map(lambda p: p[0] if p[1] is None else f'{p[0]}:{",".join(map(str, p[1]))}')
    return st.lists(piece, min_size=1, max_size=3).map('@'.join)


def _one_in(draw: st.DrawFn, n: int) -> bool:
    return draw(st.sampled_from((False,) * (n - 1) + (True,)))  # (hypothesis prefers the first element)


@st.composite
def jobs(draw: st.DrawFn, world: str) -> Job:
    """``world``: 'local' (no hostfile), 'hostfile' (anything) or 'multinode' (hostfile jobs that mostly launch)."""
    busy = world == 'multinode'
    if world == 'local':
        names, hosts, hostfile = ['localhost'], None, draw(st.sampled_from((NO_HOSTFILE, '.')))  # '.': a directory
    else:
        names = draw(st.lists(st.sampled_from(HOST_NAMES), min_size=2 if busy else 1, max_size=4, unique=True))
        hosts = tuple((name, draw(st.sampled_from((1, 2, 2, 3, 4, 0)))) for name in names)
        hostfile = draw(st.sampled_from((HOSTFILE, '<absolute>')))
        if not busy and _one_in(draw, 20):
            names, hosts = ['worker-0'], ()  # a hostfile with only a comment
    options: list[str] = []
    kind = draw(st.sampled_from(('none',) * (12 if busy else 5) + ('include', 'include', 'exclude', 'exclude', 'both')))
    if kind in ('include', 'both'):
        options.append(f'--include={draw(_spec(names))}')
    if kind in ('exclude', 'both'):
        options.append(f'--exclude={draw(_spec(names))}')
    for flag, values in (('--num_nodes', (0, 1, 2, 3)), ('--num_gpus', (0, 1, 2, 5))):
        if _one_in(draw, 12 if kind != 'none' or busy else 4):
            options.append(f'{flag}={draw(st.sampled_from(values))}')
    for flag, values in (
        ('--master_addr', (None, None, 'head-node', '10.9.8.7')),
        ('--master_port', (None,) * 6 + (1234, 0, 70000)),
        ('--launcher', LAUNCHERS[:-1] if busy else LAUNCHERS),
        ('--launcher_args', LAUNCHER_ARGS),
        ('--ssh_port', (None, None, 2200)),
        ('--venv_script', (None, None, '/opt/my venv/bin/activate')),
        ('--bind_core_list', (None, None, '0-3')),
        ('--enable_each_rank_log', (None, None, '/tmp/rank logs')),
        ('--log_level', (None, None, 'debug', 'error')),
    ):
        value = draw(st.sampled_from(values))
        if value is not None and value != '':
            options.append(f'{flag}={value}')
    if draw(st.booleans()):
        options.append('--force_multi')
    if _one_in(draw, 12 if busy else 5):
        options += ['--no_ssh', *draw(st.sampled_from(([], ['--node_rank=0'], ['--node_rank=1'], ['--node_rank=3'])))]
    elif _one_in(draw, 10):
        options.append('--node_rank=2')  # without --no_ssh: unused
    if draw(st.booleans()):
        options.append('--no_ssh_check')
    options += draw(st.lists(st.sampled_from(FLAGS), unique=True, max_size=3))
    if any(o.lower() == '--launcher=impi' for o in options):  # IMPI's binding asks numactl on the runner host
        options = [o for o in options if o != '--bind_cores_to_rank']
    env = {
        key: draw(st.sampled_from(values))
        for key, values in ENV_POOL.items()
        if _one_in(
            draw,
            5 if key in (*BATCH_JOB_VARS, 'SLURM_JOB_NODELIST', 'HYDRA_BOOTSTRAP', 'OMPI_MCA_plm_rsh_agent') else 2,
        )
    }
    cvd = draw(st.sampled_from((None, None, None, '0', '0,1', '0,1,2', '1,3', '2')))
    if cvd in ('1,3', '2') and any(o.startswith(('--include', '--exclude', '--num_')) for o in options):
        cvd = None  # other ids only where DeepSpeed turns them into the same slots (see _expect)
    if cvd is not None:
        env[CVD] = cvd
    env_file = draw(st.sampled_from(('default', 'default', 'renamed', 'absolute', 'empty')))
    lines = ENV_LINES if _one_in(draw, 6) else ENV_LINES[:-2]  # a line dslaunch refuses: now and then
    text = st.lists(st.sampled_from(lines), max_size=5).map(lambda got: ''.join(f'{x}\n' for x in got))
    places = {'absolute': ('absolute',), 'empty': ()}.get(env_file, ('home', 'cwd'))
    files = tuple((place, draw(text)) for place in places if draw(st.booleans()))
    if env_file in ('renamed', 'empty'):
        files += (('decoy', 'DECOY=1\n'),)  # a .deepspeed_env that DS_ENV_FILE makes both sides ignore
    return Job(
        hosts=hosts,
        hostfile=hostfile,
        decorated=draw(st.booleans()),
        devices=draw(st.integers(0, 4)),
        options=tuple(options),
        script=draw(st.sampled_from(('train.py', 'pkg.train', 'my script.py'))),
        user_args=tuple(draw(st.lists(st.sampled_from(USER_ARGS), max_size=3))),
        env=tuple(env.items()),
        env_file=env_file,
        files=files,
        unreachable=frozenset(draw(st.sets(st.sampled_from(names), max_size=1)) if _one_in(draw, 5) else ()),
        hostname_i=draw(st.sampled_from((GOOD_HOSTNAME_I,) * 5 + ('',))),
    )


@dataclass
class Workspace:
    cwd: str
    home: str
    absolute: str  # DS_ENV_FILE when it is an absolute path

    def env(self, job: Job) -> dict[str, str]:
        env = {'PATH': '/usr/bin:/bin', 'HOME': self.home, **dict(job.env)}
        if job.env_file != 'default':
            env['DS_ENV_FILE'] = {'renamed': 'my_env', 'absolute': self.absolute, 'empty': ''}[job.env_file]
        return env

    def write_env_files(self, job: Job, rewrite: Any = None) -> None:
        name = {'default': '.deepspeed_env', 'renamed': 'my_env', 'absolute': None, 'empty': None}[job.env_file]
        for place, text in job.files:
            path = {
                'home': os.path.join(self.home, name or ''),
                'cwd': os.path.join(self.cwd, name or ''),
                'absolute': self.absolute,
                'decoy': os.path.join(self.cwd, '.deepspeed_env'),
            }[place]
            with open(path, 'w', encoding='utf-8') as f:
                f.write(text if rewrite is None or place == 'decoy' else rewrite(text))


def hostfile_text(job: Job) -> str:
    if not job.decorated:
        return ''.join(f'{host} slots={slots}\n' for host, slots in job.hosts)
    lines = ['# the cluster', *(f'  {host}\tslots=0{slots}  # gpus' for host, slots in job.hosts)]
    return '\r\n'.join(lines) + '\r\n'


@contextlib.contextmanager
def workspace(job: Job) -> Iterator[Workspace]:
    """A fresh working directory (with the hostfile) and home directory, entered for the example."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix='dsl-diff-runner-') as tmp:
        tmp = os.path.realpath(tmp)
        ws = Workspace(os.path.join(tmp, 'cwd'), os.path.join(tmp, 'home'), os.path.join(tmp, 'etc', 'ds env'))
        for d in (ws.cwd, ws.home, os.path.dirname(ws.absolute)):
            os.makedirs(d)
        if job.hosts is not None:
            with open(os.path.join(ws.cwd, HOSTFILE), 'w', encoding='utf-8', newline='') as f:
                f.write(hostfile_text(job))
        os.chdir(ws.cwd)
        try:
            yield ws
        finally:
            os.chdir(old)


# ---- the documented equivalents ----------------------------------------------------------------------------
def _env_file_line(raw: str) -> tuple[str, str] | None | bool:
    """docs/compatibility.md's reading of one env-file line: (key, value); None: skipped; False: refused."""
    line = raw.strip()
    if not line or line.startswith('#'):
        return None
    words = line.split(None, 1)
    if len(words) == 2 and words[0] == 'export':
        line = words[1]
    key, eq, value = line.partition('=')
    if not eq or not key.strip():
        return False
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in '"\'':
        value = value[1:-1]
    return key.strip(), value


def ds_equivalent_env_file(text: str) -> str:
    """The file DeepSpeed reads the way dslaunch reads ``text`` (lines dslaunch refuses left out)."""
    pairs = [_env_file_line(line) for line in text.splitlines()]
    return ''.join(f'{p[0]}={p[1]}\n' for p in pairs if isinstance(p, tuple))


def env_files_refused(job: Job) -> bool:
    """Whether a file dslaunch reads has a line without ``=`` or with an empty name."""
    read = {'absolute': ('absolute',), 'empty': ()}.get(job.env_file, ('home', 'cwd'))
    return any(
        _env_file_line(line) is False for place, text in job.files if place in read for line in text.splitlines()
    )


def env_files_differ(job: Job) -> bool:
    return any(place != 'decoy' and ds_equivalent_env_file(text) != text for place, text in job.files)


def this_host(host: str) -> bool:
    name = socket.gethostname()
    return host in ('localhost', '127.0.0.1', '::1', name, name.split('.')[0])


def documented_ssh_hosts(launcher: str, args: argparse.Namespace, env: dict[str, str], active: dict) -> list[str]:
    """The hosts dslaunch probes (docs/compatibility.md, "ssh reachability probe"): pdsh all; Slurm none; the MPI
    engines every host but this one, none inside a batch job or where the user chose the engine's bootstrap."""
    if launcher in ('pdsh', 'slurm'):
        return list(active) if launcher == 'pdsh' else []
    words = shlex.split(args.launcher_args)
    if launcher == 'openmpi':
        chosen_env = ('OMPI_MCA_plm', 'OMPI_MCA_plm_rsh_agent', 'OMPI_MCA_orte_rsh_agent')
        chosen = any(
            a in ('-mca', '--mca') and b in ('plm', 'plm_rsh_agent', 'orte_rsh_agent')
            for a, b in itertools.pairwise(words)
        )
    else:
        chosen_env = ('HYDRA_LAUNCHER', 'HYDRA_BOOTSTRAP', 'HYDRA_LAUNCHER_EXEC', 'HYDRA_BOOTSTRAP_EXEC')
        chosen_env += ('I_MPI_HYDRA_BOOTSTRAP',) if launcher == 'impi' else ()
        chosen = any(w in ('-launcher', '-bootstrap', '-launcher-exec', '-bootstrap-exec') for w in words)
    if chosen or any(env.get(name) for name in (*BATCH_JOB_VARS, *chosen_env)):
        return []
    return [host for host in active if not this_host(host)]


def backend_refusal(error: BaseException | None) -> bool:
    text = str(error)
    return isinstance(error, ValueError) and (' backend ' in text or 'requires same number of devices' in text)


# ---- the expectation, in dslaunch's order of decisions -----------------------------------------------------
class _Refused(Exception):
    pass


@dataclass
class Expected:
    error: tuple[type[BaseException], str | None, str] | None = None  # (class, exact text or None, substring)
    tag: str | None = None  # the documented row a refusal comes from, where it has one
    tags: set[str] = field(default_factory=set)  # documented differences the input runs into
    ds: DSRun | None = None  # the DeepSpeed run a success is compared with
    mode: str = ''
    active: dict[str, list[int]] = field(default_factory=dict)
    master_addr: str = ''
    master_port: int = 0
    probes: list[tuple[str, str, int | None]] = field(default_factory=list)
    removed: tuple[str, ...] = ()
    exports: dict[str, str] | None = None
    derived_include: bool = False  # DeepSpeed's input keeps CUDA_VISIBLE_DEVICES, which it turns into --include

    def refuse(self, cls: type[BaseException], text: str | None, contains: str = '', tag: str | None = None) -> None:
        self.error, self.tag = (cls, text, contains), tag
        raise _Refused


def expected_outcome(job: Job, args: argparse.Namespace, ws: Workspace) -> Expected:
    exp = Expected()
    try:
        _expect(job, args, ws, exp)
    except _Refused:
        pass
    return exp


def _expect(job: Job, args: argparse.Namespace, ws: Workspace, exp: Expected) -> None:
    env, devices, cpu = ws.env(job), job.devices, False
    if job.hosts is None and env.get(CVD):
        ids = [int(i) for i in env[CVD].split(',')]
        if ids == list(range(len(ids))):  # 0..k-1: DeepSpeed on a k-device machine without the variable
            devices = len(env.pop(CVD).split(','))
        else:  # generated without filters: DeepSpeed's --include=localhost:<ids> on a machine that has them
            devices, exp.derived_include = max(ids) + 1, True
        exp.removed = (CVD,)
        exp.tags.add(CUDA_IDS)
    elif job.hosts is None and devices == 0:
        devices, cpu = 1, True
        exp.tags.add(CPU_RANKS)
    ws.write_env_files(job, ds_equivalent_env_file)
    # A name no shell can export, inherited from the environment, is left out of the exports (and stays in
    # the environment): DeepSpeed without it, the variable put back into the environment it started with.
    hidden = {k: v for k, v in env.items() if k.startswith(EXPORT_PREFIXES) and not is_shell_name(k)}
    if hidden:
        exp.tags.add(INHERITED_NAMES)

    def deepspeed(launcher: str | None = None, unreachable: frozenset[str] = frozenset()) -> DSRun:
        visible = {k: v for k, v in env.items() if k not in hidden}
        run = run_deepspeed(job.argv(launcher), visible, devices=devices, home=ws.home, unreachable=unreachable)
        if run.env is not None:
            run.env.update(hidden)
        return run

    exp.ds = ds = deepspeed()
    if ds.filtered is None:  # refused before or in the filters: DeepSpeed's refusal, in its words
        assert ds.error is not None
        exp.refuse(type(ds.error), str(ds.error))
    if not ds.filtered:
        exp.refuse(ResourceFilterError, None, 'Nothing left to run on: ', EMPTY)
    kept = list(ds.filtered)[: args.num_nodes] if args.num_nodes > 0 else list(ds.filtered)
    if args.num_gpus > 0 and not cpu and any(args.num_gpus > len(ds.filtered[h]) for h in kept):
        exp.refuse(ResourceFilterError, None, f'--num_gpus {args.num_gpus} is more than the ', NUM_GPUS_BOUND)
    assert ds.limited is not None, f'DeepSpeed stopped between the filter and --num_nodes/--num_gpus: {ds.error!r}'
    exp.active = active = ds.limited
    launcher = args.launcher.lower()
    if launcher not in runner.LAUNCHERS:
        exp.refuse(UnknownLauncherError, f'Unknown launcher {launcher}', tag=UNKNOWN_LAUNCHER)
    multinode = (args.force_multi or len(active) > 1) and not args.no_ssh
    exp.mode = 'multinode' if multinode else 'local'
    if not multinode and backend_refusal(ds.error):  # DeepSpeed asked Slurm although the job runs here
        exp.tags.add(BACKEND_LOCAL)
        exp.ds = ds = deepspeed('pdsh')
    if args.no_ssh and not 0 <= args.node_rank < len(active):
        assert isinstance(ds.error, AssertionError), ds.error
        exp.refuse(UsageError, str(ds.error), tag=ASSERT_AS_ERROR)
    if multinode:
        exp.ds = ds = _expect_backend(args, launcher, ds, exp, deepspeed)
        if job.hosts is not None and not args.no_ssh_check:
            _expect_ssh(job, args, launcher, env, exp, deepspeed)
    _expect_master(job, args, launcher, env, multinode, ds, exp)
    if multinode:
        _expect_exports(job, launcher, ds, exp)


def _expect_backend(args, launcher: str, ds: DSRun, exp: Expected, deepspeed) -> DSRun:
    filtering = bool(args.include or args.exclude) or args.num_nodes != -1 or args.num_gpus != -1
    if exp.derived_include and launcher in ('mpich', 'impi', 'mvapich'):
        # DeepSpeed refuses the --include it derives from CUDA_VISIBLE_DEVICES=1,3. These engines place k ranks
        # per host and cannot pick device ids (nor is world_info passed to their ranks): like OpenMPI and Slurm
        # (compatibility-backends.md), dslaunch must refuse such a world, not run it on other devices.
        assert backend_refusal(ds.error) and 'does not support worker include/exclusion' in str(ds.error), ds.error
        exp.refuse(ResourceFilterError, None, '')
    if launcher == 'openmpi' and (filtering or exp.derived_include):
        assert backend_refusal(ds.error) and 'openmpi backend does not support' in str(ds.error), ds.error
        exp.tags.add(OPENMPI_FILTERS)
        if any(list(slots) != list(range(len(slots))) for slots in exp.active.values()):
            exp.refuse(ResourceFilterError, None, 'openmpi backend cannot select specific device ids', OPENMPI_FILTERS)
        ds = deepspeed('pdsh')  # the exports and PYTHONPATH DeepSpeed collects for any backend
        ds.cmd = ds.env = None  # DeepSpeed has no OpenMPI command for this world
        return ds
    if backend_refusal(ds.error):
        exp.refuse(type(ds.error), str(ds.error))
    return ds


def _expect_ssh(job: Job, args, launcher: str, env: dict[str, str], exp: Expected, deepspeed) -> None:
    hosts = documented_ssh_hosts(launcher, args, env, exp.active)
    exp.probes += [('ssh', host, args.ssh_port) for host in hosts]
    dead = [host for host in hosts if host in job.unreachable]
    if dead:
        first = next(iter(exp.active))
        theirs = deepspeed(unreachable=frozenset({first})).error  # DeepSpeed's text, for its first host
        assert isinstance(theirs, RuntimeError) and f'host={first} ' in str(theirs), theirs
        text = str(theirs).replace(f'host={first} ', f'host={dead[0]} ')
        exp.refuse(LauncherError, text, tag=SSH_WHERE_USED)


def _expect_master(job: Job, args, launcher: str, env: dict[str, str], multinode: bool, ds: DSRun, exp) -> None:
    first = next(iter(exp.active))
    if job.hosts is None:
        exp.master_addr = args.master_addr or '127.0.0.1'
        if exp.master_addr != '127.0.0.1':
            exp.tags.add(MASTER_ADDR)
    elif args.master_addr:
        exp.master_addr = args.master_addr
    elif multinode and launcher == 'pdsh':
        exp.probes.append(('hostname -I', first, args.ssh_port))
        if not job.hostname_i.split():
            exp.refuse(LauncherError, None, 'printed no address', HOSTNAME_EMPTY)
        exp.master_addr = job.hostname_i.split()[0]
    elif multinode and launcher == 'slurm' and not (args.include or args.exclude) and env.get('SLURM_JOB_NODELIST'):
        exp.master_addr = env['SLURM_JOB_NODELIST'].split(',')[0]  # the allocation's first node
    else:
        exp.master_addr = first if multinode or args.no_ssh else '127.0.0.1'
    if exp.master_addr != ds.args.master_addr:
        exp.tags.add(EMPTY_MASTER_ADDR if job.hosts is not None else MASTER_ADDR)
    if sorted(ds.ssh) != sorted(exp.probes):  # DeepSpeed: the first host, whenever there is a hostfile
        exp.tags.add(SSH_WHERE_USED)
    exp.master_port = args.master_port
    if args.master_port == 0:
        if multinode or args.no_ssh:
            exp.refuse(UsageError, None, '--master_port 0', PORT_ZERO)
        exp.master_port = FREE_PORT
        exp.tags.add(PORT_ZERO)


def _expect_exports(job: Job, launcher: str, ds: DSRun, exp: Expected) -> None:
    if env_files_differ(job):
        exp.tags.add(ENV_FILE)
    if env_files_refused(job):
        exp.refuse(EnvFileError, None, '', ENV_FILE)
    exports: dict[str, str] = {}
    for source, key, value in ds.exports:
        if source == 'backend':
            continue
        exports[key.strip()] = value if source == 'env' else value.strip()  # dslaunch: values raw
    exp.exports = exports
    if launcher == 'pdsh' and not all(is_shell_name(k) for k in exports):
        exp.refuse(DslaunchError, None, 'not a valid variable name', BAD_NAMES)


# ---- comparing ---------------------------------------------------------------------------------------------
# Which documented differences can explain that DeepSpeed refused an input that dslaunch runs.
_EXPLAINS: list[tuple[Any, set[str]]] = [
    (lambda e: 'was not reachable via ssh' in str(e), {SSH_WHERE_USED}),
    (lambda e: isinstance(e, IndexError), {HOSTNAME_EMPTY, EMPTY_MASTER_ADDR, SSH_WHERE_USED}),
    (lambda e: 'no GPU resources' in str(e), {CPU_RANKS, CUDA_IDS}),
    (lambda e: str(e).startswith(('No slot', 'Cannot specify num_nodes/gpus')), {CUDA_IDS}),
    (lambda e: 'not enough values to unpack' in str(e), {ENV_FILE}),
    (backend_refusal, {BACKEND_LOCAL, OPENMPI_FILTERS, CUDA_IDS}),  # CUDA_IDS: DeepSpeed's derived --include
]


def check_refusals_are_documented(job: Job, ws: Workspace, exp: Expected, ours: Ours) -> None:
    """DeepSpeed on the original input: where one side refuses and the other does not, a documented row says why."""
    ws.write_env_files(job)
    theirs = run_deepspeed(
        job.argv(),
        ws.env(job),
        devices=job.devices,
        home=ws.home,
        unreachable=job.unreachable,
        hostname_i=job.hostname_i,
    ).error
    if theirs is None and ours.error is not None:  # (DeepSpeed's equivalent input may refuse: CUDA ids, CPU ranks)
        assert exp.tag is not None or exp.tags & {CUDA_IDS, CPU_RANKS}, (
            f'DeepSpeed runs this; dslaunch refuses without a documented reason: {ours.error!r}'
        )
    if theirs is not None and ours.error is None:
        fitting = set().union(*(tags for applies, tags in _EXPLAINS if applies(theirs)))
        assert exp.tags & fitting, f'DeepSpeed refuses ({theirs!r}); dslaunch runs it without a documented reason'


def check_refusal(exp: Expected, ours: Ours) -> None:
    cls, text, contains = exp.error
    if ours.error is None:
        ran = f'{ours.plan.mode} {ours.plan.backend or ""} world {ours.plan.active}'
        raise AssertionError(f'dslaunch ran ({ran}); expected {cls.__name__}: {text or contains or "any text"}')
    assert isinstance(ours.error, cls), f'{ours.error!r} is not a {cls.__name__}'  # DeepSpeed's: ValueError, ...
    if text is not None:
        assert str(ours.error) == text
    assert contains in str(ours.error)


def check_local(exp: Expected, ours: Ours) -> None:
    plan, ds = ours.plan, exp.ds
    assert ds.cmd is not None and ds.cmd[:4] == DS_LAUNCH, ds.error
    assert ds.world_info == plan.world_info
    want = list(OUR_LAUNCH)
    for word in ds.cmd[4:]:  # DeepSpeed's command with the documented substitutions
        if word.startswith('--master_addr='):
            word = f'--master_addr={exp.master_addr}'
        elif word.startswith('--master_port=') and exp.master_port == FREE_PORT:
            word = f'--master_port={FREE_PORT}'
        want.append(word)
    assert plan.argv == want
    assert plan.env == ds.env  # this machine's environment, minus CUDA_VISIBLE_DEVICES where DeepSpeed drops it


def check_multinode(exp: Expected, ours: Ours, args: argparse.Namespace) -> None:
    plan, ds = ours.plan, exp.ds
    assert plan.backend == args.launcher.lower()
    assert plan.exports == exp.exports and list(plan.exports) == list(exp.exports)
    assert plan.world_info == runner.encode_world_info(exp.active)
    if ds.world_info is not None:
        assert plan.world_info == ds.world_info
    pythonpath = [v for s, k, v in ds.exports if s == 'env' and k == 'PYTHONPATH']
    assert ours.env_in['PYTHONPATH'] == pythonpath[0]  # (Slurm's get_cmd then puts the exports there)
    name = plan.backend
    ds_args = argparse.Namespace(**vars(plan.args))
    ds_args.launcher = name
    ds_cmd = None if ds.cmd is None else _ds_backend_cmd(ds, exp)
    world = backend_rules.World(
        name, ds_args, plan.resource_pool, plan.active, dict(ours.backend.exports), ds_cmd, os.getcwd()
    )
    if name == 'impi' and not any(plan.active.values()):
        return  # no ranks: DeepSpeed's Intel MPI command has no rank segment to compare ours with
    case = {'mvapich_hostfile_written': {'content': ds.mvapich_hostfile}} if ds.mvapich_hostfile else {}
    backend_rules.assert_backend(world, ours.backend, ours.cmd, plan.env, ours.env_in, ds.env, case)


def _ds_backend_cmd(ds: DSRun, exp: Expected) -> list[str]:
    """DeepSpeed's backend command in the placeholders of the golden vectors, with dslaunch's documented
    master address (MASTER_ADDR / EMPTY_MASTER_ADDR) where it differs."""
    cmd = [
        w.replace(DS_HELPER, backend_rules.DS_HELPER).replace(
            ds_backends.MVAPICH_TMP_HOSTFILE, backend_rules.DS_MVAPICH_HOSTFILE
        )
        for w in ds.cmd
    ]
    theirs = ds.args.master_addr
    if theirs != exp.master_addr:
        assert exp.tags & {MASTER_ADDR, EMPTY_MASTER_ADDR}, f'undocumented master address {exp.master_addr}'
        cmd = [f'--master_addr={exp.master_addr}' if w == f'--master_addr={theirs}' else w for w in cmd]  # PDSH
        for i in range(1, len(cmd)):  # MPICH, Intel MPI: -genv MASTER_ADDR <addr>
            if cmd[i - 1] == 'MASTER_ADDR' and cmd[i] == theirs:
                cmd[i] = exp.master_addr
    return cmd


def check_job(job: Job, in_hypothesis: bool = True) -> None:
    with workspace(job) as ws:
        args = runner.parse_args(job.argv(), prog='deepspeed')
        exp = expected_outcome(job, args, ws)
        ws.write_env_files(job)  # dslaunch reads the files as written
        env = ws.env(job)
        ours = run_dslaunch(job.argv(), env, Probes(job.devices, job.unreachable, job.hostname_i), ws.cwd)
        try:
            _compare(job, ws, args, exp, ours, in_hypothesis)
        finally:
            if ours.backend is not None:
                ours.backend.cleanup()  # per-job hostfiles (OpenMPI, MVAPICH)


def _compare(job: Job, ws: Workspace, args: argparse.Namespace, exp: Expected, ours: Ours, in_hypothesis: bool) -> None:
    check_refusals_are_documented(job, ws, exp, ours)
    outcome = f'refused ({exp.error[0].__name__}, {exp.tag})' if exp.error else exp.mode
    if in_hypothesis:
        hypothesis.event(f'{args.launcher.lower()}: {outcome}')  # see --hypothesis-show-statistics
    if exp.error is not None:
        check_refusal(exp, ours)
        return
    assert ours.error is None, f'dslaunch refused: {ours.error!r}; DeepSpeed: {exp.ds.error or exp.ds.cmd}'
    plan = ours.plan
    assert plan.mode == exp.mode
    assert list(plan.active) == list(exp.active) and plan.active == exp.active
    assert json.loads(base64.urlsafe_b64decode(plan.world_info)) == exp.active
    assert plan.master_addr == exp.master_addr and plan.args.master_addr == exp.master_addr
    assert plan.master_port == exp.master_port
    assert plan.removed_env == exp.removed
    assert sorted(ours.probes.calls) == sorted(exp.probes)
    if exp.mode == 'local':
        check_local(exp, ours)
    else:
        check_multinode(exp, ours, args)


@SETTINGS
@given(jobs('hostfile'))
def test_hostfile_jobs_match_deepspeed(job: Job) -> None:
    check_job(job)


@SETTINGS
@given(jobs('multinode'))
def test_multinode_jobs_match_deepspeed(job: Job) -> None:
    check_job(job)


@SETTINGS
@given(jobs('local'))
def test_local_jobs_match_deepspeed(job: Job) -> None:
    check_job(job)


def _job(*options: str, hosts: tuple[tuple[str, int], ...] | None = None, **changes: Any) -> Job:
    fields: dict[str, Any] = {
        'hosts': hosts,
        'hostfile': HOSTFILE if hosts is not None else NO_HOSTFILE,
        'decorated': False,
        'devices': 2,
        'options': options,
        'script': 'train.py',
        'user_args': ('--lr', '0.1'),
        'env': (),
        'env_file': 'default',
        'files': (),
        'unreachable': frozenset(),
        'hostname_i': GOOD_HOSTNAME_I,
    }
    return Job(**{**fields, **changes})


@pytest.mark.parametrize('launcher', ['mpich', 'impi', 'mvapich', 'openmpi', 'slurm', 'pdsh'])
@pytest.mark.parametrize('visible', ['1,3', '2'])
def test_visible_device_ids_under_each_backend(launcher: str, visible: str) -> None:
    """``CUDA_VISIBLE_DEVICES=1,3``, no hostfile, ``--force_multi``: DeepSpeed turns the variable into
    ``--include=localhost:1,3``; pdsh runs world ``[1, 3]`` (its launcher sets each rank's devices), every other
    backend refuses (MPI: no include/exclude; Slurm: no device ids). dslaunch keeps the ids as the slots and
    drops the variable (docs/compatibility.md), so an engine that places k ranks per host by count cannot honour
    them: it must refuse, as OpenMPI and Slurm do, not run the ranks on devices 0..k-1."""
    check_job(_job(f'--launcher={launcher}', '--force_multi', devices=4, env=((CVD, visible),)), in_hypothesis=False)


@pytest.mark.parametrize('launcher', ['pdsh', 'openmpi', 'mpich', 'impi', 'mvapich', 'slurm'])
@pytest.mark.parametrize('hosts', [(('worker-0', 2),), (('worker-0', 2), ('worker-1', 2))], ids=['one-host', 'two'])
def test_unbalanced_launcher_args(launcher: str, hosts: tuple[tuple[str, int], ...]) -> None:
    """``--launcher_args '-x "a'``: DeepSpeed's backends fail on the shell split (``No closing quotation``) when
    the job is multi-node and never look at it otherwise; dslaunch refuses exactly then, with one line."""
    argv = ['--hostfile=hostfile', f'--launcher={launcher}', '--launcher_args=-x "a', '--master_addr=w0', 'train.py']
    with workspace(_job(hosts=hosts)) as ws:
        env = ws.env(_job(hosts=hosts))
        theirs = run_deepspeed(argv, env, devices=2, home=ws.home)
        ours = run_dslaunch(argv, env, Probes(2, frozenset(), GOOD_HOSTNAME_I), ws.cwd)
        if ours.backend is not None:
            ours.backend.cleanup()
    if len(hosts) == 1:
        assert theirs.error is None and theirs.cmd[:4] == DS_LAUNCH
        assert ours.error is None and ours.plan.mode == 'local'
    else:
        assert isinstance(theirs.error, ValueError) and str(theirs.error) == 'No closing quotation'
        assert isinstance(ours.error, DslaunchError) and 'No closing quotation' in str(ours.error)
