"""Per-rank helper for MPI backends (DeepSpeed's ``launcher_helper.py``, spec section 10).

``mpirun`` starts this helper once per rank; it turns the MPI launcher's rank variables into
``RANK``/``LOCAL_RANK`` and runs the training script. DeepSpeed only knows MPICH/PMI names;
dslaunch also reads OpenMPI, MVAPICH, Slurm and Intel MPI (Hydra) names and adds
``WORLD_SIZE``/``LOCAL_SIZE`` when the launcher says them. Where DeepSpeed's names are
present the result is DeepSpeed's. Unlike DeepSpeed (always exit 0) the helper exits with
the script's status, 256-N if it died from signal N (as DeepSpeed's launch.py exits).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from types import FrameType

from .argparse_compat import CompatArgumentParser
from .errors import DslaunchError, EnvMappingError, UnknownLauncherError, UsageError, one_line
from .signal_policy import STOP_SIGNALS, not_ignored

__all__ = ['HELPER_LAUNCHERS', 'bind_cores', 'build_parser', 'child_argv', 'child_env', 'env_mapping', 'main', 'parse_args']

HELPER_LAUNCHERS = ('mpich', 'impi', 'openmpi', 'mvapich', 'slurm')

# DeepSpeed's lists first: when any of them is set, all set ones must agree and win.
_RANK_NAMES = ('PMIX_RANK', 'PMI_RANK')
_LOCAL_RANK_NAMES = ('PALS_LOCAL_RANKID', 'MPI_LOCALRANKID')
# dslaunch's fallbacks, first present wins: OpenMPI, MVAPICH, Slurm.
_RANK_FALLBACKS = ('OMPI_COMM_WORLD_RANK', 'MV2_COMM_WORLD_RANK', 'SLURM_PROCID')
_LOCAL_RANK_FALLBACKS = ('OMPI_COMM_WORLD_LOCAL_RANK', 'MV2_COMM_WORLD_LOCAL_RANK', 'SLURM_LOCALID')
_WORLD_SIZE_NAMES = ('PMI_SIZE', 'OMPI_COMM_WORLD_SIZE', 'MV2_COMM_WORLD_SIZE', 'SLURM_NTASKS', 'SLURM_NPROCS')
_LOCAL_SIZE_NAMES = (
    'MPI_LOCALNRANKS',
    'OMPI_COMM_WORLD_LOCAL_SIZE',
    'MV2_COMM_WORLD_LOCAL_SIZE',
    'SLURM_NTASKS_PER_NODE',
)


def build_parser(prog: str | None = None) -> CompatArgumentParser:
    """DeepSpeed 0.19.8's launcher_helper.py parser."""
    p = CompatArgumentParser(prog=prog, description='Map MPI rank variables to RANK/LOCAL_RANK and run the script.')
    p.add_argument('--launcher', type=str, default='mpich', help='Backend that started this process.')
    p.add_argument('--module', action='store_true', help='Run the script as a module (python -m).')
    p.add_argument('--no_python', action='store_true', help='Execute the script directly, without python.')
    p.add_argument('user_script', type=str, help='The training script (or module with --module).')
    p.add_argument('user_args', nargs=argparse.REMAINDER, help='Arguments for the training script.')
    # The IMPI backend passes these (DeepSpeed bound cores in its per-rank MPMD segments).
    p.add_argument('--bind_cores_to_rank', action='store_true', help='Pin this rank to its share of the cores (numactl).')
    p.add_argument('--bind_core_list', type=str, default=None, help='Cores to share out, e.g. 0,2-5.')
    return p


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """Parse helper arguments (``sys.argv[1:]`` when ``argv`` is None)."""
    return build_parser(prog).parse_args(None if argv is None else list(argv))


def env_mapping(environ: Mapping[str, str]) -> dict[str, str]:
    """``RANK`` and ``LOCAL_RANK`` (plus ``WORLD_SIZE``/``LOCAL_SIZE`` when known) for this rank.

    Only the new variables are returned; ``child_env`` merges them. Errors are ``OSError``
    subclasses with DeepSpeed's texts.
    """
    rank = _agreed(environ, _RANK_NAMES, "rank number doesn't match!")
    if rank is None:
        rank = _first(environ, _RANK_FALLBACKS)
    if rank is None:
        raise EnvMappingError('rank number is not in current env!')
    local_rank = _agreed(environ, _LOCAL_RANK_NAMES, "local_rank number doesn't match!")
    if local_rank is None:
        local_rank = _first(environ, _LOCAL_RANK_FALLBACKS)
    if local_rank is None:
        raise EnvMappingError('rank number is not in current env!')  # sic: DeepSpeed's text for both
    mapped = {'RANK': rank, 'LOCAL_RANK': local_rank}
    world_size = _first(environ, _WORLD_SIZE_NAMES)
    if world_size is not None:
        mapped['WORLD_SIZE'] = world_size
    local_size = _first(environ, _LOCAL_SIZE_NAMES)
    if local_size is None:
        local_size = _slurm_local_size(environ)
    if local_size is not None:
        mapped['LOCAL_SIZE'] = local_size
    return mapped


def child_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The script's environment: ranks always from the MPI launcher (as DeepSpeed); sizes only
    where the backend command did not set them already (MPICH/IMPI pass them with -genv)."""
    mapped = env_mapping(environ)
    env = dict(environ)
    env['RANK'], env['LOCAL_RANK'] = mapped.pop('RANK'), mapped.pop('LOCAL_RANK')
    for key, value in mapped.items():
        env.setdefault(key, value)
    return env


def child_argv(args: argparse.Namespace, *, python: str | None = None) -> list[str]:
    """``python -u [-m] script args``, or ``script args`` with ``--no_python``."""
    if args.no_python and args.module:
        raise UsageError("Don't use both the '--no_python' flag and the '--module' flag at the same time.")
    if args.no_python:
        return [args.user_script, *args.user_args]
    return [python or sys.executable, '-u', *(['-m'] if args.module else []), args.user_script, *args.user_args]


def bind_cores(args: argparse.Namespace, env: dict[str, str]) -> list[str]:
    """DeepSpeed's IMPI core binding, done on this node: the ``numactl`` prefix for LOCAL_RANK of
    LOCAL_SIZE ranks; sets ``OMP_NUM_THREADS`` in ``env`` to the cores per rank (DeepSpeed: ``-genv``)."""
    from .numa import get_numactl_cmd  # only for core binding: not on the start path

    local_size, local_rank = env.get('LOCAL_SIZE', ''), env.get('LOCAL_RANK', '')
    if not (local_size.isdigit() and local_rank.isdigit()):
        raise UsageError('--bind_cores_to_rank needs LOCAL_SIZE and LOCAL_RANK (ranks per node, this rank)')
    cores_per_rank, prefix = get_numactl_cmd(args.bind_core_list, int(local_size), int(local_rank), environ=env)
    env['OMP_NUM_THREADS'] = str(cores_per_rank)
    return prefix


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the script for this rank; return its exit status (256-N after signal N)."""
    args = parse_args(argv)
    try:
        if args.launcher.lower() not in HELPER_LAUNCHERS:
            raise UnknownLauncherError(f'Unknown launcher {one_line(args.launcher.lower())}')
        env = child_env(os.environ if environ is None else environ)
        cmd = child_argv(args)
        if args.bind_cores_to_rank:
            cmd = bind_cores(args, env) + cmd
    except DslaunchError as exc:
        print(f'{os.path.basename(sys.argv[0])}: error: {exc}', file=sys.stderr)
        return exc.exit_code
    return _run(cmd, env)


def _run(cmd: list[str], env: dict[str, str]) -> int:
    """Runs the script; under a dslaunch runner (the job channel's variables are set) reports its
    failure at once and obeys the runner's stop, as the per-node launcher does under PDSH: MPICH
    and Intel MPI never stop the other ranks when one fails, Open MPI takes seconds, srun -K exits
    143 and Intel MPI 255 instead of the rank's code."""
    from . import jobchannel
    from .channel_vars import REPORT_TO_ENV, TOKEN_ENV

    report_to, token = env.pop(REPORT_TO_ENV, None), env.pop(TOKEN_ENV, None)
    lock = threading.Lock()
    stops: list[int] = []
    paused: list[bool] = []  # [True] while the runner's Ctrl-Z holds
    child: subprocess.Popen[bytes] | None = None

    def stop(sig: int) -> None:  # from the runner's thread: a failure elsewhere, Ctrl-C, or the runner gone
        with lock:
            stops.append(sig)
            if child is not None and child.poll() is None:
                child.send_signal(sig)
                if paused:
                    child.send_signal(signal.SIGCONT)  # a stopped script acts on it only once continued

    def pass_on(sig: int) -> None:  # the runner's Ctrl-Z or fg/bg: the script pauses or resumes
        with lock:
            paused[:] = [True] if sig == signal.SIGTSTP else []
            if child is not None and child.poll() is None:
                # SIGSTOP for SIGTSTP: the engines start ranks in process groups with no parent in
                # their session (orphaned), where the kernel discards a SIGTSTP (measured: MPICH).
                child.send_signal(signal.SIGSTOP if sig == signal.SIGTSTP else sig)

    client = None
    if report_to and token:
        try:
            client = jobchannel.JobClient(report_to, token, -1, stop, on_signal=pass_on)
        except OSError as exc:
            print(f'launcher_helper: cannot reach the dslaunch runner at {report_to}: {exc.strerror or exc}',
                  file=sys.stderr)  # fmt: skip
            return 1
    try:
        with lock:
            # close_fds=False: MPI's PMI channel can be an inherited descriptor (PMI_FD).
            child = subprocess.Popen(cmd, env=env, close_fds=False)
            if stops:
                child.send_signal(stops[0])  # a stop that came while the script was starting
    except OSError as exc:
        print(f'launcher_helper: cannot run {cmd[0]}: {exc.strerror or exc}', file=sys.stderr)
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        if client is not None:
            client.report_failure(int(env.get('RANK', -1)), code, code, [])
            client.report_done(code)
        return code

    def forward(signum: int, _frame: FrameType | None) -> None:
        # mpirun signals this process; the script must get it too instead of being orphaned.
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in not_ignored(STOP_SIGNALS)}
    try:
        returncode = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = returncode & 0xFF  # 256-N after signal N, as the launcher's (command_exit)
    if client is None:
        return code
    if stops:
        # Stopped by the runner, which knows why and sets the job's status itself. A non-zero status
        # here would only start the engine's own, slower abort (Open MPI: 1-3 s; srun: killing the step).
        client.report_done(code)
        return 0
    if code != 0:
        client.report_failure(int(env.get('RANK', -1)), returncode, code, [])
    client.report_done(code)
    return code


def _agreed(environ: Mapping[str, str], names: Sequence[str], mismatch: str) -> str | None:
    """The value all set ``names`` share; None if none is set."""
    values = [environ[name] for name in names if name in environ]
    if any(v != values[0] for v in values[1:]):
        raise EnvMappingError(mismatch)
    return values[0] if values else None


def _first(environ: Mapping[str, str], names: Sequence[str]) -> str | None:
    for name in names:
        if name in environ:
            return environ[name]
    return None


def _slurm_local_size(environ: Mapping[str, str]) -> str | None:
    """Tasks on this node from ``SLURM_TASKS_PER_NODE`` (e.g. ``2(x3),1``) and ``SLURM_NODEID``."""
    spec, node = environ.get('SLURM_TASKS_PER_NODE'), environ.get('SLURM_NODEID')
    if spec is None or node is None or not node.isdigit():
        return None
    remaining = int(node)  # nodes still to skip
    for part in spec.split(','):
        count, _, repeat = part.partition('(x')
        times = repeat[:-1] if repeat.endswith(')') else None
        if not count.isdigit() or (repeat and not (times and times.isdigit())):
            return None
        span = int(times) if times else 1
        if remaining < span:
            return count
        remaining -= span
    return None


if __name__ == '__main__':
    sys.exit(main())
