"""What an uploaded body must be, and how a refusal says so: the rules, apart from the
lifecycle of an upload (upload.py).

A safetensors body: a header length that fits (checked from its first 8 bytes, again once the
body is complete), a header that parses, and not a LoRA adapter's weights without their config.
A tar body, once unpacked: a checkpoint directory as the inbox recognises one, whose
safetensors headers are within the bound.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Literal

from ..errors import CheckpointError
from ..sources import LoraCheckpoint
from ..tensorfile import SafetensorsReader
from .headercheck import header_problem
from .inbox import Refused, header_refusal_in, inspect_entry

BodyKind = Literal["safetensors", "tar"]
SAFETENSORS: BodyKind = "safetensors"
TAR: BodyKind = "tar"
TAR_TYPES = ("application/x-tar", "application/tar")
HOW_TO_SEND = (
    "the body must be a .safetensors file, or a checkpoint directory (LoRA adapter, sharded "
    "or model directory) sent as a tar with Content-Type: application/x-tar"
)
LORA_FILE = (
    "this is a LoRA adapter's weights (lora_A/lora_B tensors) without its adapter_config.json "
    "(rank, alpha, target modules): send the adapter directory as a tar with Content-Type: "
    "application/x-tar (MergeClient.upload(directory) does that)"
)
NO_CHECKPOINT = (
    "no checkpoint in the tar: {why} (expected, at its top or under one folder: "
    "model.safetensors, or model.safetensors.index.json with its shards, or a PEFT adapter's "
    "adapter_config.json with adapter_model.safetensors)"
)


class Refusal(Exception):
    """An upload refused before it was queued; the HTTP answer is ``status_code``."""

    def __init__(
        self, status_code: int, reason: str, journal: bool = True, retry_after: int | None = None
    ) -> None:
        super().__init__(reason)
        self.status_code = status_code
        self.reason = reason
        self.journal = journal  # a 503 is not an arrival: nothing was received, nothing to note
        self.retry_after = retry_after
        self.checkpoint_id: str | None = None  # the id it was journaled under

    @property
    def status(self) -> Literal["rejected", "busy"]:
        return "rejected" if self.journal else "busy"


def storage_refusal(exc: OSError, what: str = "this upload") -> Refusal:
    """The server's own disk failed while writing ``what``: 507 when it is full, else 500.
    The reason names no path (the server's own, for clients)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return Refusal(
            507, f"no space left on device on the server for {what}; retry later", retry_after=60
        )
    return Refusal(500, f"the server could not write {what}: {exc.strerror or type(exc).__name__}")


def body_kind(content_type: str, format_param: str | None, name: str) -> BodyKind:
    """``tar`` for a tar upload (by Content-Type, ``?format=tar`` or a ``.tar`` name)."""
    if format_param is not None:
        if format_param == SAFETENSORS or format_param == TAR:
            return format_param
        raise Refusal(400, f"unknown format {format_param[:40]!r}: use safetensors or tar")
    media = content_type.split(";", 1)[0].strip().lower()
    return TAR if media in TAR_TYPES or name.endswith(".tar") else SAFETENSORS


def check_prefix(prefix: bytes, size: int | None, max_header_bytes: int) -> None:
    """Refusal when the first 8 bytes of a body of ``size`` bytes (if known) declare a header
    the server will not read."""
    problem = header_problem(prefix, size, max_header_bytes)
    if problem is not None:
        status, reason = problem
        raise Refusal(status, f"{reason}; {HOW_TO_SEND}" if status == 422 else reason)


def check_file(path: Path, max_header_bytes: int) -> None:
    """Refusal (422) unless ``path`` is a safetensors file a fold can read."""
    try:
        reader = SafetensorsReader(path, max_header_bytes)  # truncation, garbage, pickles
    except CheckpointError as exc:
        raise Refusal(422, f"{exc.reason}; {HOW_TO_SEND}") from exc
    with reader:
        if any(LoraCheckpoint._LORA.match(key) for key in reader.meta):
            raise Refusal(422, LORA_FILE)


def check_unpacked(root: Path, max_header_bytes: int) -> None:
    """Refusal (422) unless the unpacked tar at ``root`` is a complete checkpoint directory."""
    try:
        signature, why = inspect_entry(root, root, max_header_bytes)
    except Refused as exc:
        raise Refusal(422, str(exc)) from exc
    if signature is None:
        raise Refusal(422, NO_CHECKPOINT.format(why=why))
    problem = header_refusal_in(root, max_header_bytes)
    if problem is not None:
        raise Refusal(422, problem)
