#!/usr/bin/env bash
# Install the Debian packages the multi-node tests need (make system-deps). Idempotent: when
# everything is installed it only asks dpkg and returns in well under a second. Daemons are
# never started by apt here (no systemd, policy-rc.d); tests/infra/*-up.sh start their own.
#
# Not root and something missing: a loud warning and exit 0, so `make test` still runs the rest
# (the multi-node tests then skip, naming what is missing); with CI=true that is an error.
set -euo pipefail
# shellcheck source=tests/infra/lib.sh
. "$(dirname "$0")/lib.sh"

PACKAGES=(
  openssh-server openssh-client  # a per-host sshd, the ssh client pdsh/mpirun use
  pdsh                           # --launcher pdsh (the default)
  openmpi-bin                    # --launcher openmpi (mpirun.openmpi, orted)
  mpich                          # --launcher mpich (mpirun.mpich = Hydra)
  slurm-wlm munge                # --launcher slurm (slurmctld, slurmd, srun; munged for auth)
  iproute2 util-linux procps     # ip netns, nsenter/unshare, ps
  numactl                        # --bind_cores_to_rank on the ranks' hosts
  python3-venv                   # the Intel MPI venv (tests/infra/impi-venv.sh)
)

missing=()
for p in "${PACKAGES[@]}"; do
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  note "all ${#PACKAGES[@]} packages already installed"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  msg="not root, cannot install: ${missing[*]} (run 'sudo make system-deps'); the multi-node tests will skip"
  [ "${CI:-}" = true ] && die "$msg"
  printf '\n!!! %s: WARNING: %s\n\n' "${0##*/}" "$msg" >&2
  exit 0
fi

note "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp /tmp/dslaunch-system-deps.XXXXXX.log)
# No Recommends: MPICH's would pull in gfortran, autotools and the dev headers (+115 MB).
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 "${missing[@]}"; } \
    >"$log" 2>&1; then
  tail -n 30 "$log" >&2
  die "apt-get failed (full log: $log)"
fi
rm -f "$log"
note "installed ${#missing[@]} package(s)"
