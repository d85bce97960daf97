"""Differential property tests: dslaunch's pure parsers against DeepSpeed's own functions.

The installed ``deepspeed`` package is the oracle, called at test time on the same
hypothesis-generated input as dslaunch (nothing of DeepSpeed is copied here):

- ``deepspeed.launcher.runner``: ``_parse_hostfile``/``fetch_hostfile``, ``parse_node_config``,
  ``parse_node_config_list``, ``parse_resource_filter``, ``parse_inclusion_exclusion``,
  ``apply_num_nodes_and_gpus``, ``encode_world_info``, against ``dslaunch.hostfile``/``world_info``;
- the ``--world_info`` decoding of ``deepspeed.launcher.launch.main`` (run up to the point where it
  has the decoded value), against ``dslaunch.world_info.decode_world_info``;
- ``deepspeed.utils.numa``: ``parse_range_list``, ``get_numactl_cmd`` and ``get_numa_cores``, with
  its machine probes (``numactl --hardware``, ``psutil``, the package check) replaced by the
  generated topology, against ``dslaunch.numa`` with a ``StaticTopology``.

The contract, for every input:

1. DeepSpeed returns a value: dslaunch returns the same value, in the same host order.
2. DeepSpeed raises (any exception): dslaunch raises a ``DslaunchError``; where DeepSpeed's error is
   one of its own messages (not an internal crash such as ``invalid literal for int()``), dslaunch's
   text is DeepSpeed's, with line-breaking characters escaped where docs/compatibility.md says so.
3. dslaunch refuses what DeepSpeed accepts only in a case docs/compatibility.md lists; each test
   spells out the documented cases it allows (e.g. ``_documented_world_info_shape``), anything else
   fails.

DeepSpeed's list-building is guarded (a module-level ``range`` that refuses more than
``MAX_SLOTS_PER_HOST`` items) so a generated ``0-99999999999`` cannot exhaust memory; where the guard
trips, dslaunch must refuse the input (the documented 2^20 limits).
"""

from __future__ import annotations

import base64
import builtins
import io
import itertools
import json
import locale
import sys
import tempfile
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

deepspeed = pytest.importorskip('deepspeed', reason='the differential tests need DeepSpeed as the oracle')
hypothesis = pytest.importorskip('hypothesis')
from deepspeed.launcher import launch as ds_launch
from deepspeed.launcher import runner as ds_runner
from deepspeed.utils import numa as ds_numa
from dslaunch import hostfile, numa, world_info
from dslaunch.errors import (
    CoreBindingError,
    DslaunchError,
    HostfileError,
    ResourceFilterError,
    WorldInfoError,
    one_line,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

# No deadline/too_slow checks: other suites run next to this one on a loaded machine.
# Derandomized: the same examples every run, so the suite never fails on an example an earlier
# run did not try (runs of 2,000-4,000 random examples per test found nothing more).
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

LIMIT = hostfile.MAX_SLOTS_PER_HOST
assert numa.MAX_CORES == LIMIT  # the guard below stands for both documented limits

# DeepSpeed's crashes on malformed --include/--exclude that dslaunch reports in its own words, naming the
# spec (docs/compatibility.md); 'Exceeds the limit' is int() refusing a slot of more than 4300 digits.
INTERNAL_CRASH = (
    'invalid literal for int()',
    'too many values to unpack',
    'not enough values to unpack',
    'Exceeds the limit',
)


class _TooBig(Exception):
    """DeepSpeed was about to build a list of more than LIMIT items."""


class _Decoded(Exception):
    """launch.main() has decoded --world_info; carries the value."""

    def __init__(self, value: Any) -> None:
        super().__init__('decoded')
        self.value = value


def _guarded_range(*args: int) -> range:
    r = builtins.range(*args)
    if hostfile._size(r) > LIMIT:  # not len(): it overflows past sys.maxsize
        raise _TooBig(f'range{args}')
    return r


@pytest.fixture(scope='module', autouse=True)
def _deepspeed_sandbox() -> Iterator[None]:
    """DeepSpeed quiet, without its machine probes, and unable to build huge lists (undone after the module)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ds_runner, 'range', _guarded_range, raising=False)
        mp.setattr(ds_numa, 'range', _guarded_range, raising=False)
        mp.setattr(ds_numa, 'check_for_numactl_pkg', lambda: True)  # would run dpkg/rpm
        mp.setattr(ds_launch, 'set_log_level_from_string', lambda *a, **k: None)
        mp.setattr(ds_runner.logger, 'disabled', True)
        yield


def _outcome(fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
    """(True, value) or (False, exception): DeepSpeed's answer, whatever it raises (sys.exit too)."""
    try:
        return True, fn(*args)
    except _TooBig:
        raise
    except (Exception, SystemExit) as exc:  # noqa: BLE001 (the oracle's answer is whatever it raised)
        return False, exc


def _outcome_guarded(fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
    """As _outcome, with the guard's _TooBig as DeepSpeed's exception (it stands for MemoryError or a hang)."""
    try:
        return _outcome(fn, *args)
    except _TooBig as exc:
        return False, exc


def _items(mapping: Any) -> list[tuple[Any, Any]]:
    """Comparable form of {host: slots}: host order, slot counts or lists (OrderedDict, dict, ranges alike)."""
    return [(host, slots if isinstance(slots, int) else list(slots)) for host, slots in mapping.items()]


def _check_same_error(
    theirs: BaseException, ours: BaseException, expected_type: type[DslaunchError], spec: str, internal: tuple[str, ...]
) -> None:
    assert isinstance(ours, expected_type), (
        f'DeepSpeed: {theirs!r}; dslaunch: {ours!r} is not a {expected_type.__name__}'
    )
    text = str(theirs)
    if type(theirs) is ValueError and not any(crash in text for crash in internal):
        assert str(ours) == one_line(text), f'DeepSpeed said {text!r}'
    else:
        # Documented: DeepSpeed's internal crash becomes a message that names the user's input.
        assert one_line(spec) in str(ours), f'DeepSpeed: {theirs!r}; dslaunch: {ours!r}'


# --------------------------------------------------------------------------------------------
# Hostfile

host_names = st.sampled_from(
    ['worker-0', 'worker-1', 'node01', 'localhost', '10.0.0.7', 'gpu.example.com', 'a', 'B', '\u00e9t\u00e9', 'n\u0663']
) | st.text(st.characters(blacklist_categories=('Cs',), blacklist_characters='\n\r'), min_size=1, max_size=8)
slot_counts = st.integers(0, 16).map(str) | st.sampled_from(
    ['007', '\u0663', '\uff18', '12345678901234567890', '9' * 4301, '', '-1', '+2', '2x', '1_0', '0x10']
)
separators = st.sampled_from([' ', '\t', '  ', ' \t', '\u00a0', '\u3000', '\x1f', '', '='])
newlines = st.sampled_from(['\n', '\r\n', '\r', '\x0b', '\x0c', '\x1c', '\x85', '\u2028'])


@st.composite
def hostfile_lines(draw: st.DrawFn) -> list[str]:
    """Realistic hostfile lines: entries, comments, blanks, duplicates, and broken entries."""
    hosts = draw(st.lists(host_names, min_size=1, max_size=4))
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(['entry', 'entry', 'entry', 'comment', 'blank', 'garbage']))
        indent = draw(st.sampled_from(['', ' ', '\t', '\u2003']))
        if kind == 'entry':
            slots = draw(st.sampled_from(['slots=', 'slots = ', 'Slots=', 'slot=', 'max_slots=']) | st.just('slots='))
            tail = draw(st.sampled_from(['', ' ', ' # gpu box', 'x', ' max_slots=8', '\t']))
            line = f'{indent}{draw(st.sampled_from(hosts))}{draw(separators)}{slots}{draw(slot_counts)}{tail}'
        elif kind == 'comment':
            line = f'{indent}#{draw(st.text(max_size=10))}'
        elif kind == 'blank':
            line = draw(st.sampled_from(['', ' ', '\t', '\u00a0', '\x1e']))
        else:
            line = draw(st.text(st.sampled_from(list('ab0 #=:@\tslot\u0663')), max_size=12))
        lines.append(line)
    return [line + draw(newlines) for line in lines]


def _check_hostfile(theirs: tuple[bool, Any], parse: Callable[[], Any]) -> None:
    try:
        ours = parse()
    except DslaunchError as exc:
        assert not theirs[0], f'DeepSpeed accepts {_items(theirs[1])}; dslaunch: {exc!r}'
        _check_same_error(theirs[1], exc, HostfileError, '', internal=())  # every text is DeepSpeed's
        return
    assert theirs[0], f'DeepSpeed: {theirs[1]!r}; dslaunch accepts {ours}'
    assert _items(ours) == _items(theirs[1])
    assert all(type(n) is int for n in ours.values())


@SETTINGS
@given(hostfile_lines() | st.lists(st.text(max_size=20).map(lambda s: s + '\n'), max_size=4))
@example(['worker-0 slots=4\n', '#worker-1 slots=4\n', 'worker-2\tslots=2 # two\n', '\n'])
@example(['worker-0 slots=4\n', '  worker-0 slots=2\n'])
@example(['worker-0 slots=12345678901234567890\n'])
@example(['\ufeffworker-0 slots=2\n'])
@example(['w\u2028x slots=2\n'])
@example([' \x85 \n', 'a slots=1\x1c\n'])
@example(['w slots=1\n', 'w slots=' + '9' * 4301 + '\n'])  # DeepSpeed converts the count before the duplicate check
def test_hostfile_lines_match_deepspeed(lines):
    _check_hostfile(_outcome(ds_runner._parse_hostfile, lines), lambda: hostfile.parse_hostfile_lines(lines))


@pytest.mark.skipif(
    locale.getpreferredencoding(False).replace('-', '').lower() != 'utf8',
    reason="DeepSpeed reads the hostfile in the locale's encoding; the comparison needs UTF-8",
)
@SETTINGS
@given(hostfile_lines().map(''.join) | st.text(st.characters(blacklist_categories=('Cs',)), max_size=60))
@example('worker-0 slots=2\r\nworker-1 slots=2\rworker-2 slots=1\n')
@example('a slots=1\x0bb slots=2\n')
@example('w slots=1\nw slots=' + '9' * 4301 + '\n')  # DeepSpeed converts the count before the duplicate check
def test_hostfile_files_match_deepspeed(text):
    with tempfile.TemporaryDirectory(prefix='dsdiff-') as tmp:
        path = Path(tmp, 'hostfile')
        path.write_bytes(text.encode('utf-8'))
        theirs = _outcome(ds_runner.fetch_hostfile, str(path))
        _check_hostfile(theirs, lambda: hostfile.fetch_hostfile(path))
    _check_hostfile(theirs, lambda: hostfile.parse_hostfile(text))


def test_fetch_hostfile_without_a_file_matches_deepspeed(tmp_path):
    for path in (tmp_path / 'absent', tmp_path, tmp_path / 'nul\0byte'):
        assert ds_runner.fetch_hostfile(str(path)) is None
        assert hostfile.fetch_hostfile(str(path), warn=False) is None


def test_undecodable_hostfile_is_a_hostfile_error_where_deepspeed_crashes(tmp_path):
    path = tmp_path / 'hostfile'
    path.write_bytes(b'worker-\xff slots=2\n')
    ok, exc = _outcome(ds_runner.fetch_hostfile, str(path))
    assert not ok and isinstance(exc, UnicodeDecodeError)
    with pytest.raises(HostfileError, match='not valid UTF-8'):  # documented: names the file
        hostfile.fetch_hostfile(path)


# --------------------------------------------------------------------------------------------
# --include / --exclude / --num_nodes / --num_gpus

pool_hosts = st.sampled_from(['worker-0', 'worker-1', 'w2', 'localhost', 'n\u0663', '\u00e9', 'a:b', 'x@y', ' ', ''])
pools = st.dictionaries(pool_hosts, st.integers(0, 6), min_size=1, max_size=4)
slot_tokens = st.integers(-2, 8).map(str) | st.sampled_from(
    ['', ' 1', '1 ', '+2', '1_0', '\u0663', '\uff11', 'a', '0x1', '9' * 30, '9' * 4301, '1.0', '-0', '0:1']
)


@st.composite
def node_specs(draw: st.DrawFn, hosts: list[str]) -> str:
    """``host[:slot,...]`` pieces joined by '@': known and unknown hosts, odd slots, empty pieces."""
    pieces = []
    for _ in range(draw(st.integers(1, 4))):
        host = draw(st.sampled_from(hosts) | pool_hosts | st.sampled_from(['', 'ghost', 'WORKER-0']))
        form = draw(st.sampled_from(['bare', 'slots', 'slots', 'colon', 'double']))
        if form == 'bare':
            pieces.append(host)
        elif form == 'colon':
            pieces.append(f'{host}:')
        else:
            tokens = draw(st.lists(slot_tokens, min_size=1, max_size=4))
            extra = ':0' if form == 'double' else ''
            pieces.append(f'{host}:{",".join(tokens)}{extra}')
    return '@'.join(pieces)


free_specs = st.text(st.sampled_from(list('ab01:,@ -x9\u0663\t')), max_size=25) | st.text(max_size=15)


@SETTINGS
@given(node_specs(['worker-0', 'worker-1']) | free_specs)
@example('worker-0:0,1@worker-1')
@example('a@a:1')
@example('a:3,1,3@b@a:2')
@example('a:1:2')
@example('a: 1 ,+2')
@example('@')
@example('a:\u0663')
def test_node_config_list_matches_deepspeed(spec):
    theirs = _outcome(ds_runner.parse_node_config_list, spec)
    ours = _check_filter(theirs, lambda: hostfile.parse_node_config_list(spec), spec)
    if ours is not None and '@' not in spec:
        # dslaunch has no parse_node_config of its own: one piece is the whole list
        ok, piece = _outcome(ds_runner.parse_node_config, spec)
        assert ok and ours == {piece[0]: sorted(set(piece[1]))}


def _check_filter(theirs: tuple[bool, Any], run: Callable[[], Any], spec: str) -> Any:
    """DeepSpeed's outcome and dslaunch's `run()` agree: the same value (returned), or both refuse
    (None), dslaunch with DeepSpeed's error text."""
    try:
        ours = run()
    except DslaunchError as exc:
        assert not theirs[0], f'DeepSpeed accepts {_items(theirs[1])}; dslaunch: {exc!r}'
        _check_same_error(theirs[1], exc, ResourceFilterError, spec, INTERNAL_CRASH)
        return None
    assert theirs[0], f'DeepSpeed: {theirs[1]!r}; dslaunch accepts {ours}'
    assert _items(ours) == _items(theirs[1])
    return ours


@SETTINGS
@given(pools, st.data())
@example({'worker-0': 4, 'worker-1': 4}, None)
def test_inclusion_exclusion_matches_deepspeed(pool, data):
    if data is None:  # the explicit example: the README's own filter line
        include, exclude = 'worker-0@worker-1:0,2', ''
    else:
        spec = data.draw(node_specs(list(pool)) | free_specs | st.just(''), label='spec')
        include, exclude = data.draw(
            st.sampled_from([(spec, ''), ('', spec), (spec, spec), (spec, 'worker-0')]), label='include, exclude'
        )
    pool = OrderedDict(pool)
    theirs = _outcome(ds_runner.parse_inclusion_exclusion, pool, include, exclude)
    _check_filter(theirs, lambda: hostfile.parse_inclusion_exclusion(pool, include, exclude), include or exclude)


host_infos = st.dictionaries(
    pool_hosts, st.lists(st.integers(0, 5) | st.sampled_from(['GPU-8a3b', 'MIG-1']), max_size=5), min_size=1, max_size=4
)


@SETTINGS
@given(host_infos, st.data())
@example({'a': [0, 0, 1], 'b': [2, 1, 0]}, None)
def test_resource_filter_matches_deepspeed(host_info, data):
    if data is None:
        include, exclude = '', 'a:0@b'
    else:
        spec = data.draw(node_specs(list(host_info)) | st.just(''), label='spec')
        include, exclude = data.draw(st.sampled_from([(spec, ''), ('', spec)]), label='include, exclude')
    host_info = OrderedDict(host_info)
    theirs = _outcome(ds_runner.parse_resource_filter, host_info, include, exclude)
    ours_input = {host: list(slots) for host, slots in host_info.items()}
    _check_filter(theirs, lambda: hostfile.parse_resource_filter(ours_input, include, exclude), include or exclude)
    assert ours_input == host_info  # neither side mutates the caller's lists


limits = st.integers(-3, 6) | st.sampled_from([0, 10**30, -(10**30)])


@SETTINGS
@given(st.dictionaries(pool_hosts, st.lists(st.integers(0, 7), max_size=4), max_size=4), limits, limits)
@example({'a': [0, 1], 'b': [3]}, 1, 4)
@example({'a': [2, 3], 'b': []}, 0, -1)
@example({}, 0, 10**30)  # DeepSpeed: {} (no host to give slots to); dslaunch: the documented refusal
def test_num_nodes_and_gpus_match_deepspeed(active, num_nodes, num_gpus):
    active = OrderedDict(active)
    theirs = _outcome_guarded(ds_runner.apply_num_nodes_and_gpus, active, num_nodes, num_gpus)
    try:
        ours = hostfile.apply_num_nodes_and_gpus(active, num_nodes, num_gpus)
    except DslaunchError as exc:
        # documented: --num_gpus above 2^20 is refused (DeepSpeed: OverflowError or a huge list per host;
        # with no host left it returns {}); nothing else may be refused
        assert isinstance(exc, ResourceFilterError) and num_gpus > LIMIT, f'DeepSpeed: {theirs[1]!r}; dslaunch: {exc!r}'
        return
    assert theirs[0], f'DeepSpeed: {theirs[1]!r}; dslaunch: {ours}'
    assert _items(ours) == _items(theirs[1])


def test_more_than_the_slot_limit_is_a_documented_refusal():
    # DeepSpeed lists the slots (no limit); docs/compatibility.md: "at most 1048576 ranks per host".
    # (With any filter DeepSpeed's duplicate removal runs over every host, quadratic: not run here.)
    pool = OrderedDict(big=LIMIT + 1, small=2)
    ok, value = _outcome(_unguarded(ds_runner.parse_inclusion_exclusion), pool, '', '')
    assert ok and len(value['big']) == LIMIT + 1 and value['small'] == [0, 1]
    with pytest.raises(ResourceFilterError, match='at most 1048576 ranks per host'):
        hostfile.parse_inclusion_exclusion(pool, '', '')


@pytest.mark.parametrize(
    'include, expected',
    [('big:5,7', {'big': [5, 7]}), ('small', {'small': [0, 1]}), ('small:1@big:0', {'big': [0], 'small': [1]})],
)
def test_a_twenty_digit_pool_is_filtered_where_deepspeed_overflows(include, expected):
    pool = OrderedDict(big=10**19, small=2)
    ok, exc = _outcome(_unguarded(ds_runner.parse_inclusion_exclusion), pool, include, '')
    assert not ok and isinstance(exc, OverflowError)  # DeepSpeed: list(range(10**19)) on every call
    assert hostfile.parse_inclusion_exclusion(pool, include, '') == expected  # documented: never crash
    for include_, exclude in (('', ''), ('', 'small')):  # what has to list the whole host is refused
        with pytest.raises(ResourceFilterError, match='at most'):
            hostfile.parse_inclusion_exclusion(pool, include_, exclude)


def test_num_gpus_above_the_limit_is_a_documented_refusal():
    ok, value = _outcome(_unguarded(ds_runner.apply_num_nodes_and_gpus), {'a': [0]}, 0, LIMIT + 1)
    assert ok and len(value['a']) == LIMIT + 1
    with pytest.raises(ResourceFilterError, match='at most'):
        hostfile.apply_num_nodes_and_gpus({'a': [0]}, 0, LIMIT + 1)


def _unguarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ds_runner, 'range', builtins.range)
            return fn(*args)

    return call


# --------------------------------------------------------------------------------------------
# --world_info

json_scalars = (
    st.integers(-(2**70), 2**70) | st.text(max_size=6) | st.booleans() | st.none() | st.floats(allow_nan=False)
)
slot_lists = st.lists(st.integers(0, 2**40) | st.sampled_from(['GPU-8a3b', 'MIG-1/2', '\u00e9', '\ud800']), max_size=5)
world_infos = st.dictionaries(st.text(max_size=8) | pool_hosts, slot_lists, max_size=4)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@SETTINGS
@given(
    world_infos
    | st.dictionaries(st.text(max_size=5), json_values, max_size=3)
    | st.dictionaries(st.integers(-3, 3) | st.booleans() | st.none() | st.floats(), slot_lists, max_size=3)
)
@example(OrderedDict([('worker-1', [0, 1]), ('worker-0', [2])]))
@example({'h\u00e9': ['GPU-8a3b'], '': [], 'n': [2**64]})
def test_encode_world_info_is_deepspeeds_string(info):
    theirs = ds_runner.encode_world_info(info)
    assert world_info.encode_world_info(info) == theirs
    ok, decoded = _deepspeed_decode(theirs)  # and DeepSpeed's launcher reads dslaunch's string back
    assert ok and decoded == json.loads(json.dumps(info))


def _deepspeed_decode(encoded: str) -> tuple[bool, Any]:
    """What DeepSpeed's launch.py makes of ``--world_info=<encoded>``: run its main() up to json.loads."""

    def loads(raw: Any) -> Any:
        raise _Decoded(json.loads(raw))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, 'argv', ['launch.py', f'--world_info={encoded}', 'train.py'])
        mp.setattr(ds_launch, 'json', types.SimpleNamespace(loads=loads))
        try:
            ds_launch.main()
        except _Decoded as decoded:
            return True, decoded.value
        except SystemExit as exc:  # argparse: the harness is wrong, not the input
            raise AssertionError(f'launch.py did not take --world_info={encoded!r}') from exc
        except Exception as exc:  # noqa: BLE001 (launch.py's answer is whatever it raised)
            return False, exc
    raise AssertionError('launch.main() went past json.loads')


def _documented_world_info_shape(value: Any) -> bool:
    """docs/compatibility.md: the decoded value must be an object of host -> list of device ids."""
    return isinstance(value, dict) and all(
        isinstance(slots, list) and all(isinstance(s, str) or (type(s) is int) for s in slots)
        for slots in value.values()
    )


def _b64(data: bytes, standard: bool = False, strip: bool = False) -> str:
    text = (base64.standard_b64encode if standard else base64.urlsafe_b64encode)(data).decode()
    return text.rstrip('=') if strip else text


encoded_world_infos = st.one_of(
    st.builds(lambda info, std: _b64(json.dumps(info).encode(), std), world_infos, st.booleans()),
    st.builds(lambda value: _b64(json.dumps(value).encode()), json_values),
    st.builds(_b64, st.binary(max_size=24), st.booleans(), st.booleans()),
    st.builds(
        lambda text, enc: _b64(text.encode(enc, 'surrogatepass')),
        st.text(max_size=20),
        st.sampled_from(['utf-8', 'utf-8-sig', 'utf-16', 'utf-32-be']),
    ),
    st.text(st.sampled_from(list('eyJhIjpbMF19=-_+/ \n!\u00e9')), max_size=24),
    st.text(max_size=16),
    st.sampled_from(['e30=\udcff', '\udcffe30=', 'e30=\x00', '\u0660\u0661', '====', 'e30==', 'e===']),
)


@SETTINGS
@given(encoded_world_infos)
@example('None')
@example('')
@example('e30=')  # {}
@example('e30')  # {} without padding
@example('eyJhIjogWzBdfQ==')  # {"a": [0]}
@example('eyJhIjogWzBdfQ')  # same, padding stripped
@example('eyJhIjogIjAxIn0=')  # {"a": "01"}
@example('eyJhIjogWzAuNV19')  # {"a": [0.5]}
@example('eyJhIjogW3RydWVdfQ==')  # {"a": [true]}
@example('W10=')  # []
@example('eyJhIjpbMF0sImEiOlsxXX0=')  # {"a":[0],"a":[1]}: the last wins, in both
@example('e30=\n')
@example('e3\n0=')
@example(_b64(b'{"a": [' + b'9' * 4301 + b']}'))
@example(_b64(b'[' * 100000))
def test_world_info_decoding_matches_launch_py(encoded):
    ok, theirs = _deepspeed_decode(encoded)
    try:
        ours = world_info.decode_world_info(encoded)
    except DslaunchError as exc:
        assert isinstance(exc, WorldInfoError), repr(exc)
        assert '\n' not in str(exc)
        assert not ok or not _documented_world_info_shape(theirs), f'launch.py decodes {theirs!r}; dslaunch: {exc!r}'
        return
    assert ok, f'launch.py: {theirs!r}; dslaunch decodes {ours!r}'
    assert ours == theirs and list(ours) == list(theirs)


# --------------------------------------------------------------------------------------------
# Core binding (--bind_cores_to_rank / --bind_core_list)

range_texts = st.one_of(
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 3)), max_size=5).map(
        lambda parts: ','.join(str(a) if w == 0 else f'{a}-{a + w}' for a, w in parts)
    ),
    st.lists(st.integers(-2, 24), max_size=6).map(lambda xs: ','.join(map(str, xs))),
    st.text(st.sampled_from(list('0123456789,- ')), max_size=20),
    st.sampled_from(['0-1048575', '0-1048576', '0-99999999999', '5-1048580', ' 1 - 3', '+1', '1_0', '\u0663-\u0665']),
    st.text(max_size=8),
)


def _check_numa(
    theirs: tuple[bool, Any], run: Callable[[], Any], spec: str, documented: Callable[[], bool], own_text: bool = True
) -> None:
    try:
        ours = run()
    except DslaunchError as exc:
        assert isinstance(exc, CoreBindingError), repr(exc)
        if theirs[0]:
            assert documented(), f'DeepSpeed accepts {theirs[1]!r}; dslaunch: {exc!r}'
            return
        their_exc = theirs[1]
        text = str(their_exc)
        if isinstance(their_exc, _TooBig):
            assert 'Bad range' in str(exc)  # documented: more than 2^20 cores
        elif 'invalid literal for int()' in text or 'Exceeds the limit' in text:
            assert 'Bad range' in str(exc) and spec in str(exc)  # documented: names the range
        elif own_text and type(their_exc) in (ValueError, AssertionError):
            assert str(exc) == text  # DeepSpeed's own text (an assert becomes a ValueError: documented)
        return
    assert theirs[0], f'DeepSpeed: {theirs[1]!r}; dslaunch accepts {ours!r}'
    assert ours == theirs[1]


@SETTINGS
@given(range_texts)
@example('0,2-4,6')
@example('-1')
@example('4-2')
@example('1-')
@example('0-2,2')
@example('1 2')
@example(' 1 - 3,+5')
@example('9' * 4301)
@example('9' * 4301 + '-1')
def test_range_list_matches_deepspeed(spec):
    theirs = _outcome_guarded(ds_numa.parse_range_list, spec)
    too_many = theirs[0] and len(theirs[1]) > numa.MAX_CORES
    _check_numa(theirs, lambda: numa.parse_range_list(spec), spec, lambda: too_many)


@st.composite
def topologies(draw: st.DrawFn) -> list[list[int]]:
    """numactl --hardware's CPU lists: plain nodes, flat-mode HBM (CPU-less) nodes, fake NUMA copies."""
    total = draw(st.integers(1, 16))
    cuts = sorted(draw(st.sets(st.integers(1, total - 1), max_size=3))) if total > 1 else []
    bounds = [0, *cuts, total]
    nodes = [list(range(a, b)) for a, b in itertools.pairwise(bounds)]
    kind = draw(st.sampled_from(['plain', 'hbm', 'fake', 'mixed', 'none', 'random']))
    if kind == 'hbm':
        nodes += [[] for _ in nodes]
    elif kind == 'fake':
        copies = draw(st.lists(st.integers(1, 3), min_size=len(nodes), max_size=len(nodes)))
        nodes = [node for node, n in zip(nodes, copies) for _ in range(n)]
    elif kind == 'mixed':
        nodes = draw(st.lists(st.sampled_from([*nodes, []]), max_size=5))
    elif kind == 'none':
        nodes = []
    elif kind == 'random':
        nodes = draw(st.lists(st.lists(st.integers(0, 12), max_size=5), max_size=5))
    return nodes


@SETTINGS
@given(
    range_texts | st.none(),
    topologies(),
    st.integers(0, 18),
    st.integers(-1, 5),
    st.integers(-3, 6),
    st.booleans(),
)
@example('0-7', [list(range(8)), [], list(range(8))], 8, 1, 0, False)
@example(None, [[0, 1], [2, 3], [], []], 4, 2, 1, False)
@example(None, [[0, 1, 2, 3], [0, 1, 2, 3]], 4, 2, 1, False)
@example('0-7', [], 8, 3, 3, False)  # a leftover core: DeepSpeed binds rank 3 of 3 to it
@example('0-7', [], 8, 2, -2, False)  # a negative local rank counts from the end in DeepSpeed
@example('0-3', [], 4, 1, 0, True)
def test_numactl_cmd_matches_deepspeed(bind, numa_cores, physical, nprocs, local_rank, kmp):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ds_numa, 'get_numa_cores', lambda: [list(cpus) for cpus in numa_cores])
        mp.setattr(ds_numa, 'psutil', types.SimpleNamespace(cpu_count=lambda logical=True: physical))
        if kmp:
            mp.setenv('KMP_AFFINITY', 'granularity=fine')
        else:
            mp.delenv('KMP_AFFINITY', raising=False)
        theirs = _outcome_guarded(ds_numa.get_numactl_cmd, bind, nprocs, local_rank)
    if bind is None:
        core_count = physical
    else:
        parsed = _outcome_guarded(ds_numa.parse_range_list, bind)
        core_count = len(parsed[1]) if parsed[0] else 0

    def documented() -> bool:
        # docs/compatibility.md: a local rank outside 0..n-1 (DeepSpeed binds a leftover core or counts
        # from the end), and more than 2^20 cores, are CoreBindingErrors.
        return not 0 <= local_rank < nprocs or core_count > numa.MAX_CORES

    topology = numa.StaticTopology(numa_cores, physical)
    environ = {'KMP_AFFINITY': 'granularity=fine'} if kmp else {}

    def run() -> tuple[int, list[str]]:
        return numa.get_numactl_cmd(bind, nprocs, local_rank, topology=topology, environ=environ)

    # no local processes (DeepSpeed: ZeroDivisionError, or its per-rank assert for a negative count) is
    # dslaunch's own message; a count of ranks cannot be negative outside a direct call
    _check_numa(theirs, run, bind or '', documented, own_text=nprocs > 0)


def _numactl_hardware(numa_cores: list[list[int]]) -> str:
    """`numactl --hardware` as numactl prints it (a CPU-less node's line ends after 'cpus:')."""
    n = len(numa_cores)
    out = io.StringIO()
    out.write(f'available: {n} nodes (0-{n - 1})\n' if n > 1 else f'available: {n} nodes (0)\n')
    for node, cpus in enumerate(numa_cores):
        out.write(f'node {node} cpus:{"".join(f" {c}" for c in cpus)}\n')
        out.write(f'node {node} size: 64000 MB\nnode {node} free: 1000 MB\n')
    out.write('node distances:\nnode ' + ''.join(f'{i:4d}' for i in range(n)) + '\n')
    for i in range(n):
        out.write(f'{i:3d}: ' + ''.join(f'{10 if i == j else 21:4d}' for j in range(n)) + '\n')
    return out.getvalue()


@SETTINGS
@given(topologies().filter(bool))
@example([list(range(4)), list(range(4, 8)), [], []])
def test_numactl_hardware_parsing_matches_deepspeed(numa_cores):
    text = _numactl_hardware(numa_cores)
    fake = types.SimpleNamespace(check_output=lambda cmd: text.encode(), SubprocessError=Exception)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ds_numa, 'subprocess', fake)
        theirs = ds_numa.get_numa_cores()
    assert numa.parse_numactl_hardware(text) == theirs == numa_cores
