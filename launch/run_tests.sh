#!/usr/bin/env bash
# Sets up the environment when needed, then runs ruff and the whole pytest suite offline.
# Extra arguments go to pytest (e.g. `bash launch/run_tests.sh tests/test_dialogue.py -x`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash launch/setup.sh
# The real-browser UI test needs Chromium and playwright-core; without them it skips with the reason.
bash launch/install_browser.sh >/dev/null 2>&1 || echo "run_tests: browser tools not installed; the browser test will skip" >&2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" PYTHONDONTWRITEBYTECODE=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
