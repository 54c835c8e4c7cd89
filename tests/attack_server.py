"""The REST service without an engine, for attack drills in a process of its own (so its memory can be
measured): ``python -m tests.attack_server --root DIR --port N [--token T] [--body_timeout_s S]``.

Real store, validation, gate and preview pool; the voice preview speaks with a stand-in that takes
``--preview_s`` seconds and returns a short silent WAV (Kokoro is not loaded). Prints ``ready`` once
it listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import io
import logging
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import uvicorn

from service.api import ServiceInfo, create_app
from service.jobs import JobStore
from service.schemas import EngineStatus
from service.validation import Limits


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token", default=None)
    p.add_argument("--body_timeout_s", type=float, default=30.0)
    p.add_argument("--preview_s", type=float, default=0.5)
    p.add_argument("--max_queue", type=int, default=500)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    store = JobStore(args.root / "outputs" / "jobs.db", args.root / "outputs", max_queue=args.max_queue,
                     min_free_bytes=0)  # fmt: skip
    buf = io.BytesIO()
    sf.write(buf, np.zeros(2400, dtype=np.float32), 24_000, format="WAV")
    wav = buf.getvalue()

    def speak(voice: str, text: str | None) -> bytes:
        time.sleep(args.preview_s)
        return wav

    info = ServiceInfo(engine_status=lambda: EngineStatus(True, time.time()))
    app = create_app(store, info, auth_token=args.token, limits=Limits(), tts_preview=speak,
                     body_timeout_s=args.body_timeout_s)  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning",
                                           access_log=False, limit_concurrency=1000))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    print("ready", flush=True)
    thread.join()


if __name__ == "__main__":
    main()
