"""TIES' deferred fold (state in memory): every column outside its threshold windows folded in
the one pass, the rest settled at the end; held to the torch reference bit for bit, on the
inputs that would expose a wrong threshold or a wrong majority sign, and on the fallback when
the windows miss or too many columns wait."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import contmerge.elementwise
import contmerge.strategies.ties as ties
from contmerge import Merger
from contmerge.hashing import LEAF_BYTES
from contmerge.kth import KthSmallestAbs
from contmerge.strategies.ties import ContinualTies
from contmerge.strategy import FoldContext, TensorInfo
from contmerge.tensorfile import TensorMeta

from helpers import fine_tuned

N = 60_000
CHUNK = 7_001  # ragged chunks, none a multiple of 8 (the tally's word loop and its tail)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int32)


def exact_threshold(values: np.ndarray, k: int) -> float:
    """The k-th smallest |x| by the radix select the ordinary passes use."""
    row = KthSmallestAbs(k)
    while not row.done:
        row.update_array(values)
        row.next_digit()
    return row.value


def inputs(case: str) -> tuple[np.ndarray, np.ndarray]:
    """(merged task vector, δ) of one column each, float32."""
    g = np.random.default_rng(7)
    old = g.standard_normal(N).astype(np.float32)
    delta = g.standard_normal(N).astype(np.float32)
    if case == "equal magnitudes":  # the k-th shared by thousands of entries: ≥ keeps all
        old = g.choice(np.float32([-2, -1, -0.5, 0, 0.5, 1, 2]), N)
        delta = g.choice(np.float32([-3, -1, 1, 3]), N)
    elif case == "cancelling":  # kept entries that sum to 0: the majority sign decides
        delta[::3] = -old[::3]
    elif case == "zeros":
        old[:] = 0.0
        delta[: N // 2] = 0.0
        delta[N // 2 : N // 2 + 100] = -0.0
    return old, delta


def reference(rule: ContinualTies, old: np.ndarray, delta: np.ndarray, k: int):
    """Thresholds, majority sign and new state by the ordinary passes and the torch fold."""
    t = (exact_threshold(old, k), exact_threshold(delta, k))
    s = old * (np.abs(old) >= t[0]) + delta * (np.abs(delta) >= t[1])
    majority = float(np.sign(int(np.count_nonzero(s > 0)) - int(np.count_nonzero(s < 0))))
    info = TensorInfo("w", TensorMeta((N,), torch.float32), False, torch.float32)
    ctx = FoldContext(index=2, globals={}, stats={"thresholds": t, "majority_sign": majority})
    state = {"value": torch.from_numpy(old)}
    new = rule.fold(info, state, torch.from_numpy(delta), torch.zeros(N), ctx)["value"]
    return t, majority, new


def windows_around(values: np.ndarray, k: int, width: float) -> tuple[float, float]:
    """A window of magnitudes holding the k-th smallest, ``width`` of the ranks either side."""
    magnitudes = np.sort(np.abs(values))
    lo = magnitudes[max(int(k - width * N), 0)]
    hi = magnitudes[min(int(k + width * N), N - 1)]
    return float(lo), float(hi)


@pytest.mark.parametrize("merge_func", ["sum", "mean"])
@pytest.mark.parametrize("case", ["random", "equal magnitudes", "cancelling", "zeros"])
def test_deferred_fold_settles_to_the_reference_bit_for_bit(case, merge_func) -> None:
    rule = ContinualTies(merge_func=merge_func)
    old, delta = inputs(case)
    base = np.linspace(-1, 1, N, dtype=np.float32)
    x = base + delta
    delta = x - base  # δ as the fold differences it
    k = N - int(N * rule.threshold / 100)
    thresholds, majority, want = reference(rule, old, delta, k)
    windows = [windows_around(old, k, 0.01), windows_around(delta, k, 0.01)]
    deferred = ties._Deferred(rule, k, windows)
    info = TensorInfo("w", TensorMeta((N,), torch.float32), False, torch.float32)
    fold = deferred.chunk(info)
    out = np.full(N, np.nan, np.float32)
    for a in range(0, N, CHUNK):
        b = min(a + CHUNK, N)
        fold(a, x[a:b], base[a:b], old[a:b], out[a:b])
    ctx = FoldContext(index=2, globals={})
    assert deferred.settle(ctx) == []
    assert ctx.stats["thresholds"] == thresholds
    assert ctx.stats["majority_sign"] == majority
    assert torch.equal(bits(torch.from_numpy(out)), bits(want))


def test_deferred_fold_gives_up_when_the_window_misses_the_kth() -> None:
    rule = ContinualTies()
    old, delta = inputs("random")
    k = N - int(N * rule.threshold / 100)
    t = exact_threshold(delta, k)
    windows = [windows_around(old, k, 0.01), (t * 1.5, t * 2.0)]  # δ's k-th is below it
    deferred = ties._Deferred(rule, k, windows)
    info = TensorInfo("w", TensorMeta((N,), torch.float32), False, torch.float32)
    out = np.empty(N, np.float32)
    deferred.chunk(info)(0, delta, np.zeros(N, np.float32), old, out)
    assert deferred.settle(FoldContext(index=2, globals={})) is None


def model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(700, 900, generator=g),  # several 1 MiB chunks
        "layer.bias": torch.randn(700, generator=g),
        "head.weight": torch.randn(300, 700, generator=g),
    }


def save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def reference_rule() -> ContinualTies:
    """TIES on its per-tensor path: the ordinary passes and the torch fold."""
    whole = type("WholeTies", (ContinualTies,), {"elementwise": False, "defers": False})
    return whole()


def settled(monkeypatch) -> list[bool]:
    """Whether each deferred fold settled (False: it fell back), recorded from the real one."""
    outcomes: list[bool] = []
    settle = ties._Deferred.settle

    def recording(self, ctx):
        result = settle(self, ctx)
        outcomes.append(result is not None)
        return result

    monkeypatch.setattr(ties._Deferred, "settle", recording)
    return outcomes


def fold_both(tmp_path: Path, arrivals: list[dict[str, torch.Tensor]], base) -> None:
    base_path = save(base, tmp_path / "base.safetensors")
    paths = [save(a, tmp_path / f"a{t}.safetensors") for t, a in enumerate(arrivals)]
    fast = Merger(base_path, "ties", workers=2)
    slow = Merger(base_path, reference_rule(), workers=2)
    for path in paths:
        assert fast.fold(path).content_hash == slow.fold(path).content_hash
    for (key, a), (_, b) in zip(fast.iter_merged(), slow.iter_merged()):
        assert torch.equal(bits(a), bits(b)), key


def test_folds_settle_in_memory_and_equal_the_reference(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(contmerge.elementwise, "CHUNK_BYTES", LEAF_BYTES)
    outcomes = settled(monkeypatch)
    base = model()
    arrivals = [fine_tuned(base, t) for t in range(3)]
    arrivals[2]["head.weight"] = base["head.weight"].clone()  # a tensor that did not move
    fold_both(tmp_path, arrivals, base)
    assert outcomes == [True, True]  # arrivals 2 and 3 (the first is only scaled)


def test_too_many_waiting_columns_fold_the_ordinary_way(tmp_path, monkeypatch) -> None:
    # the sample shows more would wait than may be kept: no deferred fold is even begun
    monkeypatch.setattr(ties, "MAX_CANDIDATES", 1000)
    outcomes = settled(monkeypatch)
    base = model()
    fold_both(tmp_path, [fine_tuned(base, t) for t in range(3)], base)
    assert outcomes == []


def test_a_deferred_fold_keeping_too_many_gives_up(monkeypatch) -> None:
    monkeypatch.setattr(ties, "MAX_CANDIDATES", 1000)
    rule = ContinualTies()
    old, delta = inputs("random")
    k = N - int(N * rule.threshold / 100)
    windows = [windows_around(old, k, 0.01), windows_around(delta, k, 0.01)]
    deferred = ties._Deferred(rule, k, windows)
    info = TensorInfo("w", TensorMeta((N,), torch.float32), False, torch.float32)
    out = np.empty(N, np.float32)
    fold = deferred.chunk(info)
    for a in range(0, N, CHUNK):
        b = min(a + CHUNK, N)
        fold(a, delta[a:b], np.zeros(b - a, np.float32), old[a:b], out[a:b])
    assert deferred.settle(FoldContext(index=2, globals={})) is None


def test_a_sample_unlike_the_model_falls_back_to_the_exact_passes(tmp_path, monkeypatch) -> None:
    # the sample takes every 61st entry of each chunk: make exactly those tiny, so its windows
    # say the k-th is far smaller than it is
    monkeypatch.setattr(contmerge.elementwise, "CHUNK_BYTES", LEAF_BYTES)
    outcomes = settled(monkeypatch)
    base = model()
    arrivals = [fine_tuned(base, t) for t in range(3)]
    per_chunk = LEAF_BYTES // 4
    for arrival in arrivals[1:]:
        for name, value in arrival.items():
            flat = value.reshape(-1)
            sampled = np.arange(flat.numel())
            sampled = sampled[(sampled % per_chunk) % ties._SamplePass.sample == 0]
            flat[sampled] = base[name].reshape(-1)[sampled] + 1e-6
    fold_both(tmp_path, arrivals, base)
    assert outcomes == [False, False]


def test_a_durable_state_folds_the_ordinary_way(tmp_path, monkeypatch) -> None:
    outcomes = settled(monkeypatch)
    base = model()
    base_path = save(base, tmp_path / "base.safetensors")
    paths = [save(fine_tuned(base, t), tmp_path / f"a{t}.safetensors") for t in range(3)]
    with Merger(base_path, "ties", state_dir=tmp_path / "state", workers=2) as durable:
        memory = Merger(base_path, "ties", workers=2)
        for path in paths:
            assert durable.fold(path).content_hash == memory.fold(path).content_hash
        for (key, a), (_, b) in zip(durable.iter_merged(), memory.iter_merged()):
            assert torch.equal(bits(a), bits(b)), key
    assert outcomes == [True, True]  # the memory merger's only
