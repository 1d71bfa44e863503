"""What the merge-server tests share: small real checkpoints, a real ``contmerge serve`` on
loopback (:class:`Served`), and readers of what it wrote (journal, inbox outcomes)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from contmerge import Merger
from contmerge.server.client import MergeClient
from contmerge.server.launcher import ServerProcess

TOKEN = "test-token-0123456789abcdef"
STRATEGY = "ties"  # order-sensitive: equality with a sequential fold also checks the order


# --- checkpoints -----------------------------------------------------------------------------
def make_base(width: int = 48, layers: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(layers):
        tensors[f"layers.{i}.weight"] = torch.randn(width, width, generator=gen)
        tensors[f"layers.{i}.bias"] = torch.randn(width, generator=gen)
    tensors["head.weight"] = torch.randn(10, width, generator=gen)
    tensors["steps"] = torch.tensor([7, 11], dtype=torch.int64)  # a buffer: never merged
    return tensors


def finetune(base: dict[str, torch.Tensor], seed: int, scale: float = 0.01) -> dict:
    gen = torch.Generator().manual_seed(1000 + seed)
    return {
        name: value + scale * torch.randn(value.shape, generator=gen)
        if value.is_floating_point()
        else value.clone()
        for name, value in base.items()
    }


def sequential_fold(base: Path, strategy: str, files: list[Path]) -> dict[str, torch.Tensor]:
    merger = Merger(base, strategy)  # in memory: the reference the server must equal
    for path in files:
        assert merger.fold(path).status == "folded"
    return merger.emit_state_dict()


def assert_same_model(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), f"{name}: max abs diff " + str(
            (got[name].double() - want[name].double()).abs().max().item()
        )


# --- polling and files -------------------------------------------------------------------------
def wait_for(predicate: Callable[[], Any], timeout: float = 90.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def journal(state: Path) -> list[dict[str, Any]]:
    path = state / "journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_events(state: Path, checkpoint_id: str) -> list[dict[str, Any]]:
    return [
        r
        for r in journal(state)
        if r["id"] == checkpoint_id and r["event"] in {"folded", "duplicate", "rejected"}
    ]


def serve_args(state: Path, base: Path, token_file: Path, *extra: str) -> list[str]:
    return [
        "--state", str(state), "--base", str(base), "--strategy", STRATEGY,
        "--port", "0", "--token-file", str(token_file), "--threads", "1", *extra,
    ]  # fmt: skip


class Served:
    """A running server, its files, and what the tests uploaded (id -> local file)."""

    def __init__(
        self,
        root: Path,
        *extra: str,
        width: int = 48,
        layers: int = 2,
        state: Path | None = None,
    ) -> None:
        self.root = root
        self.state = state or root / "state"
        self.base = root / "base.safetensors"
        self.base_tensors = make_base(width, layers)
        save_file(self.base_tensors, self.base)
        self.token_file = root / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.args = serve_args(self.state, self.base, self.token_file, *extra)
        self.process = ServerProcess(self.args, root / "server.log").start()
        self.client = MergeClient(self.process.url, TOKEN)
        self.uploaded: dict[str, Path] = {}

    def restart(self, kill: bool = False, already_stopped: bool = False) -> None:
        self.client.close()
        if kill:
            self.process.kill()
        elif not already_stopped:
            assert self.process.stop() == 0
        self.process = ServerProcess(self.args, self.root / "server.log").start()
        self.client = MergeClient(self.process.url, TOKEN)

    def checkpoint(self, seed: int, **kwargs: Any) -> Path:
        path = self.root / f"ckpt-{seed}.safetensors"
        save_file(finetune(self.base_tensors, seed, **kwargs), path)
        return path

    def upload(self, path: Path, name: str | None = None) -> str:
        receipt = self.client.upload(path, name)
        self.uploaded[receipt["id"]] = path
        return receipt["id"]

    def snapshot(self) -> tuple[int, int, bytes]:
        manifest = self.client.manifest()
        model = self.client.http.get("/model")
        assert model.status_code == 200
        return manifest["generation"], manifest["globals"]["count"], model.content

    def close(self) -> None:
        self.client.close()
        self.process.stop()


def wait_scans(server: Served, scans: int = 6) -> dict[str, Any]:
    """Let the watcher look at the inbox a few more times; returns the last status."""
    start = server.client.status()["inbox"]["scans"]
    return wait_for(
        lambda: (s := server.client.status())["inbox"]["scans"] >= start + scans and s,
        what="inbox scans",
    )


def drop(path: Path, data: bytes) -> None:
    """How a writer should deliver: write a temp name, fsync, rename into place."""
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def inbox_outcome(server: Served, name: str, timeout: float = 90.0) -> dict[str, Any]:
    return wait_for(
        lambda: next(
            (r for r in reversed(journal(server.state))
             if r["origin"] == "inbox" and r["name"] == name and r["event"] != "accepted"),
            None,
        ),
        timeout=timeout,
        what=f"the outcome of inbox/{name}",
    )  # fmt: skip
