"""Real-/proc utilities shared by the core tests: polling, process state, the launcher helper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from typing_extensions import Self

HELPERS = Path(__file__).resolve().parent
PY = sys.executable
T = TypeVar('T')


def wait_until(pred: Callable[[], T], timeout: float, what: str = 'condition', interval: float = 0.01) -> T:
    """Polls `pred` until it returns something truthy (returned) or fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f'timed out after {timeout} s waiting for {what}')
        time.sleep(interval)


def proc_stat(pid: int) -> dict[str, Any] | None:
    """state, ppid, pgrp and session of `pid` from /proc/<pid>/stat; None if it is gone."""
    try:
        with open(f'/proc/{pid}/stat', 'rb') as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(b')') + 2 :].split()
    return {'state': fields[0].decode(), 'ppid': int(fields[1]), 'pgrp': int(fields[2]), 'session': int(fields[3])}


def proc_state(pid: int) -> str:
    """The one-letter state of `pid` (R, S, T for stopped, Z, ...); 'gone' if there is none."""
    st = proc_stat(pid)
    return st['state'] if st else 'gone'


def alive(pid: int) -> bool:
    """Running (or stopped), not a zombie and not gone."""
    st = proc_stat(pid)
    return st is not None and st['state'] not in ('Z', 'X')


def all_dead(pids: Any) -> bool:
    return not any(alive(p) for p in pids)


def environ_has(pid: int, entry: str) -> bool:
    try:
        with open(f'/proc/{pid}/environ', 'rb') as f:
            return entry.encode() in f.read().split(b'\0')
    except OSError:
        return False


def marked(entry: str) -> list[int]:
    """Live pids whose environment holds `entry` (NAME=VALUE), by a plain /proc scan."""
    me = os.getpid()
    return [
        int(d)
        for d in os.listdir('/proc')
        if d.isdigit() and int(d) != me and alive(int(d)) and environ_has(int(d), entry)
    ]


def zombie_children() -> list[int]:
    """Our own children that have exited and not been reaped."""
    me = os.getpid()
    out = []
    for d in os.listdir('/proc'):
        if d.isdigit():
            st = proc_stat(int(d))
            if st and st['ppid'] == me and st['state'] == 'Z':
                out.append(int(d))
    return out


def read_json_when_ready(path: Path, timeout: float = 10.0) -> dict[str, Any]:
    wait_until(path.exists, timeout, f'{path} to appear')
    data: dict[str, Any] = json.loads(path.read_text())
    return data


class Launcher:
    """`tests/helpers/launcher.py` in a subprocess, with its JSON events read line by line."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [PY, str(HELPERS / 'launcher.py'), json.dumps(spec)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        assert self.proc.stdout is not None
        self._out = self.proc.stdout

    @property
    def pid(self) -> int:
        return self.proc.pid

    def event(self, timeout: float = 30.0) -> dict[str, Any]:
        """The next event line (blocking up to `timeout`; the launcher is killed if it never comes)."""
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self._out, selectors.EVENT_READ)
            if not sel.select(timeout):
                self.proc.kill()
                raise AssertionError(f'launcher sent no event within {timeout} s')
        line = self._out.readline()
        if not line:
            raise AssertionError(f'launcher exited (rc={self.proc.wait()}) without the expected event')
        event: dict[str, Any] = json.loads(line)
        return event

    def events(self) -> Iterator[dict[str, Any]]:
        while line := self._out.readline():
            yield json.loads(line)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._out.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
