"""How the dslaunch commands end once their job is over.

Exit handlers and stdio flushes run as at any exit, but not the interpreter's teardown of every
module and object (3-20 ms, more with more ranks: docs/benchmarks.md), which is on the path of
every failure and teardown a launcher reports. The objects a job made (a plan, a spec and a
result a rank: thousands at 1,024 ranks) are left to the exit too, not freed one by one on the
way out of the functions that made them (about 1 ms at 1,024 ranks).

Only for the commands themselves (`dslaunch`, `python -m dslaunch.launch`): a caller that runs
the CLI in-process (`cli.main(argv)`) exits normally and gets its memory back.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs the CLI start-up time
if TYPE_CHECKING:
    from typing import NoReturn

_ending_with_exit = False
_left_to_exit: list[object] = []


def will_exit() -> None:
    """Called by a command that ends with `exit_now`: `leave_to_exit` keeps objects from then on."""
    global _ending_with_exit
    _ending_with_exit = True


def leave_to_exit(*objects: object) -> None:
    """Keeps `objects` alive until the process exits, when the command will end with `exit_now`;
    does nothing otherwise."""
    if _ending_with_exit:
        _left_to_exit.append(objects)


def exit_now(code: int) -> NoReturn:
    """Runs the exit handlers, flushes stdout and stderr, and ends the process with `code`."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed console: nothing more can be said on it
            pass
    os._exit(code)
