#!/usr/bin/env bash
# Which torch build this host needs, and whether an installed one fits it (launch/setup.sh uses both).
#   bash launch/torch_wheel.sh choose         prints "<cuda|cpu> <pip requirement>": cuda when nvidia-smi
#                                             lists a GPU, else cpu
#   bash launch/torch_wheel.sh check PYTHON   exit 0 when PYTHON's torch is the pinned version in the build
#                                             this host needs; else prints why and exits 1
# On a GPU host the requirement is "torch===2.13.0": arbitrary equality (===) refuses local builds such
# as 2.13.0+cpu, so pip takes the registry's CUDA build. With TORCH_INDEX_URL set (a wheel index of
# +cuXXX builds), setup.sh installs "torch==2.13.0" from there instead.
set -euo pipefail
TORCH_VERSION=2.13.0

gpu_count() {
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo 0
        return
    fi
    local listing
    listing="$(nvidia-smi -L 2>/dev/null || true)"
    grep -c '^GPU ' <<<"$listing" || true
}

case "${1:-}" in
    choose)
        if (( $(gpu_count) > 0 )); then
            if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
                echo "cuda torch==$TORCH_VERSION"
            else
                echo "cuda torch===$TORCH_VERSION"
            fi
        else
            echo "cpu torch==$TORCH_VERSION"
        fi
        ;;
    check)
        python="${2:?usage: torch_wheel.sh check PYTHON}"
        if ! info="$("$python" -c 'import torch; print(torch.__version__, torch.version.cuda or "none")' 2>/dev/null)"; then
            echo "torch is not installed in $python"
            exit 1
        fi
        read -r version cuda <<<"$info"
        if [[ "$version" != "$TORCH_VERSION" && "$version" != "$TORCH_VERSION+"* ]]; then
            echo "torch $version is installed, $TORCH_VERSION is pinned"
            exit 1
        fi
        gpus="$(gpu_count)"
        if (( gpus > 0 )) && [[ "$cuda" == none ]]; then
            echo "torch $version is a CPU-only build, but nvidia-smi lists $gpus GPU(s)"
            exit 1
        fi
        ;;
    *)
        echo "usage: bash launch/torch_wheel.sh choose | check PYTHON" >&2
        exit 2
        ;;
esac
