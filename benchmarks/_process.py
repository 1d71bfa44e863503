"""Whole processes timed from start to exit, with their peak RSS from ``wait4``."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass

from _venv import tail


@dataclass
class Run:
    wall: float
    peak_rss: int


def timed(command: list[str], timeout: float, env: Mapping[str, str] | None = None) -> Run:
    """Wall time and peak RSS (wait4's ru_maxrss) of one process; its output on failure."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.005)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"exit {proc.returncode}: {' '.join(command)}\n{tail(log.read())}")
    return Run(wall, usage.ru_maxrss * 1024)
