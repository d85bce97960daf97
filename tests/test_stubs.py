"""`_core.pyi` must describe the compiled module exactly (mypy's stubtest, as pydantic-core does)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_core_stub_matches_the_extension() -> None:
    proc = subprocess.run(
        [sys.executable, '-m', 'mypy.stubtest', 'dslaunch._core', '--allowlist', str(ROOT / '.mypy-stubtest-allowlist')],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
