"""TORCHELASTIC_ERROR_FILE for the ranks, as torchrun's agent gives it: torch's `@record` writes a
rank's uncaught exception there (its message and traceback, as JSON).

The layout is torch's: `<base>/<run id>_<random>/attempt_<restart>/<local rank>/error.json`, the
base being the per-rank log directory when there is one, else a new `torchelastic_*` temporary
directory. After the job the files ranks wrote are named in one line and kept; when no rank wrote
one, what was made for them is removed (torch leaves it behind).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterable

from dslaunch.errors import DslaunchError


class ErrorFiles:
    """One node's error files over a job (one attempt per start of its ranks)."""

    def __init__(self, log_dir: str | None, run_id: str) -> None:
        # the run id is the user's (--rdzv-id, ELASTIC_RUN_ID): only its plain characters name a directory
        name = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in run_id)[:64]
        self.temporary = not log_dir
        self.given: dict[str, None] = {}  # every file handed out, in order
        self.keep = False  # the directories hold more than error files (torchrun's --tee/--redirects logs)
        try:
            self.base = log_dir or tempfile.mkdtemp(prefix='torchelastic_')
            self.run_dir = tempfile.mkdtemp(prefix=f'{name}_', dir=self.base)
        except OSError as e:
            raise _cannot_make(e) from None

    def attempt(self, restart: int, local_ranks: Iterable[int]) -> dict[int, str]:
        """Fresh `attempt_<restart>/<local rank>/` directories; local rank -> its error file."""
        attempt = os.path.join(self.run_dir, f'attempt_{restart}')
        shutil.rmtree(attempt, ignore_errors=True)  # a repeated attempt starts clean, as in torch
        files = {}
        for local in local_ranks:
            try:
                os.makedirs(os.path.join(attempt, str(local)))
            except OSError as e:
                raise _cannot_make(e) from None
            files[local] = os.path.join(attempt, str(local), 'error.json')
            self.given[files[local]] = None
        return files

    def finish(self) -> list[str]:
        """Names the files ranks wrote (one line on stderr) and returns them; with none, removes
        what was made for them."""
        written = [path for path in self.given if os.path.isfile(path)]
        if written:
            print(f'dslaunch: error files written by failed ranks (torch @record): {" ".join(written)}',
                  file=sys.stderr)
        elif not self.keep:
            shutil.rmtree(self.base if self.temporary else self.run_dir, ignore_errors=True)
        return written


def _cannot_make(e: OSError) -> DslaunchError:
    return DslaunchError(f"cannot make a directory for the ranks' error files: {e.strerror or e}: "
                         f'{e.filename or "the temporary directory"}')
