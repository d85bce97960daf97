"""The per-node launcher (``python -m dslaunch.launch``), DeepSpeed's ``launch.py`` contract.

This module holds the pure part: the command line (``parse_args``) and what to start for
each local rank (``rank_plans``: rank arithmetic, child argv, environment, log file name),
per spec sections 2.2, 7.2 and 8. Starting and supervising the processes lives elsewhere.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence

from .argparse_compat import CompatArgumentParser
from .errors import UsageError, WorldInfoError, printable
from .world_info import NONE_SENTINEL, decode_world_info

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs the CLI start-up time
if TYPE_CHECKING:
    from typing import Any, Literal

    from .numa import Topology

__all__ = [
    'RankPlan',
    'build_parser',
    'child_command',
    'ensure_rank_log_dir',
    'load_world_info',
    'parse_args',
    'rank_log_name',
    'rank_plans',
]

DEFAULT_MASTER_ADDR = '127.0.0.1'
DEFAULT_MASTER_PORT = 29500
LOG_LEVELS = ('debug', 'info', 'warning', 'error', 'critical')
MODULE_AND_NO_PYTHON = "Don't use both the '--no_python' flag and the '--module' flag at the same time."


def build_parser(prog: str | None = None) -> CompatArgumentParser:
    """DeepSpeed 0.19.8's launch.py parser plus dslaunch's options."""
    p = CompatArgumentParser(
        prog=prog,
        description='Start and supervise the ranks of one node of a distributed job '
        '(drop-in for deepspeed.launcher.launch).',
    )
    p.add_argument('--node_rank', type=int, default=0, help='Index of this node among the world_info hosts.')
    p.add_argument('--master_addr', type=str, default=DEFAULT_MASTER_ADDR, help='Rendezvous address of rank 0.')
    p.add_argument('--master_port', type=int, default=DEFAULT_MASTER_PORT, help='Rendezvous port of rank 0.')
    p.add_argument(
        '--world_info',
        type=str,
        default=NONE_SENTINEL,
        help='Hosts and slots of the job: URL-safe base64 of a JSON object.',
    )
    p.add_argument('--module', action='store_true', help='Run the script as a module (python -m).')
    p.add_argument('--no_python', action='store_true', help='Execute the script directly, without python.')
    p.add_argument('--no_local_rank', action='store_true', help='Do not pass --local_rank to the script.')
    p.add_argument(
        '--save_pid',
        type=int,
        default=0,
        help="Runner pid; when non-zero write this launcher's pid to /tmp/<save_pid>.deepspeed.",
    )
    p.add_argument(
        '--enable_each_rank_log', type=str, default='None', help='Directory for one log file per rank ("None": off).'
    )
    p.add_argument('--bind_cores_to_rank', action='store_true', help='Pin each rank to its own CPU cores.')
    p.add_argument('--bind_core_list', type=str, default=None, help='Cores to share out, e.g. 0,2-5.')
    p.add_argument('--log_level', type=str, default='info', choices=list(LOG_LEVELS), help='Launcher log level.')
    p.add_argument('-q', '--quiet', action='store_true', help='Same as --log_level error.')
    p.add_argument('training_script', type=str, help='The training script (or module with --module).')
    p.add_argument('training_script_args', nargs=argparse.REMAINDER, help='Arguments for the training script.')
    p.add_extension(
        '--enable_elastic_training', action='store_true', help='Elastic training (dslaunch; as DeepSpeed 0.19.7).'
    )
    p.add_extension('--min_elastic_nodes', type=int, default=-1, help='Fewest nodes for elastic training.')
    p.add_extension('--max_elastic_nodes', type=int, default=-1, help='Most nodes for elastic training.')
    _add_elastic_extensions(p)
    p.add_job_extensions()
    p.add_extension('--dry_run', action='store_true', help='Print the ranks that would start and exit.')
    return p


def _add_elastic_extensions(p: CompatArgumentParser) -> None:
    """dslaunch's elastic options (the runner has the same ones and forwards them when set)."""
    p.add_extension(
        '--max_restarts', type=int, default=None, help='Elastic: restarts after a rank failure (default 3).'
    )
    p.add_extension(
        '--rdzv_timeout', type=int, default=None, help='Elastic: seconds for a rendezvous to form (default 600).'
    )
    p.add_extension(
        '--rdzv_conf',
        type=str,
        default=None,
        help='Elastic: c10d rendezvous options, e.g. last_call_timeout=5,keep_alive_interval=2.',
    )


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """Parse launcher arguments (``sys.argv[1:]`` when ``argv`` is None)."""
    return build_parser(prog).parse_args(None if argv is None else list(argv))


class RankPlan:
    """One child process of this node. (A plain class: see `runner.Plan` on `dataclasses`.)"""

    __slots__ = ('argv', 'bare', 'console', 'env_overrides', 'local_rank', 'log_name', 'rank', 'stream_logs')

    def __init__(self, *, rank: int, local_rank: int, argv: list[str], env_overrides: dict[str, str],
                 log_name: str | None) -> None:
        self.rank = rank
        self.local_rank = local_rank
        self.argv = argv
        self.env_overrides = env_overrides  # set on top of the launcher's environment
        self.log_name = log_name  # per-rank log file (stdout and stderr), or None
        # torchrun's --tee/--redirects (torch_launch): the streams shown (`_core.RankSpec`'s
        # `console`), those shown without the prefix (`bare`), and one file per stream (stdout's,
        # stderr's; None: not logged) instead of `log_name`
        self.console: bool | Literal['stdout', 'stderr'] = True
        self.bare: bool | Literal['stdout', 'stderr'] = False
        self.stream_logs: tuple[str | None, str | None] | None = None

    def __repr__(self) -> str:
        return f'RankPlan({", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)})'


def load_world_info(args: argparse.Namespace) -> dict[str, list[Any]]:
    """Decode ``args.world_info`` (``"None"``, the default, is an error as in DeepSpeed)."""
    return decode_world_info(args.world_info)


def rank_plans(
    world_info: Mapping[str, Sequence[Any]],
    node_rank: int,
    args: argparse.Namespace,
    environ: Mapping[str, str],
    *,
    python: str | None = None,
    timestamp: str | None = None,
    topology: Topology | None = None,
) -> list[RankPlan]:
    """The children of node ``node_rank``, in spawn order.

    Ranks are numbered consecutively across hosts in ``world_info`` order; a child's
    ``LOCAL_RANK`` is ``RANK % n_local`` (DeepSpeed's rule, which permutes local ranks on
    heterogeneous nodes). ``environ`` is only read (``KMP_AFFINITY`` with core binding).
    """
    hosts = list(world_info)
    if not 0 <= node_rank < len(hosts):
        # Deviation: DeepSpeed dies with IndexError (and silently accepts negative ranks).
        raise WorldInfoError(
            f'--node_rank {node_rank} is out of range: world_info has {len(hosts)} '
            f'node(s) ({printable(", ".join(hosts)) or "none"})'
        )
    if getattr(args, 'no_python', False) and getattr(args, 'module', False):
        raise UsageError(MODULE_AND_NO_PYTHON)

    first_rank = sum(len(world_info[host]) for host in hosts[:node_rank])
    slots = list(world_info[hosts[node_rank]])
    n_local = len(slots)
    shared = {
        'CUDA_VISIBLE_DEVICES': ','.join(str(s) for s in slots),
        'MASTER_ADDR': str(getattr(args, 'master_addr', DEFAULT_MASTER_ADDR)),
        'MASTER_PORT': str(getattr(args, 'master_port', DEFAULT_MASTER_PORT)),
        'WORLD_SIZE': str(sum(len(world_info[host]) for host in hosts)),
        'CROSS_RANK': str(node_rank),
        'CROSS_SIZE': str(len(hosts)),
        'LOCAL_SIZE': str(n_local),
    }
    log_dir = getattr(args, 'enable_each_rank_log', 'None')
    stamp = timestamp if timestamp is not None else time.strftime('%Y%m%d%H%M%S', time.localtime())

    plans = []
    for local_proc in range(n_local):
        rank = first_rank + local_proc
        local_rank = rank % n_local
        env = dict(shared, RANK=str(rank), LOCAL_RANK=str(local_rank))
        prefix: list[str] = []
        if getattr(args, 'bind_cores_to_rank', False):
            from .numa import get_numactl_cmd  # only for core binding: not on the CLI start path

            cores_per_rank, prefix = get_numactl_cmd(
                getattr(args, 'bind_core_list', None), n_local, local_rank, topology=topology, environ=environ
            )
            env['OMP_NUM_THREADS'] = str(cores_per_rank)
        argv = prefix + child_command(args, local_rank, python=python)
        log_name = rank_log_name(log_dir, stamp, rank) if log_dir != 'None' else None
        plans.append(RankPlan(rank=rank, local_rank=local_rank, argv=argv, env_overrides=env, log_name=log_name))
    return plans


def child_command(args: argparse.Namespace, local_rank: int, *, python: str | None = None) -> list[str]:
    """``python -u [-m] script [--local_rank=N] args`` (or the script itself with ``--no_python``)."""
    if args.no_python and args.module:
        raise UsageError(MODULE_AND_NO_PYTHON)
    cmd: list[str] = []
    if not args.no_python:
        cmd += [python or sys.executable, '-u']
        if args.module:
            cmd.append('-m')
    cmd.append(args.training_script)
    # The elastic agent of DeepSpeed <= 0.19.7 passed no --local_rank either.
    if not args.no_local_rank and not getattr(args, 'enable_elastic_training', False):
        cmd.append(f'--local_rank={local_rank}')  # underscore form, before the user's args
    return cmd + list(args.training_script_args)


def rank_log_name(log_dir: str, timestamp: str, rank: int) -> str:
    """``<dir>/<YYYYmmddHHMMSS>_rank<RANK>.log`` (global rank)."""
    return os.path.join(log_dir, f'{timestamp}_rank{rank}.log')


def ensure_rank_log_dir(log_dir: str) -> None:
    """Create the ``--enable_each_rank_log`` directory; DeepSpeed's messages on failure."""
    if os.path.isfile(log_dir):
        raise UsageError(f'{log_dir} should not be a file, it should be a directory.')
    try:
        os.makedirs(log_dir, exist_ok=True)
    except OSError as exc:
        raise UsageError(f'unable to create directory {log_dir} for each rank log.') from exc


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dslaunch.launch ...`: DeepSpeed's per-node launcher, run by the Rust core.
    A user mistake is one line on stderr and exit status 1. Returns the exit status; -N: end by
    signal N (`command_exit`)."""
    from dslaunch import command_exit
    from dslaunch.errors import DslaunchError
    from dslaunch.launch_run import run_node

    try:
        args = parse_args(argv, prog='dslaunch.launch')
        return command_exit.per_node_launcher(run_node(args, native_prog='dslaunch.launch', launcher_status=True))
    except DslaunchError as e:
        print(f'dslaunch.launch: error: {e}', file=sys.stderr)
        return e.exit_code


if __name__ == '__main__':
    from dslaunch import command_exit

    command_exit.will_exit()
    command_exit.exit_now(main())
