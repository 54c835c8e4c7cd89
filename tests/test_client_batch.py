"""The Python client (``service.client``) and the batch command (``python -m inference.batch``).

- a job file's paths become data URLs (relative to the job file), a missing file names its key;
- a batch file: bad lines and repeated names are refused with the line;
- one loaded model renders a 3-job batch (every job its video and ``stats.json``); a rerun skips them all
  without loading a model; a changed line renders again;
- against a running service: the client submits, follows progress, downloads and cancels; the batch command
  with ``--server`` renders the 3 jobs and a rerun skips them.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from inference import batch as batch_module
from inference.batch import BatchJob, read_batch
from inference.render.spec import JobInputError
from inference.render.video_io import probe_media
from inference.render.worker import RuntimeOptions
from service.client import ApiError, DialogueClient, JobFailed, job_body
from tests.subprocess_env import offline_env
from tests.test_service_e2e import ROOT, running_service

SETTINGS = {"mode": "clip", "frame_num": 17, "motion_frames": 5, "steps": 2}
SCRIPTS = ("(s1) Hello there. (s2) Hi!", "(s1) Good morning. (s2) Morning!", "(s1) Bye now. (s2) See you.")


def _batch_file(folder: Path, portraits: tuple[Path, Path]) -> Path:
    for p in portraits:
        shutil.copy(p, folder / p.name)
    lines = [{"name": f"job{i}", "left_image": "left.png", "right_image": "right.png", "script": s,
              "preset": "fast", "settings": {**SETTINGS, "seed": i}} for i, s in enumerate(SCRIPTS)]  # fmt: skip
    path = folder / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def _run_batch(
    jobs: Path, out: Path, *extra: str, weights: Path | None = None
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "inference.batch", str(jobs), "--out", str(out), *extra]
    if weights is not None:
        cmd += ["--preset", "tiny", "--weights", str(weights)]
    return subprocess.run(cmd, cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=600)


def _check_outputs(out: Path) -> None:
    for i in range(len(SCRIPTS)):
        folder = out / f"job{i}"
        info = probe_media(folder / "video.mp4")
        assert info.video_codec == "h264" and info.frames > 0
        stats = json.loads((folder / "stats.json").read_text())
        assert stats["seed"] == i and stats["frames"] == info.frames and stats["clips"] == 1
        assert stats["timings"]["total_time"] > 0 and "torch" in stats["versions"]


def test_a_job_files_paths_become_data_urls(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"\x89PNG fake")
    (tmp_path / "b.wav").write_bytes(b"RIFF fake")
    job = {"left_image": "a.png", "right_image": "data:image/png;base64,AAAA", "cond_audio": {"person1": "b.wav"},
           "audio": ["b.wav"], "script": "(s1) Hi."}  # fmt: skip
    (tmp_path / "job.json").write_text(json.dumps(job))
    body = job_body(tmp_path / "job.json")
    assert body["left_image"] == "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()
    assert body["right_image"] == "data:image/png;base64,AAAA" and body["script"] == "(s1) Hi."
    assert body["cond_audio"]["person1"].startswith("data:audio/") and body["audio"][0].startswith(
        "data:audio/"
    )
    with pytest.raises(FileNotFoundError, match="right_image"):
        job_body({"right_image": "missing.png"}, base_dir=tmp_path)


def test_a_batch_file_names_its_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"name": "a", "script": "x"}\n\n# a comment\n{"script": "y"}\n')
    jobs = read_batch(path)
    assert [(j.name, j.line) for j in jobs] == [("a", 1), ("job_0004", 4)]
    for text, field in (('{"name": "a"}\n{"name": "a"}\n', "line 2.name"), ("[1]\n", "line 1"),
                        ("{nope\n", "line 1"), ('{"name": "../x"}\n', "line 1.name")):  # fmt: skip
        path.write_text(text)
        with pytest.raises(JobInputError) as err:
            read_batch(path)
        assert err.value.field == field
    job = BatchJob("a", {"script": "x"}, path)
    assert not job.finished(tmp_path)


def test_render_refuses_other_options_once_a_model_is_loaded(monkeypatch, tmp_path: Path) -> None:
    """``render(options=...)`` after the first call: the same options render, different ones are refused
    (not silently ignored)."""

    class Loaded:  # the loaded Batch, without loading a model
        options = RuntimeOptions(preset="tiny")

        def render(self, job, out_dir):
            return Path(out_dir) / "video.mp4"

    monkeypatch.setattr(batch_module, "_DEFAULT", Loaded())
    assert (
        batch_module.render({}, tmp_path / "a", options=RuntimeOptions(preset="tiny"))
        == tmp_path / "a" / "video.mp4"
    )
    assert batch_module.render({}, tmp_path / "a") == tmp_path / "a" / "video.mp4"
    with pytest.raises(ValueError, match="already loaded"):
        batch_module.render({}, tmp_path / "a", options=RuntimeOptions(preset="multitalk-14b"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_one_loaded_model_renders_a_batch_and_a_rerun_skips_it(
    tiny_weights: Path, portrait_pngs: tuple[Path, Path], tmp_path: Path
) -> None:
    jobs, out = _batch_file(tmp_path, portrait_pngs), tmp_path / "out"
    first = _run_batch(jobs, out, weights=tiny_weights)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "3 rendered, 0 failed" in first.stdout
    _check_outputs(out)
    again = _run_batch(jobs, out, weights=tiny_weights)
    assert again.returncode == 0 and "3 skipped, 0 rendered" in again.stdout, again.stdout
    assert "DiT loaded" not in again.stderr  # nothing to do: no model was loaded
    lines = jobs.read_text().splitlines()
    changed = json.loads(lines[1])
    changed["settings"]["seed"] = 11
    jobs.write_text("\n".join([lines[0], json.dumps(changed), lines[2]]) + "\n")
    third = _run_batch(jobs, out, weights=tiny_weights)
    assert third.returncode == 0 and "2 skipped, 1 rendered" in third.stdout, third.stdout
    assert json.loads((out / "job1" / "stats.json").read_text())["seed"] == 11


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_client_and_the_batch_command_through_a_service(
    tiny_weights: Path, portrait_pngs: tuple[Path, Path], tmp_path: Path
) -> None:
    jobs = _batch_file(tmp_path, portrait_pngs)
    with running_service(tiny_weights, tmp_path / "outputs", tmp_path / "service.log") as svc:
        client = DialogueClient(svc.base)
        seen: list[float] = []
        job = json.loads(jobs.read_text().splitlines()[0])
        job.pop("name")
        job |= {"left_image": str(portrait_pngs[0]), "right_image": str(portrait_pngs[1])}  # absolute paths
        video = client.render(job, tmp_path / "one", progress=lambda s: seen.append(s["progress"]))
        assert probe_media(video).frames > 0 and (tmp_path / "one" / "stats.json").is_file()
        assert seen == sorted(seen) and seen[-1] == 100.0 and len(seen) >= 3
        with pytest.raises(ApiError) as err:
            client.submit({"script": "(s1) Hi."})
        assert err.value.status == 400 and err.value.field
        # Cancel a job that waits behind another: it ends cancelled, and wait() says so.
        client.submit(job)
        behind = client.submit(job)
        assert client.cancel(behind)["cancel_requested"]
        with pytest.raises(JobFailed) as failed:
            client.wait(behind, timeout_s=300)
        assert failed.value.status["status"] == "cancelled"
        out = tmp_path / "out"
        first = _run_batch(jobs, out, "--server", svc.base)
        assert first.returncode == 0 and "3 rendered, 0 failed" in first.stdout, (
            first.stdout + first.stderr[-2000:]
        )
        _check_outputs(out)
        again = _run_batch(jobs, out, "--server", svc.base)
        assert again.returncode == 0 and "3 skipped, 0 rendered" in again.stdout, again.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_render_in_process_keeps_the_model_for_the_next_call(
    tiny_weights: Path, portrait_pngs: tuple[Path, Path], tmp_path: Path
) -> None:
    import inference.batch as batch

    job = {"left_image": str(portrait_pngs[0]), "right_image": str(portrait_pngs[1]), "script": SCRIPTS[0],
           "preset": "fast", "settings": SETTINGS}  # fmt: skip
    try:
        first = batch.render(job, tmp_path / "a", options=RuntimeOptions(preset="tiny", weights=tiny_weights))
        model = batch._DEFAULT.runtime.model
        second = batch.render({**job, "script": SCRIPTS[1]}, tmp_path / "b")
        assert batch._DEFAULT.runtime.model is model  # loaded once
    finally:
        if batch._DEFAULT is not None:
            batch._DEFAULT.close()
            batch._DEFAULT = None
    for video in (first, second):
        assert probe_media(video).frames > 0 and (video.parent / "stats.json").is_file()
        assert json.loads((video.parent / "job.json").read_text())["script"] in SCRIPTS
