#!/usr/bin/env bash
# First command on a new GPU host: the tiny DiT at P=N against P=1 (with and without FSDP2, with a
# sequence length that needs padding) on whatever device is present (CUDA/NCCL or CPU/gloo).
#   bash launch/selftest.sh N               fp32; prints "selftest ok max_abs_diff=<x> ranks=<N> device=<d> ..."
#   bash launch/selftest.sh N --dtype bf16  the model in bf16 (flash-attn on a GPU host where installed); the
#                                           line states the tolerance (2 x bf16 eps x max|reference|), the
#                                           bf16-vs-fp32 gap and the speaker-routing position check
#   bash launch/selftest.sh 4 --ring_size 2 Ulysses 2 x ring 2 (--ulysses_size U, --cfg_parallel also pass
#                                           through); with a ring, the line also shows the negative control
#                                           (the merge without its log-sum-exp rescale), which must fail
# A failure prints "selftest FAILED ..." and exits 1.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
N="${1:-2}"
shift || true
DTYPE=fp32
LAYOUT=()
while (( $# )); do
    case "$1" in
        --dtype)
            DTYPE="${2:-}"
            shift 2 || { echo "selftest.sh: --dtype needs fp32 or bf16" >&2; exit 2; }
            ;;
        --ring_size|--ulysses_size)
            [[ "${2:-}" =~ ^[0-9]+$ ]] || { echo "selftest.sh: $1 needs a number" >&2; exit 2; }
            LAYOUT+=("$1" "$2")
            shift 2
            ;;
        --cfg_parallel)
            LAYOUT+=("$1")
            shift
            ;;
        *)
            echo "usage: bash launch/selftest.sh N [--dtype fp32|bf16] [--ring_size R] [--ulysses_size U] [--cfg_parallel]" >&2
            exit 2
            ;;
    esac
done
if [[ "$DTYPE" != fp32 && "$DTYPE" != bf16 ]]; then
    echo "selftest.sh: --dtype must be fp32 or bf16, got '$DTYPE'" >&2
    exit 2
fi
bash launch/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False OMP_NUM_THREADS=1
exec timeout 600 "$ROOT/.venv/bin/torchrun" --standalone --nproc-per-node="$N" distributed_app.py --selftest \
    --selftest_dtype "$DTYPE" ${LAYOUT[@]+"${LAYOUT[@]}"}
