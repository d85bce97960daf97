"""The hang watchdog (`--hang_timeout SECONDS`): a job whose ranks all went quiet is reported, with
every rank's last output line, state, CPU time and Python stack, identical stacks grouped.

The Rust core keeps each rank's last output time and line (no Python runs per line); this module
only reads `Supervisor.status()` at a coarse period (a fifth of the timeout, 0.2 to 5 s). A hang
is declared when no rank has written anything for `timeout` seconds while some rank still runs.
With `--hang_action stop` (the default) the job is then torn down and dslaunch exits with
`HANG_EXIT_STATUS`; with `report` it goes on, and a new report needs output, then silence again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dslaunch import stacks as stacks_mod

if TYPE_CHECKING:
    from dslaunch._core import RankResult, Supervisor

#: dslaunch's exit status after it stopped a hung job (as timeout(1) does for a command it timed out).
HANG_EXIT_STATUS = 124
HANG_ACTIONS = ('stop', 'report')


def check_period(timeout: float) -> float:
    """How often the watchdog looks: a fifth of the timeout, between 0.2 and 5 seconds."""
    return min(max(timeout / 5.0, 0.2), 5.0)


def _rank_label(r: RankResult) -> int | str:
    return int(r.tag) if r.tag.isdigit() else r.tag


@dataclass
class Hang:
    """One detected hang: what every rank was doing."""

    detected_at: float
    timeout: float
    quiet_for: float
    action: str
    ranks: list[RankResult]
    stacks: list[stacks_mod.RankStack]
    groups: list[stacks_mod.StackGroup] = field(default_factory=list)
    suspects: list[int | str] = field(default_factory=list)
    note: str | None = None

    def lines(self) -> list[str]:
        """The console report."""
        running = sum(1 for r in self.ranks if r.state == 'running')
        head = (f'dslaunch: HANG: no rank wrote output for {self.quiet_for:.1f} s (--hang_timeout {self.timeout:g}); '
                f'{running} of {len(self.ranks)} ranks running; '
                + ('stopping the job' if self.action == 'stop' else 'the job goes on'))
        out = [head, 'dslaunch: Python stacks (py-spy), identical stacks grouped:']
        if self.note:
            out.append(f'dslaunch: {self.note}')
        by_label = {_rank_label(r): r for r in self.ranks}
        details: dict[int | str, str] = {}
        for label, r in by_label.items():
            details[label] = _last_line_text(r, self.detected_at)
        out += stacks_mod.render_groups(self.groups, details=details)
        if self.suspects:
            what = '; '.join(
                f'rank {s} ({next(g.summary for g in self.groups if s in g.labels)}, {details.get(s, "")})'
                for s in self.suspects[:8])
            out.append(f'dslaunch: likely cause, unlike the other ranks: {what}')
        return out

    def to_dict(self) -> dict[str, object]:
        """The hang for `--report_json` (docs/report.md)."""
        by_rank = {s.rank: s for s in self.stacks}
        ranks = []
        for r in self.ranks:
            label = _rank_label(r)
            s = by_rank.get(label)
            ranks.append({
                'rank': label, 'pid': r.pid, 'state': s.state if s else None, 'cpu_time': s.cpu_time if s else None,
                'last_line': r.last_line, 'last_output_at': r.last_output_at,
                'stack_pid': s.stack_pid if s else None,
                'frames': [f.to_dict() for f in s.frames] if s else [], 'stack_error': s.error if s else None,
            })
        return {
            'detected_at': self.detected_at, 'timeout': self.timeout, 'quiet_for': self.quiet_for,
            'action': self.action, 'note': self.note, 'suspects': self.suspects,
            'groups': [stacks_mod.group_dict(g) for g in self.groups], 'ranks': ranks,
        }


def _last_line_text(r: RankResult, now: float) -> str:
    if r.last_output_at is None or r.last_line is None:
        return 'no output yet'
    return f'last line {now - r.last_output_at:.1f} s ago: {r.last_line[:200]!r}'


class HangWatch:
    """Looks at the job every `period` seconds; reports (and with `stop`, ends) a hang."""

    def __init__(self, sup: Supervisor, timeout: float, action: str = 'stop') -> None:
        if action not in HANG_ACTIONS:
            raise ValueError(f'hang action must be one of {HANG_ACTIONS}, not {action!r}')
        self.sup = sup
        self.timeout = timeout
        self.action = action
        self.period = check_period(timeout)
        self.hangs: list[Hang] = []
        self.stopped_job = False
        self._reported_quiet_since: float | None = None

    def quiet_since(self, ranks: list[RankResult]) -> float:
        """When the last output of any rank was written (the start, for ranks that wrote none)."""
        return max((r.last_output_at or r.started_at) for r in ranks)

    def check(self, now: float | None = None) -> Hang | None:
        """One look; returns the hang if one was declared now."""
        if self.stopped_job:
            return None
        ranks = self.sup.status()
        if not any(r.state == 'running' for r in ranks):
            return None
        now = time.time() if now is None else now
        since = self.quiet_since(ranks)
        if now - since < self.timeout or self._reported_quiet_since == since:
            return None
        self._reported_quiet_since = since
        running = [(_rank_label(r), r.pid) for r in ranks if r.state == 'running']
        found = stacks_mod.collect(running)
        groups = stacks_mod.group(found)
        hang = Hang(detected_at=now, timeout=self.timeout, quiet_for=now - since, action=self.action,
                    ranks=ranks, stacks=found, groups=groups, suspects=stacks_mod.odd_ones_out(groups),
                    note=stacks_mod.stacks_note(found))
        self.hangs.append(hang)
        text = '\n'.join(hang.lines()) + '\n'
        if not self.sup.console_message(text, stderr=True):
            import sys

            sys.stderr.write(text)
            sys.stderr.flush()
        if self.action == 'stop':
            self.stopped_job = True
            self.sup.terminate()
        return hang
