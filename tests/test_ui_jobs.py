"""The UI's job views against a real JobStore: the status of the job on screen with named stages and
named downloads, who ran a finished job and its model passes, cancel, history, re-runs, settings that
come back, the live queue and the gallery, and, behind the app's gate, each credential's own jobs.

The engine is not part of the UI: tests move jobs along the way an engine would (claim, progress,
outputs, done) through the store's own API.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from PIL import Image

from service.jobs import JobState, JobStore
from service.ui import UiHandlers, build_ui, mount_ui, submit_form
from tests import ui_support
from tests.ui_support import _finish, _handlers, _png_bytes, _portrait, _values

# the shared fixtures, bound here so pytest finds them for this module's tests
store, portraits, ui, recordings = (
    ui_support.store,
    ui_support.portraits,
    ui_support.ui,
    ui_support.recordings,
)

# ---------------------------------------------------------------------------------------------- status


def test_poll_follows_the_job(ui: UiHandlers, store: JobStore, portraits: tuple[str, str]) -> None:
    first, _ = ui.generate(_values(ui, portraits))
    second, _ = ui.generate(_values(ui, portraits))
    r = ui.poll(second)
    assert not r.terminal and r.cancellable and r.video is None
    assert "position <b>2</b> of 2" in r.html and "queued" in r.html

    store.claim_next("test")
    store.update_progress(first, 42, "clip 1 of 2, step 3 of 16")
    r = ui.poll(first)
    assert (
        "42%" in r.html
        and "Denoising: clip 1 of 2, step 3 of 16" in r.html
        and 'aria-valuenow="42"' in r.html
    )
    assert 'data-stage="denoising"' in r.html and '<span class="dv-step dv-step-done">Speech</span>' in r.html
    assert "position <b>1</b> of 1" in ui.poll(second).html and "1 job running" in ui.poll(second).html
    # Every stage the renderer reports has its name on the page.
    for text, stage in (("synthesising speech", "Speech"), ("composing the scene", "Scene"),
                        ("encoding audio (wav2vec2)", "Conditioning"), ("conditioning clip 2 of 2", "Conditioning"),
                        ("decoding clip 2 of 2", "Decoding"), ("encoding the video", "Muxing")):  # fmt: skip
        store.update_progress(first, 50, text)
        assert f'<span class="dv-stage">{stage}: {text}</span>' in ui.poll(first).html, text

    store.set_state(first, "rendering")
    store.set_state(first, "encoding")
    cue = "00:00:00,000 --> 00:00:01,000\nHi\n"
    for name, data in {"video.mp4": b"mp4", "subtitles.vtt": f"WEBVTT\n\n{cue.replace(',', '.')}".encode(),
                       "subtitles.srt": f"1\n{cue}".encode(), "mix.wav": b"RIFF", "render.json": b"{}"}.items():  # fmt: skip
        (store.job_dir(first) / name).write_bytes(data)
    store.set_outputs(first, ["subtitles.vtt", "video.mp4", "subtitles.srt", "mix.wav", "render.json"])
    store.set_state(first, "done")
    r = ui.poll(first)
    assert r.terminal and not r.cancellable and r.done and "done" in r.html and "100%" in r.html
    assert r.video == str(store.job_dir(first).resolve() / "video.mp4")
    # Downloads are named after the job, the side files zipped.
    short = first[:8]
    names = [Path(p).name for p in r.downloads.paths()]
    assert names == [f"dialogue-{short}.mp4", f"dialogue-{short}.srt", f"dialogue-{short}.vtt",
                     f"dialogue-{short}-files.zip"]  # fmt: skip
    assert Path(r.downloads.video).read_bytes() == b"mp4" and r.subtitles == r.downloads.vtt
    with zipfile.ZipFile(r.downloads.zip) as zf:
        assert sorted(zf.namelist()) == ["mix.wav", "render.json"]

    assert "No job yet" in ui.poll("").html
    assert "not a job id" in ui.poll("../etc/passwd").html
    assert "no job with id" in ui.poll("0" * 32).html


def test_poll_converts_srt_only_subtitles(
    ui: UiHandlers, store: JobStore, portraits: tuple[str, str]
) -> None:
    job_id, _ = ui.generate(_values(ui, portraits))
    _finish(store, job_id, {"video.mp4": b"x", "subtitles.srt": b"1\n00:00:00,000 --> 00:00:01,500\nHi\n"})
    r = ui.poll(job_id)
    vtt = Path(r.subtitles).read_text()
    assert vtt.startswith("WEBVTT") and "00:00:00.000 --> 00:00:01.500" in vtt and "Hi" in vtt
    assert "Done in 12 s" in r.html  # total_time 12.5 s


def test_poll_failed_and_missing_outputs(ui: UiHandlers, store: JobStore, portraits: tuple[str, str]) -> None:
    job_id, _ = ui.generate(_values(ui, portraits))
    store.claim_next("test")
    store.set_state(job_id, "failed", error="<b>out of memory</b>")
    r = ui.poll(job_id)
    assert r.terminal and "Failed: &lt;b&gt;out of memory&lt;/b&gt;" in r.html
    other, _ = ui.generate(_values(ui, portraits))
    _finish(store, other, {"video.mp4": b"x"})
    (store.job_dir(other) / "video.mp4").unlink()
    r = ui.poll(other)
    assert r.video is None and "missing on disk" in r.html


def test_cancel(ui: UiHandlers, store: JobStore, portraits: tuple[str, str]) -> None:
    running, _ = ui.generate(_values(ui, portraits))
    waiting, _ = ui.generate(_values(ui, portraits))
    store.claim_next("test")
    assert "cancelled" in ui.cancel(waiting) and store.get(waiting).state == JobState.CANCELLED
    assert "Cancel requested" in ui.cancel(running) and store.get(running).cancel_requested
    r = ui.poll(running)
    assert "cancelling" in r.html and not r.cancellable
    store.set_state(running, "cancelled")
    assert "already finished" in ui.cancel(running)
    assert "No job" in ui.cancel("")


# ---------------------------------------------------------------------------------------------- history


def test_history_rows_and_selection(ui: UiHandlers, store: JobStore, portraits: tuple[str, str]) -> None:
    old, _ = ui.generate(_values(ui, portraits))
    new, _ = ui.generate(_values(ui, portraits, preset="quality", steps=40, text_guidance=5.0, seed=3))
    _finish(store, old, {"video.mp4": b"x"})
    rows, ids = ui.history()
    assert ids == [new, old]
    assert rows[0][:7] == [new[:8], rows[0][1], "queued (#1)", "quality", 40, "480p", 3]
    assert rows[1][2] == "done" and rows[1][-1] == 12.5
    assert rows[1][7] == "af_heart + am_adam" and rows[1][8].startswith("(s1) Hello there! / (s2)")
    table = ui.history_html()
    assert table.index(new) < table.index(old)  # newest first
    assert (
        f'data-action="cancel" data-job="{new}"' in table
        and f'data-action="delete" data-job="{new}"' not in table
    )
    assert (
        f'data-action="delete" data-job="{old}"' in table and f'data-action="load" data-job="{old}"' in table
    )
    assert f'data-action="seed" data-job="{old}"' in table


def test_rerun_resubmits_same_inputs(
    ui: UiHandlers, store: JobStore, portraits: tuple[str, str], tmp_path: Path
) -> None:
    first, _ = ui.generate(_values(ui, portraits, layout="backdrop", backdrop="plain", aspect="4:3", seed=11))
    _finish(store, first, {"video.mp4": b"x"})
    again, msg = ui.rerun(first)
    assert again is not None and again != first and again[:8] in msg and "same seed (11)" in msg
    a, b = store.get(first), store.get(again)
    assert a.spec == b.spec and a.settings == b.settings
    for name in a.inputs:
        assert store.input_path(again, name).read_bytes() == store.input_path(first, name).read_bytes()

    scene = _portrait(tmp_path / "scene.png", (40, 50, 60), (800, 400))
    boxed, _ = ui.generate(_values(ui, ("", ""), source="scene", scene_image=scene,
                                   boxes='{"person1": [40, 20, 380, 400], "person2": [40, 420, 380, 780]}'))  # fmt: skip
    again2, msg = ui.rerun(boxed)
    assert again2 is not None, msg
    assert store.get(again2).spec["scene"] == store.get(boxed).spec["scene"]

    assert ui.rerun("")[0] is None
    assert "no job with id" in ui.rerun("f" * 32)[1]


def test_rerun_of_audio_file_job(ui: UiHandlers, store: JobStore, portraits: tuple[str, str]) -> None:
    buf = io.BytesIO()
    tone = 0.3 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000)  # 1 s: uploaded speech must not be silent
    soundfile.write(buf, tone.astype(np.float32), 16000, format="WAV")
    files = {"left_image": Path(portraits[0]).read_bytes(), "right_image": Path(portraits[1]).read_bytes(),
             "audio1": buf.getvalue(), "audio2": buf.getvalue()}  # fmt: skip
    job_id = submit_form(store, {"audio_mode": "para", "preset": "fast"}, files)
    again, msg = ui.rerun(job_id)
    assert again is not None, msg
    assert store.get(again).spec["audio_mode"] == "para" and store.get(again).spec["audio_source"] == "files"


def test_current_job_prefers_url_then_browser(
    ui: UiHandlers, store: JobStore, portraits: tuple[str, str]
) -> None:
    a, _ = ui.generate(_values(ui, portraits))
    b, _ = ui.generate(_values(ui, portraits))
    assert ui.current_job(a, b) == b
    assert ui.current_job(a, None) == a
    assert ui.current_job(a, "not-an-id") == a
    assert ui.current_job("0" * 32, None) == ""  # stored id of a job this store does not know
    assert ui.current_job(None, None) == ""


# ---------------------------------------------------------------------------------------------- settings that come back


def test_load_settings_brings_back_every_field(
    ui: UiHandlers, store: JobStore, portraits: tuple[str, str]
) -> None:
    values = _values(
        ui, portraits, layout="backdrop", backdrop="plain", aspect="4:3", voice2="bf_emma", prompt="In a library.",
        steps=20, seed=1234, max_length=30.0, color_correction=0.5, apg=True, negative_prompt="blurry",
        text_guidance=2.5, speech="script",
    )  # fmt: skip
    job_id, msg = ui.generate(values)
    assert job_id is not None, msg
    loaded, differ, text = ui.load_settings(job_id)
    for key, value in values.items():
        if key in ("left_image", "right_image"):
            assert Path(loaded[key]).read_bytes() == Path(value).read_bytes(), key
        else:
            assert loaded[key] == value, (key, loaded[key], value)
    assert (
        loaded["source"] == "portraits" and loaded["scene_image"] is None and loaded["single_image"] is None
    )
    assert set(differ) == {"steps", "seed", "max_length", "color_correction", "apg", "negative_prompt",
                           "text_guidance"}  # fmt: skip
    assert job_id[:8] in text and "seed 1234" in text
    # Loaded values submit the same job again (same settings and inputs).
    again, _ = ui.generate(loaded)
    a, b = store.get(job_id), store.get(again)
    assert (
        a.settings == b.settings
        and a.spec["scene"] == b.spec["scene"]
        and a.spec["script"] == b.spec["script"]
    )
    # A random seed comes back as the seed the video used.
    rnd, _ = ui.generate({**values, "seed": -1})
    drawn = store.get(rnd).settings["seed"]
    assert drawn >= 0 and ui.load_settings(rnd)[0]["seed"] == drawn
    # Inputs that are gone are named; the rest still loads.
    store.input_path(job_id, store.get(job_id).spec["images"]["right"]).unlink()
    loaded, _, text = ui.load_settings(job_id)
    assert loaded["right_image"] is None and loaded["script"] == values["script"]
    assert "No longer on disk: Portrait of person 2 (right)" in text
    assert ui.load_settings("")[0] is None and "no job with id" in ui.load_settings("0" * 32)[2]


def test_load_settings_of_scene_and_audio_jobs(
    ui: UiHandlers, store: JobStore, tmp_path: Path, recordings: tuple[str, str]
) -> None:
    scene = _portrait(tmp_path / "scene.png", (40, 50, 60), (800, 400))
    boxes = "[[40, 20, 380, 400], [40, 420, 380, 780]]"
    values = _values(ui, ("", ""), source="scene", scene_image=scene, boxes=boxes, speech="audio",
                     audio1=recordings[0], audio2=recordings[1], audio_mode="para")  # fmt: skip
    job_id, msg = ui.generate(values)
    assert job_id is not None, msg
    loaded, _, _ = ui.load_settings(job_id)
    assert loaded["source"] == "scene" and json.loads(loaded["boxes"]) == json.loads(boxes)
    assert loaded["speech"] == "audio" and loaded["audio_mode"] == "para"
    for key in ("scene_image", "audio1", "audio2"):
        assert Path(loaded[key]).read_bytes() == Path(values[key]).read_bytes(), key


def test_rerun_with_a_new_seed(ui: UiHandlers, store: JobStore, portraits: tuple[str, str]) -> None:
    first, _ = ui.generate(_values(ui, portraits, seed=7, steps=20))
    _finish(store, first, {"video.mp4": b"x"})
    again, msg = ui.rerun(first, new_seed=True)
    a, b = store.get(first), store.get(again)
    assert "new seed" in msg and b.settings["seed"] != 7 and b.spec["settings_overrides"]["seed"] == -1
    assert {k: v for k, v in a.settings.items() if k != "seed"} == {
        k: v for k, v in b.settings.items() if k != "seed"
    }
    assert b.spec["script"] == a.spec["script"] and b.spec["images"] == a.spec["images"]
    same, msg = ui.rerun(first)  # negative control: a plain re-run keeps the seed
    assert store.get(same).settings["seed"] == 7 and "same seed (7)" in msg


# ---------------------------------------------------------------------------------------------- job lists


def test_queue_gallery_and_delete(ui: UiHandlers, store: JobStore, portraits: tuple[str, str]) -> None:
    done, _ = ui.generate(_values(ui, portraits))
    running, _ = ui.generate(_values(ui, portraits, steps=20))
    waiting, _ = ui.generate(_values(ui, portraits, steps=21))
    _finish(store, done, {"video.mp4": b"x", "reference.png": _png_bytes()})
    store.claim_next("test")
    store.update_progress(running, 30, "decoding clip 1 of 2")
    queue = ui.queue_html()
    assert queue.index(running) < queue.index(waiting) and done not in queue
    assert "<b>running</b>" in queue and "Decoding: decoding clip 1 of 2" in queue and "<b>#1</b>" in queue
    assert (
        f'data-action="cancel" data-job="{running}"' in queue
        and f'data-action="cancel" data-job="{waiting}"' in queue
    )
    assert "1 job waiting, 1 running" in ui.header()
    gallery = ui.gallery_html()
    assert f'data-job="{done}"' in gallery and running not in gallery
    assert f"dialogue-{done[:8]}.mp4" in gallery and 'data-file="' in gallery and "thumbnail.jpg" in gallery
    with Image.open(store.job_dir(done) / "downloads" / "thumbnail.jpg") as thumb:
        assert thumb.width <= 320 and thumb.height <= 180
    sig = ui.panels_signature()
    assert ui.panels_signature() == sig  # nothing changed
    store.update_progress(running, 31, "decoding clip 1 of 2")
    assert ui.panels_signature() != sig
    # Delete: finished jobs only, with their folder.
    assert "cancel it first" in ui.delete(running) and store.exists(running)
    assert "Deleted job" in ui.delete(done) and not store.exists(done) and not store.job_dir(done).exists()
    assert "Finished videos appear here" in ui.gallery_html()


def test_downloads_of_an_uploaded_audio_job_have_no_empty_subtitles(
    ui: UiHandlers, store: JobStore, portraits: tuple[str, str], recordings: tuple[str, str]
) -> None:
    job_id, _ = ui.generate(
        _values(ui, portraits, speech="audio", audio1=recordings[0], audio2=recordings[1])
    )
    _finish(store, job_id, {"video.mp4": b"x", "subtitles.srt": b"", "subtitles.vtt": b"WEBVTT\n\n",
                            "timeline.json": b"{}"})  # fmt: skip
    d = ui.poll(job_id).downloads
    assert d.srt is None and d.vtt is None and Path(d.video).name == f"dialogue-{job_id[:8]}.mp4"
    with zipfile.ZipFile(d.zip) as zf:
        assert zf.namelist() == ["timeline.json"]


# ---------------------------------------------------------------------------------------------- stages


def test_the_renderers_stage_texts_have_names_in_order() -> None:
    from types import SimpleNamespace

    from inference.render.pipeline import clip_progress, clip_stage
    from service.ui.formatting import stage_of

    prep = SimpleNamespace(num_clips=3)
    texts, percents = [], []
    for index in range(3):
        clip = SimpleNamespace(index=index)
        for pct, text in (clip_stage(prep, clip, "conditioning"), *(clip_progress(prep, clip, s, 4) for s in (1, 4)),
                          clip_stage(prep, clip, "decoding")):  # fmt: skip
            texts.append(text)
            percents.append(pct)
    assert texts[:4] == ["conditioning clip 1 of 3", "clip 1 of 3, step 1 of 4", "clip 1 of 3, step 4 of 4",
                         "decoding clip 1 of 3"]  # fmt: skip
    assert [stage_of(t) for t in texts[:4]] == ["conditioning", "denoising", "denoising", "decoding"]
    assert percents == sorted(percents) and percents[0] >= 10 and percents[-1] <= 95  # never goes back


class _StageSink:
    """Records what the worker reports (a test double of the service's StoreSink)."""

    def __init__(self) -> None:
        self.stages: list[str] = []

    def progress(self, job_id: str, percent: float, stage: str) -> None:
        self.stages.append(stage)

    def cancel_requested(self, job_id: str) -> bool:
        return False

    def timing(self, job_id: str, name: str, seconds: float) -> None:
        pass

    def state(self, job_id: str, state: str) -> None:
        pass

    def done(self, job_id: str, outputs: list[str]) -> None:
        pass

    def failed(self, job_id: str, reason: str, *, cancelled: bool = False, interrupted: bool = False) -> None:
        pass


@pytest.mark.slow
def test_a_real_render_reports_every_stage_by_name(tiny_weights: Path, portrait_pngs, tmp_path: Path) -> None:
    """The tiny weights through the one clip driver: the status panel can name every stage it reports."""
    import torch

    from inference.checkpoint.loader import load_model
    from inference.checkpoint.weights import WeightPaths
    from inference.parallel.context import ParallelContext
    from inference.render.intake import Limits as JobLimits
    from inference.render.intake import build_job
    from inference.render.pipeline import RenderConfig, Renderer
    from inference.render.settings import GenerationSettings
    from inference.render.spec import JobInput
    from inference.render.worker import RenderJob, Runtime, RuntimeOptions
    from service.ui.formatting import STAGES, stage_of

    paths = WeightPaths.under(tiny_weights)
    renderer = Renderer(paths, RenderConfig(render_divisor=8))
    model = load_model(paths.wan_dir, device="cpu", dtype=torch.float32)
    runtime = Runtime(RuntimeOptions(preset="tiny", weights=tiny_weights), ParallelContext.single("cpu"), model,
                      paths, renderer)  # fmt: skip
    left, right = (Path(p).read_bytes() for p in portrait_pngs)
    job = build_job(
        JobInput(left_image=left, right_image=right, script="(s1) Hi there.\n(s2) Hello."), JobLimits()
    )
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name, data in job.files.items():
        (inputs / name).write_bytes(data)
    sink = _StageSink()
    settings = GenerationSettings.from_dict({"steps": 2, "seed": 3})
    runtime.render(RenderJob("stages", job.spec, settings, inputs, tmp_path / "out"), sink)
    named = [stage_of(s) for s in sink.stages if s != "done"]
    assert None not in named, sink.stages
    seen = list(dict.fromkeys(named))  # first appearance of each, in order
    assert seen == list(STAGES), sink.stages
    decodes = [s for s in sink.stages if s.startswith("decoding clip")]
    conditions = [s for s in sink.stages if s.startswith("conditioning clip")]
    assert len(decodes) == len(conditions) >= 1 and decodes[-1].endswith(f"of {len(decodes)}"), sink.stages


# ---------------------------------------------------------------------------------------------- who ran it


def _done(store: JobStore, job_id: str, files: dict[str, bytes]) -> None:
    """The end of a claimed job: its files written, done."""
    store.set_state(job_id, "rendering")
    store.set_state(job_id, "encoding")
    for name, data in files.items():
        (store.job_dir(job_id) / name).write_bytes(data)
    store.set_outputs(job_id, [n for n in files if n != "stats.json"])
    store.set_state(job_id, "done")


def test_job_views_say_who_ran_a_job_and_its_model_passes(
    ui: UiHandlers, store: JobStore, portraits: tuple[str, str]
) -> None:
    from inference.parallel.groups import ReplicaGroup
    from inference.render.stats import build_stats, write_stats

    job_id, _ = ui.generate(_values(ui, portraits))
    assert store.claim_for_group(1, [2, 3], ["cuda:2", "cuda:3"]).id == job_id
    store.update_progress(job_id, 40, "clip 1 of 2, step 2 of 4")
    assert (
        "running for" in ui.poll(job_id).html
        and "on group 1 · ranks 2–3 · cuda:2, cuda:3" in ui.poll(job_id).html
    )
    assert "on group 1 · ranks 2–3 · cuda:2, cuda:3" in ui.queue_html()
    # The renderer's record and the group leader's stats.json (as the worker writes them).
    passes = {
        "passes": 120,
        "computed": 96,
        "skipped": 24,
        "model_calls": 48,
        "per_clip": [],
        "resumed_after_clip": 0,
    }
    render = {"frames": 81, "fps": 25, "clips": 2, "size": [896, 448], "settings": {"seed": 1, "steps": 4},
              "passes": passes}  # fmt: skip
    group = ReplicaGroup(1, 2, (2, 3), ("cuda:2", "cuda:3"), "node-a")
    stats = build_stats(job_id=job_id, render=render, timings={"total_time": 3.0}, group=group, peak_bytes=[1, 2],
                        memory="cuda_max_allocated", prepared_on="group")  # fmt: skip
    write_stats(store.job_dir(job_id), stats)
    _done(
        store,
        job_id,
        {"video.mp4": b"x", "render.json": json.dumps(render).encode(), "reference.png": _png_bytes()},
    )
    said = (
        "ran on group 1 of 2 · ranks 2–3 · cuda:2, cuda:3 · node node-a · model passes: 96 computed, "
        "24 skipped by TeaCache (20%) in 48 batched forwards"
    )
    assert ui.run_facts(store.get(job_id)) == said
    assert said in ui.poll(job_id).html and said in ui.gallery_html()
    # Without stats.json: the render record's passes and the job row's group; a plain forward per pass.
    other, _ = ui.generate(_values(ui, portraits, steps=20))
    store.claim_for_group(0, [0], ["cpu"])
    plain = {**passes, "passes": 10, "computed": 10, "skipped": 0, "model_calls": 10, "resumed_after_clip": 1}
    _done(store, other, {"video.mp4": b"x", "render.json": json.dumps({**render, "passes": plain}).encode()})
    assert ui.run_facts(store.get(other)) == (
        "ran on group 0 · rank 0 · cpu · model passes: 10 computed, none skipped; 1 clip came from an earlier "
        "attempt (not counted)"
    )
    # Negative control: a job with neither record and no group says nothing about them.
    bare, _ = ui.generate(_values(ui, portraits, steps=21))
    _finish(store, bare, {"video.mp4": b"x"})
    assert ui.run_facts(store.get(bare)) == "" and "dv-facts" not in ui.poll(bare).html


# ---------------------------------------------------------------------------------------------- whose jobs


def test_each_credential_sees_and_owns_its_own_jobs(store: JobStore, portraits: tuple[str, str]) -> None:
    """Behind the gate (--auth users) the page shows each user only their jobs and what the page submits
    is theirs; --share_jobs shows every job; an open service shows every job (REST's rule)."""
    import base64

    import gradio as gr
    from fastapi.testclient import TestClient
    from starlette.requests import Request

    from service.api import ServiceInfo, create_app
    from service.ui.handlers import request_principal

    ui = _handlers(store)
    ann, _ = ui.generate(_values(ui, portraits), owner="user:ann")
    bob, _ = ui.generate(_values(ui, portraits, steps=20), owner="user:bob")
    assert (store.get(ann).owner, store.get(bob).owner) == ("user:ann", "user:bob")
    assert ann in ui.history_html(viewer="user:ann") and bob not in ui.history_html(viewer="user:ann")
    assert [r[0] for r in ui.history(viewer="user:bob")[0]] == [bob[:8]]
    queue = ui.queue_html("user:ann")
    assert ann in queue and bob not in queue and "1 job of other users running or waiting" in queue
    # Another's job is answered as if it did not exist: view, load, re-run, cancel, delete, reattach.
    assert "no job with id" in ui.poll(bob, "user:ann").html and ui.load_settings(bob, "user:ann")[0] is None
    assert ui.rerun(bob, viewer="user:ann", owner="user:ann")[0] is None and store.count() == 2
    assert "no job with id" in ui.cancel(bob, "user:ann") and not store.get(bob).cancel_requested
    assert ui.current_job(bob, None, "user:ann") == "" and ui.current_job(ann, None, "user:ann") == ann
    _finish(store, ann, {"video.mp4": b"x"})
    assert "no job with id" in ui.delete(ann, "user:bob") and store.exists(ann)
    assert ann in ui.gallery_html(viewer="user:ann") and ann not in ui.gallery_html(viewer="user:bob")
    # Open service (no credential) and --share_jobs: every job.
    assert ann in ui.history_html() and bob in ui.history_html()

    def page_request(principal: str | None = None, username: str | None = None) -> gr.Request:
        scope = {"type": "http", "headers": [], "state": {"principal": principal} if principal else {}}
        return gr.Request(request=Request(scope), username=username)

    assert request_principal(page_request("user:ann")) == ui.viewer(page_request("user:ann")) == "user:ann"
    assert request_principal(page_request(username="cy")) == "user:cy"  # gradio's own login (mount_ui auth)
    assert request_principal(page_request()) is None and request_principal(None) is None
    assert _handlers(store, share_jobs=True).viewer(page_request("user:ann")) is None

    # Through the gate and Gradio's own API, as the browser's page calls its events.
    users = {"ann": "pw-ann", "bob": "pw-bob"}
    app = create_app(store, ServiceInfo(), users=users)
    submit = lambda form, files, owner=None: submit_form(store, form, files, owner=owner)  # noqa: E731
    mount_ui(app, build_ui(store, submit=submit, tts_preview=None, info=lambda: {}), store)

    def call(client: TestClient, user: str, api: str, data: list[Any]) -> str:
        auth = {"Authorization": "Basic " + base64.b64encode(f"{user}:{users[user]}".encode()).decode()}
        event = client.post(f"/gradio_api/call/{api}", json={"data": data}, headers=auth).json()["event_id"]
        return client.get(f"/gradio_api/call/{api}/{event}", headers=auth).text

    with TestClient(app) as client:
        panels = call(client, "bob", "panels", [""])
        assert bob in panels and ann not in panels
        assert "no job with id" in call(client, "bob", "show", [ann, "", ""])
        call(client, "bob", "new_seed", [ann])  # another's job: nothing submitted
        assert store.count() == 2
        call(client, "ann", "new_seed", [ann])
        (new,) = [j for j in store.list(10) if j.id not in (ann, bob)]
        assert new.owner == "user:ann" and new.spec["images"] == store.get(ann).spec["images"]
