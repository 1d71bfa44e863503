"""A small Python client of the merge server (httpx): upload, wait, download.

client = MergeClient("https://merge.example:8470", token=open("token").read().strip())
receipt = client.upload("step-1000.safetensors")
client.wait([receipt["id"]])
client.download("merged.safetensors")
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx

FINAL = {"folded", "duplicate", "rejected"}


class MergeClient:
    def __init__(
        self, url: str, token: str | None = None, verify: Any = True, timeout: float = 120.0
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url, headers=headers, verify=verify, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> MergeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def post(self, data: bytes, name: str) -> httpx.Response:
        """One upload attempt; the response as it came (202, 4xx, 503...)."""
        return self.http.post("/checkpoints", params={"name": name}, content=data)

    def upload(
        self, source: str | Path | bytes, name: str | None = None, patience: float = 600.0
    ) -> dict[str, Any]:
        """Upload, waiting out 503s as Retry-After says; the 202 receipt or an HTTPStatusError."""
        if isinstance(source, (str, Path)):
            name = name or Path(source).name
            data = Path(source).read_bytes()
        else:
            data = source
        deadline = time.monotonic() + patience
        while True:
            response = self.post(data, name or "checkpoint")
            if response.status_code != 503 or time.monotonic() > deadline:
                response.raise_for_status()
                return response.json()
            time.sleep(float(response.headers.get("Retry-After", "1")))

    def outcome(self, checkpoint_id: str) -> dict[str, Any]:
        return self.http.get(f"/uploads/{checkpoint_id}").json()

    def wait(self, ids: Iterable[str], timeout: float = 600.0) -> dict[str, dict[str, Any]]:
        """Poll until every id is folded, duplicate or rejected; their final records."""
        waiting = list(ids)
        done: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while waiting:
            record = self.outcome(waiting[0])
            if record.get("status") in FINAL:
                done[waiting.pop(0)] = record
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(waiting)} upload(s) still pending, e.g. {waiting[0]}")
            time.sleep(0.05)
        return done

    def status(self) -> dict[str, Any]:
        response = self.http.get("/status")
        response.raise_for_status()
        return response.json()

    def manifest(self) -> dict[str, Any]:
        response = self.http.get("/manifest")
        response.raise_for_status()
        return response.json()

    def metrics(self) -> str:
        response = self.http.get("/metrics")
        response.raise_for_status()
        return response.text

    def download(self, out: str | Path) -> Path:
        """The current merged model, streamed to ``out`` (a .safetensors file)."""
        out = Path(out)
        with self.http.stream("GET", "/model") as response:
            response.raise_for_status()
            with open(out, "wb") as handle:
                for block in response.iter_bytes(1 << 20):
                    handle.write(block)
        return out
