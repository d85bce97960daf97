#!/usr/bin/env bash
# Sets up the bench-only venv with the peers dslaunch is measured against:
# torch (torchrun), deepspeed==0.19.8 (its per-node launcher and runner), plus matplotlib and
# py-spy for the chart and the profiles. Idempotent: a stamp file skips the work next time.
# DeepSpeed is an sdist whose setup.py imports torch, so it is built without build isolation,
# after torch, with DS_BUILD_OPS=0 (no C++/CUDA ops: only the launcher is needed). If deepspeed
# cannot be installed the harness still runs the other launchers and says so.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${BENCH_VENV:-.bench-venv}
DS_VERSION=0.19.8
STAMP=$VENV/.peers-ok
if [ -f "$STAMP" ]; then
  echo "bench venv $VENV ready ($(cat "$STAMP"))"
  exit 0
fi
set -e
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
$PIP install -q torch psutil numpy matplotlib py-spy
set +e
# Build deps deepspeed's setup.py needs when build isolation is off.
$PIP install -q packaging ninja hjson py-cpuinfo pydantic tqdm msgpack einops
DS_BUILD_OPS=0 DS_BUILD_AIO=0 DS_BUILD_SPARSE_ATTN=0 \
  $PIP install -q --no-build-isolation "deepspeed==$DS_VERSION"
ds_rc=$?
set -e
rm -f "$VENV/.deepspeed-missing"
if [ $ds_rc -ne 0 ] || ! "$VENV/bin/python" -c 'import deepspeed.launcher.launch' >/dev/null 2>&1; then
  echo "WARNING: deepspeed==$DS_VERSION could not be installed into $VENV; the harness runs without it" >&2
  echo "deepspeed install failed (rc=$ds_rc)" > "$VENV/.deepspeed-missing"
fi
torch_v=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')
ds_v=$("$VENV/bin/python" -c 'import deepspeed; print(deepspeed.__version__)' 2>/dev/null | tail -n 1 || echo none)
echo "torch=$torch_v deepspeed=$ds_v" > "$STAMP"
echo "bench venv $VENV ready ($(cat "$STAMP"))"
