"""Differential tests: dslaunch's command-line parsing against DeepSpeed's own code, run side by side.

The installed DeepSpeed (0.19.8) is the oracle at test time; nothing of it is copied here. Hypothesis
builds argv lists from the real flags of the runner (``deepspeed``: ``deepspeed.launcher.runner.parse_args``
against ``dslaunch.runner.parse_args``) and of the per-node launcher (``deepspeed.launcher.launch.parse_args``,
which reads ``sys.argv``, against ``dslaunch.launch.parse_args``): both spellings (``--flag=value``,
``--flag value``, ``-Hvalue``), argparse prefix abbreviations (unique and ambiguous), repeated flags,
values that look like flags or negative numbers, ``--`` separators, scripts and script arguments with
spaces, quotes, ``=``, control characters and unicode, and flags after the script (which belong to the
script).

Where DeepSpeed accepts a command line, every attribute of its namespace must be equal in dslaunch's
(same type, same value, same order) and dslaunch's own extra attributes must keep their defaults.
Where DeepSpeed exits, dslaunch must exit with the same status and the same ``prog: error: ...``
text (the usage lines above it differ: dslaunch has more options). The one documented difference
(docs/compatibility.md, "dslaunch-only flags" and "abbreviations of long options") is that dslaunch
accepts its own options before the script; the strategy knows which words it put there, and such a
command line is compared with DeepSpeed's result for the same line without them.

The last part checks the user-argument quoting DeepSpeed's runner applies before the multi-node
backends: ``add_export``'s value rule (``dslaunch.backends.deepspeed_quote`` reproduces it as a fact),
the raw user arguments of the MPI and Slurm commands, and the PDSH words, which dslaunch quotes
differently on purpose (docs/compatibility-backends.md, "PDSH", "user arguments") and which must reach
the remote script byte for byte through a real POSIX shell.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import pytest

_ENV_BEFORE = set(os.environ)
deepspeed = pytest.importorskip('deepspeed', reason='DeepSpeed is the oracle of these tests (make install)')
hypothesis = pytest.importorskip('hypothesis')
from deepspeed.launcher import launch as ds_launch
from deepspeed.launcher import multinode_runner as ds_backends
from deepspeed.launcher import runner as ds_runner
from dslaunch import launch, runner
from dslaunch.backends import deepspeed_quote, make_runner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

for _name in set(os.environ) - _ENV_BEFORE:  # `import deepspeed` sets PYTORCH_NVML_BASED_CUDA_CHECK
    del os.environ[_name]

# Derandomized: the same examples every run, so the suite never fails on an example an earlier
# run did not try (runs of 2,000-4,000 random examples per test found nothing more).
SETTINGS = settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


# ---- the flags DeepSpeed 0.19.8 defines (test_flag_tables_cover_deepspeed checks this list) --------
class Opt(NamedTuple):
    names: tuple[str, ...]  # every option string, the long name that gives `dest` first among the long ones
    kind: Any  # 'flag', 'int', 'str' or a tuple of choices

    @property
    def dest(self) -> str:
        return next(n for n in self.names if n.startswith('--'))[2:]

    @property
    def longs(self) -> list[str]:
        return [n for n in self.names if n.startswith('--')]


LOG_LEVELS = ('debug', 'info', 'warning', 'error', 'critical')
RUNNER_OPTS = [
    Opt(('-H', '--hostfile'), 'str'),
    Opt(('-i', '--include'), 'str'),
    Opt(('-e', '--exclude'), 'str'),
    Opt(('--num_nodes',), 'int'),
    Opt(('--num_gpus', '--num_accelerators'), 'int'),
    Opt(('--master_port',), 'int'),
    Opt(('--master_addr',), 'str'),
    Opt(('--node_rank',), 'int'),
    Opt(('--launcher',), 'str'),
    Opt(('--launcher_args',), 'str'),
    Opt(('--module',), 'flag'),
    Opt(('--no_python',), 'flag'),
    Opt(('--no_local_rank',), 'flag'),
    Opt(('--no_ssh',), 'flag'),
    Opt(('--no_ssh_check',), 'flag'),
    Opt(('--force_multi',), 'flag'),
    Opt(('--save_pid',), 'flag'),
    Opt(('--enable_each_rank_log',), 'str'),
    Opt(('--autotuning',), ('tune', 'run')),
    Opt(('--bind_cores_to_rank',), 'flag'),
    Opt(('--bind_core_list',), 'str'),
    Opt(('--ssh_port',), 'int'),
    Opt(('--venv_script',), 'str'),
    Opt(('--log_level',), LOG_LEVELS),
    Opt(('-q', '--quiet'), 'flag'),
]
LAUNCH_OPTS = [
    Opt(('--node_rank',), 'int'),
    Opt(('--master_addr',), 'str'),
    Opt(('--master_port',), 'int'),
    Opt(('--world_info',), 'str'),
    Opt(('--module',), 'flag'),
    Opt(('--no_python',), 'flag'),
    Opt(('--no_local_rank',), 'flag'),
    Opt(('--save_pid',), 'int'),
    Opt(('--enable_each_rank_log',), 'str'),
    Opt(('--bind_cores_to_rank',), 'flag'),
    Opt(('--bind_core_list',), 'str'),
    Opt(('--log_level',), LOG_LEVELS),
    Opt(('-q', '--quiet'), 'flag'),
]

# dslaunch-only options (docs/compatibility.md) with a value each accepts; None: a store_true flag.
COMMON_EXTENSIONS: dict[str, str | None] = {
    'grace_period': '5',
    'raw_output': None,
    'console_ranks': '0,2-3',
    'report_json': 'r.json',
    'hang_timeout': '60',
    'hang_action': 'report',
    'collapse': 'on',
    'collapse_window': '0.5',
    'status_line': 'off',
    'max_restarts': '3',
    'rdzv_timeout': '60',
    'rdzv_conf': 'join_timeout=5',
    'min_elastic_nodes': '1',
    'max_elastic_nodes': '2',
    'dry_run': None,
}
RUNNER_EXTENSIONS = {'elastic_training': None, **COMMON_EXTENSIONS}
LAUNCH_EXTENSIONS = {'enable_elastic_training': None, **COMMON_EXTENSIONS}


def _selecting_prefixes(name: str, native: Sequence[str], extensions: Sequence[str]) -> list[str]:
    """Abbreviations of the dslaunch option `name` that pick it: no DeepSpeed option and no other
    dslaunch option starts with them (docs/compatibility.md, "abbreviations of long options")."""
    return [
        name[:k]
        for k in range(3, len(name))
        if not any(o.startswith(name[:k]) for o in native)
        and [e for e in extensions if e.startswith(name[:k])] == [name]
    ]


class Parser(NamedTuple):
    name: str
    prog: str
    opts: list[Opt]
    extensions: dict[str, str | None]
    script_dest: str
    args_dest: str
    ours: Callable[[list[str]], Any]
    oracle: Callable[[list[str]], Any]

    def extension_spellings(self, dest: str) -> list[str]:
        native = [n for o in self.opts for n in o.longs] + ['--help']
        names = ['--' + e for e in self.extensions]
        return ['--' + dest, *_selecting_prefixes('--' + dest, native, names)]


@contextlib.contextmanager
def _sys_argv(argv: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def _ds_runner_parse(argv: list[str]) -> Any:
    with _sys_argv(['deepspeed']):  # its parser takes its prog from sys.argv[0]
        return ds_runner.parse_args(argv)


def _ds_launch_parse(argv: list[str]) -> Any:
    with _sys_argv(['launch.py', *argv]):  # launch.py's parse_args() reads sys.argv
        return ds_launch.parse_args()


RUNNER = Parser(
    'runner',
    'deepspeed',
    RUNNER_OPTS,
    RUNNER_EXTENSIONS,
    'user_script',
    'user_args',
    lambda argv: runner.parse_args(argv, prog='deepspeed'),
    _ds_runner_parse,
)
LAUNCH = Parser(
    'launch',
    'launch.py',
    LAUNCH_OPTS,
    LAUNCH_EXTENSIONS,
    'training_script',
    'training_script_args',
    lambda argv: launch.parse_args(argv, prog='launch.py'),
    _ds_launch_parse,
)


class Outcome(NamedTuple):
    namespace: dict[str, Any] | None  # None: SystemExit
    code: Any
    out: str
    err: str


def _call(parse: Callable[[list[str]], Any], argv: list[str]) -> Outcome:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            namespace = parse(list(argv))
        except SystemExit as exc:
            return Outcome(None, exc.code, out.getvalue(), err.getvalue())
    return Outcome(vars(namespace), None, out.getvalue(), err.getvalue())


def _error_text(outcome: Outcome, prog: str) -> str:
    """The ``prog: error: ...`` part of stderr (the usage lines above it list dslaunch's extra options)."""
    marker = f'{prog}: error: '
    assert marker in outcome.err, outcome.err
    return outcome.err[outcome.err.index(marker) :]


def _typed(namespace: dict[str, Any]) -> dict[str, tuple[type, Any]]:
    return {k: (type(v), v) for k, v in namespace.items()}


def assert_same_outcome(parser: Parser, argv: list[str], ds: Outcome, ours: Outcome, extensions_used: bool) -> None:
    if ds.namespace is not None:
        assert ours.namespace is not None, f'DeepSpeed accepts {argv!r}, dslaunch exits: {ours.err}'
        assert _typed({k: ours.namespace.get(k, '<missing>') for k in ds.namespace}) == _typed(ds.namespace)
        assert [k for k in ours.namespace if k in ds.namespace] == list(ds.namespace)  # declaration order
        if not extensions_used:  # nothing may have been taken as one of dslaunch's own options
            assert {k: v for k, v in ours.namespace.items() if k not in ds.namespace} == default_extras(parser)
        return
    assert ours.namespace is None, f'DeepSpeed exits on {argv!r} ({ds.err.strip()!r}), dslaunch accepts it'
    assert ours.code == ds.code
    if ds.code == 0:  # -h / --help
        assert ours.out.startswith(f'usage: {parser.prog} ') and ds.out.startswith(f'usage: {parser.prog} ')
        return
    assert _error_text(ours, parser.prog) == _error_text(ds, parser.prog)


def default_extras(parser: Parser) -> dict[str, Any]:
    """dslaunch's own attributes and their defaults (what DeepSpeed's namespace lacks)."""
    return _default_extras(parser.name)


@functools.cache
def _default_extras(name: str) -> dict[str, Any]:
    parser = RUNNER if name == 'runner' else LAUNCH
    ds, ours = vars(parser.oracle(['x'])), vars(parser.ours(['x']))
    return {k: v for k, v in ours.items() if k not in ds}


def check(parser: Parser, argv: list[str], without_extensions: list[str]) -> None:
    """Parse `argv` with both; `without_extensions` is `argv` less the dslaunch-only options the
    strategy put before the script."""
    ds = _call(parser.oracle, argv)
    ours = _call(parser.ours, argv)
    used = argv != without_extensions
    if used and ds.namespace is None and ds.code == 2 and 'unrecognized arguments: ' in ds.err:
        # Documented: dslaunch takes its own options (docs/compatibility.md, "dslaunch-only flags");
        # for every other word it must read the line as DeepSpeed reads it without them.
        ds = _call(parser.oracle, without_extensions)
    assert_same_outcome(parser, argv, ds, ours, used)


# ---- strategies ------------------------------------------------------------------------------------
INT_WORDS = ['0', '-0', '-1', '+3', '007', '1.5', '1e3', '0x10', ' 2', '2 ', '1_000', '\u0663', 'nan', '9' * 20]
TRICKY = [
    '', '-', '--', '---', '-1', '-5', '-1.5', '-1e3', '-x', '-q', '-qq', '-qHf', '-Hfile', '-i=a', '-h', '--h',
    '--foo', '--foo=bar', '--foo bar', '--m', '--n', '--no', '--e', '--ma=1', '--num_gpus', '--num_gpus=2',
    '--dry', '--dry_run', '--dry_run=a b', '--dry=1 x', '--grace_period=1 x', '--raw_output=a b', '--c', '--max',
    '--hang_timeout=5', 'a b', "it's", 'say "hi"', '\\', '$HOME', '`id`', 'a=b', '=', 'x=1 y', 'ünïcødé ✓', '\u00a0',
    'a\nb', '\t', '\r', '%n', '*', 'None', 'localhost:0@w1', 'tune', 'debug', 'INFO', 'train.py',
]  # fmt: skip
ALPHABET = st.sampled_from(list('-=_ abqHx19.:@"\'\\$\n') + ['ü', '\u00a0', '\u2028'])
words = st.one_of(st.sampled_from(TRICKY), st.text(ALPHABET, max_size=10), st.text(max_size=6))
scripts = st.one_of(
    st.just('train.py'),
    st.sampled_from(['pkg.mod', 'ü.py', 'a b.py', "it's.py", 'x=1', '-', '-1', '--', '-x', '--dry_run=a b']),
    words,
)


def _values(kind: Any) -> st.SearchStrategy[str]:
    if kind == 'int':
        return st.one_of(st.integers(-3, 70000).map(str), st.sampled_from(INT_WORDS), words)
    if isinstance(kind, tuple):
        return st.one_of(
            st.sampled_from(kind), st.sampled_from([c.upper() for c in kind] + [c[:2] for c in kind]), words
        )
    return words


def _spellings(opt: Opt) -> st.SearchStrategy[str]:
    """An option string, its other names, or any prefix of a long name (unique or ambiguous)."""
    prefixes = [st.integers(3, len(n)).map(lambda k, n=n: n[:k]) for n in opt.longs]
    return st.one_of(st.sampled_from(opt.names), *prefixes)


class Segment(NamedTuple):
    words: list[str]
    wants_value: bool  # a value option with its value left out: it takes the next word


@st.composite
def native_option(draw: st.DrawFn, parser: Parser) -> Segment:
    """One of DeepSpeed's options in any spelling, with a value (or an error) as the strategy likes."""
    opt = draw(st.sampled_from(parser.opts))
    spelling = draw(_spellings(opt))
    if opt.kind == 'flag':
        if draw(st.integers(0, 9)) == 0:
            return Segment([f'{spelling}={draw(words)}'], False)  # an explicit argument to a flag is an error
        return Segment([spelling], False)
    forms = ['sep', 'sep', 'eq', 'missing'] + ([] if spelling.startswith('--') else ['attached'])
    form = draw(st.sampled_from(forms))
    value = draw(_values(opt.kind))
    if form == 'missing':
        return Segment([spelling], True)
    return Segment(
        {'sep': [spelling, value], 'eq': [f'{spelling}={value}'], 'attached': [spelling + value]}[form], False
    )


def native_segment(parser: Parser) -> st.SearchStrategy[list[str]]:
    return native_option(parser).map(lambda s: s.words)


@st.composite
def extension_segment(draw: st.DrawFn, parser: Parser) -> list[str]:
    """One of dslaunch's own options, spelt in full or by a prefix that selects it, with a valid value."""
    dest = draw(st.sampled_from(sorted(parser.extensions)))
    spelling = draw(st.sampled_from(parser.extension_spellings(dest)))
    value = parser.extensions[dest]
    if value is None:
        return [spelling]
    return draw(st.sampled_from([[spelling, value], [f'{spelling}={value}']]))


def not_extension_word(parser: Parser) -> Callable[[str], bool]:
    """For words before the script: false for those dslaunch takes as its own options (only
    extension_segment adds those, so that `check` knows where they are)."""
    spellings = {s for dest in parser.extensions for s in parser.extension_spellings(dest)}
    return lambda w: ' ' in w or w.partition('=')[0] not in spellings


def _starts_positionals(parser: Parser, word: str) -> bool:
    """Whether argparse takes `word` (before the script) as a positional or as `--`: the words after it
    are then the script's. Asked of argparse itself, through dslaunch's parser (the same for DeepSpeed's
    options; extension words never get here)."""
    if word == '--':
        return True
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            return _argparse_parser(parser.name)._parse_optional(word) is None
        except SystemExit:  # an ambiguous prefix: an error either way
            return False


@functools.cache
def _argparse_parser(name: str) -> Any:
    return (runner if name == 'runner' else launch).build_parser()


class Case(NamedTuple):
    argv: list[str]
    without_extensions: list[str]


@st.composite
def command_lines(draw: st.DrawFn, parser: Parser) -> Case:
    argv: list[str] = []
    plain: list[str] = []
    kinds = st.sampled_from(['native'] * 8 + ['word', 'extension', 'extension'])
    positional_seen = False  # a bare word can become the script: what follows it is the script's
    wants_value_before = False  # the previous word was an option waiting for its value
    for kind in draw(st.lists(kinds, max_size=6)):
        if kind == 'extension':
            segment = draw(extension_segment(parser))
            argv += segment
            # DeepSpeed's view is the line without it, unless it follows the script or an option
            # that wants a value (both parsers then stop at it: "expected one argument")
            plain += segment if positional_seen or wants_value_before else []
            wants_value_before = False
            continue
        if kind == 'native':
            segment, wants_value = draw(native_option(parser))
        else:
            segment, wants_value = [draw(words.filter(not_extension_word(parser)))], False
            positional_seen = positional_seen or (not wants_value_before and _starts_positionals(parser, segment[0]))
        wants_value_before = wants_value
        argv += segment
        plain += segment
    if draw(st.integers(0, 40)) == 0:
        help_word = [draw(st.sampled_from(['-h', '--help', '--he', '--hel']))]
        argv += help_word
        plain += help_word
    tail: list[str] = []
    if draw(st.integers(0, 9)):  # a script, mostly
        if draw(st.integers(0, 5)) == 0:
            tail.append('--')
        tail.append(draw(scripts.filter(not_extension_word(parser))))
        if not wants_value_before and _starts_positionals(parser, tail[0]):  # what follows is the script's
            user_word = st.one_of(words, extension_segment(parser))
        else:  # a "script" such as `-x` is an unknown option: dslaunch's own must not follow
            user_word = words.filter(not_extension_word(parser))
        user_segment = st.one_of(
            user_word,
            native_segment(parser),
            st.sampled_from(['--', '-h', '--help']),
        ).map(lambda w: w if isinstance(w, list) else [w])
        for segment in draw(st.lists(user_segment, max_size=5)):
            tail += segment
    return Case(argv + tail, plain + tail)


# ---- 1 and 2: the parsers --------------------------------------------------------------------------
PARSERS = [pytest.param(RUNNER, id='runner'), pytest.param(LAUNCH, id='launch')]


@pytest.mark.parametrize('parser', PARSERS)
def test_flag_tables_cover_deepspeed(parser: Parser) -> None:
    """The tables above list every DeepSpeed option (so the fuzzing reaches all of them) and every
    dslaunch-only one; each name is one DeepSpeed accepts."""
    ds = vars(parser.oracle(['x']))
    assert set(ds) == {o.dest for o in parser.opts} | {parser.script_dest, parser.args_dest}
    assert set(default_extras(parser)) == set(parser.extensions)
    for opt in parser.opts:
        for name in opt.names:
            if opt.kind == 'flag':
                argv, expected = [name], True
            elif opt.kind == 'int':
                argv, expected = [name, '7'], 7
            elif opt.kind == 'str':
                argv, expected = [name, 'v w'], 'v w'
            else:
                argv, expected = [name, opt.kind[-1]], opt.kind[-1]
            assert getattr(parser.oracle([*argv, 'x']), opt.dest) == expected
            assert getattr(parser.ours([*argv, 'x']), opt.dest) == expected


@SETTINGS
@given(st.data())
@pytest.mark.parametrize('parser', PARSERS)
def test_parse_args_matches_deepspeed(parser: Parser, data: st.DataObject) -> None:
    case = data.draw(command_lines(parser), label='case')
    check(parser, case.argv, case.without_extensions)


# Corner cases worth keeping whatever hypothesis draws (None: no dslaunch-only option in the line).
CORNER_CASES = [
    # A word with a space is a value (or the script) to argparse, but `--<dslaunch option>=...` is
    # matched by its exact name first, so dslaunch took these as its own options.
    (RUNNER, ['--dry_run=a b'], None),
    (RUNNER, ['-H', '--grace_period=1 x', 'train.py'], None),
    (RUNNER, ['--launcher_args', '--report_json=a b', 'train.py'], None),
    (LAUNCH, ['--node_rank', '0', '--dry_run=a b'], None),
    (LAUNCH, ['--master_addr', '--grace_period=1 x', 'train.py'], None),
    (RUNNER, ['-H', '--dry=1 x', 'train.py'], None),  # a prefix of one: fine
    (RUNNER, ['train.py', '--dry_run=a b', '--grace_period', '5'], None),  # after the script: the script's
    (RUNNER, ['--num_accel', '2', '--num_g=3', '-qHhosts', '--', 'train.py', '--', '-x'], None),
    (RUNNER, ['--ma', '1', 'train.py'], None),  # ambiguous among DeepSpeed's own options
    (RUNNER, ['--master_port', '-1', '--node_rank=-2', '--launcher', '-x', 'train.py'], None),
    (RUNNER, ['--log_level', 'INFO', 'train.py'], None),
    (RUNNER, ['--module=yes', 'train.py'], None),
    (RUNNER, ['x y', '--num_gpus=2', '--e', 'ünï\n'], None),
    (RUNNER, ['--max', '1', 'train.py'], None),  # a prefix of two dslaunch options: unknown, as in DeepSpeed
    (RUNNER, ['--dry', 'train.py'], ['train.py']),  # documented: a prefix selecting one dslaunch option
    (LAUNCH, ['--e', 'logs', '--save_pid', '-3', 'train.py', '--e'], None),
    (LAUNCH, ['--d', 'train.py'], ['train.py']),
    (LAUNCH, ['--world_info', '--', 'train.py'], None),
    (LAUNCH, ['--m', 'x'], None),
    (LAUNCH, ['-q', '--q', '--log_level=debug', 'train.py', '--local_rank=0'], None),
]


@pytest.mark.parametrize('parser, argv, without', [pytest.param(*c, id=f'{c[0].name}:{c[1]!r}') for c in CORNER_CASES])
def test_corner_cases_match_deepspeed(parser: Parser, argv: list[str], without: list[str] | None) -> None:
    check(parser, argv, argv if without is None else without)


# ---- 3: user arguments and exports on their way to the multi-node backends -------------------------
arg_text = st.text(st.characters(blacklist_categories=('Cs',), blacklist_characters='\x00'), max_size=8)
user_args_lists = st.lists(
    st.one_of(arg_text, st.sampled_from([*TRICKY, 'a"b c', "a'b c", 'a\\\\" b', '$(id) x', '%n %h', '100%'])),
    max_size=5,
)
ACTIVE = {'h1': [0, 1], 'h2': [0, 1]}
POOL = {'h1': 2, 'h2': 2}
WORLD_INFO = 'eyJoMSI6IFswLCAxXSwgImgyIjogWzAsIDFdfQ=='


def _both_namespaces(argv: list[str], user_args: list[str] | None = None) -> tuple[Any, Any]:
    """DeepSpeed's and dslaunch's runner namespaces for `argv`, with `user_args` set on both (argparse
    itself would refuse some, such as an ambiguous `--l` even after the script, in both parsers)."""
    ds, ours = _call(RUNNER.oracle, argv), _call(RUNNER.ours, argv)
    assert ds.namespace is not None and ours.namespace is not None, (ds.err, ours.err)
    if user_args is not None:
        ds.namespace['user_args'] = list(user_args)
        ours.namespace['user_args'] = list(user_args)
    return argparse.Namespace(**ds.namespace), argparse.Namespace(**ours.namespace)


@SETTINGS
@given(st.text(max_size=12), st.sampled_from(['A', ' NCCL_X ', 'PYTHONPATH\t']))
def test_add_export_value_rule_matches_deepspeed(value: str, key: str) -> None:
    """`deepspeed_quote` is DeepSpeed's `add_export` rule (kept as a fact, not applied): same result for
    any value; dslaunch's own `add_export` strips the name as DeepSpeed does and keeps the value raw
    (docs/compatibility-backends.md, "exported values")."""
    ds_args, our_args = _both_namespaces(['train.py'])
    theirs = ds_backends.PDSHRunner(ds_args, WORLD_INFO)
    theirs.add_export(key, value)
    assert theirs.exports == {key.strip(): deepspeed_quote(value)}
    if '\x00' not in value:
        ours = make_runner('pdsh', our_args, WORLD_INFO, POOL)
        ours.add_export(key, value)
        assert ours.exports == {key.strip(): value}


@SETTINGS
@given(user_args_lists, st.sampled_from(['openmpi', 'mpich', 'impi', 'slurm']), st.booleans())
def test_mpi_and_slurm_rank_commands_end_with_deepspeeds_user_words(
    user_args: list[str], name: str, module: bool
) -> None:
    """DeepSpeed passes the script and its arguments to mpirun/srun as raw words; so does dslaunch
    (through its rank helper, docs/compatibility-backends.md "rank command")."""
    argv = ['--launcher', name, '--master_addr', 'h1', *(['--module'] if module else []), 'train.py']
    ds_args, our_args = _both_namespaces(argv, user_args)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        backend = {
            'openmpi': ds_backends.OpenMPIRunner,
            'mpich': ds_backends.MPICHRunner,
            'impi': ds_backends.IMPIRunner,
        }
        theirs = backend.get(name, ds_backends.SlurmRunner)(ds_args, WORLD_INFO, POOL).get_cmd({}, dict(ACTIVE))
    ours = make_runner(name, our_args, WORLD_INFO, POOL).get_cmd({}, dict(ACTIVE))
    n = len(user_args) + 1
    assert ours[-n:] == theirs[-n:] == ['train.py', *user_args]
    assert ours[-n - 1] == ('--module' if module else 'slurm' if name == 'slurm' else name)


def _pdsh_rewrite(word: str) -> str:
    """What pdsh does to each word of the remote command (%h, %u, %n, %%; other %x kept)."""
    return re.sub(
        r'%(.)', lambda m: {'%': '%', 'h': 'HOST', 'u': 'USER', 'n': '0'}.get(m[1], m[0]), word, flags=re.DOTALL
    )


def _through_sh(words: list[str]) -> list[str]:
    """The argv a POSIX shell makes of `words` joined by spaces, as ssh hands pdsh's line to it."""
    line = "printf '%s\\0' " + ' '.join(words)
    out = subprocess.run(['sh', '-c', line], capture_output=True, check=True, timeout=10).stdout
    return [w.decode('utf-8', 'surrogateescape') for w in out.split(b'\0')[:-1]]


@settings(SETTINGS, max_examples=150)
@given(user_args_lists, st.one_of(st.just('train.py'), arg_text.filter(bool)))
def test_pdsh_user_words_arrive_where_deepspeeds_do(user_args: list[str], script: str) -> None:
    """DeepSpeed's PDSH backend wraps only arguments with a space in "..." (so `$HOME`, `;`, quotes,
    `%n` and empty arguments change or break on the remote side); dslaunch quotes every word for the
    shell and doubles `%` for pdsh (docs/compatibility-backends.md, "PDSH"). So: dslaunch's words
    arrive byte for byte through pdsh's rewrite and a real `sh`, and for an argument that needs no
    quoting at all the word on the command line is DeepSpeed's."""
    ds_args, our_args = _both_namespaces(['--master_addr', 'h1', 'train.py'], user_args)
    ds_args.user_script = our_args.user_script = script
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        theirs = ds_backends.PDSHRunner(ds_args, WORLD_INFO).get_cmd({}, ACTIVE)[0]
    ours = make_runner('pdsh', our_args, WORLD_INFO, POOL).get_cmd({}, ACTIVE)
    n = len(user_args) + 1
    sent = [_pdsh_rewrite(w) for w in ours[-n:]]
    assert _through_sh(sent) == [script, *user_args]
    for mine, deepspeeds, raw in zip(ours[-n:], theirs[-n:], [script, *user_args]):
        if re.fullmatch(r'[A-Za-z0-9_@+=:,./-]+', raw):
            assert mine == deepspeeds == raw
