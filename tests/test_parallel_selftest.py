"""The parity self-test (``launch/selftest.sh N [--dtype bf16]``) on spawned gloo ranks.

bf16: the run passes with its epsilon-derived tolerance and routing-position check, and fails for two
speaker-routing errors that only bf16 rounding or the split exposes (negative controls): positions
normalised with this rank's min/max instead of the global ones, and positions left unrounded on the
P ranks while one process rounds them.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch

import inference.model.dit as dit
from inference.model.sp import NoParallel
from inference.parallel.context import ParallelContext
from inference.parallel.selftest import BF16_EPS, BF16_STEPS, _bf16_step, run_selftest
from tests.dist_harness import run_spmd
from tests.subprocess_env import offline_env

ROOT = Path(__file__).resolve().parents[1]


class _LocalOnly:
    """An ``sp`` whose min/max reductions forget the other ranks (the bug the control injects)."""

    def __init__(self, sp) -> None:
        self.sp = sp

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_reduce_min(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _selftests(ctx: ParallelContext) -> dict[str, str]:
    lines = {"fp32": run_selftest(ctx)[2], "bf16": run_selftest(ctx, torch.bfloat16)[2]}
    original = dit.routing_positions
    try:

        def local_min_max(ref_map, sp, class_range, class_interval, dtype):
            if isinstance(sp, NoParallel):
                return original(ref_map, sp, class_range, class_interval, dtype)
            return original(ref_map, _LocalOnly(sp), class_range, class_interval, dtype)

        dit.routing_positions = local_min_max
        lines["local_min_max"] = run_selftest(ctx, torch.bfloat16)[2]

        def unrounded(ref_map, sp, class_range, class_interval, dtype):
            rounded_to = dtype if isinstance(sp, NoParallel) else torch.float32
            return original(ref_map, sp, class_range, class_interval, rounded_to)

        dit.routing_positions = unrounded
        lines["unrounded"] = run_selftest(ctx, torch.bfloat16)[2]
    finally:
        dit.routing_positions = original
    return lines


def _field(line: str, name: str) -> float:
    match = re.search(rf"\b{name}=(\S+)", line)
    assert match is not None, (name, line)
    return float(match.group(1))


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_bf16_selftest_passes_and_catches_routing_errors() -> None:
    lines = run_spmd(_selftests, 2, timeout_s=200)[0]
    fp32, bf16 = lines["fp32"], lines["bf16"]
    assert fp32.startswith("selftest ok max_abs_diff=") and "tolerance=1e-05" in fp32, fp32
    assert bf16.startswith("selftest ok dtype=bf16 "), bf16
    # The stated tolerance is 2 x eps x max|reference|, and both comparisons are inside it.
    tolerance, scale = _field(bf16, "tolerance"), float(re.search(r"max\|reference\| (\S+)\)", bf16).group(1))
    assert tolerance == pytest.approx(BF16_STEPS * BF16_EPS * scale, rel=1e-3)
    assert _field(bf16, "max_abs_diff") <= tolerance and _field(bf16, "bf16_vs_fp32") <= tolerance
    assert _field(bf16, "routing_positions") == 3 * 2 * 21  # 3 variants x 2 blocks x 21 tokens
    assert _field(bf16, "beyond_one_step") == 0 and _field(bf16, "not_bf16") == 0
    # Negative controls: each routing error fails the bf16 self-test through the position check.
    assert lines["local_min_max"].startswith("selftest FAILED"), lines["local_min_max"]
    assert _field(lines["local_min_max"], "beyond_one_step") > 0
    assert lines["unrounded"].startswith("selftest FAILED"), lines["unrounded"]
    assert _field(lines["unrounded"], "not_bf16") > 0


def test_bf16_step_is_the_spacing_of_bf16_values() -> None:
    x = torch.tensor([1.0, 3.0, 20.0, 24.0, 0.75])
    step = _bf16_step(x)
    assert step.tolist() == [2**-7, 2**-6, 2**-3, 2**-3, 2**-8]
    up = (x + step).to(torch.bfloat16).float()
    assert torch.equal(up, x + step)  # the next bf16 value exists one step up
    assert torch.equal((x + step / 4).to(torch.bfloat16).float(), x)  # less than half a step rounds back


def test_selftest_script_rejects_an_unknown_dtype() -> None:
    proc = subprocess.run(["bash", "launch/selftest.sh", "2", "--dtype", "fp16"], cwd=ROOT, env=offline_env(),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "--dtype must be fp32 or bf16" in proc.stderr
