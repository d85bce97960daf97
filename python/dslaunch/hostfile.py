"""The hostfile and the ``--include``/``--exclude``/``--num_nodes``/``--num_gpus`` filters.

Grammar and error texts follow DeepSpeed 0.19.8 (spec sections 4 and 5, 0.19.7+ filter
semantics). Host order is file order everywhere because it later fixes rank order.
Where DeepSpeed dies with an internal exception (``too many values to unpack``,
``invalid literal for int()``, ``MemoryError`` or ``OverflowError`` on a huge slot count) we raise a
``ResourceFilterError`` that says what is wrong instead (docs/compatibility.md). Echoed user
text has its line-breaking characters escaped (``errors.one_line``: DeepSpeed's text otherwise) so
every message is one line.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Mapping, Sequence

from .errors import HostfileError, ResourceFilterError, one_line

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs the CLI start-up time
if TYPE_CHECKING:
    import logging

__all__ = [
    'MAX_SLOTS_PER_HOST',
    'NO_HOSTFILE',
    'apply_num_nodes_and_gpus',
    'fetch_hostfile',
    'parse_hostfile',
    'parse_hostfile_lines',
    'parse_inclusion_exclusion',
    'parse_node_config_list',
    'parse_resource_filter',
]

# A slot is a device id: an int, or (CUDA_VISIBLE_DEVICES UUID entries) a string.
Slot = int | str
SlotList = Sequence[Slot]

# `host slots=N`; \S, \s and \d are Unicode-aware exactly as in DeepSpeed's `re.search`. Compiled on
# first use (re caches it), not at import: most launches have no hostfile.
_HOST_LINE = r'^(\S+)\s+slots=(\d+)'

# Slot lists are built in memory; beyond this a host cannot be launched anyway, and
# materialising ``range(10**19)`` would only end in MemoryError.
MAX_SLOTS_PER_HOST = 1 << 20

NO_HOSTFILE = 'No hostfile at %s; using the resources of this machine only.'
_BAD_ENTRY = 'Hostfile contains a bad entry: {}, unable to proceed with launching'
_DUPLICATE = 'Hostfile contains multiple entries for {}, unable to proceed with launching'
_EMPTY = 'Hostfile is empty or not formatted correctly, unable to proceed with launching.'


def _logger() -> logging.Logger:
    # logging is imported when something is logged, not on the CLI start path (it costs ~5 ms).
    import logging

    return logging.getLogger(__name__)


def fetch_hostfile(path: str | os.PathLike[str], *, warn: bool = True) -> dict[str, int] | None:
    """Read an MPI-style hostfile into ``{host: slots}`` (file order).

    Anything that is not a regular file (missing path, directory) means "no hostfile": the
    caller runs on local resources, so this only logs a warning (unless ``warn`` is False,
    for callers that tell the user themselves) and returns ``None``.
    """
    if not os.path.isfile(path):
        if warn:
            _logger().warning(NO_HOSTFILE, os.fspath(path))
        return None
    try:
        with open(path, encoding='utf-8') as f:  # universal newlines, like DeepSpeed's readlines()
            lines = f.readlines()
    except UnicodeDecodeError as exc:
        raise HostfileError(
            f'Hostfile {os.fspath(path)} is not valid UTF-8 ({exc.reason} at byte {exc.start})'
        ) from None
    except OSError as exc:
        raise HostfileError(f'Cannot read hostfile {os.fspath(path)}: {exc.strerror or exc}') from None
    return parse_hostfile_lines(lines)


def parse_hostfile(text: str) -> dict[str, int]:
    """Parse hostfile text, splitting lines the way reading the file would (universal newlines)."""
    return parse_hostfile_lines(io.StringIO(text, newline=None))


def parse_hostfile_lines(lines: Iterable[str]) -> dict[str, int]:
    """Parse hostfile lines (as ``readlines()`` returns them) into ``{host: slots}``."""
    raw = list(lines)
    pool: dict[str, int] = {}
    for raw_line in raw:
        line = raw_line.strip()
        if not line or line.startswith('#'):  # comments only as whole lines
            continue
        match = re.search(_HOST_LINE, line)
        if match is None:
            _log_bad_hostfile(raw)
            raise HostfileError(_BAD_ENTRY.format(one_line(line)))
        host = match.group(1)
        try:  # before the duplicate check, whose error DeepSpeed gives only for a count it could read
            slots = int(match.group(2))  # arbitrary precision: 20-digit counts parse fine
        except ValueError as exc:  # more than sys.get_int_max_str_digits() digits: DeepSpeed's ValueError text
            raise HostfileError(str(exc)) from None
        if host in pool:
            _log_bad_hostfile(raw)
            raise HostfileError(_DUPLICATE.format(one_line(host)))
        pool[host] = slots
    if not pool:
        _log_bad_hostfile(raw)
        raise HostfileError(_EMPTY)
    return pool


def _log_bad_hostfile(lines: list[str]) -> None:
    # Debug only: the raised error is the one line the user sees (DeepSpeed logs this at ERROR).
    _logger().debug('Rejected hostfile contents: %r', lines)


def parse_node_config_list(spec: str) -> dict[str, list[int]]:
    """Parse ``NAME[:SLOT[,SLOT...]][@NAME...]`` into ``{host: sorted unique slots}``.

    A bare ``NAME`` contributes no slots (``[]`` = the whole host); pieces naming the same
    host are merged, so ``a@a:1`` is ``{a: [1]}`` exactly as in DeepSpeed.
    """
    merged: dict[str, list[int]] = {}
    for piece in spec.split('@'):
        if ':' not in piece:
            merged.setdefault(piece, [])
            continue
        parts = piece.split(':')
        if len(parts) != 2:
            raise ResourceFilterError(
                f"Bad node spec '{one_line(piece)}' in '{one_line(spec)}': "
                "expected NAME or NAME:SLOT[,SLOT...] with one ':'"
            )
        host, slot_text = parts
        slots = merged.setdefault(host, [])
        for token in slot_text.split(','):
            try:
                slots.append(int(token))  # Python int(): surrounding spaces are fine, as in DeepSpeed
            except ValueError:
                raise ResourceFilterError(
                    f"Bad slot '{one_line(token)}' for host '{one_line(host)}' in '{one_line(spec)}': "
                    'slots must be integers'
                ) from None
    return {host: sorted(set(slots)) for host, slots in merged.items()}


def parse_resource_filter(
    host_info: Mapping[str, SlotList], include_str: str = '', exclude_str: str = ''
) -> Mapping[str, SlotList]:
    """Apply ``--include`` or ``--exclude`` to ``{host: slots}``.

    With neither filter the same object is returned. The result keeps ``host_info``'s
    host order and drops hosts left without slots.
    """
    if include_str and exclude_str:
        raise ResourceFilterError('include_str and exclude_str are mutually exclusive.')
    if not include_str and not exclude_str:
        return host_info

    including = bool(include_str)
    requested = parse_node_config_list(include_str if including else exclude_str)
    for host, slots in requested.items():
        if host not in host_info:
            raise ResourceFilterError(f"Hostname '{one_line(host)}' not found in hostfile")
        for slot in slots:
            if slot not in host_info[host]:
                raise ResourceFilterError(f"No slot '{slot}' specified on host '{one_line(host)}'")

    chosen: dict[str, SlotList] = {}
    if including:
        for host, slots in requested.items():
            chosen[host] = slots if slots else host_info[host]
    else:
        chosen = dict(host_info)
        for host, slots in requested.items():
            if not slots:
                chosen[host] = []
                continue
            pending = set(slots)
            _check_size(host, _size(host_info[host]))
            _logger().debug('excluding slots %s of %s', slots, host)
            kept: list[Slot] = []
            for s in host_info[host]:
                if s in pending:  # like DeepSpeed's list.remove: only the first occurrence goes
                    pending.discard(s)
                else:
                    kept.append(s)
            chosen[host] = kept

    result: dict[str, SlotList] = {}
    for host in host_info:  # host_info order, not filter order
        if host in chosen and _size(chosen[host]) > 0:
            result[host] = _unique(chosen[host])
    return result


def parse_inclusion_exclusion(
    resource_pool: Mapping[str, int], inclusion: str = '', exclusion: str = ''
) -> dict[str, list[int]]:
    """Turn a hostfile pool into active resources ``{host: [slot, ...]}`` (0.19.7+ semantics).

    Every host starts with slots ``0..n-1``; the filter then picks from those.
    """
    # range objects keep "slot in host" O(1) and let a 20-digit pool be filtered without
    # building a list; only what survives the filter is turned into lists.
    host_info: dict[str, SlotList] = {host: range(count) for host, count in resource_pool.items()}
    active = parse_resource_filter(host_info, inclusion, exclusion)
    return {host: _as_list(host, slots) for host, slots in active.items()}


def apply_num_nodes_and_gpus(active: Mapping[str, SlotList], num_nodes: int, num_gpus: int) -> dict[str, list[Slot]]:
    """Keep the first ``num_nodes`` hosts and give every host slots ``0..num_gpus-1``.

    Values ``<= 0`` mean "no limit". Like DeepSpeed, ``num_gpus`` is not checked against
    the hosts' slots here; ``runner.plan`` does that check.
    """
    hosts = list(active)
    if num_nodes > 0:
        hosts = hosts[:num_nodes]
    if num_gpus > 0:
        _check_size('every host', num_gpus)
        return {host: list(range(num_gpus)) for host in hosts}
    out: dict[str, list[Slot]] = {}
    for host in hosts:
        _check_size(host, _size(active[host]))
        out[host] = list(active[host])
    return out


def _unique(slots: SlotList) -> SlotList:
    if isinstance(slots, range):
        return slots
    seen: set[Slot] = set()
    out: list[Slot] = []
    for slot in slots:
        if slot not in seen:
            seen.add(slot)
            out.append(slot)
    return out


def _as_list(host: str, slots: SlotList) -> list[int]:
    _check_size(host, _size(slots))
    return [int(s) for s in slots]


def _size(slots: SlotList) -> int:
    # len() of a range past sys.maxsize raises OverflowError; the arithmetic does not.
    if isinstance(slots, range):
        return max(0, (slots.stop - slots.start + slots.step - (1 if slots.step > 0 else -1)) // slots.step)
    return len(slots)


def _check_size(host: str, count: int) -> None:
    if count > MAX_SLOTS_PER_HOST:
        raise ResourceFilterError(
            f'{count} slots requested on {host!s}; dslaunch launches at most {MAX_SLOTS_PER_HOST} ranks per host'
        )
