"""An elastic rank without torch for the hang watchdog: every rank prints the same line; in the
first round (TORCHELASTIC_RESTART_COUNT 0) it then goes silent forever, later it exits 0."""

import os
import sys
import time

print('every rank says this', flush=True)
if os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0':
    time.sleep(600)
print(f'rank {os.environ["RANK"]} done after restart', flush=True)
sys.exit(0)
