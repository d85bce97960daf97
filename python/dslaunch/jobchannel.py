"""The channel between the runner and its per-node launchers (multi-node jobs).

DeepSpeed's runner learns of a failure only when pdsh returns, i.e. when every host is done:
a rank failing on host 2 leaves host 1's ranks blocked in a collective until its timeout.
Here each per-node launcher (PDSH), or each rank's helper (MPI, Slurm: `launcher_helper`),
holds a TCP connection to the runner:

- launcher -> runner: `hello`, then `fail` the moment one of its ranks fails (with the rank, its
  exit status and its last stderr lines), and `done` with its exit status;
- runner -> launchers: `stop` with a signal (a failure elsewhere, or Ctrl-C/SIGTERM on the
  runner): each launcher forwards it to its ranks and tears them down.
- A launcher whose connection drops (the runner was killed, even by SIGKILL) tears its ranks down.

Messages are JSON lines. The runner listens on a free port and gives the launchers its address
and a random token through the environment (`DSLAUNCH_REPORT_TO`, `DSLAUNCH_JOB_TOKEN`); a
connection without the token is dropped, so two jobs never act on each other.
"""

from __future__ import annotations

import errno
import json
import selectors
import socket
import threading
from collections.abc import Callable

from dslaunch.channel_vars import REPORT_TO_ENV, TOKEN_ENV

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs the CLI start-up time
if TYPE_CHECKING:
    from typing import Any


def _send(sock: socket.socket, msg: dict[str, Any]) -> bool:
    try:
        sock.sendall(json.dumps(msg).encode() + b'\n')
        return True
    except OSError:
        return False


def address_towards(host: str) -> str:
    """Our IP address on the route to `host` (no packet is sent: UDP connect only picks a route)."""
    try:
        target = socket.gethostbyname(host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))
            return str(s.getsockname()[0])
    except OSError:
        return '127.0.0.1'


class JobServer:
    """The runner's end: accepts the launchers, collects failures, broadcasts stops."""

    def __init__(self, on_failure: Callable[[dict[str, Any]], None] | None = None) -> None:
        # secrets (hmac, OpenSSL: ~5 ms) is imported here, by the runner: every per-node launcher
        # and rank helper imports this module too, for its client, which needs no token of its own.
        import secrets

        self.token = secrets.token_hex(16)
        self.first_failure: dict[str, Any] | None = None
        self.done: dict[int, int] = {}
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when a connection closes
        self._clients: dict[socket.socket, int | None] = {}
        self._stop_sent: dict[str, Any] | None = None
        self._paused: dict[str, Any] | None = None  # a SIGTSTP not yet followed by SIGCONT
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(('0.0.0.0', 0))
        self._listener.listen(128)
        self.port = int(self._listener.getsockname()[1])
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name='dslaunch-jobserver', daemon=True)
        self._thread.start()

    def env_for(self, first_host: str) -> dict[str, str]:
        """What the launchers need to find us."""
        return {REPORT_TO_ENV: f'{address_towards(first_host)}:{self.port}', TOKEN_ENV: self.token}

    def connected(self) -> int:
        with self._lock:
            return sum(1 for n in self._clients.values() if n is not None)

    def wait_idle(self, timeout: float) -> bool:
        """Waits until every connection is closed, so that reports sent just before a launcher or
        rank exited are in `first_failure`; False if some is still open after `timeout`."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._clients, timeout)

    def stop(self, sig: int) -> None:
        """Tell every launcher (now and any that connects later) to stop its ranks with `sig`."""
        msg = {'t': 'stop', 'sig': sig}
        with self._lock:
            self._stop_sent = msg
            clients = [c for c, n in self._clients.items() if n is not None]
        for c in clients:
            _send(c, msg)

    def signal(self, sig: int) -> None:
        """Pass `sig` on to every launcher's ranks without stopping the job: the runner's Ctrl-Z
        (SIGTSTP, also sent to launchers that connect while it holds) and `fg`/`bg` (SIGCONT)."""
        from signal import SIGTSTP

        msg = {'t': 'signal', 'sig': sig}
        with self._lock:
            self._paused = msg if sig == SIGTSTP else None
            clients = [c for c, n in self._clients.items() if n is not None]
        for c in clients:
            _send(c, msg)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake_w.send(b'x')
        self._thread.join(timeout=5)
        for c in list(self._clients):
            c.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def _serve(self) -> None:
        buffers: dict[socket.socket, bytes] = {}
        while not self._closed:
            for key, _ in self._sel.select():
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._wake_r:
                    continue
                if sock is self._listener:
                    conn, _ = sock.accept()
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self._sel.register(conn, selectors.EVENT_READ)
                    with self._lock:
                        self._clients[conn] = None
                    buffers[conn] = b''
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b''
                if not data:
                    self._drop(sock, buffers)
                    continue
                buffers[sock] += data
                *lines, buffers[sock] = buffers[sock].split(b'\n')
                for line in lines:
                    if not self._handle(sock, line):
                        self._drop(sock, buffers)
                        break

    def _drop(self, sock: socket.socket, buffers: dict[socket.socket, bytes]) -> None:
        self._sel.unregister(sock)
        buffers.pop(sock, None)
        with self._lock:
            self._clients.pop(sock, None)
            self._idle.notify_all()
        sock.close()

    def _handle(self, sock: socket.socket, line: bytes) -> bool:
        try:
            msg = json.loads(line)
        except ValueError:
            return False
        with self._lock:
            node = self._clients.get(sock)
        if node is None:
            import secrets

            if msg.get('t') != 'hello' or not secrets.compare_digest(str(msg.get('token', '')), self.token):
                return False
            with self._lock:
                self._clients[sock] = int(msg.get('node', -1))
                pending = self._stop_sent or self._paused
            if pending:
                _send(sock, pending)
            return True
        if msg.get('t') == 'fail':
            first = False
            with self._lock:
                if self.first_failure is None:
                    self.first_failure = msg
                    first = True
            if first and self._on_failure:
                self._on_failure(msg)
        elif msg.get('t') == 'done':
            self.done[node] = int(msg.get('code', 0))
        return True


class JobClient:
    """A per-node launcher's end. `on_stop(sig)` is called (from a thread) when the runner asks
    for a stop or the connection to it is lost; `on_signal(sig)`, when the runner passes on a
    signal that does not stop the job (SIGTSTP, SIGCONT)."""

    def __init__(
        self,
        address: str,
        token: str,
        node_rank: int,
        on_stop: Callable[[int], None],
        timeout: float = 15.0,
        on_signal: Callable[[int], None] | None = None,
    ) -> None:
        host, _, port = address.rpartition(':')
        if not port.isdigit() or int(port) > 65535:
            raise OSError(errno.EINVAL, f'not a HOST:PORT address: {address!r}')
        self._sock = socket.create_connection((host, int(port)), timeout=timeout)
        self._sock.settimeout(None)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._node = node_rank
        self._on_stop = on_stop
        self._on_signal = on_signal
        self._finished = False
        #: The runner asked for a stop (another host failed, or Ctrl-C): the job's status is its.
        self.stopped_by_runner = False
        _send(self._sock, {'t': 'hello', 'token': token, 'node': node_rank})
        self._thread = threading.Thread(target=self._listen, name='dslaunch-jobclient', daemon=True)
        self._thread.start()

    def report_failure(
        self, rank: int, returncode: int | None, exit_status: int | None, stderr_tail: list[str]
    ) -> None:
        _send(
            self._sock,
            {
                't': 'fail',
                'node': self._node,
                'host': socket.gethostname(),
                'rank': rank,
                'returncode': returncode,
                'exit_status': exit_status,
                'stderr_tail': stderr_tail[-20:],
            },
        )

    def report_hang(self, quiet_for: float, suspects: list[int | str], exit_status: int) -> None:
        """This node's hang watchdog stopped its ranks (`--hang_timeout`): the job hangs."""
        _send(
            self._sock,
            {
                't': 'fail',
                'kind': 'hang',
                'node': self._node,
                'host': socket.gethostname(),
                'rank': None,
                'exit_status': exit_status,
                'quiet_for': quiet_for,
                'suspects': suspects[:16],
            },
        )

    def report_done(self, code: int) -> None:
        self._finished = True
        _send(self._sock, {'t': 'done', 'node': self._node, 'code': code})
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self._finished = True
        self._sock.close()

    def _listen(self) -> None:
        import signal

        buf = b''
        while True:
            try:
                data = self._sock.recv(4096)
            except OSError:
                data = b''
            if not data:
                if not self._finished:
                    self._on_stop(int(signal.SIGTERM))  # the runner is gone: nobody will collect this job
                return
            buf += data
            *lines, buf = buf.split(b'\n')
            for line in lines:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if msg.get('t') == 'stop':
                    self.stopped_by_runner = True
                    self._on_stop(int(msg.get('sig', signal.SIGTERM)))
                elif msg.get('t') == 'signal' and self._on_signal is not None:
                    self._on_signal(int(msg.get('sig', 0)))  # Ctrl-Z / fg on the runner
