"""wav2vec2 audio features aligned to 25 fps video frames, computed as MultiTalk does.

Upstream (``src/audio_analysis/wav2vec2.py`` + ``generate_multitalk.py::get_embedding``):

1. 16 kHz mono float audio -> ``Wav2Vec2FeatureExtractor`` (zero-mean / unit-variance normalisation);
2. the CNN feature encoder gives ~50 frames per second ``[1, 512, T50]``;
3. those CNN features are linearly interpolated (``align_corners=True``) to ``T = int(len / 16000 * 25)``
   frames, i.e. the video frame count at 25 fps, *before* the transformer;
4. feature projection -> transformer encoder; the outputs of its layers (``hidden_states[1:]``) are
   stacked to ``[T, num_layers, hidden]`` (``[T, 12, 768]`` for chinese-wav2vec2-base).

Here the stock ``Wav2Vec2Model.forward`` does all of the model math; a forward hook on its CNN feature
encoder only resamples the CNN output in time (step 3). That keeps transformers' own hidden-state
collection (transformers 5 no longer returns hidden states from an overridden encoder call).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import InputError

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
VIDEO_FPS = 25


class AudioEncoderError(InputError):
    """Bad audio input or wav2vec2 folder; ``field`` names it ("audio", "wav2vec2_dir")."""


def num_video_frames(num_samples: int) -> int:
    """Video frames at 25 fps covered by ``num_samples`` of 16 kHz audio, rounded down (upstream's
    ``int(len(speech) / 16000 * 25)``, same float expression so the rounding agrees)."""
    return int(num_samples / SAMPLE_RATE * VIDEO_FPS)


def interpolate_features(features: torch.Tensor, num_frames: int) -> torch.Tensor:
    """features: [B, C, T_in] -> [B, C, num_frames], linear with ``align_corners=True`` along time."""
    return F.interpolate(features, size=num_frames, mode="linear", align_corners=True)


class AudioEncoder:
    """chinese-wav2vec2-base (or any wav2vec2 folder) -> per-video-frame embeddings ``[T, layers, hidden]``.

    Runs on the CPU by default, as upstream does; float32 unless told otherwise."""

    def __init__(
        self, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise AudioEncoderError("wav2vec2_dir", f"no wav2vec2 model in {folder} (config.json missing)")
        if not (folder / "preprocessor_config.json").is_file():
            raise AudioEncoderError("wav2vec2_dir", f"preprocessor_config.json missing in {folder}")
        try:
            # Eager attention: the upstream math path; attentions are never requested.
            model = Wav2Vec2Model.from_pretrained(
                str(folder), local_files_only=True, attn_implementation="eager", dtype=dtype
            )
            extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise AudioEncoderError("wav2vec2_dir", f"cannot load wav2vec2 from {folder}: {exc}") from exc
        if extractor.sampling_rate != SAMPLE_RATE:
            raise AudioEncoderError(
                "wav2vec2_dir", f"feature extractor expects {extractor.sampling_rate} Hz, not {SAMPLE_RATE}"
            )
        self.model = model.to(device).eval().requires_grad_(False)
        self.extractor = extractor
        self._lock = threading.Lock()  # the resampling hook is per call; one call at a time
        logger.info(
            "wav2vec2 loaded from %s: %d layers x %d, %s on %s",
            folder,
            self.num_layers,
            self.hidden_size,
            dtype,
            device,
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def _input_values(self, audio: np.ndarray) -> torch.Tensor:
        if isinstance(audio, torch.Tensor):
            audio = audio.detach().cpu().numpy()
        if not isinstance(audio, np.ndarray):
            raise AudioEncoderError(
                "audio", f"expected a 1-D numpy array of 16 kHz samples, got {type(audio)}"
            )
        if audio.ndim != 1:
            raise AudioEncoderError("audio", f"expected mono audio [N], got shape {audio.shape}")
        if not np.issubdtype(audio.dtype, np.floating):
            raise AudioEncoderError("audio", f"expected float samples in [-1, 1], got {audio.dtype}")
        if not np.all(np.isfinite(audio)):
            raise AudioEncoderError("audio", "contains NaN or infinite samples")
        if num_video_frames(len(audio)) < 1:
            raise AudioEncoderError(
                "audio", f"{len(audio)} samples is shorter than one 25 fps frame ({SAMPLE_RATE // VIDEO_FPS})"
            )
        values = self.extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_values
        return torch.from_numpy(np.asarray(values, dtype=np.float32)).reshape(1, -1)

    @torch.no_grad()
    def encode(self, audio_16k: np.ndarray) -> torch.Tensor:
        """audio_16k: [N] float mono samples at 16 kHz -> [T, num_layers, hidden] float32 on the CPU,
        with ``T = int(N / 16000 * 25)``."""
        values = self._input_values(audio_16k)
        num_frames = num_video_frames(values.shape[-1])

        def resample(_module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return interpolate_features(output, num_frames)  # [1, C, T50] -> [1, C, T]

        dtype = next(self.model.parameters()).dtype
        with self._lock:
            handle = self.model.feature_extractor.register_forward_hook(resample)
            try:
                out = self.model(values.to(self.device, dtype), output_hidden_states=True)
            finally:
                handle.remove()
        layers = out.hidden_states[1:]  # [0] is the transformer input; upstream drops it
        if len(layers) != self.num_layers or layers[0].shape[1] != num_frames:
            raise RuntimeError(
                f"wav2vec2 returned {len(layers)} layers of {layers[0].shape[1]} frames, "
                f"expected {self.num_layers} of {num_frames}"
            )
        return torch.stack(layers, dim=2)[0].float().cpu()  # [T, layers, hidden]
