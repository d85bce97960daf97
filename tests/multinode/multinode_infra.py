"""Shared pieces of the multi-node tests (conftest.py holds the fixtures): the test hosts, the
engines, and running `dslaunch` inside a host. See conftest.py for the whole picture."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / 'tests' / 'infra'
PROBE = Path(__file__).resolve().parent / 'scripts' / 'rank_probe.py'
NSENTER = shutil.which('nsenter') or '/usr/bin/nsenter'
DSLAUNCH = str(Path(sys.executable).parent / 'dslaunch')
# This session's own hosts (tests/infra/lib.sh): two pytest sessions on one machine never share them.
STATE_PARENT = '/tmp/dslaunch-engines.'
STATE = Path(os.environ.get('DSLAUNCH_ENGINES_DIR') or f'{STATE_PARENT}{os.getpid()}')
NS_PREFIX = os.environ.get('DSLAUNCH_ENGINES_NS') or f'dsl{os.getpid()}-'
INFRA_ENV = {'DSLAUNCH_ENGINES_DIR': str(STATE), 'DSLAUNCH_ENGINES_NS': NS_PREFIX}
IMPI_VENV = Path(os.environ.get('DSLAUNCH_IMPI_VENV', str(ROOT / '.impi-venv')))
N_HOSTS = 4  # hosts brought up: h1..h4 (test_more_hosts.py uses all of them)
JOB_HOSTS = 2  # the hosts of the default hostfile and of Slurm: h1, h2
SLOTS = 2
NET = '10.211.0'  # tests/infra/lib.sh: DSL_NET
DEAD_HOST = 'hdead'  # resolves and routes on the test hosts, nothing answers ssh
IN_CI = os.environ.get('CI', '').lower() == 'true'
TAG_VAR = 'DSLAUNCH_TEST_TAG'
# Launcher variables of an enclosing job must not leak into the runner (issue 5: Open MPI must
# work without any OMPI_* in the runner's environment).
_SCRUBBED_PREFIXES = ('OMPI_', 'PMIX_', 'PMI_', 'SLURM_', 'I_MPI_', 'HYDRA_', 'MPI_', 'MV2_')
_SCRUBBED = ('CUDA_VISIBLE_DEVICES', 'DS_ENV_FILE', 'SLURM_CONF')

#: what could not start, for conftest's terminal summary
unavailable_reasons: list[str] = []


def unavailable(what: str) -> NoReturn:
    """Skip (fail under CI=true) the tests that need `what`, loudly."""
    if what not in unavailable_reasons:
        unavailable_reasons.append(what)
    if IN_CI:
        pytest.fail(f'multi-node test infrastructure cannot start: {what} '
                    '(CI=true: this is a failure, not a skip)', pytrace=False)
    pytest.skip(f'MULTI-NODE TEST SKIPPED: {what}')


def infra(script: str, *args: str, timeout: float = 300,
          instance: Mapping[str, str] = INFRA_ENV) -> subprocess.CompletedProcess[str]:
    """Run tests/infra/<script> for this session's hosts (no test tag leaks into the daemons)."""
    env = {k: v for k, v in os.environ.items() if k != TAG_VAR}
    env.update(instance)
    return subprocess.run(['bash', str(INFRA / script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)


def reap_stale_instances() -> None:
    """Tear down the hosts of pytest sessions that died without doing it (their pid is gone)."""
    for state in Path(STATE_PARENT).parent.glob(Path(STATE_PARENT).name + '*'):
        owner = state.name.rsplit('.', 1)[-1]
        if not owner.isdigit() or state == STATE or os.path.exists(f'/proc/{owner}'):
            continue
        ns_file = state / 'ns'
        prefix = ns_file.read_text().strip() if ns_file.exists() else f'dsl{owner}-'
        infra('hosts-down.sh', instance={'DSLAUNCH_ENGINES_DIR': str(state), 'DSLAUNCH_ENGINES_NS': prefix})
        shutil.rmtree(state, ignore_errors=True)


def need_programs(programs: Sequence[tuple[str, str]]) -> None:
    for program, package in programs:
        if shutil.which(program) is None and not os.access(program, os.X_OK):
            unavailable(f"{program} not found: install the Debian package '{package}' (make system-deps)")


def tail(text: str, n: int = 8) -> str:
    return ' | '.join(text.strip().splitlines()[-n:])


# ---- processes ------------------------------------------------------------------------------------

def _read(path: str) -> bytes | None:
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError:
        return None


def proc_alive(pid: int) -> bool:
    """Running or stopped: not gone and not a zombie."""
    stat = _read(f'/proc/{pid}/stat')
    return stat is not None and stat.rsplit(b')', 1)[1].split()[0] not in (b'Z', b'X')


def cmdline(pid: int) -> str:
    raw = _read(f'/proc/{pid}/cmdline') or b''
    return raw.replace(b'\0', b' ').decode(errors='replace').strip()


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process."""
    parents = {}
    for name in os.listdir('/proc'):
        stat = _read(f'/proc/{name}/stat') if name.isdigit() else None
        if stat is not None:
            parents[int(name)] = int(stat.rsplit(b')', 1)[1].split()[1])
    return parents


def _netns_inode(pid: int) -> int | None:
    try:
        link = os.readlink(f'/proc/{pid}/ns/net')  # 'net:[4026532312]'
    except OSError:
        return None
    return int(link[5:-1])


# ---- the cluster ----------------------------------------------------------------------------------

@dataclass
class Cluster:
    """The test hosts of this session and how to run things on them."""

    hosts: list[str]  # the default job's hosts (the first JOB_HOSTS), each with `slots` slots in `hostfile`
    all_hosts: list[str]  # every test host that is up (N_HOSTS)
    slots: int
    state: Path
    hostfile: Path  # every host of `hosts` with `slots` slots
    slurm_conf: str | None = None
    _netns: dict[str, int] = field(default_factory=dict)

    def address(self, host: str) -> str:
        return f'{NET}.{host[1:]}'

    def sshd_pid(self, host: str) -> int:
        return int((self.state / 'run' / f'sshd-{host}.pid').read_text())

    def netns(self) -> dict[int, str]:
        """network-namespace inode -> host, for every test host (hdead included)."""
        if not self._netns:
            for name in [*self.all_hosts, DEAD_HOST]:
                self._netns[name] = os.stat(f'/run/netns/{NS_PREFIX}{name}').st_ino
        return {inode: host for host, inode in self._netns.items()}

    def daemon_pids(self) -> set[int]:
        """The infrastructure's own processes inside the hosts: sshd, slurmd, slurmctld (pid files)
        and slurmctld's helper child (slurmscriptd). Children of sshd and slurmd are jobs."""
        pids: dict[str, int] = {}
        for pidfile in [*(self.state / 'run').glob('sshd-*.pid'), *(self.state / 'slurm' / 'run').glob('*.pid')]:
            try:
                pids[pidfile.stem] = int(pidfile.read_text())
            except (OSError, ValueError):
                pass
        daemons = set(pids.values())
        if 'slurmctld' in pids:
            daemons |= {pid for pid, ppid in _parents().items() if ppid == pids['slurmctld']}
        return daemons

    def job_processes(self) -> dict[int, tuple[str, str]]:
        """Live processes inside the test hosts that are not infrastructure: pid -> (host, cmdline)."""
        netns, daemons, me = self.netns(), self.daemon_pids(), os.getpid()
        found = {}
        for name in os.listdir('/proc'):
            if not name.isdigit():
                continue
            pid = int(name)
            host = netns.get(_netns_inode(pid) or -1)
            if host is None or pid in daemons or pid == me or not proc_alive(pid):
                continue
            found[pid] = (host, cmdline(pid))
        return found

    def slurm_jobs(self) -> list[str]:
        """Slurm jobs not yet completing ('<id> <state>'), or [] without Slurm."""
        if self.slurm_conf is None:
            return []
        done = self.run_on('h1', ['squeue', '-h', '-o', '%i %t'], env={'SLURM_CONF': self.slurm_conf}, timeout=30)
        return [line for line in done.stdout.splitlines() if line.strip() and line.split()[-1] != 'CG']

    def cleanup_jobs(self) -> list[str]:
        """Kill (SIGKILL) every job process on the test hosts and cancel every Slurm job;
        returns what was found. For tests whose expected failure may leave a job running."""
        found = [f'{host}: pid {pid}: {cmd}' for pid, (host, cmd) in sorted(self.job_processes().items())]
        jobs = self.slurm_jobs()
        if jobs:
            found += [f'slurm job {job}' for job in jobs]
            self.run_on('h1', ['scancel', *[j.split()[0] for j in jobs]], env={'SLURM_CONF': self.slurm_conf or ''})
        for pid in self.job_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while self.job_processes() and time.monotonic() < deadline:
            time.sleep(0.02)
        return found

    # ---- running commands inside a host ---------------------------------------------------------
    def enter(self, host: str, cwd: str | os.PathLike[str]) -> list[str]:
        """argv prefix that runs a command inside `host` (network, hostname, mount namespaces)."""
        return [NSENTER, '-t', str(self.sshd_pid(host)), '-n', '-u', '-m', f'--wd={cwd}', '--']

    def run_on(self, host: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
               cwd: str | os.PathLike[str] = '/', timeout: float = 60) -> subprocess.CompletedProcess[str]:
        full = {**os.environ, **(env or {})}
        return subprocess.run([*self.enter(host, cwd), *argv], env=full, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, check=False)

    def write_hostfile(self, path: Path, hosts: Sequence[str] | None = None, slots: int | None = None) -> Path:
        path.write_text(''.join(f'{h} slots={slots or self.slots}\n' for h in (hosts or self.hosts)))
        return path


# ---- engines --------------------------------------------------------------------------------------

ENGINES = ('pdsh', 'openmpi', 'mpich', 'impi', 'slurm')


@dataclass(frozen=True)
class Engine:
    """How to run dslaunch with one backend on the test hosts."""

    name: str
    binary: str  # the program the backend command starts with
    master_addr: str = 'h1'  # what ranks get as MASTER_ADDR when --master_addr is not given
    own_launcher_args: tuple[str, ...] = ()  # --launcher_args words the backend needs here
    env: Mapping[str, str] = field(default_factory=dict)  # additions to the runner's environment

    def flags(self, *launcher_args: str) -> list[str]:
        """`--launcher NAME [--launcher_args=WORDS]`: the engine's own launcher args, then `launcher_args`."""
        words = [*self.own_launcher_args, *launcher_args]
        return ['--launcher', self.name, *([f'--launcher_args={shlex.join(words)}'] if words else [])]


# ---- the runner -----------------------------------------------------------------------------------

def runner_env(workdir: Path, *extra: Mapping[str, str]) -> dict[str, str]:
    """The runner's environment: ours without launcher variables, plus DS_ENV_FILE exporting the
    test tag to every rank on every host (ssh sessions carry none of the caller's environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES) and k not in _SCRUBBED}
    tag = os.environ.get(TAG_VAR)
    if tag:
        env_file = workdir / 'tag.deepspeed_env'
        env_file.write_text(f'{TAG_VAR}={tag}\n')
        env['DS_ENV_FILE'] = str(env_file)
    for more in extra:
        env.update(more)
    return env


@dataclass
class Run:
    """A finished runner."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


class Job:
    """A dslaunch runner started in the background inside a test host."""

    def __init__(self, cluster: Cluster, host: str, args: Sequence[str], workdir: Path,
                 env: Mapping[str, str], name: str = 'job') -> None:
        self.workdir = workdir
        # files, not pipes: a pipe nobody reads while we wait could fill up and block the runner
        self._out: BinaryIO = open(workdir / f'{name}.stdout', 'w+b')  # noqa: SIM115 (closed by kill/close)
        self._err: BinaryIO = open(workdir / f'{name}.stderr', 'w+b')  # noqa: SIM115
        self.started = time.time()
        self.proc = subprocess.Popen([*cluster.enter(host, workdir), DSLAUNCH, *args], env=dict(env),
                                     stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err,
                                     start_new_session=True)  # its own process group, as under a shell

    def ctrl_c(self, sig: int = signal.SIGINT) -> None:
        """What Ctrl-C in a terminal does: SIGINT to the runner's whole (foreground) process group
        (Ctrl-\\: SIGQUIT)."""
        os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float) -> Run | None:
        """The finished run, or None if the runner is still running after `timeout` seconds."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return Run(code, self._text(self._out), self._text(self._err), time.time() - self.started)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self.close()

    def close(self) -> None:
        self._out.close()
        self._err.close()

    @staticmethod
    def _text(f: BinaryIO) -> str:
        f.seek(0)
        return f.read().decode(errors='replace')


@dataclass
class Runner:
    """Starts dslaunch inside h1 (the first host, where a user runs it) with a clean environment."""

    cluster: Cluster
    workdir: Path

    def env(self, engine: Engine | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return runner_env(self.workdir, engine.env if engine else {}, extra or {})

    def run(self, *args: str, engine: Engine | None = None, env: Mapping[str, str] | None = None,
            host: str = 'h1', timeout: float = 90) -> Run:
        job = self.start(*args, engine=engine, env=env, host=host)
        try:
            done = job.wait(timeout)
            if done is None:
                raise AssertionError(f'dslaunch {shlex.join(args)} still running after {timeout} s')
            return done
        finally:
            job.kill()

    def start(self, *args: str, engine: Engine | None = None, env: Mapping[str, str] | None = None,
              host: str = 'h1', name: str = 'job') -> Job:
        return Job(self.cluster, host, args, self.workdir, self.env(engine, env), name=name)

    def rank_records(self, outdir: Path) -> dict[int, dict[str, Any]]:
        return {int(p.stem[4:]): json.loads(p.read_text()) for p in outdir.glob('rank[0-9]*.json')}
