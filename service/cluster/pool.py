"""The head's side of the Ray service: replica groups as gangs of actors, fed from the job store.

Each group has a *slot* (its index) and one thread on the head. The thread builds the slot's gang when
the cluster has room for it (``Gang.reserve``: a placement group that is ready within a few seconds, else
the slot waits and tries again every ``rescan_s``), then serves it:

- a free group claims the oldest queued job from the store (``claim_for_group``: the job records the
  group, its ranks and GPUs) and sends it to the gang's leader: spec, settings, input files and the clips
  an earlier attempt finished, as one object in Ray's object store;
- the leader's ``poll`` (a long poll: at its next event, at most ``poll_s`` later) brings back progress, timings, states, new finished clips
  (written into the job's ``.frames/`` here at once) and the job's end with its files (written into the
  job's folder in ``outputs/``, then the job is done) — through the same ``StoreSink`` a torchrun leader
  reports to. A cancel requested in the store is passed on;
- a gang is down when a member's ``serve`` call fails (the actor or its node died: Ray reports it at
  once) or the leader does not answer a poll within ``reply_s`` (hung). Then every member is killed,
  the placement group freed, the group's job handed back to the store (``requeue_after_crash``: the
  attempt counts; the next group resumes after the last clip that came back), and the slot builds a new
  gang when resources allow.

With ``replicas=None`` the pool keeps as many groups as the cluster's nodes hold (re-checked every
``rescan_s``): groups are added when nodes join and removed when they leave. A fixed count keeps that many
slots; one whose node left waits for room.

``status()`` is the service's ``EngineStatus``: one entry per group with its node, ranks and GPUs; healthy
while at least one group serves and none of the serving groups is stale.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from common.errors import InputError
from inference.cluster.gang import Gang, GangError, GangShape
from inference.cluster.transfer import pack, unpack
from inference.parallel.groups import ReplicaGroup
from inference.render.pipeline import FRAMES_SPILL_DIR
from inference.render.settings import GenerationSettings
from inference.render.spec import JobSpec
from service.cluster.member import MAX_CONCURRENCY, GangMember, MemberSpec
from service.jobs import INPUTS_DIRNAME, JobState, JobStore
from service.runner import STORE_ERRORS, EngineMonitor, StoreSink
from service.schemas import EngineStatus, WorkerStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolConfig:
    shape: GangShape
    member: MemberSpec
    replicas: int | None = 1  # None: as many groups as the cluster holds
    poll_s: float = 0.5
    reply_s: float = 60.0  # a leader that does not answer a poll this long is hung
    rescan_s: float = 10.0  # how often a waiting slot (or the group count) is re-checked
    reserve_s: float = 3.0  # how long a placement group may take to be ready before the slot waits
    build_s: float = 900.0  # members located, joined and their models loaded


@dataclass
class Slot:
    """One replica group's place in the pool, with its current gang (None while waiting or rebuilding)."""

    index: int
    gang: Gang | None = None
    state: str = "waiting"  # waiting | starting | serving | down | stopped
    message: str = "waiting for resources"
    generation: int = 0  # gangs built for this slot so far
    jobs: dict[str, str] = field(default_factory=dict)  # in-flight job -> its last reported state
    cancels_sent: set[str] = field(default_factory=set)
    beat: float | None = None  # head clock: the leader engine's last heartbeat
    limit_s: float | None = None
    task_id: str | None = None
    stage: str | None = None
    jobs_done: int = 0
    retired: bool = False
    next_try: float = 0.0


class ClusterPool:
    """Builds, feeds, watches and rebuilds the groups (see the module docstring)."""

    def __init__(self, store: JobStore, config: PoolConfig, monitor: EngineMonitor | None = None) -> None:
        self.store = store
        self.config = config
        self.monitor = monitor or EngineMonitor(config.shape.size, "ray")
        self.sink = StoreSink(store, self.monitor)
        self._actor = ray.remote(max_concurrency=MAX_CONCURRENCY)(GangMember)
        self._lock = threading.Lock()
        self._slots: list[Slot] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._stop_by = float("inf")  # monotonic deadline of stop()
        self._ready = threading.Condition(self._lock)
        self.facts: dict[str, Any] | None = None  # the first leader's answer (voices, LoRA, weights)
        self._manager = threading.Thread(target=self._manage, name="ray-pool", daemon=True)

    # ---- life cycle

    def start(self) -> ClusterPool:
        initial = self.config.replicas if self.config.replicas is not None else max(1, self._capacity())
        for _ in range(initial):
            self._add_slot()
        self._manager.start()
        return self

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        """Block until one group serves; its leader's facts. ``GangError`` when none does in time."""
        deadline = time.monotonic() + timeout_s
        with self._ready:
            while self.facts is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    why = "; ".join(f"group {s.index}: {s.message}" for s in self._slots) or "no group"
                    raise GangError(f"no group came up within {timeout_s:.0f}s ({why})")
                self._ready.wait(min(left, 1.0))
            return self.facts

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop every gang after its current step: running jobs end as interrupted (back to the queue, the
        attempt not counted), their last events applied; then kill what is left. Bounded by ``timeout_s``
        in all (a cluster whose processes died with the head's process group answers nothing)."""
        self._stop_by = time.monotonic() + timeout_s
        self._stop.set()
        for thread in self._threads:
            thread.join(max(0.0, self._stop_by - time.monotonic()))
        self._manager.join(timeout=1)

    # ---- status for the web

    def slots(self) -> list[Slot]:
        with self._lock:
            return list(self._slots)

    def status(self) -> EngineStatus:
        now = time.time()
        groups, workers, messages = [], [], []
        serving_beats: list[tuple[float, float | None]] = []
        for slot in self.slots():
            gang = slot.gang
            group = gang.group if gang is not None else self._placeholder(slot.index)
            serving = slot.state == "serving" and gang is not None
            state = ("busy" if slot.task_id else "idle") if serving else slot.state
            if serving and slot.beat is not None:
                serving_beats.append((slot.beat, slot.limit_s))
            elif slot.state != "stopped":
                messages.append(f"group {slot.index}: {slot.state}: {slot.message}")
            progress = None
            if slot.task_id is not None:
                try:
                    progress = round(self.store.get(slot.task_id).progress, 2)
                except (KeyError, *STORE_ERRORS):
                    progress = None
            finishing = [j for j, s in slot.jobs.items() if s == JobState.ENCODING.value]
            locations = gang.locations if gang is not None else []
            groups.append({
                "group": slot.index, "ranks": list(group.ranks), "devices": list(group.devices),
                "node": group.node, "node_id": gang.node_id if gang is not None else None,
                "gpus": [d for d in group.devices if d.startswith("cuda")],
                "pids": [loc["pid"] for loc in locations], "pid": locations[0]["pid"] if locations else None,
                "state": state, "task_id": slot.task_id, "stage": slot.stage, "progress": progress,
                "finishing": finishing, "generation": slot.generation, "jobs_done": slot.jobs_done,
                "message": slot.message if not serving else "",
                "heartbeat_age_s": None if slot.beat is None or not serving else round(max(0.0, now - slot.beat), 3),
            })  # fmt: skip
            for rank, device in zip(group.ranks, group.devices, strict=True):
                workers.append(WorkerStatus(rank, slot.task_id is not None, slot.task_id, slot.stage,
                                            device if gang is not None else None, slot.index))  # fmt: skip
        last, limit = min(serving_beats, key=lambda b: b[0]) if serving_beats else (None, None)
        return EngineStatus(
            bool(serving_beats), last, tuple(workers), "; ".join(messages), limit, tuple(groups)
        )

    def leader(self) -> Any:
        """A serving group's leader (for voice previews), or None."""
        for slot in self.slots():
            if slot.state == "serving" and slot.gang is not None:
                return slot.gang.leader
        return None

    # ---- the slots

    def _placeholder(self, index: int) -> ReplicaGroup:
        g = self.config.shape.size
        return ReplicaGroup(index, max(index + 1, len(self._slots)), tuple(index * g + r for r in range(g)),
                            ("-",) * g, "")  # fmt: skip

    def _capacity(self) -> int:
        """Gangs the alive nodes hold (by their total resources)."""
        return sum(self.config.shape.fits(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive"))

    def _add_slot(self) -> Slot:
        with self._lock:
            slot = Slot(len(self._slots))
            self._slots.append(slot)
        thread = threading.Thread(
            target=self._run_slot, args=(slot,), name=f"ray-group{slot.index}", daemon=True
        )
        self._threads.append(thread)
        thread.start()
        return slot

    def _manage(self) -> None:
        """With ``replicas=None``: follow the cluster's capacity (nodes joining or leaving)."""
        while not self._stop.wait(self.config.rescan_s):
            if self.config.replicas is not None:
                continue
            try:
                want = self._capacity()
            except Exception:
                logger.warning("cannot read the cluster's nodes", exc_info=True)
                continue
            with self._lock:
                have = [s for s in self._slots if not s.retired]
            for _ in range(want - len(have)):
                slot = self._add_slot()
                logger.info("a node joined: group %d added (%d group(s) fit the cluster)", slot.index, want)
            for slot in reversed(have[want:] if want < len(have) else []):
                if slot.gang is None:  # only groups without a gang leave (their node is gone)
                    slot.retired = True
                    logger.info(
                        "a node left: group %d removed (%d group(s) fit the cluster)", slot.index, want
                    )
            with self._lock:
                while self._slots and self._slots[-1].retired:
                    self._slots.pop()

    def _run_slot(self, slot: Slot) -> None:
        while not self._stop.is_set() and not slot.retired:
            if slot.gang is None and (time.monotonic() < slot.next_try or not self._build(slot)):
                self._stop.wait(min(self.config.poll_s * 4, self.config.rescan_s))
                continue
            try:
                self._serve_once(slot)
            except GangError as exc:
                self._take_down(slot, str(exc))
                continue
            self._stop.wait(0.01)  # the poll itself waits (long poll)
        if slot.gang is not None:
            self._stop_gang(slot)
        slot.state = "stopped"

    def _build(self, slot: Slot) -> bool:
        shape = self.config.shape
        pg = Gang.reserve(shape, timeout_s=self.config.reserve_s)
        if pg is None:
            slot.state, slot.message = (
                "waiting",
                f"waiting for room: {shape.size} x {shape.bundle()} on one node",
            )
            slot.next_try = time.monotonic() + self.config.rescan_s
            return False
        slot.state, slot.message = "starting", f"starting gang {slot.generation + 1}"
        t0 = time.monotonic()
        spec = self.config.member
        try:
            gang = Gang.build(
                self._actor, shape, pg, index=slot.index, count=max(len(self._slots), slot.index + 1),
                make_args=lambda rank: (rank, spec), start=lambda actor, rank, master, group: actor.start.remote(
                    master, group), timeout_s=self.config.build_s,
            )  # fmt: skip
        except GangError as exc:
            slot.state, slot.message = "down", f"could not start: {exc}"
            slot.next_try = time.monotonic() + self.config.rescan_s
            logger.error("group %d: could not start a gang: %s", slot.index, exc)
            return False
        gang.start_serving()
        slot.generation += 1
        slot.gang, slot.state, slot.message = gang, "serving", ""
        slot.beat, slot.limit_s = time.time(), None
        logger.info(
            "%s: gang %d serving (built in %.1fs)", gang.group.label(), slot.generation, time.monotonic() - t0
        )
        with self._ready:
            if self.facts is None:
                self.facts = dict(gang.started[0])
            self._ready.notify_all()
        return True

    def _serve_once(self, slot: Slot) -> None:
        gang = slot.gang
        assert gang is not None
        down = gang.dead_member()
        if down is not None:
            raise GangError(down)
        if self._free(slot) and not self._stop.is_set():
            self._dispatch(slot, gang)
        # A long poll: back at the leader's next event (a job's end: the group takes the next job at once)
        reply = gang.call(
            gang.leader.poll.remote(self.config.poll_s), self.config.reply_s, "heartbeat (poll)"
        )
        self._apply(slot, reply)
        if self._free(slot) and not self._stop.is_set():
            self._dispatch(slot, gang)
        for job_id in list(slot.jobs):
            if job_id not in slot.cancels_sent and self.sink.cancel_requested(job_id):
                gang.leader.cancel.remote(job_id)
                slot.cancels_sent.add(job_id)

    def _free(self, slot: Slot) -> bool:
        """No job in flight, or only ones being decoded and muxed (the group may start the next)."""
        return all(state == JobState.ENCODING.value for state in slot.jobs.values())

    def _dispatch(self, slot: Slot, gang: Gang) -> None:
        g = gang.group
        try:
            job = self.store.claim_for_group(g.index, g.ranks, g.devices)
        except STORE_ERRORS as exc:
            logger.warning("group %d: the store refuses the claim (%s); trying again", g.index, exc)
            return
        if job is None:
            return
        folder = self.store.job_dir(job.id)
        try:
            spec = JobSpec.from_json(job.spec)
            GenerationSettings.from_dict(job.settings)
            spec.input_paths(folder / INPUTS_DIRNAME)
        except InputError as exc:
            self.store.set_state(job.id, JobState.FAILED, error=f"cannot start the job: {exc}")
            logger.warning("job %s refused: %s", job.id, exc)
            return
        payload = {"job_id": job.id, "spec": job.spec, "settings": job.settings,
                   "inputs": pack(folder / INPUTS_DIRNAME), "frames": pack(folder / FRAMES_SPILL_DIR)}  # fmt: skip
        slot.jobs[job.id] = JobState.PREPARING.value
        slot.task_id, slot.stage = job.id, "preparing"
        resumed = len([n for n in payload["frames"] if n.endswith(".npy")])
        logger.info(
            "job %s -> %s%s", job.id, g.label(), f" (resumes after {resumed} clip(s))" if resumed else ""
        )
        gang.call(gang.leader.submit.remote(ray.put(payload)), self.config.reply_s, "submitting a job")

    def _apply(self, slot: Slot, reply: dict[str, Any]) -> None:
        """A poll's answer into the store: clips first, then progress, then the events in order."""
        for job_id, files in reply["frames"].items():
            unpack(files, self.store.job_dir(job_id) / FRAMES_SPILL_DIR)
        for job_id, (percent, stage) in reply["progress"].items():
            self.sink.progress(job_id, percent, stage)
        for event in reply["events"]:
            kind, job_id = event[0], event[1]
            if kind == "timing":
                self.sink.timing(job_id, event[2], event[3])
            elif kind == "state":
                slot.jobs[job_id] = event[2]
                self.sink.state(job_id, event[2])
            elif kind == "done":
                unpack(event[3], self.store.job_dir(job_id))
                self.sink.done(job_id, event[2])
                self._forget(slot, job_id)
                slot.jobs_done += 1
            elif kind == "failed":
                self.sink.failed(job_id, event[2], cancelled=event[3], interrupted=event[4])
                self._forget(slot, job_id)
        age = reply.get("beat_age_s")
        slot.beat = None if age is None else time.time() - age
        slot.limit_s = reply.get("limit_s")
        slot.task_id, slot.stage = reply.get("job"), reply.get("stage")

    def _forget(self, slot: Slot, job_id: str) -> None:
        slot.jobs.pop(job_id, None)
        slot.cancels_sent.discard(job_id)

    def _take_down(self, slot: Slot, why: str) -> None:
        """The gang is lost: kill it, hand its jobs back (the attempt counts), rebuild later."""
        gang = slot.gang
        label = gang.group.label() if gang is not None else f"group {slot.index}"
        logger.error("%s went down: %s", label, why)
        if gang is not None:
            gang.kill()
        slot.gang, slot.state, slot.message = None, "down", f"gang {slot.generation} lost: {why}; rebuilding"
        slot.task_id = slot.stage = None
        slot.beat = None
        for job_id in list(slot.jobs):
            try:
                self.store.requeue_after_crash(job_id, f"its group {slot.index} went down")
            except (KeyError, *STORE_ERRORS):
                logger.exception("job %s: could not hand it back after its group went down", job_id)
            self.monitor.idle(job_id)
            self._forget(slot, job_id)
        slot.next_try = 0.0  # rebuild as soon as the cluster has room

    def _stop_gang(self, slot: Slot) -> None:
        """Clean stop (service shutdown): the engine stops after its step, the last events are applied."""
        gang = slot.gang
        assert gang is not None
        left = lambda: max(0.5, self._stop_by - time.monotonic())  # noqa: E731
        try:
            gang.leader.stop.remote()
            ray.wait(gang.serving, num_returns=len(gang.serving), timeout=left())
            self._apply(slot, gang.call(gang.leader.poll.remote(), min(5.0, left()), "the last poll"))
        except (GangError, ray.exceptions.RayError) as exc:
            logger.warning("group %d did not stop cleanly: %s", slot.index, exc)
        for job_id in list(slot.jobs):  # never reported back: re-queued at the next start
            logger.warning("job %s: no end reported by group %d before the stop", job_id, slot.index)
        gang.kill()
        slot.gang = None


def tts_preview_via(pool: ClusterPool, timeout_s: float = 60.0) -> Callable[[str, str | None], bytes]:
    """Voice previews made by a serving group's leader (the head loads no model)."""

    def preview(voice: str, text: str | None) -> bytes:
        leader = pool.leader()
        if leader is None:
            raise RuntimeError("no group is serving yet; try again in a moment")
        return ray.get(leader.tts_preview.remote(voice, text), timeout=timeout_s)

    return preview
