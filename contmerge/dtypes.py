"""The dtype policy: which arrival dtypes fold into a base, and which dtype a merge is emitted in.

Float tensors are merged in float32, or in float64 where the base is float64
(``layout.compute_dtype``). An arrival's float tensor may come in any float dtype whose every
value the compute dtype holds exactly: bfloat16, float16, 8-bit floats and float32 into a
float32 computation (a bf16 or fp16 ``save_pretrained`` of an fp32 base, or an fp32 checkpoint
of a bf16 base), anything into a float64 one. Refused, because a value would change silently:
a float64 arrival into a float32 computation (its values would be rounded), a float arrival
where the base has integers or booleans, an integer arrival where the base has floats, and an
integer tensor of another width than the base's. The merged model is written in the base's
dtype unless another is asked for (``--out-dtype``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .errors import SettingError
from .tensorfile import CODE_BY_DTYPE, TensorMeta

#: names accepted by ``--out-dtype`` (safetensors codes, torch names and the usual short ones)
OUT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "f64": torch.float64,
}


def code(dtype: torch.dtype) -> str:
    """The safetensors name of a dtype (``F32``, ``BF16``…)."""
    return CODE_BY_DTYPE[dtype]


def parse_out_dtype(text: str | torch.dtype | None) -> torch.dtype | None:
    """``--out-dtype``'s value as a float dtype; None (or "base") keeps the base's dtypes."""
    if text is None or isinstance(text, torch.dtype):
        if isinstance(text, torch.dtype) and not text.is_floating_point:
            raise SettingError(f"out dtype {text} is not a float dtype")
        return text
    key = text.strip().lower()
    if key == "base":
        return None
    if key not in OUT_DTYPES:
        raise SettingError(
            f"unknown out dtype {text!r}: one of base, float32 (fp32), bfloat16 (bf16), "
            "float16 (fp16), float64 (fp64)"
        )
    return OUT_DTYPES[key]


def arrival_dtype_problem(arrival: torch.dtype, base: torch.dtype, compute: torch.dtype) -> str:
    """Why an arrival's tensor of dtype ``arrival`` cannot fold into the base's (``base``,
    merged in ``compute``), or "" when it can."""
    if arrival == base:
        return ""
    has = f"dtype {code(arrival)}, the base has {code(base)}"
    if not base.is_floating_point:
        return (
            f"{has}: integer and boolean tensors are not merged and must keep the base's dtype "
            "(a conversion would change their values)"
        )
    if not arrival.is_floating_point:
        return f"{has}: an integer or boolean tensor cannot stand for float weights"
    if compute != torch.float64 and arrival == torch.float64:
        return (
            f"{has}: this base is merged in {code(compute)}, which would round float64 values "
            "silently; save the checkpoint in float32 (e.g. model.float()) or merge into a "
            "float64 base"
        )
    return ""


def dtype_summary(metas: Iterable[TensorMeta]) -> str:
    """The float dtypes of a checkpoint's tensors as the manifest records them: ``BF16``, or
    ``BF16+F32`` when it mixes them (integer buffers are not merged: not counted)."""
    codes = sorted({code(m.dtype) for m in metas if m.is_float})
    return "+".join(codes) if codes else "none"
