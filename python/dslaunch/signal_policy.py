"""Which stop signals dslaunch's own handlers take over.

Every one it handles, except a signal it inherited as ignored: that was asked for. `nohup`
ignores SIGHUP so that closing the terminal does not stop the job (DeepSpeed's runner, which has
no SIGHUP handler, keeps it ignored), and a shell script's background command ignores SIGINT and
SIGQUIT. The Rust core's signal forwarding follows the same rule (`Supervisor.start`).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterable

#: What ends a job (SIGKILL after the grace period), as torchrun's default `--signals-to-handle`.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
#: torchrun's `--signals-to-handle` default, which its workers see as TORCHELASTIC_SIGNALS_TO_HANDLE.
TORCHRUN_SIGNALS = 'SIGTERM,SIGINT,SIGHUP,SIGQUIT'
#: What the Rust core passes on to the ranks by default (`Supervisor(forward_signals=None)`).
FORWARDED = (*STOP_SIGNALS, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTSTP, signal.SIGCONT)
_NEVER_A_STOP = (signal.SIGKILL, signal.SIGSTOP, signal.SIGTSTP, signal.SIGCONT, signal.SIGCHLD)


def stop_signals_from(names: str) -> tuple[int, ...]:
    """torchrun's `--signals-to-handle SIGTERM,SIGUSR1,...`: the signals that stop the job (passed
    on to the ranks, then SIGKILL after the grace period). STOP_SIGNALS always are: leaving one to
    its default action would end dslaunch without its ranks' teardown. As torchrun, a name that is
    no signal, or one that cannot be handled, is a warning, not an error."""
    stops = list(STOP_SIGNALS)
    for name in filter(None, (n.strip() for n in names.split(','))):
        sig = signal.Signals.__members__.get(name)
        if sig is None or sig in _NEVER_A_STOP:
            why = 'no such signal' if sig is None else 'cannot be one that stops the job'
            print(f'dslaunch: warning: --signals-to-handle: {name}: {why}; ignored', file=sys.stderr)
        elif sig not in stops:
            stops.append(sig)
    return tuple(stops)


def not_ignored(signals: Iterable[int]) -> list[int]:
    """`signals` without those this process ignores now."""
    return [s for s in signals if signal.getsignal(s) is not signal.SIG_IGN]
