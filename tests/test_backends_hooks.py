"""The backend hooks the runner calls around the command: signal mapping, Slurm's kill-on-bad-exit,
keeping a per-job hostfile for --dry_run."""

from __future__ import annotations

import argparse
import os
import signal

from dslaunch.backends import LAUNCHERS, make_runner


def args(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = {'master_addr': 'h1', 'master_port': 29500, 'hostfile': 'hostfile',
                               'user_script': 'train.py', 'user_args': []}
    base.update(kw)
    return argparse.Namespace(**base)


def test_only_srun_gets_sigterm_for_ctrl_c() -> None:
    for name in LAUNCHERS:
        runner = make_runner(name, args(), 'e30=', {'h1': 2, 'h2': 2})
        want = signal.SIGTERM if name == 'slurm' else signal.SIGINT
        assert runner.forwarded_signal(signal.SIGINT) == want, name
        assert runner.forwarded_signal(signal.SIGTERM) == signal.SIGTERM, name


def test_slurm_kills_the_step_when_a_task_fails_unless_the_user_says_otherwise() -> None:
    runner = make_runner('slurm', args(), 'e30=', {'h1': 2, 'h2': 2})
    env: dict[str, str] = {}
    runner.get_cmd(env, {'h1': [0, 1], 'h2': [0, 1]})
    assert env['SLURM_KILL_BAD_EXIT'] == '1'
    env = {'SLURM_KILL_BAD_EXIT': '0'}
    runner.get_cmd(env, {'h1': [0, 1], 'h2': [0, 1]})
    assert env['SLURM_KILL_BAD_EXIT'] == '0'


def test_keep_temp_files_leaves_the_filtered_hostfile_for_a_dry_run() -> None:
    runner = make_runner('openmpi', args(exclude='h2:1'), 'e30=', {'h1': 2, 'h2': 2})
    cmd = runner.get_cmd({}, {'h1': [0, 1], 'h2': [0]})
    path = cmd[cmd.index('-hostfile') + 1]
    assert runner.keep_temp_files() == [path]
    runner.cleanup()
    try:
        with open(path, encoding='utf-8') as f:
            assert f.read() == 'h1 slots=2\nh2 slots=1\n'
    finally:
        os.unlink(path)
