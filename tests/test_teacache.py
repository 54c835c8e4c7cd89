"""TeaCache: upstream's decisions in 3-pass mode, right bookkeeping in 2-pass mode, residual reuse, a tiny
clip with skips (and none at the strictest threshold), and identical decisions on 2 gloo ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.model.config import DiTConfig
from inference.model.dit import MultiTalkDiT
from inference.render.pipeline import branch_model_fns, denoise_clip
from inference.render.sampler import PassStats, noise_for_clip, sample_clip, timesteps
from inference.render.settings import GenerationSettings, SettingsError
from inference.render.teacache import COEFFICIENTS, TeaCache, TeaCacheConfig, teacache_for
from tests.dist_harness import run_spmd
from tests.test_batched_guidance import clip_tensors


def _modulations(steps: int, seed: int = 0) -> list[torch.Tensor]:
    """A slowly drifting e0 per step [1, 6, 8] (the same for every branch, as e0 depends on t only)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 6, 8, generator=g) + 3.0
    drift = torch.randn(1, 6, 8, generator=g)
    return [base + drift * (0.004 * i + 0.0005 * i * i) for i in range(steps)]


def upstream_decisions(mods: list[torch.Tensor], thresh: float, steps: int, passes: int = 3) -> list[bool]:
    """Upstream's class-level bookkeeping (``cnt % 3`` slots, ret_steps 15 calls, reset every steps*3),
    written out independently: per call, True when the blocks run."""
    coeffs = COEFFICIENTS[(True, 480)]
    cnt, ret, num = 0, 5 * 3, steps * 3
    acc: dict[int, float] = {}
    prev: dict[int, torch.Tensor] = {}
    out = []
    for step in range(steps):
        for _ in range(passes):
            slot, m = cnt % 3, mods[step]
            if cnt < ret:
                calc, acc[slot] = True, 0.0
            else:
                rel = ((m - prev[slot]).abs().mean() / prev[slot].abs().mean()).item()
                acc[slot] += float(np.poly1d(coeffs)(rel))
                calc = acc[slot] >= thresh
                if calc:
                    acc[slot] = 0.0
            prev[slot] = m.clone()
            out.append(calc)
            cnt = 0 if cnt + 1 >= num else cnt + 1
    return out


class _Blocks:
    """Stand-in block stack: adds 1 + call index, and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + float(self.calls)


def _drive(cache: TeaCache, mods: list[torch.Tensor], branches: tuple[str, ...], batched: bool) -> _Blocks:
    blocks = _Blocks()
    for m in mods:
        groups = [branches] if batched else [(b,) for b in branches]
        for group in groups:
            n = len(group)
            x = torch.zeros(n, 2, 4)
            cache.run(group, x, m[:, 0].expand(n, -1), m.expand(n, -1, -1), blocks)
    return blocks


@pytest.mark.parametrize("thresh", [0.2, 0.5])
def test_three_pass_decisions_match_upstream(thresh):
    steps = 20
    mods = _modulations(steps)
    cache = TeaCache(TeaCacheConfig(thresh, 480, steps))
    _drive(cache, mods, ("cond", "drop_text", "uncond"), batched=False)
    ours = [computed for _, _, computed in cache.decisions]
    ref = upstream_decisions(mods, thresh, steps)
    assert ours == ref
    assert not all(ref) and sum(not c for c in ref) == cache.stats.skipped  # some skipped


def test_two_pass_keeps_each_branch_apart():
    """2-pass: each branch has its own state; retention is the first 5 steps of each (upstream's cnt % 3
    would retain 7.5 steps and hand cond's residual to drop_audio)."""
    steps = 16
    mods = _modulations(steps)
    two = TeaCache(TeaCacheConfig(0.5, 480, steps))
    _drive(two, mods, ("cond", "drop_audio"), batched=False)
    one = TeaCache(TeaCacheConfig(0.5, 480, steps))
    _drive(one, mods, ("cond",), batched=False)
    per_branch = {b: [c for bb, _, c in two.decisions if bb == b] for b in ("cond", "drop_audio")}
    single = [c for _, _, c in one.decisions]
    assert per_branch["cond"] == per_branch["drop_audio"] == single
    assert all(per_branch["cond"][:5]) and not all(per_branch["cond"])
    upstream = upstream_decisions(mods, 0.5, steps, passes=2)
    assert upstream != [c for _, _, c in two.decisions]  # the bookkeeping upstream gets wrong


def test_skip_reuses_each_branch_residual_and_batched_decides_alike():
    steps = 12
    mods = _modulations(steps)
    seq = TeaCache(TeaCacheConfig(0.5, 480, steps))
    _drive(seq, mods, ("cond", "drop_text", "uncond"), batched=False)
    bat = TeaCache(TeaCacheConfig(0.5, 480, steps))
    _drive(bat, mods, ("cond", "drop_text", "uncond"), batched=True)
    assert [d[2] for d in seq.decisions] == [d[2] for d in bat.decisions]
    # A skip adds the last residual of that branch: rows get different residuals.
    cache = TeaCache(TeaCacheConfig(1.0, 480, steps))
    blocks = _Blocks()
    x = torch.zeros(2, 2, 4)
    for i, m in enumerate(mods):
        out = cache.run(("cond", "drop_audio"), x, m[:, 0].expand(2, -1), m.expand(2, -1, -1), blocks)
        if i >= 5 and blocks.calls == 5:  # skipped since step 5: the residual of the 5th call
            assert torch.equal(out, x + 5.0)
    assert cache.stats.skipped > 0


def test_config_and_settings_validation():
    with pytest.raises(ValueError):
        TeaCacheConfig(5.0, 480, 10)
    with pytest.raises(ValueError):
        TeaCacheConfig(0.2, 600, 10)
    with pytest.raises(SettingsError) as err:
        GenerationSettings(teacache=True, teacache_thresh=0.0)
    assert err.value.field == "teacache_thresh"
    assert teacache_for(GenerationSettings()) is None
    cache = teacache_for(GenerationSettings(teacache=True, teacache_thresh=0.3, resolution=720, steps=9))
    assert cache is not None and cache.config.coefficients == COEFFICIENTS[(True, 720)]
    assert TeaCacheConfig(0.2, 480, 10, use_ret_steps=False).retained(9)


@pytest.fixture(scope="module")
def model() -> MultiTalkDiT:
    return MultiTalkDiT(DiTConfig.tiny()).init_weights(seed=3).eval().requires_grad_(False)


@pytest.mark.parametrize("text", [5.0, 1.0])
def test_tiny_clip_counts_computed_and_skipped_passes(model, text):
    tensors = clip_tensors(seed=6)
    loose = GenerationSettings(steps=12, text_guidance=text, seed=3, teacache=True, teacache_thresh=1.0)
    strict = GenerationSettings(steps=12, text_guidance=text, seed=3, teacache=True, teacache_thresh=0.01)
    branches = 2 if text == 1.0 else 3
    got = {}
    with torch.no_grad():
        for name, settings in (("loose", loose), ("strict", strict)):
            for batched in (False, True):
                stats = PassStats()
                latent = denoise_clip(model, tensors, settings, clip_index=0, batched=batched, stats=stats)
                got[name, batched] = (stats, latent)
    for batched in (False, True):
        stats = got["loose", batched][0]
        assert stats.passes == 12 * branches and stats.skipped > 0
        assert stats.computed + stats.skipped == stats.passes
        assert stats.skipped % branches == 0  # branches skip together (same timestep distance)
        assert got["strict", batched][0].skipped == 0  # negative control
    seq, bat = got["loose", False][0], got["loose", True][0]
    assert (seq.passes, seq.skipped) == (bat.passes, bat.skipped)
    assert (seq.model_calls, bat.model_calls) == (12 * branches, 12)
    assert (got["loose", False][1] - got["loose", True][1]).abs().max().item() <= 1e-6


def _rank_teacache(ctx, state: dict, tensors: dict, settings_dict: dict) -> dict:
    sp = ctx.sequence_parallel()
    model = MultiTalkDiT(DiTConfig.tiny()).eval().requires_grad_(False)
    model.load_state_dict(state)
    settings = GenerationSettings.from_dict(settings_dict)
    out = {}
    with torch.no_grad():
        for batched in (False, True):
            stats = PassStats()
            cache = teacache_for(settings, sp, stats)
            model_fn, batch_fn = branch_model_fns(model, tensors, settings, sp=sp, cache=cache)
            noise = noise_for_clip(settings.seed, 0, (16, 3, 4, 6))
            latent = sample_clip(model_fn, noise, timesteps(settings.steps, settings.effective_shift), settings,
                                 batch_fn=batch_fn if batched else None, stats=stats)  # fmt: skip
            out[batched] = (cache.decisions, stats.to_dict(), latent)
    return out


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_decisions_identical_on_two_gloo_ranks(model):
    tensors = clip_tensors(seed=6)
    settings = GenerationSettings(steps=12, seed=3, teacache=True, teacache_thresh=1.0)
    stats = PassStats()
    cache = teacache_for(settings, None, stats)
    model_fn, _ = branch_model_fns(model, tensors, settings, cache=cache)
    with torch.no_grad():
        ref = sample_clip(model_fn, noise_for_clip(3, 0, (16, 3, 4, 6)),
                          timesteps(settings.steps, settings.effective_shift), settings, stats=stats)  # fmt: skip
    results = run_spmd(_rank_teacache, 2, model.state_dict(), tensors, settings.to_dict(), timeout_s=120)
    for res in results:
        for batched in (False, True):
            decisions, rank_stats, latent = res[batched]
            assert decisions == results[0][batched][0] == cache.decisions
            assert rank_stats["skipped"] == stats.skipped > 0 and rank_stats["passes"] == stats.passes
            assert (latent - ref).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_teacache_job_reports_computed_and_skipped_passes(tiny_weights, tmp_path):
    """Upstream's --use_teacache on a tiny 3-pass job: the render record counts computed and skipped passes."""
    import json

    from tests.test_generate import explain, run_cli
    from tests.test_lora import upstream_command, upstream_job

    job = upstream_job(tmp_path / "job")
    flags = ["--sample_steps", "8", "--use_teacache", "--teacache_thresh", "1.0"]
    proc = run_cli(upstream_command(tiny_weights, job, tmp_path / "out" / "tea", *flags))
    assert proc.returncode == 0, explain(proc)
    record = json.loads((tmp_path / "out" / "tea.render.json").read_text())
    assert record["settings"]["teacache"] is True and record["settings"]["lora"] is False
    passes = record["passes"]
    assert passes["passes"] == 8 * 3 and passes["computed"] + passes["skipped"] == 24
    assert passes["skipped"] > 0 and passes["computed"] >= 5 * 3  # the first 5 steps always run
