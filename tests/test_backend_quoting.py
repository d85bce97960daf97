"""Every user argument and exported value reaches the rank byte for byte, under every backend.

PDSH: the remote command is run through real shells (``/bin/sh`` and ``bash``), the way pdsh and
sshd hand it over, into a stub launcher that dumps its argv and environment; with pdsh installed
it also goes through the real pdsh (with a fake ``ssh`` that runs the command locally). MPI/Slurm:
the words must hold the raw values; with MPICH / Open MPI / Intel MPI installed the command really
runs, with the helper module swapped for the same stub. The PDSH kill command is run against real
processes: it must hit exactly this job's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dslaunch.backends import HELPER_MODULE, JOB_ID_ENV, LAUNCHERS, PDSHRunner, make_runner
from dslaunch.backends.impi import find_intel_mpirun
from dslaunch.errors import LauncherError

NASTY = [
    'a b', "it's", 'say "hi"', '$HOME', '$(echo pwned)', '`echo pwned`', 'a;b', 'a && b', 'x|y>z<w',
    'a\nb', 'a\tb', '', 'ünïcødé ✓', '*', '*.json', '~', '!', '#c', "'", '"', '\\', '{a,b}', '  lead',
    '100%', '%h %n %u %%', '-x', '--eq=a b',
]  # fmt: skip
STUB = 'dslaunch_quoting_stub'
STUB_SOURCE = textwrap.dedent("""
    import json, os, sys
    keep = {k: v for k, v in os.environ.items() if k.startswith('T_') or k == 'DSLAUNCH_JOB_ID'}
    out = os.path.join(os.environ['QT_OUT'], f'{os.getpid()}.json')
    with open(out, 'w', encoding='utf-8') as f:
        json.dump({'argv': sys.argv[1:], 'env': keep, 'cwd': os.getcwd()}, f)
""")
PY = sys.executable
ENV_KEYS = [f'T_{i}' for i in range(len(NASTY))]


def make_args(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = {
        'launcher_args': '', 'module': False, 'no_python': False, 'no_local_rank': False, 'save_pid': False,
        'enable_each_rank_log': 'None', 'bind_cores_to_rank': False, 'bind_core_list': None, 'venv_script': None,
        'ssh_port': None, 'include': '', 'exclude': '', 'num_nodes': -1, 'num_gpus': -1, 'master_addr': '127.0.0.1',
        'master_port': 29500, 'hostfile': 'hostfile', 'user_script': 'train.py', 'user_args': list(NASTY),
        'log_level': 'info', 'quiet': False,
    }  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


def pdsh_format(word: str, host: str, user: str, rank: int) -> str:
    """What pdsh does to each remote word before ssh (``%h %u %n %%``; any other ``%x`` kept)."""
    out, i = [], 0
    while i < len(word):
        c = word[i]
        if c == '%' and i + 1 < len(word):
            nxt = word[i + 1]
            out.append({'h': host, 'u': user, 'n': str(rank), '%': '%'}.get(nxt, '%' + nxt))
            i += 2
        else:
            out.append(c)
            i += 1
    return ''.join(out)


@pytest.fixture
def stub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cwd holding the stub module and an output folder; returns the output folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / f'{STUB}.py').write_text(STUB_SOURCE)
    out = tmp_path / 'out'
    out.mkdir()
    return out


def dumps(out: Path) -> list[dict]:
    return [json.loads(p.read_text(encoding='utf-8')) for p in sorted(out.glob('*.json'))]


def add_nasty_exports(runner, out: Path, pythonpath: str) -> None:
    runner.add_export('PYTHONPATH', pythonpath)
    runner.add_export('QT_OUT', str(out))
    for key, value in zip(ENV_KEYS, NASTY):
        runner.add_export(key, value)


def assert_env(dump: dict, job_id: str | None = None) -> None:
    assert {k: dump['env'][k] for k in ENV_KEYS} == dict(zip(ENV_KEYS, NASTY))
    assert dump['env'].get(JOB_ID_ENV) == job_id


# ---- PDSH: real shells -----------------------------------------------------------------------------
def pdsh_remote(runner: PDSHRunner, cmd: list[str]) -> list[str]:
    return cmd[6 + len(runner.launcher_args()) :]


@pytest.mark.parametrize('shell', ['/bin/sh', 'bash'])
def test_pdsh_remote_command_through_a_real_shell(stub: Path, shell: str) -> None:
    if not shutil.which(shell):
        pytest.skip(f'{shell} not installed')
    runner = PDSHRunner(make_args(job_id='job-7', bind_cores_to_rank=True, bind_core_list='0-1', quiet=True), 'e30=')
    runner.launch_module = STUB
    add_nasty_exports(runner, stub, os.getcwd())
    cmd = runner.get_cmd({}, {'hA': [0, 1], 'hB': [0, 1]})
    for rank, host in enumerate(['hA', 'hB']):
        line = ' '.join(pdsh_format(w, host, 'root', rank) for w in pdsh_remote(runner, cmd))
        subprocess.run([shell, '-c', line], check=True, timeout=60, env={'PATH': os.defpath}, cwd='/')
    got = dumps(stub)
    assert len(got) == 2
    for dump in got:
        rank = dump['argv'][1]
        assert dump['argv'] == [
            '--world_info=e30=', rank, '--master_addr=127.0.0.1', '--master_port=29500',
            '--enable_each_rank_log=None', '--bind_cores_to_rank', '--bind_core_list=0-1', '--quiet',
            '--log_level=info', 'train.py', *NASTY,
        ]  # fmt: skip
        assert_env(dump, 'job-7')
        assert dump['cwd'] == os.getcwd()  # the `cd` word survived too
    assert sorted(d['argv'][1] for d in got) == ['--node_rank=0', '--node_rank=1']


def test_pdsh_venv_script_with_a_nasty_path(stub: Path) -> None:
    if not shutil.which('bash'):
        pytest.skip('bash not installed')
    venv = Path(os.getcwd(), 'my venv\'s "act" $x %n.sh')
    venv.write_text('export T_VENV="sourced"\n')
    runner = PDSHRunner(make_args(venv_script=str(venv), user_args=['x']), 'e30=')
    runner.launch_module = STUB
    add_nasty_exports(runner, stub, os.getcwd())
    cmd = runner.get_cmd({}, {'hA': [0]})
    remote = pdsh_remote(runner, cmd)
    assert remote[0].startswith('source ') and remote[0].endswith(';')
    line = ' '.join(pdsh_format(w, 'hA', 'root', 0) for w in remote)
    subprocess.run(['bash', '-c', line], check=True, timeout=60, env={'PATH': os.defpath})
    (dump,) = dumps(stub)
    assert dump['argv'][-2:] == ['train.py', 'x']
    assert_env(dump)


def test_pdsh_rejects_a_name_the_shell_cannot_export() -> None:
    runner = PDSHRunner(make_args(), 'e30=')
    runner.add_export('export A', '1')
    with pytest.raises(ValueError, match='not a valid variable name'):
        runner.get_cmd({}, {'hA': [0]})
    for bad in ('', 'A=B', 'A\0'):
        with pytest.raises(ValueError):
            runner.add_export(bad, 'v')
    with pytest.raises(ValueError):
        runner.add_export('A', 'nul\0byte')


def test_pdsh_ssh_args_append_spacing() -> None:
    runner = PDSHRunner(make_args(ssh_port=2222), 'e30=')
    env = {'PDSH_SSH_ARGS_APPEND': '-o Foo=bar '}
    runner.get_cmd(env, {'hA': [0]})
    assert env == {'PDSH_SSH_ARGS_APPEND': '-o Foo=bar -p 2222', 'PDSH_RCMD_TYPE': 'ssh'}
    env = {}
    runner.get_cmd(env, {'hA': [0]})
    assert env['PDSH_SSH_ARGS_APPEND'] == '-p 2222'


# ---- PDSH: the real pdsh, with a fake ssh that runs the command here -------------------------------
FAKE_SSH = textwrap.dedent("""\
    #!{python}
    # Fake ssh: skip options, take the host, join the rest with spaces and run it with /bin/sh -c,
    # as sshd hands a remote command to the login shell.
    import os, sys
    args, with_value = sys.argv[1:], set('BbcDEeFIiJLlmOopQRSWw')
    while args and args[0].startswith('-'):
        opt = args.pop(0)
        if len(opt) == 2 and opt[1] in with_value:
            args.pop(0)
    host, command = args[0], ' '.join(args[1:])
    os.execv('/bin/sh', ['sh', '-c', command])
""")


@pytest.fixture
def fake_ssh_path(tmp_path: Path) -> str:
    if not shutil.which('pdsh'):
        pytest.skip('pdsh not installed')
    bindir = tmp_path / 'fakebin'
    bindir.mkdir()
    ssh = bindir / 'ssh'
    ssh.write_text(FAKE_SSH.format(python=PY))
    ssh.chmod(0o755)
    return f'{bindir}{os.pathsep}{os.environ.get("PATH", os.defpath)}'


def test_real_pdsh_delivers_args_and_env(stub: Path, fake_ssh_path: str) -> None:
    runner = PDSHRunner(make_args(ssh_port=2222, job_id='job-9'), 'e30=')
    runner.launch_module = STUB
    add_nasty_exports(runner, stub, os.getcwd())
    env = {'PATH': fake_ssh_path, 'HOME': os.environ.get('HOME', '/')}
    cmd = runner.get_cmd(env, {'hA': [0], 'hB': [0], 'hC': [0]})
    done = subprocess.run(cmd, check=False, env=env, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    got = dumps(stub)
    assert sorted(d['argv'][1] for d in got) == ['--node_rank=0', '--node_rank=1', '--node_rank=2']  # %n: 0-based
    for dump in got:
        assert dump['argv'][-len(NASTY) - 1 :] == ['train.py', *NASTY]
        assert_env(dump, 'job-9')


# ---- PDSH kill: only this job's processes ----------------------------------------------------------
SLEEPER = 'import time; time.sleep(120)'


@pytest.fixture
def procs() -> Iterator[dict[str, subprocess.Popen]]:
    started: dict[str, subprocess.Popen] = {}
    yield started
    for p in started.values():  # leave nothing behind
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)
    assert all(p.poll() is not None for p in started.values())


def _spawn(procs: dict, name: str, extra_env: dict[str, str], argv_tail: tuple[str, ...] = ()) -> None:
    env = {'PATH': os.defpath, **extra_env}
    procs[name] = subprocess.Popen([PY, '-c', SLEEPER, *argv_tail], env=env)


def _wait_dead(p: subprocess.Popen, timeout: float = 10) -> int | None:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def _start_kill_scenario(procs: dict) -> None:
    _spawn(procs, 'target1', {JOB_ID_ENV: 'job-A'})
    _spawn(procs, 'target2', {'OTHER': 'x', JOB_ID_ENV: 'job-A', 'MORE': 'y'})
    _spawn(procs, 'longer_id', {JOB_ID_ENV: 'job-AB'})
    _spawn(procs, 'other_job', {JOB_ID_ENV: 'job-B'})
    _spawn(procs, 'value_only', {'X': f'{JOB_ID_ENV}=job-A'})
    _spawn(procs, 'argv_only', {}, (f'{JOB_ID_ENV}=job-A',))  # DeepSpeed's pkill -f would hit this one
    deadline = time.monotonic() + 10
    for p in procs.values():  # each must have exec'd python (environ readable) before the kill
        while Path(f'/proc/{p.pid}/cmdline').read_bytes().split(b'\0')[:2] != [PY.encode(), b'-c']:
            assert time.monotonic() < deadline
            time.sleep(0.01)


def _assert_only_targets_killed(procs: dict) -> None:
    assert _wait_dead(procs['target1']) == -signal.SIGTERM
    assert _wait_dead(procs['target2']) == -signal.SIGTERM
    time.sleep(0.2)
    for name in ('longer_id', 'other_job', 'value_only', 'argv_only'):
        assert procs[name].poll() is None, f'{name} was killed'


@pytest.mark.skipif(not Path('/proc/self/environ').exists(), reason='needs /proc')
def test_kill_cmd_hits_only_this_job(procs: dict) -> None:
    runner = PDSHRunner(make_args(job_id='job-A'), 'e30=')
    cmd = runner.get_cmd({}, {'hA': [0], 'hB': [0]})
    kill = runner.kill_cmd('job-A')
    assert kill[:6] == cmd[:6] and len(kill) == 7
    _start_kill_scenario(procs)
    subprocess.run(['/bin/sh', '-c', pdsh_format(kill[-1], 'hA', 'root', 0)], check=True, timeout=30)
    _assert_only_targets_killed(procs)


@pytest.mark.skipif(not Path('/proc/self/environ').exists(), reason='needs /proc')
def test_kill_cmd_through_real_pdsh(procs: dict, fake_ssh_path: str) -> None:
    runner = PDSHRunner(make_args(job_id='job-A'), 'e30=')
    env = {'PATH': fake_ssh_path, 'HOME': os.environ.get('HOME', '/')}
    runner.get_cmd(env, {'hA': [0]})
    _start_kill_scenario(procs)
    subprocess.run(runner.kill_cmd('job-A'), env=env, check=True, timeout=60, capture_output=True)
    _assert_only_targets_killed(procs)


@pytest.mark.parametrize('bad', ['', 'a b', "a'b", 'x;y', 'a\nb', 'a%n', '$(id)', 'x' * 129])
def test_kill_cmd_rejects_unsafe_job_ids(bad: str) -> None:
    runner = PDSHRunner(make_args(), 'e30=')
    runner.get_cmd({}, {'hA': [0]})
    with pytest.raises(ValueError):
        runner.kill_cmd(bad)
    with pytest.raises(ValueError):
        PDSHRunner(make_args(job_id=bad or 'a b'), 'e30=').get_cmd({}, {'hA': [0]})


def test_kill_cmd_signal_names() -> None:
    runner = PDSHRunner(make_args(job_id='j'), 'e30=')
    runner.get_cmd({}, {'hA': [0]})
    assert 'kill -KILL ' in runner.kill_cmd('j', 'SIGKILL')[-1]
    with pytest.raises(ValueError):
        runner.kill_cmd('j', 'NOPE')
    with pytest.raises(LauncherError, match='not marked'):
        runner.kill_cmd('other')


# ---- MPI / Slurm: raw words -------------------------------------------------------------------------
def mpi_exports(name: str, cmd: list[str], env: dict[str, str]) -> dict[str, str]:
    """The exports as the engine will read them from the command (or srun's environment)."""
    if name == 'slurm':
        return {k: env[k] for k in ENV_KEYS}
    if name in ('mpich', 'impi'):
        return {cmd[i + 1]: cmd[i + 2] for i, w in enumerate(cmd) if w == '-genv' and cmd[i + 1] in ENV_KEYS}
    flag = '-x' if name == 'openmpi' else '-env'
    words = [cmd[i + 1] for i, w in enumerate(cmd) if w == flag]
    return dict(w.split('=', 1) for w in words if w.split('=', 1)[0] in ENV_KEYS)


@pytest.mark.parametrize('name', [n for n in LAUNCHERS if n != 'pdsh'])
def test_mpi_words_are_raw(name: str, stub: Path) -> None:
    runner = make_runner(name, make_args(module=True), 'e30=', {'hA': 2, 'hB': 2})
    add_nasty_exports(runner, stub, os.getcwd())
    env: dict[str, str] = {}
    cmd = runner.get_cmd(env, {'hA': [0, 1], 'hB': [0, 1]})
    helper = cmd.index(HELPER_MODULE)
    assert cmd[helper - 3 : helper] == [PY, '-u', '-m']
    assert cmd[helper + 1 :] == ['--launcher', name, '--module', 'train.py', *NASTY]
    assert mpi_exports(name, cmd, env) == dict(zip(ENV_KEYS, NASTY))
    if name == 'slurm':
        assert '--export=ALL' in cmd and not any(k in w for w in cmd for k in ENV_KEYS)
        assert env['MASTER_ADDR'] == '127.0.0.1' and env['MASTER_PORT'] == '29500'
    runner.cleanup()


def test_slurm_values_srun_could_not_split() -> None:
    runner = make_runner('slurm', make_args(user_args=[]), 'e30=', {'hA': 1})
    runner.add_export('SLURM_JOB_CPUS_PER_NODE', '64(x2),32')
    runner.add_export('MULTI', 'line1\nline2')
    env = {'PATH': '/usr/bin'}
    cmd = runner.get_cmd(env, {'hA': [0]})
    assert '--export=ALL' in cmd
    assert env['SLURM_JOB_CPUS_PER_NODE'] == '64(x2),32' and env['MULTI'] == 'line1\nline2'


# ---- MPI: the real engines, helper swapped for the stub ----------------------------------------------
def _run_engine(name: str, stub: Path, binary: str | None, launcher_args: str, extra_env: dict[str, str]) -> None:
    if not binary:
        pytest.skip(f'{name} launcher not installed')
    Path('hostfile').write_text('localhost slots=2\n')
    runner = make_runner(name, make_args(launcher_args=launcher_args, job_id='job-M'), 'e30=', {'localhost': 2})
    add_nasty_exports(runner, stub, os.getcwd())
    env = {'PATH': os.environ.get('PATH', os.defpath), 'HOME': os.environ.get('HOME', '/'), **extra_env}
    cmd = runner.get_cmd(env, {'localhost': [0, 1]})
    assert cmd[0] == binary
    if name == 'impi':  # Intel's mpirun script must find Intel's hydra, not MPICH's, through PATH
        assert shutil.which('mpiexec.hydra', path=env['PATH']) == os.path.join(os.path.dirname(binary), 'mpiexec.hydra')
    cmd[cmd.index(HELPER_MODULE)] = STUB  # the real helper maps ranks; the stub only reports what arrived
    done = subprocess.run(
        cmd, check=False, env=env, timeout=120, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    runner.cleanup()
    assert done.returncode == 0, done.stdout + done.stderr
    got = dumps(stub)
    assert len(got) == 2
    for dump in got:
        assert dump['argv'] == ['--launcher', name, 'train.py', *NASTY]
        assert_env(dump, 'job-M')


def test_real_mpich(stub: Path) -> None:
    runner = make_runner('mpich', make_args(), 'e30=', {'localhost': 2})
    found = runner.backend_binary()
    _run_engine('mpich', stub, found if os.path.isabs(found) else None, '', {})


def test_real_openmpi(stub: Path) -> None:
    found = make_runner('openmpi', make_args(), 'e30=', {'localhost': 2}).backend_binary()
    root = {'OMPI_ALLOW_RUN_AS_ROOT': '1', 'OMPI_ALLOW_RUN_AS_ROOT_CONFIRM': '1'}
    _run_engine('openmpi', stub, found if os.path.isabs(found) else None, '--mca btl_tcp_if_include lo', root)


def test_real_intel_mpi(stub: Path) -> None:
    _run_engine('impi', stub, find_intel_mpirun(), '', {})
