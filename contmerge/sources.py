"""Checkpoint sources, read lazily one tensor at a time.

Every source answers the same three questions: which tensors it has (``meta``, known without
reading data), the value of one tensor (``read``, or ``view`` to look without copying), and, for
sources that only carry a change (LoRA adapters), the delta against the base (``delta``).
Nothing here holds more than one tensor of the checkpoint in memory at a time.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError
from .tensorfile import SafetensorsReader, TensorMeta

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = ("model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin", TORCH_INDEX)
CONFIG_FILES_TO_SKIP = set(WEIGHT_FILES) | {"adapter_model.safetensors", "adapter_model.bin"}
#: ``reader(start, stop, buffer)``: the bytes of entries ``start:stop`` of a flattened tensor, as
#: uint8, read into ``buffer`` or a view of memory already holding them; never to be written
ChunkReader = Callable[[int, int, np.ndarray], np.ndarray]


class Checkpoint:
    """A model's tensors by name. Subclasses fill ``meta`` and implement ``read``."""

    source: str
    meta: dict[str, TensorMeta]
    #: directory whose config/tokenizer files travel with an emitted model, if any
    config_dir: Path | None = None
    #: names of ``nn.Linear`` weights when the source knows them exactly (modules, model dirs)
    linear_names: frozenset[str] | None = None
    #: ``read`` returns a new tensor nobody else holds, so the engine may compute in it in place
    fresh_reads: bool = False

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

    def __init__(self, path: str | Path) -> None:
        self._reader = SafetensorsReader(path)
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


class ShardedCheckpoint(Checkpoint):
    """A Hugging Face sharded directory described by ``model.safetensors.index.json``."""

    fresh_reads = True

    def __init__(self, index_path: str | Path) -> None:
        index_path = Path(index_path)
        self.source = str(index_path.parent)
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(str(index_path), f"malformed shard index: {exc}") from exc
        self._readers: dict[str, SafetensorsReader] = {}
        self._shard_of: dict[str, str] = {}
        self.meta = {}
        try:
            for shard in sorted(set(weight_map.values())):
                shard_path = index_path.parent / shard
                if not shard_path.is_file():
                    raise CheckpointError(str(shard_path), "shard listed in the index is missing")
                self._readers[shard] = SafetensorsReader(shard_path)
            for name, shard in weight_map.items():
                reader = self._readers[shard]
                if name not in reader.meta:
                    raise CheckpointError(
                        reader.path, "tensor listed in the index is missing", name
                    )
                self.meta[name] = reader.meta[name]
                self._shard_of[name] = shard
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
    """A ``torch.save`` file, loaded only with ``weights_only=True`` (no arbitrary pickle code)."""

    fresh_reads = True  # ``read`` clones out of the loaded (memory-mapped) file

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.source = str(path)
        try:
            # mmap keeps tensors on disk until read; it needs the zip format of torch >= 1.6
            loaded = torch.load(
                path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
            )
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                str(path),
                f"refused: this pickle needs code beyond plain tensors ({_unpickle_reason(exc)})",
            ) from exc
        except Exception as exc:  # torch raises many kinds (e.g. AttributeError for f8 legacy)
            reason = f"not a readable torch file: {type(exc).__name__}: {exc}"
            raise CheckpointError(str(path), reason) from exc
        tensors = _unwrap_state_dict(loaded)
        if tensors is None:
            raise CheckpointError(str(path), "does not hold a state dict of tensors")
        self._tensors = tensors
        self.meta = {n: TensorMeta.of(t) for n, t in tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name].clone()

    def view(self, name: str) -> torch.Tensor:
        return self._tensors[name]


def _unpickle_reason(exc: Exception) -> str:
    """The useful line of torch's long weights_only message (what it refused to load)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch colours part of its message
    found = re.search(
        r"WeightsUnpickler error:\s*(.*?)(?: was not an allowed global|\. Please use|\n\n|$)",
        text,
        re.S,
    )
    if found and found.group(1).strip():
        return found.group(1).strip()
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def _unwrap_state_dict(obj: object) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
        for key in ("state_dict", "model", "module"):
            if key in obj:
                return _unwrap_state_dict(obj[key])
    return None


class LoraCheckpoint(Checkpoint):
    """A PEFT LoRA adapter directory, read as the low-rank delta B·A·scale on its target weights.

    Tensors saved under ``modules_to_save`` are full replacements and fold like full weights.
    """

    _LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.weight$")

    def __init__(self, directory: str | Path, base_meta: Mapping[str, TensorMeta]) -> None:
        directory = Path(directory)
        self.source = str(directory)
        try:
            config = json.loads((directory / "adapter_config.json").read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(str(directory), f"unreadable adapter_config.json: {exc}") from exc
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            raise CheckpointError(
                str(directory), f"unsupported PEFT type {config.get('peft_type')}"
            )
        for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA bias")):
            if config.get(flag):
                raise CheckpointError(
                    str(directory), f"{what} adapters are not supported (not a B·A delta)"
                )
        self._config = config
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        weights = directory / "adapter_model.safetensors"
        if weights.is_file():
            self._inner: Checkpoint = SafetensorsCheckpoint(weights)
        elif (directory / "adapter_model.bin").is_file():
            self._inner = TorchFileCheckpoint(directory / "adapter_model.bin")
        else:
            raise CheckpointError(str(directory), "no adapter_model.safetensors or .bin inside")
        self._pairs: dict[str, tuple[str, str]] = {}
        self._full: dict[str, str] = {}
        self._scales: dict[str, float] = {}
        pending: dict[str, dict[str, str]] = {}
        for key in self._inner.meta:
            match = self._LORA.match(key)
            if match:
                pending.setdefault(match["module"], {})[match["part"]] = key
            else:
                self._full[_base_name(key, base_meta)] = key
        for module, parts in pending.items():
            if set(parts) != {"A", "B"}:
                raise CheckpointError(self.source, "LoRA factor without its partner", module)
            target = _base_name(module + ".weight", base_meta)
            self._pairs[target] = (parts["A"], parts["B"])
            self._scales[target] = self._scale_of(module, self._inner.meta[parts["A"]])
        self.meta = {name: base_meta[name] for name in self._pairs if name in base_meta}
        self.meta.update({name: self._inner.meta[key] for name, key in self._full.items()})
        for name in list(self._pairs) + list(self._full):
            if name not in base_meta:
                raise CheckpointError(self.source, "adapter targets a tensor the base lacks", name)

    @property
    def carries_full_weights(self) -> bool:
        return False

    def _scale_of(self, module: str, a_meta: TensorMeta) -> float:
        """PEFT's ``scaling``: alpha / r (or / √r with rsLoRA), where ``rank_pattern`` and
        ``alpha_pattern`` may give a module its own r and alpha; r is lora_A's row count."""
        config = self._config
        path = _strip_peft_prefix(module)
        alpha = float(config.get("lora_alpha", config["r"]))
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            # the matching rule of peft.utils.other.get_pattern_key
            if re.match(rf"(.*\.)?({pattern})$", path):
                alpha = float(value)
                break
        rank = a_meta.shape[0] if a_meta.shape else int(config["r"])
        return alpha / rank**0.5 if config.get("use_rslora") else alpha / rank

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


def open_checkpoint(
    source: str | Path | Mapping[str, torch.Tensor] | nn.Module | Checkpoint,
    base_meta: Mapping[str, TensorMeta] | None = None,
) -> Checkpoint:
    """Open any supported checkpoint: a file, a model/adapter directory, a state dict or module."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, (Mapping, nn.Module)):
        return StateDictCheckpoint(source)
    path = Path(source)
    if path.is_dir():
        return _open_directory(path, base_meta)
    if not path.exists():
        raise CheckpointError(str(path), "no such file or directory")
    if path.name.endswith(".index.json"):
        return ShardedCheckpoint(path)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return TorchFileCheckpoint(path)
    return SafetensorsCheckpoint(path)


def _open_directory(path: Path, base_meta: Mapping[str, TensorMeta] | None) -> Checkpoint:
    if (path / "adapter_config.json").is_file():
        if base_meta is None:
            raise CheckpointError(str(path), "a LoRA adapter can only be read against a base")
        return LoraCheckpoint(path, base_meta)
    for name in WEIGHT_FILES:
        candidate = path / name
        if not candidate.is_file():
            continue
        if name == TORCH_INDEX:
            raise CheckpointError(
                str(path), "sharded .bin checkpoints are not supported; convert them to safetensors"
            )
        checkpoint = open_checkpoint(candidate)
        checkpoint.source = str(path)
        if (path / "config.json").is_file():
            checkpoint.config_dir = path
            checkpoint.linear_names = _linear_names_from_config(path, checkpoint.meta)
        return checkpoint
    raise CheckpointError(str(path), f"directory holds none of {', '.join(WEIGHT_FILES)}")


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
