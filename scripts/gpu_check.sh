#!/usr/bin/env bash
# The nixl transport's device check (issue 21), prepared to run on a machine with an NVIDIA GPU:
# two processes move KV blocks held in VRAM (CUDA tensors registered as Placement.DEVICE) with
# dxl over NIXL -- pull, push, the handoff in fetch and push mode, and a request moved by the
# vLLM connector's worker side from KV caches in vLLM 0.33's FlashAttention layout -- verify
# every byte, and print the pull's GB/s beside a bulk device-to-device copy of the same bytes
# measured in the same run (scripts/gpu_check.py; its --device cpu runs the same flow on host
# memory, which is how it was tested: the session that wrote it had no GPU, so on a GPU it has
# NOT been run yet).
#
# The device has Python 3.12 and torch with CUDA, and no package registry, so the wheels come
# with the checkout, in $WHEELS (default ./wheels). Fetch them on a machine that has a registry:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       --no-deps -d wheels nixl==1.5.1 nixl-cu12==1.5.1 nixl-cu13==1.5.1 \
#       numpy cffi pycparser 'setuptools>=77' wheel
# (nixl's own dependency, torch, is the device's: the venv sees it through
# --system-site-packages). dxl's cffi shim is compiled here: a C compiler is needed.
# Usage: scripts/gpu_check.sh [gpu_check.py options, e.g. --tensors 64 --blocks 64]
# Bounded: every step is timed, the check itself by `timeout` (the whole run well under 5 min).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-wheels}
PY=${PY:-python3.12}
VENV=${VENV:-.venv-gpu}
start=$(date +%s)

"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader || true
test -d "$WHEELS" || { echo "gpu_check: no wheels in $WHEELS (see the header)" >&2; exit 2; }

test -x "$VENV/bin/python" || "$PY" -m venv --system-site-packages "$VENV"
PIP=("$VENV/bin/pip" install -q --no-index --find-links "$WHEELS")
timeout 120 "${PIP[@]}" --no-deps nixl nixl-cu12 nixl-cu13
timeout 120 "${PIP[@]}" numpy cffi pycparser 'setuptools>=77' wheel
DXL_WERROR=1 timeout 120 "${PIP[@]}" --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import dxl, json; from dxl.transport.nixl import nixl_info; \
print(json.dumps(nixl_info()))"
echo "gpu_check: environment ready in $(( $(date +%s) - start )) s"

rc=0
timeout 240 "$VENV/bin/python" scripts/gpu_check.py --device cuda "$@" || rc=$?
echo "gpu_check: done in $(( $(date +%s) - start )) s, exit $rc"
exit $rc
