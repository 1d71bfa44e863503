"""Shared pieces of the benchmarks: peak-RSS probes and synthetic checkpoints written lazily.

Synthetic models are generated tensor by tensor from per-tensor seeds, so writing a model of any
size holds one tensor in memory, and an arrival (base + small noise) can be regenerated at any
time without keeping the base around.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from contmerge.tensorfile import SafetensorsWriter, TensorMeta

MiB = 1024 * 1024
GiB = 1024 * MiB


# --- memory probes (Linux /proc) ---------------------------------------------------------------


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    if found is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(found.group(1))


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """VmHWM: the resident high-water mark since start or since ``reset_peak_rss``."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (writing 5 to clear_refs, Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


# --- synthetic models -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A transformer-ish model: ``layers`` blocks of four square linears, a bias, a norm."""

    hidden: int
    layers: int
    embed_rows: int = 0

    def metas(self) -> dict[str, TensorMeta]:
        metas: dict[str, TensorMeta] = {}
        h = self.hidden
        if self.embed_rows:
            metas["embed.weight"] = TensorMeta((self.embed_rows, h), torch.float32)
        for i in range(self.layers):
            for proj in ("q", "k", "v", "o"):
                metas[f"layers.{i}.{proj}.weight"] = TensorMeta((h, h), torch.float32)
            metas[f"layers.{i}.o.bias"] = TensorMeta((h,), torch.float32)
            metas[f"layers.{i}.norm.weight"] = TensorMeta((h,), torch.float32)
        metas["position_ids"] = TensorMeta((512,), torch.int64)
        return metas

    def linear_names(self) -> list[str]:
        return [
            n
            for n, m in self.metas().items()
            if n.endswith(("q.weight", "k.weight", "v.weight", "o.weight"))
        ]

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.metas().values())

    @staticmethod
    def of_size(nbytes: int, hidden: int) -> Layout:
        per_layer = 4 * hidden * hidden * 4
        return Layout(hidden, max(1, round(nbytes / per_layer)))


def _seed(*parts: object) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def base_tensor(name: str, meta: TensorMeta) -> torch.Tensor:
    if not meta.is_float:
        return torch.arange(meta.numel, dtype=meta.dtype).reshape(meta.shape)
    g = torch.Generator().manual_seed(_seed("base", name))
    if name.endswith("norm.weight"):
        return 1 + 0.1 * torch.randn(meta.shape, generator=g)
    return 0.05 * torch.randn(meta.shape, generator=g)


def arrival_tensor(name: str, meta: TensorMeta, index: int) -> torch.Tensor:
    """θ0 + a small deterministic perturbation (index 0 is the base itself)."""
    return variant(base_tensor(name, meta), name, meta, index)


def variant(base: torch.Tensor, name: str, meta: TensorMeta, index: int) -> torch.Tensor:
    """Arrival ``index`` of tensor ``name`` from its base value (a new tensor; base unchanged)."""
    if not index or not meta.is_float:
        return base
    g = torch.Generator().manual_seed(_seed("arrival", index, name))
    return torch.add(base, torch.randn(meta.shape, generator=g), alpha=0.002)


def write_model(path: Path, metas: dict[str, TensorMeta], tensors: Iterator[torch.Tensor]) -> Path:
    """Write tensors one at a time, in the order of ``metas``: memory stays at one tensor."""
    with open(path, "wb") as handle:
        writer = SafetensorsWriter(handle, metas)
        for name, tensor in zip(metas, tensors):
            writer.write(name, tensor)
        writer.finish()
    return path


def write_checkpoint(path: Path, layout: Layout, index: int) -> Path:
    metas = layout.metas()
    return write_model(path, metas, (arrival_tensor(n, m, index) for n, m in metas.items()))


def write_fisher(path: Path, layout: Layout, index: int) -> Path:
    """A positive diagonal Fisher per float tensor (the sidecar ``<stem>.fisher.safetensors``)."""
    metas = {n: m for n, m in layout.metas().items() if m.is_float}

    def tensors() -> Iterator[torch.Tensor]:
        for name, meta in metas.items():
            g = torch.Generator().manual_seed(_seed("fisher", index, name))
            yield torch.rand(meta.shape, generator=g) + 1e-3

    return write_model(path, metas, tensors())


def write_gram(path: Path, layout: Layout, index: int, samples: int = 64) -> Path:
    """XᵀX of random inputs per linear weight (the sidecar ``<stem>.gram.safetensors``)."""
    names = layout.linear_names()
    h = layout.hidden
    metas = {n: TensorMeta((h, h), torch.float32) for n in names}

    def tensors() -> Iterator[torch.Tensor]:
        for name in names:
            g = torch.Generator().manual_seed(_seed("gram", index, name))
            x = torch.randn(samples, h, generator=g)
            yield x.T @ x

    return write_model(path, metas, tensors())


# --- bandwidth reference -------------------------------------------------------------------------


class Memcpy:
    """The reference copy: ``nbytes`` copied with numpy into a preallocated buffer.

    Timed once per call, so a benchmark can interleave it with what it measures: on a shared
    machine memory bandwidth drifts, and a ratio to a copy timed a minute earlier drifts with it.
    """

    def __init__(self, nbytes: int) -> None:
        self.src = np.ones(nbytes // 8, dtype=np.float64)
        self.dst = np.empty_like(self.src)

    def seconds(self) -> float:
        started = time.perf_counter()
        np.copyto(self.dst, self.src)
        return time.perf_counter() - started

    def best(self, repeats: int = 5) -> float:
        return min(self.seconds() for _ in range(repeats))


def human(nbytes: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes / 1024:.0f} KiB"


def cpu_note() -> str:
    load = os.getloadavg()[0]
    return (
        f"{os.cpu_count()} CPUs, load average {load:.1f}, torch threads {torch.get_num_threads()}"
    )
