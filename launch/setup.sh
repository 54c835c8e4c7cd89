#!/usr/bin/env bash
# Idempotent environment setup: creates .venv at the repo root when missing, installs torch==2.13.0
# first in the build this host needs (launch/torch_wheel.sh: the CUDA build when nvidia-smi lists a GPU,
# and a CPU-only torch is refused there), then the pinned requirements constrained to that torch.
# A second run with nothing to do returns in seconds (a stamp holds the requirement hash and the build).
#   bash launch/setup.sh --dry-run   says which torch it would install and why, and changes nothing
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV="$ROOT/.venv"
STAMP="$VENV/.setup-stamp"

read -r TORCH_KIND TORCH_REQ <<<"$(bash launch/torch_wheel.sh choose)"
want="$(cat requirements.txt constraints.txt launch/setup.sh launch/torch_wheel.sh | sha256sum | cut -d' ' -f1)-$TORCH_KIND"
if [[ $DRY_RUN == 0 && -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    exit 0
fi

torch_args=(install -q "$TORCH_REQ")
[[ -n "${TORCH_INDEX_URL:-}" ]] && torch_args+=(--index-url "$TORCH_INDEX_URL")
if why="$(bash launch/torch_wheel.sh check "$VENV/bin/python")"; then
    plan="keep the installed torch ($TORCH_KIND build)"
else
    plan="pip ${torch_args[*]} ($TORCH_KIND build): $why"
fi
if [[ $DRY_RUN == 1 ]]; then
    echo "setup: torch: $plan"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "setup: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
if ! bash launch/torch_wheel.sh check "$VENV/bin/python" >/dev/null; then
    echo "setup: torch: $plan" >&2
    "${PIP[@]}" "${torch_args[@]}"
    if ! why="$(bash launch/torch_wheel.sh check "$VENV/bin/python")"; then
        echo "setup: error: $why after installing $TORCH_REQ; pip's configuration (find-links, constraints)" \
             "supplies another build. Set TORCH_INDEX_URL to an index that serves CUDA builds of torch" >&2
        exit 1
    fi
fi
echo "setup: installing pinned requirements (constraints: constraints.txt)" >&2
"${PIP[@]}" install -q -c constraints.txt -r requirements.txt
echo "$want" > "$STAMP"
echo "setup: done" >&2
