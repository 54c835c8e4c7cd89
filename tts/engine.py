"""Kokoro-82M speech synthesis from a local folder only (never the Hugging Face hub).

Folder layout (hexgrad/Kokoro-82M, or ``tts.tiny.write_tiny_kokoro``)::

    kokoro_dir/config.json  kokoro_dir/kokoro-v1_0.pth  kokoro_dir/voices/<voice_id>.pt

G2P (text -> phonemes), chosen per turn by the turn's language, not the voice's:

- ``"zh"`` turns: misaki ``ZHG2P`` v1.0 frontend (IPA with tone arrows, lang_code ``z``). Runs of Latin
  letters inside a Chinese turn (``GPU``, names) are phonemised by the English G2P and spliced in,
  because the v1.0 Chinese frontend would pass them through as raw letters. Any voice can speak a
  Chinese turn: an English voice keeps its timbre and reads the Chinese phonemes (the result sounds
  accented); the ``zf_``/``zm_`` voices are the ones trained on Mandarin.
- ``"en"`` turns: British G2P (``b``) for ``bf_``/``bm_`` voices, American (``a``) for every other
  voice. misaki's ``en.G2P`` is used when the spaCy model ``en_core_web_sm`` is installed; otherwise
  misaki's ``EspeakG2P`` (espeak-ng bundled by espeakng-loader) with one logged warning. misaki's
  ``en.G2P`` would try to *download* the spaCy model when it is missing, so it is never constructed
  unless the model is installed as a package.

Determinism: Kokoro's vocoder draws noise (``SineGen`` / ``SourceModuleHnNSF`` use the global torch
RNG). Each call runs under ``torch.random.fork_rng`` seeded with ``seed``, so the same seed gives the
same audio and the caller's RNG state is untouched.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from tts.errors import KokoroWeightsError, TTSInputError, UnknownVoiceError
from tts.voices import LANGUAGES, VOICES, Voice, get_voice

logger = logging.getLogger(__name__)

SAMPLE_RATE = 24_000
# Kokoro v1.0 id: selects the IPA Chinese frontend in misaki and names the checkpoint; never downloaded.
REPO_ID = "hexgrad/Kokoro-82M"
MODEL_FILE = "kokoro-v1_0.pth"
SUBMODULES = ("bert", "bert_encoder", "predictor", "text_encoder", "decoder")
# PL-BERT has 512 positions; two are the boundary tokens KModel adds.
MAX_PHONEMES = 510
TURN_LANGUAGES = ("en", "zh")
SPEED_RANGE = (0.25, 4.0)
# espeak-ng voice for each Kokoro lang_code that misaki phonemises with espeak.
_ESPEAK_LANGUAGE = {"a": "en-us", "b": "en-gb", "e": "es", "f": "fr-fr", "h": "hi", "i": "it", "p": "pt-br"}
PREVIEW_LINES = {
    "a": "Hi there! This is how I sound in a conversation.",
    "b": "Hello! This is how I sound in a conversation.",
    "e": "¡Hola! Así suena mi voz en una conversación.",
    "f": "Bonjour ! Voici ma voix dans une conversation.",
    "h": "नमस्ते! बातचीत में मेरी आवाज़ ऐसी लगती है।",
    "i": "Ciao! Ecco come suona la mia voce in una conversazione.",
    "p": "Olá! É assim que a minha voz soa numa conversa.",
    "z": "你好！这就是我在对话里的声音。",
}
# Break points for splitting a phoneme string, strongest first (as Kokoro's own English chunker).
_BREAKS = ("!.?…", ":;", ",—", " ")
_PUNCTUATION = frozenset(";:,.!?¡¿—…\"«»“”()'’- ")
_LATIN_RUN = re.compile(r"[A-Za-z][A-Za-z'’\-]*(?:\s+[A-Za-z][A-Za-z'’\-]*)*")

_espeak_warned = False


@runtime_checkable
class Synthesizer(Protocol):
    """Anything that turns one turn of text into mono audio (``KokoroEngine``, or a fake in tests)."""

    sample_rate: int

    def synthesize(
        self, text: str, voice: str, language: str, seed: int, speed: float = 1.0
    ) -> np.ndarray:  # pragma: no cover - protocol
        """Returns ``audio: [N]`` float32 mono at ``sample_rate``."""
        ...


def spacy_english_available() -> bool:
    """True when misaki's ``en.G2P`` can load ``en_core_web_sm`` without trying to download it."""
    if importlib.util.find_spec("en_core_web_sm") is None:
        return False
    try:
        # misaki asks spacy.util.is_package, which looks for an installed distribution by this name.
        importlib.metadata.distribution("en_core_web_sm")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def split_phonemes(ps: str, limit: int | None = None) -> list[str]:
    """Split a phoneme string into chunks of at most ``limit`` (default 510) characters at the strongest break."""
    limit = MAX_PHONEMES if limit is None else limit
    ps = ps.strip()
    chunks: list[str] = []
    while len(ps) > limit:
        window = ps[:limit]
        cut = -1
        for marks in _BREAKS:
            cut = max(window.rfind(m) for m in marks)
            if cut > 0:
                break
        if cut <= 0:
            cut = limit - 1
        chunks.append(ps[: cut + 1].strip())
        ps = ps[cut + 1 :].strip()
    if ps:
        chunks.append(ps)
    return [c for c in chunks if c]


def g2p_code(voice_lang_code: str, language: str) -> str:
    """Kokoro lang_code used for a turn in ``language`` spoken by a voice of ``voice_lang_code``."""
    if language == "zh":
        return "z"
    if language == "en":
        return "b" if voice_lang_code == "b" else "a"
    raise TTSInputError("language", f"unsupported turn language {language!r}; allowed: 'en', 'zh'")


@contextlib.contextmanager
def seeded_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Run the body with the global torch RNG seeded to ``seed`` and restore the caller's state after.

    Only the CPU generator and, on CUDA, the engine's own device are forked and seeded, so other
    GPUs' generators are never touched.
    """
    seed = seed % (2**63)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[idx]):
            torch.random.default_generator.manual_seed(seed)
            with torch.cuda.device(idx):
                torch.cuda.manual_seed(seed)
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield


def _voice_lang_code(voice_id: str) -> str:
    voice = VOICES.get(voice_id)
    if voice is not None:
        return voice.lang_code
    # A custom pack in the folder (e.g. a blend): its first letter follows Kokoro's naming if it can.
    return voice_id[0] if voice_id[:1] in LANGUAGES else "a"


def _check_folder(kokoro_dir: Path) -> tuple[Path, Path, dict[str, Path]]:
    expected = (
        f"expected {kokoro_dir}/config.json, {kokoro_dir}/{MODEL_FILE} and {kokoro_dir}/voices/<voice>.pt"
    )
    if not kokoro_dir.is_dir():
        raise KokoroWeightsError(
            "kokoro_dir",
            f"Kokoro folder {kokoro_dir} does not exist; {expected} "
            "(fetch them with weights/download.sh, or write random test weights with `python -m tts make-tiny`)",
        )
    config_path = kokoro_dir / "config.json"
    model_path = kokoro_dir / MODEL_FILE
    voice_dir = kokoro_dir / "voices"
    missing = [p.name for p in (config_path, model_path) if not p.is_file()]
    voice_files = {p.stem: p for p in sorted(voice_dir.glob("*.pt"))} if voice_dir.is_dir() else {}
    if not voice_files:
        missing.append("voices/*.pt (no voice files)")
    if missing:
        raise KokoroWeightsError(
            "kokoro_dir",
            f"Kokoro folder {kokoro_dir} is incomplete: missing {', '.join(missing)}; {expected}",
        )
    return config_path, model_path, voice_files


def _read_config(config_path: Path) -> dict[str, Any]:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KokoroWeightsError("kokoro_dir", f"{config_path} is not readable JSON: {exc}") from None
    required = ("vocab", "n_token", "plbert", "hidden_dim", "style_dim", "n_layer", "max_dur", "dropout",
                "text_encoder_kernel_size", "n_mels", "istftnet")  # fmt: skip
    absent = [k for k in required if not isinstance(config, dict) or k not in config]
    if absent:
        raise KokoroWeightsError(
            "kokoro_dir", f"{config_path} is not a Kokoro config: missing keys {', '.join(absent)}"
        )
    return config


def _load_checkpoint(model_path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(model_path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # Legacy (non-zip) checkpoints cannot be memory-mapped.
        try:
            ckpt = torch.load(model_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise KokoroWeightsError(
                "kokoro_dir", f"{model_path} is not a readable torch checkpoint: {exc}"
            ) from None
    except Exception as exc:
        raise KokoroWeightsError(
            "kokoro_dir", f"{model_path} is not a readable torch checkpoint: {exc}"
        ) from None
    if not isinstance(ckpt, dict) or not all(isinstance(ckpt.get(k), dict) for k in SUBMODULES):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise KokoroWeightsError(
            "kokoro_dir",
            f"{model_path} is not a Kokoro checkpoint: expected a dict of state dicts {list(SUBMODULES)}, found {found}",
        )
    return ckpt


def _verify_loaded(model: torch.nn.Module, ckpt: dict[str, Any], model_path: Path) -> None:
    """Fail if a parameter was not in the checkpoint.

    KModel retries a failed strict load with ``strict=False`` after stripping a ``module.`` prefix,
    which would silently keep random weights for anything it could not match.
    """
    for name in SUBMODULES:
        keys = set(ckpt[name])
        keys |= {k[len("module.") :] for k in keys if k.startswith("module.")}
        params = {k for k, _ in getattr(model, name).named_parameters()}
        missing = sorted(params - keys)
        if missing:
            raise KokoroWeightsError(
                "kokoro_dir",
                f"{model_path} does not match config.json: {len(missing)} parameters of {name!r} are missing "
                f"(e.g. {', '.join(missing[:3])})",
            )


def _fold_weight_norm(model: torch.nn.Module) -> None:
    """Bake weight-normalised layers into plain weights (inference only).

    kokoro builds its convolutions with ``torch.nn.utils.weight_norm``, which recomputes
    ``g * v / ||v||`` on every forward: about 13% of CPU synthesis time. Folding once gives the same
    weights.
    """
    for module in model.modules():
        if hasattr(module, "weight_g") and hasattr(module, "weight_v"):
            torch.nn.utils.remove_weight_norm(module)


class KokoroEngine:
    """Kokoro-82M on one device, loaded from a local folder.

    kokoro_dir: folder with ``config.json``, ``kokoro-v1_0.pth`` and ``voices/*.pt``.
    device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    Thread-safe: calls are serialised (the seeded RNG section is process-global).
    """

    sample_rate: int = SAMPLE_RATE

    def __init__(self, kokoro_dir: Path | str, device: str = "cpu") -> None:
        self.kokoro_dir = Path(kokoro_dir)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise TTSInputError(
                "device", f"not a torch device: {device!r} (use 'cpu', 'cuda' or 'cuda:N')"
            ) from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise TTSInputError("device", f"device {device!r} requested but CUDA is not available")
        if self.device.type not in ("cpu", "cuda"):
            raise TTSInputError("device", f"unsupported device {device!r}; use 'cpu', 'cuda' or 'cuda:N'")
        config_path, model_path, self._voice_files = _check_folder(self.kokoro_dir)
        config = _read_config(config_path)
        ckpt = _load_checkpoint(model_path)

        from kokoro import KModel  # imported here: ~4 s of transformers import, only when a model is built

        try:
            model = KModel(repo_id=REPO_ID, config=config, model=str(model_path))
        except (RuntimeError, AssertionError, KeyError, TypeError, ValueError) as exc:
            raise KokoroWeightsError(
                "kokoro_dir", f"{model_path} does not fit {config_path}: {str(exc)[:400]}"
            ) from None
        _verify_loaded(model, ckpt, model_path)
        del ckpt
        _fold_weight_norm(model)
        self._model = model.to(self.device).eval().requires_grad_(False)
        self._vocab: dict[str, int] = dict(config["vocab"])
        self._packs: dict[str, torch.Tensor] = {}
        self._g2p: dict[str, Any] = {}
        self._spacy = spacy_english_available()
        self._lock = threading.RLock()
        logger.info(
            "Kokoro loaded from %s on %s (%d voices, English G2P: %s)",
            self.kokoro_dir, self.device, len(self._voice_files), "misaki+spaCy" if self._spacy else "espeak-ng",
        )  # fmt: skip

    # ----------------------------------------------------------------- voices
    @property
    def available_voices(self) -> tuple[str, ...]:
        """Voice ids with a ``voices/<id>.pt`` file in the folder, sorted."""
        return tuple(self._voice_files)

    def installed_voices(self) -> list[Voice]:
        """Catalog entries of the installed voices (custom packs not in the catalog are left out)."""
        return [VOICES[v] for v in self._voice_files if v in VOICES]

    def _check_voice(self, voice: str) -> str:
        if isinstance(voice, str) and voice.strip() in self._voice_files:
            return voice.strip()
        get_voice(voice)  # raises UnknownVoiceError for ids that are not Kokoro voices at all
        shown = ", ".join(self.available_voices[:12]) + (" ..." if len(self._voice_files) > 12 else "")
        raise UnknownVoiceError(
            "voice",
            f"voice {voice!r} is a Kokoro voice but voices/{voice}.pt is not in {self.kokoro_dir}; "
            f"installed: {shown}",
        )

    def _pack(self, voice: str) -> torch.Tensor:
        """Style pack of ``voice``: ``[L, 1, 256]`` float32 on the engine's device (L = 510 for real voices)."""
        pack = self._packs.get(voice)
        if pack is not None:
            return pack
        path = self._voice_files[voice]
        try:
            pack = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise KokoroWeightsError("kokoro_dir", f"{path} is not a readable voice file: {exc}") from None
        if not isinstance(pack, torch.Tensor) or pack.ndim != 3 or tuple(pack.shape[1:]) != (1, 256):
            shape = tuple(pack.shape) if isinstance(pack, torch.Tensor) else type(pack).__name__
            raise KokoroWeightsError(
                "kokoro_dir",
                f"{path} is not a Kokoro voice pack: expected a [510, 1, 256] tensor, got {shape}",
            )
        pack = pack.to(device=self.device, dtype=torch.float32)
        self._packs[voice] = pack
        return pack

    # -------------------------------------------------------------------- G2P
    def _espeak(self, language: str) -> Any:
        key = f"espeak:{language}"
        if key not in self._g2p:
            from misaki.espeak import EspeakG2P

            self._g2p[key] = EspeakG2P(language=language)
        return self._g2p[key]

    def _english_chunks(self, text: str, code: str) -> list[str]:
        global _espeak_warned
        if self._spacy:
            key = f"en:{code}"
            if key not in self._g2p:
                from kokoro import KPipeline

                # model=False: a "quiet" pipeline that only phonemises and chunks (never loads a model).
                self._g2p[key] = KPipeline(lang_code=code, repo_id=REPO_ID, model=False)
            return [r.phonemes for r in self._g2p[key](text) if r.phonemes]
        if not _espeak_warned:
            _espeak_warned = True
            logger.warning(
                "spaCy model en_core_web_sm is not installed: English G2P uses espeak-ng (misaki EspeakG2P), "
                "which is offline but less accurate than misaki's lexicon; install en_core_web_sm to switch"
            )
        ps, _ = self._espeak(_ESPEAK_LANGUAGE[code])(text)
        return split_phonemes(ps)

    def _chinese_phonemes(self, text: str) -> str:
        if "zh" not in self._g2p:
            import jieba
            from misaki.zh import ZHG2P

            # jieba logs every dictionary load to stderr at DEBUG through its own handler.
            jieba.setLogLevel(logging.WARNING)

            self._g2p["zh"] = ZHG2P(version=None)
        zh = self._g2p["zh"]
        parts: list[str] = []
        pos = 0
        for m in _LATIN_RUN.finditer(text):
            if text[pos : m.start()].strip():
                parts.append(zh(text[pos : m.start()])[0])
            parts.append(" ".join(self._english_chunks(m.group(0), "a")))
            pos = m.end()
        if text[pos:].strip():
            parts.append(zh(text[pos:])[0])
        return " ".join(p.strip() for p in parts if p.strip())

    def phonemize(self, text: str, code: str) -> list[str]:
        """Phoneme chunks (each at most 510 symbols) for ``text`` with Kokoro lang_code ``code``."""
        if code in ("a", "b"):
            return self._english_chunks(text, code)
        if code == "z":
            return split_phonemes(self._chinese_phonemes(text))
        if code in _ESPEAK_LANGUAGE:
            ps, _ = self._espeak(_ESPEAK_LANGUAGE[code])(text)
            return split_phonemes(ps)
        raise TTSInputError(
            "language",
            f"no offline G2P for Kokoro lang_code {code!r} (Japanese needs misaki[ja], not installed)",
        )

    # -------------------------------------------------------------- synthesis
    def synthesize(self, text: str, voice: str, language: str, seed: int, speed: float = 1.0) -> np.ndarray:
        """Speak ``text`` (a turn in ``language``, "en" or "zh") with ``voice``.

        Returns ``audio: [N]`` float32 mono at 24 kHz. Long text is split into <=510-phoneme chunks
        whose audio is concatenated. Same (text, voice, language, seed, speed) -> same samples.
        """
        if language not in TURN_LANGUAGES:
            raise TTSInputError("language", f"unsupported turn language {language!r}; allowed: 'en', 'zh'")
        voice = self._check_voice(voice)
        return self._speak(text, voice, g2p_code(_voice_lang_code(voice), language), seed, speed)

    def preview(self, voice: str, seed: int = 0) -> np.ndarray:
        """A short line in the voice's own language: ``[N]`` float32 at 24 kHz.

        Japanese voices read the English line (no offline Japanese G2P is installed; dialogue turns
        are English or Chinese anyway).
        """
        voice = self._check_voice(voice)
        code = _voice_lang_code(voice)
        code = code if code in PREVIEW_LINES else "a"
        return self._speak(PREVIEW_LINES[code], voice, code, seed, 1.0)

    def _speak(self, text: str, voice: str, code: str, seed: int, speed: float) -> np.ndarray:
        if not isinstance(text, str) or not text.strip():
            raise TTSInputError("text", "empty text: a turn needs something to say")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise TTSInputError("seed", f"seed must be an integer, got {seed!r}")
        lo, hi = SPEED_RANGE
        if not isinstance(speed, int | float) or not lo <= float(speed) <= hi:
            raise TTSInputError("speed", f"speed must be a number in [{lo}, {hi}], got {speed!r}")
        # One call at a time: the G2P objects and voice cache are built lazily, and the seeded RNG
        # section is process-global.
        with self._lock:
            # A chunk of only punctuation would "speak" a breath of vocoder noise: nothing to lip-sync to.
            chunks = [
                c
                for c in self.phonemize(text.strip(), code)
                if any(ch in self._vocab and ch not in _PUNCTUATION for ch in c)
            ]
            if not chunks:
                raise TTSInputError(
                    "text", f"nothing speakable in {text.strip()[:60]!r} (no phonemes after G2P)"
                )
            pack = self._pack(voice)
            pieces: list[np.ndarray] = []
            with seeded_rng(self.device, int(seed)), torch.inference_mode():
                for ps in chunks:
                    style = pack[
                        min(len(ps), pack.shape[0]) - 1
                    ]  # [1, 256]: Kokoro picks the style by length
                    audio = self._model(ps, style, float(speed))
                    pieces.append(audio.detach().float().cpu().numpy().reshape(-1))
        out = np.concatenate(pieces).astype(np.float32, copy=False)
        if not np.isfinite(out).all():
            raise RuntimeError(
                f"Kokoro produced non-finite audio for voice {voice!r}; the weights may be corrupt"
            )
        return out
