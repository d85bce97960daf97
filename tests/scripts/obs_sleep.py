"""Prints 'ready', then waits in a function of its own (`dslaunch stacks` test subject) until
OBS_SLEEP seconds pass; prints 'resumed' and exits 0."""

import os
import time


def wait_here(seconds: float) -> None:
    time.sleep(seconds)  # SLEEP-LINE


rank = os.environ.get('RANK', '0')
print(f'rank {rank} ready', flush=True)
wait_here(float(os.environ.get('OBS_SLEEP', '60')))
print(f'rank {rank} resumed', flush=True)
