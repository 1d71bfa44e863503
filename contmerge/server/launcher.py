"""Run ``contmerge serve`` as a child process and wait until it answers (tests, benchmarks).

The server binds ``--port 0`` and prints the address it got, so several servers can start at
once on a shared machine without racing for a port.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

_LISTENING = re.compile(r"listening on (https?://\S+)")


class ServerProcess:
    def __init__(
        self,
        args: Sequence[str],
        log_path: str | Path,
        env: dict[str, str] | None = None,
        verify: Any = True,
    ) -> None:
        self.args = list(args)
        self.log_path = Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.verify = verify
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self._log_from = 0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 120.0) -> ServerProcess:
        """Start the server and return once ``/healthz`` answers 200."""
        # the log may hold earlier runs (a restart): look only at what this run writes
        self._log_from = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "contmerge", "serve", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
            )
        deadline = time.monotonic() + timeout
        while not self.url:
            match = _LISTENING.search(self.log(since_start=True))
            if match:
                self.url = match.group(1)
                break
            self._check_alive(deadline)
            time.sleep(0.05)
        while True:
            try:
                health = httpx.get(f"{self.url}/healthz", verify=self.verify, timeout=5)
                if health.status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            self._check_alive(deadline)
            time.sleep(0.05)

    def _check_alive(self, deadline: float) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"contmerge serve exited ({self.process.returncode}):\n{self.log()}")
        if time.monotonic() > deadline:
            self.kill()
            raise TimeoutError(f"contmerge serve did not come up:\n{self.log()}")

    def log(self, since_start: bool = False) -> str:
        """The server's output (of this run only, with ``since_start``)."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as handle:
            handle.seek(self._log_from if since_start else 0)
            return handle.read().decode(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as in a crash or an OOM kill."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, and SIGKILL if it does not exit in time; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.process.returncode)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
