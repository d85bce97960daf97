"""A rank for benches/bench_multinode.py: no torch, so the launchers' own costs show.

usage: mn_rank.py TOKEN OUTDIR MODE   (TOKEN only marks the processes of one trial)

On start it writes OUTDIR/up.<RANK> = "<CLOCK_MONOTONIC> <pid> <hostname>" (the test hosts
share one kernel, so their monotonic clocks agree). MODE `wait` sleeps; MODE `fail` makes the
last rank wait until every rank is up, then write OUTDIR/failed with its exit time and exit 7.
"""

import os
import socket
import sys
import time

_, token, outdir, mode = sys.argv
rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])


def put(name: str, text: str) -> None:
    tmp = os.path.join(outdir, f'.{name}.{os.getpid()}')
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, os.path.join(outdir, name))  # readers never see half a record


put(f'up.{rank}', f'{time.monotonic()} {os.getpid()} {socket.gethostname()}')
if mode == 'fail' and rank == world - 1:
    while not all(os.path.exists(os.path.join(outdir, f'up.{r}')) for r in range(world)):
        time.sleep(0.01)
    time.sleep(0.3)
    put('failed', repr(time.monotonic()))
    os._exit(7)
time.sleep(120)
