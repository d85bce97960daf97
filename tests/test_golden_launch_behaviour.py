"""DeepSpeed's launch_behaviour vectors, re-run against dslaunch with real processes.

Each case ran DeepSpeed 0.19.8's launch.py (or runner) with a scripted child per rank. Here the
same argv runs through `python -m dslaunch.launch` (or the `dslaunch` runner) and the outcome is
compared. The exit status must be DeepSpeed's, byte for byte (spec section 14, item 7: 256-N for a
rank killed by signal N, 1 after SIGINT/SIGTERM to launch.py, death by the signal for the runner
and for SIGHUP). The marker files must match too, except for the documented deviations
(docs/compatibility.md), which are asserted as such:
- a signal to the launcher: DeepSpeed answers SIGINT with SIGTERM to the ranks, or dies (SIGHUP)
  leaving them running; dslaunch forwards the signal itself and leaves nothing;
- SIGKILL/SIGTERM/SIGINT to the runner: DeepSpeed orphans the ranks; dslaunch leaves none;
- leftovers of a clean exit (a background grandchild) are killed; `--save_pid`'s file is removed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import golden
import pytest

pytestmark = pytest.mark.skipif(not golden.available(), reason='../shared/spec/golden not found')
BEHAVE = Path(__file__).parent / 'scripts' / 'golden_behave.py'
CASES = golden.load('launch_behaviour.json')['cases'] if golden.available() else []
SIGNALS = {'SIGTERM': signal.SIGTERM, 'SIGINT': signal.SIGINT, 'SIGHUP': signal.SIGHUP, 'SIGKILL': signal.SIGKILL}


def dslaunch_argv(case: dict[str, Any], cwd: Path) -> list[str]:
    argv = [a.replace('<CWD>', str(cwd)) for a in case['argv']]
    assert argv[:3] == ['<PYTHON>', '-u', '-m']
    module = {'deepspeed.launcher.launch': 'dslaunch.launch', 'deepspeed.launcher.runner': 'dslaunch'}[argv[3]]
    rest = argv[4:]
    if '<save_pid>' in rest:
        rest[rest.index('<save_pid>')] = str(900000 + os.getpid() % 90000)
    script = rest.index('behave.py')
    rest[script] = str(BEHAVE)
    return [sys.executable, '-u', '-m', module, *rest]


def expected_exit(case: dict[str, Any]) -> int:
    """DeepSpeed's exit status (as `Popen.returncode`: -N when it died of signal N)."""
    if case['name'] == 'runner_child_launch_py_sigkilled':
        # DeepSpeed's runner exits 0 when its launch.py child is SIGKILLed. dslaunch's runner has
        # no such child (it supervises the ranks in-process): this case SIGKILLs the runner.
        return -signal.SIGKILL
    code: int = case['exit_code']
    return code


@pytest.mark.parametrize('case', CASES, ids=[golden.case_id(c) for c in CASES])
def test_launch_behaviour(case: dict[str, Any], tmp_path: Path) -> None:
    if case['name'] == 'enable_each_rank_log_is_a_file':
        (tmp_path / 'afile').write_text('x')
    argv = dslaunch_argv(case, tmp_path)
    env = dict(os.environ, BEHAVE=json.dumps(case['behave']))
    env.pop('CUDA_VISIBLE_DEVICES', None)
    action = case.get('action') or ''
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session='to group' in action)
    if action:
        n = len(case['behave'])
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob('rank*.started'))) < n:
            assert time.monotonic() < deadline, 'ranks did not start'
            time.sleep(0.02)
        time.sleep(0.3)
        sig = next(s for name, s in SIGNALS.items() if f'sent {name}' in action)
        if 'to group' in action:
            os.killpg(proc.pid, sig)  # like Ctrl-C at a terminal: the whole foreground group
        else:
            proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == expected_exit(case), f'{out}\n{err}'

    markers = {p.name for p in tmp_path.iterdir() if '.' in p.name and p.name.startswith(('rank', 'grandchild'))}
    want = set(case['marker_files'])
    if 'sent SIGINT' in action and 'runner' not in case['name']:
        # DeepSpeed's launch.py answers SIGINT with SIGTERM to the ranks; dslaunch forwards SIGINT itself.
        want = {m.replace('got_SIGTERM', 'got_SIGINT') for m in want}
    if case['name'] in ('sighup_to_launcher', 'runner_child_launch_py_sigkilled',
                        'runner_sigterm_to_runner_only', 'runner_sigint_to_runner_only'):
        # DeepSpeed left these ranks running; dslaunch forwards the signal (or its orphan guard
        # SIGKILLs them), so the ranks may record the forwarded signal.
        markers = {m for m in markers if '.got_' not in m}
    if case['name'] == 'grandchild_left_running_after_clean_exit':
        markers.discard('grandchild0.got_SIGTERM')  # dslaunch ends what a clean job left behind
    assert markers == want, f'{out}\n{err}'
    if 'log_files' in case:
        logdir = Path(argv[argv.index(next(a for a in argv if a.startswith('--enable_each_rank_log')))].split('=', 1)[1])
        files = sorted(logdir.iterdir())
        assert [f.name[14:] for f in files] == [n.replace('<YYYYmmddHHMMSS>', '') for n in case['log_files']]
        for f, name in zip(files, case['log_files']):
            assert f.read_text().splitlines() == case['log_file_contents'][name]
    if case.get('pid_file'):
        pid_file = Path(case['pid_file'].replace('<save_pid>', argv[argv.index('--save_pid') + 1]))
        assert not pid_file.exists(), 'dslaunch removes the --save_pid file when the job ends'
