"""Optional features without their extra installed: one line naming the extra, exit 2, no
traceback. The module is made unimportable in a real subprocess (``sys.modules[name] = None``
makes ``import name`` fail as if it were not installed); nothing of ours is mocked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file
from server_helpers import make_base


def run_without(module: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys\n"
        f"sys.modules[{module!r}] = None\n"
        "from contmerge.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def assert_names_the_extra(run: subprocess.CompletedProcess[str], extra: str, module: str) -> None:
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert f"pip install 'contmerge[{extra}]'" in lines[0]
    assert f"pip install '.[{extra}]'" in lines[0]  # from a checkout
    assert module in lines[0]


@pytest.mark.parametrize("module", ["uvicorn", "fastapi"])
def test_serve_without_the_server_extra_names_it(tmp_path: Path, module: str) -> None:
    base = tmp_path / "base.safetensors"
    save_file(make_base(), base)
    state = tmp_path / "state"
    run = run_without(
        module,
        ["serve", "--state", str(state), "--base", str(base), "--strategy", "ties",
         "--insecure-no-auth", "--port", "0"],
    )  # fmt: skip
    assert_names_the_extra(run, "server", module)
    assert not state.exists()  # refused before touching the state


def test_simulate_federated_without_flower_names_the_extra() -> None:
    run = run_without("flwr", ["simulate", "federated", "--rounds", "1"])
    assert_names_the_extra(run, "flower", "flwr")
