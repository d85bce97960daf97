"""runner.plan: each documented deviation from DeepSpeed, and the dslaunch-only options, on small inputs."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys

import pytest
from dslaunch import runner
from dslaunch.errors import (
    LauncherError,
    ResourceFilterError,
    UnknownLauncherError,
    UsageError,
)
from dslaunch.probes import SystemProbes


class Probes:
    def __init__(self, gpus=4, ssh_ok=True, hostname_i='10.0.0.9\n', port_free=True):
        self.gpus, self.ssh_ok, self.hostname, self.free = gpus, ssh_ok, hostname_i, port_free
        self.calls = []

    def device_count(self):
        return self.gpus

    def ssh_reachable(self, host, port):
        self.calls.append(('ssh', host, port))
        return self.ssh_ok

    def hostname_i(self, host, port):
        self.calls.append(('hostname -I', host, port))
        return self.hostname

    def backend_exists(self, name):
        return True

    def port_free(self, addr, port):
        self.calls.append(('port_free', addr, port))
        return self.free

    def free_port(self):
        return 41234


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _plan(cwd, *argv, env=None, probes=None, hostfile=None):
    if hostfile is not None:
        (cwd / 'hostfile').write_text(hostfile)
    hf = ['--hostfile', 'hostfile'] if hostfile is not None else ['--hostfile', str(cwd / 'none')]
    args = runner.parse_args([*hf, *argv, 'train.py', '--lr', '1'], prog='deepspeed')
    return runner.plan(args, {'PATH': '/bin', **(env or {})}, probes or Probes(), cwd=str(cwd), python='PY', pid=7)


def _world(plan):
    return json.loads(base64.urlsafe_b64decode(plan.world_info))


TWO_HOSTS = 'worker-0 slots=2\nworker-1 slots=2\n'


def test_default_local_command_is_deepspeeds(cwd):
    plan = _plan(cwd)
    assert plan.mode == 'local'
    assert plan.argv == [
        'PY',
        '-u',
        '-m',
        'dslaunch.launch',
        '--world_info=eyJsb2NhbGhvc3QiOiBbMCwgMSwgMiwgM119',
        '--master_addr=127.0.0.1',
        '--master_port=29500',
        '--enable_each_rank_log=None',
        '--log_level=info',
        'train.py',
        '--lr',
        '1',
    ]


def test_no_gpus_runs_cpu_ranks(cwd):
    assert _world(_plan(cwd, probes=Probes(gpus=0))) == {'localhost': [0]}
    assert _world(_plan(cwd, '--num_gpus', '3', probes=Probes(gpus=0))) == {'localhost': [0, 1, 2]}


def test_num_gpus_is_bounded_by_gpus_and_slots(cwd):
    with pytest.raises(ResourceFilterError, match='--num_gpus 8 is more than the 4 slot'):
        _plan(cwd, '--num_gpus', '8')
    with pytest.raises(ResourceFilterError, match="of host 'worker-0'"):
        _plan(cwd, '--num_gpus', '3', '--master_addr', 'w0', hostfile=TWO_HOSTS)
    assert _world(_plan(cwd, '--num_gpus', '2')) == {'localhost': [0, 1]}


def test_user_master_addr_is_respected_locally(cwd):
    plan = _plan(cwd, '--master_addr', '10.9.9.9')
    assert '--master_addr=10.9.9.9' in plan.argv and plan.master_addr == '10.9.9.9'


def test_master_port_zero_picks_a_free_port(cwd):
    plan = _plan(cwd, '--master_port', '0')
    assert plan.master_port == 41234 and '--master_port=41234' in plan.argv


def test_taken_master_port_is_an_error(cwd):
    with pytest.raises(LauncherError, match='--master_port 29500 is already in use'):
        _plan(cwd, probes=Probes(port_free=False))


def test_master_port_zero_needs_a_single_machine(cwd):
    with pytest.raises(UsageError, match='--master_port 0'):
        _plan(cwd, '--master_port', '0', '--master_addr', 'w0', hostfile=TWO_HOSTS)


@pytest.mark.parametrize(
    'visible, argv, world',
    [
        ('4,5', [], {'localhost': [4, 5]}),
        ('2,3', ['--num_gpus', '1'], {'localhost': [2]}),
        ('0,1', ['--num_nodes', '1'], {'localhost': [0, 1]}),
        ('0,1', ['--num_gpus', '0'], {'localhost': [0, 1]}),
        ('2,3', ['--include', 'localhost:3'], {'localhost': [3]}),
        ('2,3,5', ['--exclude', 'localhost:3'], {'localhost': [2, 5]}),
        ('GPU-8a3b,GPU-77c1', [], {'localhost': ['GPU-8a3b', 'GPU-77c1']}),
    ],
)
def test_cuda_visible_devices_are_the_local_slots(cwd, visible, argv, world):
    plan = _plan(cwd, *argv, env={'CUDA_VISIBLE_DEVICES': visible})
    assert _world(plan) == world
    assert plan.removed_env == ('CUDA_VISIBLE_DEVICES',) and 'CUDA_VISIBLE_DEVICES' not in plan.env


def test_cuda_visible_devices_errors(cwd):
    with pytest.raises(ResourceFilterError, match="No slot '0' specified on host 'localhost'"):
        _plan(cwd, '--include', 'localhost:0', env={'CUDA_VISIBLE_DEVICES': '2,3'})
    with pytest.raises(ResourceFilterError, match='--num_gpus 3 is more than the 2'):
        _plan(cwd, '--num_gpus', '3', env={'CUDA_VISIBLE_DEVICES': '2,3'})
    with pytest.raises(UsageError, match='UUID'):
        _plan(cwd, '--include', 'localhost:0', env={'CUDA_VISIBLE_DEVICES': 'GPU-a,GPU-b'})


def test_cuda_visible_devices_ignored_with_a_hostfile(cwd):
    plan = _plan(cwd, '--num_nodes', '1', '--master_addr', 'w0', env={'CUDA_VISIBLE_DEVICES': '7'}, hostfile=TWO_HOSTS)
    assert _world(plan) == {'worker-0': [0, 1]} and plan.env['CUDA_VISIBLE_DEVICES'] == '7'


def test_empty_selection_is_a_clear_error(cwd):
    with pytest.raises(ResourceFilterError, match='Nothing left to run on'):
        _plan(cwd, '--exclude', 'worker-0@worker-1', hostfile=TWO_HOSTS)


def test_unknown_launcher_is_an_error_locally(cwd):
    with pytest.raises(UnknownLauncherError, match='Unknown launcher bogus'):
        _plan(cwd, '--launcher', 'BOGUS')


def test_ssh_only_where_the_job_uses_ssh(cwd):
    probes = Probes()
    plan = _plan(cwd, hostfile=TWO_HOSTS, probes=probes)
    assert plan.mode == 'multinode' and plan.master_addr == '10.0.0.9'
    assert sorted(c[:2] for c in probes.calls if c[0] != 'port_free') == [
        ('hostname -I', 'worker-0'), ('ssh', 'worker-0'), ('ssh', 'worker-1')]  # fmt: skip
    for launcher in ('openmpi', 'mpich'):  # ssh bootstraps: every host (none is this machine)
        probes = Probes(hostname_i='')
        plan = _plan(cwd, '--launcher', launcher, hostfile=TWO_HOSTS, probes=probes)
        assert sorted(c[:2] for c in probes.calls) == [('ssh', 'worker-0'), ('ssh', 'worker-1')], launcher
        assert plan.master_addr == 'worker-0'
    for argv, env in (
        (['--launcher', 'slurm'], {}),
        (['--launcher', 'openmpi'], {'SLURM_JOB_ID': '17'}),  # mpirun starts its daemons with srun
        (['--launcher', 'mpich', '--launcher_args', '-launcher fork'], {}),  # the user picked the bootstrap
        (['--launcher', 'openmpi', '--launcher_args', '--mca plm_rsh_agent rsh'], {}),
        (['--no_ssh_check', '--master_addr', 'w0'], {}),
        (['--no_ssh', '--node_rank', '1'], {}),
        (['--num_nodes', '1'], {}),
        (['--include', 'worker-1'], {}),
    ):
        probes = Probes(ssh_ok=False, hostname_i='')
        plan = _plan(cwd, *argv, hostfile=TWO_HOSTS, probes=probes, env=env)
        assert not [c for c in probes.calls if c[0] != 'port_free'], argv
    assert plan.mode == 'local' and plan.master_addr == '127.0.0.1'  # one host left: runs here


def test_mpi_ssh_check_skips_this_machine(cwd):
    probes = Probes()
    _plan(cwd, '--launcher', 'mpich', hostfile=f'{socket.gethostname()} slots=2\nworker-1 slots=2\n', probes=probes)
    assert [c[:2] for c in probes.calls] == [('ssh', 'worker-1')]


class OneHostDown(Probes):
    def __init__(self, down, **kw):
        super().__init__(**kw)
        self.down = down

    def ssh_reachable(self, host, port):
        super().ssh_reachable(host, port)
        return host not in self.down


@pytest.mark.parametrize('launcher', ['pdsh', 'openmpi', 'mpich', 'impi'])
def test_a_later_host_not_answering_ssh_is_named(cwd, launcher):
    hostfile = TWO_HOSTS + 'worker-2 slots=2\nworker-3 slots=2\n'
    with pytest.raises(LauncherError, match=r'host=worker-2 was not reachable via ssh'):
        _plan(cwd, '--launcher', launcher, hostfile=hostfile, probes=OneHostDown({'worker-2', 'worker-3'}))


def test_slurm_master_is_the_first_node_of_the_allocation(cwd):
    env = {'SLURM_JOB_NODELIST': 'gpu[07-09],cpu1'}
    assert _plan(cwd, '--launcher', 'slurm', hostfile=TWO_HOSTS, env=env).master_addr == 'gpu07'
    # outside an allocation, or with --include/--exclude (srun then gets --nodelist): the first kept host
    assert _plan(cwd, '--launcher', 'slurm', hostfile=TWO_HOSTS).master_addr == 'worker-0'
    plan = _plan(cwd, '--launcher', 'slurm', '--exclude', 'worker-0', '--force_multi', hostfile=TWO_HOSTS, env=env)
    assert plan.master_addr == 'worker-1'
    assert _plan(cwd, '--launcher', 'slurm', '--master_addr', 'm', hostfile=TWO_HOSTS, env=env).master_addr == 'm'


class NotInstalled(Probes):
    def backend_exists(self, name):
        return False


@pytest.mark.parametrize(('launcher', 'package'), [
    ('pdsh', "the Debian package 'pdsh'"), ('openmpi', "'openmpi-bin'"), ('mpich', "the Debian package 'mpich'"),
    ('impi', "'impi-rt'"), ('slurm', "'slurm-client'"), ('mvapich', 'MVAPICH2'),
])  # fmt: skip
def test_backend_not_installed_names_its_package(cwd, launcher, package):
    probes = NotInstalled()
    with pytest.raises(LauncherError, match=f"launcher '{launcher}' not installed; install .*{package}"):
        _plan(cwd, '--launcher', launcher, hostfile=TWO_HOSTS, probes=probes)
    assert not [c for c in probes.calls if c[0] != 'port_free']  # asked before any ssh


def test_no_ssh_uses_the_first_host_as_master(cwd):
    plan = _plan(cwd, '--no_ssh', '--node_rank', '1', hostfile=TWO_HOSTS)
    assert plan.mode == 'local' and plan.master_addr == 'worker-0'
    assert '--node_rank=1' in plan.argv


def test_unreachable_host_names_the_host(cwd):
    with pytest.raises(LauncherError, match='host=worker-0 was not reachable via ssh'):
        _plan(cwd, hostfile=TWO_HOSTS, probes=Probes(ssh_ok=False))


def test_empty_hostname_i_is_a_clear_error(cwd):
    with pytest.raises(LauncherError, match="'hostname -I' on worker-0 printed no address"):
        _plan(cwd, hostfile=TWO_HOSTS, probes=Probes(hostname_i='  \n'))


def test_node_rank_check_is_an_error_not_an_assert(cwd):
    with pytest.raises(UsageError, match='--node_rank is not set correctly'):
        _plan(cwd, '--no_ssh', '--master_addr', 'w0', hostfile=TWO_HOSTS)


def test_autotuning_is_not_supported(cwd):
    with pytest.raises(UsageError, match='--autotuning is not supported'):
        _plan(cwd, '--autotuning', 'tune')


@pytest.mark.parametrize(
    'argv, match',
    [
        (['--elastic_training'], 'needs --master_addr'),
        (['--elastic_training', '--master_addr', 'a', '--no_local_rank'], '--no_local_rank'),
        (
            ['--elastic_training', '--master_addr', 'a', '--min_elastic_nodes', '3', '--max_elastic_nodes', '2'],
            'larger than',
        ),
        (['--grace_period', '-1'], '--grace_period'),
        (['--hang_timeout', '-5'], '--hang_timeout'),
        (['--console_ranks', '2,1'], '--console_ranks'),
    ],
)
def test_dslaunch_option_errors(cwd, argv, match):
    with pytest.raises(UsageError, match=match):
        _plan(cwd, *argv)


def test_elastic_flags_are_forwarded_like_0_19_7(cwd):
    plan = _plan(
        cwd, '--elastic_training', '--master_addr', '10.0.0.1', '--min_elastic_nodes', '1', '--max_elastic_nodes', '2'
    )
    at = plan.argv.index('--enable_each_rank_log=None')
    assert plan.argv[at + 1 : at + 4] == ['--enable_elastic_training', '--max_elastic_nodes=2', '--min_elastic_nodes=1']


def test_dslaunch_options_are_forwarded_only_when_set(cwd):
    plan = _plan(cwd, '--grace_period', '5', '--raw_output', '--console_ranks', '0', '--dry_run', '--hang_timeout', '9')
    at = plan.argv.index('--grace_period=5.0')
    assert plan.argv[at : at + 3] == ['--grace_period=5.0', '--raw_output', '--console_ranks=0']
    assert plan.args.dry_run and plan.args.hang_timeout == 9.0


def test_multinode_env_and_exports(cwd):
    (cwd / '.deepspeed_env').write_text('# site\n\nexport EXTRA=1\nNCCL_DEBUG=WARN\n')
    env = {'NCCL_DEBUG': 'INFO', 'PYTHONPATH': '/p', 'WANDB_API_KEY': 'x', 'HOME': str(cwd / 'home')}
    plan = _plan(cwd, '--master_addr', 'w0', env=env, hostfile=TWO_HOSTS)
    assert plan.env['PYTHONPATH'] == f'{cwd}:/p'
    assert plan.exports == {'NCCL_DEBUG': 'WARN', 'PYTHONPATH': f'{cwd}:/p', 'EXTRA': '1'}
    assert list(plan.exports) == ['NCCL_DEBUG', 'PYTHONPATH', 'EXTRA']
    assert plan.backend == 'pdsh' and plan.argv is None


def test_environ_is_not_modified(cwd):
    env = {'CUDA_VISIBLE_DEVICES': '1', 'PATH': '/bin'}
    args = runner.parse_args(['--hostfile', str(cwd / 'none'), 'train.py'])
    runner.plan(args, env, Probes(), cwd=str(cwd))
    assert env == {'CUDA_VISIBLE_DEVICES': '1', 'PATH': '/bin'}


def test_system_probes_ports():
    probes = SystemProbes(environ={})
    port = probes.free_port()
    assert 0 < port < 65536
    with socket.socket() as busy:
        busy.bind(('', 0))
        busy.listen()
        assert not probes.port_free('127.0.0.1', busy.getsockname()[1])
    assert probes.port_free('127.0.0.1', probes.free_port())


def test_system_probes_backend_lookup(monkeypatch, tmp_path):
    monkeypatch.setenv('PATH', str(tmp_path))
    probes = SystemProbes(environ={})
    assert not probes.backend_exists('pdsh') and not probes.backend_exists('mvapich')
    assert not probes.backend_exists('bogus')
    # each backend looks for the program it runs: Open MPI's plain `mpirun` is not MPICH or Intel MPI
    (tmp_path / 'mpirun').write_text('#!/bin/sh\necho "mpirun (Open MPI) 4.1.4"\n')
    (tmp_path / 'mpirun').chmod(0o755)
    assert not probes.backend_exists('mpich') and not probes.backend_exists('impi')
    for name, program in (('pdsh', 'pdsh'), ('slurm', 'srun'), ('mpich', 'mpirun.mpich')):
        (tmp_path / program).symlink_to('/bin/true')
        assert SystemProbes(environ={'PATH': str(tmp_path)}).backend_exists(name), name
    assert not probes.ssh_reachable('host.invalid', None)  # no ssh on PATH: unreachable, no exception


@pytest.mark.parametrize('removed', [False, True])
def test_shell_line_runs_with_the_planned_environment(tmp_path, removed):
    """--dry_run's line, run by a shell whose environment is the caller's, gives the command exactly
    the planned environment and arguments."""
    base = {'PATH': '/usr/bin:/bin', 'KEEP': 'k', 'CHANGED': 'old', 'GONE': 'g'}
    env = {'PATH': '/usr/bin:/bin', 'KEEP': 'k', 'CHANGED': "it's $HOME `x`", 'NEW': 'a b\nc', 'GONE': 'g'}
    if removed:
        del env['GONE']
    cmd = [sys.executable, '-c', 'import json, os, sys; print(json.dumps([dict(os.environ), sys.argv[1:]]))',
           'a b', '$(x)', '%n']  # fmt: skip
    line = runner.shell_line(cmd, env, base)
    assert line.startswith('env -u GONE ' if removed else 'CHANGED=')
    done = subprocess.run(['bash', '-c', line], env=base, capture_output=True, text=True, check=True)
    got_env, got_args = json.loads(done.stdout)
    got_env = {k: v for k, v in got_env.items() if k not in ('PWD', 'SHLVL', '_', 'LC_CTYPE')}
    assert got_env == env and got_args == cmd[3:]
    assert runner.shell_line(['a', 'b c'], base, base) == "a 'b c'"


@pytest.mark.parametrize('launcher, name', [('mpich', 'MPICH'), ('impi', 'Intel MPI'), ('mvapich', 'mvapich')])
def test_unequal_hosts_are_refused_before_any_ssh(cwd, launcher, name):
    # DeepSpeed's MPI runners need the same slot count on every host of the hostfile; the plan
    # refuses such a world with DeepSpeed's text before it probes a single host
    probes = Probes()
    with pytest.raises(ResourceFilterError, match=f'^{name} requires same number of devices per node$'):
        _plan(cwd, '--launcher', launcher, '--master_addr', 'a', hostfile='a slots=4\nb slots=2\n', probes=probes)
    assert not [c for c in probes.calls if c[0] == 'ssh']


def test_an_inherited_name_no_shell_can_export_is_skipped_with_a_note(cwd):
    # DeepSpeed's pdsh command has the remote bash reject `export PYTHON-FOO=x;` and the job goes on
    plan = _plan(cwd, '--master_addr', 'w0', hostfile=TWO_HOSTS, env={'PYTHON-FOO': 'x', 'PYTHONX': '1'})
    assert plan.mode == 'multinode' and 'PYTHON-FOO' not in plan.exports and plan.exports['PYTHONX'] == '1'
    assert any("'PYTHON-FOO' is not a shell variable name" in n for n in plan.notes)


def test_deepspeed_shaped_names_for_tools_written_against_deepspeeds_runner(cwd):
    # what DeepSpeed's own launcher tests call: runner.main(args), runner._parse_hostfile,
    # runner.apply_num_nodes_and_gpus, and MPI backends fed the {host: count} pool
    from dslaunch.backends import make_runner

    with pytest.raises(ValueError, match='Cannot specify num_nodes/gpus with include/exclude'):
        runner.main(['--num_nodes', '1', '--num_gpus', '1', '-i', 'localhost', str(cwd / 'x.py')])
    assert runner._parse_hostfile(['worker-0 slots=2', 'worker-1 slots=2']) == {'worker-0': 2, 'worker-1': 2}
    assert runner.apply_num_nodes_and_gpus({'a': [0, 1], 'b': [0, 1]}, 1, -1) == {'a': [0, 1]}
    args = runner.parse_args(['--master_addr', 'w0', 'train.py'])
    cmd = make_runner('openmpi', args, 'e30=', {'w0': 4, 'w1': 4}).get_cmd({}, {'w0': 4, 'w1': 4})
    assert cmd[cmd.index('-n') + 1] == '8'
