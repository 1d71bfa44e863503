"""Fixed normalised heads: unit rows at the class means, cosine logits at CLIP's scale."""

from __future__ import annotations

import pytest
import torch

from contmerge.simulations.heads import CLIP_LOGIT_SCALE, class_mean_heads, cosine_logits


def test_heads_are_unit_class_means_and_classify_separable_data() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 5) * 4
    labels = torch.arange(3).repeat_interleave(20)
    features = centres[labels] + 0.3 * torch.randn(60, 5, generator=gen)
    heads = class_mean_heads(features, labels, 3)
    assert torch.allclose(heads.norm(dim=1), torch.ones(3), atol=1e-6)
    assert torch.equal(heads.argmax(dim=1), torch.arange(3))
    logits = cosine_logits(features, heads)
    assert float(logits.abs().max()) <= CLIP_LOGIT_SCALE + 1e-4
    assert torch.equal(logits.argmax(dim=1), labels)
    # scaling a feature does not change its logits: only its direction counts
    assert torch.allclose(cosine_logits(7 * features, heads), logits, atol=1e-4)


def test_a_class_without_examples_is_refused() -> None:
    with pytest.raises(ValueError, match=r"class\(es\) \[2\]"):
        class_mean_heads(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), 3)
