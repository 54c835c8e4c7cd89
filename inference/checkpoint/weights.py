"""Weight folders: discovery, validation with exact messages, and the tiny random preset.

Real weights use the official upstream layout under one root (default ``weights/``)::

    Wan2.1-I2V-14B-480P/      DiT shards + MultiTalk index + multitalk.safetensors, T5, CLIP, VAE, tokenizer
    chinese-wav2vec2-base/    config.json, preprocessor_config.json, model.safetensors
    Kokoro-82M/               config.json, kokoro-v1_0.pth, voices/*.pt

``make-tiny`` writes every component in that same layout under another root (``weights/tiny`` for
the demo), tiny and seeded-random, so the whole pipeline runs on a CPU with no downloads. Tiny sizes:
DiT dim 64 / 4 heads / 2 layers (``tiny_dit_config``), umT5 32 wide, CLIP 64 wide, VAE base width 4,
wav2vec2 2 layers x 32, Kokoro at its minimum of about 69 M parameters.

CLI::

    python -m inference.weights make-tiny --out DIR [--seed 0]
    python -m inference.weights check --preset multitalk-14b|tiny --root DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from common.errors import InputError
from inference.model.config import DiTConfig

logger = logging.getLogger(__name__)

WAN_DIR = "Wan2.1-I2V-14B-480P"
WAV2VEC_DIR = "chinese-wav2vec2-base"
KOKORO_DIR = "Kokoro-82M"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
VAE_FILE = "Wan2.1_VAE.pth"
TOKENIZER_DIR = "google/umt5-xxl"
PRESETS = ("multitalk-14b", "tiny")
TINY_MARKER = "tiny-weights.json"
TINY_FORMAT = 1


class WeightsError(InputError):
    """Weights missing or malformed; the message lists exactly what is missing and how to get it."""


@dataclass(frozen=True)
class WeightPaths:
    """Where each component lives. ``wan_dir`` holds the DiT, T5, CLIP, VAE and tokenizer."""

    root: Path
    wan_dir: Path
    wav2vec_dir: Path
    kokoro_dir: Path

    @classmethod
    def under(cls, root: str | Path) -> WeightPaths:
        root = Path(root)
        return cls(root, root / WAN_DIR, root / WAV2VEC_DIR, root / KOKORO_DIR)

    def expected_files(self) -> list[Path]:
        """Files that must exist (shards are checked through the index separately)."""
        return [
            self.wan_dir / INDEX_NAME,
            self.wan_dir / T5_FILE,
            self.wan_dir / CLIP_FILE,
            self.wan_dir / VAE_FILE,
            self.wan_dir / TOKENIZER_DIR,
            self.wav2vec_dir / "config.json",
            self.wav2vec_dir / "preprocessor_config.json",
            self.kokoro_dir / "config.json",
            self.kokoro_dir / "kokoro-v1_0.pth",
            self.kokoro_dir / "voices",
        ]

    def missing(self) -> list[str]:
        """Human-readable list of what is missing or inconsistent (empty when complete)."""
        problems = [f"missing: {p}" for p in self.expected_files() if not p.exists()]
        index = self.wan_dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                problems.append(f"unreadable: {index} ({exc})")
            else:
                files = sorted(set(weight_map.values()))
                problems += [
                    f"missing: {self.wan_dir / f} (named in {INDEX_NAME})"
                    for f in files
                    if not (self.wan_dir / f).is_file()
                ]
                if not any(k.startswith("audio_proj.") for k in weight_map):
                    problems.append(
                        f"wrong: {index} is Wan's own index without the MultiTalk keys; link MeiGen-MultiTalk's "
                        "index and multitalk.safetensors into the Wan folder (bash weights/download.sh does it)"
                    )
        voices = self.kokoro_dir / "voices"
        if voices.is_dir() and not any(voices.glob("*.pt")):
            problems.append(f"missing: {voices}/*.pt (no Kokoro voices)")
        wav2vec_weights = [self.wav2vec_dir / n for n in ("model.safetensors", "pytorch_model.bin")]
        if self.wav2vec_dir.is_dir() and not any(p.is_file() for p in wav2vec_weights):
            problems.append(f"missing: {self.wav2vec_dir}/model.safetensors")
        return problems

    def check(self, preset: str) -> WeightPaths:
        """Raise ``WeightsError`` naming every missing file and the command that fixes it."""
        problems = self.missing()
        if problems:
            fix = (
                f"run: python -m inference.weights make-tiny --out {self.root}"
                if preset == "tiny"
                else "run: bash weights/download.sh   (see weights/README.md for the layout)"
            )
            raise WeightsError(
                "weights",
                f"the {preset} weights under {self.root} are incomplete:\n  "
                + "\n  ".join(problems)
                + f"\n{fix}",
            )
        return self

    def voices(self) -> list[str]:
        return sorted(p.stem for p in (self.kokoro_dir / "voices").glob("*.pt"))


def tiny_dit_config():
    """The tiny DiT matched to the tiny encoders' widths (text, CLIP, wav2vec2)."""
    # Imported here on purpose, as in make_tiny: the tiny encoders bring transformers and diffusers (seconds
    # to import), and the web process and the CLI's job checks read this module for weight paths only.
    from inference.encoders.tiny import TINY_CLIP_DIM, TINY_T5_DIM, TINY_WAV2VEC2_DIM, TINY_WAV2VEC2_LAYERS

    return dataclasses.replace(
        DiTConfig.tiny(),
        text_len=512,  # as the real model: prompts are never cut
        text_dim=TINY_T5_DIM,
        clip_dim=TINY_CLIP_DIM,
        audio_dim=TINY_WAV2VEC2_DIM,
        audio_layers=TINY_WAV2VEC2_LAYERS,
    )


def _tiny_marker(seed: int) -> dict:
    return {"format": TINY_FORMAT, "seed": seed, "random_weights": True}


def make_tiny(out: str | Path, seed: int = 0) -> WeightPaths:
    """Write every component, tiny and seeded-random, in the official layout under ``out``.

    Idempotent: a root that already holds this tiny set (same marker, nothing missing) is kept.
    """
    paths = WeightPaths.under(out)
    marker = paths.root / TINY_MARKER
    if marker.is_file() and not paths.missing():
        try:
            if json.loads(marker.read_text()) == _tiny_marker(seed):
                logger.info("tiny weights already present in %s", paths.root)
                return paths
        except (OSError, ValueError):
            pass

    # Imported here on purpose: writing the weights needs torch, transformers and diffusers, which the
    # callers that only read paths (the web process, the CLI's job checks) should not pay for.
    from inference.checkpoint.loader import save_checkpoint
    from inference.encoders.tiny import write_tiny_clip, write_tiny_t5, write_tiny_vae, write_tiny_wav2vec2
    from inference.model.dit import build_model
    from tts.tiny import write_tiny_kokoro

    paths.wan_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(tiny_dit_config(), "cpu").init_weights(seed)
    save_checkpoint(model, paths.wan_dir, num_shards=2)
    write_tiny_t5(paths.wan_dir, seed)
    write_tiny_clip(paths.wan_dir, seed)
    write_tiny_vae(paths.wan_dir, seed)
    write_tiny_wav2vec2(paths.root, seed)
    write_tiny_kokoro(paths.kokoro_dir, seed)
    marker.write_text(json.dumps(_tiny_marker(seed)))
    paths.check("tiny")
    logger.info("tiny weights written to %s", paths.root)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference.weights", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("make-tiny", help="write tiny random weights in the official layout")
    tiny.add_argument("--out", required=True, type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    check = sub.add_parser("check", help="say exactly what is missing from a weights root")
    check.add_argument("--preset", choices=PRESETS, default="multitalk-14b")
    check.add_argument("--root", type=Path, default=Path("weights"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "make-tiny":
            paths = make_tiny(args.out, args.seed)
            print(f"tiny weights ready in {paths.root}")
        else:
            WeightPaths.under(args.root).check(args.preset)
            print(f"{args.preset} weights complete in {args.root}")
    except (WeightsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
