"""The native host (rust/src/host.rs): `dslaunch` plans in Python, then execs `dslaunch-host`,
which runs the job, reports and ends the process. Every scenario here runs the installed command
twice, under the native host and under the Python host (`DSLAUNCH_NATIVE_HOST=0`), and checks
that a user sees the same thing: exit status, report lines and `--report_json` document."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest
from dslaunch import _core
from helpers.procs import wait_until

BIN = Path(sys.executable).parent
DSLAUNCH = str(BIN / 'dslaunch')
HOST = Path(_core.__file__).resolve().parent / 'dslaunch-host'


#: Where a report starts in stderr: its first line.
REPORT_START = re.compile(r'^dslaunch: (\d+ ranks? (on \S+ )?finished|rank \S+ \(pid|stopped)')
#: What differs between two runs of one job: pids, times, job ids.
VOLATILE = [(re.compile(r'pid \d+'), 'pid N'), (re.compile(r'\d+\.\d s'), 'T s'),
            (re.compile(r'\b[0-9a-f]{12}\b'), 'JOB')]
#: Report fields that differ between two runs of one job.
VOLATILE_KEYS = {'run_id', 'started_at', 'ended_at', 'wall_time', 'pid', 'last_output_at'}


def env_for(native: bool, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop('CUDA_VISIBLE_DEVICES', None)
    env['DSLAUNCH_NATIVE_HOST'] = '1' if native else '0'
    env.update(extra or {})
    return env


def report_of(stderr: str) -> list[str]:
    """The report's lines, normalised (the ranks' own lines before it interleave differently)."""
    lines = stderr.splitlines()
    start = next((i for i, ln in enumerate(lines) if REPORT_START.match(ln)), len(lines))
    out = []
    for ln in lines[start:]:
        for pattern, repl in VOLATILE:
            ln = pattern.sub(repl, ln)
        out.append(ln)
    return out


def stable(doc: Any) -> Any:
    """A report document without the fields that change from run to run."""
    if isinstance(doc, dict):
        return {k: stable(v) for k, v in doc.items() if k not in VOLATILE_KEYS}
    if isinstance(doc, list):
        return [stable(v) for v in doc]
    return doc


def write_script(tmp_path: Path, body: str) -> str:
    path = tmp_path / 'rank.py'
    path.write_text(textwrap.dedent(body))
    return str(path)


def run_both(tmp_path: Path, args: list[str], **kw: Any) -> dict[bool, tuple[int, list[str], Any]]:
    """Runs `dslaunch ARGS --report_json ...` under each host: {native: (status, report, json)}."""
    out = {}
    for native in (True, False):
        rj = tmp_path / f'report-{native}.json'
        proc = subprocess.run([DSLAUNCH, '--report_json', str(rj), *args], env=env_for(native, kw.get('env')),
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
        doc = json.loads(rj.read_text()) if rj.exists() else None
        out[native] = (proc.returncode, report_of(proc.stderr), doc and stable(doc))
    return out


def assert_same(results: dict[bool, tuple[int, list[str], Any]]) -> tuple[int, list[str], Any]:
    native, python = results[True], results[False]
    assert native[0] == python[0], f'exit status: native {native[0]}, python {python[0]}'
    assert native[1] == python[1], f'report:\nnative {native[1]}\npython {python[1]}'
    assert native[2] == python[2], 'the --report_json documents differ'
    return native


def test_the_launcher_becomes_the_native_host_and_ps_shows_the_command(tmp_path: Path) -> None:
    script = write_script(tmp_path, """
        import os
        parent = os.getppid()
        print('EXE', os.readlink(f'/proc/{parent}/exe'))
        print('CMD', open(f'/proc/{parent}/cmdline', 'rb').read().split(b'\\0')[:-1])
    """)
    for native in (True, False):
        proc = subprocess.run([DSLAUNCH, '--num_gpus', '1', '--no_local_rank', script], env=env_for(native),
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        exe = re.search(r'EXE (\S+)', proc.stdout)
        assert exe is not None, proc.stdout
        if native:
            assert Path(exe.group(1)) == HOST
            assert f"b'--', b'dslaunch', b'--num_gpus', b'1', b'--no_local_rank', b'{script}'" in proc.stdout
        else:
            assert 'python' in Path(exe.group(1)).name


def test_success_and_a_rank_failure_report_the_same(tmp_path: Path) -> None:
    ok = write_script(tmp_path, "print('hello')\n")
    status, report, doc = assert_same(run_both(tmp_path, ['--num_gpus', '2', '--no_local_rank', ok]))
    assert status == 0 and report == ['dslaunch: 2 ranks finished OK in T s'] and doc['success'] is True
    failing = write_script(tmp_path, """
        import os, sys, time
        if os.environ['RANK'] == '1':
            print('caf\\u00e9 \\x01 "quoted" \\\\ back', file=sys.stderr)
            print('second line', file=sys.stderr)
            sys.exit(3)
        time.sleep(30)
    """)
    status, report, doc = assert_same(run_both(tmp_path, ['--num_gpus', '3', '--no_local_rank', failing]))
    assert status == 3
    assert report[:2] == ['dslaunch: rank 1 (pid N) failed: exit code 3 after T s; the job was torn down',
                          'dslaunch: ranks 0,2: killed by SIGTERM; rank 1: exit code 3']
    assert doc['root_cause']['kind'] == 'rank_failed' and doc['root_cause']['stderr_tail'][-1] == 'second line'


def test_merged_logs_a_killed_rank_and_the_local_rank_hint_report_the_same(tmp_path: Path) -> None:
    killed = write_script(tmp_path, """
        import os, signal, time
        if os.environ['RANK'] == '0':
            print('about to die', flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(30)
    """)
    logs = tmp_path / 'logs'
    status, report, _ = assert_same(run_both(tmp_path, ['--num_gpus', '2', '--no_local_rank',
                                                        '--enable_each_rank_log', str(logs), killed]))  # fmt: skip
    assert status == 247 and 'dslaunch: last output lines of rank 0:' in report
    no_local_rank = write_script(tmp_path, """
        import argparse
        argparse.ArgumentParser().parse_args()
    """)
    status, report, _ = assert_same(run_both(tmp_path, ['--num_gpus', '1', no_local_rank]))
    assert status == 2 and any(ln.startswith('dslaunch: hint:') for ln in report)


def test_leftovers_and_quiet_report_the_same(tmp_path: Path) -> None:
    leaves = write_script(tmp_path, """
        import subprocess
        subprocess.Popen(['sleep', '30'], start_new_session=True)
    """)
    status, report, doc = assert_same(run_both(tmp_path, ['--num_gpus', '1', '--no_local_rank', leaves]))
    assert status == 0 and report[-1] == 'dslaunch: killed 1 process(es) the ranks left behind'
    assert doc['leftovers_killed'] == 1
    ok = write_script(tmp_path, "print('hello')\n")
    status, report, _ = assert_same(run_both(tmp_path, ['--quiet', '--num_gpus', '1', '--no_local_rank', ok]))
    assert status == 0 and report == []


def test_a_rank_that_cannot_start_is_one_line_from_either_host(tmp_path: Path) -> None:
    for native in (True, False):
        proc = subprocess.run([DSLAUNCH, '--num_gpus', '2', '--no_python', str(tmp_path / 'missing')],
                              env=env_for(native), capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 1
        assert proc.stderr.splitlines()[-1] == (f'dslaunch: error: cannot start a rank: No such file or directory: '
                                                f'{tmp_path / "missing"}')  # fmt: skip


def _start(args: list[str], native: bool, tmp_path: Path, ready: int) -> subprocess.Popen[str]:
    """Starts a job whose `ready` ranks each touch a file in tmp_path once running; waits for them."""
    proc = subprocess.Popen(args, env=env_for(native, {'READY_DIR': str(tmp_path)}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    wait_until(lambda: len(list(tmp_path.glob('ready-*'))) >= ready, 60, 'the ranks to start')
    return proc


SLEEPER = """
    import os, pathlib, time
    pathlib.Path(os.environ['READY_DIR'], 'ready-' + os.environ['RANK']).touch()
    time.sleep(60)
"""


@pytest.mark.parametrize('front', ['dslaunch', 'dslaunch.launch'])
def test_sigterm_ends_the_job_as_each_command_does(tmp_path: Path, front: str) -> None:
    """The CLI dies of the signal (a shell sees 143); DeepSpeed's per-node launcher exits 1."""
    script = write_script(tmp_path, SLEEPER)
    if front == 'dslaunch':
        args = [DSLAUNCH, '--num_gpus', '2', '--no_local_rank', script]
    else:
        world = base64.urlsafe_b64encode(json.dumps({'localhost': [0, 1]}).encode()).decode()
        args = [str(BIN / 'python'), '-m', 'dslaunch.launch', f'--world_info={world}', '--master_port', '29555',
                '--no_local_rank', script]  # fmt: skip
    seen: dict[bool, tuple[int, list[str]]] = {}
    for native in (True, False):
        ready = tmp_path / f'ready{native}'
        ready.mkdir()
        proc = _start(args, native, ready, 2)
        exe = os.readlink(f'/proc/{proc.pid}/exe')
        assert (Path(exe) == HOST) == native, exe
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        seen[native] = (proc.returncode, report_of(err))
    assert seen[True] == seen[False]
    status, report = seen[True]
    assert status == (-signal.SIGTERM if front == 'dslaunch' else 1)
    assert report == ['dslaunch: stopped by SIGTERM after T s', 'dslaunch: ranks 0-1: killed by SIGTERM']


def test_save_pid_file_is_written_and_removed(tmp_path: Path) -> None:
    script = write_script(tmp_path, """
        import glob, os
        print('PIDFILE', open(f'/tmp/{os.getppid()}.deepspeed').read())
    """)
    proc = subprocess.run([DSLAUNCH, '--save_pid', '--num_gpus', '1', '--no_local_rank', script], env=env_for(True),
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    launcher = re.search(r'launcher pid: (\d+)', proc.stdout)
    assert launcher is not None and f'PIDFILE {launcher.group(1)}' in proc.stdout
    assert not Path(f'/tmp/{launcher.group(1)}.deepspeed').exists()


def test_arguments_that_are_not_utf8_reach_the_rank_intact(tmp_path: Path) -> None:
    out = tmp_path / 'argv'
    script = write_script(tmp_path, """
        import os, sys
        open(sys.argv[1], 'wb').write(os.fsencode(sys.argv[2]))
    """)
    arg = b'caf\xe9-\xff'
    proc = subprocess.run([DSLAUNCH.encode(), b'--num_gpus', b'1', b'--no_local_rank', script.encode(),
                           str(out).encode(), arg], env=env_for(True), capture_output=True, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == arg


def test_the_hang_watchdog_keeps_the_python_host(tmp_path: Path) -> None:
    script = write_script(tmp_path, """
        import os
        print('EXE', os.readlink(f'/proc/{os.getppid()}/exe'))
    """)
    proc = subprocess.run([DSLAUNCH, '--hang_timeout', '60', '--num_gpus', '1', '--no_local_rank', script],
                          env=env_for(True), capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert 'python' in Path(proc.stdout.split('EXE ')[1].split()[0]).name


def test_a_host_that_cannot_run_leaves_the_supervisor_usable(tmp_path: Path) -> None:
    sup = _core.Supervisor([_core.RankSpec(['/bin/sh', '-c', 'exit 4'])], prefix=None)
    with pytest.raises(FileNotFoundError):
        sup.exec_host(tmp_path / 'no-such-host')
    report = sup.run()
    assert report.ranks[0].returncode == 4


def test_the_host_refuses_to_run_by_hand_or_without_a_plan() -> None:
    by_hand = subprocess.run([str(HOST)], capture_output=True, text=True, timeout=30, check=False)
    assert by_hand.returncode == 2 and by_hand.stderr.count('\n') == 1 and 'not by hand' in by_hand.stderr
    garbage = subprocess.run([str(HOST), '--plan-fd', '0'], input='not a plan, some text', capture_output=True, text=True,
                             timeout=30, check=False)  # fmt: skip
    assert garbage.returncode == 1
    assert garbage.stderr.strip() == ("dslaunch: error: cannot read the job's plan: not a dslaunch plan "
                                      '(rebuild: make build-dev, or set DSLAUNCH_NATIVE_HOST=0)')


@pytest.mark.skipif(shutil.which('cargo') is None, reason='cargo not installed')
def test_a_wheel_built_by_pip_carries_the_native_host(tmp_path: Path) -> None:
    """A user's `pip install` from source, not `make`: the build backend (build_host.py) puts the
    host into the wheel, and the installed command becomes it."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation', '-w',
                    str(tmp_path / 'wheels'), str(root)], check=True, timeout=900)  # fmt: skip
    wheel = next((tmp_path / 'wheels').glob('dslaunch-*.whl'))
    with zipfile.ZipFile(wheel) as z:
        assert z.getinfo('dslaunch/dslaunch-host').external_attr >> 16 & 0o111, 'not executable in the wheel'
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True, timeout=120)
    site = next((venv / 'lib').glob('python3*/site-packages'))
    with zipfile.ZipFile(wheel) as z:  # what pip would do, without fetching the dependencies
        z.extractall(site)
    (site / 'dslaunch' / 'dslaunch-host').chmod(0o755)
    rank = ['/bin/sh', '-c', 'readlink /proc/$PPID/exe']
    proc = subprocess.run([str(venv / 'bin' / 'python'), '-m', 'dslaunch', '--num_gpus', '1', '--no_python',
                           '--no_local_rank', *rank], env=env_for(True), capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(f'{site.name}/dslaunch/dslaunch-host'), proc.stdout
