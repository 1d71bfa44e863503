"""``contmerge merge`` of checkpoints that are all folded already, answered from the manifest and
the file system alone: no torch import, no tensor read (well under a second on any model size).

Anything this cannot settle from the record (a checkpoint not recognised by its file identity, a
base whose files changed, a strategy spelled differently, settings, a device, an ``--out``, a
manifest that does not parse) goes the ordinary way, through the Merger, which decides it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from .dirlock import DirectoryLock
from .errors import ContmergeError
from .identity import base_identity, file_identity
from .manifest import MANIFEST, Manifest, read_manifest


def already_folded(args: argparse.Namespace) -> tuple[Manifest, list[tuple[str, int]]] | None:
    """The manifest and (checkpoint, its index) for every checkpoint of a ``merge`` invocation
    when each is the very file folded before and nothing else was asked; None when the Merger
    must decide.
    ``merge`` is a writer even when it writes nothing: it takes the directory's lock as the
    Merger would (StateError, as there, when it cannot)."""
    if args.out or args.set or args.device or args.weight or args.verify_base:
        return None
    if not os.path.isfile(Path(args.state) / MANIFEST):
        return None  # a new state, or something the Merger names
    with contextlib.closing(DirectoryLock.exclusive(Path(args.state))):
        return _answer(args)


def _answer(args: argparse.Namespace) -> tuple[Manifest, list[tuple[str, int]]] | None:
    try:
        manifest, _ = read_manifest(args.state)
    except ContmergeError:
        return None
    if args.strategy is not None and args.strategy != manifest.strategy:
        return None  # perhaps the same rule written another way: the Merger compares specs
    record = manifest.base.record
    if record is None or record.identity != base_identity(args.base):
        return None
    if not _state_file_in_place(Path(args.state), manifest):
        return None  # the Merger names what is wrong with it
    index_of = {a.file: a.index for a in manifest.arrivals if a.file}
    found = []
    for checkpoint in args.checkpoints:
        index = index_of.get(file_identity(checkpoint))
        if index is None:
            return None
        found.append((checkpoint, index))
    return manifest, found


def _state_file_in_place(directory: Path, manifest: Manifest) -> bool:
    """The generation's file is there with the recorded size (a cheap look, as opening does)."""
    assert manifest.state_file is not None  # read from a directory: always named
    try:
        size = os.stat(directory / manifest.state_file).st_size
    except OSError:
        return False
    return manifest.checksum is None or size == manifest.checksum.bytes
