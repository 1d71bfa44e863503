"""Every checkpoint source reads back exactly the tensors that were written.

Real files on disk: safetensors written by contmerge and by the ``safetensors`` package, sharded
directories (by hand and by transformers), torch files (loaded only with ``weights_only``), and
PEFT LoRA adapters, whose delta must equal what ``merge_and_unload`` does to the base.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from contmerge import CheckpointError, Merger, open_checkpoint
from contmerge.server.inbox import sidecar_names
from contmerge.sources import (
    LoraCheckpoint,
    SafetensorsCheckpoint,
    ShardedCheckpoint,
    StateDictCheckpoint,
    TorchFileCheckpoint,
    shard_files,
    sidecar_name,
)
from contmerge.state import SPARE
from contmerge.tensorfile import TensorMeta, write_safetensors


def all_kinds() -> dict[str, torch.Tensor]:
    """One tensor of every dtype and awkward shape the format allows."""
    g = torch.Generator().manual_seed(0)
    return {
        "layer.weight": torch.randn(5, 7, generator=g),
        "f64": torch.randn(3, 4, generator=g, dtype=torch.float64),
        "f16": torch.randn(6, generator=g).half(),
        "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "f8": torch.randn(8, generator=g).to(torch.float8_e4m3fn),
        "i64": torch.randint(-(2**40), 2**40, (9,), generator=g),
        "i32": torch.randint(-(2**30), 2**30, (2, 2), generator=g, dtype=torch.int32),
        "i16": torch.randint(-(2**14), 2**14, (3,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-128, 127, (4,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (4,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(4, 4, generator=g) > 0.5,
        "scalar": torch.tensor(3.5),
        "scalar_i64": torch.tensor(-7, dtype=torch.int64),
        "scalar_bf16": torch.tensor(0.25, dtype=torch.bfloat16),
        "empty": torch.empty(0, 3),
        "empty_bf16": torch.empty(4, 0, dtype=torch.bfloat16),
        "empty_i64": torch.empty(0, dtype=torch.int64),
    }


def assert_identical(got: torch.Tensor, want: torch.Tensor, name: str = "") -> None:
    """Same dtype, shape and bytes (bitwise: NaN payloads, -0.0 and f8 compare exactly)."""
    assert got.dtype == want.dtype, name
    assert tuple(got.shape) == tuple(want.shape), name
    as_bytes = [t.contiguous().reshape(-1).view(torch.uint8) for t in (got, want)]
    assert torch.equal(*as_bytes), name


def assert_reads(checkpoint, tensors: dict[str, torch.Tensor]) -> None:
    assert sorted(checkpoint.keys()) == sorted(tensors)
    for name, want in tensors.items():
        assert checkpoint.meta[name] == TensorMeta.of(want), name
        assert_identical(checkpoint.read(name), want, name)


# --- single safetensors files -------------------------------------------------------------


def test_own_writer_round_trips_every_dtype_and_shape(tmp_path: Path) -> None:
    tensors = all_kinds()
    tensors["special"] = torch.tensor([math.inf, -math.inf, math.nan, -0.0])
    path = tmp_path / "m.safetensors"
    with open(path, "wb") as handle:
        write_safetensors(handle, tensors, {"note": "hi"})
    with open_checkpoint(path) as checkpoint:
        assert isinstance(checkpoint, SafetensorsCheckpoint)
        assert_reads(checkpoint, tensors)
    # and the official reader agrees with what we wrote
    official = load_file(path)
    for name, want in tensors.items():
        assert_identical(official[name], want, name)


def test_reads_files_written_by_the_safetensors_package(tmp_path: Path) -> None:
    tensors = all_kinds()
    path = tmp_path / "official.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "who": "safetensors"})
    with SafetensorsCheckpoint(path) as checkpoint:
        assert_reads(checkpoint, tensors)
        assert checkpoint._reader.metadata == {"format": "pt", "who": "safetensors"}


def test_reads_a_tensor_many_times_into_fresh_memory(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(3)}, path)
    with open_checkpoint(path) as checkpoint:
        first = checkpoint.read("w")
        first.mul_(5)  # the caller owns the buffer: writing to it must not leak into later reads
        assert torch.equal(checkpoint.read("w"), torch.ones(3))


# --- sharded directories ----------------------------------------------------------------------


def write_shards(directory: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, directory / shard)
        weight_map.update({n: shard for n in part})
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_directory_written_by_hand(tmp_path: Path) -> None:
    tensors = all_kinds()
    write_shards(tmp_path / "sharded", tensors, shards=3)
    for given in (tmp_path / "sharded", tmp_path / "sharded" / "model.safetensors.index.json"):
        with open_checkpoint(given) as checkpoint:
            assert isinstance(checkpoint, ShardedCheckpoint)
            assert checkpoint.source == str(tmp_path / "sharded")
            assert checkpoint.config_dir is None  # no config.json: nothing travels with emit
            assert_reads(checkpoint, tensors)


def test_sharded_index_naming_a_missing_shard_or_tensor_is_refused(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(2), "b": torch.zeros(3)}
    write_shards(tmp_path / "d", tensors, shards=2)
    index_path = tmp_path / "d" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["c"] = index["weight_map"]["a"]  # listed, but the shard lacks it
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"tensor 'c'.*missing"):
        open_checkpoint(tmp_path / "d")
    (tmp_path / "d" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.*missing"):
        open_checkpoint(tmp_path / "d")


def test_sharded_directory_written_by_transformers(tmp_path: Path, minilm_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(minilm_dir)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20MB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) >= 3
    expected: dict[str, torch.Tensor] = {}
    for shard in shards:  # what transformers wrote, read by the official reader
        expected.update(load_file(shard))
    with open_checkpoint(tmp_path / "sharded") as checkpoint:
        assert isinstance(checkpoint, ShardedCheckpoint)
        assert checkpoint.config_dir == tmp_path / "sharded"
        assert_reads(checkpoint, expected)
        state = model.state_dict()
        for name in checkpoint.keys():
            assert torch.equal(checkpoint.read(name), state[name]), name


# --- torch files --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "zipped", "wrap"),
    [
        ("m.pt", True, False),
        ("m.bin", False, False),
        ("m.pth", True, True),
        ("m.ckpt", False, True),
    ],
)
def test_torch_files_read_with_weights_only(
    tmp_path: Path, filename: str, zipped: bool, wrap: bool
) -> None:
    tensors = all_kinds()
    if not zipped:
        del tensors["f8"]  # torch's legacy format cannot hold float8 (see the test below)
    payload: object = {"state_dict": tensors, "epoch": 3, "lr": 0.1} if wrap else tensors
    path = tmp_path / filename
    torch.save(payload, path, _use_new_zipfile_serialization=zipped)
    with open_checkpoint(path) as checkpoint:
        assert isinstance(checkpoint, TorchFileCheckpoint)
        assert_reads(checkpoint, tensors)


def test_unreadable_torch_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "f8.bin"
    torch.save(
        {"f8": torch.zeros(2, dtype=torch.float8_e4m3fn)},
        path,
        _use_new_zipfile_serialization=False,
    )  # torch writes it but cannot read it back
    with pytest.raises(CheckpointError, match=r"f8\.bin: not a readable torch file"):
        open_checkpoint(path)
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="not a torch file"):
        open_checkpoint(path)


class WritesAFile:
    """A pickle payload: unpickling it calls ``open(marker, "w")``, which creates the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class Harmless:
    """A custom class: loading it needs this module's code, which weights_only forbids."""

    def __init__(self) -> None:
        self.value = 1


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch.save zip", "torch.save legacy", "raw pickle", "pickle p5"])
def test_pickle_that_needs_code_is_refused_and_nothing_runs(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    payload = {"weight": torch.ones(2), "trap": WritesAFile(marker)}
    if "pickle" in how:  # a raw pickle stores tensors through another global: leave them out
        raw = {"trap": payload["trap"]}
        path.write_bytes(pickle.dumps(raw, protocol=5 if how.endswith("p5") else 2))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=how.endswith("zip"))
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(path)
    assert str(path) in str(caught.value)
    assert caught.value.reason.startswith("refused: this pickle needs code")
    if how != "pickle p5":  # torch's unpickler stops at the protocol-5 opcode before the global
        assert "io.open" in caught.value.reason
    assert not marker.exists(), "the pickle payload was executed"
    # the payload is live: an unsafe load does create the file (so the check above means something)
    if "pickle" in how:
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


def test_torch_file_with_a_custom_class_is_refused_with_a_clear_reason(tmp_path: Path) -> None:
    path = tmp_path / "custom.pt"
    torch.save({"weight": torch.ones(2), "meta": Harmless()}, path)
    with pytest.raises(CheckpointError, match=r"custom\.pt: refused: .*Harmless"):
        open_checkpoint(path)


def test_torch_file_without_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(CheckpointError, match="state dict"):
        open_checkpoint(path)


# --- in-memory sources --------------------------------------------------------------------------


def test_module_source_knows_its_linear_weights() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Embedding(5, 4), nn.Linear(4, 2))
    checkpoint = open_checkpoint(model)
    assert isinstance(checkpoint, StateDictCheckpoint)
    assert checkpoint.linear_names == {"0.weight", "3.weight"}
    assert_reads(checkpoint, {k: v.detach() for k, v in model.state_dict().items()})


def test_state_dict_with_a_non_tensor_value_is_refused() -> None:
    with pytest.raises(CheckpointError, match=r"tensor 'step'.*not a tensor"):
        open_checkpoint({"w": torch.ones(1), "step": 3})


# --- the Merger over every dtype ------------------------------------------------------------------


def test_merger_folds_every_dtype_and_shape_and_keeps_them(tmp_path: Path) -> None:
    base = all_kinds()
    base_path = tmp_path / "base.safetensors"
    save_file(base, base_path)
    arrivals = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        moved = {
            n: (t.double() + 0.01 * torch.randn(t.shape, generator=g, dtype=torch.float64)).to(
                t.dtype
            )
            if t.is_floating_point()
            else t
            for n, t in base.items()
        }
        arrivals.append(moved)
        save_file(moved, tmp_path / f"ft{seed}.safetensors")
    with Merger(base_path, "average", state_dir=tmp_path / "state") as merger:
        for seed in (1, 2):
            assert merger.fold(tmp_path / f"ft{seed}.safetensors").status == "folded"
        merged = merger.emit_state_dict()
        merger.emit(tmp_path / "out.safetensors")
    written = load_file(tmp_path / "out.safetensors")
    for name, want in base.items():
        assert_identical(written[name], merged[name], name)
        assert merged[name].dtype == want.dtype and merged[name].shape == want.shape, name
        if not want.is_floating_point():
            assert_identical(merged[name], want, name)  # integer buffers are not merged
            continue
        mean = (arrivals[0][name].double() + arrivals[1][name].double()) / 2
        # f8 keeps three mantissa bits: the mean is only exact to its rounding
        tol = 0.13 if want.dtype == torch.float8_e4m3fn else 1e-2
        assert torch.allclose(merged[name].double(), mean, atol=tol, rtol=tol), name


# --- PEFT LoRA adapters ---------------------------------------------------------------------


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 12)
        self.conv = Conv1D(10, 12)  # GPT-2's transposed linear: weight is (in, out) = (12, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(torch.relu(self.fc2(torch.relu(self.fc1(x))))))


def make_adapter(tmp_path: Path, safe: bool = True, **config: object):
    """A saved adapter with nonzero B, the base's tensors, and merge_and_unload's tensors."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = SmallNet()
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    model = peft.get_peft_model(base, peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # B starts at zero: make the adapter change something, by as little as a fine-tune
            # does (a change as large as the weights is refused as another base's)
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=g))
            elif "modules_to_save" in name:
                param.add_(0.02 * torch.randn(param.shape, generator=g))
    directory = tmp_path / "adapter"
    model.save_pretrained(directory, safe_serialization=safe)
    merged = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    return directory, base_state, merged


LORA_CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]),
    "rslora": dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], use_rslora=True),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["fc1", "fc2"],
        rank_pattern={"fc2": 2},
        alpha_pattern={"fc2": 3},
    ),
    "fan_in_fan_out": dict(r=3, lora_alpha=6, target_modules=["conv"], fan_in_fan_out=True),
    "modules_to_save": dict(r=2, lora_alpha=4, target_modules=["fc2"], modules_to_save=["head"]),
}


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_delta_equals_merge_and_unload(tmp_path: Path, case: str, safe: bool) -> None:
    directory, base, merged = make_adapter(tmp_path, safe=safe, **LORA_CASES[case])
    base_meta = StateDictCheckpoint(base).meta
    with open_checkpoint(directory, base_meta) as adapter:
        assert isinstance(adapter, LoraCheckpoint)
        assert not adapter.carries_full_weights
        changed = {n for n in base if not torch.equal(merged[n], base[n])}
        assert changed and changed == set(adapter.meta)
        for name, value in base.items():
            delta = adapter.delta(name, value)
            expected = merged[name] - value
            if delta is None:
                assert not expected.any(), name
            else:
                assert delta.shape == value.shape, name
                torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-5)


def test_lora_adapter_folds_into_the_base_like_merge_and_unload(tmp_path: Path) -> None:
    directory, base, merged = make_adapter(tmp_path, **LORA_CASES["modules_to_save"])
    with Merger(
        base, "task_arithmetic", tmp_path / "state", settings={"scaling_factor": 1.0}
    ) as merger:
        merger.fold(directory)
        out = merger.emit_state_dict()
    for name in base:
        torch.testing.assert_close(out[name], merged[name], rtol=1e-5, atol=1e-5)


def test_lora_adapter_needs_a_base_and_matching_targets(tmp_path: Path) -> None:
    directory, base, _ = make_adapter(tmp_path, **LORA_CASES["plain"])
    with pytest.raises(CheckpointError, match="against a base"):
        open_checkpoint(directory)
    other = {k: v for k, v in base.items() if k != "fc2.weight"}
    with pytest.raises(CheckpointError, match=r"tensor 'fc2.weight'.*base lacks"):
        open_checkpoint(directory, StateDictCheckpoint(other).meta)


def test_dora_adapter_is_refused_not_misread(tmp_path: Path) -> None:
    directory, base, _ = make_adapter(
        tmp_path, r=2, lora_alpha=4, target_modules=["fc1"], use_dora=True
    )
    with pytest.raises(CheckpointError, match="DoRA"):
        open_checkpoint(directory, StateDictCheckpoint(base).meta)


# --- hostile sharded indexes ------------------------------------------------------------------


def test_shard_files_lists_the_shards_inside_the_directory(tmp_path: Path) -> None:
    write_shards(tmp_path / "d", {"a": torch.ones(2), "b": torch.zeros(3), "c": torch.ones(1)}, 2)
    (tmp_path / "d" / "link.safetensors").symlink_to("model-00001-of-00002.safetensors")
    index_path = tmp_path / "d" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["c"] = "link.safetensors"  # a symlink that stays inside is fine
    index_path.write_text(json.dumps(index))
    assert shard_files(index_path) == [
        tmp_path / "d" / "link.safetensors",
        tmp_path / "d" / "model-00001-of-00002.safetensors",
        tmp_path / "d" / "model-00002-of-00002.safetensors",
    ]
    with open_checkpoint(tmp_path / "d") as checkpoint:
        assert torch.equal(checkpoint.read("c"), torch.ones(1))


def _outside_shard(tmp_path: Path, how: str) -> Path:
    """A sharded directory whose second shard is a readable safetensors file outside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"b": torch.zeros(3)}, outside / "x.safetensors")
    directory = tmp_path / "ckpt"
    write_shards(directory, {"a": torch.ones(2), "b": torch.zeros(3)}, shards=2)
    shard = {
        "dot-dot": "../outside/x.safetensors",
        "dot-dot inside a path": "sub/../../outside/x.safetensors",
        "absolute": str(outside / "x.safetensors"),
        "symlink out": "link.safetensors",
        "symlinked folder out": "folder/x.safetensors",
        "NUL byte": "x.safetensors\0",
    }[how]
    (directory / "link.safetensors").symlink_to(outside / "x.safetensors")
    (directory / "folder").symlink_to(outside)
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["b"] = shard
    index_path.write_text(json.dumps(index))
    return index_path


@pytest.mark.parametrize(
    "how",
    [
        "dot-dot",
        "dot-dot inside a path",
        "absolute",
        "symlink out",
        "symlinked folder out",
        "NUL byte",
    ],
)
def test_shard_path_leaving_the_directory_is_refused(tmp_path: Path, how: str) -> None:
    index_path = _outside_shard(tmp_path, how)
    for call in (lambda: open_checkpoint(index_path.parent), lambda: shard_files(index_path)):
        with pytest.raises(CheckpointError) as caught:
            call()
        assert caught.value.source == str(index_path)
        assert "shards must lie in its directory" in caught.value.reason


@pytest.mark.parametrize(
    ("index", "reason"),
    [
        ({"weight_map": [["a", "model-00001-of-00002.safetensors"]]}, "weight_map is a list"),
        ({"weight_map": {"a": 1}}, "shard of a tensor is 1"),
        ({"weight_map": {"a": None}}, "shard of a tensor is None"),
        ({"weight_map": {"a": ""}}, "shard of a tensor is ''"),
        ({"weight_map": {}}, "weight_map is empty"),
        ({"metadata": {}}, "weight_map is missing"),
        ([1, 2], "not a JSON object"),
        ("text", "not a JSON object"),
    ],
)
def test_malformed_shard_index_is_a_clean_error(tmp_path: Path, index: object, reason: str):
    write_shards(tmp_path / "d", {"a": torch.ones(2), "b": torch.zeros(3)}, shards=2)
    index_path = tmp_path / "d" / "model.safetensors.index.json"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(reason)) as caught:
        open_checkpoint(tmp_path / "d")
    assert caught.value.source == str(index_path)


def test_shard_index_that_is_not_json_is_a_clean_error(tmp_path: Path) -> None:
    write_shards(tmp_path / "d", {"a": torch.ones(2)}, shards=1)
    index_path = tmp_path / "d" / "model.safetensors.index.json"
    for raw, reason in (
        (b'{"weight_map": {"a": "x", "a": "y"}}', "key 'a' twice"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b'{"weight_map": NaN}', "NaN is not a JSON value"),
        (b"", "not valid JSON"),
    ):
        index_path.write_bytes(raw)
        with pytest.raises(CheckpointError, match=reason) as caught:
            open_checkpoint(tmp_path / "d")
        assert caught.value.source == str(index_path)


# --- hostile LoRA adapters, written by hand ----------------------------------------------------


def lora_base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "fc.weight": torch.randn(8, 6, generator=g),
        "fc.bias": torch.randn(8, generator=g),
        "head.weight": torch.randn(3, 8, generator=g),
    }


def hand_adapter(
    directory: Path,
    config: object,
    factors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """An adapter directory as PEFT saves it: a small, plausible delta on fc and head."""
    g = torch.Generator().manual_seed(1)
    if factors is None:
        factors = {
            "base_model.model.fc.lora_A.weight": 0.1 * torch.randn(2, 6, generator=g),
            "base_model.model.fc.lora_B.weight": 0.1 * torch.randn(8, 2, generator=g),
            "base_model.model.head.lora_A.weight": 0.1 * torch.randn(2, 8, generator=g),
            "base_model.model.head.lora_B.weight": 0.1 * torch.randn(3, 2, generator=g),
        }
    directory.mkdir(parents=True, exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (directory / "adapter_config.json").write_text(text)
    save_file(factors, directory / "adapter_model.safetensors")
    return directory


GOOD_LORA = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["fc", "head"]}


def test_hand_made_adapter_reads_as_b_times_a(tmp_path: Path) -> None:
    directory = hand_adapter(tmp_path / "a", GOOD_LORA)
    base = lora_base()
    with open_checkpoint(directory, StateDictCheckpoint(base).meta) as adapter:
        factors = load_file(directory / "adapter_model.safetensors")
        want = (
            2
            * factors["base_model.model.fc.lora_B.weight"]
            @ factors["base_model.model.fc.lora_A.weight"]
        )
        torch.testing.assert_close(adapter.delta("fc.weight", base["fc.weight"]), want)


LORA_CONFIG_ERRORS = {
    "missing r": ({"lora_alpha": 4}, "no 'r'"),
    "r is text": ({"r": "abc"}, "'r' must be a positive integer"),
    "r is zero": ({"r": 0}, "'r' must be a positive integer"),
    "r is negative": ({"r": -2}, "'r' must be a positive integer"),
    "r is a float": ({"r": 1e6}, "'r' must be a positive integer"),
    "r is true": ({"r": True}, "'r' must be a positive integer"),
    "alpha is text": ({"lora_alpha": "4"}, "'lora_alpha' must be a positive finite number"),
    "alpha is NaN": ({"lora_alpha": "@NaN"}, "NaN is not a JSON value"),
    "alpha is 1e999": ({"lora_alpha": "@1e999"}, "'lora_alpha' must be a positive finite number"),
    "alpha is negative": ({"lora_alpha": -4}, "'lora_alpha' must be"),
    "bad alpha_pattern regex": ({"alpha_pattern": {"fc(": 3}}, "bad regex"),
    "bad rank_pattern regex": ({"rank_pattern": {"[fc": 3}}, "bad regex"),
    "alpha_pattern a list": ({"alpha_pattern": ["fc"]}, "'alpha_pattern' must be an object"),
    "rank_pattern value text": ({"rank_pattern": {"fc": "2"}}, "'rank_pattern' value"),
    "use_rslora text": ({"use_rslora": "false"}, "'use_rslora' must be true or false"),
    "fan_in_fan_out number": ({"fan_in_fan_out": 1}, "'fan_in_fan_out' must be true or false"),
    "peft_type not a string": ({"peft_type": ["LORA"]}, "unsupported PEFT type"),
    "another PEFT type": ({"peft_type": "IA3"}, "unsupported PEFT type 'IA3'"),
}


@pytest.mark.parametrize("case", list(LORA_CONFIG_ERRORS))
def test_bad_lora_config_is_a_clean_error(tmp_path: Path, case: str) -> None:
    edit, reason = LORA_CONFIG_ERRORS[case]
    config = {**GOOD_LORA, **edit}
    if case == "missing r":
        del config["r"]
    # "@text": a value Python's json writes no other way (NaN, a number beyond float's range)
    text = re.sub(r'"@([^"]*)"', r"\1", json.dumps(config))
    directory = hand_adapter(tmp_path / "a", text)
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(directory, StateDictCheckpoint(lora_base()).meta)
    assert caught.value.source == str(directory / "adapter_config.json")
    assert reason in caught.value.reason, caught.value.reason


@pytest.mark.parametrize("config", [[1, 2], "null", '"LORA"', "{", '{"r": 2, "r": 3}'], ids=str)
def test_lora_config_that_is_not_a_json_object_is_a_clean_error(tmp_path: Path, config: object):
    text = json.dumps(config) if isinstance(config, list) else config
    directory = hand_adapter(tmp_path / "a", text)
    with pytest.raises(CheckpointError, match="malformed adapter_config.json") as caught:
        open_checkpoint(directory, StateDictCheckpoint(lora_base()).meta)
    assert caught.value.source == str(directory / "adapter_config.json")


def _factors(**shapes: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """fc's factors with the given shapes (``A``, ``B``), head's left as in hand_adapter."""
    out = {
        "base_model.model.head.lora_A.weight": torch.full((2, 8), 0.01),
        "base_model.model.head.lora_B.weight": torch.full((3, 2), 0.01),
    }
    for part, shape in shapes.items():
        out[f"base_model.model.fc.lora_{part}.weight"] = torch.full(shape, 0.01)
    return out


LORA_FACTOR_ERRORS = {
    # B·A of [1, 6] for an [8, 6] weight: broadcast into every row before
    "product a row": (
        _factors(A=(2, 6), B=(1, 2)),
        r"B·A has shape \[1, 6\], the weight has \[8, 6\]",
    ),
    "product transposed": (_factors(A=(2, 8), B=(6, 2)), r"B·A has shape \[6, 8\]"),
    "ranks disagree": (_factors(A=(2, 6), B=(8, 3)), "lora_A has 2, lora_B 3"),
    "rank 0": (_factors(A=(0, 6), B=(8, 0)), "rank 0"),
    "rank differs from r": (_factors(A=(3, 6), B=(8, 3)), "rank 3, adapter_config.json gives"),
    "3-D factor": (_factors(A=(2, 6, 1), B=(8, 2)), r"shape \[2, 6, 1\]: only linear"),
    "1-D factor": (_factors(A=(12,), B=(8, 2)), "only linear"),
}


@pytest.mark.parametrize("case", list(LORA_FACTOR_ERRORS))
def test_lora_factors_that_do_not_make_the_weight_are_refused_on_opening(
    tmp_path: Path, case: str
) -> None:
    factors, reason = LORA_FACTOR_ERRORS[case]
    directory = hand_adapter(tmp_path / "a", GOOD_LORA, factors)
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(directory, StateDictCheckpoint(lora_base()).meta)
    assert caught.value.tensor == "fc.weight"
    assert caught.value.source == str(directory / "adapter_model.safetensors")
    assert re.search(reason, caught.value.reason), caught.value.reason


def test_lora_factor_of_integers_is_refused(tmp_path: Path) -> None:
    factors = _factors(A=(2, 6), B=(8, 2))
    factors["base_model.model.fc.lora_A.weight"] = torch.ones(2, 6, dtype=torch.int64)
    directory = hand_adapter(tmp_path / "a", GOOD_LORA, factors)
    with pytest.raises(CheckpointError, match=r"lora_A.weight' has dtype I64, not float"):
        open_checkpoint(directory, StateDictCheckpoint(lora_base()).meta)


@pytest.mark.parametrize("strategy", ["average", "opcm", "ties", "magmax", "task_arithmetic"])
def test_lora_adapter_with_an_absurd_scale_is_refused_like_another_base(
    tmp_path: Path, strategy: str
) -> None:
    base = lora_base()
    good = hand_adapter(tmp_path / "good", GOOD_LORA)
    absurd = hand_adapter(tmp_path / "absurd", {**GOOD_LORA, "lora_alpha": 4e4})
    with Merger(base, strategy, tmp_path / "state") as merger:
        assert merger.fold(good).status == "folded"
        before = {p.name: p.read_bytes() for p in (tmp_path / "state").iterdir()}
        with pytest.raises(CheckpointError, match="another base, or scaled absurdly") as caught:
            merger.fold(absurd)
        assert caught.value.source == str(absurd)
        assert merger.count == 1
    after = {p.name: p.read_bytes() for p in (tmp_path / "state").iterdir()}
    assert {k: v for k, v in after.items() if k != SPARE} == {
        k: v for k, v in before.items() if k != SPARE
    }
    # the check is the another-base one: turned off, the same adapter folds
    with Merger(base, strategy, max_relative_delta=None) as merger:
        assert merger.fold(absurd).status == "folded"


# --- torch zip archives that a memory-mapped load would misread --------------------------------


def repack(source: Path, out: Path, edit) -> Path:
    """``source``'s zip records rewritten through ``edit(name, data) -> (data, compression)``."""
    import zipfile

    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(out, "w") as packed:
        for info in archive.infolist():
            data, compression = edit(info.filename, archive.read(info.filename))
            packed.writestr(zipfile.ZipInfo(info.filename), data, compress_type=compression)
    return out


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("data record compressed", "'good/data/0' is compressed"),  # a bomb: 200 MB of zeros
        ("pickle compressed", "'good/data.pkl' is compressed"),
        (
            "data record cut short",
            "tensor 'w': its data needs 64 bytes, it has a zip record of 8 bytes",
        ),
    ],
)
def test_torch_zip_records_are_checked_before_they_are_mapped(
    tmp_path: Path, case: str, reason: str
) -> None:
    import zipfile

    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(4, 4)}, good)

    def edit(name: str, data: bytes) -> tuple[bytes, int]:
        if case == "data record compressed" and name.endswith("data/0"):
            return bytes(200 << 20), zipfile.ZIP_DEFLATED
        if case == "pickle compressed" and name.endswith("data.pkl"):
            return data, zipfile.ZIP_DEFLATED
        if case == "data record cut short" and name.endswith("data/0"):
            return data[:8], zipfile.ZIP_STORED
        return data, zipfile.ZIP_STORED

    path = repack(good, tmp_path / "bad.pt", edit)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(CheckpointError, match=re.escape(reason)) as caught:
        open_checkpoint(path)
    assert caught.value.source == str(path)
    # a repacked file that changes nothing still loads
    same = repack(good, tmp_path / "same.pt", lambda n, d: (d, zipfile.ZIP_STORED))
    assert torch.equal(open_checkpoint(same).read("w"), torch.ones(4, 4))


@pytest.mark.parametrize(
    "name, sidecar",
    [
        ("model.safetensors", "model.fisher.safetensors"),
        ("run.3.safetensors", "run.3.fisher.safetensors"),  # only the last suffix goes
        ("model.pt", "model.fisher.safetensors"),
        ("model", "model.fisher.safetensors"),  # a model directory
    ],
)
def test_one_sidecar_rule_for_the_api_and_the_inbox(name: str, sidecar: str) -> None:
    assert sidecar_name(name, "fisher") == sidecar
    assert sidecar_names(name, ["fisher", "gram"]) == [sidecar, sidecar.replace("fisher", "gram")]
