"""Differential tests of the torchrun / torch.distributed.launch front end (`dslaunch.torch_launch`),
with torch itself as the oracle at test time. Nothing is launched: both sides stop at what they
would start.

* Argument parsing: `torch.distributed.run.get_args_parser()` (and `torch.distributed.launch`'s
  parser, which adds `--use-env`) against `torch_launch.build_parser()` on generated command lines:
  both spellings, `=` and space forms, prefix abbreviations, repeated options, `--`, script
  arguments that look like options, values that look like options, and the `PET_<DEST>`
  environment defaults. Same command lines rejected, same values kept.
* What a launch is made of: torch's `LaunchConfig`, command and arguments, taken from
  `torch.distributed.run.run` (or `torch.distributed.launch.launch`) with `elastic_launch`
  replaced by a recorder, so torch's own rewrites (`--standalone`, a one-node job with nothing
  naming the rendezvous) apply; its rendezvous endpoint as torch's rendezvous handlers read it.
  Against them, what `dslaunch --dry_run` plans (the workers' argv and environment, or the
  `ElasticConfig` of an elastic line) and the pure helpers it uses (`std_streams`,
  `prefix_template`, `grace_of`, `parse_rank_selection`).

Where a comparison leaves a case out, the comment names the line of docs/compatibility.md
("`torch.distributed.launch` / `torchrun` front end") that documents the difference.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import socket
import sys
import tempfile
from collections.abc import Iterator, Sequence
from string import Template
from typing import Any
from unittest import mock

import pytest

torch = pytest.importorskip('torch', reason="torch's own launchers are the oracle here")
pytest.importorskip('hypothesis')

import torch.distributed.launch as torch_dist_launch
import torch.distributed.run as torchrun
from dslaunch import torch_launch
from dslaunch.errors import DslaunchError, UsageError
from dslaunch.launch_run import parse_rank_selection
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.distributed.elastic.multiprocessing import Std
from torch.distributed.elastic.multiprocessing.api import to_map
from torch.distributed.elastic.rendezvous import (
    RendezvousParameters,
    dynamic_rendezvous,
    static_tcp_rendezvous,
)
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import DEFAULT_PORT as C10D_PORT
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint
from torch.distributed.elastic.utils import macros

# Derandomized: the same examples every run, so the suite never fails on an example an earlier
# run did not try (runs of 2,000-4,000 random examples per test found nothing more).
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

REJECTED = 'rejected'
UUID = re.compile(r'[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}')

#: Variables that change what either launcher derives: every comparison starts without them.
DERIVING_VARS = (
    'OMP_NUM_THREADS',
    'TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE',
    'PYTHON_EXEC',
    'TORCH_ELASTIC_SHUTDOWN_TIMEOUT',
    'CUDA_VISIBLE_DEVICES',
    'HIP_VISIBLE_DEVICES',
)


@contextlib.contextmanager
def environment(extra: dict[str, str] | None = None) -> Iterator[None]:
    """os.environ without PET_* and DERIVING_VARS, plus `extra`; restored afterwards (both parsers
    read PET_* when they are built, torch's config_from_args writes OMP_NUM_THREADS)."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith('PET_') or name in DERIVING_VARS:
            del os.environ[name]
    os.environ.update(extra or {})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No output, no log records (torch's launcher logs its warnings on every call)."""
    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(before)


# --------------------------------------------------------------------------------------------
# The two parsers


def torch_args(argv: Sequence[str], *, launch: bool) -> argparse.Namespace | str:
    """torch's namespace for `argv`: torch.distributed.launch's parser when `launch`, else
    torchrun's; REJECTED when it refuses the line."""
    try:
        with quiet():
            return (torch_dist_launch.parse_args if launch else torchrun.parse_args)(list(argv))
    except SystemExit:
        return REJECTED
    except ValueError:  # a PET_ flag that is not an integer: raised while the parser is built
        return REJECTED


def dslaunch_words(argv: Sequence[str], *, launch: bool) -> list[str]:
    """`argv` as dslaunch's front end gets it: `dslaunch-torchrun` (torchrun) adds `--use-env`."""
    return list(argv) if launch else ['--use-env', *argv]


def dslaunch_args(argv: Sequence[str], *, launch: bool) -> argparse.Namespace | str:
    try:
        with quiet():
            return torch_launch.build_parser().parse_args(dslaunch_words(argv, launch=launch))
    except (SystemExit, UsageError):
        return REJECTED


def _torch_actions() -> dict[str, argparse.Action]:
    """torchrun's options by dest (torch.distributed.launch's parser is this one plus `--use-env`)."""
    return {a.dest: a for a in torchrun.get_args_parser()._actions}


def _dslaunch_actions() -> dict[str, argparse.Action]:
    return {a.dest: a for a in torch_launch.build_parser()._actions}


#: torchrun options this front end refuses, documented: "`--logs-specs`, `--numa-binding` |
#: supported | this front end's argparse error (exit 2)".
DOCUMENTED_REFUSED = frozenset({'logs_specs', 'numa_binding'})


def shared_dests() -> list[str]:
    """torchrun's options that dslaunch's parser has too, by dest (no -h, no positionals)."""
    both = _torch_actions().keys() & _dslaunch_actions().keys()
    return sorted(d for d in both if d not in ('help', 'training_script', 'training_script_args'))


#: torch.distributed.launch's own option, on top of torchrun's.
USE_ENV = ('--use-env', '--use_env')


def meaning(torch_ns: argparse.Namespace, ds_ns: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shared options' values, on the same footing: an option dslaunch leaves at None (it has
    nothing to tune with it) reads as torch's default, a string as torch's type makes it, and
    `--nnodes` as the (min, max) torch makes of it (its default is `1:1`, dslaunch's `1`)."""
    actions = _torch_actions()
    ours: dict[str, Any] = {}
    theirs: dict[str, Any] = {}
    for dest in shared_dests():
        t, d = getattr(torch_ns, dest), getattr(ds_ns, dest)
        if d is None:
            d = actions[dest].default
        if isinstance(d, str) and actions[dest].type not in (None, str):
            d = actions[dest].type(d)
        if dest == 'nnodes':
            t, d = _nodes(t), _nodes(d)
        theirs[dest], ours[dest] = t, d
    theirs['use_env'], ours['use_env'] = torchrun.get_use_env(torch_ns), ds_ns.use_env
    for ns, out in ((torch_ns, theirs), (ds_ns, ours)):
        out['training_script'] = ns.training_script
        out['training_script_args'] = list(ns.training_script_args)
    return theirs, ours


def _nodes(spec: str) -> object:
    try:
        return torchrun.parse_min_max_nnodes(spec)
    except (ValueError, RuntimeError):
        return spec


# --------------------------------------------------------------------------------------------
# What each side would launch


def torch_plan(argv: Sequence[str], *, launch: bool, environ: dict[str, str] | None = None) -> dict[str, Any] | str:
    """torch's LaunchConfig (`config`), entrypoint and arguments for `argv`, what OMP_NUM_THREADS
    its workers get, and its rendezvous endpoint as its handlers read it (`endpoint`: host, port);
    REJECTED when torch refuses the line before a worker starts."""
    with environment(environ):
        args = torch_args(argv, launch=launch)
        if args == REJECTED:
            return REJECTED
        seen: dict[str, Any] = {}

        class Recorder:
            def __init__(self, config: Any, entrypoint: Any) -> None:
                seen['config'], seen['entrypoint'] = config, entrypoint

            def __call__(self, *cmd_args: str) -> None:
                seen['args'] = list(cmd_args)

        with (
            tempfile.TemporaryDirectory() as tmp,
            mock.patch.object(tempfile, 'tempdir', tmp),
            mock.patch.object(torchrun, 'elastic_launch', Recorder),
            mock.patch.object(torch.multiprocessing, '_set_thread_name', lambda name: None),
            quiet(),
        ):
            try:
                (torch_dist_launch.launch if launch else torchrun.run)(args)
            except (ValueError, AssertionError, RuntimeError, TypeError):
                return REJECTED
        seen['omp'] = os.environ.get('OMP_NUM_THREADS')
        try:
            seen['endpoint'] = torch_endpoint(seen['config'])
        except ValueError:
            return REJECTED
        return seen


def torch_endpoint(config: Any) -> tuple[str, int]:
    """Where torch's rendezvous handler meets: the static handler's master address and port (its
    own checks: a port is needed), or the c10d backend's host and port (29400 by default)."""
    if config.rdzv_backend == 'static':
        params = RendezvousParameters(
            backend=config.rdzv_backend,
            endpoint=config.rdzv_endpoint,
            run_id=config.run_id,
            min_nodes=config.min_nodes,
            max_nodes=config.max_nodes,
            local_addr=config.local_addr,
            **config.rdzv_configs,
        )
        handler = static_tcp_rendezvous.create_rdzv_handler(params)
        return handler.master_addr, handler.master_port
    return parse_rendezvous_endpoint(config.rdzv_endpoint, C10D_PORT)


def torch_worker_argv(plan: dict[str, Any], local_rank: int) -> list[str]:
    """A worker's command line as torch's agent makes it (its `${local_rank}` macro applied to
    the arguments); a `--run-path` entrypoint (a function) is kept as the function."""
    return [plan['entrypoint'], *macros.substitute(list(plan['args']), str(local_rank))]


def dslaunch_plan(argv: Sequence[str], *, launch: bool, environ: dict[str, str] | None = None) -> dict[str, Any] | str:
    """What `dslaunch --dry_run` plans for `argv`: the arguments after its rewrites (`args`), the
    worker plans (`plans`) and, for an elastic line, the ElasticConfig (`cfg`); REJECTED when it
    refuses the line."""
    seen: dict[str, Any] = {'cfg': None}
    real_plans, real_cfg = torch_launch._worker_plans, torch_launch.elastic_config

    def plans(args: argparse.Namespace, run_id: str) -> Any:
        seen['args'], seen['plans'] = args, real_plans(args, run_id)
        return seen['plans']

    def cfg(args: argparse.Namespace, free_port: Any) -> Any:
        seen['cfg'] = real_cfg(args, free_port)
        return seen['cfg']

    with (
        environment(environ),
        mock.patch.object(torch_launch, '_worker_plans', plans),
        mock.patch.object(torch_launch, 'elastic_config', cfg),
        quiet(),
    ):
        try:
            rc = torch_launch.main(['--dry_run', *dslaunch_words(argv, launch=launch)])
        except (SystemExit, DslaunchError):
            return REJECTED
        assert rc == 0
        seen['environ'] = dict(os.environ)
    return seen


# --------------------------------------------------------------------------------------------
# Parsing

_TEXT = st.text(st.sampled_from(list('ab01:,=-_ $.{}\u0663')), max_size=6)
_INTS = st.one_of(
    st.integers(-3, 70000).map(str), st.sampled_from(['x', '', ' 4', '1_0', '\u0663', '0x1', '+2', '2.0'])
)
_STREAMS = st.one_of(st.sampled_from(['0', '3', '0:3,1:2', '9', '1:1']), _TEXT)
VALUES = {
    'nnodes': st.one_of(st.sampled_from(['1', '2', '1:1', '1:2', '2:2', '0', '2:1', 'x', ' 3', '1:2:3', '-1']), _TEXT),
    'nproc_per_node': st.one_of(st.sampled_from(['1', '2', 'auto', 'cpu', 'gpu', '0', '-2', 'x', '1_0']), _TEXT),
    'rdzv_backend': st.sampled_from(['static', 'c10d', 'etcd', 'etcd-v2', '']),
    'rdzv_endpoint': st.one_of(st.sampled_from(['localhost:29400', 'node0', '[::1]:5000', 'h:']), _TEXT),
    'rdzv_conf': st.one_of(st.sampled_from(['join_timeout=5', 'a=1,b=2', ',', '"k=v"']), _TEXT),
    'max_restarts': _INTS,
    'node_rank': _INTS,
    'master_port': _INTS,
    'shutdown_timeout': _INTS,
    # torch types these two (a float, a choice) and dslaunch does not: "`--monitor-interval`,
    # `--start-method`, ... | accepted and ignored". Only values torch takes are generated.
    'monitor_interval': st.sampled_from(['0.5', '1', '1e-2', ' 2', 'inf', '-1']),
    'start_method': st.sampled_from(['spawn', 'fork', 'forkserver']),
    'redirects': _STREAMS,
    'tee': _STREAMS,
    'signals_to_handle': st.sampled_from(['SIGTERM,SIGUSR1', 'SIGUSR2', '']),
}
_FLAG_ENV = st.sampled_from(['0', '1', '2', ' 1', '-1', '', 'yes'])
_SCRIPT_WORDS = st.sampled_from(
    [
        '--nproc-per-node',
        '4',
        '--',
        '-m',
        '--standalone',
        '${local_rank}',
        'x',
        '--use-env',
        '--dry_run',
        '--raw_output',
        '-r',
        '--nnodes=2',
        '-h',
    ]
)


TORCH_OPTIONS = _torch_actions()  # for their spellings, arity and type only: defaults are read where PET_* is set


TORCH_SPELLINGS = frozenset(s for a in TORCH_OPTIONS.values() for s in a.option_strings) | frozenset(USE_ENV)


def _spellings(dest: str) -> list[str]:
    return list(USE_ENV) if dest == 'use_env' else TORCH_OPTIONS[dest].option_strings


def _is_flag(dest: str) -> bool:
    return dest == 'use_env' or TORCH_OPTIONS[dest].nargs == 0


@st.composite
def option_words(draw: st.DrawFn, dest: str) -> list[str]:
    """One option in any of its spellings, sometimes abbreviated, its value (if any) as the next
    word, after `=`, or (short options) attached."""
    spelling = draw(st.sampled_from(_spellings(dest)))
    if spelling.startswith('--') and draw(st.integers(0, 4)) == 0:
        spelling = spelling[: draw(st.integers(4, len(spelling)))]
    if _is_flag(dest):
        return [spelling + '=1'] if draw(st.integers(0, 9)) == 0 else [spelling]
    value = draw(VALUES.get(dest, _TEXT))
    forms = ['space', 'eq'] + (['attached'] if not spelling.startswith('--') else [])
    form = draw(st.sampled_from(forms))
    return {'space': [spelling, value], 'eq': [f'{spelling}={value}'], 'attached': [spelling + value]}[form]


#: torchrun's options whose default is read from PET_<DEST> (some dslaunch does not have, whose
#: variable then changes torch's namespace only), and one that is not read from it (--numa-binding).
ENV_DESTS = sorted(d for d, a in TORCH_OPTIONS.items() if isinstance(a, (torchrun.env, torchrun.check_env))) + [
    'numa_binding',
    'use_env',
]


@st.composite
def command_lines(draw: st.DrawFn) -> tuple[list[str], dict[str, str], bool]:
    """(argv, PET_* environment, torch.distributed.launch rather than torchrun)."""
    launch = draw(st.booleans())
    dests = shared_dests() + (['use_env'] if launch else [])
    argv: list[str] = []
    for dest in draw(st.lists(st.sampled_from(dests), max_size=6)):
        argv += draw(option_words(dest))
    if draw(st.booleans()):
        argv.append('--')
    argv.append(draw(st.sampled_from(['train.py', 'pkg.mod', '/abs/t.py', '$x.py'])))
    argv += draw(st.lists(_SCRIPT_WORDS, max_size=4))
    env = {}
    for dest in draw(st.lists(st.sampled_from(ENV_DESTS), max_size=3)):
        env[f'PET_{dest.upper()}'] = draw(_FLAG_ENV if _is_flag(dest) else VALUES.get(dest, _TEXT))
    return argv, env, launch


@SETTINGS
@given(command_lines())
def test_the_parsers_accept_the_same_lines_and_keep_the_same_values(case: tuple[list[str], dict[str, str], bool]):
    argv, env, launch = case
    with environment(env):
        theirs = torch_args(argv, launch=launch)
        ours = dslaunch_args(argv, launch=launch)
        assert (ours == REJECTED) == (theirs == REJECTED), (argv, env, theirs, ours)
        if theirs != REJECTED:
            assert isinstance(theirs, argparse.Namespace) and isinstance(ours, argparse.Namespace)
            torch_values, our_values = meaning(theirs, ours)
            assert our_values == torch_values


#: torchrun spellings DeepSpeed's runner has too. Alone they keep DeepSpeed's meaning (docs: "The
#: spellings DeepSpeed's runner has too (`--master_addr`, `--master_port`, `--node_rank`,
#: `--no_python`, `--module`, `--max_restarts`) keep DeepSpeed's meaning when no torch-only option
#: comes with them").
DEEPSPEED_SPELLINGS = frozenset(
    {'--master_addr', '--master_port', '--node_rank', '--no_python', '--module', '--max_restarts'}
)


def test_every_torchrun_option_is_the_front_ends_or_a_documented_refusal():
    """Each option string of torch's launchers is one of this front end's, for the same option
    (dest) and arity, unless the compatibility table lists it as refused."""
    ours = {s: a for a in torch_launch.build_parser()._actions for s in a.option_strings}
    unknown = []
    for dest, action in TORCH_OPTIONS.items():
        for spelling in action.option_strings:
            if dest == 'help':
                continue
            if dest in DOCUMENTED_REFUSED:
                assert spelling not in ours
            elif spelling not in ours:
                unknown.append(spelling)
            else:
                assert (ours[spelling].dest, ours[spelling].nargs == 0) == (dest, action.nargs == 0), spelling
    for spelling in USE_ENV:
        assert ours[spelling].dest == 'use_env' and ours[spelling].nargs == 0
    assert unknown == []


def test_each_torchrun_option_alone_selects_the_torch_front_end():
    """docs: the front end is picked when "one of them (... every option of torch 2.15's torchrun,
    the ones this front end refuses included) comes before the script, in either spelling": in
    every form argparse takes it (`--opt V`, `--opt=V`, `-rV`), torch.distributed.launch's
    `--use-env` too, and not only after another torch option."""
    missed = []
    for dest, action in [*TORCH_OPTIONS.items(), ('use_env', None)]:
        for spelling in _spellings(dest) if dest != 'help' else []:
            if spelling in DEEPSPEED_SPELLINGS:
                continue
            forms = [[spelling]] if _is_flag(dest) else [[spelling, '3'], [f'{spelling}=3']]
            if not spelling.startswith('--') and not _is_flag(dest):
                forms.append([spelling + '3'])
            missed += [words for words in forms if not torch_launch.wants_torch_cli([*words, 'train.py'])]
    assert missed == []


# --------------------------------------------------------------------------------------------
# The world and the rendezvous


def spelled(draw: st.DrawFn, options: dict[str, str | bool | None]) -> list[str]:
    """`{spelling: value}` as command-line words, in a drawn order, each option in a drawn spelling
    (`--a-b` or `--a_b`) and form (`--opt V` or `--opt=V`); None and False are left out."""
    words: list[str] = []
    for name in draw(st.permutations(sorted(options))):
        value = options[name]
        if value is None or value is False:
            continue
        spelling = draw(st.sampled_from([name, '--' + name[2:].replace('-', '_')]))
        if spelling not in TORCH_SPELLINGS:
            spelling = name
        if value is True:
            words.append(spelling)
        else:
            words += draw(st.sampled_from([[spelling, str(value)], [f'{spelling}={value}']]))
    return words


#: `--nproc-per-node` values that count devices, compared where torch sees no accelerator (with
#: one, torch may have read CUDA_VISIBLE_DEVICES before `environment()` cleared it).
DEVICE_COUNTS = ['auto', 'gpu', 'xpu'] if not torch.cuda.is_available() else []

ENDPOINTS = ['node1:4321', 'node1', '[::1]:5000', '127.0.0.1:29401', 'node1:65535', 'node1:65536', 'node1:x']


@st.composite
def world_lines(draw: st.DrawFn) -> list[str]:
    """Command lines about the nodes, the workers per node and the rendezvous. Left out, each a
    documented difference: `--node-rank` not below `--nnodes` and `--master-port 0` ("`--node-rank`
    not below `--nnodes`; `--nproc-per-node 0` ... | hangs, or a traceback | one error line",
    "`--master-port 0` | a literal 0 reaches the workers | a free port"); the etcd backends, which
    elastic lines here refuse (they run the c10d rendezvous; tests/test_torch_launch.py) and one-node
    lines run as `--standalone`; `--standalone` with more than one node is a torch quirk not
    copied (a local c10d store on a free port that no other node can reach: torch waits for nodes
    that cannot come; dslaunch runs the one node)."""
    nnodes = draw(st.sampled_from(['1', '2', '1:1', '1:2', '2:3', '3']))
    low, high = torchrun.parse_min_max_nnodes(nnodes)
    backend = draw(st.sampled_from([None, 'static', 'c10d']))
    endpoint = draw(st.none() | st.sampled_from(ENDPOINTS))
    restarts = draw(st.sampled_from([None, 0, 1, 3]))
    standalone = high == 1 and draw(st.booleans())
    if backend == 'c10d' and high == 1 and not restarts:
        # documented: "`--rdzv-backend c10d` | ... | on one node with a fixed `--nnodes 1` and no
        # restarts, the same as `--standalone`": the endpoint is not read, so not checked either
        assume(endpoint not in ('node1:65536', 'node1:x'))
    if endpoint == 'node1' and backend in (None, 'static') and (low != high or restarts):
        assume(False)  # test_a_static_endpoint_without_a_port_is_refused_on_elastic_lines_too
    return spelled(
        draw,
        {
            '--nnodes': nnodes if nnodes != '1' or draw(st.booleans()) else None,
            # without a GPU `gpu` and `xpu` are refused by both and `auto` counts the CPUs
            '--nproc-per-node': draw(st.sampled_from([None, '1', '2', '3', 'cpu', *DEVICE_COUNTS])),
            '--node-rank': draw(st.none() | st.integers(0, high - 1)),
            '--master-addr': draw(st.sampled_from([None, '127.0.0.1', 'node0', 'localhost', '10.1.2.3'])),
            '--master-port': draw(st.sampled_from([None, 1234, 29501, 65535])),
            '--rdzv-backend': backend,
            '--rdzv-endpoint': endpoint,
            '--rdzv-id': draw(st.sampled_from([None, 'job7', 'team/exp 1'])),
            '--standalone': standalone,
            '--max-restarts': restarts,
        },
    ) + ['train.py']


def _endpoint_of(ours: dict[str, Any]) -> tuple[str, int]:
    if ours['cfg'] is not None:
        host, _, port = ours['cfg'].endpoint.rpartition(':')
        return host, int(port)
    env = ours['plans'][0].env_overrides
    return env['MASTER_ADDR'], int(env['MASTER_PORT'])


@SETTINGS
@given(world_lines(), st.booleans())
def test_nodes_workers_and_rendezvous_as_torch_derives_them(argv: list[str], launch: bool):
    theirs = torch_plan(argv, launch=launch)
    ours = dslaunch_plan(argv, launch=launch)
    assert (ours == REJECTED) == (theirs == REJECTED), (theirs, ours)
    if theirs == REJECTED:
        return
    assert isinstance(theirs, dict) and isinstance(ours, dict)
    config, plans, cfg = theirs['config'], ours['plans'], ours['cfg']
    assert len(plans) == config.nproc_per_node
    if cfg is not None:
        assert (cfg.min_nodes, cfg.max_nodes, cfg.max_restarts) == (
            config.min_nodes,
            config.max_nodes,
            config.max_restarts,
        )
        run_id = cfg.run_id
    else:
        env = plans[0].env_overrides
        assert (int(env['GROUP_WORLD_SIZE']),) * 2 == (config.min_nodes, config.max_nodes)
        assert config.max_restarts == 0 and env['TORCHELASTIC_MAX_RESTARTS'] == '0'
        assert {p.env_overrides['TORCHELASTIC_RUN_ID'] for p in plans} == {env['TORCHELASTIC_RUN_ID']}
        run_id = env['TORCHELASTIC_RUN_ID']
    if UUID.fullmatch(config.run_id):  # a fresh one: --standalone, or torch's local c10d rendezvous
        assert UUID.fullmatch(run_id)
    else:
        assert run_id == config.run_id
    host, port = _endpoint_of(ours)
    if config.rdzv_endpoint == 'localhost:0' or (cfg is None and config.rdzv_backend == 'c10d'):
        # torch's local c10d store on a free port (--standalone, or nothing names the rendezvous),
        # or c10d on one node, which dslaunch runs as --standalone (documented). Documented: "one
        # node, no `--master-addr` | `MASTER_ADDR=localhost` | `127.0.0.1`" and "`--master-addr`
        # without `--master-port` | the address is ignored | used" (the workers' MASTER_ADDR).
        parsed = dslaunch_args(argv, launch=launch)
        assert isinstance(parsed, argparse.Namespace)
        named = cfg is None and parsed.rdzv_backend == 'static' and not parsed.standalone
        assert host == (parsed.master_addr if named else '127.0.0.1')
        assert 0 < port < 65536
    else:
        assert (host, port) == theirs['endpoint']


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine where torch sees no GPU')
@pytest.mark.parametrize('spec', ['gpu', 'auto'])
def test_nproc_gpu_and_auto_count_the_gpus_that_are_there(spec: str):
    """Without a GPU, a CUDA_VISIBLE_DEVICES left in the environment names devices that are not
    there: torch refuses `--nproc-per-node gpu` and counts the CPUs for `auto`. dslaunch counts
    the variable's entries (here one more than the CPUs, for either); documented: "`gpu` without a
    GPU | hangs, or a traceback | one error line"."""
    argv = ['--nproc-per-node', spec, '--master-port', '29501', 'train.py']
    env = {'CUDA_VISIBLE_DEVICES': ','.join(str(i) for i in range(len(os.sched_getaffinity(0)) + 1))}
    theirs = torch_plan(argv, launch=False, environ=env)
    ours = dslaunch_plan(argv, launch=False, environ=env)
    if theirs == REJECTED:
        assert ours == REJECTED
    else:
        assert isinstance(theirs, dict) and isinstance(ours, dict)
        assert len(ours['plans']) == theirs['config'].nproc_per_node


def test_a_static_endpoint_without_a_port_is_refused_on_elastic_lines_too():
    """torch's static rendezvous handler refuses an `--rdzv-endpoint` without a port. dslaunch
    refuses it on a plain static line (`expected HOST:PORT`), but on an elastic line of the static
    backend (`--max-restarts N`, `--nnodes MIN:MAX`) it meets at `node1:29400`, the c10d default."""
    for extra in ([], ['--max-restarts', '1'], ['--nnodes', '1:2']):
        argv = ['--rdzv-endpoint', 'node1', *extra, 'train.py']
        assert torch_plan(argv, launch=False) == REJECTED, extra
        assert dslaunch_plan(argv, launch=False) == REJECTED, extra


# --------------------------------------------------------------------------------------------
# The workers' command lines

_ARGS = st.sampled_from(
    [
        '--lr',
        '0.1',
        '${local_rank}',
        '$local_rank',
        '$HOME',
        '$$x',
        '--local-rank=${local_rank}',
        '${local_rank}${local_rank}',
        '$',
        '${',
        '--nproc-per-node',
        '-m',
        'x y',
        '',
    ]
)


@st.composite
def worker_lines(draw: st.DrawFn) -> tuple[list[str], dict[str, str], bool]:
    """(argv, environment, torch.distributed.launch rather than torchrun) about what each worker
    runs: -m, --no-python, --run-path, --use-env, PYTHON_EXEC, the script's arguments with the
    `${local_rank}` macro, OMP_NUM_THREADS. Script names without `$`:
    test_the_local_rank_macro_applies_to_the_script_as_under_torch."""
    launch = draw(st.booleans())
    argv = spelled(
        draw,
        {
            '--nproc-per-node': draw(st.sampled_from([None, '1', '2', '3'])),
            '--master-port': 29501,
            '--module': draw(st.booleans()),
            '--no-python': draw(st.booleans()),
            '--run-path': draw(st.booleans()),
            '--use-env': launch and draw(st.booleans()),
        },
    )
    argv = [('-m' if w == '--module' and draw(st.booleans()) else w) for w in argv]
    argv += [draw(st.sampled_from(['train.py', 'pkg.mod', '/abs/t.py', 'tool'])), *draw(st.lists(_ARGS, max_size=5))]
    env = {}
    if draw(st.booleans()):
        env['PYTHON_EXEC'] = '/opt/py/bin/python3'
    omp = draw(st.sampled_from([None, '4', '']))
    if omp is not None:
        env['OMP_NUM_THREADS'] = omp
    return argv, env, launch


@SETTINGS
@given(worker_lines())
def test_worker_command_lines_and_omp_threads_as_torch_makes_them(case: tuple[list[str], dict[str, str], bool]):
    argv, env, launch = case
    theirs = torch_plan(argv, launch=launch, environ=env)
    ours = dslaunch_plan(argv, launch=launch, environ=env)
    assert (ours == REJECTED) == (theirs == REJECTED), (theirs, ours)
    if theirs == REJECTED:
        return
    assert isinstance(theirs, dict) and isinstance(ours, dict)
    python = env.get('PYTHON_EXEC', sys.executable)
    assert len(ours['plans']) == theirs['config'].nproc_per_node
    for plan in ours['plans']:
        expected = torch_worker_argv(theirs, plan.local_rank)
        if callable(expected[0]):
            # documented: "`--run-path` | each worker runs the script with `runpy.run_path` (Python
            # even with `--no-python`, `-m` ignored) | each worker is `python -u script`"
            expected = [python, '-u', *expected[1:]]
        assert plan.argv == expected
        assert plan.env_overrides.get('OMP_NUM_THREADS', ours['environ'].get('OMP_NUM_THREADS')) == theirs['omp']


@pytest.mark.parametrize('flags', [[], ['-m'], ['--no-python']], ids=['script', 'module', 'no-python'])
def test_the_local_rank_macro_applies_to_the_script_as_under_torch(flags: list[str]):
    """torch's agent applies `${local_rank}` (and `$$`) to every argument after the interpreter,
    the script or module name included: `torchrun 'run_${local_rank}.py'` runs run_0.py, run_1.py.
    With --no-python the script is the program itself, which torch leaves as it is."""
    argv = ['--nproc-per-node', '2', '--master-port', '29501', *flags, 'run_${local_rank}$$.py', 'a$$b']
    theirs = torch_plan(argv, launch=False)
    ours = dslaunch_plan(argv, launch=False)
    assert isinstance(theirs, dict) and isinstance(ours, dict)
    assert [p.argv for p in ours['plans']] == [torch_worker_argv(theirs, r) for r in (0, 1)]


# --------------------------------------------------------------------------------------------
# Role, console and log streams, signals, shutdown

STREAM_SPECS = ['0', '1', '2', '3', '0:3', '1:2', '0:1,1:2', '2:3', '0:0']


@st.composite
def option_lines(draw: st.DrawFn) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) with torchrun's options about the workers' role, console, logs,
    signals and shutdown, on a static or an elastic (`--max-restarts 1`) line."""
    argv = spelled(
        draw,
        {
            '--nproc-per-node': draw(st.sampled_from(['1', '2', '3'])),
            '--master-port': 29501,
            '--max-restarts': draw(st.sampled_from([None, 1])),
            '--role': draw(st.sampled_from([None, 'trainer', 'a b', '', '{tag}'])),
            '--redirects': draw(st.none() | st.sampled_from(STREAM_SPECS)),
            '--tee': draw(st.none() | st.sampled_from(STREAM_SPECS)),
            '--local-ranks-filter': draw(st.sampled_from([None, '0', '1', '0,2', ''])),
            '--log-line-prefix-template': draw(
                st.sampled_from(
                    [
                        None,
                        '${rank}|',
                        '[${role_name}${local_rank}@${hostname}]:',
                        '$x ${local_rank}',
                        '',
                        '{rank}|${rank}}{{|',
                    ]
                )
            ),
            '--signals-to-handle': draw(st.sampled_from([None, 'SIGTERM,SIGUSR1', 'SIGUSR2'])),
            '--shutdown-timeout': draw(st.sampled_from([None, 0, 5])),
            '--duplicate-stdout-filters': draw(st.sampled_from([None, 'loss', 'a,,b,c', '', ','])),
            '--local-addr': draw(st.sampled_from([None, '10.0.0.1'])),
            '--virtual-local-rank': draw(st.booleans()),
            '--log-dir': draw(st.sampled_from([None, os.devnull])),  # a directory torch would make: none
        },
    ) + ['train.py']
    env = {}
    if draw(st.booleans()):
        env['TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE'] = '${role_name}:${rank}> '
    if draw(st.booleans()):
        env['TORCH_ELASTIC_SHUTDOWN_TIMEOUT'] = '7'
    return argv, env


def _std(value: Any, nproc: int) -> list[int]:
    """torch's --redirects/--tee value (a Std or a map) per local rank, as 0-3."""
    got = to_map(value, nproc)
    return [int(got[r]) for r in range(nproc)]


def render_core_prefix(template: str, *, rank: int, tag: int) -> str:
    """A prefix template as the core renders it: `{rank}` and `{tag}` placeholders, `{{`/`}}` one brace."""
    parts = {'{rank}': str(rank), '{tag}': str(tag), '{{': '{', '}}': '}'}
    return re.sub(r'\{rank\}|\{tag\}|\{\{|\}\}', lambda m: parts[m.group()], template)


def expected_prefix(config: Any, tee: list[int], rank: int, local_rank: int) -> str | None:
    """The console prefix torch gives a worker's tee'd lines: its template with the macros
    rendered, else `[<role><local rank>]:`; None when torch tees nothing, where dslaunch keeps its
    own `[R]: ` (documented: "console lines | ... | line-atomic, `[R]: ` prefix; with `--tee`,
    torch's prefix on the tee'd streams and the others bare, as torch; with a template and no
    `--tee`, the template on every line (torch ignores it there)")."""
    template = config.log_line_prefix_template
    if template:
        return Template(template).safe_substitute(
            role_name=config.role, rank=rank, local_rank=local_rank, hostname=socket.gethostname()
        )
    return f'[{config.role}{local_rank}]:' if any(tee) else None


@SETTINGS
@given(option_lines())
def test_role_streams_console_signals_and_shutdown_as_torch_derives_them(case: tuple[list[str], dict[str, str]]):
    argv, env = case
    theirs = torch_plan(argv, launch=False, environ=env)
    ours = dslaunch_plan(argv, launch=False, environ=env)
    assert isinstance(theirs, dict) and isinstance(ours, dict)
    config, args, plans, environ = theirs['config'], ours['args'], ours['plans'], ours['environ']
    nproc = config.nproc_per_node
    assert args.role == config.role
    assert args.duplicate_stdout_filters == config.duplicate_stdout_filters
    assert args.signals_to_handle == config.signals_to_handle
    assert torch_launch.grace_of(args, environ) == config.shutdown_timeout
    assert (ours['cfg'].local_addr if ours['cfg'] else args.local_addr) == config.local_addr
    assert args.virtual_local_rank == config.virtual_local_rank
    logs = config.logs_specs
    assert args.log_dir == logs._root_log_dir or (
        args.log_dir is None and os.path.basename(logs._root_log_dir).startswith('torchelastic_')
    )
    redirects, tee = _std(logs._redirects, nproc), _std(logs._tee, nproc)
    assert torch_launch.std_streams(args.redirects, nproc, '--redirects') == redirects
    assert torch_launch.std_streams(args.tee, nproc, '--tee') == tee
    assert parse_rank_selection(args.local_ranks_filter) == logs._local_ranks_filter
    if ours['cfg'] is not None:
        return  # an elastic worker's RANK comes from each rendezvous round
    for plan in plans:
        env_of = plan.env_overrides
        assert (env_of['ROLE_NAME'], env_of['TORCHELASTIC_SIGNALS_TO_HANDLE']) == (
            config.role,
            config.signals_to_handle,
        )
        assert env_of['LOCAL_RANK'] == ('0' if config.virtual_local_rank else str(plan.local_rank))
        ours_prefix = torch_launch.prefix_template(args, environ, tee_used=any(tee))
        if ours_prefix is not None:  # as the core renders it: `{rank}` the index on this node, `{tag}` the rank
            ours_prefix = render_core_prefix(ours_prefix, rank=plan.local_rank, tag=plan.rank)
        assert ours_prefix == expected_prefix(config, tee, plan.rank, plan.local_rank)


def test_a_tee_that_tees_no_worker_keeps_the_default_prefix():
    """`--tee 1:3` with one worker (or `--tee 0:0`) tees nothing: torch shows the worker's lines
    as they are. dslaunch should keep its own `[R]: ` prefix (or show them bare, as torch), not
    take the tee'd streams' `[<role><local rank>]:`."""
    for tee in ('1:3', '0:0'):
        ours = dslaunch_plan(
            ['--nproc-per-node', '1', '--master-port', '29501', '--tee', tee, 'train.py'], launch=False
        )
        assert isinstance(ours, dict)
        (plan,) = ours['plans']
        tee_used = any(torch_launch.std_streams(tee, 1, '--tee'))
        assert (
            plan.bare is True or torch_launch.prefix_template(ours['args'], ours['environ'], tee_used=tee_used) is None
        )
        assert plan.console is True


#: What dslaunch reads in a --redirects/--tee value beyond torch's grammar (one digit 0-3, or
#: `<one digit>:<0-3>,...`): spaces around the parts (harmless; not in the compatibility table), and
#: local ranks of more than one digit (documented: "a bad value is one error line where torch raises
#: a traceback; local ranks of more than one digit may be named").
STREAMS_EXTENDED = re.compile(r'\s*[0-3]\s*|\s*\d+\s*:\s*[0-3]\s*(,\s*\d+\s*:\s*[0-3]\s*)*')


@SETTINGS
@given(
    st.text(st.sampled_from(list('0123459:, \n\u0663x')), max_size=8) | st.sampled_from(STREAM_SPECS), st.integers(1, 4)
)
def test_redirects_and_tee_values_as_torch_reads_them(spec: str, nproc: int):
    """Per local rank, the same streams; a value torch refuses is refused (a UsageError, one line)
    unless it is in dslaunch's documented extension."""
    try:
        theirs: list[int] | str = _std(Std.from_str(spec), nproc)
    except ValueError:
        theirs = REJECTED
    try:
        ours: list[int] | str = torch_launch.std_streams(spec, nproc, '--tee')
    except UsageError:
        ours = REJECTED
    if theirs != REJECTED:
        assert ours == theirs
    elif ours != REJECTED:
        assert STREAMS_EXTENDED.fullmatch(spec), spec


@pytest.mark.parametrize('spec', ['\u00b2:3', '0:3,\u00b9:1'])
def test_a_stream_value_with_a_superscript_digit_is_one_error_line(spec: str):
    """`²` is a digit to str.isdigit() but not to int(): torch refuses the value (its grammar
    wants decimal digits), dslaunch must too, with its one-line UsageError, not a ValueError
    traceback."""
    with pytest.raises(ValueError):
        Std.from_str(spec)
    with pytest.raises(UsageError):
        torch_launch.std_streams(spec, 2, '--redirects')


@settings(SETTINGS, max_examples=80)
@given(st.text(st.sampled_from(list('0123,- +_x\u0663')), max_size=6))
def test_local_ranks_filter_as_torch_reads_it(spec: str):
    """The same local ranks shown. dslaunch reads the filter with its `--console_ranks` grammar,
    which adds ranges (`0-2`) and `none`; torch takes a signed number (`-1` names no worker, `-0`
    is 0), which dslaunch reads as a range and refuses (a torch quirk not copied)."""
    theirs = torch_plan(['--local-ranks-filter', spec, '--master-port', '29501', 'train.py'], launch=False)
    try:
        ours: set[int] | None | str = parse_rank_selection(spec)
    except UsageError:
        ours = REJECTED
    if theirs != REJECTED and ours != REJECTED:
        assert isinstance(theirs, dict)
        assert ours == theirs['config'].logs_specs._local_ranks_filter
    elif theirs != REJECTED:
        assert any(part.strip().startswith('-') for part in spec.split(',')), spec
    elif ours != REJECTED:
        assert '-' in spec or spec.strip().lower() == 'none', spec


# --------------------------------------------------------------------------------------------
# --rdzv-conf of an elastic line

#: The --rdzv-conf keys torch 2.15's c10d rendezvous reads: its handler's (dynamic_rendezvous.
#: create_handler) and its backend's (c10d_rendezvous_backend.create_backend).
TORCH_C10D_KEYS = frozenset(
    {
        'join_timeout',
        'last_call_timeout',
        'close_timeout',
        'heartbeat_timeout',
        'keep_alive_interval',
        'keep_alive_max_attempt',
        'cas_backoff_max_seconds',
        'is_host',
        'read_timeout',
        'store_type',
    }
)


def torch_c10d_reads(conf: dict[str, Any]) -> tuple[Any, ...] | str:
    """What torch's c10d rendezvous makes of these options: its handler's settings (built on a
    stand-in store, nothing is reached) and the backend's `is_host` and `read_timeout`; REJECTED
    when torch refuses them. The etcd key `timeout` is not read."""
    conf = {k: v for k, v in conf.items() if k != 'timeout'}
    params = RendezvousParameters(
        backend='c10d', endpoint='localhost:29400', run_id='r', min_nodes=1, max_nodes=2, **conf
    )
    try:
        with quiet():
            handler = dynamic_rendezvous.create_handler(mock.Mock(), mock.Mock(), params)
        backend_reads = params.get_as_bool('is_host'), params.get_as_int('read_timeout', 60)
    except (ValueError, TypeError):
        return REJECTED
    s = handler._settings
    timeout = s.timeout
    return (
        timeout.join,
        timeout.last_call,
        timeout.close,
        timeout.heartbeat,
        s.keep_alive_interval,
        s.keep_alive_max_attempt,
        s.cas_backoff_max_seconds,
        *backend_reads,
    )


RDZV_ITEMS = [
    'join_timeout=5',
    'last_call_timeout=1',
    'close_timeout=3',
    'heartbeat_timeout=4',
    'keep_alive_interval=2',
    'keep_alive_max_attempt=2',
    'read_timeout= 7 ',
    ' is_host = true',
    'is_host=no',
    'is_host=Y',
    'is_host=0',
    'timeout=30',
    'timeout=',
    'join_timeout=0',
    'join_timeout=-3',
    'join_timeout=x',
    'keep_alive_interval=1.5',
    'bogus=1',
    'join_timeout=',
    '=3',
    'last_call_timeout',
    '',
]


@SETTINGS
@given(
    st.lists(st.sampled_from(RDZV_ITEMS), min_size=1, max_size=4, unique_by=lambda i: i.partition('=')[0].strip()).map(
        ','.join
    ),
    st.sampled_from([[], ['--nnodes', '1:2']]),
)
def test_rdzv_conf_of_an_elastic_line_as_torchs_c10d_rendezvous_reads_it(conf: str, nodes: list[str]):
    """dslaunch checks --rdzv-conf before anything starts and hands it to torch's c10d
    rendezvous: what it hands over must read as torch reads the option itself. Documented: "the
    etcd key `timeout` ... ignored in elastic jobs too, other keys c10d does not know are one error
    line". Beyond torch, dslaunch skips items without a key (`a=1,`, `=3`, which torch refuses).
    Each key once: dslaunch checks every item, torch only the last of a repeated key."""
    argv = ['--max-restarts', '1', *nodes, '--rdzv-conf', conf, 'train.py']
    theirs = torch_plan(argv, launch=False)
    if theirs != REJECTED:
        assert isinstance(theirs, dict)
        theirs = torch_c10d_reads(theirs['config'].rdzv_configs)
    ours = dslaunch_plan(argv, launch=False)
    if ours == REJECTED:
        assert theirs == REJECTED or any(
            item.partition('=')[0].strip() not in TORCH_C10D_KEYS for item in conf.split(',')
        ), conf
        return
    assert isinstance(ours, dict)
    handed_over = torch_c10d_reads(ours['cfg'].rdzv_conf)
    assert handed_over != REJECTED, ours['cfg'].rdzv_conf
    if theirs == REJECTED:  # only when what torch refuses is an item without a key or the etcd key `timeout`
        kept = ','.join(i for i in conf.split(',') if i.partition('=')[0].strip() not in ('', 'timeout'))
        theirs = torch_plan(['--max-restarts', '1', *nodes, '--rdzv-conf', kept, 'train.py'], launch=False)
        assert isinstance(theirs, dict), conf
        theirs = torch_c10d_reads(theirs['config'].rdzv_configs)
    assert handed_over == theirs


@pytest.mark.parametrize(
    'item', ['is_host=t', 'is_host=F', 'is_host=on', 'is_host=off', 'store_type=tcp', 'cas_backoff_max_seconds=0.5']
)
def test_rdzv_conf_values_torchs_c10d_rendezvous_takes_are_taken_and_only_those(item: str):
    """A --rdzv-conf item is refused before anything starts exactly when torch's c10d rendezvous
    refuses it: torch's booleans are 1/true/t/yes/y and 0/false/f/no/n (any case), so `is_host=t`
    works under torchrun, and `is_host=on` is a ValueError traceback from inside torch once
    dslaunch has let it through; `store_type=tcp` and `cas_backoff_max_seconds` are c10d keys
    (documented: only "keys c10d does not know are one error line")."""
    argv = ['--max-restarts', '1', '--rdzv-conf', item, 'train.py']
    theirs = torch_plan(argv, launch=False)
    assert isinstance(theirs, dict)
    torch_takes_it = torch_c10d_reads(theirs['config'].rdzv_configs) != REJECTED
    ours = dslaunch_plan(argv, launch=False)
    assert (ours != REJECTED) == torch_takes_it
    if isinstance(ours, dict):
        assert torch_c10d_reads(ours['cfg'].rdzv_conf) == torch_c10d_reads(theirs['config'].rdzv_configs)
