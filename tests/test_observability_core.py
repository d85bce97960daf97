"""Issue 9 in the Rust core, with real processes: the collapser keeps every rank's lines in order and
loses nothing (not even at teardown with lines held), launcher messages come after held lines, the
last output line is kept for hang reports, and no status line is drawn on a pipe or file."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from dslaunch import _core
from helpers.procs import wait_until

# Each rank prints shared lines (which collapse) and lines of its own, in rank-dependent orders.
ORDERS = [
    'echo A; echo B; echo "own $R"; echo C; echo A',
    'echo B; echo A; echo C; echo "own $R"; echo A',
    'echo A; echo "own $R"; echo B; echo A; echo C',
    'echo C; echo B; echo A; echo "own $R"; echo B',
]


def expand(text: str) -> dict[int, list[str]]:
    """Console text with collapsed lines (`[0-2,5]: x`) -> each rank's lines in console order."""
    per_rank: dict[int, list[str]] = {}
    for line in text.splitlines():
        m = re.fullmatch(r'\[([0-9,\-]+)\]: (.*)', line)
        assert m, f'torn or unprefixed line {line!r}'
        ranks: list[int] = []
        for part in m.group(1).split(','):
            lo, _, hi = part.partition('-')
            ranks.extend(range(int(lo), int(hi or lo) + 1))
        for r in ranks:
            per_rank.setdefault(r, []).append(m.group(2))
    return per_rank


def run_to_file(tmp_path: Path, scripts: list[str], run_id: str, **kw: object) -> tuple[_core.Report, str]:
    out = tmp_path / 'console.txt'
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        specs = [_core.RankSpec(['/bin/sh', '-c', s], env={'R': str(i)}) for i, s in enumerate(scripts)]
        sup = _core.Supervisor(specs, run_id=run_id, stdout_fd=fd, **kw)  # type: ignore[arg-type]
        report = sup.run()
    finally:
        os.close(fd)
    return report, out.read_text()


def test_collapsed_console_keeps_each_ranks_order_and_loses_nothing(tmp_path: Path, run_id: str) -> None:
    scripts = [ORDERS[i % len(ORDERS)] for i in range(12)]
    report, text = run_to_file(tmp_path, scripts, run_id, collapse='on', collapse_window=1.0)
    assert report.returncode == 0
    per_rank = expand(text)
    for i in range(12):
        want = [ln.replace('"own $R"', f'own {i}').removeprefix('echo ').strip('"')
                for ln in (c.strip() for c in ORDERS[i % len(ORDERS)].split(';'))]
        assert per_rank[i] == want, (i, text)
    lines = text.splitlines()
    assert len(lines) < 12 * 5, 'something collapsed'
    assert any(re.fullmatch(r'\[[0-9,\-]+\]: [ABC]', ln) and ('-' in ln or ',' in ln) for ln in lines)


def test_held_lines_are_written_when_the_job_is_torn_down(tmp_path: Path, run_id: str) -> None:
    # A 60 s window holds everything; the failing rank tears the job down at once, and the job
    # must end promptly with every held line written.
    scripts = ['echo same; echo "first $R"; sleep 30', 'echo same; echo "first $R"; sleep 0.3; exit 7']
    t0 = time.monotonic()
    report, text = run_to_file(tmp_path, scripts, run_id, collapse='on', collapse_window=60.0, grace_period=5.0)
    assert time.monotonic() - t0 < 20
    assert report.returncode == 7
    per_rank = expand(text)
    assert per_rank == {0: ['same', 'first 0'], 1: ['same', 'first 1']}
    assert '[0-1]: same' in text.splitlines()


def test_messages_follow_held_lines_and_last_line_is_kept(tmp_path: Path, run_id: str) -> None:
    out = tmp_path / 'console.txt'
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        sup = _core.Supervisor([_core.RankSpec(['/bin/sh', '-c', 'echo hello; echo "bye" >&2; sleep 30'])],
                               run_id=run_id, stdout_fd=fd, stderr_fd=fd, collapse='on', collapse_window=30.0,
                               keep_last_line=True)
        sup.start()
        wait_until(lambda: sup.status()[0].last_line == 'bye', 10, 'the last line')
        assert sup.console_message('launcher says hi') is True
        wait_until(lambda: 'launcher says hi' in out.read_text(), 10, 'the message')
        assert out.read_text().splitlines() == ['[0]: hello', '[0]: bye', 'launcher says hi']
        sup.terminate(grace_period=1)
        report = sup.wait(timeout=30)
        assert report is not None and report.ranks[0].last_line == 'bye'
        assert sup.console_message('too late') is False  # the console is closed: the caller prints
    finally:
        os.close(fd)


def test_last_line_is_not_kept_by_default(tmp_path: Path, run_id: str) -> None:
    report, _ = run_to_file(tmp_path, ['echo one'], run_id)
    assert report.ranks[0].last_line is None and report.ranks[0].output_lines == 1


def test_no_status_line_or_collapse_on_a_file_in_auto_mode(tmp_path: Path, run_id: str) -> None:
    report, text = run_to_file(tmp_path, ['echo same; sleep 1.2', 'echo same; sleep 1.2'], run_id,
                               collapse='auto', status_line=True)
    assert report.returncode == 0
    assert '\x1b' not in text and 'running' not in text
    assert sorted(text.splitlines()) == ['[0]: same', '[1]: same']


def test_bad_collapse_arguments_are_value_errors(run_id: str) -> None:
    import pytest

    spec = [_core.RankSpec(['true'])]
    with pytest.raises(ValueError, match='collapse'):
        _core.Supervisor(spec, run_id=run_id, collapse='sometimes')  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='collapse_window'):
        _core.Supervisor(spec, run_id=run_id, collapse_window=-1)
