"""MVAPICH2: ``mpirun -np N -ppn P --hostfile <per-job file> -env K=V ... python -u -m dslaunch.launcher_helper ...``.

MVAPICH2's ``mpirun`` is Hydra, which takes ``-env NAME=VALUE`` and passes the value on unchanged
(checked on MPICH 4.0.2's Hydra; MVAPICH itself cannot be installed on Debian, so its command is
only checked against DeepSpeed's vectors). DeepSpeed writes the host list to the fixed path
``/tmp/deepspeed_mvapich_hostfile``, which two jobs on one machine overwrite; we use a per-job file.
"""

from __future__ import annotations

import os
import subprocess
from argparse import Namespace
from collections.abc import Mapping, MutableMapping

from .base import HYDRA_BOOTSTRAP, HYDRA_BOOTSTRAP_ENV, ActiveResources, MultiNodeRunner, which, which_in_dir


def _accelerator() -> str:
    # No torch import on the CLI path: DeepSpeed's choice is cuda on a GPU host; DS_ACCELERATOR overrides it.
    return os.environ.get('DS_ACCELERATOR', 'cuda').lower()


class MVAPICHRunner(MultiNodeRunner):
    name = 'mvapich'

    def __init__(self, args: Namespace, world_info_base64: str, resource_pool: Mapping[str, int] | None = None) -> None:
        super().__init__(args, world_info_base64, resource_pool)
        # DeepSpeed's fixed tuning exports, in its order.
        self.add_export('MV2_SMP_USE_CMA', '0')
        self.add_export('MV2_DEBUG_SHOW_BACKTRACE', '1')
        if (getattr(self.args, 'accelerator', None) or _accelerator()) == 'cuda':
            self.add_export('MV2_USE_CUDA', '1')
        self.add_export('MV2_SUPPORT_DL', '1')
        self.add_export('MV2_ENABLE_AFFINITY', '0')
        self.add_export('MV2_INTER_ALLGATHER_TUNING', '5')
        self.add_export('MV2_CUDA_USE_NAIVE', '0')

    @staticmethod
    def _mpiname(path: str | None = None) -> str | None:
        mpiname = which('mpiname', path)
        if not mpiname:
            return None
        try:
            out = subprocess.run([mpiname], capture_output=True, timeout=10, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        return mpiname if b'MVAPICH' in out else None

    @classmethod
    def backend_binary(cls, path: str | None = None) -> str:
        mpiname = cls._mpiname(path)
        return (mpiname and which_in_dir('mpirun', os.path.dirname(mpiname))) or 'mpirun'

    @classmethod
    def backend_exists(cls, path: str | None = None) -> bool:
        return cls._mpiname(path) is not None

    @classmethod
    def backend_package(cls) -> str:
        return 'MVAPICH2 (not packaged by Debian or PyPI; `mpiname` must report MVAPICH)'

    def ssh_hosts(self, environment: Mapping[str, str], active_resources: ActiveResources) -> list[str]:
        return self.ssh_bootstrap_hosts(environment, active_resources, HYDRA_BOOTSTRAP, HYDRA_BOOTSTRAP_ENV)

    def validate_args(self) -> None:
        self.reject_filters()
        self.reject_unequal_pool('mvapich requires same number of devices per node')

    def get_cmd(self, environment: MutableMapping[str, str], active_resources: ActiveResources) -> list[str]:
        self.require_leading_slots(active_resources)
        total, per_host = self.equal_slots(active_resources, 'mvapich requires same number of devices per node')
        hostfile = self.write_temp_file('dslaunch_mvapich_hostfile_', ''.join(f'{h}\n' for h in active_resources))
        cmd = [
            self.backend_binary(environment.get('PATH')),
            '-np',
            str(total),
            '-ppn',
            str(per_host),
            '--hostfile',
            hostfile,
        ] + self.launcher_args()
        for key, value in [*self.exports.items(), *self.rank_exports()]:
            cmd += ['-env', f'{key}={value}']
        return cmd + self.helper_cmd()
