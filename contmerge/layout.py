"""What the engine knows about each base tensor: shape, dtype, whether it is a linear weight."""

from __future__ import annotations

import re
from collections.abc import Collection

import torch

from .sources import Checkpoint
from .strategy import TensorInfo

# 2-D weights that are not nn.Linear although they look like one (when the source cannot say)
NOT_LINEAR_HINT = re.compile(r"(embed|emb\b|wte|wpe|position|token_type|shared\.weight)", re.I)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half and 8-bit floats are merged in float32 so that sums do not lose the small deltas."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def tensor_infos(
    base: Checkpoint, linear: str | None = None, resolved: Collection[str] | None = None
) -> dict[str, TensorInfo]:
    """Infos for every base tensor, in the base's order.

    Linear weights are known exactly when the base is a module or a transformers directory; a
    regex ``linear`` overrides that; otherwise a 2-D ``*.weight`` that is not named like an
    embedding counts as linear. ``resolved``: the linear weights as found before (a state's
    record of its base), overriding all of that.
    """
    pattern = re.compile(linear) if linear else None
    infos: dict[str, TensorInfo] = {}
    for name, meta in base.meta.items():
        if resolved is not None:
            is_linear = name in resolved
        elif pattern is not None:
            is_linear = bool(pattern.search(name))
        elif base.linear_names is not None:
            is_linear = name in base.linear_names
        else:
            is_linear = name.endswith("weight") and not NOT_LINEAR_HINT.search(name)
        is_linear = is_linear and meta.is_float and len(meta.shape) == 2
        infos[name] = TensorInfo(name, meta, is_linear, compute_dtype(meta.dtype))
    return infos
