"""Shared fixtures for the test suites.

House rule (shared/STYLE.md): every test proves it left no process behind. The autouse fixture
`no_process_left_behind` puts a unique `DSLAUNCH_TEST_TAG=<uuid>` into `os.environ` for the test,
so every process the test starts (ranks, launchers, helpers, and their descendants, setsid or
not) inherits it. After the test it scans /proc for live processes other than this one carrying
the tag, gives stragglers up to 2 s to exit, then SIGKILLs the survivors and fails the test,
naming them. A process inside execve(2) shows an empty environ for a moment, so every process
ever seen tagged is remembered and judged by its pid (and start time), never by the last scan.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator

import pytest

TEST_TAG_VAR = 'DSLAUNCH_TEST_TAG'
STRAGGLER_WAIT_S = 2.0

# The tests play a user's terminal: what they start must not inherit signals ignored by whatever
# started pytest (a background `bash .ci/run &` ignores SIGINT and SIGQUIT), because dslaunch keeps
# an inherited SIG_IGN (nohup's SIGHUP), and its Ctrl-C and Ctrl-\ tests would then test that.
for _sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
    if signal.getsignal(_sig) is signal.SIG_IGN:
        signal.signal(_sig, signal.default_int_handler if _sig == signal.SIGINT else signal.SIG_DFL)


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (state first); None if gone."""
    try:
        with open(f'/proc/{pid}/stat', 'rb') as f:
            return f.read().rsplit(b')', 1)[1].split()
    except (OSError, IndexError):
        return None


def _state(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[0].decode() if fields else None


def _identity(pid: int) -> bytes | None:
    """The start time of a live (non-zombie) `pid`: with the pid, it names one process for good."""
    fields = _stat_fields(pid)
    return fields[19] if fields and fields[0] not in (b'Z', b'X') else None


def _tagged_processes(entry: bytes) -> dict[int, str]:
    """Live processes (not us, not zombies) whose environment holds `entry`, with their command lines."""
    me = os.getpid()
    found: dict[int, str] = {}
    for name in os.listdir('/proc'):
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        try:
            with open(f'/proc/{pid}/environ', 'rb') as f:
                if entry not in f.read().split(b'\0'):
                    continue
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                cmd = f.read().replace(b'\0', b' ').decode(errors='replace').strip()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if _state(pid) not in (None, 'Z', 'X'):
            found[pid] = cmd
    return found


def _reap_zombie_children() -> None:
    """Reaps exited children of this process (orphans of a test's jobs re-parented to us: once a
    Supervisor has run here, this process is a child subreaper)."""
    me = str(os.getpid())
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            with open(f'/proc/{name}/stat', 'rb') as f:
                fields = f.read().rsplit(b')', 1)[1].split()
        except OSError:
            continue
        if fields[0] == b'Z' and fields[1].decode() == me:
            try:
                os.waitpid(int(name), os.WNOHANG)
            except ChildProcessError:
                pass


@pytest.fixture(autouse=True)
def no_process_left_behind(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Tags the test's processes and fails the test if any of them outlives it (see module doc)."""
    tag = uuid.uuid4().hex
    monkeypatch.setenv(TEST_TAG_VAR, tag)
    yield tag
    entry = f'{TEST_TAG_VAR}={tag}'.encode()
    seen: dict[int, tuple[bytes, str]] = {}  # pid -> (start time, command line)

    def scan() -> None:
        for pid, cmd in _tagged_processes(entry).items():
            ident = _identity(pid)
            if ident is not None:
                seen.setdefault(pid, (ident, cmd))

    def still_alive() -> dict[int, str]:
        return {pid: cmd for pid, (ident, cmd) in seen.items() if _identity(pid) == ident}

    scan()
    deadline = time.monotonic() + STRAGGLER_WAIT_S
    while still_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
        scan()
    for _ in range(3):  # a process that was invisible (inside execve) in one scan shows in the next
        time.sleep(0.01)
        scan()
    survivors = still_alive()
    for pid in survivors:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if survivors:
        kill_deadline = time.monotonic() + STRAGGLER_WAIT_S
        while still_alive() and time.monotonic() < kill_deadline:
            time.sleep(0.02)
            scan()  # and whatever they started meanwhile
        for pid in still_alive():
            os.kill(pid, signal.SIGKILL)
    _reap_zombie_children()
    if survivors:
        listing = '\n'.join(f'  pid {pid}: {cmd}' for pid, cmd in sorted(survivors.items()))
        pytest.fail(f'{len(survivors)} process(es) of this test outlived it (now SIGKILLed):\n{listing}', pytrace=False)


@pytest.fixture
def run_id() -> str:
    """A fresh job id; `DSLAUNCH_RUN_ID=<run_id>` marks every process of the job."""
    return f'test-{uuid.uuid4().hex}'
