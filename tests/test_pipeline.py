"""inference.pipeline: job descriptions (ours and upstream MultiTalk's), render sizes, latent masks, frame
counts, and ``denoise_clip`` with the real tiny DiT (determinism, CFG branches, motion latents, cancel)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.render.pipeline import (
    DEFAULT_PROMPT,
    JobInputError,
    JobRequest,
    denoise_clip,
    expected_frames,
    latent_masks_at,
    render_size,
)
from inference.render.sampler import Cancelled
from inference.render.settings import GenerationSettings

SCRIPT = "(s1) Hello there, how are you today?\n(s2) I am fine, thank you."
SETTINGS = GenerationSettings(steps=2)


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    """A folder with the files a job may name (contents are never decoded by ``from_job_json``)."""
    for name in ("left.png", "right.png", "scene.png", "a.wav", "b.wav"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def from_json(data, base: Path) -> JobRequest:
    return JobRequest.from_job_json(data, base, SETTINGS)


def expect_error(field: str, *fragments: str):
    """Context: a JobInputError whose field is ``field`` and whose message holds every fragment."""

    class _Check:
        def __enter__(self):
            self._raises = pytest.raises(JobInputError)
            self.info = self._raises.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self._raises.__exit__(*exc)
            err = self.info.value
            assert err.field == field, f"field {err.field!r} != {field!r}: {err}"
            assert str(err).startswith(f"{field}: ")
            for frag in fragments:
                assert frag in str(err), f"{frag!r} not in {str(err)!r}"
            return handled

    return _Check()


# ------------------------------------------------------------------------------------ our JSON form


def test_our_form_portraits_script_voices(job_dir: Path) -> None:
    req = from_json(
        {
            "left_image": "left.png",
            "right_image": str(job_dir / "right.png"),  # absolute paths are kept
            "script": SCRIPT,
            "voices": ["bf_emma", "am_adam"],
            "prompt": "Two friends talking.",
            "layout": "backdrop",
        },
        job_dir,
    )
    assert req.left_image == job_dir / "left.png" and req.right_image == job_dir / "right.png"
    assert req.scene_image is None and req.audio_files is None
    assert req.script == SCRIPT and req.voices == ("bf_emma", "am_adam")
    assert req.prompt == "Two friends talking." and req.layout == "backdrop"
    assert req.settings is SETTINGS


def test_our_form_defaults(job_dir: Path) -> None:
    req = from_json({"left_image": "left.png", "right_image": "right.png", "script": SCRIPT}, job_dir)
    assert req.voices == ("af_heart", "am_adam")
    assert req.prompt == DEFAULT_PROMPT and req.layout == "side_by_side"


def test_our_form_scene_boxes_and_audio_files(job_dir: Path) -> None:
    req = from_json(
        {
            "scene_image": "scene.png",
            "boxes": {"person2": [10, 60, 90, 100], "person1": [10, 0, 90, 40]},
            "audio": ["a.wav", "b.wav"],
            "audio_mode": "para",
        },
        job_dir,
    )
    assert req.scene_image == job_dir / "scene.png" and req.left_image is None
    assert req.boxes == [[10, 0, 90, 40], [10, 60, 90, 100]]  # person 1 first, whatever the key order
    assert req.audio_files == (job_dir / "a.wav", job_dir / "b.wav") and req.audio_mode == "para"
    assert req.script is None


def test_our_form_one_audio_file(job_dir: Path) -> None:
    req = from_json({"left_image": "left.png", "right_image": "right.png", "audio": ["a.wav"]}, job_dir)
    assert req.audio_files == (job_dir / "a.wav", None) and req.audio_mode == "add"


# ------------------------------------------------------------------------------ upstream's JSON form


def test_upstream_form_cond_audio_bbox(job_dir: Path) -> None:
    req = from_json(
        {
            "prompt": "A man and a woman talk in a kitchen.",
            "cond_image": "scene.png",
            "audio_type": "para",
            "cond_audio": {"person1": "a.wav", "person2": "b.wav"},
            "bbox": {"person2": [160, 1320, 1280, 2280], "person1": [160, 120, 1280, 1080]},
        },
        job_dir,
    )
    assert req.scene_image == job_dir / "scene.png"
    assert req.audio_files == (job_dir / "a.wav", job_dir / "b.wav") and req.audio_mode == "para"
    assert req.boxes == [[160, 120, 1280, 1080], [160, 1320, 1280, 2280]]
    assert req.prompt == "A man and a woman talk in a kitchen." and req.script is None


def test_upstream_form_tts_audio_voice_paths(job_dir: Path) -> None:
    req = from_json(
        {
            "prompt": "Two people talk.",
            "cond_image": "scene.png",
            "audio_type": "add",  # ignored in TTS mode, as upstream
            "cond_audio": {},  # upstream's TTS examples keep an empty cond_audio
            "tts_audio": {
                "text": "(s1) do you know multi-talk? (s2) yes, I know it, that's amazing! (s1) Me too.",
                "human1_voice": "weights/Kokoro-82M/voices/af_heart.pt",
                "human2_voice": "weights/Kokoro-82M/voices/am_adam.pt",
            },
        },
        job_dir,
    )
    assert req.voices == ("af_heart", "am_adam")
    assert req.script.startswith("(s1) do you know") and req.audio_files is None
    assert req.scene_image == job_dir / "scene.png" and req.boxes is None


# ------------------------------------------------------------------------------------------ errors


def test_missing_file_names_field_and_path(job_dir: Path) -> None:
    with expect_error("right_image", "file not found", str(job_dir / "nope.png")):
        from_json({"left_image": "left.png", "right_image": "nope.png", "script": SCRIPT}, job_dir)
    with expect_error("cond_audio.person2", "b2.wav"):
        from_json(
            {"cond_image": "scene.png", "cond_audio": {"person1": "a.wav", "person2": "b2.wav"}}, job_dir
        )
    with expect_error("left_image", "expected a file path"):
        from_json({"right_image": "right.png", "script": SCRIPT}, job_dir)


def test_both_script_and_audio_refused(job_dir: Path) -> None:
    with expect_error("audio", "not both"):
        from_json(
            {"left_image": "left.png", "right_image": "right.png", "script": SCRIPT, "audio": ["a.wav"]},
            job_dir,
        )
    with expect_error("cond_audio", "not both"):
        from_json(
            {"cond_image": "scene.png", "cond_audio": {"person1": "a.wav"}, "tts_audio": {"text": SCRIPT}},
            job_dir,
        )


def test_neither_script_nor_audio_refused(job_dir: Path) -> None:
    with expect_error("audio", "script"):
        from_json({"left_image": "left.png", "right_image": "right.png"}, job_dir)
    with expect_error("cond_audio", "tts_audio"):
        from_json({"cond_image": "scene.png"}, job_dir)


@pytest.mark.parametrize(
    ("voices", "field", "fragment"),
    [
        (["af_heart", "zz_nobody"], "voices[1]", "unknown voice 'zz_nobody'"),
        (["af_heart"], "voices", "two voice ids"),
        ("af_heart", "voices", "two voice ids"),
        ([3, "am_adam"], "voices[0]", "expected a voice id"),
    ],
)
def test_bad_voices_name_the_field(job_dir: Path, voices, field: str, fragment: str) -> None:
    with expect_error(field, fragment):
        from_json(
            {"left_image": "left.png", "right_image": "right.png", "script": SCRIPT, "voices": voices},
            job_dir,
        )


def test_upstream_unknown_voice_path(job_dir: Path) -> None:
    with expect_error("tts_audio.human2_voice", "unknown voice 'xx_ghost'"):
        from_json(
            {
                "cond_image": "scene.png",
                "tts_audio": {"text": SCRIPT, "human2_voice": "weights/Kokoro-82M/voices/xx_ghost.pt"},
            },
            job_dir,
        )


def test_bad_script_names_the_line(job_dir: Path) -> None:
    bad = "(s1) Hi there.\n(s3) Who am I?"
    with expect_error("script", "line 2", "(s3)"):
        from_json({"left_image": "left.png", "right_image": "right.png", "script": bad}, job_dir)
    with expect_error("tts_audio.text", "line 2"):
        from_json({"cond_image": "scene.png", "tts_audio": {"text": bad}}, job_dir)


@pytest.mark.parametrize("data", [["left.png"], "left.png", None, 3])
def test_non_object_json_refused(job_dir: Path, data) -> None:
    with expect_error("input", "JSON object"):
        from_json(data, job_dir)


def test_bad_bbox_and_prompt(job_dir: Path) -> None:
    with expect_error("bbox", "person1"):
        from_json(
            {"cond_image": "scene.png", "cond_audio": {"person1": "a.wav"}, "bbox": {"p1": [0, 0, 1, 1]}},
            job_dir,
        )
    with expect_error("prompt", "text"):
        from_json(
            {"left_image": "left.png", "right_image": "right.png", "script": SCRIPT, "prompt": 5}, job_dir
        )


# ------------------------------------------------------------------------------------------ from_spec


def spec_inputs(tmp_path: Path) -> Path:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("left_image.png", "right_image.jpg", "scene_image.png", "audio1.wav", "audio2.wav"):
        (inputs / name).write_bytes(b"x")
    return inputs


def test_from_spec_portraits_tts(tmp_path: Path) -> None:
    inputs = spec_inputs(tmp_path)
    spec = {
        "kind": "dialogue",
        "layout": "portraits",
        "images": {"left": "left_image.png", "right": "right_image.jpg"},
        "scene": {"layout": "backdrop", "backdrop": "studio", "aspect": "16:9"},
        "audio_source": "tts",
        "script": SCRIPT,
        "voices": ["bf_emma", "bm_george"],
        "prompt": "Two colleagues.",
    }
    req = JobRequest.from_spec(spec, {"steps": 3, "seed": 7}, inputs)
    assert req.left_image == (inputs / "left_image.png").resolve()
    assert req.right_image == (inputs / "right_image.jpg").resolve()
    assert (req.layout, req.backdrop, req.aspect) == ("backdrop", "studio", "16:9")
    assert req.script == SCRIPT and req.voices == ("bf_emma", "bm_george")
    assert req.settings == GenerationSettings(steps=3, seed=7) and req.prompt == "Two colleagues."


def test_from_spec_scene_files(tmp_path: Path) -> None:
    inputs = spec_inputs(tmp_path)
    spec = {
        "layout": "scene",
        "images": {"scene": "scene_image.png"},
        "scene": {"layout": "scene", "boxes": [[0, 0, 10, 10], [0, 20, 10, 30]]},
        "audio_source": "files",
        "audio": {"person1": "audio1.wav", "person2": "audio2.wav"},
        "audio_mode": "para",
        "prompt": None,
    }
    req = JobRequest.from_spec(spec, {}, inputs)
    assert req.scene_image == (inputs / "scene_image.png").resolve()
    assert req.boxes == [[0, 0, 10, 10], [0, 20, 10, 30]]
    assert req.audio_files == ((inputs / "audio1.wav").resolve(), (inputs / "audio2.wav").resolve())
    assert req.audio_mode == "para" and req.script is None and req.prompt == DEFAULT_PROMPT


@pytest.mark.parametrize("name", ["missing.png", "../outside.png"])
def test_from_spec_refuses_missing_or_escaping_files(tmp_path: Path, name: str) -> None:
    inputs = spec_inputs(tmp_path)
    (tmp_path / "outside.png").write_bytes(b"x")
    spec = {"images": {"left": name, "right": "right_image.jpg"}, "audio_source": "tts", "script": SCRIPT}
    with expect_error("inputs", name):
        JobRequest.from_spec(spec, {}, inputs)


def test_from_spec_bad_settings_name_the_setting(tmp_path: Path) -> None:
    inputs = spec_inputs(tmp_path)
    spec = {"images": {"scene": "scene_image.png"}, "audio_source": "tts", "script": SCRIPT}
    with pytest.raises(ValueError, match="steps") as info:
        JobRequest.from_spec(spec, {"steps": 0}, inputs)
    assert info.value.field == "steps"


def test_request_needs_exactly_one_speech_source(job_dir: Path) -> None:
    with expect_error("script", "exactly one"):
        JobRequest(SETTINGS, script=SCRIPT, audio_files=(job_dir / "a.wav", None), scene_image=job_dir)
    with expect_error("audio_mode", "'mix'"):
        JobRequest(SETTINGS, audio_files=(job_dir / "a.wav", None), audio_mode="mix", scene_image=job_dir)


# ----------------------------------------------------------------------------- sizes, masks, frames


@pytest.mark.parametrize(
    ("bucket", "divisor", "expected"),
    [
        ((448, 896), 8, (64, 112)),
        ((896, 448), 8, (112, 64)),
        ((640, 640), 8, (80, 80)),
        ((448, 896), 1, (448, 896)),
        ((128, 896), 8, (32, 112)),  # never below 32
    ],
)
def test_render_size(bucket, divisor, expected) -> None:
    size = render_size(bucket, divisor)
    assert size == expected
    assert all(side % 16 == 0 and side >= 32 for side in size) or divisor == 1


def assert_partition(m: torch.Tensor) -> None:
    assert m.shape[0] == 3 and m.dtype == torch.float32
    assert torch.equal(m.sum(0), torch.ones_like(m[0])), "not a partition"
    for c in range(3):
        assert m[c].sum() > 0, f"class {c} is empty"


def test_latent_masks_of_a_real_scene_at_tiny_size(portrait_pngs) -> None:
    from inference.scene.compose import compose_scene

    scene = compose_scene(*portrait_pngs, size=480)
    hw = render_size(scene.bucket, 8)
    m = latent_masks_at(scene.masks, (hw[0] // 8, hw[1] // 8))
    assert m.shape == (3, hw[0] // 8, hw[1] // 8)
    assert_partition(m)
    # person 1 is on the left, person 2 on the right
    cols = torch.arange(m.shape[2], dtype=torch.float32)
    assert (m[0].sum(0) * cols).sum() / m[0].sum() < (m[1].sum(0) * cols).sum() / m[1].sum()
    # at full latent size the area vote agrees with the scene's nearest-downsampled masks (off the edges)
    full = latent_masks_at(scene.masks, scene.latent_size)
    agree = (full.argmax(0) == torch.from_numpy(scene.latent_masks).argmax(0)).float().mean()
    assert agree > 0.9


def test_latent_masks_keep_every_class_without_emptying_another() -> None:
    # Person 2 and the background are two 3x3 specks in the same corner cell of a 16x16 mask:
    # both lose the vote at 2x2, both need a cell back, and the second must not take the first's.
    m = np.zeros((3, 16, 16), np.uint8)
    m[0] = 1
    m[:, 0:3, 0:3] = 0
    m[1, 0:3, 0:3] = 1
    m[:, 0:3, 3:6] = 0
    m[2, 0:3, 3:6] = 1
    out = latent_masks_at(m, (2, 2))
    assert_partition(out)
    assert out[1, 0, 0] == 1  # person 2 keeps its best cell


@pytest.mark.parametrize("size", [(4, 4), (4, 8), (8, 14), (3, 5)])
def test_latent_masks_random_partitions(size) -> None:
    rng = np.random.default_rng(sum(size))
    for _ in range(20):
        labels = rng.choice(3, size=(40, 56), p=[0.9, 0.07, 0.03])
        m = np.stack([(labels == c) for c in range(3)]).astype(np.uint8)
        assert_partition(latent_masks_at(m, size))


def test_expected_frames() -> None:
    assert expected_frames(3.44, GenerationSettings()) == 86
    assert expected_frames(6.875, GenerationSettings()) == 171
    assert expected_frames(0.039, GenerationSettings()) == 0
    assert expected_frames(100.0, GenerationSettings()) == 1000  # max_frames cap
    assert expected_frames(10.0, GenerationSettings(mode="clip")) == 81  # one clip


# ------------------------------------------------------------------------------------- denoise_clip


@pytest.fixture(scope="module")
def tiny_dit():
    from inference.checkpoint.weights import tiny_dit_config
    from inference.model.dit import build_model

    torch.manual_seed(0)
    return build_model(tiny_dit_config(), "cpu").init_weights(0).eval()


def clip_tensors(model, t_lat: int = 3, h: int = 4, w: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tensors the engine broadcasts for one clip, random but well-shaped for ``model``."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    frames = 4 * (t_lat - 1) + 1
    masks = torch.zeros(3, h, w)
    masks[0, :, : w // 2 - 1] = 1
    masks[1, :, w // 2 + 1 :] = 1
    masks[2] = 1 - masks[0] - masks[1]
    return {
        "context": torch.randn(1, 7, cfg.text_dim, generator=g),
        "context_null": torch.randn(1, 5, cfg.text_dim, generator=g),
        "clip_fea": torch.randn(1, 257, cfg.clip_dim, generator=g),
        "y": torch.randn(1, 20, t_lat, h, w, generator=g),
        "audio": torch.randn(1, 2, frames, 5, cfg.audio_layers, cfg.audio_dim, generator=g),
        "ref_target_masks": masks,
    }


@torch.no_grad()
def test_denoise_clip_deterministic_per_seed(tiny_dit) -> None:
    tensors = clip_tensors(tiny_dit)
    a = denoise_clip(tiny_dit, tensors, GenerationSettings(steps=2, seed=1), clip_index=0)
    b = denoise_clip(tiny_dit, tensors, GenerationSettings(steps=2, seed=1), clip_index=0)
    assert a.shape == (16, 3, 4, 6) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    c = denoise_clip(tiny_dit, tensors, GenerationSettings(steps=2, seed=2), clip_index=0)
    d = denoise_clip(tiny_dit, tensors, GenerationSettings(steps=2, seed=1), clip_index=1)
    assert (a - c).abs().mean() > 0.1 and (a - d).abs().mean() > 0.1  # seed and clip index both matter


class BranchSpy(torch.nn.Module):
    """Wraps the real DiT and records which conditioning each call got (text, persons, masks)."""

    def __init__(self, model, tensors) -> None:
        super().__init__()
        self.model = model
        self.tensors = tensors
        self.calls: list[tuple[str, int, bool]] = []

    def forward(self, x, t, context, clip_fea, y, audio, masks, sp=None):
        text = "prompt" if context is self.tensors["context"] else "negative"
        assert text == "prompt" or context is self.tensors["context_null"]
        persons = int(audio.shape[1])
        if persons == 1:
            assert not audio.any(), "the single-person branch is the silent one"
        self.calls.append((text, persons, masks is not None))
        return self.model(x, t, context, clip_fea, y, audio, masks, sp=sp)


@torch.no_grad()
@pytest.mark.parametrize(
    ("text_guidance", "expected"),
    [
        # cond, drop_text (negative prompt + audio), uncond (negative prompt + silence)
        (5.0, [("prompt", 2, True), ("negative", 2, True), ("negative", 1, False)]),
        # cond, drop_audio (prompt + silence)
        (1.0, [("prompt", 2, True), ("prompt", 1, False)]),
    ],
)
def test_denoise_clip_branch_sets(tiny_dit, text_guidance: float, expected) -> None:
    tensors = clip_tensors(tiny_dit)
    spy = BranchSpy(tiny_dit, tensors)
    settings = GenerationSettings(steps=2, text_guidance=text_guidance)
    out = denoise_clip(spy, tensors, settings, clip_index=0)
    assert spy.calls == expected * 2  # two steps
    assert torch.equal(out, denoise_clip(tiny_dit, tensors, settings, clip_index=0))


@torch.no_grad()
def test_denoise_clip_guidance_changes_the_result(tiny_dit) -> None:
    tensors = clip_tensors(tiny_dit)
    three = denoise_clip(tiny_dit, tensors, GenerationSettings(steps=2, text_guidance=5.0), clip_index=0)
    two = denoise_clip(tiny_dit, tensors, GenerationSettings(steps=2, text_guidance=1.0), clip_index=0)
    # The tiny random DiT barely reads its text, so the gap is small, but far above float noise.
    assert (three - two).abs().mean() > 1e-5


@torch.no_grad()
def test_denoise_clip_honours_the_motion_latent(tiny_dit) -> None:
    tensors = clip_tensors(tiny_dit, t_lat=3)
    motion = torch.randn(16, 1, 4, 6, generator=torch.Generator().manual_seed(5))
    without = denoise_clip(tiny_dit, tensors, SETTINGS, clip_index=1)
    out = denoise_clip(tiny_dit, {**tensors, "motion_latent": motion}, SETTINGS, clip_index=1)
    assert torch.equal(out[:, :1], motion)  # re-noised to t = 0 at the end: exactly the motion latent
    assert not torch.allclose(out[:, 1:], without[:, 1:])  # and it conditions the new frames
    bad = torch.randn(16, 3, 4, 6)  # as many motion frames as the clip has: nothing left to generate
    with pytest.raises(ValueError, match="motion_latent"):
        denoise_clip(tiny_dit, {**tensors, "motion_latent": bad}, SETTINGS, clip_index=1)


@torch.no_grad()
def test_denoise_clip_cancel_and_progress(tiny_dit) -> None:
    tensors = clip_tensors(tiny_dit)
    polls: list[int] = []

    def stop_on_second_poll() -> bool:
        polls.append(1)
        return len(polls) == 2

    seen: list[tuple[int, int]] = []
    with pytest.raises(Cancelled) as info:
        denoise_clip(
            tiny_dit,
            tensors,
            GenerationSettings(steps=3),
            clip_index=0,
            should_stop=stop_on_second_poll,
            progress=lambda step, total: seen.append((step, total)),
        )
    assert (info.value.step, info.value.total) == (1, 3)
    assert seen == [(1, 3)]  # one step ran, then the loop stopped at the boundary
    seen.clear()
    denoise_clip(tiny_dit, tensors, SETTINGS, clip_index=0, progress=lambda s, n: seen.append((s, n)))
    assert seen == [(1, 2), (2, 2)]


def test_job_json_round_trip_through_a_file(tmp_path: Path, job_dir: Path) -> None:
    """The CLI reads JSON text: unicode prompts and scripts survive, paths resolve against the file."""
    job = {"left_image": "left.png", "right_image": "right.png", "script": "(s1) Grüße!\n(s2) 你好。"}
    path = job_dir / "job.json"
    path.write_text(json.dumps(job, ensure_ascii=False), encoding="utf-8")
    req = from_json(json.loads(path.read_text(encoding="utf-8")), path.parent)
    assert req.script == job["script"] and req.left_image == job_dir / "left.png"
