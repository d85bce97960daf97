"""Log multiplexing: many ranks writing fast, through a regular file and through a pipe drained by
a slow reader; every console segment is one rank's prefix plus one whole line of that rank; all
bytes arrive, unchanged, in order per rank; log files get the raw bytes; `\\r`, invalid UTF-8, an
endless line, `prefix=None`, `console_ranks` and `stderr_tail`."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dslaunch import _core
from helpers.procs import HELPERS, PY, wait_until
from helpers.writer import awk_command, expected, sh_command

PREFIX = re.compile(rb'\[(\d+)\]: ')


class SlowReader(threading.Thread):
    """Drains a pipe in small reads with pauses: a console that cannot keep up."""

    def __init__(self, fd: int, chunk: int = 32768, pause: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.fd, self.chunk, self.pause = fd, chunk, pause
        self.parts: list[bytes] = []

    def run(self) -> None:
        while data := os.read(self.fd, self.chunk):
            self.parts.append(data)
            time.sleep(self.pause)

    @property
    def data(self) -> bytes:
        return b''.join(self.parts)


@contextmanager
def console(kind: str, tmp_path: Path, name: str) -> Iterator[tuple[int, list[bytes]]]:
    """An fd for stdout_fd/stderr_fd; after the block, result[0] holds everything written to it."""
    result: list[bytes] = []
    if kind == 'file':
        path = tmp_path / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            yield fd, result
        finally:
            os.close(fd)
        result.append(path.read_bytes())
    else:
        r, w = os.pipe()
        reader = SlowReader(r)
        reader.start()
        try:
            yield w, result
        finally:
            os.close(w)
            reader.join(60)
            os.close(r)
        assert not reader.is_alive()
        result.append(reader.data)


def demux(data: bytes) -> dict[int, bytes]:
    """Splits prefixed console output back into each rank's bytes. Fails on any line that does not
    start with a prefix (a torn line: another rank's bytes in the middle of one)."""
    per_rank: dict[int, bytes] = {}
    assert data.endswith(b'\n') or not data
    for seg in data.split(b'\n')[:-1]:
        m = PREFIX.match(seg)
        assert m, f'console line without a prefix: {seg[:120]!r}'
        r = int(m.group(1))
        per_rank[r] = per_rank.get(r, b'') + seg[m.end() :] + b'\n'
    return per_rank


def console_form(raw: bytes) -> bytes:
    """What the console shows for one rank's stream: an unterminated tail gets its newline."""
    return raw if not raw or raw.endswith(b'\n') else raw + b'\n'


def assert_merge_of(log: bytes, out: bytes, err: bytes, rank: int) -> None:
    """`log` is `out` and `err` merged in read order. The merge may put a stderr line in the middle
    of a stdout line (stdio cuts lines at block boundaries, as `2>&1` would show), so instead of
    splitting lines: every stderr write here is one whole line `R<rank> e L<i> ...\n` shorter than
    PIPE_BUF (so no read splits it), a pattern that never occurs in stdout; cut exactly those out
    and both streams must be left intact."""
    assert len(log) == len(out) + len(err)
    err_line = re.compile(rb'R%d e L\d+ [^\n]*\n' % rank)
    assert b''.join(m.group() for m in err_line.finditer(log)) == err
    assert err_line.sub(b'', log) == out


@pytest.mark.parametrize('kind', ['file', 'slow-pipe'])
def test_many_fast_ranks_every_line_whole_and_accounted_for(kind: str, tmp_path: Path) -> None:
    modes = ['print'] * 5 + ['raw'] * 4 + ['sh'] * 3 + ['awk'] * 3
    nlines = {'print': 1200, 'raw': 1200, 'sh': 400, 'awk': 2500}
    ranks = []
    for r, mode in enumerate(modes):
        if mode == 'sh':
            argv = sh_command(r, nlines[mode])
        elif mode == 'awk':
            argv = awk_command(r, nlines[mode])
        else:
            argv = [PY, str(HELPERS / 'writer.py'), mode, str(r), str(nlines[mode])]
        ranks.append(_core.RankSpec(argv, log_file=tmp_path / f'rank{r}.log'))
    with console(kind, tmp_path, 'out') as (out_fd, out), console(kind, tmp_path, 'err') as (err_fd, err):
        report = _core.Supervisor(ranks, stdout_fd=out_fd, stderr_fd=err_fd).run()
    assert report.returncode == 0, [(r.rank, r.returncode, r.stderr_tail[-3:]) for r in report.ranks]
    got_out, got_err = demux(out[0]), demux(err[0])
    total = 0
    for r, mode in enumerate(modes):
        want_out, want_err = expected(mode, r, nlines[mode])
        assert got_out.get(r, b'') == console_form(want_out), f'rank {r} ({mode}) stdout differs on the console'
        assert got_err.get(r, b'') == console_form(want_err), f'rank {r} ({mode}) stderr differs on the console'
        info = report.ranks[r]
        assert info.output_bytes == len(want_out) + len(want_err)
        assert info.output_lines == len(console_form(want_out).splitlines()) + len(console_form(want_err).splitlines())
        log = (tmp_path / f'rank{r}.log').read_bytes()
        if want_err:
            assert_merge_of(log, want_out, want_err, r)
        else:
            assert log == want_out, f'rank {r} log file differs'
        total += len(want_out) + len(want_err)
    assert total > 9_000_000, 'enough output to overrun the 8 MiB console backlog limit'


def test_last_words_of_ranks_that_exit_at_once_are_never_lost(tmp_path: Path) -> None:
    n = 64
    ranks = [_core.RankSpec(['/bin/sh', '-c', f'printf "first %s\\nlast words %s" {r} {r}']) for r in range(n)]
    with console('file', tmp_path, 'out') as (fd, out):
        report = _core.Supervisor(ranks, stdout_fd=fd).run()
    assert report.returncode == 0
    got = demux(out[0])
    assert got == {r: f'first {r}\nlast words {r}\n'.encode() for r in range(n)}


def test_carriage_returns_and_invalid_utf8_pass_through_unchanged(tmp_path: Path) -> None:
    data = b'10%\r20%\r30%\rdone\r\n\xff\xfe\x80 not utf-8 \xc3\x28\nno newline \xe2\x82'
    rank = _core.RankSpec(
        [PY, '-c', f'import os; os.write(1, {data!r}); os.write(2, {data!r})'], log_file=tmp_path / 'log'
    )
    with console('file', tmp_path, 'out') as (out_fd, out), console('file', tmp_path, 'err') as (err_fd, err):
        report = _core.Supervisor([rank], stdout_fd=out_fd, stderr_fd=err_fd).run()
    assert report.returncode == 0
    shown = (
        b'[0]: 10%\r[0]: 20%\r[0]: 30%\r[0]: done\r\n[0]: \xff\xfe\x80 not utf-8 \xc3\x28\n[0]: no newline \xe2\x82\n'
    )
    assert out[0] == shown
    assert err[0] == shown
    assert (tmp_path / 'log').read_bytes() == data + data
    assert report.ranks[0].stderr_tail[-1] == 'no newline \ufffd'


@pytest.mark.parametrize('max_line', [65536, 1000])
def test_endless_line_arrives_in_pieces_of_max_line_bytes(tmp_path: Path, max_line: int) -> None:
    size = 1_000_000
    code = f'import os, string; d = (string.ascii_letters * {size // 52 + 1}).encode()[:{size}]; os.write(1, d)'
    with console('slow-pipe', tmp_path, 'out') as (fd, out):
        report = _core.Supervisor([_core.RankSpec([PY, '-c', code])], stdout_fd=fd, max_line_bytes=max_line).run()
    assert report.returncode == 0
    pieces = out[0].split(b'\n')[:-1]
    assert all(p.startswith(b'[0]: ') for p in pieces)
    bodies = [p[5:] for p in pieces]
    assert all(len(b) == max_line for b in bodies[:-1]) and 0 < len(bodies[-1]) <= max_line
    assert len(bodies) == -(-size // max_line)
    import string

    assert b''.join(bodies) == (string.ascii_letters * (size // 52 + 1)).encode()[:size]
    assert report.ranks[0].output_bytes == size


def test_log_files_hold_each_ranks_bytes_exactly_without_prefix(tmp_path: Path) -> None:
    code = (
        'import os, sys\n'
        'for i in range(300):\n'
        '    os.write(1, b"R%d o L%d stdout line\\n" % (int(sys.argv[1]), i))\n'
        '    if i % 3 == 0: os.write(2, b"R%d e L%d stderr line\\n" % (int(sys.argv[1]), i))\n'
        'os.write(1, b"tail without newline")\n'
    )
    ranks = [_core.RankSpec([PY, '-c', code, str(r)], log_file=tmp_path / f'{r}.log') for r in range(4)]
    with console('file', tmp_path, 'out') as (out_fd, _), console('file', tmp_path, 'err') as (err_fd, _):
        report = _core.Supervisor(ranks, stdout_fd=out_fd, stderr_fd=err_fd).run()
    assert report.returncode == 0
    for r in range(4):
        want_out = b''.join(b'R%d o L%d stdout line\n' % (r, i) for i in range(300)) + b'tail without newline'
        want_err = b''.join(b'R%d e L%d stderr line\n' % (r, i) for i in range(0, 300, 3))
        log = (tmp_path / f'{r}.log').read_bytes()
        assert not log.startswith(b'[')
        assert_merge_of(log, want_out, want_err, r)


def test_prefix_none_gives_raw_whole_lines(tmp_path: Path) -> None:
    ranks = [_core.RankSpec(sh_command(r, 300)) for r in range(4)]
    with console('slow-pipe', tmp_path, 'out') as (fd, out):
        report = _core.Supervisor(ranks, prefix=None, stdout_fd=fd, stderr_fd=fd).run()
    assert report.returncode == 0
    lines = out[0].split(b'\n')
    assert lines[-1] == b''
    for r in range(4):
        want_out, want_err = expected('sh', r, 300)
        mine = [x + b'\n' for x in lines[:-1] if x.startswith(b'R%d ' % r)]
        assert b''.join(x for x in mine if x.startswith(b'R%d o' % r)) == want_out
        assert b''.join(x for x in mine if x.startswith(b'R%d e' % r)) == want_err
    assert all(re.fullmatch(rb'R\d [oe] L\d+ x*', x) for x in lines[:-1]), 'every line is one whole rank line'


def test_custom_prefix_template(tmp_path: Path) -> None:
    ranks = [_core.RankSpec(['echo', 'hi'], tag=f'node{r}') for r in range(2)]
    with console('file', tmp_path, 'out') as (fd, out):
        _core.Supervisor(ranks, prefix='<{rank}|{tag}> ', stdout_fd=fd).run()
    assert sorted(out[0].splitlines()) == [b'<0|node0> hi', b'<1|node1> hi']


def test_console_copies_get_the_prefixed_lines_holding_a_needle(tmp_path: Path) -> None:
    """torchrun's --duplicate-*-filters: each shown, prefixed line of the stream that holds one of
    the needles goes to the copy too, as the rank wrote it (collapsing on); bare streams, ranks off
    the console and the other lines are not copied; an empty needle takes every line."""
    write = '/bin/sh', '-c', 'echo loss=1; echo step; echo loss=2 >&2; printf "loss-no-newline"'
    ranks = [
        _core.RankSpec(write),
        _core.RankSpec(write, bare='stdout'),
        _core.RankSpec(write, console=False),
    ]
    copies = {'stdout': (tmp_path / 'out.log', ['loss', 'nothing']), 'stderr': (str(tmp_path / 'err.log'), [''])}
    with console('file', tmp_path, 'out') as (out_fd, out), console('file', tmp_path, 'err') as (err_fd, err):
        report = _core.Supervisor(ranks, stdout_fd=out_fd, stderr_fd=err_fd, collapse='on',
                                  collapse_window=5, console_copies=copies).run()
    assert report.returncode == 0
    assert sorted((tmp_path / 'out.log').read_bytes().splitlines(keepends=True)) == [
        b'[0]: loss-no-newline\n', b'[0]: loss=1\n']
    assert sorted((tmp_path / 'err.log').read_bytes().splitlines(keepends=True)) == [b'[0]: loss=2\n', b'[1]: loss=2\n']
    assert b'[0-1]: loss=2' in err[0]  # the console collapsed what the copy keeps per rank
    assert b'loss=1\n' in out[0].splitlines(keepends=True)  # rank 1's bare line: shown, not copied
    with pytest.raises(ValueError, match='console_copies keys'):
        _core.Supervisor(ranks, console_copies={'both': (tmp_path / 'x', ['a'])})
    with pytest.raises(OSError):  # a copy that cannot be made fails the start, before any rank runs
        _core.Supervisor(ranks, console_copies={'stdout': (tmp_path / 'no' / 'x', ['a'])}).start()


def test_console_ranks_shows_only_those_but_logs_all(tmp_path: Path) -> None:
    ranks = [
        _core.RankSpec(['/bin/sh', '-c', f'echo out {r}; echo err {r} >&2'], log_file=tmp_path / f'{r}.log')
        for r in range(3)
    ]
    ranks.append(_core.RankSpec(['echo', 'hidden by its spec'], console=False))
    with console('file', tmp_path, 'out') as (out_fd, out), console('file', tmp_path, 'err') as (err_fd, err):
        report = _core.Supervisor(ranks, console_ranks=[0, 3], stdout_fd=out_fd, stderr_fd=err_fd).run()
    assert report.returncode == 0
    assert out[0] == b'[0]: out 0\n' and err[0] == b'[0]: err 0\n'
    for r in range(3):
        assert sorted((tmp_path / f'{r}.log').read_bytes().splitlines()) == [f'err {r}'.encode(), f'out {r}'.encode()]
    assert report.ranks[1].output_lines == 2


def test_one_stream_on_the_console_and_a_log_file_per_stream(tmp_path: Path) -> None:
    """torchrun's `--redirects`/`--tee`: each stream its own file (or none), and a stream kept off
    the console still reaches its file."""
    both = '/bin/sh', '-c', 'echo out; echo err >&2; echo out2; echo err2 >&2'
    ranks = [
        _core.RankSpec(both, console='stdout', stderr_log_file=tmp_path / '0.err'),
        _core.RankSpec(both, console='stderr', stdout_log_file=tmp_path / '1.out', stderr_log_file=tmp_path / '1.err'),
        _core.RankSpec(both, console=False, stdout_log_file=tmp_path / '2.out'),
    ]
    assert [r.console for r in ranks] == ['stdout', 'stderr', False]
    assert (ranks[1].stdout_log_file, ranks[1].stderr_log_file, ranks[1].log_file) == \
        (str(tmp_path / '1.out'), str(tmp_path / '1.err'), None)
    with console('file', tmp_path, 'out') as (out_fd, out), console('file', tmp_path, 'err') as (err_fd, err):
        report = _core.Supervisor(ranks, stdout_fd=out_fd, stderr_fd=err_fd).run()
    assert report.returncode == 0
    assert out[0] == b'[0]: out\n[0]: out2\n' and err[0] == b'[1]: err\n[1]: err2\n'
    assert (tmp_path / '0.err').read_bytes() == (tmp_path / '1.err').read_bytes() == b'err\nerr2\n'
    assert (tmp_path / '1.out').read_bytes() == (tmp_path / '2.out').read_bytes() == b'out\nout2\n'
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in ('.out', '.err')) == ['0.err', '1.err', '1.out', '2.out']


def test_a_bare_stream_has_no_prefix_and_is_never_collapsed(tmp_path: Path) -> None:
    """`RankSpec(bare=...)`: torchrun prefixes only the streams it tees. The bare stream's lines come
    as written, and identical bare lines of several ranks stay apart even with `collapse='on'`,
    while the prefixed stream's still collapse."""
    both = '/bin/sh', '-c', 'echo same; echo err >&2'
    ranks = [_core.RankSpec(both, bare='stderr'), _core.RankSpec(both, bare='stderr')]
    with console('file', tmp_path, 'out') as (out_fd, out), console('file', tmp_path, 'err') as (err_fd, err):
        report = _core.Supervisor(ranks, stdout_fd=out_fd, stderr_fd=err_fd, collapse='on', collapse_window=5).run()
    assert report.returncode == 0
    assert out[0] == b'[0-1]: same\n' and err[0] == b'err\nerr\n'
    with console('file', tmp_path, 'out2') as (out_fd, out), console('file', tmp_path, 'err2') as (err_fd, err):
        _core.Supervisor([_core.RankSpec(both, bare=True, tag='7')], stdout_fd=out_fd, stderr_fd=err_fd).run()
    assert (out[0], err[0]) == (b'same\n', b'err\n')
    with pytest.raises(ValueError, match="bare must be True, False, 'stdout' or 'stderr'"):
        _core.RankSpec(['true'], bare='both')


def test_console_and_per_stream_logs_are_checked() -> None:
    with pytest.raises(ValueError, match='not both'):
        _core.RankSpec(['true'], log_file='a', stderr_log_file='b')
    with pytest.raises(ValueError, match="'stdout' or 'stderr'"):
        _core.RankSpec(['true'], console='both')
    with pytest.raises(TypeError):
        _core.RankSpec(['true'], console=1)  # type: ignore[arg-type]


def test_stderr_tail_holds_the_last_stderr_lines(tmp_path: Path) -> None:
    code = 'import sys\nprint("to stdout")\nfor i in range(50): print("noise", i, file=sys.stderr)\nraise ValueError("boom")'
    ranks = [_core.RankSpec([PY, '-c', code]), _core.RankSpec(['sleep', '30'])]
    with console('file', tmp_path, 'out') as (fd, _):
        report = _core.Supervisor(ranks, stderr_tail=4, stdout_fd=fd, stderr_fd=fd).run()
    ff = report.first_failure
    assert ff is not None and ff.rank == 0 and report.returncode == 1
    assert ff.stderr_tail == [
        'noise 49',
        'Traceback (most recent call last):',
        '  File "<string>", line 4, in <module>',
        'ValueError: boom',
    ]
    assert report.ranks[1].stderr_tail == []


def test_nothing_lost_when_the_job_ends_while_the_console_is_paused(tmp_path: Path) -> None:
    """Ranks with enlarged (1 MiB) stdout pipes write ~0.9 MB each and exit while the console is
    stalled: the supervisor holds its 8 MiB backlog limit, stops reading, and the job ends with
    the rest still in the pipes. All of it must still reach the console."""
    n, lines = 10, 9000
    code = (
        'import fcntl, os, sys\n'
        'r = int(sys.argv[1])\n'
        'fcntl.fcntl(1, 1031, 1 << 20)  # F_SETPIPE_SZ\n'
        "os.write(1, b''.join(b'R%d line %06d ' % (r, i) + b'z' * 80 + b'\\n' for i in range(9000)))\n"
    )
    r_fd, w_fd = os.pipe()
    go = threading.Event()
    parts: list[bytes] = []

    def stalled_then_fast_reader() -> None:
        go.wait(30)
        while data := os.read(r_fd, 1 << 20):
            parts.append(data)

    reader = threading.Thread(target=stalled_then_fast_reader, daemon=True)
    reader.start()
    sup = _core.Supervisor([_core.RankSpec([PY, '-c', code, str(r)]) for r in range(n)], stdout_fd=w_fd)
    try:
        sup.start()
        wait_until(lambda: all(s.state != 'running' for s in sup.status()), 30, 'every rank to exit')
        # The scenario itself, not a wait for an event: the console stays stalled past the
        # supervisor's 0.5 s drain deadline, so the job ends while reading is still paused.
        time.sleep(0.8)
        assert not sup.done, 'the job cannot end before the console takes its backlog'
    finally:
        go.set()
        report = sup.wait(timeout=60)
        os.close(w_fd)
        reader.join(30)
        os.close(r_fd)
    assert report is not None and report.returncode == 0
    got = demux(b''.join(parts))
    for r in range(n):
        want = b''.join(b'R%d line %06d ' % (r, i) + b'z' * 80 + b'\n' for i in range(lines))
        assert got[r] == want, f'rank {r}: {len(got[r])} of {len(want)} bytes reached the console'
        assert report.ranks[r].output_bytes == len(want)
