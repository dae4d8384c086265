#!/usr/bin/env bash
# One check of flaxvision on a CUDA machine in under 8 minutes; prints ONE JSON object on stdout, progress on stderr.
# What it measures: benchmarks/gpu_check.py. Run from anywhere in a copy of the repo (it needs no install):
#
#   bash benchmarks/gpu_check.sh                          # the GPU machine (JAX cuda, flax, optax, torch, timm)
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh         # tiny sizes, any machine: tests the script itself
#   GPU_CHECK_WHEELS=.whl bash benchmarks/gpu_check.sh    # first install the wheels in .whl (e.g. grain and its
#                                                         # needs, for the input pipeline part) into a temp dir
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh   # another interpreter (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [[ -n "${GPU_CHECK_WHEELS:-}" ]]; then
  if compgen -G "$GPU_CHECK_WHEELS/*.whl" >/dev/null; then
    site=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        "$GPU_CHECK_WHEELS"/*.whl >&2; then
      export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
      echo "gpu_check: installing the wheels of $GPU_CHECK_WHEELS failed; going on without them" >&2
    fi
  else
    echo "gpu_check: no wheels in GPU_CHECK_WHEELS=$GPU_CHECK_WHEELS; going on without them" >&2
  fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
