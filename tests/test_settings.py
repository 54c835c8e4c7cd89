"""GenerationSettings validation, (de)serialisation, presets and the time estimate."""

from __future__ import annotations

import random

import pytest

from inference.render.settings import (
    DEFAULT_NEGATIVE_PROMPT,
    PRESETS,
    WAN_NEGATIVE_PROMPT_ZH,
    GenerationSettings,
    SettingsError,
    count_clips,
    estimate_seconds,
)


def test_defaults_follow_upstream():
    s = GenerationSettings()
    assert (s.steps, s.text_guidance, s.audio_guidance, s.seed) == (40, 5.0, 4.0, 42)
    assert (s.frame_num, s.motion_frames, s.mode, s.max_frames, s.color_correction) == (
        81,
        25,
        "streaming",
        9000,  # not upstream's 1000: the default cap is the longest video (6 min), see inference.render.length
        1.0,
    )
    assert s.effective_shift == 7.0
    assert GenerationSettings(resolution=720).effective_shift == 11.0
    assert GenerationSettings(shift=2).effective_shift == 2.0
    assert s.passes_per_step == 3 and s.latent_frames == 21
    assert DEFAULT_NEGATIVE_PROMPT.startswith(
        "bright tones, overexposed"
    ) and DEFAULT_NEGATIVE_PROMPT.endswith("walking backwards")
    assert WAN_NEGATIVE_PROMPT_ZH.startswith("色调艳丽") and WAN_NEGATIVE_PROMPT_ZH.endswith("倒着走")


@pytest.mark.parametrize(
    ("field", "value", "allowed_part"),
    [
        ("steps", 0, "1..100"),
        ("steps", 101, "1..100"),
        ("steps", 40.5, "1..100"),
        ("steps", True, "1..100"),
        ("steps", "40", "1..100"),
        ("text_guidance", 0.5, "1.0..20.0"),
        ("audio_guidance", 21, "1.0..20.0"),
        ("audio_guidance", float("nan"), "1.0..20.0"),
        ("shift", 0.0, "0.1..30.0"),
        ("seed", 1.5, None),
        ("resolution", 540, "480 or 720"),
        ("frame_num", 80, "4n+1"),
        ("frame_num", 1, "5..201"),
        ("frame_num", 205, "5..201"),
        ("motion_frames", 24, "4k+1"),
        ("motion_frames", 81, "1..77"),
        ("mode", "endless", "'streaming' or 'clip'"),
        ("max_frames", 80, "81..9000"),
        ("color_correction", 1.5, "0.0..1.0"),
        ("negative_prompt", 5, None),
        ("negative_prompt", "x" * 5000, "at most 4000"),
        ("apg", "yes", "true or false"),
        ("apg_momentum", -2.0, "-1.0..1.0"),
    ],
)
def test_validation_names_field_and_range(field, value, allowed_part):
    with pytest.raises(SettingsError) as info:
        GenerationSettings(**{field: value})
    err = info.value
    assert isinstance(err, ValueError)
    assert err.field == field
    assert str(err).startswith(f"{field}: ")
    if allowed_part is not None:
        text = f"{err.allowed} {err}"
        assert allowed_part in text


def test_max_frames_bound_follows_frame_num():
    GenerationSettings(frame_num=41, motion_frames=9, max_frames=41)
    with pytest.raises(SettingsError) as info:
        GenerationSettings(frame_num=121, max_frames=100)
    assert info.value.field == "max_frames"


def test_from_dict_rejects_unknown_key_by_name_and_coerces_numbers():
    with pytest.raises(SettingsError) as info:
        GenerationSettings.from_dict({"steps": 10, "cfg": 3})
    assert info.value.field == "cfg" and "steps" in info.value.allowed
    s = GenerationSettings.from_dict({"steps": 30.0, "text_guidance": 3, "seed": -1})
    assert s.steps == 30 and isinstance(s.steps, int)
    assert s.text_guidance == 3.0 and isinstance(s.text_guidance, float)
    with pytest.raises(SettingsError) as info:
        GenerationSettings.from_dict([("steps", 3)])
    assert info.value.field == "settings"


def test_to_dict_round_trip():
    s = GenerationSettings(steps=12, shift=3.5, mode="clip", resolution=720, apg=True, negative_prompt="blur")
    d = s.to_dict()
    assert d["shift"] == 3.5 and d["mode"] == "clip" and d["negative_prompt"] == "blur"
    assert GenerationSettings.from_dict(d) == s
    assert GenerationSettings.from_dict(GenerationSettings().to_dict()).shift is None


def test_with_resolved_seed():
    s = GenerationSettings(seed=-1)
    r1 = s.with_resolved_seed(random.Random(0))
    r2 = s.with_resolved_seed(random.Random(0))
    assert r1.seed >= 0 and r1.seed == r2.seed
    assert r1.with_resolved_seed() is r1
    assert GenerationSettings(seed=7).with_resolved_seed().seed == 7


def test_presets_are_valid_and_ordered_by_cost():
    assert set(PRESETS) == {"fast", "balanced", "quality"}
    for name, preset in PRESETS.items():
        assert preset.name == name and preset.description
        assert GenerationSettings.from_dict(preset.settings.to_dict()) == preset.settings
    assert PRESETS["fast"].settings.passes_per_step == 2
    assert PRESETS["quality"].settings == GenerationSettings()
    costs = [estimate_seconds(PRESETS[n].settings, 10.0, 1.0) for n in ("fast", "balanced", "quality")]
    assert costs[0] < costs[1] < costs[2]
    hd = PRESETS["quality"].apply({"resolution": 720})
    assert hd.resolution == 720 and hd.steps == 40
    with pytest.raises(SettingsError):
        PRESETS["fast"].apply({"steps": 0})


def test_count_clips_and_estimate():
    s = GenerationSettings(max_frames=1000)  # upstream's cap
    # 1 + ceil((L - 81) / 56) with L = min(T, 1000)
    assert [count_clips(t, s) for t in (50, 81, 82, 137, 138, 250, 1000, 1500)] == [1, 1, 2, 2, 3, 5, 18, 18]
    # the default cap, 9000 frames: 1500 frames (60 s) are 27 clips, 9000 and more 161
    assert [count_clips(t, GenerationSettings()) for t in (1500, 9000, 12000)] == [27, 161, 161]
    assert count_clips(250, GenerationSettings(mode="clip")) == 1
    # 10 s -> 250 frames -> 5 clips x 40 steps x 3 passes
    assert estimate_seconds(s, 10.0, 2.0) == pytest.approx(5 * 40 * 3 * 2.0)
    assert estimate_seconds(PRESETS["fast"].settings, 10.0, 2.0, clip_overhead_s=5) == pytest.approx(
        5 * (16 * 2 * 2.0 + 5)
    )
    with pytest.raises(SettingsError) as info:
        estimate_seconds(s, -1.0, 1.0)
    assert info.value.field == "audio_seconds"


# ----------------------------------------------------------------------------------------- LoRA presets


def test_fast_preset_is_distilled_where_a_lora_is_loaded():
    from inference.render.settings import LoraState, offered_presets, preset_catalog

    none, merged = LoraState(), LoraState.of("merged", ["lightx2v_rank32"])
    switchable = LoraState.of("switchable", ["Wan2.1_I2V_14B_FusionX_LoRA"])
    assert PRESETS["fast"].apply(lora=none).lora is False
    fast = PRESETS["fast"].apply(lora=merged)
    assert (fast.lora, fast.steps, fast.text_guidance, fast.audio_guidance, fast.shift) == (
        True,
        4,
        1.0,
        2.0,
        2.0,
    )
    assert fast.steps * fast.passes_per_step == 8
    assert PRESETS["fast"].apply(lora=switchable).steps == 8  # FusionX
    assert PRESETS["quality"].apply(lora=switchable).lora is False  # one service, both presets
    assert set(offered_presets(none)) == set(offered_presets(switchable)) == set(PRESETS)
    assert set(offered_presets(merged)) == {"fast"}
    with pytest.raises(SettingsError) as err:
        PRESETS["quality"].apply(lora=merged)
    assert err.value.field == "preset"
    catalog = preset_catalog(merged)
    assert catalog["fast"]["offered"] and catalog["fast"]["uses_lora"] and not catalog["quality"]["offered"]
    assert not preset_catalog(none)["fast"]["uses_lora"]


def test_lora_setting_is_checked_against_the_service():
    from inference.render.settings import LoraState, check_lora_setting

    with pytest.raises(SettingsError) as err:
        PRESETS["quality"].apply({"lora": True}, lora=LoraState())
    assert err.value.field == "lora" and "--lora_dir" in err.value.message
    with pytest.raises(SettingsError) as err:
        check_lora_setting(GenerationSettings(lora=False), LoraState.of("merged", ["x"]))
    assert err.value.field == "lora"
    check_lora_setting(GenerationSettings(lora=True), LoraState.of("switchable", ["x"]))
    with pytest.raises(SettingsError):
        GenerationSettings(lora="yes")
    with pytest.raises(SettingsError):
        LoraState(mode="merged")
