"""The backend hooks the runner calls around the command: signal mapping, Slurm's kill-on-bad-exit,
keeping a per-job hostfile for --dry_run, the hosts reached by ssh, the "installed" checks."""

from __future__ import annotations

import argparse
import os
import signal
import socket

import pytest
from dslaunch.backends import LAUNCHERS, make_runner
from dslaunch.backends.slurm import first_node


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


def test_which_hosts_each_backend_reaches_by_ssh() -> None:
    active = {'localhost': [0, 1], socket.gethostname(): [0], 'far-1': [0], 'far-2': [0]}
    for name in LAUNCHERS:
        runner = make_runner(name, args(), 'e30=', {h: 2 for h in active})
        want = {'pdsh': list(active), 'slurm': []}.get(name, ['far-1', 'far-2'])  # MPI: not this machine
        assert runner.ssh_hosts({}, active) == want, name
    # the engine does not use ssh: inside a batch job, or the user picked its bootstrap
    for name, launcher_args, env in (
        ('openmpi', '', {'SLURM_JOB_ID': '5'}),
        ('mpich', '', {'PBS_JOBID': '7.server'}),
        ('impi', '', {'I_MPI_HYDRA_BOOTSTRAP': 'slurm'}),
        ('mpich', '-launcher fork', {}),
        ('mvapich', '-bootstrap slurm', {}),
        ('openmpi', '--mca plm slurm', {}),
        ('openmpi', '-mca plm_rsh_agent rsh', {}),
    ):
        runner = make_runner(name, args(launcher_args=launcher_args), 'e30=', {h: 2 for h in active})
        assert runner.ssh_hosts(env, active) == [], (name, launcher_args, env)
    assert make_runner('pdsh', args(), 'e30=', {}).ssh_hosts({'SLURM_JOB_ID': '5'}, active) == list(active)


def test_backend_checks_need_no_instance() -> None:
    # the runner asks them before building the backend: class methods
    for name, cls in LAUNCHERS.items():
        assert cls.backend_package()
        if name != 'impi':  # Intel's is also looked for beside this Python and under $I_MPI_ROOT
            assert not cls.backend_exists('/nonexistent') and cls.backend_binary('/nonexistent') == (
                'srun' if name == 'slurm' else 'pdsh' if name == 'pdsh' else 'mpirun'
            )


@pytest.mark.parametrize(('nodelist', 'first'), [
    ('h1', 'h1'), ('h[1-2]', 'h1'), ('gpu[03-05,7],cpu1', 'gpu03'), ('a,b', 'a'), ('n[1-2]-ib', 'n1-ib'),
    ('', None), ('x[1-2]y[3-4]', None),
])  # fmt: skip
def test_slurm_first_node(nodelist: str, first: str | None) -> None:
    assert first_node(nodelist) == first


def test_impi_refuses_a_core_list_too_short_for_its_ranks():
    # DeepSpeed's IMPI get_cmd asserts this for the per-host rank count; the list is the same on every host
    from dslaunch.errors import CoreBindingError

    runner = make_runner('impi', args(bind_cores_to_rank=True, bind_core_list='0-4'), 'e30=', {'h1': 8, 'h2': 8})
    with pytest.raises(CoreBindingError, match='^At least one core needs to be assigned to each rank$'):
        runner.get_cmd({}, {'h1': list(range(8)), 'h2': list(range(8))})
    runner = make_runner('impi', args(bind_cores_to_rank=True, bind_core_list='0-15'), 'e30=', {'h1': 8, 'h2': 8})
    assert '--bind_core_list=0-15' in runner.get_cmd({}, {'h1': list(range(8)), 'h2': list(range(8))})
