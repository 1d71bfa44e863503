"""DARE (Yu et al., 2024) as a pre-processor: drop each delta entry with probability p and
rescale the survivors by 1/(1−p). Seeded per (seed, arrival index, tensor), so reruns agree."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from contmerge.strategy import FoldContext, Preprocessor, TensorInfo


@dataclass
class Dare(Preprocessor):
    name = "dare"
    p: float = 0.9
    rescale: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"dare: p must be in [0, 1), got {self.p}")

    def transform(self, info: TensorInfo, delta: Tensor, ctx: FoldContext) -> Tensor:
        keep = (
            torch.rand(delta.shape, generator=ctx.generator(f"{self.seed}:{info.name}")) >= self.p
        )
        kept = delta * keep
        return kept / (1.0 - self.p) if self.rescale else kept
