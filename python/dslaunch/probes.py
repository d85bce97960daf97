"""The real ``runner.Probes``: what the runner asks the machine and the network.

Every probe is lazy and bounded: nothing runs unless ``runner.plan`` needs the answer, and
ssh calls have timeouts (DeepSpeed's have none, so an unreachable host hangs the runner).
"""

from __future__ import annotations

# The C module behind `socket`: that one turns its constants into enums on import, 3 ms of every
# CLI start, and the port checks below need none of it.
import _socket
import os
from collections.abc import Mapping

from .devices import gpu_count
from .errors import LauncherError

__all__ = ['SSH_CONNECT_TIMEOUT', 'SystemProbes']

#: Seconds the reachability check waits for a host's sshd to answer (DeepSpeed: no limit).
SSH_CONNECT_TIMEOUT = 5


class SystemProbes:
    """Probes backed by this machine (``which``, ``ssh``, sockets, ``devices.gpu_count``)."""

    def __init__(self, environ: Mapping[str, str] | None = None, *, ssh_timeout: float = 30.0) -> None:
        self.environ = os.environ if environ is None else environ
        self.ssh_timeout = ssh_timeout

    def device_count(self) -> int:
        return gpu_count(self.environ)

    def ssh_reachable(self, host: str, port: int | None) -> bool:
        import subprocess  # only multi-node jobs run ssh: not imported on the CLI start path

        cmd = ['ssh', '-o', 'PasswordAuthentication=no', '-o', f'ConnectTimeout={SSH_CONNECT_TIMEOUT}',
               *_port_args(port), host, 'hostname']  # fmt: skip
        try:
            done = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=min(self.ssh_timeout, 2 * SSH_CONNECT_TIMEOUT),
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0

    def hostname_i(self, host: str, port: int | None) -> str:
        import subprocess

        cmd = ['ssh', '-o', f'ConnectTimeout={SSH_CONNECT_TIMEOUT}', *_port_args(port), host, 'hostname', '-I']
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
        """Asks the backend for the program it will run (DeepSpeed looks for `mpirun` for MPICH and
        Intel MPI, which Open MPI's satisfies, and for `sinfo` for Slurm)."""
        from .backends import LAUNCHERS

        backend = LAUNCHERS.get(name)
        return backend is not None and backend.backend_exists(self.environ.get('PATH'))

    def port_free(self, addr: str, port: int) -> bool:
        # The rendezvous server listens on every interface, so test the wildcard address;
        # SO_REUSEADDR makes sockets in TIME_WAIT not count as "taken", as for the real server.
        del addr
        sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        try:
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
            sock.bind(('', port))
        except OSError:
            return False
        finally:
            sock.close()
        return True

    def free_port(self) -> int:
        sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        try:
            sock.bind(('', 0))
            return int(sock.getsockname()[1])
        finally:
            sock.close()


def _port_args(port: int | None) -> list[str]:
    return ['-p', str(port)] if port else []  # DeepSpeed tests truthiness too
