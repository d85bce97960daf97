"""Per-rank argv/env of the per-node launcher against real DeepSpeed runs (golden/rank_mapping_cases.json)."""

from __future__ import annotations

import os

import golden
import pytest
import vectors
from dslaunch import launch
from dslaunch.errors import UsageError, WorldInfoError
from dslaunch.numa import StaticTopology
from dslaunch.world_info import encode_world_info

CASES = vectors.cases('rank_mapping_cases.json')
PYTHON = '<PYTHON>'
STAMP = '20260101120000'
# What DeepSpeed's launch.py sets for a child; everything else is inherited.
LAUNCHER_KEYS = {
    'RANK',
    'LOCAL_RANK',
    'WORLD_SIZE',
    'LOCAL_SIZE',
    'CROSS_RANK',
    'CROSS_SIZE',
    'MASTER_ADDR',
    'MASTER_PORT',
    'CUDA_VISIBLE_DEVICES',
    'OMP_NUM_THREADS',
}
# Deviation: set by `import deepspeed` in the launcher and leaked into every rank; dslaunch does not.
LEAKED_BY_DEEPSPEED = {'PYTORCH_NVML_BASED_CUDA_CHECK'}


def _plans(case):
    argv = case['launch_argv']
    assert argv[1:4] == ['-u', '-m', 'deepspeed.launcher.launch']
    args = launch.parse_args(argv[4:], prog='launch.py')
    world_info = launch.load_world_info(args)
    vectors.ordered_equal(world_info, case['world_info'])
    return args, launch.rank_plans(world_info, args.node_rank, args, case['parent_env'], python=PYTHON, timestamp=STAMP)


def _script_position(args):
    return 0 if args.no_python else (3 if args.module else 2)


@pytest.mark.parametrize('case', CASES, ids=golden.case_id)
def test_children_argv(case):
    args, plans = _plans(case)
    observed = case['children_observed']
    assert len(plans) == len(observed)
    at = _script_position(args)
    for plan, child in zip(plans, observed):
        if not args.no_python:
            assert plan.argv[:at] == [PYTHON, '-u', *(['-m'] if args.module else [])]
        script = plan.argv[at]
        assert script == args.training_script
        seen_script = vectors.fill(child['argv'][0], CWD='')
        if args.module:  # python replaced the module name by its file
            assert seen_script.endswith('/' + script.replace('.', '/') + '.py')
        else:
            assert seen_script == script
        assert plan.argv[at + 1 :] == child['argv'][1:]
        if args.enable_each_rank_log == 'None':
            assert plan.log_name is None
        else:  # launch.py redirects each rank to <dir>/<YYYYmmddHHMMSS>_rank<RANK>.log
            assert plan.log_name == os.path.join(args.enable_each_rank_log, f'{STAMP}_rank{plan.rank}.log')


@pytest.mark.parametrize('case', CASES, ids=golden.case_id)
def test_children_env(case):
    _, plans = _plans(case)
    for plan, child in zip(plans, case['children_observed']):
        changed = {k: v for k, v in child['env_changed_by_launcher'].items() if k not in LEAKED_BY_DEEPSPEED}
        assert {k: plan.env_overrides.get(k) for k in changed} == changed
        assert set(plan.env_overrides) <= LAUNCHER_KEYS
        merged = {**case['parent_env'], **plan.env_overrides}
        assert {k: merged.get(k) for k in child['env']} == child['env']
        assert plan.rank == int(child['env']['RANK']) and plan.local_rank == int(child['env']['LOCAL_RANK'])
        assert not child['env_removed_by_launcher']


@pytest.mark.parametrize('case', [c for c in CASES if 'reproduced' in c], ids=golden.case_id)
def test_rank_arithmetic(case):
    _, plans = _plans(case)
    expected = [(int(p['RANK']), int(p['LOCAL_RANK'])) for p in case['reproduced']['local_procs']]
    assert [(p.rank, p.local_rank) for p in plans] == expected


def _args(*extra, world=None, node_rank=0):
    world = world or {'localhost': [0, 1]}
    return launch.parse_args(
        [f'--world_info={encode_world_info(world)}', f'--node_rank={node_rank}', *extra, 'train.py', '--lr', '0.1'],
        prog='launch.py',
    )


def test_node_rank_out_of_range_is_a_world_info_error():
    args = _args()
    for bad in (1, 5, -1):
        with pytest.raises(WorldInfoError, match='out of range'):
            launch.rank_plans({'localhost': [0, 1]}, bad, args, {})


def test_zero_slot_node_starts_nothing():
    assert launch.rank_plans({'localhost': []}, 0, _args(), {}) == []


def test_each_rank_log_names(tmp_path):
    world = {'a': [0, 1], 'b': [0, 1]}
    args = _args(f'--enable_each_rank_log={tmp_path}', world=world, node_rank=1)
    plans = launch.rank_plans(world, 1, args, {}, timestamp=STAMP)
    assert [p.log_name for p in plans] == [os.path.join(tmp_path, f'{STAMP}_rank{r}.log') for r in (2, 3)]
    default = launch.rank_plans(world, 1, args, {})[0].log_name
    assert default is not None and os.path.basename(default).endswith('_rank2.log')
    assert len(os.path.basename(default)) == len(f'{STAMP}_rank2.log')


def test_bind_cores_adds_numactl_and_omp_threads():
    args = _args('--bind_cores_to_rank', '--bind_core_list=0-7')
    topo = StaticTopology([[0, 1, 2, 3], [4, 5, 6, 7]], 8)
    plans = launch.rank_plans({'localhost': [0, 1]}, 0, args, {}, python=PYTHON, topology=topo)
    assert plans[1].argv[:5] == ['numactl', '-m', '1', '-C', '4-7']
    assert plans[1].argv[5:8] == [PYTHON, '-u', 'train.py']
    assert plans[1].env_overrides['OMP_NUM_THREADS'] == '4'


def test_uuid_slots_become_cuda_visible_devices():
    plans = launch.rank_plans({'localhost': ['GPU-a', 'GPU-b']}, 0, _args(), {})
    assert plans[0].env_overrides['CUDA_VISIBLE_DEVICES'] == 'GPU-a,GPU-b'


def test_module_with_no_python_is_rejected():
    with pytest.raises(UsageError, match="Don't use both"):
        launch.rank_plans({'localhost': [0]}, 0, _args('--module', '--no_python'), {})


def test_world_info_none_is_rejected():
    args = launch.parse_args(['train.py'], prog='launch.py')
    with pytest.raises(WorldInfoError, match='world_info can not be None'):
        launch.load_world_info(args)


def test_ensure_rank_log_dir(tmp_path):
    target = tmp_path / 'logs' / 'nested'
    launch.ensure_rank_log_dir(str(target))
    assert target.is_dir()
    afile = tmp_path / 'afile'
    afile.write_text('x')
    with pytest.raises(UsageError, match='should not be a file, it should be a directory'):
        launch.ensure_rank_log_dir(str(afile))
