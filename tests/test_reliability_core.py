"""Reliability of the core under load and bad conditions (issue 8): a rank writing 1 GB without
a newline (memory stays bounded), a full disk under the per-rank log files, and a soak of 200
consecutive jobs of 64 ranks with random failures in one launcher process."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from dslaunch import _core
from helpers import mounts
from helpers.procs import HELPERS, PY, marked

F_SETPIPE_SZ = 1031


def _vm(field: str) -> int:
    """A /proc/self/status size in KiB (VmHWM, VmRSS)."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise AssertionError(f'{field} not in /proc/self/status')


class CountingReader(threading.Thread):
    """Drains a pipe, checking on the fly that the stream is `[0]: ` + max_line zero bytes + `\\n`
    repeated (and a shorter last piece), without keeping it."""

    def __init__(self, fd: int, max_line: int, prefix: bytes) -> None:
        super().__init__(daemon=True)
        self.fd, self.prefix = fd, prefix
        self.period = len(prefix) + max_line + 1
        self.total = 0
        self.newlines: list[int] = []  # offsets of the newlines that are not where expected
        self.newline_count = 0
        self.non_zero = 0

    def run(self) -> None:
        while data := os.read(self.fd, 1 << 20):
            pos = data.find(b'\n')
            while pos != -1:
                offset = self.total + pos
                if (offset + 1) % self.period and len(self.newlines) < 10:
                    self.newlines.append(offset)
                self.newline_count += 1
                pos = data.find(b'\n', pos + 1)
            self.non_zero += len(data) - data.count(0)
            self.total += len(data)


def test_one_gigabyte_without_a_newline_keeps_memory_bounded() -> None:
    """A rank writes 1 GiB of NUL bytes and never a line end. The console gets it all, cut into
    max_line (64 KiB) pieces each behind the prefix and ended by the cut's newline; the launcher's
    peak memory during the job grows by far less than the stream (the splitter holds at most one
    max_line piece, the console backlog at most its 8 MiB high-water mark)."""
    size = 1 << 30
    max_line = 64 * 1024
    r, w = os.pipe()
    fcntl.fcntl(r, F_SETPIPE_SZ, 1 << 20)
    reader = CountingReader(r, max_line, b'[0]: ')
    reader.start()
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # reset VmHWM to the current RSS
    base = _vm('VmRSS')
    try:
        rank = _core.RankSpec(['head', '-c', str(size), '/dev/zero'])
        report = _core.Supervisor([rank], stdout_fd=w, max_line_bytes=max_line, forward_signals=[]).run()
        peak = _vm('VmHWM')
    finally:
        os.close(w)
        reader.join(120)
        os.close(r)
    assert report.returncode == 0
    assert report.ranks[0].output_bytes == size
    pieces = size // max_line
    assert reader.newline_count == pieces and reader.newlines == [], reader.newlines
    assert reader.total == size + pieces * (len('[0]: ') + 1)
    assert reader.non_zero == pieces * (len('[0]: ') + 1), 'only prefixes and cut newlines were added'
    growth_mib = (peak - base) / 1024
    assert growth_mib < 64, f'peak memory grew by {growth_mib:.0f} MiB while 1 GiB streamed through'


# ---- a full disk under the per-rank log files -------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (root only): the disk the log files fill up."""
    with mounts.small_tmpfs(tmp_path, '256k') as mnt:
        yield mnt


def test_full_disk_for_log_files_keeps_the_job_running(tmp_path: Path, small_tmpfs: Path) -> None:
    """Policy (docs/reliability.md): when a rank's log file cannot be written (ENOSPC), the job
    goes on; that file stops being written (it keeps what fit, a prefix of the rank's output);
    one warning line per file names the rank and the file; the report marks the rank's log as
    incomplete (`log_error`); the console still gets every line. Ranks whose files fit are
    untouched."""
    lines = 3000  # ~190 KB per rank: two ranks overflow 256 KiB together, the small one fits
    # The big ranks start writing once the small rank's lines are in its log file.
    code = (
        'import sys, time\n'
        'r, n, small_log = sys.argv[1], int(sys.argv[2]), sys.argv[3]\n'
        'while r != "2" and open(small_log).read().count("\\n") < 10:\n'
        '    time.sleep(0.01)\n'
        'for i in range(n):\n'
        '    sys.stdout.write(f"rank {r} line {i:05d} " + "x" * 40 + "\\n")\n'
    )
    counts = {0: lines, 1: lines, 2: 10}
    ranks = [
        _core.RankSpec(
            [PY, '-c', code, str(r), str(n), str(small_tmpfs / 'rank2.log')], log_file=small_tmpfs / f'rank{r}.log'
        )
        for r, n in counts.items()
    ]
    out_path, err_path = tmp_path / 'out', tmp_path / 'err'
    out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        report = _core.Supervisor(ranks, stdout_fd=out, stderr_fd=err, forward_signals=[]).run()
    finally:
        os.close(out)
        os.close(err)
    assert report.returncode == 0 and report.success, 'a full log disk does not fail the job'
    shown = out_path.read_text().splitlines()
    for r, n in counts.items():
        want = [f'rank {r} line {i:05d} ' + 'x' * 40 for i in range(n)]
        assert [ln[len(f'[{r}]: ') :] for ln in shown if ln.startswith(f'[{r}]: ')] == want, f'rank {r} console'
    warnings = [ln for ln in err_path.read_text().splitlines() if 'log file' in ln]
    hit = [r.rank for r in report.ranks if r.log_error is not None]
    assert hit, 'the 256 KiB disk did not fill up: the test proves nothing'
    assert 2 not in hit, 'the small rank was written before the disk filled'
    assert len(warnings) == len(hit), warnings
    for rank in hit:
        info = report.ranks[rank]
        assert 'No space left on device' in (info.log_error or '')
        mine = [w for w in warnings if f'rank {rank} ' in w]
        assert len(mine) == 1, warnings
        full_text = ''.join(f'rank {rank} line {i:05d} ' + 'x' * 40 + '\n' for i in range(counts[rank]))
        kept = (small_tmpfs / f'rank{rank}.log').read_text()
        assert full_text.startswith(kept) and len(kept) < len(full_text), 'the log keeps a prefix'
    assert (small_tmpfs / 'rank2.log').read_text().count('\n') == 10


def test_full_disk_warning_names_the_log_file(tmp_path: Path, small_tmpfs: Path) -> None:
    """The one warning names the file that stopped being written (and says it is incomplete)."""
    log = small_tmpfs / 'rank0.log'
    rank = _core.RankSpec(['head', '-c', str(1 << 20), '/dev/zero'], log_file=log)
    err_path = tmp_path / 'err'
    err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        report = _core.Supervisor([rank], stdout_fd=null, stderr_fd=err, forward_signals=[]).run()
    finally:
        os.close(err)
        os.close(null)
    assert report.returncode == 0 and report.ranks[0].log_error is not None
    warnings = [ln for ln in err_path.read_text().splitlines() if 'log file' in ln]
    assert len(warnings) == 1 and str(log) in warnings[0] and 'incomplete' in warnings[0], warnings


# ---- the soak -------------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_soak_200_jobs_of_64_ranks_leave_no_zombie_orphan_or_fd(no_process_left_behind: str) -> None:
    """200 consecutive jobs of 64 ranks (12,800 processes) in one launcher process, each a random
    (seeded) scenario: all succeed, one fails, one dies of SIGKILL, one leaves a background
    process, or the caller stops the job. Every report is as the scenario says; afterwards the
    launcher holds the same fds and threads as after its first job, has no zombie child, and no
    process of any job is alive."""
    done = subprocess.run(
        [PY, str(HELPERS / 'soak.py'), '200', '64', '20260808'],
        capture_output=True, text=True, timeout=220, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result['mismatches'] == []
    assert set(result['scenarios']) == {'ok', 'fail', 'signal', 'leftover', 'stop'}
    assert sum(result['scenarios'].values()) == 200
    assert result['fds_after'] == result['fds_before'], 'leaked fds'
    assert result['threads_after'] == result['threads_before'], 'leaked threads'
    assert result['zombies'] == []
    assert result['marked_left'] == []
    assert marked(f'DSLAUNCH_TEST_TAG={no_process_left_behind}') == []
    print(f'soak: {result["processes"]} ranks in {result["elapsed"]:.1f} s, scenarios {result["scenarios"]}')
