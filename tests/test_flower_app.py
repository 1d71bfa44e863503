"""The Flower app under simulations/flower_app, started by ``flwr run`` for real.

1. Local simulation: ``flower-superlink --simulation`` with two virtual SuperNodes.
2. Deployment: a real ``flower-superlink`` and two ``flower-supernode`` processes on loopback,
   in insecure mode, the model travelling as bfloat16 (which Flower's ArrayRecord refuses
   natively): every client must receive it bit-exactly and the merged model stays bf16.

Offline: runtime dependency installation is disabled on the SuperLink (SuperNodes only install
when allowed), telemetry and the update check are off. Every process is started in its own
session and its whole process group is stopped afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from safetensors.torch import load_file

APP = Path(__file__).resolve().parents[1] / "simulations" / "flower_app"
BIN = Path(sys.executable).parent
RUN_TIMEOUT = 600.0  # generous: a shared 2-core machine may be busy
ROUNDS = 2
BASE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "PYTHONUNBUFFERED": "1",
}
RUN_CONFIG = (
    f"num-server-rounds={ROUNDS} n-train=300 n-test=200 tasks='fashion_rot90,digits' "
    "strategy='opcm' merge='continual' partition='by-task'"
)

DOC = (Path(__file__).resolve().parents[1] / "docs" / "flower.md").read_text()
#: docs/flower.md's config.toml and the simulation settings its `flwr run` passes: the tests use
#: them as written (addresses aside), so the documented setup is the tested one
DOC_TOML = re.search(r"```toml\n(.*?)```", DOC, re.S).group(1)  # type: ignore[union-attr]
DOC_PORTS = {"local-sim": 9093, "deploy": 9094}

pytestmark = pytest.mark.skipif(
    not (BIN / "flower-superlink").exists() or shutil.which("flwr", path=str(BIN)) is None,
    reason="Flower's executables are not installed",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Processes:
    """Long-running Flower processes, each in its own process group, with logs on disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def env(self, home: str) -> dict[str, str]:
        flwr_home = self.root / home
        flwr_home.mkdir(parents=True, exist_ok=True)
        # the SuperLink starts flower-superexec by name: this venv's, even when not activated
        path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
        return {**os.environ, **BASE_ENV, "FLWR_HOME": str(flwr_home), "PATH": path}

    def start(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.log", "wb")
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log,
                                stderr=subprocess.STDOUT, env=self.env(name),
                                start_new_session=True)  # fmt: skip
        self.procs.append((name, proc))

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.logs()}")

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(
            f"--- {p.name} ---\n{p.read_text(errors='replace')[-tail:]}"
            for p in sorted(self.root.glob("*.log"))
        )

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for _, proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop()


def _wait_http(port: int, procs: Processes, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check_alive()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"SuperLink not up on port {port}:\n{procs.logs()}")


def _doc_federation_config() -> str:
    found = re.search(r'--federation-config "([^"]+)"', DOC)
    assert found, "docs/flower.md's local simulation passes no --federation-config"
    return found.group(1)


def _doc_toml(connection: str, port: int) -> str:
    """docs/flower.md's config.toml, ``connection`` the default and pointing at ``port``."""
    toml = DOC_TOML.replace(f"127.0.0.1:{DOC_PORTS[connection]}", f"127.0.0.1:{port}")
    return re.sub(r'default = "[^"]*"', f'default = "{connection}"', toml)


def test_documented_flower_config_uses_no_deprecated_options(tmp_path: Path, monkeypatch) -> None:
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.common.config import parse_config_args

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_text(DOC_TOML)
    for name in DOC_PORTS:
        connection = read_superlink_connection(name)
        # what `flwr run` warns about: "`options.` fields … are deprecated"
        assert connection.options is None and connection.address, name
    assert parse_config_args([_doc_federation_config()]) == {
        "num-supernodes": 2, "client-resources-num-cpus": 1,
    }  # fmt: skip


def _flwr_run(procs: Processes, connection: str, toml: str, out: Path, extra: str = "",
              federation_config: str | None = None) -> dict:  # fmt: skip
    """``flwr run`` the app, then poll until the ServerApp wrote its results (or failed)."""
    env = procs.env("cli")
    (Path(env["FLWR_HOME"]) / "config.toml").write_text(toml)
    run_config = f"{RUN_CONFIG} out-dir='{out}' {extra}"
    federation = ["--federation-config", federation_config] if federation_config else []
    submitted = subprocess.run(
        [str(BIN / "flwr"), "run", str(APP), connection, "--run-config", run_config,
         *federation, "--format", "json"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr + procs.logs()
    run_id = json.loads(submitted.stdout)["run-id"]
    deadline = time.monotonic() + RUN_TIMEOUT
    status = "?"
    while time.monotonic() < deadline:
        if (out / "results.json").exists():
            return json.loads((out / "results.json").read_text())
        procs.check_alive()
        listed = subprocess.run(
            [str(BIN / "flwr"), "list", connection, "--run-id", str(run_id), "--format", "json"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        if listed.returncode == 0:
            status = json.loads(listed.stdout)["runs"][0]["status"]
            if status.startswith("finished") and not (out / "results.json").exists():
                break
        time.sleep(3)
    log = subprocess.run([str(BIN / "flwr"), "log", str(run_id), connection, "--show"],
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    raise AssertionError(f"run {run_id} ended as {status} without results:\n"
                         f"{log.stdout[-6000:]}\n{procs.logs()}")  # fmt: skip


def _check_results(results: dict, dtype: str) -> None:
    assert sorted(int(r) for r in results["accuracy"]) == list(range(ROUNDS + 1))
    for report in results["rounds"]:
        assert len(report["folded"]) == 2, report
        assert report["updated"] and not report["missing"] and not report["rejected"]
    assert results["dtypes"] == [dtype]
    assert len(results["transport"]) == 2 * ROUNDS
    assert all(t["bit_exact"] for t in results["transport"]), results["transport"]
    final = results["accuracy"][str(ROUNDS)]["mean"]
    assert 0.3 < final <= 1.0  # 10-way tasks: far above chance


@pytest.mark.slow
def test_flwr_run_local_simulation(processes: Processes, tmp_path: Path) -> None:
    port = _free_port()
    processes.start("superlink", ["flower-superlink", "--insecure", "--simulation",
                                  "--disable-runtime-dependency-installation",
                                  "--host", "127.0.0.1", "--port", str(port)])  # fmt: skip
    _wait_http(port, processes)
    toml = _doc_toml("local-sim", port)
    results = _flwr_run(processes, "local-sim", toml, tmp_path / "out",
                        federation_config=_doc_federation_config())  # fmt: skip
    _check_results(results, "float32")


@pytest.mark.slow
def test_flwr_run_on_superlink_and_two_supernodes_with_bf16(
    processes: Processes, tmp_path: Path
) -> None:
    port = _free_port()
    processes.start("superlink", ["flower-superlink", "--insecure",
                                  "--disable-runtime-dependency-installation",
                                  "--host", "127.0.0.1", "--port", str(port)])  # fmt: skip
    _wait_http(port, processes)
    for i in range(2):
        processes.start(f"supernode{i}", [
            "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
            "--host", "127.0.0.1", "--port", str(_free_port()),
            "--node-config", f"partition-id={i} num-partitions=2",
        ])  # fmt: skip
    toml = _doc_toml("deploy", port)
    out = tmp_path / "out"
    results = _flwr_run(processes, "deploy", toml, out, "transport-dtype='bfloat16'")
    _check_results(results, "bfloat16")
    merged = load_file(str(out / "merged.safetensors"))
    assert {str(t.dtype) for t in merged.values()} == {"torch.bfloat16"}
