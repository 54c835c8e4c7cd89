"""Defects that only a GPU host would have shown, each caught here on the CPU.

1. The pre-flight's free memory counts blocks PyTorch caches but does not use as free.
2. T5's token embedding (``shared`` and ``encoder.embed_tokens``) stays one Parameter through a move
   to another device or dtype (it was copied twice: 2.1 GB on the GPU).
3. ``--t5_cpu`` keeps T5 in bf16 (upstream), not fp32.
4. Under torchrun (``OMP_NUM_THREADS=1``) each local process gets its share of the cores.
5. ``/api/health`` stays healthy through one long model pass and turns unhealthy when nothing signals.
6. A CPU-only torch on a GPU host: the 14B preset refuses to fall back to the CPU unless
   ``--device cpu``, and ``launch/setup.sh`` chooses the CUDA build when ``nvidia-smi`` lists a GPU.
"""

from __future__ import annotations

import logging
import os
import queue
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

import distributed_app
from inference.encoders import T5Encoder
from inference.encoders import tiny as te
from inference.encoders.common import _load_into, _meta_init
from inference.encoders.t5 import t5_config_from_wan, t5_wan_to_hf
from inference.model.config import DiTConfig
from inference.model.dit import MultiTalkDiT
from inference.parallel import host
from inference.parallel.context import ParallelContext
from inference.parallel.engine import Engine, JobContext, Message, Op, TensorSpec
from inference.parallel.host import HostGpus, free_device_bytes, resolve_device
from inference.parallel.layout import ParallelConfigError
from inference.parallel.selftest import _inputs
from inference.render import pipeline
from inference.render.pipeline import RenderConfig, Renderer, t5_placement
from inference.render.settings import GenerationSettings
from inference.render.worker import DialogueWorker, Runtime, RuntimeOptions
from service.api import EngineStatus, ServiceInfo, create_app
from service.jobs import JobStore
from service.runner import PASS_SLACK, EngineMonitor
from tests.subprocess_env import offline_env

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


# --------------------------------------------------------------------------- 1. pre-flight memory


def test_free_memory_counts_cached_blocks_as_free() -> None:
    # After clip 1: the driver sees 2 GiB free, PyTorch holds 10 GiB of which 4 GiB are live tensors.
    assert free_device_bytes(2 * GIB, 10 * GIB, 4 * GIB) == 8 * GIB
    assert free_device_bytes(5 * GIB, 0, 0) == 5 * GIB
    with pytest.raises(ValueError, match="inconsistent"):
        free_device_bytes(GIB, GIB, 2 * GIB)  # more allocated than reserved


def test_preflight_reads_the_allocator_not_only_the_driver(monkeypatch) -> None:
    dev = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (2 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 10 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 4 * GIB)
    worker = DialogueWorker(torch.nn.Linear(1, 1), ParallelContext(device=dev), None, None)
    # 6 GiB needed: the driver's 2 GiB alone would refuse the clip, with the cache it fits.
    assert worker.preflight(Message(Op.DENOISE, "j", {"min_free_bytes": 6 * GIB})) is None
    refusal = worker.preflight(Message(Op.DENOISE, "j", {"min_free_bytes": 9 * GIB}))
    assert refusal is not None and "8.0 GiB free" in refusal


# --------------------------------------------------------------------------- 2. T5 tied embedding


def _embeddings(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return model.shared.weight, model.encoder.embed_tokens.weight


def test_t5_embedding_stays_one_parameter_through_moves(tmp_path) -> None:
    te.write_tiny_t5(tmp_path, seed=0)
    model = T5Encoder.from_wan(tmp_path, dtype=torch.float32).model
    shared, embed = _embeddings(model)
    assert shared is embed
    count = sum(p.numel() for p in model.parameters())
    # A dtype conversion takes the same path in Module._apply as a CPU -> CUDA move (the tensor is
    # converted and set into the existing Parameter), so a split would show here.
    for target in (torch.float64, torch.bfloat16):
        model.to(target)
        shared, embed = _embeddings(model)
        assert shared is embed and shared.dtype == target
        assert shared.data_ptr() == embed.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == count


def test_untied_assignment_splits_on_a_move(tmp_path) -> None:
    """Negative control: the same load without the re-tie shares storage only until the first move."""
    from transformers import UMT5EncoderModel

    from inference.encoders.common import load_wan_state_dict

    te.write_tiny_t5(tmp_path, seed=0)
    sd = load_wan_state_dict(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", "t5_checkpoint")
    config = t5_config_from_wan(sd)
    model = _meta_init(lambda: UMT5EncoderModel(config))
    _load_into(model, t5_wan_to_hf({k: v.float() for k, v in sd.items()}), "t5_checkpoint")
    shared, embed = _embeddings(model)
    assert shared is not embed and shared.data_ptr() == embed.data_ptr()
    model.to(torch.float64)
    shared, embed = _embeddings(model)
    assert shared.data_ptr() != embed.data_ptr()  # two copies: what the GPU move did


# --------------------------------------------------------------------------- 3. --t5_cpu dtype


def test_t5_cpu_keeps_bf16() -> None:
    cuda = torch.device("cuda", 0)
    assert t5_placement(cuda, t5_cpu=True) == (torch.device("cpu"), torch.bfloat16)
    assert t5_placement(cuda, t5_cpu=False) == (cuda, torch.bfloat16)
    assert t5_placement(torch.device("cpu"), t5_cpu=False) == (torch.device("cpu"), torch.float32)


def test_renderer_loads_t5_where_t5_placement_says(monkeypatch, tmp_path) -> None:
    from inference.checkpoint.weights import WeightPaths

    seen: dict[str, Any] = {}

    class Loaded(Exception):
        pass

    def from_wan(path, device="cpu", dtype=torch.float32, **_kw):
        seen.update(device=torch.device(device), dtype=dtype)
        raise Loaded

    monkeypatch.setattr(T5Encoder, "from_wan", from_wan)
    with pytest.raises(Loaded):
        Renderer(WeightPaths.under(tmp_path), RenderConfig(device=torch.device("cuda", 0), t5_cpu=True))
    assert seen == {"device": torch.device("cpu"), "dtype": torch.bfloat16}
    assert pipeline.t5_placement is t5_placement


# --------------------------------------------------------------------------- 4. threads under torchrun


@pytest.fixture
def restore_process_state():
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    torch.set_num_threads(threads)
    torch.set_grad_enabled(grad)
    root.handlers[:] = handlers
    root.setLevel(level)


def test_rank0_gets_its_share_of_the_cores_after_start_up(monkeypatch, restore_process_state) -> None:
    # torchrun with 4 local processes on an 8-core host: OMP_NUM_THREADS=1 is torchrun's default.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(host, "available_cores", lambda: 8)
    torch.set_num_threads(1)
    # --sample_steps 0 is refused right after start-up, before any weights load.
    assert distributed_app.main(["--preset", "tiny", "--sample_steps", "0"]) == 2
    assert torch.get_num_threads() == 2


def test_thread_rule() -> None:
    assert host.cpu_threads_per_process(16, 8) == 2
    assert host.cpu_threads_per_process(4, 8) == 1
    env = {"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "3"}
    before = torch.get_num_threads()
    try:
        assert host.configure_cpu_threads(env, cores=16) == 3  # an explicit choice is kept
        assert host.configure_cpu_threads({"LOCAL_WORLD_SIZE": "2"}, cores=16) == 8
        assert host.configure_cpu_threads({"LOCAL_WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}, cores=16) == 1
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- 5. liveness


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


OLD_LIMIT = 120.0  # max(120 s, 4 x heartbeat): what /api/health allowed between beats


class SlowModel(torch.nn.Module):
    """Each forward is one model pass that takes ``durations[i]`` seconds of the fake clock; near its
    end it asks what /api/health would say."""

    def __init__(self, clock: FakeClock, monitor: EngineMonitor, durations: list[float]) -> None:
        super().__init__()
        self.clock, self.monitor, self.durations = clock, monitor, list(durations)
        self.verdicts: list[str | None] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.durations.pop(0)
        self.clock.now += 0.9 * d
        self.verdicts.append(self.monitor.status().heartbeat_problem(OLD_LIMIT, self.clock.now))
        self.clock.now += 0.1 * d
        return x


class PassWorker:
    def __init__(self, model: SlowModel, monitor: EngineMonitor) -> None:
        self.model, self.monitor = model, monitor
        self.engine: Engine | None = None

    def preflight(self, msg: Message) -> str | None:
        return None

    def run(self, msg: Message, tensors: dict[str, torch.Tensor], job: JobContext) -> dict[str, torch.Tensor]:
        self.monitor.beat(msg.job_id, "rendering")  # the last beat before the passes (a step's progress)
        with job.signal_passes(self.model):
            x = tensors["x"]
            for _ in range(len(self.model.durations)):
                x = self.model(x)
        return {"x": x}

    def prepare(self, job: str) -> tuple[Message, dict[str, torch.Tensor]]:
        x = torch.zeros(2)
        return Message(Op.DENOISE, job, {}, (TensorSpec.of("x", x),)), {"x": x}

    def finish(self, job: str, result: dict[str, torch.Tensor] | None) -> None:
        assert self.engine is not None
        self.engine.request_shutdown()

    def reject(self, job: str, reason: str) -> None:
        raise AssertionError(reason)


def _run_passes(
    durations: list[float], *, liveness: bool
) -> tuple[list[str | None], EngineMonitor, FakeClock]:
    clock = FakeClock()
    monitor = EngineMonitor(1, "cpu", first_pass_limit_s=60.0, clock=clock)
    model = SlowModel(clock, monitor, durations)
    worker = PassWorker(model, monitor)
    jobs: queue.Queue = queue.Queue()
    jobs.put("job")
    engine = Engine(worker, ParallelContext.single("cpu"), jobs, liveness=monitor if liveness else None)
    worker.engine = engine
    engine.serve(install_signal_handlers=False)
    return model.verdicts, monitor, clock


def test_health_stays_ok_through_a_pass_longer_than_the_old_limit() -> None:
    # 40 s (the first pass: the first-pass limit of 60 s applies), then 100 s and 200 s: 200 s > 120 s.
    verdicts, monitor, clock = _run_passes([40.0, 100.0, 200.0], liveness=True)
    assert verdicts == [None, None, None]
    assert monitor.status().heartbeat_limit_s is None  # between passes: the service's own limit
    # A pass that never ends: healthy up to 3 x the slowest pass, then unhealthy.
    monitor.pass_started()
    clock.now += PASS_SLACK * 200.0 - 1
    assert monitor.status().heartbeat_problem(OLD_LIMIT, clock.now) is None
    clock.now += 2
    assert "limit 600 s" in (monitor.status().heartbeat_problem(OLD_LIMIT, clock.now) or "")


def test_health_turns_bad_when_nothing_signals() -> None:
    # Negative control: the same passes without per-pass signals (one beat per step, as before).
    verdicts, _, _ = _run_passes([40.0, 100.0, 200.0], liveness=False)
    assert verdicts[0] is None
    assert verdicts[1] is not None and "limit 120 s" in verdicts[1]
    assert verdicts[2] is not None
    # And with signals, silence after the job ends is still caught at the service's limit.
    _, monitor, clock = _run_passes([40.0], liveness=True)
    clock.now += OLD_LIMIT + 1
    assert monitor.status().heartbeat_problem(OLD_LIMIT, clock.now) is not None


def test_first_pass_before_any_measurement() -> None:
    clock = FakeClock()
    monitor = EngineMonitor(1, "cpu", first_pass_limit_s=1800.0, clock=clock)
    monitor.beat()
    monitor.pass_started()
    clock.now += 1000
    assert monitor.status().heartbeat_problem(OLD_LIMIT, clock.now) is None
    clock.now += 801
    assert monitor.status().heartbeat_problem(OLD_LIMIT, clock.now) is not None


def test_api_health_uses_the_engine_limit(tmp_path) -> None:
    import time

    store = JobStore(tmp_path / "jobs.sqlite", tmp_path / "outputs", min_free_bytes=0)
    status = {"limit": 300.0}

    def engine_status() -> EngineStatus:
        return EngineStatus(True, time.time() - 200.0, (), "", status["limit"])

    client = TestClient(
        create_app(store, ServiceInfo(engine_status=engine_status, heartbeat_timeout_s=120.0))
    )
    try:
        assert client.get("/api/health").status_code == 200
        status["limit"] = None
        resp = client.get("/api/health")
        assert resp.status_code == 503 and "limit 120 s" in " ".join(resp.json()["problems"])
    finally:
        store.close()


def test_dialogue_worker_signals_every_model_pass() -> None:
    """The real worker: one DENOISE of a tiny DiT reports a start and an end for every forward."""

    class Recorder:
        def __init__(self) -> None:
            self.events: list[str] = []

        def pass_started(self) -> None:
            self.events.append("start")

        def pass_finished(self, seconds: float) -> None:
            assert seconds >= 0
            self.events.append("end")

    cfg = DiTConfig.tiny()
    model = MultiTalkDiT(cfg).init_weights(seed=0).eval().requires_grad_(False)
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    inputs = _inputs(cfg, torch.device("cpu"))
    tensors = {k: inputs[k] for k in ("context", "clip_fea", "y", "audio", "ref_target_masks")}
    tensors["context_null"] = inputs["context"]
    settings = GenerationSettings.from_dict({"steps": 2})
    msg = Message(Op.DENOISE, "j", {"generation": settings.to_dict(), "clip_index": 0})
    recorder = Recorder()
    job = JobContext(ParallelContext.single("cpu"), msg, lambda: False, threading.Event(), liveness=recorder)
    worker = DialogueWorker(model, ParallelContext.single("cpu"), None, None)
    with torch.no_grad():
        assert worker.run(msg, tensors, job) is not None
    assert len(calls) >= 2 * 2
    assert recorder.events == ["start", "end"] * len(calls)


# --------------------------------------------------------------------------- 6. CPU-only torch on a GPU host

CPU_TORCH_ON_GPU_HOST = HostGpus("2.13.0+cpu", None, cuda_available=False, host_gpus=2)


def test_14b_preset_refuses_a_silent_cpu_fallback() -> None:
    with pytest.raises(ParallelConfigError) as err:
        resolve_device("multitalk-14b", None, CPU_TORCH_ON_GPU_HOST)
    assert err.value.field == "device"
    assert "CPU-only build" in err.value.message and "2 GPU(s)" in err.value.message
    assert "--device cpu" in err.value.message
    assert resolve_device("multitalk-14b", "cpu", CPU_TORCH_ON_GPU_HOST) == "cpu"  # asked for
    assert resolve_device("tiny", None, CPU_TORCH_ON_GPU_HOST) is None  # the CPU demo
    cuda_host = HostGpus("2.13.0+cu128", "12.8", cuda_available=True, host_gpus=0)
    assert resolve_device("multitalk-14b", None, cuda_host) is None  # cuda:LOCAL_RANK
    with pytest.raises(ParallelConfigError, match="CPU-only build"):
        resolve_device("tiny", "cuda", CPU_TORCH_ON_GPU_HOST)
    with pytest.raises(ParallelConfigError, match="not a torch device"):
        resolve_device("tiny", "gpu0", CPU_TORCH_ON_GPU_HOST)


def test_runtime_refuses_before_touching_weights(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(HostGpus, "probe", classmethod(lambda cls: CPU_TORCH_ON_GPU_HOST))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ParallelConfigError) as err:
        Runtime.start(RuntimeOptions(preset="multitalk-14b", weights=tmp_path / "none"))
    assert err.value.field == "device"
    # With --device cpu the start-up goes on (and stops at the missing weights instead).
    with pytest.raises(ValueError) as err2:
        Runtime.start(RuntimeOptions(preset="multitalk-14b", weights=tmp_path / "none", device="cpu"))
    assert getattr(err2.value, "field", None) != "device"


def _fake_bin(folder: Path, name: str, script: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _gpu_path(tmp_path: Path, gpus: int) -> str:
    """A PATH whose nvidia-smi lists ``gpus`` GPUs (none: it says so and fails, as on a host without)."""
    folder = tmp_path / f"gpus{gpus}"
    if gpus:
        lines = "".join(f'echo "GPU {i}: NVIDIA H200 (UUID: GPU-{i})"\n' for i in range(gpus))
        _fake_bin(folder, "nvidia-smi", lines)
    else:
        _fake_bin(folder, "nvidia-smi", 'echo "No devices were found"\nexit 6\n')
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host's torch finds a GPU")
def test_service_start_up_names_the_cpu_only_torch(tmp_path) -> None:
    env = offline_env(PATH=_gpu_path(tmp_path, 2))
    cmd = [sys.executable, "distributed_app.py", "--weights", str(tmp_path / "none"), "--no_ui"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith("error: --device: "), proc.stderr[-2000:]
    assert "nvidia-smi lists 2 GPU(s)" in lines[0]
    assert not (tmp_path / "none").exists()


def _sh(args: list[str], path: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], cwd=ROOT, env={**os.environ, "PATH": path, **env},
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_setup_chooses_the_cuda_build_on_a_gpu_host(tmp_path) -> None:
    gpu, none = _gpu_path(tmp_path, 2), _gpu_path(tmp_path, 0)
    assert _sh(["launch/torch_wheel.sh", "choose"], gpu).stdout.split() == ["cuda", "torch===2.13.0"]
    assert _sh(["launch/torch_wheel.sh", "choose"], none).stdout.split() == ["cpu", "torch==2.13.0"]
    with_index = _sh(["launch/torch_wheel.sh", "choose"], gpu, TORCH_INDEX_URL="file:///wheels")
    assert with_index.stdout.split() == ["cuda", "torch==2.13.0"]

    def check(version: str, cuda: str, path: str) -> subprocess.CompletedProcess:
        python = _fake_bin(tmp_path / f"py-{version}-{cuda}", "python", f'echo "{version} {cuda}"\n')
        return _sh(["launch/torch_wheel.sh", "check", str(python)], path)

    refused = check("2.13.0+cpu", "none", gpu)
    assert refused.returncode == 1 and "CPU-only build" in refused.stdout and "2 GPU(s)" in refused.stdout
    assert check("2.13.0+cpu", "none", none).returncode == 0
    assert check("2.13.0+cu128", "12.8", gpu).returncode == 0
    assert check("2.13.0", "12.8", gpu).returncode == 0
    assert check("2.12.0", "12.8", gpu).returncode == 1

    # setup.sh itself, in its dry run: the plan for this venv's torch on a GPU host.
    plan = _sh(["launch/setup.sh", "--dry-run"], gpu)
    assert plan.returncode == 0, plan.stderr
    if torch.version.cuda is None:
        assert "torch===2.13.0 (cuda build)" in plan.stdout and "CPU-only build" in plan.stdout
    else:
        assert "keep the installed torch (cuda build)" in plan.stdout
