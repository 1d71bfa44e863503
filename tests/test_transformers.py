"""Transformers model directories end to end, on the real all-MiniLM-L6-v2.

Fine-tuned copies saved by ``save_pretrained`` (one file and sharded) fold into the base
directory; the emitted directory loads with ``AutoModel.from_pretrained`` and keeps the config
and tokenizer; linear weights are found exactly; a PEFT LoRA adapter folds like
``merge_and_unload``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from contmerge import CheckpointError, Merger, open_checkpoint
from contmerge.cli import main
from contmerge.state import SPARE

transformers = pytest.importorskip("transformers")

TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def linear_weights(model: nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def perturbed(minilm_dir: Path, seed: int, scale: float = 1e-3) -> nn.Module:
    model = transformers.AutoModel.from_pretrained(minilm_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def base_model(minilm_dir: Path) -> nn.Module:
    return transformers.AutoModel.from_pretrained(minilm_dir)


def test_linear_names_of_a_model_directory_are_its_nn_linear_modules(
    minilm_dir: Path, base_model: nn.Module, tmp_path: Path
) -> None:
    expected = linear_weights(base_model)
    assert len(expected) == 6 * 6 + 1  # q, k, v, attention out, intermediate, output; pooler
    with open_checkpoint(minilm_dir) as checkpoint:
        assert checkpoint.config_dir == minilm_dir
        assert checkpoint.linear_names == expected
    # the same through a sharded directory written by transformers
    base_model.save_pretrained(tmp_path / "sharded", max_shard_size="30MB")
    with open_checkpoint(tmp_path / "sharded") as checkpoint:
        assert checkpoint.linear_names == expected
    # and a task model: prefixed names (bert.…) and a classifier head that is a linear too
    config = transformers.AutoConfig.from_pretrained(minilm_dir, num_labels=3)
    task = transformers.BertForSequenceClassification(config)
    task.save_pretrained(tmp_path / "task")
    with open_checkpoint(tmp_path / "task") as checkpoint:
        assert checkpoint.linear_names == linear_weights(task)
        assert "classifier.weight" in checkpoint.linear_names
    with Merger(minilm_dir, "opcm") as merger:  # OPCM projects exactly these
        assert {n for n, i in merger.infos.items() if i.is_linear} == expected


def test_fold_fine_tuned_copies_and_emit_a_loadable_directory(
    minilm_dir: Path, base_model: nn.Module, tmp_path: Path
) -> None:
    arrivals = []
    for seed, shard in ((1, None), (2, "20MB")):
        model = perturbed(minilm_dir, seed)
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(tmp_path / f"ft{seed}", **kwargs)
        arrivals.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert (tmp_path / "ft2" / "model.safetensors.index.json").is_file()
    with Merger(minilm_dir, "average", state_dir=tmp_path / "state") as merger:
        for seed in (1, 2):
            assert merger.fold(tmp_path / f"ft{seed}").status == "folded"
        out = merger.emit(tmp_path / "merged")
    assert out == tmp_path / "merged"
    for name in ("config.json", "model.safetensors", *TOKENIZER_FILES):
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors.index.json").exists()

    loaded = transformers.AutoModel.from_pretrained(out)
    base_state = base_model.state_dict()
    for name, value in loaded.state_dict().items():
        if not value.is_floating_point():
            assert torch.equal(value, base_state[name]), name
            continue
        mean = (arrivals[0][name].double() + arrivals[1][name].double()) / 2
        torch.testing.assert_close(value.double(), mean, rtol=0, atol=1e-6)

    # the directory is a usable model: its own tokenizer, a finite forward pass
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["constant memory merging"], return_tensors="pt")
    with torch.no_grad():
        hidden = loaded(**batch).last_hidden_state
    assert hidden.shape[-1] == 384 and bool(hidden.isfinite().all())


def test_lora_adapter_on_minilm_folds_like_merge_and_unload(
    minilm_dir: Path, tmp_path: Path
) -> None:
    peft = pytest.importorskip("peft")
    model = transformers.AutoModel.from_pretrained(minilm_dir)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["query", "value"],
        modules_to_save=["pooler"],
        rank_pattern={"layer.5.attention.self.value": 4},
    )
    peft_model = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.01 * torch.randn(param.shape, generator=g))
            elif "modules_to_save" in name:
                param.add_(0.01 * torch.randn(param.shape, generator=g))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}

    with open_checkpoint(tmp_path / "adapter", open_checkpoint(minilm_dir).meta) as adapter:
        targets = set(adapter.meta)
        assert len(targets) == 6 * 2 + 2  # 12 LoRA targets, the pooler's weight and bias
        for name in targets:
            delta = adapter.delta(name, base_state[name])
            torch.testing.assert_close(delta, merged[name] - base_state[name])

    with Merger(
        minilm_dir, "task_arithmetic", tmp_path / "state", settings={"scaling_factor": 1.0}
    ) as merger:
        merger.fold(tmp_path / "adapter")
        merger.emit(tmp_path / "merged")
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "merged").state_dict()
    for name, value in loaded.items():
        torch.testing.assert_close(value, merged[name], rtol=1e-5, atol=1e-6)


def _state_files(directory: Path) -> dict[str, bytes]:
    """Every file of a state directory but the spare (scratch a fold overwrites, not state)."""
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.name != SPARE}


def test_a_model_of_another_base_is_refused_and_the_state_kept(
    minilm_dir: Path, tmp_path: Path
) -> None:
    perturbed(minilm_dir, 1).save_pretrained(tmp_path / "ft1")
    config = transformers.AutoConfig.from_pretrained(minilm_dir)
    torch.manual_seed(7)
    transformers.BertModel(config).save_pretrained(tmp_path / "scratch")  # same shapes, new init
    with Merger(minilm_dir, "magmax", state_dir=tmp_path / "state") as merger:
        merger.fold(tmp_path / "ft1")
        files = _state_files(tmp_path / "state")
        with pytest.raises(CheckpointError, match=r"scratch: differs .*another base") as caught:
            merger.fold(tmp_path / "scratch")
        assert caught.value.source == str(tmp_path / "scratch")
        assert _state_files(tmp_path / "state") == files
        assert merger.count == 1


MIXED = {"ft_bf16": (1, torch.bfloat16, "20MB"), "ft_fp16": (2, torch.float16, None)}
MIXED["ft_fp32"] = (3, torch.float32, None)


@pytest.fixture(scope="module")
def mixed_precision(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The fp32 base saved in shards, fine-tunes saved bf16 (sharded), fp16 and fp32 by
    ``save_pretrained``, and their values in float32 (what a merge must see of them)."""
    root = tmp_path_factory.mktemp("mixed")
    base = transformers.AutoModel.from_pretrained(minilm_dir)
    base.save_pretrained(root / "base", max_shard_size="30MB")
    reference = {}
    for name, (seed, dtype, shard) in MIXED.items():
        model = perturbed(minilm_dir, seed).to(dtype)
        model.save_pretrained(root / name, **({"max_shard_size": shard} if shard else {}))
        reference[name] = {k: v.detach().float() for k, v in model.state_dict().items()}
    return root, reference


@pytest.mark.parametrize(
    "strategy",
    ["average", "magmax", pytest.param("ties", marks=pytest.mark.slow)],  # ties: ~60 s
)
def test_mixed_precision_fine_tunes_emit_a_sharded_model_transformers_loads(
    mixed_precision, tmp_path: Path, strategy: str
) -> None:
    root, reference = mixed_precision
    base_dir, out = root / "base", tmp_path / "merged"
    assert (root / "ft_bf16" / "model.safetensors.index.json").is_file()
    args = ["merge", "--quiet", "--base", str(base_dir), "--state", str(tmp_path / "run")]
    args += ["--strategy", strategy, "--out", str(out), *(str(root / n) for n in MIXED)]
    assert main(args) == 0
    manifest = (tmp_path / "run" / "manifest.json").read_text()
    assert [a["dtype"] for a in json.loads(manifest)["arrivals"]] == [
        "BF16",
        "F16",
        "F32",
    ]
    # sharded as the base is, with the same index
    index = (out / "model.safetensors.index.json").read_text()
    assert index.count(".safetensors") > 2
    base_index = (base_dir / "model.safetensors.index.json").read_text()
    assert sorted(json.loads(index)["weight_map"].items()) == sorted(
        json.loads(base_index)["weight_map"].items()
    )
    card = (out / "README.md").read_text()
    for k, (name, dtype) in enumerate(zip(MIXED, ("BF16", "F16", "F32")), 1):
        assert f"| {k} | `{root / name}` | {dtype} | 1 |" in card

    with Merger(base_dir, strategy) as direct:  # the reference: the same values in float32
        for name in MIXED:
            direct.fold(reference[name])
        want = direct.emit_state_dict()
    loaded = transformers.AutoModel.from_pretrained(out)
    for name, value in loaded.state_dict().items():
        if name in want:
            assert value.dtype == torch.float32, name
            assert torch.equal(value, want[name]), name
    if strategy == "average":  # and in bf16 when asked
        emit = ["emit", "--state", str(tmp_path / "run"), "--out", str(tmp_path / "bf16")]
        assert main([*emit, "--out-dtype", "bfloat16"]) == 0
        config = json.loads((tmp_path / "bf16" / "config.json").read_text())
        assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
        half = transformers.AutoModel.from_pretrained(tmp_path / "bf16", dtype="auto")
        assert next(half.parameters()).dtype == torch.bfloat16
        for name, value in half.state_dict().items():
            if name in want and want[name].is_floating_point():
                assert torch.equal(value, want[name].to(torch.bfloat16)), name
