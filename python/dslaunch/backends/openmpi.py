"""Open MPI: ``mpirun -n N -hostfile H ... -x K=V ... python -u -m dslaunch.launcher_helper ...``.

mpirun forwards only ``-x`` variables to remote ranks and passes each ``-x`` word on as is (checked
with Open MPI 4.1.4: spaces, quotes, ``$()``, commas, newlines and empty values arrive unchanged).
"""

from __future__ import annotations

import itertools
import os
from argparse import Namespace
from collections.abc import Mapping, MutableMapping

from .base import (
    OMPI_BOOTSTRAP,
    OMPI_BOOTSTRAP_ENV,
    ActiveResources,
    MultiNodeRunner,
    slot_counts,
    which,
    which_in_dir,
)


class OpenMPIRunner(MultiNodeRunner):
    name = 'openmpi'

    def __init__(self, args: Namespace, world_info_base64: str, resource_pool: Mapping[str, int] | None = None) -> None:
        super().__init__(args, world_info_base64, resource_pool)
        self.add_export('UCX_TLS', 'tcp')  # DeepSpeed's first export, kept for the same shape

    @classmethod
    def backend_binary(cls, path: str | None = None) -> str:
        # Debian installs Open MPI and MPICH side by side; plain `mpirun` may be either (alternatives).
        suffixed = which('mpirun.openmpi', path)
        if suffixed:
            return suffixed
        info = which('ompi_info', path)
        mpirun = info and which_in_dir('mpirun', os.path.dirname(info))
        return mpirun or 'mpirun'

    @classmethod
    def backend_exists(cls, path: str | None = None) -> bool:
        return os.path.isabs(cls.backend_binary(path))

    @classmethod
    def backend_package(cls) -> str:
        return "Open MPI (the Debian package 'openmpi-bin')"

    def ssh_hosts(self, environment: Mapping[str, str], active_resources: ActiveResources) -> list[str]:
        return self.ssh_bootstrap_hosts(environment, active_resources, OMPI_BOOTSTRAP, OMPI_BOOTSTRAP_ENV)

    @classmethod
    def validate_active_resources(cls, active: ActiveResources) -> None:
        # Filtering is supported by writing a smaller hostfile; picking device ids is not.
        cls.require_leading_slots(active)

    def hostfile_for(self, active: ActiveResources) -> str:
        """The user's hostfile when nothing was filtered out, else a per-job one with the kept slots."""
        unfiltered = slot_counts(active) == self.resource_pool and list(active) == list(self.resource_pool)
        if unfiltered or not self.resource_pool:
            return str(self.arg('hostfile'))
        lines = ''.join(f'{host} slots={n}\n' for host, n in slot_counts(active).items() if n > 0)
        return self.write_temp_file('dslaunch_openmpi_hostfile_', lines)

    def get_cmd(self, environment: MutableMapping[str, str], active_resources: ActiveResources) -> list[str]:
        self.validate_active_resources(active_resources)
        launcher_args = self.launcher_args()
        total = sum(slot_counts(active_resources).values())  # DeepSpeed counts the unfiltered pool
        cmd = [
            self.backend_binary(environment.get('PATH')),
            '-n',
            str(total),
            '-hostfile',
            self.hostfile_for(active_resources),
            '--mca',
            'btl',
            '^openib',
        ]
        # DeepSpeed's eth0 default, dropped when the user names the interface (#4460, #6613).
        user_sets_if = any(
            a in ('-mca', '--mca') and b == 'btl_tcp_if_include' for a, b in itertools.pairwise(launcher_args)
        )
        if not user_sets_if:
            cmd += ['--mca', 'btl_tcp_if_include', 'eth0']
        cmd += launcher_args
        for key, value in [*self.exports.items(), *self.rank_exports()]:
            cmd += ['-x', f'{key}={value}']
        if os.path.isabs(cmd[0]):
            # Open MPI takes an mpirun started by its absolute path as `--prefix <its dir's parent>`
            # and puts `/usr/bin` and `/usr/lib` first on every rank's PATH and LD_LIBRARY_PATH,
            # ahead of the user's venv (DeepSpeed's plain `mpirun` does not). A --prefix in
            # --launcher_args still wins over this.
            cmd.append('--noprefix')
        return cmd + self.helper_cmd()
