"""MPICH (Hydra): ``mpirun -n N -ppn P -genv K V ... -hosts h0,h1 python -u -m dslaunch.launcher_helper ...``.

Hydra takes ``-genv NAME VALUE`` as two words and passes the value on unchanged (checked with MPICH
4.0.2 for spaces, both quote kinds, ``$()``, backticks, ``;``, ``*``, newlines, tabs and empty values),
so nothing is quoted. Ranks get PMI_RANK / MPI_LOCALRANKID, which the helper maps.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

from .base import HYDRA_BOOTSTRAP, HYDRA_BOOTSTRAP_ENV, ActiveResources, MultiNodeRunner, version_text, which


def is_mpich_hydra(program: str) -> bool:
    text = version_text(program)
    return 'HYDRA' in text and 'Intel' not in text


class MPICHRunner(MultiNodeRunner):
    name = 'mpich'

    @classmethod
    def backend_binary(cls, path: str | None = None) -> str:
        # Prefer Debian's suffixed names: plain `mpirun` is usually Open MPI's (higher alternatives priority).
        for program in ('mpirun.mpich', 'mpiexec.mpich'):
            found = which(program, path)
            if found:
                return found
        plain = which('mpirun', path)
        return plain if plain and is_mpich_hydra(plain) else 'mpirun'

    @classmethod
    def backend_exists(cls, path: str | None = None) -> bool:
        return os.path.isabs(cls.backend_binary(path))

    @classmethod
    def backend_package(cls) -> str:
        return "MPICH (the Debian package 'mpich')"

    def ssh_hosts(self, environment: Mapping[str, str], active_resources: ActiveResources) -> list[str]:
        return self.ssh_bootstrap_hosts(environment, active_resources, HYDRA_BOOTSTRAP, HYDRA_BOOTSTRAP_ENV)

    def validate_args(self) -> None:
        self.reject_filters()
        self.reject_unequal_pool('MPICH requires same number of devices per node')

    def get_cmd(self, environment: MutableMapping[str, str], active_resources: ActiveResources) -> list[str]:
        self.require_leading_slots(active_resources)
        total, per_host = self.equal_slots(active_resources, 'MPICH requires same number of devices per node')
        cmd = [self.backend_binary(environment.get('PATH')), '-n', str(total), '-ppn', str(per_host)]
        cmd += self.launcher_args()
        cmd += self.genv_words(total, per_host)
        cmd += ['-hosts', ','.join(active_resources)]
        return cmd + self.helper_cmd()
