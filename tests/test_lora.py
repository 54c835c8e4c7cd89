"""LoRA files in every accepted layout, on the tiny DiT: exact merges, refusals by name, switchable adapters
against merged ones, and the FSDP2 loader merging each rank's row slice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from inference.checkpoint.loader import load_model, save_checkpoint
from inference.checkpoint.lora import AdapterBank, LoraError, MergedSource, read_lora, read_loras
from inference.model.config import DiTConfig
from inference.model.dit import MultiTalkDiT, build_model
from inference.model.sp import NoParallel
from tests.dist_harness import run_spmd

RANK = 3
SHAPES = {k: tuple(v.shape) for k, v in build_model(DiTConfig.tiny(), "meta").state_dict().items()}


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def _pair(param: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for a weight of SHAPES[param] (conv weights get conv-shaped factors)."""
    shape = SHAPES[param]
    down = _rand(RANK, *shape[1:], seed=seed)
    up = _rand(shape[0], RANK, *([1] * (len(shape) - 2)), seed=seed + 1)
    return down, up


def _delta(down: torch.Tensor, up: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """dW = factor * up @ down, written out independently of the module under test."""
    d = (up.flatten(1) @ down.flatten(1)).view(up.shape[0], *down.shape[1:])
    return d * factor if factor != 1.0 else d


def upstream_layout(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """upstream MultiTalk / ComfyUI layout: lora_down/lora_up, .diff, .diff_b, .diff_m; no alpha."""
    tensors: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    for i, param in enumerate(
        [
            "blocks.0.self_attn.q.weight",
            "blocks.1.ffn.0.weight",
            "blocks.0.cross_attn.k_img.weight",
            "blocks.1.audio_cross_attn.kv_linear.weight",
            "time_projection.1.weight",
            "patch_embedding.weight",
        ]
    ):
        down, up = _pair(param, seed=10 * i)
        stem = "diffusion_model." + param.removesuffix(".weight")
        tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = down, up
        expected[param] = _delta(down, up)
    for i, (key, param) in enumerate(
        [
            ("blocks.0.norm3.diff", "blocks.0.norm3.weight"),
            ("blocks.0.cross_attn.norm_k_img.diff", "blocks.0.cross_attn.norm_k_img.weight"),
            ("blocks.0.self_attn.q.diff_b", "blocks.0.self_attn.q.bias"),
            ("head.head.diff_b", "head.head.bias"),
            ("blocks.1.diff_m", "blocks.1.modulation"),
        ]
    ):
        diff = _rand(*SHAPES[param], seed=100 + i)
        tensors[f"diffusion_model.{key}"] = diff
        expected[param] = diff
    path = folder / "upstream_fusionx_like.safetensors"
    save_file(tensors, str(path))
    return path, expected


def peft_layout(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """PEFT/diffusers: lora_A/lora_B with transformer. (diffusers module names) and diffusion_model. prefixes."""
    tensors: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    for i, (stem, param) in enumerate(
        [
            ("transformer.blocks.0.attn1.to_k", "blocks.0.self_attn.k.weight"),
            ("transformer.blocks.1.attn2.to_out.0", "blocks.1.cross_attn.o.weight"),
            ("transformer.blocks.1.ffn.net.2", "blocks.1.ffn.2.weight"),
            (
                "diffusion_model.blocks.0.audio_cross_attn.q_linear",
                "blocks.0.audio_cross_attn.q_linear.weight",
            ),
            ("transformer.condition_embedder.text_embedder.linear_1", "text_embedding.0.weight"),
        ]
    ):
        down, up = _pair(param, seed=200 + 10 * i)
        adapter = ".default" if i == 1 else ""
        tensors[f"{stem}.lora_A{adapter}.weight"], tensors[f"{stem}.lora_B{adapter}.weight"] = down, up
        expected[param] = _delta(down, up)
    bias = _rand(SHAPES["blocks.0.self_attn.v.bias"][0], seed=300)
    tensors["transformer.blocks.0.attn1.to_v.lora_B.bias"] = bias
    expected["blocks.0.self_attn.v.bias"] = bias
    path = folder / "peft.safetensors"
    save_file(tensors, str(path))
    return path, expected


def kohya_layout(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """kohya/musubi: lora_unet_<underscored path>.lora_down/lora_up/.alpha (alpha = rank/2 and = rank)."""
    tensors: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    for i, (flat, param, alpha) in enumerate(
        [
            ("lora_unet_blocks_0_self_attn_v", "blocks.0.self_attn.v.weight", RANK / 2),
            ("lora_unet_blocks_1_ffn_2", "blocks.1.ffn.2.weight", float(RANK)),
            ("lora_unet__blocks_1_cross_attn_v_img", "blocks.1.cross_attn.v_img.weight", 1.5),
            ("lora_unet_blocks_0.audio_cross_attn.proj", "blocks.0.audio_cross_attn.proj.weight", RANK / 4),
        ]
    ):
        down, up = _pair(param, seed=400 + 10 * i)
        tensors[f"{flat}.lora_down.weight"], tensors[f"{flat}.lora_up.weight"] = down, up
        tensors[f"{flat}.alpha"] = torch.tensor(alpha)
        expected[param] = _delta(down, up, alpha / RANK)
    path = folder / "kohya.safetensors"
    save_file(tensors, str(path))
    return path, expected


LAYOUTS = {"upstream": upstream_layout, "peft": peft_layout, "kohya": kohya_layout}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    model = MultiTalkDiT(DiTConfig.tiny()).init_weights(seed=5)
    folder = tmp_path_factory.mktemp("tiny_lora_base")
    save_checkpoint(model, folder, num_shards=2)
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_merges_to_exactly_w_plus_s_dw(layout, base, tmp_path):
    folder, weights = base
    path, expected = LAYOUTS[layout](tmp_path)
    scale = 0.75
    adapter = read_lora(path, SHAPES, scale)
    assert set(adapter.deltas) == set(expected)
    merged = load_model(folder, device="cpu", dtype=torch.float32, loras=[adapter]).state_dict()
    for key, w in weights.items():
        if key in expected:
            assert torch.equal(merged[key], w + expected[key] * scale), key
        else:
            assert torch.equal(merged[key], w), key


def test_merge_equals_upstreams_fp32_merge_and_stacks_loras(base, tmp_path):
    """Upstream's WanLoraWrapper (fp32 on CPU): ``param.add_(matmul(up, down) * scale)`` per LoRA in order."""
    folder, weights = base
    up_path, _ = upstream_layout(tmp_path)
    kohya_path, _ = kohya_layout(tmp_path)
    adapters = read_loras([up_path, kohya_path], [1.0, 0.5], SHAPES)
    merged = load_model(folder, device="cpu", dtype=torch.float32, loras=adapters).state_dict()
    from safetensors.torch import load_file

    ref = {k: v.clone() for k, v in weights.items()}
    for key, t in load_file(str(up_path)).items():  # upstream's own pairing rules, written out here
        name = key.removeprefix("diffusion_model.")
        if key.endswith("lora_down.weight"):
            up = load_file(str(up_path))[key.replace("lora_down", "lora_up")]
            target = name.replace("lora_down.weight", "weight")
            ref[target].add_((up.flatten(1) @ t.flatten(1)).view(ref[target].shape) * 1.0)
        elif key.endswith(".diff_b"):
            ref[name.replace("diff_b", "bias")].add_(t * 1.0)
        elif key.endswith(".diff"):
            ref[name.replace("diff", "weight")].add_(t * 1.0)
        elif key.endswith(".diff_m"):  # upstream skips diff_m; lightx2v I2V files carry it
            ref[name.replace("diff_m", "modulation")].add_(t * 1.0)
    second = read_lora(kohya_path, SHAPES, 0.5)
    for key, delta in second.deltas.items():
        ref[key].add_(delta.rows() * 0.5)
    for key in weights:
        assert torch.equal(merged[key], ref[key]), key


def test_bf16_merge_rounds_once_from_fp32(base, tmp_path):
    folder, weights = base
    path, expected = peft_layout(tmp_path)
    merged = load_model(
        folder, device="cpu", dtype=torch.bfloat16, loras=[read_lora(path, SHAPES)]
    ).state_dict()
    key = "blocks.0.self_attn.k.weight"
    assert merged[key].dtype == torch.bfloat16
    assert torch.equal(merged[key], (weights[key] + expected[key]).to(torch.bfloat16))


def _write(tmp_path: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize(
    ("tensors", "named"),
    [
        ({"diffusion_model.blocks.7.self_attn.q.lora_down.weight": torch.zeros(2, 64),
          "diffusion_model.blocks.7.self_attn.q.lora_up.weight": torch.zeros(64, 2)}, "blocks.7.self_attn.q"),
        ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 64),
          "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(65, 2)}, "lora_up.weight"),
        ({"diffusion_model.blocks.0.norm3.diff": torch.zeros(63)}, "blocks.0.norm3.diff"),
        ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 64)}, "lora_down.weight"),
        ({"lora_unet_blocks_0_selfattn_q.lora_down.weight": torch.zeros(2, 64),
          "lora_unet_blocks_0_selfattn_q.lora_up.weight": torch.zeros(64, 2)}, "lora_unet_blocks_0_selfattn_q"),
        ({"diffusion_model.blocks.0.self_attn.q.weight": torch.zeros(64, 64)}, "self_attn.q.weight"),
    ],
)  # fmt: skip
def test_bad_key_or_shape_is_refused_by_name(tensors, named, tmp_path):
    path = _write(tmp_path, "bad_lora.safetensors", tensors)
    with pytest.raises(LoraError) as err:
        read_lora(path, SHAPES)
    assert err.value.field == "lora_dir"
    assert named in err.value.message and "bad_lora.safetensors" in err.value.message


def test_scales_and_files_are_checked(tmp_path):
    path, _ = peft_layout(tmp_path)
    with pytest.raises(LoraError) as err:
        read_loras([path, path], [1.0, 0.5, 0.2], SHAPES)
    assert err.value.field == "lora_scale"
    with pytest.raises(LoraError) as err:
        read_lora(tmp_path / "missing.safetensors", SHAPES)
    assert "missing.safetensors" in err.value.message
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoraError):
        read_lora(tmp_path / "junk.safetensors", SHAPES)
    assert [a.scale for a in read_loras([path, path], [0.5], SHAPES)] == [0.5, 0.5]


def test_merged_source_merges_only_the_requested_rows(base, tmp_path):
    from inference.checkpoint.loader import open_checkpoint

    folder, weights = base
    path, expected = upstream_layout(tmp_path)
    adapter = read_lora(path, SHAPES, 2.0)
    key = "blocks.1.ffn.0.weight"
    src = MergedSource(open_checkpoint(folder)[key], [(adapter.deltas[key], 2.0)])
    rows = slice(40, 90)
    got = src.load(dtype=torch.float32, rows=rows)
    assert got.shape == (50, SHAPES[key][1])
    assert torch.equal(got, weights[key][rows] + expected[key][rows] * 2.0)


def _inputs(seed: int = 3) -> dict[str, torch.Tensor]:
    from tests.test_batched_guidance import clip_tensors

    t = clip_tensors(seed)
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(1, 16, 3, 4, 6, generator=g),
        "t": torch.tensor([640.0]),
        "context": t["context"],
        "clip_fea": t["clip_fea"],
        "y": t["y"],
        "audio": t["audio"],
        "ref_target_masks": t["ref_target_masks"],
    }


def test_switchable_equals_merged_and_off_equals_base(base, tmp_path):
    folder, _ = base
    paths = [upstream_layout(tmp_path)[0], peft_layout(tmp_path)[0], kohya_layout(tmp_path)[0]]
    adapters = read_loras(paths, [1.0, 0.8, 1.2], SHAPES)
    merged = load_model(folder, device="cpu", dtype=torch.float32, loras=adapters)
    plain = load_model(folder, device="cpu", dtype=torch.float32)
    switch = load_model(folder, device="cpu", dtype=torch.float32)
    bank = AdapterBank(switch, adapters)
    assert bank.hooked_layers > 0 and bank._swaps  # both mechanisms are exercised
    inp = _inputs()
    with torch.no_grad():
        want_on, want_off = merged(**inp), plain(**inp)
        off = switch(**inp)
        bank.set_active(True)
        on = switch(**inp)
        bank.set_active(False)
        off_again = switch(**inp)
        bank.set_active(True)
        on_again = switch(**inp)
    assert (on - want_on).abs().max().item() <= 1e-6
    assert torch.equal(off, want_off) and torch.equal(off_again, want_off)
    assert torch.equal(on_again, on)
    assert (on - off).abs().max().item() > 1e-3  # negative control: the adapters change the output
    bank.remove()
    with torch.no_grad():
        assert torch.equal(switch(**inp), want_off)


def _fsdp_rank(ctx, folder: str, lora_paths: list[str], scales: list[float]) -> dict:
    from inference.parallel.fsdp import load_dit

    sp = ctx.sequence_parallel()
    adapters = read_loras(lora_paths, scales, SHAPES)
    out = {}
    with torch.no_grad():
        merged = load_dit(folder, ctx, "full", config=DiTConfig.tiny(), dtype=torch.float32, loras=adapters)
        out["merged"] = merged(**_inputs(), sp=sp)
        keep = load_dit(folder, ctx, "keep", config=DiTConfig.tiny(), dtype=torch.float32)
        bank = AdapterBank(keep, adapters)
        out["off"] = keep(**_inputs(), sp=sp)
        bank.set_active(True)
        out["on"] = keep(**_inputs(), sp=sp)
        bank.set_active(False)
        out["off_again"] = keep(**_inputs(), sp=sp)
    return out


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_fsdp2_ranks_merge_their_row_slices(base, tmp_path):
    folder, _ = base
    paths = [str(upstream_layout(tmp_path)[0]), str(kohya_layout(tmp_path)[0])]
    scales = [1.0, 0.5]
    adapters = read_loras(paths, scales, SHAPES)
    merged = load_model(folder, device="cpu", dtype=torch.float32, loras=adapters)
    plain = load_model(folder, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        want_on, want_off = merged(**_inputs(), sp=NoParallel()), plain(**_inputs(), sp=NoParallel())
    results = run_spmd(_fsdp_rank, 2, str(folder), paths, scales, timeout_s=120)
    for res in results:
        assert (res["merged"] - want_on).abs().max().item() <= 1e-5
        assert (res["on"] - want_on).abs().max().item() <= 1e-5
        assert (res["off"] - want_off).abs().max().item() <= 1e-5
        assert torch.equal(res["off_again"], res["off"])
        assert (res["on"] - res["off"]).abs().max().item() > 1e-3


# ------------------------------------------------------------------------------------ the generate CLI


def upstream_job(folder: Path) -> Path:
    """An upstream-format job (cond_image + tts_audio) with a two-person scene image."""
    import json

    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (896, 448), (200, 200, 150))
    draw = ImageDraw.Draw(image)
    for x in (150, 600):
        draw.ellipse((x, 80, x + 150, 230), fill=(240, 200, 170))
        draw.rectangle((x - 20, 230, x + 170, 448), fill=(40, 70, 120))
    image.save(folder / "scene.png")
    job = {"prompt": "Two people talk.", "cond_image": "scene.png",
           "tts_audio": {"text": "(s1) Hello there. (s2) Hi, how are you?", "human1_voice": "af_heart",
                         "human2_voice": "am_adam"}}  # fmt: skip
    (folder / "job.json").write_text(json.dumps(job))
    return folder / "job.json"


def tiny_distill_lora(path: Path) -> Path:
    """A lightx2v-like file (upstream layout) for the tiny DiT."""
    tensors = {}
    for i in range(2):
        for j, module in enumerate(("self_attn.q", "self_attn.k", "ffn.0", "cross_attn.o")):
            down, up = _pair(f"blocks.{i}.{module}.weight", seed=500 + 10 * i + j)
            tensors[f"diffusion_model.blocks.{i}.{module}.lora_down.weight"] = down
            tensors[f"diffusion_model.blocks.{i}.{module}.lora_up.weight"] = up
    tensors["diffusion_model.blocks.0.norm3.diff"] = _rand(*SHAPES["blocks.0.norm3.weight"], seed=600)
    save_file(tensors, str(path))
    return path


def upstream_command(tiny_weights: Path, job: Path, save_file_name: Path, *extra: str) -> list[str]:
    """Upstream README's command line (paths pointed at the tiny weights), plus ``--preset tiny``."""
    return ["--preset", "tiny", "--ckpt_dir", str(tiny_weights / "Wan2.1-I2V-14B-480P"),
            "--wav2vec_dir", str(tiny_weights / "chinese-wav2vec2-base"), "--input_json", str(job),
            "--save_file", str(save_file_name), "--mode", "clip", *extra]  # fmt: skip


@pytest.mark.slow
def test_upstream_lora_command_renders_the_fast_preset_with_8_passes_per_clip(tiny_weights, tmp_path):
    import json

    from tests.test_generate import explain, run_cli

    job = upstream_job(tmp_path / "job")
    lora = tiny_distill_lora(tmp_path / "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors")
    flags = ["--lora_dir", str(lora), "--lora_scale", "1.0", "--sample_steps", "4", "--sample_text_guide_scale",
             "1", "--sample_audio_guide_scale", "2", "--sample_shift", "2"]  # fmt: skip
    proc = run_cli(upstream_command(tiny_weights, job, tmp_path / "out" / "fast", *flags))
    assert proc.returncode == 0, explain(proc)
    assert (tmp_path / "out" / "fast.mp4").is_file()
    record = json.loads((tmp_path / "out" / "fast.render.json").read_text())
    s = record["settings"]
    assert (s["lora"], s["steps"], s["text_guidance"], s["audio_guidance"], s["shift"]) == (
        True,
        4,
        1.0,
        2.0,
        2.0,
    )
    assert record["passes"]["per_clip"] == [
        {"clip": 0, "passes": 8, "computed": 8, "skipped": 0, "model_calls": 4}  # 4 steps x 2, batched
    ]
    # A LoRA that does not fit the model is refused by name, exit 2, before the DiT loads.
    bad = tmp_path / "bad.safetensors"
    save_file({"diffusion_model.blocks.9.self_attn.q.lora_down.weight": torch.zeros(2, 64),
               "diffusion_model.blocks.9.self_attn.q.lora_up.weight": torch.zeros(64, 2)}, str(bad))  # fmt: skip
    proc = run_cli(upstream_command(tiny_weights, job, tmp_path / "out" / "bad", "--lora_dir", str(bad)))
    assert proc.returncode == 2 and "blocks.9.self_attn.q" in proc.stderr, explain(proc)
    assert "DiT loaded" not in proc.stderr


def test_one_model_serves_lora_and_plain_jobs_per_clip(base, tmp_path):
    """Switchable adapters inside denoise_clip: a job with settings.lora equals the merged model's clip,
    the next job without it equals the plain model's, on the same loaded weights."""
    from inference.render.pipeline import denoise_clip
    from inference.render.settings import GenerationSettings
    from tests.test_batched_guidance import clip_tensors

    folder, _ = base
    adapters = read_loras([upstream_layout(tmp_path)[0]], [1.0], SHAPES)
    merged = load_model(folder, device="cpu", dtype=torch.float32, loras=adapters)
    plain = load_model(folder, device="cpu", dtype=torch.float32)
    shared = load_model(folder, device="cpu", dtype=torch.float32)
    bank = AdapterBank(shared, adapters)
    tensors = clip_tensors(seed=8)
    fast = GenerationSettings(steps=3, text_guidance=1.0, audio_guidance=2.0, shift=2.0, lora=True, seed=4)
    quality = GenerationSettings(steps=3, seed=4)
    with torch.no_grad():
        got_fast = denoise_clip(shared, tensors, fast, clip_index=0, adapters=bank, batched=True)
        got_quality = denoise_clip(shared, tensors, quality, clip_index=0, adapters=bank, batched=True)
        want_fast = denoise_clip(merged, tensors, fast, clip_index=0, batched=True)
        want_quality = denoise_clip(plain, tensors, quality, clip_index=0, batched=True)
        wrong = denoise_clip(plain, tensors, fast, clip_index=0, batched=True)  # negative control
    # W x + s B(A x) against (W + s B A) x: float rounding only, relative to the latent's size.
    assert (got_fast - want_fast).abs().max().item() <= 1e-6 * want_fast.abs().max().item()
    assert torch.equal(got_quality, want_quality)
    assert (wrong - want_fast).abs().max().item() > 1e-3


def test_api_info_says_which_presets_need_the_lora(tmp_path):
    from fastapi.testclient import TestClient

    from inference.render.settings import LoraState
    from service.api import ServiceInfo, create_app
    from service.jobs import JobStore

    store = JobStore(tmp_path / "jobs.sqlite", tmp_path / "outputs")
    try:
        for lora, fast_uses, quality_offered in (
            (LoraState(), False, True),
            (LoraState.of("switchable", ["Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32"]), True, True),
            (LoraState.of("merged", ["Wan2.1_I2V_14B_FusionX_LoRA"]), True, False),
        ):
            info = TestClient(create_app(store, ServiceInfo(lora=lora))).get("/api/info").json()
            presets = info["presets"]
            assert presets["fast"]["offered"] and presets["fast"]["uses_lora"] is fast_uses
            assert presets["quality"]["offered"] is quality_offered and not presets["quality"]["uses_lora"]
            if fast_uses:
                assert presets["fast"]["steps"] == lora.steps and presets["fast"]["text_guidance"] == 1.0
        assert presets["fast"]["steps"] == 8  # FusionX
    finally:
        store.close()
