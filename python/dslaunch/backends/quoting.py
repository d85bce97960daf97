"""How values are written into backend command lines.

Only PDSH goes through a shell (the remote login shell that ssh hands the joined words to), so only
PDSH quotes. MPI launchers and srun get each value as its own argv word and pass it on unchanged.
"""

from __future__ import annotations

import re
import shlex

# DeepSpeed 0.19.8 wraps a value in double quotes when it holds anything outside this class.
_DS_PLAIN = re.compile(r'[^\w@%+=:,./-]')
_SHELL_NAME = re.compile(r'[A-Za-z_][A-Za-z0-9_]*\Z')


def deepspeed_quote(value: str) -> str:
    """What DeepSpeed 0.19.8's ``add_export`` stores for ``value``.

    A fact kept for the golden vectors (``add_export_quoting``); dslaunch does NOT apply it. It strips
    the value and wraps it in ``"..."`` without escaping anything inside, so ``say "hi"``, ``$HOME``
    and backticks still break or expand in a shell, and MPI/srun receive literal quote characters.
    """
    value = value.strip()
    return f'"{value}"' if _DS_PLAIN.search(value) else value


def pdsh_word(word: str) -> str:
    """``word`` as one shell word that survives pdsh and the remote shell byte for byte.

    ``shlex.quote`` protects it from the POSIX shell; doubling ``%`` protects it from pdsh, which
    rewrites ``%h``, ``%u``, ``%n`` and ``%%`` in every word of the remote command before ssh sees it.
    """
    return shlex.quote(word).replace('%', '%%')


def is_shell_name(name: str) -> bool:
    """Whether ``name`` can follow ``export`` in a POSIX shell."""
    return bool(_SHELL_NAME.match(name))
