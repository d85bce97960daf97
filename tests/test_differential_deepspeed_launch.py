"""Differential property tests: what the per-node launcher gives each rank, against DeepSpeed's launch.py.

The installed DeepSpeed (0.19.8) is the oracle at test time; nothing of it is copied here. For one
hypothesis-generated node (a ``--world_info`` of 0-4 hosts with unsorted, non-contiguous, string
or empty slot lists, ``--node_rank``, ``--master_addr/--master_port``, ``--module``, ``--no_python``,
``--no_local_rank``, ``--save_pid``, ``--enable_each_rank_log``, ``--bind_cores_to_rank`` with and
without ``--bind_core_list``, a script and arguments with odd characters, and an inherited
environment with or without ``CUDA_VISIBLE_DEVICES``, ``OMP_NUM_THREADS``, ``KMP_AFFINITY``, stale
``RANK``-style variables and others), both launchers run with their process spawning replaced:

- DeepSpeed: ``deepspeed.launcher.launch.main()`` with ``sys.argv`` and ``os.environ`` set to the
  case, ``subprocess.Popen`` replaced by a recorder (each rank's argv, a copy of its environment,
  its log file), and its signal handlers, 1 s sleeps, numactl/dpkg probes, clock and pid-file
  directory replaced; the machine's topology is the generated one.
- dslaunch: ``dslaunch.launch.parse_args`` and ``dslaunch.launch_run.run_node`` (which calls
  ``launch.rank_plans`` with the launcher's interpreter, then its pre-start checks) with
  ``launch_run.run_plans`` replaced by a recorder, ``numa.SystemTopology`` by the same topology and
  ``os.sched_getaffinity`` by the generated machine's cores. A rank's environment is the one
  ``run_plans`` gives it: the launcher's environment updated with the plan's ``env_overrides``.

Each side runs in its own fresh working directory (same relative paths), so directories created
by one are not seen by the other. Two of dslaunch's pre-start checks are kept out of the generated
space: the script exists (a missing one is a documented refusal, docs/compatibility.md "a training
script that does not exist"), and ``--bind_core_list`` names only CPUs of the generated machine
(``launch_run.check_bind_core_list`` refuses others up front, where launch.py's ranks would each
fail in numactl).

The contract: where DeepSpeed starts ranks, dslaunch plans the same ranks in the same order, each
with the same argv (same interpreter, ``sys.executable``), the same complete environment (every
variable launch.py sets, changes or leaves alone) and the same per-rank log file, and the log
directory exists on both sides afterwards. Where DeepSpeed raises, dslaunch raises a
``DslaunchError``; where the input has one fault only, of the class and with DeepSpeed's own text
(launch.py's messages). dslaunch may refuse what DeepSpeed accepts only in the cases
docs/compatibility.md lists ("Per-node launcher"): a negative ``--node_rank`` and ``--module`` with
``--no_python`` on a zero-slot node. The test also predicts DeepSpeed's refusals from the input,
so a change in the oracle's rules shows up as a failure, not as a silently narrower test.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import signal
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

_ENV_BEFORE = set(os.environ)
deepspeed = pytest.importorskip('deepspeed', reason='DeepSpeed is the oracle of these tests (make install)')
hypothesis = pytest.importorskip('hypothesis')
from deepspeed.accelerator import get_accelerator
from deepspeed.launcher import launch as ds_launch
from deepspeed.launcher import runner as ds_runner
from deepspeed.utils import numa as ds_numa
from dslaunch import launch, launch_run, numa
from dslaunch.channel_vars import REPORT_TO_ENV, TOKEN_ENV
from dslaunch.errors import CoreBindingError, DslaunchError, UsageError, WorldInfoError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    _ACCELERATOR = get_accelerator()  # detected once and cached, before os.environ is swapped below
for _name in set(os.environ) - _ENV_BEFORE:  # `import deepspeed` sets PYTORCH_NVML_BASED_CUDA_CHECK
    del os.environ[_name]

# No deadline/too_slow checks: other suites run next to this one on a loaded machine.
# Derandomized: the same examples every run, so the suite never fails on an example an earlier
# run did not try (runs of 2,000-4,000 random examples per test found nothing more).
SETTINGS = settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
STAMP = '20260101120000'
STAMP_FORMAT = '%Y%m%d%H%M%S'


# ---- the two launchers, spawning replaced ----------------------------------------------------------
class Topo(NamedTuple):
    numa_cores: list[list[int]]
    physical_cores: int
    usable: frozenset[int]  # the CPUs this process may run on (os.sched_getaffinity)


class Spawn(NamedTuple):
    argv: list[str]
    env: dict[str, str]
    log: str | None  # the per-rank log file (stdout and stderr)


class Outcome(NamedTuple):
    spawns: list[Spawn] | None  # None: refused
    error: BaseException | None
    save_pid: int | None = None  # dslaunch: what run_node hands run_plans (None: not called)


def _stamp(fmt: str, t: Any = None) -> str:
    assert fmt == STAMP_FORMAT, fmt
    return STAMP


class _FakeProcess:
    """A rank that has already exited 0."""

    returncode = 0

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> int:
        return 0

    def wait(self, timeout: float | None = None) -> int:
        return 0


def _no_sleep(seconds: float) -> None:
    pass


def run_deepspeed(argv: list[str], environ: dict[str, str], topo: Topo, cwd: Path, pid_dir: Path) -> Outcome:
    """DeepSpeed's launch.py main() on `argv`; SystemExit (argparse) is returned as the error."""
    spawns: list[Spawn] = []

    def popen(cmd: list[str], env: dict[str, str], stdout: Any = None, stderr: Any = None) -> _FakeProcess:
        log = None
        if stdout is not None:
            assert stderr is stdout
            log = stdout.name
            stdout.close()
        spawns.append(Spawn(list(cmd), dict(env), log))  # launch.py reuses one dict for every rank
        return _FakeProcess(100000 + len(spawns))

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.chdir(cwd)
        mp.setattr(sys, 'argv', ['launch.py', *argv])
        mp.setattr(os, 'environ', dict(environ))
        mp.setattr(ds_launch, 'subprocess', types.SimpleNamespace(Popen=popen))
        fake_signal = types.SimpleNamespace(signal=lambda *a: None, SIGINT=signal.SIGINT, SIGTERM=signal.SIGTERM)
        mp.setattr(ds_launch, 'signal', fake_signal)
        mp.setattr(ds_launch, 'time', types.SimpleNamespace(sleep=_no_sleep, strftime=_stamp, localtime=time.localtime))
        mp.setattr(ds_launch, 'PID_FILE_BASEPATH', str(pid_dir))
        mp.setattr(ds_launch, 'set_log_level_from_string', lambda *a, **k: None)
        mp.setattr(ds_launch.logger, 'disabled', True)
        mp.setattr(ds_numa, 'check_for_numactl_pkg', lambda: True)  # would run dpkg/rpm
        mp.setattr(ds_numa, 'get_numa_cores', lambda: [list(cpus) for cpus in topo.numa_cores])
        mp.setattr(ds_numa, 'psutil', types.SimpleNamespace(cpu_count=lambda logical=True: topo.physical_cores))
        try:
            ds_launch.main()
        except (Exception, SystemExit) as exc:  # noqa: BLE001 (the oracle's answer is whatever it raised)
            return Outcome(None, exc)
    return Outcome(spawns, None)


def run_dslaunch(argv: list[str], environ: dict[str, str], topo: Topo, cwd: Path) -> Outcome:
    """`python -m dslaunch.launch argv` up to the start of the ranks."""
    recorded: dict[str, Any] = {}

    def run_plans(plans: list[launch.RankPlan], env: dict[str, str], **kwargs: Any) -> int:
        assert 'plans' not in recorded
        recorded.update(plans=list(plans), env=dict(env), save_pid=kwargs.get('save_pid'))
        return 0

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.chdir(cwd)
        mp.setattr(launch_run, 'run_plans', run_plans)
        mp.setattr(numa, 'SystemTopology', lambda: numa.StaticTopology(topo.numa_cores, topo.physical_cores))
        mp.setattr(launch, 'time', types.SimpleNamespace(strftime=_stamp, localtime=time.localtime))
        mp.setattr(os, 'sched_getaffinity', lambda pid: set(topo.usable))
        try:
            args = launch.parse_args(argv, prog='launch.py')
            status = launch_run.run_node(args, dict(environ))
        except (DslaunchError, SystemExit) as exc:
            return Outcome(None, exc)
    assert status == 0
    if 'plans' not in recorded:  # nothing to start
        return Outcome([], None)
    # run_plans' environment for a rank: the launcher's (less the runner's channel variables) + overrides
    base = {k: v for k, v in recorded['env'].items() if k not in (REPORT_TO_ENV, TOKEN_ENV)}
    spawns = [Spawn(p.argv, {**base, **p.env_overrides}, p.log_name) for p in recorded['plans']]
    return Outcome(spawns, None, recorded['save_pid'])


# ---- the cases -------------------------------------------------------------------------------------
class Case(NamedTuple):
    world: dict[str, list[Any]]
    node_rank: int
    options: list[str]  # launcher options before the script, `--name=value` or `--flag`
    script: str
    user_args: list[str]
    environ: dict[str, str]
    topo: Topo

    def argv(self) -> list[str]:
        return [f'--world_info={ds_runner.encode_world_info(self.world)}', f'--node_rank={self.node_rank}',
                *self.options, self.script, *self.user_args]  # fmt: skip

    def option(self, name: str) -> str | None:
        """The value of `--name=value` (the last one), '' for a bare flag, None when absent."""
        found = None
        for word in self.options:
            key, eq, value = word.partition('=')
            if key == f'--{name}':
                found = value if eq else ''
        return found


LOG_DIRS = ['logs', 'existing', 'existing/', 'new/deep er/dir', 'lögs\tdir', 'afile', 'afile/sub']
LOG_DIR_ROOTS = {d.split('/')[0] for d in LOG_DIRS}  # a script of that name would turn the log dir into a file
ODD = st.characters(blacklist_categories=('Cs',), blacklist_characters='\x00')
odd_text = st.text(ODD, max_size=8)
SLOT_STRINGS = ['GPU-8a3b', 'MIG-1/2', 'é', '0', '']


@st.composite
def topologies(draw: st.DrawFn) -> Topo:
    """A machine: `numactl --hardware`'s CPU lists (plain, flat-mode HBM, fake NUMA, none) and its cores."""
    total = draw(st.integers(1, 12))
    cuts = sorted(draw(st.sets(st.integers(1, total - 1), max_size=3))) if total > 1 else []
    nodes = [list(range(a, b)) for a, b in itertools.pairwise([0, *cuts, total])]
    kind = draw(st.sampled_from(['plain', 'plain', 'hbm', 'fake', 'none']))
    if kind == 'hbm':
        nodes += [[] for _ in nodes]
    elif kind == 'fake':
        nodes = [node for node in nodes for _ in range(draw(st.integers(1, 2)))]
    elif kind == 'none':
        nodes = []
    physical = draw(st.sampled_from([total, max(1, total // 2)]))
    return Topo(nodes, physical, frozenset(range(total)))


def _core_list_text(cores: list[int], ranges: bool) -> str:
    if not ranges:
        return ','.join(map(str, cores))
    ordered = sorted(set(cores))
    pieces = []
    for _, run in itertools.groupby(enumerate(ordered), key=lambda ic: ic[1] - ic[0]):
        run_cores = [c for _, c in run]
        pieces.append(str(run_cores[0]) if len(run_cores) == 1 else f'{run_cores[0]}-{run_cores[-1]}')
    return ','.join(pieces)


@st.composite
def bind_core_lists(draw: st.DrawFn, topo: Topo) -> str | None:
    """None (all physical cores), cores of this machine (unsorted, repeated, ranges) or a bad list."""
    kind = draw(st.sampled_from(['none', 'cores', 'cores', 'bad']))
    if kind == 'none':
        return None
    if kind == 'bad':
        return draw(st.sampled_from(['', 'a', '3-1', '1-', '-1', '0,,1', '0-', ',']))
    cores = draw(st.lists(st.sampled_from(sorted(topo.usable)), min_size=1, max_size=8))
    return _core_list_text(cores, draw(st.booleans()))


slot_lists = st.lists(st.integers(0, 15) | st.sampled_from(SLOT_STRINGS), max_size=5) | st.lists(
    st.integers(0, 15), unique=True, max_size=8
).map(sorted)
host_names = st.sampled_from(['localhost', 'worker-0', 'worker-1', '10.0.0.2', 'h\u00e9', '']) | st.text(
    ODD, max_size=6
)
worlds = st.integers(0, 19).flatmap(
    lambda k: st.just({}) if k == 0 else st.dictionaries(host_names, slot_lists, min_size=1, max_size=4)
)

ENV_NAMES = st.text(st.characters(blacklist_categories=('Cs',), blacklist_characters='=\x00'), min_size=1, max_size=8)
numbers = st.integers(-1, 9).map(str)
INHERITED = {
    'CUDA_VISIBLE_DEVICES': st.sampled_from(['', '0', '0,1', '3,1', '-1', 'GPU-8a3b', 'MIG-1/2']) | odd_text,
    'OMP_NUM_THREADS': st.sampled_from(['1', '8', '', 'x']),
    'RANK': numbers,
    'LOCAL_RANK': numbers,
    'WORLD_SIZE': numbers,
    'LOCAL_SIZE': numbers,
    'CROSS_RANK': numbers,
    'CROSS_SIZE': numbers,
    'MASTER_ADDR': st.sampled_from(['10.1.1.1', '']),
    'MASTER_PORT': st.sampled_from(['1234', '']),
    'HIP_VISIBLE_DEVICES': st.sampled_from(['0', '1,2']),
    'NCCL_DEBUG': st.just('INFO'),
    'NCCL_SOCKET_IFNAME': st.just('eth0'),
    'PATH': st.just('/usr/local/bin:/usr/bin:/bin'),
    'PYTHONPATH': odd_text,
    'PYTORCH_NVML_BASED_CUDA_CHECK': st.just('1'),
}
environments = st.builds(
    lambda known, other, kmp: {**other, **known, **({'KMP_AFFINITY': 'granularity=fine'} if kmp else {})},
    st.fixed_dictionaries({}, optional=INHERITED),
    st.dictionaries(ENV_NAMES, st.text(ODD, max_size=10), max_size=3),
    st.sampled_from([False] * 9 + [True]),
)
scripts = st.one_of(
    st.sampled_from(['train.py', 'pkg.mod', 'a b.py', "it's.py", 'x=1', 'ü.py', 'sub dir/train.py', '$HOME', '.']),
    st.text(st.characters(blacklist_categories=('Cs',), blacklist_characters='\x00/'), min_size=1, max_size=10),
).filter(lambda s: not s.startswith('-') and s.split('/')[0] not in LOG_DIR_ROOTS)
USER_WORDS = ['--local_rank=3', '--', '-h', '--help', '--module', '--node_rank=9', 'a b', '$HOME', "it's", '\n', '']
user_args = st.lists(st.sampled_from(USER_WORDS) | st.text(ODD, max_size=8), max_size=4)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    world = draw(worlds)
    n = len(world)
    node_rank = draw(st.integers(0, n - 1) if n and draw(st.integers(0, 5)) else st.integers(-5, 5))
    topo = draw(topologies())
    options: list[str] = []
    if draw(st.booleans()):
        options.append(f'--master_addr={draw(st.sampled_from(["10.0.0.1", "node-0", ""]) | odd_text)}')
    if draw(st.booleans()):
        options.append(f'--master_port={draw(st.integers(-2, 70000) | st.just(0))}')
    for flag in ('module', 'no_python', 'no_local_rank', 'quiet'):
        if draw(st.integers(0, 3)) == 0:
            options.append(f'--{flag}')
    if draw(st.integers(0, 4)) == 0:
        options.append(f'--save_pid={draw(st.integers(-3, 2**31))}')
    if draw(st.integers(0, 2)) == 0:
        options.append(f'--enable_each_rank_log={draw(st.sampled_from(LOG_DIRS))}')
    if draw(st.integers(0, 2)) == 0:
        options.append('--bind_cores_to_rank')
    cores = draw(bind_core_lists(topo))
    if cores is not None:
        options.append(f'--bind_core_list={cores}')
    if draw(st.integers(0, 4)) == 0:
        options.append(f'--log_level={draw(st.sampled_from(["debug", "error"]))}')
    options = draw(st.permutations(options))
    return Case(world, node_rank, list(options), draw(scripts), draw(user_args), draw(environments), topo)


# ---- what DeepSpeed refuses, and what dslaunch may refuse on its own ------------------------------
def _n_local(case: Case) -> int | None:
    """Slots of this node (None: launch.py's `node_list[node_rank]` fails)."""
    hosts = list(case.world)
    if not -len(hosts) <= case.node_rank < len(hosts):
        return None
    return len(case.world[hosts[case.node_rank]])


def deepspeed_faults(case: Case) -> list[str]:
    """The faults of `case` that make launch.py raise, in the order it meets them."""
    n_local = _n_local(case)
    if n_local is None:
        return ['node_rank']
    faults = []
    if case.option('enable_each_rank_log') in ('afile', 'afile/sub'):
        faults.append('log_dir')
    if n_local and case.option('bind_cores_to_rank') is not None:  # numactl is asked at the first spawn
        bind = case.option('bind_core_list')
        try:
            count = case.topo.physical_cores if bind is None else len(ds_numa.parse_range_list(bind))
        except ValueError:
            count = None
        if 'KMP_AFFINITY' in case.environ:
            faults.append('kmp')
        elif count is None:
            faults.append('core_list')
        elif count < n_local:
            faults.append('few_cores')
    if n_local and case.option('module') is not None and case.option('no_python') is not None:
        faults.append('module_no_python')
    return faults


def documented_refusals(case: Case) -> list[str]:
    """What dslaunch refuses and launch.py does not (docs/compatibility.md, "Per-node launcher")."""
    n_local = _n_local(case)
    extra = []
    if n_local is not None and case.node_rank < 0:
        extra.append('negative_node_rank')  # `--node_rank` outside the world
    if n_local == 0 and case.option('module') is not None and case.option('no_python') is not None:
        extra.append('module_no_python_zero_slots')  # `--no_python` with `--module`
    return extra


EXPECTED_CLASS = {
    'node_rank': WorldInfoError,
    'negative_node_rank': WorldInfoError,
    'log_dir': UsageError,
    'module_no_python': UsageError,
    'module_no_python_zero_slots': UsageError,
    'kmp': CoreBindingError,
    'core_list': CoreBindingError,
    'few_cores': CoreBindingError,
}


@contextlib.contextmanager
def _workdirs(case: Case) -> Iterator[tuple[Path, Path, Path]]:
    """DeepSpeed's working directory, dslaunch's, and the pid-file directory, fresh for each case:
    each holds a file `afile`, a directory `existing` and the script."""
    with tempfile.TemporaryDirectory(prefix='dsl-launch-diff-') as tmp:
        root = Path(tmp)
        dirs = [root / 'deepspeed', root / 'dslaunch']
        for d in dirs:
            (d / 'existing').mkdir(parents=True)
            (d / 'afile').write_text('x')
            script = d / case.script
            if not script.exists():
                script.parent.mkdir(parents=True, exist_ok=True)
                script.write_text('')
        (root / 'pids').mkdir()
        yield dirs[0], dirs[1], root / 'pids'


def check(case: Case) -> None:
    argv = case.argv()
    with _workdirs(case) as (ds_cwd, our_cwd, pid_dir):
        theirs = run_deepspeed(argv, case.environ, case.topo, ds_cwd, pid_dir)
        ours = run_dslaunch(argv, case.environ, case.topo, our_cwd)
        log_dir = case.option('enable_each_rank_log')
        dirs_made = [(d / log_dir).is_dir() for d in (ds_cwd, our_cwd)] if log_dir else None

    if isinstance(theirs.error, SystemExit):  # argparse: the same answer (tests/test_differential_deepspeed_args.py)
        assert isinstance(ours.error, SystemExit) and ours.error.code == theirs.error.code, ours
        return
    faults, extra = deepspeed_faults(case), documented_refusals(case)
    assert (theirs.error is not None) == bool(faults), f'DeepSpeed: {theirs.error!r}; predicted faults {faults}'

    if theirs.error is not None:
        assert ours.error is not None, f'DeepSpeed refuses ({theirs.error!r}); dslaunch plans {ours.spawns!r}'
        assert isinstance(ours.error, DslaunchError), repr(ours.error)
        if len(faults) == 1 and not extra:
            assert isinstance(ours.error, EXPECTED_CLASS[faults[0]]), repr(ours.error)
            text = str(theirs.error)
            if faults[0] == 'node_rank':  # documented: IndexError there, one line naming the range here
                assert 'is out of range' in str(ours.error)
            elif 'invalid literal for int()' not in text:  # documented: 'Bad range' names the part instead
                assert str(ours.error) == text
        return

    if extra:
        assert ours.error is not None, f'documented refusal {extra} not made; dslaunch plans {ours.spawns!r}'
        assert isinstance(ours.error, EXPECTED_CLASS[extra[0]]), repr(ours.error)
        return
    assert ours.error is None, f'DeepSpeed starts {len(theirs.spawns or [])} rank(s); dslaunch: {ours.error!r}'
    assert theirs.spawns is not None and ours.spawns is not None
    assert len(ours.spawns) == len(theirs.spawns)
    for rank, (mine, deepspeeds) in enumerate(zip(ours.spawns, theirs.spawns)):
        assert mine.argv == deepspeeds.argv, f'local process {rank}'
        changed = {k: v for k, v in deepspeeds.env.items() if case.environ.get(k) != v}
        assert {k: mine.env.get(k) for k in changed} == changed, f'local process {rank}'
        assert mine.env == deepspeeds.env, f'local process {rank}'
        assert mine.log == deepspeeds.log, f'local process {rank}'
    if ours.spawns:
        assert ours.save_pid == int(case.option('save_pid') or 0)
    if dirs_made is not None:
        assert dirs_made[1] == dirs_made[0], (
            f'--enable_each_rank_log {log_dir!r}: created (DeepSpeed, dslaunch) = {dirs_made}'
        )


# ---- tests ------------------------------------------------------------------------------------------
def test_oracle_accelerator_sets_cuda_visible_devices() -> None:
    """DeepSpeed's accelerator here is the one whose visible-devices variable dslaunch sets."""
    assert _ACCELERATOR.visible_devices_envs() == ['CUDA_VISIBLE_DEVICES']


TOPO8 = Topo([[0, 1, 2, 3], [4, 5, 6, 7]], 8, frozenset(range(8)))


@SETTINGS
@given(cases())
@example(  # heterogeneous nodes: LOCAL_RANK = RANK % n_local permutes the local ranks
    Case({'a': [0, 1, 2], 'b': [5, 3]}, 1, ['--bind_cores_to_rank'], 'train.py', ['--lr', '0.1'], {}, TOPO8)
)
@example(  # unsorted, non-contiguous and UUID slots; the inherited device/thread variables are replaced
    Case(
        {'h1': [], 'h2': [7, 2, 'GPU-8a3b'], 'h3': [0]},
        1,
        ['--bind_cores_to_rank', '--bind_core_list=6,1-3,0', '--no_local_rank', '--master_port=007'],
        'a b.py',
        ['--', '$HOME', ''],
        {'CUDA_VISIBLE_DEVICES': '0,1', 'OMP_NUM_THREADS': '8', 'RANK': '5', 'OTHER': 'x y'},
        TOPO8,
    )
)
@example(Case({'a': [0], 'b': [1]}, -1, ['--module'], 'pkg.mod', [], {}, TOPO8))  # negative node rank
@example(Case({'a': []}, 0, ['--module', '--no_python'], 'x', [], {}, TOPO8))  # zero-slot node
@example(Case({'a': [0, 1]}, 0, ['--enable_each_rank_log=new/deep er/dir'], 'train.py', [], {}, TOPO8))
@example(Case({'a': []}, 0, ['--enable_each_rank_log=afile'], 'train.py', [], {}, TOPO8))
@example(Case({'a': [0, 1]}, 0, ['--bind_cores_to_rank'], 't.py', [], {'KMP_AFFINITY': 'x'}, TOPO8))
def test_ranks_match_deepspeed(case: Case) -> None:
    check(case)


@pytest.mark.parametrize('log_dir', ['afile', 'afile/sub', 'new logs'])
def test_zero_slot_node_checks_and_makes_the_rank_log_dir(log_dir: str) -> None:
    """launch.py handles `--enable_each_rank_log` before it looks at the local slots: on a node with
    none it still refuses a file (exit 1) and still creates the directory."""
    case = Case({'a': [0], 'b': []}, 1, [f'--enable_each_rank_log={log_dir}'], 'train.py', [], {}, TOPO8)
    with _workdirs(case) as (ds_cwd, our_cwd, pid_dir):
        theirs = run_deepspeed(case.argv(), {}, TOPO8, ds_cwd, pid_dir)
        ours = run_dslaunch(case.argv(), {}, TOPO8, our_cwd)
        made = [(d / log_dir).is_dir() for d in (ds_cwd, our_cwd)]
    if log_dir.startswith('afile'):
        assert isinstance(theirs.error, ValueError)
        assert isinstance(ours.error, UsageError), f'DeepSpeed: {theirs.error!r}; dslaunch: {ours!r}'
        assert str(ours.error) == str(theirs.error)
    else:
        assert theirs == Outcome([], None) and ours.error is None
        assert made == [True, True]


def test_existing_pid_file_is_refused_by_both(tmp_path: Path) -> None:
    """launch.py asserts that `/tmp/<save_pid>.deepspeed` does not exist; dslaunch refuses it too, as a
    `UsageError` before anything starts (docs/compatibility.md, "--save_pid file")."""
    case = Case({'a': [0]}, 0, ['--save_pid=4242'], 'train.py', [], {}, TOPO8)
    with _workdirs(case) as (ds_cwd, _, pid_dir):
        (pid_dir / '4242.deepspeed').write_text('1')
        theirs = run_deepspeed(case.argv(), {}, TOPO8, ds_cwd, pid_dir)
    assert isinstance(theirs.error, AssertionError)
    (tmp_path / '4242.deepspeed').write_text('1')
    with pytest.raises(UsageError, match='exists'):
        launch_run.PidFile(4242, directory=str(tmp_path)).__enter__()
    assert (tmp_path / '4242.deepspeed').read_text() == '1'


def test_save_pid_file_holds_the_launcher_pid(tmp_path: Path) -> None:
    """Both write the launcher's own pid to `<dir>/<save_pid>.deepspeed` (dslaunch removes it after)."""
    case = Case({'a': [0]}, 0, ['--save_pid=77'], 'train.py', [], {}, TOPO8)
    with _workdirs(case) as (ds_cwd, _, pid_dir):
        theirs = run_deepspeed(case.argv(), {}, TOPO8, ds_cwd, pid_dir)
        assert theirs.error is None
        deepspeeds = (pid_dir / '77.deepspeed').read_text()
    with contextlib.redirect_stdout(io.StringIO()) as out, launch_run.PidFile(77, directory=str(tmp_path)) as pid:
        assert pid.path == str(tmp_path / '77.deepspeed')
        assert (tmp_path / '77.deepspeed').read_text() == deepspeeds == str(os.getpid())
    assert out.getvalue() == f'launcher pid: {os.getpid()}\n'
    assert not (tmp_path / '77.deepspeed').exists()
