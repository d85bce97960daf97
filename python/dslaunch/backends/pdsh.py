"""PDSH: one ``dslaunch.launch`` per host, started over ssh by pdsh.

pdsh joins the command words with spaces, rewrites ``%h %u %n %%`` in them, and ssh hands the result
to the remote login shell. So every word we do not control is shell-quoted and has ``%`` doubled;
only ``--node_rank=%n`` is left for pdsh to fill in (the host's 0-based index in ``-w``).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping, MutableMapping

from ..errors import EnvFileError, LauncherError
from .base import JOB_ID_ENV, LAUNCH_MODULE, ActiveResources, MultiNodeRunner, check_job_id, which
from .quoting import is_shell_name, pdsh_word

PDSH_MAX_FAN_OUT = 1024


class PDSHRunner(MultiNodeRunner):
    name = 'pdsh'
    #: The per-node launcher module; a class attribute so tests can point it at a stub.
    launch_module = LAUNCH_MODULE

    _pdsh_prefix: list[str] | None = None
    _marked_job: str | None = None

    @classmethod
    def backend_binary(cls, path: str | None = None) -> str:
        return which('pdsh', path) or 'pdsh'

    @classmethod
    def backend_exists(cls, path: str | None = None) -> bool:
        return which('pdsh', path) is not None

    @classmethod
    def backend_package(cls) -> str:
        return "the Debian package 'pdsh' (with an ssh client)"

    def ssh_hosts(self, environment: Mapping[str, str], active_resources: ActiveResources) -> list[str]:
        return list(active_resources)  # pdsh reaches every host by ssh, this one too

    def get_cmd(self, environment: MutableMapping[str, str], active_resources: ActiveResources) -> list[str]:
        environment['PDSH_RCMD_TYPE'] = 'ssh'
        ssh_port = self.arg('ssh_port')
        if ssh_port is not None:
            # Appended with one space; DeepSpeed inserts 13 spaces and a stray line continuation.
            old = environment.get('PDSH_SSH_ARGS_APPEND', '').strip()
            environment['PDSH_SSH_ARGS_APPEND'] = f'{old} -p {ssh_port}' if old else f'-p {ssh_port}'

        prefix = [
            self.backend_binary(environment.get('PATH')),
            '-S',
            '-f',
            str(PDSH_MAX_FAN_OUT),
            '-w',
            ','.join(active_resources),
        ] + self.launcher_args()
        self._pdsh_prefix = prefix
        self._marked_job = self.job_id()

        remote: list[str] = []
        venv = self.arg('venv_script')
        if venv is not None:  # DeepSpeed tests `is not None`: --venv_script '' still writes the word
            remote.append(f'source {pdsh_word(venv)};')
        remote.append(self._exports_word())
        remote.append(f'cd {pdsh_word(os.path.abspath("."))};')
        launch = [sys.executable, '-u', '-m', self.launch_module, f'--world_info={self.world_info_base64}']
        remote += [pdsh_word(w) for w in launch]
        remote.append('--node_rank=%n')  # the one word pdsh must rewrite
        tail = [
            f'--master_addr={self.arg("master_addr")}',
            f'--master_port={self.arg("master_port")}',
            *self._launch_flags(),
            self.user_script,
            *self.user_arguments,
        ]
        remote += [pdsh_word(w) for w in tail]
        return prefix + remote

    def _exports_word(self) -> str:
        # One word, as DeepSpeed builds it ('export K=V; ' each), but with each value shell-quoted.
        exports = list(self.exports.items()) + self.marker_exports()
        for key, _ in exports:
            if not is_shell_name(key):
                raise EnvFileError(f'cannot export {key!r} through the remote shell: not a valid variable name')
        return ''.join(f'export {key}={pdsh_word(value)}; ' for key, value in exports)

    def _launch_flags(self) -> list[str]:
        """Flags for ``dslaunch.launch``: DeepSpeed's, then the ones it forgets to forward (same order as local mode)."""
        flags = []
        if self.arg('no_python'):
            flags.append('--no_python')
        if self.arg('module'):
            flags.append('--module')
        if self.arg('no_local_rank'):
            flags.append('--no_local_rank')
        if self.arg('save_pid'):
            flags += ['--save_pid', str(os.getpid())]
        if self.arg('enable_each_rank_log'):
            flags.append(f'--enable_each_rank_log={self.arg("enable_each_rank_log")}')
        if self.arg('bind_cores_to_rank'):
            flags.append('--bind_cores_to_rank')
        if self.arg('bind_core_list') is not None:
            flags.append(f'--bind_core_list={self.arg("bind_core_list")}')
        if self.arg('quiet'):
            flags.append('--quiet')
        flags.append(f'--log_level={self.arg("log_level")}')
        # dslaunch's own launch.py options, forwarded like local mode does: only when set.
        if getattr(self.args, 'grace_period', 30.0) != 30.0:
            flags.append(f'--grace_period={self.args.grace_period}')
        if getattr(self.args, 'raw_output', False):
            flags.append('--raw_output')
        if getattr(self.args, 'console_ranks', None) is not None:
            flags.append(f'--console_ranks={self.args.console_ranks}')
        if getattr(self.args, 'report_json', None) is not None:
            flags.append(f'--report_json={os.path.abspath(self.args.report_json)}')
        from dslaunch.argparse_compat import job_extension_flags

        flags += job_extension_flags(self.args)  # --hang_timeout, --collapse, ... when set
        if getattr(self.args, 'elastic_training', False):  # DeepSpeed 0.19.7's pdsh runner forwarded these
            from dslaunch.elastic import launch_flags

            flags += [
                '--enable_elastic_training',
                f'--max_elastic_nodes={self.args.max_elastic_nodes}',
                f'--min_elastic_nodes={self.args.min_elastic_nodes}',
                *launch_flags(self.args),
            ]
        return flags

    def kill_cmd(self, job_id: str, signal_name: str = 'TERM') -> list[str]:
        """A pdsh command that signals only this job's processes on every host of the last ``get_cmd``.

        They are found by the exact environment entry ``DSLAUNCH_JOB_ID=<job_id>`` (which ``get_cmd``
        exports when ``args.job_id`` is set), never by command-line pattern: other jobs, other users and
        the kill command itself do not carry it.
        """
        if self._pdsh_prefix is None:
            raise LauncherError('kill_cmd() reuses the host list of get_cmd(); call get_cmd() first')
        check_job_id(job_id)
        if job_id != self._marked_job:  # else the kill would silently find nothing
            raise LauncherError(f'job {job_id!r} was not marked: get_cmd() ran with args.job_id={self._marked_job!r}')
        sig = signal_name.upper().removeprefix('SIG')
        if f'SIG{sig}' not in signal.Signals.__members__:
            raise ValueError(f'unknown signal {signal_name!r}')
        marker = pdsh_word(f'{JOB_ID_ENV}={job_id}')
        # grep -z: environ entries are NUL-separated; -x: the whole entry; -F: no regex; -l: file names.
        snippet = (
            f'for p in $(grep -lzxF -- {marker} /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3); '
            f'do [ "$p" = "$$" ] || kill -{sig} "$p" 2>/dev/null; done; true'
        )
        return self._pdsh_prefix + [snippet]
