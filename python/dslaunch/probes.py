"""The real ``runner.Probes``: what the runner asks the machine and the network.

Every probe is lazy and bounded: nothing runs unless ``runner.plan`` needs the answer, and
ssh calls have timeouts (DeepSpeed's have none, so an unreachable host hangs the runner).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Mapping

from .devices import gpu_count
from .errors import LauncherError

__all__ = ['BACKEND_TOOLS', 'SystemProbes']

# The tool whose presence means "this backend is installed" (DeepSpeed's backend_exists checks).
BACKEND_TOOLS = {'pdsh': 'pdsh', 'openmpi': 'ompi_info', 'mpich': 'mpirun', 'impi': 'mpirun', 'slurm': 'sinfo'}


class SystemProbes:
    """Probes backed by this machine (``which``, ``ssh``, sockets, ``devices.gpu_count``)."""

    def __init__(self, environ: Mapping[str, str] | None = None, *, ssh_timeout: float = 30.0) -> None:
        self.environ = os.environ if environ is None else environ
        self.ssh_timeout = ssh_timeout

    def device_count(self) -> int:
        return gpu_count(self.environ)

    def ssh_reachable(self, host: str, port: int | None) -> bool:
        cmd = ['ssh', '-o', 'PasswordAuthentication=no', *_port_args(port), host, 'hostname']
        try:
            done = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=self.ssh_timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0

    def hostname_i(self, host: str, port: int | None) -> str:
        cmd = ['ssh', *_port_args(port), host, 'hostname', '-I']
        try:
            done = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=self.ssh_timeout, check=True
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise LauncherError(
                f"Unable to detect suitable master address via 'hostname -I' on {host} "
                f'({exc}); please pass --master_addr'
            ) from None
        return done.stdout.decode('utf-8', errors='replace')

    def backend_exists(self, name: str) -> bool:
        if name == 'mvapich':
            return _is_mvapich_gdr()
        tool = BACKEND_TOOLS.get(name)
        return tool is not None and shutil.which(tool) is not None

    def port_free(self, addr: str, port: int) -> bool:
        # The rendezvous server listens on every interface, so test the wildcard address;
        # SO_REUSEADDR makes sockets in TIME_WAIT not count as "taken", as for the real server.
        del addr
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(('', port))
            except OSError:
                return False
        return True

    def free_port(self) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(('', 0))
            return int(sock.getsockname()[1])


def _port_args(port: int | None) -> list[str]:
    return ['-p', str(port)] if port else []  # DeepSpeed tests truthiness too


def _is_mvapich_gdr() -> bool:
    """DeepSpeed's MVAPICH check: ``mpiname`` must report MVAPICH2-GDR."""
    mpiname = shutil.which('mpiname')
    if mpiname is None:
        return False
    try:
        out = subprocess.run([mpiname], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return 'MVAPICH2-GDR' in out.stdout
