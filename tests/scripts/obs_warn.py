"""Every rank prints the same warning at the same moment (OBS_AT, a Unix time), then a line of its
own: the collapsed console's test subject (tests/test_observability_e2e.py)."""

import os
import sys
import time

rank = int(os.environ.get('RANK', '0'))
at = float(os.environ.get('OBS_AT', '0'))
time.sleep(max(0.0, at - time.time()))
print('UserWarning: this warning is printed by every rank', file=sys.stderr, flush=True)
print(f'rank {rank} after the warning', file=sys.stderr, flush=True)
print(f'rank {rank} stdout line', flush=True)
