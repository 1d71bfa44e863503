"""Optional features without their extra installed: one line naming the extra, exit 2, no
traceback. The module is made unimportable in a real subprocess (``sys.modules[name] = None``
makes ``import name`` fail as if it were not installed); nothing of ours is mocked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save_file
from server_helpers import Served, finetune, make_base, sequential_fold


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


def test_the_server_folds_a_bf16_upload_and_serves_the_out_dtype_asked(tmp_path: Path) -> None:
    served = Served(tmp_path, "--out-dtype", "bfloat16")
    try:
        arrival = {
            k: v.to(torch.bfloat16) if v.is_floating_point() else v
            for k, v in finetune(served.base_tensors, 1).items()
        }
        path = tmp_path / "ft_bf16.safetensors"
        save_file(arrival, path)
        upload = served.upload(path)
        assert served.client.wait([upload])[upload]["status"] == "folded"
        manifest = served.client.manifest()
        assert manifest["arrivals"][-1]["dtype"] == "BF16"
        model = load(served.client.http.get("/model").content)
    finally:
        served.close()
    expected = sequential_fold(served.base, manifest["strategy"], [path])
    for name, value in expected.items():
        want = value.to(torch.bfloat16) if value.is_floating_point() else value
        assert model[name].dtype == want.dtype, name
        assert torch.equal(model[name], want), name


def test_serve_refuses_an_unknown_out_dtype_in_one_line(tmp_path: Path) -> None:
    save_file(make_base(), tmp_path / "base.safetensors")
    result = subprocess.run(
        [sys.executable, "-m", "contmerge", "serve", "--state", str(tmp_path / "s"), "--base",
         str(tmp_path / "base.safetensors"), "--strategy", "average", "--insecure-no-auth",
         "--port", "0", "--out-dtype", "int4"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    # a usage error, as merge's: refused while the options are parsed, before any port or state
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("contmerge serve: error: argument --out-dtype: unknown out dtype 'int4'")
    assert not (tmp_path / "s").exists()
