"""DARE (Yu et al., 2024) as a pre-processor: drop each delta entry with probability p and
rescale the survivors by 1/(1−p).

Each entry's coin is a hash (SplitMix64's finaliser) of its position under a key drawn from
(seed, arrival index, tensor name): reruns agree, entries are independent, and the mask is the
same whether a tensor is transformed whole or chunk by chunk on several threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from contmerge.kernels import kernel
from contmerge.strategy import EntryTransform, FoldContext, Preprocessor, TensorInfo, setting


@dataclass
class Dare(Preprocessor):
    """DARE (Yu et al. 2024), a pre-processor: drop each delta entry with probability p and
    rescale the survivors by 1/(1−p)."""

    name = "dare"
    elementwise = True
    p: float = setting(0.9, "probability of dropping each delta entry, in [0, 1)")
    rescale: bool = setting(True, "divide the kept entries by 1−p (False: keep them as they are)")
    seed: int = setting(0, "seed of the drop mask (mixed with the arrival index and tensor name)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"dare: p must be in [0, 1), got {self.p}")

    def transform(self, info: TensorInfo, delta: Tensor, ctx: FoldContext) -> Tensor:
        kept = delta.detach().clone().contiguous()
        self.transform_into(info, kept.view(-1).numpy(), ctx, 0)
        return kept

    def entry_transform(self, info: TensorInfo, ctx: FoldContext) -> EntryTransform:
        keep = 1.0 - self.p
        return EntryTransform(
            _drop_and_rescale,
            (
                np.uint64(ctx.key(f"{self.seed}:{info.name}")),
                np.uint64(min(int(self.p * 2.0**64), 2**64 - 1)),  # drop where the hash is below
                info.scalar(keep if self.rescale else 1.0),
                info.scalar(0.0),  # a float literal would make the result float64
            ),
        )


@kernel
def _drop_and_rescale(delta: Any, position: np.uint64, params: tuple[Any, ...]) -> Any:
    key, below, keep, zero = params
    z = key + position * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return zero if z < below else delta / keep
