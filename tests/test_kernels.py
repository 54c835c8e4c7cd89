"""GPU kernel selection on a CPU machine: the flash-attn / SDPA choice and its fallback, and
``--compile`` (torch.compile of the transformer blocks) with its eager fallback."""

from __future__ import annotations

import pytest
import torch

import inference.model.attention as attn
from inference.model.attention import (
    AttentionKernelError,
    attend,
    attention,
    choose_kernel,
    set_attention_kernel,
)
from inference.model.config import DiTConfig
from inference.model.dit import MultiTalkDiT, compile_blocks
from tests.test_lora import _inputs


@pytest.mark.parametrize(
    ("device", "dtype", "available", "preference", "want"),
    [
        ("cuda", torch.bfloat16, {"flash3", "flash2"}, "auto", "flash3"),
        ("cuda", torch.float16, {"flash2"}, "auto", "flash2"),
        ("cuda", torch.bfloat16, {"flash3", "flash2"}, "flash2", "flash2"),
        ("cuda", torch.bfloat16, set(), "auto", "sdpa"),
        ("cuda", torch.float32, {"flash3", "flash2"}, "auto", "sdpa"),  # flash kernels need fp16/bf16
        ("cuda", torch.bfloat16, {"flash2"}, "sdpa", "sdpa"),
        ("cpu", torch.bfloat16, {"flash3", "flash2"}, "auto", "sdpa"),
    ],
)
def test_kernel_choice(device, dtype, available, preference, want):
    assert choose_kernel(device, dtype, available, preference) == want


def test_pinning_a_missing_flash_kernel_is_refused(monkeypatch):
    monkeypatch.setattr(attn, "flash_kernels", lambda: {})
    with pytest.raises(AttentionKernelError, match="flash2 is not installed"):
        set_attention_kernel("flash2")
    with pytest.raises(AttentionKernelError, match="unknown"):
        set_attention_kernel("xformers")
    set_attention_kernel("sdpa")
    set_attention_kernel("auto")


def test_attend_falls_back_to_sdpa_when_the_flash_kernel_fails(monkeypatch):
    """A flash kernel that raises is dropped once for SDPA (the CPU tensors stand in for CUDA ones)."""
    calls = []

    def broken(q, k, v):
        calls.append(1)
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer")

    monkeypatch.setattr(attn, "flash_kernels", lambda: {"flash2": broken})
    monkeypatch.setattr(
        attn, "attention_kernel_for", lambda q: "sdpa" if "flash2" in attn._failed else "flash2"
    )
    monkeypatch.setattr(attn, "_failed", set())
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 7, 2, 8, generator=g) for _ in range(3))
    assert torch.equal(attend(q, k, v), attention(q, k, v))
    assert torch.equal(attend(q, k, v), attention(q, k, v))
    assert calls == [1]  # tried once, then SDPA only


def test_attend_uses_the_flash_kernel_and_unpacks_its_tuple(monkeypatch):
    seen = []

    def fake_fa3(q, k, v):
        seen.append(q.shape)
        return attention(q, k, v), torch.zeros(1)  # some flash-attn 3 builds also return the LSE

    monkeypatch.setattr(attn, "flash_kernels", lambda: {"flash3": fake_fa3})
    monkeypatch.setattr(attn, "attention_kernel_for", lambda q: "flash3")
    q = torch.randn(2, 5, 2, 8)
    assert torch.equal(attend(q, q, q), attention(q, q, q)) and seen == [q.shape]


def test_compile_blocks_matches_eager():
    """The dynamo-traced blocks (backend "eager": no code generation, fast on CPU) give the same output."""
    inp = _inputs()
    model = MultiTalkDiT(DiTConfig.tiny()).init_weights(seed=2).eval().requires_grad_(False)
    with torch.no_grad():
        want = model(**inp)
        assert compile_blocks(model, backend="eager") == "eager"
        got = model(**inp)
        again = model(**inp)
    assert torch.equal(got, want) and torch.equal(again, want)
    assert list(model.state_dict()) == list(MultiTalkDiT(DiTConfig.tiny()).state_dict())  # keys unchanged


def test_compile_falls_back_to_eager_without_a_compiler(monkeypatch, caplog):
    import inference.model.dit as dit

    monkeypatch.setattr(dit, "compile_unavailable", lambda device_type: "no C++ compiler found")
    model = MultiTalkDiT(DiTConfig.tiny()).init_weights(seed=2).eval()
    assert compile_blocks(model) == "eager"
    assert "uncompiled" in caplog.text
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in model.blocks)
