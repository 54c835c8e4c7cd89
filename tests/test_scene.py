"""Scene composition, buckets, masks and image loading (small images, no network)."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.scene import buckets, compose
from inference.scene.compose import (
    MAX_CONTAINMENT,
    Scene,
    SceneError,
    box_overlap,
    compose_scene,
    load_image,
    main,
    partition_masks,
    scene_from_image,
)

REPO = Path(__file__).resolve().parents[1]
FACE = (240, 200, 170)


def portrait(w: int, h: int, body=(30, 60, 120), bg=(200, 200, 150)) -> Image.Image:
    """Synthetic head-and-shoulders portrait whose head size is proportional to the image height."""
    yy, xx = np.mgrid[:h, :w]
    a = np.empty((h, w, 3), np.uint8)
    a[:] = bg
    a[(np.abs(xx - w / 2) < 0.3 * h) & (yy > 0.5 * h)] = body
    a[(yy - 0.3 * h) ** 2 + (xx - w / 2) ** 2 < (0.15 * h) ** 2] = FACE
    return Image.fromarray(a)


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def assert_partition(masks: np.ndarray) -> None:
    assert masks.shape[0] == 3
    np.testing.assert_array_equal(masks.sum(axis=0), 1)
    assert set(np.unique(masks)) <= {0, 1}
    for k in range(3):
        assert masks[k].any(), f"class {k} empty"


def face_pixels(arr: np.ndarray) -> int:
    return int((np.abs(arr.astype(int) - np.array(FACE)).sum(-1) < 30).sum())


# -- buckets ------------------------------------------------------------------------------------------


def test_bucket_tables_match_upstream():
    assert len(buckets.ASPECT_RATIO_627) == 15 and len(buckets.ASPECT_RATIO_960) == 21
    assert buckets.ASPECT_RATIO_627["0.50"] == (448, 896)
    assert buckets.ASPECT_RATIO_627["4.00"] == (1280, 320)
    assert buckets.ASPECT_RATIO_960["0.55"] == (704, 1280)
    assert buckets.ASPECT_RATIO_960["3.75"] == (1920, 512)
    for table in buckets.BUCKET_TABLES.values():
        for key, (h, w) in table.items():
            assert h % 32 == 0 and w % 32 == 0
            assert abs(h / w - float(key)) < 0.06, key


@pytest.mark.parametrize(
    ("hw", "size", "expected"),
    [
        ((1080, 1920), 480, (448, 896)),
        ((1920, 1080), 480, (832, 448)),
        ((500, 500), 480, (640, 640)),
        ((1080, 1920), 720, (704, 1280)),
        ((500, 500), 720, (960, 960)),
    ],
)
def test_nearest_bucket(hw, size, expected):
    assert buckets.nearest_bucket(*hw, size=size) == expected


def test_nearest_bucket_rejects_unknown_size():
    with pytest.raises(ValueError, match="480"):
        buckets.nearest_bucket(100, 100, size=600)


def test_cover_crop_geometry_and_image():
    geo = buckets.cover_crop((720, 1280), (448, 896))
    assert geo.resized == (504, 896) and (geo.top, geo.left) == (28, 0)
    # A frame whose outer 20 rows are red: the crop removes them, nothing black is padded in.
    a = np.zeros((720, 1280, 3), np.uint8)
    a[:] = (0, 255, 0)
    a[:20] = (255, 0, 0)
    a[-20:] = (255, 0, 0)
    out = np.asarray(buckets.resize_and_center_crop(Image.fromarray(a), (448, 896)))
    assert out.shape == (448, 896, 3)
    assert (out[:, :, 1] > 200).all()


def test_transform_box_matches_nearest_mask():
    rng = np.random.default_rng(0)
    for _ in range(25):
        src = (int(rng.integers(260, 700)), int(rng.integers(260, 700)))
        target = buckets.nearest_bucket(*src)
        y0, y1 = sorted(rng.choice(src[0] + 1, 2, replace=False))
        x0, x1 = sorted(rng.choice(src[1] + 1, 2, replace=False))
        mask = np.zeros(src, np.uint8)
        mask[y0:y1, x0:x1] = 1
        warped = buckets.resize_and_center_crop_mask(mask, target)
        ty0, tx0, ty1, tx1 = buckets.transform_box((y0, x0, y1, x1), src, target)
        expected = np.zeros(target, np.uint8)
        expected[ty0:ty1, tx0:tx1] = 1
        np.testing.assert_array_equal(warped, expected)


# -- loading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_load_image_formats(fmt, tmp_path):
    path = tmp_path / f"p.{fmt.lower()}"
    portrait(300, 400).save(path, format=fmt)
    img = load_image(path, "left_image")
    assert img.mode == "RGB" and img.size == (300, 400)
    assert load_image(path.read_bytes(), "left_image").size == (300, 400)


def test_load_image_applies_exif_orientation(tmp_path):
    a = np.zeros((300, 400, 3), np.uint8)  # stored 400 wide x 300 high, left half red
    a[:, :200] = (255, 0, 0)
    a[:, 200:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    Image.fromarray(a).save(path, format="JPEG", exif=exif.tobytes(), quality=95)
    out = np.asarray(load_image(path, "left_image"))
    assert out.shape == (400, 300, 3)  # displayed portrait
    assert out[:150, :, 0].mean() > 200 and out[:150, :, 2].mean() < 60  # the red half is now on top
    assert out[250:, :, 2].mean() > 200


def test_load_image_flattens_alpha_on_white():
    rgba = Image.new("RGBA", (300, 300), (0, 0, 0, 0))
    img = load_image(png_bytes(rgba), "right_image")
    assert img.mode == "RGB" and np.asarray(img).min() == 255


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"definitely not an image", "not a supported image"),
        (png_bytes(Image.new("RGB", (300, 300)), "GIF"), "GIF"),
        (png_bytes(Image.new("RGB", (255, 400))), "under 256"),
        (png_bytes(Image.new("RGB", (256, 1100))), "4 times"),
        (_png_header_only(8000, 6000), "megapixels"),  # 48 MP, refused from the header alone
        (_png_header_only(20000, 20000), "pixels"),  # decompression bomb
        (png_bytes(portrait(300, 400), "JPEG")[:400], "corrupt"),  # truncated
    ],
    ids=["empty", "garbage", "gif", "short-side", "aspect", "megapixels", "bomb", "truncated"],
)
def test_load_image_errors(data, match):
    with pytest.raises(SceneError, match=match) as info:
        load_image(data, "left_image")
    assert info.value.field == "left_image"
    assert isinstance(info.value, ValueError)


def test_load_image_missing_file_and_wrong_type(tmp_path):
    with pytest.raises(SceneError, match="not found") as info:
        load_image(tmp_path / "nope.png", "right_image")
    assert info.value.field == "right_image"
    with pytest.raises(SceneError, match="path or image bytes"):
        load_image(123, "scene_image")  # type: ignore[arg-type]


# -- compose_scene ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["side_by_side", "backdrop"])
@pytest.mark.parametrize(
    ("left_wh", "right_wh"),
    [((300, 400), (600, 800)), ((640, 360), (256, 256)), ((256, 455), (900, 300))],
)
def test_compose_scene_shapes_and_partition(layout, left_wh, right_wh):
    scene = compose_scene(portrait(*left_wh), portrait(*right_wh, body=(120, 40, 40)), layout=layout)
    h, w = scene.bucket
    assert (h, w) == (448, 896)
    assert scene.image.size == (w, h) and scene.image.mode == "RGB"
    assert scene.masks.dtype == np.uint8 and scene.masks.shape == (3, h, w)
    assert scene.latent_masks.dtype == np.float32 and scene.latent_masks.shape == (3, h // 8, w // 8)
    assert_partition(scene.masks)
    assert_partition(scene.latent_masks)
    (a0, ax0, a1, ax1), (b0, bx0, b1, bx1) = scene.boxes
    assert (ax0 + ax1) / 2 < w / 2 < (bx0 + bx1) / 2  # speaker 1 left, speaker 2 right
    assert ax1 <= w // 2 <= bx0
    # The body colours land in the right halves.
    arr = np.asarray(scene.image).astype(int)
    assert np.abs(arr[:, : w // 2] - (30, 60, 120)).sum(-1).min() < 20
    assert np.abs(arr[:, w // 2 :] - (120, 40, 40)).sum(-1).min() < 20


@pytest.mark.parametrize("layout", ["side_by_side", "backdrop"])
def test_compose_scene_people_similar_size(layout):
    # Same framing, 3x different resolution and different aspect: heads must come out alike.
    scene = compose_scene(portrait(300, 400), portrait(1200, 1200), layout=layout)
    arr = np.asarray(scene.image)
    w = arr.shape[1]
    left, right = face_pixels(arr[:, : w // 2]), face_pixels(arr[:, w // 2 :])
    assert left > 1000 and right > 1000
    assert 0.85 < left / right < 1.15, (left, right)


def test_compose_scene_sizes_aspects_and_backdrops():
    left, right = portrait(300, 400), portrait(400, 300)
    assert compose_scene(left, right, size=720).bucket == (704, 1280)
    assert compose_scene(left, right, aspect="1:1").bucket == (640, 640)
    assert compose_scene(left, right, aspect="0.67").bucket == (512, 768)
    blur = compose_scene(left, right, layout="backdrop", backdrop="blur")
    plain = compose_scene(left, right, layout="backdrop", backdrop="plain")
    corner = np.asarray(plain.image)[:8, :8].reshape(-1, 3)
    assert (corner == corner[0]).all()  # plain colour
    assert not np.array_equal(np.asarray(blur.image), np.asarray(plain.image))


def test_compose_scene_extreme_pair_is_cheap():
    # A 1:4 portrait beside a square one: the common height is 4x the bucket; only the visible window
    # is resampled, and the 1:4 person still fills its half.
    scene = compose_scene(portrait(256, 1024), portrait(1024, 1024), layout="side_by_side")
    assert scene.image.size == (896, 448)
    assert face_pixels(np.asarray(scene.image)[:, :448]) > 1000


def test_compose_scene_accepts_paths_and_bytes(tmp_path):
    p = tmp_path / "a.png"
    portrait(300, 400).save(p)
    scene = compose_scene(p, png_bytes(portrait(500, 500), "WEBP"), names=("Ann", "Bob"))
    assert scene.names == ("Ann", "Bob")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"layout": "grid"}, "layout"),
        ({"size": 1080}, "size"),
        ({"backdrop": "video"}, "backdrop"),
        ({"aspect": "wide"}, "aspect"),
        ({"names": ("only one",)}, "names"),
    ],
)
def test_compose_scene_option_errors(kwargs, field):
    with pytest.raises(SceneError) as info:
        compose_scene(portrait(300, 400), portrait(300, 400), **kwargs)
    assert info.value.field == field


def test_compose_scene_image_errors_name_the_side():
    with pytest.raises(SceneError) as info:
        compose_scene(portrait(300, 400), b"garbage")
    assert info.value.field == "right_image"
    with pytest.raises(SceneError) as info:
        compose_scene(Image.new("RGB", (200, 400)), portrait(300, 400))
    assert info.value.field == "left_image"


def test_overlay_differs_and_scene_is_frozen():
    scene = compose_scene(portrait(300, 400), portrait(300, 400))
    assert scene.overlay.size == scene.image.size
    diff = np.abs(np.asarray(scene.overlay, dtype=int) - np.asarray(scene.image, dtype=int))
    assert diff.mean() > 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        scene.size = 720  # type: ignore[misc]


# -- scene_from_image ---------------------------------------------------------------------------------


def test_scene_from_image_default_boxes_are_upstream_halves():
    img = Image.fromarray(np.full((448, 896, 3), 90, np.uint8))
    scene = scene_from_image(img)
    assert scene.bucket == (448, 896)
    assert scene.boxes == ((22, 22, 425, 425), (22, 470, 425, 873))
    assert_partition(scene.masks)
    assert scene.masks[0, 22:425, 22:425].all() and scene.masks[1, 22:425, 470:873].all()
    assert scene.masks[2, :22].all() and scene.masks[2, :, 425:470].all()


def test_scene_from_image_transforms_given_boxes():
    src = Image.fromarray(np.full((720, 1280, 3), 90, np.uint8))  # 16:9 -> 448x896, cropped 28 rows
    boxes = [[100, 100, 600, 500], [150, 700, 700, 1200]]
    scene = scene_from_image(src, boxes)
    assert scene.bucket == (448, 896)
    for k, box in enumerate(boxes):
        mask = np.zeros((720, 1280), np.uint8)
        mask[box[0] : box[2], box[1] : box[3]] = 1
        expected = buckets.resize_and_center_crop_mask(mask, (448, 896))
        np.testing.assert_array_equal(scene.masks[k], expected)
    assert scene.boxes[0] == buckets.transform_box(boxes[0], (720, 1280), (448, 896))
    assert_partition(scene.latent_masks)
    # Upstream's dict form gives the same scene.
    again = scene_from_image(src, json.dumps({"person1": boxes[0], "person2": boxes[1]}))
    assert again.boxes == scene.boxes


def test_overlapping_boxes_split_by_nearer_centre():
    src = Image.fromarray(np.full((448, 896, 3), 90, np.uint8))
    a, b = (40, 100, 400, 500), (40, 400, 400, 800)  # 100 px wide overlap, IoU 0.14
    scene = scene_from_image(src, [a, b])
    assert_partition(scene.masks)
    overlap = scene.masks[:, 40:400, 400:500]
    assert overlap[0, :, :50].all() and overlap[1, :, 50:].all()  # split at the midpoint x = 450
    np.testing.assert_array_equal(partition_masks((a, b), (448, 896)), scene.masks)


@pytest.mark.parametrize(
    ("boxes", "match"),
    [
        ([[0, 0, 500, 300], [0, 400, 300, 800]], "outside"),
        ([[-5, 0, 300, 300], [0, 400, 300, 800]], "outside"),
        ([[300, 0, 100, 300], [0, 400, 300, 800]], "inverted"),
        ([[100, 100, 100, 300], [0, 400, 300, 800]], "empty"),
        ([[0, 0, 400, 400], [0, 50, 400, 450]], "overlap"),  # IoU 0.78
        ([[0, 0, 440, 880], [100, 100, 200, 200]], "overlap"),  # small box inside the big one
        ([[0, 0, 300, 300]], "two boxes"),
        ({"person1": [0, 0, 1, 1], "speaker2": [0, 0, 1, 1]}, "person1 and person2"),
        ("[[0, 0, 1", "JSON"),
        ([[0, 0, 300, "x"], [0, 400, 300, 800]], "4 numbers"),
        ([[0, 0, 300, float("nan")], [0, 400, 300, 800]], "finite"),
        ([[10, 10, 13, 13], [0, 400, 300, 800]], "too small"),
        ([[0, 0, 448, 448], [0, 448, 448, 896]], "background"),
    ],
)
def test_box_errors(boxes, match):
    src = Image.fromarray(np.full((448, 896, 3), 90, np.uint8))
    with pytest.raises(SceneError, match=match) as info:
        scene_from_image(src, boxes)
    assert info.value.field == "boxes"


def test_box_in_cropped_away_part_is_refused():
    # 4:1 image -> bucket 320x1216 (key 0.26): the cover crop drops about 25 source columns per side.
    src = Image.fromarray(np.full((256, 1024, 3), 90, np.uint8))
    assert scene_from_image(src, [[0, 0, 256, 400], [0, 600, 256, 1000]]).bucket == (320, 1216)
    with pytest.raises(SceneError, match="cropped away") as info:
        scene_from_image(src, [[0, 0, 256, 20], [0, 600, 256, 1000]])
    assert info.value.field == "boxes"


def test_overlap_rule_thresholds():
    iou, contain = box_overlap((0, 0, 100, 100), (0, 50, 100, 150))
    assert iou == pytest.approx(1 / 3) and contain == pytest.approx(0.5)
    _, contain = box_overlap((0, 0, 400, 400), (0, 0, 100, 100))
    assert contain > MAX_CONTAINMENT


def test_scene_image_errors():
    with pytest.raises(SceneError) as info:
        scene_from_image(b"nope")
    assert info.value.field == "scene_image"


# -- save / load / CLI --------------------------------------------------------------------------------

FILES = {"reference.png", "overlay.png", "masks.npz", "scene.json"}


def test_save_and_load_round_trip(tmp_path):
    scene = compose_scene(portrait(300, 400), portrait(500, 400), layout="backdrop", names=("Ann", "Bob"))
    out = scene.save(tmp_path / "s")
    assert {p.name for p in out.iterdir()} == FILES  # no temp files left behind
    meta = json.loads((out / "scene.json").read_text())
    assert meta["bucket"] == [448, 896] and meta["size"] == 480
    assert meta["boxes"] == [list(b) for b in scene.boxes]
    back = Scene.load(out)
    np.testing.assert_array_equal(back.masks, scene.masks)
    np.testing.assert_array_equal(back.latent_masks, scene.latent_masks)
    np.testing.assert_array_equal(np.asarray(back.image), np.asarray(scene.image))
    assert back.boxes == scene.boxes and back.names == ("Ann", "Bob") and back.layout == "backdrop"


def test_cli_two_portraits_of_different_sizes(tmp_path):
    portrait(300, 400).save(tmp_path / "a.png")
    portrait(700, 500).save(tmp_path / "b.jpg")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "inference.scene", "--left", str(tmp_path / "a.png"), "--right",
         str(tmp_path / "b.jpg"), "--layout", "backdrop", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == FILES
    assert json.loads(proc.stdout)["bucket"] == [448, 896]
    with np.load(out / "masks.npz") as npz:
        assert_partition(npz["masks"])
        assert npz["latent_masks"].shape == (3, 56, 112)


def test_cli_error_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "inference.scene", "--left", str(tmp_path / "missing.png"), "--right",
         str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "left_image" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_cli_scene_with_boxes(tmp_path, capsys):
    Image.fromarray(np.full((448, 896, 3), 90, np.uint8)).save(tmp_path / "s.png")
    rc = main(
        [
            "--scene",
            str(tmp_path / "s.png"),
            "--boxes",
            "[[0,0,400,400],[0,500,400,880]]",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 0
    assert json.loads((tmp_path / "o" / "scene.json").read_text())["boxes"] == [
        [0, 0, 400, 400],
        [0, 500, 400, 880],
    ]
    boxes_file = tmp_path / "b.json"
    boxes_file.write_text(json.dumps({"person1": [0, 0, 400, 400], "person2": [0, 0, 400, 400]}))
    rc = main(["--scene", str(tmp_path / "s.png"), "--boxes", str(boxes_file), "--out", str(tmp_path / "o2")])
    assert rc == 2
    assert "boxes" in capsys.readouterr().err


def test_load_image_16bit_grey_is_scaled_in_8_bits():
    grey = Image.fromarray(np.full((300, 260), 40000, dtype=np.uint16))
    img = load_image(png_bytes(grey), "left_image")
    assert img.mode == "RGB" and set(np.unique(np.asarray(img))) == {round(40000 / 65535 * 255)}
    low = Image.fromarray(np.full((300, 260), 200, dtype=np.uint16))  # 16-bit container, 8-bit data
    assert set(np.unique(np.asarray(load_image(png_bytes(low), "left_image")))) == {255}


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_working_size_reduction_same_geometry_on_every_path(fmt, tmp_path):
    assert compose.reduction_factor(5000, 8000, 2048) == 2 and compose.reduction_factor(4095, 9000, 2048) == 1
    assert compose.reduction_factor(600, 601, 150) == 4 and compose.reduction_factor(600, 601, None) == 1
    path = tmp_path / f"p.{fmt.lower()}"
    portrait(601, 803).save(path, format=fmt, quality=95)
    small = load_image(path, "left_image", min_short_side=150)  # JPEG: DCT scaling; PNG: box reduce
    assert small.size == (151, 201) and small.mode == "RGB"
    full = np.asarray(load_image(path, "left_image"), dtype=np.float32)
    ref = full[:800, :600].reshape(200, 4, 150, 4, 3).mean(axis=(1, 3))
    assert np.abs(np.asarray(small, dtype=np.float32)[:200, :150] - ref).mean() < 4
    # Negative control: a different picture is far from it.
    assert np.abs(np.asarray(small, dtype=np.float32)[:200, :150] - ref[::-1]).mean() > 4
    # A decoded image and the file reduce to the same size, so validation and the engine agree.
    assert load_image(path, "left_image", min_short_side=150).size == small.size
    assert compose._as_rgb_image(Image.open(path), "left_image", 150).size == small.size


def test_load_image_reduction_keeps_exif_orientation(tmp_path):
    a = np.zeros((600, 800, 3), np.uint8)  # stored 800 wide x 600 high, left half red
    a[:, :400] = (255, 0, 0)
    a[:, 400:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    Image.fromarray(a).save(path, format="JPEG", exif=exif.tobytes(), quality=95)
    out = np.asarray(load_image(path, "left_image", min_short_side=300))
    assert out.shape == (400, 300, 3)
    assert out[:150, :, 0].mean() > 200 and out[250:, :, 2].mean() > 200


def test_scene_from_a_reduced_copy_keeps_the_originals_geometry(tmp_path):
    # A large scene image is decoded at a working size; bucket, boxes and crop follow the original.
    rng = np.random.default_rng(1)
    small = rng.integers(0, 255, (45, 80, 3), dtype=np.uint8)
    src = Image.fromarray(small).resize((1603, 901), Image.Resampling.BILINEAR)
    path = tmp_path / "scene.png"
    src.save(path)
    boxes = [[100, 100, 800, 700], [100, 900, 800, 1500]]
    full = scene_from_image(load_image(path, "scene_image"), boxes)
    copy = load_image(path, "scene_image", min_short_side=300)
    assert copy.size == (802, 451)
    reduced = scene_from_image(copy, boxes, source_size=compose.image_size(path, "scene_image"))
    assert reduced.bucket == full.bucket and reduced.boxes == full.boxes
    diff = np.abs(np.asarray(reduced.image, dtype=int) - np.asarray(full.image, dtype=int))
    assert diff.mean() < 6  # the same picture at the same place, resampled from fewer pixels
    # Negative control: without source_size the copy's own (rounded) geometry is used.
    assert scene_from_image(copy, None).image.size == full.image.size
    assert (
        np.abs(
            np.asarray(scene_from_image(copy, None).image, dtype=int)[:, ::-1]
            - np.asarray(full.image, dtype=int)
        ).mean()
        > 20
    )


def test_one_person_image_is_decoded_at_a_working_size_with_the_original_geometry() -> None:
    import io

    from inference.scene.images import PORTRAIT_SHORT_SIDE
    from inference.scene.single import single_scene

    big = Image.new(
        "RGB", (2 * PORTRAIT_SHORT_SIDE + 512, 3 * PORTRAIT_SHORT_SIDE)
    )  # 4.6k x 6.1k, under 40 MP
    big.paste((200, 40, 40), (0, 0, big.width // 2, big.height))  # left half red, right half black
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    from_bytes = single_scene(buf.getvalue(), size=480)
    from_image = single_scene(big, size=480)  # a decoded image takes the same path
    assert from_bytes.bucket == from_image.bucket == (from_bytes.image.height, from_bytes.image.width)
    assert from_bytes.boxes == ((0, 0, *from_bytes.bucket),)
    a = np.asarray(from_bytes.image, dtype=np.int16)
    b = np.asarray(from_image.image, dtype=np.int16)
    assert np.abs(a - b).max() <= 2
    # The red/black edge sits where the original's crop puts it (reduced copy, same geometry).
    row = a[a.shape[0] // 2, :, 0]
    assert row[: a.shape[1] // 2 - 2].min() > 150 and row[a.shape[1] // 2 + 2 :].max() < 50
