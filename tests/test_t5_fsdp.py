"""``--t5_fsdp``: the umT5 encoder sharded with FSDP2 over 2 gloo ranks equals the one-process encoder, and
text encoding runs as one ENCODE_TEXT step of the engine that every rank joins.

Negative control: with every rank filling its shard from rank 0's rows (a sharded load that ignores the
rank), the sharded encoder must differ from the reference.
"""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

from inference.encoders import T5Encoder
from inference.encoders.common import EncoderError
from inference.encoders.tiny import write_tiny_t5
from inference.parallel import fsdp
from inference.parallel.context import ParallelContext
from inference.parallel.engine import Engine, JobContext, Message, Op, TensorSpec
from inference.parallel.fsdp import CollectiveTextEncoder, check_t5_fsdp, load_t5, param_bytes
from inference.parallel.layout import ParallelConfigError
from tests.dist_harness import run_spmd

PROMPTS = ["two people talking in a video", "a man and a woman"]
TOL = 1e-6


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("t5")
    write_tiny_t5(folder, seed=3)
    return folder


def _rank_encode(ctx: ParallelContext, folder: str, wrong_rows: bool) -> dict:
    if wrong_rows:  # negative control: every rank loads the rows rank 0 should hold
        real = fsdp._shard_rows

        def rank0_rows(param: DTensor) -> slice:
            rows = real(param)
            return slice(0, rows.stop - rows.start)

        fsdp._shard_rows = rank0_rows
    enc = load_t5(folder, ctx, dtype=torch.float32)
    local, total = param_bytes(enc.model)
    out = enc.encode(PROMPTS)
    return {
        "out": [t.clone() for t in out],
        "sharded": isinstance(enc.model.encoder.block[0].layer[0].SelfAttention.q.weight, DTensor),
        "tied": enc.model.shared.weight is enc.model.encoder.embed_tokens.weight,
        "local": local,
        "total": total,
    }


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_t5_sharded_over_two_ranks_equals_one_process(t5_folder: Path) -> None:
    ref = T5Encoder.from_wan(t5_folder, dtype=torch.float32).encode(PROMPTS)
    results = run_spmd(_rank_encode, 2, str(t5_folder), False, timeout_s=150)
    for rank, res in enumerate(results):
        assert res["sharded"] and res["tied"], rank
        assert res["local"] < 0.6 * res["total"], (
            rank,
            res["local"],
            res["total"],
        )  # no rank holds all of T5
        for got, want in zip(res["out"], ref, strict=True):
            assert got.shape == want.shape
            diff = (got - want).abs().max().item()
            assert diff <= TOL, (rank, diff)

    bad = run_spmd(_rank_encode, 2, str(t5_folder), True, timeout_s=150)
    worst = max((got - want).abs().max().item() for got, want in zip(bad[0]["out"], ref, strict=True))
    assert worst > 1e-3, f"wrong shard rows went unnoticed (max diff {worst})"


class TextWorker:
    """Rank 0 encodes the job's prompt through the collective encoder while preparing; every rank's step
    runs the local shard. ``run`` returns the context so rank 0 can compare it."""

    def __init__(self, ctx: ParallelContext, local: T5Encoder) -> None:
        self.ctx = ctx
        self.local = local
        self.engine: Engine | None = None
        self.collective = CollectiveTextEncoder()
        self.steps = 0
        self.results: dict[str, Any] = {}

    def preflight(self, msg: Message) -> str | None:
        return None

    def step(self, msg: Message) -> list[torch.Tensor]:
        self.steps += 1
        return self.local.encode(list(msg.settings["texts"]))

    def run(self, msg: Message, tensors: dict[str, torch.Tensor], job: JobContext) -> dict[str, torch.Tensor]:
        return {"context": tensors["context"].clone()}

    def prepare(self, job: dict) -> tuple[Message, dict[str, torch.Tensor]]:
        context = self.collective.encode([job["prompt"]])[0]
        tensors = {"context": context}
        return Message(Op.DENOISE, job["id"], {}, (TensorSpec.of("context", context),)), tensors

    def finish(self, job: dict, result: dict[str, torch.Tensor] | None) -> None:
        assert result is not None and self.engine is not None
        self.results[job["id"]] = result["context"]
        if job.get("last"):
            self.engine.request_shutdown()

    def reject(self, job: dict, reason: str) -> None:
        self.results[job["id"]] = reason


def _rank_engine(ctx: ParallelContext, folder: str) -> dict:
    worker = TextWorker(ctx, load_t5(folder, ctx, dtype=torch.float32))
    jobs: queue.Queue = queue.Queue()
    engine = Engine(worker, ctx, jobs, heartbeat_s=0.5)
    worker.engine = engine
    worker.collective.run_step = engine.run_step
    if ctx.is_rank0:
        jobs.put({"id": "empty", "prompt": ""})  # an empty prompt is still one (EOS only)
        jobs.put({"id": "a", "prompt": PROMPTS[0]})
        jobs.put({"id": "b", "prompt": PROMPTS[1], "last": True})
    engine.serve(install_signal_handlers=False)
    return {"steps": worker.steps, "results": worker.results}


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_text_encoding_is_a_collective_engine_step(t5_folder: Path) -> None:
    ref = T5Encoder.from_wan(t5_folder, dtype=torch.float32)
    r0, r1 = run_spmd(_rank_engine, 2, str(t5_folder), timeout_s=150)
    assert r0["steps"] == r1["steps"] == 3  # every rank joined every encoding
    for job, prompt in (("empty", ""), ("a", PROMPTS[0]), ("b", PROMPTS[1])):
        want = ref.encode([prompt])[0]
        got = r0["results"][job]
        assert isinstance(got, torch.Tensor), got
        assert (got - want).abs().max().item() <= TOL, job


def test_collective_encoder_checks_input_before_broadcasting() -> None:
    sent: list[Message] = []
    enc = CollectiveTextEncoder(sent.append)
    for bad in ("one string", [], [1, 2]):
        with pytest.raises(EncoderError) as err:
            enc.encode(bad)  # type: ignore[arg-type]
        assert err.value.field == "texts"
    assert sent == []
    enc.encode(["fine"])
    assert sent[0].op is Op.ENCODE_TEXT and sent[0].settings["texts"] == ("fine",)


def test_t5_fsdp_flag_checks(t5_folder: Path) -> None:
    check_t5_fsdp(True)
    check_t5_fsdp(False, t5_cpu=True)
    with pytest.raises(ParallelConfigError, match="--t5_cpu") as err:
        check_t5_fsdp(True, t5_cpu=True)
    assert err.value.field == "t5_fsdp"
    # One process: nothing to shard, the encoder is whole and equals the plain load.
    whole = load_t5(t5_folder, ParallelContext.single("cpu"), dtype=torch.float32)
    assert not isinstance(whole.model.shared.weight, DTensor)
    want = T5Encoder.from_wan(t5_folder, dtype=torch.float32).encode(PROMPTS[:1])[0]
    assert torch.equal(whole.encode(PROMPTS[:1])[0], want)
