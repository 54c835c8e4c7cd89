"""The original service's memory layouts, served end to end on the tiny preset over REST:

- its manual launch ``torchrun --nproc_per_node=2 --master_port=PORT distributed_app.py --ulysses_size=2
  --ring_size=1 --t5_fsdp --dit_fsdp`` (T5 and the DiT sharded over both ranks; the master port is a free
  one instead of 29500 so parallel test runs do not collide);
- one process with ``--num_persistent_param_in_dit 0 --offload_model true`` (every DiT block streamed,
  encoders in CPU memory between their stages).

Each renders a two-speaker job to a valid mp4 (h264 + aac, durations within a frame of the timeline).
The helpers (start, health, submit, checks, kill) are ``tests/test_service_e2e.py``'s.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.test_service_e2e import (
    ROOT,
    VENV_BIN,
    Service,
    _env,
    _kill_tree,
    check_video,
    free_port,
    submit,
    wait_healthy,
    wait_status,
)

pytestmark = pytest.mark.slow


@contextmanager
def launched(cmd: list[str], weights: Path, work: Path) -> Iterator[Service]:
    port = free_port()
    outputs, log = work / "outputs", work / "service.log"
    full = [*cmd, "--preset", "tiny", "--weights", str(weights), "--outputs_dir", str(outputs),
            "--server_port", str(port), "--no_ui"]  # fmt: skip
    with log.open("ab") as out:
        proc = subprocess.Popen(full, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    service = Service(proc, f"http://127.0.0.1:{port}", log, outputs)
    try:
        wait_healthy(service)
        yield service
    finally:
        _kill_tree(proc)


@pytest.mark.distributed
@pytest.mark.timeout(500)
def test_original_manual_launch_t5_fsdp_dit_fsdp_two_ranks(
    tiny_weights: Path, portrait_pngs: tuple[Path, Path], tmp_path: Path
) -> None:
    cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}", "distributed_app.py",
           "--ulysses_size=2", "--ring_size=1", "--t5_fsdp", "--dit_fsdp"]  # fmt: skip
    with launched(cmd, tiny_weights, tmp_path) as svc:
        info = svc.get("/api/info").json()
        assert info["world_size"] == 2 and info["fsdp"] == {"dit": True, "t5": True}, info
        task_id = submit(svc, portrait_pngs)
        body = wait_status(svc, task_id, {"done"})
        assert body["attempts"] == 1
        check_video(svc, task_id, tmp_path)
        log = svc.log_tail(200000)
        assert "T5 sharded over 2 ranks" in log and "FSDP2 full over 2 ranks" in log


@pytest.mark.timeout(400)
def test_one_process_streamed_dit_and_offloaded_encoders(
    tiny_weights: Path, portrait_pngs: tuple[Path, Path], tmp_path: Path
) -> None:
    cmd = [sys.executable, "distributed_app.py", "--ulysses_size=1", "--ring_size=1",
           "--num_persistent_param_in_dit", "0", "--offload_model", "true"]  # fmt: skip
    with launched(cmd, tiny_weights, tmp_path) as svc:
        task_id = submit(svc, portrait_pngs)
        body = wait_status(svc, task_id, {"done"})
        assert body["attempts"] == 1
        check_video(svc, task_id, tmp_path)
        log = svc.log_tail(200000)
        assert "0 of 2 blocks resident" in log and "2 streamed" in log
        assert "T5Encoder offloaded to CPU memory" in log and "WanVae offloaded to CPU memory" in log
