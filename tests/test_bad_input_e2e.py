"""Bad input found by fuzzing every front end: each case is one clear error line, a non-zero exit,
no traceback, no hang, nothing started (the conftest fails a test that leaves a process behind)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from test_cli_e2e import DUMP, dslaunch, one_error_line

WORLD = 'eyJsb2NhbGhvc3QiOiBbMF19'  # {"localhost": [0]}


def _dslaunch_module(module: str, *args: str, env: dict[str, str] | None = None):
    import subprocess

    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, '-m', module, *args], env=full, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, check=False)


@pytest.mark.parametrize(('args', 'needle'), [
    (['--grace_period', 'nan'], '--grace_period must be >= 0'),
    (['--grace_period', '-1'], '--grace_period must be >= 0'),
    (['--hang_timeout', 'nan'], '--hang_timeout must be >= 0'),
    (['--bind_cores_to_rank', '--bind_core_list', '0,999'], 'core(s) 999 are not available on this host'),
    (['--launcher', 'a\nb', '-H', '{hostfile}', '--no_ssh_check', '--master_addr', '10.0.0.1'], 'Unknown launcher a\\nb'),
    (['--console_ranks', '\n'], '--console_ranks'),
    (['-H', '{hostfile}', '--no_ssh_check', '--master_addr', '10.0.0.1', '--dry_run', '--launcher_args', '"x'],
     'No closing quotation'),
    (['--report_json', '/nonexistent-dir/r.json'], 'cannot write --report_json'),
    (['--nproc-per-node', '1', '--master-port', '70000'], 'is not a port number'),
    (['--nproc-per-node', '99999999999'], 'more ranks per host'),
    (['--nproc-per-node', '1', '--nnodes', '0'], '--nnodes must be at least 1'),
    (['--nproc-per-node', '1', '--rdzv-backend', 'bogus'], 'not a rendezvous backend'),
    (['--nproc-per-node', '1', '--grace_period', '-1'], '--grace_period must be >= 0'),
    (['--nproc-per-node', '1', '--log-dir', '{file}'], '{file}'),
    (['--nproc-per-node', '1', '--local-ranks-filter', '0-99999999999'], '0-99999999999'),
], ids=lambda v: repr(v)[:40] if isinstance(v, list) else None)
def test_cli_bad_input_is_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    hostfile = tmp_path / 'hostfile'
    hostfile.write_text('h1 slots=1\nh2 slots=1\n')
    file = tmp_path / 'a-file'
    file.write_text('')
    fill = {'hostfile': str(hostfile), 'file': str(file)}
    proc = dslaunch(*[a.format(**fill) if '{' in a else a for a in args], DUMP, env={'DUMP_DIR': str(tmp_path)},
                    timeout=60)
    assert proc.returncode != 0
    assert needle.format(**fill) in one_error_line(proc)
    assert not list(tmp_path.glob('rank*.json')), 'a rank started'


@pytest.mark.parametrize(('args', 'env', 'needle'), [
    (['--grace_period', '-1'], {}, '--grace_period must be >= 0'),
    (['--console_ranks', '1-99999999999'], {}, '1-99999999999'),
    (['--hang_timeout', 'nan'], {}, '--hang_timeout must be >= 0'),
    ([], {'DSLAUNCH_REPORT_TO': 'garbage', 'DSLAUNCH_JOB_TOKEN': 't'}, 'runner'),
])
def test_per_node_launcher_bad_input_is_one_line(tmp_path: Path, args: list[str], env: dict[str, str],
                                                 needle: str) -> None:
    proc = _dslaunch_module('dslaunch.launch', f'--world_info={WORLD}', '--master_port=29512', *args, DUMP,
                            env={'DUMP_DIR': str(tmp_path), **env})
    assert proc.returncode != 0
    assert needle in one_error_line(proc)
    assert not list(tmp_path.glob('rank*.json'))


@pytest.mark.skipif(not shutil.which('mpirun.mpich'), reason='MPICH (the Debian package mpich): make system-deps')
def test_mpi_engines_refuse_device_ids_they_cannot_place(tmp_path: Path) -> None:
    """`CUDA_VISIBLE_DEVICES=1,3` with an MPI engine: its ranks would run on devices 0 and 1, so it is
    refused, as Open MPI and Slurm refuse it (DeepSpeed: 'does not support worker include/exclusion')."""
    proc = dslaunch('--launcher', 'mpich', '--force_multi', DUMP, env={'CUDA_VISIBLE_DEVICES': '1,3',
                                                                      'DUMP_DIR': str(tmp_path)})
    assert proc.returncode == 1
    assert one_error_line(proc) == ('dslaunch: error: mpich backend cannot select specific device ids, got [1, 3] on '
                                    'localhost. Filter whole hosts, or keep the first N slots on every host.')
    assert not list(tmp_path.iterdir())


def test_report_json_through_a_symlink_writes_the_target(tmp_path: Path) -> None:
    target = tmp_path / 'real.json'
    link = tmp_path / 'link.json'
    link.symlink_to(target)
    proc = dslaunch('--num_gpus', '1', '--report_json', str(link), DUMP, env={'DUMP_DIR': str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and '"returncode": 0' in target.read_text()


def test_report_json_into_a_fifo_writes_into_it(tmp_path: Path) -> None:
    import threading

    fifo = tmp_path / 'fifo'
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    proc = dslaunch('--num_gpus', '1', '--report_json', str(fifo), DUMP, env={'DUMP_DIR': str(tmp_path)})
    reader.join(30)
    assert proc.returncode == 0, proc.stderr
    assert fifo.is_fifo() and '"returncode": 0' in got[0]
