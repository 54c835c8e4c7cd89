"""A small Python client for the service's REST API (``requests`` only; no model code is imported).

    from service.client import DialogueClient

    client = DialogueClient("http://127.0.0.1:8419", token="...")       # token / (user, password) optional
    job_id = client.submit("jobs/two_people.json")                       # a job JSON file (paths) or a dict
    status = client.wait(job_id, progress=lambda s: print(s["progress"], s["stage"]))
    client.download(job_id, "out/video.mp4")                             # or file="stats.json"
    client.download_all(job_id, "out/")                                  # every output, stats.json included
    client.cancel(job_id)

A job is the same JSON the CLI reads (``python -m inference.generate --input``): upstream MultiTalk's keys or
ours. Files may be given by path (relative to the job file's folder, else the working directory) and are
sent as data URLs; values that already are data URLs pass unchanged. A refused job raises ``ApiError``
with the field the service named; a job that ends failed or cancelled raises ``JobFailed`` from ``wait``.
"""

from __future__ import annotations

import base64
import json
import logging
import mimetypes
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import requests

logger = logging.getLogger(__name__)

# Keys of a job JSON that name files (see ``inference.render.spec.parse_job_json``).
FILE_KEYS = ("left_image", "right_image", "cond_image", "scene_image", "image")
FILE_MAPS = ("cond_audio",)  # {person1, person2}: files
FILE_LISTS = ("audio",)  # [file, file]
FINAL_STATES = frozenset({"done", "failed", "cancelled"})
ProgressFn = Callable[[dict[str, Any]], None]


class ApiError(RuntimeError):
    """The service refused a request: HTTP ``status``, the ``field`` it names and its ``message``."""

    def __init__(self, status: int, field: str | None, message: str) -> None:
        super().__init__(f"{status}: {field + ': ' if field else ''}{message}")
        self.status, self.field, self.message = status, field, message


class JobFailed(RuntimeError):
    """A job ended without a video; ``status`` is its last ``/api/status`` body."""

    def __init__(self, status: dict[str, Any]) -> None:
        super().__init__(f"job {status.get('task_id')} {status.get('status')}: {status.get('error')}")
        self.status = status


def _data_url(path: Path) -> str:
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _resolve(value: Any, key: str, base_dir: Path | None) -> Any:
    """A file value as a data URL: data URLs unchanged, paths read (job file's folder, then the cwd)."""
    if not isinstance(value, str) or value.startswith("data:"):
        return value
    path = Path(value)
    places = (
        [path]
        if path.is_absolute()
        else [p / path for p in ((base_dir,) if base_dir else ()) + (Path.cwd(),)]
    )
    for place in places:
        if place.is_file():
            return _data_url(place)
    raise FileNotFoundError(
        f"{key}: file not found: {value} (looked in {', '.join(str(p.parent) for p in places)})"
    )


def job_body(
    job: Mapping[str, Any] | str | os.PathLike[str], base_dir: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """The JSON body for ``POST /api/generate`` from a job dict or a job JSON file, its files inlined."""
    if isinstance(job, Mapping):
        body = dict(job)
        folder = Path(base_dir) if base_dir is not None else None
    else:
        path = Path(job)
        body = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(body, dict):
            raise ValueError(f"{path}: a job JSON file holds one object")
        folder = Path(base_dir) if base_dir is not None else path.parent
    for key in FILE_KEYS:
        if key in body:
            body[key] = _resolve(body[key], key, folder)
    for key in FILE_MAPS:
        if isinstance(body.get(key), dict):
            body[key] = {k: _resolve(v, f"{key}.{k}", folder) for k, v in body[key].items()}
    for key in FILE_LISTS:
        if isinstance(body.get(key), list):
            body[key] = [_resolve(v, f"{key}[{i}]", folder) for i, v in enumerate(body[key])]
    return body


class DialogueClient:
    """The REST API as Python calls (see the module docstring). Thread-safe for separate calls."""

    def __init__(self, base_url: str, *, token: str | None = None, auth: tuple[str, str] | None = None,
                 timeout_s: float = 120.0, session: requests.Session | None = None) -> None:  # fmt: skip
        self.base = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = session or requests.Session()
        if token is not None:
            self.session.headers["Authorization"] = f"Bearer {token}"
        if auth is not None:
            self.session.auth = auth

    # ---- plumbing

    def _call(self, method: str, path: str, **kw: Any) -> requests.Response:
        r = self.session.request(method, self.base + path, timeout=kw.pop("timeout", self.timeout_s), **kw)
        if r.status_code >= 400:
            field, message = None, r.text[:500]
            try:
                err = r.json().get("error") or {}
                field, message = err.get("field"), err.get("message", message)
            except (ValueError, AttributeError):
                pass
            raise ApiError(r.status_code, field, message)
        return r

    def _json(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        return self._call(method, path, **kw).json()

    # ---- the API

    def health(self) -> dict[str, Any]:
        r = self.session.get(self.base + "/api/health", timeout=self.timeout_s)
        return r.json()

    def info(self) -> dict[str, Any]:
        return self._json("GET", "/api/info")

    def queue(self) -> dict[str, Any]:
        """Replica groups (state, ranks, devices, current job and progress), running jobs and the queue."""
        return self._json("GET", "/api/queue")

    def submit(
        self,
        job: Mapping[str, Any] | str | os.PathLike[str],
        *,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> str:
        """Queue a job (a dict or a job JSON file); returns its id. ``ApiError`` names a refused field."""
        return str(self._json("POST", "/api/generate", json=job_body(job, base_dir))["task_id"])

    def status(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/status/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"/api/jobs/{job_id}")

    def wait(self, job_id: str, *, timeout_s: float | None = None, poll_s: float = 1.0,
             progress: ProgressFn | None = None) -> dict[str, Any]:  # fmt: skip
        """Poll until the job ends; ``progress(status)`` on every change of progress or stage. Returns the
        final status of a done job; ``JobFailed`` for failed/cancelled, ``TimeoutError`` past ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last: tuple[Any, ...] | None = None
        while True:
            status = self.status(job_id)
            seen = (status["status"], status["progress"], status["stage"])
            if progress is not None and seen != last:
                progress(status)
            last = seen
            if status["status"] in FINAL_STATES:
                if status["status"] != "done":
                    raise JobFailed(status)
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status['status']} after {timeout_s} s")
            time.sleep(poll_s)

    def download(self, job_id: str, dest: str | os.PathLike[str], *, file: str | None = None) -> Path:
        """Save the job's video (or output ``file``) at ``dest`` (written to a temporary name, then renamed)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        params = {"file": file} if file else None
        tmp = dest.with_name(f".{dest.name}.part")
        with (
            self._call("GET", f"/api/download/{job_id}", params=params, stream=True) as r,
            tmp.open("wb") as fh,
        ):
            for chunk in r.iter_content(1 << 20):
                fh.write(chunk)
        os.replace(tmp, dest)
        return dest

    def download_all(self, job_id: str, folder: str | os.PathLike[str]) -> list[Path]:
        """Every output of a done job (video.mp4, stats.json, subtitles, ...) into ``folder``."""
        status = self.status(job_id)
        return [self.download(job_id, Path(folder) / name, file=name) for name in status["outputs"]]

    def render(self, job: Mapping[str, Any] | str | os.PathLike[str], folder: str | os.PathLike[str], *,
               progress: ProgressFn | None = None, timeout_s: float | None = None) -> Path:  # fmt: skip
        """Submit, wait and download every output into ``folder``; returns the video's path."""
        job_id = self.submit(job)
        self.wait(job_id, timeout_s=timeout_s, progress=progress)
        self.download_all(job_id, folder)
        return Path(folder) / "video.mp4"
