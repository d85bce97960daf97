"""Property tests: the parsers never fail with anything but a DslaunchError, and valid input round-trips."""

from __future__ import annotations

import base64
import json

import pytest

hypothesis = pytest.importorskip('hypothesis')
from dslaunch.errors import DslaunchError, HostfileError, ResourceFilterError, WorldInfoError
from dslaunch.hostfile import (
    parse_hostfile,
    parse_inclusion_exclusion,
    parse_node_config_list,
)
from dslaunch.numa import parse_range_list
from dslaunch.world_info import decode_world_info, encode_world_info
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# No deadline/too_slow checks: the suite also runs next to real-process tests on a loaded machine.
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Host names as hostfiles hold them: no whitespace, not starting with '#', no '@'/':' (filter syntax).
host_names = st.text(
    st.characters(blacklist_categories=('Cs', 'Zs', 'Zl', 'Zp', 'Cc'), blacklist_characters='@:,#'),
    min_size=1,
    max_size=12,
)
pools = st.dictionaries(host_names, st.integers(min_value=0, max_value=6), min_size=1, max_size=5)
hostfile_alphabet = st.sampled_from(list('ab0123456789 \t\r\n#=-slot@:xS\u00a0\u2028\x0b'))


@SETTINGS
@given(st.text(hostfile_alphabet, max_size=80) | st.text(max_size=80))
def test_hostfile_parser_only_raises_hostfile_errors(text):
    try:
        pool = parse_hostfile(text)
    except HostfileError:
        return
    assert pool and all(isinstance(n, int) and n >= 0 for n in pool.values())


@SETTINGS
@given(pools, st.booleans())
def test_hostfile_round_trip(pool, crlf):
    newline = '\r\n' if crlf else '\n'
    text = '# generated\n' + ''.join(f'{host} slots={n}{newline}' for host, n in pool.items())
    parsed = parse_hostfile(text)
    assert parsed == pool and list(parsed) == list(pool)


@SETTINGS
@given(st.text(st.sampled_from(list('ab01:,@ -x9')), max_size=30) | st.text(max_size=30))
def test_node_config_parser_only_raises_filter_errors(spec):
    try:
        parsed = parse_node_config_list(spec)
    except ResourceFilterError:
        return
    for slots in parsed.values():
        assert slots == sorted(set(slots))


@SETTINGS
@given(pools, st.text(st.sampled_from(list('ab01:,@ -x9')), max_size=20), st.booleans())
def test_filters_only_raise_filter_errors(pool, spec, include):
    try:
        active = parse_inclusion_exclusion(pool, spec if include else '', '' if include else spec)
    except ResourceFilterError:
        return
    hosts = list(pool)
    assert [h for h in hosts if h in active] == list(active)  # hostfile order kept
    for host, slots in active.items():
        assert set(slots) <= set(range(pool[host]))
        assert slots or not spec  # only the unfiltered pool keeps zero-slot hosts (as DeepSpeed)


@SETTINGS
@given(pools, st.data())
def test_include_selects_exactly_what_it_names(pool, data):
    chosen = {}
    for host, n in pool.items():
        if n and data.draw(st.booleans()):
            chosen[host] = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1)))
    if not chosen:
        return
    spec = '@'.join(f'{host}:{",".join(map(str, slots))}' for host, slots in chosen.items())
    active = parse_inclusion_exclusion(pool, spec, '')
    assert active == {h: chosen[h] for h in pool if h in chosen}
    excluded = parse_inclusion_exclusion(pool, '', spec)
    for host, n in pool.items():
        left = [s for s in range(n) if s not in chosen.get(host, [])]
        assert excluded.get(host, []) == left


world_infos = st.dictionaries(
    st.text(max_size=10), st.lists(st.integers(0, 2**40) | st.text(max_size=8), max_size=6), max_size=5
)


@SETTINGS
@given(world_infos)
def test_world_info_round_trip(info):
    encoded = encode_world_info(info)
    assert encoded == base64.urlsafe_b64encode(json.dumps(info).encode()).decode()
    decoded = decode_world_info(encoded)
    assert decoded == info and list(decoded) == list(info)
    standard = encoded.replace('-', '+').replace('_', '/')
    assert decode_world_info(standard) == info


@SETTINGS
@given(st.text(max_size=60) | st.binary(max_size=40).map(lambda b: base64.urlsafe_b64encode(b).decode()))
def test_world_info_decoder_only_raises_world_info_errors(text):
    try:
        decoded = decode_world_info(text)
    except WorldInfoError:
        return
    assert isinstance(decoded, dict)


@SETTINGS
@given(st.text(st.sampled_from(list('0123456789,- ')), max_size=20) | st.text(max_size=20))
def test_range_list_only_raises_dslaunch_errors(spec):
    try:
        cores = parse_range_list(spec)
    except DslaunchError:
        return
    assert cores == sorted(set(cores))
