"""Random models shaped like real ones: non-square linears, biases, norms, embeddings, buffers."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from contmerge import Merger

Model = dict[str, torch.Tensor]


def random_base(seed: int = 0, dtype: torch.dtype = torch.float32) -> Model:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    return {
        "embed.weight": rand(20, 12),  # 2-D but an embedding: never projected
        "encoder.0.weight": rand(48, 12),  # non-square linear
        "encoder.0.bias": rand(48),
        "norm.weight": 1 + 0.1 * rand(48),
        "norm.bias": rand(48),
        "encoder.1.weight": rand(16, 48),
        "encoder.1.bias": rand(16),
        "conv.weight": rand(4, 2, 3, 3),
        "bn.running_mean": rand(4),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "position_ids": torch.arange(10, dtype=torch.int64),
    }


def fine_tuned(base: Model, seed: int, scale: float = 0.05, low_rank: bool = True) -> Model:
    """A plausible fine-tune: float tensors move by a small (partly low-rank) delta."""
    g = torch.Generator().manual_seed(1000 + seed)
    out: Model = {}
    for name, value in base.items():
        if not value.is_floating_point():
            out[name] = value.clone()
            continue
        noise = torch.randn(value.shape, generator=g)
        if low_rank and value.dim() == 2:
            a = torch.randn(value.shape[0], 2, generator=g)
            b = torch.randn(2, value.shape[1], generator=g)
            noise = noise + 2 * (a @ b)
        out[name] = (value.to(torch.float64) + scale * noise).to(value.dtype)
    return out


def float_names(model: Model) -> list[str]:
    return [n for n, v in model.items() if v.is_floating_point()]


def whole_norm(model: Model, names: list[str]) -> float:
    return float(torch.sqrt(sum((model[n].double() ** 2).sum() for n in names)))


def write_models(tmp_path: Path, count: int, scale: int = 1) -> tuple[Path, list[Path]]:
    base = random_base()
    if scale > 1:  # larger tensors so a fold takes long enough to be interrupted
        base["encoder.0.weight"] = torch.randn(256 * scale, 512)
        base["encoder.1.weight"] = torch.randn(128, 256 * scale)
        base["encoder.0.bias"] = torch.randn(256 * scale)
        base["norm.weight"] = torch.ones(256 * scale)
        base["norm.bias"] = torch.zeros(256 * scale)
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for seed in range(count):
        path = tmp_path / f"ft{seed}.safetensors"
        save_file(fine_tuned(base, seed), path)
        paths.append(path)
    return tmp_path / "base.safetensors", paths


def merged_after(base: Path, paths: list[Path], strategy: str) -> dict[str, torch.Tensor]:
    with Merger(base, strategy) as merger:
        for path in paths:
            merger.fold(path)
        return merger.emit_state_dict()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_float32_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal names and dtypes, values within a few float32 roundings."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(
            a[name], b[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
