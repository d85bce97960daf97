"""Backend command lines against DeepSpeed 0.19.8's (``runner_cmd_cases.json`` and the multi-node
cases of ``runner_main_cases.json``).

Each test first checks that the vector has the DeepSpeed shape the spec describes, then turns that
DeepSpeed command into the dslaunch one by the substitutions listed in
``docs/compatibility-backends.md`` and asserts equality word for word. The first word is the
backend's binary: dslaunch resolves its own (``/usr/bin/mpirun.openmpi`` where DeepSpeed says
``mpirun``), so it is checked separately.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dslaunch.backends import LAUNCHERS, PDSHRunner, deepspeed_quote, make_runner
from dslaunch.errors import DslaunchError, LauncherError
from golden import available, case_id, load, ordered

pytestmark = pytest.mark.skipif(not available(), reason='golden vectors (../shared/spec/golden) not found')

CMD = (
    load('runner_cmd_cases.json')
    if available()
    else {'cases': [], 'pdsh_user_arg_quoting': [], 'add_export_quoting': []}
)
MAIN = load('runner_main_cases.json')['cases'] if available() else []
MAIN_MULTI = [c for c in MAIN if 'cmd' in c and c['cmd'][0] != '<PYTHON>']

PY = sys.executable
DS_HELPER = '<DS_LAUNCHER_DIR>/launcher_helper.py'
DS_MVAPICH_HOSTFILE = '/tmp/deepspeed_mvapich_hostfile'
# First words dslaunch may use for each backend (basename), besides an unresolved plain name.
BINARIES = {
    'pdsh': {'pdsh'},
    'openmpi': {'mpirun', 'mpirun.openmpi'},
    'mpich': {'mpirun', 'mpirun.mpich', 'mpiexec.mpich'},
    'impi': {'mpirun'},
    'mvapich': {'mpirun'},
    'slurm': {'srun'},
}
EXPORT_PREFIXES = ('MLFLOW', 'PYTHON', 'MV2', 'UCX', 'NCCL')  # DeepSpeed's list + the CUDA accelerator's


# ---- DeepSpeed facts, written from the spec ------------------------------------------------------
def ds_parser() -> argparse.ArgumentParser:
    """The ``deepspeed`` argument parser of 0.19.8 (spec section 2.1)."""
    p = argparse.ArgumentParser(prog='deepspeed', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('-H', '--hostfile', type=str, default='/job/hostfile')
    p.add_argument('-i', '--include', type=str, default='')
    p.add_argument('-e', '--exclude', type=str, default='')
    p.add_argument('--num_nodes', type=int, default=-1)
    p.add_argument('--num_gpus', '--num_accelerators', type=int, default=-1, dest='num_gpus')
    p.add_argument('--master_port', type=int, default=29500)
    p.add_argument('--master_addr', type=str, default='')
    p.add_argument('--node_rank', type=int, default=-1)
    p.add_argument('--launcher', type=str, default='pdsh')
    p.add_argument('--launcher_args', type=str, default='')
    for flag in (
        '--module',
        '--no_python',
        '--no_local_rank',
        '--no_ssh',
        '--no_ssh_check',
        '--force_multi',
        '--save_pid',
    ):
        p.add_argument(flag, action='store_true')
    p.add_argument('--enable_each_rank_log', type=str, default='None')
    p.add_argument('--autotuning', type=str, default='', choices=['tune', 'run'])
    p.add_argument('user_script', type=str)
    p.add_argument('user_args', nargs=argparse.REMAINDER)
    p.add_argument('--bind_cores_to_rank', action='store_true')
    p.add_argument('--bind_core_list', type=str, default=None)
    p.add_argument('--ssh_port', type=int, default=None)
    p.add_argument('--venv_script', type=str, default=None)
    p.add_argument('--log_level', type=str, default='info', choices=['debug', 'info', 'warning', 'error', 'critical'])
    p.add_argument('-q', '--quiet', action='store_true')
    return p


def parse_hostfile(text: str) -> dict[str, int]:
    pool: dict[str, int] = {}
    for line in text.splitlines():
        m = re.search(r'^(\S+)\s+slots=(\d+)', line.strip())
        if m:
            pool[m.group(1)] = int(m.group(2))
    return pool


def _node_config(spec: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for piece in spec.split('@'):
        host, _, slots = piece.partition(':')
        out.setdefault(host, []).extend(int(x) for x in slots.split(',')) if slots else out.setdefault(host, [])
    return {h: sorted(set(s)) for h, s in out.items()}


def ds_active(pool: dict[str, int], args: argparse.Namespace) -> dict[str, list[int]]:
    """DeepSpeed 0.19.7+ filtering (spec 5.2-5.4), for valid filters only."""
    active = {h: list(range(n)) for h, n in pool.items()}
    if args.include:
        keep = _node_config(args.include)
        active = {h: (keep[h] or s) for h, s in active.items() if h in keep}
    elif args.exclude:
        drop = _node_config(args.exclude)
        active = {
            h: ([] if h in drop and not drop[h] else [x for x in s if x not in drop.get(h, [])])
            for h, s in active.items()
        }
        active = {h: s for h, s in active.items() if s}
    if args.num_nodes > 0:
        active = dict(list(active.items())[: args.num_nodes])
    if args.num_gpus > 0:
        active = {h: list(range(args.num_gpus)) for h in active}
    return active


def encode_world_info(active: dict[str, list[int]]) -> str:
    return base64.urlsafe_b64encode(json.dumps(active).encode()).decode()


def ds_pdsh_user_arg(arg: str) -> str:
    """DeepSpeed's PDSH user-arg rule: only args with a space are wrapped, inner ``"`` escaped."""
    return '"{}"'.format(arg.replace('"', '\\"')) if ' ' in arg else arg


def ds_python_exec(args: argparse.Namespace) -> list[str]:
    if args.no_python:
        return []
    return [PY, '-u'] + (['-m'] if args.module else [])


# ---- the dslaunch rules (docs/compatibility-backends.md) -----------------------------------------
def pq(word: str) -> str:
    """A word for pdsh + the remote shell: shell-quoted, ``%`` doubled for pdsh."""
    return shlex.quote(word).replace('%', '%%')


def helper(name: str, args: argparse.Namespace, extra: list[str] | None = None) -> list[str]:
    flags = ['--launcher', name] + (['--module'] if args.module else []) + (['--no_python'] if args.no_python else [])
    return [PY, '-u', '-m', 'dslaunch.launcher_helper', *flags, *(extra or []), args.user_script, *args.user_args]


def master(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [('MASTER_ADDR', str(args.master_addr)), ('MASTER_PORT', str(args.master_port))]


def pairs(flag: str, items, joined: bool) -> list[str]:
    out: list[str] = []
    for k, v in items:
        out += [flag, f'{k}={v}'] if joined else [flag, k, v]
    return out


def sub(word: str, cwd: str) -> str:
    return word.replace('<PYTHON>', PY).replace('<CWD>', cwd).replace('<PID>', str(os.getpid()))


class World:
    """One scenario: parsed args, pool, active hosts, raw exports in order, the DeepSpeed command."""

    def __init__(self, name: str, args, pool, active, raw: dict[str, str], ds_cmd: list[str] | None, cwd: str):
        self.name, self.args, self.pool, self.active, self.raw, self.cwd = name, args, pool, active, raw, cwd
        self.stored = {k: deepspeed_quote(v) for k, v in raw.items()}  # what DeepSpeed put on its command line
        self.ds = [sub(w, cwd) for w in ds_cmd] if ds_cmd else None
        self.total = sum(len(s) for s in active.values())
        self.la = shlex.split(args.launcher_args)


# ---- DeepSpeed command -> dslaunch command, per backend ------------------------------------------
def expect_pdsh(w: World) -> list[str]:
    ds, args = w.ds, w.args
    p = 6 + len(w.la)
    assert ds[1:p] == ['-S', '-f', '1024', '-w', ','.join(w.active), *w.la]
    i, venv = p, []
    if args.venv_script is not None:
        assert ds[i] == f'source {args.venv_script};'
        venv, i = [f'source {pq(args.venv_script)};'], i + 1
    assert ds[i] == ''.join(f'export {k}={v}; ' for k, v in w.stored.items())
    assert ds[i + 1] == f'cd {w.cwd};'
    launch, tail = ds[i + 2 : len(ds) - 1 - len(args.user_args)], ds[len(ds) - 1 - len(args.user_args) :]
    assert tail == [args.user_script] + [ds_pdsh_user_arg(a) for a in args.user_args]
    assert launch[:4] == [PY, '-u', '-m', 'deepspeed.launcher.launch'] and launch[5] == '--node_rank=%n'
    assert launch[-1].startswith('--enable_each_rank_log=') or not args.enable_each_rank_log
    launch[3] = 'dslaunch.launch'
    forwarded = (
        (['--bind_cores_to_rank'] if args.bind_cores_to_rank else [])
        + ([f'--bind_core_list={args.bind_core_list}'] if args.bind_core_list is not None else [])
        + (['--quiet'] if args.quiet else [])
        + [f'--log_level={args.log_level}']
    )
    exports = ''.join(f'export {k}={pq(v)}; ' for k, v in w.raw.items())
    return (
        ds[1:p]
        + venv
        + [exports, f'cd {pq(w.cwd)};']
        + [x if x == '--node_rank=%n' else pq(x) for x in launch]
        + [pq(x) for x in forwarded]
        + [pq(args.user_script)]
        + [pq(a) for a in args.user_args]
    )


def ds_openmpi_shape(w: World) -> list[str]:
    """DeepSpeed's OpenMPI command (spec 9.2), for scenarios where DeepSpeed refused to build one."""
    sets_if = any(a in ('-mca', '--mca') and b == 'btl_tcp_if_include' for a, b in zip(w.la, w.la[1:]))
    return (
        ['mpirun', '-n', str(sum(w.pool.values())), '-hostfile', w.args.hostfile, '--mca', 'btl', '^openib']
        + ([] if sets_if else ['--mca', 'btl_tcp_if_include', 'eth0'])
        + w.la
        + pairs('-x', w.stored.items(), True)
        + ds_python_exec(w.args)
        + [w.args.user_script, *w.args.user_args]
    )


def expect_openmpi(w: World, cmd: list[str]) -> list[str]:
    ds = w.ds or ds_openmpi_shape(w)
    i0 = ds.index('-x')
    head = ds[1:i0]
    assert head[:2] == ['-n', str(sum(w.pool.values()))]  # DeepSpeed: the unfiltered pool
    assert ds[i0 : i0 + 2 * len(w.stored)] == pairs('-x', w.stored.items(), True)
    assert ds[i0 + 2 * len(w.stored) :] == ds_python_exec(w.args) + [w.args.user_script, *w.args.user_args]
    head[1] = str(w.total)
    counts = {h: len(s) for h, s in w.active.items()}
    if counts != w.pool or list(counts) != list(w.pool):  # filtered: a per-job hostfile of the kept slots
        assert cmd[4] != w.args.hostfile and Path(cmd[4]).read_text() == ''.join(
            f'{h} slots={n}\n' for h, n in counts.items() if n
        )
        head[3] = cmd[4]
    noprefix = ['--noprefix'] if os.path.isabs(cmd[0]) else []  # deviation: no implied --prefix
    return head + pairs('-x', [*w.raw.items(), *master(w.args)], True) + noprefix + helper('openmpi', w.args)


def expect_mpich(w: World) -> list[str]:
    ds, args = w.ds, w.args
    i0 = 5 + len(w.la)
    j = i0 + 2 * len(w.stored)
    assert ds[i0:j] == pairs('-genv', w.stored.items(), True)
    fixed = ds[j : j + 12]
    assert fixed[1::3] == ['MASTER_ADDR', 'MASTER_PORT', 'WORLD_SIZE', 'LOCAL_SIZE']
    assert ds[j + 12] == '-hosts'
    ds_helper = (
        ([PY, '-u'] + (['-m'] if args.module else []) if not args.no_python else [])
        + [DS_HELPER, '--launcher', args.launcher]
        + (['--module'] if args.module and not args.no_python else [])
        + (['--no_python'] if args.no_python else [])
        + [args.user_script, *args.user_args]
    )
    assert ds[j + 14 :] == ds_helper
    # Deviation: DeepSpeed's `-genv K=<quoted>` becomes `-genv K <raw>`; the helper is a module.
    return ds[1:i0] + pairs('-genv', w.raw.items(), False) + fixed + ds[j + 12 : j + 14] + helper('mpich', args)


def expect_impi(w: World) -> list[str]:
    ds, args = w.ds, w.args
    i0 = 3 + len(w.la)
    j = i0 + 3 * len(w.stored)
    assert ds[i0:j] == pairs('-genv', w.stored.items(), False)
    if args.bind_cores_to_rank:  # DeepSpeed computes OMP_NUM_THREADS here; the helper does it per node
        assert ds[j : j + 2] == ['-genv', 'OMP_NUM_THREADS']
        j += 3
    fixed = ds[j : j + 15]
    assert fixed[1::3] == ['MASTER_ADDR', 'MASTER_PORT', 'WORLD_SIZE', 'LOCAL_SIZE', 'I_MPI_PIN']
    hosts = ds[j + 15 : j + 17]
    assert hosts[0] == '-hosts'
    ppn = int(ds[2])
    segments = ' '.join(ds[j + 17 :]).split(' : ')  # DeepSpeed: one MPMD segment per rank
    assert len(segments) == w.total
    for rank, seg in enumerate(segments):
        assert seg.startswith(f'-n 1 -env RANK {rank} -env LOCAL_RANK {rank % ppn} ')
    bind = (
        ['--bind_cores_to_rank']
        + ([f'--bind_core_list={args.bind_core_list}'] if args.bind_core_list is not None else [])
        if args.bind_cores_to_rank
        else []
    )
    return (
        ds[1:i0]
        + pairs('-genv', w.raw.items(), False)
        + fixed
        + hosts
        + ['-n', str(w.total)]
        + helper('impi', args, bind)
    )


def expect_mvapich(w: World, cmd: list[str], content: str) -> list[str]:
    ds, args = w.ds, w.args
    assert ds[5:7] == ['--hostfile', DS_MVAPICH_HOSTFILE]
    i0 = 7 + len(w.la)
    j = i0 + 2 * len(w.stored)
    assert ds[i0:j] == pairs('-env', w.stored.items(), True)
    assert ds[j:] == ds_python_exec(args) + [args.user_script, *args.user_args]
    path = cmd[6]  # deviation: a per-job temp file, not the fixed path
    assert path != DS_MVAPICH_HOSTFILE and os.path.basename(path).startswith('dslaunch_mvapich_hostfile_')
    assert Path(path).read_text() == content
    return ds[1:6] + [path] + ds[7:i0] + pairs('-env', [*w.raw.items(), *master(args)], True) + helper('mvapich', args)


def expect_slurm(w: World) -> list[str]:
    ds, args = w.ds, w.args
    ie = next(i for i, x in enumerate(ds) if x.startswith('--export='))
    assert ds[ie] == '--export=ALL' + ''.join(f',{k}={v}' for k, v in w.stored.items())
    assert ds[ie + 1 :] == [PY, '-u', args.user_script, *args.user_args]  # DeepSpeed ignores --module/--no_python
    assert ds[1:3] == ['-n', str(w.total)]
    return ds[1:ie] + ['--export=ALL'] + helper('slurm', args)


def expected_env(w: World, env_in: dict[str, str], ds_env_out: dict[str, str] | None) -> dict[str, str]:
    out = dict(ds_env_out if ds_env_out is not None else env_in)
    if w.name == 'pdsh' and w.args.ssh_port is not None:
        old = env_in.get('PDSH_SSH_ARGS_APPEND', '')
        assert out['PDSH_SSH_ARGS_APPEND'] == f'{old} ' + ' ' * 12 + f'-p {w.args.ssh_port}'  # DeepSpeed's spacing
        out['PDSH_SSH_ARGS_APPEND'] = ' '.join(x for x in (old.strip(), f'-p {w.args.ssh_port}') if x)
    if w.name == 'slurm':  # deviation: exports travel in srun's environment
        out.update(w.raw)
        out.update(master(w.args))
        out.setdefault('SLURM_KILL_BAD_EXIT', '1')  # deviation: a failing task stops the step (srun -K)
    return out


def check_first_word(name: str, runner, cmd: list[str], env: dict[str, str]) -> None:
    assert cmd[0] == runner.backend_binary(env.get('PATH'))
    assert os.path.basename(cmd[0]) in BINARIES[name]
    assert os.path.isabs(cmd[0]) or cmd[0] == ('srun' if name == 'slurm' else 'pdsh' if name == 'pdsh' else 'mpirun')


def assert_backend(
    w: World,
    runner,
    cmd: list[str],
    env: dict[str, str],
    env_in: dict[str, str],
    ds_env_out: dict[str, str] | None,
    case: dict[str, Any],
) -> None:
    check_first_word(w.name, runner, cmd, env)
    if w.name == 'pdsh':
        expected = expect_pdsh(w)
    elif w.name == 'openmpi':
        expected = expect_openmpi(w, cmd)
    elif w.name == 'mpich':
        expected = expect_mpich(w)
    elif w.name == 'impi':
        expected = expect_impi(w)
    elif w.name == 'mvapich':
        content = case.get('mvapich_hostfile_written', {}).get('content', ''.join(f'{h}\n' for h in w.active))
        expected = expect_mvapich(w, cmd, content)
    else:
        expected = expect_slurm(w)
    assert cmd[1:] == expected
    want_env = expected_env(w, env_in, ds_env_out)
    if w.name == 'impi' and env.get('PATH') != want_env.get('PATH'):  # Intel's dir put first on PATH
        assert env['PATH'] == f'{os.path.dirname(cmd[0])}{os.pathsep}{want_env["PATH"]}'
        want_env['PATH'] = env['PATH']
    assert env == want_env


# ---- runner_cmd_cases.json: cases ----------------------------------------------------------------
def raw_exports(case: dict[str, Any]) -> dict[str, str]:
    """DeepSpeed's exports in its order, with raw values: a key added again keeps its first position."""
    last = {k.strip(): v for k, v in case['exports_added_in_order']}
    return {k: last.get(k, v) for k, v in case['exports_after_add'].items()}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv('DS_ACCELERATOR', raising=False)
    return str(tmp_path)


@pytest.mark.parametrize('case', CMD['cases'], ids=case_id)
def test_runner_cmd_case(case, in_tmp, capsys):
    Path('hostfile').write_text(case['hostfile'])
    if 'argparse_exit' in case:  # an argparse fact, not a backend one: the flag value looks like an option
        with pytest.raises(SystemExit) as exc:
            ds_parser().parse_args(case['runner_argv'])
        assert exc.value.code == case['argparse_exit']['code']
        assert capsys.readouterr().err.strip().splitlines()[-1] == case['argparse_exit']['stderr_last_line']
        return
    args = ds_parser().parse_args(case['runner_argv'])
    pool, active = parse_hostfile(case['hostfile']), ordered(case['active_resources'])
    env_in = dict(case['environment_in'])
    env = dict(env_in)
    name = case['runner']
    if 'exports_after_add' in case:
        raw = raw_exports(case)
    else:
        raw = {'UCX_TLS': 'tcp'} if name == 'openmpi' else {}
        for k, v in case['exports_added_in_order']:
            raw[k.strip()] = v
    w = World(name, args, pool, active, raw, case.get('cmd'), in_tmp)

    def build():
        runner = make_runner(name, args, case['world_info'], pool)
        runner.validate_active_resources(active)
        for k, v in case['exports_added_in_order']:
            runner.add_export(k, v)
        return runner, runner.get_cmd(env, active)

    error = case.get('error')
    leading = all(list(s) == list(range(len(s))) for s in active.values())
    if error and name == 'openmpi' and leading:
        # Deviation: OpenMPI runs the filtered world (per-job hostfile) instead of refusing.
        runner, cmd = build()
        assert_backend(w, runner, cmd, env, env_in, None, case)
        runner.cleanup()
        assert not os.path.exists(cmd[4]) or cmd[4] == args.hostfile
        return
    if error:
        with pytest.raises(ValueError) as exc:
            build()
        assert isinstance(exc.value, DslaunchError)  # one-line CLI error, not a traceback
        if name == 'openmpi':
            assert str(exc.value).startswith('openmpi backend cannot select specific device ids')
        else:
            assert str(exc.value) == error['message']
        return
    runner, cmd = build()
    assert runner.exports == raw  # stored raw; DeepSpeed stores deepspeed_quote(value)
    assert {k: deepspeed_quote(v) for k, v in raw.items()} == case['exports_after_add']
    assert_backend(w, runner, cmd, env, env_in, case.get('environment_out'), case)
    if 'stdout' in case:  # DeepSpeed's IMPI print()s its command; the runner logs it instead
        assert capsys.readouterr().out == ''
    if 'kill_cmd' in case:
        ds_kill = [sub(x, in_tmp) for x in case['kill_cmd']]
        p = 6 + len(w.la)
        assert ds_kill[p] == 'pkill -f ' and len(ds_kill) == p + 2  # DeepSpeed: a pattern that hits other jobs
        with pytest.raises(LauncherError, match='not marked'):  # no args.job_id: nothing could be found
            runner.kill_cmd('job-1')
        args.job_id = 'job-1'  # the marker is the only change to the command
        marked = make_runner(name, args, case['world_info'], pool)
        for k, v in case['exports_added_in_order']:
            marked.add_export(k, v)
        marked_cmd = marked.get_cmd(dict(env_in), active)
        i = p + (1 if args.venv_script is not None else 0)
        assert marked_cmd[:i] + marked_cmd[i + 1 :] == cmd[:i] + cmd[i + 1 :]
        assert marked_cmd[i] == cmd[i] + 'export DSLAUNCH_JOB_ID=job-1; '
        kill = marked.kill_cmd('job-1')
        assert kill[:p] == cmd[:p] and len(kill) == p + 1
        assert 'DSLAUNCH_JOB_ID=job-1' in kill[-1] and 'pkill' not in kill[-1]
    runner.cleanup()


def test_kill_cmd_needs_get_cmd():
    runner = PDSHRunner(ds_parser().parse_args(['train.py']), 'e30=')
    with pytest.raises(LauncherError):
        runner.kill_cmd('job-1')


# ---- runner_main_cases.json: the multi-node launches ---------------------------------------------
def main_exports(case: dict[str, Any], name: str, cwd: str) -> list[tuple[str, str]]:
    """The exports DeepSpeed's main() adds, in order (spec 7.3), with raw values."""
    out: dict[str, str] = {}
    if name == 'openmpi':
        out['UCX_TLS'] = 'tcp'
    if name == 'mvapich':
        out.update(
            {
                'MV2_SMP_USE_CMA': '0',
                'MV2_DEBUG_SHOW_BACKTRACE': '1',
                'MV2_USE_CUDA': '1',
                'MV2_SUPPORT_DL': '1',
                'MV2_ENABLE_AFFINITY': '0',
                'MV2_INTER_ALLGATHER_TUNING': '5',
                'MV2_CUDA_USE_NAIVE': '0',
            }
        )
    pairs_: list[tuple[str, str]] = list(out.items())
    env = dict(case['env_in'])
    env['PYTHONPATH'] = f'{cwd}:{env["PYTHONPATH"]}' if 'PYTHONPATH' in env else cwd  # '' gives '<cwd>:'
    skip = {'NCCL_IB_HCA', 'UCX_NET_DEVICES'} if 'AISC_JOB_NAME' in env else set()
    pairs_ += [(k, v) for k, v in env.items() if k.startswith(EXPORT_PREFIXES) and k not in skip]
    wanted = case['env_in'].get('DS_ENV_FILE', '.deepspeed_env')
    files = {f: t for f, t in (case.get('deepspeed_env_files') or {}).items() if os.path.basename(f) == wanted}
    for fname in sorted(files, key=lambda f: not f.startswith(('~', '<', '/'))):  # home file first, then ./
        for line in files[fname].splitlines(keepends=True):
            k, v = line.split('=', 1)
            pairs_.append((k.strip(), v.strip()))
    return pairs_


@pytest.mark.parametrize('case', MAIN_MULTI, ids=case_id)
def test_runner_main_multinode_cmd(case, in_tmp):
    args = ds_parser().parse_args(case['deepspeed_argv'])
    name = args.launcher = args.launcher.lower()  # main() lowercases it before building the backend
    if not args.master_addr:
        args.master_addr = '10.1.2.3'  # the vectors' patched `ssh <host> hostname -I`
    # --force_multi without a hostfile: DeepSpeed's pool is this machine's devices
    pool = parse_hostfile(case['hostfile']) if case['hostfile'] is not None else {'localhost': case['device_count']}
    active = ds_active(pool, args)
    if 'world_info_decoded' in case:
        assert active == ordered(case['world_info_decoded']) and list(active) == case['world_info_decoded']['order']
    exports = main_exports(case, name, in_tmp)
    runner = make_runner(name, args, encode_world_info(active), pool)
    runner.validate_active_resources(active)
    env_in = dict(case['env_in'])
    env_in['PYTHONPATH'] = case['popen_env_changes']['PYTHONPATH'].replace('<CWD>', in_tmp)
    env = dict(env_in)
    if any(not k.strip() for k, _ in exports):
        # Deviation: a `=value` line gives DeepSpeed an empty name (`export =value;`); refused here
        # (docs/compatibility-backends.md, bad export names)
        with pytest.raises(ValueError, match='not an environment variable name'):
            for k, v in exports:
                runner.add_export(k, v)
        return
    for k, v in exports:
        runner.add_export(k, v)
    raw = dict(runner.exports)
    if any(not re.match(r'[A-Za-z_]\w*\Z', k) for k in raw) and name == 'pdsh':
        # Deviation: `export A=1` in .deepspeed_env gives the name "export A"; DeepSpeed writes
        # `export export A=1;` (it works by accident in bash); we refuse a name the shell cannot export.
        with pytest.raises(ValueError, match='not a valid variable name'):
            runner.get_cmd(env, active)
        return
    cmd = runner.get_cmd(env, active)
    w = World(name, args, pool, active, raw, case['cmd'], in_tmp)
    ds_env_out = {**env_in, **{k: v.replace('<CWD>', in_tmp) for k, v in case['popen_env_changes'].items()}}
    for k in case['popen_env_removed']:
        ds_env_out.pop(k, None)
    assert_backend(w, runner, cmd, env, env_in, ds_env_out, case)
    runner.cleanup()


# ---- runner_cmd_cases.json: pdsh_user_arg_quoting ------------------------------------------------
def _run_words_in_shell(words: list[str], shell: str) -> list[str]:
    dump = 'import json,sys; print(json.dumps(sys.argv[1:]))'
    line = ' '.join([shlex.quote(PY), '-c', shlex.quote(dump), *words]).replace('%%', '%')  # as pdsh would
    out = subprocess.run([shell, '-c', line], capture_output=True, check=True, env={'PATH': os.defpath}).stdout
    return json.loads(out)


@pytest.mark.parametrize('case', CMD['pdsh_user_arg_quoting'], ids=lambda c: repr(c['user_args']))
def test_pdsh_user_arg_quoting(case, in_tmp):
    user_args = case['user_args']
    assert [ds_pdsh_user_arg(a) for a in user_args] == case['pdsh_user_arguments']  # DeepSpeed's rule, as a fact
    args = ds_parser().parse_args(['--master_addr', 'w0', 'train.py', *user_args])
    assert args.user_args == user_args
    cmd = PDSHRunner(args, 'e30=').get_cmd({}, {'w0': [0], 'w1': [0]})
    tail = cmd[len(cmd) - len(user_args) :]
    assert tail == [pq(a) for a in user_args]
    for shell in ('/bin/sh', 'bash'):
        assert _run_words_in_shell(tail, shell) == user_args  # byte for byte, through a real shell
    for name in LAUNCHERS:  # MPI/Slurm: no shell, each argument is one argv word, unchanged
        if name == 'pdsh':
            continue
        runner = make_runner(name, args, 'e30=', {'w0': 1, 'w1': 1})
        cmd = runner.get_cmd({}, {'w0': [0], 'w1': [0]})
        assert cmd[len(cmd) - len(user_args) :] == case['base_runner_user_arguments'] == user_args
        runner.cleanup()


# ---- runner_cmd_cases.json: add_export_quoting ---------------------------------------------------
@pytest.mark.parametrize('case', CMD['add_export_quoting'], ids=lambda c: repr(c['value']))
def test_add_export_quoting(case):
    key = case['key'].strip()
    assert {key: deepspeed_quote(case['value'])} == case['stored']  # the fact; we do not apply it
    args = ds_parser().parse_args(['--master_addr', 'w0', 'train.py'])
    for name in LAUNCHERS:
        runner = make_runner(name, args, 'e30=', {'w0': 1, 'w1': 1})
        runner.add_export(case['key'], case['value'])
        assert runner.exports[key] == case['value']  # raw, unstripped, unquoted
        env: dict[str, str] = {}
        cmd = runner.get_cmd(env, {'w0': [0], 'w1': [0]})
        if name == 'pdsh':
            assert f'export {key}={pq(case["value"])}; ' in cmd[6]
        elif name == 'slurm':
            assert env[key] == case['value']
        elif name in ('mpich', 'impi'):
            assert ['-genv', key, case['value']] == cmd[cmd.index(key) - 1 : cmd.index(key) + 2]
        else:
            assert f'{key}={case["value"]}' in cmd
        runner.cleanup()


def test_unknown_launcher():
    args = ds_parser().parse_args(['train.py'])
    with pytest.raises(LauncherError, match='^Unknown launcher bogus$'):
        make_runner('bogus', args, 'e30=', {})
    assert type(make_runner('PDSH', args, 'e30=', {})) is PDSHRunner
    assert list(LAUNCHERS) == ['pdsh', 'openmpi', 'mvapich', 'slurm', 'mpich', 'impi']


# ---- deviations that the visible vectors reach only partly ---------------------------------------
@pytest.mark.parametrize(
    ('extra', 'hostfile_text'),
    [
        (['--exclude', 'worker-1:1'], 'worker-0 slots=2\nworker-1 slots=1\n'),
        (['--include', 'worker-0@worker-1'], None),  # everything kept: the user's hostfile
        (['--num_nodes', '1'], 'worker-0 slots=2\n'),
        (['--num_gpus', '1'], 'worker-0 slots=1\nworker-1 slots=1\n'),
    ],
)
def test_openmpi_runs_a_filtered_world(extra, hostfile_text, in_tmp):
    Path('hostfile').write_text('worker-0 slots=2\nworker-1 slots=2\n')
    args = ds_parser().parse_args(['--hostfile', 'hostfile', '--launcher', 'openmpi', *extra, 'train.py'])
    pool = parse_hostfile(Path('hostfile').read_text())
    active = ds_active(pool, args)
    runner = make_runner('openmpi', args, encode_world_info(active), pool)
    cmd = runner.get_cmd({}, active)
    assert cmd[1:3] == ['-n', str(sum(len(s) for s in active.values()))]
    if hostfile_text is None:
        assert cmd[4] == 'hostfile'
    else:
        assert Path(cmd[4]).name.startswith('dslaunch_openmpi_hostfile_') and Path(cmd[4]).read_text() == hostfile_text
    runner.cleanup()
    assert hostfile_text is None or not Path(cmd[4]).exists()


def test_openmpi_refuses_device_ids(in_tmp):
    args = ds_parser().parse_args(['--exclude', 'worker-1:0', '--launcher', 'openmpi', 'train.py'])
    with pytest.raises(
        ValueError, match=r'^openmpi backend cannot select specific device ids, got \[1\] on worker-1\.'
    ):
        LAUNCHERS['openmpi'].validate_active_resources({'worker-0': [0, 1], 'worker-1': [1]})
    runner = make_runner('openmpi', args, 'e30=', {'worker-0': 2, 'worker-1': 2})
    with pytest.raises(DslaunchError):
        runner.get_cmd({}, {'worker-0': [0, 1], 'worker-1': [1]})


def test_mvapich_hostfiles_are_per_job(in_tmp):
    args = ds_parser().parse_args(['--launcher', 'mvapich', 'train.py'])
    active = {'worker-0': [0, 1], 'worker-1': [0, 1]}
    a, b = (make_runner('mvapich', args, 'e30=', {'worker-0': 2, 'worker-1': 2}) for _ in range(2))
    path_a, path_b = a.get_cmd({}, active)[6], b.get_cmd({}, active)[6]
    assert path_a != path_b and path_a != DS_MVAPICH_HOSTFILE
    assert Path(path_a).read_text() == Path(path_b).read_text() == 'worker-0\nworker-1\n'
    a.cleanup()
    b.cleanup()
    assert not Path(path_a).exists() and not Path(path_b).exists()


def test_mvapich_use_cuda_follows_ds_accelerator(in_tmp, monkeypatch):
    args = ds_parser().parse_args(['--launcher', 'mvapich', 'train.py'])
    assert 'MV2_USE_CUDA' in make_runner('mvapich', args, 'e30=', {}).exports
    monkeypatch.setenv('DS_ACCELERATOR', 'cpu')
    assert 'MV2_USE_CUDA' not in make_runner('mvapich', args, 'e30=', {}).exports


def test_validate_active_resources_by_name():
    from dslaunch.backends import validate_active_resources

    validate_active_resources('PDSH', {'a': [1]})  # pdsh picks device ids through world_info
    with pytest.raises(ValueError, match='same slot count'):
        validate_active_resources('slurm', {'a': [0, 1], 'b': [0]})
    with pytest.raises(LauncherError, match='^Unknown launcher nope$'):
        validate_active_resources('nope', {})
