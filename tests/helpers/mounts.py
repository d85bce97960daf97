"""A small tmpfs for "disk full" tests (root only; the test is skipped otherwise)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_tmpfs(tmp_path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's syntax, e.g. `128k`) at `tmp_path`/full, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip('mounting a tmpfs needs root')
    mnt = tmp_path / 'full'
    mnt.mkdir()
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(mnt)], capture_output=True,
                          check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs: {done.stderr.decode().strip()}')
    try:
        yield mnt
    finally:
        subprocess.run(['umount', '-l', str(mnt)], check=False)
