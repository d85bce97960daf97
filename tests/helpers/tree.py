"""A process tree that leaves its parent's process group in every common way.

    tree.py PIDFILE [--kinds plain,setsid,doublefork,pgrp] [--ignore-term] [--exit CODE --after SECONDS]

Forks one descendant per kind, each ending up as `sleep 600`:
  plain       a child in our process group
  setsid      a child that called setsid() (new session and group)
  doublefork  setsid() + fork, the middle process exits: the daemon is re-parented away from us
  pgrp        a child that moved to a process group of its own (setpgid(0, 0))
  nested      a child that itself forks a setsid grandchild (two levels down; reported as
              "nested" and "nested_grandchild")
Once all exist, writes {"root": pid, "<kind>": pid, ...} to PIDFILE (atomically), then sleeps,
or exits CODE after SECONDS (leaving the descendants behind). With --ignore-term the descendants
ignore SIGTERM (the disposition survives their exec), so only SIGKILL ends them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

SLEEP = ['sleep', '600']


def _become_sleeper(ignore_term: bool) -> None:
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.execvp(SLEEP[0], SLEEP)
    finally:
        os._exit(127)


def _fork(setup: str, ignore_term: bool) -> dict[str, int]:
    """Forks a sleeper after `setup`; returns {label: pid} of the processes that end up sleeping."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            label = setup
            if setup in ('setsid', 'doublefork'):
                os.setsid()
            elif setup == 'pgrp':
                os.setpgid(0, 0)
            if setup == 'doublefork':
                if os.fork() != 0:
                    os._exit(0)  # the middle process: its child is orphaned and re-parented
            elif setup == 'nested' and os.fork() == 0:
                os.setsid()
                label = 'nested_grandchild'
            os.write(w, f'{label} {os.getpid()}\n'.encode())
            os.close(w)
            _become_sleeper(ignore_term)
        finally:
            os._exit(127)
    os.close(w)
    with os.fdopen(r, 'rb') as f:
        reported = {k.decode(): int(v) for k, v in (line.split() for line in f.read().splitlines())}
    if setup == 'doublefork':
        os.waitpid(pid, 0)  # reap the middle process, as a real daemonizer's parent does
    return reported


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('pidfile')
    ap.add_argument('--kinds', default='plain,setsid,doublefork,pgrp')
    ap.add_argument('--ignore-term', action='store_true')
    ap.add_argument('--exit', type=int, default=None)
    ap.add_argument('--after', type=float, default=0.0)
    args = ap.parse_args()
    pids: dict[str, int] = {'root': os.getpid()}
    for kind in args.kinds.split(','):
        if kind:
            pids.update(_fork(kind, args.ignore_term))
    tmp = f'{args.pidfile}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(pids, f)
    os.rename(tmp, args.pidfile)
    print(f'tree ready: {json.dumps(pids)}', flush=True)
    if args.exit is not None:
        time.sleep(args.after)
        sys.exit(args.exit)
    time.sleep(600)


if __name__ == '__main__':
    main()
