"""Core binding for ``--bind_cores_to_rank``: the ``numactl`` prefix for one local rank.

Behaviour (core split, NUMA node choice, flat-HBM ``-p``, fake-NUMA ``-m a,b``, the ``-C``
list format and the error texts) follows DeepSpeed's ``deepspeed/utils/numa.py`` (spec
section 8.7, ``numactl_cases.json``). The machine topology is a parameter so tests can feed
the vectors' topologies; the default reads ``numactl --hardware`` and the physical core count
only when first needed.
"""

from __future__ import annotations

import functools
import importlib
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from .errors import CoreBindingError

__all__ = [
    'StaticTopology',
    'SystemTopology',
    'Topology',
    'format_core_list',
    'get_numactl_cmd',
    'parse_numactl_hardware',
    'parse_range_list',
]

# Far above any real machine; keeps "0-99999999999" from exhausting memory.
MAX_CORES = 1 << 20

_KMP_AFFINITY_CONFLICT = (
    'Environment variable KMP_AFFINITY conflicts with numactl because it interfere with how many CPU cores '
    'numactl can set. Unset KMP_AFFINITY before launching deepspeed.\n\n'
    '\t$ unset KMP_AFFINITY\n'
    '\t$ deepspeed <deepspeed command parameters>'
)


class Topology(Protocol):
    """What core binding needs to know about the machine."""

    @property
    def numa_cores(self) -> Sequence[Sequence[int]]:
        """CPU ids of NUMA node ``i`` at index ``i``; ``[]`` for a memory-only (HBM) node."""
        ...

    @property
    def physical_cores(self) -> int:
        """Physical core count, used when no ``--bind_core_list`` is given."""
        ...


@dataclass(frozen=True)
class StaticTopology:
    """A fixed topology (tests, or a caller that already probed the machine)."""

    numa_cores: Sequence[Sequence[int]]
    physical_cores: int


class SystemTopology:
    """This machine's topology, probed lazily: nothing runs until an attribute is read."""

    @functools.cached_property
    def numa_cores(self) -> list[list[int]]:
        numactl = shutil.which('numactl')
        if numactl is None:  # no numactl: no NUMA memory binding, only -C (as with DeepSpeed)
            return []
        try:
            out = subprocess.run([numactl, '--hardware'], capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return []
        return parse_numactl_hardware(out.stdout)

    @functools.cached_property
    def physical_cores(self) -> int:
        return physical_core_count()


def physical_core_count() -> int:
    """Physical cores of this machine: psutil if installed, else /proc/cpuinfo, else logical CPUs."""
    try:
        psutil = importlib.import_module('psutil')  # lazy: not on the CLI start path
    except ImportError:
        pass
    else:
        physical = psutil.cpu_count(logical=False)
        if physical:
            return int(physical)
    count = _cpuinfo_core_count()
    if count:
        return count
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def _cpuinfo_core_count(path: str = '/proc/cpuinfo') -> int:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo; 0 when unknown."""
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            text = f.read()
    except OSError:
        return 0
    cores = set()
    for block in text.split('\n\n'):
        fields = dict(line.split(':', 1) for line in block.splitlines() if ':' in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if 'core id' in fields:
            cores.add((fields.get('physical id', '0'), fields['core id']))
    return len(cores)


def parse_numactl_hardware(text: str) -> list[list[int]]:
    """CPU lists per NUMA node from ``numactl --hardware`` output.

    Nodes ``0..available-1`` are looked up by their ``node N cpus:`` line, in that order;
    a node without CPUs (HBM) gives ``[]``.
    """
    count = 0
    cpus_by_node: dict[int, list[int]] = {}
    for line in text.splitlines():
        words = line.split()
        if line.startswith('available:') and len(words) > 1 and words[1].isdecimal():
            count = int(words[1])
        elif len(words) >= 3 and words[0] == 'node' and words[2] == 'cpus:' and words[1].isdecimal():
            cpus_by_node[int(words[1])] = [int(w) for w in words[3:] if w.isdecimal()]
    return [cpus_by_node[node] for node in range(count) if node in cpus_by_node]


def parse_range_list(spec: str) -> list[int]:
    """Expand ``"0,2-4,6"`` into ``[0, 2, 3, 4, 6]``.

    Sub-ranges are ``N`` or ``A-B`` (inclusive, ``A <= B``) and must be strictly ascending
    and disjoint; numbers are read with Python's ``int`` (so ``" 1 - 3"`` is fine).
    """
    numbers: list[int] = []
    last = -1  # DeepSpeed starts here too, so a leading negative number counts as "not ascending"
    for part in spec.split(','):
        sub = _parse_range(part, spec)
        if sub[0] <= last:
            raise CoreBindingError(
                f"Bad range: '{spec}', sub ranges must not overlap with each other and should be in ascend order"
            )
        last = sub[-1]
        if len(numbers) + (sub.stop - sub.start) > MAX_CORES:
            raise CoreBindingError(f"Bad range: '{spec}', more than {MAX_CORES} cores")
        numbers.extend(sub)
    return numbers


def _parse_range(part: str, spec: str) -> range:
    try:
        single = int(part)
    except ValueError:
        pass
    else:
        return range(single, single + 1)
    ends = part.split('-')
    if len(ends) != 2:
        raise CoreBindingError(f"Bad range: '{part}', range must be either a number or two number separated by dash")
    try:
        start, end = int(ends[0]), int(ends[1])
    except ValueError:
        where = '' if part == spec else f" in '{spec}'"
        raise CoreBindingError(f"Bad range: '{part}'{where}, both ends of a range must be integers") from None
    if start > end:
        raise CoreBindingError(f"Bad range: '{part}', range end must larger than or equal to start")
    return range(start, end + 1)


def get_numactl_cmd(
    bind_core_list: str | None,
    num_local_procs: int,
    local_rank: int,
    *,
    topology: Topology | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[int, list[str]]:
    """``(cores_per_rank, ["numactl", ...])`` for local rank ``local_rank`` of ``num_local_procs``.

    Cores are split evenly in order (leftovers unused). ``-m``/``-p`` is added when all of the
    rank's cores sit in one NUMA node (or fake-NUMA group); the caller sets
    ``OMP_NUM_THREADS=cores_per_rank`` for the child.
    """
    env = os.environ if environ is None else environ
    if 'KMP_AFFINITY' in env:
        raise CoreBindingError(_KMP_AFFINITY_CONFLICT)
    topo: Topology = SystemTopology() if topology is None else topology

    cores: Sequence[int]
    if bind_core_list is not None:
        cores = parse_range_list(bind_core_list)
    else:
        cores = range(topo.physical_cores)
    if num_local_procs <= 0:
        raise CoreBindingError(f'Cannot bind cores for {num_local_procs} local processes')
    per_rank = len(cores) // num_local_procs
    if per_rank < 1:
        raise CoreBindingError('At least one core needs to be assigned to each rank')
    if not 0 <= local_rank < num_local_procs:
        raise CoreBindingError(f'Local rank {local_rank} is outside 0..{num_local_procs - 1}; no cores to bind')
    mine = list(cores[per_rank * local_rank : per_rank * (local_rank + 1)])

    cmd = ['numactl', *_memory_binding(mine, topo.numa_cores), '-C', format_core_list(mine)]
    return per_rank, cmd


def _memory_binding(cores: Sequence[int], numa_cores: Sequence[Sequence[int]]) -> list[str]:
    """``-m``/``-p`` flags for a rank whose CPUs are ``cores``; ``[]`` if they span nodes."""
    wanted = set(cores)
    holders = [node for node, cpus in enumerate(numa_cores) if wanted <= set(cpus)]
    cpu_nodes = [node for node, cpus in enumerate(numa_cores) if cpus]
    memory_nodes = [node for node, cpus in enumerate(numa_cores) if not cpus]

    if memory_nodes and len(memory_nodes) == len(cpu_nodes):
        # Flat-mode HBM: the k-th CPU node's high-bandwidth memory is the k-th CPU-less node.
        hbm_of = dict(zip(cpu_nodes, memory_nodes))
        return ['-p', str(hbm_of[holders[0]])] if holders else []

    groups = _fake_numa_groups(numa_cores)
    if groups:
        for node in holders:
            for group in groups:
                if node in group:
                    return ['-m', ','.join(str(n) for n in group)]
        return []

    return ['-m', str(holders[0])] if holders else []


def _fake_numa_groups(numa_cores: Sequence[Sequence[int]]) -> list[list[int]]:
    """Runs of CPU nodes whose CPU lists repeat the previous CPU node's (fake NUMA)."""
    groups: list[list[int]] = []
    run: list[int] = []
    previous: Sequence[int] | None = None
    for node, cpus in enumerate(numa_cores):
        if cpus:
            if previous is not None and list(cpus) == list(previous):
                if not run:
                    run.append(node - 1)
                run.append(node)
            elif run:
                groups.append(run)
                run = []
        # As DeepSpeed: a CPU-less node is the "previous" one too, so it breaks a run of duplicates.
        previous = cpus
    if run:
        groups.append(run)
    return groups


def format_core_list(cores: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"`` (ascending input)."""
    pieces: list[str] = []
    start = prev = None
    for core in cores:
        if prev is not None and core == prev + 1:
            prev = core
            continue
        if start is not None:
            pieces.append(str(start) if start == prev else f'{start}-{prev}')
        start = prev = core
    if start is not None:
        pieces.append(str(start) if start == prev else f'{start}-{prev}')
    return ','.join(pieces)
