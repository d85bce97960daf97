#!/usr/bin/env bash
# usage: impi-venv.sh [DIR]   (default: .impi-venv at the repository root)
# Intel MPI's runtime from PyPI (impi-rt) in a venv of its own, so its libmpi never shadows
# another MPI's. Pinned: 2021.19.0 needs libfabric>=2.6, which PyPI does not have, and pip
# would download both wheels (2 x 129 MB) before falling back. Idempotent.
set -euo pipefail
# shellcheck source=tests/infra/lib.sh
. "$(dirname "$0")/lib.sh"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=${1:-$ROOT/.impi-venv}
VERSION=2021.18.1

mkdir -p "$(dirname "$DIR")"
exec 8>"$DIR.lock"  # two sessions may want it at once
flock -w 600 8 || die "$DIR.lock held for 600 s"
if [ -x "$DIR/bin/mpiexec.hydra" ] && [ -x "$DIR/bin/impi_info" ]; then
  note "Intel MPI already in $DIR"
  exit 0
fi
need_cmd python3 python3
python3 -m venv "$DIR" || { rm -rf "$DIR"; die "python3 -m venv failed: install the Debian package 'python3-venv'"; }
"$DIR/bin/pip" install -q --disable-pip-version-check "impi-rt==$VERSION" \
  || { rm -rf "$DIR"; die "pip install impi-rt==$VERSION failed"; }
[ -x "$DIR/bin/mpiexec.hydra" ] || { rm -rf "$DIR"; die "impi-rt installed no mpiexec.hydra in $DIR/bin"; }
note "Intel MPI $VERSION in $DIR"
