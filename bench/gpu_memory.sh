#!/usr/bin/env bash
# GPU memory per stage beside the memory plan, on random weights in the 14B shapes (bench/gpu_memory.py).
#
#   bash bench/gpu_memory.sh            # every GPU of this host: the layouts that fit its GPUs
#   NPROC=8 bash bench/gpu_memory.sh    # as many ranks
#
# Runs, where the GPUs allow (each run prints planned / measured / ratio per stage and rank):
#   1 GPU  480p  --num_persistent_param_in_dit 0 --offload_model true   (the lowest-memory layout)
#   1 GPU  480p  the layout the plan suggests for this GPU (python -m inference.memory)
#   N GPUs 720p  --t5_fsdp --dit_fsdp                                    (the original service's launch)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA GPU visible to torch: nothing to measure (bench/memory.py checks the plan on the CPU)" >&2
  exit 1
fi
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
NPROC=${NPROC:-$GPUS}
GIB=$("$PY" -c "import torch; print(int(torch.cuda.get_device_properties(0).total_memory / 2**30))")
echo "== $GPUS GPU(s) of ${GIB} GiB; $NPROC rank(s) for the multi-GPU run"

echo "== 1 GPU, multitalk-480, every block streamed, encoders offloaded"
"$PY" bench/gpu_memory.py --size multitalk-480 --num_persistent_param_in_dit 0 --offload_model true

echo "== 1 GPU, multitalk-480, the layout the plan suggests for a ${GIB} GiB GPU"
SUGGESTED=$("$PY" - "$GIB" <<'PY'
import sys
from inference.memory import Layout, ModelSizes, Workload, plan
result = plan(ModelSizes.preset("multitalk-14b"), Layout(gpus=1, gpu_gib=float(sys.argv[1])),
              Workload.for_size("multitalk-480"))
lay = result.layout if result.fits else result.suggestion
if lay is None:
    print("NONE")
else:
    flags = []
    if lay.num_persistent_param_in_dit is not None:
        flags += ["--num_persistent_param_in_dit", str(lay.num_persistent_param_in_dit)]
    if lay.t5_cpu:
        flags.append("--t5_cpu")
    flags += ["--offload_model", str(lay.offload).lower()]
    print(" ".join(flags))
PY
)
if [ "$SUGGESTED" = "NONE" ]; then
  echo "the plan finds no layout for one ${GIB} GiB GPU at 480p"
else
  # shellcheck disable=SC2086
  "$PY" bench/gpu_memory.py --size multitalk-480 $SUGGESTED
fi

if [ "$NPROC" -gt 1 ]; then
  echo "== $NPROC GPUs, multitalk-720, --t5_fsdp --dit_fsdp"
  "$TORCHRUN" --standalone --nproc_per_node="$NPROC" bench/gpu_memory.py --size multitalk-720 --t5_fsdp --dit_fsdp
fi
