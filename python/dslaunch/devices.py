"""How many GPUs this machine offers, without importing torch.

Importing torch costs seconds on the CLI start path; the runner only needs a count (and,
with ``CUDA_VISIBLE_DEVICES``, the ids). Sources, first that answers wins:
``CUDA_VISIBLE_DEVICES`` (CUDA's parsing rules), the entries of
``/proc/driver/nvidia/gpus``, ``nvidia-smi -L`` (short timeout), else 0.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping

__all__ = ['VISIBLE_DEVICES_VAR', 'DeviceId', 'gpu_count', 'nvidia_smi_gpu_lines', 'visible_devices']

VISIBLE_DEVICES_VAR = 'CUDA_VISIBLE_DEVICES'
DeviceId = int | str

# Compiled on first use (re caches them), not at import: most launches set no CUDA_VISIBLE_DEVICES.
_INDEX = r'[0-9]+'
_UUID = r'(?:GPU|MIG)-\S+'


def visible_devices(environ: Mapping[str, str] | None = None) -> list[DeviceId] | None:
    """The devices ``CUDA_VISIBLE_DEVICES`` exposes; ``None`` when it is unset.

    Entries are indices (``int``) or ``GPU-<uuid>``/``MIG-<...>`` identifiers (``str``).
    As CUDA does, parsing stops at the first invalid entry, so ``-1`` or ``""`` expose nothing.
    """
    env = os.environ if environ is None else environ
    value = env.get(VISIBLE_DEVICES_VAR)
    if value is None:
        return None
    devices: list[DeviceId] = []
    for entry in value.split(','):
        entry = entry.strip()
        if re.fullmatch(_INDEX, entry):
            devices.append(int(entry))
        elif re.fullmatch(_UUID, entry):
            devices.append(entry)
        else:
            break
    return devices


def nvidia_smi_gpu_lines(timeout: float = 5.0) -> list[str] | None:
    """The ``GPU n: ...`` lines of ``nvidia-smi -L``; ``None`` if it is missing or fails."""
    # A GPU machine is counted from /proc, not by this; a CPU-only one looks up nvidia-smi on
    # every start, so by a PATH walk rather than shutil.which (importing shutil costs 2 ms).
    found = (os.path.join(d, 'nvidia-smi') for d in os.get_exec_path())
    smi = next((p for p in found if os.path.isfile(p) and os.access(p, os.X_OK)), None)
    if smi is None:
        return None
    import subprocess

    try:
        out = subprocess.run([smi, '-L'], capture_output=True, text=True, timeout=timeout, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    # MIG instances are listed as indented sub-lines; count whole GPUs only.
    return [line for line in out.stdout.splitlines() if line.startswith('GPU ')]


def gpu_count(
    environ: Mapping[str, str] | None = None,
    *,
    proc_dir: str = '/proc/driver/nvidia/gpus',
    smi_lines: Callable[[], list[str] | None] = nvidia_smi_gpu_lines,
) -> int:
    """Number of GPUs a rank launched from this environment could use."""
    visible = visible_devices(environ)
    if visible is not None:
        return len(visible)
    try:
        entries = os.listdir(proc_dir)
    except OSError:
        entries = []
    if entries:
        return len(entries)
    lines = smi_lines()
    return len(lines) if lines else 0
