"""Variables exported to remote ranks in multi-node mode (spec section 7.3).

Two sources, in this order: variables of the runner's environment whose names start with
one of DeepSpeed's export prefixes, then ``~/.deepspeed_env`` and ``./.deepspeed_env``
(``$DS_ENV_FILE`` renames the file). A later key overwrites the value but keeps the first
position, exactly as DeepSpeed's exports dict does.

Deviation: DeepSpeed crashes on a blank or ``#`` comment line in the env file and keeps an
``export`` prefix as part of the key; dslaunch skips such lines and drops the prefix.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

from .errors import EnvFileError

__all__ = [
    'ACCELERATOR_EXPORT_PREFIXES',
    'DEFAULT_ENV_FILE_NAME',
    'EXPORT_PREFIXES',
    'collect_exports',
    'env_file_name',
    'env_file_paths',
    'parse_env_file',
    'read_env_files',
]

DEFAULT_ENV_FILE_NAME = '.deepspeed_env'

# DeepSpeed's EXPORT_ENVS; the accelerator adds its own (CUDA: NCCL).
EXPORT_PREFIXES: tuple[str, ...] = ('MLFLOW', 'PYTHON', 'MV2', 'UCX')
ACCELERATOR_EXPORT_PREFIXES: tuple[str, ...] = ('NCCL',)

# On AISC jobs the platform sets these per node; exporting the head node's values breaks them.
_SKIPPED_WHEN_SET: dict[str, tuple[str, ...]] = {'AISC_JOB_NAME': ('NCCL_IB_HCA', 'UCX_NET_DEVICES')}


def collect_exports(
    environ: Mapping[str, str], *, accelerator_prefixes: Sequence[str] = ACCELERATOR_EXPORT_PREFIXES
) -> dict[str, str]:
    """Variables of ``environ`` to export, in ``environ``'s iteration order."""
    prefixes = (*EXPORT_PREFIXES, *accelerator_prefixes)
    skipped = {name for trigger, names in _SKIPPED_WHEN_SET.items() if trigger in environ for name in names}
    return {key: value for key, value in environ.items() if key.startswith(prefixes) and key not in skipped}


def env_file_name(environ: Mapping[str, str] | None = None) -> str:
    """The env file's name: ``$DS_ENV_FILE`` (read now, not at import) or ``.deepspeed_env``."""
    env = os.environ if environ is None else environ
    return env.get('DS_ENV_FILE', DEFAULT_ENV_FILE_NAME)


def env_file_paths(
    environ: Mapping[str, str] | None = None, *, home: str | None = None, cwd: str | None = None
) -> list[str]:
    """Candidate env files in reading order: home directory first, then the working directory.

    An absolute ``$DS_ENV_FILE`` makes both candidates the same file; it is listed once.
    """
    env = os.environ if environ is None else environ
    name = env_file_name(env)
    home_dir = home if home is not None else (env.get('HOME') or os.path.expanduser('~'))
    work_dir = cwd if cwd is not None else '.'
    paths: list[str] = []
    for directory in (home_dir, work_dir):
        path = os.path.join(directory, name)
        if path not in paths:
            paths.append(path)
    return paths


def parse_env_file(lines: Iterable[str], *, source: str = '<env file>') -> dict[str, str]:
    """``KEY=VALUE`` lines into a dict; key and value are stripped (DeepSpeed's ``add_export`` strips too).

    Blank lines, ``#`` comment lines and a leading ``export `` are tolerated. One pair of matching
    quotes around the whole value is removed (``K="eth0"`` gives ``eth0``): under DeepSpeed's
    default pdsh backend the remote shell removes them (DeepSpeed writes ``export K=""eth0"";``),
    while its MPI backends hand ranks the quote characters. Nothing else is unquoted or expanded,
    and ``#`` after a value is part of it.
    """
    result: dict[str, str] = {}
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith('#'):
            continue
        words = line.split(None, 1)
        if len(words) == 2 and words[0] == 'export':
            line = words[1]
        if '=' not in line:
            raise EnvFileError(f'{source}:{number}: expected KEY=VALUE, got {line!r}')
        key, value = line.split('=', 1)
        key = key.strip()
        if not key:
            raise EnvFileError(f'{source}:{number}: empty variable name in {line!r}')
        result[key] = _unquoted(value.strip())
    return result


def _unquoted(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in '"\'':
        return value[1:-1]
    return value


def read_env_files(environ: Mapping[str, str] | None = None, *, paths: Sequence[str] | None = None) -> dict[str, str]:
    """Merge the env files that exist (see ``env_file_paths``), later files winning."""
    merged: dict[str, str] = {}
    for path in env_file_paths(environ) if paths is None else paths:
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding='utf-8') as f:
                merged.update(parse_env_file(f, source=path))
        except UnicodeDecodeError:
            raise EnvFileError(f'{path}: not valid UTF-8') from None
        except OSError as exc:
            raise EnvFileError(f'{path}: cannot read ({exc.strerror or exc})') from None
    return merged
