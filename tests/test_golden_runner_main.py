"""The runner's decisions (``runner.plan``) against DeepSpeed's ``runner.main()`` (golden/runner_main_cases.json).

DeepSpeed's result is the default expectation. ``expected_outcome`` below applies dslaunch's
documented deviations (docs/compatibility.md) on top of it; every case that differs from
DeepSpeed must carry the tag of such a deviation, so an undocumented difference fails.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any

import golden
import pytest
import vectors
from dslaunch import runner
from dslaunch.devices import visible_devices
from dslaunch.envfile import collect_exports, parse_env_file
from dslaunch.errors import (
    DslaunchError,
    EnvFileError,
    HostfileError,
    LauncherError,
    ResourceFilterError,
    UnknownLauncherError,
    UsageError,
)
from dslaunch.hostfile import parse_hostfile, parse_inclusion_exclusion, parse_resource_filter

CASES = vectors.cases('runner_main_cases.json')
PID = 4242
FREE_PORT = 45678
HOSTNAME_I = '10.1.2.3 172.17.0.1\n'
CVD = 'CUDA_VISIBLE_DEVICES'

# Tags of deliberate differences (each is a row of docs/compatibility.md).
CUDA_IDS = 'cuda-visible-devices-are-slots'
CPU_RANKS = 'cpu-ranks-without-gpus'
MASTER_ADDR = 'user-master-addr-respected'
NUM_GPUS_BOUND = 'num-gpus-bounded'
EMPTY = 'empty-selection-error'
UNKNOWN_LAUNCHER = 'unknown-launcher-always-error'
SSH_WHERE_USED = 'ssh-only-where-used'
HOSTNAME_EMPTY = 'hostname-i-empty-error'
ASSERT_AS_ERROR = 'assert-raised-as-error'
ENV_FILE = 'env-file-tolerant'
AUTOTUNING = 'autotuning-unsupported'
BACKEND_OWN = 'backend-deviation'
MASTER_PORT_ZERO = 'master-port-zero-picks-free-port'


class FakeProbes:
    """Answers as DeepSpeed's patched functions did in the vector, and records the ssh calls."""

    def __init__(self, device_count: int, ssh_ok: bool = True, hostname_i: str = HOSTNAME_I) -> None:
        self._device_count = device_count
        self._ssh_ok = ssh_ok
        self._hostname_i = hostname_i
        self.ssh_calls: list[tuple[str, str, int | None]] = []
        self.backend_checks: list[str] = []

    def device_count(self) -> int:
        return self._device_count

    def ssh_reachable(self, host: str, port: int | None) -> bool:
        self.ssh_calls.append(('check_call', host, port))
        return self._ssh_ok

    def hostname_i(self, host: str, port: int | None) -> str:
        self.ssh_calls.append(('check_output', host, port))
        return self._hostname_i

    def backend_exists(self, name: str) -> bool:
        self.backend_checks.append(name)
        return True  # forced True in the vectors

    def port_free(self, addr: str, port: int) -> bool:
        return True

    def free_port(self) -> int:
        return FREE_PORT


@dataclass
class Outcome:
    error: tuple[type[BaseException], str | None] | None = None  # (class, exact message or None)
    error_contains: str = ''
    mode: str = ''
    active: dict[str, list[Any]] = field(default_factory=dict)
    master_addr: str = ''
    ssh_calls: list[tuple[str, str, int | None]] = field(default_factory=list)
    removed: tuple[str, ...] = ()
    exports: dict[str, str] | None = None
    tags: set[str] = field(default_factory=set)


def ds_ssh_calls(case: dict[str, Any]) -> list[tuple[str, str, int | None]]:
    """DeepSpeed's recorded ssh command lines as (call, host, port)."""
    calls = []
    for call in case.get('ssh_calls', []):
        words = call['cmd']
        port = int(words[words.index('-p') + 1]) if '-p' in words else None
        host = words[words.index('hostname') - 1]
        calls.append((call['call'], host, port))
    return calls


def probes_for(case: dict[str, Any]) -> FakeProbes:
    err = case.get('error') or {}
    ssh_ok = 'was not reachable via ssh' not in err.get('message', '')
    hostname_empty = err.get('type') == 'IndexError' and any(
        c['call'] == 'check_output' for c in case.get('ssh_calls', [])
    )
    return FakeProbes(case['device_count'], ssh_ok=ssh_ok, hostname_i='' if hostname_empty else HOSTNAME_I)


class _Stop(Exception):
    """Ends the expectation early: dslaunch is expected to raise ``Outcome.error``."""


def _fail(out: Outcome, cls: type[BaseException], message: str | None, *tags: str, contains: str = '') -> None:
    out.error, out.error_contains = (cls, message), contains
    out.tags.update(tags)
    raise _Stop


def expected_outcome(
    case: dict[str, Any], args: Any, env: dict[str, str], probes: FakeProbes, env_file_texts: dict[str, str]
) -> Outcome:
    """dslaunch's documented behaviour for this input, step by step as in spec section 3."""
    out = Outcome()
    try:
        if args.autotuning:
            _fail(out, UsageError, None, AUTOTUNING, contains='not supported')
        if case['hostfile'] is None:
            active, cpu = _expect_local_pool(case, args, env, probes, out)
        else:
            active, cpu = _expect_hostfile_pool(case, args, out), False
        if not active:
            _fail(out, ResourceFilterError, None, EMPTY, contains='Nothing left to run on')
        out.active = _expect_limits(args, active, cpu, out)
        _expect_launch(case, args, probes, out)
        if out.mode == 'multinode':
            _expect_exports(case, env, env_file_texts, out)
    except _Stop:
        pass
    return out


def _conflict(args: Any) -> bool:
    return (args.num_nodes >= 0 or args.num_gpus >= 0) and bool(args.include or args.exclude)


def _expect_local_pool(case, args, env, probes, out):
    raw_cvd = env.get(CVD, '')
    if raw_cvd:
        ids: list[Any] = visible_devices({CVD: raw_cvd}) or []
        out.removed = (CVD,)
        out.tags.add(CUDA_IDS)
    else:
        ids = list(range(probes.device_count()))
    cpu = not ids
    if cpu:
        ids = [0]
        out.tags.add(CPU_RANKS)
    if _conflict(args):
        _fail(out, ResourceFilterError, 'Cannot specify num_nodes/gpus with include/exclude')
    if (args.include or args.exclude) and any(isinstance(i, str) for i in ids):
        _fail(out, UsageError, None, CUDA_IDS, contains='UUID')
    if args.num_nodes > 1:
        _fail(out, ResourceFilterError, 'Num nodes is >1 but no extra nodes available via hostfile')
    try:
        active = {h: list(s) for h, s in parse_resource_filter({'localhost': ids}, args.include, args.exclude).items()}
    except ResourceFilterError as exc:
        _fail(out, ResourceFilterError, str(exc))
    out.master_addr = args.master_addr or '127.0.0.1'
    if args.master_addr and args.master_addr != '127.0.0.1':
        out.tags.add(MASTER_ADDR)
    return active, cpu


def _expect_hostfile_pool(case, args, out):
    try:
        pool = parse_hostfile(case['hostfile'])
    except HostfileError as exc:
        _fail(out, HostfileError, str(exc))
    if _conflict(args):
        _fail(out, ResourceFilterError, 'Cannot specify num_nodes/gpus with include/exclude')
    try:
        active = parse_inclusion_exclusion(pool, args.include, args.exclude)
    except ResourceFilterError as exc:
        _fail(out, ResourceFilterError, str(exc))
    out.master_addr = args.master_addr
    return active


def _expect_limits(args, active, cpu, out):
    hosts = list(active)[: args.num_nodes] if args.num_nodes > 0 else list(active)
    if args.num_gpus <= 0:
        return {h: active[h] for h in hosts}
    if not cpu and any(args.num_gpus > len(active[h]) for h in hosts):
        _fail(out, ResourceFilterError, None, NUM_GPUS_BOUND, contains='is more than')
    return {h: (list(range(args.num_gpus)) if cpu else active[h][: args.num_gpus]) for h in hosts}


def _expect_launch(case, args, probes, out):
    launcher, active = args.launcher.lower(), out.active
    if launcher not in runner.LAUNCHERS:
        _fail(out, UnknownLauncherError, f'Unknown launcher {launcher}', UNKNOWN_LAUNCHER)
    if args.no_ssh and not 0 <= args.node_rank < len(active):
        _fail(out, UsageError, 'Launching training without ssh, but --node_rank is not set correctly.', ASSERT_AS_ERROR)
    multinode = (args.force_multi or len(active) > 1) and not args.no_ssh
    if multinode:
        refusal = _backend_refusal(launcher, args, active, case)
        if refusal is not None:
            _fail(out, type(refusal), str(refusal), *_backend_tags(refusal, case))
        if _is_backend_refusal(case.get('error')):
            out.tags.add(BACKEND_OWN)  # DeepSpeed's backend refused; dslaunch's accepts this world
    first = next(iter(active))
    uses_ssh = multinode and launcher == 'pdsh' and case['hostfile'] is not None
    # ssh is checked on every host the engine reaches by ssh: pdsh every host, the MPI ssh bootstraps the
    # hosts other than this one (none of the vectors' names is this machine), Slurm none.
    ssh_hosts = list(active) if multinode and launcher != 'slurm' and case['hostfile'] is not None else []
    if ssh_hosts and not args.no_ssh_check:
        out.ssh_calls += [('check_call', host, args.ssh_port) for host in ssh_hosts]
        if not probes._ssh_ok:
            _fail(out, LauncherError, case['error']['message'])
    if not out.master_addr:
        if uses_ssh:
            out.ssh_calls.append(('check_output', first, args.ssh_port))
            if not probes._hostname_i.split():
                _fail(out, LauncherError, None, HOSTNAME_EMPTY, contains='printed no address')
            out.master_addr = probes._hostname_i.split()[0]
        else:
            out.master_addr = first if (multinode or args.no_ssh) else '127.0.0.1'
    if out.ssh_calls != ds_ssh_calls(case):
        out.tags.add(SSH_WHERE_USED)
    if not multinode and _is_backend_refusal(case.get('error')):
        out.tags.add(BACKEND_OWN)  # DeepSpeed asks the backend even when the job then runs locally
    if args.master_port == 0:
        if multinode or args.no_ssh:
            _fail(out, UsageError, None, MASTER_PORT_ZERO, contains='--master_port 0')
        out.tags.add(MASTER_PORT_ZERO)  # local: a free port is chosen
    out.mode = 'multinode' if multinode else 'local'


def _expect_exports(case, env, env_file_texts, out):
    exports_env = dict(env)
    exports_env['PYTHONPATH'] = f'{case["_cwd"]}:{env["PYTHONPATH"]}' if 'PYTHONPATH' in env else case['_cwd']
    exports = collect_exports(exports_env)
    for name, text in env_file_texts.items():
        try:
            exports.update(parse_env_file(text.splitlines(keepends=True), source=os.path.join(case['_cwd'], name)))
        except EnvFileError as exc:
            _fail(out, EnvFileError, str(exc), ENV_FILE)
        if any(
            not line.strip() or line.strip().startswith('#') or line.startswith('export ') for line in text.splitlines()
        ):
            out.tags.add(ENV_FILE)
    out.exports = exports


def _backend_refusal(launcher: str, args: Any, active: dict[str, list[Any]], case: dict[str, Any]):
    """The error dslaunch's backend raises for this world (class check, then construction), if any."""
    try:
        from dslaunch.backends import launcher_class, make_runner
    except ImportError:
        return None
    pool = parse_hostfile(case['hostfile']) if case['hostfile'] is not None else {'localhost': 1}
    try:
        launcher_class(launcher).validate_active_resources(active)
        make_runner(launcher, args, 'e30=', pool)
    except DslaunchError as exc:
        return exc
    return None


def _backend_tags(refusal: BaseException, case: dict[str, Any]) -> tuple[str, ...]:
    ds = case.get('error')
    if ds is not None and ds['message'] == str(refusal):
        return ()
    return (BACKEND_OWN,)  # the backends' deviations are listed in docs/compatibility-backends.md


def _setup(case: dict[str, Any], tmp_path):
    cwd = tmp_path / 'cwd'
    cwd.mkdir()
    if case['hostfile'] is not None:
        vectors.write_exact(cwd / 'hostfile', case['hostfile'])
    env_files = case.get('deepspeed_env_files') or {}
    for name, text in env_files.items():
        vectors.write_exact(cwd / name, text)
    case = dict(case, _cwd=str(cwd))
    return case, str(cwd), vectors.fill(case['deepspeed_argv'], CWD=cwd), vectors.fill(case['env_in'], CWD=cwd)


def _is_backend_refusal(ds_error: dict[str, str] | None) -> bool:
    message = (ds_error or {}).get('message', '')
    return ' backend ' in message or 'requires same number of devices' in message


# Which deviations can explain that DeepSpeed failed where dslaunch does something else.
_EXPLAINS = [
    (lambda e: 'was not reachable via ssh' in e['message'], {SSH_WHERE_USED}),
    (lambda e: e['type'] == 'IndexError', {EMPTY, HOSTNAME_EMPTY, SSH_WHERE_USED}),
    (lambda e: 'no GPU resources' in e['message'], {CPU_RANKS, CUDA_IDS}),
    (lambda e: 'invalid literal for int()' in e['message'] or e['message'].startswith('No slot'), {CUDA_IDS}),
    (lambda e: 'Cannot specify num_nodes/gpus' in e['message'], {CUDA_IDS}),
    (lambda e: 'not enough values to unpack' in e['message'], {ENV_FILE}),
    (lambda e: e['type'] == 'AssertionError', {ASSERT_AS_ERROR}),
    (lambda e: e['type'] == 'NotImplementedError', {UNKNOWN_LAUNCHER}),
    (_is_backend_refusal, {BACKEND_OWN}),
]


def _ds_error_is_explained(case: dict[str, Any], expected: Outcome) -> None:
    """When DeepSpeed failed, dslaunch either fails the same way or a fitting tag says why not."""
    ds = case.get('error')
    if ds is None:
        return
    ds_type = vectors.builtin_type(ds['type'])
    same = (
        expected.error is not None
        and expected.error[1] == ds['message']
        and (ds_type is None or issubclass(expected.error[0], ds_type))
    )
    if same:
        return
    fitting = set().union(*(tags for applies, tags in _EXPLAINS if applies(ds)))
    assert expected.tags & fitting, f'DeepSpeed raised {ds}; dslaunch differs without a fitting deviation'


@pytest.mark.parametrize('case', CASES, ids=golden.case_id)
def test_plan_matches_deepspeed(case, tmp_path, monkeypatch):
    case, cwd, argv, env = _setup(case, tmp_path)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))  # no ~/.deepspeed_env of this machine
    env.setdefault('HOME', str(tmp_path / 'home'))
    args = runner.parse_args(argv, prog='deepspeed')
    probes = probes_for(case)
    env_files = {
        name: text
        for name, text in (case.get('deepspeed_env_files') or {}).items()
        if name == env.get('DS_ENV_FILE', '.deepspeed_env')
    }
    expected = expected_outcome(case, args, dict(env), probes, env_files)
    _ds_error_is_explained(case, expected)

    if expected.error is not None:
        cls, message = expected.error
        with pytest.raises(DslaunchError) as info:
            runner.plan(args, env, probes, cwd=cwd, python='<PYTHON>', pid=PID)
        assert isinstance(info.value, cls)
        if message is not None:
            assert str(info.value) == message
        assert expected.error_contains in str(info.value)
        ds = case.get('error')
        if ds and str(info.value) == ds['message'] and ds['type'] != 'AssertionError':
            vectors.assert_same_error(info.value, ds)
        if ds is None:
            assert expected.tags, 'DeepSpeed succeeded here; failing needs a documented deviation'
        return

    plan = runner.plan(args, env, probes, cwd=cwd, python='<PYTHON>', pid=PID)
    assert plan.mode == expected.mode
    vectors.ordered_equal(plan.active, {'dict': expected.active, 'order': list(expected.active)})
    assert json.loads(base64.urlsafe_b64decode(plan.world_info)) == expected.active
    assert plan.master_addr == expected.master_addr
    assert sorted(probes.ssh_calls) == sorted(expected.ssh_calls)  # asked in parallel
    assert plan.removed_env == expected.removed
    if 'error' not in case:
        _compare_with_deepspeed_success(case, plan, expected, env, cwd)
    if plan.mode == 'local':
        assert plan.env == {k: v for k, v in env.items() if k not in expected.removed}
        assert plan.argv is not None and plan.argv[:4] == ['<PYTHON>', '-u', '-m', 'dslaunch.launch']
        assert plan.argv[-1 - len(args.user_args) :] == [args.user_script, *args.user_args]
    else:
        assert plan.backend == args.launcher.lower()
        assert probes.backend_checks == [plan.backend]
        assert plan.exports == expected.exports
        _check_backend_is_built_from_plan(plan, monkeypatch)


def _compare_with_deepspeed_success(case, plan, expected, env, cwd):
    ds_world = golden.ordered(case['world_info_decoded']) if 'world_info_decoded' in case else None
    if ds_world is not None and ds_world != plan.active:
        assert expected.tags & {CUDA_IDS, CPU_RANKS, NUM_GPUS_BOUND}, 'undocumented world_info difference'
    if ds_ssh_calls(case) != expected.ssh_calls:
        assert SSH_WHERE_USED in expected.tags
    if plan.mode == 'local':
        ds_cmd = vectors.fill(case['cmd'], PID=PID, CWD=cwd)
        assert ds_cmd[:4] == ['<PYTHON>', '-u', '-m', 'deepspeed.launcher.launch']
        ours = list(plan.argv)
        # Put our deliberate differences into DeepSpeed's command; everything else must be equal.
        want = ['<PYTHON>', '-u', '-m', 'dslaunch.launch'] + [_swap(word, plan, expected) for word in ds_cmd[4:]]
        assert ours == want
        assert sorted(case.get('popen_env_removed', [])) == sorted(plan.removed_env)
    else:
        changes = vectors.fill(case.get('popen_env_changes', {}), CWD=cwd)
        assert plan.env['PYTHONPATH'] == changes['PYTHONPATH']
        if plan.backend == 'pdsh' and ENV_FILE not in expected.tags:
            exports_word = next((w for w in case['cmd'] if w.startswith('export ')), '')  # after launcher_args/venv
            exported = [
                part.split('=', 1)[0].removeprefix('export ') for part in exports_word.split('; ') if part.strip()
            ]
            assert list(plan.exports) == exported


def _swap(word: str, plan, expected: Outcome) -> str:
    if word.startswith('--world_info='):
        return f'--world_info={plan.world_info}'
    if word.startswith('--master_port=') and word != f'--master_port={plan.master_port}':
        assert MASTER_PORT_ZERO in expected.tags, f'undocumented master_port {plan.master_port}'
        return f'--master_port={plan.master_port}'
    if word.startswith('--master_addr='):
        ds_value = word.split('=', 1)[1]
        if ds_value != plan.master_addr:
            assert expected.tags & {MASTER_ADDR, SSH_WHERE_USED}, f'undocumented master_addr {plan.master_addr}'
        return f'--master_addr={plan.master_addr}'
    return word


def _check_backend_is_built_from_plan(plan, monkeypatch):
    """The backend gets exactly the plan's name, args, world_info and pool; its command is then checked."""
    try:
        from dslaunch import backends

        real = backends.make_runner
    except (ImportError, AttributeError):
        pytest.skip('dslaunch.backends.make_runner is not available yet: cmd check skipped')
    built = []

    def spy(name, args, world_info, pool):
        built.append((name, args, world_info, dict(pool)))
        return real(name, args, world_info, pool)

    monkeypatch.setattr(backends, 'make_runner', spy)
    cmd = runner.backend_command(plan)
    assert built == [(plan.backend, plan.args, plan.world_info, plan.resource_pool)]
    assert plan.args.master_addr == plan.master_addr
    joined = shlex.join(cmd)
    assert plan.args.user_script in cmd or plan.args.user_script in joined
    if plan.backend == 'pdsh':
        assert f'--world_info={plan.world_info}' in cmd
        assert f'--master_addr={plan.master_addr}' in cmd
    assert sys.executable in cmd or plan.args.no_python
