"""Slurm: ``srun -n N [--nodelist ... --nodes ...] --export=ALL python -u -m dslaunch.launcher_helper ...``.

srun's ``--export=ALL,K=V,...`` splits on commas and cannot carry a newline, so a value like
``64(x2),a`` or a multi-line one cannot go there. ``--export=ALL`` forwards srun's whole
environment, so the exports are put into the environment srun is started with instead.
Shapes follow DeepSpeed 0.19.7+ (no ``--include``/``--exclude`` forwarded, ``-n`` = kept slots).

Two srun defaults do not fit a training job: a task that exits non-zero leaves the others running
(blocked in a collective until a timeout), and one SIGINT only prints the tasks' status. So the
environment gets ``SLURM_KILL_BAD_EXIT=1`` (srun's ``-K``; a user's own setting or ``-K0`` in
``--launcher_args`` wins), and ``forwarded_signal`` turns the runner's SIGINT into SIGTERM.
"""

from __future__ import annotations

import signal
from collections.abc import MutableMapping

from ..errors import ResourceFilterError
from .base import ActiveResources, MultiNodeRunner, slot_counts, which


def first_node(nodelist: str) -> str | None:
    """The first host of a Slurm hostlist (``gpu[03-05,7],cpu1`` -> ``gpu03``), None if empty or unreadable."""
    head, depth = '', 0
    for ch in nodelist.strip():  # up to the first comma outside brackets
        depth += (ch == '[') - (ch == ']')
        if ch == ',' and depth == 0:
            break
        head += ch
    prefix, bracket, rest = head.partition('[')
    if not bracket:
        return prefix or None
    first = rest.split(',')[0].split('-')[0].rstrip(']')
    suffix = rest.partition(']')[2]
    return f'{prefix}{first}{suffix}' if first.isdigit() and '[' not in suffix else None


class SlurmRunner(MultiNodeRunner):
    name = 'slurm'

    @classmethod
    def backend_binary(cls, path: str | None = None) -> str:
        return which('srun', path) or 'srun'

    @classmethod
    def backend_exists(cls, path: str | None = None) -> bool:
        return which('srun', path) is not None  # DeepSpeed looks for sinfo, but srun is what runs

    @classmethod
    def backend_package(cls) -> str:
        return "Slurm's client commands (the Debian package 'slurm-client')"

    @classmethod
    def validate_active_resources(cls, active: ActiveResources) -> None:
        cls.require_leading_slots(active)
        counts = slot_counts(active)
        if len(set(counts.values())) > 1:
            raise ResourceFilterError(f'slurm backend needs the same slot count on every host, got {counts}.')

    def get_cmd(self, environment: MutableMapping[str, str], active_resources: ActiveResources) -> list[str]:
        self.validate_active_resources(active_resources)
        total = sum(slot_counts(active_resources).values())
        cmd = [self.backend_binary(environment.get('PATH')), '-n', str(total)] + self.launcher_args()
        comment = getattr(self.args, 'slurm_comment', '')
        if comment:
            cmd += ['--comment', str(comment)]
        if self.arg('include') or self.arg('exclude'):
            cmd += ['--nodelist', ','.join(active_resources), '--nodes', str(len(active_resources))]
        if self.arg('num_nodes') > 0:
            cmd += ['--nodes', str(self.arg('num_nodes'))]
        if self.arg('num_gpus') > 0:
            cmd += ['--gpus-per-node', str(self.arg('num_gpus'))]
        for key, value in [*self.exports.items(), *self.rank_exports()]:
            environment[key] = value
        environment.setdefault('SLURM_KILL_BAD_EXIT', '1')
        return cmd + ['--export=ALL'] + self.helper_cmd()

    def forwarded_signal(self, sig: int) -> int:
        return int(signal.SIGTERM) if sig in (signal.SIGINT, signal.SIGQUIT) else sig
