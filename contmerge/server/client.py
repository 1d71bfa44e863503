"""A small Python client of the merge server (httpx): upload, wait, download.

client = MergeClient("https://merge.example:8470", token=open("token").read().strip())
receipt = client.upload("step-1000.safetensors")   # or a LoRA adapter / sharded directory
client.wait([receipt["id"]])
client.download("merged.safetensors")

A refused upload raises :class:`UploadError` with the server's status code and reason.
"""

from __future__ import annotations

import contextlib
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx

from ..errors import ContmergeError

FINAL = {"folded", "duplicate", "rejected"}
TAR_TYPE = "application/x-tar"


class UploadError(ContmergeError):
    """The server refused an upload: ``status_code`` and ``reason`` are the server's."""

    def __init__(self, status_code: int, reason: str, record: dict[str, Any]) -> None:
        super().__init__(f"upload refused ({status_code}): {reason}")
        self.status_code = status_code
        self.reason = reason
        self.record = record


def _refusal(response: httpx.Response) -> UploadError:
    try:
        record = response.json()
    except ValueError:
        record = {}
    if not isinstance(record, dict):
        record = {}
    reason = str(record.get("reason") or record.get("detail") or response.text.strip())
    return UploadError(response.status_code, reason or response.reason_phrase, record)


@contextlib.contextmanager
def _as_tar(directory: Path) -> Iterator[IO[bytes]]:
    """The directory's files as a plain tar in a temporary file (links followed)."""
    with tempfile.TemporaryFile() as handle:
        with tarfile.open(fileobj=handle, mode="w", dereference=True) as tar:
            for path in sorted(directory.rglob("*")):
                if path.is_file():
                    tar.add(path, arcname=path.relative_to(directory).as_posix())
        handle.seek(0)
        yield handle


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

    def post(
        self, data: bytes | IO[bytes], name: str, content_type: str | None = None
    ) -> httpx.Response:
        """One upload attempt; the response as it came (202, 4xx, 503...)."""
        headers = {"Content-Type": content_type} if content_type else {}
        return self.http.post("/checkpoints", params={"name": name}, content=data, headers=headers)

    def upload(
        self, source: str | Path | bytes, name: str | None = None, patience: float = 600.0
    ) -> dict[str, Any]:
        """Upload a safetensors file (path or bytes) or a checkpoint directory (sent as a tar),
        waiting out 503s as Retry-After says; the 202 receipt, or UploadError."""
        if isinstance(source, bytes):
            return self._send(lambda: contextlib.nullcontext(source), name, None, patience)
        path = Path(source)
        name = name or path.name
        if path.is_dir():
            with _as_tar(path) as handle:

                def rewound() -> contextlib.AbstractContextManager[IO[bytes]]:
                    handle.seek(0)
                    return contextlib.nullcontext(handle)

                return self._send(rewound, name, TAR_TYPE, patience)
        return self._send(lambda: open(path, "rb"), name, None, patience)

    def _send(
        self,
        body: Any,
        name: str | None,
        content_type: str | None,
        patience: float,
    ) -> dict[str, Any]:
        """Post ``body()`` (a fresh context per attempt) until it is not a 503 or patience ends."""
        deadline = time.monotonic() + patience
        while True:
            with body() as data:
                response = self.post(data, name or "checkpoint", content_type)
            if response.status_code == 202:
                return response.json()
            if response.status_code != 503 or time.monotonic() > deadline:
                raise _refusal(response)
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
