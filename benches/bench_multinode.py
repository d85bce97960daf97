"""Scenario 7 of docs/benchmarks.md: two test hosts x 2 ranks over pdsh, dslaunch against
DeepSpeed's runner, side by side in one run.

The hosts are network namespaces with their own sshd, made by tests/infra/hosts-up.sh under a
state directory and namespace prefix of their own (so a test session's hosts are never touched).
Both runners start inside h1, as a user runs them on the first host of the hostfile, with the
same hostfile, rank program (benches/mn_rank.py, no torch) and a clean environment. Measured, per
repetition and launcher in a shuffled order:

- up:     runner start -> the last of the 4 ranks running (each rank records CLOCK_MONOTONIC;
          the namespaces share one kernel, so the clocks agree);
- fail:   the last rank (on h2) exits 7 -> every other rank gone; -> runner exit, and its status;
- ctrl-c: SIGINT to the runner's process group once all ranks are up -> no process of the trial
          left on any host (runner, pdsh, ssh, per-node launchers, ranks); and how many were left
          0.5 s after the SIGINT.
A trial's processes all carry its token in their argv; after each trial whatever is left is
SIGKILLed, so one trial never poisons the next. Needs root, pdsh and openssh-server
(`make system-deps`); DeepSpeed from .bench-venv (`make bench-peers`), else dslaunch alone.

usage: bench_multinode.py [--reps N] [--launchers dslaunch,deepspeed] [--cap SECONDS] [--keep-hosts]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / 'tests' / 'infra'
RANK = ROOT / 'benches' / 'mn_rank.py'
RANKS = 4  # 2 hosts x 2 slots
HOSTS_ENV = {'DSLAUNCH_ENGINES_DIR': '/tmp/dslaunch-bench-hosts', 'DSLAUNCH_ENGINES_NS': 'dslb-'}
CLEAN_ENV = {'PATH': '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', 'HOME': '/root', 'LANG': 'C.UTF-8'}
LAUNCHERS = {
    'dslaunch': ROOT / '.venv' / 'bin' / 'dslaunch',
    'deepspeed': ROOT / '.bench-venv' / 'bin' / 'deepspeed',
}


def token_pids(token: str) -> list[int]:
    """Live processes whose argv mentions `token` (on any host: one kernel, one pid namespace)."""
    found, me, needle = [], os.getpid(), token.encode()
    for d in os.listdir('/proc'):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f'/proc/{d}/cmdline', 'rb') as f:
                if needle in f.read():
                    with open(f'/proc/{d}/stat', 'rb') as s:
                        if s.read().rsplit(b')', 1)[1].split()[0] not in (b'Z', b'X'):
                            found.append(int(d))
        except OSError:
            pass
    return found


def sweep(token: str) -> int:
    pids = token_pids(token)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while token_pids(token) and time.monotonic() < deadline:
        time.sleep(0.02)
    return len(pids)


def wait_exited(pids: list[int], until: float) -> float | None:
    """The moment the last of `pids` exited (pidfds), or None if one still runs at `until`."""
    fds = {}
    for p in pids:
        try:
            fds[os.pidfd_open(p)] = p
        except ProcessLookupError:
            pass
    last = time.monotonic()
    try:
        while fds:
            left = until - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select(list(fds), [], [], left)
            last = time.monotonic()
            for fd in ready:
                os.close(fd)
                del fds[fd]
        return last
    finally:
        for fd in fds:
            os.close(fd)


def wait_file(path: Path, until: float) -> bool:
    while not path.exists():
        if time.monotonic() > until:
            return False
        time.sleep(0.005)
    return True


class Hosts:
    def __init__(self) -> None:
        self.env = dict(os.environ, **HOSTS_ENV)
        subprocess.run(['bash', str(INFRA / 'hosts-up.sh'), '2'], env=self.env, check=True)
        run = Path(HOSTS_ENV['DSLAUNCH_ENGINES_DIR']) / 'run'
        self.h1 = int((run / 'sshd-h1.pid').read_text())

    def enter(self, cwd: Path) -> list[str]:
        return ['nsenter', '-t', str(self.h1), '-n', '-u', '-m', f'--wd={cwd}', '--']

    def down(self) -> None:
        subprocess.run(['bash', str(INFRA / 'hosts-down.sh')], env=self.env, check=False)


def trial(hosts: Hosts, launcher: str, mode: str, work: Path, cap: float) -> dict[str, Any]:
    token = f'mnb{uuid.uuid4().hex[:10]}'
    out = work / token
    out.mkdir()
    hostfile = work / 'hostfile'
    argv = [str(LAUNCHERS[launcher]), '-H', str(hostfile), '--no_local_rank', str(RANK), token, str(out), mode]
    rec: dict[str, Any] = {'launcher': launcher, 'mode': mode, 'token': token}
    with open(out / 'runner.log', 'wb') as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [*hosts.enter(work), *argv],
            env=CLEAN_ENV,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        ups = [out / f'up.{r}' for r in range(RANKS)]
        if not all(wait_file(p, t0 + 60) for p in ups):
            rec['error'] = 'ranks not all up within 60 s'
            return rec
        recs = [p.read_text().split() for p in ups]
        rec['up_s'] = max(float(r[0]) for r in recs) - t0
        rec['hosts'] = sorted({r[2] for r in recs})
        pids = [int(r[1]) for r in recs]
        if mode == 'fail':
            if not wait_file(out / 'failed', time.monotonic() + 30):
                rec['error'] = 'the failing rank did not fail'
                return rec
            t_fail = float((out / 'failed').read_text())
            gone = wait_exited(pids[:-1], t_fail + cap)
            rec['ranks_gone_s'] = None if gone is None else gone - t_fail
            try:
                rec['status'] = proc.wait(max(0.0, t_fail + cap - time.monotonic()))
                rec['runner_exit_s'] = time.monotonic() - t_fail
            except subprocess.TimeoutExpired:
                rec['runner_exit_s'] = None
        else:
            t_int = time.monotonic()
            os.killpg(proc.pid, signal.SIGINT)
            left_half: int | None = None
            while True:
                now = time.monotonic()
                left = token_pids(token)
                if left_half is None and now - t_int >= 0.5:
                    left_half = len(left)
                if not left:
                    rec['clean_s'] = now - t_int
                    break
                if now - t_int > cap:
                    rec['clean_s'] = None
                    break
                time.sleep(0.01)
            rec['left_at_0.5s'] = left_half or 0
            try:
                rec['status'] = proc.wait(5)
            except subprocess.TimeoutExpired:
                rec['status'] = None
        return rec
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        rec['swept'] = sweep(token)
        rec['log_tail'] = (out / 'runner.log').read_text(errors='replace')[-600:]


def fmt(v: float | None, cap: float) -> str:
    if v is None:
        return f'> {cap:g} s'
    return f'{v * 1000:.0f} ms' if v < 1 else f'{v:.2f} s'


def median(vals: list[float | None]) -> float | None:
    if not vals or any(v is None for v in vals):
        return None  # a trial that hit the cap makes the median "more than the cap"
    return statistics.median(v for v in vals if v is not None)


def render(records: list[dict[str, Any]], launchers: list[str], cap: float) -> str:
    def col(launcher: str, mode: str, key: str) -> list[Any]:
        return [r.get(key) for r in records if r['launcher'] == launcher and r['mode'] == mode and 'error' not in r]

    rows = [
        ('all 4 ranks up after the runner starts', 'wait', 'up_s'),
        ('rank on h2 exits 7 -> every other rank gone', 'fail', 'ranks_gone_s'),
        ('rank on h2 exits 7 -> runner exits', 'fail', 'runner_exit_s'),
        ('Ctrl-C -> nothing of the job left on any host', 'wait', 'clean_s'),
    ]
    lines = ['| measure (median) | ' + ' | '.join(launchers) + ' |', '|---' * (len(launchers) + 1) + '|']
    for title, mode, key in rows:
        lines.append(f'| {title} | ' + ' | '.join(fmt(median(col(la, mode, key)), cap) for la in launchers) + ' |')
    statuses = [sorted({str(s) for s in col(la, 'fail', 'status')}) for la in launchers]
    lines.append('| runner exit status after the failure | ' + ' | '.join(','.join(s) for s in statuses) + ' |')
    left = [sorted({str(s) for s in col(la, 'wait', 'left_at_0.5s')}) for la in launchers]
    lines.append('| processes left 0.5 s after Ctrl-C | ' + ' | '.join(','.join(s) for s in left) + ' |')
    errors = [r for r in records if 'error' in r]
    for r in errors:
        lines.append(f'\n{r["launcher"]} {r["mode"]}: {r["error"]}\n{r["log_tail"]}')
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--reps', type=int, default=3)
    ap.add_argument('--launchers', default='dslaunch,deepspeed')
    ap.add_argument('--cap', type=float, default=20.0, help='give up waiting after this many seconds')
    ap.add_argument('--keep-hosts', action='store_true', help='leave the test hosts up afterwards')
    ap.add_argument('--seed', type=int, default=1)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print('bench_multinode: needs root (network namespaces, sshd)', file=sys.stderr)
        return 2
    launchers = [la for la in args.launchers.split(',') if la]
    missing = [la for la in launchers if not LAUNCHERS.get(la, Path('/nonexistent')).exists()]
    if missing:
        print(f'bench_multinode: left out (not installed): {", ".join(missing)}', file=sys.stderr)
        launchers = [la for la in launchers if la not in missing]
    if 'dslaunch' not in launchers:
        print('bench_multinode: dslaunch is not installed in .venv (make install)', file=sys.stderr)
        return 2
    work = ROOT / 'bench-results' / f'mn-{time.strftime("%Y%m%d-%H%M%S")}'
    work.mkdir(parents=True)
    (work / 'hostfile').write_text('h1 slots=2\nh2 slots=2\n')
    hosts = Hosts()
    rng = random.Random(args.seed)
    records: list[dict[str, Any]] = []
    try:
        for rep in range(args.reps):
            for mode in ('wait', 'fail'):
                order = launchers[:]
                rng.shuffle(order)
                for la in order:
                    r = trial(hosts, la, mode, work, args.cap)
                    r['rep'] = rep
                    records.append(r)
                    shown = {k: v for k, v in r.items() if k not in ('log_tail', 'token')}
                    print(f'bench_multinode: {shown}', file=sys.stderr, flush=True)
    finally:
        if not args.keep_hosts:
            hosts.down()
    table = render(records, launchers, args.cap)
    print(table)
    (work / 'results.json').write_text(json.dumps({'records': records, 'cap_s': args.cap}, indent=1))
    (work / 'results.md').write_text(table + '\n')
    print(f'bench_multinode: results in {work.relative_to(ROOT)}', file=sys.stderr)
    return 1 if any('error' in r and r['launcher'] == 'dslaunch' for r in records) else 0


if __name__ == '__main__':
    sys.exit(main())
