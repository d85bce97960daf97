"""The three command lines against DeepSpeed's argparse parsers (golden/parse_args_cases.json)."""

from __future__ import annotations

import json

import golden
import pytest
from dslaunch import launch, launcher_helper, runner

PARSERS = {
    'runner.parse_args': (runner, 'deepspeed'),
    'launch.parse_args': (launch, 'launch.py'),
    'launcher_helper.parse_args': (launcher_helper, 'launcher_helper.py'),
}

# dslaunch-only options and their defaults; DeepSpeed's namespace never has them.
OBSERVABILITY = {'hang_action': 'stop', 'collapse': 'auto', 'collapse_window': 0.25, 'status_line': 'auto'}
EXTENSIONS = {
    'runner.parse_args': {
        'elastic_training': False,
        'min_elastic_nodes': -1,
        'max_elastic_nodes': -1,
        'dry_run': False,
        'grace_period': 30.0,
        'raw_output': False,
        'console_ranks': None,
        'hang_timeout': 0.0,
        'report_json': None,
        **OBSERVABILITY,
        'max_restarts': None,
        'rdzv_timeout': None,
        'rdzv_conf': None,
    },
    'launch.parse_args': {
        'enable_elastic_training': False,
        'min_elastic_nodes': -1,
        'max_elastic_nodes': -1,
        'grace_period': 30.0,
        'raw_output': False,
        'console_ranks': None,
        'dry_run': False,
        'report_json': None,
        'hang_timeout': 0.0,
        **OBSERVABILITY,
        'max_restarts': None,
        'rdzv_timeout': None,
        'rdzv_conf': None,
    },
    'launcher_helper.parse_args': {},
}
EXTENSION_FLAGS = {'--' + name for names in EXTENSIONS.values() for name in names}


def _cases():
    if not golden.available():
        return []
    data = golden.load('parse_args_cases.json')
    return [
        pytest.param(parser, case, id=f'{parser}:{json.dumps(case["argv"])[:60]}')
        for parser in PARSERS
        for case in data.get(parser, [])
    ]


def _uses_extension(case):
    """DeepSpeed 0.19.8 rejected a flag that dslaunch adds (e.g. the 0.19.7 elastic flags)."""
    last = case.get('stderr_last_line', '')
    return 'unrecognized arguments' in last and any(
        token.split('=', 1)[0] in EXTENSION_FLAGS for token in last.split()
    )  # `--min_elastic_nodes=1` as well as `--min_elastic_nodes 1`


@pytest.fixture(autouse=True)
def _fixed_width(monkeypatch):
    monkeypatch.setenv('COLUMNS', '80')  # usage wrapping as in the generator's (non-tty) run


@pytest.mark.parametrize('parser, case', _cases())
def test_parser_matches_deepspeed(parser, case, capsys):
    module, prog = PARSERS[parser]
    if 'namespace' in case or _uses_extension(case):
        namespace = vars(module.parse_args(case['argv'], prog=prog))
        if _uses_extension(case):
            # Deviation: dslaunch accepts these flags (as DeepSpeed 0.19.7 did).
            assert [flag for flag in case['argv'] if flag.split('=', 1)[0] in EXTENSION_FLAGS]
            return
        expected = case['namespace']
        assert {k: namespace[k] for k in expected} == expected
        assert list(namespace)[: len(expected)] == list(expected)  # same declaration order
        extras = {k: v for k, v in namespace.items() if k not in expected}
        assert extras == EXTENSIONS[parser]
        return
    with pytest.raises(SystemExit) as info:
        module.parse_args(case['argv'], prog=prog)
    assert info.value.code == case['system_exit']
    out, err = capsys.readouterr()
    err_lines = err.strip().splitlines()
    assert (err_lines[-1] if err_lines else '') == case['stderr_last_line']
    if 'stdout_first_line' in case:
        assert out.splitlines()[0] == case['stdout_first_line']


def test_elastic_flags_parse():
    args = runner.parse_args(
        ['--elastic_training', '--min_elastic_nodes', '1', '--max_elastic_nodes', '2', 'train.py'], prog='deepspeed'
    )
    assert (args.elastic_training, args.min_elastic_nodes, args.max_elastic_nodes) == (True, 1, 2)
    assert args.user_script == 'train.py' and args.user_args == []
    args = launch.parse_args(['--enable_elastic_training', 'train.py'], prog='launch.py')
    assert args.enable_elastic_training


def test_dslaunch_options_parse():
    args = runner.parse_args(
        [
            '--dry_run',
            '--grace_period',
            '5',
            '--raw_output',
            '--console_ranks',
            '0,2-3',
            '--hang_timeout',
            '60',
            'train.py',
            '--dry_run',
        ],
        prog='deepspeed',
    )
    assert (args.dry_run, args.grace_period, args.raw_output, args.console_ranks, args.hang_timeout) == (
        True,
        5.0,
        True,
        '0,2-3',
        60.0,
    )
    assert args.user_args == ['--dry_run']  # after the script everything belongs to the script


@pytest.mark.parametrize(
    'module, prog, prefix, dest, value',
    [
        (launch, 'launch.py', '--e', 'enable_each_rank_log', 'logs'),  # not ambiguous with --enable_elastic_training
        (launch, 'launch.py', '--enable', 'enable_each_rank_log', 'logs'),
        (runner, 'deepspeed', '--ma', None, None),  # still ambiguous between DeepSpeed's --master_*
        (runner, 'deepspeed', '--dry', 'dry_run', True),  # an extension's own prefix still works
    ],
)
def test_extensions_do_not_change_deepspeed_abbreviations(module, prog, prefix, dest, value, capsys):
    argv = [prefix] + ([] if value is True else ['logs' if value else 'x']) + ['train.py']
    if dest is None:
        with pytest.raises(SystemExit):
            module.parse_args(argv, prog=prog)
        assert 'could match --master_port, --master_addr' in capsys.readouterr().err
        return
    assert getattr(module.parse_args(argv, prog=prog), dest) == value


@pytest.mark.parametrize('module, prog', [(runner, 'deepspeed'), (launch, 'launch.py')])
@pytest.mark.parametrize('word', ['--c', '--co=1', '--hang', '--max', '--r'])
def test_a_prefix_of_several_extensions_stays_an_unknown_option(module, prog, word):
    # DeepSpeed knows none of these options, so after the script such a word is the script's.
    # argparse checks every argument for ambiguity before parsing: an ambiguous match against
    # dslaunch's own options would stop the script's arguments from ever reaching it.
    head = ['--world_info', 'X'] if module is launch else []
    args = vars(module.parse_args([*head, 'train.py', word, 'cfg.json'], prog=prog))
    assert args['user_args' if module is runner else 'training_script_args'] == [word, 'cfg.json']


def test_a_spaced_value_is_not_an_extension_prefix():
    # `-H '--d=1 x'` is a hostfile path to DeepSpeed (argparse takes a word with a space as a value)
    assert runner.parse_args(['-H', '--d=1 x', 'train.py']).hostfile == '--d=1 x'


def test_prog_defaults_to_argv0(monkeypatch):
    monkeypatch.setattr('sys.argv', ['/usr/local/bin/ds', 'train.py'])
    assert runner.build_parser().prog == 'ds'
