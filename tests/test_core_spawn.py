"""Starting ranks and reaping them: process groups, the rank's inherited state, exits reported as
they happen with no polling, nothing left unreaped, and every kind of bad input."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from dslaunch import _core
from helpers.procs import HELPERS, PY, alive, all_dead, environ_has, marked, proc_stat, wait_until, zombie_children

RANK_SELF_REPORT = r"""
import json, os, sys
names = os.listdir('/proc/self/fd')          # the listing's own directory fd is closed again by now
fds = {}
for name in names:
    try:
        os.fstat(int(name))
        fds[name] = os.readlink('/proc/self/fd/' + name)
    except OSError:
        pass
print(json.dumps({
    'pid': os.getpid(), 'pgid': os.getpgid(0), 'sid': os.getsid(0), 'fds': fds,
    'run_id': os.environ.get('DSLAUNCH_RUN_ID'), 'stdin_read': sys.stdin.buffer.read(),
}, default=repr))
"""


def _devnull() -> int:
    return os.open(os.devnull, os.O_WRONLY)


def test_ranks_run_in_own_process_groups_with_dev_null_stdin_and_run_id(run_id: str) -> None:
    sup = _core.Supervisor([_core.RankSpec(['sleep', '30']) for _ in range(4)], run_id=run_id, grace_period=0)
    with sup:
        pids = sup.pids
        assert len(pids) == 4 and len(set(pids)) == 4
        for pid in pids:
            st = proc_stat(pid)
            assert st is not None and st['state'] not in ('Z', 'X')
            assert st['pgrp'] == pid, 'each rank leads its own process group'
            assert st['session'] == os.getsid(0), 'a new group, not a new session (terminal job control intact)'
            assert st['ppid'] == os.getpid()
            assert os.readlink(f'/proc/{pid}/fd/0') == '/dev/null'
            # Only 0-2: no fd of the launcher leaks in. The dynamic loader of the freshly exec'd
            # `sleep` briefly holds fd 3 (a library it maps), so wait for that to pass; a leaked fd
            # would stay for good.
            wait_until(lambda pid=pid: sorted(os.listdir(f'/proc/{pid}/fd'), key=int) == ['0', '1', '2'], 5,
                       'only fds 0-2 in the rank')
            assert os.readlink(f'/proc/{pid}/fd/1').startswith('pipe:')
            # posix_spawn returns once the exec has begun; /proc/<pid>/environ reads empty until
            # the kernel has finished setting up the new image, so poll.
            wait_until(lambda pid=pid: environ_has(pid, f'DSLAUNCH_RUN_ID={run_id}'), 5, 'the run id in the environ')
        assert sorted(_core.find_marked(f'{_core.RUN_ID_VAR}={run_id}')) == sorted(pids)
        sup.kill()
        report = sup.wait(timeout=10)
    assert report is not None and report.run_id == run_id
    assert [r.returncode for r in report.ranks] == [-9] * 4
    assert all_dead(pids)


def test_rank_sees_clean_process_state(run_id: str, tmp_path: Path) -> None:
    """No fd but 0, 1, 2 (the orphan guard's pipe and the launcher's inheritable fds stay out),
    default dispositions and an empty mask even when the launcher ignores and blocks signals."""
    leaked_r, leaked_w = os.pipe()
    os.set_inheritable(leaked_r, True)  # an fd the launcher would pass on if the spawn did not close it
    old_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})
    out = tmp_path / 'out'
    fd = os.open(out, os.O_WRONLY | os.O_CREAT)
    try:
        sup = _core.Supervisor(
            [
                _core.RankSpec([PY, '-c', RANK_SELF_REPORT], tag='py'),
                # exec: grep itself is the rank and reads its own status (Python would ignore SIGPIPE itself)
                _core.RankSpec(['/bin/sh', '-c', 'exec grep -E "^Sig(Ign|Blk)" /proc/self/status'], tag='sig'),
            ],
            run_id=run_id,
            prefix='{tag} ',
            stdout_fd=fd,
            forward_signals=[],
        )
        sup.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        signal.signal(signal.SIGHUP, old_hup)
        os.close(leaked_r)
        os.close(leaked_w)
    report = sup.wait(timeout=30)
    os.close(fd)
    assert report is not None and report.returncode == 0, report
    lines = out.read_text().splitlines()
    info = json.loads(next(line for line in lines if line.startswith('py '))[3:])
    assert sorted(info['fds'], key=int) == ['0', '1', '2'], info['fds']
    assert info['fds']['0'] == '/dev/null' and info['stdin_read'] == repr(b'')
    assert info['pgid'] == info['pid'] and info['sid'] == os.getsid(0)
    assert info['run_id'] == run_id
    sig = dict(line[4:].split(':\t') for line in lines if line.startswith('sig '))
    assert int(sig['SigBlk'], 16) == 0, f'signal mask not empty: {sig}'
    assert int(sig['SigIgn'], 16) == 0, f'ignored signals inherited: {sig}'


def test_exits_are_reaped_as_they_happen_without_polling(run_id: str) -> None:
    """Each exit is seen when it happens (the early rank is reported while the others still
    run); the loop thread sleeps in epoll while nothing happens (a poller would wake up
    constantly); afterwards no rank pid remains, not even as a zombie."""
    argv = [
        ['/bin/sh', '-c', 'exit 0'],
        ['/bin/sh', '-c', 'sleep 1.5; exit 0'],
        ['/bin/sh', '-c', 'sleep 1.5; exit 0'],
    ]
    sup = _core.Supervisor([_core.RankSpec(a) for a in argv], run_id=run_id, stdout_fd=_devnull(), fail_fast=True)
    sup.start()
    early = wait_until(lambda: (s := sup.status()[0]).state == 'exited' and s, 5, 'rank 0 reported')
    assert early.returncode == 0 and early.ended_at is not None
    assert [s.state for s in sup.status()[1:]] == ['running', 'running']
    loop_tid = _supervisor_thread()
    before = _ctx_switches(loop_tid)
    time.sleep(0.6)  # measuring idleness needs a stretch of time in which nothing happens
    woke = _ctx_switches(loop_tid) - before
    assert woke <= 3, f'the supervisor thread woke {woke} times in 0.6 s with nothing to do'
    report = sup.wait(timeout=10)
    assert report is not None and report.returncode == 0 and report.success
    assert [r.state for r in report.ranks] == ['exited'] * 3
    assert report.ranks[0].ended_at < report.ranks[1].ended_at
    pids = [r.pid for r in report.ranks]
    assert not set(pids) & set(zombie_children())
    assert not [p for p in pids if proc_stat(p) is not None]


def _supervisor_thread() -> int:
    tids = [
        int(t)
        for t in os.listdir('/proc/self/task')
        if Path(f'/proc/self/task/{t}/comm').read_text().startswith('dslaunch-super')
    ]
    assert len(tids) == 1, tids
    return tids[0]


def _ctx_switches(tid: int) -> int:
    """How often the thread has blocked (each wake-up from epoll_wait follows one)."""
    text = Path(f'/proc/self/task/{tid}/status').read_text()
    return next(int(line.split()[1]) for line in text.splitlines() if line.startswith('voluntary_ctxt_switches:'))


@pytest.mark.parametrize(
    ('code', 'returncode', 'signal_', 'exit_status', 'state'),
    [
        ('exit 0', 0, None, 0, 'exited'),
        ('exit 7', 7, None, 7, 'failed'),
        ('kill -TERM $$', -15, 15, 143, 'killed'),
        ('kill -KILL $$', -9, 9, 137, 'killed'),
    ],
)
def test_exit_status_conventions(code: str, returncode: int, signal_: int | None, exit_status: int, state: str) -> None:
    report = _core.Supervisor([_core.RankSpec(['/bin/sh', '-c', code])], stdout_fd=_devnull()).run()
    r = report.ranks[0]
    assert (r.returncode, r.signal, r.exit_status, r.state) == (returncode, signal_, exit_status, state)
    assert report.returncode == exit_status


# ---- bad input ----------------------------------------------------------------------------------


def test_missing_program_raises_file_not_found_naming_it() -> None:
    sup = _core.Supervisor([_core.RankSpec(['dslaunch-no-such-program-xyz'])], stdout_fd=_devnull())
    with pytest.raises(FileNotFoundError) as ei:
        sup.start()
    assert ei.value.errno == errno.ENOENT
    assert ei.value.filename == 'dslaunch-no-such-program-xyz'


def test_missing_program_path_raises_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / 'nope'
    with pytest.raises(FileNotFoundError) as ei:
        _core.Supervisor([_core.RankSpec([missing])], stdout_fd=_devnull()).start()
    assert ei.value.errno == errno.ENOENT and ei.value.filename == str(missing)


def test_non_executable_file_raises_permission_error(tmp_path: Path) -> None:
    script = tmp_path / 'script.sh'
    script.write_text('#!/bin/sh\necho hi\n')
    script.chmod(stat.S_IRUSR | stat.S_IWUSR)
    with pytest.raises(PermissionError) as ei:
        _core.Supervisor([_core.RankSpec([script])], stdout_fd=_devnull()).start()
    assert ei.value.errno == errno.EACCES and ei.value.filename == str(script)


def test_empty_argv_raises_value_error() -> None:
    with pytest.raises(ValueError, match='argv'):
        _core.RankSpec([])


def test_missing_cwd_raises_file_not_found_naming_it(tmp_path: Path) -> None:
    cwd = tmp_path / 'no' / 'such' / 'dir'
    with pytest.raises(FileNotFoundError) as ei:
        _core.Supervisor([_core.RankSpec(['true'], cwd=cwd)], stdout_fd=_devnull()).start()
    assert ei.value.errno == errno.ENOENT and ei.value.filename == str(cwd)


def test_cwd_is_honoured_and_relative_programs_resolve_against_the_launcher(tmp_path: Path) -> None:
    sub = tmp_path / 'sub'
    sub.mkdir()
    (sub / 'where.sh').write_text('#!/bin/sh\npwd\n')
    (sub / 'where.sh').chmod(0o755)
    out = tmp_path / 'out'
    fd = os.open(out, os.O_WRONLY | os.O_CREAT)
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        report = _core.Supervisor(
            [_core.RankSpec(['./where.sh'], cwd='sub'), _core.RankSpec(['sub/where.sh'])],
            stdout_fd=fd,
            prefix='{rank} ',
        ).run()
    finally:
        os.chdir(old)
        os.close(fd)
    assert report.returncode == 0
    assert sorted(out.read_text().splitlines()) == [f'0 {sub}', f'1 {tmp_path}']


def test_log_file_in_missing_directory_raises_os_error_naming_it(tmp_path: Path, run_id: str) -> None:
    log = tmp_path / 'missing' / 'rank0.log'
    sup = _core.Supervisor([_core.RankSpec(['sleep', '30'], log_file=log)], run_id=run_id, stdout_fd=_devnull())
    with pytest.raises(OSError) as ei:
        sup.start()
    assert ei.value.errno == errno.ENOENT and ei.value.filename == str(log)
    assert marked(f'DSLAUNCH_RUN_ID={run_id}') == []


@pytest.mark.parametrize('k', [1, 5])
def test_failed_spawn_of_rank_k_leaves_no_rank_alive(tmp_path: Path, run_id: str, k: int) -> None:
    """Ranks 0..k-1 start (each with setsid and double-forked descendants), rank k cannot: the
    OSError comes only after every process of the job is gone."""
    ranks = [
        _core.RankSpec([PY, str(HELPERS / 'tree.py'), str(tmp_path / f'tree{i}.json')], env={'I': str(i)})
        for i in range(k)
    ]
    ranks.append(_core.RankSpec([tmp_path / 'missing-program']))
    ranks += [_core.RankSpec(['sleep', '30']) for _ in range(2)]
    sup = _core.Supervisor(ranks, run_id=run_id, stdout_fd=_devnull())
    with pytest.raises(FileNotFoundError):
        sup.start()
    assert _core.find_marked(f'DSLAUNCH_RUN_ID={run_id}') == []
    assert marked(f'DSLAUNCH_RUN_ID={run_id}') == []
    assert sup.pids == [] and not sup.done


def test_started_twice_and_wait_before_start_raise_supervisor_error() -> None:
    sup = _core.Supervisor([_core.RankSpec(['true'])], stdout_fd=_devnull())
    with pytest.raises(_core.SupervisorError):
        sup.wait()
    with pytest.raises(_core.SupervisorError):
        sup.status()
    assert sup.pids == [] and not sup.done
    sup.start()
    with pytest.raises(_core.SupervisorError, match='already'):
        sup.start()
    report = sup.wait(timeout=10)
    assert report is not None and report.returncode == 0
    with pytest.raises(_core.SupervisorError):
        sup.run()
    assert issubclass(_core.SupervisorError, RuntimeError)


@pytest.mark.parametrize(
    'kwargs',
    [{'grace_period': -1.0}, {'grace_period': float('nan')}, {'forward_signals': [signal.SIGKILL]}, {'run_id': 'a\nb'}],
)
def test_bad_options_raise_value_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _core.Supervisor([_core.RankSpec(['true'])], **kwargs)  # type: ignore[arg-type]


def test_supervisor_dropped_while_running_kills_its_ranks(run_id: str) -> None:
    sup = _core.Supervisor([_core.RankSpec(['sleep', '30']) for _ in range(2)], run_id=run_id, forward_signals=[])
    sup.start()
    pids = sup.pids
    assert all(alive(p) for p in pids)
    del sup
    wait_until(lambda: all_dead(pids), 5, 'the ranks of a dropped supervisor to die')


# A rank that leaves a zombie child: the zombie is re-parented to the launcher (a subreaper) when
# the rank exits, and the end of the job reaps it.
_LEAVES_A_ZOMBIE = 'import os, time\nif os.fork() == 0:\n    os._exit(0)\ntime.sleep(0.3)\n'


@pytest.mark.parametrize('callers_zombie', [False, True], ids=['only-the-job', 'and-the-callers-own'])
def test_orphaned_zombies_are_reaped_and_the_callers_own_exited_child_is_not(run_id: str,
                                                                            callers_zombie: bool) -> None:
    """The job's orphans are reaped at its end (none is left a zombie); a child the caller made
    and has not waited for yet (here `subprocess.Popen`) keeps its exit status for the caller,
    whether or not it is a zombie first in the kernel's list of our children."""
    mine = subprocess.Popen(['/bin/sh', '-c', 'exit 5']) if callers_zombie else None
    if mine is not None:
        wait_until(lambda: mine.pid in zombie_children(), 5, "the caller's child to exit")
    ranks = [_core.RankSpec([PY, '-c', _LEAVES_A_ZOMBIE]) for _ in range(4)]
    sup = _core.Supervisor(ranks, run_id=run_id, stdout_fd=_devnull())
    sup.start()
    report = sup.wait(timeout=20)
    assert report is not None and report.returncode == 0
    assert zombie_children() == ([mine.pid] if mine is not None else [])
    if mine is not None:
        assert mine.wait(timeout=5) == 5
