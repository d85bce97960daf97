"""Intel MPI: one segment, ``mpirun -ppn P -genv K V ... -hosts h0,h1 -n N python -u -m dslaunch.launcher_helper ...``.

DeepSpeed writes one MPMD segment per rank (``-n 1 -env RANK i -env LOCAL_RANK j cmd :`` x N), so
the command grows with the world size. Intel MPI already gives each rank PMI_RANK and
MPI_LOCALRANKID; the helper maps them, and does the ``--bind_cores_to_rank`` numactl prefix and
OMP_NUM_THREADS on the node itself, where the cores are.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping

from .base import (
    HYDRA_BOOTSTRAP,
    HYDRA_BOOTSTRAP_ENV,
    ActiveResources,
    MultiNodeRunner,
    version_text,
    which,
    which_in_dir,
)


def find_intel_mpirun(path: str | None = None) -> str | None:
    """Intel's ``mpirun``: under ``$I_MPI_ROOT``, beside this Python (the ``impi-rt`` wheel), or on PATH."""
    root = os.environ.get('I_MPI_ROOT')
    dirs = [os.path.join(root, 'bin'), os.path.join(root, 'intel64', 'bin')] if root else []
    dirs.append(os.path.dirname(sys.executable))
    plain = which('mpirun', path)
    if plain:
        dirs.append(os.path.dirname(plain))
    for directory in dirs:
        mpirun = which_in_dir('mpirun', directory)
        if mpirun and (which_in_dir('impi_info', directory) or _is_intel(which_in_dir('mpiexec.hydra', directory))):
            return mpirun
    return None


def _is_intel(program: str | None) -> bool:
    return bool(program) and 'Intel' in version_text(program)


class IMPIRunner(MultiNodeRunner):
    name = 'impi'

    @classmethod
    def backend_binary(cls, path: str | None = None) -> str:
        return find_intel_mpirun(path) or 'mpirun'

    @classmethod
    def backend_exists(cls, path: str | None = None) -> bool:
        return find_intel_mpirun(path) is not None

    def ssh_hosts(self, environment: Mapping[str, str], active_resources: ActiveResources) -> list[str]:
        return self.ssh_bootstrap_hosts(
            environment, active_resources, HYDRA_BOOTSTRAP, (*HYDRA_BOOTSTRAP_ENV, 'I_MPI_HYDRA_BOOTSTRAP')
        )

    @classmethod
    def backend_package(cls) -> str:
        return "Intel MPI (the PyPI package 'impi-rt', or Intel oneAPI with $I_MPI_ROOT set)"

    def validate_args(self) -> None:
        self.reject_filters()
        self.reject_unequal_pool('Intel MPI requires same number of devices per node')

    def get_cmd(self, environment: MutableMapping[str, str], active_resources: ActiveResources) -> list[str]:
        self.require_leading_slots(active_resources)
        total, per_host = self.equal_slots(active_resources, 'Intel MPI requires same number of devices per node')
        if self.arg('bind_cores_to_rank') and self.arg('bind_core_list') is not None:
            # The list is the same on every node: refuse here (DeepSpeed's check and text), not once per rank.
            from ..numa import StaticTopology, get_numactl_cmd

            get_numactl_cmd(self.arg('bind_core_list'), per_host, 0, topology=StaticTopology([], 1), environ={})
        binary = self.backend_binary(environment.get('PATH'))
        self._put_hydra_first(binary, environment)
        cmd = [binary, '-ppn', str(per_host)] + self.launcher_args()
        cmd += self.genv_words(total, per_host, ('I_MPI_PIN', '0'))  # Intel pinning off: binding is ours (numactl)
        cmd += ['-hosts', ','.join(active_resources), '-n', str(total)]
        return cmd + self.helper_cmd(self._bind_flags())

    def _bind_flags(self) -> list[str]:
        flags = ['--bind_cores_to_rank'] if self.arg('bind_cores_to_rank') else []
        if flags and self.arg('bind_core_list') is not None:
            flags.append(f'--bind_core_list={self.arg("bind_core_list")}')
        return flags

    @staticmethod
    def _put_hydra_first(binary: str, environment: MutableMapping[str, str]) -> None:
        # Intel's mpirun is a script that runs `mpiexec.hydra` through PATH; with MPICH's earlier on
        # PATH it would silently run MPICH's instead. Put Intel's directory first when that would happen.
        directory = os.path.dirname(binary)
        own = directory and which_in_dir('mpiexec.hydra', directory)
        path = environment.get('PATH', os.defpath)
        if own and which('mpiexec.hydra', path) != own:
            environment['PATH'] = f'{directory}{os.pathsep}{path}' if path else directory
