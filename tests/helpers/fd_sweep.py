"""Starts the same small job under every RLIMIT_NOFILE hard limit from "almost nothing left" to
"plenty", one forked child per limit (a hard limit can only be lowered), and reports for each
limit how `start()` ended and whether any process of the job survived it.

    fd_sweep.py NRANKS

Prints one JSON object: {"baseline": fds open before the job, "results": [[limit, outcome], ...]}
where outcome is "ok", "OSError:<errno>" or either with " LEAK" appended when processes marked
with the job's run id were still alive after the child had returned.
"""

from __future__ import annotations

import json
import os
import resource
import signal  # noqa: F401 - imported up front, as in any real launcher: start() and wait()
import sys
import threading  # noqa: F401 - import them lazily, which needs a free fd the first time
import uuid

from dslaunch import _core


def run_child(limit: int, nranks: int, run_id: str, report_fd: int) -> None:
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            ranks = [_core.RankSpec(['sleep', '30']) for _ in range(nranks)]
            sup = _core.Supervisor(ranks, run_id=run_id, stdout_fd=null, forward_signals=[])
            sup.start()
        except OSError as e:  # from the constructor (its pipe) or from start()
            outcome = f'OSError:{e.errno}'
        else:
            sup.kill()  # long-lived ranks: a leaked one is still there when the parent looks
            report = sup.wait()
            outcome = 'ok' if report is not None and report.stopped else f'report:{report}'
    except BaseException as e:  # noqa: BLE001 - anything else is a finding to report
        outcome = f'{type(e).__name__}:{e}'
    os.write(report_fd, outcome.encode())
    os._exit(0)


def main() -> None:
    nranks = int(sys.argv[1])
    baseline = len(os.listdir('/proc/self/fd')) - 1
    results = []
    for limit in range(baseline + 2, baseline + 4 * nranks + 24):
        run_id = f'sweep-{uuid.uuid4().hex}'
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            run_child(limit, nranks, run_id, w)
        os.close(w)
        outcome = os.read(r, 4096).decode()
        os.close(r)
        os.waitpid(pid, 0)
        # The child has returned: whatever of its job is still alive was leaked.
        left = _core.find_marked(f'DSLAUNCH_RUN_ID={run_id}')
        for p in left:
            os.kill(p, 9)
        results.append([limit, outcome + (' LEAK' if left else '')])
    print(json.dumps({'baseline': baseline, 'results': results}))


if __name__ == '__main__':
    main()
