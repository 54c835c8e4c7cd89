"""Upstream generate_multitalk.py flags on ``python -m inference.generate``: mapping and refusals (no weights)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from inference.render.cli import build_parser
from inference.render.speed import SpeedOptionError, SpeedOptions, speed_options
from inference.render.upstream_cli import UpstreamFlagError, normalize, runtime_overrides, setting_overrides
from inference.render.worker import RuntimeOptions


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_readme_command_maps_onto_our_options():
    args = normalize(parse(
        "--ckpt_dir", "weights/Wan2.1-I2V-14B-480P", "--wav2vec_dir", "weights/chinese-wav2vec2-base",
        "--input_json", "examples/multitalk_example_2.json", "--lora_dir", "weights/fusionx.safetensors",
        "--lora_scale", "1.0", "--sample_text_guide_scale", "1.0", "--sample_audio_guide_scale", "2.0",
        "--sample_steps", "8", "--mode", "streaming", "--save_file", "multi_long_fusionx_exp", "--sample_shift", "2",
        "--size", "multitalk-720", "--base_seed", "7", "--use_apg", "--color_correction_strength", "0.5",
        "--use_teacache", "--teacache_thresh", "0.3", "--frame_num", "81", "--motion_frame", "25", "--dit_fsdp",
    ))  # fmt: skip
    assert args.weights == Path("weights") and args.input == Path("examples/multitalk_example_2.json")
    assert args.out == Path("multi_long_fusionx_exp.mp4") and args.dit_fsdp == "full"
    assert setting_overrides(args) == {
        "seed": 7, "frame_num": 81, "motion_frames": 25, "shift": 2.0, "text_guidance": 1.0, "audio_guidance": 2.0,
        "color_correction": 0.5, "teacache_thresh": 0.3, "resolution": 720, "apg": True, "teacache": True,
    }  # fmt: skip
    speed = speed_options(args)
    assert speed.lora_dir == (Path("weights/fusionx.safetensors"),) and speed.lora_scale == (1.0,)
    assert speed.lora_state.mode == "merged" and speed.lora_state.steps == 8


def test_defaults_follow_upstream():
    args = normalize(parse("--input_json", "job.json"))
    assert args.out == Path("multitalk-14B_multitalk-480_job.mp4")
    assert speed_options(args).lora_scale == (1.2,)  # upstream's --lora_scale default
    assert setting_overrides(args) == {}


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (("--input_json", "j.json", "--ckpt_dir", "weights/Wan2.1-I2V-14B-720P"), "--ckpt_dir"),
        (("--input_json", "j.json", "--wav2vec_dir", "elsewhere/wav2vec"), "--wav2vec_dir"),
        (("--input_json", "j.json", "--audio_save_dir", "save_audio"), "--audio_save_dir"),
        (("--input_json", "j.json", "--task", "infinitetalk-14B"), "--task"),
        (("--save_file", "x"), "--input"),
        (("--input", "a.json", "--input_json", "b.json"), "--input_json"),
    ],
)
def test_flags_that_cannot_be_honoured_are_named(argv, flag):
    with pytest.raises(UpstreamFlagError) as err:
        normalize(parse(*argv))
    assert err.value.field == flag


def test_runtime_flags_route_to_the_service_option_names():
    @dataclasses.dataclass(frozen=True)
    class Options:  # a runtime that already has --quant but not --offload_model
        quant: str | None = None
        quant_dir: Path | None = None

    args = normalize(parse("--input_json", "j.json", "--quant", "int8", "--quant_dir", "q"))
    assert runtime_overrides(args, Options) == {"quant": "int8", "quant_dir": Path("q")}
    args = normalize(parse("--input_json", "j.json", "--num_persistent_param_in_dit", "0"))
    with pytest.raises(UpstreamFlagError) as err:
        runtime_overrides(args, Options)
    assert err.value.field == "--num_persistent_param_in_dit"
    assert (
        runtime_overrides(normalize(parse("--input_json", "j.json", "--offload_model", "False")), Options)
        == {}
    )


def test_cli_exits_2_on_an_unhonoured_flag_before_loading(capsys):
    from inference.render.cli import main

    assert main(["--input_json", "j.json", "--audio_save_dir", "x"]) == 2
    assert "--audio_save_dir" in capsys.readouterr().err
    with pytest.raises(SpeedOptionError) as err:
        SpeedOptions(lora_dir=(Path("a"), Path("b")), lora_scale=(1.0, 2.0, 3.0))
    assert err.value.field == "--lora_scale"


def test_offload_model_false_reaches_the_runtime():
    """Upstream offloads by default on one GPU; ``--offload_model False`` must override that default."""
    off = runtime_overrides(
        normalize(parse("--input_json", "j.json", "--offload_model", "False")), RuntimeOptions
    )
    assert off["offload_model"] is False
    unset = runtime_overrides(normalize(parse("--input_json", "j.json")), RuntimeOptions)
    assert "offload_model" not in unset  # not given: the runtime's default decides
