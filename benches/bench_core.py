"""Spawn-to-exit cost of `dslaunch._core` against `subprocess.Popen`, measured in the same run.

    python benches/bench_core.py [--quick] [--sizes 8,64,256,1024] [--reps N] [--ballast-gb 2]

For each N it times starting N no-op ranks (`/bin/true`) and waiting until every one is reaped:
  core         `_core.Supervisor(...).run()`: posix_spawn in own groups, pipes, pidfd reaping, the
               orphan guard, the leftover sweep (everything a real job pays for)
  popen        `subprocess.Popen` of the same N (stdio to /dev/null), then `wait()` on each
  popen+fork   the same with a `preexec_fn`, which forces fork+exec: what any per-child setup
               hook (PR_SET_PDEATHSIG, say) would cost
first with the launcher as it is, then holding ~2 GB of touched memory (a big Python launcher,
or one that has loaded a model): posix_spawn/vfork should not care, fork has to copy the page
tables. Prints median, min and max (ms) over the repetitions, and the ratio of each peer's median
to the core's (above 1: the core is faster). No pytest; stdlib only besides dslaunch.

    python benches/bench_core.py --log [--quick] [--log-ranks 16] [--log-lines 200000]

The log round instead measures console throughput: N ranks each write L lines as fast as `yes`
can (the console is /dev/null, so only the supervisor's own work counts) with the collapsed
console off and on (`collapse='on'`, forced, as /dev/null is no terminal), for lines identical
across ranks (every line collapses) and lines distinct per rank (none do: the collapser's worst
case, every line held and released on its own). Prints MB/s and the on/off ratio.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from dslaunch import _core

TRUE = '/bin/true'


def run_core(n: int, null: int) -> None:
    report = _core.Supervisor(
        [_core.RankSpec([TRUE]) for _ in range(n)], stdout_fd=null, stderr_fd=null, forward_signals=[]
    ).run()
    if report.returncode != 0 or len(report.ranks) != n:
        raise RuntimeError(f'core run failed: {report!r}')


def run_popen(n: int, preexec: bool = False) -> None:
    kwargs: dict[str, object] = {
        'stdin': subprocess.DEVNULL,
        'stdout': subprocess.DEVNULL,
        'stderr': subprocess.DEVNULL,
    }
    if preexec:
        kwargs['preexec_fn'] = _noop
    procs = [subprocess.Popen([TRUE], **kwargs) for _ in range(n)]  # type: ignore[call-overload]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f'popen run failed: {codes}')


def _noop() -> None:
    pass


def measure(fn: Callable[[], None], reps: int) -> list[float]:
    fn()  # warm-up: page cache, the dynamic loader, Python's own lazy imports
    times = []
    gc.disable()
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return times


def rss_mb() -> float:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    return float('nan')


def touch_ballast(gb: float) -> bytearray:
    size = int(gb * (1 << 30))
    ballast = bytearray(size)  # calloc: zero pages, not yet resident
    ballast[::4096] = b'\x01' * len(range(0, size, 4096))  # one write per page makes it resident
    return ballast


def fmt(times: list[float]) -> str:
    ms = [t * 1000 for t in times]
    return f'{statistics.median(ms):9.1f} {min(ms):9.1f} {max(ms):9.1f}'


def bench(sizes: list[int], reps: int, fork_max: int, label: str) -> None:
    null = os.open(os.devnull, os.O_WRONLY)
    print(f'\n== {label} (launcher RSS {rss_mb():,.0f} MB; {reps} reps; times in ms: median min max) ==')
    head = f'{"N":>6} | {"core":^29} | {"popen":^29} | {"popen+fork":^29} | popen/core  fork/core'
    print(head)
    print('-' * len(head))
    for n in sizes:
        core = measure(functools.partial(run_core, n, null), reps)
        popen = measure(functools.partial(run_popen, n), reps)
        fork = measure(functools.partial(run_popen, n, preexec=True), reps) if n <= fork_max else None
        core_med = statistics.median(core)
        ratio_popen = statistics.median(popen) / core_med
        fork_cols = fmt(fork) if fork else f'{"(skipped)":^29}'
        ratio_fork = f'{statistics.median(fork) / core_med:9.2f}x' if fork else f'{"-":>10}'
        print(f'{n:>6} | {fmt(core)} | {fmt(popen)} | {fork_cols} | {ratio_popen:9.2f}x {ratio_fork}')
        sys.stdout.flush()
    os.close(null)


def run_log(n: int, lines: int, collapse: str, distinct: bool, null: int) -> float:
    """Seconds for N ranks to write `lines` lines each through the console (and nothing else)."""
    text = ('rank $R: ' if distinct else '') + 'INFO step done, loss=0.1234 lr=3e-4 tokens/s=123456 [filler]'
    specs = [_core.RankSpec(['/bin/sh', '-c', f'yes "{text}" | head -n {lines}'], env={'R': str(i)})
             for i in range(n)]
    sup = _core.Supervisor(specs, stdout_fd=null, stderr_fd=null, forward_signals=[], collapse=collapse)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    report = sup.run()
    elapsed = time.perf_counter() - t0
    if report.returncode != 0:
        raise RuntimeError(f'log run failed: {report!r}')
    return elapsed


def bench_log(n: int, lines: int, reps: int) -> None:
    null = os.open(os.devnull, os.O_WRONLY)
    line_bytes = len('INFO step done, loss=0.1234 lr=3e-4 tokens/s=123456 [filler]') + 1 + len('[00]: ')
    print(f'\n== console throughput: {n} ranks x {lines:,} lines, median of {reps} (MB/s of prefixed output) ==')
    print(f'{"lines":>10} | {"collapse off":>13} | {"collapse on":>12} | on/off')
    for distinct in (False, True):
        size = n * lines * (line_bytes + (9 if distinct else 0)) / 1e6
        off = statistics.median(measure(functools.partial(run_log, n, lines, 'off', distinct, null), reps))
        on = statistics.median(measure(functools.partial(run_log, n, lines, 'on', distinct, null), reps))
        label = 'distinct' if distinct else 'identical'
        print(f'{label:>10} | {size / off:13.0f} | {size / on:12.0f} | {off / on:6.2f}x')
        sys.stdout.flush()
    os.close(null)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true', help='3 repetitions (default 7)')
    ap.add_argument('--sizes', default='8,64,256,1024', help='comma-separated rank counts')
    ap.add_argument('--reps', type=int, default=None)
    ap.add_argument('--ballast-gb', type=float, default=2.0, help='touched memory for the second round (0: skip)')
    ap.add_argument('--no-fork', action='store_true', help='skip the popen+fork column')
    ap.add_argument('--log', action='store_true', help='the console throughput round (collapse off vs on) only')
    ap.add_argument('--log-ranks', type=int, default=16)
    ap.add_argument('--log-lines', type=int, default=None, help='lines per rank (default 200000; 50000 with --quick)')
    ap.add_argument(
        '--fork-max-ballast',
        type=int,
        default=None,
        help='largest N for popen+fork while holding the ballast (default 8 with --quick, else 64: '
        'each fork copies the page tables, ~0.1 s a child at 2 GB)',
    )
    args = ap.parse_args()
    reps = args.reps or (3 if args.quick else 7)
    sizes = [int(s) for s in args.sizes.split(',') if s]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * max(sizes) + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * max(sizes) + 64), hard))
    print(
        f'dslaunch._core {_core.__version__} | Python {platform.python_version()} | {platform.system()} '
        f'{platform.release()} | {os.cpu_count()} CPUs | glibc {platform.libc_ver()[1]}'
    )
    if args.log:
        bench_log(args.log_ranks, args.log_lines or (50_000 if args.quick else 200_000), reps)
        return
    fork_max = 0 if args.no_fork else max(sizes)
    fork_max_ballast = 0 if args.no_fork else (args.fork_max_ballast or (8 if args.quick else 64))
    bench(sizes, reps, fork_max, 'plain launcher')
    if args.ballast_gb > 0:
        t0 = time.perf_counter()
        ballast = touch_ballast(args.ballast_gb)
        print(f'\n(touched {args.ballast_gb:g} GB in {time.perf_counter() - t0:.1f} s)')
        bench(sizes, reps, fork_max_ballast, f'launcher holding {args.ballast_gb:g} GB of touched memory')
        del ballast


if __name__ == '__main__':
    main()
