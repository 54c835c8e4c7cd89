#!/usr/bin/env bash
# Downloads the real weights (about 90 GB) into weights/ with the Hugging Face CLI, links MultiTalk
# into the Wan folder as upstream documents, and verifies the expected files. Resumable: run it again
# after an interruption and it continues where it stopped. Needs network access to huggingface.co;
# the service itself never downloads anything (HF_HUB_OFFLINE=1).
#
#   bash weights/download.sh            # everything
#   bash weights/download.sh --verify   # only check what is there
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
cd "$HERE"

HF="${HF:-}"
if [[ -z "$HF" ]]; then
    for c in "$ROOT/.venv/bin/hf" "$(command -v hf || true)" "$(command -v huggingface-cli || true)"; do
        [[ -n "$c" && -x "$c" ]] && HF="$c" && break
    done
fi

WAN=Wan2.1-I2V-14B-480P
WAN_FILES=(
    config.json
    diffusion_pytorch_model-00001-of-00007.safetensors diffusion_pytorch_model-00002-of-00007.safetensors
    diffusion_pytorch_model-00003-of-00007.safetensors diffusion_pytorch_model-00004-of-00007.safetensors
    diffusion_pytorch_model-00005-of-00007.safetensors diffusion_pytorch_model-00006-of-00007.safetensors
    diffusion_pytorch_model-00007-of-00007.safetensors
    models_t5_umt5-xxl-enc-bf16.pth models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth Wan2.1_VAE.pth
    google/umt5-xxl/tokenizer_config.json
    multitalk.safetensors diffusion_pytorch_model.safetensors.index.json
)
W2V_FILES=(config.json preprocessor_config.json model.safetensors)
MT_FILES=(multitalk.safetensors diffusion_pytorch_model.safetensors.index.json)
KOKORO_FILES=(config.json kokoro-v1_0.pth voices/af_heart.pt voices/am_adam.pt voices/zf_xiaobei.pt voices/zm_yunjian.pt)

verify() {
    local missing=0 dir f
    check() { dir=$1; shift; for f in "$@"; do [[ -e "$dir/$f" ]] || { echo "missing: weights/$dir/$f"; missing=1; }; done; }
    check "$WAN" "${WAN_FILES[@]}"
    check chinese-wav2vec2-base "${W2V_FILES[@]}"
    check MeiGen-MultiTalk "${MT_FILES[@]}"
    check Kokoro-82M "${KOKORO_FILES[@]}"
    if [[ -f "$WAN/diffusion_pytorch_model.safetensors.index.json" ]] &&
        ! grep -q multitalk.safetensors "$WAN/diffusion_pytorch_model.safetensors.index.json"; then
        echo "wrong: weights/$WAN/diffusion_pytorch_model.safetensors.index.json is Wan's own index; it must be MeiGen-MultiTalk's"
        missing=1
    fi
    if [[ $missing == 0 ]]; then echo "weights: all expected files present"; fi
    return $missing
}

if [[ "${1:-}" == "--verify" ]]; then verify; exit $?; fi
if [[ -z "$HF" ]]; then
    echo "error: the Hugging Face CLI (hf or huggingface-cli) was not found; run 'bash launch/setup.sh' first" >&2
    exit 2
fi
export HF_HUB_OFFLINE=0 HF_HUB_ENABLE_HF_TRANSFER="${HF_HUB_ENABLE_HF_TRANSFER:-0}"

"$HF" download Wan-AI/Wan2.1-I2V-14B-480P --local-dir "$WAN"
"$HF" download TencentGameMate/chinese-wav2vec2-base --local-dir chinese-wav2vec2-base
"$HF" download TencentGameMate/chinese-wav2vec2-base model.safetensors --revision refs/pr/1 --local-dir chinese-wav2vec2-base
"$HF" download MeiGen-AI/MeiGen-MultiTalk --local-dir MeiGen-MultiTalk
"$HF" download hexgrad/Kokoro-82M --local-dir Kokoro-82M

# Link MultiTalk into the Wan folder (upstream README, "Link or Copy").
if [[ -f "$WAN/diffusion_pytorch_model.safetensors.index.json" && ! -L "$WAN/diffusion_pytorch_model.safetensors.index.json" ]]; then
    mv "$WAN/diffusion_pytorch_model.safetensors.index.json" "$WAN/diffusion_pytorch_model.safetensors.index.json_old"
fi
ln -sfn "$HERE/MeiGen-MultiTalk/diffusion_pytorch_model.safetensors.index.json" "$WAN/diffusion_pytorch_model.safetensors.index.json"
ln -sfn "$HERE/MeiGen-MultiTalk/multitalk.safetensors" "$WAN/multitalk.safetensors"
verify
