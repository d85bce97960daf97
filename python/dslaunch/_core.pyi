"""The process supervisor behind dslaunch (a Rust extension).

A `Supervisor` starts many rank processes (each in its own process group, by posix_spawn),
reaps them through pidfds in one epoll loop, multiplexes their stdout/stderr into prefixed,
line-atomic console output and per-rank log files, forwards signals, and tears the whole job
down (grandchildren and escaped sessions included) on the first failure. An orphan guard
process kills the job if the launcher itself is SIGKILLed. Every process of a job carries
`DSLAUNCH_RUN_ID=<run_id>` in its environment.
"""

import os
from collections.abc import Mapping, Sequence
from types import FrameType, TracebackType
from typing import Literal, NoReturn, TypeAlias, final

__all__ = [
    'RUN_ID_VAR',
    'RankResult',
    'RankSpec',
    'Report',
    'Supervisor',
    'SupervisorError',
    '_SignalForwarder',
    '__version__',
    'find_marked',
    'kill_tree',
]
__version__: str
RUN_ID_VAR: str

_StrPath: TypeAlias = str | os.PathLike[str]

class SupervisorError(RuntimeError):
    """The supervisor was used in the wrong order (started twice, waited on before start)."""

@final
class RankSpec:
    """One rank to start.

    Args:
        argv: Program and arguments; `argv[0]` is looked up in the rank's PATH unless it has a `/`.
        env: Variables set for this rank on top of the supervisor's base environment.
        cwd: Working directory (default: the launcher's).
        log_file: A file that receives the rank's stdout and stderr merged (truncated first).
        tag: The label in the console prefix (default: the rank's index).
        console: Whether the rank's lines are shown on the console: True, False, or the one stream
            shown, 'stdout' or 'stderr' (with a merged `log_file`, both streams count as stdout).
        stdout_log_file: A file for the rank's stdout alone (truncated first); not with `log_file`.
        stderr_log_file: A file for the rank's stderr alone; not with `log_file`. A stream without
            a file is not logged.
        bare: Whose console lines come without the supervisor's prefix (and are never collapsed):
            True (both streams), False, 'stdout' or 'stderr' (torchrun prefixes only tee'd streams).
    """

    def __new__(
        cls,
        argv: Sequence[_StrPath],
        *,
        env: Mapping[str, str] | None = None,
        cwd: _StrPath | None = None,
        log_file: _StrPath | None = None,
        tag: str | None = None,
        console: bool | Literal['stdout', 'stderr'] = True,
        stdout_log_file: _StrPath | None = None,
        stderr_log_file: _StrPath | None = None,
        bare: bool | Literal['stdout', 'stderr'] = False,
    ) -> RankSpec: ...
    @property
    def argv(self) -> list[str]: ...
    @property
    def env(self) -> dict[str, str]: ...
    @property
    def cwd(self) -> str | None: ...
    @property
    def log_file(self) -> str | None: ...
    @property
    def stdout_log_file(self) -> str | None: ...
    @property
    def stderr_log_file(self) -> str | None: ...
    @property
    def tag(self) -> str: ...
    @property
    def console(self) -> bool | Literal['stdout', 'stderr']: ...

@final
class RankResult:
    """One rank's state, live (`Supervisor.status()`) or final (`Report.ranks`).

    `state` is 'running', 'exited' (code 0), 'failed' (non-zero code) or 'killed' (by a
    signal). `returncode` follows `subprocess` (-N for signal N); `exit_status` the shell
    (128+N). Times are Unix timestamps. `stderr_tail` holds the rank's last stderr lines;
    `last_line` its last output line of either stream (kept with `keep_last_line=True`).
    """

    rank: int
    tag: str
    pid: int
    state: Literal['running', 'exited', 'failed', 'killed']
    returncode: int | None
    signal: int | None
    exit_status: int | None
    started_at: float
    ended_at: float | None
    last_output_at: float | None
    output_bytes: int
    output_lines: int
    stderr_tail: list[str]
    log_error: str | None
    last_line: str | None

@final
class Report:
    """The outcome of a job.

    `returncode` is 0 on success; else the root-cause rank's exit status (128+N for a death by
    signal N), or 128+N when signal N stopped the job. `first_failure` is the root cause: the
    first rank seen failing before any teardown began. `stopped` is true when the caller
    terminated or killed the job. `leftovers_killed` counts processes outside the rank groups
    (escaped or left behind) that the supervisor had to kill.
    """

    run_id: str
    ranks: list[RankResult]
    first_failure: RankResult | None
    interrupted_by: int | None
    stopped: bool
    returncode: int
    started_at: float
    ended_at: float | None
    leftovers_killed: int
    @property
    def success(self) -> bool: ...
    @property
    def wall_time(self) -> float | None: ...

@final
class _SignalForwarder:
    def __call__(self, signum: int, frame: FrameType | None, /) -> None: ...

@final
class Supervisor:
    """Starts, watches, signals and tears down a set of ranks.

    Args:
        ranks: The ranks, in rank order.
        env: The base environment of every rank (default: the launcher's own).
        prefix: Console prefix template, `{tag}` and `{rank}` substituted (`{{` and `}}` are a
            literal brace); None for raw lines.
        console_ranks: Only these rank indices are shown on the console (default: all).
        grace_period: Seconds between the polite signal and SIGKILL when tearing down.
        forward_signals: Signals of the launcher forwarded to every rank's process group while
            the job runs (default SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGTSTP,
            SIGCONT; handlers are installed by `start()` on the main thread and restored when the
            job is over; a signal ignored at that moment stays ignored, as `nohup`'s SIGHUP). The
            stop signals also end the job; a second one kills at once. After forwarding SIGTSTP
            (Ctrl-Z) the launcher's process stops itself; SIGCONT (`fg`, `bg`) resumes it and is
            forwarded.
        stop_signals: The signals that, received (or given to `send_signal`/`stop`), end the job
            as well as being passed on (default SIGINT, SIGTERM, SIGHUP, SIGQUIT; torchrun's
            `--signals-to-handle`). ValueError for SIGKILL, SIGSTOP, SIGTSTP, SIGCONT, SIGCHLD.
        fail_fast: Tear the job down when one rank exits non-zero or dies by a signal.
        stderr_tail: How many of each rank's last stderr lines to keep.
        orphan_guard: Start the guard process that kills the job if the launcher is SIGKILLed.
        kill_leftovers: When every rank has exited, end what they left running.
        run_id: The job's id (default: a random one).
        max_line_bytes: Longer lines reach the console in pieces of this size.
        stdout_fd: Where the ranks' stdout goes (default 1).
        stderr_fd: Where the ranks' stderr goes (default 2).
        collapse: Identical lines written by several ranks within `collapse_window` seconds are
            printed once behind a rank range (`[0-6,8-15]: ...`): 'off', 'auto' (on the streams
            that are terminals) or 'on'. Log files keep every line; each rank's lines keep their
            order. Needs a `prefix`.
        collapse_window: How long a console line waits for other ranks to print the same.
        status_line: Keep a live status line (ranks running/exited/failed, elapsed time) below
            the ranks' output when stderr or stdout is a terminal; never on a pipe or file.
        keep_last_line: Keep each rank's last output line (`RankResult.last_line`).
        merge_stderr: Each rank's stderr goes into its stdout pipe: one stream, in the order the
            rank wrote to either (so its log file keeps that order, as DeepSpeed's per-rank
            logs); on the console it is stdout, and `stderr_tail` keeps that stream's last lines.
        console_copies: `{'stdout': (path, needles), 'stderr': ...}`: that file (created at
            `start()`) also gets each prefixed console line of the stream that holds any of the
            needles (an empty needle: every line), prefix included, as the rank wrote it (before
            collapsing); bare lines are not copied (torchrun's `--duplicate-stdout-filters`).

    Durations (`grace_period`, timeouts) may be `inf`: anything beyond 2**32 s means never.
    A job is over only when every line its ranks wrote has reached the console: if nobody reads
    `stdout_fd`/`stderr_fd` (a full pipe), `wait()` waits for that reader, after `kill()` too.
    Dropping the last reference to a running supervisor kills its job; while its signal
    handlers are installed (from `start()` on the main thread until the job is over and waited
    for) they hold a reference, so `del` alone does not end it: call `kill()` or `wait()`. A
    forked child's copy is inert: the job stays the parent's.
    """

    def __new__(
        cls,
        ranks: Sequence[RankSpec],
        *,
        env: Mapping[str, str] | None = None,
        prefix: str | None = '[{tag}]: ',
        console_ranks: Sequence[int] | None = None,
        grace_period: float = 30.0,
        forward_signals: Sequence[int] | None = None,
        stop_signals: Sequence[int] | None = None,
        fail_fast: bool = True,
        stderr_tail: int = 20,
        orphan_guard: bool = True,
        kill_leftovers: bool = True,
        run_id: str | None = None,
        max_line_bytes: int = 65536,
        stdout_fd: int = 1,
        stderr_fd: int = 2,
        collapse: Literal['off', 'auto', 'on'] = 'off',
        collapse_window: float = 0.25,
        status_line: bool = False,
        keep_last_line: bool = False,
        merge_stderr: bool = False,
        console_copies: Mapping[Literal['stdout', 'stderr'], tuple[str | os.PathLike[str], Sequence[str]]] | None = None,
    ) -> Supervisor: ...
    def start(self) -> None:
        """Starts every rank; raises OSError if one cannot start, after killing those started."""
    def exec_host(
        self,
        host: str | os.PathLike[str],
        *,
        start_message: str | None = None,
        quiet: bool = False,
        report_json: str | os.PathLike[str] | None = None,
        pid_file: str | os.PathLike[str] | None = None,
        launcher_status: bool = False,
        prog: str | None = None,
        shown_argv: Sequence[str] | None = None,
    ) -> NoReturn:
        """Replaces this process with the native host `host` (`dslaunch-host`), which runs the job,
        prints the report (not for a `quiet` job that went well), writes `report_json`, removes
        `pid_file` and ends the process with the job's status (`launcher_status`: 1 after
        SIGINT/SIGTERM, as DeepSpeed's per-node launcher); `prog` names the command in an error
        line (default 'dslaunch'); `shown_argv` is appended to the host's
        arguments for `ps` to show. Only returns by raising OSError when
        `host` cannot be run; `start()` still works then."""
    def wait(self, timeout: float | None = None) -> Report | None:
        """Waits with the GIL released until the job is over; None if `timeout` passed first."""
    def poll(self) -> Report | None:
        """The report if the job is over, else None. Never blocks."""
    def wait_exits(self, timeout: float | None = None) -> list[RankResult]:
        """Waits until some rank has exited since the last call, the job is over, or `timeout`
        passes; returns the ranks that exited since the last call (possibly none)."""
    def status(self) -> list[RankResult]:
        """Every rank's state now. Never blocks."""
    def send_signal(self, signal: int) -> None:
        """Forwards a signal to every running rank's group (as if the launcher received it)."""
    def stop(self, signal: int) -> None:
        """A stop asked for from outside (a multi-node runner): as `send_signal`, but a job already
        ending goes on ending with its grace period; only SIGKILL kills at once; SIGTSTP pauses
        the ranks without stopping this process. Returns at once."""
    def terminate(self, grace_period: float | None = None, signal: int = 15) -> None:
        """Begins stopping the job: `signal` now, SIGKILL after the grace period. Returns at once."""
    def kill(self) -> None:
        """SIGKILLs every rank tree now. Returns at once."""
    def console_message(self, text: str, stderr: bool = True) -> bool:
        """Prints `text` on the console in order with the ranks' lines (after lines the collapser
        holds, above the status line). False when the console is already closed (the job is over
        or ending): print it yourself then."""
    def run(self) -> Report:
        """`start()` then `wait()`."""
    @property
    def run_id(self) -> str: ...
    @property
    def pids(self) -> list[int]: ...
    @property
    def done(self) -> bool: ...
    def __len__(self) -> int: ...
    def __enter__(self) -> Supervisor: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> bool: ...

def kill_tree(pid: int, grace_period: float = 5.0) -> int:
    """Kills `pid` and all its descendants (in other process groups or sessions too): SIGTERM,
    then SIGKILL after `grace_period`. Returns how many processes were signalled.

    The walk follows parent links, so a daemon whose middle parent already exited (a finished
    double fork) is no longer below `pid`; a `Supervisor` finds those (it is their subreaper, and
    they carry its job marker)."""

def find_marked(marker: str) -> list[int]:
    """Pids of every live process whose environment holds the entry `marker` (`NAME=VALUE`)."""
