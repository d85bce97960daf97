"""Running one node's ranks under the Rust supervisor: the process half of ``dslaunch.launch``.

The pure half (argument parsing, world_info, rank arithmetic, child argv) lives in ``launch.py``;
this module turns those plans into a ``dslaunch._core.Supervisor`` and reports the outcome.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Mapping, Sequence

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs the CLI start-up time
if TYPE_CHECKING:
    from typing_extensions import Self

    from dslaunch import _core, jobchannel
    from dslaunch.hang import HangWatch
    from dslaunch.launch import RankPlan

from dslaunch import command_exit
from dslaunch.errors import DslaunchError, UsageError, printable

#: Console prefix of every rank line: `[3]: loss=0.5`.
DEFAULT_PREFIX = '[{tag}]: '


def parse_rank_selection(spec: str | None, option: str = '--console_ranks') -> set[int] | None:
    """`0,2-3` -> {0, 2, 3}; None or '' -> None (all ranks); `none` -> no rank (a quiet console, as
    DeepSpeed's with `--enable_each_rank_log`)."""
    if not spec:
        return None
    if spec.strip().lower() == 'none':
        return set()
    chosen: set[int] = set()
    for part in spec.split(','):
        part = part.strip()
        try:
            if '-' in part:
                lo, hi = part.split('-', 1)
                from dslaunch.hostfile import MAX_SLOTS_PER_HOST  # only for ranges: not on the start path

                if int(hi) - int(lo) > MAX_SLOTS_PER_HOST:  # `0-99999999999` would build the set for minutes
                    raise ValueError(part)
                chosen.update(range(int(lo), int(hi) + 1))
            else:
                chosen.add(int(part))
        except ValueError:
            raise UsageError(f'{option}: {spec!r} is not a list of ranks like 0,2-3') from None
    return chosen


def check_report_path(path: str) -> None:
    """`--report_json` must be creatable: a missing or unwritable directory is one line up front."""
    where = os.path.dirname(os.path.abspath(path)) or '.'
    if os.path.isdir(path) or not os.path.isdir(where) or not os.access(where, os.W_OK | os.X_OK):
        raise UsageError(f'cannot write --report_json {printable(path)}: '
                         f'{"is a directory" if os.path.isdir(path) else "no writable directory " + printable(where)}')


def check_bind_core_list(args: argparse.Namespace) -> None:
    """Cores of `--bind_core_list` this process may not use: one line here, not every rank's
    numactl printing its usage text."""
    spec = getattr(args, 'bind_core_list', None)
    if not getattr(args, 'bind_cores_to_rank', False) or spec is None:
        return
    from dslaunch.numa import format_core_list, parse_range_list

    usable = os.sched_getaffinity(0)
    missing = [c for c in parse_range_list(spec) if c not in usable]
    if missing:
        raise UsageError(f'--bind_core_list {spec}: core(s) {format_core_list(missing)} are not available on this '
                         f'host (usable here: {format_core_list(sorted(usable))})')


def check_script(args: argparse.Namespace) -> None:
    """A missing training script is one clear error before anything starts (DeepSpeed starts
    every rank and lets each print its own 'can't open file'). Anything that exists is left to
    python, which also runs a directory or zip with `__main__.py`, `/dev/null`, a FIFO or
    `<(...)`: `os.path.isfile` would reject those although DeepSpeed runs them."""
    if args.no_python or args.module:
        return
    script = args.training_script
    if not os.path.exists(script):
        raise UsageError(f'training script {script!r} not found (cwd {os.getcwd()})')


#: Set to 0 to run every job under the Python host (`native_host`).
NATIVE_HOST_ENV = 'DSLAUNCH_NATIVE_HOST'


def native_host() -> str | None:
    """The native host binary (`dslaunch-host`, put beside the extension by the build backend,
    build_host.py), or None where it is missing or `DSLAUNCH_NATIVE_HOST=0` asks for the Python
    host."""
    if os.environ.get(NATIVE_HOST_ENV, '1') == '0':
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'dslaunch-host')
    return path if os.access(path, os.X_OK) else None


class PidFile:
    """`--save_pid`: `/tmp/<runner pid>.deepspeed` holding our pid, removed when the job ends
    (DeepSpeed leaves it behind after success and failure)."""

    def __init__(self, runner_pid: int, directory: str = '/tmp') -> None:
        self.path = os.path.join(directory, f'{runner_pid}.deepspeed') if runner_pid else None

    def __enter__(self) -> Self:
        if self.path is None:
            return self
        if os.path.isfile(self.path):
            raise UsageError(f'pid file {self.path} exists (another job with the same --save_pid?)')
        try:
            with open(self.path, 'x', encoding='ascii') as f:
                f.write(str(os.getpid()))
        except OSError as e:
            raise UsageError(f'cannot write pid file {self.path}: {e.strerror}') from None
        print(f'launcher pid: {os.getpid()}', flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _rank_spec(plan: RankPlan, env: dict[str, str]) -> _core.RankSpec:
    """The core's spec of one planned rank (`launch.RankPlan`)."""
    from dslaunch import _core

    out_log, err_log = plan.stream_logs or (None, None)
    return _core.RankSpec(plan.argv, env=env, log_file=plan.log_name, tag=str(plan.rank),
                          console=plan.console, stdout_log_file=out_log, stderr_log_file=err_log, bare=plan.bare)


def _forwarded_with(stop_signals: Sequence[int] | None) -> list[int] | None:
    """What the Supervisor passes on when `stop_signals` stop the job: its default list and those
    (None: the core's default)."""
    if stop_signals is None:
        return None
    from dslaunch.signal_policy import FORWARDED

    return list(dict.fromkeys((*FORWARDED, *stop_signals)))


def run_plans(
    plans: Sequence[RankPlan],
    environ: Mapping[str, str],
    *,
    raw_output: bool = False,
    console_ranks: set[int] | None = None,
    grace_period: float = 30.0,
    save_pid: int = 0,
    run_id: str | None = None,
    node_rank: int | None = None,
    report_json: str | None = None,
    hang_timeout: float = 0.0,
    hang_action: str = 'stop',
    collapse: str = 'auto',
    collapse_window: float = 0.25,
    status_line: str = 'auto',
    quiet: bool = False,
    prefix: str = DEFAULT_PREFIX,
    stop_signals: Sequence[int] | None = None,
    console_copies: Mapping[str, tuple[str, Sequence[str]]] | None = None,
    native_prog: str | None = None,
    launcher_status: bool = False,
) -> int:
    """Starts the planned ranks, waits for them, prints the report; returns the job's status
    (`command_exit.job_status`: -N when signal N stopped it).

    Observability (docs/observability.md): `hang_timeout` > 0 starts the hang watchdog
    (`hang.py`); `collapse` ('auto': on a terminal) prints identical lines of several ranks once;
    `status_line` ('auto') keeps a live status line below the output on a terminal. The job id is
    printed once at start (unless `quiet`), for `dslaunch stacks <job id>`. `stop_signals` (default
    `signal_policy.STOP_SIGNALS`): the signals that end the job, passed on to the ranks first.
    `console_copies`: the core's (torchrun's --duplicate-*-filters).

    `native_prog` (the command's name) lets a command that ends with `command_exit.exit_now` hand
    a job that needs no Python while it runs (no hang watchdog, no multi-node runner) to the native
    host (`native_host`, rust/src/host.rs): this process becomes it, and it ends the process as
    the command would (`launcher_status`: `command_exit.per_node_launcher`'s status).

    Under a multi-node runner (`DSLAUNCH_REPORT_TO` and `DSLAUNCH_JOB_TOKEN` in `environ`), the
    first failure is reported to the runner the moment it happens, and a stop from the runner
    (or the loss of the connection to it) tears this node's ranks down.
    """
    from dslaunch import _core
    from dslaunch import report as _  # noqa: F401 (loaded before the job: not on a teardown's path)
    from dslaunch.channel_vars import REPORT_TO_ENV, TOKEN_ENV

    if not grace_period >= 0:  # negative or nan, before the Supervisor's own ValueError (inf: never SIGKILL)
        raise UsageError(f'--grace_period must be >= 0 seconds, got {grace_period}')
    if report_json:
        check_report_path(report_json)  # fail before the job runs, not after it (exit 0)

    environ = dict(environ)
    report_to = environ.pop(REPORT_TO_ENV, None)
    token = environ.pop(TOKEN_ENV, None)

    # Variables equal in every rank go into the base environment once, not into each rank's spec
    # (at 1,024 ranks per-rank copies of e.g. a long CUDA_VISIBLE_DEVICES cost megabytes).
    overrides = [dict(p.env_overrides) for p in plans]
    common = {k: v for k, v in overrides[0].items() if all(o.get(k) == v for o in overrides[1:])} if plans else {}
    environ.update(common)
    specs = [_rank_spec(p, {k: v for k, v in o.items() if k not in common}) for p, o in zip(plans, overrides)]
    # A rank's log file holds its stdout and stderr in the order it wrote them, as DeepSpeed's
    # (one file for both): the two must then be one pipe, whose lines the console shows on stdout.
    merged = any(p.log_name for p in plans)
    shown = None
    if console_ranks is not None:
        shown = [i for i, p in enumerate(plans) if p.rank in console_ranks]
    sup = _core.Supervisor(
        specs,
        env=environ,
        prefix=None if raw_output else prefix,
        console_ranks=shown,
        grace_period=grace_period,
        run_id=run_id or os.urandom(6).hex(),  # 12 random hex digits (uuid4's first 12: no uuid import)
        collapse=collapse,  # type: ignore[arg-type]  # checked by the parser's choices
        collapse_window=collapse_window,
        status_line=status_line != 'off',
        merge_stderr=merged,
        keep_last_line=hang_timeout > 0,
        stop_signals=None if stop_signals is None else list(stop_signals),
        forward_signals=_forwarded_with(stop_signals),
        console_copies=console_copies,  # type: ignore[arg-type]  # keys as the core takes them
    )
    watch = None
    if hang_timeout > 0:
        from dslaunch.hang import HangWatch

        watch = HangWatch(sup, hang_timeout, hang_action)
    stops: list[int] = []
    started: list[bool] = []  # [True] once the ranks run (a flag for the client's thread: no threading import)

    def on_stop(sig: int) -> None:
        # The runner's stop: a node already ending (one of its ranks failed) keeps its ranks'
        # grace period, where a second signal to this process would kill them at once.
        stops.append(sig)
        if started:
            sup.stop(sig)

    def on_signal(sig: int) -> None:
        # The runner's Ctrl-Z or fg/bg: the ranks pause or resume; this process stays up.
        if started:
            sup.stop(sig)

    client = None
    if report_to and token:
        try:
            from dslaunch import jobchannel  # only under a multi-node runner: sockets and threads

            client = jobchannel.JobClient(report_to, token, node_rank or 0, on_stop, on_signal=on_signal)
        except OSError as e:
            raise DslaunchError(f'cannot reach the dslaunch runner at {report_to}: {e.strerror or e}') from None
    start_message = None
    if not quiet and plans:
        start_message = (f'dslaunch: job {sup.run_id}: {len(plans)} rank(s), launcher pid {os.getpid()} '
                         f'(their Python stacks: dslaunch stacks {sup.run_id})')
    with PidFile(save_pid) as pid_file:
        if native_prog and watch is None and client is None:
            _hand_to_native_host(sup, native_prog, launcher_status, start_message=start_message, quiet=quiet,
                                 report_json=report_json, pid_file=pid_file.path)  # fmt: skip
        try:
            sup.start()
        except OSError as e:
            what = e.filename or ''
            msg = f'cannot start a rank: {e.strerror or e}: {what}'.rstrip(': ')
            if e.errno == errno.EMFILE:  # each rank holds 3 fds here (stdout, stderr, pidfd)
                msg += f' ({len(plans)} ranks need about {3 * len(plans) + 64} fds: raise the hard limit, ulimit -Hn)'
            raise DslaunchError(msg) from None
        started.append(True)
        if stops:
            sup.stop(stops[0])  # a stop that arrived while the ranks were starting
        if start_message is not None:
            sup.console_message(start_message)
        report = _supervise(sup, client, watch, stops)
    command_exit.leave_to_exit(plans, specs, overrides, sup, report, environ)
    return _report_and_status(report, watch, client, shown_any=bool(plans), quiet=quiet, merged=merged,
                              report_json=report_json)  # fmt: skip


def _hand_to_native_host(sup: _core.Supervisor, prog: str, launcher_status: bool, *, start_message: str | None,
                         quiet: bool, report_json: str | None, pid_file: str | None) -> None:
    """Becomes the native host for this job, which ends the process (`Supervisor.exec_host`);
    returns when the Python host must run it: not a command's own process, no host binary, or
    one that cannot be run."""
    host = native_host() if command_exit.ending_with_exit() else None
    if host is None:
        return
    try:
        sup.exec_host(host, start_message=start_message, quiet=quiet, report_json=report_json, pid_file=pid_file,
                      launcher_status=launcher_status, prog=prog, shown_argv=[prog, *sys.argv[1:]])
    except OSError as e:
        print(f'dslaunch: warning: cannot run the native host {host}: {e.strerror or e}', file=sys.stderr)


def _report_and_status(report: _core.Report, watch: HangWatch | None, client: jobchannel.JobClient | None, *,
                       shown_any: bool, quiet: bool, merged: bool, report_json: str | None) -> int:
    """After the job: tells the runner (if any), prints the report, writes `--report_json`;
    returns this node's status."""
    from dslaunch.report import print_report

    status = _job_status(report, watch)
    returncode = command_exit.shell(status)  # for the report: what a shell shows
    hangs = watch.hangs if watch is not None else []
    if client is not None:
        client.report_done(returncode)
    if shown_any and not (quiet and returncode == 0 and not hangs):  # quiet: "finished OK" is not an error
        print_report(report, hangs=hangs, returncode=returncode, tail_of='output' if merged else 'stderr')
    if report_json:
        from dslaunch.report import write_json

        try:
            write_json(report, report_json, hangs=hangs, returncode=returncode)
        except OSError as e:
            print(f'dslaunch: cannot write --report_json {report_json}: {e.strerror}', file=sys.stderr)
    failed_here = report.first_failure is not None or (watch is not None and watch.stopped_job)
    if client is not None and client.stopped_by_runner and not failed_here:
        # Stopped by the runner, which knows why and sets the job's status: a non-zero status
        # here would only add "pdsh@h1: h2: ssh exited with exit code 1" for every other host.
        return 0
    return status


def _job_status(report: _core.Report, watch: HangWatch | None) -> int:
    """`command_exit.job_status`, or the hang watchdog's status when it stopped the job."""
    if watch is not None and watch.stopped_job:
        from dslaunch.hang import HANG_EXIT_STATUS

        return HANG_EXIT_STATUS
    return command_exit.job_status(report)


def _supervise(sup: _core.Supervisor, client: jobchannel.JobClient | None, watch: HangWatch | None,
               stops: list[int]) -> _core.Report:
    """Waits for the job: reports the first failure to the runner as it happens (multi-node), and
    lets the hang watchdog look at the job at its period."""
    period = watch.period if watch is not None else None
    if client is not None:
        reported = False
        while not sup.done:
            for r in sup.wait_exits(timeout=period):
                if not reported and not stops and r.state in ('failed', 'killed'):
                    client.report_failure(int(r.tag), r.returncode, r.exit_status, r.stderr_tail)
                    reported = True
            if watch is not None:
                hang = watch.check()
                if hang is not None and watch.stopped_job and not reported:
                    # The root cause is the hang, not the SIGTERM our own stop gives the ranks next.
                    from dslaunch.hang import HANG_EXIT_STATUS

                    client.report_hang(hang.quiet_for, hang.suspects, HANG_EXIT_STATUS)
                    reported = True
    elif watch is not None:
        while sup.wait(timeout=period) is None:
            watch.check()
    report = sup.wait()
    assert report is not None
    return report


def run_node(args: argparse.Namespace, environ: Mapping[str, str] | None = None, *, native_prog: str | None = None,
             launcher_status: bool = False) -> int:
    """Everything `python -m dslaunch.launch` does after parsing its arguments (`native_prog`,
    `launcher_status`: `run_plans`')."""
    from dslaunch import launch

    env = dict(os.environ if environ is None else environ)
    hang_timeout = getattr(args, 'hang_timeout', 0.0)
    if not hang_timeout >= 0:  # negative or nan
        raise UsageError(f'--hang_timeout must be >= 0 seconds (0 = off), got {hang_timeout}')
    collapse_window = getattr(args, 'collapse_window', 0.25)
    if not 0 <= collapse_window <= 60:
        raise UsageError(f'--collapse_window must be between 0 and 60 seconds, got {collapse_window}')
    if getattr(args, 'enable_elastic_training', False):
        from dslaunch import elastic  # torch is imported there, and only there

        return elastic.run(args, env)
    world_info = launch.load_world_info(args)
    plans = launch.rank_plans(world_info, args.node_rank, args, env, python=sys.executable)
    log_dir = getattr(args, 'enable_each_rank_log', 'None')
    if log_dir != 'None':
        launch.ensure_rank_log_dir(log_dir)  # made (or refused) on a node with zero slots too, as DeepSpeed
    if not plans:
        return 0  # a node with zero slots runs nothing, as in DeepSpeed
    check_script(args)
    check_bind_core_list(args)
    return run_plans(
        plans,
        env,
        raw_output=getattr(args, 'raw_output', False),
        console_ranks=parse_rank_selection(getattr(args, 'console_ranks', None)),
        grace_period=getattr(args, 'grace_period', 30.0),
        save_pid=getattr(args, 'save_pid', 0) or 0,
        node_rank=args.node_rank,
        report_json=getattr(args, 'report_json', None),
        hang_timeout=hang_timeout,
        hang_action=getattr(args, 'hang_action', 'stop'),
        collapse=getattr(args, 'collapse', 'auto'),
        collapse_window=collapse_window,
        status_line=getattr(args, 'status_line', 'auto'),
        quiet=bool(getattr(args, 'quiet', False)) or getattr(args, 'log_level', 'info') in ('error', 'critical'),
        native_prog=native_prog,
        launcher_status=launcher_status,
    )
