"""GPU discovery without torch."""

from __future__ import annotations

import os
import stat
import sys

import pytest
from dslaunch import devices


@pytest.mark.parametrize(
    'value, expected',
    [
        ('0,1', [0, 1]),
        ('3', [3]),
        (' 2 , 5 ', [2, 5]),
        ('GPU-8a3b1c,GPU-77', ['GPU-8a3b1c', 'GPU-77']),
        ('MIG-GPU-8a3b/1/0,MIG-4f2e', ['MIG-GPU-8a3b/1/0', 'MIG-4f2e']),
        ('0,GPU-ab', [0, 'GPU-ab']),
        ('', []),
        ('-1', []),
        ('0,-1,2', [0]),  # CUDA stops at the first invalid entry
        ('1,x,2', [1]),
    ],
)
def test_visible_devices(value, expected):
    assert devices.visible_devices({'CUDA_VISIBLE_DEVICES': value}) == expected


def test_visible_devices_unset():
    assert devices.visible_devices({}) is None


def _no_smi():
    return None


def test_gpu_count_prefers_cuda_visible_devices(tmp_path):
    (tmp_path / '0000:01:00.0').mkdir()
    assert devices.gpu_count({'CUDA_VISIBLE_DEVICES': '4,5,6'}, proc_dir=str(tmp_path), smi_lines=_no_smi) == 3
    assert devices.gpu_count({'CUDA_VISIBLE_DEVICES': ''}, proc_dir=str(tmp_path), smi_lines=_no_smi) == 0


def test_gpu_count_from_proc(tmp_path):
    for bus in ('0000:01:00.0', '0000:41:00.0'):
        (tmp_path / bus).mkdir()
    assert devices.gpu_count({}, proc_dir=str(tmp_path), smi_lines=_no_smi) == 2


def test_gpu_count_from_nvidia_smi(tmp_path):
    lines = ['GPU 0: NVIDIA H100 (UUID: GPU-a)', 'GPU 1: NVIDIA H100 (UUID: GPU-b)']
    assert devices.gpu_count({}, proc_dir=str(tmp_path / 'absent'), smi_lines=lambda: lines) == 2


def test_gpu_count_none():
    assert devices.gpu_count({}, proc_dir='/nonexistent/gpus', smi_lines=_no_smi) == 0


def test_nvidia_smi_lines_counts_gpus_not_mig(tmp_path, monkeypatch):
    fake = tmp_path / 'nvidia-smi'
    fake.write_text(
        f'#!{sys.executable}\n'
        'print("GPU 0: A100 (UUID: GPU-a)")\n'
        'print("  MIG 1g.5gb Device 0: (UUID: MIG-x)")\n'
        'print("GPU 1: A100 (UUID: GPU-b)")\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv('PATH', str(tmp_path) + os.pathsep + os.environ.get('PATH', ''))
    assert devices.nvidia_smi_gpu_lines() == ['GPU 0: A100 (UUID: GPU-a)', 'GPU 1: A100 (UUID: GPU-b)']


def test_nvidia_smi_missing(monkeypatch, tmp_path):
    monkeypatch.setenv('PATH', str(tmp_path))
    assert devices.nvidia_smi_gpu_lines() is None


def test_no_torch_import():
    # The CLI path must stay light.
    import subprocess

    code = (
        'import sys, dslaunch.devices, dslaunch.runner, dslaunch.launch, dslaunch.launcher_helper, '
        'dslaunch.hostfile, dslaunch.numa, dslaunch.envfile, dslaunch.world_info, dslaunch.probes; '
        'bad = [m for m in ("torch", "psutil", "rich", "numpy") if m in sys.modules]; '
        'print(bad); sys.exit(1 if bad else 0)'
    )
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
