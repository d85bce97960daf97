"""Hostile input for the parsers (issue 8), beyond tests/test_properties.py: random input is
compared with a reference model of DeepSpeed's semantics, and the command-line entry points are
driven with it end to end.

The reference model (`ref_*` below) is written from the behavioural spec (spec sections 4, 5, 6),
not from DeepSpeed's code, and is first checked against every golden vector, so "agrees with the
model" means "agrees with DeepSpeed" wherever DeepSpeed gives an answer. Where DeepSpeed crashes
with an internal exception (IndexError, `too many values to unpack`, `invalid literal for int()`)
dslaunch must give a `DslaunchError` naming the input instead (docs/compatibility.md).

Then, on hypothesis-generated input: the parsers return exactly the model's result or raise
exactly the model's error (class and, for DeepSpeed's own ValueErrors, the same text); the runner's
whole planning step (`runner.plan`) and the `dslaunch` / `dslaunch.launch` command lines never
show a traceback: either a plan or one `error:` line and exit status 1.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import golden
import pytest
import vectors

hypothesis = pytest.importorskip('hypothesis')
from dslaunch import cli, launch, runner
from dslaunch.errors import DslaunchError, HostfileError, ResourceFilterError, WorldInfoError, one_line
from dslaunch.hostfile import parse_hostfile, parse_inclusion_exclusion, parse_node_config_list
from dslaunch.world_info import decode_world_info
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLI_SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))


class RefError(Exception):
    """The model's "DeepSpeed raises here": `internal` when DeepSpeed's error is a crash, not a message."""

    def __init__(self, message: str, internal: bool = False) -> None:
        super().__init__(message)
        self.internal = internal


# ---- the reference model (from the spec) ---------------------------------------------------------------

_REF_LINE = re.compile(r'^(\S+)\s+slots=(\d+)')


def ref_hostfile(text: str) -> dict[str, int]:
    pool: dict[str, int] = {}
    for raw in io.StringIO(text, newline=None):  # the lines readlines() gives
        line = raw.strip()
        if line == '' or line.startswith('#'):
            continue
        m = _REF_LINE.search(line)
        if not m:
            raise RefError(f'Hostfile contains a bad entry: {line}, unable to proceed with launching')
        if m.group(1) in pool:
            raise RefError(f'Hostfile contains multiple entries for {m.group(1)}, unable to proceed with launching')
        pool[m.group(1)] = int(m.group(2))
    if not pool:
        raise RefError('Hostfile is empty or not formatted correctly, unable to proceed with launching.')
    return pool


def ref_node_config(spec: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for piece in spec.split('@'):
        if ':' not in piece:
            out.setdefault(piece, [])
            continue
        parts = piece.split(':')
        if len(parts) != 2:
            raise RefError('too many values to unpack (expected 2)', internal=True)
        try:
            slots = [int(x) for x in parts[1].split(',')]
        except ValueError as e:
            raise RefError(str(e), internal=True) from None
        out.setdefault(parts[0], []).extend(slots)
    return {h: sorted(set(s)) for h, s in out.items()}


def ref_filter(host_info: dict[str, list[int]], include: str, exclude: str) -> dict[str, list[int]]:
    if include and exclude:
        raise RefError('include_str and exclude_str are mutually exclusive.')
    if not include and not exclude:
        return host_info
    wanted = ref_node_config(include or exclude)
    for host, slots in wanted.items():
        if host not in host_info:
            raise RefError(f"Hostname '{host}' not found in hostfile")
        for s in slots:
            if s not in host_info[host]:
                raise RefError(f"No slot '{s}' specified on host '{host}'")
    if include:
        chosen = {h: (s if s else list(host_info[h])) for h, s in wanted.items()}
    else:
        chosen = {h: list(s) for h, s in host_info.items()}
        for h, s in wanted.items():
            chosen[h] = [] if not s else [x for x in chosen[h] if x not in s]
    out = {}
    for h in host_info:
        if chosen.get(h):
            out[h] = list(dict.fromkeys(chosen[h]))
    return out


def ref_inclusion_exclusion(pool: dict[str, int], include: str, exclude: str) -> dict[str, list[int]]:
    return ref_filter({h: list(range(n)) for h, n in pool.items()}, include, exclude)


def ref_world_info_decode(encoded: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(encoded))


# ---- the model is DeepSpeed: every golden vector --------------------------------------------------------


def _golden(name: str) -> list[dict[str, Any]]:
    return vectors.cases(name)


@pytest.mark.skipif(not golden.available(), reason='golden vectors not available')
def test_reference_model_matches_every_golden_hostfile_and_filter_case() -> None:
    checked = 0
    for case in _golden('hostfile_cases.json'):
        if case.get('text') is None:
            continue
        if 'error' in case:
            with pytest.raises((RefError, UnicodeError)) as info:
                ref_hostfile(case['text'])
            if isinstance(info.value, RefError) and case['error']['type'] == 'ValueError':
                assert str(info.value) == case['error']['message'], case['name']
        else:
            assert ref_hostfile(case['text']) == golden.ordered(case['result']), case['name']
        checked += 1
    for case in _golden('filter_cases.json'):
        fn = case['function']
        if fn == 'parse_inclusion_exclusion':
            call = lambda c=case: ref_inclusion_exclusion(
                golden.ordered(c['resource_pool']), c['include'], c['exclude']
            )
        elif fn == 'parse_resource_filter':
            call = lambda c=case: ref_filter(golden.ordered(c['host_info']), c['include'], c['exclude'])
        elif fn == 'parse_node_config_list':
            call = lambda c=case: ref_node_config(c['input'])
        else:
            continue
        if 'error' in case:
            with pytest.raises(RefError) as info:
                call()
            if not info.value.internal:
                assert str(info.value) == case['error']['message'], case['name']
        else:
            result = call()
            assert result == golden.ordered(case['result']) and list(result) == list(golden.ordered(case['result']))
        checked += 1
    for case in _golden('world_info_cases.json'):
        if 'decoded_by_launch_py' in case:
            assert ref_world_info_decode(case['encoded']) == golden.ordered(case['decoded_by_launch_py'])
            assert decode_world_info(case['encoded']) == golden.ordered(case['decoded_by_launch_py'])
            checked += 1
    assert checked >= 50


# ---- dslaunch agrees with the model on random input -------------------------------------------------------

# Host names that stress the grammar: the filter's separators, comment and slot syntax, Unicode
# spaces, look-alike digits.
host_chars = st.sampled_from(list('ab-_.0189#@:,=') + ['\u00e9', '\u0663', '\u00a0', 'slots'])
hosts = st.lists(host_chars, min_size=1, max_size=6).map(''.join)
slot_words = st.sampled_from(['0', '1', '2', '3', '08', ' 1', '1 ', '-1', '', 'x', '\u0663', '99', '1e3'])


@st.composite
def hostfile_texts(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(['entry', 'entry', 'comment', 'blank', 'junk']))
        if kind == 'entry':
            sep = draw(st.sampled_from([' ', '\t', '  ', '\u00a0', '\u2003', '']))
            tail = draw(st.sampled_from(['', ' # gpus', 'x', ' slots=4', '\r']))
            lines.append(
                f'{draw(hosts)}{sep}slots={draw(st.sampled_from(["0", "1", "2", "4", "08", "-1", "a", ""]))}{tail}'
            )
        elif kind == 'comment':
            lines.append(draw(st.sampled_from(['#', '  # x', '#host slots=2'])))
        elif kind == 'blank':
            lines.append(draw(st.sampled_from(['', '   ', '\t', '\x0c'])))
        else:
            lines.append(draw(st.text(max_size=15)))
    end = draw(st.sampled_from(['\n', '\r\n', '\r']))
    return end.join(lines) + draw(st.sampled_from(['', end]))


@SETTINGS
@given(hostfile_texts())
def test_hostfile_parser_agrees_with_the_model(text: str) -> None:
    try:
        want: dict[str, int] | RefError = ref_hostfile(text)
    except RefError as e:
        want = e
    if isinstance(want, RefError):
        with pytest.raises(HostfileError) as info:
            parse_hostfile(text)
        assert str(info.value) == one_line(str(want))  # DeepSpeed's text, line breaks escaped
    else:
        got = parse_hostfile(text)
        assert got == want and list(got) == list(want)


@st.composite
def filter_specs(draw: st.DrawFn, pool: dict[str, int]) -> str:
    names = [*pool, 'nohost', '']
    pieces = []
    for _ in range(draw(st.integers(1, 3))):
        host = draw(st.sampled_from(names))
        if draw(st.booleans()):
            pieces.append(host)
        else:
            slots = draw(st.lists(slot_words, min_size=1, max_size=3))
            extra = draw(st.sampled_from(['', '', ':1']))
            pieces.append(f'{host}:{",".join(slots)}{extra}')
    return '@'.join(pieces)


pools = st.dictionaries(
    hosts.filter(lambda h: '@' not in h and ':' not in h), st.integers(0, 4), min_size=1, max_size=4
)


@SETTINGS
@given(pools, st.data())
def test_include_exclude_agree_with_the_model(pool: dict[str, int], data: st.DataObject) -> None:
    include = data.draw(st.one_of(st.just(''), filter_specs(pool)))
    exclude = data.draw(st.one_of(st.just(''), filter_specs(pool)))
    try:
        want: dict[str, list[int]] | RefError = ref_inclusion_exclusion(pool, include, exclude)
    except RefError as e:
        want = e
    if isinstance(want, RefError):
        with pytest.raises(ResourceFilterError) as info:
            parse_inclusion_exclusion(pool, include, exclude)
        if want.internal:
            assert one_line(include or exclude) in str(info.value), 'the clear error quotes the spec'
        else:
            assert str(info.value) == one_line(str(want))
    else:
        got = parse_inclusion_exclusion(pool, include, exclude)
        assert got == want and list(got) == list(want)


@SETTINGS
@given(st.text(st.sampled_from(list('ab01:,@ -x9\u0663')), max_size=25))
def test_node_config_list_agrees_with_the_model(spec: str) -> None:
    try:
        want: dict[str, list[int]] | RefError = ref_node_config(spec)
    except RefError as e:
        want = e
    if isinstance(want, RefError):
        with pytest.raises(ResourceFilterError) as info:
            parse_node_config_list(spec)
        assert one_line(spec) in str(info.value)
    else:
        assert parse_node_config_list(spec) == want


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@SETTINGS
@given(json_values, st.booleans())
def test_world_info_decoder_agrees_with_the_model_on_any_json(value: Any, standard_alphabet: bool) -> None:
    """Any JSON document, encoded as the runner would: decoded exactly as DeepSpeed's launcher
    decodes it when it is a host -> slot-list mapping; otherwise a WorldInfoError (DeepSpeed would
    fail later, inside its rank arithmetic)."""
    text = json.dumps(value)
    encoded = base64.urlsafe_b64encode(text.encode()).decode()
    if standard_alphabet:
        encoded = base64.b64encode(text.encode()).decode()
    well_formed = isinstance(value, dict) and all(
        isinstance(v, list) and all((isinstance(s, int) and not isinstance(s, bool)) or isinstance(s, str) for s in v)
        for v in value.values()
    )
    if well_formed:
        decoded = decode_world_info(encoded)
        assert decoded == ref_world_info_decode(encoded) and list(decoded) == list(value)
    else:
        with pytest.raises(WorldInfoError):
            decode_world_info(encoded)


# ---- the entry points: a plan or one error line, never a traceback ----------------------------------------


class FakeProbes:
    """The machine, as `runner.plan` sees it: 2 GPUs, ssh works, every backend installed."""

    def device_count(self) -> int:
        return 2

    def ssh_reachable(self, host: str, port: int | None) -> bool:
        return True

    def hostname_i(self, host: str, port: int | None) -> str:
        return '10.0.0.1 10.0.0.2'

    def backend_exists(self, name: str) -> bool:
        return True

    def port_free(self, addr: str, port: int) -> bool:
        return port != 29501

    def free_port(self) -> int:
        return 40000


flag_values = st.sampled_from(['-1', '0', '1', '2', '3', '99', 'x', '', '1.5', '-0', '١'])


@CLI_SETTINGS
@given(hostfile_texts(), st.data())
def test_runner_plan_gives_a_plan_or_a_dslaunch_error(
    tmp_path_factory: pytest.TempPathFactory, text: str, data: st.DataObject
) -> None:
    """The runner's whole planning step on a random hostfile and random filter flags."""
    work = tmp_path_factory.mktemp('plan')
    (work / 'hostfile').write_text(text, encoding='utf-8', newline='')
    try:
        pool = ref_hostfile(text)
    except RefError:
        pool = {'a': 2}
    argv = ['-H', 'hostfile']
    for flag in ('--include', '--exclude'):
        if data.draw(st.booleans()):
            argv += [flag, data.draw(filter_specs(pool))]
    for flag in ('--num_nodes', '--num_gpus', '--master_port'):
        if data.draw(st.booleans()):
            argv += [f'{flag}={data.draw(flag_values)}']
    argv += ['--launcher', data.draw(st.sampled_from(['pdsh', 'openmpi', 'slurm', 'mpich', 'impi', 'mvapich', 'nope']))]
    argv.append('train.py')
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            args = runner.parse_args(argv)
        except SystemExit as e:
            assert e.code == 2  # argparse: a bad number is a usage error, as in DeepSpeed
            return
    try:
        plan = runner.plan(args, {'PATH': '/usr/bin'}, FakeProbes(), cwd=str(work), python='python3', pid=1)
    except DslaunchError as e:
        assert str(e) and '\n' not in str(e).strip(), repr(e)
        return
    assert plan.active and all(isinstance(s, list) for s in plan.active.values())
    assert decode_world_info(plan.world_info) == plan.active


def _run_main(fn: Any, argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = fn(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return int(code), err.getvalue()


@CLI_SETTINGS
@given(
    st.text(max_size=40)
    | st.binary(max_size=30).map(lambda b: base64.urlsafe_b64encode(b).decode())
    | json_values.map(lambda v: base64.urlsafe_b64encode(json.dumps(v).encode()).decode()),
    st.integers(-2, 3),
)
def test_per_node_launcher_cli_rejects_bad_world_info_in_one_line(world_info: str, node_rank: int) -> None:
    """`python -m dslaunch.launch --world_info=<anything> --node_rank=<n> --dry_run`: exit 0 with a
    plan, or exit 1 with one `dslaunch.launch: error:` line; never a traceback."""
    code, err = _run_main(
        launch.main, [f'--world_info={world_info}', f'--node_rank={node_rank}', '--no_python', '--dry_run', '/bin/true']
    )
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert 'Traceback' not in err
    if code != 0:
        assert code in (1, 2), err
        if code == 1:
            assert len(lines) == 1 and lines[0].startswith('dslaunch.launch: error: '), err


@CLI_SETTINGS
@given(hostfile_texts(), st.data())
def test_dslaunch_cli_dry_run_on_hostile_hostfiles(
    tmp_path_factory: pytest.TempPathFactory, text: str, data: st.DataObject
) -> None:
    """`dslaunch -H <random hostfile> [--include/--exclude random] --dry_run ...`: a command or one
    `dslaunch: error:` line (exit 1), never a traceback (argparse's usage errors exit 2)."""
    work = tmp_path_factory.mktemp('cli')
    hostfile = work / 'hostfile'
    hostfile.write_text(text, encoding='utf-8', newline='')
    try:
        pool = ref_hostfile(text)
    except RefError:
        pool = {'localhost': 2}
    argv = ['-H', str(hostfile), '--launcher', 'slurm', '--dry_run', '--master_port', '29500']
    if data.draw(st.booleans()):
        argv += [data.draw(st.sampled_from(['--include', '--exclude'])), data.draw(filter_specs(pool))]
    argv += ['--no_python', '/bin/true']
    code, err = _run_main(cli.main, argv)
    assert 'Traceback' not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith('dslaunch: error: '), err
    else:
        assert code in (0, 2), (code, err)


def test_entry_point_error_paths_are_exercised(tmp_path: Path) -> None:
    """The properties above must reach both outcomes; a sanity check with fixed inputs."""
    hostfile = tmp_path / 'hostfile'
    hostfile.write_text('a slots=2\na slots=2\n')
    code, err = _run_main(cli.main, ['-H', str(hostfile), '--dry_run', '--no_python', '/bin/true'])
    assert code == 1 and err.startswith('dslaunch: error: Hostfile contains multiple entries for a')
    code, err = _run_main(launch.main, ['--world_info=e30', '--dry_run', '--no_python', '/bin/true'])
    assert code == 1 and err.startswith('dslaunch.launch: error: --world_info is not valid base64')


@pytest.mark.parametrize(
    ('fn', 'argv', 'start'),
    [
        (launch.main, ['--world_info=\r0', '--dry_run', '--no_python', '/bin/true'], 'dslaunch.launch: error: --world_info'),
        (launch.main, ['--world_info=eyJcdTAwMUUiOiBbXX0=', '--node_rank=1', '--dry_run', '--no_python', '/bin/true'],
         'dslaunch.launch: error: --node_rank 1 is out of range'),
    ],
)  # fmt: skip
def test_control_characters_in_echoed_input_stay_escaped_on_one_line(fn: Any, argv: list[str], start: str) -> None:
    """Found by the properties above: a `\\r` pasted into --world_info, or a `\\x1e` in a world_info
    host name, was echoed raw and broke the one-line error in two. Both are escaped now."""
    code, err = _run_main(fn, argv)
    assert code == 1 and len(err.splitlines()) == 1 and err.startswith(start), repr(err)


def test_control_characters_in_a_hostfile_line_stay_escaped(tmp_path: Path) -> None:
    hostfile = tmp_path / 'hostfile'
    hostfile.write_text('0\x850\n', encoding='utf-8', newline='')
    code, err = _run_main(cli.main, ['-H', str(hostfile), '--dry_run', '--no_python', '/bin/true'])
    assert code == 1 and len(err.splitlines()) == 1, repr(err)
    assert err == 'dslaunch: error: Hostfile contains a bad entry: 0\\x850, unable to proceed with launching\n'
