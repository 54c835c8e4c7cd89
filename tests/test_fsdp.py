"""FSDP2 for inference on 2 gloo ranks (no sequence parallelism): off/full/keep equal the unsharded
model, sharded loading reads each rank's own rows, and the memory report reflects the sharding."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from inference.checkpoint.loader import open_checkpoint, save_checkpoint
from inference.model.config import DiTConfig
from inference.model.sp import NoParallel
from inference.parallel.context import ParallelContext
from inference.parallel.fsdp import (
    apply_fsdp,
    check_fsdp_mode,
    check_t5_fsdp,
    load_dit,
    param_bytes,
    report_memory,
)
from inference.parallel.layout import ParallelConfigError
from tests.dist_harness import run_spmd
from tests.test_parallel_model import dit_inputs, tiny_dit


def _rank_fsdp(ctx: ParallelContext, folder: str) -> dict:
    out: dict = {}
    inputs = dit_inputs("A", 2)
    with torch.no_grad():
        # In-memory model sharded after construction (every rank built the same seeded weights).
        for mode in ("off", "full", "keep"):
            model = apply_fsdp(tiny_dit(), ctx.mesh, mode)
            out[(mode, "dtensor")] = isinstance(model.blocks[0].self_attn.q.weight, DTensor)
            out[(mode, "rest")] = param_bytes(model)
            out[(mode, "out")] = [model(**inputs, sp=NoParallel()) for _ in range(2)]
            out[(mode, "after")] = param_bytes(model)  # after a forward: keep holds gathered weights

        # Sharded loading: each rank's rows equal what distribute_tensor (slicing locally) gives.
        model = load_dit(folder, ctx, "full", config=DiTConfig.tiny(), dtype=torch.float32)
        refs = open_checkpoint(folder)
        mismatched = []
        for key, p in model.state_dict().items():
            want = distribute_tensor(refs[key].load(), ctx.mesh, [Shard(0)], src_data_rank=None).to_local()
            if not torch.equal(p.to_local(), want):
                mismatched.append(key)
        out["load_mismatched"] = mismatched
        out["load_out"] = model(**inputs, sp=NoParallel())
        out["report"] = report_memory(model, ctx.device)
    return out


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_fsdp_modes_equal_unsharded(tmp_path) -> None:
    model = tiny_dit()
    save_checkpoint(model, tmp_path, num_shards=3)
    with torch.no_grad():
        ref = model(**dit_inputs("A", 2), sp=NoParallel())
    results = run_spmd(_rank_fsdp, 2, str(tmp_path), timeout_s=90)
    for rank, res in enumerate(results):
        assert res[("off", "dtensor")] is False
        assert res[("full", "dtensor")] is True and res[("keep", "dtensor")] is True
        for mode in ("off", "full", "keep"):
            for out in res[(mode, "out")]:
                assert (out - ref).abs().max().item() <= 1e-5, (rank, mode)
        local_off, total = res[("off", "rest")]
        assert local_off == total
        for mode in ("full", "keep"):
            local, _ = res[(mode, "rest")]
            assert local < 0.6 * total, (rank, mode, local, total)
        assert res[("full", "after")][0] < 0.6 * total  # resharded after forward
        assert res[("keep", "after")][0] > 0.9 * total  # gathered weights kept (root and blocks)
        assert res["load_mismatched"] == []
        assert (res["load_out"] - ref).abs().max().item() <= 1e-5
        assert "MiB on this rank of" in res["report"] and "peak host RSS" in res["report"]


def test_fsdp_options_are_checked() -> None:
    with pytest.raises(ParallelConfigError, match="unknown mode 'half'") as err:
        check_fsdp_mode("half")
    assert err.value.field == "dit_fsdp"
    with pytest.raises(ParallelConfigError, match="t5_cpu") as err:
        check_t5_fsdp(True, t5_cpu=True)  # sharded over the GPUs and kept on the CPU: not both
    assert err.value.field == "t5_fsdp"
    check_t5_fsdp(True)
    # One process: nothing to shard, the model is returned unchanged.
    model = tiny_dit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_fsdp(model, None, "full") is model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
