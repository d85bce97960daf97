"""Fault injection through the real `dslaunch` command (issue 8): each test runs real ranks,
injects one fault, and asserts the exact outcome: exit status, the report's root cause, every
line the ranks wrote accounted for, and no process of the job left (checked here right after the
launcher exits, and again by the conftest's survivor scan).

Faults already covered elsewhere (not repeated here): setsid/double-fork/setpgid grandchildren
(test_core_failfast, test_core_orphans), a slow or paused console (test_core_logmux), a taken
master port (test_cli_e2e), a lowered soft fd limit (test_core_scale).
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import mounts
from helpers.procs import alive, all_dead, marked, wait_until

DSLAUNCH = str(Path(sys.executable).parent / 'dslaunch')
FAULT_RANK = str(Path(__file__).parent / 'scripts' / 'fault_rank.py')
LINES = 40
# What the runner itself prints on stdout before the ranks start (plan notes).
RUNNER_NOTES = ('No hostfile at ', 'No GPUs found', 'CUDA_VISIBLE_DEVICES=')
PREFIXED = re.compile(r'^\[(\d+)\]: (.*)$')


@pytest.fixture(autouse=True)
def _no_core_files() -> Iterator[None]:
    old = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, old[1]))
    yield
    resource.setrlimit(resource.RLIMIT_CORE, old)


def cli_env(mark: Path, faults: dict[int, str], **extra: str) -> dict[str, str]:
    env = dict(os.environ, MARK_DIR=str(mark), LINES=str(LINES))
    env.update(extra)
    env.pop('CUDA_VISIBLE_DEVICES', None)
    env.update({f'FAULT_{r}': f for r, f in faults.items()})
    return env


def start_cli(args: list[str], env: dict[str, str], **kw: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [DSLAUNCH, '--master_port', '0', *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,  # type: ignore[arg-type]
    )


def wait_ready(mark: Path, n: int, timeout: float = 60) -> dict[int, int]:
    """The ranks' pids, once every rank has printed its lines and installed its handlers."""
    wait_until(lambda: all((mark / f'rank{r}.ready').exists() for r in range(n)), timeout, f'{n} ranks ready')
    return {r: int((mark / f'rank{r}.ready').read_text()) for r in range(n)}


def expected_lines(r: int, extra: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    out = [f'rank {r} line {i}' for i in range(LINES)] + list(extra)
    err = [f'rank {r} err {i}' for i in range(0, LINES, 10)]
    return out, err


def split_console(text: str) -> tuple[dict[int, list[str]], list[str]]:
    """Prefixed lines per rank (in order), and the launcher's own (unprefixed) lines."""
    per_rank: dict[int, list[str]] = {}
    own: list[str] = []
    for line in text.splitlines():
        m = PREFIXED.match(line)
        if m:
            per_rank.setdefault(int(m.group(1)), []).append(m.group(2))
        else:
            own.append(line)
    return per_rank, own


def assert_every_line(out: str, err: str, n: int, extra_out: dict[int, tuple[str, ...]] | None = None) -> list[str]:
    """Every rank's lines arrived, whole, once, in order, with their prefix; returns the
    launcher's own stderr lines (the report)."""
    got_out, own_out = split_console(out)
    got_err, own_err = split_console(err)
    stray = [ln for ln in own_out if ln.strip() and not ln.startswith(RUNNER_NOTES)]
    assert stray == [], f'unprefixed stdout lines: {stray[:5]}'
    for r in range(n):
        want_out, want_err = expected_lines(r, (extra_out or {}).get(r, ()))
        assert got_out.get(r, []) == want_out, f'rank {r} stdout'
        assert got_err.get(r, []) == want_err, f'rank {r} stderr'
    assert set(got_out) <= set(range(n)) and set(got_err) <= set(range(n))
    return own_err


def assert_nothing_left(tag: str) -> None:
    entry = f'DSLAUNCH_TEST_TAG={tag}'
    wait_until(lambda: not marked(entry), 3.0, 'every process of the job to be gone')


def read_report(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(path.read_text())


# ---- a rank dies -----------------------------------------------------------------------------------


@pytest.mark.parametrize('fault', ['segv', 'oom-sigkill'])
def test_rank_killed_by_a_signal(tmp_path: Path, no_process_left_behind: str, fault: str) -> None:
    """Rank 1 of 3 segfaults (a real NULL dereference) or is SIGKILLed from outside, as the
    OOM killer does: exit status 256-N (DeepSpeed's), the root cause is rank 1 killed by that signal, the
    other ranks were stopped with SIGTERM, every line arrived, nothing is left."""
    sig = signal.SIGSEGV if fault == 'segv' else signal.SIGKILL
    report_path = tmp_path / 'report.json'
    faults = {0: 'sleep', 1: 'segv' if fault == 'segv' else 'sleep', 2: 'sleep'}
    p = start_cli(
        ['--num_gpus', '3', '--report_json', str(report_path), FAULT_RANK], cli_env(tmp_path, faults, WAIT_GO='1')
    )
    pids = wait_ready(tmp_path, 3)
    if fault == 'segv':
        (tmp_path / 'go').touch()
    else:
        os.kill(pids[1], signal.SIGKILL)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 256 - sig, err
    own = assert_every_line(out.decode(), err.decode(), 3)
    assert_nothing_left(no_process_left_behind)
    failed = [ln for ln in own if 'failed' in ln]
    assert len(failed) == 1 and f'rank 1 (pid {pids[1]})' in failed[0] and sig.name in failed[0], own
    doc = read_report(report_path)
    root = doc['root_cause']
    assert (root['kind'], root['rank'], root['signal'], root['exit_status']) == ('rank_failed', 1, sig, 128 + sig)
    others = {r['rank']: (r['state'], r['returncode']) for r in doc['ranks'] if r['rank'] != 1}
    assert others == {0: ('killed', -signal.SIGTERM), 2: ('killed', -signal.SIGTERM)}
    for r in (0, 2):  # each got exactly one SIGTERM from the teardown
        assert (tmp_path / f'rank{r}.signals').read_text() == f'{int(signal.SIGTERM)}\n'


def test_rank_ignoring_sigterm_gets_sigkill_when_the_grace_period_ends(
    tmp_path: Path, no_process_left_behind: str
) -> None:
    """Rank 1 fails; rank 0 ignores the teardown's SIGTERM. It is SIGKILLed no earlier than the
    grace period (1.5 s) after the failure, and not much later; rank 2 (polite) ends at once."""
    grace = 1.5
    report_path = tmp_path / 'report.json'
    faults = {0: 'ignore_term', 1: 'exit:5', 2: 'sleep'}
    p = start_cli(
        ['--num_gpus', '3', '--grace_period', str(grace), '--report_json', str(report_path), FAULT_RANK],
        cli_env(tmp_path, faults, WAIT_GO='1'),
    )
    wait_ready(tmp_path, 3)
    (tmp_path / 'go').touch()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 5, err
    assert_every_line(out.decode(), err.decode(), 3)
    assert_nothing_left(no_process_left_behind)
    doc = read_report(report_path)
    ranks = {r['rank']: r for r in doc['ranks']}
    assert doc['root_cause']['rank'] == 1 and doc['root_cause']['returncode'] == 5
    assert (ranks[0]['state'], ranks[0]['returncode']) == ('killed', -signal.SIGKILL)
    assert (ranks[2]['state'], ranks[2]['returncode']) == ('killed', -signal.SIGTERM)
    failed_at = ranks[1]['ended_at']
    assert grace - 0.05 <= ranks[0]['ended_at'] - failed_at < grace + 5, 'SIGKILL at the end of the grace period'
    assert ranks[2]['ended_at'] - failed_at < grace, 'the polite rank did not wait for the grace period'
    assert (tmp_path / 'rank0.signals').read_text() == f'{int(signal.SIGTERM)}\n', 'SIGTERM came first, once'


def test_rank_exiting_zero_early_is_not_a_failure(tmp_path: Path, no_process_left_behind: str) -> None:
    """Rank 0 exits 0 at once, rank 1 runs on for a second and finishes: the job succeeds and
    rank 1's late line arrives (the early exit did not end the job)."""
    report_path = tmp_path / 'report.json'
    p = start_cli(
        ['--num_gpus', '2', '--report_json', str(report_path), FAULT_RANK],
        cli_env(tmp_path, {0: 'ok', 1: 'ok_after:1.0'}),
    )
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    own = assert_every_line(out.decode(), err.decode(), 2, {1: ('rank 1 done',)})
    assert any('2 ranks finished OK' in ln for ln in own), own
    doc = read_report(report_path)
    assert doc['success'] is True and doc['root_cause'] is None
    ranks = {r['rank']: r for r in doc['ranks']}
    assert ranks[1]['ended_at'] - ranks[0]['ended_at'] > 0.7
    assert all((r['state'], r['returncode']) == ('exited', 0) for r in ranks.values())
    assert_nothing_left(no_process_left_behind)


def test_all_ranks_failing_at_once_names_the_first_as_root_cause(tmp_path: Path, no_process_left_behind: str) -> None:
    """Eight ranks, released together, each exit with its own code 10+rank. The root cause is the
    rank whose exit was seen first, the job's status is its code, and every other rank's own
    failure (or its teardown SIGTERM, if that came first) is in the report."""
    n = 8
    report_path = tmp_path / 'report.json'
    faults = {r: f'exit:{10 + r}' for r in range(n)}
    p = start_cli(
        ['--num_gpus', str(n), '--report_json', str(report_path), FAULT_RANK], cli_env(tmp_path, faults, WAIT_GO='1')
    )
    wait_ready(tmp_path, n)
    (tmp_path / 'go').touch()
    out, err = p.communicate(timeout=60)
    assert_every_line(out.decode(), err.decode(), n)
    doc = read_report(report_path)
    root = doc['root_cause']['rank']
    ranks = {r['rank']: r for r in doc['ranks']}
    assert p.returncode == 10 + root == doc['returncode']
    assert ranks[root]['ended_at'] == min(r['ended_at'] for r in ranks.values()), 'the root cause is the first seen'
    for r, info in ranks.items():
        assert (info['state'], info['returncode']) in (('failed', 10 + r), ('killed', -signal.SIGTERM)), info
    failed = [ln for ln in err.decode().splitlines() if ln.startswith('dslaunch:') and 'failed:' in ln]
    assert len(failed) == 1 and f'rank {root} ' in failed[0] and f'exit code {10 + root}' in failed[0]
    assert_nothing_left(no_process_left_behind)


# ---- what a rank leaves behind, and what it does to its streams ---------------------------------------


@pytest.mark.parametrize('outcome', ['failure', 'success'])
def test_rank_forking_100_children(tmp_path: Path, no_process_left_behind: str, outcome: str) -> None:
    """Rank 0 forks 100 children. On a failure of rank 1 the whole tree goes; on success (rank 0
    exits leaving its 100 children running) the leftovers are killed and counted: 100."""
    report_path = tmp_path / 'report.json'
    if outcome == 'failure':
        faults, n = {0: 'fork:100', 1: 'exit:4'}, 2
    else:
        faults, n = {0: 'fork_exit:100'}, 1
    p = start_cli(
        ['--num_gpus', str(n), '--report_json', str(report_path), FAULT_RANK], cli_env(tmp_path, faults, WAIT_GO='1')
    )
    wait_ready(tmp_path, n)
    wait_until((tmp_path / 'rank0.children').exists, 60, 'rank 0 to fork its children')
    children = [int(x) for x in (tmp_path / 'rank0.children').read_text().split()]
    assert len(children) == 100
    (tmp_path / 'go').touch()
    out, err = p.communicate(timeout=60)
    assert all_dead(children), 'a child of rank 0 outlived the job'
    assert_every_line(out.decode(), err.decode(), n)
    doc = read_report(report_path)
    if outcome == 'failure':
        assert p.returncode == 4 and doc['root_cause']['rank'] == 1
    else:
        assert p.returncode == 0 and doc['success'] is True
        assert doc['leftovers_killed'] == 100
    assert_nothing_left(no_process_left_behind)


def test_rank_closing_stdout_early_keeps_running_and_loses_nothing(tmp_path: Path, no_process_left_behind: str) -> None:
    """Rank 0 closes its stdout and writes on to stderr; rank 1 closes both and runs on 0.8 s.
    A closed stream is not an exit: the job waits for both ranks, succeeds, and every line is
    there (the stderr line after the close included)."""
    report_path = tmp_path / 'report.json'
    p = start_cli(
        ['--num_gpus', '3', '--report_json', str(report_path), FAULT_RANK],
        cli_env(tmp_path, {0: 'close_stdout', 1: 'close_all', 2: 'ok'}),
    )
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    own = assert_every_line(out.decode(), err.decode().replace('[0]: rank 0 after close\n', ''), 3)
    assert err.decode().count('[0]: rank 0 after close\n') == 1
    assert (tmp_path / 'rank1.closed_end').exists(), 'rank 1 ran to its end after closing its streams'
    doc = read_report(report_path)
    assert doc['success'] is True and all(r['state'] == 'exited' for r in doc['ranks'])
    assert any('finished OK' in ln for ln in own)
    assert_nothing_left(no_process_left_behind)


_PRINTS_FOR_A_WHILE = """import os, sys, time
rank = os.environ['RANK']
for i in range(150):
    print(f'rank {rank} line {i}', flush=True)
    time.sleep(0.004)
open(os.path.join(sys.argv[-1], f'rank{rank}.done'), 'w').close()
"""


def test_console_reader_going_away_does_not_end_the_job(tmp_path: Path, no_process_left_behind: str) -> None:
    """`dslaunch train.py | head -1`: the console's reader goes away while the ranks still print.
    The job runs to its end (status 0) and the per-rank log files have every line; the launcher
    neither dies of SIGPIPE nor reports a BrokenPipeError. (Under DeepSpeed the ranks write to
    the pipe themselves, and a Python rank dies of BrokenPipeError.)"""
    script = tmp_path / 'prints.py'
    script.write_text(_PRINTS_FOR_A_WHILE)
    logs = tmp_path / 'logs'
    p = start_cli(['--num_gpus', '2', '--enable_each_rank_log', str(logs), str(script), str(tmp_path)],
                  cli_env(tmp_path, {}))
    assert p.stdout is not None and p.stderr is not None
    assert p.stdout.readline()
    p.stdout.close()  # as `head -1` exits
    with p.stderr:
        err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0, err
    assert 'BrokenPipe' not in err and 'Traceback' not in err, err
    for r in range(2):
        assert (tmp_path / f'rank{r}.done').exists(), f'rank {r} did not run to its end'
        (log,) = logs.glob(f'*rank{r}.log')
        assert log.read_text().splitlines() == [f'rank {r} line {i}' for i in range(150)]
    assert_nothing_left(no_process_left_behind)


def test_binary_output_reaches_each_rank_log_file_byte_exact(tmp_path: Path, no_process_left_behind: str) -> None:
    """Two ranks `cat` 1 MiB of random bytes (every byte value, invalid UTF-8, NULs, lone CRs):
    each per-rank log file holds exactly those bytes, and the report counts every byte."""
    data = os.urandom(1 << 20)
    blob = tmp_path / 'blob'
    blob.write_bytes(data)
    logs = tmp_path / 'logs'
    report_path = tmp_path / 'report.json'
    p = start_cli(
        ['--num_gpus', '2', '--no_python', '--no_local_rank', '--enable_each_rank_log', str(logs),
         '--report_json', str(report_path), '/bin/cat', str(blob)],
        cli_env(tmp_path, {}),
    )  # fmt: skip
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    files = sorted(logs.iterdir())
    assert [f.name.split('_', 1)[1] for f in files] == ['rank0.log', 'rank1.log']
    for f in files:
        assert f.read_bytes() == data, f'{f.name} differs from what the rank wrote'
    doc = read_report(report_path)
    assert [r['output_bytes'] for r in doc['ranks']] == [len(data)] * 2
    assert len(out) >= 2 * len(data), 'the console got every byte too (plus prefixes)'
    assert_nothing_left(no_process_left_behind)


# ---- the launcher itself is signalled while it starts 1,024 ranks ---------------------------------------


def _children(pid: int) -> int:
    n = 0
    try:
        for tid in os.listdir(f'/proc/{pid}/task'):
            with open(f'/proc/{pid}/task/{tid}/children') as f:
                n += len(f.read().split())
    except OSError:
        pass
    return n


@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGHUP, signal.SIGTERM], ids=lambda s: s.name)
def test_launcher_signalled_during_the_spawn_of_1024_ranks(
    tmp_path: Path, no_process_left_behind: str, sig: signal.Signals
) -> None:
    """`dslaunch --num_gpus 1024` is signalled once a few dozen ranks exist (the spawn loop is
    still running): the launcher dies of it or ends the job, and within seconds no process of the
    job is left: not a rank, not a rank caught inside execve, not the orphan guard."""
    n = 1024
    env = cli_env(tmp_path, {})
    p = subprocess.Popen(
        [DSLAUNCH, '--master_port', '0', '--num_gpus', str(n), '--no_python', '--no_local_rank', '/bin/sleep', '60'],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        # The guard is the first child; then ranks appear one by one.
        wait_until(lambda: _children(p.pid) >= 24, 60, 'the spawn to be under way', interval=0.0005)
        at_signal = _children(p.pid)
        os.kill(p.pid, sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -sig, (p.returncode, err[-2000:])  # before its handlers, or after the teardown
    assert b'Traceback' not in err
    assert at_signal < n, f'the spawn had finished ({at_signal} children) before the signal'
    entry = f'DSLAUNCH_TEST_TAG={no_process_left_behind}'
    wait_until(lambda: not marked(entry), 15.0, 'every rank of the interrupted spawn to be killed', interval=0.1)


# ---- limits and the environment --------------------------------------------------------------------------


def _with_nofile(soft: int, hard: int):  # type: ignore[no-untyped-def]
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return set_limit


def test_fd_hard_limit_below_two_per_rank_is_one_clear_error(tmp_path: Path, no_process_left_behind: str) -> None:
    """Policy: the core raises the soft RLIMIT_NOFILE up to the hard limit as far as the job
    needs; when even the hard limit is too low, the CLI prints one line (no traceback), exits 1,
    and none of the ranks it managed to start is left running."""
    n = 300  # needs ~3 fds per rank in the launcher; the hard limit 256 is below 2 x 300
    p = subprocess.run(
        [DSLAUNCH, '--master_port', '0', '--num_gpus', str(n), '--no_python', '--no_local_rank', '/bin/sleep', '60'],
        env=cli_env(tmp_path, {}), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
        preexec_fn=_with_nofile(256, 256), check=False,
    )  # fmt: skip
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1, p.stderr
    assert len(lines) == 1 and 'Traceback' not in p.stderr, p.stderr
    assert lines[0].startswith('dslaunch: error:') and 'Too many open files' in lines[0]
    assert_nothing_left(no_process_left_behind)


def test_fd_soft_limit_below_two_per_rank_is_raised_and_the_job_runs(
    tmp_path: Path, no_process_left_behind: str
) -> None:
    """Soft limit 64 for 200 ranks, hard limit ample: the core raises the soft limit and all run."""
    n = 200
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4 * n + 64:
        pytest.skip(f'hard fd limit {hard} too low for this test')
    p = subprocess.run(
        [DSLAUNCH, '--master_port', '0', '--num_gpus', str(n), '--no_python', '--no_local_rank',
         '/bin/sh', '-c', 'echo rank $RANK'],
        env=cli_env(tmp_path, {}), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
        preexec_fn=_with_nofile(64, hard), check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    shown = [ln for ln in p.stdout.splitlines() if not ln.startswith(RUNNER_NOTES)]
    assert sorted(shown) == sorted(f'[{r}]: rank {r}' for r in range(n))
    assert_nothing_left(no_process_left_behind)


def _can_unshare_mounts() -> bool:
    if os.geteuid() != 0:
        return False
    probe = subprocess.run(['unshare', '-m', 'true'], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_unshare_mounts(), reason='needs root and mount namespaces (unshare -m)')
def test_save_pid_with_a_read_only_tmp_is_one_clear_error(no_process_left_behind: str) -> None:
    """`--save_pid` writes /tmp/<runner pid>.deepspeed. With /tmp read-only (bound read-only onto
    itself in a private mount namespace: a checkout under /tmp stays there), the CLI says so in one
    line, exits 1, and starts no rank."""
    script = 'mount --bind /tmp /tmp && mount -o remount,bind,ro /tmp && exec "$@"'
    p = subprocess.run(
        ['unshare', '-m', '/bin/sh', '-c', script, 'sh', DSLAUNCH, '--master_port', '0', '--num_gpus', '2',
         '--save_pid', '--no_python', '--no_local_rank', '/bin/echo', 'rank started'],
        env=cli_env(Path('/nonexistent'), {}), stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1, p.stderr
    assert len(lines) == 1 and 'Traceback' not in p.stderr, p.stderr
    assert re.fullmatch(r'dslaunch: error: cannot write pid file /tmp/\d+\.deepspeed: Read-only file system', lines[0])
    assert 'rank started' not in p.stdout
    assert_nothing_left(no_process_left_behind)


# ---- two jobs side by side ---------------------------------------------------------------------------


@pytest.mark.parametrize('event', ['failure', 'ctrl-c'])
def test_two_jobs_side_by_side_do_not_touch_each_other(tmp_path: Path, no_process_left_behind: str, event: str) -> None:
    """Two `dslaunch` jobs of the same user run the same script, each in its own session (two
    terminals). Job A fails (a rank exits 3) or gets Ctrl-C (SIGINT to its process group). Job B
    keeps running untouched (no signal reaches its ranks), then finishes with status 0 and all
    its lines."""
    mark_a, mark_b = tmp_path / 'a', tmp_path / 'b'
    mark_a.mkdir()
    mark_b.mkdir()
    faults_a = {0: 'sleep', 1: 'exit:3' if event == 'failure' else 'sleep'}
    job_b = start_cli(
        ['--num_gpus', '2', FAULT_RANK], cli_env(mark_b, {0: 'ok_after:6', 1: 'ok_after:6'}), start_new_session=True
    )
    job_a = start_cli(['--num_gpus', '2', FAULT_RANK], cli_env(mark_a, faults_a, WAIT_GO='1'), start_new_session=True)
    try:
        pids_b = wait_ready(mark_b, 2)
        pids_a = wait_ready(mark_a, 2)
        if event == 'failure':
            (mark_a / 'go').touch()
        else:
            os.killpg(job_a.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        out_a, err_a = job_a.communicate(timeout=60)
        assert job_a.returncode == (3 if event == 'failure' else -signal.SIGINT), err_a
        assert all_dead(pids_a.values())
        assert job_b.poll() is None and all(alive(p) for p in pids_b.values()), 'job B was hit'
        out_b, err_b = job_b.communicate(timeout=60)
    finally:
        for job in (job_a, job_b):
            if job.poll() is None:
                job.kill()
                job.wait()
    assert job_b.returncode == 0, err_b
    assert_every_line(out_b.decode(), err_b.decode(), 2, {0: ('rank 0 done',), 1: ('rank 1 done',)})
    for r in range(2):
        assert (mark_b / f'rank{r}.signals').read_text() == '', f'job B rank {r} received a signal'
    assert_every_line(out_a.decode(), err_a.decode(), 2)
    assert_nothing_left(no_process_left_behind)


# ---- a full disk under --enable_each_rank_log ----------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 128 KiB tmpfs (root only): the disk the log files fill up."""
    with mounts.small_tmpfs(tmp_path, '128k') as mnt:
        yield mnt


def test_full_log_disk_through_the_cli_is_a_warning_and_a_report_note(
    tmp_path: Path, small_tmpfs: Path, no_process_left_behind: str
) -> None:
    """`--enable_each_rank_log` on a disk that fills up: the job succeeds with every console line,
    one warning names the file, and the end report says the rank's log file is incomplete."""
    p = start_cli(
        ['--num_gpus', '2', '--enable_each_rank_log', str(small_tmpfs), FAULT_RANK],
        cli_env(tmp_path, {0: 'ok', 1: 'ok'}, LINES='4000'),
    )
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    text = err.decode()
    warnings = [ln for ln in text.splitlines() if ln.startswith('dslaunch:') and 'write failed' in ln]
    assert warnings and all(str(small_tmpfs) in w for w in warnings), text[-2000:]
    report_lines = [ln for ln in text.splitlines() if ln.startswith('dslaunch:') and 'write failed' not in ln]
    assert any('incomplete' in ln for ln in report_lines), report_lines
    assert_nothing_left(no_process_left_behind)


def test_a_redirected_stream_comes_back_to_the_console_when_its_log_file_fails(tmp_path: Path,
                                                                               small_tmpfs: Path) -> None:
    """torchrun's `--redirects 2` at the core: stderr goes only to its file; once the disk is full,
    the rest of it reaches the console (the warning says so) instead of being lost."""
    from dslaunch import _core

    code = 'import sys\nfor i in range(4000): print(f"line {i:05d} " + "x" * 60, file=sys.stderr)\nprint("out")'
    spec = _core.RankSpec([sys.executable, '-c', code], console='stdout', stderr_log_file=small_tmpfs / 'stderr.log')
    out, err = tmp_path / 'out', tmp_path / 'err'
    with open(out, 'wb') as o, open(err, 'wb') as e:
        report = _core.Supervisor([spec], stdout_fd=o.fileno(), stderr_fd=e.fileno()).run()
    assert report.returncode == 0 and report.ranks[0].log_error
    text = err.read_text()
    assert 'stderr.log write failed' in text and '[0]: line 03999 ' in text
    assert out.read_text() == '[0]: out\n'


def test_a_console_reader_gone_before_the_first_line_does_not_end_the_job(tmp_path: Path) -> None:
    """The launcher's own notes ('No GPUs found: ...') are the first lines on stdout: a reader that
    is already gone when they are written (`| head -0`, or `head -1` between two notes) must not
    end the job with a BrokenPipeError."""
    script = tmp_path / 'prints.py'
    script.write_text(_PRINTS_FOR_A_WHILE)
    p = start_cli(['--num_gpus', '2', str(script), str(tmp_path)], cli_env(tmp_path, {}))
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # before dslaunch writes anything
    with p.stderr:
        err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0, err
    assert 'BrokenPipe' not in err and 'Traceback' not in err, err
    assert all((tmp_path / f'rank{r}.done').exists() for r in range(2))
