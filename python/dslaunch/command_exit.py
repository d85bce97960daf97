"""How the dslaunch commands end once their job is over.

Exit handlers and stdio flushes run as at any exit, but not the interpreter's teardown of every
module and object (3-20 ms, more with more ranks: docs/benchmarks.md), which is on the path of
every failure and teardown a launcher reports. The objects a job made (a plan, a spec and a
result a rank: thousands at 1,024 ranks) are left to the exit too, not freed one by one on the
way out of the functions that made them (about 1 ms at 1,024 ranks).

Only for the commands themselves (`dslaunch`, `python -m dslaunch.launch`): a caller that runs
the CLI in-process (`cli.main(argv)`) exits normally and gets its memory back.

The exit status is DeepSpeed's (spec section 14, item 7), from every layer: a failed rank's own
code, 256-N for a rank killed by signal N (DeepSpeed's `sys.exit(-N)`: 247 for SIGKILL, 245 for
SIGSEGV). A job stopped by signal N is status -N inside dslaunch: the per-node launcher then exits
1 for SIGINT and SIGTERM, as DeepSpeed's launch.py, and otherwise the command ends by that same
signal once its ranks are gone, as DeepSpeed's runner (which has no handler) dies of it; a shell
sees 128+N.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs the CLI start-up time
if TYPE_CHECKING:
    from typing import NoReturn

    from dslaunch._core import Report

_ending_with_exit = False
_left_to_exit: list[object] = []


def will_exit() -> None:
    """Called by a command that ends with `exit_now`: `leave_to_exit` keeps objects from then on."""
    global _ending_with_exit
    _ending_with_exit = True


def ending_with_exit() -> bool:
    """Whether this process is a command that ends with `exit_now` (not a caller of `cli.main`)."""
    return _ending_with_exit


def leave_to_exit(*objects: object) -> None:
    """Keeps `objects` alive until the process exits, when the command will end with `exit_now`;
    does nothing otherwise."""
    if _ending_with_exit:
        _left_to_exit.append(objects)


def rank_status(returncode: int | None) -> int:
    """A failed rank's code as the launcher exits with it: the code, or 256-N after signal N
    (`returncode` as `subprocess`'s: -N). Never 0: a failure with no code is 1."""
    if returncode is None:
        return 1
    return (returncode & 0xFF) or 1


def job_status(report: Report) -> int:
    """The status of a finished job: 0, the root-cause rank's (`rank_status`), or -N when signal
    N to the launcher stopped it."""
    root = report.first_failure
    if root is not None:
        return rank_status(root.returncode)
    if report.interrupted_by is not None:
        return -report.interrupted_by
    if report.returncode == 0:
        return 0
    failed = next((r.returncode for r in report.ranks if r.returncode), None)
    return rank_status(failed)


def per_node_launcher(status: int) -> int:
    """DeepSpeed's launch.py handles SIGINT and SIGTERM, and then exits 1."""
    return 1 if status in (-2, -15) else status  # SIGINT, SIGTERM (Linux numbers: no import)


def shell(status: int) -> int:
    """`status` as a shell shows it: 128+N for a command ended by signal N."""
    return 128 - status if status < 0 else status


def exit_now(code: int) -> NoReturn:
    """Runs the exit handlers, flushes stdout and stderr, and ends the process with `code`; a
    negative code -N ends it by signal N (the job's ranks are gone by then)."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed console: nothing more can be said on it
            pass
    if code < 0:
        import signal

        # Dying of the signal tells the parent (a shell, a script's loop) that it was interrupted:
        # bash stops a loop on a child that died of SIGINT, not on one that exited 130.
        signal.signal(-code, signal.SIG_DFL)
        if -code == signal.SIGQUIT:  # a stop by Ctrl-\ ends as one by Ctrl-C: no core dump of dslaunch
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {-code})
        os.kill(os.getpid(), -code)
    os._exit(shell(code))
