"""Ring attention and Ulysses x ring (``UnifiedSequenceParallel``) against one process, on gloo ranks.

Two levels, each with a negative control (the running output merged without its log-sum-exp rescale):

- the attention seam alone: random q/k/v, a 1-D RoPE by global position (with the chunk offset), a
  routing-like ``head_fn`` whose heads are weighted by their global index; S = 18 and 17 (padding);
- the tiny MultiTalk DiT (4 heads): self-attention, the speaker routing map (L-RoPE) and the
  frame-local audio cross-attention on chunks that start mid-frame, with one and two persons.

2 ranks: ring 2. 4 ranks: Ulysses 2 x ring 2 and ring 4 (the last ring chunk at S = 18 holds padding).
Also single-process checks of the layout rules and the LSE kernel, and the generate CLI under torchrun
at ``--ring_size 2`` against one process on the rendered frames (within one 8-bit level; the frame
comparison's own negative control is ``test_generate``'s other-seed render).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.model.attention import attention, attention_with_lse
from inference.model.sp import NoParallel
from inference.parallel.context import ParallelContext
from inference.parallel.layout import ParallelConfigError, ParallelLayout, resolve_layout
from inference.parallel.ring import UnifiedSequenceParallel, merge_partial
from inference.render.video_io import probe_media
from tests.dist_harness import run_spmd
from tests.test_generate import max_level_diff, render
from tests.test_parallel_model import dit_inputs, tiny_dit

logger = logging.getLogger(__name__)

HEADS, HEAD_DIM, N_REF = 8, 16, 6
TOL = 1e-5


def rope_1d(x: torch.Tensor, start: int = 0) -> torch.Tensor:
    """x: [B, n, h, D] at global positions start.. -> rotated pairs of channels."""
    n, d = x.shape[1], x.shape[-1]
    inv = 1.0 / (100.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.arange(start, start + n, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(x.dtype)[None, :, None, :], ang.sin().to(x.dtype)[None, :, None, :]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def head_fn(q: torch.Tensor, k: torch.Tensor, head_start: int) -> torch.Tensor:
    """Per query: softmax over the first N_REF keys, mass on the even ones, heads weighted by global index."""
    scores = torch.einsum("bshd,bjhd->bhsj", q, k[:, :N_REF]) / math.sqrt(q.shape[-1])
    mass = scores.softmax(-1)[..., ::2].sum(-1)  # [B, h, Sq]
    weight = torch.arange(head_start + 1, head_start + 1 + q.shape[2], dtype=q.dtype)
    return (mass * weight[None, :, None]).sum(1)  # [B, Sq]


def _attention_checks(ctx: ParallelContext, layouts: list[tuple[int, int]]) -> dict:
    out: dict = {}
    for ulysses, ring in layouts:
        sp = ctx.with_layout(ParallelLayout(ulysses, ring)).sequence_parallel()
        assert isinstance(sp, UnifiedSequenceParallel), sp
        for seq_len, batch in ((18, 2), (17, 1)):
            g = torch.Generator().manual_seed(seq_len)
            q, k, v = (torch.randn(batch, seq_len, HEADS, HEAD_DIM, generator=g) for _ in range(3))
            ref, ref_stat = NoParallel().attention(q, k, v, seq_len, rope_1d, head_fn)
            sp.comm_bytes = dict.fromkeys(sp.comm_bytes, 0)
            got, stat = sp.attention(sp.shard(q), sp.shard(k), sp.shard(v), seq_len, rope_1d, head_fn)
            p2p = sp.comm_bytes["ring_p2p"]
            full = sp.gather(got.flatten(2), seq_len).view_as(ref)
            stat_full = sp.gather(stat[:, :, None], seq_len)[..., 0]  # [B, S_loc] -> [B, S]
            sp._rescale = False
            bad, _ = sp.attention(sp.shard(q), sp.shard(k), sp.shard(v), seq_len, rope_1d)
            sp._rescale = True
            bad_full = sp.gather(bad.flatten(2), seq_len).view_as(ref)
            out[(ulysses, ring, seq_len)] = {
                "attn": (full - ref).abs().max().item(),
                "stat": (stat_full - ref_stat).abs().max().item(),
                "no_rescale": (bad_full - ref).abs().max().item(),
                "ring_p2p": p2p,
                "chunk": sp.local_len(seq_len) * ulysses,
                "batch": batch,
            }
    return out


DIT_CASES = [("A", 2), ("A", 1), ("B", 2)]


def _dit_checks(ctx: ParallelContext, state: dict[str, torch.Tensor], layouts: list[tuple[int, int]]) -> dict:
    model = tiny_dit(seed=0)
    model.load_state_dict(state)
    out: dict = {}
    with torch.no_grad():
        for ulysses, ring in layouts:
            sp = ctx.with_layout(ParallelLayout(ulysses, ring)).sequence_parallel()
            for grid, persons in DIT_CASES:
                out[(ulysses, ring, grid, persons)] = model(**dit_inputs(grid, persons), sp=sp)
            sp._rescale = False
            out[(ulysses, ring, "no_rescale")] = model(**dit_inputs("A", 2), sp=sp)
    return out


def _rank_checks(
    ctx: ParallelContext, state: dict[str, torch.Tensor], layouts: list[tuple[int, int]]
) -> dict:
    """One spawn for both levels (starting ranks costs more than the checks)."""
    return {"attention": _attention_checks(ctx, layouts), "dit": _dit_checks(ctx, state, layouts)}


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.parametrize(("world_size", "layouts"), [(2, [(1, 2)]), (4, [(2, 2), (1, 4)])])
def test_ring_matches_single_process(world_size: int, layouts: list[tuple[int, int]]) -> None:
    model = tiny_dit()
    with torch.no_grad():
        ref = {case: model(**dit_inputs(*case), sp=NoParallel()) for case in DIT_CASES}
    results = run_spmd(_rank_checks, world_size, model.state_dict(), layouts, timeout_s=120)
    _check_attention([r["attention"] for r in results])
    _check_dit([r["dit"] for r in results], ref, layouts, world_size)


def _check_attention(results: list[dict]) -> None:
    for rank, res in enumerate(results):
        for (ulysses, ring, seq_len), r in res.items():
            assert r["attn"] <= TOL and r["stat"] <= TOL, (rank, ulysses, ring, seq_len, r)
            # Negative control: without the rescale of the running output the merge is wrong.
            assert r["no_rescale"] > 1e-2, (rank, ulysses, ring, seq_len, r)
            # Each rank sends its ring chunk's k and v (ring - 1) times: 2 x B x C x H/ulysses x D fp32.
            block = 2 * r["batch"] * r["chunk"] * (HEADS // ulysses) * HEAD_DIM * 4
            assert r["ring_p2p"] == (ring - 1) * block, (rank, r)
    logger.warning("ring attention (rank 0): %s", results[0])


def _check_dit(results: list[dict], ref: dict, layouts: list[tuple[int, int]], world_size: int) -> None:
    diffs: dict[str, float] = {}
    for rank, res in enumerate(results):
        for ulysses, ring in layouts:
            for case in DIT_CASES:
                d = (res[(ulysses, ring, *case)] - ref[case]).abs().max().item()
                key = f"U{ulysses}xR{ring}/{case[0]}/{case[1]}p"
                diffs[key] = max(diffs.get(key, 0.0), d)
                assert d <= TOL, (rank, key, d)
                assert torch.equal(res[(ulysses, ring, *case)], results[0][(ulysses, ring, *case)])
            bad = (res[(ulysses, ring, "no_rescale")] - ref[("A", 2)]).abs().max().item()
            diffs[f"U{ulysses}xR{ring}/no_rescale"] = bad
            assert bad > 1e-3, (rank, ulysses, ring, bad)  # the negative control must fail
    logger.warning(
        "P=%d tiny DiT max |diff| vs P=1: %s", world_size, {k: f"{v:.2e}" for k, v in diffs.items()}
    )


# ---- single process -------------------------------------------------------------------------------


def test_attention_with_lse_and_exact_merge() -> None:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 11, 3, 8, generator=g) for _ in range(3))
    out, lse = attention_with_lse(q, k, v)
    assert (out - attention(q, k, v)).abs().max().item() < 1e-6
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8)
    assert (lse - scores.logsumexp(-1)).abs().max().item() < 1e-5
    # Keys split into three blocks, merged in a scrambled order: the same result.
    acc = acc_lse = None
    for block in (slice(4, 9), slice(0, 4), slice(9, 11)):
        part, part_lse = attention_with_lse(q, k[:, block], v[:, block])
        acc, acc_lse = merge_partial(acc, acc_lse, part, part_lse)
    assert (acc - out).abs().max().item() < 1e-6 and (acc_lse - lse).abs().max().item() < 1e-5
    empty, empty_lse = attention_with_lse(q[:, :0], k, v)
    assert empty.shape == (2, 0, 3, 8) and empty_lse.shape == (2, 3, 0)


def test_layout_rules_name_the_flag() -> None:
    assert resolve_layout(8, None, 1, 40) == ParallelLayout(8, 1, 1)
    assert resolve_layout(8, 4, 2, 40) == ParallelLayout(4, 2, 1)
    assert resolve_layout(16, 8, 2, 40) == ParallelLayout(8, 2, 1)
    assert resolve_layout(16, None, 2, 40) == ParallelLayout(8, 2, 1)
    assert resolve_layout(6, None, 1, 40, cfg_parallel=True) == ParallelLayout(2, 1, 3)
    assert resolve_layout(4, None, 1, 40, cfg_parallel=True) == ParallelLayout(2, 1, 2)
    assert resolve_layout(16, 4, 2, 40, cfg_parallel=True) == ParallelLayout(4, 2, 2)
    assert resolve_layout(3, None, 1, 40, cfg_parallel=True) == ParallelLayout(1, 1, 3)
    bad = [
        ((8, None, 3, 40), "ring_size", "does not divide the number of processes"),
        ((8, 4, 1, 40), "ulysses_size", "must equal the number of processes"),
        ((6, 6, 1, 40), "ulysses_size", "does not divide the model's 40"),
        ((12, None, 1, 40), "ulysses_size", "does not divide the model's 40"),  # 12 heads per rank
        ((8, None, 0, 40), "ring_size", "at least 1"),
        ((6, 3, 1, 40, True), "ulysses_size", "does not divide"),
        ((8, 2, 1, 40, True), "cfg_parallel", "guidance groups"),  # 4 groups
        ((7, None, 1, 40, True), "cfg_parallel", "neither 3 nor 2"),
        ((1, None, 1, 40, True), "cfg_parallel", "neither 3 nor 2"),
    ]
    for args, field, text in bad:
        with pytest.raises(ParallelConfigError, match=text) as err:
            resolve_layout(*args)
        assert err.value.field == field, args


def test_layout_rank_order_keeps_ulysses_inside_a_node() -> None:
    layout = ParallelLayout(ulysses=8, ring=2)  # two 8-GPU nodes
    assert layout.ulysses_groups() == [list(range(8)), list(range(8, 16))]
    assert layout.ring_groups()[3] == [3, 11]  # only the ring crosses nodes
    cfg = ParallelLayout(ulysses=2, ring=1, cfg=3)
    assert cfg.sp_groups() == [[0, 1], [2, 3], [4, 5]] and cfg.cfg_groups() == [[0, 2, 4], [1, 3, 5]]
    assert [cfg.coords(r) for r in (0, 3, 5)] == [(0, 0, 0), (1, 0, 1), (2, 0, 1)]


# ---- torchrun: the generate CLI at --ring_size 2 ----------------------------------------------------

SHORT_SCRIPT = "(s1) Hello there.\n(s2) Hi, how are you?"


@pytest.fixture(scope="module")
def short_job(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path, portrait_pngs) -> Path:
    """``weights`` (link to the session's tiny weights) and ``jobs/job.json``: a two-line script, one clip."""
    root = tmp_path_factory.mktemp("ring_render")
    (root / "weights").symlink_to(tiny_weights, target_is_directory=True)
    jobs = root / "jobs"
    jobs.mkdir()
    job = {"left_image": str(portrait_pngs[0]), "right_image": str(portrait_pngs[1]), "script": SHORT_SCRIPT,
           "voices": ["af_heart", "am_adam"], "prompt": "Two friends talking."}  # fmt: skip
    (jobs / "job.json").write_text(json.dumps(job))
    return jobs / "job.json"


@pytest.mark.slow  # two renders with encoders, TTS and ffmpeg: about a minute on 2 cores
@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_torchrun_ring_renders_the_same_frames(short_job: Path) -> None:
    one = render(short_job, short_job.parent.parent / "one")
    ring = render(short_job, short_job.parent.parent / "ring", "--ring_size", "2", ranks=2)
    a, b = np.load(one.frames), np.load(ring.frames)
    assert max_level_diff(a, b) <= 1
    assert probe_media(ring.out).frames == a.shape[0]
