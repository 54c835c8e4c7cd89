"""A random-weight Kokoro folder in the real layout, for tests and the CPU demo (never committed).

``write_tiny_kokoro(out_dir)`` writes::

    out_dir/config.json          same keys as hexgrad/Kokoro-82M's config, shrunk (see below)
    out_dir/kokoro-v1_0.pth      {"bert", "bert_encoder", "predictor", "text_encoder", "decoder"} -> state dict
    out_dir/voices/<id>.pt       float32 style packs [510, 1, 256]
    out_dir/TINY_KOKORO.json     marker: seed, voices, format version (the folder is not real Kokoro)

so ``tts.engine.KokoroEngine`` loads it through exactly the code path it uses for the real weights.

What is shrunk, and why it cannot go further (kokoro 0.9.4):
- PL-BERT (ALBERT): 1 layer, hidden 32, 2 heads, embedding 16 (real: 12 layers, hidden 768).
- ``n_layer = 1`` (text encoder CNN depth and duration encoder LSTMs).
- iSTFTNet generator: one resblock kernel per stage and ``upsample_rates [2, 2]`` with an iSTFT of
  n_fft 150 / hop 75 (real: [10, 6] with n_fft 20 / hop 5). The product 2 * 2 * 75 = 300 equals the
  real 10 * 6 * 5, so the output is still 24 kHz with 600 samples per duration frame, but the
  resblocks run at 320 Hz instead of 4.8 kHz: about 40x less generator compute.
- Fixed by the code, not the config: ``hidden_dim 512`` (decoder ``asr_res`` expects 512 channels),
  ``style_dim 128`` (the model slices ``ref_s[:, :128]`` / ``[:, 128:]``), ``upsample_initial_channel
  512`` and the decoder's hard-coded 1024-channel blocks; about 56 M parameters remain (225 MB .pth).
- Short durations: ``max_dur = 4`` (real 50). Kokoro predicts a token's length as the sum of
  ``max_dur`` sigmoids, so random weights give about ``max_dur / 2`` frames per token: 2 frames
  (50 ms) per phoneme here instead of about 25 (0.6 s) with the real config, which keeps test
  synthesis to a fraction of a second per turn.
- ``max_position_embeddings`` stays 512 so the real 510-phoneme chunking applies unchanged.
- The vocab is synthetic (the real one is not available offline): ASCII letters, punctuation, the IPA
  symbols misaki and espeak-ng emit for English and the other espeak languages, and the Mandarin tone
  arrows. Characters outside it are dropped by ``KModel.forward``, as with the real vocab.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zlib
from pathlib import Path

import torch

from common.files import atomic_write, atomic_write_text
from tts.engine import REPO_ID
from tts.voices import get_voice

logger = logging.getLogger(__name__)

TINY_FORMAT_VERSION = 1
MARKER_NAME = "TINY_KOKORO.json"
DEFAULT_TINY_VOICES: tuple[str, ...] = ("af_heart", "am_adam", "zf_xiaobei", "zm_yunjian")
# Same id space as the real model, so token ids stay below n_token.
N_TOKEN = 178
VOICE_PACK_SHAPE = (510, 1, 256)

_PUNCTUATION = ';:,.!?¡¿—…"«»“”() '
_ASCII = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# misaki en (US/GB vocab), espeak-ng for es/fr/hi/it/pt-br, misaki zh (v1.0 IPA frontend).
_IPA = "æçðøħŋœɐɑɒɔɕɖəɚɛɜɝɟɡɢɣɤɥɦɨɪɫɬɭɯɰɱɲɳɴɵɸɹɻɽɾʁʂʃʈʉʊʋʌʍʎʐʑʒʔʝʣʤʥʦʧʨʰʱʲʷʼˈˌː˞βθχᵊᵻ"
_TONES = "↓↑→↗↘"


def tiny_vocab() -> dict[str, int]:
    """Synthetic phoneme vocab ``{char: id}`` with ids 1..len (0 is the pad/boundary token)."""
    chars: list[str] = []
    for c in _PUNCTUATION + _ASCII + _IPA + _TONES:
        if c not in chars:
            chars.append(c)
    if len(chars) >= N_TOKEN:
        raise RuntimeError(f"synthetic vocab has {len(chars)} symbols; n_token is {N_TOKEN}")
    return {c: i + 1 for i, c in enumerate(chars)}


def tiny_config() -> dict:
    """The shrunk Kokoro ``config.json`` (same keys as the real one; see the module docstring)."""
    return {
        "istftnet": {
            "upsample_kernel_sizes": [4, 4],
            "upsample_rates": [2, 2],
            "gen_istft_hop_size": 75,
            "gen_istft_n_fft": 150,
            "resblock_dilation_sizes": [[1, 3, 5]],
            "resblock_kernel_sizes": [3],
            "upsample_initial_channel": 512,
        },
        "dim_in": 64,
        "dropout": 0.0,
        "hidden_dim": 512,
        "max_conv_dim": 512,
        "max_dur": 4,
        "multispeaker": True,
        "n_layer": 1,
        "n_mels": 80,
        "n_token": N_TOKEN,
        "style_dim": 128,
        "text_encoder_kernel_size": 5,
        "plbert": {
            "hidden_size": 32,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 512,
            "num_hidden_layers": 1,
            "dropout": 0.0,
            "embedding_size": 16,
        },
        "vocab": tiny_vocab(),
    }


def _voice_pack(voice_id: str, seed: int) -> torch.Tensor:
    """Deterministic random style pack ``[510, 1, 256]`` float32, distinct per voice id."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(voice_id.encode()))
    # A smooth walk over the 510 length slots (real packs vary slowly with phoneme count) around a
    # per-voice base style, so neighbouring lengths sound alike and voices differ from each other.
    base = torch.randn(1, 1, 256, generator=gen) * 0.25
    drift = torch.cumsum(torch.randn(510, 1, 256, generator=gen) * 0.005, dim=0)
    return (base + drift).to(torch.float32).contiguous()


def _atomic_save(obj: object, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def _marker(seed: int, voices: tuple[str, ...]) -> dict:
    return {"format": TINY_FORMAT_VERSION, "seed": seed, "voices": list(voices), "random_weights": True}


def write_tiny_kokoro(
    out_dir: Path | str, seed: int = 0, voices: tuple[str, ...] | list[str] = DEFAULT_TINY_VOICES
) -> Path:
    """Write a seeded random-weight Kokoro folder to ``out_dir`` and return its path.

    Deterministic: the same seed gives bit-identical files. A folder that already holds this exact
    tiny model (same marker, all files present) is left as it is.
    """
    out = Path(out_dir)
    voices = tuple(voices)
    if not voices:
        raise ValueError("voices: at least one voice id is required")
    for vid in voices:
        get_voice(vid)
    files = [out / "config.json", out / "kokoro-v1_0.pth", *(out / "voices" / f"{v}.pt" for v in voices)]
    marker_path = out / MARKER_NAME
    if marker_path.is_file() and all(f.is_file() for f in files):
        try:
            if json.loads(marker_path.read_text()) == _marker(seed, voices):
                logger.info("tiny Kokoro already present in %s", out)
                return out
        except (OSError, json.JSONDecodeError):
            pass

    from kokoro import KModel  # ~4 s of transformers import: only when something must be built

    (out / "voices").mkdir(parents=True, exist_ok=True)
    config = tiny_config()
    # KModel only builds from a checkpoint path; an empty dict checkpoint loads nothing, which leaves
    # the freshly initialised (seeded) modules as they are.
    fd, empty = tempfile.mkstemp(prefix=".empty.", suffix=".pth", dir=out)
    os.close(fd)
    try:
        torch.save({}, empty)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = KModel(repo_id=REPO_ID, config=config, model=empty)
    finally:
        os.unlink(empty)
    state = {
        name: getattr(model, name).state_dict()
        for name in ("bert", "bert_encoder", "predictor", "text_encoder", "decoder")
    }
    _atomic_save(state, out / "kokoro-v1_0.pth")
    for vid in voices:
        _atomic_save(_voice_pack(vid, seed), out / "voices" / f"{vid}.pt")
    atomic_write_text(out / "config.json", json.dumps(config, ensure_ascii=False, indent=1))
    # The marker goes last: its presence says every other file is complete.
    atomic_write_text(marker_path, json.dumps(_marker(seed, voices), indent=1))
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("wrote tiny Kokoro (%.1f M random parameters, seed %d) to %s", n_params / 1e6, seed, out)
    return out
