"""A rank whose behaviour comes from $BEHAVE_<RANK>: `ok`, `exit:<code>:<delay>`, `sleep`,
`ignore_term` (traps SIGTERM and sleeps), `raise` (a Python traceback), `segv`.
It writes $MARK_DIR/rank<RANK>.started first so tests know it is up."""

import os
import signal
import sys
import time

rank = os.environ.get('RANK', '0')
mark = os.environ.get('MARK_DIR')
if mark:
    open(os.path.join(mark, f'rank{rank}.started'), 'w').close()
what = os.environ.get(f'BEHAVE_{rank}', 'ok')
if what == 'ok':
    sys.exit(0)
if what.startswith('exit:'):
    _, code, delay = what.split(':')
    time.sleep(float(delay))
    sys.exit(int(code))
if what == 'ignore_term':
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if what == 'raise':
    time.sleep(0.2)
    raise ValueError(f'boom in rank {rank}')
if what == 'segv':
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGSEGV)
time.sleep(600)
