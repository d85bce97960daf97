"""A rank that records every signal it receives.

    signal_rank.py OUTFILE READYFILE [--ignore SIG,...] [--lifetime SECONDS]

Appends `<signum>\\n` to OUTFILE for each SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2
received. On SIGINT, SIGTERM, SIGHUP or SIGQUIT it then exits with 128+N (as a shell would), unless that signal is
listed in --ignore (then it is recorded and survived). The other signals named in --ignore are set
to SIG_IGN (not recorded). Creates READYFILE once its handlers are in place, then idles for
--lifetime seconds (default 120) and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

RECORDED = ('SIGINT', 'SIGTERM', 'SIGHUP', 'SIGQUIT', 'SIGUSR1', 'SIGUSR2')
TERMINATING = ('SIGINT', 'SIGTERM', 'SIGHUP', 'SIGQUIT')


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('outfile')
    ap.add_argument('readyfile')
    ap.add_argument('--ignore', default='')
    ap.add_argument('--lifetime', type=float, default=120.0)
    args = ap.parse_args()
    ignored = {f'SIG{s}' if not s.startswith('SIG') else s for s in args.ignore.split(',') if s}
    out = os.open(args.outfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def record(signum: int, _frame: object) -> None:
        os.write(out, f'{signum}\n'.encode())
        if signal.Signals(signum).name in TERMINATING and signal.Signals(signum).name not in ignored:
            os._exit(128 + signum)

    for name in RECORDED:
        signal.signal(getattr(signal, name), record)
    for name in ignored - set(RECORDED):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    with open(args.readyfile, 'w') as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + args.lifetime
    while time.monotonic() < deadline:
        time.sleep(0.05)


if __name__ == '__main__':
    main()
