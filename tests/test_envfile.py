"""Exports to remote ranks: EXPORT_ENVS prefixes and .deepspeed_env files."""

from __future__ import annotations

import pytest
from dslaunch import envfile
from dslaunch.errors import EnvFileError


def test_collect_exports_prefixes_and_order():
    environ = {
        'PATH': '/bin',
        'NCCL_DEBUG': 'INFO',
        'WANDB_API_KEY': 'k',
        'PYTHONPATH': '/p',
        'HF_HOME': '/h',
        'MV2_X': '1',
        'OMP_NUM_THREADS': '4',
        'UCX_TLS': 'rc',
        'CUDA_HOME': '/c',
        'LD_LIBRARY_PATH': '/l',
        'MLFLOW_TRACKING_URI': 'u',
        'PYTHONUNBUFFERED': '1',
        'NCCL_IB_HCA': 'mlx5_0 mlx5_1',
    }
    exports = envfile.collect_exports(environ)
    assert list(exports) == [
        'NCCL_DEBUG',
        'PYTHONPATH',
        'MV2_X',
        'UCX_TLS',
        'MLFLOW_TRACKING_URI',
        'PYTHONUNBUFFERED',
        'NCCL_IB_HCA',
    ]
    assert exports['NCCL_IB_HCA'] == 'mlx5_0 mlx5_1'


def test_collect_exports_without_accelerator_prefixes():
    assert envfile.collect_exports({'NCCL_DEBUG': 'INFO', 'UCX_X': '1'}, accelerator_prefixes=()) == {'UCX_X': '1'}


def test_aisc_job_name_keeps_per_node_devices():
    environ = {'AISC_JOB_NAME': 'j', 'NCCL_IB_HCA': 'x', 'UCX_NET_DEVICES': 'y', 'NCCL_DEBUG': 'INFO'}
    assert envfile.collect_exports(environ) == {'NCCL_DEBUG': 'INFO'}


def test_parse_env_file_tolerates_blank_comment_and_export():
    text = [
        '# a comment\n',
        '\n',
        'A=1\n',
        '   \n',
        'export B=two words\n',
        'SPACED = v \n',
        'C=x=y\n',
        '  # indented comment\n',
        'A=3\n',
        'export\tD=4\n',
        'E=\n',
    ]
    parsed = envfile.parse_env_file(text)
    assert parsed == {'A': '3', 'B': 'two words', 'SPACED': 'v', 'C': 'x=y', 'D': '4', 'E': ''}
    assert list(parsed) == ['A', 'B', 'SPACED', 'C', 'D', 'E']  # A keeps its first position


def test_one_pair_of_surrounding_quotes_is_removed():
    # what a rank sees under DeepSpeed's pdsh for K="eth0": the remote shell drops the quotes
    lines = ['Q="a b"\n', "S='x'\n", 'R=1 # not a comment\n', 'H="$HOME"\n', 'M="a\n', 'N=""\n', 'O="a"b"\n']
    assert envfile.parse_env_file(lines) == {
        'Q': 'a b', 'S': 'x', 'R': '1 # not a comment', 'H': '$HOME', 'M': '"a', 'N': '', 'O': 'a"b',
    }  # fmt: skip


@pytest.mark.parametrize('line', ['JUSTAWORD\n', '=value\n', 'export ONLY\n'])
def test_parse_env_file_rejects_lines_without_assignment(line):
    with pytest.raises(EnvFileError, match='f:1'):
        envfile.parse_env_file([line], source='f')


def test_env_file_name_is_read_at_call_time(monkeypatch):
    monkeypatch.delenv('DS_ENV_FILE', raising=False)
    assert envfile.env_file_name() == '.deepspeed_env'
    monkeypatch.setenv('DS_ENV_FILE', 'custom_env')
    assert envfile.env_file_name() == 'custom_env'
    assert envfile.env_file_name({'DS_ENV_FILE': 'other'}) == 'other'


def test_env_file_paths_home_then_cwd(tmp_path):
    env = {'HOME': '/home/u'}
    assert envfile.env_file_paths(env, cwd='/work') == ['/home/u/.deepspeed_env', '/work/.deepspeed_env']
    assert envfile.env_file_paths(env) == ['/home/u/.deepspeed_env', './.deepspeed_env']
    absolute = str(tmp_path / 'abs_env')
    assert envfile.env_file_paths({'HOME': '/h', 'DS_ENV_FILE': absolute}) == [absolute]


def test_read_env_files_merges_home_then_cwd(tmp_path):
    home, cwd = tmp_path / 'home', tmp_path / 'cwd'
    home.mkdir()
    cwd.mkdir()
    (home / '.deepspeed_env').write_text('A=home\nB=home\n')
    (cwd / '.deepspeed_env').write_text('\n# local overrides\nB=cwd\nC=cwd\n')
    merged = envfile.read_env_files(
        {'HOME': str(home)}, paths=envfile.env_file_paths({'HOME': str(home)}, cwd=str(cwd))
    )
    assert merged == {'A': 'home', 'B': 'cwd', 'C': 'cwd'}
    assert list(merged) == ['A', 'B', 'C']


def test_read_env_files_uses_ds_env_file(tmp_path, monkeypatch):
    (tmp_path / 'my_env').write_text('X=1\n')
    monkeypatch.chdir(tmp_path)
    assert envfile.read_env_files({'HOME': str(tmp_path / 'nohome'), 'DS_ENV_FILE': 'my_env'}) == {'X': '1'}
    assert envfile.read_env_files({'HOME': str(tmp_path / 'nohome')}) == {}
