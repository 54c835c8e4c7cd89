"""Malformed requests of every field class, for the fuzz test (tests/test_attack_inputs.py) and
``bench/attack.py``. Each case is ``(name, method, path, kwargs)`` for ``httpx``/``TestClient.request``;
every one must be answered 4xx naming a field (never 5xx, never a hang). Loopback only, small bodies."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from PIL import Image

Case = tuple[str, str, str, dict[str, Any]]


def png(w: int = 320, h: int = 384, colour: tuple[int, int, int] = (200, 120, 90), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format=fmt)
    return buf.getvalue()


def wav(seconds: float = 0.4, rate: int = 16_000, fmt: str = "WAV") -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    soundfile.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format=fmt)
    return buf.getvalue()


def png_header(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


LEFT, RIGHT = png(), png(colour=(90, 120, 200), fmt="JPEG")
SCENE = png(640, 360)
AUDIO1, AUDIO2 = wav(), wav(0.6, fmt="FLAC")
DEEP = "[" * 100_000
HUGE = "9" * 400
BAD_NUMBERS = [
    HUGE,
    "-" + HUGE,
    "1e400",
    "NaN",
    "-Infinity",
    f"1.{'0' * 400}1",
    "true",
    "[]",
    DEEP,
]
BAD_TEXT = ["\x00", "a\x00b", "😀😀😀", "x" * 20_000, "\x07\x1b[31m"]


def form(**extra: Any) -> dict[str, Any]:
    """A valid two-portrait, two-recording form with ``extra`` applied (None removes a field)."""
    files = {
        "left_image": ("left.png", LEFT, "image/png"),
        "right_image": ("right.jpg", RIGHT, "image/jpeg"),
        "audio1": ("a.wav", AUDIO1, "audio/wav"),
        "audio2": ("b.flac", AUDIO2, "audio/flac"),
    }
    data: dict[str, Any] = {"prompt": "two friends", "preset": "fast", "settings": '{"steps": 6, "seed": 3}'}
    for key, value in extra.items():
        files.pop(key, None)
        data.pop(key, None)
        if isinstance(value, tuple):
            files[key] = value
        elif value is not None:
            data[key] = value
    return {"data": data, "files": files}


def upstream(**extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": "a studio interview",
        "cond_image": data_url(SCENE, "image/png"),
        "audio_type": "para",
        "cond_audio": {"person1": data_url(AUDIO1, "audio/wav"), "person2": data_url(AUDIO2, "audio/flac")},
        "bbox": {"person1": [20, 20, 340, 300], "person2": [20, 340, 340, 620]},
    }
    for key, value in extra.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def raw_json(text: str) -> dict[str, Any]:
    return {"content": text.encode("utf-8", "surrogatepass"), "headers": {"content-type": "application/json"}}


def cases() -> list[Case]:
    out: list[Case] = []
    post = "/api/generate"
    # numbers: settings (form JSON and JSON body), boxes, bbox
    for i, n in enumerate(BAD_NUMBERS):
        out.append((f"form settings number {i}", "POST", post, form(settings=f'{{"text_guidance": {n}}}')))
        out.append((f"form settings shift {i}", "POST", post, form(settings=f'{{"shift": {n}}}')))
        out.append((f"form settings steps {i}", "POST", post, form(settings=f'{{"steps": {n}}}')))
        out.append((f"form settings seed {i}", "POST", post, form(settings=f'{{"seed": {n}}}')))
        scene = form(left_image=None, right_image=None, scene_image=("s.png", SCENE, "image/png"))
        scene["data"]["boxes"] = f"[[{n}, 0, 100, 100], [0, 200, 100, 300]]"
        out.append((f"form boxes {i}", "POST", post, scene))
        body = json.dumps(upstream())[:-1] + f', "settings": {{"audio_guidance": {n}}}}}'
        out.append((f"json settings {i}", "POST", post, raw_json(body)))
        body = (
            json.dumps(upstream(bbox=None))[:-1]
            + f', "bbox": {{"person1": [{n}, 0, 9, 9], "person2": [0, 1, 2, 3]}}}}'
        )
        out.append((f"json bbox {i}", "POST", post, raw_json(body)))
    out.append(("form settings deep", "POST", post, form(settings=DEEP)))
    out.append(("form settings string number", "POST", post, form(settings='{"steps": "7"}')))
    out.append(("form settings not object", "POST", post, form(settings="[1, 2]")))
    out.append(("json body deep", "POST", post, raw_json(DEEP)))
    out.append(
        (
            "json body deep settings",
            "POST",
            post,
            raw_json(json.dumps(upstream())[:-1] + ', "settings": ' + "[" * 5000 + "]" * 5000 + "}"),
        )
    )
    out.append(("json body list", "POST", post, raw_json("[1, 2, 3]")))
    out.append(("json body invalid", "POST", post, raw_json("{'a': 1}")))
    out.append(
        (
            "json body not utf-8",
            "POST",
            post,
            {"content": b"\xff\xfe{}", "headers": {"content-type": "application/json"}},
        )
    )
    # text fields
    for i, t in enumerate(BAD_TEXT):
        out.append(
            (
                f"script text {i}",
                "POST",
                post,
                form(audio1=None, audio2=None, script=t, voice1="af_heart", voice2="am_adam"),
            )
        )
        if not t.isprintable() or len(t) > 10_000:  # emoji are fine in a scene prompt
            out.append((f"prompt text {i}", "POST", post, form(prompt=t)))
    # enums and ids
    for key, value in (
        ("layout", "diagonal"),
        ("backdrop", "../../etc"),
        ("preset", "ultra"),
        ("audio_mode", "mix"),
        ("voice1", "../../voices/x"),
        ("voice2", "a" * 500),
    ):
        out.append((f"enum {key}", "POST", post, form(**{key: value})))
    # aspect
    for i, a in enumerate(
        ["1e-308:1e308", "0:1", "-1:2", "nan:1", "inf", HUGE + ":1", "1:" + HUGE, "16/9", "1:100"]
    ):
        out.append((f"aspect {i}", "POST", post, form(aspect=a)))
    # files
    for i, (name, data) in enumerate([("e.png", b""), ("g.png", b"garbage"), ("t.png", LEFT[:200]),
                                      ("big.png", png_header(20_000, 20_000)), ("gif.png", png(300, 300, fmt="GIF")),
                                      ("wav.png", AUDIO1)]):  # fmt: skip
        out.append((f"left_image file {i}", "POST", post, form(left_image=(name, data, "image/png"))))
    for i, (name, data) in enumerate([("e.wav", b""), ("g.wav", b"RIFF" + bytes(200)), ("p.wav", LEFT),
                                      ("t.flac", AUDIO2[:100])]):  # fmt: skip
        out.append((f"audio1 file {i}", "POST", post, form(audio1=(name, data, "audio/wav"))))
    out.append(("unknown form field", "POST", post, form(extra_field="1")))
    out.append(("file in text field", "POST", post, form(prompt=("p.txt", b"hi", "text/plain"))))
    # data URLs in the JSON body
    for i, url in enumerate(["data:image/png;base64,!!!", "data:image/png;base64," + "A" * 5, "file:///etc/passwd",
                             "http://127.0.0.1/x.png", "/etc/passwd", "data:text/plain;base64,aGk="]):  # fmt: skip
        out.append((f"json cond_image {i}", "POST", post, raw_json(json.dumps(upstream(cond_image=url)))))
    # content type
    out.append(("content type", "POST", post, {"content": b"a=1", "headers": {"content-type": "text/plain"}}))
    out.append(
        (
            "broken multipart",
            "POST",
            post,
            {"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}},
        )
    )
    # query and path parameters
    for q in ["offset=9223372036854775808", "offset=-1", "offset=" + HUGE, "limit=0", "limit=" + HUGE, "limit=1e3",
              "state=exploded", "offset=1.5"]:  # fmt: skip
        out.append((f"jobs query {q[:20]}", "GET", f"/api/jobs?{q}", {}))
    for jid in ["..%2F..%2Fetc", "0" * 31 + "g", "A" * 32, "0" * 33, "%00" * 16]:
        out.append((f"status id {jid[:12]}", "GET", f"/api/status/{jid}", {}))
        out.append((f"download id {jid[:12]}", "GET", f"/api/download/{jid}", {}))
    for name in ["../jobs.db", "..", ".frames", "a/b", "x" * 200, "%2e%2e%2fjobs.db"]:
        out.append((f"download file {name[:12]}", "GET", f"/api/download/{'0' * 32}?file={name}", {}))
    # previews
    for i, text in enumerate(["😀😀", "a\x00b", "x" * 5000, "   "[:0] or "?!"]):
        out.append(
            (f"preview text {i}", "POST", "/api/tts/preview", {"json": {"voice": "af_heart", "text": text}})
        )
    out.append(("preview voice", "POST", "/api/tts/preview", {"json": {"voice": "../x", "text": "hi"}}))
    out.append(("preview body", "POST", "/api/tts/preview", raw_json(DEEP)))
    return out


# ---------------------------------------------------------------------------------------------- bombs
# Tiny files that declare huge decoded sizes, and bodies larger than any limit.


def flac_bomb(seconds: int = 595, channels: int = 8, rate: int = 96_000) -> bytes:
    """One level for ``seconds`` on ``channels`` channels at ``rate``: a few hundred KB of FLAC that
    decodes to ``seconds x rate x channels`` samples (595 s x 96 kHz x 8 = 457 M, 1.8 GB as float32)."""
    buf = io.BytesIO()
    with soundfile.SoundFile(buf, "w", rate, channels, format="FLAC", subtype="PCM_16") as f:
        block = np.full((rate * 5, channels), 0.25, dtype=np.float32)
        for _ in range(seconds // 5):
            f.write(block)
    return buf.getvalue()


def png_bomb(mode: str = "I;16", w: int = 5000, h: int = 8000) -> bytes:
    """A ``w x h`` (40 MP) single-colour PNG: ~100 KB; 16-bit grey ("I;16") or RGBA."""
    if mode == "I;16":
        img = Image.fromarray(np.full((h, w), 40_000, dtype=np.uint16))
    else:
        img = Image.new(mode, (w, h), (200, 100, 50, 128)[: len(mode)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_portrait(w: int = 5000, h: int = 8000) -> bytes:
    """A 40 MP JPEG with some texture (a real photo's size class)."""
    small = np.random.default_rng(0).integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((w, h)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def peak_rise_mb(pid: int, send: Callable[[], Any]) -> tuple[float, Any]:
    """``send()``'s peak resident-memory rise in process ``pid`` (MB), with its result. The kernel's
    high-water mark is reset first (``clear_refs`` 5), so the peak is this call's own."""
    before = rss_kib(pid)
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    result = send()
    return (rss_kib(pid, "VmHWM") - before) / 1024, result
