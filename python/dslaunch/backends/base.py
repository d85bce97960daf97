"""What every multi-node backend shares: arguments, exports, the rank helper, temp files."""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from argparse import Namespace
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from typing import Any, ClassVar

from ..errors import EnvFileError, ResourceFilterError, UsageError, printable

#: world_info order: host -> slot ids. Host order is rank order.
ActiveResources = Mapping[str, Sequence[int]]  # or {host: slot count}, read as slots 0..count-1

#: Environment marker carried by everything a job starts, so a kill can target this job only.
JOB_ID_ENV = 'DSLAUNCH_JOB_ID'
#: Per-node launcher used by PDSH (DeepSpeed: ``deepspeed.launcher.launch``).
LAUNCH_MODULE = 'dslaunch.launch'
#: Rank wrapper used by the MPI and Slurm backends (DeepSpeed: ``launcher_helper.py``, MPICH only).
HELPER_MODULE = 'dslaunch.launcher_helper'

_JOB_ID = re.compile(r'[A-Za-z0-9._:-]{1,128}\Z')

# DeepSpeed's parser defaults, for args objects that lack a field (tests, library callers).
_ARG_DEFAULTS: dict[str, Any] = {
    'launcher_args': '',
    'module': False,
    'no_python': False,
    'no_local_rank': False,
    'save_pid': False,
    'enable_each_rank_log': 'None',
    'bind_cores_to_rank': False,
    'bind_core_list': None,
    'venv_script': None,
    'ssh_port': None,
    'include': '',
    'exclude': '',
    'num_nodes': -1,
    'num_gpus': -1,
    'master_addr': '',
    'master_port': 29500,
    'hostfile': '/job/hostfile',
    'user_script': '',
    'user_args': [],
    'log_level': 'info',
    'quiet': False,
    'job_id': None,
}


def check_job_id(job_id: str) -> str:
    """Return ``job_id`` if it is safe inside a shell word and a grep pattern, else raise ValueError."""
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise ValueError(f'job id must be 1-128 characters of [A-Za-z0-9._:-], got {job_id!r}')
    return job_id


def slot_counts(active: ActiveResources) -> dict[str, int]:
    # An int is a slot count, as in the runner's resource pool: DeepSpeed's MPI backends size the job from
    # the pool and ignore active_resources, so DeepSpeed's own tests hand them the {host: count} pool there.
    return {host: slots if isinstance(slots, int) else len(slots) for host, slots in active.items()}


class MultiNodeRunner:
    """One multi-node backend: turns (args, world_info, active resources) into one command line.

    ``get_cmd`` may also change ``environment``, the environment the runner must start that command
    with (PDSH sets ``PDSH_RCMD_TYPE``; Slurm carries the exports there), so the runner must pass the
    same dict to ``Popen``.
    """

    name: ClassVar[str] = ''

    def __init__(self, args: Namespace, world_info_base64: str, resource_pool: Mapping[str, int] | None = None) -> None:
        self.args = args
        self.world_info_base64 = world_info_base64
        self.resource_pool: dict[str, int] = dict(resource_pool or {})
        self.exports: dict[str, str] = {}
        self._temp_files: list[str] = []
        self.validate_args()

    # ---- arguments -------------------------------------------------------------------------------
    def arg(self, field: str) -> Any:
        """``args.<field>``, or DeepSpeed's default when the namespace lacks it."""
        return getattr(self.args, field, _ARG_DEFAULTS.get(field))

    @property
    def user_script(self) -> str:
        return str(self.arg('user_script'))

    @property
    def user_arguments(self) -> list[str]:
        return list(self.arg('user_args') or [])

    def launcher_args(self) -> list[str]:
        try:
            return shlex.split(self.arg('launcher_args') or '')
        except ValueError as exc:  # `--launcher_args '"x'`: No closing quotation
            raise UsageError(f'--launcher_args {printable(self.arg("launcher_args"))!r}: {exc}') from None

    def job_id(self) -> str | None:
        """The job marker to export, from ``args.job_id`` (unset or empty: none)."""
        job_id = self.arg('job_id')
        return check_job_id(job_id) if job_id else None

    # ---- hooks a backend overrides ---------------------------------------------------------------
    # Class methods: the runner asks them before it builds a backend (the "not installed" check).
    @classmethod
    def backend_binary(cls, path: str | None = None) -> str:
        """The program ``get_cmd`` puts first: an absolute path when found on ``path``, else its plain name."""
        raise NotImplementedError

    @classmethod
    def backend_exists(cls, path: str | None = None) -> bool:
        """Whether this backend's launcher program is installed (looked up on ``path``, default this process's PATH)."""
        raise NotImplementedError

    @classmethod
    def backend_package(cls) -> str:
        """Where the launcher program comes from, for the "not installed" message."""
        raise NotImplementedError

    def ssh_hosts(self, environment: Mapping[str, str], active_resources: ActiveResources) -> list[str]:
        """The hosts the engine will reach over ssh, for the runner's reachability check (none by default)."""
        return []

    def validate_args(self) -> None:
        """Reject arguments this backend cannot honour (called by ``__init__``)."""

    @classmethod
    def validate_active_resources(cls, active: ActiveResources) -> None:
        """Reject a filtered world this backend cannot start. Callable on the class, as DeepSpeed's runner does."""

    def get_cmd(self, environment: MutableMapping[str, str], active_resources: ActiveResources) -> list[str]:
        raise NotImplementedError

    # ---- exports ---------------------------------------------------------------------------------
    def add_export(self, key: str, value: str) -> None:
        """Export ``key=value`` to every rank. The value is stored raw (DeepSpeed strips and quotes it)."""
        key = key.strip()  # a name cannot hold spaces; DeepSpeed strips it too
        if not key or '=' in key or '\0' in key:
            raise EnvFileError(f'cannot export {key!r}: not an environment variable name')
        if '\0' in value:
            raise EnvFileError(f'cannot export {key}: its value contains a NUL byte')
        self.exports[key] = value

    def rank_exports(self) -> list[tuple[str, str]]:
        """Exports added at ``get_cmd`` time for ranks started through the helper: MASTER_* and the job marker."""
        extra = [('MASTER_ADDR', str(self.arg('master_addr'))), ('MASTER_PORT', str(self.arg('master_port')))]
        return extra + self.marker_exports()

    def genv_words(self, total: int, per_host: int, *extra: tuple[str, str]) -> list[str]:
        """Hydra's (MPICH, Intel MPI) ``-genv NAME VALUE`` words, value unchanged: the exports, then
        MASTER_ADDR, MASTER_PORT, WORLD_SIZE, LOCAL_SIZE, ``extra`` and the job marker."""
        pairs = [
            *self.exports.items(),
            ('MASTER_ADDR', str(self.arg('master_addr'))),
            ('MASTER_PORT', str(self.arg('master_port'))),
            ('WORLD_SIZE', str(total)),
            ('LOCAL_SIZE', str(per_host)),
            *extra,
            *self.marker_exports(),
        ]
        return [word for key, value in pairs for word in ('-genv', key, value)]

    def marker_exports(self) -> list[tuple[str, str]]:
        job_id = self.job_id()
        return [(JOB_ID_ENV, job_id)] if job_id else []

    # ---- the rank command ------------------------------------------------------------------------
    def helper_cmd(self, extra_flags: Iterable[str] = ()) -> list[str]:
        """``python -u -m dslaunch.launcher_helper --launcher <name> [flags] script args``.

        The helper maps the engine's rank variables to RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_SIZE and then
        runs the script (``--module``: ``python -m``; ``--no_python``: exec it directly).
        """
        flags = ['--launcher', self.name]
        if self.arg('module'):
            flags.append('--module')
        if self.arg('no_python'):
            flags.append('--no_python')
        flags += list(extra_flags)
        return [sys.executable, '-u', '-m', HELPER_MODULE, *flags, self.user_script, *self.user_arguments]

    # ---- shared checks ---------------------------------------------------------------------------
    def reject_filters(self) -> None:
        """DeepSpeed's refusal of include/exclude/num_* for backends that take whole hosts only."""
        if self.arg('include') != '' or self.arg('exclude') != '':
            raise ResourceFilterError(f'{self.name} backend does not support worker include/exclusion')
        if self.arg('num_nodes') != -1 or self.arg('num_gpus') != -1:
            raise ResourceFilterError(f'{self.name} backend does not support limiting num nodes/gpus')

    @classmethod
    def require_leading_slots(cls, active: ActiveResources) -> None:
        """Every host must keep slots 0..k-1: an engine places k ranks per host as local ranks 0..k-1,
        which use devices 0..k-1; it cannot run a world of other device ids (`CUDA_VISIBLE_DEVICES=1,3`)."""
        for host, slots in active.items():
            if not isinstance(slots, int) and list(slots) != list(range(len(slots))):  # a count is slots 0..n-1
                raise ResourceFilterError(
                    f'{cls.name} backend cannot select specific device ids, got {list(slots)} on {host}. '
                    'Filter whole hosts, or keep the first N slots on every host.'
                )

    def reject_unequal_pool(self, message: str) -> None:
        """DeepSpeed's check of the hostfile's slot counts (made in its ``get_cmd``), made when the backend is
        built: the runner's plan then refuses the world before any ssh, with DeepSpeed's text."""
        if self.resource_pool:
            self.equal_slots({host: range(n) for host, n in self.resource_pool.items()}, message)

    @staticmethod
    def equal_slots(active: ActiveResources, message: str) -> tuple[int, int]:
        """(total, per host) when every host has the same slot count, else ResourceFilterError(message)."""
        counts = list(slot_counts(active).values())
        if not counts or any(n != counts[0] for n in counts):
            raise ResourceFilterError(message)
        return sum(counts), counts[0]

    def ssh_bootstrap_hosts(
        self,
        environment: Mapping[str, str],
        active_resources: ActiveResources,
        bootstrap_flags: Sequence[str],
        bootstrap_env: Sequence[str],
    ) -> list[str]:
        """``ssh_hosts`` for an MPI launcher that starts its remote daemons with ssh by default.

        None when the engine will not use ssh: inside a batch job (mpirun then starts them through
        the batch system: srun, qrsh, blaunch, ...), or when the user chose the bootstrap
        (``bootstrap_flags`` in ``--launcher_args``, ``bootstrap_env`` in the environment). The
        launch host itself is skipped: mpirun starts its ranks without ssh.
        """
        if any(environment.get(name) for name in (*BATCH_JOB_VARS, *bootstrap_env)):
            return []
        words = self.launcher_args()
        if any(w in bootstrap_flags for w in words) or any(
            a in ('-mca', '--mca') and b in bootstrap_flags for a, b in itertools.pairwise(words)
        ):
            return []
        return [host for host in active_resources if not is_this_host(host)]

    # ---- signals ---------------------------------------------------------------------------------
    def forwarded_signal(self, sig: int) -> int:
        """The signal to send the backend command when the runner receives ``sig`` (Ctrl-C: SIGINT).

        Most launchers stop the job on SIGINT; srun treats a single SIGINT as a status request.
        SIGQUIT (Ctrl-\\) is the engine's SIGTERM: its own default would end it without its cleanup.
        """
        return int(signal.SIGTERM) if sig == signal.SIGQUIT else sig

    # ---- temp files ------------------------------------------------------------------------------
    def write_temp_file(self, prefix: str, text: str) -> str:
        """A new per-job file (never a fixed path another job could overwrite); removed by ``cleanup``."""
        fd, path = tempfile.mkstemp(prefix=prefix)
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            f.write(text)
        if not self._temp_files:
            atexit.register(self.cleanup)  # also holds a reference until exit, so no early GC removal
        self._temp_files.append(path)
        return path

    def cleanup(self) -> None:
        """Remove the temp files ``get_cmd`` wrote. Call after the launched command has exited."""
        while self._temp_files:
            try:
                os.unlink(self._temp_files.pop())
            except FileNotFoundError:
                pass

    def keep_temp_files(self) -> list[str]:
        """Stop managing the temp files ``get_cmd`` wrote and return their paths: for ``--dry_run``,
        whose printed command names them and must still work when pasted after we exit."""
        kept, self._temp_files = self._temp_files, []
        return kept


#: Set inside a batch job, where MPI launchers start their remote daemons through the batch system.
BATCH_JOB_VARS = ('SLURM_JOB_ID', 'SLURM_JOBID', 'PBS_JOBID', 'LSB_JOBID', 'PE_HOSTFILE', 'COBALT_JOBID', 'FLUX_URI')

#: How a user picks the way Hydra (MPICH, Intel MPI, MVAPICH2) or Open MPI reaches the hosts; when
#: given, the runner leaves reachability to the engine.
HYDRA_BOOTSTRAP = ('-launcher', '-bootstrap', '-launcher-exec', '-bootstrap-exec')
HYDRA_BOOTSTRAP_ENV = ('HYDRA_LAUNCHER', 'HYDRA_BOOTSTRAP', 'HYDRA_LAUNCHER_EXEC', 'HYDRA_BOOTSTRAP_EXEC')
OMPI_BOOTSTRAP = ('plm', 'plm_rsh_agent', 'orte_rsh_agent')  # --mca NAME VALUE
OMPI_BOOTSTRAP_ENV = ('OMPI_MCA_plm', 'OMPI_MCA_plm_rsh_agent', 'OMPI_MCA_orte_rsh_agent')


def is_this_host(host: str) -> bool:
    """Whether ``host`` names this machine (loopback or our own hostname)."""
    name = socket.gethostname()
    return host in ('localhost', '127.0.0.1', '::1', name, name.split('.')[0])


def which_in_dir(program: str, directory: str) -> str | None:
    """``directory/program`` if it is an executable file."""
    candidate = os.path.join(directory, program)
    return candidate if os.path.isfile(candidate) and os.access(candidate, os.X_OK) else None


def which(program: str, path: str | None = None) -> str | None:
    return shutil.which(program, path=path)


@functools.lru_cache(maxsize=32)
def version_text(program: str) -> str:
    """``program --version`` output ('' if it cannot run); tells apart launchers that share a name."""
    try:
        done = subprocess.run(
            [program, '--version'], stdin=subprocess.DEVNULL, capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ''
    return (done.stdout + done.stderr).decode('utf-8', 'replace')
