"""The service on Ray (``python -m service.cluster``): bundles, the store's crash re-queue, flag refusals, and
end to end on a local Ray instance (2 CPUs, no dashboard) with the tiny preset and 2 groups of 1 actor:

- 4 REST jobs end as valid mp4s, two at a time; /api/queue, /api/health and /api/metrics show each group
  with its node and devices;
- SIGKILL of one group's actor mid-job: that job is re-queued (attempt counted), resumes after the clips
  that came back to the head and ends done; the other group's job is unaffected; a new gang is built;
- a job rendered by a Ray group has the same frames as the same job (same seed) rendered by
  ``python distributed_app.py``, and another seed gives other frames (negative control);
- a group of 2 actors (Ulysses over 2 gloo ranks formed by the gang) renders that job too, close to the
  one-process frames (far closer than another seed);
- with ``--replicas 0`` (follow the cluster) a node that joins gets a group and a node that leaves takes
  its group with it (Ray's test cluster: two nodes on this machine, in this process);
- SIGTERM stops the head, its groups and the local Ray instance, exit 0.

Ray starts once for the module (the service fixture); every subprocess is killed with its tree at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from inference.cluster.loopback import prefer_loopback

prefer_loopback()  # before Ray loads: the test cluster below binds to 127.0.0.1 only

from ray.cluster_utils import Cluster  # noqa: E402

from inference.cluster.connect import RayOptions, connect, disconnect  # noqa: E402
from inference.cluster.gang import GangShape  # noqa: E402
from inference.cluster.transfer import BundleError, FolderMirror, pack, unpack  # noqa: E402
from inference.render.video_io import read_frames  # noqa: E402
from inference.render.worker import RuntimeOptions, StartupError  # noqa: E402
from service.cluster.app import check_ray_flags, ray_parser  # noqa: E402
from service.cluster.member import MemberSpec  # noqa: E402
from service.cluster.pool import ClusterPool, PoolConfig  # noqa: E402
from service.jobs import JobState, JobStore  # noqa: E402
from tests.subprocess_env import offline_env  # noqa: E402
from tests.test_service_e2e import (  # noqa: E402
    ROOT,
    Service,
    _kill_tree,
    check_video,
    free_port,
    is_running,
    running_service,
    submit,
    wait_healthy,
    wait_status,
)

SEED = 7
REFERENCE: dict[str, np.ndarray] = {}  # frames of the seed-SEED job as distributed_app renders them
# Short clips (16 new frames each): a job has several, so a clip is back at the head before the kill.
MANY_CLIPS = '{"frame_num": 21, "motion_frames": 5, "steps": 8, "seed": %d}'


# ---------------------------------------------------------------------------------------------- units


def test_bundles_round_trip_and_refuse_escapes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "x.bin").write_bytes(b"\x00\x01")
    (src / "y.txt").write_text("hi")
    (src / ".y.txt.123.tmp").write_text("half written")
    bundle = pack(src)
    assert bundle == {"a/x.bin": b"\x00\x01", "y.txt": b"hi"}
    unpack(bundle, tmp_path / "dst")
    assert (tmp_path / "dst" / "a" / "x.bin").read_bytes() == b"\x00\x01"
    for bad in ("../evil", "/etc/passwd", "a/../../evil", ""):
        with pytest.raises(BundleError):
            unpack({bad: b"x"}, tmp_path / "dst")
    assert not (tmp_path / "evil").exists()


def test_folder_mirror_sends_only_what_changed(tmp_path: Path) -> None:
    mirror = FolderMirror(tmp_path)
    (tmp_path / "clip_0000.npy").write_bytes(b"1")
    assert mirror.changed() == {"clip_0000.npy": b"1"}
    assert mirror.changed() == {}
    (tmp_path / "state.json").write_text("{}")
    (tmp_path / "clip_0000.npy").write_bytes(b"22")
    assert mirror.changed() == {"clip_0000.npy": b"22", "state.json": b"{}"}


def test_requeue_after_crash_counts_the_attempt(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db", tmp_path / "out", min_free_bytes=0, max_attempts=2)
    job = store.submit({"k": 1}, {}, {})
    assert store.claim_for_group(0, (0,), ("cpu",)).id == job.id
    back = store.requeue_after_crash(job.id, "its group 0 went down")
    assert back.state == JobState.QUEUED and back.attempts == 1 and "group 0 went down" in back.stage
    store.claim_for_group(1, (1,), ("cpu",))
    failed = store.requeue_after_crash(job.id, "its group 1 went down")
    assert failed.state == JobState.FAILED and "attempt 2 of 2" in failed.error  # max_attempts applies

    other = store.submit({"k": 2}, {}, {})
    store.claim_for_group(0, (0,), ("cpu",))
    store.request_cancel(other.id)
    assert store.requeue_after_crash(other.id, "down").state == JobState.CANCELLED
    assert store.requeue_after_crash(other.id, "down").state == JobState.CANCELLED  # ended jobs stay


def test_gang_shape_packs_a_group_on_one_node() -> None:
    gpu = GangShape(size=4, gpus=1, cpus=2)
    assert gpu.strategy == "STRICT_PACK" and gpu.bundle() == {"CPU": 2.0, "GPU": 1.0}
    assert gpu.fits({"CPU": 32.0, "GPU": 8.0}) == 2 and gpu.fits({"CPU": 4.0, "GPU": 8.0}) == 0
    assert GangShape(size=1).strategy == "PACK" and GangShape(size=1).fits({"CPU": 2.0}) == 2


def test_flags_this_mode_cannot_honour_are_refused() -> None:
    for args, flag in ((["--group_size", "0"], "--group_size"), (["--replicas", "-1"], "--replicas"),
                       (["--prepare_on", "producer"], "--prepare_on"), (["--rescan_s", "0"], "--rescan_s")):  # fmt: skip
        with pytest.raises(StartupError) as refused:
            check_ray_flags(ray_parser().parse_args(["--preset", "tiny", *args]))
        assert refused.value.field == flag, refused.value
    out = subprocess.run([sys.executable, "-m", "service.cluster", "--preset", "tiny", "--group_size", "0"],
                         cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("error: --group_size"), out


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ray_service(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """``python -m service.cluster`` on a local Ray instance: 2 CPUs, 2 groups of 1 actor, tiny preset."""
    work = tmp_path_factory.mktemp("ray_service")
    port, log = free_port(), work / "service.log"
    cmd = [sys.executable, "-m", "service.cluster", "--preset", "tiny", "--weights", str(tiny_weights),
           "--outputs_dir", str(work / "outputs"), "--server_port", str(port), "--no_ui", "--replicas", "2",
           "--group_size", "1", "--ray_cpus", "2", "--rescan_s", "2",
           "--group_reply_s", "30"]  # fmt: skip
    env = offline_env()
    env.pop("RAY_ADDRESS", None)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    service = Service(proc, f"http://127.0.0.1:{port}", log, work / "outputs")
    try:
        wait_healthy(service, timeout_s=300)
        yield service
    finally:
        _kill_tree(proc)


def _groups(service: Service) -> list[dict]:
    return service.get("/api/queue").json()["groups"]


def _all_serving(service: Service) -> list[dict] | None:
    groups = _groups(service)
    return groups if all(g["state"] in ("idle", "busy") for g in groups) else None


def _wait(what: str, check, service: Service, timeout_s: float = 180.0, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if service.proc.poll() is not None:
            pytest.fail(f"the head exited with {service.proc.returncode}:\n{service.log_tail()}")
        time.sleep(poll_s)
    pytest.fail(f"not {what} after {timeout_s:.0f} s:\n{service.log_tail()}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_four_jobs_two_at_a_time_on_two_groups(
    ray_service: Service, portrait_pngs: tuple[Path, Path], tmp_path: Path
) -> None:
    info = ray_service.get("/api/info").json()
    assert info["replicas"] == 2 and info["group_size"] == 1 and "local Ray instance" in info["cluster"]
    # healthy once one group serves; the other may still be loading its model
    groups = _wait("both groups serving", lambda: _all_serving(ray_service), ray_service)
    assert [g["group"] for g in groups] == [0, 1]
    assert all(g["node"] and g["devices"] == ["cpu"] and g["pid"] for g in groups), groups
    assert groups[0]["pid"] != groups[1]["pid"]

    ids = [submit(ray_service, portrait_pngs) for _ in range(4)]
    bodies = [wait_status(ray_service, i, {"done"}, timeout_s=400) for i in ids]
    for task_id, body in zip(ids, bodies, strict=True):
        assert body["attempts"] == 1
        check_video(ray_service, task_id, tmp_path)
        assert (ray_service.outputs / task_id / "stats.json").is_file()
    jobs = {j["task_id"]: j for j in ray_service.get("/api/jobs", params={"limit": 10}).json()["jobs"]}
    spans = sorted((jobs[i]["started_at"], jobs[i]["finished_at"]) for i in ids)
    assert spans[0][1] > spans[1][0], f"the first two jobs did not run at the same time: {spans}"
    ran_on = {json.loads((ray_service.outputs / i / "stats.json").read_text())["group"]["group"] for i in ids}
    assert ran_on == {0, 1}

    health = ray_service.get("/api/health")
    assert health.status_code == 200
    assert [(g["group"], g["devices"], bool(g["node"])) for g in health.json()["engine"]["groups"]] == [
        (0, ["cpu"], True), (1, ["cpu"], True)]  # fmt: skip
    metrics = ray_service.get("/api/metrics").text
    assert 'dialogue_group_busy{group="1",node="' in metrics


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_of_a_group_actor_requeues_resumes_and_rebuilds(
    ray_service: Service, portrait_pngs: tuple[Path, Path], tmp_path: Path
) -> None:
    victim_job = submit(ray_service, portrait_pngs, settings=MANY_CLIPS % 11)
    other_job = submit(ray_service, portrait_pngs, settings=MANY_CLIPS % 12)
    frames = ray_service.outputs / victim_job / ".frames"
    # A finished clip has come back to the head's outputs (no shared filesystem needed to resume).
    _wait("a clip of the job at the head", lambda: (frames / "clip_0001.npy").is_file(), ray_service)
    victim = next(g for g in _groups(ray_service) if g["task_id"] == victim_job)
    os.kill(victim["pid"], signal.SIGKILL)

    def rebuilt():
        g = next(g for g in _groups(ray_service) if g["group"] == victim["group"])
        return g if g["generation"] == victim["generation"] + 1 and g["state"] in ("idle", "busy") else None

    fresh = _wait("the group rebuilt", rebuilt, ray_service, timeout_s=240)
    assert fresh["pid"] != victim["pid"]
    body = wait_status(ray_service, victim_job, {"done"}, timeout_s=400)
    assert body["attempts"] == 2, body  # the crash counts as an attempt
    render = json.loads((ray_service.outputs / victim_job / "render.json").read_text())
    assert render["passes"]["resumed_after_clip"] >= 1, render["passes"]
    other = wait_status(ray_service, other_job, {"done"}, timeout_s=400)
    assert other["attempts"] == 1, other  # the other group's job was not touched
    check_video(ray_service, victim_job, tmp_path)
    assert "went down" in ray_service.log_tail(200_000)
    _wait("healthy again", lambda: ray_service.get("/api/health").status_code == 200, ray_service, 60)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_ray_group_renders_the_frames_distributed_app_renders(
    ray_service: Service, tiny_weights: Path, portrait_pngs: tuple[Path, Path], tmp_path: Path
) -> None:
    settings = '{"seed": %d}'
    same, other = (
        submit(ray_service, portrait_pngs, settings=settings % SEED),
        submit(ray_service, portrait_pngs, settings=settings % (SEED + 1)),
    )
    for task_id in (same, other):
        wait_status(ray_service, task_id, {"done"}, timeout_s=400)
    ray_same = read_frames(ray_service.outputs / same / "video.mp4")
    ray_other = read_frames(ray_service.outputs / other / "video.mp4")

    with running_service(tiny_weights, tmp_path / "outputs", tmp_path / "app.log") as app:
        task_id = submit(app, portrait_pngs, settings=settings % SEED)
        wait_status(app, task_id, {"done"})
        reference = read_frames(app.outputs / task_id / "video.mp4")
    REFERENCE["frames"], REFERENCE["other"] = reference, ray_other
    assert reference.shape == ray_same.shape
    np.testing.assert_array_equal(ray_same, reference)
    assert ray_other.shape != reference.shape or not np.array_equal(ray_other, reference)  # the seed matters


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_stops_the_head_and_every_group(ray_service: Service) -> None:
    actors = [g["pid"] for g in _groups(ray_service)]
    assert all(actors) and all(is_running(pid) for pid in actors)
    ray_service.proc.send_signal(signal.SIGTERM)
    try:
        code = ray_service.proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the head still runs 90 s after SIGTERM:\n{ray_service.log_tail()}")
    assert code == 0, ray_service.log_tail()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(is_running(pid) for pid in actors):
        time.sleep(0.2)
    assert not [pid for pid in actors if is_running(pid)], "a group's actor outlived the head"
    assert "head: clean exit" in ray_service.log_tail(5000)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_gang_of_two_actors_forms_one_group(
    tiny_weights: Path, portrait_pngs: tuple[Path, Path], tmp_path: Path
) -> None:
    port, log = free_port(), tmp_path / "service.log"
    cmd = [sys.executable, "-m", "service.cluster", "--preset", "tiny", "--weights", str(tiny_weights),
           "--outputs_dir", str(tmp_path / "outputs"), "--server_port", str(port), "--no_ui", "--replicas", "1",
           "--group_size", "2", "--ray_cpus", "2"]  # fmt: skip
    env = offline_env()
    env.pop("RAY_ADDRESS", None)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    service = Service(proc, f"http://127.0.0.1:{port}", log, tmp_path / "outputs")
    try:
        wait_healthy(service, timeout_s=300)
        (group,) = _groups(service)
        assert (
            group["ranks"] == [0, 1] and group["devices"] == ["cpu", "cpu"] and len(set(group["pids"])) == 2
        )
        assert service.get("/api/info").json()["ulysses_size"] == 2
        task_id = submit(service, portrait_pngs, settings=json.dumps({"seed": SEED}))
        wait_status(service, task_id, {"done"}, timeout_s=400)
        check_video(service, task_id, tmp_path)
        stats = json.loads((service.outputs / task_id / "stats.json").read_text())
        assert stats["group"]["ranks"] == [0, 1], stats["group"]
        frames = read_frames(service.outputs / task_id / "video.mp4")
        proc.send_signal(signal.SIGTERM)  # a clean stop also removes the local instance's temporary folder
        proc.wait(timeout=90)
    finally:
        _kill_tree(proc)
    if "frames" in REFERENCE:  # rendered by the test before (one process, and a Ray group with another seed)
        # Ulysses over 2 ranks sums in another order: the decoded h264 frames differ a little, far less than
        # another seed makes them differ.
        close = np.abs(frames.astype(np.int16) - REFERENCE["frames"]).mean()
        if REFERENCE["other"].shape == frames.shape:
            assert close < 0.1 * np.abs(REFERENCE["other"].astype(np.int16) - REFERENCE["frames"]).mean()
        assert frames.shape == REFERENCE["frames"].shape and close < 1.0, close


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_groups_follow_nodes_that_join_and_leave(tiny_weights: Path, tmp_path: Path) -> None:
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1}
    )  # Ray's own test cluster, /tmp/ray
    pool = None
    try:
        connect(RayOptions(address=cluster.address, start_timeout_s=120))
        store = JobStore(tmp_path / "jobs.db", tmp_path / "out", min_free_bytes=0)
        member = MemberSpec(
            size=1, options=RuntimeOptions(preset="tiny", weights=tiny_weights), heartbeat_s=5
        )
        pool = ClusterPool(store, PoolConfig(shape=GangShape(size=1), member=member, replicas=None, poll_s=0.2,
                                             rescan_s=1.0, reserve_s=1.0)).start()  # fmt: skip

        def serving() -> list[str]:
            return [s.gang.node_id for s in pool.slots() if s.state == "serving" and s.gang is not None]

        first = _wait_for(lambda: serving() if len(serving()) == 1 else None, "one group on the head node")
        node = cluster.add_node(num_cpus=1)
        both = _wait_for(
            lambda: serving() if len(serving()) == 2 else None, "a group on the node that joined"
        )
        assert len(set(both)) == 2 and first[0] in both  # the new group sits on the new node
        cluster.remove_node(node)
        _wait_for(
            lambda: len(pool.slots()) == 1 and serving() == first, "the group of the node that left removed"
        )
        assert pool.status().alive
    finally:
        if pool is not None:
            pool.stop(timeout_s=10)
        disconnect()
        cluster.shutdown()


def _wait_for(check, what: str, timeout_s: float = 240.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"not {what} after {timeout_s:.0f} s")
