#!/usr/bin/env bash
# usage: slurm-down.sh   stop slurmd(s), slurmctld and munged by their pid files; idempotent
set -euo pipefail
# shellcheck source=tests/infra/lib.sh
. "$(dirname "$0")/lib.sh"
need_root
take_lock
slurm_teardown
note "Slurm down"
