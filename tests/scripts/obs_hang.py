"""A gloo job where one rank (SLOW_RANK, default 1) sleeps before a barrier while the others wait
in it: the hang watchdog's test subject (tests/test_observability_e2e.py). Until the process group
is up, a thread prints a heartbeat, so a slow start on a busy machine is not taken for the hang."""

import os
import sys
import threading
import time

rank = int(os.environ['RANK'])
started = threading.Event()


def heartbeat() -> None:
    while not started.wait(0.5):
        print(f'rank {rank} starting', flush=True)


threading.Thread(target=heartbeat, daemon=True).start()

import datetime

import torch.distributed as dist

dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=600))
started.set()
print(f'rank {rank} ready', flush=True)
if rank == int(os.environ.get('SLOW_RANK', '1')):
    print(f'rank {rank} loading data', file=sys.stderr, flush=True)
    time.sleep(600)  # HANG-LINE: the slow rank is here
dist.barrier()  # BARRIER-LINE: the others wait here
print(f'rank {rank} done', flush=True)
dist.destroy_process_group()
