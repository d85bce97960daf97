"""Real multi-node test infrastructure: hosts, engines and the per-test leftover check.

Session fixtures bring up, once, what `tests/infra/` scripts build (see their headers):

- `cluster`: test hosts h1..h4 (network namespaces joined by a bridge, each with its own sshd,
  hostname and /etc/hosts; the filesystem is shared, so the repository and its venvs are at the
  same path everywhere). The dslaunch runner is started *inside h1* (`Runner.run`/`Runner.start`), as a
  user runs `deepspeed` on the first host of the hostfile; from there `ssh h2`, pdsh, mpirun and
  srun work without flags or prompts. Most tests run on h1 and h2 (`cluster.hosts`, the default
  hostfile); test_more_hosts.py uses all four (`cluster.all_hosts`).
- `slurm_conf`: slurmctld on h1 and one slurmd on h1 and on h2 (2 CPUs each), munged; yields SLURM_CONF.
- `impi_bin`: Intel MPI's runtime from PyPI (`impi-rt==2021.18.1`) in `.impi-venv`.

Each pytest session gets hosts of its own (state in /tmp/dslaunch-engines.<pid>, namespaces
dsl<pid>-*), so two sessions on one machine never share or tear down each other's; a session that
died without tearing down is cleaned up by the next one. Everything is torn down at the end of the
session (Slurm first, then the hosts), by pid file.

When something cannot start (not root, a package missing because `make system-deps` was not run,
no network for PyPI), the tests that need it SKIP, naming exactly what is missing, and the terminal
summary repeats it in a banner. With `CI=true` the same condition FAILS those tests instead: CI
must prove the multi-node tests ran.

Leftovers: every process a test starts on a test host lives in that host's network namespace
(the runner too, since it runs inside h1). After each test `nothing_left_on_the_hosts` scans
/proc (one kernel: namespaced processes are visible here) for processes in the test hosts'
namespaces other than the infrastructure's daemons, and for Slurm jobs still queued or running;
survivors are listed, killed and fail the test. ssh sessions do not carry the local environment,
so the test tag of `tests/conftest.py` (`DSLAUNCH_TEST_TAG`) is also exported to every rank on
every host through `DS_ENV_FILE`, and its /proc scan finds remote ranks as well.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from multinode_infra import (
    IMPI_VENV,
    JOB_HOSTS,
    N_HOSTS,
    SLOTS,
    STATE,
    Cluster,
    Engine,
    Runner,
    infra,
    need_programs,
    reap_stale_instances,
    tail,
    unavailable,
    unavailable_reasons,
)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if unavailable_reasons:
        terminalreporter.section('MULTI-NODE TESTS DID NOT RUN', sep='!', red=True, bold=True)
        for what in unavailable_reasons:
            terminalreporter.line(f'  {what}', red=True)
        terminalreporter.line('  fix: run `make system-deps` as root on Debian 12 (see tests/infra/).', red=True)


_CLUSTER: Cluster | None = None  # the session's cluster while it is up (for the autouse leftover check)


@pytest.fixture(scope='session')
def cluster() -> Iterator[Cluster]:
    """N_HOSTS test hosts with sshd (tests/infra/hosts-up.sh), torn down at the end of the session."""
    if sys.platform != 'linux':
        unavailable('test hosts need Linux network namespaces')
    if os.geteuid() != 0:
        unavailable('not root: test hosts need network namespaces, mounts and a per-host sshd '
                    '(run the tests as root, e.g. in the CI container)')
    need_programs([('ip', 'iproute2'), ('nsenter', 'util-linux'), ('unshare', 'util-linux'),
                   ('/usr/sbin/sshd', 'openssh-server'), ('ssh', 'openssh-client'), ('ssh-keygen', 'openssh-client'),
                   ('pdsh', 'pdsh')])
    reap_stale_instances()
    up = infra('hosts-up.sh', str(N_HOSTS))
    if up.returncode != 0:
        infra('hosts-down.sh')
        shutil.rmtree(STATE, ignore_errors=True)
        unavailable(f'tests/infra/hosts-up.sh {N_HOSTS} failed: {tail(up.stderr)}')
    hosts = [f'h{k}' for k in range(1, N_HOSTS + 1)]
    c = Cluster(hosts=hosts[:JOB_HOSTS], all_hosts=hosts, slots=SLOTS, state=STATE, hostfile=STATE / 'hostfile')
    c.write_hostfile(c.hostfile)
    global _CLUSTER
    _CLUSTER = c
    try:
        yield c
    finally:
        _CLUSTER = None
        down = infra('hosts-down.sh')
        if down.returncode != 0:
            print(f'tests/infra/hosts-down.sh failed: {down.stderr}', file=sys.stderr)
        else:
            shutil.rmtree(STATE, ignore_errors=True)


@pytest.fixture(scope='session')
def slurm_conf(cluster: Cluster) -> Iterator[str]:
    """Slurm on the test hosts (tests/infra/slurm-up.sh); yields the SLURM_CONF path."""
    need_programs([('/usr/sbin/slurmctld', 'slurmctld'), ('/usr/sbin/slurmd', 'slurmd'), ('srun', 'slurm-client'),
                   ('/usr/sbin/munged', 'munge'), ('mungekey', 'munge')])
    up = infra('slurm-up.sh', str(len(cluster.hosts)))  # Slurm's nodes: the default job's hosts only
    if up.returncode != 0:
        infra('slurm-down.sh')
        unavailable(f'tests/infra/slurm-up.sh failed: {tail(up.stderr)}')
    conf = str(STATE / 'slurm' / 'slurm.conf')
    cluster.slurm_conf = conf
    try:
        yield conf
    finally:
        cluster.slurm_conf = None
        infra('slurm-down.sh')


@pytest.fixture(scope='session')
def impi_bin() -> Path:
    """The bin directory of Intel MPI's runtime (`impi-rt` from PyPI, made by tests/infra/impi-venv.sh)."""
    if not (IMPI_VENV / 'bin' / 'mpiexec.hydra').exists():
        made = infra('impi-venv.sh', str(IMPI_VENV), timeout=600)
        if made.returncode != 0:
            unavailable(f'Intel MPI (impi-rt) could not be installed into {IMPI_VENV}: {tail(made.stderr)} '
                        '(make system-deps installs it)')
    return IMPI_VENV / 'bin'


@pytest.fixture
def engine(request: pytest.FixtureRequest, cluster: Cluster) -> Engine:
    """The backend named by the test's `engine` parameter (`parametrize('engine', [...], indirect=True)`),
    with what it needs brought up (Slurm, the Intel MPI venv)."""
    name = request.param
    if name == 'pdsh':
        # DeepSpeed's runner takes MASTER_ADDR from `ssh <first host> hostname -I`.
        return Engine('pdsh', str(shutil.which('pdsh')), master_addr=cluster.address('h1'))
    if name == 'openmpi':
        need_programs([('mpirun.openmpi', 'openmpi-bin'), ('orted', 'openmpi-bin')])
        # Open MPI refuses root unless told; passed the DeepSpeed way, through --launcher_args.
        root = ('--allow-run-as-root',) if os.geteuid() == 0 else ()
        return Engine('openmpi', str(shutil.which('mpirun.openmpi')), own_launcher_args=root)
    if name == 'mpich':
        need_programs([('mpirun.mpich', 'mpich')])
        return Engine('mpich', str(shutil.which('mpirun.mpich')))
    if name == 'impi':
        bin_dir: Path = request.getfixturevalue('impi_bin')
        # as after `source .impi-venv/bin/activate`: Intel's mpirun first on PATH
        return Engine('impi', str(bin_dir / 'mpirun'),
                      env={'PATH': f'{bin_dir}{os.pathsep}{os.environ.get("PATH", os.defpath)}'})
    if name == 'slurm':
        conf: str = request.getfixturevalue('slurm_conf')
        return Engine('slurm', str(shutil.which('srun')), env={'SLURM_CONF': conf})
    raise ValueError(name)


@pytest.fixture
def runner(cluster: Cluster, tmp_path: Path) -> Runner:
    return Runner(cluster, tmp_path)


@pytest.fixture(autouse=True)
def nothing_left_on_the_hosts() -> Iterator[None]:
    """After each test: no job process left on any test host and no Slurm job left queued or running.
    Survivors are named, SIGKILLed (Slurm jobs cancelled) and fail the test."""
    yield
    c = _CLUSTER
    if c is None:
        return
    deadline = time.monotonic() + 3.0  # ssh sessions and step daemons take a moment to wind down
    while (c.job_processes() or c.slurm_jobs()) and time.monotonic() < deadline:
        time.sleep(0.02)
    if c.job_processes() or c.slurm_jobs():
        left = c.cleanup_jobs()
        pytest.fail('left running on the test hosts after the test (now killed):\n  ' + '\n  '.join(left),
                    pytrace=False)
