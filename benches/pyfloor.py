"""The Python floor: the least a launcher hosted by a Python interpreter can do.

    python -S pyfloor.py N prog [args...]

The same job as benches/floor.c without --mux, in Python's standard library: posix_spawnp()s N
copies of prog, each in its own process group, with RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_SIZE
set; waits for SIGCHLD/SIGTERM/SIGINT/SIGHUP with sigwaitinfo (the signals are blocked, as the C
floor reads them from a signalfd) and reaps with waitpid(WNOHANG). Fail fast on the first rank
that exits non-zero or dies of a signal; a SIGTERM/SIGINT/SIGHUP goes to every rank's group and,
once all are reaped, the floor exits with 128+sig through os._exit (no interpreter teardown).

It is a reference line in the teardown scenario: what the interpreter alone costs a launcher
(its start, and above all its exit: the kernel freeing its memory) next to the C floor.
"""

import os
import signal
import sys

STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
WATCHED = {signal.SIGCHLD, *STOPS}


def main() -> None:
    n = int(sys.argv[1])
    argv = sys.argv[2:]
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
    base = dict(os.environ, WORLD_SIZE=str(n), LOCAL_SIZE=str(n))
    live = {}
    for i in range(n):
        env = dict(base, RANK=str(i), LOCAL_RANK=str(i))
        pid = os.posix_spawnp(argv[0], argv, env, setpgroup=0, setsigmask=(), setsigdef=WATCHED)
        live[pid] = i
    code = 0
    stopping = False
    while live:
        info = signal.sigwaitinfo(WATCHED)
        if info.si_signo in STOPS:
            if not stopping:
                code = 128 + info.si_signo
            stopping = True
            for pid in live:
                _killpg(pid, info.si_signo)
            continue
        while live:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            if live.pop(pid, None) is None:
                continue
            failed = os.WIFSIGNALED(status) or os.WEXITSTATUS(status) != 0
            if failed and not stopping:
                stopping = True
                code = 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                for other in live:
                    _killpg(other, signal.SIGTERM)
            if stopping:
                _killpg(pid, signal.SIGTERM)  # the rank's group may still hold its children
    os._exit(code)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


if __name__ == '__main__':
    main()
