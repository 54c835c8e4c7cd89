"""Catalog of the 54 voices that ship with Kokoro-82M v1.0 (``voices/<id>.pt`` in hexgrad/Kokoro-82M).

A voice id encodes its language and gender: the first letter is Kokoro's ``lang_code`` (``a`` American
English, ``b`` British English, ``e`` Spanish, ``f`` French, ``h`` Hindi, ``i`` Italian, ``j`` Japanese,
``p`` Brazilian Portuguese, ``z`` Mandarin Chinese) and the second is ``f``/``m``. The descriptions are
short listening notes for a voice picker, not upstream metadata; the ids, languages and genders are
upstream's. Any voice can speak any supported turn language: the G2P follows the turn (see
``tts.engine``), the voice only supplies timbre and prosody style.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tts.errors import UnknownVoiceError

logger = logging.getLogger(__name__)

# Kokoro lang_code -> (language tag, human-readable name)
LANGUAGES: dict[str, tuple[str, str]] = {
    "a": ("en-us", "American English"),
    "b": ("en-gb", "British English"),
    "e": ("es", "Spanish"),
    "f": ("fr", "French"),
    "h": ("hi", "Hindi"),
    "i": ("it", "Italian"),
    "j": ("ja", "Japanese"),
    "p": ("pt-br", "Brazilian Portuguese"),
    "z": ("zh", "Mandarin Chinese"),
}

# Upstream examples pair these two (person 1, person 2).
DEFAULT_VOICES: tuple[str, str] = ("af_heart", "am_adam")


@dataclass(frozen=True)
class Voice:
    """One Kokoro voice.

    id: e.g. ``"af_heart"`` (file ``voices/af_heart.pt``, a float32 style pack ``[510, 1, 256]``).
    language: language tag of the voice's training data (``"en-us"``, ``"zh"``, ...).
    lang_code: Kokoro's one-letter pipeline code (``"a"``, ``"z"``, ...).
    gender: ``"female"`` or ``"male"``.
    description: a few words for a voice picker.
    """

    id: str
    language: str
    lang_code: str
    gender: str
    description: str

    @property
    def language_name(self) -> str:
        return LANGUAGES[self.lang_code][1]

    @property
    def label(self) -> str:
        """A one-line label for menus: ``"af_heart: American English, female, warm and gentle"``."""
        return f"{self.id}: {self.language_name}, {self.gender}, {self.description}"


_DESCRIPTIONS: dict[str, str] = {
    # American English, female
    "af_heart": "warm and gentle; the flagship voice",
    "af_alloy": "clear and even",
    "af_aoede": "soft and melodic",
    "af_bella": "lively and expressive",
    "af_jessica": "bright and casual",
    "af_kore": "calm and steady",
    "af_nicole": "breathy, close-mic whisper",
    "af_nova": "crisp and modern",
    "af_river": "relaxed and low-key",
    "af_sarah": "friendly and clear",
    "af_sky": "light and airy",
    # American English, male
    "am_adam": "deep and mature",
    "am_echo": "smooth and resonant",
    "am_eric": "plain and direct",
    "am_fenrir": "strong and confident",
    "am_liam": "young and casual",
    "am_michael": "warm narrator",
    "am_onyx": "low and serious",
    "am_puck": "playful and animated",
    "am_santa": "jolly and hearty",
    # British English
    "bf_alice": "clear, received pronunciation",
    "bf_emma": "warm and polished",
    "bf_isabella": "bright and articulate",
    "bf_lily": "soft and youthful",
    "bm_daniel": "calm and measured",
    "bm_fable": "storyteller, expressive",
    "bm_george": "mature and authoritative",
    "bm_lewis": "deep and steady",
    # Spanish
    "ef_dora": "warm and clear",
    "em_alex": "natural and friendly",
    "em_santa": "jolly and hearty",
    # French
    "ff_siwis": "clear and gentle",
    # Hindi
    "hf_alpha": "clear and bright",
    "hf_beta": "soft and warm",
    "hm_omega": "deep and steady",
    "hm_psi": "calm and even",
    # Italian
    "if_sara": "warm and lively",
    "im_nicola": "smooth and calm",
    # Japanese
    "jf_alpha": "clear and bright",
    "jf_gongitsune": "storyteller, gentle",
    "jf_nezumi": "light and playful",
    "jf_tebukuro": "soft storyteller",
    "jm_kumo": "calm and low",
    # Brazilian Portuguese
    "pf_dora": "warm and clear",
    "pm_alex": "natural and friendly",
    "pm_santa": "jolly and hearty",
    # Mandarin Chinese
    "zf_xiaobei": "bright and youthful",
    "zf_xiaoni": "soft and gentle",
    "zf_xiaoxiao": "clear and friendly",
    "zf_xiaoyi": "lively and sweet",
    "zm_yunjian": "steady and mature",
    "zm_yunxi": "young and bright",
    "zm_yunxia": "youthful and energetic",
    "zm_yunyang": "newsreader, clear and formal",
}


def _make_voice(voice_id: str, description: str) -> Voice:
    lang_code, gender_code = voice_id[0], voice_id[1]
    return Voice(
        id=voice_id,
        language=LANGUAGES[lang_code][0],
        lang_code=lang_code,
        gender="female" if gender_code == "f" else "male",
        description=description,
    )


VOICES: dict[str, Voice] = {vid: _make_voice(vid, desc) for vid, desc in _DESCRIPTIONS.items()}


def get_voice(voice_id: str) -> Voice:
    """The catalog entry for ``voice_id``; raises ``UnknownVoiceError`` (``field="voice"``) otherwise."""
    if isinstance(voice_id, str):
        voice = VOICES.get(voice_id.strip())
        if voice is not None:
            return voice
    shown = str(voice_id)[:40]
    hint = ""
    if isinstance(voice_id, str) and len(voice_id) >= 2:
        same_prefix = [v for v in VOICES if v.startswith(voice_id.strip()[:2].lower())]
        if same_prefix:
            hint = f" Voices starting with {voice_id.strip()[:2].lower()!r}: {', '.join(same_prefix[:8])}."
    examples = ", ".join(["af_heart", "am_adam", "bf_emma", "zf_xiaobei", "zm_yunjian"])
    raise UnknownVoiceError(
        "voice",
        f"unknown voice {shown!r}: not one of the {len(VOICES)} Kokoro v1.0 voices (e.g. {examples}).{hint}",
    )


def voices_by_language() -> dict[str, list[Voice]]:
    """Voices grouped by language tag, in catalog order: ``{"en-us": [...], "en-gb": [...], ...}``."""
    groups: dict[str, list[Voice]] = {}
    for voice in VOICES.values():
        groups.setdefault(voice.language, []).append(voice)
    return groups
