#!/usr/bin/env bash
# Starts the dialogue video service. Installs what is missing first (launch/setup.sh), sets the
# offline environment, then launches:
#   demo         one process, CPU or one GPU, tiny random weights made on first use (no downloads)
#   single       one process on one GPU with the real weights in weights/
#   distributed  torchrun over NPROC GPUs (default 8): Ulysses over all ranks, FSDP for the DiT,
#                T5 on rank 0, restarts on a crash (the job store re-queues the interrupted job);
#                with --replicas R, R groups of NPROC / R GPUs render R jobs at once (Ulysses per group)
#   ray          the head of the service on a Ray cluster (python -m service.cluster): joins RAY_ADDRESS, or
#                starts a local Ray instance when it is unset; replica groups of Ray actors on any node
#                (--replicas R, 0 = as many as the cluster holds; --group_size G GPUs per group)
# Extra arguments go to distributed_app.py / service.cluster (e.g. --server_port 9000 --host 0.0.0.0).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE="${1:-demo}"
shift || true
bash launch/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
export PYTHONUNBUFFERED=1
PY="$ROOT/.venv/bin/python"
case "$MODE" in
    demo)
        exec "$PY" distributed_app.py --preset tiny "$@"
        ;;
    single)
        exec "$PY" distributed_app.py --preset multitalk-14b "$@"
        ;;
    distributed)
        NPROC="${NPROC:-8}"
        exec "$ROOT/.venv/bin/torchrun" --standalone --nproc-per-node="$NPROC" --max-restarts="${MAX_RESTARTS:-3}" \
            distributed_app.py --preset multitalk-14b --dit_fsdp full "$@"  # Ulysses: every rank of a group
        ;;
    ray)
        exec "$PY" -m service.cluster --preset "${PRESET:-multitalk-14b}" "$@"
        ;;
    *)
        echo "usage: bash launch/start_service.sh demo|single|distributed|ray [distributed_app.py flags]" >&2
        exit 2
        ;;
esac
