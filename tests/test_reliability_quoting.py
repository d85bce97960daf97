"""Hostile arguments and environment values (issue 8): quotes, `$()`, backticks, `;`, newlines,
`%`, globs and Unicode reach the rank byte for byte, with no shell injection.

- Local path: the real `dslaunch` CLI starts real ranks that record their argv and environment as
  JSON; and the command `--dry_run` prints, run through a real `sh -c`, starts ranks that record
  the same.
- Multi-node: hypothesis-generated values go through the PDSH command builder and the remote
  command is run by real `/bin/sh` and `bash` (as pdsh's ssh hands it over), into a stub launcher;
  the MPI and Slurm builders must carry them as raw argv words or environment values.
  (tests/test_backend_quoting.py runs a fixed list of nasty values through the real engines.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

hypothesis = pytest.importorskip('hypothesis')
from dslaunch.backends import HELPER_MODULE, LAUNCHERS, PDSHRunner, make_runner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DSLAUNCH = str(Path(sys.executable).parent / 'dslaunch')
PY = sys.executable
NASTY = [
    'a b', "it's", 'say "hi"', '$HOME', '$(touch PWNED)', '`touch PWNED`', 'a;touch PWNED', 'a && b', 'x|y>z<w',
    'a\nb', 'a\r\nb', 'a\tb', '', 'ünïcødé ✓ 日本', '*', '~', '!', '#c', "'", '"', '\\', '{a,b}', '  lead',
    '100%', '%h %n %u %%', '-x', '--eq=a b', '\x1b[31mred', 'ends with space ',
]  # fmt: skip

RECORDER = textwrap.dedent("""\
    import json, os, sys
    rank = os.environ.get('RANK', 'x')
    keep = {k: v for k, v in os.environ.items() if k.startswith('Q_')}
    with open(os.path.join(os.environ['QDIR'], f'rank{rank}.json'), 'w', encoding='utf-8') as f:
        json.dump({'argv': sys.argv[1:], 'env': keep}, f)
""")


def _env(tmp_path: Path, values: list[str]) -> dict[str, str]:
    env = dict(os.environ, QDIR=str(tmp_path))
    env.pop('CUDA_VISIBLE_DEVICES', None)
    env.update({f'Q_{i}': v for i, v in enumerate(values)})
    return env


def _records(tmp_path: Path, n: int) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads((tmp_path / f'rank{r}.json').read_text(encoding='utf-8')) for r in range(n)]


def _assert_no_injection(where: Path) -> None:
    assert not (where / 'PWNED').exists(), 'a value was executed by a shell'


def test_local_cli_delivers_argv_and_env_byte_for_byte(tmp_path: Path) -> None:
    script = tmp_path / 'recorder.py'
    script.write_text(RECORDER)
    p = subprocess.run(
        [DSLAUNCH, '--master_port', '0', '--num_gpus', '2', str(script), *NASTY],
        env=_env(tmp_path, NASTY), cwd=tmp_path, capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr.decode(errors='replace')
    for r, rec in enumerate(_records(tmp_path, 2)):
        assert rec['argv'] == [f'--local_rank={r}', *NASTY]
        assert rec['env'] == {f'Q_{i}': v for i, v in enumerate(NASTY)}
    _assert_no_injection(tmp_path)


def test_dry_run_command_through_a_real_shell_delivers_the_same(tmp_path: Path) -> None:
    """The per-node launcher command `--dry_run` prints is a shell line: `sh -c` on it starts the
    ranks with exactly the user's arguments."""
    script = tmp_path / 'recorder.py'
    script.write_text(RECORDER)
    env = _env(tmp_path, NASTY)
    p = subprocess.run(
        [DSLAUNCH, '--master_port', '0', '--num_gpus', '2', '--dry_run', str(script), *NASTY],
        env=env, cwd=tmp_path, capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    stdout = p.stdout.decode()  # bytes as printed: no newline translation (a value holds \r\n)
    # The command is the last thing printed (after the runner's notes); quoted values hold newlines,
    # the interpreter's path (the console script's, python or python3) does not.
    at = stdout.index(' -u -m dslaunch.launch ')
    line = stdout[stdout.rfind('\n', 0, at) + 1 :]
    assert line.startswith(os.path.dirname(sys.executable) + '/python'), line
    done = subprocess.run(['/bin/sh', '-c', line], env=env, cwd=tmp_path, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode(errors='replace')
    for r, rec in enumerate(_records(tmp_path, 2)):
        assert rec['argv'] == [f'--local_rank={r}', *NASTY]
    _assert_no_injection(tmp_path)


# ---- multi-node command lines, with generated values ------------------------------------------------------

# Anything a user can put in an argv word or an environment value: no NUL (execve cannot carry one).
values = st.text(
    st.characters(blacklist_characters='\x00', blacklist_categories=('Cs',)), max_size=12
) | st.sampled_from(NASTY)
QSETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))

STUB = 'dslaunch_qstub'
STUB_SOURCE = textwrap.dedent("""
    import json, os, sys
    keep = {k: v for k, v in os.environ.items() if k.startswith('Q_')}
    with open(os.path.join(os.environ['QDIR'], f'{os.getpid()}.json'), 'w', encoding='utf-8') as f:
        json.dump({'argv': sys.argv[1:], 'env': keep, 'cwd': os.getcwd()}, f)
""")


def make_args(user_args: list[str], **kw: object) -> argparse.Namespace:
    base: dict[str, object] = {
        'launcher_args': '', 'module': False, 'no_python': False, 'no_local_rank': False, 'save_pid': False,
        'enable_each_rank_log': 'None', 'bind_cores_to_rank': False, 'bind_core_list': None, 'venv_script': None,
        'ssh_port': None, 'include': '', 'exclude': '', 'num_nodes': -1, 'num_gpus': -1, 'master_addr': '10.0.0.1',
        'master_port': 29500, 'hostfile': 'hostfile', 'user_script': 'train.py', 'user_args': user_args,
        'log_level': 'info', 'quiet': False,
    }  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


def pdsh_format(word: str, host: str, rank: int) -> str:
    """pdsh's rewriting of each remote word: %h, %u, %n, %% (any other %x kept)."""
    out, i = [], 0
    while i < len(word):
        if word[i] == '%' and i + 1 < len(word):
            out.append({'h': host, 'u': 'root', 'n': str(rank), '%': '%'}.get(word[i + 1], word[i : i + 2]))
            i += 2
        else:
            out.append(word[i])
            i += 1
    return ''.join(out)


@pytest.fixture(scope='module')
def stub_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp('qstub')
    (d / f'{STUB}.py').write_text(STUB_SOURCE)
    return d


@pytest.mark.parametrize('shell', ['/bin/sh', 'bash'])
@QSETTINGS
@given(args=st.lists(values, max_size=5), exports=st.lists(values, max_size=4), script=values, log_dir=values)
def test_pdsh_remote_command_delivers_generated_values(
    stub_dir: Path, tmp_path_factory: pytest.TempPathFactory, shell: str, args: list[str], exports: list[str],
    script: str, log_dir: str,
) -> None:  # fmt: skip
    if not shutil.which(shell):
        pytest.skip(f'{shell} not installed')
    out = tmp_path_factory.mktemp('q')
    script = script or 'train.py'  # DeepSpeed's positional user_script cannot be empty
    runner = PDSHRunner(make_args(args, user_script=script, enable_each_rank_log=log_dir or 'None'), 'e30=')
    runner.launch_module = STUB
    runner.add_export('PYTHONPATH', str(stub_dir))
    runner.add_export('QDIR', str(out))
    for i, v in enumerate(exports):
        runner.add_export(f'Q_{i}', v)
    old = os.getcwd()
    os.chdir(out)  # the `cd <cwd>` word: the remote side runs where the user ran dslaunch
    try:
        cmd = runner.get_cmd({}, {'hA': [0]})
    finally:
        os.chdir(old)
    remote = cmd[6 + len(runner.launcher_args()) :]
    line = ' '.join(pdsh_format(w, 'hA', 0) for w in remote)
    done = subprocess.run(
        [shell, '-c', line], env={'PATH': os.defpath}, cwd='/', capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr.decode(errors='replace')
    (dump,) = [json.loads(p.read_text(encoding='utf-8')) for p in out.glob('*.json')]
    assert dump['argv'][-len(args) - 1 :] == [script, *args]
    assert dump['env'] == {f'Q_{i}': v for i, v in enumerate(exports)}
    assert dump['cwd'] == str(out)
    if log_dir:
        assert f'--enable_each_rank_log={log_dir}' in dump['argv']
    assert '--master_addr=10.0.0.1' in dump['argv'] and '--node_rank=0' in dump['argv']
    _assert_no_injection(Path('/'))
    _assert_no_injection(out)


@pytest.mark.parametrize('name', [n for n in LAUNCHERS if n != 'pdsh'])
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(args=st.lists(values, max_size=5), exports=st.lists(values, max_size=4))
def test_mpi_and_slurm_carry_generated_values_as_raw_words(name: str, args: list[str], exports: list[str]) -> None:
    """No shell between these launchers and the rank: every value must be one raw argv word (or,
    for srun, an environment value), unchanged."""
    runner = make_runner(name, make_args(args), 'e30=', {'hA': 1, 'hB': 1})
    for i, v in enumerate(exports):
        runner.add_export(f'Q_{i}', v)
    env: dict[str, str] = {}
    try:
        cmd = runner.get_cmd(env, {'hA': [0], 'hB': [0]})
    finally:
        runner.cleanup()
    helper = cmd.index(HELPER_MODULE)
    assert cmd[helper + 1 :] == ['--launcher', name, 'train.py', *args]
    cmd = cmd[:helper]  # the launcher's own words (the user's follow the helper)
    want = {f'Q_{i}': v for i, v in enumerate(exports)}
    if name == 'slurm':
        got = {k: env[k] for k in want}
    elif name in ('mpich', 'impi'):
        got = {cmd[i + 1]: cmd[i + 2] for i, w in enumerate(cmd) if w == '-genv' and cmd[i + 1] in want}
    else:
        flag = '-x' if name == 'openmpi' else '-env'
        pairs = [cmd[i + 1] for i, w in enumerate(cmd) if w == flag]
        got = dict(p.split('=', 1) for p in pairs if p.split('=', 1)[0] in want)
        if name == 'mvapich' and not pairs:  # exports in a file MVAPICH reads
            pytest.skip('mvapich passes exports another way')
    assert got == want
