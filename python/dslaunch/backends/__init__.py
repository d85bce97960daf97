"""The six multi-node backends, by the names ``--launcher`` accepts.

How the runner drives one::

    runner = make_runner(args.launcher, args, world_info_b64, resource_pool)
    runner.validate_active_resources(active)        # also callable on the class
    for key, value in exports: runner.add_export(key, value)
    cmd = runner.get_cmd(env, active)               # may change env: Popen(cmd, env=env)
    ...
    runner.cleanup()                                # per-job temp hostfiles (also at exit)
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Mapping

from ..errors import LauncherError, one_line
from .base import HELPER_MODULE, JOB_ID_ENV, LAUNCH_MODULE, ActiveResources, MultiNodeRunner
from .impi import IMPIRunner
from .mpich import MPICHRunner
from .mvapich import MVAPICHRunner
from .openmpi import OpenMPIRunner
from .pdsh import PDSHRunner
from .quoting import deepspeed_quote
from .slurm import SlurmRunner

#: ``--launcher`` name -> backend class, in DeepSpeed's order.
LAUNCHERS: dict[str, type[MultiNodeRunner]] = {
    'pdsh': PDSHRunner,
    'openmpi': OpenMPIRunner,
    'mvapich': MVAPICHRunner,
    'slurm': SlurmRunner,
    'mpich': MPICHRunner,
    'impi': IMPIRunner,
}


def launcher_class(name: str) -> type[MultiNodeRunner]:
    """The backend class for ``name`` (any case); LauncherError for an unknown one."""
    try:
        return LAUNCHERS[name.lower()]
    except KeyError:
        raise LauncherError(f'Unknown launcher {one_line(name)}') from None


def validate_active_resources(name: str, active: ActiveResources) -> None:
    """``launcher_class(name).validate_active_resources(active)``: the check the runner makes before it
    knows whether the job runs locally (DeepSpeed's step 12)."""
    launcher_class(name).validate_active_resources(active)


def make_runner(name: str, args: Namespace, world_info_b64: str, resource_pool: Mapping[str, int]) -> MultiNodeRunner:
    """Build the backend for ``name``; its ``validate_args`` runs here (ResourceFilterError on refusal)."""
    return launcher_class(name)(args, world_info_b64, resource_pool)


__all__ = [
    'HELPER_MODULE',
    'JOB_ID_ENV',
    'LAUNCHERS',
    'LAUNCH_MODULE',
    'IMPIRunner',
    'MPICHRunner',
    'MVAPICHRunner',
    'MultiNodeRunner',
    'OpenMPIRunner',
    'PDSHRunner',
    'SlurmRunner',
    'deepspeed_quote',
    'launcher_class',
    'make_runner',
    'validate_active_resources',
]
