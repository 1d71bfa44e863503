"""Synthetic LLaMA-architecture checkpoints: a transformers model directory (config.json, bf16
safetensors shards and their index), written one tensor at a time."""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import base_tensor, variant

from contmerge.tensorfile import SafetensorsWriter, TensorMeta

INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 1024
    layers: int = 14
    intermediate: int = 2816
    vocab: int = 32000
    heads: int = 16

    def metas(self) -> dict[str, TensorMeta]:
        h, f, bf16 = self.hidden, self.intermediate, torch.bfloat16
        metas = {"model.embed_tokens.weight": TensorMeta((self.vocab, h), bf16)}
        for i in range(self.layers):
            block = f"model.layers.{i}"
            metas[f"{block}.input_layernorm.weight"] = TensorMeta((h,), bf16)
            for proj in ("q", "k", "v", "o"):
                metas[f"{block}.self_attn.{proj}_proj.weight"] = TensorMeta((h, h), bf16)
            metas[f"{block}.post_attention_layernorm.weight"] = TensorMeta((h,), bf16)
            metas[f"{block}.mlp.gate_proj.weight"] = TensorMeta((f, h), bf16)
            metas[f"{block}.mlp.up_proj.weight"] = TensorMeta((f, h), bf16)
            metas[f"{block}.mlp.down_proj.weight"] = TensorMeta((h, f), bf16)
        metas["model.norm.weight"] = TensorMeta((h,), bf16)
        metas["lm_head.weight"] = TensorMeta((self.vocab, h), bf16)
        return metas

    def config(self) -> dict[str, object]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }

    @property
    def parameters(self) -> int:
        return sum(m.numel for m in self.metas().values())

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.metas().values())


def write_llama(directory: Path, shape: LlamaShape, index: int, shards: int = 3) -> Path:
    """Variant ``index`` (0: the base) as a model directory of ``shards`` safetensors files."""
    return write_llamas({index: directory}, shape, shards)[index]


def write_llamas(
    directories: dict[int, Path], shape: LlamaShape, shards: int = 3
) -> dict[int, Path]:
    """Several variants (index → directory) written side by side, byte for byte what
    ``write_llama`` writes for each: the base weights, which every variant starts from, are drawn
    once per tensor instead of once per variant (at 3B the draws are most of the writing time)."""
    for directory in directories.values():
        directory.mkdir(parents=True, exist_ok=True)
    metas = shape.metas()
    names = list(metas)
    per_shard = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for s in range(shards):
        part = {n: metas[n] for n in names[s * per_shard : (s + 1) * per_shard]}
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        with ExitStack() as stack:
            writers = {}
            for index, directory in directories.items():
                handle = stack.enter_context(open(directory / file, "wb"))
                writers[index] = SafetensorsWriter(handle, part)
            for name, meta in part.items():
                full = TensorMeta(meta.shape, torch.float32)
                base = base_tensor(name, full)
                for index, writer in writers.items():
                    writer.write(name, variant(base, name, full, index).to(torch.bfloat16))
            for writer in writers.values():
                writer.finish()
        weight_map.update(dict.fromkeys(part, file))
    index_doc = {"metadata": {"total_size": shape.nbytes}, "weight_map": weight_map}
    for directory in directories.values():
        (directory / INDEX).write_text(json.dumps(index_doc, indent=2))
        (directory / "config.json").write_text(json.dumps(shape.config(), indent=2))
    return directories
