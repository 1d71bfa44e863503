"""OPCM's per-layer work at ViT-B/32's layer shapes, FusionBench's way and ours, alternated.

FusionBench's ``opcm_general`` projects each linear layer with a float32 SVD of the merged task
vector taken with ``full_matrices=True``, then forms C = Uᵀ τ V whole and rebuilds the masked
part (its algorithm as the paper states it; ours as ``project_out`` with full matrices). Ours is
``project_out_fast``: a float64 Gram eigendecomposition and half the products. Both on one torch
thread, on the same low-rank-plus-noise matrices (as ``fusionbench_compare.py --size vit-b32``
writes), each timed ``--repeat`` times alternately, the fastest counted; then one ViT-B/32 block
(4 square attention layers, fc1 and fc2) summed. Beside them, the error of ours with the Gram
route in float32 (``float32_gram_projection``), the speed-up the float64 route declines. A minute
or two, where ``fusionbench_compare.py``
takes FusionBench's imports, I/O and the whole merge: this isolates the linear algebra.

    python benchmarks/opcm_layers.py
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor

from contmerge.strategies.opcm import project_out_fast, remove_projection, split_rank

#: (shape, layers of that shape per ViT-B/32 block)
BLOCK = (((768, 768), 4), ((3072, 768), 1), ((768, 3072), 1))


def full_svd_projection(merged: Tensor, delta: Tensor, alpha: float) -> Tensor:
    """τ minus its diagonal and top-left r×r block in the basis of a full-matrices SVD."""
    u, sigma, vh = torch.linalg.svd(merged, full_matrices=True)
    rank = split_rank(sigma, alpha)
    coeffs = u.T @ delta @ vh.T
    mask = torch.eye(*coeffs.shape, dtype=torch.bool)
    mask[:rank, :rank] = True
    return delta - u @ (coeffs * mask) @ vh


def float32_gram_projection(merged: Tensor, delta: Tensor, alpha: float) -> Tensor:
    """Ours with the Gram matrix and its eigendecomposition in float32: the variant the float64
    route is measured against (faster, but squaring σ costs it float32's resolution of the
    small singular values)."""
    if merged.shape[0] < merged.shape[1]:
        return float32_gram_projection(merged.mT, delta.mT, alpha).mT
    _, v = torch.linalg.eigh(merged.mT @ merged)
    v = v.flip(1)
    scaled = merged @ v
    sigma = torch.linalg.vector_norm(scaled, dim=0)
    return remove_projection(scaled / sigma, sigma, v, delta, alpha)


def layer(shape: tuple[int, int], gen: torch.Generator) -> Tensor:
    low = torch.randn(shape[0], 8, generator=gen) @ torch.randn(8, shape[1], generator=gen)
    return 3e-4 * torch.randn(shape, generator=gen) + 2e-4 * low


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Example: python benchmarks/opcm_layers.py"
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per side (3)")
    parser.add_argument("--alpha", type=float, default=0.5, help="OPCM's α (0.5)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    block_theirs = block_ours = 0.0
    for shape, count in BLOCK:
        merged, delta = layer(shape, gen), layer(shape, gen)
        truth = full_svd_projection(merged.double(), delta.double(), args.alpha)
        theirs, ours, gram32 = [], [], []
        for _ in range(args.repeat):
            started = time.perf_counter()
            a = full_svd_projection(merged, delta, args.alpha)
            theirs.append(time.perf_counter() - started)
            started = time.perf_counter()
            b = project_out_fast(merged, delta, args.alpha)
            ours.append(time.perf_counter() - started)
            started = time.perf_counter()
            c = float32_gram_projection(merged, delta, args.alpha)
            gram32.append(time.perf_counter() - started)
        scale = float(truth.abs().max())
        print(
            f"{shape[0]:>5}×{shape[1]:<5} full SVD {min(theirs):7.3f} s  ours {min(ours):7.3f} s  "
            f"full/ours {min(theirs) / min(ours):5.2f}×   max error vs float64, relative: full "
            f"{float((a.double() - truth).abs().max()) / scale:.1e}, ours "
            f"{float((b.double() - truth).abs().max()) / scale:.1e}, float32 Gram "
            f"{float((c.double() - truth).abs().max()) / scale:.1e} ({min(gram32):.3f} s)",
            flush=True,
        )
        block_theirs += count * min(theirs)
        block_ours += count * min(ours)
    print(
        f"one ViT-B/32 block (4 × 768², fc1, fc2): full SVD {block_theirs:.2f} s, ours "
        f"{block_ours:.2f} s: {block_theirs / block_ours:.2f}× (one thread each)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
