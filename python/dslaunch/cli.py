"""The `dslaunch` command: DeepSpeed's runner CLI, or torch.distributed.launch's when its flags
are used. A user mistake is one line on stderr and a non-zero exit, never a traceback.

Start-up stays light: nothing here imports torch, and the native core is loaded only when ranks
are about to start.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Sequence

from dslaunch import command_exit
from dslaunch.errors import DslaunchError

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs the CLI start-up time
if TYPE_CHECKING:
    from typing import Any, NoReturn

    from dslaunch import runner as runner_mod

PROG = 'dslaunch'
#: Seconds after Ctrl-C/SIGTERM before the backend program itself is signalled too (run_multinode).
FORWARD_AFTER = 1.0


def print_to_a_reader_that_may_leave(lines: Sequence[str]) -> None:
    """Lines on stdout before the job, whose reader may already be gone (`dslaunch ... | head -1`):
    the job still runs, as the core keeps running when the console's reader leaves; whatever
    Python would print on stdout from then on is dropped (stdout becomes /dev/null), not a
    BrokenPipeError."""
    try:
        sys.stdout.write(''.join(f'{line}\n' for line in lines))
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def run_deepspeed_cli(argv: Sequence[str], prog: str = PROG) -> int:
    """`dslaunch [DeepSpeed runner flags] script args`: plan, then run locally or via a backend."""
    from dslaunch import runner
    from dslaunch.probes import SystemProbes

    args = runner.parse_args(list(argv), prog=prog)
    plan = runner.plan(args, os.environ, SystemProbes())
    if plan.args.log_level not in ('error', 'critical'):  # -q: errors only, as DeepSpeed's logger
        print_to_a_reader_that_may_leave(plan.notes)
    if plan.mode == 'local':
        assert plan.argv is not None
        if args.dry_run:
            print(runner.shell_line(plan.argv, plan.env, os.environ))
            return 0
        from dslaunch import launch, launch_run

        # In-process: the per-node launcher's argv without `python -u -m dslaunch.launch`.
        node_args = launch.parse_args(plan.argv[4:], prog='dslaunch.launch')
        return launch_run.run_node(node_args, plan.env, native_prog=prog)
    if args.dry_run:
        # Exactly what would run: the environment get_cmd set (PDSH_RCMD_TYPE, Slurm's exports) goes
        # in front, and the per-job files the command names stay, so the line works when pasted.
        cmd, backend = runner.backend_runner_command(plan)
        backend.keep_temp_files()
        print(runner.shell_line(cmd, plan.env, os.environ))
        return 0
    return run_multinode(plan)


def run_multinode(plan: runner_mod.Plan) -> int:
    """Runs a multi-node backend command (pdsh, mpirun, srun) under the supervisor.

    Whatever the backend, every rank's side connects back to us (`jobchannel`): the per-node
    launchers under pdsh, each rank's `launcher_helper` under MPI and Slurm. The first rank failure
    anywhere is reported at once and every host is told to stop; Ctrl-C/SIGTERM here stops every
    host (a second one kills); our exit status is the failing rank's own. The engines alone do not
    do this (measured: Open MPI kills the other ranks after ~2 s, MPICH and Intel MPI never, srun
    -K exits 143 and Intel MPI 255 instead of the rank's code).
    """
    import secrets
    import signal
    import subprocess
    import time

    from dslaunch import _core, jobchannel
    from dslaunch import runner as runner_mod
    from dslaunch.signal_policy import STOP_SIGNALS, not_ignored

    args = plan.args
    server = jobchannel.JobServer(on_failure=lambda _msg: server.stop(signal.SIGTERM))
    # Before get_cmd, so that every backend carries them to the ranks' side.
    plan.exports.update(server.env_for(next(iter(plan.active))))
    # The marker that remote teardown looks for; not the token, which only the ranks' side may know.
    args.job_id = f'dsl-{secrets.token_hex(8)}'
    try:
        cmd, backend = runner_mod.backend_runner_command(plan)
    except BaseException:
        server.close()
        raise
    program = os.path.basename(cmd[0])
    sup = _core.Supervisor(
        [_core.RankSpec(cmd, tag=plan.backend or 'backend')],
        env=plan.env,
        prefix=None,
        grace_period=args.grace_period,
        forward_signals=[],  # ours below: the channel first, then what the backend program needs
        run_id=args.job_id,
    )
    stops: list[int] = []

    def on_signal(sig: int, _frame: object) -> None:
        stops.append(sig)
        if len(stops) == 1:
            server.stop(sig)  # every host's ranks, each through its own connection
        else:
            server.stop(signal.SIGKILL)
            sup.kill()

    def on_job_control(sig: int, _frame: object) -> None:
        # Ctrl-Z, fg, bg: every host's ranks pause or resume through the channel; then the runner
        # stops itself on SIGTSTP, as the shell expects (the backend program, in its own process
        # group, keeps the hosts' connections up).
        server.signal(sig)
        if sig == signal.SIGTSTP:
            os.kill(os.getpid(), signal.SIGSTOP)  # as the core does for a local job

    saved = {sig: signal.signal(sig, on_signal) for sig in not_ignored(STOP_SIGNALS)}
    saved.update({sig: signal.signal(sig, on_job_control) for sig in not_ignored((signal.SIGTSTP, signal.SIGCONT))})
    try:
        try:
            sup.start()
        except OSError as e:
            raise DslaunchError(f'cannot start {cmd[0]}: {e.strerror or e}') from None
        stopped_at: float | None = None
        escalated = killed = forwarded = False
        while (report := sup.wait(timeout=0.25)) is None:
            if stopped_at is None and (stops or server.first_failure):
                stopped_at = time.monotonic()
            waited = 0.0 if stopped_at is None else time.monotonic() - stopped_at
            if stops and waited > FORWARD_AFTER and not forwarded and plan.backend != 'pdsh':
                # The engine's own stop, for ranks the channel has not reached (a backend still starting
                # them). Not at once: it is slower than the channel (Open MPI's abort takes 1-3 s, and
                # srun's kills the step). pdsh takes SIGINT as a status request; its launchers end alone.
                sup.send_signal(backend.forwarded_signal(stops[0]))
                forwarded = True
            if waited > args.grace_period and not escalated:
                server.stop(signal.SIGKILL)  # ranks that ignored the polite signal
                escalated = True
            if waited > args.grace_period + 10 and not killed:
                # The ranks' side did not wind down: kill by the job's marker, then the backend's tree.
                kill = getattr(backend, 'kill_cmd', None)
                if kill is not None:
                    subprocess.run(kill(args.job_id, 'KILL'), env=plan.env, timeout=30, check=False,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
                sup.kill()
                killed = True
        if report.returncode != 0 and server.first_failure is None and not stops:
            server.wait_idle(1.0)  # a rank's report sent just before it exited may still be in flight
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)
        server.close()
        backend.cleanup()
    return _multinode_status(plan.backend, stops, server.first_failure, program, report.returncode)


def _multinode_status(backend: str | None, stops: list[int], failure: dict[str, Any] | None, program: str,
                      program_status: int) -> int:
    """The runner's status, with its last line: DeepSpeed's after a signal to the runner; else
    the root cause the job channel reported (a hang, a rank's failure); else the backend's."""
    from dslaunch.report import signal_name

    if stops:
        # DeepSpeed's runner: its pdsh handler exits 1 after SIGINT/SIGTERM; with no handler
        # (SIGHUP, the MPI and Slurm backends) it dies of the signal.
        return command_exit.per_node_launcher(-stops[0]) if backend == 'pdsh' else -stops[0]
    if failure is not None and failure.get('kind') == 'hang':
        where = f' on {failure["host"]}' if failure.get('host') else ''
        print(f'{PROG}: error: the job hung{where}: no rank there wrote output for {failure.get("quiet_for", 0):.0f} s '
              '(its stacks are above); every host was stopped', file=sys.stderr)  # fmt: skip
        return int(failure['exit_status'])
    if failure is not None and failure.get('exit_status'):
        where = f' on {failure["host"]}' if failure.get('host') else ''
        rc = failure.get('returncode')
        if rc is None:
            rc = int(failure['exit_status'])
        how = f'was killed by {signal_name(-rc)}' if rc < 0 else f'exited with status {rc}'
        print(f'{PROG}: error: rank {failure.get("rank")}{where} {how}; every host was stopped', file=sys.stderr)
        return command_exit.rank_status(rc)
    if program_status != 0:
        print(f'{PROG}: error: {program} exited with status {program_status}', file=sys.stderr)
    return program_status


def main(argv: Sequence[str] | None = None, *, torch_cli: bool = False) -> NoReturn:
    """The `dslaunch` command (`torch_cli`: always torch.distributed.launch's front end, as
    `python -m dslaunch.torch_launch`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if argv is None:
        command_exit.will_exit()
    # `dslaunch stacks <job>`; a script named `stacks` in this directory still runs as a script
    if args[:1] == ['stacks'] and not os.path.isfile('stacks'):
        from dslaunch.stacks import main as stacks_main

        sys.exit(stacks_main(args[1:]))
    try:
        from dslaunch import torch_launch

        if torch_cli or torch_launch.wants_torch_cli(args):
            code = torch_launch.main(args, prog=PROG)
        else:
            code = run_deepspeed_cli(args)
    except DslaunchError as e:
        print(f'{PROG}: error: {e}', file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        code = -2  # SIGINT: end by it, as Python does on an uncaught KeyboardInterrupt
    if argv is None:
        command_exit.exit_now(code)
    # Called in-process with explicit arguments: a normal exit, minus the final garbage
    # collection of every object the CLI made (about 10 ms, measured in docs/benchmarks.md).
    gc.freeze()
    sys.exit(command_exit.shell(code))
