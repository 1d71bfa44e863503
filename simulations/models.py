"""A small MLP backbone that gets merged, and per-task heads that never are.

Mirrors the CLIP protocol of the continual-merging papers: one shared encoder (merged) plus one
classification head per task (kept outside the merge). The linear weights are 256x784, 256x256
and 64x256: enough rank for OPCM's SVD projection to matter. The 64-d feature layer keeps the
linear probe on pretrained features well below fine-tuning (measured: 128-d probes were within
~5-10 points of fine-tuning, which leaves merging little to recover).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .data import INPUT_DIM
from .heads import cosine_logits

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ModelConfig:
    input_dim: int = INPUT_DIM
    hidden: tuple[int, ...] = (256, 256)
    feature_dim: int = 64

    def to_dict(self) -> dict:
        return asdict(self)


class Backbone(nn.Module):
    """784 -> 256 -> 256 -> 64 MLP; each block is Linear + LayerNorm + GELU."""

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or ModelConfig()
        self.cfg = cfg
        dims = (cfg.input_dim, *cfg.hidden, cfg.feature_dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"fc": nn.Linear(a, b), "norm": nn.LayerNorm(b)})
            for a, b in zip(dims[:-1], dims[1:])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Centre the [0, 1] pixels so inverted domains are a sign flip, not a large offset.
        h = x.flatten(1) * 2.0 - 1.0
        for block in self.blocks:
            h = nn.functional.gelu(block["norm"](block["fc"](h)))
        return h


def make_head(cfg: ModelConfig, num_classes: int) -> nn.Linear:
    return nn.Linear(cfg.feature_dim, num_classes)


def get_state(module: nn.Module) -> StateDict:
    """Detached, contiguous CPU copy of a module's state dict (plain dict, safe to keep)."""
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in module.state_dict().items()}


def set_state(module: nn.Module, state: StateDict) -> nn.Module:
    """Load a state dict strictly (names and shapes must match exactly); returns the module."""
    module.load_state_dict(state, strict=True)
    return module


def backbone_from_state(state: StateDict, cfg: ModelConfig | None = None) -> Backbone:
    return set_state(Backbone(cfg), state).eval()


class CosineHead(nn.Module):
    """A fixed head of unit class embeddings: logits = scale · cos(feature, row) (``heads``)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(features, self.weight)


def head_from_state(state: StateDict, cfg: ModelConfig | None = None) -> nn.Module:
    """A head from its state: ``{weight, bias}`` is a linear probe, ``{weight}`` alone the
    papers' fixed normalised class embeddings (``CosineHead``)."""
    if "bias" not in state:
        return CosineHead(state["weight"]).eval()
    cfg = cfg or ModelConfig()
    return set_state(make_head(cfg, state["weight"].shape[0]), state).eval()
