#!/usr/bin/env python3
"""dslaunch against its peers and against the floor, side by side in one run.

Launchers (one line each in every table):
  floor      benches/floor.c, compiled with cc now: posix_spawn N + signalfd/waitpid (+ epoll mux)
  pyfloor    benches/pyfloor.py under `python -S` (teardown only): the same job in a Python process,
             what the interpreter alone costs a launcher hosted by Python
  dslaunch   .venv/bin/dslaunch --num_gpus N --no_python --no_local_rank PROG...
  dslaunch-pyhost  the same with DSLAUNCH_NATIVE_HOST=0 (teardown only): dslaunch's job kept on its
             Python host instead of the native one, what hosting the core in Python costs
  torchrun   python -m torch.distributed.run --standalone --nproc-per-node N --no-python PROG...
  deepspeed  python -m deepspeed.launcher.launch --world_info=<b64 {"localhost": [0..N-1]}>
             --no_python --no_local_rank PROG...   (DeepSpeed 0.19.8's per-node launcher)
The peers come from the bench-only venv (.bench-venv, benches/setup_peers.sh); a peer that is
not installed is left out and said so (quick mode falls back to .venv's torch for torchrun).

Scenarios (docs/benchmarks.md explains each): noop (/bin/true and `python -c pass` ranks),
failure propagation, SIGTERM teardown, SIGKILL orphans, log multiplexing, launcher peak RSS,
CLI start-up. Launchers are interleaved inside every repetition, in a shuffled order.

Every trial's processes carry LAUNCHBENCH_TAG=<trial id> in their environment; after each
trial the harness scans /proc/*/environ for that tag, counts and SIGKILLs what is left, so a
crashed trial never poisons the next one.

Usage: bench.py [--quick] [--reps R] [--only SCENARIO,...] [--out FILE]
Stdlib only: run it with any Python 3.10+; the chart (benches/plot.py) needs matplotlib.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ROOT / 'benches'
TAG_VAR = 'LAUNCHBENCH_TAG'  # not DSLAUNCH_*: nothing of dslaunch's or its tests' may match it
LAUNCHERS = ('floor', 'dslaunch', 'torchrun', 'deepspeed')
PAGE = os.sysconf('SC_PAGE_SIZE')


# ----------------------------------------------------------------------------------------------
# /proc helpers


def _read(path: str) -> bytes:
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError:
        return b''


def tagged_pids(tag: str) -> list[int]:
    """Live (non-zombie) processes whose environment holds TAG_VAR=tag."""
    needle = f'\0{TAG_VAR}={tag}\0'.encode()
    me = os.getpid()
    out = []
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid == me:
            continue
        env = _read(f'/proc/{name}/environ')
        if env and needle in b'\0' + env + b'\0':
            out.append(pid)
    return out


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in _read(f'/proc/{pid}/status').decode(errors='replace').splitlines():
        k, _, v = line.partition(':')
        out[k] = v.strip()
    return out


def kb(v: str | None) -> int:
    return int(v.split()[0]) if v else 0


def children_of(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tids = os.listdir(f'/proc/{pid}/task')
    except OSError:
        return kids
    for tid in tids:
        kids += [int(x) for x in _read(f'/proc/{pid}/task/{tid}/children').split()]
    return kids


def exe_of(pid: int) -> str:
    try:
        return os.readlink(f'/proc/{pid}/exe')
    except OSError:
        return ''


def run_id_of(pid: int) -> str | None:
    for entry in _read(f'/proc/{pid}/environ').split(b'\0'):
        if entry.startswith(b'DSLAUNCH_RUN_ID='):
            return entry.decode(errors='replace')
    return None


def guards_for(run_ids: Iterable[str]) -> list[int]:
    """dslaunch's orphan guards (env-less /bin/sh) of the given jobs, found by their argv."""
    wanted = {r.encode() for r in run_ids}
    if not wanted:
        return []
    out = []
    for name in os.listdir('/proc'):
        if name.isdigit():
            argv = _read(f'/proc/{name}/cmdline').split(b'\0')
            if b'dslaunch-orphan-guard' in argv and wanted & set(argv):
                out.append(int(name))
    return out


def wait_gone(pids: Iterable[int], timeout: float) -> tuple[float | None, list[int]]:
    """Waits (pidfds) until every pid has exited; returns (monotonic time when the last went,
    or None on timeout; the pids still alive)."""
    fds: dict[int, int] = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except OSError:
            pass  # already gone
    last = time.monotonic()
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    try:
        while fds:
            left = deadline - time.monotonic()
            if left <= 0:
                return None, sorted(fds.values())
            for fd, _ in poller.poll(left * 1000):
                poller.unregister(fd)
                os.close(fd)
                del fds[fd]
            last = time.monotonic()
        return last, []
    finally:
        for fd in fds:
            os.close(fd)


def sweep(tag: str, extra_run_ids: set[str] | None = None) -> int:
    """SIGKILLs every process of a trial (by tag, plus dslaunch guards of its jobs); returns
    how many were left."""
    run_ids = set(extra_run_ids or ())
    pids = tagged_pids(tag)
    for pid in pids:
        rid = run_id_of(pid)
        if rid:
            run_ids.add(rid)
    victims = pids + [g for g in guards_for(run_ids) if g not in pids]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    wait_gone(victims, 10)
    return len(pids)


# ----------------------------------------------------------------------------------------------
# the harness as the trials' init


class Reaper(threading.Thread):
    """The harness is a child subreaper, and this thread reaps every child at once, as a prompt
    init would (the init of some containers and VMs reaps orphans only every second or so, which
    would inflate teardown times of launchers that wait for their grandchildren to vanish, e.g.
    psutil.wait_procs in DeepSpeed's). Launchers are reaped here too; Trial.wait takes their
    status from `done`. Started after the set-up's subprocess.run calls, stopped before the plot."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.done: dict[int, tuple[int, Any]] = {}
        self.launchers: set[int] = set()
        self.cv = threading.Condition()
        self.stopping = False

    @staticmethod
    def become_subreaper() -> bool:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER

    def run(self) -> None:
        while not self.stopping:
            try:
                pid, status, ru = os.wait4(-1, 0)
            except ChildProcessError:
                time.sleep(0.002)
                continue
            with self.cv:
                # Only launchers' statuses are kept. An orphan's would outlive its pid, and a
                # later launcher given that pid again (pid_max wraps every few 1,024-rank trials)
                # would be handed the orphan's status.
                if pid in self.launchers:
                    self.done[pid] = (status, ru)
                    self.cv.notify_all()

    def spawn(self, start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        """Starts a launcher whose status `result` will give. The lock is held across the fork,
        so the status of a launcher that exits at once is recorded only after it is known."""
        with self.cv:
            proc = start()
            self.launchers.add(proc.pid)
            return proc

    def result(self, pid: int, timeout: float = 30.0) -> tuple[int, Any] | None:
        with self.cv:
            self.cv.wait_for(lambda: pid in self.done, timeout)
            self.launchers.discard(pid)
            return self.done.pop(pid, None)

    def stop(self) -> None:
        self.stopping = True
        self.join(1.0)


REAPER: Reaper | None = None


# ----------------------------------------------------------------------------------------------
# running one launcher


@dataclass
class Outcome:
    start: float
    end: float | None  # monotonic time the launcher exited (None: killed on timeout)
    returncode: int | None  # shell style: 128+N for signal N
    maxrss_kb: int  # wait4's ru_maxrss: the launcher or its largest reaped descendant
    stdout: str = ''
    stderr: str = ''

    @property
    def wall(self) -> float | None:
        return None if self.end is None else self.end - self.start


class Trial:
    """One launcher process with a fresh tag; the harness waits on it through a pidfd and
    reaps it with wait4 (for its rusage)."""

    counter = 0

    def __init__(self, cmd: Sequence[str], env: dict[str, str], stdout: Any = None, cwd: str | None = None) -> None:
        Trial.counter += 1
        self.tag = f'{os.getpid()}-{Trial.counter}'
        self.env = dict(env, **{TAG_VAR: self.tag})
        self.cmd = [str(c) for c in cmd]
        self.stdout_arg = stdout
        self.cwd = cwd
        self.run_ids: set[str] = set()

    def start(self) -> None:
        # closed by wait() (read back, then closed)
        self.errf = tempfile.TemporaryFile()  # noqa: SIM115
        out = self.stdout_arg if self.stdout_arg is not None else tempfile.TemporaryFile()  # noqa: SIM115
        self.outf = out if self.stdout_arg is None else None
        self.t0 = time.monotonic()

        def popen() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                self.cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=self.errf,
                cwd=self.cwd, start_new_session=True,
            )  # fmt: skip

        self.proc = REAPER.spawn(popen) if REAPER is not None else popen()
        self.pidfd = os.pidfd_open(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float) -> Outcome:
        r, _, _ = select.select([self.pidfd], [], [], max(0.0, timeout))
        end = time.monotonic() if r else None
        if not r:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        if REAPER is not None:
            got = REAPER.result(self.proc.pid)
            assert got is not None, f'launcher {self.proc.pid} not reaped'
            status, ru = got
        else:
            _, status, ru = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen never waits again
        os.close(self.pidfd)
        rc = self.proc.returncode
        code = None if end is None else (128 - rc if rc < 0 else rc)
        return Outcome(self.t0, end, code, ru.ru_maxrss, self._text(self.outf), self._text(self.errf))

    @staticmethod
    def _text(f: Any) -> str:
        if f is None:
            return ''
        f.seek(0)
        data = f.read()
        f.close()
        return data[-4000:].decode(errors='replace')

    def finish(self) -> int:
        """Sweeps what is left of the trial; returns the count."""
        return sweep(self.tag, self.run_ids)

    def note_run_ids(self) -> None:
        for pid in tagged_pids(self.tag):
            rid = run_id_of(pid)
            if rid:
                self.run_ids.add(rid)


# ----------------------------------------------------------------------------------------------
# the launchers


@dataclass
class Env:
    quick: bool
    tools: Path
    floor: Path = field(init=False)
    rankprog: Path = field(init=False)
    rank_python: str = ''
    dslaunch: Path = ROOT / '.venv' / 'bin' / 'dslaunch'
    dslaunch_py: Path = ROOT / '.venv' / 'bin' / 'python'
    peer_py: dict[str, str] = field(default_factory=dict)  # launcher -> python running it
    missing: dict[str, str] = field(default_factory=dict)  # launcher -> why it is left out
    base_env: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    # --extra-dslaunch NAME=PYTHONPATH: another dslaunch build (e.g. with a proposed fix), run by
    # the same CLI with that package first on PYTHONPATH, as launcher 'dslaunch+NAME'.
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.floor = self.tools / 'floor'
        self.rankprog = self.tools / 'rankprog'

    @property
    def launchers(self) -> list[str]:
        names = [name for name in LAUNCHERS if name not in self.missing]
        return names[:2] + list(self.extra) + names[2:]

    def env_for(self, launcher: str) -> dict[str, str]:
        if launcher == 'dslaunch-pyhost':
            return dict(self.base_env, DSLAUNCH_NATIVE_HOST='0')
        if launcher in self.extra:
            return dict(self.base_env, PYTHONPATH=self.extra[launcher])
        return self.base_env

    def command(self, launcher: str, n: int, argv: Sequence[str], mux: bool = False) -> list[str]:
        argv = [str(a) for a in argv]
        if launcher == 'floor':
            return [str(self.floor), *(['--mux', '--prefix'] if mux else []), str(n), *argv]
        if launcher == 'floor-file':
            return [str(self.floor), str(n), *argv]
        if launcher == 'pyfloor':
            return [str(self.dslaunch_py), '-S', str(BENCHES / 'pyfloor.py'), str(n), *argv]
        if launcher in ('dslaunch', 'dslaunch-pyhost') or launcher in self.extra:
            return [str(self.dslaunch), '--num_gpus', str(n), '--no_python', '--no_local_rank', *argv]
        if launcher == 'dslaunch-node':
            return [str(self.dslaunch_py), '-m', 'dslaunch.launch', f'--world_info={world_info(n)}', '--no_python',
                    '--no_local_rank', *argv]  # fmt: skip
        if launcher == 'torchrun':
            return [self.peer_py['torchrun'], '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', str(n),
                    '--no-python', *argv]  # fmt: skip
        if launcher == 'deepspeed':
            return [self.peer_py['deepspeed'], '-m', 'deepspeed.launcher.launch', f'--world_info={world_info(n)}',
                    '--no_python', '--no_local_rank', *argv]  # fmt: skip
        if launcher == 'deepspeed-runner':
            ds = str(Path(self.peer_py['deepspeed']).parent / 'deepspeed')
            return [ds, '--num_gpus', str(n), '--no_python', *argv]
        raise ValueError(launcher)


def world_info(n: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({'localhost': list(range(n))}).encode()).decode()


def build_tools(tools: Path) -> None:
    tools.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get('CC', 'cc')
    for name in ('floor', 'rankprog'):
        subprocess.run([cc, '-O2', '-Wall', '-o', str(tools / name), str(BENCHES / f'{name}.c')], check=True)


def find_peers(env: Env) -> None:
    bench_py = ROOT / '.bench-venv' / 'bin' / 'python'
    probe = {
        'torchrun': 'import torch.distributed.run',
        'deepspeed': 'import deepspeed.launcher.launch, deepspeed; assert deepspeed.__version__ == "0.19.8"',
    }
    for name, code in probe.items():
        candidates = [bench_py]
        if env.quick and name == 'torchrun':
            candidates.append(env.dslaunch_py)  # quick mode: .venv's torch will do
        for py in candidates:
            if py.exists() and subprocess.run([str(py), '-c', code], capture_output=True, check=False).returncode == 0:
                env.peer_py[name] = str(py)
                break
        else:
            why = ROOT / '.bench-venv' / '.deepspeed-missing'
            env.missing[name] = (why.read_text().strip() if name == 'deepspeed' and why.exists()
                                 else f'not importable from {bench_py} (run benches/setup_peers.sh)')  # fmt: skip


# ----------------------------------------------------------------------------------------------
# scenarios; each returns a list of trial records (dicts)


Record = dict[str, Any]


def interleaved(
    env: Env, rng: random.Random, reps: int, launchers: Sequence[str] | None = None
) -> Iterable[tuple[int, str]]:
    names = list(launchers or env.launchers)
    for rep in range(reps):
        rng.shuffle(names)
        for name in names:
            yield rep, name


def progress(msg: str) -> None:
    print(f'  {time.strftime("%H:%M:%S")} {msg}', file=sys.stderr, flush=True)


def timeout_for(launcher: str, n: int) -> float:
    return 120.0 + n * (0.2 if launcher in ('torchrun', 'deepspeed') else 0.05)


def scen_noop(env: Env, ns: Sequence[int], reps: int, rng: random.Random) -> list[Record]:
    out = []
    workloads = {'true': ['/bin/true'], 'python': [env.rank_python, '-c', 'pass']}
    for wl, argv in workloads.items():
        for n in ns[:1] if (env.quick and wl == 'python') else ns:
            for rep, name in interleaved(env, rng, reps if wl == 'true' else min(reps, 3)):
                t = Trial(env.command(name, n, argv), env.env_for(name))
                t.start()
                o = t.wait(timeout_for(name, n))
                left = t.finish()
                out.append({'scenario': f'noop-{wl}', 'n': n, 'launcher': name, 'rep': rep, 'wall': o.wall,
                                'returncode': o.returncode, 'survivors': left, 'maxrss_kb': o.maxrss_kb,
                                'error': None if o.returncode == 0 else o.stderr[-800:]})  # fmt: skip
                progress(f'noop-{wl} n={n} {name}: {fmt_s(o.wall)} rc={o.returncode}')
    return out


def scen_failure(env: Env, ns: Sequence[int], reps: int, rng: random.Random, tmp: Path) -> list[Record]:
    out = []
    for n in ns:
        for rep, name in interleaved(env, rng, reps):
            ts = tmp / f'fail-{n}-{rep}-{name}.ts'
            ts.unlink(missing_ok=True)
            t = Trial(env.command(name, n, [env.rankprog, 'fail', n - 1, '0.2', '3', ts]), env.env_for(name))
            t.start()
            o = t.wait(timeout_for(name, n))
            at_exit = len(tagged_pids(t.tag))
            time.sleep(0.0 if at_exit == 0 else 1.0)
            after_1s = len(tagged_pids(t.tag)) if at_exit else 0
            left = t.finish()
            fail_t = float(ts.read_text()) if ts.exists() else None
            lat = None if (o.end is None or fail_t is None) else o.end - fail_t
            out.append({'scenario': 'failure', 'n': n, 'launcher': name, 'rep': rep, 'wall': o.wall, 'latency': lat,
                            'returncode': o.returncode, 'survivors': at_exit, 'survivors_1s': after_1s, 'swept': left,
                            'maxrss_kb': o.maxrss_kb, 'error': None if o.returncode == 3 else o.stderr[-800:]})  # fmt: skip
            progress(f'failure n={n} {name}: latency {fmt_s(lat)} rc={o.returncode} survivors={at_exit}')
    return out


def wait_ranks(t: Trial, env: Env, want: int, timeout: float) -> list[int]:
    """Polls until `want` rank processes (rankprog) of the trial are up; returns the tagged pids."""
    deadline = time.monotonic() + timeout
    rp = str(env.rankprog)
    while True:
        pids = tagged_pids(t.tag)
        if sum(1 for p in pids if exe_of(p) == rp) >= want or time.monotonic() > deadline:
            return pids
        if t.proc.poll() is not None:
            return pids
        time.sleep(0.05)


def scen_teardown(env: Env, ns: Sequence[int], reps: int, rng: random.Random) -> list[Record]:
    out = []
    for n in ns:
        # pyfloor and dslaunch-pyhost: reference lines for the SIGTERM teardown (what any launcher
        # hosted by a Python interpreter costs; dslaunch's job on its Python host), not launchers
        # of their own: no SIGKILL trial.
        references = ['pyfloor', 'dslaunch-pyhost']
        for rep, name in interleaved(env, rng, reps, [*env.launchers, *references]):
            # SIGTERM: time until the launcher, every rank and every grandchild are gone.
            t = Trial(env.command(name, n, [env.rankprog, 'tree']), env.env_for(name))
            t.start()
            pids = wait_ranks(t, env, 2 * n, timeout_for(name, n))
            t.note_run_ids()
            ready = sum(1 for p in pids if exe_of(p) == str(env.rankprog))
            t_sig = time.monotonic()
            os.kill(t.pid, signal.SIGTERM)
            o = t.wait(60.0)
            # whatever is still there 2 s after the launcher exited is a survivor
            gone_at, _alive = wait_gone(
                [p for p in pids if p != t.pid], 2.0 + max(0.0, (o.end or 0) - time.monotonic())
            )
            survivors = len(tagged_pids(t.tag))
            left = t.finish()
            all_gone = None if gone_at is None else max(gone_at, o.end or gone_at) - t_sig
            exit_t = None if o.end is None else o.end - t_sig
            out.append({'scenario': 'sigterm', 'n': n, 'launcher': name, 'rep': rep, 'ready': ready, 'wall': all_gone,
                            'launcher_exit': exit_t, 'returncode': o.returncode, 'survivors': survivors, 'swept': left,
                            'stderr_tail': o.stderr[-600:],
                            'error': None if ready == 2 * n else f'only {ready} of {2 * n} processes came up'})  # fmt: skip
            progress(f'sigterm n={n} {name}: all gone {fmt_s(all_gone)} launcher exit {fmt_s(exit_t)} '
                     f'rc={o.returncode} survivors={survivors}')  # fmt: skip
            if name in references:
                continue

            # SIGKILL: what is still running 1 s later.
            t = Trial(env.command(name, n, [env.rankprog, 'tree']), env.env_for(name))
            t.start()
            pids = wait_ranks(t, env, 2 * n, timeout_for(name, n))
            t.note_run_ids()
            ready = sum(1 for p in pids if exe_of(p) == str(env.rankprog))
            os.kill(t.pid, signal.SIGKILL)
            t.wait(10.0)
            time.sleep(1.0)
            orphans = len(tagged_pids(t.tag))
            left = t.finish()
            out.append({'scenario': 'sigkill', 'n': n, 'launcher': name, 'rep': rep, 'ready': ready, 'orphans_1s': orphans,
                            'swept': left, 'error': None if ready == 2 * n else f'only {ready} of {2 * n} came up'})  # fmt: skip
            progress(f'sigkill n={n} {name}: orphans after 1 s = {orphans}')
    return out


LINE_RE = re.compile(rb'^\[(\d+)\]: ')
PAYLOAD_CHARS = frozenset(b'RSX0123456789abcdefghijklmnopqrstuvwxyz ')


def check_lines(path: Path, ranks: int, lines: int) -> dict[str, int]:
    """Counts intact, lost, torn, duplicated and foreign (launcher chatter) lines."""
    seen = [bytearray(lines) for _ in range(ranks)]
    intact = torn = dup = foreign = mislabeled = 0
    with open(path, 'rb') as f:
        data = f.read()
    for line in data.split(b'\n'):
        if not line:
            continue
        tag = None
        m = LINE_RE.match(line)
        if m:
            tag = int(m.group(1))
            line = line[m.end() :]
        if len(line) == 99 and line[0:1] == b'R' and line[90:91] == b'X':
            try:
                rank, seq, crc = int(line[1:5]), int(line[7:14]), int(line[91:99], 16)
            except ValueError:
                rank = seq = crc = -1
            if zlib.crc32(line[:89]) == crc and 0 <= rank < ranks and 0 <= seq < lines:
                if tag is not None and tag != rank:
                    mislabeled += 1
                if seen[rank][seq]:
                    dup += 1
                else:
                    seen[rank][seq] = 1
                    intact += 1
                continue
        if not set(line) <= PAYLOAD_CHARS:
            foreign += 1  # a launcher's own message, not rank output
        else:
            torn += 1
    lost = ranks * lines - intact
    return {
        'intact': intact,
        'lost': lost,
        'torn': torn,
        'duplicated': dup,
        'mislabeled': mislabeled,
        'foreign': foreign,
    }


def scen_logmux(env: Env, ranks: int, lines: int, reps: int, rng: random.Random, tmp: Path) -> list[Record]:
    out = []
    writers = {
        'write-per-line': [env.rankprog, 'write', 'line', lines],
        'stdio-64k': [env.rankprog, 'write', 'stdio', lines],
        # -u as DeepSpeed runs Python ranks: print() is then two write(2)s, text and newline
        'python-print': [env.rank_python, '-u', BENCHES / 'writer_print.py', lines],
    }
    names = ['floor-file', 'floor', *[n for n in env.launchers if n != 'floor']]
    for kind, argv in writers.items():
        for rep, name in interleaved(env, rng, reps, names):
            path = tmp / 'mux.out'
            with open(path, 'wb') as f:
                cmd = env.command(name, ranks, argv, mux=(name == 'floor'))
                t = Trial(cmd, env.env_for(name), stdout=f)
                t.start()
                o = t.wait(300.0)
            left = t.finish()
            check = check_lines(path, ranks, lines)
            size = path.stat().st_size
            path.unlink()
            label = {'floor': 'floor-mux', 'floor-file': 'file'}.get(name, name)
            out.append(dict(scenario=f'logmux-{kind}', n=ranks, lines=lines, launcher=label, rep=rep, wall=o.wall,
                            returncode=o.returncode, bytes=size, survivors=left, maxrss_kb=o.maxrss_kb, **check,
                            error=None if o.returncode == 0 else o.stderr[-800:]))  # fmt: skip
            progress(f'logmux {kind} {label}: {fmt_s(o.wall)} lost={check["lost"]} torn={check["torn"]}')
    return out


class RssSampler(threading.Thread):
    """Polls the launcher's VmHWM and its non-rank children's (helpers, e.g. dslaunch's orphan
    guard) every 10 ms until the launcher is gone."""

    def __init__(self, pid: int, rank_exe: str) -> None:
        super().__init__(daemon=True)
        self.pid, self.rank_exe = pid, rank_exe
        self.hwm = 0
        self.helpers: dict[int, tuple[str, int]] = {}
        self.known_ranks: set[int] = set()
        self.first_seen: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            st = proc_status(self.pid)
            if not st:
                return
            launcher_exe = exe_of(self.pid)  # read each time: dslaunch execs its native host
            self.hwm = max(self.hwm, kb(st.get('VmHWM')))
            now = time.monotonic()
            for kid in children_of(self.pid):
                if kid in self.known_ranks:
                    continue
                exe = exe_of(kid)
                if exe == self.rank_exe:
                    self.known_ranks.add(kid)
                    continue
                # A child that still runs the launcher's own binary is, at first, a fork or vfork
                # about to exec a rank (it shares or copies the launcher's memory): a helper only
                # if it stays so for 200 ms.
                seen = self.first_seen.setdefault(kid, now)
                if exe == launcher_exe and now - seen < 0.2:
                    continue
                kst = proc_status(kid)
                if kst:
                    name, peak = self.helpers.get(kid, (kst.get('Name', '?'), 0))
                    self.helpers[kid] = (name, max(peak, kb(kst.get('VmHWM'))))
            time.sleep(0.01)


def scen_rss(env: Env, ns: Sequence[int], reps: int, rng: random.Random) -> list[Record]:
    out = []
    for n in ns:
        for rep, name in interleaved(env, rng, reps):
            # Every rank lives ~2 s, so all N are up at once while the launcher is watched.
            t = Trial(env.command(name, n, [env.rankprog, 'sleep', '2']), env.env_for(name))
            t.start()
            s = RssSampler(t.pid, str(env.rankprog))
            s.start()
            o = t.wait(timeout_for(name, n))
            s.stop.set()
            s.join()
            left = t.finish()
            launcher_kb = s.hwm  # not wait4's maxrss: it counts the harness's memory the fork shared before exec
            helpers_kb = sum(peak for _, peak in s.helpers.values())
            out.append({'scenario': 'rss', 'n': n, 'launcher': name, 'rep': rep, 'launcher_kb': launcher_kb, 'helpers_kb': helpers_kb,
                            'helpers': sorted({nm for nm, peak in s.helpers.values() if peak}), 'total_kb': launcher_kb + helpers_kb,
                            'wait4_maxrss_kb': o.maxrss_kb, 'returncode': o.returncode, 'survivors': left,
                            'wall': o.wall, 'error': None if o.returncode == 0 else o.stderr[-800:]})  # fmt: skip
            progress(f'rss n={n} {name}: {launcher_kb / 1024:.1f} MB + helpers {helpers_kb / 1024:.1f} MB')
    return out


def scen_startup(env: Env, reps: int, rng: random.Random) -> list[Record]:
    names = ['floor', 'dslaunch', 'dslaunch-node', *env.extra]
    if 'deepspeed' in env.peer_py:
        names += ['deepspeed'] if env.quick else ['deepspeed-runner', 'deepspeed']
    if 'torchrun' in env.peer_py:
        names += ['torchrun']
    out = []
    for rep, name in interleaved(env, rng, reps, names):
        t = Trial(env.command(name, 1, ['/bin/true']), env.env_for(name))
        t.start()
        o = t.wait(120.0)
        left = t.finish()
        out.append(
            {
                'scenario': 'startup',
                'n': 1,
                'launcher': name,
                'rep': rep,
                'wall': o.wall,
                'returncode': o.returncode,
                'survivors': left,
                'maxrss_kb': o.maxrss_kb,
                'error': None if o.returncode == 0 else o.stderr[-800:],
            }
        )
        progress(f'startup {name}: {fmt_s(o.wall)} rc={o.returncode}')
    return out


# ----------------------------------------------------------------------------------------------
# summary, tables, targets


def fmt_s(v: float | None) -> str:
    if v is None:
        return '—'
    return f'{v * 1000:.1f} ms' if v < 10 else f'{v:.2f} s'


def med(vals: Sequence[float]) -> float | None:
    return statistics.median(vals) if vals else None


def summarize(records: Sequence[Record], metric: str) -> dict[tuple[str, int, str], dict[str, Any]]:
    groups: dict[tuple[str, int, str], list[Record]] = {}
    for r in records:
        groups.setdefault((r['scenario'], r['n'], r['launcher']), []).append(r)
    out = {}
    for key, rs in groups.items():
        vals = [r[metric] for r in rs if r.get(metric) is not None]
        out[key] = {'median': med(vals), 'min': min(vals) if vals else None, 'max': max(vals) if vals else None,
                        'count': len(vals), 'trials': len(rs)}  # fmt: skip
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def fmt_ratio(v: float | None) -> str:
    return '—' if v is None else (f'{v:.2f}x' if v < 100 else f'{v:.0f}x')


def timing_table(records: Sequence[Record], scenario: str, metric: str, title: str, floor: str = 'floor',
                 extra: Callable[[list[Record]], str] | None = None, extra_head: str = '') -> str:  # fmt: skip
    rs = [r for r in records if r['scenario'] == scenario]
    if not rs:
        return ''
    summ = summarize(rs, metric)
    ns = sorted({r['n'] for r in rs})
    launchers = sorted({r['launcher'] for r in rs}, key=lambda name: order_key(name, floor))
    head = f'| N | launcher | median | min | max | vs {floor} | vs dslaunch |' + (f' {extra_head} |' if extra else '')
    lines = [f'**{title}**', '', head, '|' + '---|' * (head.count('|') - 1)]
    for n in ns:
        fl = summ.get((scenario, n, floor), {}).get('median')
        ds = summ.get((scenario, n, 'dslaunch'), {}).get('median')
        for name in launchers:
            s = summ.get((scenario, n, name))
            if not s:
                continue
            row = (f'| {n} | {name} | {fmt_s(s["median"])} | {fmt_s(s["min"])} | {fmt_s(s["max"])} | '
                   f'{fmt_ratio(ratio(s["median"], fl))} | {fmt_ratio(ratio(s["median"], ds))} |')  # fmt: skip
            if s['count'] < s['trials']:
                row = row.replace(f'| {name} |', f'| {name} ({s["trials"] - s["count"]} of {s["trials"]} untimed) |')
            if extra:
                row += f' {extra([r for r in rs if r["n"] == n and r["launcher"] == name])} |'
            lines.append(row)
    return '\n'.join(lines) + '\n'


def order_key(name: str, first: str = 'floor') -> tuple[int, str]:
    """Table order: the floor(s), dslaunch and its variants, then the peers."""
    order = [first, 'floor', 'pyfloor', 'file', 'floor-mux', 'dslaunch', 'dslaunch-pyhost', 'dslaunch+', 'dslaunch-node',
             'torchrun', 'deepspeed']  # fmt: skip
    for i, prefix in enumerate(order):
        if name == prefix or (prefix.endswith('+') and name.startswith(prefix)):
            return i, name
    return len(order), name


def _vals(rs: list[Record], key: str) -> str:
    vs = sorted({str(r.get(key)) for r in rs})
    return '/'.join(vs)


def render(results: dict[str, Any]) -> str:
    rec = results['trials']
    parts = [f'# dslaunch benchmark ({results["meta"]["mode"]}, {results["meta"]["date"]})', '']
    parts.append(timing_table(rec, 'noop-true', 'wall', '1a. launch to exit, N no-op ranks (/bin/true)'))
    parts.append(timing_table(rec, 'noop-python', 'wall', '1b. launch to exit, N `python -c pass` ranks'))
    parts.append(timing_table(rec, 'failure', 'latency',
                              '2. failure propagation: failing rank exit -> launcher exit (rank N-1 exits 3 after 0.2 s)',
                              extra=lambda rs: f'{_vals(rs, "returncode")} | {max(r["survivors"] for r in rs)}',
                              extra_head='exit status | survivors'))  # fmt: skip
    parts.append(timing_table(rec, 'sigterm', 'wall', '3a. SIGTERM to the launcher -> launcher, ranks and grandchildren gone',
                              extra=lambda rs: f'{_vals(rs, "returncode")} | {max(r["survivors"] for r in rs)}',
                              extra_head='exit status | survivors'))  # fmt: skip
    sk = [r for r in rec if r['scenario'] == 'sigkill']
    if sk:
        lines = ['**3b. SIGKILL to the launcher: processes of the job still running 1 s later (of 2N)**', '',
                 '| N | ' + ' | '.join(sorted({r['launcher'] for r in sk}, key=order_key)) + ' |']  # fmt: skip
        names = sorted({r['launcher'] for r in sk}, key=order_key)
        lines.append('|' + '---|' * (len(names) + 1))
        for n in sorted({r['n'] for r in sk}):
            cells = [str(max((r['orphans_1s'] for r in sk if r['n'] == n and r['launcher'] == nm), default='—'))
                     for nm in names]  # fmt: skip
            lines.append(f'| {n} | ' + ' | '.join(cells) + ' |')
        parts.append('\n'.join(lines) + '\n')
    for kind in ('write-per-line', 'stdio-64k', 'python-print'):
        parts.append(timing_table(rec, f'logmux-{kind}', 'wall', f'4. log multiplexing, writer {kind}', floor='floor-mux',
                                  extra=lambda rs: f'{max(r["lost"] for r in rs)} | {max(r["torn"] for r in rs)}',
                                  extra_head='lost | torn'))  # fmt: skip
    rss = [r for r in rec if r['scenario'] == 'rss']
    if rss:
        lines = [
            '**5. launcher peak RSS (launcher VmHWM + helpers), N ranks alive**',
            '',
            '| N | launcher | launcher MB | helpers MB | total MB | helpers |',
            '|---|---|---|---|---|---|',
        ]
        for n in sorted({r['n'] for r in rss}):
            for name in sorted({r['launcher'] for r in rss}, key=order_key):
                rs = [r for r in rss if r['n'] == n and r['launcher'] == name]
                if rs:
                    top = max(rs, key=lambda r: r['total_kb'])
                    lines.append(f'| {n} | {name} | {top["launcher_kb"] / 1024:.1f} | {top["helpers_kb"] / 1024:.1f} | '
                                 f'{top["total_kb"] / 1024:.1f} | {(top["helpers_kb"] and ", ".join(top["helpers"])) or "-"} |')  # fmt: skip
        parts.append('\n'.join(lines) + '\n')
    parts.append(timing_table(rec, 'startup', 'wall', '6. CLI start-up: one /bin/true rank'))
    parts.append(targets_table(results['targets']))
    if results['meta']['missing']:
        parts.append('Left out: ' + '; '.join(f'{k}: {v}' for k, v in results['meta']['missing'].items()) + '\n')
    return '\n'.join(p for p in parts if p)


def targets(rec: Sequence[Record]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured figure and met/missed (never asserted)."""

    def m(scen: str, n: int, name: str, metric: str = 'wall') -> float | None:
        return summarize([r for r in rec if r['scenario'] == scen], metric).get((scen, n, name), {}).get('median')

    def worst(scen: str, n: int, name: str, key: str) -> Any:
        vs = [r.get(key) for r in rec if r['scenario'] == scen and r['n'] == n and r['launcher'] == name]
        return max((v for v in vs if v is not None), default=None)

    out: list[dict[str, Any]] = []

    def add(what: str, measured: str, met: bool | None) -> None:
        out.append({'target': what, 'measured': measured, 'met': met})

    ns = sorted({r['n'] for r in rec if r['scenario'] == 'noop-true'})
    if ns:
        top = max(ns)
        r = ratio(m('noop-true', top, 'dslaunch'), m('noop-true', top, 'floor'))
        add(f'{top} no-op ranks within 1.3x of the floor', fmt_ratio(r), None if r is None else r <= 1.3)
        r = ratio(m('noop-true', 8, 'torchrun'), m('noop-true', 8, 'dslaunch'))
        add('8 ranks at least 25x faster than torchrun', f'{fmt_ratio(r)} faster', None if r is None else r >= 25)
    for n in sorted({r['n'] for r in rec if r['scenario'] == 'failure'}):
        d, f = m('failure', n, 'dslaunch', 'latency'), m('failure', n, 'floor', 'latency')
        codes = {
            r['returncode'] for r in rec if r['scenario'] == 'failure' and r['n'] == n and r['launcher'] == 'dslaunch'
        }
        surv = worst('failure', n, 'dslaunch', 'survivors')
        if d is None or f is None:
            add(f'failure propagation N={n}', '—', None)
            continue
        if n <= 256:
            ok, what = d <= f + 0.020, f'{fmt_s(d)} vs floor {fmt_s(f)} + 20 ms'
        else:
            ok, what = d <= 1.3 * f, f'{fmt_ratio(d / f)} of floor ({fmt_s(d)} vs {fmt_s(f)})'
        add(
            f'failure propagation N={n}: time, exit status 3, 0 survivors',
            f'{what}; exit {"/".join(map(str, sorted(codes, key=str)))}; survivors {surv}',
            ok and codes == {3} and surv == 0,
        )
    for n in sorted({r['n'] for r in rec if r['scenario'] == 'sigterm'}):
        r = ratio(m('sigterm', n, 'dslaunch'), m('sigterm', n, 'floor'))
        surv = worst('sigterm', n, 'dslaunch', 'survivors')
        add(
            f'SIGTERM teardown N={n} within 1.5x of the floor, 0 survivors',
            f'{fmt_ratio(r)}, survivors {surv}',
            None if r is None else (r <= 1.5 and surv == 0),
        )
        r = ratio(m('sigterm', n, 'pyfloor'), m('sigterm', n, 'floor'))
        if r is not None:
            add(f'(reference, not a target) SIGTERM teardown N={n}: the Python floor (pyfloor) vs the floor',
                fmt_ratio(r), None)  # fmt: skip
        r = ratio(m('sigterm', n, 'dslaunch-pyhost'), m('sigterm', n, 'floor'))
        if r is not None:
            add(f'(reference, not a target) SIGTERM teardown N={n}: dslaunch on its Python host '
                '(DSLAUNCH_NATIVE_HOST=0) vs the floor', fmt_ratio(r), None)  # fmt: skip
    for n in sorted({r['n'] for r in rec if r['scenario'] == 'sigkill'}):
        o = worst('sigkill', n, 'dslaunch', 'orphans_1s')
        add(f'SIGKILL N={n}: 0 left after 1 s', str(o), None if o is None else o == 0)
    for kind in ('write-per-line', 'stdio-64k', 'python-print'):
        sc = f'logmux-{kind}'
        ns = sorted({r['n'] for r in rec if r['scenario'] == sc})
        for n in ns:
            r = ratio(m(sc, n, 'dslaunch'), m(sc, n, 'floor-mux'))
            lost, torn = worst(sc, n, 'dslaunch', 'lost'), worst(sc, n, 'dslaunch', 'torn')
            add(
                f'log mux ({kind}) within 1.5x of the C floor, 0 lost, 0 torn',
                f'{fmt_ratio(r)}, lost {lost}, torn {torn}',
                None if r is None else (r <= 1.5 and lost == 0 and torn == 0),
            )
    rss = [r for r in rec if r['scenario'] == 'rss' and r['launcher'] == 'dslaunch']
    if rss:
        top = max(r['n'] for r in rss)
        mb = max(r['total_kb'] for r in rss if r['n'] == top) / 1024
        add(f'launcher RSS < 30 MB at N={top} (launcher + orphan guard)', f'{mb:.1f} MB', mb < 30)
    return out


def targets_table(ts: Sequence[dict[str, Any]]) -> str:
    if not ts:
        return ''
    lines = ['**Targets (reported, never asserted)**', '', '| target | measured | met |', '|---|---|---|']
    for t in ts:
        lines.append(
            f'| {t["target"]} | {t["measured"]} | {"—" if t["met"] is None else ("yes" if t["met"] else "NO")} |'
        )
    return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------------------------


def versions(env: Env) -> dict[str, str]:
    out = {'python': platform.python_version(), 'kernel': platform.release(), 'cpus': str(os.cpu_count())}
    import hashlib

    for so in sorted((ROOT / 'python' / 'dslaunch').glob('_core*.so')):
        out['dslaunch_core_sha256'] = hashlib.sha256(so.read_bytes()).hexdigest()[:16]
    head = subprocess.run(
        ['git', '-C', str(ROOT), 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, check=False
    )
    out['git_head'] = head.stdout.strip() or '?'
    cc = subprocess.run([os.environ.get('CC', 'cc'), '--version'], capture_output=True, text=True, check=False)
    out['cc'] = cc.stdout.splitlines()[0] if cc.returncode == 0 else '?'
    code = 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))'
    for name, py, dist in (('dslaunch', str(env.dslaunch_py), 'dslaunch'), ('torch', env.peer_py.get('torchrun'), 'torch'),
                           ('deepspeed', env.peer_py.get('deepspeed'), 'deepspeed')):  # fmt: skip
        if py:
            p = subprocess.run([py, '-c', code, dist], capture_output=True, text=True, check=False)
            out[name] = p.stdout.strip() or '?'
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true', help='N up to 64, one repetition, small log test (CI smoke)')
    ap.add_argument('--reps', type=int, default=None, help='repetitions (default 5 full, 1 quick)')
    ap.add_argument('--ns', default=None, help='rank counts, e.g. 8,64,256,1024')
    ap.add_argument('--only', default='', help='scenarios: noop,failure,teardown,logmux,rss,startup')
    ap.add_argument('--out', default=None, help='JSON results file (default bench-results/bench-<time>.json)')
    ap.add_argument('--seed', type=int, default=1)
    ap.add_argument('--extra-dslaunch', action='append', default=[], metavar='NAME=PYTHONPATH',
                    help='also run another dslaunch build (its package dir first on PYTHONPATH) as dslaunch+NAME')  # fmt: skip
    ap.add_argument('--no-plot', action='store_true')
    ap.add_argument('--launchers', default='', help='only these of floor,dslaunch,torchrun,deepspeed')
    ap.add_argument('--render', metavar='JSON', help='only print the tables of an earlier results file')
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        saved['targets'] = targets(saved['trials'])
        print(render(saved))
        return 0

    quick = args.quick
    reps = args.reps or (1 if quick else 5)
    ns = [int(x) for x in args.ns.split(',')] if args.ns else ([8, 64] if quick else [8, 64, 256, 1024])
    only = set(args.only.split(',')) if args.only else {'noop', 'failure', 'teardown', 'logmux', 'rss', 'startup'}
    mux_ranks, mux_lines = (64, 1000) if quick else (64, 20000)
    rss_ns = [n for n in ns if n >= 256] or [max(ns)]

    shm = Path('/dev/shm')
    tmp = Path(tempfile.mkdtemp(prefix='dslaunch-bench-', dir=shm if os.access(shm, os.W_OK) else None))
    env = Env(quick=quick, tools=tmp / 'bin')
    build_tools(env.tools)
    # Python ranks run a bare venv of the base interpreter: no site-packages .pth files of this
    # machine (a sandbox CA hook there costs 40 ms per start), the same for every launcher.
    base_py = os.path.realpath(getattr(sys, '_base_executable', sys.executable))
    subprocess.run([base_py, '-m', 'venv', '--without-pip', str(env.tools / 'rankpy')], check=True)
    env.rank_python = str(env.tools / 'rankpy' / 'bin' / 'python')
    if not env.dslaunch.exists():
        print(f'{env.dslaunch} missing: run `make install` first', file=sys.stderr)
        return 2
    find_peers(env)
    # Byte-compile dslaunch as an install would: an editable install under
    # PYTHONDONTWRITEBYTECODE=1 (as on this machine) otherwise compiles its edited modules
    # from source at every start (15 ms), which no user's install does. The peers' packages
    # were byte-compiled by pip.
    compile_pkg = 'import compileall, os, dslaunch; compileall.compile_dir(os.path.dirname(dslaunch.__file__), quiet=1)'
    subprocess.run([str(env.dslaunch.parent / 'python'), '-c', compile_pkg], check=False)
    # The --extra-dslaunch builds too, found the way their launcher finds them (a copied tree's
    # bytecode is stale, and would be ignored).
    for spec in args.extra_dslaunch:
        path = os.path.abspath(spec.partition('=')[2])
        subprocess.run([str(env.dslaunch.parent / 'python'), '-c', compile_pkg], env=dict(os.environ, PYTHONPATH=path),
                       check=False)  # fmt: skip
    drop = ('DSLAUNCH_', 'VIRTUAL_ENV', 'PYTHONUNBUFFERED', 'PYTHONPATH', 'OMP_NUM_THREADS')
    env.base_env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.base_env['PATH'] = '/usr/local/bin:/usr/bin:/bin'
    env.base_env.setdefault('HOME', '/root')
    if args.launchers:
        keep = set(args.launchers.split(','))
        env.missing.update({name: 'left out by --launchers' for name in LAUNCHERS if name not in keep})
    for spec in args.extra_dslaunch:
        name, _, path = spec.partition('=')
        env.extra[f'dslaunch+{name}'] = os.path.abspath(path)
    env.versions = versions(env)
    for name, why in env.missing.items():
        print(f'NOTE: {name} left out: {why}', file=sys.stderr)

    global REAPER
    if Reaper.become_subreaper():
        REAPER = Reaper()
        REAPER.start()
    subreaper = REAPER is not None
    rng = random.Random(args.seed)
    load0 = os.getloadavg()
    t_start = time.time()
    records: list[Record] = []
    print(f'bench: mode={"quick" if quick else "full"} ns={ns} reps={reps} launchers={env.launchers}', file=sys.stderr)
    try:
        if 'startup' in only:
            records += scen_startup(env, reps, rng)
        if 'noop' in only:
            records += scen_noop(env, ns, reps, rng)
        if 'failure' in only:
            records += scen_failure(env, ns, max(1, reps if quick else min(reps, 3)), rng, tmp)
        if 'teardown' in only:
            records += scen_teardown(env, ns[-1:] if quick else ns, max(1, reps if quick else min(reps, 3)), rng)
        if 'logmux' in only:
            records += scen_logmux(env, mux_ranks, mux_lines, max(1, reps if quick else min(reps, 3)), rng, tmp)
        if 'rss' in only:
            records += scen_rss(env, rss_ns, 1 if quick else 2, rng)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if REAPER is not None:
            REAPER.stop()
            REAPER = None

    results: dict[str, Any] = {
        'meta': {'mode': 'quick' if quick else 'full', 'date': time.strftime('%Y-%m-%d %H:%M:%S %z'), 'ns': ns, 'reps': reps,
                     'seconds': round(time.time() - t_start, 1), 'loadavg_start': load0, 'loadavg_end': os.getloadavg(),
                     'versions': env.versions, 'subreaper': subreaper, 'launchers': env.launchers, 'missing': env.missing, 'rank_python': env.rank_python,
                     'logmux': {'ranks': mux_ranks, 'lines': mux_lines, 'line_bytes': 100},
                     'commands': {name: env.command(name, 8, ['PROG']) for name in
                               ['floor', 'dslaunch', 'dslaunch-node', *env.peer_py, *(['deepspeed-runner'] if 'deepspeed' in env.peer_py else [])]}},
        'trials': records,
    }  # fmt: skip
    results['targets'] = targets(records)
    out = (
        Path(args.out)
        if args.out
        else ROOT / 'bench-results' / f'bench-{"quick" if quick else "full"}-{time.strftime("%Y%m%d-%H%M%S")}.json'
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    table = render(results)
    out.with_suffix('.md').write_text(table)
    print(table)
    print(f'results: {out} (and {out.with_suffix(".md").name}); {results["meta"]["seconds"]} s', file=sys.stderr)

    if not args.no_plot:
        plot_py = ROOT / '.bench-venv' / 'bin' / 'python'
        if plot_py.exists():
            subprocess.run(
                [str(plot_py), str(BENCHES / 'plot.py'), str(out), str(out.with_suffix('.png'))], check=False
            )
    # The smoke check: the harness ran and dslaunch and the floor produced a result everywhere.
    missing = [s for s in {r['scenario'] for r in records}
               for name in ('dslaunch',) if not any(r['scenario'] == s and r['launcher'] == name for r in records)]  # fmt: skip
    if not records or missing:
        print(f'bench: no results for {missing or "anything"}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
