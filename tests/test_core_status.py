"""Live status: `status()` shows the running job and never blocks (not even while the console is
stalled and the supervisor has stopped reading), then the final states; and one supervisor after
another in the same process, as an elastic agent restarts a job."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from dslaunch import _core
from helpers.procs import HELPERS, PY, all_dead, wait_until

TICKER = 'i=0; while [ $i -lt 30 ]; do echo tick $i; sleep 0.04; i=$((i+1)); done'


def test_status_while_running_then_final(run_id: str) -> None:
    null = os.open(os.devnull, os.O_WRONLY)
    sup = _core.Supervisor([_core.RankSpec(['/bin/sh', '-c', TICKER]) for _ in range(3)], run_id=run_id, stdout_fd=null)
    assert len(sup) == 3 and sup.run_id == run_id and not sup.done
    t_start = time.time()
    sup.start()
    first = sup.status()
    assert [s.rank for s in first] == [0, 1, 2]
    assert [s.pid for s in first] == sup.pids
    assert all(s.state == 'running' and s.returncode is None and s.ended_at is None for s in first)
    assert all(t_start - 1 <= s.started_at <= time.time() for s in first)
    assert sup.poll() is None and sup.wait(timeout=0) is None
    seen = wait_until(lambda: (s := sup.status()[0]).last_output_at and s, 5, 'output from rank 0')
    later = wait_until(
        lambda: (s := sup.status()[0]).last_output_at > seen.last_output_at and s, 5, 'last_output_at to advance'
    )
    assert later.output_lines > seen.output_lines and later.output_bytes > seen.output_bytes
    assert later.state == 'running'
    report = sup.wait(timeout=20)
    assert report is not None and report.returncode == 0 and sup.done
    final = sup.status()
    assert [s.state for s in final] == ['exited'] * 3 == [r.state for r in report.ranks]
    for s in final:
        assert s.returncode == 0 and s.output_lines == 30
        assert s.started_at <= s.last_output_at <= s.ended_at
    assert report.started_at <= min(s.started_at for s in final)
    assert report.wall_time is not None and 0.9 < report.wall_time < 20
    assert sup.poll() is not None


def test_status_never_blocks_even_with_a_stalled_console() -> None:
    """Nobody reads the console: the supervisor fills its backlog and stops reading, the ranks
    block writing. status(), poll() and wait(timeout) still answer at once."""
    r_fd, w_fd = os.pipe()
    flood = [PY, '-c', 'import os\nfor i in range(20000): os.write(1, b"x" * 999 + b"\\n")']
    sup = _core.Supervisor([_core.RankSpec(flood) for _ in range(2)], stdout_fd=w_fd)
    sup.start()
    go = threading.Event()
    parts: list[int] = []

    def reader() -> None:
        go.wait(30)
        while data := os.read(r_fd, 1 << 20):
            parts.append(len(data))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        stuck = wait_until(
            lambda: sum(s.output_bytes for s in sup.status()) > 8 << 20 and sup.status(), 30, 'the backlog'
        )
        assert all(s.state == 'running' for s in stuck), 'the ranks are blocked on their full pipes'
        for _ in range(20):
            t0 = time.monotonic()
            sup.status()
            assert sup.poll() is None
            assert time.monotonic() - t0 < 0.5, 'status()/poll() blocked'
        t0 = time.monotonic()
        assert sup.wait(timeout=0.2) is None
        assert time.monotonic() - t0 < 2
    finally:
        go.set()
        report = sup.wait(timeout=60)
        os.close(w_fd)
        thread.join(30)
        os.close(r_fd)
    assert report is not None and report.returncode == 0
    assert sum(parts) == 2 * 20000 * (len('[0]: ') + 1000)


def test_one_supervisor_after_another_in_one_process(tmp_path: Path) -> None:
    """A failed job, then a restart: the second job gets its own handlers (a signal to this
    process reaches the second job's ranks), its own report and run id; nothing of the first
    lingers."""
    null = os.open(os.devnull, os.O_WRONLY)
    first = _core.Supervisor(
        [_core.RankSpec(['/bin/sh', '-c', 'exit 3']), _core.RankSpec(['sleep', '30'])], stdout_fd=null
    )
    report1 = first.run()
    assert report1.returncode == 3 and report1.first_failure is not None
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    argv = [PY, str(HELPERS / 'signal_rank.py'), str(tmp_path / 'sig'), str(tmp_path / 'ready'), '--lifetime', '1']
    second = _core.Supervisor([_core.RankSpec(argv)], stdout_fd=null)
    assert second.run_id != first.run_id
    second.start()
    wait_until((tmp_path / 'ready').exists, 10, 'the rank to be ready')
    os.kill(os.getpid(), signal.SIGUSR1)  # received by this process, forwarded by the running job
    wait_until(
        lambda: (tmp_path / 'sig').exists() and (tmp_path / 'sig').read_text() == '10\n', 5, 'the forwarded SIGUSR1'
    )
    report2 = second.wait(timeout=20)
    assert report2 is not None and report2.returncode == 0 and report2.run_id == second.run_id
    assert report1.run_id == first.run_id and report1.returncode == 3
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    assert all_dead([r.pid for r in report1.ranks + report2.ranks])
