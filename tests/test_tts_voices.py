"""Voice catalog and the tiny Kokoro writer's determinism."""

from __future__ import annotations

import json

import pytest
import torch

from tts.errors import UnknownVoiceError
from tts.tiny import DEFAULT_TINY_VOICES, MARKER_NAME, _voice_pack, tiny_config, tiny_vocab
from tts.voices import DEFAULT_VOICES, VOICES, get_voice, voices_by_language


def test_catalog_has_every_kokoro_v1_voice() -> None:
    assert len(VOICES) == 54
    counts = {lang: len(v) for lang, v in voices_by_language().items()}
    assert counts == {
        "en-us": 20,
        "en-gb": 8,
        "es": 3,
        "fr": 1,
        "hi": 4,
        "it": 2,
        "ja": 5,
        "pt-br": 3,
        "zh": 8,
    }
    zh = [v.id for v in voices_by_language()["zh"]]
    assert zh == ["zf_xiaobei", "zf_xiaoni", "zf_xiaoxiao", "zf_xiaoyi", "zm_yunjian", "zm_yunxi", "zm_yunxia",
                  "zm_yunyang"]  # fmt: skip
    for vid, v in VOICES.items():
        assert v.id == vid and v.lang_code == vid[0] and v.gender == {"f": "female", "m": "male"}[vid[1]]
        assert v.description
    assert get_voice("af_heart").gender == "female" and "gentle" in get_voice("af_heart").description
    assert get_voice("am_adam").gender == "male" and "mature" in get_voice("am_adam").description
    assert get_voice("bm_george").language == "en-gb"
    assert all(v in VOICES for v in DEFAULT_VOICES)


def test_unknown_voice_error_lists_valid_ids() -> None:
    with pytest.raises(UnknownVoiceError) as info:
        get_voice("af_nobody")
    err = info.value
    assert isinstance(err, ValueError) and err.field == "voice"
    assert "af_heart" in str(err) and "af_bella" in str(err)  # examples and same-prefix voices
    with pytest.raises(UnknownVoiceError):
        get_voice(None)  # type: ignore[arg-type]


def test_tiny_config_vocab_covers_g2p_output() -> None:
    vocab = tiny_vocab()
    cfg = tiny_config()
    assert max(vocab.values()) < cfg["n_token"] and 0 not in vocab.values()
    # symbols misaki/espeak produce for English and Mandarin
    for ch in "həlˈO wˈɜːld, ðɪs ɪz ɐ tˈɛst. ni↓xau↓ ʨi→ntʰjɛ→n ʤʧ↗↘ᵊ":
        assert ch in vocab, ch
    assert cfg["max_dur"] == 4 and cfg["plbert"]["max_position_embeddings"] == 512


def test_tiny_folder_is_deterministic(tiny_kokoro_dir) -> None:
    from kokoro import KModel

    from tts.engine import REPO_ID

    marker = json.loads((tiny_kokoro_dir / MARKER_NAME).read_text())
    assert marker["seed"] == 0 and marker["voices"] == list(DEFAULT_TINY_VOICES)
    for vid in DEFAULT_TINY_VOICES:
        pack = torch.load(tiny_kokoro_dir / "voices" / f"{vid}.pt", weights_only=True)
        assert pack.shape == (510, 1, 256) and pack.dtype == torch.float32
        assert torch.equal(pack, _voice_pack(vid, 0))
    assert not torch.equal(_voice_pack("af_heart", 0), _voice_pack("af_heart", 1))
    # rebuilding the model from the same seed gives the saved weights
    state = torch.load(tiny_kokoro_dir / "kokoro-v1_0.pth", weights_only=True, mmap=True)
    assert sorted(state) == ["bert", "bert_encoder", "decoder", "predictor", "text_encoder"]
    empty = tiny_kokoro_dir.parent / "empty.pth"
    torch.save({}, empty)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        rebuilt = KModel(repo_id=REPO_ID, config=tiny_config(), model=str(empty))
    for name in ("bert_encoder", "predictor"):
        for key, value in getattr(rebuilt, name).state_dict().items():
            assert torch.equal(value, state[name][key]), (name, key)
    n_params = sum(p.numel() for p in rebuilt.parameters())
    assert 40e6 < n_params < 60e6
