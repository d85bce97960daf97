"""Issue 9 end to end, as a user runs it (the venv's `dslaunch` console script, real ranks): the hang
watchdog on a real gloo job, `dslaunch stacks` on a running job, the collapsed console, the JSON
report (validated against docs/report.schema.json) and the live status line on a real pty."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DSLAUNCH = str(Path(sys.executable).parent / 'dslaunch')
SCRIPTS = Path(__file__).parent / 'scripts'
HANG = SCRIPTS / 'obs_hang.py'
WARN = SCRIPTS / 'obs_warn.py'
SLEEP = SCRIPTS / 'obs_sleep.py'
WARNING = 'UserWarning: this warning is printed by every rank'


def line_of(script: Path, marker: str) -> int:
    """The line number of the line of `script` carrying `marker` (a comment)."""
    return next(i for i, text in enumerate(script.read_text().splitlines(), 1) if marker in text)


def env_for(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop('CUDA_VISIBLE_DEVICES', None)
    env.update(extra)
    return env


def dslaunch(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DSLAUNCH, *args], env=env_for(**(env or {})), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(('', 0))
        return int(s.getsockname()[1])


def validate_report(path: Path) -> dict[str, object]:
    import jsonschema

    doc = json.loads(path.read_text())
    schema = json.loads((ROOT / 'docs' / 'report.schema.json').read_text())
    jsonschema.validate(doc, schema)
    return doc  # type: ignore[no-any-return]


# ---- 1. hang watchdog ----------------------------------------------------------------------------

def test_gloo_hang_names_the_sleeping_rank_and_its_line(tmp_path: Path) -> None:
    out = tmp_path / 'hang.json'
    proc = dslaunch('--num_gpus', '4', '--master_port', str(free_port()), '--hang_timeout', '3',
                    '--report_json', str(out), str(HANG), env={'SLOW_RANK': '2'}, timeout=240)
    hang_line, barrier_line = line_of(HANG, 'HANG-LINE'), line_of(HANG, 'BARRIER-LINE')
    assert proc.returncode == 124, proc.stderr
    err = proc.stderr
    assert 'dslaunch: HANG: no rank wrote output for' in err
    # identical stacks collapse into one group; the sleeping rank stands out, named with its line
    assert f'dslaunch: ranks 0-1,3: barrier at obs_hang.py:{barrier_line}' in err, err
    assert f'dslaunch: rank 2: obs_hang.py:{hang_line} in <module>' in err, err
    assert f'likely cause, unlike the other ranks: rank 2 (obs_hang.py:{hang_line} in <module>, last line' in err
    assert "'rank 2 loading data'" in err
    assert 'stopped after a hang' in err and 'exit status 124' in err
    doc = validate_report(out)
    assert doc['returncode'] == 124 and doc['success'] is False
    root = doc['root_cause']
    assert isinstance(root, dict) and root['kind'] == 'hang' and root['suspects'] == [2]
    hangs = doc['hangs']
    assert isinstance(hangs, list) and len(hangs) == 1 and hangs[0]['action'] == 'stop'
    by_rank = {r['rank']: r for r in hangs[0]['ranks']}
    assert by_rank[2]['last_line'] == 'rank 2 loading data'
    assert by_rank[2]['frames'][0]['line'] == hang_line
    assert by_rank[0]['frames'][-1]['line'] == barrier_line and by_rank[0]['frames'][0]['name'] == 'barrier'
    assert all(isinstance(r['cpu_time'], float) and r['state'] for r in hangs[0]['ranks'])
    assert [g['ranks'] for g in hangs[0]['groups']] == [[0, 1, 3], [2]]


def test_hang_report_only_lets_the_job_finish(tmp_path: Path) -> None:
    out = tmp_path / 'report.json'
    proc = dslaunch('--num_gpus', '2', '--hang_timeout', '1', '--hang_action', 'report', '--report_json', str(out),
                    str(SLEEP), env={'OBS_SLEEP': '4'})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count('dslaunch: HANG:') == 1, proc.stderr  # re-armed only by new output
    assert 'the job goes on' in proc.stderr
    assert f'dslaunch: ranks 0-1: obs_sleep.py:{line_of(SLEEP, "SLEEP-LINE")} in wait_here' in proc.stderr
    assert sorted(ln for ln in proc.stdout.splitlines() if 'resumed' in ln) == ['[0]: rank 0 resumed',
                                                                                '[1]: rank 1 resumed']
    doc = validate_report(out)
    assert doc['success'] is True and doc['root_cause'] is None
    hangs = doc['hangs']
    assert isinstance(hangs, list) and [h['action'] for h in hangs] == ['report'] and hangs[0]['suspects'] == []


def test_no_hang_watchdog_by_default(tmp_path: Path) -> None:
    out = tmp_path / 'ok.json'
    proc = dslaunch('--num_gpus', '1', '--report_json', str(out), str(SLEEP), env={'OBS_SLEEP': '1.5'})
    assert proc.returncode == 0 and 'HANG' not in proc.stderr
    doc = validate_report(out)
    assert doc['hangs'] == [] and doc['success'] is True


def test_failure_report_validates_with_last_lines(tmp_path: Path) -> None:
    out = tmp_path / 'fail.json'
    proc = dslaunch('--num_gpus', '2', '--hang_timeout', '30', '--report_json', str(out), '--no_python',
                    '--no_local_rank', '/bin/sh', '-c', 'echo about to fail; [ "$RANK" = 1 ] && exit 3; sleep 30')
    assert proc.returncode == 3, proc.stderr
    doc = validate_report(out)
    root = doc['root_cause']
    assert isinstance(root, dict) and root['kind'] == 'rank_failed' and root['rank'] == 1
    assert root['last_line'] == 'about to fail' and doc['hangs'] == []


def test_bad_hang_timeout_is_one_error_line() -> None:
    proc = dslaunch('--num_gpus', '1', '--hang_timeout', '-1', str(SLEEP))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and '--hang_timeout' in lines[0] and 'Traceback' not in proc.stderr


# ---- 2. dslaunch stacks ----------------------------------------------------------------------------

def _start_sleeping_job(tmp_path: Path, n: int, save_pid: bool) -> tuple[subprocess.Popen[bytes], Path, Path]:
    out, err = tmp_path / 'out.txt', tmp_path / 'err.txt'
    args = [DSLAUNCH, '--num_gpus', str(n), *(['--save_pid'] if save_pid else []), str(SLEEP)]
    with open(out, 'wb') as fo, open(err, 'wb') as fe:
        job = subprocess.Popen(args, env=env_for(OBS_SLEEP='120'), stdout=fo, stderr=fe, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while out.read_text().count(' ready') < n or 'dslaunch stacks ' not in err.read_text():
        assert job.poll() is None, err.read_text()
        assert time.monotonic() < deadline, (out.read_text(), err.read_text())
        time.sleep(0.05)
    return job, out, err


def _stop(job: subprocess.Popen[bytes]) -> None:
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=60) == -signal.SIGTERM


def test_stacks_of_a_running_job_by_id_pid_and_save_pid(tmp_path: Path) -> None:
    job, _out, err = _start_sleeping_job(tmp_path, 3, save_pid=True)
    try:
        m = re.search(r'dslaunch: job ([0-9a-f]+): 3 rank\(s\), launcher pid (\d+) \(their Python stacks: '
                      r'dslaunch stacks \1\)', err.read_text())
        assert m, err.read_text()
        job_id, launcher = m.group(1), int(m.group(2))
        assert launcher == job.pid
        assert Path(f'/tmp/{job.pid}.deepspeed').is_file()
        want = f'dslaunch: ranks 0-2: obs_sleep.py:{line_of(SLEEP, "SLEEP-LINE")} in wait_here'
        for ref in (job_id, job_id[:6], str(launcher)):
            proc = dslaunch('stacks', ref)
            assert proc.returncode == 0, proc.stderr
            assert want in proc.stdout, proc.stdout
            assert f'dslaunch: job {job_id}: 3 rank(s)' in proc.stdout
            assert '    wait_here (' in proc.stdout and '    <module> (' in proc.stdout
        as_json = json.loads(dslaunch('stacks', '--json', job_id).stdout)
        assert [r['rank'] for r in as_json['ranks']] == [0, 1, 2]
        assert as_json['groups'][0]['ranks'] == [0, 1, 2]
        assert job.poll() is None, 'stacks must not stop the job'
    finally:
        _stop(job)


@pytest.mark.parametrize('ref', ['0000deadbeef', '999999999', 'ab'])
def test_stacks_of_an_unknown_job_is_one_error_line(ref: str) -> None:
    proc = dslaunch('stacks', ref)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith('dslaunch stacks: error: ') and 'Traceback' not in proc.stderr
    assert proc.stdout == ''


# ---- 3. collapsed console --------------------------------------------------------------------------

def test_warning_of_16_ranks_is_printed_once_and_logged_16_times(tmp_path: Path) -> None:
    logs = tmp_path / 'logs'
    report = tmp_path / 'ok.json'
    proc = dslaunch('--num_gpus', '16', '--collapse', 'on', '--collapse_window', '3', '--enable_each_rank_log',
                    str(logs), '--report_json', str(report), str(WARN), env={'OBS_AT': str(time.time() + 4)})
    assert proc.returncode == 0, proc.stderr
    # With per-rank log files each rank's stderr shares its stdout pipe (the files keep the order
    # of its writes), so the console shows both on stdout.
    warned = [ln for ln in proc.stdout.splitlines() if WARNING in ln]
    assert warned == [f'[0-15]: {WARNING}'], proc.stdout
    # each rank's own line is there, after the warning (a rank's lines keep their order)
    after = [ln for ln in proc.stdout.splitlines() if 'after the warning' in ln]
    assert sorted(after) == sorted(f'[{r}]: rank {r} after the warning' for r in range(16))
    assert proc.stdout.index(warned[0]) < min(proc.stdout.index(ln) for ln in after)
    assert sorted(ln for ln in proc.stdout.splitlines() if 'stdout line' in ln) == sorted(
        f'[{r}]: rank {r} stdout line' for r in range(16))
    files = sorted(logs.glob('*.log'))
    assert len(files) == 16
    assert sum(f.read_text().count(WARNING) for f in files) == 16
    assert '\x1b' not in proc.stderr + proc.stdout, 'no status line or escapes on a pipe'
    assert validate_report(report)['success'] is True


def test_collapse_is_off_on_a_pipe_by_default(tmp_path: Path) -> None:
    proc = dslaunch('--num_gpus', '4', str(WARN), env={'OBS_AT': str(time.time() + 2)})
    assert proc.returncode == 0, proc.stderr
    assert sorted(ln for ln in proc.stderr.splitlines() if WARNING in ln) == sorted(
        f'[{r}]: {WARNING}' for r in range(4))


# ---- 5. live status line on a real terminal --------------------------------------------------------

def run_on_pty(args: list[str], timeout: float = 60) -> tuple[int, bytes]:
    """Runs dslaunch with stdout and stderr on a new pty; returns its status and every byte it wrote."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([DSLAUNCH, *args], env=env_for(), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    data = b''
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer of the pty is gone
                break
            if not chunk:
                break
            data += chunk
    finally:
        os.close(master)
    return proc.wait(timeout=30), data


def screen(data: bytes) -> list[str]:
    """What a terminal shows for `data`: `\\r` returns to column 0, `ESC[K` clears to the end of the
    line, `\\n` starts a new line; other characters overwrite."""
    lines: list[list[str]] = [[]]
    col = 0
    text = data.decode(errors='replace')
    i = 0
    while i < len(text):
        if text.startswith('\x1b[K', i):
            del lines[-1][col:]
            i += 3
            continue
        ch = text[i]
        i += 1
        if ch == '\r':
            col = 0
        elif ch == '\n':
            lines.append([])
            col = 0
        else:
            row = lines[-1]
            if col < len(row):
                row[col] = ch
            else:
                row.append(ch)
            col += 1
    return [''.join(row) for row in lines]


TICKS = 'for i in 1 2 3 4 5 6 7 8; do echo "tick $i of rank $RANK"; sleep 0.3; done'


def test_status_line_on_a_pty_is_drawn_below_and_never_mixed_into_lines() -> None:
    code, data = run_on_pty(['--num_gpus', '2', '--no_python', '--no_local_rank', '/bin/sh', '-c', TICKS])
    assert code == 0, data
    status = re.compile(rb'dslaunch: 2 ranks \| (\d) running, (\d) exited, (\d) failed \| \d+:\d\d')
    drawn = status.findall(data)
    assert drawn and (b'2', b'0', b'0') in drawn, data  # drawn while the ranks ran
    assert b'\r\x1b[K' in data  # erased before the ranks' lines
    shown = screen(data)
    ticks = [ln for ln in shown if 'tick ' in ln]
    assert sorted(ticks) == sorted(f'[{r}]: tick {i} of rank {r}' for r in range(2) for i in range(1, 9)), shown
    assert not any('running,' in ln for ln in shown), 'the status line is gone from the final screen'
    assert shown[-2].startswith('dslaunch: 2 ranks finished OK')
    # every rank line reached the terminal in one piece, after the status line was erased
    for raw in data.split(b'\r\n'):
        if b'tick ' in raw:
            before, _, line = raw.rpartition(b'\r\x1b[K')
            assert re.fullmatch(rb'\[\d\]: tick \d of rank \d', line), raw
            assert re.fullmatch(rb'(\r?dslaunch: 2 ranks \|[^\r\n\x1b]*\x1b\[K)*', before), raw


def test_status_line_and_collapse_off_on_a_pty() -> None:
    code, data = run_on_pty(['--num_gpus', '2', '--status_line', 'off', '--collapse', 'off', '--no_python',
                             '--no_local_rank', '/bin/sh', '-c', 'echo same line; sleep 0.5'])
    assert code == 0, data
    assert b'\x1b' not in data and b'running,' not in data
    assert sorted(ln for ln in screen(data) if 'same line' in ln) == ['[0]: same line', '[1]: same line']


def test_runner_forwards_the_flags_only_when_set() -> None:
    plain = dslaunch('--num_gpus', '1', '--dry_run', str(SLEEP))
    assert plain.returncode == 0, plain.stderr
    assert not any(f in plain.stdout for f in ('--hang', '--collapse', '--status_line'))
    proc = dslaunch('--num_gpus', '1', '--dry_run', '--hang_timeout', '5', '--hang_action', 'report', '--collapse',
                    'off', '--collapse_window', '1', '--status_line', 'off', str(SLEEP))
    assert proc.returncode == 0, proc.stderr
    for flag in ('--hang_timeout=5.0', '--hang_action=report', '--collapse=off', '--collapse_window=1.0',
                 '--status_line=off'):
        assert flag in proc.stdout.split(), proc.stdout


def test_a_hang_on_a_node_reaches_the_multinode_runner_as_the_root_cause(tmp_path: Path) -> None:
    """Multi-node: a per-node launcher whose watchdog stopped a hung job tells the runner (over the
    job channel, as on a real cluster) that the job hangs, not that its ranks died by the SIGTERM
    of its own stop; it exits 124."""
    from dslaunch.jobchannel import JobServer
    from dslaunch.world_info import encode_world_info

    failures: list[dict] = []
    server = JobServer(on_failure=failures.append)
    try:
        env = env_for(OBS_SLEEP='60', **server.env_for('localhost'))
        proc = subprocess.run(
            [sys.executable, '-m', 'dslaunch.launch', f'--world_info={encode_world_info({"localhost": [0, 1]})}',
             '--node_rank=0', '--master_addr=127.0.0.1', f'--master_port={free_port()}', '--hang_timeout=1',
             str(SLEEP)],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert proc.returncode == 124, proc.stderr
        assert 'dslaunch: HANG: no rank wrote output' in proc.stderr
        first = server.first_failure
        assert first is not None and first['kind'] == 'hang', first
        assert first['exit_status'] == 124 and first['rank'] is None and first['quiet_for'] >= 1, first
        assert failures == [first], 'the hang is the only failure the runner hears of'
    finally:
        server.close()


def test_stacks_takes_an_all_digit_job_id_prefix_that_is_no_pid() -> None:
    """Job ids are hex, so some are all digits: a number that finds no job as a pid is tried as a
    job id prefix (seen in ~6% of runs of the test above before the fix)."""
    from dslaunch import _core

    run_id = '987654321098'  # its 8-digit prefix is above any pid_max (4,194,304 at most)
    sup = _core.Supervisor([_core.RankSpec([sys.executable, str(SLEEP)], env={'OBS_SLEEP': '60', 'RANK': str(r)})
                            for r in range(2)], run_id=run_id, grace_period=0)  # fmt: skip
    with sup:
        deadline = time.monotonic() + 30
        while True:
            proc = dslaunch('stacks', run_id[:8])
            if proc.returncode == 0 and 'wait_here' in proc.stdout:
                break
            assert time.monotonic() < deadline, proc.stderr + proc.stdout
            time.sleep(0.2)
        assert f'job {run_id}' in proc.stdout, proc.stdout
        sup.terminate()
        sup.wait()
    missing = dslaunch('stacks', '99999999')
    assert missing.returncode == 1
    assert missing.stderr.startswith('dslaunch stacks: error: no process 99999999'), missing.stderr
