"""Another tool's own venv for a side-by-side benchmark: created once, reused while its probe
imports, torch pinned first so pip keeps the CPU build. Failing to install or run the other tool
is reported (``TheirFailure``), not our bug."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TORCH_PIN = "torch==2.13.0"


class TheirFailure(Exception):
    """The other tool could not be installed or run: reported, not our bug."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"{step}: {detail}")
        self.step, self.detail = step, detail


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_step(step: str, cmd: list[str], log: Path, timeout: float) -> None:
    """Run one install step, appending to the log; raise TheirFailure with its error text."""
    with log.open("a") as handle:
        handle.write(f"\n$ {' '.join(cmd)}\n")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise TheirFailure(step, f"timed out after {timeout:.0f} s: {' '.join(cmd)}") from exc
    except OSError as exc:
        raise TheirFailure(step, f"could not start {cmd[0]}: {exc}") from exc
    with log.open("a") as handle:
        handle.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise TheirFailure(
            step,
            f"exit code {proc.returncode} from `{' '.join(cmd)}`\n"
            + tail(proc.stderr or proc.stdout),
        )


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def probe(python: Path, code: str, env: Mapping[str, str]) -> dict[str, Any] | None:
    """The JSON ``code`` prints last in the venv, or None when it fails."""
    try:
        proc = subprocess.run(
            [str(python), "-c", code],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, **env},
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_venv(
    venv: Path,
    what: str,
    packages: Sequence[str],
    probe_code: str,
    env: Mapping[str, str],
    timeout: float,
) -> dict[str, Any]:
    """Reuse the venv when ``probe_code`` runs there; otherwise create it and install torch,
    then ``packages``, and probe again (TheirFailure with the import error if it still fails)."""
    python = venv_python(venv)
    if python.exists():
        versions = probe(python, probe_code, env)  # usable as it is (ours, or one the user made)
        if versions is not None:
            return versions
    venv.mkdir(parents=True, exist_ok=True)
    log = venv / "contmerge-install.log"
    print(f"  installing {what} into {venv} (log: {log}); this takes a few minutes")
    if not python.exists():
        # the interpreter under our venv, so the other tool gets the same Python version
        base = getattr(sys, "_base_executable", sys.executable)
        run_step("create the venv", [base, "-m", "venv", str(venv)], log, timeout)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    # torch first: pip then keeps the pinned CPU build instead of resolving its own
    run_step(f"pip install {TORCH_PIN}", [*pip, TORCH_PIN], log, timeout)
    listed = " ".join(f"'{p}'" for p in packages)
    run_step(f"pip install {listed}", [*pip, *packages], log, timeout)
    versions = probe(python, probe_code, env)
    if versions is None:
        proc = subprocess.run(
            [str(python), "-c", probe_code],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
        )
        raise TheirFailure(f"import {what} in its venv", tail(proc.stderr))
    return versions
