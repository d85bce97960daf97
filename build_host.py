"""The build backend (pyproject.toml): maturin's, with the native host added.

Before maturin builds a wheel (an editable install too), this builds `dslaunch-host`
(rust/src/host.rs) with cargo and puts it beside the extension, in `python/dslaunch/`, where
`[tool.maturin] include` takes it into the wheel. maturin cannot build an executable beside an
extension module itself (PyO3/maturin#368). Every other hook is maturin's own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Any

import maturin

ROOT = os.path.dirname(os.path.abspath(__file__))
HOST = os.path.join(ROOT, 'python', 'dslaunch', 'dslaunch-host')

get_requires_for_build_wheel = maturin.get_requires_for_build_wheel
get_requires_for_build_editable = maturin.get_requires_for_build_editable
get_requires_for_build_sdist = maturin.get_requires_for_build_sdist
prepare_metadata_for_build_wheel = maturin.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = maturin.prepare_metadata_for_build_editable
build_sdist = maturin.build_sdist


def build_host() -> None:
    """`cargo build --release --bin dslaunch-host`, copied to `python/dslaunch/`."""
    cargo = os.environ.get('CARGO', 'cargo')
    # cargo's progress on stderr: pip shows it with -v, and on a failure.
    subprocess.run([cargo, 'build', '--release', '--bin', 'dslaunch-host'], cwd=ROOT, check=True, stdout=sys.stderr)
    target = os.environ.get('CARGO_TARGET_DIR') or os.path.join(ROOT, 'target')
    # A new file renamed over the old: a job running the old one keeps it (no "text file busy").
    shutil.copy2(os.path.join(target, 'release', 'dslaunch-host'), f'{HOST}.tmp')
    os.replace(f'{HOST}.tmp', HOST)


def build_wheel(wheel_directory: str, config_settings: dict[str, Any] | None = None,
                metadata_directory: str | None = None) -> str:
    build_host()
    return str(maturin.build_wheel(wheel_directory, config_settings, metadata_directory))


def build_editable(wheel_directory: str, config_settings: dict[str, Any] | None = None,
                   metadata_directory: str | None = None) -> str:
    build_host()
    return str(maturin.build_editable(wheel_directory, config_settings, metadata_directory))
