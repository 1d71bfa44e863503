"""Bad checkpoints are refused with an error naming file, tensor and reason, and change nothing.

For every kind of bad input the fold raises ``CheckpointError``; the durable state directory is
byte-for-byte what it was (manifest and state file, no leftovers), the merger's view of the state
is unchanged, and the next good checkpoint folds as if the bad one had never been offered.
Bad values sit in the *last* tensor, so a fold that committed tensor by tensor would be caught.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from corpus import fine_tune, save

from contmerge import CheckpointError, ContmergeError, Merger, open_checkpoint
from contmerge.cli import main
from contmerge.state import SPARE
from contmerge.tensorfile import (
    CODE_BY_DTYPE,
    DEFAULT_MAX_HEADER_BYTES,
    MAX_HEADER_ENV,
    SafetensorsReader,
    header_limit,
    write_safetensors,
)

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
    # other float dtypes fold as their values (test_dtype_policy.py); float64 would be rounded
    "dtype mismatch": Bad(
        _with(LAST, torch.zeros(4, 8, dtype=torch.float64)), LAST, "dtype F64, the base has F32"
    ),
    "bf16 given as f64": Bad(
        _with("norm.weight", torch.ones(8, dtype=torch.float64)),
        "norm.weight",
        "dtype F64, the base has BF16",
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
    return files, json.loads(json.dumps(merger.manifest.to_json())), emitted


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
    reference = Merger(base_path, merger.manifest.strategy)
    reference.fold(work.parent / "good1.safetensors")
    reference.fold(good_file)
    assert snapshot(merger)[2] == snapshot(reference)[2]


# --- the header, as strictly as the format's reference reader --------------------------------


def raw_file(path: Path, header: str, data: bytes = b"") -> Path:
    """A safetensors file whose header is ``header`` as written (repeated keys and all)."""
    encoded = header.encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def f32(begin: int, end: int) -> str:
    """The JSON of a one-element F32 tensor's entry."""
    return json.dumps({"dtype": "F32", "shape": [1], "data_offsets": [begin, end]})


def obj(*pairs: tuple[str, str]) -> str:
    """A JSON object from (key, JSON value) pairs, as written: a key may repeat."""
    return "{" + ", ".join(f"{json.dumps(key)}: {value}" for key, value in pairs) + "}"


def test_duplicate_tensor_pointing_at_other_bytes_is_named(tmp_path: Path) -> None:
    header = obj(("a", f32(0, 4)), ("b", f32(4, 8)), ("a", f32(4, 8)))
    path = raw_file(tmp_path / "dup.safetensors", header, bytes(8))
    with pytest.raises(CheckpointError) as caught:
        SafetensorsReader(path)
    assert caught.value.tensor == "a"
    assert "listed twice (entries pointing at different data)" in caught.value.reason


def test_identical_duplicate_tensor_is_refused(tmp_path: Path) -> None:
    # the format disallows repeated keys; the reference reader happens to keep the last one
    header = obj(("a", f32(0, 4)), ("a", f32(0, 4)))
    path = raw_file(tmp_path / "dup.safetensors", header, bytes(4))
    with pytest.raises(CheckpointError, match=r"tensor 'a': .*listed twice \(the same entry\)"):
        SafetensorsReader(path)


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ('{"step": 3}', "value of 'step' is not a string"),
        ('{"nested": {"a": "b"}}', "value of 'nested' is not a string"),
        ('{"x": null}', "value of 'x' is not a string"),
        ("[]", "__metadata__ is not a JSON object"),
        ('""', "__metadata__ is not a JSON object"),
        ('{"a": "1", "a": "2"}', "__metadata__ has the key 'a' twice"),
    ],
)
def test_metadata_must_be_a_map_of_strings(tmp_path: Path, metadata: str, reason: str) -> None:
    header = obj(("__metadata__", metadata), ("a", f32(0, 4)))
    path = raw_file(tmp_path / "meta.safetensors", header, bytes(4))
    with pytest.raises(CheckpointError, match=re.escape(reason)):
        SafetensorsReader(path)


def test_null_metadata_and_padding_are_accepted_as_the_reference_reader_does(tmp_path: Path):
    header = " " + obj(("__metadata__", "null"), ("a", f32(0, 4))) + "   "
    path = raw_file(tmp_path / "ok.safetensors", header, struct.pack("<f", 2.5))
    with SafetensorsReader(path) as reader:
        assert reader.metadata == {} and reader.read("a").tolist() == [2.5]


def test_a_text_file_is_refused_without_quoting_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "passwd.safetensors"
    text = b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin\n"
    path.write_bytes(text)
    with pytest.raises(CheckpointError) as caught:
        SafetensorsReader(path)
    reason = caught.value.reason
    assert "not a safetensors file" in reason
    assert f"larger than the file ({len(text)} bytes)" in reason
    # the first 8 bytes read as a length: 3475222254926655346; no digits of it may show
    assert str(struct.unpack("<Q", b"root:x:0")[0]) not in str(caught.value)
    assert not re.search(r"\d{6,}", str(caught.value).replace(str(path), ""))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x00\xff\xfe\x00{}", "not valid UTF-8 (at byte 1)"),
        ('{"a": 1}'.encode("utf-16"), "not valid UTF-8"),  # json.loads would guess UTF-16
        (b'{"__metadata__": {"x": NaN}}', "NaN is not a JSON value"),
        (b'{"a": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 0]}}', "Infinity"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b"]}}", "a number is too long"),
        (b'{"\\ud800": {}}', "a name is not valid Unicode"),
    ],
)
def test_header_that_is_not_strict_json_is_refused_plainly(
    tmp_path: Path, raw: bytes, reason: str
) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError) as caught:
        SafetensorsReader(path)
    assert reason in caught.value.reason
    assert "\\x" not in caught.value.reason and "0xff" not in caught.value.reason


def test_data_after_the_last_tensor_is_refused(tmp_path: Path) -> None:
    # the byte buffer must be fully indexed (no room for a polyglot file's second payload)
    path = raw_file(tmp_path / "tail.safetensors", obj(("a", f32(0, 4))), bytes(12))
    with pytest.raises(CheckpointError, match="8 bytes after the last tensor's data"):
        SafetensorsReader(path)


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ('{"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}', "unsupported dtype"),
        ('{"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}', "malformed shape"),
        ('{"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}', "malformed shape"),
        ('{"dtype": "F32", "shape": [1], "data_offsets": [false, 4]}', "malformed data_offsets"),
        ('{"dtype": "F32", "shape": [0, 9223372036854775808], "data_offsets": [0, 0]}', "shape"),
        ('{"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "dtype": "F16"}', "'dtype' twice"),
    ],
)
def test_malformed_entry_is_named(tmp_path: Path, entry: str, reason: str) -> None:
    path = raw_file(tmp_path / "bad.safetensors", obj(("w", entry)), bytes(4))
    with pytest.raises(CheckpointError) as caught:
        SafetensorsReader(path)
    assert caught.value.tensor == "w" and reason in caught.value.reason, caught.value.reason


def test_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        SafetensorsReader(fifo)  # opening a FIFO for reading blocks until a writer comes


# --- the header's size is bounded --------------------------------------------------------------


def big_header_file(path: Path, header_bytes: int) -> Path:
    """A valid file with one small tensor and a header of about ``header_bytes`` bytes."""
    save(path, {"w": torch.ones(2)})
    with SafetensorsReader(path) as reader:  # grow it through the metadata
        metadata = {"note": "x" * header_bytes}
    with open(path, "wb") as handle:
        write_safetensors(handle, {"w": torch.ones(2)}, metadata)
    assert not reader.metadata
    return path


def test_header_larger_than_the_bound_is_refused_and_the_bound_can_be_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MAX_HEADER_ENV, raising=False)
    assert header_limit() == DEFAULT_MAX_HEADER_BYTES == 16 << 20
    path = big_header_file(tmp_path / "big.safetensors", DEFAULT_MAX_HEADER_BYTES + 1)
    with pytest.raises(CheckpointError) as caught:
        SafetensorsReader(path)
    assert "larger than the 16777216-byte limit" in caught.value.reason
    assert "--max-header-bytes" in caught.value.reason
    with SafetensorsReader(path, max_header_bytes=32 << 20) as reader:
        assert reader.read("w").tolist() == [1.0, 1.0]
    monkeypatch.setenv(MAX_HEADER_ENV, "32M")
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.read("w").tolist() == [1.0, 1.0]
    monkeypatch.setenv(MAX_HEADER_ENV, "1K")
    small = save(tmp_path / "small.safetensors", {"w": torch.ones(2)})
    assert open_checkpoint(small).keys() == ["w"]
    with pytest.raises(CheckpointError, match="larger than the 1024-byte limit"):
        open_checkpoint(path)
    monkeypatch.setenv(MAX_HEADER_ENV, "lots")
    with pytest.raises(ContmergeError, match="not a size in bytes: 'lots'"):
        open_checkpoint(small)


def test_cli_max_header_bytes_option(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = base_tensors()
    base_path = save(tmp_path / "base.safetensors", base)
    arrival = dict(fine_tune(base, 1))
    path = tmp_path / "ft.safetensors"
    with open(path, "wb") as handle:
        write_safetensors(handle, arrival, {"note": "x" * 4096})
    common = ["merge", "--base", str(base_path), "--state", str(tmp_path / "s"), "--quiet"]
    assert main([*common, "--strategy", "average", "--max-header-bytes", "4K", str(path)]) == 1
    assert "larger than the 4096-byte limit" in capsys.readouterr().err
    assert main([*common, "--max-header-bytes", "64K", str(path)]) == 0
    assert "folded as #1" in capsys.readouterr().out
