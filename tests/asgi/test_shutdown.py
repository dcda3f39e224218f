"""SIGTERM under load on a real uvicorn: in-flight responses complete, detached work drains, the process exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest

from tests.redis_server import free_port

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


async def test_sigterm_under_load_completes_in_flight_work(tmp_path: Path) -> None:
    port = free_port()
    done_file = tmp_path / "done.txt"
    env = {**os.environ, "SLOW_APP_DONE_FILE": str(done_file), "PYTHONPATH": str(ROOT)}
    env.pop("CACHEMW_REDIS_URL", None)
    process = await anyio.open_process(
        [sys.executable, "-m", "uvicorn", "tests.apps.slow_app:app", "--port", str(port), "--lifespan", "on",
         "--timeout-graceful-shutdown", "10"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if (await http.get("/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "uvicorn did not start"
                await anyio.sleep(0.05)
            statuses: list[int] = []

            async def one(i: int) -> None:
                statuses.append((await http.get(f"/slow/{i}")).status_code)

            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(one, i)
                await anyio.sleep(0.2)  # the requests are in the handler's 0.5 s sleep now
                process.send_signal(signal.SIGTERM)
        assert statuses == [200] * 10
        assert process.stdout is not None
        with anyio.fail_after(20):
            output = b"".join([chunk async for chunk in process.stdout])
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    # uvicorn re-raises the signal once it has shut down cleanly.
    assert process.returncode in (0, -signal.SIGTERM), output.decode(errors="replace")
    assert b"Application shutdown complete" in output
    assert sorted(done_file.read_text().split()) == sorted(str(i) for i in range(10))
