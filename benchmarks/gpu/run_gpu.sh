#!/usr/bin/env bash
# The GPU run (benchmarks/gpu/README.md): wheels from .whl/ where given, then run_gpu.py; results in
# benchmarks/results/gpu/. Extra arguments go to run_gpu.py (e.g. --tokens 2048).
set -euo pipefail
cd "$(dirname "$0")/../.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TRL_EXPERIMENTAL_SILENCE=1
exec python3 benchmarks/gpu/run_gpu.py "$@"
