"""Real DeepSpeed training scripts under `dslaunch`, compared with DeepSpeed's own `deepspeed`
runner on the same machine (DeepSpeed 0.19.8 is installed into .venv by `make install`; CPU
accelerator, gloo and DeepSpeed's shared-memory collectives, which it compiles on first use).

The script is tests/scripts/ds_zero_train.py: DeepSpeedExamples' shape (`--local_rank`,
`--deepspeed --deepspeed_config`, `deepspeed.init_distributed()`, `deepspeed.initialize()`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_e2e import SCRIPTS, dslaunch, free_port

deepspeed = pytest.importorskip('deepspeed', reason='make install puts DeepSpeed into .venv')

DS_TRAIN = str(SCRIPTS / 'ds_zero_train.py')
DEEPSPEED = str(Path(sys.executable).parent / 'deepspeed')
#: First use compiles DeepSpeed's CPU collectives (about 35 s on 2 cores), then a run takes ~10 s.
TIMEOUT = 600


def ds_config(tmp_path: Path, stage: int) -> Path:
    path = tmp_path / f'ds_zero{stage}.json'
    path.write_text(json.dumps({
        'train_batch_size': 8, 'train_micro_batch_size_per_gpu': 4,
        'optimizer': {'type': 'AdamW', 'params': {'lr': 0.01, 'torch_adam': True}},
        'zero_optimization': {'stage': stage},
    }))
    return path


#: The script's own lines, found anywhere: under DeepSpeed's runner the ranks share one stdout
#: and a rank's newline can land after the other rank's next line (dslaunch keeps lines whole).
SCRIPT_LINE = re.compile(r'rank \d (?:step \d loss -?[\d.]+|of 2 local_rank \d LOCAL_RANK \d params -?[\d.]+)')


def script_lines(text: str) -> list[str]:
    return sorted(SCRIPT_LINE.findall(text))


@pytest.mark.parametrize('stage', [2, 3])
def test_a_zero_training_script_gives_what_it_gives_under_deepspeeds_runner(tmp_path: Path, stage: int) -> None:
    """`dslaunch --num_gpus 2 script --deepspeed --deepspeed_config ds.json`, then `deepspeed` with the
    same line: both exit 0 and every rank prints the same losses, the same `--local_rank` and
    LOCAL_RANK, and the same parameters at the end (identical on both ranks)."""
    line = ['--num_gpus', '2', DS_TRAIN, '--deepspeed', '--deepspeed_config', str(ds_config(tmp_path, stage))]
    env = {'DS_ACCELERATOR': 'cpu'}
    ours = dslaunch('--master_port', str(free_port()), *line, env=env, timeout=TIMEOUT)
    assert ours.returncode == 0, ours.stderr[-3000:]
    theirs = subprocess.run([DEEPSPEED, '--master_port', str(free_port()), *line], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=TIMEOUT, stdin=subprocess.DEVNULL, check=False)
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    got, want = script_lines(ours.stdout), script_lines(theirs.stdout)
    assert len(want) == 2 * 3 + 2, theirs.stdout  # 3 steps and a summary per rank
    assert got == want
    ours_lines = [ln for ln in ours.stdout.splitlines() if SCRIPT_LINE.search(ln)]
    assert len(ours_lines) == len(want), ours.stdout  # under dslaunch each on its own line, prefixed
    assert all(re.fullmatch(r'\[[01]\]: ' + SCRIPT_LINE.pattern, ln) for ln in ours_lines), ours.stdout
    finals = {line.split(' params ')[1] for line in got if ' params ' in line}
    assert len(finals) == 1, got  # ZeRO kept the ranks' models in step
    assert 'rank 1 of 2 local_rank 1 LOCAL_RANK 1' in '\n'.join(got)
