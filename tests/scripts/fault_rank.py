"""A rank that prints a known set of lines, then misbehaves as $FAULT_<RANK> says.

Every rank first prints LINES (default 40) lines `rank <R> line <i>` to stdout (and every 10th
also `rank <R> err <i>` to stderr), records the signals it receives in $MARK_DIR/rank<R>.signals
(SIGTERM, SIGINT and SIGHUP still kill it, as their default action would), and creates $MARK_DIR/rank<R>.ready holding its pid. With $WAIT_GO set, every fault but `sleep`,
`ignore_term` and the `fork` ones then waits for $MARK_DIR/go (so the test can let all ranks fail at once, after all
their lines are out). Then, by $FAULT_<RANK> (default `sleep`):

  sleep            sleep until killed
  ok               exit 0 at once
  ok_after:<s>     sleep s seconds, print `rank <R> done`, exit 0
  exit:<code>      exit with code
  segv             a real segmentation fault (NULL dereference)
  ignore_term      ignore SIGTERM (recorded) and sleep: only SIGKILL ends it
  fork:<n>         fork n children that sleep (written to $MARK_DIR/rank<R>.children), then sleep
  fork_exit:<n>    the same, then exit 0 leaving the children behind
  close_stdout     close stdout (and keep stderr), print `rank <R> after close` to stderr,
                   sleep 0.5 s, exit 0
  close_all        close stdout and stderr, sleep 0.8 s, write $MARK_DIR/rank<R>.closed_end, exit 0
"""

import ctypes
import os
import signal
import sys
import time

rank = os.environ.get('RANK', '0')
mark = os.environ['MARK_DIR']
what = os.environ.get(f'FAULT_{rank}', 'sleep')
lines = int(os.environ.get('LINES', '40'))


def path(name: str) -> str:
    return os.path.join(mark, f'rank{rank}.{name}')


sig_fd = os.open(path('signals'), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def record(signum: int, _frame: object) -> None:
    os.write(sig_fd, f'{signum}\n'.encode())
    if signum != signal.SIGUSR1 and not (signum == signal.SIGTERM and what == 'ignore_term'):
        signal.signal(signum, signal.SIG_DFL)  # die of it, as a program without a handler does
        os.kill(os.getpid(), signum)


for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
    signal.signal(s, record)

for i in range(lines):
    sys.stdout.write(f'rank {rank} line {i}\n')
    if i % 10 == 0:
        sys.stdout.flush()
        sys.stderr.write(f'rank {rank} err {i}\n')
        sys.stderr.flush()
sys.stdout.flush()
with open(path('ready.tmp'), 'w') as f:
    f.write(str(os.getpid()))
os.rename(path('ready.tmp'), path('ready'))


def sleep_forever() -> None:
    while True:
        time.sleep(60)


if os.environ.get('WAIT_GO') and what not in ('sleep', 'ignore_term') and not what.startswith('fork'):
    while not os.path.exists(os.path.join(mark, 'go')):
        time.sleep(0.005)

if what == 'sleep' or what == 'ignore_term':
    sleep_forever()
elif what == 'ok':
    sys.exit(0)
elif what.startswith('ok_after:'):
    time.sleep(float(what.split(':')[1]))
    print(f'rank {rank} done', flush=True)
    sys.exit(0)
elif what.startswith('exit:'):
    os._exit(int(what.split(':')[1]))
elif what == 'segv':
    time.sleep(0.1)
    ctypes.string_at(0)  # reads address 0: SIGSEGV
elif what.startswith('fork'):
    n = int(what.split(':')[1])
    kids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.execvp('sleep', ['sleep', '600'])
        kids.append(pid)
    with open(path('children.tmp'), 'w') as f:
        f.write(' '.join(map(str, kids)))
    os.rename(path('children.tmp'), path('children'))
    if what.startswith('fork_exit'):
        os._exit(0)
    sleep_forever()
elif what == 'close_stdout':
    os.close(1)
    sys.stderr.write(f'rank {rank} after close\n')
    sys.stderr.flush()
    time.sleep(0.5)
    os._exit(0)
elif what == 'close_all':
    os.close(1)
    os.close(2)
    time.sleep(0.8)
    open(path('closed_end'), 'w').close()
    os._exit(0)
else:
    raise SystemExit(f'unknown FAULT_{rank}={what!r}')
