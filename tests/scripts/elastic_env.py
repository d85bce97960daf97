"""An elastic rank without torch: records its argv and environment as JSON in
$DUMP_DIR/rank<RANK>.restart<TORCHELASTIC_RESTART_COUNT>.json, then exits.

Failure on demand: rank $FAIL_RANK exits with $FAIL_CODE (default 3) while
TORCHELASTIC_RESTART_COUNT < $FAIL_UNTIL_RESTART (default: always).
"""

import json
import os
import sys
import time

KEYS = [
    'RANK',
    'LOCAL_RANK',
    'WORLD_SIZE',
    'LOCAL_SIZE',
    'CROSS_RANK',
    'CROSS_SIZE',
    'MASTER_ADDR',
    'MASTER_PORT',
    'CUDA_VISIBLE_DEVICES',
    'GROUP_RANK',
    'ROLE_RANK',
    'ROLE_NAME',
    'LOCAL_WORLD_SIZE',
    'GROUP_WORLD_SIZE',
    'ROLE_WORLD_SIZE',
    'TORCHELASTIC_RESTART_COUNT',
    'TORCHELASTIC_MAX_RESTARTS',
    'TORCHELASTIC_RUN_ID',
    'TORCHELASTIC_USE_AGENT_STORE',
    'TORCH_NCCL_ASYNC_ERROR_HANDLING',
    'DSLAUNCH_RUN_ID',
    'TORCH_DISABLE_SHARE_RDZV_TCP_STORE',
    'DSLAUNCH_REPORT_TO',
    'TORCHELASTIC_ERROR_FILE',
]
rank = os.environ.get('RANK', 'x')
restart = int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0'))
with open(os.path.join(os.environ['DUMP_DIR'], f'rank{rank}.restart{restart}.json'), 'w') as f:
    error_file = os.environ.get('TORCHELASTIC_ERROR_FILE')
    json.dump({'argv': sys.argv[1:], 'env': {k: os.environ[k] for k in KEYS if k in os.environ},
               'error_dir_exists': bool(error_file) and os.path.isdir(os.path.dirname(error_file))}, f)
print(f'rank {rank} restart {restart} world {os.environ.get("WORLD_SIZE")}', flush=True)
if rank == os.environ.get('FAIL_RANK') and restart < int(os.environ.get('FAIL_UNTIL_RESTART', '1000000')):
    # Fail only once every rank of this start has recorded itself: fail-fast would otherwise
    # stop a slower sibling before its record exists.
    world = int(os.environ.get('WORLD_SIZE', '1'))
    names = [os.path.join(os.environ['DUMP_DIR'], f'rank{r}.restart{restart}.json') for r in range(world)]
    deadline = time.monotonic() + 30
    while not all(os.path.exists(n) for n in names) and time.monotonic() < deadline:
        time.sleep(0.01)
    print(f'rank {rank} fails on purpose', file=sys.stderr, flush=True)
    sys.exit(int(os.environ.get('FAIL_CODE', '3')))
