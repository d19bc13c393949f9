"""``opsrelay serve`` as a process of its own, for the tests that kill, stop or watch it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

__all__ = ["OPSRELAY", "RelayProcess"]

OPSRELAY = Path(sys.executable).parent / "opsrelay"


class RelayProcess:
    """One ``opsrelay serve``; whatever happens, it is gone when the ``with`` block ends."""

    def __init__(self, config: Path, log: Path, *, env: dict[str, str] | None = None) -> None:
        """``env``: the process's whole environment (default: ours without OPSRELAY_* overrides)."""
        self.config, self.log_path = config, log
        if env is None:
            env = {k: v for k, v in os.environ.items() if not k.startswith("OPSRELAY_")}
            env.update(PYTHONUNBUFFERED="1")
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [str(OPSRELAY), "serve", "--config", str(config)], stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log(self) -> str:
        return "--- relay log (last 30 lines)\n" + "\n".join(self.text().splitlines()[-30:])

    def alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"the relay exited with {self.process.returncode}\n{self.log()}")

    async def terminate(self, within: float = 10.0) -> tuple[int, float]:
        """SIGTERM; the exit status and how long it took."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(self.process.wait, within)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the relay did not exit within {within:g}s of SIGTERM\n{self.log()}") from None
        return code, time.monotonic() - started

    async def kill(self) -> None:
        self.process.kill()
        await asyncio.to_thread(self.process.wait, 10)

    def __enter__(self) -> RelayProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
