#!/usr/bin/env bash
# First command on a new GPU host: the tiny DiT at P=N against P=1 (with and without FSDP2, with a
# sequence length that needs padding) on whatever device is present (CUDA/NCCL or CPU/gloo).
# Prints one line: "selftest ok max_abs_diff=<x> ranks=<N> device=<d>" or "selftest FAILED ...".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
N="${1:-2}"
bash launch/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False OMP_NUM_THREADS=1
exec timeout 600 "$ROOT/.venv/bin/torchrun" --standalone --nproc-per-node="$N" distributed_app.py --selftest
