"""The `dslaunch` command: DeepSpeed's runner CLI, or torch.distributed.launch's when its flags
are used. A user mistake is one line on stderr and a non-zero exit, never a traceback.

Start-up stays light: nothing here imports torch, and the native core is loaded only when ranks
are about to start.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from typing import NoReturn

from dslaunch.errors import DslaunchError

PROG = 'dslaunch'


def run_deepspeed_cli(argv: Sequence[str], prog: str = PROG) -> int:
    """`dslaunch [DeepSpeed runner flags] script args`: plan, then run locally or via a backend."""
    from dslaunch import runner
    from dslaunch.probes import SystemProbes

    args = runner.parse_args(list(argv), prog=prog)
    plan = runner.plan(args, os.environ, SystemProbes())
    for note in plan.notes:
        print(note, flush=True)
    if plan.mode == 'local':
        assert plan.argv is not None
        if args.dry_run:
            print(shlex.join(plan.argv))
            return 0
        from dslaunch import launch, launch_run

        # In-process: the per-node launcher's argv without `python -u -m dslaunch.launch`.
        node_args = launch.parse_args(plan.argv[4:], prog='dslaunch.launch')
        return launch_run.run_node(node_args, plan.env)
    cmd = runner.backend_command(plan)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    return run_backend(cmd, plan.env, grace_period=args.grace_period)


def run_backend(cmd: list[str], env: dict[str, str], *, grace_period: float) -> int:
    """Runs a multi-node backend command (pdsh, mpirun, srun) under the supervisor."""
    from dslaunch import _core

    sup = _core.Supervisor([_core.RankSpec(cmd, tag='launcher')], env=env, prefix=None, grace_period=grace_period)
    try:
        sup.start()
    except OSError as e:
        raise DslaunchError(f'cannot start {cmd[0]}: {e.strerror or e}') from None
    report = sup.wait()
    assert report is not None
    return report.returncode


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        from dslaunch import torch_launch

        if torch_launch.wants_torch_cli(args):
            code = torch_launch.main(args, prog=PROG)
        else:
            code = run_deepspeed_cli(args)
    except DslaunchError as e:
        print(f'{PROG}: error: {e}', file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
