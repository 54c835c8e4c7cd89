"""``--quant int8|fp8``: quantised tiny DiTs against the fp32 model, upstream's ``quant_models`` layout
(written by our writer and by optimum-quanto itself) against quantise-at-load, the FSDP refusal, Ulysses.

The relative error is ``||out_q - out_fp32|| / ||out_fp32||`` over the whole velocity of one forward
(two persons, L-RoPE routing). Measured on the tiny DiT: int8 0.53 %, fp8 (e4m3) 4.5 %.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import optimum.quanto as quanto
import pytest
import torch
from safetensors.torch import load_file, save_file

from inference.checkpoint.loader import load_model, save_checkpoint
from inference.checkpoint.lora import read_lora
from inference.checkpoint.quant import (
    FP32_LINEARS,
    QuantError,
    check_quant_layout,
    load_quantized_dit,
    planned_weight_bytes,
    resolve_quant,
    split_quantized_lora,
    weight_bytes,
    write_quantized,
)
from inference.model.config import DiTConfig
from inference.model.dit import MultiTalkDiT
from inference.parallel.context import ParallelContext
from inference.render.worker import Runtime, RuntimeOptions
from tests.dist_harness import run_spmd
from tests.test_lora import SHAPES, upstream_layout
from tests.test_parallel_model import dit_inputs

logger = logging.getLogger(__name__)

REL_BOUND = {"int8": 0.02, "fp8": 0.10}
DATA_DTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def tiny_fp32() -> MultiTalkDiT:
    return MultiTalkDiT(DiTConfig.tiny()).init_weights(seed=7).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_dit")
    save_checkpoint(tiny_fp32(), path, num_shards=2)
    return path


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    with torch.no_grad():
        return tiny_fp32()(**dit_inputs("A", 2))


def _forward(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**dit_inputs("A", 2))


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantised_tiny_dit_matches_fp32_within_bound(kind, folder, reference) -> None:
    model = load_quantized_dit(folder, resolve_quant(kind), "cpu")
    rel = _rel(_forward(model), reference)
    logger.warning("%s tiny DiT vs fp32: relative error %.4f (bound %.2f)", kind, rel, REL_BOUND[kind])
    assert 1e-4 < rel <= REL_BOUND[kind]  # quantised (not a float copy), and close
    q = model.blocks[0].self_attn.q
    assert isinstance(q, quanto.QLinear) and q.weight._data.dtype == DATA_DTYPE[kind]
    assert q.weight._scale.shape == (q.out_features, 1)
    for name in FP32_LINEARS:  # computed in fp32 by the model: stay floating point
        assert type(model.get_submodule(name).weight) is torch.nn.Parameter
    # Memory per weight: 1 byte per quantised weight + a scale per row, as planned.
    assert weight_bytes(model) == planned_weight_bytes(model.config, kind, torch.float32)
    assert weight_bytes(model) < 0.5 * planned_weight_bytes(model.config, None, torch.float32)


def test_14b_weight_bytes() -> None:
    cfg = DiTConfig.multitalk_14b()
    bf16, int8 = planned_weight_bytes(cfg, None), planned_weight_bytes(cfg, "int8")
    logger.warning("MultiTalk 14B weights: bf16 %.2f GiB, int8/fp8 %.2f GiB", bf16 / 2**30, int8 / 2**30)
    assert 0.49 < int8 / bf16 < 0.52


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_upstream_layout_file_equals_quantise_at_load(kind, folder, tmp_path) -> None:
    spec = write_quantized(tiny_fp32(), tmp_path, kind)
    qdir = tmp_path / "quant_models"
    assert spec.weights_file == qdir / f"dit_model_{kind}.safetensors"
    assert spec.map_file == qdir / f"dit_model_map_{kind}.json"
    qmap = json.loads(spec.map_file.read_text())
    assert qmap["blocks.0.self_attn.q"] == {"weights": quanto.qtypes[{"int8": "qint8", "fp8": "qfloat8"}[kind]].name,
                                            "activations": "none"}  # fmt: skip
    state = load_file(spec.weights_file)
    assert state["blocks.0.ffn.0.weight._data"].dtype == DATA_DTYPE[kind]
    assert state["blocks.0.ffn.0.weight._scale"].shape == (DiTConfig.tiny().ffn_dim, 1)
    assert state["blocks.0.ffn.0.input_scale"].shape == ()
    assert "time_embedding.0.weight" in state and "blocks.0.ffn.0.weight" not in state

    at_load = load_quantized_dit(folder, resolve_quant(kind), "cpu")
    expected = _forward(at_load)
    for given in (tmp_path, qdir, spec.weights_file):  # upstream's folder, quant_models/, the file itself
        from_file = load_quantized_dit(folder, resolve_quant(kind, given), "cpu")
        assert torch.equal(_forward(from_file), expected), given
    a, b = at_load.blocks[1].ffn[2].weight, from_file.blocks[1].ffn[2].weight
    assert torch.equal(a._data, b._data) and torch.equal(a._scale, b._scale)

    # Negative control: one layer's scales off by 2x in the file -> a different, worse result.
    state["blocks.0.self_attn.v.weight._scale"] = state["blocks.0.self_attn.v.weight._scale"] * 2
    save_file(state, str(spec.weights_file))
    tampered = _forward(load_quantized_dit(folder, resolve_quant(kind, tmp_path), "cpu"))
    assert _rel(tampered, expected) > 0.01


def test_file_written_by_optimum_quanto_loads(folder, reference, tmp_path) -> None:
    """A DiT quantised by quanto's own ``quantize`` + ``freeze`` (every linear, the fp32 ones too, as a
    plain ``quantize(model, qint8)`` does), saved with ``state_dict`` and ``quantization_map`` under the
    FusionX names and passed as upstream does (``--lora_dir`` with ``--quant int8``)."""
    model = tiny_fp32()
    quanto.quantize(model, weights=quanto.qint8)
    quanto.freeze(model)
    expected = _forward(model)
    qdir = tmp_path / "quant_models"
    qdir.mkdir()
    path = qdir / "quant_model_int8_FusionX.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    (qdir / "quantization_map_int8_FusionX.json").write_text(json.dumps(quanto.quantization_map(model)))
    assert set(FP32_LINEARS) <= set(quanto.quantization_map(model))

    quant_file, loras = split_quantized_lora("int8", [path])
    assert quant_file == path and loras == []
    loaded = load_quantized_dit(folder, resolve_quant("int8", None, quant_file), "cpu")
    assert type(loaded.time_embedding[0].weight) is torch.nn.Parameter  # dequantised at load
    out = _forward(loaded)
    assert (out - expected).abs().max().item() < 1e-5
    assert _rel(out, reference) <= REL_BOUND["int8"]
    # An ordinary LoRA file is not a quantised model; without --quant nothing is taken out of --lora_dir.
    lora, _ = upstream_layout(tmp_path)
    assert split_quantized_lora("int8", [lora]) == (None, [lora])
    assert split_quantized_lora(None, [path]) == (None, [path])


def test_lora_merged_before_quantising(folder, tmp_path) -> None:
    lora_path, _ = upstream_layout(tmp_path)
    adapter = read_lora(lora_path, SHAPES, 0.5)
    merged = load_model(folder, dtype=torch.float32, device="cpu", loras=[adapter])
    save_checkpoint(merged, tmp_path / "merged", num_shards=1)
    direct = load_quantized_dit(tmp_path / "merged", resolve_quant("int8"), "cpu")
    via_hook = load_model(folder, device="cpu", loras=[adapter], quant=resolve_quant("int8"))
    assert torch.equal(_forward(via_hook), _forward(direct))
    written = write_quantized(tiny_fp32(), tmp_path / "q", "int8")
    with pytest.raises(QuantError) as err:
        load_quantized_dit(folder, written, "cpu", loras=[adapter])
    assert err.value.field == "lora_dir"


def test_bad_options_and_files_are_refused(folder, tmp_path) -> None:
    def refused(field: str, fn, *args, **kwargs) -> str:
        with pytest.raises(QuantError) as err:
            fn(*args, **kwargs)
        assert err.value.field == field, err.value
        return err.value.message

    refused("quant", resolve_quant, "int4")
    refused("quant_dir", resolve_quant, "int8", tmp_path / "absent")
    assert "dit_model_int8.safetensors" in refused("quant_dir", resolve_quant, "int8", tmp_path)
    refused("quant_dir", resolve_quant, None, tmp_path)
    spec = write_quantized(tiny_fp32(), tmp_path, "fp8")
    # The map says fp8; --quant int8 with the same file is refused.
    (tmp_path / "quant_models" / "dit_model_int8.safetensors").write_bytes(spec.weights_file.read_bytes())
    (tmp_path / "quant_models" / "dit_model_map_int8.json").write_bytes(spec.map_file.read_bytes())
    assert "qfloat8" in refused("quant", load_quantized_dit, folder, resolve_quant("int8", tmp_path), "cpu")
    # Activation quantisation and missing tensors are refused, naming the file.
    qmap = json.loads(spec.map_file.read_text())
    qmap["blocks.0.ffn.0"]["activations"] = "qint8"
    spec.map_file.write_text(json.dumps(qmap))
    assert "activations" in refused(
        "quant_dir", load_quantized_dit, folder, resolve_quant("fp8", tmp_path), "cpu"
    )
    qmap["blocks.0.ffn.0"]["activations"] = "none"
    spec.map_file.write_text(json.dumps(qmap))
    state = load_file(spec.weights_file)
    del state["blocks.1.self_attn.o.weight._scale"]
    save_file(state, str(spec.weights_file))
    assert "blocks.1.self_attn.o.weight._scale" in refused(
        "quant_dir", load_quantized_dit, folder, resolve_quant("fp8", tmp_path), "cpu"
    )


def test_fsdp_refused_with_quant(monkeypatch) -> None:
    spec = resolve_quant("int8")
    check_quant_layout(spec, "off", 2)
    check_quant_layout(spec, "full", 1)  # one rank: FSDP has nothing to shard
    check_quant_layout(None, "full", 2)
    with pytest.raises(QuantError) as err:
        check_quant_layout(spec, "full", 2)
    assert "--dit_fsdp full" in err.value.message and "--quant int8" in err.value.message
    # At start-up, before any process group or weight.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(QuantError, match="--dit_fsdp keep"):
        Runtime.start(RuntimeOptions(preset="tiny", dit_fsdp="keep", quant="int8"))


def _rank_quantised(ctx: ParallelContext, folder: str) -> torch.Tensor:
    model = load_quantized_dit(folder, resolve_quant("int8"), ctx.device)
    with torch.no_grad():
        return model(**dit_inputs("A", 2), sp=ctx.sequence_parallel())


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_quantised_dit_under_ulysses_matches_one_process(folder, reference) -> None:
    single = _forward(load_quantized_dit(folder, resolve_quant("int8"), "cpu"))
    results = run_spmd(_rank_quantised, 2, str(folder), timeout_s=100)
    for out in results:
        assert (out - single).abs().max().item() <= 1e-5
        assert (out - reference).abs().max().item() > 1e-4  # the ranks ran int8 weights, not fp32 ones
