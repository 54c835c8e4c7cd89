"""One person: one image -> a one-person MultiTalk scene (the whole frame is the speaker).

Upstream's single-person jobs (``single_example_*.json``) resize and centre-crop the image to the nearest
bucket, as for a two-person scene, and give the speaker the whole frame: with one person MultiTalk's audio
attention has no speaker routing (no L-RoPE), so there is nothing to separate. Here the masks stay a
partition: person 1 covers every pixel, person 2 and the background are empty.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from inference.scene.buckets import nearest_bucket, resize_and_center_crop
from inference.scene.compose import (
    DEFAULT_NAMES,
    Scene,
    _as_rgb_image,
    _check_name,
    _check_size,
    latent_masks_from,
    render_overlay,
)
from inference.scene.images import PORTRAIT_SHORT_SIDE, _cover_crop_reduced, image_size

logger = logging.getLogger(__name__)


def single_scene(
    image: Image.Image | str | Path | bytes,
    *,
    size: int = 480,
    name: str = DEFAULT_NAMES[0],
    field: str = "image",
) -> Scene:
    """One image of one person -> a scene at the nearest bucket with one full-frame box.

    ``boxes`` is ``((0, 0, H, W),)``; ``masks`` uint8 ``[3, H, W]`` with person 1 everywhere;
    ``layout`` "single". Errors are SceneError naming ``field``.
    """
    size = _check_size(size)
    clean = _check_name(name)
    # Decoded at a working size like the portraits; the bucket and the crop follow the original's geometry.
    w0, h0 = image.size if isinstance(image, Image.Image) else image_size(image, field)
    src = _as_rgb_image(image, field, min_short_side=PORTRAIT_SHORT_SIDE)
    bucket = nearest_bucket(h0, w0, size)
    if src.size == (w0, h0):
        scene_img = resize_and_center_crop(src, bucket)
    else:
        scene_img = _cover_crop_reduced(src, (h0, w0), bucket)
    h, w = bucket
    masks = np.zeros((3, h, w), dtype=np.uint8)
    masks[0] = 1
    box = (0, 0, h, w)
    logger.info("one-person scene %dx%d from an image of %dx%d", w, h, w0, h0)
    return Scene(
        image=scene_img,
        bucket=bucket,
        boxes=(box,),
        masks=masks,
        latent_masks=latent_masks_from(masks),
        overlay=render_overlay(scene_img, masks, (box,), (clean,)),  # type: ignore[arg-type]
        size=size,
        layout="single",
        names=(clean,),
    )
