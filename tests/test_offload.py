"""Weights in CPU memory: DiT blocks streamed per forward (``--num_persistent_param_in_dit``) and encoders
offloaded between stages (``--offload_model``), each against the resident model on CPU.

Streaming must be bit-identical to the resident model (same tensors, same order, only copied in), with at
most two streamed blocks present at once, with and without Ulysses (2 gloo ranks). Negative controls: a
changed host copy of one block (or of an encoder) must change the output, so the comparison would catch a
streamer that used stale or wrong weights.
"""

from __future__ import annotations

import copy

import pytest
import torch

from inference.encoders import T5Encoder, WanVae
from inference.encoders.tiny import write_tiny_t5, write_tiny_vae
from inference.model.sp import NoParallel
from inference.parallel.context import ParallelContext
from inference.parallel.layout import ParallelConfigError
from inference.parallel.offload import EncoderHome, HostCopy, check_streaming, plan_streaming, stream_blocks
from tests.dist_harness import run_spmd
from tests.test_parallel_model import dit_inputs, tiny_dit


def _forward(model: torch.nn.Module, grid: str = "A", persons: int = 2, sp=None) -> torch.Tensor:
    with torch.no_grad():
        return model(**dit_inputs(grid, persons), sp=sp or NoParallel())


def _block_numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.blocks[0].parameters())


def _root_numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) - len(model.blocks) * _block_numel(model)


@pytest.mark.parametrize("persistent", ["none", "root", "root+1"])
def test_streamed_blocks_are_bit_identical_to_resident(persistent: str) -> None:
    ref_model = tiny_dit()
    ref = [_forward(ref_model, g, p) for g, p in (("A", 2), ("B", 1))]
    model = copy.deepcopy(ref_model)
    budget = {"none": 0, "root": _root_numel(model), "root+1": _root_numel(model) + _block_numel(model)}[
        persistent
    ]
    streamer = stream_blocks(model, "cpu", budget)
    kept = {"none": 0, "root": 0, "root+1": 1}[persistent]
    assert streamer.plan.persistent_blocks == kept
    assert streamer.plan.root_persistent == (persistent != "none")
    assert streamer.plan.resident_params <= budget

    present: list[int] = []

    def count(*_args: object) -> None:
        present.append(sum(c.loaded_on is not None for c in streamer._copies.values()))

    for block in model.blocks:
        block.register_forward_pre_hook(count)
    for _ in range(2):  # twice: a streamed model stays usable
        got = [_forward(model, g, p) for g, p in (("A", 2), ("B", 1))]
        for g, r in zip(got, ref, strict=True):
            assert torch.equal(g, r)
    assert max(present) <= 2 and max(present) >= 1
    # Between forwards the streamed blocks point at their host copies again.
    assert all(c.loaded_on is None for c in streamer._copies.values())


def test_streaming_negative_control_changed_host_copy_changes_the_output() -> None:
    ref_model = tiny_dit()
    ref = _forward(ref_model)
    model = copy.deepcopy(ref_model)
    streamer = stream_blocks(model, "cpu", 0)
    last = max(streamer._copies)
    hc = streamer._copies[last]
    weight = model.blocks[last].self_attn.q.weight
    host = hc._param_host[next(i for i, p in enumerate(hc._params) if p is weight)]
    # The streamed forward copies from the host copy: the module itself holds no device copy at rest.
    assert weight.data_ptr() == host.data_ptr()
    with torch.no_grad():
        host.add_(1e-3)  # one weight of one streamed block, in host memory
    assert not torch.equal(_forward(model), ref)


def _rank_stream(ctx: ParallelContext) -> dict:
    out = {}
    sp = ctx.sequence_parallel()
    out["resident"] = _forward(tiny_dit(), sp=sp)
    model = tiny_dit()
    stream_blocks(model, ctx.device, 0)
    out["streamed"] = _forward(model, sp=sp)
    return out


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_streaming_under_ulysses_two_ranks() -> None:
    single = _forward(tiny_dit())
    for res in run_spmd(_rank_stream, 2, timeout_s=100):
        assert torch.equal(res["streamed"], res["resident"])
        assert (res["streamed"] - single).abs().max().item() <= 1e-5


def test_plan_streaming_fills_root_then_blocks() -> None:
    model = tiny_dit()
    root, block = _root_numel(model), _block_numel(model)
    assert plan_streaming(model, 0).persistent_blocks == 0 and not plan_streaming(model, 0).root_persistent
    p = plan_streaming(model, root + block + block // 2)
    assert p.root_persistent and p.persistent_blocks == 1 and p.resident_params == root + block
    everything = plan_streaming(model, 10**12)
    assert everything.persistent_blocks == len(model.blocks)
    # A budget below the root skips the root (it is streamed per forward) and keeps blocks if they fit.
    assert (
        plan_streaming(model, block).persistent_blocks == 1
        and not plan_streaming(model, block).root_persistent
    )


def test_streaming_flag_checks() -> None:
    check_streaming(None, "full", 8)
    check_streaming(0, "off", 8)
    check_streaming(0, "full", 1)  # one process: FSDP has nothing to shard
    with pytest.raises(ParallelConfigError, match="dit_fsdp full") as err:
        check_streaming(0, "full", 2)
    assert err.value.field == "num_persistent_param_in_dit"
    with pytest.raises(ParallelConfigError) as err:
        check_streaming(-1, "off", 1)
    assert err.value.field == "num_persistent_param_in_dit"


def test_host_copy_keeps_tied_parameters_tied() -> None:
    lin = torch.nn.Linear(4, 4)
    other = torch.nn.Linear(4, 4)
    other.weight = lin.weight  # one Parameter under two modules
    hc = HostCopy([lin, other])
    assert len(hc._params) == 3  # weight once, two biases
    hc.load(torch.device("cpu"))
    assert lin.weight is other.weight and lin.weight.data_ptr() != hc._param_host[0].data_ptr()
    hc.release()
    assert lin.weight.data_ptr() == hc._param_host[0].data_ptr()


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("enc")
    write_tiny_t5(folder, seed=1)
    write_tiny_vae(folder, seed=1)
    return folder


def test_offloaded_encoders_equal_resident(encoder_folder) -> None:
    t5_ref = T5Encoder.from_wan(encoder_folder, dtype=torch.float32)
    vae_ref = WanVae.from_wan(encoder_folder)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 32, 48, generator=g) * 2 - 1
    want_text = t5_ref.encode(["two people talking"])[0]
    want_y = vae_ref.build_y(image, 5)

    home = EncoderHome("cpu", offload=True)
    t5 = home.add(T5Encoder.from_wan(encoder_folder, dtype=torch.float32))
    vae = home.add(WanVae.from_wan(encoder_folder))
    host_ptr = t5.model.shared.weight.data_ptr()
    with home.stage(t5):
        assert t5.model.shared.weight.data_ptr() != host_ptr  # a copy made for the stage
        got_text = t5.encode(["two people talking"])[0]
    assert t5.model.shared.weight.data_ptr() == host_ptr  # back on the host copy
    with home.stage(vae):
        got_y = vae.build_y(image, 5)
    assert torch.equal(got_text, want_text)
    assert torch.equal(got_y, want_y)

    # Negative control: the stage really uses the host copy.
    with torch.no_grad():
        home._homes[id(t5)][0]._param_host[0].mul_(1.01)
    with home.stage(t5):
        assert not torch.equal(t5.encode(["two people talking"])[0], want_text)

    # Without offload nothing moves.
    plain = EncoderHome("cpu", offload=False)
    resident = plain.add(t5_ref)
    ptr = resident.model.shared.weight.data_ptr()
    with plain.stage(resident):
        assert resident.model.shared.weight.data_ptr() == ptr


def test_streaming_a_quantised_dit_is_bit_identical(tmp_path) -> None:
    """--quant with --num_persistent_param_in_dit: quanto's int8 weights stream like plain ones."""
    from inference.checkpoint.loader import save_checkpoint
    from inference.checkpoint.quant import QuantSpec, load_quantized_dit
    from inference.model.config import DiTConfig

    save_checkpoint(tiny_dit(), tmp_path, num_shards=1)

    def load() -> torch.nn.Module:
        return load_quantized_dit(
            tmp_path, QuantSpec("int8"), "cpu", config=DiTConfig.tiny(), dtype=torch.float32
        )

    ref = _forward(load())
    model = load()
    streamer = stream_blocks(model, "cpu", 0)
    assert streamer._side is None and streamer.plan.persistent_blocks == 0
    assert torch.equal(_forward(model), ref)
