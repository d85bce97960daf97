"""The per-rank child of the launch_behaviour golden cases: $BEHAVE is a JSON map RANK -> action.

Actions (as in the spec's experiments): `ok`, `exit:<code>:<delay>`, `sleep`, `selfkill:<sig>:<delay>`,
`ignore_term`, `grandchild_then_ok`, `grandchild_then_sleep`. Marker files in the cwd:
rankN.started / .exiting / .got_SIGTERM / .got_SIGINT / .grandchild; grandchildN.got_SIGTERM.
"""

import json
import os
import signal
import subprocess
import sys
import time

rank = os.environ.get('RANK', '0')
action = json.loads(os.environ.get('BEHAVE', '{}')).get(rank, 'ok')


def mark(name: str) -> None:
    open(name, 'w').close()


def on_signal(signum: int, _frame: object) -> None:
    mark(f'rank{rank}.got_{signal.Signals(signum).name}')
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


mark(f'rank{rank}.started')
print(f'hello from rank {rank}', flush=True)
print(f'stderr from rank {rank}', file=sys.stderr, flush=True)
signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)

GRANDCHILD = ('import os, signal, time\n'
              'def h(s, f):\n'
              f'    open("grandchild{rank}.got_SIGTERM", "w").close(); os._exit(0)\n'
              'signal.signal(signal.SIGTERM, h)\n'
              'time.sleep(120)\n')

if action.startswith('grandchild_then'):
    subprocess.Popen([sys.executable, '-c', GRANDCHILD])
    mark(f'rank{rank}.grandchild')
    action = 'ok' if action == 'grandchild_then_ok' else 'sleep'
if action == 'ok':
    mark(f'rank{rank}.exiting')
    sys.exit(0)
if action.startswith('exit:'):
    _, code, delay = action.split(':')
    time.sleep(float(delay))
    mark(f'rank{rank}.exiting')
    sys.exit(int(code))
if action.startswith('selfkill:'):
    _, sig, delay = action.split(':')
    time.sleep(float(delay))
    mark(f'rank{rank}.exiting')
    signal.signal(int(sig), signal.SIG_DFL) if int(sig) != signal.SIGKILL else None
    os.kill(os.getpid(), int(sig))
if action == 'ignore_term':
    def ignore(signum: int, _frame: object) -> None:
        mark(f'rank{rank}.got_SIGTERM')
    signal.signal(signal.SIGTERM, ignore)
time.sleep(120)
