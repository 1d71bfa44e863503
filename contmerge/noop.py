"""``contmerge merge`` of checkpoints that are all folded already, answered from the manifest and
the file system alone: no torch import, no tensor read (well under a second on any model size).

Anything this cannot settle from the record (a checkpoint not recognised by its file identity, a
base whose files changed, a strategy spelled differently, settings, a device, an ``--out``, a
manifest that does not parse) goes the ordinary way, through the Merger, which decides it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .errors import ContmergeError
from .identity import base_identity, file_identity
from .manifest import FORMAT, read_manifest


def already_folded(args: argparse.Namespace) -> list[tuple[str, int]] | None:
    """(checkpoint, its index) for every checkpoint of a ``merge`` invocation when each is the
    very file folded before and nothing else was asked; None when the Merger must decide."""
    if args.out or args.set or args.device or getattr(args, "verify_base", False):
        return None
    try:
        manifest, _ = read_manifest(args.state)
    except ContmergeError:
        return None
    if args.strategy is not None and args.strategy != manifest["strategy"]:
        return None  # perhaps the same rule written another way: the Merger compares specs
    record = manifest["base"].get("record")
    if not isinstance(record, dict) or record.get("identity") != base_identity(args.base):
        return None
    if not _state_file_in_place(Path(args.state), manifest):
        return None  # the Merger names what is wrong with it
    index_of = {a.get("file"): a["index"] for a in manifest["arrivals"] if a.get("file")}
    found = []
    for checkpoint in args.checkpoints:
        index = index_of.get(file_identity(checkpoint))
        if index is None:
            return None
        found.append((checkpoint, index))
    return found


def _state_file_in_place(directory: Path, manifest: dict) -> bool:
    """The generation's file is there with the recorded size (a cheap look, as opening does)."""
    try:
        size = os.stat(directory / manifest["state_file"]).st_size
    except OSError:
        return False
    return manifest["format"] != FORMAT or size == manifest["checksum"]["bytes"]
