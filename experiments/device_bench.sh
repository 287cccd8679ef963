#!/usr/bin/env bash
# One GPU benchmark table in at most 8 minutes (experiments/device_bench.py): train step time and MFU of
# PreNorm, Block, Block two-phase and Full; the Pallas kernel against XLA; decode latency. Usage, anywhere:
#   bash experiments/device_bench.sh [--budget_s=450] [--dry_run]     # PYTHON=... picks the interpreter
# Installs this package only where it is missing: with its CUDA extra where jax sees no GPU, else without,
# keeping the machine's jax (pip's own PIP_FIND_LINKS / PIP_NO_INDEX serve machines without network).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
if [[ " $* " != *" --dry_run "* ]] && ! "$python" -c "import jax; jax.devices('gpu')" >/dev/null 2>&1; then
  "$python" -m pip install -q -e ".[cuda]"
elif ! "$python" -c "import attnres_jax, configs.base" >/dev/null 2>&1; then
  "$python" -m pip install -q -e .
fi
exec "$python" -m experiments.device_bench "$@"
