"""Which stop signals dslaunch's own handlers take over.

Every one it handles, except a signal it inherited as ignored: that was asked for. `nohup`
ignores SIGHUP so that closing the terminal does not stop the job (DeepSpeed's runner, which has
no SIGHUP handler, keeps it ignored), and a shell script's background command ignores SIGINT and
SIGQUIT. The Rust core's signal forwarding follows the same rule (`Supervisor.start`).
"""

from __future__ import annotations

import signal
from collections.abc import Iterable

#: What ends a job (SIGKILL after the grace period), as torchrun's default `--signals-to-handle`.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def not_ignored(signals: Iterable[int]) -> list[int]:
    """`signals` without those this process ignores now."""
    return [s for s in signals if signal.getsignal(s) is not signal.SIG_IGN]
