#!/usr/bin/env bash
# GPU figures in one call (about 5-8 minutes on one H100/H200; no network needed, nothing is
# downloaded: every model is built with random weights). Uses the project's .venv when present.
#   bash bench/gpu.sh            -> tables on stdout, bench/results/gpu.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" bench/gpu_bench.py --device cuda "$@"
