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
from typing import TYPE_CHECKING, NoReturn

from dslaunch.errors import DslaunchError

if TYPE_CHECKING:
    from dslaunch import runner as runner_mod

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
    if args.dry_run:
        print(shlex.join(runner.backend_command(plan)))
        return 0
    return run_multinode(plan)


def run_multinode(plan: runner_mod.Plan) -> int:
    """Runs a multi-node backend command (pdsh, mpirun, srun) under the supervisor.

    With pdsh, every per-node launcher connects back to us (`jobchannel`): the first rank failure
    anywhere is reported at once and every host is told to stop, Ctrl-C/SIGTERM here stops every
    host (a second one kills), and our exit status is the failing rank's own. MPI launchers and
    srun get our signals forwarded; how they react to one failing rank differs (measured: Open MPI
    kills the others after ~2 s, srun -K in ~0.3 s, MPICH and Intel MPI not at all), which is
    why the channel is to be extended to them through launcher_helper.
    """
    import signal
    import time

    from dslaunch import _core, jobchannel
    from dslaunch import runner as runner_mod

    args = plan.args
    server = None
    if plan.backend == 'pdsh':
        server = jobchannel.JobServer(on_failure=lambda _msg: server.stop(signal.SIGTERM) if server else None)
        plan.exports.update(server.env_for(next(iter(plan.active))))
        args.job_id = server.token
    cmd, backend = runner_mod.backend_runner_command(plan)
    sup = _core.Supervisor([_core.RankSpec(cmd, tag=plan.backend or 'backend')], env=plan.env, prefix=None,
                           grace_period=args.grace_period, forward_signals=[] if server else None)
    stops: list[int] = []

    def on_signal(sig: int, _frame: object) -> None:
        stops.append(sig)
        assert server is not None
        if len(stops) == 1:
            server.stop(sig)
        else:
            server.stop(signal.SIGKILL)
            sup.kill()

    saved = {}
    if server is not None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            saved[sig] = signal.signal(sig, on_signal)
    try:
        try:
            sup.start()
        except OSError as e:
            raise DslaunchError(f'cannot start {cmd[0]}: {e.strerror or e}') from None
        stopped_at: float | None = None
        while (report := sup.wait(timeout=0.5)) is None:
            if server is None:
                continue
            if stopped_at is None and (stops or server.first_failure):
                stopped_at = time.monotonic()
            if stopped_at is not None and time.monotonic() - stopped_at > args.grace_period + 10:
                # The launchers did not wind down: fall back to killing by the job's marker.
                kill = getattr(backend, 'kill_cmd', None)
                if kill is not None:
                    import subprocess

                    subprocess.run(kill(args.job_id, 'KILL'), env=plan.env, timeout=30, check=False,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                sup.kill()
                stopped_at = float('inf')
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)
        if server is not None:
            server.close()
        cleanup = getattr(backend, 'cleanup', None)
        if cleanup is not None:
            cleanup()
    if stops:
        return 128 + stops[0]
    failure = server.first_failure if server is not None else None
    if failure is not None and failure.get('exit_status'):
        print(f'dslaunch: rank {failure.get("rank")} on node {failure.get("node")} failed '
              f'(exit status {failure["exit_status"]}); every node was stopped', file=sys.stderr)
        return int(failure['exit_status'])
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
