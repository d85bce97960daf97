"""User-facing errors.

Every error a user can cause (a bad hostfile, a bad filter, a garbage ``--world_info``) is a
``DslaunchError``; the CLI prints ``<prog>: error: <message>`` on one line and exits non-zero,
never with a traceback. Each class also subclasses the builtin a caller would naturally catch.
"""


class DslaunchError(Exception):
    """Base class for errors the CLI reports on one line."""

    exit_code = 1


class HostfileError(DslaunchError, ValueError):
    """The hostfile is malformed (bad entry, duplicate host, no hosts)."""


class ResourceFilterError(DslaunchError, ValueError):
    """``--include``/``--exclude``/``--num_nodes``/``--num_gpus`` cannot be applied."""


class WorldInfoError(DslaunchError, ValueError):
    """``--world_info`` cannot be decoded or does not fit ``--node_rank``."""


class LauncherError(DslaunchError, RuntimeError):
    """A launcher/backend problem: unknown name, binary missing, host unreachable, port taken."""


class UnknownLauncherError(LauncherError, NotImplementedError):
    """``--launcher`` names no backend dslaunch knows (DeepSpeed raises NotImplementedError)."""


class UsageError(DslaunchError, ValueError):
    """Flags that cannot be combined, or a flag value outside what the launcher supports."""


class CoreBindingError(DslaunchError, ValueError):
    """``--bind_cores_to_rank``/``--bind_core_list`` cannot be honoured."""


class EnvFileError(DslaunchError, ValueError):
    """A ``.deepspeed_env`` (or ``$DS_ENV_FILE``) line is not ``KEY=VALUE``."""


class EnvMappingError(DslaunchError, OSError):
    """The MPI/Slurm environment does not say which rank this process is (an OSError, as in DeepSpeed)."""


def printable(text: str, limit: int | None = None) -> str:
    """`text` for an error message: control and other non-printable characters (a pasted ``\\r``,
    a ``\\x1e`` in a host name) escaped as in a Python literal, so the message stays on one line;
    cut to ``limit`` characters plus ``...`` when given."""
    shown = text if limit is None or len(text) <= limit else text[:limit] + '...'
    return ''.join(c if c.isprintable() else repr(c)[1:-1] for c in shown)


def one_line(text: str) -> str:
    """`text` for an error message that must keep DeepSpeed's wording: only what breaks the line or
    drives the terminal (C0 controls but tab, DEL, C1 controls, U+2028/U+2029) is escaped as in a
    Python literal; tabs, non-ASCII spaces (NBSP, U+3000), a BOM and other printable-looking
    characters stay as DeepSpeed prints them."""
    return ''.join(repr(c)[1:-1] if _breaks_line(c) else c for c in text)


def _breaks_line(c: str) -> bool:
    o = ord(c)
    return (o < 0x20 and c != '\t') or 0x7F <= o <= 0x9F or c in '\u2028\u2029'
