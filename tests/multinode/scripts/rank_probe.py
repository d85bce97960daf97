#!/usr/bin/env python3
"""A rank that records what it was given, for the multi-node tests (standard library only).

    rank_probe.py [--local_rank=N] OUTDIR [ARGS...]

Writes OUTDIR/rank<RANK>.json (atomically) with its host, pid, argv (ARGS, byte for byte), cwd,
the ``--local_rank=N`` the per-node launcher put first (PDSH only), the rank variables a plain
torch.distributed script needs and every variable whose name starts with MLFLOW_DSLT_ (the
tests' exported values: a prefix DeepSpeed's runner exports). Then, if OUTDIR/control.json exists:
  {"exit": {"<rank>": code}, "exit_after": seconds, "sleep": seconds}
a rank listed in "exit" sleeps "exit_after" seconds, writes OUTDIR/exit<RANK> (the time it exits)
and exits with its code (with "kill": {"<rank>": N} instead: kills itself with signal N); the
others sleep "sleep" seconds (a rank blocked in a collective), exit 0.
With "term_delay": seconds, the others take SIGTERM as a cleanup that long (a checkpoint), then
write OUTDIR/term<RANK> and exit 143.
"""

import json
import os
import signal
import socket
import sys
import time

RANK_KEYS = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
EXTRA_KEYS = ('DSLAUNCH_TEST_TAG', 'DSLAUNCH_JOB_ID', 'PYTHONPATH', 'OMP_NUM_THREADS', 'CROSS_RANK', 'CROSS_SIZE',
              'CUDA_VISIBLE_DEVICES', 'TORCHELASTIC_ERROR_FILE', 'PATH', 'LD_LIBRARY_PATH')


def main() -> int:
    words = sys.argv[1:]
    local_rank_arg = words.pop(0) if words and words[0].startswith('--local_rank=') else None
    outdir, args = words[0], words[1:]
    rank = os.environ.get('RANK', f'unknown-{os.getpid()}')
    error_file = os.environ.get('TORCHELASTIC_ERROR_FILE')
    record = {
        'host': socket.gethostname(),
        'pid': os.getpid(),
        'argv': args,
        'local_rank_arg': local_rank_arg,
        'cwd': os.getcwd(),
        'env': {k: os.environ[k] for k in RANK_KEYS + EXTRA_KEYS if k in os.environ},
        'exports': {k: v for k, v in os.environ.items() if k.startswith('MLFLOW_DSLT_')},
        'cpus': sorted(os.sched_getaffinity(0)),
        'error_dir_exists': bool(error_file) and os.path.isdir(os.path.dirname(error_file)),
        'started': time.time(),
    }
    path = os.path.join(outdir, f'rank{rank}.json')
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        json.dump(record, f)
    os.replace(path + '.tmp', path)
    print(f'probe rank {rank} on {record["host"]}', flush=True)

    try:
        with open(os.path.join(outdir, 'control.json'), encoding='utf-8') as f:
            control = json.load(f)
    except FileNotFoundError:
        return 0
    code = control.get('exit', {}).get(rank)
    kill = control.get('kill', {}).get(rank)
    if code is not None or kill is not None:
        time.sleep(control.get('exit_after', 0))
        with open(os.path.join(outdir, f'exit{rank}'), 'w', encoding='utf-8') as f:
            f.write(repr(time.time()))
        if kill is not None:
            print(f'probe rank {rank} kills itself with signal {kill}', file=sys.stderr, flush=True)
            os.kill(os.getpid(), int(kill))
        print(f'probe rank {rank} exits with {code}', file=sys.stderr, flush=True)
        return int(code)
    if 'term_delay' in control:

        def clean_up(*_: object) -> None:
            time.sleep(control['term_delay'])
            with open(os.path.join(outdir, f'term{rank}'), 'w', encoding='utf-8') as f:
                f.write(repr(time.time()))
            os._exit(143)

        signal.signal(signal.SIGTERM, clean_up)
    time.sleep(control.get('sleep', 0))
    return 0


if __name__ == '__main__':
    sys.exit(main())
