"""Fixed, normalised classification heads, kept outside the merge (the papers' kind).

The papers merge CLIP image encoders and classify with the text encoder's class embeddings:
fixed, unit-norm rows, cosine logits times a fixed scale (CLIP's learned temperature, 100).
With no text encoder for our tasks, a task's class embeddings are the *pretrained* model's
normalised class-mean features on that task's training data: computed once from θ0, never
trained, never merged, so a merge is judged only by how its features line up with them.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

#: CLIP's logit scale (exp of its learned temperature, clipped at 100)
CLIP_LOGIT_SCALE = 100.0


def class_mean_heads(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """``num_classes × D`` unit rows: the mean of each class's unit-normalised features."""
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"features {tuple(features.shape)} and labels {tuple(labels.shape)}")
    unit = F.normalize(features.double(), dim=1)
    sums = torch.zeros(num_classes, unit.shape[1], dtype=unit.dtype)
    sums.index_add_(0, labels.long(), unit)
    missing = torch.bincount(labels.long(), minlength=num_classes) == 0
    if bool(missing.any()):
        raise ValueError(f"no example of class(es) {missing.nonzero().flatten().tolist()}")
    return F.normalize(sums, dim=1).to(features.dtype)


def cosine_logits(
    features: torch.Tensor, heads: torch.Tensor, scale: float = CLIP_LOGIT_SCALE
) -> torch.Tensor:
    """``scale · cos(feature, head)`` for every class: CLIP's zero-shot logits."""
    return scale * F.normalize(features, dim=-1) @ heads.to(features.dtype).T
