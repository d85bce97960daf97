"""A rank that records what it was given: argv and the launcher-set environment, as JSON in
$DUMP_DIR/rank<RANK>.json. Exits with $EXIT_<RANK> if set (default 0)."""

import json
import os
import sys

KEYS = ['RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_SIZE', 'CROSS_RANK', 'CROSS_SIZE', 'MASTER_ADDR',
        'MASTER_PORT', 'CUDA_VISIBLE_DEVICES', 'LOCAL_WORLD_SIZE', 'GROUP_RANK', 'OMP_NUM_THREADS', 'DSLAUNCH_RUN_ID',
        'ROLE_NAME', 'TORCHELASTIC_RUN_ID', 'TORCHELASTIC_RESTART_COUNT', 'TORCHELASTIC_USE_AGENT_STORE',
        'TORCHELASTIC_ERROR_FILE', 'TORCHELASTIC_SIGNALS_TO_HANDLE']
rank = os.environ.get('RANK', 'x')
with open(os.path.join(os.environ['DUMP_DIR'], f'rank{rank}.json'), 'w') as f:
    error_file = os.environ.get('TORCHELASTIC_ERROR_FILE')
    json.dump({'argv': sys.argv[1:], 'env': {k: os.environ[k] for k in KEYS if k in os.environ},
               'error_dir_exists': bool(error_file) and os.path.isdir(os.path.dirname(error_file))}, f)
print(f'hello from rank {rank}', flush=True)
print(f'stderr from rank {rank}', file=sys.stderr, flush=True)
sys.exit(int(os.environ.get(f'EXIT_{rank}', '0')))
