"""`dslaunch --nproc-per-node N train.py`: the `torch.distributed.launch` / `torchrun` front end.

Scripts written for `torch.distributed.launch` run unchanged: each worker gets torchrun's
environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, ROLE_RANK, MASTER_ADDR,
MASTER_PORT, ...) plus DeepSpeed's (LOCAL_SIZE, CROSS_RANK, CROSS_SIZE), and `--local-rank=N`
before its own arguments unless `--use-env` is given, as torch.distributed.launch does. A fixed
`--nnodes` with the static rendezvous (one launcher per node with `--node-rank`) runs as a plain
dslaunch job; what needs torchrun's elastic agent (`--nnodes MIN:MAX`, `--max-restarts`, a c10d
rendezvous across nodes) runs under dslaunch's (`dslaunch.elastic`), with torch's c10d rendezvous.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

from dslaunch.errors import UsageError
from dslaunch.signal_policy import TORCHRUN_SIGNALS, stop_signals_from

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs the CLI start-up time
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Literal

    from dslaunch.elastic import ElasticConfig
    from dslaunch.launch import RankPlan

#: Options that only torch's launchers have (torch 2.15's torchrun, plus torch.distributed.launch's
#: --use-env), with a value and without: seeing one before the script selects this front end, even
#: one this front end then refuses (its own error, not DeepSpeed's usage). The spellings DeepSpeed's
#: runner shares (_SHARED_VALUE_OPTIONS, --no_python, --module) keep DeepSpeed's meaning when alone.
_TORCH_VALUE_OPTIONS = (
    '--nproc-per-node', '--nproc_per_node', '--nnodes', '--node-rank', '--master-addr', '--master-port',
    '--max-restarts', '--rdzv-backend', '--rdzv_backend', '--rdzv-endpoint', '--rdzv_endpoint', '--rdzv-id',
    '--rdzv_id', '--rdzv-conf', '--rdzv_conf', '--monitor-interval', '--monitor_interval', '--start-method',
    '--start_method', '--event-log-handler', '--event_log_handler', '--role', '--log-dir', '--log_dir',
    '--local-ranks-filter', '--local_ranks_filter', '-r', '--redirects', '-t', '--tee', '--log-line-prefix-template',
    '--log_line_prefix_template', '--duplicate-stdout-filters', '--duplicate_stdout_filters',
    '--duplicate-stderr-filters', '--duplicate_stderr_filters', '--local-addr', '--local_addr', '--logs-specs',
    '--logs_specs', '--numa-binding', '--numa_binding', '--signals-to-handle', '--signals_to_handle',
    '--shutdown-timeout', '--shutdown_timeout', '--print-completion', '--print_completion',
)
TORCH_ONLY_OPTIONS = _TORCH_VALUE_OPTIONS + (
    '--use-env', '--use_env', '--no-python', '--standalone', '--run-path', '--run_path', '--virtual-local-rank',
    '--virtual_local_rank', '-m',
)
#: torch's short options with a value, which may be joined to it (`-r3`, `-t0:3`).
_SHORT_VALUE_OPTIONS = ('-r', '-t')
_SHARED_VALUE_OPTIONS = ('--node_rank', '--master_addr', '--master_port', '--max_restarts')


#: DeepSpeed-side options that settle the question the other way (`--max_restarts` is shared).
DEEPSPEED_ONLY_OPTIONS = ('--elastic_training', '--min_elastic_nodes', '--max_elastic_nodes', '--num_gpus',
                          '--num_accelerators', '--hostfile', '--include', '--exclude', '--launcher')

#: Options (of either CLI) whose value may follow as the next word: that word is not the script.
_VALUE_OPTIONS = _TORCH_VALUE_OPTIONS + _SHARED_VALUE_OPTIONS + ('--grace_period',)


def _options_before_script(argv: Sequence[str]) -> list[str]:
    """The option names before the script, skipping the value of `--opt VALUE`."""
    names: list[str] = []
    takes_value = False
    for arg in argv:
        if takes_value:
            takes_value = False
            continue
        if not arg.startswith('-') or arg == '--':
            break
        if arg[:2] in _SHORT_VALUE_OPTIONS and len(arg) > 2:
            names.append(arg[:2])  # `-r3` is `-r 3`
            continue
        name = arg.split('=', 1)[0]
        names.append(name)
        takes_value = '=' not in arg and name in _VALUE_OPTIONS
    return names


def wants_torch_cli(argv: Sequence[str]) -> bool:
    """Whether `argv` uses torch's launcher flags (before the script), not DeepSpeed's."""
    before_script = _options_before_script(argv)  # everything after the script belongs to the user
    if any(a in DEEPSPEED_ONLY_OPTIONS for a in before_script):
        return False
    return any(a in TORCH_ONLY_OPTIONS or _torch_abbreviation(a) for a in before_script)


def _torch_abbreviation(name: str) -> bool:
    """`--nproc-per`: the start of torch-only options and of none of the runner's, which DeepSpeed
    refuses and torch's argparse takes (`python -m torch.distributed.launch --nproc-per 2 ...`)."""
    if not name.startswith('--') or len(name) < 3 or not any(o.startswith(name) for o in TORCH_ONLY_OPTIONS):
        return False
    from dslaunch import runner  # only for such a word: the runner's parser is not on the usual start path

    return not any(o.startswith(name) for o in runner.build_parser()._option_string_actions)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or 'dslaunch',
        description='torch.distributed.launch-compatible front end of dslaunch (static rendezvous).',
    )
    p.add_argument('--nproc-per-node', '--nproc_per_node', dest='nproc_per_node', default='1',
                   help='workers per node: a number, "gpu", "cpu" or "auto"')
    p.add_argument('--nnodes', default='1', help='number of nodes (a fixed number)')
    p.add_argument('--node-rank', '--node_rank', dest='node_rank', type=int, default=0)
    p.add_argument('--master-addr', '--master_addr', dest='master_addr', default='127.0.0.1')
    p.add_argument('--master-port', '--master_port', dest='master_port', type=int, default=None,
                   help='default: 29500 for several nodes, a free port for one node (as torchrun)')
    p.add_argument('--standalone', action='store_true', help='single node on 127.0.0.1 and a free port')
    p.add_argument('--use-env', '--use_env', dest='use_env', action='store_true',
                   help='do not pass --local-rank; read LOCAL_RANK from the environment')
    p.add_argument('-m', '--module', action='store_true')
    p.add_argument('--no-python', '--no_python', dest='no_python', action='store_true')
    p.add_argument('--max-restarts', '--max_restarts', dest='max_restarts', type=int, default=0)
    p.add_argument('--rdzv-backend', '--rdzv_backend', dest='rdzv_backend', default='static')
    p.add_argument('--rdzv-endpoint', '--rdzv_endpoint', dest='rdzv_endpoint', default='')
    p.add_argument('--rdzv-id', '--rdzv_id', dest='rdzv_id', default='none',
                   help="the workers' TORCHELASTIC_RUN_ID (default 'none'; a random id under --standalone, and on one node "
                        'without --master-port or --rdzv-endpoint, as torchrun)')
    p.add_argument('--role', default='default', help='ROLE_NAME given to the workers')
    p.add_argument('--log-dir', '--log_dir', dest='log_dir', default=None, help='per-rank log files here')
    # torchrun's tuning knobs of its own agent, worker start-up, rendezvous timeouts and event log:
    # nothing to tune here (no polling agent, no multiprocessing start, a static rendezvous)
    for flag, alt in (('--monitor-interval', '--monitor_interval'), ('--start-method', '--start_method'),
                      ('--rdzv-conf', '--rdzv_conf'), ('--event-log-handler', '--event_log_handler')):
        p.add_argument(flag, alt, dest=alt[2:], default=None, help='accepted and ignored (no agent here to tune)')
    p.add_argument('--local-ranks-filter', '--local_ranks_filter', dest='local_ranks_filter', default=None,
                   help='only these local ranks on the console, e.g. 0 or 0,2')
    p.add_argument('--run-path', '--run_path', dest='run_path', action='store_true',
                   help='run the script with Python even with --no-python (each worker is `python -u script`, '
                        "what torch's runpy.run_path in a worker amounts to)")
    p.add_argument('-r', '--redirects', default='0',
                   help='streams kept off the console and written to <log dir>/<run id>_*/attempt_0/<local rank>/'
                        '{stdout,stderr}.log: 3 both, 1 stdout, 2 stderr, 0 none; or per local rank, e.g. 0:3,1:2')
    p.add_argument('-t', '--tee', default='0', help='streams written to those files and shown (same values)')
    p.add_argument('--log-line-prefix-template', '--log_line_prefix_template', dest='log_line_prefix_template',
                   default='', help='console prefix with ${rank}, ${local_rank}, ${role_name}, ${hostname} '
                   '(default: $TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE; with --tee [${role_name}${local_rank}]:)')
    for stream in ('stdout', 'stderr'):
        p.add_argument(f'--duplicate-{stream}-filters', f'--duplicate_{stream}_filters', type=filter_list, default=[],
                       dest=f'duplicate_{stream}_filters',
                       help=f"also write the tee'd {stream} lines that hold any of these comma-separated texts (,, for "
                            f'a comma) to <log dir>/<run id>_*/attempt_<restart>/filtered_{stream}.log')
    p.add_argument('--shutdown-timeout', '--shutdown_timeout', dest='shutdown_timeout', type=int, default=None,
                   help='seconds between SIGTERM and SIGKILL when workers are stopped (default: '
                        '$TORCH_ELASTIC_SHUTDOWN_TIMEOUT, else 30); the same as --grace_period')
    p.add_argument('--local-addr', '--local_addr', dest='local_addr', default=None,
                   help="this node's address for the other nodes, in an elastic job's rendezvous "
                        '(default: the address that routes towards the rendezvous host)')
    p.add_argument('--virtual-local-rank', '--virtual_local_rank', dest='virtual_local_rank', action='store_true',
                   help='each worker sees only its own GPU, as device 0: LOCAL_RANK=0 and CUDA_VISIBLE_DEVICES '
                        "= its entry of this process's list (or its local rank)")
    p.add_argument('--signals-to-handle', '--signals_to_handle', dest='signals_to_handle', default=TORCHRUN_SIGNALS,
                   help='signals that stop the job, passed on to the workers first (SIGKILL after the shutdown '
                        'timeout), e.g. SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 under Slurm; SIGTERM, SIGINT, SIGHUP '
                        'and SIGQUIT always do; other signals dslaunch passes on (SIGUSR1/2) leave the job running')
    p.add_argument('--raw_output', action='store_true', help='no rank prefix on console lines')
    p.add_argument('--grace_period', type=float, default=None, help="dslaunch's name for --shutdown-timeout")
    p.add_argument('--dry_run', action='store_true')
    p.add_argument('--print-completion', '--print_completion', action=_PrintCompletion, choices=('bash', 'zsh', 'tcsh'),
                   help="print a shell completion script for these options and exit (needs the 'shtab' package)")
    p.add_argument('training_script')
    p.add_argument('training_script_args', nargs=argparse.REMAINDER)
    _pet_defaults(p, os.environ)
    return p


class _PrintCompletion(argparse.Action):
    """torchrun's --print-completion SHELL: the completion script `shtab` makes from this parser,
    then exit (an error line and status 1 without shtab, which is imported only here)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        try:
            import shtab  # type: ignore[import-not-found]
        except ImportError:
            parser.exit(1, f"{option_string} requires the 'shtab' package: pip install shtab\n")
        print(shtab.complete(parser, shell=values))
        parser.exit()


#: This front end's options that are not torchrun's: no PET_ variable for them (torch.distributed.launch's
#: --use-env has none either).
_NOT_TORCHRUNS = frozenset({'help', 'use_env', 'raw_output', 'grace_period', 'dry_run', 'print_completion',
                            'training_script', 'training_script_args'})


def _pet_defaults(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """torchrun's defaults from the environment: `PET_<DEST>` for each of its options (PET_NNODES,
    PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR, ... as Kubeflow's PyTorchJob sets them), an
    integer for a flag (0 off). The command line still wins."""
    for action in parser._actions:
        name = f'PET_{action.dest.upper()}'
        if action.dest in _NOT_TORCHRUNS or name not in environ:
            continue
        value = environ[name]
        if action.nargs == 0:
            try:
                action.default = bool(int(value))
            except ValueError:
                raise UsageError(f'{name}={value!r}: expected an integer (0 is off)') from None
        else:
            action.default = value  # argparse converts it with the option's type, as a command-line value


def nproc_from(spec: str) -> int:
    from dslaunch.devices import gpu_count

    def cpu_count() -> int:
        try:
            return len(os.sched_getaffinity(0)) or 1  # what torch counts: taskset/cgroup limits
        except AttributeError:
            return os.cpu_count() or 1

    if spec in ('gpu', 'auto'):
        # CUDA_VISIBLE_DEVICES counts only where there are GPUs at all: torch sees none without
        n = gpu_count() if gpu_count({}) else 0
        if n > 0 or spec == 'auto':
            return n or cpu_count()
        raise UsageError('--nproc-per-node gpu: no GPU found')
    if spec == 'cpu':
        return cpu_count()
    try:
        n = int(spec)
    except ValueError:
        raise UsageError(f'--nproc-per-node: {spec!r} is not a number, "gpu", "cpu" or "auto"') from None
    if n < 1:
        raise UsageError('--nproc-per-node must be at least 1')
    from dslaunch.hostfile import MAX_SLOTS_PER_HOST

    if n > MAX_SLOTS_PER_HOST:  # `99999999999` would build the plans for minutes
        raise UsageError(f'--nproc-per-node {n} is more ranks per host than dslaunch launches ({MAX_SLOTS_PER_HOST})')
    return n


def grace_of(args: argparse.Namespace, environ: Mapping[str, str]) -> float:
    """Seconds from SIGTERM to SIGKILL for stopped workers: --shutdown-timeout, --grace_period,
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT (torch's), else 30."""
    if args.shutdown_timeout is not None:
        source, grace = '--shutdown-timeout', str(args.shutdown_timeout)
    elif args.grace_period is not None:
        source, grace = '--grace_period', str(args.grace_period)
    else:
        source, grace = 'TORCH_ELASTIC_SHUTDOWN_TIMEOUT', environ.get('TORCH_ELASTIC_SHUTDOWN_TIMEOUT', '30')
    try:
        seconds = float(grace)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # nan too
        raise UsageError(f'{source} must be >= 0 seconds, got {grace}')
    return seconds


def virtual_local_rank(plans: Sequence[RankPlan], environ: Mapping[str, str]) -> None:
    """torchrun's --virtual-local-rank: each worker sees only its own GPU, as device 0 (LOCAL_RANK=0;
    CUDA_VISIBLE_DEVICES, and HIP_VISIBLE_DEVICES where set, is this process's entry for its local
    rank, or the local rank itself when none is set)."""
    hip = environ.get('HIP_VISIBLE_DEVICES')
    name, parent = ('HIP_VISIBLE_DEVICES', hip) if hip else ('CUDA_VISIBLE_DEVICES', environ.get('CUDA_VISIBLE_DEVICES'))
    for p in plans:
        if parent is None:
            device = str(p.local_rank)
        else:
            devices = parent.split(',')
            if p.local_rank >= len(devices):
                raise UsageError(f'--virtual-local-rank: local rank {p.local_rank} has no device in {name}={parent}')
            device = devices[p.local_rank].strip()
        p.env_overrides.update({'LOCAL_RANK': '0', 'CUDA_VISIBLE_DEVICES': device})
        if hip:
            p.env_overrides['HIP_VISIBLE_DEVICES'] = device


def std_streams(spec: str, nproc: int, option: str) -> list[int]:
    """torchrun's --redirects/--tee value, per local rank: one of 0-3 for every worker (1 stdout,
    2 stderr, 3 both), or `local_rank:value,...` (workers not named: 0; ones beyond --nproc-per-node
    ignored, as torch)."""
    bad = UsageError(f'{option} {spec!r}: expected 0-3 (1 stdout, 2 stderr, 3 both) or local_rank:value,... '
                     'e.g. 0:3,1:2')

    def value(v: str) -> int:
        if v.strip() in ('0', '1', '2', '3'):
            return int(v)
        raise bad

    if ':' not in spec:
        return [value(spec)] * nproc
    streams = [0] * nproc
    for item in spec.split(','):
        local, _, v = item.partition(':')
        if not local.strip().isdecimal():  # not isdigit: int() refuses '²'
            raise bad
        if int(local) < nproc:
            streams[int(local)] = value(v)
        else:
            value(v)
    return streams


def prefix_template(args: argparse.Namespace, environ: Mapping[str, str], *, tee_used: bool) -> str | None:
    """torchrun's console prefix (--log-line-prefix-template, else TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE,
    else `[${role_name}${local_rank}]:` when some worker's stream is tee'd, `tee_used`) as the core's
    prefix template (`{tag}` is the global rank, `{rank}` the worker's index on this node: its local
    rank); None keeps dslaunch's `[rank]: `."""
    template = args.log_line_prefix_template or environ.get('TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE', '')
    if not template and tee_used:
        template = '[${role_name}${local_rank}]:'
    if not template:
        return None
    import socket
    from string import Template

    # torch's macros to the core's placeholders; every other brace, the role's and host name's
    # included, is text (the core reads `{{` and `}}` as one brace). NUL is in no argument.
    text = Template(template).safe_substitute(rank='\0T', local_rank='\0R', role_name=args.role,
                                              hostname=socket.gethostname())
    return text.replace('{', '{{').replace('}', '}}').replace('\0T', '{tag}').replace('\0R', '{rank}')


#: Streams as `_core.RankSpec`'s `console`/`bare` take them, by a 0-3 value (1 stdout, 2 stderr):
#: all but those streams, e.g. the console of a worker whose streams `value` are redirected.
_ALL_BUT: dict[int, bool | Literal['stdout', 'stderr']] = {0: True, 1: 'stderr', 2: 'stdout', 3: False}


def worker_streams(redirect: int, tee: int, error_file: str, *, tee_used: bool) -> tuple[
        bool | Literal['stdout', 'stderr'], bool | Literal['stdout', 'stderr'], tuple[str | None, str | None]]:
    """One worker's --redirects/--tee values (`std_streams`) as torchrun has them: its `console`
    (all but the streams redirected and not tee'd), the streams shown `bare` (when the job tees at
    all, `tee_used`, only tee'd streams are prefixed, as torch shows the others as they are; without
    --tee dslaunch prefixes every line, its own default), and its `stdout.log`/`stderr.log` (each
    stream redirected or tee'd, beside its error file)."""
    logged, where = redirect | tee, os.path.dirname(error_file)
    return _ALL_BUT[redirect & ~tee], _ALL_BUT[tee] if tee_used else False, (
        os.path.join(where, 'stdout.log') if logged & 1 else None,
        os.path.join(where, 'stderr.log') if logged & 2 else None)


def stream_plans(plans: Sequence[RankPlan], redirects: list[int], tee: list[int], error_files: dict[int, str]) -> bool:
    """Applies --redirects/--tee (`std_streams`) to the plans (`worker_streams`). False when no
    stream is logged."""
    if not any(redirects) and not any(tee):
        return False
    for p in plans:
        p.console, p.bare, logs = worker_streams(redirects[p.local_rank], tee[p.local_rank],
                                                 error_files[p.local_rank], tee_used=any(tee))
        if any(logs):
            p.stream_logs = logs
        # torch's files only, for every worker: a `<stamp>_rank<R>.log` of both streams would make
        # the job merge stderr into stdout, and the per-stream files could not be told apart
        p.log_name = None
    return True


def filter_list(value: str) -> list[str]:
    """torchrun's --duplicate-*-filters value: texts separated by commas, `,,` for a comma in one
    (`''` is one empty text, which every line holds)."""
    return [part.replace('\0', ',') for part in value.replace(',,', '\0').split(',')]


def console_copies(filters: tuple[list[str], list[str]], tee: list[int],
                   attempt_dir: str) -> dict[str, tuple[str, list[str]]]:
    """--duplicate-stdout-filters/--duplicate-stderr-filters (`filters`) as the core's
    `console_copies`: the file `<attempt dir>/filtered_<stream>.log`, made whenever filters are
    given, gets the lines of the tee'd streams shown on the console that hold one of them (as
    torch: none without --tee)."""
    copies = {}
    for (stream, bit), wanted in zip((('stdout', 1), ('stderr', 2)), filters):
        if wanted:
            tee_d = any(t & bit for t in tee)
            copies[stream] = (os.path.join(attempt_dir, f'filtered_{stream}.log'), wanted if tee_d else [])
    return copies


def substitute_local_rank(words: Sequence[str], local_rank: int) -> list[str]:
    """torchrun's macro: `${local_rank}` (or `$local_rank`) in the script's arguments becomes the
    worker's local rank, and `$$` a `$`, as in torch; any other `$` text is left alone."""
    if not any('$' in w for w in words):
        return list(words)
    from string import Template  # only when needed: `string` is not on the CLI's start path

    return [Template(w).safe_substitute(local_rank=str(local_rank)) for w in words]


def node_range(spec: object) -> tuple[int, int]:
    """`--nnodes N`, `N:N` or `MIN:MAX` as (MIN, MAX); anything else is a UsageError."""
    try:
        lo, sep, hi = str(spec).partition(':')
        low = int(lo)
        high = int(hi) if sep else low
    except ValueError:
        raise UsageError(f'--nnodes {spec!r}: expected a node count N or a range MIN:MAX') from None
    if low < 1:
        raise UsageError(f'--nnodes must be at least 1, got {spec}')
    if high < low:
        raise UsageError(f'--nnodes {spec}: the maximum is below the minimum')
    return low, high


def fixed_nnodes(spec: object) -> int:
    """`--nnodes N` or `N:N` as a number (the static rendezvous); a range is a UsageError."""
    low, high = node_range(spec)
    if high != low:
        raise UsageError(f'--nnodes {spec}: a range needs the elastic agent (a c10d rendezvous), not a fixed world')
    return low


def is_elastic(args: argparse.Namespace) -> bool:
    """Whether torchrun would need its elastic agent: a node range, restarts, or a dynamic
    rendezvous across nodes (on one node, a dynamic rendezvous is a standalone job)."""
    low, high = node_range(args.nnodes)
    dynamic = args.rdzv_backend != 'static' and not args.standalone
    return low != high or args.max_restarts != 0 or (dynamic and high > 1)


def elastic_config(args: argparse.Namespace, free_port: Callable[[], int]) -> ElasticConfig:
    """torchrun's elastic settings, for dslaunch's elastic agent (which runs torch's c10d
    rendezvous): the endpoint (`--rdzv-endpoint`, port 29400 by default as torch's; under the
    static backend `--master-addr:--master-port`), `--nnodes MIN:MAX`, `--rdzv-id`,
    `--max-restarts` and the `--rdzv-conf` keys of the c10d rendezvous."""
    from dslaunch.elastic import ElasticConfig, parse_rdzv_conf

    low, high = (1, 1) if args.standalone else node_range(args.nnodes)
    if args.rdzv_backend.startswith('etcd'):
        raise UsageError(f'--rdzv-backend {args.rdzv_backend}: elastic jobs here use the c10d rendezvous')
    if args.max_restarts < 0:
        raise UsageError(f'--max-restarts must be >= 0, got {args.max_restarts}')
    nothing_named = args.rdzv_backend == 'static' and not args.rdzv_endpoint and args.master_port is None
    if args.standalone or (high == 1 and nothing_named):  # torchrun: a local c10d rendezvous on a free port
        host, port = '127.0.0.1', '0'
    elif args.rdzv_endpoint:
        host, sep, port = args.rdzv_endpoint.rpartition(':')
        if not sep or ']' in port:  # no port given (an IPv6 address in brackets has colons of its own)
            if args.rdzv_backend == 'static':  # torch's static handler needs one; c10d's defaults to 29400
                raise UsageError(f'--rdzv-endpoint {args.rdzv_endpoint!r}: expected HOST:PORT')
            host, port = args.rdzv_endpoint, '29400'
    elif args.rdzv_backend == 'static':
        host, port = args.master_addr, str(args.master_port if args.master_port is not None else 29500)
    else:
        host, port = 'localhost', '29400'
    host = host.strip('[]')
    if not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f'--rdzv-endpoint {args.rdzv_endpoint!r}: expected HOST:PORT')
    if int(port) == 0:
        if high > 1:
            raise UsageError('the rendezvous port 0 only works for one node: give the other nodes a port to reach')
        port = str(free_port())
    # `timeout` (etcd's key, common in scripts) is dropped, as torch's c10d handler ignores it; the
    # other keys are checked as c10d reads them; a value in quotes, as some scripts pass it, is
    # taken without them
    text = (args.rdzv_conf or '').strip().strip('\'"')
    known = ','.join(kv for kv in text.split(',') if kv.split('=', 1)[0].strip() not in ('timeout', ''))
    conf = {'join_timeout': '600', 'read_timeout': '60'}  # torch's c10d defaults
    conf.update(parse_rdzv_conf(known, '--rdzv-conf'))
    run_id = torch_run_id(args.rdzv_id, standalone=args.standalone, rdzv_backend=args.rdzv_backend,
                          rdzv_endpoint=args.rdzv_endpoint, master_port=args.master_port, one_node=high == 1)
    return ElasticConfig(run_id=run_id, endpoint=f'{host}:{port}', min_nodes=low, max_nodes=high,
                         max_restarts=args.max_restarts, rdzv_conf=conf, local_addr=args.local_addr)


def run_elastic(args: argparse.Namespace, plans: Sequence[RankPlan], cfg: ElasticConfig, grace: float,
                streams: tuple[list[int], list[int]]) -> int:
    """This node's elastic agent (`dslaunch.elastic`) for torchrun's elastic command lines: each
    rendezvous round gives the workers their RANK, WORLD_SIZE, GROUP_RANK, MASTER_ADDR/PORT, ...;
    `plans` give the rest (argv with `--local-rank`, OMP_NUM_THREADS, ...); `streams` are the
    workers' --redirects and --tee (`std_streams`)."""
    from dslaunch import elastic
    from dslaunch.launch_run import DEFAULT_PREFIX

    node = elastic.Node(
        argv=[p.argv for p in plans],
        static_env=[dict(p.env_overrides) for p in plans],  # the per-round variables are set over these
        base_env=dict(os.environ),
        grace=grace,
        raw_output=args.raw_output,
        console_ranks=None,
        console_local_ranks=_local_ranks_filter(args),
        log_dir=args.log_dir,
        quiet=False,
        role=args.role,
        prefix=prefix_template(args, os.environ, tee_used=any(streams[1])) or DEFAULT_PREFIX,
        virtual_local_rank=args.virtual_local_rank,
        stop_signals=stop_signals_from(args.signals_to_handle),
        streams=streams,
        duplicate_filters=(args.duplicate_stdout_filters, args.duplicate_stderr_filters),
    )
    host = cfg.endpoint.rpartition(':')[0]
    return elastic.run_node(cfg, node, argparse.Namespace(log_level='info', node_rank=None, master_addr=host))


def plans_for(args: argparse.Namespace, *, python: str, log_stamp: str, run_id: str = 'none') -> list[RankPlan]:
    from dslaunch.launch import RankPlan

    nnodes = fixed_nnodes(args.nnodes)
    if not 0 <= args.node_rank < nnodes:
        raise UsageError(f'--node-rank {args.node_rank} is out of range for --nnodes {nnodes}')
    if args.no_python and args.module and not args.run_path:
        raise UsageError("Don't use both the '--no-python' flag and the '--module' flag at the same time.")
    if args.no_python and not args.use_env:
        raise UsageError('--no-python requires --use-env (as in torch.distributed.launch)')
    script_alone = args.no_python and not args.run_path  # --run-path runs the script with Python, -m or not
    nproc = nproc_from(str(args.nproc_per_node))
    world = nnodes * nproc
    plans = []
    for local in range(nproc):
        rank = args.node_rank * nproc + local
        argv: list[str] = [] if script_alone else [python, '-u'] + (['-m'] if args.module and not args.run_path else [])
        # torch applies the macro to every argument of the interpreter, the script's name included;
        # a program run as itself (--no-python) is left as it is
        argv += [args.training_script] if script_alone else substitute_local_rank([args.training_script], local)
        if not args.use_env:
            argv.append(f'--local-rank={local}')
        argv += substitute_local_rank(args.training_script_args, local)
        env = {
            'RANK': str(rank), 'LOCAL_RANK': str(local), 'WORLD_SIZE': str(world),
            'LOCAL_WORLD_SIZE': str(nproc), 'LOCAL_SIZE': str(nproc),
            'GROUP_RANK': str(args.node_rank), 'GROUP_WORLD_SIZE': str(nnodes),
            'ROLE_RANK': str(rank), 'ROLE_WORLD_SIZE': str(world), 'ROLE_NAME': args.role,
            'CROSS_RANK': str(args.node_rank), 'CROSS_SIZE': str(nnodes),
            'MASTER_ADDR': args.master_addr, 'MASTER_PORT': str(args.master_port),
        }
        # what torchrun's agent adds: scripts that ask torch.distributed.is_torchelastic_launched()
        # see True; the ranks' rank 0 hosts its own store (no agent store to share here)
        env.update({
            'TORCHELASTIC_RUN_ID': run_id, 'TORCHELASTIC_RESTART_COUNT': '0', 'TORCHELASTIC_MAX_RESTARTS': '0',
            'TORCHELASTIC_USE_AGENT_STORE': 'False', 'TORCHELASTIC_SIGNALS_TO_HANDLE': args.signals_to_handle,
            'TORCH_NCCL_ASYNC_ERROR_HANDLING': os.environ.get('TORCH_NCCL_ASYNC_ERROR_HANDLING', '1'),
        })
        if nproc > 1 and 'OMP_NUM_THREADS' not in os.environ:
            env['OMP_NUM_THREADS'] = '1'  # torchrun's default, to keep N workers from oversubscribing
        log = os.path.join(args.log_dir, f'{log_stamp}_rank{rank}.log') if args.log_dir else None
        plans.append(RankPlan(rank=rank, local_rank=local, argv=argv, env_overrides=env, log_name=log))
    if args.virtual_local_rank:
        virtual_local_rank(plans, os.environ)
    return plans


def torch_run_id(rdzv_id: str, *, standalone: bool, rdzv_backend: str, rdzv_endpoint: str, master_port: int | None,
                 one_node: bool) -> str:
    """The workers' TORCHELASTIC_RUN_ID, as torch 2.15's torchrun makes it: a random one under
    --standalone, and also on one node when nothing names a rendezvous (the static backend, no
    --rdzv-endpoint, no --master-port), where torchrun turns to a local c10d rendezvous with a
    fresh id (a --rdzv-id given then is dropped, as there); else --rdzv-id, by default 'none'."""
    if standalone or (rdzv_backend == 'static' and not rdzv_endpoint and master_port is None and one_node):
        return _random_run_id()
    return rdzv_id


def _random_run_id() -> str:
    h = os.urandom(16).hex()  # a UUID's shape, as torchrun's default run id (without importing uuid)
    return f'{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}'


def main(argv: Sequence[str], prog: str | None = None) -> int:
    import shlex

    from dslaunch.launch_run import DEFAULT_PREFIX, run_plans
    from dslaunch.probes import SystemProbes

    args = build_parser(prog).parse_args(list(argv))
    if args.rdzv_backend not in ('static', 'c10d', 'etcd', 'etcd-v2'):
        raise UsageError(f'--rdzv-backend {args.rdzv_backend!r}: not a rendezvous backend (static, c10d, etcd, etcd-v2)')
    if is_elastic(args):
        return _elastic_main(args)
    asked_standalone = args.standalone
    given_backend, given_endpoint, given_port = args.rdzv_backend, args.rdzv_endpoint, args.master_port
    probes = SystemProbes()
    one_node = fixed_nnodes(args.nnodes) == 1
    if args.rdzv_backend != 'static' and not args.standalone:
        args.standalone = True  # one node (is_elastic: not several): what torchrun's c10d on localhost amounts to
    if args.rdzv_endpoint and not args.standalone:
        host, _, port = args.rdzv_endpoint.rpartition(':')
        if not host or not port.isdigit():
            raise UsageError(f'--rdzv-endpoint {args.rdzv_endpoint!r}: expected HOST:PORT')
        args.master_addr, args.master_port = host.strip('[]'), int(port)
    if args.standalone:
        args.master_addr, args.nnodes, args.node_rank = '127.0.0.1', '1', 0
        args.master_port = probes.free_port()
    elif args.master_port == 0 or (args.master_port is None and one_node):
        args.master_port = probes.free_port()
    elif args.master_port is None:
        args.master_port = 29500
    if not 0 <= args.master_port <= 65535:
        raise UsageError(f'--master-port {args.master_port} is not a port number (0-65535)')
    grace = grace_of(args, os.environ)  # a bad timeout is one line before anything starts
    stops = stop_signals_from(args.signals_to_handle)
    run_id = torch_run_id(args.rdzv_id, standalone=asked_standalone, rdzv_backend=given_backend,
                          rdzv_endpoint=given_endpoint, master_port=given_port, one_node=one_node)
    plans = _worker_plans(args, run_id)
    redirects = std_streams(args.redirects, len(plans), '--redirects')
    tee = std_streams(args.tee, len(plans), '--tee')
    local = _local_ranks_filter(args)
    console = None if local is None else {p.rank for p in plans if p.local_rank in local}
    if args.dry_run:
        for p in plans:
            env = ' '.join(f'{k}={shlex.quote(v)}' for k, v in p.env_overrides.items())
            print(f'{env} {shlex.join(p.argv)}')
        return 0
    args.training_script_args = list(args.training_script_args)
    _check_script(args, len(plans))
    if args.node_rank == 0 and args.master_addr in ('127.0.0.1', 'localhost') and \
            not probes.port_free(args.master_addr, args.master_port):
        raise UsageError(f'master port {args.master_port} is already in use on this host; '
                         'pick another with --master-port (0 picks a free one)')
    if args.log_dir:
        from dslaunch.launch import ensure_rank_log_dir

        ensure_rank_log_dir(args.log_dir)  # a file or an unwritable path: one line, as --enable_each_rank_log
    from dslaunch.error_files import ErrorFiles

    error_files = ErrorFiles(args.log_dir, run_id)
    paths = error_files.attempt(0, (p.local_rank for p in plans))
    for p in plans:
        p.env_overrides['TORCHELASTIC_ERROR_FILE'] = paths[p.local_rank]
    attempt_dir = os.path.dirname(os.path.dirname(paths[plans[0].local_rank]))
    copies = console_copies((args.duplicate_stdout_filters, args.duplicate_stderr_filters), tee, attempt_dir)
    if stream_plans(plans, redirects, tee, paths):
        error_files.keep = True
        print(f'dslaunch: worker logs (--redirects/--tee): {attempt_dir}/<local rank>/{{stdout,stderr}}.log',
              file=sys.stderr)
    if copies:
        error_files.keep = True
        print(f'dslaunch: filtered lines (--duplicate-*-filters): {attempt_dir}/filtered_{{stdout,stderr}}.log',
              file=sys.stderr)
    try:
        return run_plans(plans, os.environ, raw_output=args.raw_output, console_ranks=console,
                         grace_period=grace, stop_signals=stops, console_copies=copies,
                         prefix=prefix_template(args, os.environ, tee_used=any(tee)) or DEFAULT_PREFIX)
    finally:
        error_files.finish()


def _local_ranks_filter(args: argparse.Namespace) -> set[int] | None:
    """--local-ranks-filter: the local ranks shown on the console (None: all)."""
    from dslaunch.launch_run import parse_rank_selection

    if not args.local_ranks_filter:
        return None
    return parse_rank_selection(args.local_ranks_filter, '--local-ranks-filter') or set()


def _worker_plans(args: argparse.Namespace, run_id: str) -> list[RankPlan]:
    import time

    python = os.environ.get('PYTHON_EXEC', sys.executable)  # torchrun's override of the workers' interpreter
    return plans_for(args, python=python, log_stamp=time.strftime('%Y%m%d%H%M%S'), run_id=run_id)


def _check_script(args: argparse.Namespace, nproc: int) -> None:
    """A missing script is one line (`launch_run.check_script`): each worker's, after the macro."""
    from dslaunch.launch_run import check_script

    script_alone = args.no_python and not args.run_path
    names = [args.training_script]
    if not script_alone and '$' in args.training_script:
        names = [substitute_local_rank(names, local)[0] for local in range(nproc)]
    for name in dict.fromkeys(names):
        check_script(argparse.Namespace(no_python=script_alone, module=args.module, training_script=name))


def _elastic_main(args: argparse.Namespace) -> int:
    import shlex

    from dslaunch.probes import SystemProbes

    cfg = elastic_config(args, SystemProbes().free_port)
    grace = grace_of(args, os.environ)  # a bad timeout is one line before anything starts
    # the node's workers as on a one-node world: every round sets their place in the job
    one = argparse.Namespace(**{**vars(args), 'nnodes': '1', 'node_rank': 0, 'master_port': 0})
    plans = _worker_plans(one, cfg.run_id)
    streams = std_streams(args.redirects, len(plans), '--redirects'), std_streams(args.tee, len(plans), '--tee')
    _local_ranks_filter(args)  # a bad value is one line, --dry_run too
    if args.dry_run:
        print(f"# elastic: rendezvous '{cfg.run_id}' at {cfg.endpoint}, {cfg.min_nodes} to {cfg.max_nodes} nodes, "
              f'{cfg.max_restarts} restart(s); RANK, WORLD_SIZE, MASTER_ADDR/PORT, ... come from each round')
        for p in plans:
            print(shlex.join(p.argv))
        return 0
    _check_script(args, len(plans))
    if args.log_dir:
        from dslaunch.launch import ensure_rank_log_dir

        ensure_rank_log_dir(args.log_dir)
    return run_elastic(args, plans, cfg, grace, streams)


if __name__ == '__main__':  # `python -m dslaunch.torch_launch ...`, like `python -m torch.distributed.launch`
    from dslaunch.cli import main as _cli_main

    _cli_main(torch_cli=True)
