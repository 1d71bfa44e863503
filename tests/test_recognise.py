"""``sources.recognise``: what a path is, told once for every door. A table over real files
made here (each kind, each refusal), then the same directories offered to each door: the API
(``open_checkpoint``), the server's inbox, DIMAT and FW-Merging tell them apart alike."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from contmerge.errors import CheckpointError
from contmerge.server.inbox import Refused, inspect_entry
from contmerge.sources import Incomplete, ShardPathError, open_checkpoint, recognise
from contmerge.strategies.dimat import Layout, load_source
from contmerge.strategies.frank_wolfe import FrankWolfeMerger

TENSORS = {"layer.weight": torch.arange(12.0).reshape(3, 4), "layer.bias": torch.ones(3)}
LORA_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["layer"]}
Make = Callable[[Path], Path]


def model_file(name: str) -> Make:
    def make(root: Path) -> Path:
        save_file(TENSORS, root / name)
        return root / name

    return make


def torch_file(name: str) -> Make:
    def make(root: Path) -> Path:
        torch.save(TENSORS, root / name)
        return root / name

    return make


def directory(*files: tuple[str, Callable[[Path], None]]) -> Make:
    def make(root: Path) -> Path:
        folder = root / "model"
        folder.mkdir()
        for name, write in files:
            write(folder / name)
        return folder

    return make


def safetensors_at(path: Path) -> None:
    save_file(TENSORS, path)


def torch_at(path: Path) -> None:
    torch.save(TENSORS, path)


def json_at(value: object) -> Callable[[Path], None]:
    return lambda path: path.write_text(json.dumps(value))


def adapter_at(path: Path) -> None:
    save_file(
        {
            "base_model.model.layer.lora_A.weight": torch.ones(2, 4),
            "base_model.model.layer.lora_B.weight": torch.ones(3, 2),
        },
        path,
    )


def shards(*present: int) -> list[tuple[str, Callable[[Path], None]]]:
    """A two-shard checkpoint's index and the shards numbered in ``present``."""
    names = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    parts = [{"layer.weight": TENSORS["layer.weight"]}, {"layer.bias": TENSORS["layer.bias"]}]
    weight_map = {n: names[i] for i, part in enumerate(parts) for n in part}
    files: list[tuple[str, Callable[[Path], None]]] = [
        ("model.safetensors.index.json", json_at({"weight_map": weight_map}))
    ]
    for i in present:
        files.append((names[i - 1], lambda p, part=parts[i - 1]: save_file(part, p)))
    return files


def cut(make: Make, keep: Callable[[int], int]) -> Make:
    def made(root: Path) -> Path:
        path = make(root)
        data = path.read_bytes()
        path.write_bytes(data[: keep(len(data))])
        return path

    return made


def header_length(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


#: name -> (how it is made, what recognise says: (kind, a directory, its config dir travels))
KINDS: dict[str, tuple[Make, tuple[str, bool, bool]]] = {
    "safetensors file": (model_file("ft.safetensors"), ("safetensors", False, False)),
    "safetensors file of another suffix": (model_file("ft.st"), ("safetensors", False, False)),
    "torch file": (torch_file("ft.bin"), ("torch", False, False)),
    "torch .pt file": (torch_file("ft.pt"), ("torch", False, False)),
    "sharded directory": (directory(*shards(1, 2)), ("sharded", True, False)),
    "shard index given itself": (
        lambda root: directory(*shards(1, 2))(root) / "model.safetensors.index.json",
        ("sharded", False, False),
    ),
    "model directory": (
        directory(("model.safetensors", safetensors_at), ("config.json", json_at({}))),
        ("safetensors", True, True),
    ),
    "model directory of torch weights": (
        directory(("pytorch_model.bin", torch_at)),
        ("torch", True, False),
    ),
    "model directory in both formats": (
        directory(("model.safetensors", safetensors_at), ("pytorch_model.bin", torch_at)),
        ("safetensors", True, False),
    ),
    "sharded model directory": (
        directory(*shards(1, 2), ("config.json", json_at({}))),
        ("sharded", True, True),
    ),
    "PEFT LoRA adapter": (
        directory(
            ("adapter_config.json", json_at(LORA_CONFIG)), ("adapter_model.safetensors", adapter_at)
        ),
        ("lora", True, False),
    ),
}

PICKLE = "pickle/zip \\(torch.save\\) file, not safetensors"
TWO_KINDS = "two kinds in one directory"
#: name -> (how it is made, the error's type, its message, the file it names relative to tmp)
REFUSALS: dict[str, tuple[Make, type[CheckpointError], str, str]] = {
    "pickle named .safetensors": (
        torch_file("ft.safetensors"),
        CheckpointError,
        PICKLE,
        "ft.safetensors",
    ),
    "pickle as a directory's model.safetensors": (
        directory(("model.safetensors", torch_at)),
        CheckpointError,
        PICKLE,
        "model/model.safetensors",
    ),
    "pickle as an adapter's weights": (
        directory(
            ("adapter_config.json", json_at(LORA_CONFIG)), ("adapter_model.safetensors", torch_at)
        ),
        CheckpointError,
        PICKLE,
        "model/adapter_model.safetensors",
    ),
    "safetensors cut in its header": (
        cut(model_file("ft.safetensors"), lambda n: 20),
        CheckpointError,
        "truncated, or not a safetensors file",
        "ft.safetensors",
    ),
    "safetensors cut before its header length": (
        cut(model_file("ft.safetensors"), lambda n: 5),
        CheckpointError,
        "truncated: 5 bytes is too short",
        "ft.safetensors",
    ),
    "empty directory": (directory(), Incomplete, "directory holds none of", "model"),
    "config only": (directory(("config.json", json_at({}))), Incomplete, "holds none of", "model"),
    "adapter and model weights": (
        directory(
            ("adapter_config.json", json_at(LORA_CONFIG)), ("model.safetensors", safetensors_at)
        ),
        CheckpointError,
        TWO_KINDS,
        "model",
    ),
    "shard index and model.safetensors": (
        directory(*shards(1, 2), ("model.safetensors", safetensors_at)),
        CheckpointError,
        TWO_KINDS,
        "model",
    ),
    "adapter config without its weights": (
        directory(("adapter_config.json", json_at(LORA_CONFIG))),
        Incomplete,
        "adapter_config.json without adapter_model.safetensors or adapter_model.bin",
        "model",
    ),
    "adapter weights without their config": (
        directory(("adapter_model.safetensors", adapter_at)),
        Incomplete,
        "adapter_model.safetensors without its adapter_config.json",
        "model",
    ),
    "a shard not there yet": (
        directory(*shards(1)),
        Incomplete,
        "shard listed in the index is missing",
        "model/model-00002-of-00002.safetensors",
    ),
    "shard outside the directory": (
        directory(
            ("model.safetensors.index.json", json_at({"weight_map": {"a": "../x.safetensors"}}))
        ),
        ShardPathError,
        "shards must lie in its directory",
        "model/model.safetensors.index.json",
    ),
    "sharded .bin checkpoint": (
        directory(("pytorch_model.bin.index.json", json_at({"weight_map": {}}))),
        CheckpointError,
        "sharded .bin checkpoints are not supported",
        "model",
    ),
    "model.safetensors a directory": (
        directory(("model.safetensors", lambda p: p.mkdir())),
        CheckpointError,
        "not a regular file \\(a directory\\)",
        "model/model.safetensors",
    ),
    "nothing there": (
        lambda root: root / "gone.safetensors",
        CheckpointError,
        "no such file",
        "gone.safetensors",
    ),
}


@pytest.mark.parametrize("name", KINDS)
def test_each_kind_is_recognised_and_opens_as_it_says(tmp_path: Path, name: str) -> None:
    make, (kind, is_directory, travels) = KINDS[name]
    path = make(tmp_path)
    found = recognise(path)
    assert (found.kind, found.directory, found.config_dir is not None) == (
        kind,
        is_directory,
        travels,
    )
    assert found.full_weights == (kind != "lora") and found.weights.is_file()
    assert found.describe().startswith("a ")
    base = {n: t.clone() for n, t in TENSORS.items()}
    with open_checkpoint(path, open_checkpoint(base).meta) as checkpoint:
        assert checkpoint.carries_full_weights == found.full_weights
        assert checkpoint.config_dir == found.config_dir
        if found.full_weights:
            assert {n: checkpoint.read(n) for n in checkpoint.meta}.keys() == TENSORS.keys()
            for n, t in TENSORS.items():
                assert torch.equal(checkpoint.read(n), t)


@pytest.mark.parametrize("name", REFUSALS)
def test_each_refusal_names_the_path_and_why(tmp_path: Path, name: str) -> None:
    make, kind, reason, named = REFUSALS[name]
    path = make(tmp_path)
    with pytest.raises(kind, match=reason) as caught:
        recognise(path)
    assert caught.value.source == str(tmp_path / named)
    with pytest.raises(kind, match=reason):  # opening tells it as recognise does
        open_checkpoint(path, open_checkpoint(TENSORS).meta)


def test_a_file_cut_in_its_data_is_recognised_and_refused_on_opening(tmp_path: Path) -> None:
    path = cut(model_file("ft.safetensors"), lambda n: n - 4)(tmp_path)
    assert recognise(path).kind == "safetensors"  # its header is whole: only its data is short
    with pytest.raises(CheckpointError, match="truncated|beyond|past the end"):
        open_checkpoint(path)


def _fw(tmp_path: Path) -> FrankWolfeMerger:
    save_file(TENSORS, tmp_path / "base.safetensors")
    return FrankWolfeMerger(tmp_path / "base.safetensors", [], None, work_dir=tmp_path / "fw")  # type: ignore[arg-type]


DOOR_CASES = [
    "model directory",
    "model directory of torch weights",
    "sharded model directory",
    "pickle as a directory's model.safetensors",
    "adapter and model weights",
    "shard index and model.safetensors",
    "empty directory",
    "a shard not there yet",
    "sharded .bin checkpoint",
]


@pytest.mark.parametrize("name", DOOR_CASES)
def test_every_door_recognises_the_same_directory_alike(tmp_path: Path, name: str) -> None:
    make = KINDS[name][0] if name in KINDS else REFUSALS[name][0]
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    path = make(inbox)
    try:
        recognise(path)
    except CheckpointError as exc:
        expected: CheckpointError | None = exc
    else:
        expected = None
    fw = _fw(tmp_path)
    doors: dict[str, Callable[[], object]] = {
        "open_checkpoint": lambda: open_checkpoint(path).close(),
        "dimat": lambda: load_source(path),
        "fw": lambda: fw.add(path),
    }
    for door, offer in doors.items():
        if expected is None:
            offer()
            continue
        with pytest.raises(type(expected)) as caught:
            offer()
        assert str(caught.value) == str(expected), door
    # the inbox waits for an incomplete directory, naming what it lacks; takes any other one,
    # once settled, to the fold, which refuses it with the reason above
    signature, waiting = inspect_entry(path, inbox)
    if isinstance(expected, Incomplete):
        assert signature is None and waiting is not None and expected.reason in waiting
    else:
        assert signature is not None and waiting is None
    fw.close()


def test_the_inbox_refuses_a_shard_outside_as_it_is(tmp_path: Path) -> None:
    path = REFUSALS["shard outside the directory"][0](tmp_path)
    with pytest.raises(Refused, match="shards must lie in its directory"):
        inspect_entry(path, tmp_path)


def test_dimat_and_fw_refuse_an_adapter_and_a_misfit_alike(tmp_path: Path) -> None:
    adapter = KINDS["PEFT LoRA adapter"][0](tmp_path)
    fw = _fw(tmp_path)
    for offer in (lambda: load_source(adapter), lambda: fw.add(adapter)):
        with pytest.raises(CheckpointError, match="a LoRA adapter carries only a change"):
            offer()
    misfit = tmp_path / "misfit.safetensors"
    save_file({**TENSORS, "layer.bias": torch.ones(4)}, misfit)
    layout = Layout.of(TENSORS)
    messages = []
    for offer in (lambda: load_source(misfit, layout), lambda: fw.add(misfit)):
        with pytest.raises(CheckpointError, match=r"shape \[4\], the base has \[3\]") as caught:
            offer()
        messages.append(str(caught.value))
    assert messages[0] == messages[1]  # one rule (contmerge.checks), one message
    fw.close()
