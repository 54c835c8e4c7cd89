"""Replica groups (``--replicas``), the producer stage, the finisher thread and ``stats.json``.

- plans and flags: group sizes, refusals naming the flag;
- the store: claims from several processes at once hand out every job exactly once and record the group;
  the producer's hand-off (preparing -> ready -> taken), its bound and its cancels; an old store gains
  the group columns;
- the board: every group's state, the stalest heartbeat for health, a group that has not started;
- four gloo ranks split into two groups of two: each group's broadcasts stay in the group (a world
  broadcast is the negative control: it crosses), each group runs its own engine loop with its own jobs,
  and the sequence-parallel forward (Ulysses, and ring inside a group) equals one process (self-test,
  whose ring check has its own negative control);
- a job prepared by the producer (saved, loaded by a clips-only leader) renders the same frames as one
  prepared by the group (a different seed is the negative control); the finisher's VAE handle shares
  the weights, not the caches, and decodes the same;
- torchrun with ``--replicas 2``: four REST jobs, two at a time, both groups listed; SIGKILL of one
  group's leader: both jobs end done, the innocent one's attempt not counted, both resume after their
  finished clips.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import torch.distributed as dist

from inference.checkpoint.loader import load_model
from inference.checkpoint.weights import WeightPaths
from inference.parallel.context import ParallelContext
from inference.parallel.engine import Engine, Message, Op, TensorSpec
from inference.parallel.groups import ReplicaGroup, ReplicaPlan, join_replica_group
from inference.parallel.layout import ParallelConfigError, ParallelLayout
from inference.parallel.selftest import run_selftest
from inference.render.finisher import renderer_for_thread
from inference.render.intake import Limits, build_job
from inference.render.pipeline import FRAMES_FILE, RenderConfig, Renderer
from inference.render.producer import apply_memory_cap, load_handoff, parse_producer_device, save_handoff
from inference.render.settings import GenerationSettings
from inference.render.spec import JobInput
from inference.render.stats import build_stats, merge_peaks
from inference.render.video_io import probe_media
from inference.render.worker import RenderJob, Runtime, RuntimeOptions, StartupError
from service.groups import GroupBoard, board_status
from service.jobs import JobState, JobStore
from service.schemas import EngineStatus, WorkerStatus
from tests.dist_harness import run_spmd
from tests.test_service_e2e import (
    ROOT,
    VENV_BIN,
    Service,
    _env,
    _kill_tree,
    free_port,
    submit,
    wait_healthy,
    wait_status,
)

SPEC = {"kind": "dialogue", "version": 1}


# ---------------------------------------------------------------------------------------------- plans, flags


def test_replica_plan_splits_consecutive_ranks_and_names_the_flag() -> None:
    plan = ReplicaPlan(8, 4)
    assert plan.group_size == 2 and plan.ranks(3) == (6, 7) and plan.group_of(5) == 2
    assert plan.all_ranks() == ((0, 1), (2, 3), (4, 5), (6, 7))
    for world, replicas, words in (
        (6, 4, "allowed: [1, 2, 3, 6]"),
        (2, 3, "at least 3 processes"),
        (2, 0, "at least 1"),
    ):
        with pytest.raises(ParallelConfigError) as err:
            ReplicaPlan(world, replicas)
        assert err.value.field == "replicas" and words in err.value.message
    g = ReplicaGroup(1, 2, (2, 3), ("cuda:2", "cuda:3"), "node-a")
    assert g.label() == "group 1 (ranks 2,3 on cuda:2,cuda:3 on node-a)"
    assert ReplicaGroup.from_json(g.to_json()) == g


def test_producer_flags_are_refused_with_the_flag_named() -> None:
    with pytest.raises(StartupError) as err:
        parse_producer_device("tpu:0")
    assert err.value.field == "--producer_device"
    if not torch.cuda.is_available():
        with pytest.raises(StartupError) as err:
            parse_producer_device("cuda:0")
        assert err.value.field == "--producer_device" and "no CUDA device" in err.value.message
    assert parse_producer_device("cpu") == torch.device("cpu")
    with pytest.raises(StartupError) as err:
        apply_memory_cap(torch.device("cpu"), 4.0, set())
    assert err.value.field == "--producer_memory_gib" and "CUDA allocator" in err.value.message
    assert apply_memory_cap(torch.device("cpu"), None, set()) == "no memory cap"
    with pytest.raises(StartupError) as err:
        Runtime.start(RuntimeOptions(preset="tiny", prepare_on="producer", t5_fsdp=True, make_tiny=False))
    assert err.value.field == "--prepare_on"


@pytest.mark.timeout(300)
def test_replica_startup_refusals_exit_2_naming_the_flag(tmp_path: Path) -> None:
    cases = {
        ("--replicas", "2"): "--replicas",  # one process cannot hold two groups
        ("--producer_memory_gib", "2"): "--producer_memory_gib",  # without --prepare_on producer
        ("--prepare_on", "producer", "--producer_device", "cuda:7"): "--producer_device",
        ("--prepare_on", "producer", "--producer_memory_gib", "2"): "--producer_memory_gib",  # on the CPU
        # As rank 0 of 2 processes (refused before the rendezvous): a group of one rank cannot hold Ulysses 2.
        ("--replicas", "2", "--ulysses_size", "2"): "--ulysses_size",
    }
    procs = {}
    try:
        for flags in cases:
            cmd = [sys.executable, "distributed_app.py", "--preset", "tiny", "--weights", str(tmp_path / "none"),
                   "--outputs_dir", str(tmp_path / "out"), "--server_port", str(free_port()), "--no_ui", *flags]  # fmt: skip
            env = _env() | (
                {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"} if "--ulysses_size" in flags else {}
            )
            procs[flags] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True, start_new_session=True)  # fmt: skip
        for flags, proc in procs.items():
            out, err = proc.communicate(timeout=240)
            lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
            assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, (flags, out, err)
            assert cases[flags] in lines[0] and len(lines[0]) > len(cases[flags]) + 20, (flags, lines[0])
            if "--ulysses_size" in flags:
                assert "with --replicas 2 a group has 1 of the 2 processes" in lines[0], lines[0]
    finally:
        for proc in procs.values():
            _kill_tree(proc)
    assert not (tmp_path / "none").exists(), "a refused start-up must not write tiny weights"


# ---------------------------------------------------------------------------------------------- the store


def _claim_all(db: str, outputs: str, group: int, barrier, results) -> None:
    store = JobStore(db, outputs)  # its own connections, as a group leader's process has
    barrier.wait()
    ids = []
    while (job := store.claim_for_group(group, (2 * group, 2 * group + 1), ("cpu", "cpu"))) is not None:
        ids.append(job.id)
    results.put((group, ids))


def test_group_leaders_in_separate_processes_claim_every_job_once(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db", tmp_path / "out", max_queue=100)
    submitted = [store.submit(SPEC, {"steps": 4}, {}).id for _ in range(24)]
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(str(store.db_path), str(store.outputs_dir), g, barrier, results))
             for g in range(3)]  # fmt: skip
    for proc in procs:
        proc.start()
    claimed = dict(results.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
    flat = [j for ids in claimed.values() for j in ids]
    assert sorted(flat) == sorted(submitted) and len(flat) == len(set(flat))  # each exactly once
    for group, ids in claimed.items():
        for job_id in ids:
            job = store.get(job_id)
            assert (job.state, job.replica_group, job.ranks, job.devices, job.attempts) == (
                JobState.PREPARING, group, (2 * group, 2 * group + 1), ("cpu", "cpu"), 1)  # fmt: skip
            assert job.worker == f"group {group}"


def test_producer_hand_off_preparing_ready_taken(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db", tmp_path / "out")
    a, b, c = (store.submit(SPEC, {"steps": 4}, {}).id for _ in range(3))
    job = store.claim_for_producer()
    assert job.id == a and job.handoff == "preparing" and job.attempts == 1 and job.worker == "producer"
    assert store.claim_for_group(0, (0,), ("cpu",), prepared=True) is None  # not ready yet
    assert store.mark_prepared(a) and store.prepared_waiting() == 1
    taken = store.claim_for_group(1, (1,), ("cpu",), prepared=True)
    assert (taken.id, taken.handoff, taken.replica_group, taken.attempts) == (a, "taken", 1, 1)
    assert store.prepared_waiting() == 0
    # A prepared job cancelled while it waits is ended by the producer's sweep, never taken.
    assert store.claim_for_producer().id == b and store.mark_prepared(b)
    store.request_cancel(b)
    assert store.claim_for_group(0, (0,), ("cpu",), prepared=True) is None
    assert store.cancel_waiting_handoffs() == [b] and store.get(b).state == JobState.CANCELLED
    # A prepared job left waiting by a stop is not counted as an attempt; recovery re-queues it.
    assert store.claim_for_producer().id == c and store.mark_prepared(c)
    assert store.refund_waiting_handoffs() == [c]
    assert {j.id for j in store.recover_interrupted()} == {a, c}  # a: a group had taken it
    assert (store.get(c).state, store.get(c).attempts) == (JobState.QUEUED, 0)
    assert (store.get(a).state, store.get(a).attempts) == (JobState.QUEUED, 1)  # rendering had begun: counted
    # One the producer was still preparing counts (the preparation itself may have crashed the process).
    assert [store.claim_for_producer().id for _ in range(2)] == [a, c]
    assert store.refund_waiting_handoffs() == []


def test_a_store_from_before_replica_groups_gains_the_columns(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    conn = sqlite3.connect(db)
    conn.executescript(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, state TEXT NOT NULL, "
        "created_at REAL NOT NULL, updated_at REAL NOT NULL, started_at REAL, finished_at REAL, spec TEXT NOT NULL, "
        "settings TEXT NOT NULL, inputs TEXT NOT NULL, progress REAL NOT NULL DEFAULT 0, stage TEXT NOT NULL "
        "DEFAULT '', timings TEXT NOT NULL DEFAULT '{}', error TEXT, outputs TEXT NOT NULL DEFAULT '[]', attempts "
        "INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0, worker TEXT, purged_at REAL, "
        "owner TEXT); PRAGMA user_version=1;"
    )
    conn.execute("INSERT INTO jobs (id, state, created_at, updated_at, spec, settings, inputs) VALUES "
                 "(?, 'queued', 1, 1, '{}', '{}', '[]')", ("a" * 32,))  # fmt: skip
    conn.commit()
    conn.close()
    store = JobStore(db, tmp_path / "out")
    old = store.get("a" * 32)
    assert (old.replica_group, old.ranks, old.devices, old.handoff) == (None, (), (), None)
    assert store.claim_for_group(0, (0, 1), ("cpu", "cpu")).ranks == (0, 1)


# ---------------------------------------------------------------------------------------------- the board


def _status(beat: float | None, job: str | None = None, limit: float | None = None) -> EngineStatus:
    return EngineStatus(True, beat, (WorkerStatus(0, job is not None, job, "clip 1" if job else None, "cpu"),),
                        "", limit)  # fmt: skip


def test_the_board_shows_every_group_and_the_stalest_heartbeat(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db", tmp_path / "out")
    job = store.submit(SPEC, {"steps": 4}, {})
    groups = (ReplicaGroup(0, 2, (0,), ("cpu",)), ReplicaGroup(1, 2, (1,), ("cpu",)))
    board = GroupBoard(store.db_path)
    board.reset(groups)
    now = time.time()
    starting = board_status(board, store, 2, local=(0, _status(now)))
    assert starting.last_heartbeat is None  # group 1 has not served yet: /api/health is not ok
    assert starting.heartbeat_problem(120, now) is not None
    store.claim_for_group(1, (1,), ("cpu",))
    store.update_progress(job.id, 42.0, "clip 1")
    board.publish(groups[1], _status(now - 50, job.id, limit=300.0))
    status = board_status(board, store, 2, local=(0, _status(now)))
    assert (
        status.alive
        and status.last_heartbeat == pytest.approx(now - 50)
        and status.heartbeat_limit_s == 300.0
    )
    by_group = {g["group"]: g for g in status.groups}
    assert by_group[0]["state"] == "idle" and by_group[1]["state"] == "busy"
    assert (
        by_group[1]["task_id"] == job.id
        and by_group[1]["progress"] == 42.0
        and by_group[1]["pid"] == os.getpid()
    )
    assert [(w.rank, w.group, w.busy) for w in status.workers] == [(0, 0, False), (1, 1, True)]
    board.publish(groups[1], _status(now - 500))  # a stuck group makes the service unhealthy
    assert board_status(board, store, 2, local=(0, _status(now))).heartbeat_problem(120, now) is not None
    assert not board.stop_requested()
    board.request_stop()
    assert GroupBoard(store.db_path).stop_requested()


# ---------------------------------------------------------------------------------------------- 4 gloo ranks


class _SumWorker:
    """Each job: the leader broadcasts a tensor; every rank of the group adds its group rank + 1 and the
    group all-reduces, so a job's result says which ranks took part."""

    def __init__(self, ctx: ParallelContext, results: list) -> None:
        self.ctx, self.results = ctx, results

    def preflight(self, msg: Message) -> str | None:
        return None

    def run(self, msg, tensors, job):
        x = tensors["x"] + (self.ctx.rank + 1)
        dist.all_reduce(x, group=self.ctx.data)
        job.step_boundary(x)
        return {"x": x}

    def prepare(self, job):
        x = torch.tensor([float(job)])
        return Message(Op.DENOISE, f"job{job}", {}, (TensorSpec.of("x", x),)), {"x": x}

    def finish(self, job, result):
        self.results.append((job, float(result["x"].item())))

    def reject(self, job, reason):
        raise AssertionError(reason)

    def step(self, msg):
        raise AssertionError("no steps")


def _groups_of_two(world: ParallelContext) -> dict:
    plan = ReplicaPlan(world.world_size, 2)
    ctx, group, groups = join_replica_group(world, plan, ParallelLayout(ulysses=2))
    out = {"group": group.index, "ranks": group.ranks, "group_rank": ctx.rank, "size": ctx.world_size,
           "mesh": ctx.mesh.size()}  # fmt: skip
    # Each group's leader broadcasts its own value: the group's ranks get it, never the other group's.
    t = torch.tensor([100.0 + group.index]) if ctx.is_rank0 else torch.zeros(1)
    dist.broadcast(t, group_src=0, group=ctx.data)
    out["from_leader"] = float(t.item())
    w = torch.tensor([100.0 + group.index]) if world.rank == 0 else torch.zeros(1)
    dist.broadcast(w, src=0, group=world.data)  # negative control: a world broadcast crosses groups
    out["from_world"] = float(w.item())
    # Two engine loops side by side, each with its own jobs.
    results: list = []
    jobs = [10 * (group.index + 1), 10 * (group.index + 1) + 1]

    def source(timeout_s: float):
        if jobs:
            return jobs.pop(0)
        if len(results) == 2:
            engine.request_shutdown()
        time.sleep(0.01)
        return None

    engine = Engine(_SumWorker(ctx, results), ctx, source if ctx.is_rank0 else None, heartbeat_s=5.0)
    engine.serve(install_signal_handlers=False)
    out["jobs"] = results
    ok, diff, line = run_selftest(ctx)  # Ulysses 2 inside the group (+ FSDP over the group's mesh)
    out["selftest"] = (ok, line)
    ring_ctx, _, _ = join_replica_group(world, plan, ParallelLayout(ulysses=1, ring=2))
    ok, diff, line = run_selftest(ring_ctx)  # the ring's sub-groups mapped into each group
    out["ring_selftest"] = (ok, line)
    out["ring_members"] = dist.get_process_group_ranks(ring_ctx.ring_group)
    return out


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_four_ranks_as_two_groups_keep_their_collectives_and_jobs_apart() -> None:
    values = run_spmd(_groups_of_two, 4, timeout_s=300.0)
    for rank, v in enumerate(values):
        g = rank // 2
        assert (v["group"], v["ranks"], v["group_rank"], v["size"], v["mesh"]) == (
            g,
            (2 * g, 2 * g + 1),
            rank % 2,
            2,
            2,
        )
        assert v["from_leader"] == 100.0 + g
        assert v["from_world"] == 100.0  # the control: group 1 would have had group 0's value
        assert v["selftest"][0], v["selftest"][1]
        assert v["ring_selftest"][0], v["ring_selftest"][1]
        assert sorted(v["ring_members"]) == [2 * g, 2 * g + 1]
    # Leaders only: each group ran its own two jobs; the sum says both of its ranks (1 + 2) took part.
    assert values[0]["jobs"] == [(10, 2 * 10 + 3.0), (11, 2 * 11 + 3.0)]
    assert values[2]["jobs"] == [(20, 2 * 20 + 3.0), (21, 2 * 21 + 3.0)]


# ---------------------------------------------------------------------------------------------- producer, finisher


@pytest.fixture(scope="module")
def tiny_parts(tiny_weights: Path):
    paths = WeightPaths.under(tiny_weights)
    model = load_model(paths.wan_dir, device="cpu", dtype=torch.float32)
    return paths, model


def _render(paths, model, renderer, job: RenderJob) -> np.ndarray:
    runtime = Runtime(RuntimeOptions(preset="tiny"), ParallelContext.single("cpu"), model, paths, renderer)
    try:
        runtime.render(job)
    finally:
        runtime.close()
    return np.load(job.out_dir / FRAMES_FILE)


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_a_job_prepared_by_the_producer_renders_the_frames_the_group_renders(
    tiny_parts, portrait_pngs, tmp_path: Path
) -> None:
    paths, model = tiny_parts
    left, right = (Path(p).read_bytes() for p in portrait_pngs)
    sub = build_job(JobInput(left_image=left, right_image=right, script="(s1) Hello there. (s2) Hi, you."),
                    Limits())  # fmt: skip
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name, data in sub.files.items():
        (inputs / name).write_bytes(data)
    config = RenderConfig(render_divisor=8, save_frames=True)
    values = {"steps": 2, "seed": 7, "frame_num": 17, "motion_frames": 5}  # about 1.4 s of speech: 3 clips

    def job(name: str, **extra) -> RenderJob:
        return RenderJob(
            name, sub.spec, GenerationSettings.from_dict({**values, **extra}), inputs, tmp_path / name
        )

    full = Renderer(paths, config)
    on_group = _render(paths, model, full, job("group"))
    # The producer: front half only, its hand-off saved; the leader: clips only, the hand-off loaded.
    producer = Renderer(paths, config, stages=frozenset({"prepare"}))
    assert producer.vae is None and producer.clip is None
    handed = job("producer")
    with pytest.raises(FileNotFoundError):  # no meta.json yet: nothing a group may take
        load_handoff(sub.spec, handed.out_dir, torch.device("cpu"))
    prep = producer.prepare(sub.spec, handed.settings, inputs, handed.out_dir)
    save_handoff(prep, {"tts_time": 1.0})
    leader = Renderer(paths, config, stages=frozenset({"clips"}))
    assert leader.t5 is None and leader.audio_encoder is None
    handed.prepared, timings = load_handoff(sub.spec, handed.out_dir, torch.device("cpu"))
    handed.clip_index, handed.prepared_on = handed.prepared.start_clip, "producer"  # as HandoffLoader does
    assert timings == {"tts_time": 1.0} and handed.prepared.num_clips >= 2
    on_producer = _render(paths, model, leader, handed)
    assert on_group.shape == on_producer.shape and np.array_equal(on_group, on_producer)
    other = _render(paths, model, full, job("other_seed", seed=8))  # negative control
    assert not np.array_equal(on_group, other)
    stats = json.loads((handed.out_dir / "stats.json").read_text())
    assert (
        stats["seed"] == 7
        and stats["clips"] == handed.prepared.num_clips
        and stats["frames"] == on_group.shape[0]
    )
    assert stats["prepared_on"] == "producer" and stats["passes"]["computed"] > 0
    assert stats["memory"]["kind"] == "process_max_rss" and int(stats["memory"]["peak_bytes"]["0"]) > 0
    assert "torch" in stats["versions"] and stats["group"]["ranks"] == [0]


@pytest.mark.slow
def test_the_finishers_vae_shares_weights_not_caches(tiny_parts) -> None:
    paths, _ = tiny_parts
    renderer = Renderer(paths, RenderConfig(render_divisor=8), stages=frozenset({"clips"}))
    twin = renderer_for_thread(renderer)
    a, b = renderer.vae.model, twin.vae.model
    assert a is not b and all(
        p.data_ptr() == q.data_ptr() for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )
    gen = torch.Generator().manual_seed(0)
    latents = [torch.randn(16, 3, 8, 14, generator=gen) for _ in range(2)]
    expected = [renderer.vae.decode(z) for z in latents]
    got: dict[int, torch.Tensor] = {}

    def decode(i: int, vae) -> None:
        got[i] = vae.decode(latents[i])

    threads = [
        threading.Thread(target=decode, args=(0, renderer.vae)),
        threading.Thread(target=decode, args=(1, twin.vae)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert a._feat_map is not b._feat_map  # each handle keeps its own causal cache


def test_stats_record() -> None:
    render = {"frames": 50, "fps": 25, "clips": 2, "size": [112, 64], "settings": {"seed": 3, "steps": 4},
              "passes": {"passes": 16, "computed": 12, "skipped": 4}}  # fmt: skip
    group = ReplicaGroup(1, 2, (2, 3), ("cuda:2", "cuda:3"))
    stats = build_stats(job_id="j", render=render, timings={"total_time": 10.0}, group=group,
                        peak_bytes=merge_peaks([5, 9], [7, 8]), memory="cuda_max_allocated", prepared_on="group")  # fmt: skip
    assert stats["memory"]["peak_bytes"] == {"2": 7, "3": 9} and stats["seconds"] == 2.0
    assert stats["throughput"]["frames_per_second"] == 5.0 and stats["passes"]["skipped"] == 4
    assert stats["group"] == group.to_json() and stats["seed"] == 3


# ---------------------------------------------------------------------------------------------- torchrun


def _check_mp4(svc: Service, job_id: str, tmp_path: Path) -> None:
    """The job's mp4 plays: h264 + aac, frames, video and audio of the same length (one frame)."""
    r = svc.get(f"/api/download/{job_id}")
    assert r.status_code == 200 and r.headers["content-type"].startswith("video/mp4"), r.text[:300]
    path = tmp_path / f"{job_id}.mp4"
    path.write_bytes(r.content)
    info = probe_media(path)
    assert (info.video_codec, info.audio_codec) == ("h264", "aac") and info.frames > 0, info
    assert abs(info.video_duration - info.audio_duration) <= 1 / 25 + 1e-6, info


def _wait_through_restart(svc: Service, ids: list[str], timeout_s: float) -> dict[str, dict]:
    """Wait until every job is done while torchrun restarts the ranks (the web is down meanwhile)."""
    deadline, ends = time.monotonic() + timeout_s, {}
    while len(ends) < len(ids) and time.monotonic() < deadline:
        assert svc.proc.poll() is None, f"torchrun ended ({svc.proc.returncode}):\n{svc.log_tail()}"
        for job_id in set(ids) - set(ends):
            try:
                body = svc.get(f"/api/status/{job_id}").json()
            except requests.RequestException:
                break  # restarting
            assert body["status"] not in ("failed", "cancelled"), (body, svc.log_tail())
            if body["status"] == "done":
                ends[job_id] = body
        time.sleep(0.5)
    assert len(ends) == len(ids), f"not done after {timeout_s} s:\n{svc.log_tail()}"
    return ends


def _interval(body: dict) -> tuple[float, float]:
    def ts(s: str) -> float:
        return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()

    return ts(body["started_at"]), ts(body["finished_at"])


@contextmanager
def _two_groups(weights: Path, outputs: Path, log: Path) -> Iterator[Service]:
    """torchrun, 2 processes as 2 groups of 1, one restart allowed (the crash drill)."""
    port = free_port()
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "--max-restarts", "1",
           "distributed_app.py", "--preset", "tiny", "--weights", str(weights), "--outputs_dir", str(outputs),
           "--server_port", str(port), "--no_ui", "--replicas", "2"]  # fmt: skip
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    service = Service(proc, f"http://127.0.0.1:{port}", log, outputs)
    try:
        wait_healthy(service)
        yield service
    finally:
        _kill_tree(proc)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_torchrun_two_groups_serve_jobs_side_by_side_and_survive_a_killed_group(
    tiny_weights: Path, portrait_pngs: tuple[Path, Path], tmp_path: Path
) -> None:
    short = json.dumps({"mode": "clip", "frame_num": 33, "steps": 4})
    with _two_groups(tiny_weights, tmp_path / "outputs", tmp_path / "service.log") as svc:
        queue = svc.get("/api/queue").json()
        assert [(g["group"], g["ranks"], g["state"]) for g in queue["groups"]] == [
            (0, [0], "idle"),
            (1, [1], "idle"),
        ]
        ids = [submit(svc, portrait_pngs, settings=short) for _ in range(4)]
        busy = set()
        deadline = time.monotonic() + 300
        while len(busy) < 2 and time.monotonic() < deadline:  # /api/queue shows both groups at work
            busy |= {g["group"] for g in svc.get("/api/queue").json()["groups"] if g["state"] == "busy"}
            time.sleep(0.1)
        bodies = [wait_status(svc, i, {"done"}, timeout_s=400) for i in ids]
        for i in ids:
            _check_mp4(svc, i, tmp_path)
        assert busy == {0, 1}
        assert {b["group"] for b in bodies} == {0, 1} and all(b["attempts"] == 1 for b in bodies)
        spans = sorted(_interval(b) for b in bodies)
        assert any(a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False)), spans  # two ran at once
        stats = svc.get(f"/api/download/{ids[0]}", params={"file": "stats.json"}).json()
        assert stats["group"]["group"] == bodies[0]["group"]
        # The crash drill: two multi-clip jobs, one per group; SIGKILL the leader of the job's group 1.
        long = json.dumps({"frame_num": 17, "motion_frames": 5, "steps": 8})
        script = "(s1) Hello there, this line makes a few clips. (s2) Hi, how are you doing today, my friend?"
        drill = [submit(svc, portrait_pngs, script=script, settings=long) for _ in range(2)]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            states = [svc.get(f"/api/status/{i}").json() for i in drill]
            if all(s["status"] == "rendering" and s["progress"] > 25 for s in states):
                break
            time.sleep(0.1)
        groups = {g["group"]: g for g in svc.get("/api/queue").json()["groups"]}
        victim, innocent = drill if states[0]["group"] == 1 else drill[::-1]
        os.kill(groups[1]["pid"], signal.SIGKILL)
        ends = _wait_through_restart(svc, drill, timeout_s=500)
        assert ends[innocent]["attempts"] == 1, ends[innocent]  # stopped cleanly: not counted
        assert ends[victim]["attempts"] == 2, ends[victim]
        for i in drill:
            _check_mp4(svc, i, tmp_path)
            resumed = svc.get(f"/api/download/{i}", params={"file": "stats.json"}).json()["passes"]
            assert resumed["resumed_after_clip"] > 0, (i, resumed)
        assert "recovered 1 job(s)" in svc.log_tail(200000)


def test_the_page_header_shows_each_group(tmp_path: Path) -> None:
    from service.ui.handlers import UiHandlers  # gradio: seconds to import, only this test needs it

    groups = [
        {"group": 0, "state": "busy", "progress": 42.0},
        {"group": 1, "state": "idle", "progress": None},
    ]
    info = {"model": "tiny", "world_size": 2, "groups": groups}
    h = UiHandlers(JobStore(tmp_path / "jobs.db", tmp_path / "out"), submit=lambda f, u: "", tts_preview=None,
                   info=lambda: info)  # fmt: skip
    assert "group 0 busy (42%), group 1 idle" in h.header()
    info["groups"] = groups[:1]  # one group: nothing more than before replica groups
    assert "group 0" not in h.header()


def test_metrics_show_groups_and_sum_stats_files(tmp_path: Path) -> None:
    from service.metrics import render_metrics

    store = JobStore(tmp_path / "jobs.db", tmp_path / "out")
    for group in (0, 1):
        job = store.submit(SPEC, {"steps": 4}, {})
        store.claim_for_group(group, (group,), ("cpu",))
        for state in (JobState.RENDERING, JobState.ENCODING, JobState.DONE):
            store.set_state(job.id, state)
        render = {"frames": 25 * (group + 1), "fps": 25, "clips": 1, "passes": {"computed": 6, "skipped": 2}}
        stats = build_stats(job_id=job.id, render=render, timings={"total_time": 2.0},
                            group=ReplicaGroup(group, 2, (group,), ("cpu",)), peak_bytes=[1000 * (group + 1)],
                            memory="process_max_rss", prepared_on="group")  # fmt: skip
        (store.job_dir(job.id) / "stats.json").write_text(json.dumps(stats))
    groups = ({"group": 0, "devices": ["cpu"], "state": "busy", "heartbeat_age_s": 0.5},
              {"group": 1, "devices": ["cpu"], "state": "idle", "heartbeat_age_s": None})  # fmt: skip
    status = EngineStatus(True, time.time(), (), "", None, groups)
    text = render_metrics(store, lambda: status, 2)

    def sample(name: str, group: int | None = None, **labels: str) -> float:
        """The value of ``name`` for ``group`` (other labels, e.g. the node, may be added)."""
        want = [f'group="{group}"'] if group is not None else []
        want += [f'{k}="{v}"' for k, v in labels.items()]
        for line in text.splitlines():
            key, _, value = line.rpartition(" ")
            if key.split("{")[0] == name and all(w in key for w in want):
                return float(value)
        raise AssertionError(f"no {name} {want} in:\n{text}")

    assert sample("dialogue_replica_groups") == 2
    assert (sample("dialogue_group_busy", 0), sample("dialogue_group_busy", 1)) == (1.0, 0.0)
    assert np.isnan(sample("dialogue_group_heartbeat_age_seconds", 1))
    assert (sample("dialogue_group_jobs", 0), sample("dialogue_group_frames", 1)) == (1.0, 50.0)
    assert (
        sample("dialogue_model_passes", kind="skipped") == 4.0
        and sample("dialogue_peak_memory_bytes") == 2000
    )
