"""The memory plan (``inference.memory``): sizes against the library models, the layouts of the original
service (8 x 24 GB at 720p with --t5_fsdp --dit_fsdp; one 24 GB GPU at 480p), suggestions, refusals, the
start-up verdict, and planned against measured for one DiT forward on the CPU.

The VAE's peaks come from ``inference.encoders.vae``'s meta-device dry run, which takes tens of seconds at
720p on a loaded CPU; tests of the plan's own logic replace it with a constant (``cheap_vae``), and one
slow test runs the real command line.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inference.memory.__main__ import main as cli_main
from inference.memory.measure import FORWARD_CASES, forward_measured, forward_planned
from inference.memory.plan import GIB, Layout, MemoryPlanError, Workload, plan
from inference.memory.sizes import ClipSizes, DitSizes, ModelSizes, T5Sizes
from inference.memory.startup import check_layout_fits, startup_check
from inference.model.config import DiTConfig
from inference.parallel.context import ParallelContext
from inference.parallel.offload import plan_streaming
from tests.subprocess_env import offline_env

ROOT = Path(__file__).resolve().parents[1]
plan_module = importlib.import_module("inference.memory.plan")  # the package re-exports the function ``plan``


@pytest.fixture(scope="module")
def sizes() -> ModelSizes:
    return ModelSizes.preset("multitalk-14b")


@pytest.fixture()
def cheap_vae(monkeypatch: pytest.MonkeyPatch) -> None:
    """VAE peaks from a linear rule instead of the dry run: 20 fp32 full-resolution copies untiled, 3 tiled."""

    def peaks(sizes: ModelSizes, lay: Layout, work: Workload, tiled: bool) -> tuple[int, int]:
        frame = 3 * work.height * work.width * 4
        per = 3 if tiled else 20
        return per * frame * 8, per * frame * 8 + work.clip_bytes()

    monkeypatch.setattr(plan_module, "_vae_peaks", peaks)


def test_14b_sizes(sizes: ModelSizes) -> None:
    dit = sizes.dit
    assert 18.8e9 < dit.params < 19.0e9  # Wan2.1-I2V-14B + MultiTalk's audio layers
    assert dit.root_params + dit.num_blocks * dit.block_params == dit.params
    assert abs(dit.total_bytes(2) / GIB - 35.2) < 0.1
    assert sizes.t5.params == 5_680_910_336  # umT5-XXL encoder
    assert 0.60e9 < sizes.clip.params < 0.62e9
    assert 0.12e9 < sizes.vae.params < 0.13e9
    # int8: one byte per quantised weight plus scales; under 19 GiB.
    assert 17 * GIB < dit.total_bytes(2, "int8") < 19 * GIB


def test_closed_forms_equal_the_library_models() -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    t5 = T5Sizes(vocab=301, d_model=48, d_ff=80, num_layers=3, num_heads=6, d_kv=8)
    with torch.device("meta"):
        m = UMT5EncoderModel(UMT5Config(vocab_size=301, d_model=48, d_kv=8, d_ff=80, num_layers=3, num_heads=6,
                                        feed_forward_proj="gated-gelu", tie_word_embeddings=False))  # fmt: skip
        c = CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=16, image_size=224, patch_size=14))  # fmt: skip
    assert t5.params == sum(p.numel() for p in m.parameters())
    assert ClipSizes(width=64, mlp=96, layers=2, heads=16).params == sum(p.numel() for p in c.parameters())


def test_quantised_bytes_follow_the_quant_module() -> None:
    from inference.checkpoint.quant import planned_weight_bytes, quantisable_linears
    from inference.model.dit import build_model

    cfg = DiTConfig.tiny()
    dit = DitSizes.of(cfg)
    for kind in ("int8", "fp8"):
        assert dit.total_bytes(2, kind) == planned_weight_bytes(cfg, kind, torch.bfloat16)
    assert dit.total_bytes(2) == planned_weight_bytes(cfg, None, torch.bfloat16)
    linears = len(quantisable_linears(build_model(cfg, "meta")))
    assert linears == dit.num_blocks * dit.block_linears + dit.root_linears


def test_streaming_plan_matches_the_streamer() -> None:
    from inference.model.dit import build_model

    cfg = DiTConfig.tiny()
    sizes = ModelSizes.preset("tiny")
    model = build_model(cfg, "meta")
    dit = sizes.dit
    for budget in (0, dit.root_params, dit.root_params + dit.block_params + 5, dit.block_params, 10**12):
        streamer = plan_streaming(model, budget)
        assert plan_module._persistent_blocks(sizes, budget) == (
            streamer.root_persistent,
            streamer.persistent_blocks,
        )


def test_original_service_8x24gb_720p_fits_with_t5_and_dit_fsdp(sizes: ModelSizes, cheap_vae: None) -> None:
    work = Workload.for_size("multitalk-720")
    assert work.height * work.width >= 960 * 960  # the largest bucket of the family
    result = plan(sizes, Layout(gpus=8, gpu_gib=24, dit_fsdp="full", t5_fsdp=True), work)
    assert result.fits, result.verdict
    for rank in result.ranks:
        assert rank.peak.total < 24 * GIB
        names = {i.name for s in rank.stages for i in s.items}
        assert {"DiT shard", "T5 shard", "DiT blocks in flight", "activations (largest op)"} <= names
    rank0 = result.ranks[0]
    assert {s.name for s in rank0.stages} == {"text", "conditioning", "denoise", "decode"}
    assert {s.name for s in result.ranks[1].stages} == {
        "text",
        "denoise",
    }  # T5 is sharded: every rank encodes
    # Without the two flags the replicated DiT (35 GiB) cannot fit, and the plan says which flags would.
    plain = plan(sizes, Layout(gpus=8, gpu_gib=24), work)
    assert not plain.fits and plain.suggestion is not None
    assert plain.suggestion.dit_fsdp == "full"
    assert (
        "does not fit" in plain.verdict and "--dit_fsdp" in plain.verdict and "makes it fit" in plain.verdict
    )


def test_one_24gb_gpu_at_480p_gets_a_layout_that_fits(sizes: ModelSizes, cheap_vae: None) -> None:
    work = Workload.for_size("multitalk-480")
    default = plan(sizes, Layout(gpus=1, gpu_gib=24), work)
    assert default.layout.offload  # upstream's default on one GPU
    assert not default.fits and default.suggestion is not None, default.verdict
    suggested = plan(sizes, default.suggestion, work)
    assert suggested.fits and suggested.layout.streaming, suggested.verdict
    # The suggestion keeps as many blocks resident as still fit: one more would not.
    dit = sizes.dit
    more = default.suggestion.replace(
        num_persistent_param_in_dit=default.suggestion.num_persistent_param_in_dit + dit.block_params
    )
    assert not plan(sizes, more, work).fits
    assert (
        f"--num_persistent_param_in_dit {default.suggestion.num_persistent_param_in_dit}" in default.verdict
    )
    # The lowest-memory layout fits with room to spare.
    low = plan(sizes, Layout(gpus=1, gpu_gib=24, num_persistent_param_in_dit=0, t5_cpu=True), work)
    assert low.fits and low.worst.peak.total < 12 * GIB


def test_layouts_the_plan_refuses() -> None:
    with pytest.raises(MemoryPlanError) as err:
        Layout(gpus=2, dit_fsdp="full", num_persistent_param_in_dit=0)
    assert err.value.field == "num_persistent_param_in_dit" and "--dit_fsdp full" in err.value.message
    Layout(gpus=1, dit_fsdp="full", num_persistent_param_in_dit=0)  # one process: nothing is sharded
    for kwargs, field in (
        ({"gpus": 0}, "gpus"),
        ({"quant": "int4"}, "quant"),
        ({"vae_tiling": "x"}, "vae_tiling"),
    ):
        with pytest.raises(MemoryPlanError) as err:
            Layout(**kwargs)  # type: ignore[arg-type]
        assert err.value.field == field
    with pytest.raises(MemoryPlanError) as err:
        Workload(100, 64)
    assert err.value.field == "size"


def test_startup_verdict(sizes: ModelSizes, cheap_vae: None) -> None:
    work = Workload.for_size("multitalk-480")
    with pytest.raises(MemoryPlanError) as err:
        check_layout_fits(Layout(gpus=8, gpu_gib=24), "multitalk-14b", work)
    assert err.value.field == "--t5_fsdp" or err.value.field == "--dit_fsdp"
    assert "does not fit" in err.value.message and "makes it fit" in err.value.message
    ok = check_layout_fits(Layout(gpus=8, gpu_gib=80), "multitalk-14b", work)
    assert ok.fits
    # On a CPU nothing is planned (host memory is not the GPU's).
    common = dict(preset="multitalk-14b", world_size=1, local_rank=0, resolution=480, frames=81, dit_fsdp="off",
                  t5_fsdp=False, t5_cpu=False, offload_model=None, num_persistent_param_in_dit=None,
                  vae_tiling="auto", quant=None)  # fmt: skip
    assert startup_check(device="cpu", **common) is None


def test_cli_refuses_a_bad_flag_and_prints_a_plan(
    capsys: pytest.CaptureFixture[str], cheap_vae: None
) -> None:
    assert cli_main(["--gpus", "2", "--dit_fsdp", "--num_persistent_param_in_dit", "0"]) == 2
    assert "error: --num_persistent_param_in_dit:" in capsys.readouterr().err
    assert cli_main(["--gpus", "8", "--gpu-gib", "80", "--size", "multitalk-480"]) == 0
    out = capsys.readouterr().out
    assert "rank 0: peak" in out and "ranks 1-7: peak" in out and "fits" in out
    assert cli_main(["--gpus", "1", "--gpu-gib", "24", "--size", "multitalk-480"]) == 1
    out = capsys.readouterr().out
    assert "does not fit" in out and "with the suggested flags:" in out


@pytest.mark.parametrize("case", FORWARD_CASES[:2], ids=lambda c: c.name)
def test_planned_dit_forward_matches_measured_on_cpu(case) -> None:
    planned = forward_planned(case)
    measured = forward_measured(ParallelContext.single("cpu"), case)
    assert 0.85 <= measured / planned <= 1.15, (planned, measured)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cli_8x24gb_720p_with_the_real_vae_dry_run() -> None:
    cmd = [sys.executable, "-m", "inference.memory", "--gpus", "8", "--gpu-gib", "24", "--size", "multitalk-720",
           "--frames", "81", "--t5_fsdp", "--dit_fsdp"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ": fits: peak" in proc.stdout
    peaks = [
        float(line.split("peak ")[1].split(" GiB")[0])
        for line in proc.stdout.splitlines()
        if line.startswith("rank")
    ]
    assert len(peaks) == 2 and max(peaks) < 24
