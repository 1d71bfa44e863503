"""Bad checkpoints are refused with an error naming file, tensor and reason, and change nothing.

For every kind of bad input the fold raises ``CheckpointError``; the durable state directory is
byte-for-byte what it was (manifest and state file, no leftovers), the merger's view of the state
is unchanged, and the next good checkpoint folds as if the bad one had never been offered.
Bad values sit in the *last* tensor, so a fold that committed tensor by tensor would be caught.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from contmerge import CheckpointError, Merger
from contmerge.state import SPARE
from contmerge.tensorfile import CODE_BY_DTYPE, write_safetensors

Tensors = dict[str, torch.Tensor]


def base_tensors() -> Tensors:
    g = torch.Generator().manual_seed(0)
    return {  # order matters: the fold walks the base's order, and "head.weight" comes last
        "embed.weight": torch.randn(12, 8, generator=g),
        "layer.0.weight": torch.randn(8, 8, generator=g),
        "layer.0.bias": torch.randn(8, generator=g),
        "norm.weight": (1 + 0.1 * torch.randn(8, generator=g)).bfloat16(),
        "steps": torch.tensor(3, dtype=torch.int64),
        "head.weight": torch.randn(4, 8, generator=g),
    }


LAST = "head.weight"


def fine_tune(base: Tensors, seed: int) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    return {
        name: (value.float() + 0.05 * torch.randn(value.shape, generator=g)).to(value.dtype)
        if value.is_floating_point()
        else value.clone()
        for name, value in base.items()
    }


def save(path: Path, tensors: Tensors) -> Path:
    with open(path, "wb") as handle:
        write_safetensors(handle, tensors)
    return path


def raw_safetensors(path: Path, tensors: Tensors, edit: Callable[[dict], None]) -> Path:
    """A safetensors file whose header ``edit`` tampers with (data laid out as usual)."""
    header: dict[str, object] = {}
    data = b""
    for name, value in tensors.items():
        raw = value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        code = CODE_BY_DTYPE[value.dtype]
        header[name] = {
            "dtype": code,
            "shape": list(value.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def truncated(path: Path, good: Path, cut: Callable[[int, int], int]) -> Path:
    """``good`` cut to ``cut(header_len, size)`` bytes."""
    data = good.read_bytes()
    path.write_bytes(data[: cut(header_length(good), len(data))])
    return path


# --- the bad inputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """How to make one bad checkpoint, and what the error must say about it."""

    make: Callable[[Path, Tensors, Path], Path]  # (directory, good tensors, good file) -> path
    tensor: str | None  # the tensor the message must name, if any
    reason: str  # a regex the reason must match
    named: str | None = None  # the file named in the message, if not the one returned


def _with(name: str, value: torch.Tensor | None) -> Callable[[Path, Tensors, Path], Path]:
    def make(directory: Path, good: Tensors, _: Path) -> Path:
        tensors = dict(good)
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
        return save(directory / "bad.safetensors", tensors)

    return make


def _poisoned(value: float, suffix: str = ".safetensors") -> Callable[[Path, Tensors, Path], Path]:
    def make(directory: Path, good: Tensors, _: Path) -> Path:
        tensors = dict(good)
        last = tensors[LAST].clone()
        last[-1, -1] = value
        tensors[LAST] = last
        path = directory / f"bad{suffix}"
        if suffix == ".safetensors":
            return save(path, tensors)
        torch.save(tensors, path)
        return path

    return make


def _header(edit: Callable[[dict], None]) -> Callable[[Path, Tensors, Path], Path]:
    return lambda d, good, _: raw_safetensors(d / "bad.safetensors", good, edit)


def _cut(cut: Callable[[int, int], int]) -> Callable[[Path, Tensors, Path], Path]:
    return lambda d, _, good_file: truncated(d / "bad.safetensors", good_file, cut)


def _set(name: str, key: str, value: object) -> Callable[[dict], None]:
    def edit(header: dict) -> None:
        header[name][key] = value

    return edit


def _overlap(header: dict) -> None:
    begin, end = header["layer.0.weight"]["data_offsets"]
    header["layer.0.bias"]["data_offsets"] = [begin + 4, begin + 4 + 8 * 4]


def _past_end(header: dict) -> None:
    begin, end = header[LAST]["data_offsets"]
    header[LAST]["data_offsets"] = [begin + 64, end + 64]


def _pickled(zipped: bool) -> Callable[[Path, Tensors, Path], Path]:
    def make(directory: Path, good: Tensors, _: Path) -> Path:
        path = directory / "model.safetensors"
        torch.save(good, path, _use_new_zipfile_serialization=zipped)
        return path

    return make


def _raw_header(raw: bytes) -> Callable[[Path, Tensors, Path], Path]:
    def make(directory: Path, good: Tensors, _: Path) -> Path:
        path = directory / "bad.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw)
        return path

    return make


def _bad_json(directory: Path, good: Tensors, good_file: Path) -> Path:
    data = bytearray(good_file.read_bytes())
    data[8] = ord("[")  # '{' -> '[': the header no longer parses
    data[9:12] = b"}}}"
    path = directory / "bad.safetensors"
    path.write_bytes(bytes(data))
    return path


def _other_base(directory: Path, good: Tensors, _: Path) -> Path:
    """A model with the same names, shapes and dtypes, from an independent random init."""
    g = torch.Generator().manual_seed(12345)
    other = {
        n: torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v
        for n, v in good.items()
    }
    other["norm.weight"] = (1 + 0.1 * torch.randn(8, generator=g)).bfloat16()
    return save(directory / "other-base.safetensors", other)


def _sharded_with_truncated_shard(directory: Path, good: Tensors, _: Path) -> Path:
    shard_dir = directory / "sharded"
    shard_dir.mkdir()
    names = list(good)
    weight_map = {}
    for i, part in enumerate((names[:3], names[3:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save(shard_dir / shard, {n: good[n] for n in part})
        weight_map.update({n: shard for n in part})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    last_shard = shard_dir / "model-00002-of-00002.safetensors"
    last_shard.write_bytes(last_shard.read_bytes()[:-3])
    return shard_dir


def _lora_nan(directory: Path, good: Tensors, _: Path) -> Path:
    adapter = directory / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4})
    )
    lora_b = torch.ones(4, 2)
    lora_b[0, 0] = float("nan")
    factors = {
        "base_model.model.layer.0.lora_A.weight": torch.ones(2, 8),
        "base_model.model.layer.0.lora_B.weight": torch.ones(8, 2),
        "base_model.model.head.lora_A.weight": torch.ones(2, 8),
        "base_model.model.head.lora_B.weight": lora_b,
    }
    save(adapter / "adapter_model.safetensors", factors)
    return adapter


def _lora_orphan(directory: Path, good: Tensors, _: Path) -> Path:
    adapter = directory / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    save(
        adapter / "adapter_model.safetensors",
        {"base_model.model.head.lora_A.weight": torch.ones(2, 8)},
    )
    return adapter


BAD: dict[str, Bad] = {
    "missing tensor": Bad(_with("layer.0.bias", None), "layer.0.bias", r"missing"),
    "missing last tensor": Bad(_with(LAST, None), LAST, r"missing"),
    "extra tensor": Bad(_with("extra.weight", torch.zeros(3)), "extra.weight", "does not have"),
    "shape mismatch": Bad(
        _with(LAST, torch.zeros(4, 9)), LAST, r"shape \[4, 9\], the base has \[4, 8\]"
    ),
    "0-d for a vector": Bad(
        _with("layer.0.bias", torch.tensor(1.0)), "layer.0.bias", r"shape \[\]"
    ),
    "dtype mismatch": Bad(
        _with(LAST, torch.zeros(4, 8, dtype=torch.float16)), LAST, "dtype F16, the base has F32"
    ),
    "bf16 given as f32": Bad(
        _with("norm.weight", torch.ones(8)), "norm.weight", "dtype F32, the base has BF16"
    ),
    "int buffer as float": Bad(_with("steps", torch.tensor(3.0)), "steps", "dtype F32"),
    "NaN in last tensor": Bad(_poisoned(float("nan")), LAST, "NaN or Inf"),
    "Inf in last tensor": Bad(_poisoned(float("inf")), LAST, "NaN or Inf"),
    "-Inf in last tensor of a .pt": Bad(_poisoned(float("-inf"), ".pt"), LAST, "NaN or Inf"),
    "empty file": Bad(
        lambda d, g, f: truncated(d / "bad.safetensors", f, lambda h, s: 0), None, "truncated"
    ),
    "cut in length prefix": Bad(_cut(lambda h, s: 5), None, "truncated"),
    "cut inside header": Bad(_cut(lambda h, s: 8 + h // 2), None, "truncated"),
    "cut right after header": Bad(_cut(lambda h, s: 8 + h), "embed.weight", "truncated"),
    "cut inside first tensor": Bad(_cut(lambda h, s: 8 + h + 100), "embed.weight", "truncated"),
    "cut inside last tensor": Bad(_cut(lambda h, s: s - 1), LAST, "truncated"),
    "bad JSON": Bad(_bad_json, None, "not valid JSON"),
    "header is an array": Bad(_raw_header(b"[1, 2]"), None, "not a JSON object"),
    "header entry not an object": Bad(
        lambda d, g, f: raw_safetensors(d / "bad.safetensors", {}, lambda h: h.update(x=1)),
        "x",
        "malformed header entry",
    ),
    "offsets overlap": Bad(_header(_overlap), "layer.0.bias", "overlaps .*layer.0.weight"),
    "offsets past end": Bad(_header(_past_end), LAST, "gap of 64 bytes"),
    "unknown dtype": Bad(_header(_set(LAST, "dtype", "F17")), LAST, "unsupported dtype 'F17'"),
    "span disagrees with shape": Bad(_header(_set(LAST, "shape", [4, 7])), LAST, "span"),
    "negative dimension": Bad(_header(_set(LAST, "shape", [-4, -8])), LAST, "malformed shape"),
    "torch zip named .safetensors": Bad(_pickled(True), None, "pickle/zip"),
    "torch legacy named .safetensors": Bad(_pickled(False), None, "pickle/zip"),
    "another base": Bad(_other_base, None, "another base"),
    "sharded, a shard cut short": Bad(
        _sharded_with_truncated_shard,
        LAST,
        "truncated",
        named="sharded/model-00002-of-00002.safetensors",
    ),
    "LoRA factor with NaN": Bad(_lora_nan, LAST, "NaN or Inf"),
    "LoRA factor without partner": Bad(_lora_orphan, None, "without its partner"),
    "no such file": Bad(lambda d, g, f: d / "nowhere.safetensors", None, "no such file"),
}


# --- the durable state before and after ------------------------------------------------------


def snapshot(merger: Merger) -> tuple[dict[str, bytes], dict, dict[str, bytes]]:
    """Every file of the state directory, the manifest as the merger sees it, and its emit."""
    files = {}
    if merger.store.path is not None:
        # the spare is scratch a fold overwrites, not state
        files = {
            p.name: p.read_bytes() for p in sorted(merger.store.path.iterdir()) if p.name != SPARE
        }
    emitted = {
        name: value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        for name, value in merger.emit_state_dict().items()
    }
    return files, json.loads(json.dumps(merger.manifest)), emitted


SETUPS = [
    ("average", "disk"),
    ("opcm", "disk"),
    ("ties", "disk"),
    ("chain(dare(p=0.5), magmax())", "disk"),
    ("average", "memory"),
]


@pytest.fixture(params=SETUPS, ids=[f"{s}-{k}" for s, k in SETUPS])
def folded_once(request, tmp_path: Path) -> Iterator[tuple[Merger, Path, Tensors, Path]]:
    """A merger (durable or in memory) that has folded one good checkpoint already."""
    strategy, kind = request.param
    base = base_tensors()
    base_path = save(tmp_path / "base.safetensors", base)
    state_dir = tmp_path / "state" if kind == "disk" else None
    merger = Merger(base_path, strategy, state_dir)
    merger.fold(save(tmp_path / "good1.safetensors", fine_tune(base, 1)))
    work = tmp_path / "inputs"
    work.mkdir()
    yield merger, base_path, fine_tune(base, 2), work
    merger.close()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_and_leaves_the_state_untouched(folded_once, case: str) -> None:
    merger, base_path, good, work = folded_once
    bad = BAD[case]
    good_file = save(work.parent / "good2.safetensors", good)
    path = bad.make(work, good, good_file)
    before = snapshot(merger)

    with pytest.raises(CheckpointError) as caught:
        merger.fold(path)

    error = caught.value
    message = str(error)
    named = str(work / bad.named) if bad.named else str(path)
    assert named in message, message
    assert error.source.startswith(str(path)), message
    if bad.tensor is not None:
        assert error.tensor == bad.tensor and repr(bad.tensor) in message, message
    assert re.search(bad.reason, error.reason), message

    after = snapshot(merger)
    assert after[0] == before[0], "the state directory changed"
    assert after[1] == before[1], "the manifest changed"
    assert after[2] == before[2], "the merged model changed"

    # the next good checkpoint folds, and the result is as if the bad one never came
    result = merger.fold(good_file)
    assert (result.status, result.index, merger.count) == ("folded", 2, 2)
    reference = Merger(base_path, merger.manifest["strategy"])
    reference.fold(work.parent / "good1.safetensors")
    reference.fold(good_file)
    assert snapshot(merger)[2] == snapshot(reference)[2]
