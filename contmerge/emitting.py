"""Writing a merged model: one ``.safetensors`` file, or a model directory as transformers reads
it (shards with ``model.safetensors.index.json``, the base's config and tokenizer files, and a
model card ``README.md`` saying how the model was made).

Tensors are streamed: every shard file is open at once and each merged tensor goes to its own
shard as it is computed, so memory stays one tensor whatever the number of shards. Each file is
replaced atomically, the index after its shards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .atomic import atomic_open, atomic_write_bytes, writing
from .dtypes import code
from .errors import SettingError
from .manifest import Manifest
from .sources import SAFETENSORS_INDEX
from .tensorfile import SafetensorsWriter, TensorMeta

SINGLE_FILE = "model.safetensors"
MODEL_CARD = "README.md"
#: weight files of an earlier emit into the same directory, replaced by this one's
_OLD_WEIGHTS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


def out_metas(
    metas: Mapping[str, TensorMeta], out_dtype: torch.dtype | None
) -> dict[str, TensorMeta]:
    """The emitted tensors' metas: float tensors in ``out_dtype`` when given, else as the base."""
    if out_dtype is None:
        return dict(metas)
    return {n: TensorMeta(m.shape, out_dtype) if m.is_float else m for n, m in metas.items()}


def plan_shards(
    metas: Mapping[str, TensorMeta],
    base_shards: Mapping[str, str] | None,
    shard_size: int | None,
) -> dict[str, list[str]]:
    """File name -> tensor names, in the base's order. With ``shard_size``, consecutive
    tensors up to that many bytes per file (a larger tensor gets a file of its own); else
    the base's own shards (``base_shards``: tensor -> shard file name) when it had them, else
    one file."""
    if shard_size is not None:
        groups: list[list[str]] = []
        used = 0
        for name, meta in metas.items():
            if not groups or (used + meta.nbytes > shard_size and groups[-1]):
                groups.append([])
                used = 0
            groups[-1].append(name)
            used += meta.nbytes
        if len(groups) == 1:
            return {SINGLE_FILE: groups[0]}
        total = len(groups)
        return {f"model-{k + 1:05d}-of-{total:05d}.safetensors": g for k, g in enumerate(groups)}
    if base_shards:
        files: dict[str, list[str]] = {}
        for name in metas:
            files.setdefault(base_shards[name], []).append(name)
        if len(files) > 1:
            return files
    return {SINGLE_FILE: list(metas)}


def write_model(
    out: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    metas: Mapping[str, TensorMeta],
    plan: Mapping[str, list[str]],
    metadata: Mapping[str, str],
    *,
    model_directory: bool = True,
) -> None:
    """Stream ``tensors`` (in ``metas``' order) into the files of ``plan`` inside ``out``;
    with more than one file, then the shard index. In a ``model_directory``, weight files of
    an earlier emit that are not in ``plan`` go (transformers would read a stale index)."""
    shard_of = {name: file for file, names in plan.items() for name in names}
    with contextlib.ExitStack() as files:
        writers = {
            file: SafetensorsWriter(
                files.enter_context(atomic_open(out / file)),
                {n: metas[n] for n in names},
                metadata,
            )
            for file, names in plan.items()
        }
        for name, tensor in tensors:
            writers[shard_of[name]].write(name, tensor.contiguous())
        for writer in writers.values():
            writer.finish()
    if len(plan) > 1:
        index = {
            "metadata": {"total_size": sum(m.nbytes for m in metas.values())},
            "weight_map": {name: shard_of[name] for name in metas},
        }
        atomic_write_bytes(out / SAFETENSORS_INDEX, json.dumps(index, indent=2).encode() + b"\n")
    if not model_directory:
        return
    for entry in out.iterdir():
        if (
            _OLD_WEIGHTS.fullmatch(entry.name)
            and entry.name not in plan
            and (len(plan) == 1 or entry.name != SAFETENSORS_INDEX)
        ):
            with writing(entry), contextlib.suppress(FileNotFoundError):
                os.unlink(entry)


def set_config_dtype(out: Path, dtype: torch.dtype) -> None:
    """Say ``dtype`` in the emitted ``config.json`` (transformers' ``dtype="auto"`` reads it),
    where the base's config said its own."""
    path = out / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for key in keys:
        config[key] = str(dtype).removeprefix("torch.")
    atomic_write_bytes(path, json.dumps(config, indent=2).encode() + b"\n")


def check_out(out: Path, shard_size: int | None) -> None:
    """Refuse, before any work, an output that cannot take the options given."""
    if shard_size is not None and out.suffix == ".safetensors":
        raise SettingError(
            f"{out}: a shard size needs a directory to write the shards in (give --out a "
            "directory, e.g. merged/), not a .safetensors file"
        )
    if shard_size is not None and shard_size <= 0:
        raise SettingError(f"shard size {shard_size} must be positive")


def model_card(manifest: Manifest, version: str, out_dtype: torch.dtype | None) -> str:
    """The emitted directory's ``README.md``: how the model was made, arrival by arrival."""
    base = manifest.base
    arrivals = manifest.arrivals
    pattern = manifest.linear_pattern
    lines = [
        "---",
        "tags:",
        "- contmerge",
        "- merge",
        "---",
        "# Merged model",
        "",
        f"Made with contmerge {version}, strategy `{manifest.strategy}`, from "
        f"{len(arrivals)} fine-tuned checkpoint(s) of one base, folded one at a time in "
        "the order below.",
        "",
        "## Settings",
        "",
        f"- strategy: `{manifest.strategy}`",
        f"- base: `{base.source}` (fingerprint `{base.fingerprint}`)",
        f"- linear weights: {base.linear_weights} of {base.tensors} tensors"
        + (f" (pattern `{pattern}`)" if pattern else ""),
        "- dtype of the emitted weights: "
        + (code(out_dtype) if out_dtype is not None else "the base's"),
    ]
    globals_ = {k: v for k, v in manifest.globals.items() if k != "count"}
    if globals_:
        lines.append(f"- strategy globals: `{json.dumps(globals_)}`")
    lines += [
        "",
        "## Checkpoints folded",
        "",
        "| # | source | dtype | weight | content hash (xxh3-128) | folded at |",
        "|---|---|---|---|---|---|",
    ]
    for record in arrivals:
        weight, dtype = record.weight, record.dtype or "not recorded"
        lines.append(
            f"| {record.index} | `{record.source}` | {dtype} "
            f"| {'1' if weight is None else weight} | `{record.hash}` | {record.folded_at} |"
        )
    return "\n".join(lines) + "\n"
