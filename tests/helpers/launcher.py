"""A launcher process built on `dslaunch._core`, for tests that signal or SIGKILL the launcher.

    launcher.py SPEC_JSON

SPEC_JSON: {"ranks": [{"argv": [...], "env": {...}, "log_file": ..., "tag": ...}],
            "options": {Supervisor keyword arguments},
            "console": path or null (the ranks' stdout and stderr; default /dev/null),
            "nofile": [soft, hard] or null (RLIMIT_NOFILE to set before starting),
            "mode": "wait" (default) | "with" (a `with Supervisor(...)` block around wait()),
            "jobs": K (default 1: K independent supervisors of these ranks, each with its own
                    run id and orphan guard; the events then list every job's pids and run ids)}

Writes one JSON object per line to its stdout (the events), flushed at once:
  {"event": "started", "run_id": ..., "pids": [...], "nofile": [soft, hard]}
  {"event": "started_jobs", "run_ids": [...], "pids": [...]}   (with "jobs")
  {"event": "report", "returncode": ..., "interrupted_by": ..., "stopped": ..., "leftovers_killed": ...,
   "first_failure": rank or null, "ranks": [{"pid", "state", "returncode"}]}
  {"event": "error", "type": ..., "errno": ..., "filename": ..., "message": ...}
  {"event": "keyboard_interrupt", "alive_after_with": [...]}
and exits with the report's returncode (97 after an error, 98 after KeyboardInterrupt).
"""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any

from dslaunch import _core


def emit(**event: object) -> None:
    sys.stdout.write(json.dumps(event) + '\n')
    sys.stdout.flush()


def alive(pid: int) -> bool:
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] not in ('Z', 'X')
    except (FileNotFoundError, ProcessLookupError):
        return False


def main() -> int:
    spec = json.loads(sys.argv[1])
    if spec.get('nofile'):
        resource.setrlimit(resource.RLIMIT_NOFILE, tuple(spec['nofile']))
    console = os.open(spec.get('console') or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    ranks = [
        _core.RankSpec(r['argv'], env=r.get('env'), log_file=r.get('log_file'), tag=r.get('tag')) for r in spec['ranks']
    ]
    options: dict[str, Any] = dict(spec.get('options') or {})
    options.setdefault('stdout_fd', console)
    options.setdefault('stderr_fd', console)
    if spec.get('jobs'):
        return run_jobs(spec['jobs'], ranks, options)
    sup = _core.Supervisor(ranks, **options)
    try:
        sup.start()
    except OSError as e:
        emit(event='error', type=type(e).__name__, errno=e.errno, filename=e.filename, message=str(e))
        return 97
    emit(event='started', run_id=sup.run_id, pids=sup.pids, nofile=list(resource.getrlimit(resource.RLIMIT_NOFILE)))
    try:
        if spec.get('mode') == 'with':
            with sup:
                report = sup.wait()
        else:
            report = sup.wait()
    except KeyboardInterrupt:
        emit(event='keyboard_interrupt', alive_after_with=[p for p in sup.pids if alive(p)])
        return 98
    assert report is not None
    emit(
        event='report',
        returncode=report.returncode,
        interrupted_by=report.interrupted_by,
        stopped=report.stopped,
        leftovers_killed=report.leftovers_killed,
        first_failure=None if report.first_failure is None else report.first_failure.rank,
        ranks=[
            {'pid': r.pid, 'state': r.state, 'returncode': r.returncode, 'ended_at': r.ended_at} for r in report.ranks
        ],
    )
    return report.returncode


def run_jobs(k: int, ranks: list[_core.RankSpec], options: dict[str, Any]) -> int:
    sups = [_core.Supervisor(ranks, forward_signals=[], **options) for _ in range(k)]
    for sup in sups:
        sup.start()
    emit(event='started_jobs', run_ids=[s.run_id for s in sups], pids=[p for s in sups for p in s.pids])
    reports = [s.wait() for s in sups]
    return max(r.returncode for r in reports if r is not None)


if __name__ == '__main__':
    sys.exit(main())
