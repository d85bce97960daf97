"""Elastic training for the per-node launcher (``--enable_elastic_training``), as DeepSpeed <= 0.19.7.

One per-node launcher is one elastic *agent*. The agents of a job meet at a
``torch.distributed.elastic`` c10d rendezvous on ``--master_addr:--master_port`` (run id
``$ELASTIC_RUN_ID``, default DeepSpeed's ``123456789``), between ``--min_elastic_nodes`` and
``--max_elastic_nodes`` of them. Each completed rendezvous round gives this node its group rank and
its ranks' global ranks; the agent then starts the node's ranks, watches them, and on a rank failure
(up to ``--max_restarts`` times) or when nodes wait to join, stops them and goes to the next round.

torch's rendezvous, rank assignment and restart loop are used as they are
(``SimpleElasticAgent``); what differs from ``LocalElasticAgent`` is who owns the processes: every
round's ranks are one ``dslaunch._core.Supervisor`` job, so they get the same rank-prefixed,
line-atomic output, fail-fast teardown of whole process trees, signal forwarding and orphan guard
as a non-elastic launch. Ranks get DeepSpeed's variables (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE,
CROSS_RANK, CROSS_SIZE, MASTER_ADDR, MASTER_PORT, CUDA_VISIBLE_DEVICES) and torchelastic's
(GROUP_RANK, ROLE_RANK, LOCAL_WORLD_SIZE, TORCHELASTIC_RESTART_COUNT, ..., TORCHELASTIC_ERROR_FILE for
torch's ``@record``: ``dslaunch.error_files``), recomputed every round,
and no ``--local_rank`` argument.

Nothing here imports torch until an elastic job really starts: validation is pure.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import command_exit
from .errors import DslaunchError, UsageError
from .signal_policy import STOP_SIGNALS, not_ignored

__all__ = [
    'DEFAULT_MAX_RESTARTS',
    'DEFAULT_RDZV_TIMEOUT',
    'DEFAULT_RUN_ID',
    'RUN_ID_ENV',
    'ElasticConfig',
    'Node',
    'launch_flags',
    'parse_rdzv_conf',
    'resolve',
    'run',
    'run_node',
    'worker_env',
]

RUN_ID_ENV = 'ELASTIC_RUN_ID'
DEFAULT_RUN_ID = '123456789'  # DeepSpeed's ELASTIC_TRAINING_ID_DEFAULT
DEFAULT_MAX_RESTARTS = 3
# DeepSpeed passed `timeout=100`, a key torch's c10d handler ignores, so its joins waited torch's
# default join_timeout: 600 s. That is what 0.19.7 users got, so it is the default here.
DEFAULT_RDZV_TIMEOUT = 600
ROLE = 'trainer'  # DeepSpeed's WorkerSpec role
MONITOR_POLL_S = 0.5  # longest wait for a rank exit between two checks for waiting nodes
INFO = 'dslaunch: elastic: '

# --rdzv_conf keys torch's c10d rendezvous understands (seconds, counts, a bool, a float, the store).
_INT_KEYS = (
    'join_timeout',
    'last_call_timeout',
    'close_timeout',
    'heartbeat_timeout',
    'keep_alive_interval',
    'keep_alive_max_attempt',
    'read_timeout',
)
_BOOL_KEYS = ('is_host',)
_TRUE = ('1', 'true', 't', 'yes', 'y')  # torch's spellings (RendezvousParameters.get_as_bool), any case
_FALSE = ('0', 'false', 'f', 'no', 'n')
_OTHER_KEYS = ('cas_backoff_max_seconds', 'store_type')


@dataclass(frozen=True)
class ElasticConfig:
    """Everything an elastic node needs, resolved and validated (no torch involved)."""

    run_id: str
    endpoint: str  # host:port of the c10d rendezvous store
    min_nodes: int
    max_nodes: int
    max_restarts: int
    rdzv_conf: dict[str, str] = field(default_factory=dict)  # torch rendezvous options
    local_addr: str | None = None  # this node's address for the others (default: the one towards the endpoint)

    @property
    def join_timeout(self) -> int:
        return int(self.rdzv_conf['join_timeout'])


def parse_rdzv_conf(text: str | None, option: str = '--rdzv_conf') -> dict[str, str]:
    """``--rdzv_conf last_call_timeout=1,keep_alive_interval=2`` -> a dict; a key torch's c10d
    rendezvous does not take, or a value it would refuse, is a ``UsageError`` naming `option`."""
    conf: dict[str, str] = {}
    for part in (text or '').split(','):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition('=')
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise UsageError(f'{option}: expected KEY=VALUE, got {part!r}')
        problem = _rdzv_value_problem(key, value)
        if problem:
            raise UsageError(f'{option}: {problem}')
        conf[key] = value
    return conf


def _rdzv_value_problem(key: str, value: str) -> str | None:
    """What torch's c10d rendezvous would refuse in `key=value` (None: nothing)."""
    if key in _INT_KEYS:
        try:
            ok = int(value) > 0
        except ValueError:
            ok = False
        return None if ok else f'{key} must be a positive whole number, got {value!r}'
    if key in _BOOL_KEYS:
        return None if value.lower() in _TRUE + _FALSE else f'{key} must be true or false, got {value!r}'
    if key == 'cas_backoff_max_seconds':
        try:
            ok = 0 <= float(value) < float('inf')
        except ValueError:
            ok = False
        return None if ok else f'{key} must be a number of seconds >= 0, got {value!r}'
    if key == 'store_type':
        # torch's 'file' store takes the endpoint as a file path; nodes here meet at HOST:PORT
        return None if value.lower() == 'tcp' else f"store_type {value!r}: only 'tcp' (the rendezvous meets at HOST:PORT)"
    return f'unknown key {key!r} (known: {", ".join(_INT_KEYS + _BOOL_KEYS + _OTHER_KEYS)})'


def resolve(args: argparse.Namespace, environ: Mapping[str, str], n_hosts: int) -> ElasticConfig:
    """DeepSpeed 0.19.7's elastic settings from launch.py's arguments, checked.

    ``--min_elastic_nodes -1`` means 1 and ``--max_elastic_nodes -1`` the number of world_info hosts,
    as in DeepSpeed. Raises ``UsageError`` (one line) for anything that cannot work.
    """
    if getattr(args, 'no_local_rank', False):
        raise UsageError('--no_local_rank argument is not supported in Elastic training')  # DeepSpeed's text
    low = args.min_elastic_nodes if args.min_elastic_nodes != -1 else 1
    high = args.max_elastic_nodes if args.max_elastic_nodes != -1 else max(n_hosts, 1)
    if low <= 0 or high <= 0:
        raise UsageError(f'--min_elastic_nodes ({low}) and --max_elastic_nodes ({high}) must be positive')
    if low > high:
        raise UsageError(f'--min_elastic_nodes {low} is larger than --max_elastic_nodes {high}')
    restarts = getattr(args, 'max_restarts', None)
    restarts = DEFAULT_MAX_RESTARTS if restarts is None else restarts
    if restarts < 0:
        raise UsageError(f'--max_restarts must be >= 0, got {restarts}')
    timeout = getattr(args, 'rdzv_timeout', None)
    timeout = DEFAULT_RDZV_TIMEOUT if timeout is None else timeout
    if timeout <= 0:
        raise UsageError(f'--rdzv_timeout must be a positive number of seconds, got {timeout}')
    port = args.master_port
    if not 0 < port < 65536:
        raise UsageError(f'--master_port {port} is not a TCP port (the elastic rendezvous listens there)')
    conf = {'join_timeout': str(timeout), 'read_timeout': str(min(60, timeout))}
    conf.update(parse_rdzv_conf(getattr(args, 'rdzv_conf', None)))
    run_id = environ.get(RUN_ID_ENV) or DEFAULT_RUN_ID
    return ElasticConfig(
        run_id=run_id,
        endpoint=f'{args.master_addr}:{port}',
        min_nodes=low,
        max_nodes=high,
        max_restarts=restarts,
        rdzv_conf=conf,
    )


def launch_flags(args: argparse.Namespace) -> list[str]:
    """The dslaunch-only elastic flags of a runner namespace, for the per-node launcher command
    (only those the user set, so default command lines stay DeepSpeed's)."""
    flags = []
    if getattr(args, 'max_restarts', None) is not None:
        flags.append(f'--max_restarts={args.max_restarts}')
    if getattr(args, 'rdzv_timeout', None) is not None:
        flags.append(f'--rdzv_timeout={args.rdzv_timeout}')
    if getattr(args, 'rdzv_conf', None) is not None:
        flags.append(f'--rdzv_conf={args.rdzv_conf}')
    return flags


def worker_env(
    *,
    static: Mapping[str, str],
    local_rank: int,
    global_rank: int,
    role_rank: int,
    world_size: int,
    role_world_size: int,
    group_rank: int,
    group_world_size: int,
    local_world_size: int,
    master_addr: str,
    master_port: int,
    restart_count: int,
    max_restarts: int,
    run_id: str,
    use_agent_store: bool,
    environ: Mapping[str, str],
    role: str = ROLE,
) -> dict[str, str]:
    """One rank's variables for one rendezvous round: DeepSpeed's (with the node's place in this
    round as CROSS_RANK/CROSS_SIZE) and torchelastic's. ``static`` holds what does not change
    between rounds (CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS with core binding)."""
    env = dict(static)
    env.update(
        {
            # DeepSpeed's launch.py variables
            'RANK': str(global_rank),
            'LOCAL_RANK': str(local_rank),
            'WORLD_SIZE': str(world_size),
            'LOCAL_SIZE': str(local_world_size),
            'CROSS_RANK': str(group_rank),
            'CROSS_SIZE': str(group_world_size),
            'MASTER_ADDR': master_addr,
            'MASTER_PORT': str(master_port),
            # torchelastic's (LocalElasticAgent._start_workers)
            'GROUP_RANK': str(group_rank),
            'ROLE_RANK': str(role_rank),
            'ROLE_NAME': role,
            'LOCAL_WORLD_SIZE': str(local_world_size),
            'GROUP_WORLD_SIZE': str(group_world_size),
            'ROLE_WORLD_SIZE': str(role_world_size),
            'TORCHELASTIC_RESTART_COUNT': str(restart_count),
            'TORCHELASTIC_MAX_RESTARTS': str(max_restarts),
            'TORCHELASTIC_RUN_ID': run_id,
            'TORCHELASTIC_USE_AGENT_STORE': str(use_agent_store),
            'TORCH_NCCL_ASYNC_ERROR_HANDLING': environ.get('TORCH_NCCL_ASYNC_ERROR_HANDLING', '1'),
        }
    )
    return env


# ---------------------------------------------------------------------------------------------
# The running part: imports torch.

_FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
_JOB_CONTROL = (signal.SIGTSTP, signal.SIGCONT)  # Ctrl-Z and fg/bg: passed on to the ranks too
_PER_ROUND = (
    'RANK',
    'LOCAL_RANK',
    'WORLD_SIZE',
    'LOCAL_SIZE',
    'CROSS_RANK',
    'CROSS_SIZE',
    'MASTER_ADDR',
    'MASTER_PORT',
)


def _cause(exc: BaseException) -> str:
    """The innermost cause's first line: torch wraps store errors in 'see inner exception'."""
    inner: BaseException = exc
    while inner.__cause__ is not None:
        inner = inner.__cause__
    text = str(inner).strip().splitlines()
    return text[0] if text else type(inner).__name__


def _import_torch_elastic() -> None:
    try:
        import torch.distributed.elastic.agent.server.api  # noqa: F401
    except ImportError as e:
        raise DslaunchError('elastic training (--enable_elastic_training, or torchrun options: --nnodes MIN:MAX, '
                            f'--max-restarts, c10d) needs torch with torch.distributed.elastic: {e}') from None


def _quiet_torch_logs(level: str) -> None:
    """torch's elastic loggers print to stderr: keep their chatter out (the agent says what matters
    in its own lines), unless ``--log_level debug``."""
    import logging

    top = logging.getLogger('torch.distributed.elastic')
    top.propagate = False  # also for loggers its modules create later
    if level == 'debug':
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(INFO + 'torch: %(message)s'))
        for name in list(logging.root.manager.loggerDict):
            if name.startswith('torch.distributed.elastic'):
                logging.getLogger(name).setLevel(logging.INFO)
    else:
        handler = logging.NullHandler()
    top.handlers[:] = [handler]


def _signal_exception(sig: int) -> BaseException:
    from torch.distributed.elastic.multiprocessing.api import SignalException

    return SignalException(f'dslaunch.launch (pid {os.getpid()}) got {signal.Signals(sig).name}', signal.Signals(sig))


@dataclass
class Node:
    """This node's fixed part of every round (argv and static variables per local rank)."""

    argv: list[list[str]]
    static_env: list[dict[str, str]]
    base_env: dict[str, str]
    grace: float
    raw_output: bool
    console_ranks: set[int] | None
    log_dir: str | None
    quiet: bool
    exit_barrier_timeout: float = 300.0
    collapse: str = 'auto'
    collapse_window: float = 0.25
    status_line: str = 'auto'
    hang_timeout: float = 0.0
    hang_action: str = 'stop'
    error_files: Any = None  # dslaunch.error_files.ErrorFiles: the ranks' TORCHELASTIC_ERROR_FILE
    role: str = ROLE  # the workers' ROLE_NAME (torchrun's --role)
    console_local_ranks: set[int] | None = None  # torchrun's --local-ranks-filter
    prefix: str = '[{tag}]: '  # the console prefix template (torchrun's --log-line-prefix-template)
    virtual_local_rank: bool = False  # torchrun's --virtual-local-rank: LOCAL_RANK=0 in every worker
    stop_signals: tuple[int, ...] = STOP_SIGNALS  # torchrun's --signals-to-handle (signal_policy)
    # torchrun's --redirects and --tee, per local rank (torch_launch.std_streams); None: DeepSpeed's path
    streams: tuple[list[int], list[int]] | None = None
    # torchrun's --duplicate-stdout-filters and --duplicate-stderr-filters (torch_launch.console_copies)
    duplicate_filters: tuple[list[str], list[str]] = ([], [])

    def streams_logged(self) -> bool:
        """Whether --redirects/--tee send some worker's stream to its own `stdout.log`/`stderr.log`
        (beside its error file, per attempt), instead of DeepSpeed-style per-rank log files."""
        return self.streams is not None and (any(self.streams[0]) or any(self.streams[1]))

    def shown(self, workers: list[Any]) -> list[int] | None:
        """Which of this round's workers (by index) the console shows; None: all."""
        if self.console_ranks is None and self.console_local_ranks is None:
            return None
        return [i for i, w in enumerate(workers)
                if (self.console_ranks is None or w.global_rank in self.console_ranks)
                and (self.console_local_ranks is None or w.local_rank in self.console_local_ranks)]

    def info(self, text: str) -> None:
        if not self.quiet:
            print(INFO + text, file=sys.stderr, flush=True)


class _SupervisedAgentMixin:
    """The process half of torch's ``SimpleElasticAgent``: ``dslaunch._core.Supervisor`` owns the ranks.

    ``_agent_class()`` combines it with ``SimpleElasticAgent`` (torch is imported only then).
    Each rendezvous round's ranks are one Supervisor job (fail-fast, whole-tree teardown, prefixed
    output, orphan guard). Signals: the first stop signal (SIGINT, SIGTERM, SIGHUP, SIGQUIT, and
    those of torchrun's ``--signals-to-handle``) ends the agent through torch's ``SignalException``
    path (the ranks get that signal, SIGKILL after the grace period); a second one kills the ranks
    at once; SIGUSR1/SIGUSR2 are otherwise forwarded to the ranks, and so are SIGTSTP (Ctrl-Z: this
    process then stops too) and SIGCONT.
    """

    _remaining_restarts: int  # SimpleElasticAgent's

    def __init__(self, spec: Any, node: Node) -> None:
        from torch.distributed.elastic.agent.server.api import SimpleElasticAgent

        init: Any = SimpleElasticAgent.__init__
        init(self, spec, exit_barrier_timeout=node.exit_barrier_timeout, shutdown_timeout=int(node.grace))
        self.node = node
        self.sup: Any = None  # this round's Supervisor
        self.watch: Any = None  # its hang watchdog (--hang_timeout)
        self.started = False
        self.starts = 0
        self.last_report: Any = None
        self.signals: list[int] = []
        self.critical = False  # starting or stopping ranks: a signal must not unwind us there
        self.restarting = False
        self.log_names: set[str] = set()
        self.error_paths: dict[int, str] = {}  # this round's error file of each local rank
        self.tail_of = 'stderr'  # what the reports' rank tails are of ('output' with rank log files)

    # -- signals ---------------------------------------------------------------------------------
    def on_signal(self, signum: int, _frame: object) -> None:
        sup = self.sup if self.started else None
        if signum not in self.node.stop_signals and signum in _FORWARDED_SIGNALS + _JOB_CONTROL:
            if sup is not None and not sup.done:
                sup.send_signal(signum)  # SIGTSTP: the core passes it on, then stops this process
            elif signum == signal.SIGTSTP:
                os.kill(os.getpid(), signal.SIGSTOP)  # no ranks running: stop, as by default
            return
        self.signals.append(signum)
        if len(self.signals) > 1:
            if sup is not None:
                sup.kill()  # a second stop signal: no more grace
        elif not self.critical:
            raise _signal_exception(signum)  # torch's agent loop shuts down on it
        elif sup is not None and not sup.done:
            sup.terminate(self.node.grace, signum)  # raised by raise_pending() after the critical part

    def raise_pending(self) -> None:
        if len(self.signals) == 1:
            raise _signal_exception(self.signals[0])

    # -- SimpleElasticAgent's hooks --------------------------------------------------------------
    def _start_workers(self, worker_group: Any) -> dict[int, Any]:
        from dslaunch import _core
        from dslaunch.report import rank_ranges

        spec = worker_group.spec
        node = self.node
        restart_count = spec.max_restarts - self._remaining_restarts
        stamp = time.strftime('%Y%m%d%H%M%S', time.localtime())
        self.starts += 1
        if node.error_files is not None:
            self.error_paths = node.error_files.attempt(restart_count, (w.local_rank for w in worker_group.workers))
        specs = []
        for w in worker_group.workers:
            env = worker_env(
                static=node.static_env[w.local_rank],
                local_rank=w.local_rank,
                global_rank=w.global_rank,
                role_rank=w.role_rank,
                world_size=w.world_size,
                role_world_size=w.role_world_size,
                group_rank=int(worker_group.group_rank),
                group_world_size=int(worker_group.group_world_size),
                local_world_size=spec.local_world_size,
                master_addr=str(worker_group.master_addr),
                master_port=int(worker_group.master_port),
                restart_count=restart_count,
                max_restarts=spec.max_restarts,
                run_id=spec.rdzv_handler.get_run_id(),
                use_agent_store=bool(spec.rdzv_handler.use_agent_store),
                environ=node.base_env,
                role=node.role,
            )
            if w.local_rank in self.error_paths:
                env['TORCHELASTIC_ERROR_FILE'] = self.error_paths[w.local_rank]
            if node.virtual_local_rank:
                env['LOCAL_RANK'] = '0'  # its one device (CUDA_VISIBLE_DEVICES, in the static part) is device 0
            specs.append(self._rank_spec(w, env, stamp))
        shown = node.shown(worker_group.workers)
        # Per-rank log files keep the order a rank wrote stdout and stderr in: one pipe for both.
        merged = any(s.log_file for s in specs)
        self.tail_of = 'output' if merged else 'stderr'
        node.info(
            f'start #{self.starts}: node {worker_group.group_rank} of {worker_group.group_world_size}, '
            f'ranks {rank_ranges(w.global_rank for w in worker_group.workers)} of '
            f'{worker_group.workers[0].world_size} (restart {restart_count} of {spec.max_restarts}; '
            f'MASTER_ADDR:MASTER_PORT {worker_group.master_addr}:{worker_group.master_port})'
        )
        sup = _core.Supervisor(
            specs,
            env=node.base_env,
            prefix=None if node.raw_output else node.prefix,
            console_ranks=shown,
            grace_period=node.grace,
            forward_signals=[],  # the agent's own handler decides (on_signal)
            fail_fast=True,
            collapse=node.collapse,  # type: ignore[arg-type]  # checked by the parser's choices
            collapse_window=node.collapse_window,
            status_line=node.status_line != 'off',
            keep_last_line=node.hang_timeout > 0,
            merge_stderr=merged,
            console_copies=self._console_copies(restart_count),  # type: ignore[arg-type]  # the core's keys
        )
        if node.hang_timeout > 0:
            from dslaunch.hang import HangWatch

            # A hang stops this round's ranks (with --hang_action stop): the agent sees them
            # killed and restarts the group, as after any failure.
            self.watch = HangWatch(sup, node.hang_timeout, node.hang_action)
        self.critical = True
        self.sup, self.started = sup, False
        try:
            sup.start()
            self.started = True
        except OSError as e:
            what = e.filename or ''
            raise DslaunchError(f'cannot start a rank: {e.strerror or e}: {what}'.rstrip(': ')) from None
        finally:
            self.critical = False
        self.raise_pending()  # a stop signal that came while the ranks were starting
        return {w.local_rank: pid for w, pid in zip(worker_group.workers, sup.pids)}

    def _console_copies(self, restart: int) -> dict[str, tuple[str, list[str]]] | None:
        """torchrun's --duplicate-*-filters for this restart's attempt directory (None: not given)."""
        node = self.node
        if node.streams is None or node.error_files is None or not any(node.duplicate_filters):
            return None
        from dslaunch.torch_launch import console_copies

        attempt_dir = os.path.join(node.error_files.run_dir, f'attempt_{restart}')
        return console_copies(node.duplicate_filters, node.streams[1], attempt_dir)

    def _rank_spec(self, worker: Any, env: dict[str, str], stamp: str) -> Any:
        from dslaunch import _core

        argv, tag, node = self.node.argv[worker.local_rank], str(worker.global_rank), self.node
        if node.streams is not None and node.streams_logged() and worker.local_rank in self.error_paths:
            from dslaunch.torch_launch import worker_streams

            redirects, tee = node.streams
            console, bare, (out, err) = worker_streams(redirects[worker.local_rank], tee[worker.local_rank],
                                                       self.error_paths[worker.local_rank], tee_used=any(tee))
            return _core.RankSpec(argv, env=env, tag=tag, console=console, bare=bare, stdout_log_file=out,
                                  stderr_log_file=err)
        return _core.RankSpec(argv, env=env, log_file=self._log_name(stamp, worker.global_rank), tag=tag)

    def _log_name(self, stamp: str, rank: int) -> str | None:
        from dslaunch.launch import rank_log_name

        if not self.node.log_dir:
            return None
        log = rank_log_name(self.node.log_dir, stamp, rank)
        if log in self.log_names:  # two starts within one second: keep the first one's file
            log = log.removesuffix('.log') + f'_start{self.starts}.log'
        self.log_names.add(log)
        return log

    def _monitor_workers(self, worker_group: Any) -> Any:
        from torch.distributed.elastic.agent.server.api import RunResult, WorkerState
        from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

        self.raise_pending()
        sup = self.sup
        if sup is None or not self.started:
            return RunResult(state=WorkerState.UNKNOWN)
        sup.wait_exits(timeout=MONITOR_POLL_S)  # returns at once on an exit; a signal raises here
        if self.watch is not None:
            self.watch.check()
        ranks = sup.status()
        failed = [r for r in ranks if r.state in ('failed', 'killed')]
        if failed:
            failures = {}
            for r in failed:
                worker = worker_group.workers[r.rank]
                code = r.returncode if r.returncode is not None else -(r.signal or 0)
                what = {'local_rank': worker.local_rank, 'pid': r.pid, 'exitcode': code}
                try:  # torch reads a rank's error file here, and raises on one it cannot parse
                    failure = ProcessFailure(**what, error_file=self.error_paths.get(worker.local_rank, '<N/A>'))
                except Exception:  # noqa: BLE001 (what a rank wrote must not end the agent)
                    failure = ProcessFailure(**what, error_file='<N/A>')
                failures[worker.global_rank] = failure
            return RunResult(state=WorkerState.FAILED, failures=failures)
        if all(r.state == 'exited' for r in ranks):
            done = {w.global_rank: None for w in worker_group.workers}
            return RunResult(state=WorkerState.SUCCEEDED, return_values=done)
        return RunResult(state=WorkerState.HEALTHY)

    def _restart_workers(self, worker_group: Any) -> None:
        from torch.distributed.elastic.agent.server.api import SimpleElasticAgent, WorkerState

        if worker_group.state == WorkerState.HEALTHY:  # torch restarts healthy ranks only for joiners
            self.node.info('nodes are waiting to join: stopping the ranks for a new rendezvous round')
        self.restarting = True
        try:
            restart: Any = SimpleElasticAgent._restart_workers
            restart(self, worker_group)
        finally:
            self.restarting = False

    def _stop_workers(self, worker_group: Any) -> None:
        from dslaunch.report import print_report

        report = self._end_round(signal.SIGTERM)
        hangs = self.watch.hangs if self.watch is not None and self.watch.stopped_job else []
        if report is not None and (report.first_failure is not None or hangs):
            print_report(report, hangs=hangs, tail_of=self.tail_of)
            spec = worker_group.spec
            if self.restarting:
                used = spec.max_restarts - self._remaining_restarts
                self.node.info(f'restarting the ranks (restart {used} of {spec.max_restarts})')
            else:
                self.node.info(f'no restarts left (--max_restarts {spec.max_restarts}): giving up')
        if not self.restarting:
            self._arrive_at_the_exit_barrier()
        self.raise_pending()

    def _arrive_at_the_exit_barrier(self) -> None:
        """A node that gives up still counts at torch's exit barrier, where the nodes whose ranks
        finished wait for every node (torch's agent never arrives there after a failure, so they
        wait the whole ``exit_barrier_timeout``, 300 s, for it). Best effort: it uses torch's
        private barrier half, and a store that is gone or slow must not delay this node's exit."""
        with contextlib.suppress(Exception):  # then the others wait, as under torchrun
            from torch.distributed.elastic.agent.server.api import _TERMINAL_STATE_SYNC_ID
            from torch.distributed.elastic.utils.store import _barrier_nonblocking, store_timeout

            store, group = getattr(self, '_store', None), getattr(self, '_worker_group', None)
            if store is not None and group is not None:
                with store_timeout(store, 5):
                    _barrier_nonblocking(store, int(group.group_world_size), _TERMINAL_STATE_SYNC_ID)

    def _shutdown(self, death_sig: int = signal.SIGTERM, timeout: int = 30) -> None:
        from dslaunch.report import print_report

        report = self._end_round(death_sig)
        if report is not None and not report.success:
            print_report(report, tail_of=self.tail_of)

    def _end_round(self, sig: int) -> Any:
        """Stops this round's ranks (``sig``, SIGKILL after the grace period); their report, or
        None when none ran."""
        sup, started = self.sup, self.started
        if sup is None:
            return None
        self.critical = True
        try:
            if started and not sup.done:
                sup.terminate(self.node.grace, int(sig))
            report = sup.wait() if started else None
        finally:
            self.critical = False
        self.sup, self.started = None, False
        if report is not None:
            self.last_report = report
        return report


@functools.cache
def _agent_class() -> Any:
    """``SupervisedElasticAgent``: the mixin over torch's ``SimpleElasticAgent``."""
    from torch.distributed.elastic.agent.server.api import SimpleElasticAgent

    return type('SupervisedElasticAgent', (_SupervisedAgentMixin, SimpleElasticAgent), {})


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """``python -m dslaunch.launch --enable_elastic_training ...``: this node's elastic agent.

    Returns the status (`command_exit`): 0 when the job finished, the failing rank's when the
    restarts ran out (256-N for a death by signal N), -N when signal N stopped this node. Bad
    input, and a rendezvous that does not form within ``--rdzv_timeout`` or cannot be reached,
    raise ``DslaunchError`` (one line).
    """
    from dslaunch import launch
    from dslaunch.channel_vars import REPORT_TO_ENV, TOKEN_ENV
    from dslaunch.launch_run import check_script, parse_rank_selection
    from dslaunch.torch_launch import substitute_local_rank

    base_env = dict(environ)
    report_to = base_env.pop(REPORT_TO_ENV, None)
    token = base_env.pop(TOKEN_ENV, None)
    world_info = launch.load_world_info(args)
    cfg = resolve(args, base_env, len(world_info))
    launch.rank_plans(world_info, args.node_rank, args, base_env)  # checks --node_rank, --module/--no_python
    host = list(world_info)[args.node_rank]
    # This node alone: local rank i is plan i (DeepSpeed's RANK % n_local only holds for a static
    # world), numactl binding by local rank.
    plans = launch.rank_plans({host: world_info[host]}, 0, args, base_env, python=sys.executable)
    if not plans:
        return 0  # a node with zero slots runs nothing, as in non-elastic mode
    check_script(args)
    log_dir = getattr(args, 'enable_each_rank_log', 'None')
    if log_dir != 'None':
        launch.ensure_rank_log_dir(log_dir)
    quiet = args.quiet or args.log_level in ('warning', 'error', 'critical')
    node = Node(
        argv=[substitute_local_rank(p.argv, p.local_rank) for p in plans],
        static_env=[{k: v for k, v in p.env_overrides.items() if k not in _PER_ROUND} for p in plans],
        base_env=base_env,
        grace=getattr(args, 'grace_period', 30.0),
        raw_output=getattr(args, 'raw_output', False),
        console_ranks=parse_rank_selection(getattr(args, 'console_ranks', None)),
        log_dir=log_dir if log_dir != 'None' else None,
        quiet=quiet,
        collapse=getattr(args, 'collapse', 'auto'),
        collapse_window=getattr(args, 'collapse_window', 0.25),
        status_line=getattr(args, 'status_line', 'auto'),
        hang_timeout=getattr(args, 'hang_timeout', 0.0) or 0.0,
        hang_action=getattr(args, 'hang_action', 'stop'),
    )
    return run_node(cfg, node, args, report_to, token)


def run_node(cfg: ElasticConfig, node: Node, args: argparse.Namespace, report_to: str | None = None,
             token: str | None = None) -> int:
    """This node's elastic agent for `cfg`, running `node`'s ranks each round: what `run` does
    once DeepSpeed's arguments are resolved (the torch front end's elastic jobs come here too).
    `args` gives `log_level`, `node_rank`, `master_addr` (the rendezvous host), and optionally
    `save_pid` and `report_json`. The status as `run`'s."""
    if args.log_level != 'debug':
        # c10d logs each failed store connection with a C++ backtrace; the failure reaches the
        # user as one line instead. Read by torch at import; the ranks' environment is already set.
        os.environ.setdefault('TORCH_CPP_LOG_LEVEL', 'FATAL')
    _import_torch_elastic()
    _quiet_torch_logs('error' if node.quiet else args.log_level)
    from dslaunch.error_files import ErrorFiles
    from dslaunch.launch_run import PidFile

    node.error_files = ErrorFiles(node.log_dir, cfg.run_id)
    if node.streams_logged():
        node.error_files.keep = True
        print(f'dslaunch: worker logs (--redirects/--tee): {node.error_files.run_dir}/attempt_<restart>/<local rank>/'
              '{stdout,stderr}.log', file=sys.stderr)
    if any(node.duplicate_filters):
        node.error_files.keep = True
        print(f'dslaunch: filtered lines (--duplicate-*-filters): {node.error_files.run_dir}/attempt_<restart>/'
              'filtered_{stdout,stderr}.log', file=sys.stderr)
    try:
        with PidFile(getattr(args, 'save_pid', 0) or 0), _AgentEnvironment():
            return _run_agent(cfg, node, args, report_to, token)
    finally:
        node.error_files.finish()


class _AgentEnvironment:
    """The agent process's own switches, undone afterwards (the runner may run us in-process).

    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: each round's ranks get a fresh TCPStore from their
    rank 0 on a port the rank-0 agent picks (``TORCHELASTIC_USE_AGENT_STORE=False``), as in
    DeepSpeed 0.19.7. torch's shared agent store outlives the rounds, and with it the previous
    round's process-group keys.
    """

    NAME = 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE'

    def __enter__(self) -> None:
        self.saved = os.environ.get(self.NAME)
        os.environ[self.NAME] = '1'

    def __exit__(self, *exc: object) -> None:
        if self.saved is None:
            os.environ.pop(self.NAME, None)
        else:
            os.environ[self.NAME] = self.saved


def _rendezvous_handler(cfg: ElasticConfig, master_addr: str) -> Any:
    from torch.distributed.elastic.rendezvous import RendezvousError, RendezvousParameters
    from torch.distributed.elastic.rendezvous import registry as rdzv_registry

    from dslaunch.jobchannel import address_towards

    try:
        socket.getaddrinfo(master_addr, None)  # a name that cannot resolve would wait out --rdzv_timeout
    except OSError as e:
        raise DslaunchError(f'cannot resolve --master_addr {master_addr!r}: {e.strerror or e}') from None
    params = RendezvousParameters(
        backend='c10d',
        endpoint=cfg.endpoint,
        run_id=cfg.run_id,
        min_nodes=cfg.min_nodes,
        max_nodes=cfg.max_nodes,
        local_addr=cfg.local_addr or address_towards(master_addr),  # this node as the others reach it
        **cfg.rdzv_conf,
    )
    try:
        return rdzv_registry.get_rendezvous_handler(params)
    except (ValueError, TypeError) as e:  # a --rdzv_conf value torch refuses that parse_rdzv_conf let through
        raise DslaunchError(f'the elastic rendezvous refused its settings (--rdzv_conf): {_cause(e)}') from None
    except RendezvousError as e:
        raise DslaunchError(
            f"cannot reach the elastic rendezvous '{cfg.run_id}' at {cfg.endpoint}: {_cause(e)}"
        ) from None


def _connect_runner(report_to: str | None, token: str | None, node_rank: int) -> Any:
    """The channel to a multi-node runner, if one started us: its stop reaches us as a signal."""
    from dslaunch import jobchannel

    if not (report_to and token):
        return None
    try:
        return jobchannel.JobClient(report_to, token, node_rank, lambda sig: os.kill(os.getpid(), sig))
    except OSError as e:
        raise DslaunchError(f'cannot reach the dslaunch runner at {report_to}: {e.strerror or e}') from None


def _raise_stop(signum: int, _frame: object) -> None:
    raise _signal_exception(signum)


def _run_agent(
    cfg: ElasticConfig, node: Node, args: argparse.Namespace, report_to: str | None, token: str | None
) -> int:
    from torch.distributed.elastic.agent.server.api import WorkerSpec
    from torch.distributed.elastic.multiprocessing.api import SignalException

    node.info(
        f"joining rendezvous '{cfg.run_id}' at {cfg.endpoint} ({cfg.min_nodes} to {cfg.max_nodes} nodes, "
        f'{cfg.max_restarts} restart(s), join timeout {cfg.join_timeout} s)'
    )
    saved: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        stops = node.stop_signals
        for signum in not_ignored(dict.fromkeys(stops + _FORWARDED_SIGNALS)):
            saved[signum] = signal.signal(signum, _raise_stop if signum in stops else signal.SIG_IGN)
        for signum in _JOB_CONTROL:
            saved[signum] = signal.getsignal(signum)  # the agent's handler from its start on
    client = handler = None
    code = 1
    close_rdzv = False
    try:
        client = _connect_runner(report_to, token, args.node_rank or 0)
        handler = _rendezvous_handler(cfg, str(args.master_addr))
        spec = WorkerSpec(
            role=node.role,
            local_world_size=len(node.argv),
            rdzv_handler=handler,
            entrypoint=node.argv[0][0],
            args=tuple(node.argv[0][1:]),
            max_restarts=cfg.max_restarts,
            monitor_interval=0.01,  # the real wait is Supervisor.wait_exits in _monitor_workers
        )
        agent = _agent_class()(spec, node)
        for stop in saved:
            signal.signal(stop, agent.on_signal)
        close_rdzv = True  # as torchrun: close the rendezvous when this node ends, unless signalled
        try:
            code = _outcome(agent, cfg, client)
        finally:
            _write_report_json(agent.last_report, getattr(args, 'report_json', None))
    except SignalException as e:
        close_rdzv = False  # a signalled node must not close the rendezvous on the others
        code = -int(e.sigval)
        node.info(f'stopped by {signal.Signals(e.sigval).name}')
    finally:
        if close_rdzv and handler is not None:
            with contextlib.suppress(Exception):  # the store's host may be gone already
                handler.shutdown()  # late nodes then learn the job is over
        for stop, old in saved.items():
            signal.signal(stop, old)
        if client is not None:
            client.report_done(command_exit.shell(code))
    if client is not None and client.stopped_by_runner and code < 0:
        return 0  # the runner stopped this node and sets the job's status (as launch_run)
    return code


def _write_report_json(report: Any, path: str | None) -> None:
    """``--report_json``: the report of this node's last start of ranks."""
    if not path or report is None:
        return
    from dslaunch.report import write_json

    try:
        write_json(report, path)
    except OSError as e:
        print(f'dslaunch: cannot write --report_json {path}: {e.strerror}', file=sys.stderr)


def _outcome(agent: Any, cfg: ElasticConfig, client: Any) -> int:
    """Runs torch's agent loop; the exit status, or a one-line ``DslaunchError``."""
    from torch.distributed.elastic.rendezvous import RendezvousClosedError, RendezvousError, RendezvousTimeoutError

    from dslaunch.report import print_report

    where = f"elastic rendezvous '{cfg.run_id}' at {cfg.endpoint}"
    try:
        result = agent.run(agent.node.role)
    except RendezvousTimeoutError:
        raise DslaunchError(
            f'the {where} did not form within {cfg.join_timeout} s '
            f'(needs at least {cfg.min_nodes} node(s); see --rdzv_timeout)'
        ) from None
    except RendezvousClosedError:
        raise DslaunchError(f'the {where} is closed: the job has already ended') from None
    except RendezvousError as e:
        raise DslaunchError(f'lost the {where}: {_cause(e)}') from None
    report = agent.last_report
    if result is None:  # torch's RendezvousGracefulExitError: a spare node of a job that ended
        agent.node.info('the job ended while this node was a spare: nothing to run')
        return 0
    if not result.is_failed():
        if report is not None:
            print_report(report)
        return 0
    if client is not None and report is not None and report.first_failure is not None:
        f = report.first_failure
        client.report_failure(int(f.tag), f.returncode, f.exit_status, f.stderr_tail)
    return (command_exit.job_status(report) or 1) if report is not None else 1
