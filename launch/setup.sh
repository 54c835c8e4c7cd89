#!/usr/bin/env bash
# Idempotent environment setup: creates .venv at the repo root when missing, installs
# torch==2.13.0 first, then the pinned requirements constrained to that torch.
# A second run with nothing to do returns in seconds (a stamp holds the requirement hash).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV="$ROOT/.venv"
STAMP="$VENV/.setup-stamp"

want="$(cat requirements.txt constraints.txt launch/setup.sh | sha256sum | cut -d' ' -f1)"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "setup: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
    echo "setup: installing torch==2.13.0" >&2
    "${PIP[@]}" install -q torch==2.13.0
fi
echo "setup: installing pinned requirements (constraints: constraints.txt)" >&2
"${PIP[@]}" install -q -c constraints.txt -r requirements.txt
echo "$want" > "$STAMP"
echo "setup: done" >&2
