"""The short report printed when a job ends: what happened to every rank, and for a failure the
root cause with the last lines of its stderr (the user's traceback, undecorated)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterable, Sequence

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs the CLI start-up time
if TYPE_CHECKING:
    from typing import TextIO

    from dslaunch._core import RankResult, Report
    from dslaunch.hang import Hang


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f'signal {num}'


def rank_ranges(ranks: Iterable[int]) -> str:
    """`[0, 1, 2, 5, 7, 8]` -> `0-2,5,7-8`."""
    out: list[str] = []
    nums = sorted(set(ranks))
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f'{nums[i]}-{nums[j]}')
        i = j + 1
    return ','.join(out)


def describe(r: RankResult) -> str:
    """How one rank ended, in words."""
    if r.state == 'running':
        return 'still running'
    if r.signal is not None:
        return f'killed by {signal_name(r.signal)}'
    return f'exit code {r.returncode}'


def _label(tags: Sequence[str]) -> str:
    numeric = [int(t) for t in tags if t.isdigit()]
    if len(numeric) == len(tags):
        return ('ranks ' if len(tags) > 1 else 'rank ') + rank_ranges(numeric)
    return ('ranks ' if len(tags) > 1 else 'rank ') + ','.join(tags)


def render(report: Report, *, host: str | None = None, hangs: Sequence[Hang] = (),
           returncode: int | None = None, tail_of: str = 'stderr') -> list[str]:
    """The report as lines (without newlines). `hangs`: what the hang watchdog found; `returncode`:
    dslaunch's exit status when it differs from the report's (after stopping a hung job);
    `tail_of`: what the ranks' kept tail is of, 'stderr' or 'output' (stderr merged into stdout)."""
    where = f' on {host}' if host else ''
    wall = report.wall_time or 0.0
    n = len(report.ranks)
    lines: list[str] = []
    stopped_hang = next((h for h in hangs if h.action == 'stop'), None)
    if report.success and not hangs:
        lines.append(f'dslaunch: {n} rank{"s" if n != 1 else ""}{where} finished OK in {wall:.1f} s')
        return lines + _leftovers_note(report) + _log_notes(report)
    cause = report.first_failure
    if report.success:
        lines.append(f'dslaunch: {n} rank{"s" if n != 1 else ""}{where} finished OK in {wall:.1f} s '
                     f'after {len(hangs)} hang report(s)')
        return lines + _leftovers_note(report) + _log_notes(report)
    if stopped_hang is not None and cause is None:
        lines.append(f'dslaunch: stopped{where} after a hang (no output for {stopped_hang.quiet_for:.1f} s) '
                     f'after {wall:.1f} s; exit status {returncode}')
    elif cause is not None:
        lines.append(
            f'dslaunch: rank {cause.tag}{where} (pid {cause.pid}) failed: {describe(cause)} '
            f'after {(cause.ended_at or report.started_at) - cause.started_at:.1f} s; the job was torn down'
        )
    elif report.interrupted_by is not None:
        lines.append(f'dslaunch: stopped by {signal_name(report.interrupted_by)}{where} after {wall:.1f} s')
    elif report.stopped:
        lines.append(f'dslaunch: stopped{where} after {wall:.1f} s')
    groups: dict[str, list[str]] = {}
    said: dict[tuple[str, int | None, int | None], str] = {}  # describe() once per kind of end, not per rank
    for r in report.ranks:
        key = (r.state, r.signal, r.returncode)
        what = said.get(key)
        if what is None:
            what = said[key] = describe(r)
        groups.setdefault(what, []).append(r.tag)
    lines.append('dslaunch: ' + '; '.join(f'{_label(tags)}: {what}' for what, tags in groups.items()))
    if cause is not None and cause.stderr_tail:
        lines.append(f'dslaunch: last {tail_of} lines of rank {cause.tag}:')
        lines.extend(cause.stderr_tail)
        lines += _local_rank_hint(cause.stderr_tail)
    return lines + _leftovers_note(report) + _log_notes(report)


#: The argument each front end gives the script, and the flag before the script that drops it.
_LOCAL_RANK_ARGS = (
    ('--local_rank=', 'dslaunch passes it, as deepspeed does: add --no_local_rank before the script'),
    ('--local-rank=', ('dslaunch passes it, as torch.distributed.launch does: add --use-env before the script, '
                       'as a torchrun script needs')),
)


def _local_rank_hint(stderr_tail: Sequence[str]) -> list[str]:
    """A script whose argparse rejected the launcher's own local-rank argument (a script written
    for torchrun, or one that reads LOCAL_RANK): which flag stops dslaunch passing it."""
    for line in stderr_tail:
        if 'unrecognized arguments:' not in line:
            continue
        for arg, fix in _LOCAL_RANK_ARGS:
            if arg in line.partition('unrecognized arguments:')[2]:
                return [f'dslaunch: hint: the script does not take {arg}N; {fix}']
    return []


def _leftovers_note(report: Report) -> list[str]:
    """Background processes the ranks left and the job end killed: said on success too, where it
    matters most (a detached uploader or service lost its work without a word otherwise)."""
    if not report.leftovers_killed:
        return []
    return [f'dslaunch: killed {report.leftovers_killed} process(es) the ranks left behind']


def _log_notes(report: Report) -> list[str]:
    """A line per rank whose log file stopped being written (a full disk: the job went on)."""
    return [f'dslaunch: the log file of rank {r.tag} is incomplete: {r.log_error}' for r in report.ranks if r.log_error]


def print_report(report: Report, stream: TextIO | None = None, *, host: str | None = None,
                 hangs: Sequence[Hang] = (), returncode: int | None = None, tail_of: str = 'stderr') -> None:
    out = stream or sys.stderr
    for line in render(report, host=host, hangs=hangs, returncode=returncode, tail_of=tail_of):
        print(line, file=out)
    out.flush()


#: Version of the `--report_json` document; bump on an incompatible change (docs/report.md).
REPORT_SCHEMA = 'dslaunch.report/1'


def _rank_dict(r: RankResult, host: str) -> dict[str, object]:
    return {
        'rank': int(r.tag) if r.tag.isdigit() else r.tag,
        'host': host,
        'pid': r.pid,
        'state': r.state,
        'returncode': r.returncode,
        'signal': r.signal,
        'signal_name': signal_name(r.signal) if r.signal is not None else None,
        'exit_status': r.exit_status,
        'started_at': r.started_at,
        'ended_at': r.ended_at,
        'last_output_at': r.last_output_at,
        'output_bytes': r.output_bytes,
        'output_lines': r.output_lines,
        'stderr_tail': r.stderr_tail,
        'last_line': r.last_line,
        'log_error': r.log_error,
        'restarts': 0,
    }


def to_json_dict(report: Report, *, host: str, hangs: Sequence[Hang] = (),
                 returncode: int | None = None) -> dict[str, object]:
    """The `--report_json` document (schema in docs/report.md and docs/report.schema.json).
    `returncode` overrides the report's (dslaunch's exit status after stopping a hung job)."""
    ranks = [_rank_dict(r, host) for r in report.ranks]
    cause = report.first_failure
    stopped_hang = next((h for h in hangs if h.action == 'stop'), None)
    code = report.returncode if returncode is None else returncode
    root: dict[str, object] | None = None
    if stopped_hang is not None and cause is None:
        root = {'kind': 'hang', 'quiet_for': stopped_hang.quiet_for, 'timeout': stopped_hang.timeout,
                'suspects': stopped_hang.suspects,
                'summary': '; '.join(f'{len(g.ranks)}x {g.summary}' for g in stopped_hang.groups)}
    elif cause is not None:
        root = {'kind': 'rank_failed', **_rank_dict(cause, host)}
    elif report.interrupted_by is not None:
        root = {'kind': 'signal', 'signal': report.interrupted_by, 'signal_name': signal_name(report.interrupted_by)}
    elif report.stopped:
        root = {'kind': 'stopped'}
    return {
        'schema': REPORT_SCHEMA,
        'run_id': report.run_id,
        'host': host,
        'started_at': report.started_at,
        'ended_at': report.ended_at,
        'wall_time': report.wall_time,
        'returncode': code,
        'success': code == 0,
        'root_cause': root,
        'leftovers_killed': report.leftovers_killed,
        'ranks': ranks,
        'hangs': [h.to_dict() for h in hangs],
    }


def write_json(report: Report, path: str, *, hangs: Sequence[Hang] = (), returncode: int | None = None) -> None:
    """Writes the report atomically (a reader never sees half a file)."""
    import json
    import os
    import socket

    doc = to_json_dict(report, host=socket.gethostname(), hangs=hangs, returncode=returncode)
    path = os.path.realpath(path)  # a symlink (e.g. in a results dir) is written through, not replaced
    # /dev/stdout, /dev/null, a FIFO: written into; replacing the node would break it for everyone
    in_place = os.path.exists(path) and not os.path.isfile(path)
    target = path if in_place else f'{path}.tmp{os.getpid()}'
    with open(target, 'w', encoding='utf-8') as f:
        json.dump(doc, f, indent=1)
        f.write('\n')
    if not in_place:
        os.replace(target, path)
