"""Ulysses sequence parallelism against single-process attention, on spawned gloo ranks.

The attention block here is self-contained (random q/k/v, a 1-D RoPE by global token index, a
routing-map-like ``head_fn``), so these tests do not depend on the DiT; the full-model parity
tests live in ``test_parallel_model.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from inference.model.attention import attend, attention
from inference.model.sp import NoParallel
from inference.parallel.context import ParallelContext
from inference.parallel.layout import ParallelConfigError, allowed_sizes, check_heads, check_parallel_sizes
from inference.parallel.ulysses import SequenceParallel
from tests.dist_harness import run_spmd

HEADS, HEAD_DIM, N_REF, N_CLASS = 8, 16, 6, 3


def rope_1d(x: torch.Tensor) -> torch.Tensor:
    """x: [B, S, h, D] -> rotated by the global token index 0..S-1 (pairs of channels)."""
    s, d = x.shape[1], x.shape[-1]
    inv = 1.0 / (100.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv[None, :]  # [S, D/2]
    cos, sin = ang.cos().to(x.dtype)[None, :, None, :], ang.sin().to(x.dtype)[None, :, None, :]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def make_head_fn(masks: torch.Tensor):
    """Routing-map-like statistic: per class, mean over its reference keys of softmax(q . k_ref).

    masks: [n, N_REF] bool. Each head's term is weighted by its *global* index + 1, so a wrong
    ``head_start`` or a head mix-up changes the result.
    """
    counts = masks.sum(-1).clamp(min=1).to(torch.float32)

    def head_fn(q: torch.Tensor, k: torch.Tensor, head_start: int) -> torch.Tensor:
        scores = torch.einsum("bshd,bjhd->bhsj", q, k[:, :N_REF]) / math.sqrt(q.shape[-1])
        probs = scores.softmax(-1)  # [B, h, S, N_REF]
        per_class = torch.einsum("bhsj,nj->bhns", probs, masks.to(probs.dtype)) / counts[:, None]
        weight = torch.arange(head_start + 1, head_start + 1 + q.shape[2], dtype=probs.dtype)
        return (per_class * weight[None, :, None, None]).sum(dim=(0, 1))  # [n, S]

    return head_fn


def _inputs(seq_len: int, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, seq_len, HEADS, HEAD_DIM, generator=g) for _ in range(3))
    masks = torch.rand(N_CLASS, N_REF, generator=g) > 0.4
    return q, k, v, masks


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _sp_checks(ctx: ParallelContext, cases: list[tuple[int, int]]) -> dict:
    """On every rank: compare Ulysses attention with the single-process reference for each (S, B)."""
    sp = ctx.sequence_parallel()
    assert isinstance(sp, SequenceParallel)
    p, out = ctx.world_size, {}

    # Collective round trips.
    x = torch.arange(2 * 13 * 5, dtype=torch.float32).view(2, 13, 5)
    loc = sp.shard(x)
    start, end = sp.token_range(13)
    out["shard_gather"] = torch.equal(sp.gather(loc, 13), x)
    out["token_range_ok"] = torch.equal(loc[:, : end - start], x[:, start:end]) and bool(
        (loc[:, end - start :] == 0).all()
    )
    chunks = torch.randn(p, 3, 4, generator=torch.Generator().manual_seed(ctx.rank))
    out["all_to_all_twice"] = torch.equal(sp._all_to_all(sp._all_to_all(chunks)), chunks)
    r = torch.tensor([float(ctx.rank), -float(ctx.rank)])
    out["max"] = sp.all_reduce_max(r).tolist()
    out["min"] = sp.all_reduce_min(r).tolist()

    ref_sp = NoParallel()
    for seq_len, batch in cases:
        q, k, v, masks = _inputs(seq_len, batch, seed=seq_len * 10 + batch)
        head_fn = make_head_fn(masks) if batch == 1 else None
        ref, ref_stat = ref_sp.attention(q, k, v, seq_len, rope_1d, head_fn)

        got, stat = sp.attention(sp.shard(q), sp.shard(k), sp.shard(v), seq_len, rope_1d, head_fn)
        full = sp.gather(got.flatten(2), seq_len).view_as(ref)
        res = {"attn": _max_diff(full, ref), "local_len": got.shape[1]}
        if head_fn is not None:
            assert stat is not None and stat.shape == (N_CLASS, sp.local_len(seq_len))
            res["stat"] = _max_diff(sp.gather(stat.T[None], seq_len)[0].T, ref_stat)

        sp._trim_padding = False  # negative control: pad keys enter attention
        bad, _ = sp.attention(sp.shard(q), sp.shard(k), sp.shard(v), seq_len, rope_1d)
        sp._trim_padding = True
        res["attn_untrimmed"] = _max_diff(sp.gather(bad.flatten(2), seq_len).view_as(ref), ref)
        out[(seq_len, batch)] = res
    out["comm_bytes"] = dict(sp.comm_bytes)
    return out


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("world_size", "cases"),
    [
        (2, [(18, 1), (17, 1), (18, 2)]),  # 18 divisible by 2; 17 needs one pad token
        (4, [(18, 1), (16, 1), (18, 2)]),  # 18 needs two pad tokens at P=4; 16 does not
    ],
)
def test_sp_attention_matches_single_process(world_size: int, cases: list[tuple[int, int]]) -> None:
    results = run_spmd(_sp_checks, world_size, cases, timeout_s=90)
    for rank, res in enumerate(results):
        assert res["shard_gather"] and res["token_range_ok"] and res["all_to_all_twice"], rank
        assert res["max"] == [world_size - 1, 0.0]
        assert res["min"] == [0.0, -(world_size - 1)]
        for seq_len, batch in cases:
            r = res[(seq_len, batch)]
            assert r["local_len"] == -(-seq_len // world_size)
            assert r["attn"] <= 1e-6, (rank, seq_len, r)
            if batch == 1:
                assert r["stat"] <= 1e-5, (rank, seq_len, r)
            padded = seq_len % world_size != 0
            if padded:
                # Negative control: leaving the pad keys in attention must break parity.
                assert r["attn_untrimmed"] > 1e-3, (rank, seq_len, r)
            else:
                assert r["attn_untrimmed"] <= 1e-6, (rank, seq_len, r)
        assert res["comm_bytes"]["all_to_all"] > 0 and res["comm_bytes"]["reduce_scatter"] > 0


# ---- single-process checks (no spawning) ----------------------------------------------------------


def test_check_heads_names_allowed_sizes() -> None:
    check_heads(40, 8)
    with pytest.raises(ParallelConfigError, match=r"allowed sizes: \[1, 2, 4, 5, 8, 10, 20, 40\]") as err:
        check_heads(40, 3)
    assert err.value.field == "ulysses_size"
    assert isinstance(err.value, ValueError)
    assert allowed_sizes(4) == [1, 2, 4]


def test_check_parallel_sizes() -> None:
    check_parallel_sizes(world_size=8, ulysses_size=8, ring_size=1, num_heads=40)
    # Layouts with a ring and guidance groups: tests/test_ring.py.
    with pytest.raises(ParallelConfigError, match="must equal the number of processes") as err:
        check_parallel_sizes(world_size=8, ulysses_size=4, ring_size=1, num_heads=40)
    assert err.value.field == "ulysses_size"
    with pytest.raises(ParallelConfigError, match="does not divide"):
        check_parallel_sizes(world_size=6, ulysses_size=6, ring_size=1, num_heads=40)


def test_single_context_and_from_env_without_torchrun() -> None:
    ctx = ParallelContext.single("cpu")
    assert (ctx.rank, ctx.world_size, ctx.distributed, ctx.device.type) == (0, 1, False, "cpu")
    assert isinstance(ctx.sequence_parallel(), NoParallel)
    assert ctx.destroy() is True
    assert ParallelContext.from_env(device="cpu", environ={}).world_size == 1
    with pytest.raises(ParallelConfigError, match="RANK") as err:
        ParallelContext.from_env(device="cpu", environ={"WORLD_SIZE": "2"})
    assert err.value.field == "RANK"
    with pytest.raises(ParallelConfigError, match="MASTER_ADDR"):
        ParallelContext.from_env(device="cpu", environ={"WORLD_SIZE": "2", "RANK": "1"})


def test_token_layout_without_communication() -> None:
    sp = SequenceParallel(None, 4, 3)
    assert (sp.padded_len(18), sp.local_len(18)) == (20, 5)
    assert sp.token_range(18) == (15, 18)  # the last rank holds 3 real tokens and 2 pads
    assert SequenceParallel(None, 4, 1).token_range(18) == (5, 10)
    assert SequenceParallel(None, 8, 7).token_range(5) == (5, 5)  # all padding
    x = torch.arange(18.0).view(1, 18, 1)
    assert sp.shard(x).flatten().tolist() == [15.0, 16.0, 17.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="rank"):
        SequenceParallel(None, 2, 2)


def test_no_parallel_is_plain_attention() -> None:
    q, k, v, masks = _inputs(10, 1, seed=3)
    out, stat = NoParallel().attention(q, k, v, 10, rope_1d, make_head_fn(masks))
    ref = attention(rope_1d(q), rope_1d(k), v)
    assert torch.equal(out, ref)
    assert torch.equal(attend(q, k, v), attention(q, k, v))  # CPU: SDPA
    assert stat is not None and stat.shape == (N_CLASS, 10)
