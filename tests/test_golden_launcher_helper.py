"""The MPI rank helper against DeepSpeed's ``env_mapping`` (golden/launcher_helper_cases.json)."""

from __future__ import annotations

import json
import os

import pytest
import vectors
from dslaunch import launcher_helper
from dslaunch.errors import EnvMappingError, UnknownLauncherError, UsageError

CASES = vectors.cases('launcher_helper_cases.json')
RANK_KEYS = ('RANK', 'LOCAL_RANK')
SIZE_KEYS = {'WORLD_SIZE', 'LOCAL_SIZE'}  # dslaunch extras, only where the MPI launcher says them


@pytest.mark.parametrize('case', CASES, ids=lambda c: json.dumps(c['env_in'], sort_keys=True))
def test_env_mapping_matches_deepspeed(case):
    if 'error' in case:
        with pytest.raises(EnvMappingError) as info:
            launcher_helper.env_mapping(case['env_in'])
        vectors.assert_same_error(info.value, case['error'])
        return
    mapped = launcher_helper.env_mapping(case['env_in'])
    expected = case['env_out']
    assert {k: mapped[k] for k in RANK_KEYS} == {k: expected[k] for k in RANK_KEYS}
    assert set(mapped) - set(RANK_KEYS) <= SIZE_KEYS
    for key in set(expected) - set(RANK_KEYS):
        assert mapped.get(key) == expected[key]


@pytest.mark.parametrize(
    'env, expected',
    [
        (
            {
                'OMPI_COMM_WORLD_RANK': '5',
                'OMPI_COMM_WORLD_LOCAL_RANK': '1',
                'OMPI_COMM_WORLD_SIZE': '8',
                'OMPI_COMM_WORLD_LOCAL_SIZE': '4',
            },
            {'RANK': '5', 'LOCAL_RANK': '1', 'WORLD_SIZE': '8', 'LOCAL_SIZE': '4'},
        ),
        (
            {
                'MV2_COMM_WORLD_RANK': '2',
                'MV2_COMM_WORLD_LOCAL_RANK': '0',
                'MV2_COMM_WORLD_SIZE': '4',
                'MV2_COMM_WORLD_LOCAL_SIZE': '2',
            },
            {'RANK': '2', 'LOCAL_RANK': '0', 'WORLD_SIZE': '4', 'LOCAL_SIZE': '2'},
        ),
        (
            {'SLURM_PROCID': '3', 'SLURM_LOCALID': '1', 'SLURM_NTASKS': '4', 'SLURM_NTASKS_PER_NODE': '2'},
            {'RANK': '3', 'LOCAL_RANK': '1', 'WORLD_SIZE': '4', 'LOCAL_SIZE': '2'},
        ),
        (
            {
                'SLURM_PROCID': '6',
                'SLURM_LOCALID': '0',
                'SLURM_NTASKS': '7',
                'SLURM_TASKS_PER_NODE': '2(x3),1',
                'SLURM_NODEID': '3',
            },
            {'RANK': '6', 'LOCAL_RANK': '0', 'WORLD_SIZE': '7', 'LOCAL_SIZE': '1'},
        ),
        (
            {'SLURM_PROCID': '4', 'SLURM_LOCALID': '0', 'SLURM_TASKS_PER_NODE': '2(x3),1', 'SLURM_NODEID': '2'},
            {'RANK': '4', 'LOCAL_RANK': '0', 'LOCAL_SIZE': '2'},
        ),
        (
            {'PMI_RANK': '3', 'MPI_LOCALRANKID': '1', 'PMI_SIZE': '4', 'MPI_LOCALNRANKS': '2'},
            {'RANK': '3', 'LOCAL_RANK': '1', 'WORLD_SIZE': '4', 'LOCAL_SIZE': '2'},
        ),
        # OpenMPI 5 (PMIx) sets PMIX_RANK but no local-rank name DeepSpeed knows: fall back to OMPI's.
        (
            {'PMIX_RANK': '1', 'OMPI_COMM_WORLD_RANK': '1', 'OMPI_COMM_WORLD_LOCAL_RANK': '1'},
            {'RANK': '1', 'LOCAL_RANK': '1'},
        ),
        # DeepSpeed's names win over the fallbacks (mpirun inside a Slurm allocation).
        (
            {'PMI_RANK': '3', 'MPI_LOCALRANKID': '1', 'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'},
            {'RANK': '3', 'LOCAL_RANK': '1'},
        ),
    ],
)
def test_other_mpi_launchers(env, expected):
    assert launcher_helper.env_mapping(env) == expected


def test_child_env_keeps_backend_sizes_but_overrides_ranks():
    env = {'PMI_RANK': '3', 'MPI_LOCALRANKID': '1', 'PMI_SIZE': '8', 'WORLD_SIZE': '4', 'RANK': '99'}
    child = launcher_helper.child_env(env)
    assert (child['RANK'], child['LOCAL_RANK'], child['WORLD_SIZE']) == ('3', '1', '4')
    assert 'LOCAL_SIZE' not in child


@pytest.mark.parametrize(
    'argv, expected',
    [
        (['train.py', '--lr', '0.1'], ['PY', '-u', 'train.py', '--lr', '0.1']),
        (['--module', 'pkg.mod', '--x'], ['PY', '-u', '-m', 'pkg.mod', '--x']),
        (['--no_python', './a.sh', 'x'], ['./a.sh', 'x']),
    ],
)
def test_child_argv(argv, expected):
    assert launcher_helper.child_argv(launcher_helper.parse_args(argv), python='PY') == expected


def test_module_and_no_python_is_an_error():
    with pytest.raises(UsageError):
        launcher_helper.child_argv(launcher_helper.parse_args(['--module', '--no_python', 'x']))


def _script(tmp_path, body):
    path = tmp_path / 'child.py'
    path.write_text('import os, signal, sys\n' + body)
    return str(path)


MPI_ENV = {'PMI_RANK': '1', 'MPI_LOCALRANKID': '1', 'PATH': '/usr/bin:/bin'}


def test_main_exits_with_the_child_status(tmp_path):
    script = _script(tmp_path, "assert os.environ['RANK'] == '1' and os.environ['LOCAL_RANK'] == '1'\nsys.exit(3)\n")
    assert launcher_helper.main([script], environ=MPI_ENV) == 3


def test_main_reports_death_by_signal_as_256_minus_n(tmp_path):
    script = _script(tmp_path, 'os.kill(os.getpid(), signal.SIGTERM)\n')
    assert launcher_helper.main([script], environ=MPI_ENV) == 256 - 15  # as DeepSpeed's launch.py


def test_main_module_mode(tmp_path, monkeypatch):
    (tmp_path / 'helper_child_mod.py').write_text('import sys\nsys.exit(sys.argv[1] == "--ok" and 7 or 1)\n')
    env = {**MPI_ENV, 'PYTHONPATH': str(tmp_path)}
    assert launcher_helper.main(['--module', 'helper_child_mod', '--ok'], environ=env) == 7


def test_main_unknown_launcher_and_missing_rank(capsys, tmp_path):
    script = _script(tmp_path, 'sys.exit(0)\n')
    assert launcher_helper.main(['--launcher', 'bogus', script], environ=MPI_ENV) == 1
    assert 'Unknown launcher bogus' in capsys.readouterr().err
    assert launcher_helper.main([script], environ={'PATH': '/usr/bin'}) == 1
    assert 'rank number is not in current env!' in capsys.readouterr().err


def test_main_missing_program(tmp_path):
    assert launcher_helper.main(['--no_python', str(tmp_path / 'nope')], environ=MPI_ENV) == 127


def test_unknown_launcher_error_type():
    assert issubclass(UnknownLauncherError, NotImplementedError)


@pytest.mark.skipif(not os.path.exists('/usr/bin/numactl') or len(os.sched_getaffinity(0)) < 2,
                    reason='needs numactl and two cores')
def test_main_binds_cores_like_deepspeeds_impi_segments(tmp_path):
    # DeepSpeed's IMPI runner put `-genv OMP_NUM_THREADS <cores per rank>` and a `numactl -C` prefix
    # in each rank's segment; the helper does both on the rank's own node
    script = _script(tmp_path, "sys.exit(0 if (sorted(os.sched_getaffinity(0)), os.environ['OMP_NUM_THREADS'])"
                               " == ([1], '1') else 9)\n")
    env = {**MPI_ENV, 'MPI_LOCALNRANKS': '2'}
    assert launcher_helper.main(['--launcher', 'impi', '--bind_cores_to_rank', '--bind_core_list', '0-1', script],
                                environ=env) == 0


def test_bind_cores_without_local_size_is_a_usage_error():
    args = launcher_helper.parse_args(['--bind_cores_to_rank', 'x.py'])
    with pytest.raises(UsageError, match='LOCAL_SIZE'):
        launcher_helper.bind_cores(args, {'LOCAL_RANK': '0'})
