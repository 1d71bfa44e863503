"""The watched inbox: a directory where a training job (or anyone) drops checkpoints.

Polling, no dependency. An entry is taken only when it is complete and settled:

- a file that was renamed into place; dotfiles, ``*.tmp`` and ``*.partial`` are being written
  and are ignored;
- a directory: a sharded checkpoint once its ``model.safetensors.index.json`` and every shard it
  lists are there; a model or LoRA adapter directory once its weights file is there;
- and in both cases looking the same (sizes, mtimes) on two scans in a row, which also covers a
  writer that does not rename.

Once the writer is done, the entry moves to ``done/`` or ``rejected/`` (with
``<name>.reason.txt`` beside it). Entries stay in place until then, so a restart finds them again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..sources import SAFETENSORS_INDEX

log = logging.getLogger("contmerge.server")
DONE, REJECTED = "done", "rejected"
IGNORED_SUFFIXES = (".tmp", ".partial")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_WEIGHTS = ("model.safetensors", "pytorch_model.bin")

Signature = list[Any]  # JSON-friendly, so the journal can remember it across restarts


@dataclass(frozen=True)
class InboxEntry:
    name: str
    path: Path
    signature: Signature
    sidecars: tuple[Path, ...]  # per-checkpoint statistics files that travel with it


def is_ignored(name: str) -> bool:
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES) or name in (DONE, REJECTED)


def sidecar_names(name: str, kinds: Sequence[str]) -> list[str]:
    """``model.safetensors`` brings its ``fisher`` statistics as ``model.fisher.safetensors``."""
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return [f"{stem}.{kind}.safetensors" for kind in kinds]


def inspect_entry(path: Path) -> tuple[Signature | None, str | None]:
    """(signature, None) when the entry looks complete, else (None, what it is waiting for)."""
    try:
        if path.is_file():
            stat = path.stat()
            return [stat.st_size, stat.st_mtime_ns, stat.st_ino], None
        if not path.is_dir():
            return None, "not a file or directory"
        listing = sorted(
            [child.name, child.stat().st_size, child.stat().st_mtime_ns] for child in path.iterdir()
        )
    except FileNotFoundError:
        return None, "vanished"
    names = {row[0] for row in listing}
    if SAFETENSORS_INDEX in names:
        try:
            weight_map = json.loads((path / SAFETENSORS_INDEX).read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return listing, None  # settled yet unreadable: the fold will say why
        missing = [s for s in shards if s not in names]
        if missing:
            return None, f"waiting for {len(missing)} shard(s), e.g. {missing[0]}"
        return listing, None
    if "adapter_config.json" in names:
        if names.intersection(ADAPTER_WEIGHTS):
            return listing, None
        return None, "adapter directory without adapter_model.safetensors yet"
    if names.intersection(MODEL_WEIGHTS):
        return listing, None
    return None, f"directory without {SAFETENSORS_INDEX} or model weights yet"


class InboxWatcher(threading.Thread):
    def __init__(
        self,
        directory: Path,
        submit: Callable[[InboxEntry], bool],
        poll_interval: float = 1.0,
        sidecar_kinds: Sequence[str] = (),
    ) -> None:
        super().__init__(name="contmerge-inbox", daemon=True)
        self.directory = directory
        self.done_dir = directory / DONE
        self.rejected_dir = directory / REJECTED
        for folder in (directory, self.done_dir, self.rejected_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.submit = submit
        self.poll_interval = poll_interval
        self.sidecar_kinds = tuple(sidecar_kinds)
        self.scans = 0
        self.waiting: dict[str, str] = {}
        self._seen: dict[str, Signature] = {}
        self._claimed: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.scan()
            except OSError:
                log.exception("inbox scan of %s failed", self.directory)
            self._stopping.wait(self.poll_interval)

    def _candidates(self) -> list[Path]:
        # statistics files travel with their checkpoint; they are not checkpoints of their own
        sidecars = {f".{kind}.safetensors" for kind in self.sidecar_kinds}
        found = []
        for entry in os.scandir(self.directory):
            if is_ignored(entry.name) or any(entry.name.endswith(s) for s in sidecars):
                continue
            try:
                # a rename updates ctime, not mtime: ctime orders entries by arrival
                found.append((entry.stat().st_ctime_ns, entry.name, Path(entry.path)))
            except FileNotFoundError:
                continue
        return [path for _, _, path in sorted(found)]

    def scan(self) -> None:
        waiting: dict[str, str] = {}
        present: set[str] = set()
        blocked = False  # once the queue is full, later entries wait: arrival order is kept
        for path in self._candidates():
            name = path.name
            present.add(name)
            with self._lock:
                if name in self._claimed:
                    continue
            signature, why = inspect_entry(path)
            if signature is None:
                self._seen.pop(name, None)
                waiting[name] = why or "incomplete"
                continue
            if self._seen.get(name) != signature:
                self._seen[name] = signature
                waiting[name] = "settling"
                continue
            if blocked:
                waiting[name] = "queue full"
                continue
            sidecars = tuple(
                path.with_name(s)
                for s in sidecar_names(name, self.sidecar_kinds)
                if path.with_name(s).exists()
            )
            with self._lock:
                self._claimed.add(name)
            if not self.submit(InboxEntry(name, path, signature, sidecars)):
                with self._lock:
                    self._claimed.discard(name)
                waiting[name] = "queue full"
                blocked = True
                continue
            self._seen.pop(name, None)
        for name in set(self._seen) - present:
            del self._seen[name]
        self.waiting = waiting  # replaced whole, so readers on other threads see one scan
        self.scans += 1

    def settle(self, entry: InboxEntry, checkpoint_id: str, event: str, reason: str | None) -> None:
        """Move a finished entry (and its sidecars) to done/ or rejected/."""
        folder = self.rejected_dir if event == "rejected" else self.done_dir
        target = entry.name
        if (folder / target).exists() or any((folder / s.name).exists() for s in entry.sidecars):
            target = f"{checkpoint_id}-{entry.name}"  # never overwrite an earlier one
        try:
            if entry.path.exists():
                os.replace(entry.path, folder / target)
            for sidecar in entry.sidecars:
                prefix = target[: len(target) - len(entry.name)]
                os.replace(sidecar, folder / f"{prefix}{sidecar.name}")
            if event == "rejected":
                (folder / f"{target}.reason.txt").write_text(f"{reason}\n")
        finally:
            with self._lock:
                self._claimed.discard(entry.name)
