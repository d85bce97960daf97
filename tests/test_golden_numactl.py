"""Core binding against DeepSpeed's ``get_numactl_cmd``/``parse_range_list`` (golden/numactl_cases.json)."""

from __future__ import annotations

import pytest
import vectors
from dslaunch.errors import CoreBindingError
from dslaunch.numa import (
    StaticTopology,
    SystemTopology,
    format_core_list,
    get_numactl_cmd,
    parse_numactl_hardware,
    parse_range_list,
)

CASES = vectors.cases('numactl_cases.json')
RANGE_CASES = vectors.cases('numactl_cases.json', key='parse_range_list')


def _case_id(case):
    return f'{case.get("topology")}:{case.get("bind_core_list")}:{case.get("num_local_procs")}:{case.get("local_rank")}'


def _check_error(exc, expected, source):
    message = expected['message']
    if message.startswith('invalid literal for int()'):
        # Deviation: DeepSpeed's int() traceback becomes a "Bad range" message naming the input.
        assert 'Bad range' in str(exc) and source in str(exc)
    elif expected['type'] == 'AssertionError':
        # Deviation: raised (not asserted, so also under python -O) as a ValueError; same text.
        assert str(exc) == message
    else:
        vectors.assert_same_error(exc, expected)


@pytest.mark.parametrize('case', CASES, ids=_case_id)
def test_numactl_cmd_matches_deepspeed(case):
    topology = StaticTopology(case.get('numa_cores', []), case.get('physical_cores_if_no_list', 16))
    call = (case['bind_core_list'], case['num_local_procs'], case['local_rank'])
    if 'error' in case:
        with pytest.raises(CoreBindingError) as info:
            get_numactl_cmd(*call, topology=topology, environ=case.get('env', {}))
        _check_error(info.value, case['error'], case['bind_core_list'] or '')
        return
    cores_per_rank, cmd = get_numactl_cmd(*call, topology=topology, environ=case.get('env', {}))
    assert (cores_per_rank, cmd) == (case['cores_per_rank'], case['numactl_cmd'])


@pytest.mark.parametrize('case', RANGE_CASES, ids=lambda c: repr(c['input']))
def test_parse_range_list_matches_deepspeed(case):
    if 'error' in case:
        with pytest.raises(CoreBindingError) as info:
            parse_range_list(case['input'])
        _check_error(info.value, case['error'], case['input'])
        return
    assert parse_range_list(case['input']) == case['result']


SAMPLE_HARDWARE = """available: 4 nodes (0-3)
node 0 cpus: 0 1 2 3
node 0 size: 64000 MB
node 0 free: 1000 MB
node 1 cpus: 4 5 6 7
node 1 size: 64000 MB
node 2 cpus:
node 2 size: 16000 MB
node 3 cpus: 
node 3 size: 16000 MB
node distances:
node   0   1   2   3
  0:  10  21  13  31
"""


def test_parse_numactl_hardware():
    assert parse_numactl_hardware(SAMPLE_HARDWARE) == [[0, 1, 2, 3], [4, 5, 6, 7], [], []]
    assert parse_numactl_hardware('') == []


def test_flat_hbm_from_parsed_output():
    topo = StaticTopology(parse_numactl_hardware(SAMPLE_HARDWARE), 8)
    assert get_numactl_cmd(None, 2, 1, topology=topo, environ={}) == (4, ['numactl', '-p', '3', '-C', '4-7'])


@pytest.mark.parametrize('bad', ['1-', 'a-b', '-', '1--3'])
def test_bad_ranges_are_core_binding_errors(bad):
    with pytest.raises(CoreBindingError, match='Bad range'):
        parse_range_list(bad)


def test_local_rank_outside_the_node_is_an_error():
    with pytest.raises(CoreBindingError):
        get_numactl_cmd('0-3', 2, 2, topology=StaticTopology([], 4), environ={})
    with pytest.raises(CoreBindingError):
        get_numactl_cmd('0-3', 0, 0, topology=StaticTopology([], 4), environ={})


def test_format_core_list():
    assert format_core_list([0, 1, 2, 5, 7, 8]) == '0-2,5,7-8'
    assert format_core_list([3]) == '3'
    assert format_core_list([]) == ''


def test_system_topology_is_lazy_and_sane():
    topo = SystemTopology()
    assert 'numa_cores' not in vars(topo) and 'physical_cores' not in vars(topo)
    assert topo.physical_cores >= 1
    assert all(isinstance(core, int) for node in topo.numa_cores for core in node)


@pytest.mark.parametrize('numa_cores, expected', [
    # facts from DeepSpeed 0.19.8's get_numactl_cmd: a CPU-less node breaks a run of repeated CPU lists
    ([list(range(8)), [], list(range(8))], ['numactl', '-m', '0', '-C', '0-7']),
    ([list(range(8)), list(range(8)), [], list(range(8))], ['numactl', '-m', '0,1', '-C', '0-7']),
])
def test_a_cpu_less_node_ends_a_fake_numa_group(numa_cores, expected):
    assert get_numactl_cmd('0-7', 1, 0, topology=StaticTopology(numa_cores, 8), environ={}) == (8, expected)


def test_a_bad_range_error_quotes_the_whole_list():
    with pytest.raises(CoreBindingError, match=r"'a-b' in '0,a-b'"):
        parse_range_list('0,a-b')
