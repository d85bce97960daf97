"""The ``deepspeed``/``ds`` runner: command line and launch decision (spec sections 2.1 and 3).

``parse_args`` is DeepSpeed's parser plus a few dslaunch options. ``plan`` makes every
decision of DeepSpeed's ``runner.main()`` (hostfile, CUDA_VISIBLE_DEVICES, filters, local vs
multi-node, master address, the per-node launcher command) without starting a process: the
machine is reached only through the ``Probes`` object, so tests pass a fake. Where dslaunch
deliberately differs from DeepSpeed 0.19.8 the comment says so and docs/compatibility.md
has the row.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Mapping, Sequence

from .argparse_compat import CompatArgumentParser
from .devices import VISIBLE_DEVICES_VAR, DeviceId, visible_devices
from .envfile import collect_exports, env_file_paths, read_env_files
from .errors import (
    CoreBindingError,
    DslaunchError,
    LauncherError,
    ResourceFilterError,
    UnknownLauncherError,
    UsageError,
    one_line,
)
from .hostfile import (
    MAX_SLOTS_PER_HOST,
    NO_HOSTFILE,
    apply_num_nodes_and_gpus,
    fetch_hostfile,
    parse_hostfile_lines,
    parse_inclusion_exclusion,
    parse_resource_filter,
)
from .world_info import encode_world_info

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs the CLI start-up time
if TYPE_CHECKING:
    from typing import Any, Literal, Protocol
else:
    Protocol = object  # at run time `Probes` is a plain class: only the type checker uses it as a protocol

__all__ = [
    'LAUNCHERS',
    'LAUNCH_MODULE',
    'Plan',
    'Probes',
    'apply_num_nodes_and_gpus',
    'backend_command',
    'build_parser',
    'launcher_command',
    'main',
    'parse_args',
    'plan',
    'shell_line',
]

LAUNCHERS = ('pdsh', 'openmpi', 'mvapich', 'slurm', 'mpich', 'impi')
PDSH = 'pdsh'
LAUNCH_MODULE = 'dslaunch.launch'  # DeepSpeed: deepspeed.launcher.launch
DEFAULT_MASTER_PORT = 29500  # torch.distributed's default
LOCALHOST = 'localhost'
LOOPBACK = '127.0.0.1'
LOG_LEVELS = ('debug', 'info', 'warning', 'error', 'critical')


def build_parser(prog: str | None = None) -> CompatArgumentParser:
    """DeepSpeed 0.19.8's runner parser (same names, order, defaults) plus dslaunch's options."""
    p = CompatArgumentParser(
        prog=prog,
        description='Launch a distributed training job on this machine or across the hosts of a hostfile '
        '(drop-in for the deepspeed command).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        '-H',
        '--hostfile',
        type=str,
        default='/job/hostfile',
        help='MPI-style hostfile ("<host> slots=<n>" per line); if missing, run locally.',
    )
    p.add_argument(
        '-i',
        '--include',
        type=str,
        default='',
        help='Use only these hosts/slots: NAME[:SLOT[,SLOT...]][@NAME...]. Excludes --exclude.',
    )
    p.add_argument(
        '-e', '--exclude', type=str, default='', help='Leave out these hosts/slots (same syntax as --include).'
    )
    p.add_argument('--num_nodes', type=int, default=-1, help='Run on the first N hosts only.')
    p.add_argument(
        '--num_gpus',
        '--num_accelerators',
        type=int,
        default=-1,
        dest='num_gpus',
        help='Run N ranks per host (slots 0..N-1).',
    )
    p.add_argument(
        '--master_port',
        type=int,
        default=DEFAULT_MASTER_PORT,
        help='Rendezvous port of rank 0 (0: pick a free one; single machine only).',
    )
    p.add_argument(
        '--master_addr', type=str, default='', help='Rendezvous address of rank 0; empty: found from the first host.'
    )
    p.add_argument('--node_rank', type=int, default=-1, help='Index of this host in the job (with --no_ssh).')
    p.add_argument('--launcher', type=str, default=PDSH, help='Multi-node backend: ' + ', '.join(LAUNCHERS) + '.')
    p.add_argument(
        '--launcher_args',
        type=str,
        default='',
        help='Extra arguments for the backend command, as one shell-quoted string.',
    )
    p.add_argument('--module', action='store_true', help='Run the script as a module (python -m).')
    p.add_argument('--no_python', action='store_true', help='Execute the script directly, without python.')
    p.add_argument('--no_local_rank', action='store_true', help='Do not pass --local_rank to the script.')
    p.add_argument(
        '--no_ssh',
        action='store_true',
        help="Start only this host's ranks (needs --node_rank); launch the other hosts yourself.",
    )
    p.add_argument('--no_ssh_check', action='store_true', help='Skip the passwordless-ssh check.')
    p.add_argument('--force_multi', action='store_true', help='Use the multi-node backend even for one host.')
    p.add_argument(
        '--save_pid',
        action='store_true',
        help='Have the per-node launcher write its pid to /tmp/<runner pid>.deepspeed.',
    )
    p.add_argument(
        '--enable_each_rank_log', type=str, default='None', help='Directory for one log file per rank ("None": off).'
    )
    p.add_argument(
        '--autotuning',
        type=str,
        default='',
        choices=['tune', 'run'],
        help='DeepSpeed autotuning (not supported by dslaunch).',
    )
    p.add_argument('user_script', type=str, help='The training script (or module with --module).')
    p.add_argument('user_args', nargs=argparse.REMAINDER, help='Arguments for the training script.')
    p.add_argument('--bind_cores_to_rank', action='store_true', help='Pin each rank to its own CPU cores.')
    p.add_argument(
        '--bind_core_list', type=str, default=None, help='Cores to share out with --bind_cores_to_rank, e.g. 0,2-5.'
    )
    p.add_argument('--ssh_port', type=int, default=None, help='ssh port for the hosts.')
    p.add_argument(
        '--venv_script', type=str, default=None, help='Script to source on each host before launching (pdsh).'
    )
    p.add_argument('--log_level', type=str, default='info', choices=list(LOG_LEVELS), help='Launcher log level.')
    p.add_argument('-q', '--quiet', action='store_true', help='Same as --log_level error.')
    _add_runner_extensions(p)
    return p


def _add_runner_extensions(p: CompatArgumentParser) -> None:
    # Elastic flags as DeepSpeed 0.19.7 had them (0.19.8 removed them).
    p.add_extension('--elastic_training', action='store_true', help='Elastic training (dslaunch; as DeepSpeed 0.19.7).')
    p.add_extension('--min_elastic_nodes', type=int, default=-1, help='Fewest hosts for elastic training.')
    p.add_extension('--max_elastic_nodes', type=int, default=-1, help='Most hosts for elastic training.')
    p.add_extension('--max_restarts', type=int, default=None, help='Elastic: restarts after a rank failure (3).')
    p.add_extension('--rdzv_timeout', type=int, default=None, help='Elastic: seconds for a rendezvous to form (600).')
    p.add_extension(
        '--rdzv_conf', type=str, default=None, help='Elastic: c10d rendezvous options, e.g. last_call_timeout=5.'
    )
    p.add_extension('--dry_run', action='store_true', help='Print what would be launched and exit.')
    p.add_job_extensions()  # --hang_timeout and the other observability options are defined there


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """Parse runner arguments (``sys.argv[1:]`` when ``argv`` is None)."""
    return build_parser(prog).parse_args(None if argv is None else list(argv))


#: DeepSpeed's name for the hostfile line parser (``deepspeed.launcher.runner._parse_hostfile``).
_parse_hostfile = parse_hostfile_lines


def main(args: Sequence[str] | None = None) -> None:
    """DeepSpeed's ``runner.main(args)``: run the ``deepspeed`` command line ``args`` (default ``sys.argv[1:]``).

    As in DeepSpeed, a refused command line raises (``ResourceFilterError`` and the other ``ValueError``
    subclasses), a failed job exits with its status (``SystemExit``), a successful one returns None.
    """
    from .cli import run_deepspeed_cli  # not at import time: cli imports this module
    from .command_exit import shell

    code = run_deepspeed_cli(sys.argv[1:] if args is None else list(args))
    if code != 0:
        sys.exit(shell(code))  # a job stopped by signal N: 128+N (the command itself dies of it)


class Probes(Protocol):
    """Everything ``plan`` needs from the machine and the network."""

    def device_count(self) -> int:
        """GPUs on this machine (0 on a CPU-only host)."""

    def ssh_reachable(self, host: str, port: int | None) -> bool:
        """True if ``ssh host hostname`` works without a password."""

    def hostname_i(self, host: str, port: int | None) -> str:
        """Output of ``ssh host hostname -I``."""

    def backend_exists(self, name: str) -> bool:
        """True if the backend's tools (pdsh, mpirun, srun, ...) are installed."""

    def port_free(self, addr: str, port: int) -> bool:
        """True if a rendezvous server could listen on ``port`` here."""

    def free_port(self) -> int:
        """A TCP port that is free on this machine right now."""


class Plan:
    """What the runner will start.

    ``mode == 'local'``: run ``argv`` (the per-node launcher) with ``env`` on this machine.
    ``mode == 'multinode'``: build the ``backend`` command (``backend_command``) and run it
    with ``env``; ``exports`` are handed to the backend in order.

    A plain class, not a dataclass: importing `dataclasses` (and `inspect` with it) cost every
    `dslaunch` start 7 ms (docs/benchmarks.md, fix 14).
    """

    __slots__ = (
        'active',
        'args',
        'argv',
        'backend',
        'env',
        'exports',
        'hostfile_found',
        'master_addr',
        'master_port',
        'mode',
        'notes',
        'removed_env',
        'resource_pool',
        'world_info',
    )

    def __init__(self, *, mode: Literal['local', 'multinode'], args: argparse.Namespace,
                 active: dict[str, list[DeviceId]], world_info: str, resource_pool: dict[str, int],
                 master_addr: str, master_port: int, env: dict[str, str], removed_env: tuple[str, ...] = (),
                 argv: list[str] | None = None, backend: str | None = None,
                 exports: dict[str, str] | None = None, hostfile_found: bool = False,
                 notes: list[str] | None = None) -> None:
        self.mode = mode
        self.args = args  # a copy with master_addr/master_port/log_level resolved
        self.active = active
        self.world_info = world_info
        self.resource_pool = resource_pool
        self.master_addr = master_addr
        self.master_port = master_port
        self.env = env
        self.removed_env = removed_env
        self.argv = argv
        self.backend = backend
        self.exports = {} if exports is None else exports
        self.hostfile_found = hostfile_found
        self.notes = [] if notes is None else notes

    def __repr__(self) -> str:
        return f'Plan({", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)})'


def plan(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    probes: Probes,
    *,
    cwd: str | None = None,
    python: str | None = None,
    pid: int | None = None,
    env_files: Sequence[str] | None = None,
) -> Plan:
    """Decide what to launch, following DeepSpeed's ``runner.main()`` steps 1-17 in order.

    ``environ`` is not modified; ``cwd`` (default: the process's) resolves a relative
    hostfile and becomes the ``PYTHONPATH`` head in multi-node mode; ``python`` and ``pid``
    default to ``sys.executable`` and ``os.getpid()``; ``env_files`` overrides the
    ``.deepspeed_env`` search path.
    """
    env = dict(environ)
    workdir = os.path.abspath(cwd if cwd is not None else os.getcwd())
    _check_dslaunch_flags(args)
    notes: list[str] = []

    # Steps 1-2: log level, hostfile.
    log_level = 'error' if args.quiet else args.log_level
    hostfile_pool = fetch_hostfile(os.path.join(workdir, args.hostfile), warn=False)
    if hostfile_pool is None:
        # A note (printed to stdout by the CLI, where DeepSpeed's logger prints it), not a log
        # record: stderr is kept for the one error line.
        notes.append(NO_HOSTFILE % args.hostfile)

    # Step 3. Deviation: DeepSpeed turns CUDA_VISIBLE_DEVICES into --include=localhost:<v>, which
    # fails for ids >= the device count or UUIDs and, combined with --num_gpus, renumbers from 0.
    # dslaunch uses the visible ids themselves as the local slots.
    visible: list[DeviceId] | None = None
    removed: tuple[str, ...] = ()
    if hostfile_pool is None and env.get(VISIBLE_DEVICES_VAR, ''):
        visible = visible_devices(env) or []
        notes.append(
            f'{VISIBLE_DEVICES_VAR}={env[VISIBLE_DEVICES_VAR]}: local slots are devices '
            f'{",".join(map(str, visible)) or "(none)"}'
        )
        del env[VISIBLE_DEVICES_VAR]  # ranks get theirs from the launcher, as in DeepSpeed
        removed = (VISIBLE_DEVICES_VAR,)

    # Step 4 (">= 0": --num_gpus 0 counts as given, as in DeepSpeed).
    if (args.num_nodes >= 0 or args.num_gpus >= 0) and (args.include or args.exclude):
        raise ResourceFilterError('Cannot specify num_nodes/gpus with include/exclude')

    # Steps 5-7: pool, then --include/--exclude.
    cpu_only = False
    if hostfile_pool is None:
        active, local_slots, cpu_only = _local_resources(args, visible, probes, notes)
        resource_pool = {LOCALHOST: local_slots}
        # Deviation: DeepSpeed always uses 127.0.0.1 here, even over a user --master_addr.
        master_addr = args.master_addr or LOOPBACK
    else:
        resource_pool = dict(hostfile_pool)
        master_addr = args.master_addr
        filtered = parse_inclusion_exclusion(hostfile_pool, args.include, args.exclude)
        active = {host: list[DeviceId](slots) for host, slots in filtered.items()}
    if not active:
        # Deviation: DeepSpeed fails later with IndexError.
        raise ResourceFilterError(
            f'Nothing left to run on: --include/--exclude removed every slot (pool: {_describe_pool(resource_pool)})'
        )

    # Step 10.
    if args.autotuning:
        raise UsageError("--autotuning is not supported by dslaunch; use DeepSpeed's own runner to autotune")

    # Step 11, with bounds (deviation: DeepSpeed does not check --num_gpus).
    active = _limit_nodes_and_gpus(active, args.num_nodes, args.num_gpus, cpu_only=cpu_only)

    # Step 12. Deviations: an unknown launcher name is an error in every mode (DeepSpeed ignores
    # it when the job then runs locally); the backend's veto on the selection is asked below,
    # only when that backend will start the job (DeepSpeed asks before deciding, so a Slurm
    # objection could stop a job that would have run locally without Slurm).
    launcher = args.launcher.lower()
    if launcher not in LAUNCHERS:
        raise UnknownLauncherError(f'Unknown launcher {one_line(launcher)}')

    # Step 13 (DeepSpeed asserts; dslaunch raises the same text, also under python -O).
    if args.no_ssh and not 0 <= args.node_rank < len(active):
        raise UsageError('Launching training without ssh, but --node_rank is not set correctly.')

    # Steps 8-9 and 15. Deviation: ssh is used only where the job uses ssh (pdsh across hosts):
    # not for MPI/Slurm, not with --no_ssh, not when the job then runs on this machine.
    multinode = (args.force_multi or len(active) > 1) and not args.no_ssh
    if getattr(args, 'elastic_training', False) and multinode and launcher != PDSH:
        # MPI and Slurm start every rank themselves: there is no per-node agent to restart them.
        raise UsageError(
            f'--elastic_training needs per-node launchers: use --launcher pdsh, or start each host '
            f'with --no_ssh; {launcher} starts the ranks itself'
        )
    if getattr(args, 'hang_timeout', 0) and multinode and launcher != PDSH:
        # The watchdog lives in the per-node launcher, which MPI and Slurm do not run.
        raise UsageError(
            f'--hang_timeout needs per-node launchers: use --launcher pdsh, or start each host with '
            f'--no_ssh; {launcher} starts the ranks itself'
        )
    backends = _backends_module() if multinode else None
    backend = None
    if backends is not None:
        backends.launcher_class(launcher).validate_active_resources(active)  # a class method, as in DeepSpeed
        # Step 17's construction (it validates the arguments) moved up: the backend says which hosts it
        # reaches by ssh. Deviation: "not installed" is asked before ssh, and names the package.
        backend = backends.make_runner(launcher, args, encode_world_info(active), resource_pool)
    if multinode and not probes.backend_exists(launcher):
        package = f'; install {backend.backend_package()}' if backend is not None else ''
        raise LauncherError(f"launcher '{launcher}' not installed{package}")
    first_host = next(iter(active))
    # Deviation: DeepSpeed checks the first host, and only that, also where ssh is not used. Here:
    # every host the engine reaches by ssh (pdsh: all; MPI ssh bootstraps: the other hosts), at once.
    ssh_hosts = backend.ssh_hosts(env, active) if backend is not None and hostfile_pool is not None else []
    uses_ssh = multinode and launcher == PDSH and hostfile_pool is not None
    want_address = uses_ssh and not master_addr
    address = _check_ssh(args, probes, [] if args.no_ssh_check else ssh_hosts, first_host if want_address else None)
    if not master_addr:
        master_addr = _default_master_addr(args, env, first_host, address, multinode=multinode)

    master_port = _choose_port(args, probes, master_addr, multinode)

    # Step 14.
    world_info = encode_world_info(active)
    resolved = argparse.Namespace(**vars(args))
    resolved.master_addr, resolved.master_port, resolved.log_level = master_addr, master_port, log_level

    common: dict[str, Any] = {
        'args': resolved,
        'active': active,
        'world_info': world_info,
        'resource_pool': resource_pool,
        'master_addr': master_addr,
        'master_port': master_port,
        'removed_env': removed,
        'hostfile_found': hostfile_pool is not None,
        'notes': notes,
    }
    if not multinode:
        argv = launcher_command(resolved, world_info, python=python, pid=pid)
        return Plan(mode='local', env=env, argv=argv, **common)

    # Step 17 (the backend was built and asked above).
    old_path = env.get('PYTHONPATH')
    env['PYTHONPATH'] = workdir if old_path is None else f'{workdir}:{old_path}'
    from .backends.quoting import is_shell_name

    exports = collect_exports(env)
    for name in [k for k in exports if not is_shell_name(k)]:
        # e.g. PYTHON-FOO inherited from the caller: no shell can export it (DeepSpeed's pdsh
        # command has bash reject it and the job goes on without it); the env file stays strict
        del exports[name]
        notes.append(f'Not exported to the other hosts: {name!r} is not a shell variable name.')
    exports.update(read_env_files(env, paths=env_files if env_files is not None else env_file_paths(env, cwd=workdir)))
    return Plan(mode='multinode', env=env, backend=launcher, exports=exports, **common)


def launcher_command(
    args: argparse.Namespace, world_info: str, *, python: str | None = None, pid: int | None = None
) -> list[str]:
    """The per-node launcher command of local mode, flag for flag in DeepSpeed's order.

    ``args`` must carry the resolved ``master_addr``, ``master_port`` and ``log_level``.
    """
    cmd = [
        python or sys.executable,
        '-u',
        '-m',
        LAUNCH_MODULE,
        f'--world_info={world_info}',
        f'--master_addr={args.master_addr}',
        f'--master_port={args.master_port}',
    ]
    if args.no_ssh:
        cmd.append(f'--node_rank={args.node_rank}')
    if args.no_python:
        cmd.append('--no_python')
    if args.module:
        cmd.append('--module')
    if args.no_local_rank:
        cmd.append('--no_local_rank')
    if args.save_pid:
        cmd += ['--save_pid', str(os.getpid() if pid is None else pid)]
    if args.enable_each_rank_log:  # the default is the (truthy) string "None"
        cmd.append(f'--enable_each_rank_log={args.enable_each_rank_log}')
    if getattr(args, 'elastic_training', False):  # as DeepSpeed 0.19.7 forwarded them
        cmd += [
            '--enable_elastic_training',
            f'--max_elastic_nodes={args.max_elastic_nodes}',
            f'--min_elastic_nodes={args.min_elastic_nodes}',
        ]
    if args.bind_cores_to_rank:
        cmd.append('--bind_cores_to_rank')
    if args.bind_core_list is not None:
        cmd.append(f'--bind_core_list={args.bind_core_list}')
    if args.quiet:
        cmd.append('--quiet')
    cmd.append(f'--log_level={args.log_level}')
    # dslaunch options go last and only when set, so default commands equal DeepSpeed's.
    if getattr(args, 'grace_period', 30.0) != 30.0:
        cmd.append(f'--grace_period={args.grace_period}')
    if getattr(args, 'raw_output', False):
        cmd.append('--raw_output')
    if getattr(args, 'console_ranks', None) is not None:
        cmd.append(f'--console_ranks={args.console_ranks}')
    if getattr(args, 'elastic_training', False):
        from .elastic import launch_flags

        cmd += launch_flags(args)
    if getattr(args, 'report_json', None) is not None:
        cmd.append(f'--report_json={os.path.abspath(args.report_json)}')
    from .argparse_compat import job_extension_flags

    cmd += job_extension_flags(args)  # --hang_timeout, --collapse, ... when set
    return cmd + [args.user_script, *args.user_args]


def backend_command(p: Plan) -> list[str]:
    """The multi-node backend command for a ``multinode`` plan (``dslaunch.backends``).

    The backend may add variables to ``p.env``; run the command with ``p.env``.
    """
    return backend_runner_command(p)[0]


def shell_line(cmd: Sequence[str], env: Mapping[str, str], base: Mapping[str, str]) -> str:
    """``cmd`` as one shell line that runs it with ``env`` from a shell whose environment is ``base``:
    ``K=V ... cmd`` for what was set or changed, ``env -u K ... K=V ... cmd`` when something was removed.
    Every word is shell-quoted (``--dry_run`` prints it to be pasted)."""
    import shlex

    from .backends.quoting import is_shell_name

    changed = [f'{k}={v}' for k, v in env.items() if base.get(k) != v]
    removed = [k for k in base if k not in env]
    if removed or not all(is_shell_name(word.split('=', 1)[0]) for word in changed):
        prefix = ['env', *[w for k in removed for w in ('-u', k)], *changed] if removed or changed else []
        return shlex.join([*prefix, *cmd])
    assignments = [f'{word.split("=", 1)[0]}={shlex.quote(word.split("=", 1)[1])}' for word in changed]
    return ' '.join([*assignments, shlex.join(cmd)])


def backend_runner_command(p: Plan) -> tuple[list[str], Any]:
    """The backend command and the backend object (for its kill command and cleanup)."""
    if p.mode != 'multinode' or p.backend is None:
        raise ValueError('backend_command needs a multinode plan')
    from typing import cast

    from .backends import make_runner  # lazy: only multi-node jobs need the backends

    runner = make_runner(p.backend, p.args, p.world_info, p.resource_pool)
    for key, value in p.exports.items():
        try:
            runner.add_export(key, value)
        except ValueError as e:  # e.g. a NUL byte or '=' from a .deepspeed_env file
            raise DslaunchError(str(e)) from None
    # get_cmd may add to the environment (PDSH_RCMD_TYPE, ...): p.env is what must be run with.
    # Multi-node worlds come from a hostfile, so their slots are ints (UUIDs only occur locally).
    try:
        cmd = list(runner.get_cmd(p.env, cast('dict[str, list[int]]', p.active)))
    except DslaunchError:
        raise  # already one line of its own kind (a UsageError is a ValueError too)
    except ValueError as e:  # e.g. PDSH: an exported name the remote shell cannot `export` ('PYTHON-FOO')
        raise DslaunchError(str(e)) from None
    return cmd, runner


def _backends_module() -> Any:
    """``dslaunch.backends`` when it is available, else None (its checks are then skipped)."""
    try:
        from . import backends
    except ImportError:
        return None
    has_api = callable(getattr(backends, 'make_runner', None)) and callable(getattr(backends, 'launcher_class', None))
    return backends if has_api else None


def _local_resources(
    args: argparse.Namespace, visible: list[DeviceId] | None, probes: Probes, notes: list[str]
) -> tuple[dict[str, list[DeviceId]], int, bool]:
    """Steps 5-7 without a hostfile: this machine's slots, filtered; (active, slot count, CPU only)."""
    slots: list[DeviceId] = list(visible) if visible is not None else list(range(probes.device_count()))
    cpu_only = not slots
    if cpu_only:
        # Deviation: DeepSpeed stops with "no GPU resources available"; dslaunch runs CPU ranks.
        slots = [0]
        notes.append('No GPUs found: running CPU ranks on localhost.')
    if (args.include or args.exclude) and any(isinstance(s, str) for s in slots):
        raise UsageError(
            f'--include/--exclude select devices by index, but {VISIBLE_DEVICES_VAR} names '
            f'devices by UUID; list the wanted devices in {VISIBLE_DEVICES_VAR} instead'
        )
    if args.num_nodes > 1:
        raise ResourceFilterError('Num nodes is >1 but no extra nodes available via hostfile')
    filtered = parse_resource_filter({LOCALHOST: slots}, args.include, args.exclude)
    return {host: list(s) for host, s in filtered.items()}, len(slots), cpu_only


def _check_ssh(args: argparse.Namespace, probes: Probes, hosts: Sequence[str], address_of: str | None) -> str | None:
    """Every one of ``hosts`` must answer ssh; all are asked at once, with ``hostname -I`` of
    ``address_of`` (if given) alongside. Returns that output. One round trip instead of DeepSpeed's
    two: this is on the way to every rank's start."""
    calls: list[Any] = [functools.partial(probes.ssh_reachable, host, args.ssh_port) for host in hosts]
    if address_of is not None:
        calls.append(functools.partial(probes.hostname_i, address_of, args.ssh_port))
    if len(calls) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(len(calls), 64)) as pool:
            futures = [pool.submit(call) for call in calls]
        results = [f.exception() or f.result() for f in futures]
    else:
        results = []
        for call in calls:
            try:
                results.append(call())
            except LauncherError as exc:
                results.append(exc)
    for host, ok in zip(hosts, results):
        if ok is not True:  # in hostfile order: the first host that does not answer is named
            raise LauncherError(
                f'Using hostfile at {args.hostfile} but host={host} was not reachable via ssh. If you are '
                f'running with a single node please remove {args.hostfile} or setup passwordless ssh.'
            )
    if address_of is None:
        return None
    output = results[-1]
    if isinstance(output, BaseException):
        raise output
    return _first_address(str(output), address_of)


def _default_master_addr(
    args: argparse.Namespace, env: Mapping[str, str], first_host: str, address: str | None, *, multinode: bool
) -> str:
    """Step 9 when --master_addr is empty (a hostfile was found); ``address``: from ``hostname -I``."""
    if address is not None:
        return address
    if multinode and args.launcher.lower() == 'slurm' and not (args.include or args.exclude):
        # Inside an allocation srun runs on its nodes (the hostfile's names are not passed), rank 0
        # on the first one. Outside one, or with a --nodelist from the filters: the first kept host.
        from .backends.slurm import first_node

        allocated = first_node(env.get('SLURM_JOB_NODELIST', '') or env.get('SLURM_NODELIST', ''))
        if allocated:
            return allocated
    if multinode or args.no_ssh:
        return first_host  # the backend reaches it by this name, so ranks can too
    return LOOPBACK  # every rank runs here


def _check_dslaunch_flags(args: argparse.Namespace) -> None:
    """Reject impossible combinations of dslaunch's own options before touching the machine."""
    if getattr(args, 'elastic_training', False):
        if not args.master_addr:
            raise UsageError('--elastic_training needs --master_addr (the rendezvous endpoint every host joins)')
        if args.no_local_rank:
            raise UsageError('--elastic_training cannot be combined with --no_local_rank')
        low, high = args.min_elastic_nodes, args.max_elastic_nodes
        if low > 0 and high > 0 and low > high:
            raise UsageError(f'--min_elastic_nodes {low} is larger than --max_elastic_nodes {high}')
        if (getattr(args, 'max_restarts', None) or 0) < 0:
            raise UsageError(f'--max_restarts must be >= 0, got {args.max_restarts}')
        if getattr(args, 'rdzv_timeout', None) is not None and args.rdzv_timeout <= 0:
            raise UsageError(f'--rdzv_timeout must be a positive number of seconds, got {args.rdzv_timeout}')
        from .elastic import parse_rdzv_conf

        parse_rdzv_conf(getattr(args, 'rdzv_conf', None))
    else:
        given = [f'--{n}' for n in ('max_restarts', 'rdzv_timeout', 'rdzv_conf') if getattr(args, n, None) is not None]
        if given:
            raise UsageError(f'{", ".join(given)} only apply with --elastic_training')
    if not getattr(args, 'grace_period', 0.0) >= 0:  # negative or nan (inf: never SIGKILL)
        raise UsageError(f'--grace_period must be >= 0 seconds, got {args.grace_period}')
    if not getattr(args, 'hang_timeout', 0.0) >= 0:  # negative or nan
        raise UsageError(f'--hang_timeout must be >= 0 seconds (0 = off), got {args.hang_timeout}')
    ranks = getattr(args, 'console_ranks', None)
    if ranks is not None and ranks.strip().lower() != 'none':
        from .numa import parse_range_list  # same N,A-B syntax as --bind_core_list

        try:
            parse_range_list(ranks)
        except CoreBindingError as exc:
            raise UsageError(f'--console_ranks: {one_line(str(exc))}') from None


def _limit_nodes_and_gpus(
    active: dict[str, list[DeviceId]], num_nodes: int, num_gpus: int, *, cpu_only: bool
) -> dict[str, list[DeviceId]]:
    """``apply_num_nodes_and_gpus`` plus bounds: ``--num_gpus`` takes the first N slots of each host."""
    hosts = list(active)[:num_nodes] if num_nodes > 0 else list(active)
    if num_gpus <= 0:
        return {host: active[host] for host in hosts}
    if num_gpus > MAX_SLOTS_PER_HOST:
        raise ResourceFilterError(
            f'--num_gpus {num_gpus} is more ranks per host than dslaunch launches ({MAX_SLOTS_PER_HOST})'
        )
    limited: dict[str, list[DeviceId]] = {}
    for host in hosts:
        slots = active[host]
        if cpu_only:  # CPU ranks: any count goes
            limited[host] = list(range(num_gpus))
        elif num_gpus > len(slots):
            raise ResourceFilterError(f"--num_gpus {num_gpus} is more than the {len(slots)} slot(s) of host '{host}'")
        else:
            limited[host] = slots[:num_gpus]
    return limited


def _choose_port(args: argparse.Namespace, probes: Probes, master_addr: str, multinode: bool) -> int:
    """``--master_port``, with 0 meaning "pick one" and a taken port reported up front (dslaunch)."""
    port: int = args.master_port
    # Elastic: any node's agent may already host the rendezvous store on that port.
    elastic = getattr(args, 'elastic_training', False)
    local_master = not multinode and (not args.no_ssh or args.node_rank == 0) and not elastic
    if port == 0:
        if multinode or args.no_ssh:
            raise UsageError(
                '--master_port 0 (pick a free port) needs every rank on this machine; '
                'give a fixed port for multi-node jobs'
            )
        return probes.free_port()
    if local_master and 0 < port < 65536 and not probes.port_free(master_addr, port):
        raise LauncherError(
            f'--master_port {port} is already in use on this machine; '
            'choose another port, or --master_port 0 for a free one'
        )
    return port


def _first_address(hostname_i_output: str, host: str) -> str:
    words = hostname_i_output.split()
    if not words:
        # Deviation: DeepSpeed fails with IndexError here.
        raise LauncherError(f"'hostname -I' on {host} printed no address; pass --master_addr")
    return words[0]


def _describe_pool(pool: Mapping[str, int]) -> str:
    return ', '.join(f'{host}={count}' for host, count in pool.items())
