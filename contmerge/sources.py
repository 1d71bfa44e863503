"""Checkpoint sources, read lazily one tensor at a time.

Every source answers the same three questions: which tensors it has (``meta``, known without
reading data), the value of one tensor (``read``, or ``view`` to look without copying), and, for
sources that only carry a change (LoRA adapters), the delta against the base (``delta``).
Nothing here holds more than one tensor of the checkpoint in memory at a time.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
import torch
from torch import nn

from . import jsonfile
from .errors import CheckpointError, clip
from .lora_config import CONFIG_FILE, read_lora_config
from .tensorfile import (
    CODE_BY_DTYPE,
    SafetensorsReader,
    TensorMeta,
    header_limit,
    prefix_problem,
)
from .torchfile import load_torch_file

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
#: what a model directory holds its weights in, in the order they are looked for: safetensors
#: before torch (Hugging Face repositories often ship the same weights in both)
MODEL_WEIGHT_FILES = ("model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin", TORCH_INDEX)
#: what a PEFT adapter directory (one with ``adapter_config.json``) holds its weights in
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
#: every weight-file name of a directory (the one list: sources, the inbox, the emit's copy)
WEIGHT_FILES = MODEL_WEIGHT_FILES + ADAPTER_WEIGHT_FILES
CONFIG_FILES_TO_SKIP = frozenset(WEIGHT_FILES)
#: files read by torch's (weights-only) unpickler; any other file is read as safetensors
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
#: ``reader(start, stop, buffer)``: the bytes of entries ``start:stop`` of a flattened tensor, as
#: uint8, read into ``buffer`` or a view of memory already holding them; never to be written
ChunkReader = Callable[[int, int, np.ndarray], np.ndarray]


class Checkpoint:
    """A model's tensors by name. Subclasses fill ``meta`` and implement ``read``."""

    source: str
    meta: dict[str, TensorMeta]
    #: directory whose config/tokenizer files travel with an emitted model, if any
    config_dir: Path | None = None
    #: ``read`` returns a new tensor nobody else holds, so the engine may compute in it in place
    fresh_reads: bool = False
    #: tensor name -> the file of a sharded checkpoint holding it (an emit shards alike)
    shard_names: dict[str, str] | None = None

    _linear_names: frozenset[str] | None = None
    _linear_names_known = False

    @property
    def linear_names(self) -> frozenset[str] | None:
        """Names of ``nn.Linear`` weights when the source knows them exactly (modules, model
        directories). A directory's are learnt from its config on first use (building the model
        on the meta device takes seconds), so an open that does not need them skips that."""
        if not self._linear_names_known:
            found = None
            if self.config_dir is not None:
                found = _linear_names_from_config(self.config_dir, self.meta)
            self.linear_names = found
        return self._linear_names

    @linear_names.setter
    def linear_names(self, names: frozenset[str] | None) -> None:
        self._linear_names, self._linear_names_known = names, True

    def keys(self) -> list[str]:
        return list(self.meta)

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def view(self, name: str) -> torch.Tensor:
        """The tensor without a copy where the source allows it; never to be written into."""
        return self.read(name)

    def release(self, name: str) -> None:
        """Done with ``view(name)``: memory it brought in may go."""

    def chunks(self, name: str) -> ChunkReader:
        """Reads ``name`` a flat slice at a time (see ``ChunkReader``)."""
        raw = self.view(name).reshape(-1).contiguous().view(torch.uint8).numpy()
        size = self.meta[name].dtype.itemsize
        return lambda start, stop, buffer: raw[start * size : stop * size]

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        """θ − θ0 for one tensor, or None where this source does not change it."""
        return self.read(name).to(base.dtype) - base

    @property
    def carries_full_weights(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pread_chunks(reader: SafetensorsReader, name: str) -> ChunkReader:
    # a copy into a buffer hot in cache costs what mapping fresh pages would, and a file cut
    # short by someone else gives an error instead of a fault
    size = reader.meta[name].dtype.itemsize
    return lambda start, stop, buffer: reader.read_bytes(
        name, start * size, buffer[: (stop - start) * size]
    )


class StateDictCheckpoint(Checkpoint):
    """An in-memory state dict or module (the tensors are already in memory)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor] | nn.Module, source: str = "<memory>"):
        if isinstance(tensors, nn.Module):
            self.linear_names = frozenset(
                f"{name}.weight"
                for name, mod in tensors.named_modules()
                if isinstance(mod, nn.Linear)
            )
            tensors = tensors.state_dict()
        self.source = source
        self._tensors: dict[str, torch.Tensor] = {}
        for name, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(
                    source, f"value is {type(value).__name__}, not a tensor", name
                )
            self._tensors[name] = value.detach()
        self.meta = {n: TensorMeta.of(t) for n, t in self._tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name].cpu()


class SafetensorsCheckpoint(Checkpoint):
    """One ``.safetensors`` file."""

    fresh_reads = True

    def __init__(self, path: str | Path, max_header_bytes: int | None = None) -> None:
        self._reader = SafetensorsReader(path, max_header_bytes)
        self.source = str(path)
        self.meta = dict(self._reader.meta)

    def read(self, name: str) -> torch.Tensor:
        return self._reader.read(name)

    def view(self, name: str) -> torch.Tensor:
        return self._reader.view(name)

    def release(self, name: str) -> None:
        self._reader.release(name)

    def chunks(self, name: str) -> ChunkReader:
        return _pread_chunks(self._reader, name)

    def close(self) -> None:
        self._reader.close()


def read_shard_index(index_path: str | Path, max_bytes: int | None = None) -> dict[str, Path]:
    """A sharded checkpoint's ``weight_map``: tensor name -> shard file, every shard checked to
    lie inside the index's directory (no absolute path, no ``..``, no symlink leading out).

    Shards need not exist yet (the server's inbox waits for them). Raises CheckpointError
    naming the index file. The one rule for both doors: the CLI and the server's inbox.
    """
    index_path = Path(index_path)
    index = jsonfile.read_object(index_path, header_limit(max_bytes), "shard index")
    weight_map = index.get("weight_map")

    def fail(reason: str, tensor: str | None = None) -> CheckpointError:
        return CheckpointError(str(index_path), f"malformed shard index: {reason}", tensor)

    if not isinstance(weight_map, dict):
        what = "missing" if weight_map is None else f"a {type(weight_map).__name__}"
        raise fail(f"weight_map is {what}, not an object of tensor name -> shard file")
    if not weight_map:
        raise fail("weight_map is empty")
    directory = index_path.parent
    shards: dict[str, Path] = {}
    out: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise fail(f"the shard of a tensor is {clip(repr(shard), 60)}, not a file name", name)
        if shard not in shards:
            shards[shard] = _shard_path(index_path, directory, shard)
        out[name] = shards[shard]
    return out


def shard_files(index_path: str | Path, max_bytes: int | None = None) -> list[Path]:
    """The distinct shard files an index names, each inside its directory (see
    ``read_shard_index``); CheckpointError naming the index file otherwise."""
    return sorted(set(read_shard_index(index_path, max_bytes).values()))


class ShardPathError(CheckpointError):
    """A shard index naming a file that can never be read as its shard: outside its directory,
    or a path that does not resolve. Waiting for it would not help (the server's inbox)."""


def _shard_path(index_path: Path, directory: Path, shard: str) -> Path:
    def refuse(why: str) -> CheckpointError:
        return ShardPathError(
            str(index_path), f"shard {clip(shard, 80)!r} {why}: shards must lie in its directory"
        )

    if "\0" in shard:
        raise refuse("holds a NUL byte")
    relative = PurePosixPath(shard)
    if relative.is_absolute():
        raise refuse("is an absolute path")
    if ".." in relative.parts:
        raise refuse("leaves the directory (..)")
    path = directory / relative
    try:
        root, resolved = directory.resolve(), path.resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        # no exception text: it holds the full path, and a reason may reach an HTTP client
        raise refuse("cannot be resolved (a symlink loop?)") from None
    if resolved == root or not resolved.is_relative_to(root):
        raise refuse("is a symlink leading out of the directory")
    return path


class ShardedCheckpoint(Checkpoint):
    """A Hugging Face sharded directory described by ``model.safetensors.index.json``."""

    fresh_reads = True

    def __init__(self, index_path: str | Path, max_header_bytes: int | None = None) -> None:
        index_path = Path(index_path)
        self.source = str(index_path.parent)
        weight_map = read_shard_index(index_path, max_header_bytes)
        self._readers: dict[Path, SafetensorsReader] = {}
        self._shard_of: dict[str, Path] = {}
        self.meta = {}
        try:
            for shard_path in sorted(set(weight_map.values())):
                if not shard_path.exists():
                    raise CheckpointError(str(shard_path), "shard listed in the index is missing")
                self._readers[shard_path] = SafetensorsReader(shard_path, max_header_bytes)
            for name, shard_path in weight_map.items():
                reader = self._readers[shard_path]
                if name not in reader.meta:
                    raise CheckpointError(
                        reader.path, "tensor listed in the index is missing", name
                    )
                self.meta[name] = reader.meta[name]
                self._shard_of[name] = shard_path
            self.shard_names = {name: path.name for name, path in self._shard_of.items()}
        except BaseException:
            self.close()
            raise

    def read(self, name: str) -> torch.Tensor:
        return self._readers[self._shard_of[name]].read(name)

    def view(self, name: str) -> torch.Tensor:
        return self._readers[self._shard_of[name]].view(name)

    def release(self, name: str) -> None:
        self._readers[self._shard_of[name]].release(name)

    def chunks(self, name: str) -> ChunkReader:
        return _pread_chunks(self._readers[self._shard_of[name]], name)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()


class TorchFileCheckpoint(Checkpoint):
    """A ``torch.save`` file, loaded only with ``weights_only=True`` (no arbitrary pickle code),
    its zip records checked before any is mapped (see ``contmerge.torchfile``)."""

    fresh_reads = True  # ``read`` clones out of the loaded (memory-mapped) file

    def __init__(self, path: str | Path) -> None:
        self.source = str(path)
        self._tensors = load_torch_file(Path(path))
        self.meta = {n: TensorMeta.of(t) for n, t in self._tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name].clone()

    def view(self, name: str) -> torch.Tensor:
        return self._tensors[name]


class LoraCheckpoint(Checkpoint):
    """A PEFT LoRA adapter directory, read as the low-rank delta B·A·scale on its target weights.

    Tensors saved under ``modules_to_save`` are full replacements and fold like full weights.
    The config and every factor's shape are checked on opening, from headers only: a factor
    pair that does not make the target's shape is refused before anything is read.
    """

    _LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.weight$")

    def __init__(
        self,
        directory: str | Path,
        base_meta: Mapping[str, TensorMeta],
        max_header_bytes: int | None = None,
    ) -> None:
        directory = Path(directory)
        self.source = str(directory)
        self._config = read_lora_config(directory)
        self.fan_in_fan_out = self._config.fan_in_fan_out
        found = recognise(directory, max_header_bytes)
        if found.kind != "lora":
            raise CheckpointError(str(directory), f"not a LoRA adapter: {found.describe()}")
        if found.weights.name.endswith(TORCH_SUFFIXES):
            self._inner: Checkpoint = TorchFileCheckpoint(found.weights)
        else:
            self._inner = SafetensorsCheckpoint(found.weights, max_header_bytes)
        try:
            self._pair_up(base_meta)
        except BaseException:
            self._inner.close()
            raise

    def _pair_up(self, base_meta: Mapping[str, TensorMeta]) -> None:
        inner = self._inner
        self._pairs: dict[str, tuple[str, str]] = {}
        self._full: dict[str, str] = {}
        self._scales: dict[str, float] = {}
        pending: dict[str, dict[str, str]] = {}
        for key in inner.meta:
            match = self._LORA.match(key)
            if not match:
                self._claim(_base_name(key, base_meta), key, base_meta)
                self._full[_base_name(key, base_meta)] = key
                continue
            parts = pending.setdefault(match["module"], {})
            if match["part"] in parts:
                raise CheckpointError(inner.source, "LoRA factor given twice (two adapters?)", key)
            parts[match["part"]] = key
        for module, parts in pending.items():
            if set(parts) != {"A", "B"}:
                raise CheckpointError(inner.source, "LoRA factor without its partner", module)
            target = _base_name(module + ".weight", base_meta)
            self._claim(target, parts["A"], base_meta)
            path = _strip_peft_prefix(module)  # what PEFT's rank/alpha patterns match
            rank = self._check_factors(target, path, parts, base_meta[target])
            self._pairs[target] = (parts["A"], parts["B"])
            scale = self._config.scale_of(path, rank)
            if not math.isfinite(scale):
                raise CheckpointError(inner.source, f"LoRA scale {scale} is not finite", target)
            self._scales[target] = scale
        self.meta = {name: base_meta[name] for name in self._pairs}
        self.meta.update({name: inner.meta[key] for name, key in self._full.items()})

    def _claim(self, target: str, key: str, base_meta: Mapping[str, TensorMeta]) -> None:
        """``key`` changes the base's ``target``: the base must have it, and nothing else may."""
        if target not in base_meta:
            raise CheckpointError(self.source, "adapter targets a tensor the base lacks", target)
        if target in self._pairs or target in self._full:
            raise CheckpointError(
                self._inner.source, "two adapter tensors change the same base tensor", target
            )

    def _check_factors(
        self, target: str, module: str, parts: Mapping[str, str], weight: TensorMeta
    ) -> int:
        """The factors' rank, once B·A is known (from the headers) to make ``weight``'s shape
        at the rank adapter_config.json gives ``module``."""
        a_key, b_key = parts["A"], parts["B"]
        a_meta, b_meta = self._inner.meta[a_key], self._inner.meta[b_key]

        def fail(reason: str) -> CheckpointError:
            return CheckpointError(self._inner.source, reason, target)

        for key, meta in ((a_key, a_meta), (b_key, b_meta)):
            if not meta.is_float:
                raise fail(f"LoRA factor {key!r} has dtype {CODE_BY_DTYPE[meta.dtype]}, not float")
            if len(meta.shape) != 2:
                raise fail(
                    f"LoRA factor {key!r} has shape {list(meta.shape)}: only linear (2-D) "
                    "factors are supported"
                )
        (rank, fan_in), (fan_out, rank_b) = a_meta.shape, b_meta.shape
        if rank != rank_b:
            raise fail(f"LoRA factors disagree on the rank: lora_A has {rank}, lora_B {rank_b}")
        if rank == 0:
            raise fail("LoRA factors of rank 0")
        product = [fan_in, fan_out] if self.fan_in_fan_out else [fan_out, fan_in]
        if tuple(product) != weight.shape:
            raise fail(f"LoRA product B·A has shape {product}, the weight has {list(weight.shape)}")
        wanted = self._config.rank_of(module)
        if rank != wanted:
            raise fail(
                f"LoRA factors have rank {rank}, {self._config.path.name} gives this module "
                f"r={wanted}"
            )
        if rank > max(product):
            raise fail(f"LoRA rank {rank} exceeds both of the weight's dimensions {product}")
        return rank

    @property
    def carries_full_weights(self) -> bool:
        return False

    def read(self, name: str) -> torch.Tensor:
        return self._inner.read(self._full[name])

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        a_key, b_key = self._pairs[name]
        return self._inner.read(a_key), self._inner.read(b_key)

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        if name in self._full:
            return super().delta(name, base)
        if name not in self._pairs:
            return None
        lora_a, lora_b = self.factors(name)
        update = (lora_b.to(base.dtype) @ lora_a.to(base.dtype)) * self._scales[name]
        return update.T if self.fan_in_fan_out else update

    def close(self) -> None:
        self._inner.close()


def _base_name(adapter_key: str, base_meta: Mapping[str, TensorMeta]) -> str:
    """Map PEFT's ``base_model.model.<name>`` (and ``modules_to_save.default``) to a base key."""
    # peft < 0.14 saved modules_to_save copies as ``<module>.modules_to_save.<tensor>``
    name = _strip_peft_prefix(re.sub(r"\.modules_to_save(\.default)?(?=\.)", "", adapter_key))
    if name in base_meta:
        return name
    # PEFT wraps task models (e.g. BertForX) while the base may be the bare encoder, or vice versa
    candidates = [k for k in base_meta if k.endswith("." + name) or name.endswith("." + k)]
    return candidates[0] if len(candidates) == 1 else name


def _strip_peft_prefix(name: str) -> str:
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def sidecar_name(name: str, kind: str) -> str:
    """``model.safetensors`` brings its ``kind`` statistics (e.g. ``fisher``) in
    ``model.<kind>.safetensors`` beside it: the one rule of the CLI, the API and the inbox."""
    suffix = Path(name).suffix
    stem = name[: -len(suffix)] if suffix else name
    return f"{stem}.{kind}.safetensors"


Kind = Literal["safetensors", "sharded", "torch", "lora"]
KIND_NAMES: dict[Kind, str] = {
    "safetensors": "safetensors file",
    "sharded": "sharded safetensors checkpoint",
    "torch": "torch.save file",
    "lora": "PEFT LoRA adapter",
}


@dataclass(frozen=True)
class Recognised:
    """What a path holds, told from names, a shard index and at most the first 8 bytes of a
    weight file; no tensor is read. ``open_checkpoint`` opens it as this says."""

    path: Path
    kind: Kind
    #: the file the weights come from: the path itself, a directory's weight file, the index
    weights: Path
    #: the path is a directory (a model or adapter directory), not a file
    directory: bool = False
    #: a sharded checkpoint's shard files, each inside its directory and each there
    shards: tuple[Path, ...] = ()
    #: a model directory with a ``config.json``: its config files travel with an emitted model
    config_dir: Path | None = None

    @property
    def full_weights(self) -> bool:
        """A full model's weights (an adapter only carries a change to the base's)."""
        return self.kind != "lora"

    def describe(self) -> str:
        what = KIND_NAMES[self.kind]
        if self.config_dir is not None:
            return f"a model directory ({what})"
        if self.directory and self.kind != "lora":
            return f"a directory holding a {what}"
        return f"a {what}"


class Incomplete(CheckpointError):
    """A directory that is not a checkpoint yet but may become one: its weights, or some of
    its shards, are not there (the server's inbox waits; everyone else refuses)."""


def recognise(path: str | Path, max_header_bytes: int | None = None) -> Recognised:
    """What ``path`` is: a safetensors file, a sharded checkpoint (its index, or a directory
    holding one), a ``torch.save`` file, a PEFT LoRA adapter directory or a model directory
    holding one of those; else a ``CheckpointError`` naming the path and why (``Incomplete``
    for a directory whose weights are missing). The one rule of every door: the CLI and API
    (``open_checkpoint``), the server's inbox, DIMAT and FW-Merging.

    A directory with two kinds (an adapter config beside a model's weights, a shard index
    beside a single ``model.safetensors``) is refused: which one is meant cannot be told. A
    model's weights in both safetensors and torch form are the same model: safetensors is read.
    """
    path = Path(path)
    if path.is_dir():
        return _recognise_directory(path, max_header_bytes)
    if not path.exists():
        what = "a dangling or looping symlink" if path.is_symlink() else "no such file or directory"
        raise CheckpointError(str(path), what)
    if path.name == TORCH_INDEX:
        raise CheckpointError(str(path), _TORCH_SHARDS)
    if path.name.endswith(".index.json"):
        return _recognise_sharded(path, path, False, max_header_bytes)
    if not read_as_safetensors(path.name):
        return Recognised(path, "torch", path)
    _check_prefix(path, max_header_bytes)
    return Recognised(path, "safetensors", path)


def read_as_safetensors(name: str) -> bool:
    """Whether a file of this name is read as safetensors: all but torch files and indexes."""
    return not name.endswith((*TORCH_SUFFIXES, ".index.json"))


_TORCH_SHARDS = "sharded .bin checkpoints are not supported; convert them to safetensors"


def _recognise_directory(path: Path, max_header_bytes: int | None) -> Recognised:
    present = [name for name in (CONFIG_FILE, *WEIGHT_FILES) if os.path.lexists(path / name)]
    for name in present:
        if (path / name).is_dir():
            raise CheckpointError(str(path / name), "not a regular file (a directory)")
    model = [name for name in MODEL_WEIGHT_FILES if name in present]
    if CONFIG_FILE in present:
        if model:
            raise CheckpointError(
                str(path),
                f"two kinds in one directory: a LoRA adapter ({CONFIG_FILE}) and a model's "
                f"weights ({model[0]}); put each in its own directory",
            )
        for name in ADAPTER_WEIGHT_FILES:
            if name in present:
                if not name.endswith(TORCH_SUFFIXES):
                    _check_prefix(path / name, max_header_bytes)
                return Recognised(path, "lora", path / name, directory=True)
        raise Incomplete(str(path), f"{CONFIG_FILE} without {' or '.join(ADAPTER_WEIGHT_FILES)}")
    if "model.safetensors" in model and SAFETENSORS_INDEX in model:
        raise CheckpointError(
            str(path),
            f"two kinds in one directory: model.safetensors and a shard index "
            f"({SAFETENSORS_INDEX}); keep the one that is the model",
        )
    if not model:
        stray = [name for name in ADAPTER_WEIGHT_FILES if name in present]
        if stray:
            raise Incomplete(str(path), f"{stray[0]} without its {CONFIG_FILE}")
        raise Incomplete(str(path), f"directory holds none of {', '.join(MODEL_WEIGHT_FILES)}")
    config_dir = path if (path / "config.json").is_file() else None
    name = model[0]
    if name == SAFETENSORS_INDEX:
        return _recognise_sharded(path, path / name, True, max_header_bytes, config_dir)
    if name == TORCH_INDEX:
        raise CheckpointError(str(path), _TORCH_SHARDS)
    if name.endswith(TORCH_SUFFIXES):
        return Recognised(path, "torch", path / name, directory=True, config_dir=config_dir)
    _check_prefix(path / name, max_header_bytes)
    return Recognised(path, "safetensors", path / name, directory=True, config_dir=config_dir)


def _recognise_sharded(
    path: Path,
    index: Path,
    directory: bool,
    max_header_bytes: int | None,
    config_dir: Path | None = None,
) -> Recognised:
    shards = shard_files(index, max_header_bytes)
    missing = [shard for shard in shards if not shard.is_file()]
    if missing:
        # named by the first: waiting would be the inbox's answer, a refusal everyone else's
        where = "" if len(missing) == 1 else f" ({len(missing)} of {len(shards)} are not there)"
        raise Incomplete(str(missing[0]), f"shard listed in the index is missing{where}")
    return Recognised(path, "sharded", index, directory, tuple(shards), config_dir)


def _check_prefix(path: Path, max_header_bytes: int | None) -> None:
    """A regular file that is to be read as safetensors must start like one (the reader's
    first check, ``tensorfile.prefix_problem``): a pickle or a truncated file is named here.
    Anything else (a FIFO, a device) is left to the reader, which refuses it without blocking."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            size = os.fstat(handle.fileno()).st_size
    except OSError:
        return  # unreadable: opening it says why
    problem = prefix_problem(prefix, size, header_limit(max_header_bytes))
    if problem is not None:
        raise CheckpointError(str(path), problem)


def open_checkpoint(
    source: str | Path | Mapping[str, torch.Tensor] | nn.Module | Checkpoint | Recognised,
    base_meta: Mapping[str, TensorMeta] | None = None,
    max_header_bytes: int | None = None,
) -> Checkpoint:
    """Open any supported checkpoint: a file, a model/adapter directory (what ``recognise``
    tells), a state dict or module.

    ``max_header_bytes`` bounds a safetensors header or shard index (default
    ``tensorfile.header_limit()``: $CONTMERGE_MAX_HEADER_BYTES, else 16 MiB).
    """
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, (Mapping, nn.Module)):
        return StateDictCheckpoint(source)
    found = source if isinstance(source, Recognised) else recognise(source, max_header_bytes)
    checkpoint: Checkpoint
    if found.kind == "lora":
        if base_meta is None:
            raise CheckpointError(str(found.path), "a LoRA adapter can only be read against a base")
        return LoraCheckpoint(found.path, base_meta, max_header_bytes)
    if found.kind == "sharded":
        checkpoint = ShardedCheckpoint(found.weights, max_header_bytes)
    elif found.kind == "torch":
        checkpoint = TorchFileCheckpoint(found.weights)
    else:
        checkpoint = SafetensorsCheckpoint(found.weights, max_header_bytes)
    if found.directory:
        checkpoint.source = str(found.path)
    checkpoint.config_dir = found.config_dir  # its linear names are learnt when first asked for
    return checkpoint


def _linear_names_from_config(path: Path, meta: Mapping[str, TensorMeta]) -> frozenset[str] | None:
    """Exact ``nn.Linear`` weight names, by building the model on the meta device (no weights)."""
    try:
        import transformers
    except ImportError:
        return None
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        with torch.device("meta"):
            # model classes have no public ``from_config`` (only the Auto classes do)
            model = cls(config) if cls else transformers.AutoModel.from_config(config)
    except Exception:  # an unknown architecture falls back to the shape heuristic
        return None
    names = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    prefix = getattr(model, "base_model_prefix", "")
    names |= {n[len(prefix) + 1 :] for n in names if prefix and n.startswith(prefix + ".")}
    return frozenset(n for n in meta if n in names)
