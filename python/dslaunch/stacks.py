"""Python stacks of a job's ranks, grouped so identical stacks collapse, and `dslaunch stacks <job>`.

Stacks come from py-spy (`py-spy dump --json --pid PID`): it reads the rank's memory from outside
(ptrace), pausing it for a moment; the rank goes on afterwards. Without py-spy, or where it may not
read other processes, every rank is still shown with its state and CPU time, and a note says why
the stacks are missing. The hang watchdog (`hang.py`) and `dslaunch stacks` both use this module.

A job is found through `/proc`: every process of a job carries `DSLAUNCH_RUN_ID=<job id>` in its
environment; its ranks are the marked processes whose parent is not marked with the same id.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

RUN_ID_VAR = 'DSLAUNCH_RUN_ID'
#: Seconds one `py-spy dump` may take before it is given up.
DUMP_TIMEOUT_S = 20.0
#: Rank states from /proc/<pid>/stat, in words.
STATE_NAMES = {
    'R': 'running', 'S': 'sleeping', 'D': 'disk sleep', 'T': 'stopped', 't': 'traced', 'Z': 'zombie',
    'X': 'dead', 'I': 'idle',
}


@dataclass(frozen=True)
class Frame:
    """One Python frame: function name, file, line."""

    name: str
    filename: str
    line: int
    short: str = field(default='', compare=False)  # py-spy's package-relative name, for display

    def render(self) -> str:
        return f'{self.name} ({self.short or self.filename}:{self.line})'

    def to_dict(self) -> dict[str, object]:
        return {'name': self.name, 'filename': self.filename, 'line': self.line}


@dataclass
class RankStack:
    """What is known about one rank's process: its main thread's stack (innermost frame first)."""

    rank: int | str
    pid: int
    state: str | None = None
    cpu_time: float | None = None
    frames: list[Frame] = field(default_factory=list)
    threads: int = 0
    stack_pid: int | None = None  # the process py-spy read (the rank, or its Python child)
    error: str | None = None

    @property
    def state_text(self) -> str:
        if self.state is None:
            return 'gone'
        return f'{self.state} ({STATE_NAMES.get(self.state, "?")})'


@dataclass
class StackGroup:
    """Ranks with identical stacks (or the same reason for having none)."""

    ranks: list[RankStack]
    frames: list[Frame]
    summary: str

    @property
    def labels(self) -> list[int | str]:
        return [r.rank for r in self.ranks]


# ---- reading processes ---------------------------------------------------------------------------


def proc_state(pid: int) -> tuple[str | None, float | None]:
    """The state letter and CPU time (user + system, seconds) of `pid`; (None, None) if it is gone."""
    try:
        with open(f'/proc/{pid}/stat', 'rb') as f:
            fields = f.read().rsplit(b')', 1)[1].split()
    except (OSError, IndexError):
        return None, None
    ticks = os.sysconf('SC_CLK_TCK')
    return fields[0].decode(), (int(fields[11]) + int(fields[12])) / ticks


def read_environ(pid: int) -> dict[str, str] | None:
    try:
        with open(f'/proc/{pid}/environ', 'rb') as f:
            raw = f.read()
    except OSError:
        return None
    env: dict[str, str] = {}
    for entry in raw.split(b'\0'):
        key, sep, value = entry.partition(b'=')
        if sep:
            env[key.decode(errors='replace')] = value.decode(errors='replace')
    return env


def parent_of(pid: int) -> int | None:
    try:
        with open(f'/proc/{pid}/stat', 'rb') as f:
            return int(f.read().rsplit(b')', 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def children_of(pid: int) -> list[int]:
    """Direct and indirect children of `pid` (breadth first)."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir('/proc'):
        if name.isdigit():
            ppid = parent_of(int(name))
            if ppid is not None:
                parents.setdefault(ppid, []).append(int(name))
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = sorted(parents.get(todo.pop(0), []))
        out.extend(kids)
        todo.extend(kids)
    return out


# ---- py-spy ---------------------------------------------------------------------------------------


def py_spy_path() -> str | None:
    """py-spy next to our interpreter (the venv's bin, which need not be on PATH), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), 'py-spy')
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which('py-spy')


MISSING_PY_SPY = 'py-spy is not installed (pip install py-spy): no Python stacks, only process states'


def _spy(tool: str, pid: int) -> tuple[list[dict[str, Any]] | None, str | None]:
    try:
        proc = subprocess.run([tool, 'dump', '--json', '--pid', str(pid)], capture_output=True, text=True,
                              timeout=DUMP_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return None, f'py-spy took more than {DUMP_TIMEOUT_S:.0f} s'
    except OSError as e:
        return None, f'cannot run py-spy: {e.strerror or e}'
    if proc.returncode == 0:
        try:
            threads = json.loads(proc.stdout)
        except ValueError:
            return None, 'py-spy printed no JSON'
        return (threads if isinstance(threads, list) else None), None
    msg = ' '.join((proc.stderr or proc.stdout).split())
    if 'ermission' in msg or 'ptrace' in msg.lower():
        msg = f'py-spy may not read pid {pid} (run as root, or allow ptrace: kernel.yama.ptrace_scope=0): {msg}'
    return None, msg or f'py-spy exited with {proc.returncode}'


def _main_thread(threads: list[dict[str, Any]], pid: int) -> dict[str, Any] | None:
    for t in threads:
        if t.get('os_thread_id') == pid or t.get('thread_name') == 'MainThread':
            return t
    return threads[0] if threads else None


def dump_one(tool: str | None, rank: int | str, pid: int) -> RankStack:
    """State, CPU time and (with py-spy) the main thread's stack of one rank. A rank that is not a
    Python process itself (a shell, numactl wrapper or --no_python program) is searched for its
    first Python descendant."""
    state, cpu = proc_state(pid)
    rs = RankStack(rank=rank, pid=pid, state=state, cpu_time=cpu)
    if state is None:
        rs.error = 'the process is gone'
        return rs
    if tool is None:
        rs.error = MISSING_PY_SPY
        return rs
    threads, error = _spy(tool, pid)
    spied = pid
    if threads is None and error is not None and 'ermission' not in error:
        for child in children_of(pid)[:8]:
            threads, _ = _spy(tool, child)
            if threads is not None:
                spied, error = child, None
                break
    if threads is None:
        rs.error = error
        return rs
    rs.stack_pid = spied
    rs.threads = len(threads)
    main = _main_thread(threads, spied)
    if main is not None:
        rs.frames = [Frame(str(f.get('name')), str(f.get('filename')), int(f.get('line') or 0),
                           str(f.get('short_filename') or ''))
                     for f in main.get('frames') or []]
    if not rs.frames:
        rs.error = 'no Python frame in the main thread'
    return rs


def collect(targets: Sequence[tuple[int | str, int]], *, tool: str | None = None, missing_ok: bool = True,
            workers: int = 8) -> list[RankStack]:
    """Dumps every (rank, pid) in parallel (at most `workers` py-spy at a time), in rank order."""
    spy = tool if tool is not None else py_spy_path()
    if not targets:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(targets)))) as pool:
        return list(pool.map(lambda t: dump_one(spy, t[0], t[1]), targets))


# ---- grouping and rendering -----------------------------------------------------------------------


def is_library(filename: str) -> bool:
    """Frames of the standard library and installed packages (not the user's code)."""
    return ('/site-packages/' in filename or '/dist-packages/' in filename or '/lib/python3' in filename
            or filename.startswith('<frozen'))


def summarize(frames: Sequence[Frame]) -> str:
    """One line for a stack: `barrier at train.py:88` (a library call made from the user's line)
    or `data.py:40 in next_batch` (stuck in the user's own code)."""
    if not frames:
        return 'no Python stack'
    user = next((i for i, f in enumerate(frames) if not is_library(f.filename)), 0)
    f = frames[user]
    where = f'{os.path.basename(f.filename)}:{f.line}'
    if user == 0:
        return f'{where} in {f.name}'
    return f'{frames[0].name} at {where}'


def rank_label(ranks: Iterable[int | str]) -> str:
    """`rank 7`, `ranks 0-6,8-15` (numeric ranks as ranges)."""
    from dslaunch.report import rank_ranges

    items = list(ranks)
    nums = [r for r in items if isinstance(r, int)]
    text = rank_ranges(nums) if len(nums) == len(items) else ','.join(str(r) for r in items)
    return ('ranks ' if len(items) > 1 else 'rank ') + text


def group(stacks: Sequence[RankStack]) -> list[StackGroup]:
    """Ranks with identical main-thread stacks (or the same error) together, in order of their
    first rank."""
    groups: dict[tuple[object, ...], StackGroup] = {}
    for s in stacks:
        key: tuple[object, ...] = tuple(s.frames) if s.frames else ('error', s.error)
        g = groups.get(key)
        if g is None:
            summary = summarize(s.frames) if s.frames else (s.error or 'no Python stack')
            groups[key] = StackGroup([s], list(s.frames), summary)
        else:
            g.ranks.append(s)
    return list(groups.values())


def odd_ones_out(groups: Sequence[StackGroup]) -> list[int | str]:
    """The ranks whose stack differs from a majority's: the likely cause of a hang in a collective
    (every other rank waits for them). Empty when no stack holds a majority."""
    total = sum(len(g.ranks) for g in groups)
    with_stacks = [g for g in groups if g.frames]
    if len(with_stacks) < 2:
        return []
    biggest = max(with_stacks, key=lambda g: len(g.ranks))
    if 2 * len(biggest.ranks) <= total:
        return []
    return [r.rank for g in with_stacks if g is not biggest for r in g.ranks]


def _cpu_range(ranks: Sequence[RankStack]) -> str:
    cpus = [r.cpu_time for r in ranks if r.cpu_time is not None]
    if not cpus:
        return 'cpu ?'
    lo, hi = min(cpus), max(cpus)
    return f'cpu {lo:.1f} s' if hi - lo < 0.05 else f'cpu {lo:.1f}-{hi:.1f} s'


def render_groups(groups: Sequence[StackGroup], *, details: dict[int | str, str] | None = None,
                  indent: str = '    ') -> list[str]:
    """The grouped stacks as console lines: a header per group (ranks, where, state, CPU time),
    then its frames, innermost first. `details` adds a line per rank of small groups."""
    lines: list[str] = []
    for g in groups:
        states = sorted({r.state_text for r in g.ranks})
        lines.append(f'dslaunch: {rank_label(g.labels)}: {g.summary}  [{", ".join(states)}; {_cpu_range(g.ranks)}]')
        for f in g.frames:
            lines.append(f'{indent}{f.render()}')
        if details and len(g.ranks) <= 4:
            for r in g.ranks:
                if r.rank in details:
                    lines.append(f'{indent}rank {r.rank}: {details[r.rank]}')
    return lines


def stacks_note(stacks: Sequence[RankStack]) -> str | None:
    """Why stacks are missing, once (not per rank)."""
    errors = {s.error for s in stacks if s.error and not s.frames}
    if MISSING_PY_SPY in errors:
        return MISSING_PY_SPY
    if errors and all(not s.frames for s in stacks):
        return min(errors)
    return None


# ---- finding a running job ------------------------------------------------------------------------


class JobNotFound(Exception):
    """No running job matches what the user gave."""


@dataclass
class Job:
    """A running job's ranks (label, pid) in rank order, and its id(s)."""

    run_ids: list[str]
    ranks: list[tuple[int | str, int]]
    launcher_pid: int | None


def _marked() -> dict[int, tuple[str, int | None, dict[str, str]]]:
    """Every live process carrying a job id: pid -> (job id, parent pid, environment)."""
    found: dict[int, tuple[str, int | None, dict[str, str]]] = {}
    me = os.getpid()
    for name in os.listdir('/proc'):
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        env = read_environ(pid)
        if not env or RUN_ID_VAR not in env:
            continue
        state, _ = proc_state(pid)
        if state in (None, 'Z', 'X'):
            continue
        found[pid] = (env[RUN_ID_VAR], parent_of(pid), env)
    return found


def _rank_of(env: dict[str, str]) -> int | str | None:
    for key in ('RANK', 'LOCAL_RANK'):
        value = env.get(key, '')
        if value.isdigit():
            return int(value)
    return None


def _ranks_of(marked: dict[int, tuple[str, int | None, dict[str, str]]], run_ids: set[str],
              under: int | None = None) -> list[tuple[int | str, int]]:
    """The top processes of the given jobs (their parent is not of the same job), optionally only
    those descending from `under`."""
    tops = [pid for pid, (rid, ppid, _) in marked.items()
            if rid in run_ids and not (ppid in marked and marked[ppid][0] == rid)]
    if under is not None:
        below = set(children_of(under))
        tops = [p for p in tops if p in below]
    tops.sort()
    labelled: list[tuple[int | str, int]] = []
    for i, pid in enumerate(tops):
        rank = _rank_of(marked[pid][2])
        labelled.append((rank if rank is not None else i, pid))
    labelled.sort(key=lambda t: (isinstance(t[0], str), t[0] if isinstance(t[0], int) else 0, str(t[0])))
    return labelled


def find_job(job: str, *, pid_dir: str = '/tmp') -> Job:
    """`job`: the job id the launcher printed (or a unique prefix of it, 4 characters at least),
    the launcher's pid, or the pid given to `--save_pid` (its `/tmp/<pid>.deepspeed` names the
    launcher). A job id is hex, so a number may be either: it is a pid if that finds a job, else
    a job id (prefix)."""
    marked = _marked()
    if job.isdigit():
        try:
            return _job_of_pid(int(job), marked, pid_dir)
        except JobNotFound:
            if not any(rid.startswith(job) for rid, _, _ in marked.values()):
                raise
    return _job_of_id(job, marked)


def _job_of_pid(pid: int, marked: dict[int, tuple[str, int | None, dict[str, str]]], pid_dir: str) -> Job:
    launcher = pid
    pid_file = os.path.join(pid_dir, f'{pid}.deepspeed')
    try:
        with open(pid_file, encoding='ascii') as f:
            launcher = int(f.read().strip())
    except (OSError, ValueError):
        pass
    if pid in marked and launcher == pid:  # a rank's (or its child's) own pid: its job
        rid = marked[pid][0]
        return Job([rid], _ranks_of(marked, {rid}), None)
    if not os.path.exists(f'/proc/{launcher}'):
        raise JobNotFound(f'no process {launcher}' + (f' (from {pid_file})' if launcher != pid else ''))
    below = set(children_of(launcher))
    run_ids = {marked[p][0] for p in below if p in marked}
    if not run_ids:
        raise JobNotFound(f'process {launcher} runs no dslaunch job')
    return Job(sorted(run_ids), _ranks_of(marked, run_ids, under=launcher), launcher)


def _job_of_id(job: str, marked: dict[int, tuple[str, int | None, dict[str, str]]]) -> Job:
    ids = {rid for rid, _, _ in marked.values()}
    if job in ids:
        chosen = {job}
    else:
        chosen = {rid for rid in ids if len(job) >= 4 and rid.startswith(job)}
        if len(chosen) > 1:
            raise JobNotFound(f'job id {job!r} is ambiguous: {", ".join(sorted(chosen))}')
    if not chosen:
        raise JobNotFound(f'no running dslaunch job {job!r}')
    ranks = _ranks_of(marked, chosen)
    return Job(sorted(chosen), ranks, parent_of(ranks[0][1]) if ranks else None)


# ---- `dslaunch stacks <job>` ----------------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
    """`dslaunch stacks <job>`: prints the grouped Python stacks of a running job's ranks."""
    p = argparse.ArgumentParser(
        prog='dslaunch stacks',
        description="Print the Python stacks of a running job's ranks (py-spy), identical stacks grouped. "
        'The job keeps running.',
    )
    p.add_argument('job', help='the job id dslaunch printed at start, the launcher pid, or the --save_pid pid')
    p.add_argument('--json', action='store_true', help='print JSON (every rank, its state, CPU time and frames)')
    args = p.parse_args(list(argv))
    try:
        job = find_job(args.job)
    except JobNotFound as e:
        print(f'dslaunch stacks: error: {e} (give the job id dslaunch printed at start, the launcher pid, '
              'or the pid given to --save_pid)', file=sys.stderr)
        return 1
    if not job.ranks:
        print(f'dslaunch stacks: error: job {",".join(job.run_ids)} has no running rank', file=sys.stderr)
        return 1
    stacks = collect(job.ranks)
    groups = group(stacks)
    note = stacks_note(stacks)
    if args.json:
        doc = {'run_ids': job.run_ids, 'launcher_pid': job.launcher_pid, 'note': note,
               'groups': [group_dict(g) for g in groups], 'ranks': [rank_stack_dict(s) for s in stacks]}
        print(json.dumps(doc, indent=1))
    else:
        where = f', launcher pid {job.launcher_pid}' if job.launcher_pid else ''
        print(f'dslaunch: job {",".join(job.run_ids)}: {len(stacks)} rank(s){where}; identical stacks grouped')
        if note:
            print(f'dslaunch: {note}')
        for line in render_groups(groups):
            print(line)
    return 0 if any(s.frames for s in stacks) else 1


def rank_stack_dict(s: RankStack) -> dict[str, object]:
    return {'rank': s.rank, 'pid': s.pid, 'state': s.state, 'cpu_time': s.cpu_time, 'stack_pid': s.stack_pid,
            'frames': [f.to_dict() for f in s.frames], 'error': s.error}


def group_dict(g: StackGroup) -> dict[str, object]:
    return {'ranks': g.labels, 'summary': g.summary, 'frames': [f.to_dict() for f in g.frames]}
