"""The fast path of elementwise rules: chunked, multi-threaded folds that must equal the
reference per-tensor ``fold`` bit for bit, and keep every guarantee of the slow path."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import contmerge.elementwise
from contmerge import Merger
from contmerge.chunks import ChunkRunner
from contmerge.errors import CheckpointError
from contmerge.hashing import LEAF_BYTES, ContentHash
from contmerge.kernels import STREAM_ALIGN, fused_fold, keep_delta
from contmerge.registry import available, lookup, parse_strategy
from contmerge.sources import open_checkpoint
from contmerge.state import SPARE
from contmerge.strategies.average import Average
from contmerge.strategies.dare import Dare
from contmerge.strategies.magmax import MagMax
from contmerge.strategies.task_arithmetic import TaskArithmetic
from contmerge.strategies.ties import ContinualTies
from contmerge.strategy import (
    Chain,
    EntryFold,
    FoldContext,
    Preprocessor,
    State,
    Strategy,
    TensorInfo,
)
from contmerge.tensorfile import CODE_BY_DTYPE, TensorMeta

from helpers import fine_tuned


def registered_elementwise() -> list[str]:
    """Every registered elementwise rule at its defaults, and every elementwise pre-processor
    chained in front of each: a rule added to the registry is held to its reference here
    without being listed (torch's ``supported_impls`` pattern)."""
    rules, pres = [], []
    for name in available():
        cls = lookup(name)
        if getattr(cls, "elementwise", False):
            (pres if issubclass(cls, Preprocessor) else rules).append(name)
    return [*rules, *(f"chain({pre}(), {rule}())" for pre in pres for rule in rules)]


#: the registry's elementwise rules (ties's passes too: chunked on the threads vs whole
#: tensors), and settings that take other branches of a rule's loop
ELEMENTWISE = [*registered_elementwise(), "ties(merge_func='mean', threshold=35.0)"]


def big_base(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors spanning several 1 MiB chunks (and a ragged last one), plus small ones."""
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(700, 900, generator=g).to(dtype),  # 2.4 MiB in float32
        "layer.bias": torch.randn(700, generator=g).to(dtype),
        "head.weight": torch.randn(300, 700, generator=g).to(dtype),
        "steps": torch.tensor(3, dtype=torch.int64),
    }


def save(model: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.items()}, str(path))
    return path


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[tensor.element_size()])


def whole(rule: Strategy) -> Strategy:
    """The same rule, made to take the per-tensor path (the reference)."""
    if isinstance(rule, Chain):
        return Chain(*rule.pre, whole(rule.rule))  # a chain is elementwise only if its rule is
    clone = type(f"Whole{type(rule).__name__}", (type(rule),), {"elementwise": False})
    return clone(**rule.hparams())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule", [Average(), TaskArithmetic(), MagMax()])
def test_fold_into_equals_fold_bit_for_bit(rule: Strategy, dtype: torch.dtype) -> None:
    n = 50_000
    g = torch.Generator().manual_seed(1)
    state = torch.randn(n, generator=g).to(dtype)
    delta = torch.randn(n, generator=g).to(dtype)
    state[:100] = 0.0
    delta[100:200] = state[100:200]  # equal magnitudes, same sign
    delta[200:300] = -state[200:300]  # equal magnitudes, opposite signs: the later one wins
    delta[300:310] = -0.0
    info = TensorInfo("w", TensorMeta((n,), dtype), False, dtype)
    for index in (1, 2, 3, 7, 24):
        ctx = FoldContext(index=index, globals={})
        want = rule.fold(info, {"value": state}, delta.clone(), state, ctx)["value"]
        array = state.numpy()
        out = {"value": np.empty_like(array)}
        rule.fold_into(info, out, {"value": array}, delta.numpy().copy(), array, ctx, 0)
        assert torch.equal(bits(torch.from_numpy(out["value"])), bits(want)), (rule.name, index)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("majority", [-1.0, 0.0, 1.0])
@pytest.mark.parametrize("merge_func", ["sum", "mean"])
def test_ties_entry_fold_equals_fold_bit_for_bit(dtype, majority, merge_func) -> None:
    n = 50_000
    g = torch.Generator().manual_seed(2)
    state = torch.randn(n, generator=g).to(dtype)
    delta = torch.randn(n, generator=g).to(dtype)
    state[:100] = 0.0
    state[100:150] = -0.0
    delta[200:300] = -state[200:300]  # columns that cancel: the majority sign decides
    delta[300:310] = -0.0
    rule = ContinualTies(merge_func=merge_func)
    info = TensorInfo("w", TensorMeta((n,), dtype), False, dtype)
    for index in (1, 2, 5):
        stats = {"thresholds": (0.8, 0.5), "majority_sign": majority}
        ctx = FoldContext(index=index, globals={}, stats=stats)
        want = rule.fold(info, {"value": state}, delta.clone(), state, ctx)["value"]
        array = state.numpy()
        out = {"value": np.empty_like(array)}
        rule.fold_into(info, out, {"value": array}, delta.numpy().copy(), array, ctx, 0)
        assert torch.equal(bits(torch.from_numpy(out["value"])), bits(want)), index


def test_dare_masks_the_same_entries_whole_or_in_chunks() -> None:
    delta = torch.randn(10_007)
    info = TensorInfo("w", TensorMeta((10_007,), torch.float32), False, torch.float32)
    ctx = FoldContext(index=4, globals={})
    dare = Dare(p=0.6, seed=5)
    whole_tensor = dare.transform(info, delta, ctx)
    pieces = delta.numpy().copy()
    for start in range(0, pieces.size, 999):
        dare.transform_into(info, pieces[start : start + 999], ctx, start)
    assert torch.equal(torch.from_numpy(pieces), whole_tensor)
    kept = whole_tensor != 0
    assert 0.37 < kept.float().mean() < 0.43
    assert torch.equal(whole_tensor[kept], delta[kept] / np.float32(0.4))
    # another arrival index, another mask
    assert not torch.equal(dare.transform(info, delta, FoldContext(index=5, globals={})) != 0, kept)


@pytest.mark.parametrize("chunk_bytes", [LEAF_BYTES, 4 * LEAF_BYTES])
@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_chunked_path_equals_the_per_tensor_path(
    tmp_path, monkeypatch, name, dtype, workers, chunk_bytes
) -> None:
    # one leaf per chunk: the big tensors span several chunks, the last one ragged; or
    # several leaves per chunk
    monkeypatch.setattr(contmerge.elementwise, "CHUNK_BYTES", chunk_bytes)
    base = big_base(dtype)
    paths = [save(fine_tuned(base, t), tmp_path / f"a{t}.safetensors") for t in range(3)]
    base_path = save(base, tmp_path / "base.safetensors")
    fast = Merger(base_path, name, workers=workers)
    slow = Merger(base_path, whole(parse_strategy(name)), workers=workers)
    for path in paths:
        assert fast.fold(path).content_hash == slow.fold(path).content_hash
    for (key, a), (_, b) in zip(fast.iter_merged(), slow.iter_merged()):
        assert torch.equal(bits(a), bits(b)), key
    for record_fast, record_slow in zip(fast.arrivals, slow.arrivals):
        assert record_fast.relative_delta == pytest.approx(record_slow.relative_delta)


def as_dtype(model: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.items()}


@pytest.mark.parametrize(
    "base_dtype, arrival_dtype",
    [
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float32),
    ],
)
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_an_arrival_in_another_dtype_folds_chunked_as_per_tensor_and_as_its_values(
    tmp_path, monkeypatch, name, base_dtype, arrival_dtype
) -> None:
    # one hash leaf per chunk, of the arrival's own bytes: the big tensors span several chunks
    monkeypatch.setattr(contmerge.elementwise, "CHUNK_BYTES", LEAF_BYTES)
    base = big_base(base_dtype)
    arrivals = [as_dtype(fine_tuned(base, t), arrival_dtype) for t in range(3)]
    paths = [save(a, tmp_path / f"a{t}.safetensors") for t, a in enumerate(arrivals)]
    # the same values, already in the compute dtype: what the arrival's dtype must not change
    compute = torch.float64 if base_dtype == torch.float64 else torch.float32
    widened = [
        save(as_dtype(a, compute), tmp_path / f"w{t}.safetensors") for t, a in enumerate(arrivals)
    ]
    base_path = save(base, tmp_path / "base.safetensors")
    fast = Merger(base_path, name, workers=2)
    slow = Merger(base_path, whole(parse_strategy(name)), workers=2)
    reference = Merger(base_path, name, workers=2)
    for path, wide in zip(paths, widened):
        assert fast.fold(path).content_hash == slow.fold(path).content_hash
        reference.fold(wide)
    for (key, a), (_, b), (_, c) in zip(
        fast.iter_merged(), slow.iter_merged(), reference.iter_merged()
    ):
        assert a.dtype == base[key].dtype, key  # emitted in the base's dtype
        assert torch.equal(bits(a), bits(b)), key
        assert torch.equal(bits(a), bits(c)), key
    assert {r.dtype for r in fast.arrivals} == {CODE_BY_DTYPE[arrival_dtype]}


@pytest.mark.parametrize("durable", [False, True])
def test_batches_of_any_size_fold_the_same(tmp_path, monkeypatch, durable) -> None:
    base = big_base()
    base["norm.weight"] = torch.rand(64)  # small tensors between big ones, an int buffer too
    paths = [save(fine_tuned(base, t), tmp_path / f"a{t}.safetensors") for t in range(3)]
    base_path = save(base, tmp_path / "base.safetensors")
    results = []
    for batch_bytes in (1, 3 << 20, 1 << 30):  # a tensor per batch, a few, all at once
        monkeypatch.setattr(contmerge.elementwise, "BATCH_BYTES", batch_bytes)
        state = tmp_path / f"state-{batch_bytes}" if durable else None
        with Merger(base_path, "average", state_dir=state, workers=2) as merger:
            hashes = [merger.fold(path).content_hash for path in paths]
            results.append((hashes, merger.emit_state_dict()))
    for hashes, merged in results[1:]:
        assert hashes == results[0][0]
        assert all(torch.equal(merged[k], results[0][1][k]) for k in merged)


def test_content_hash_is_the_same_whatever_the_path_or_thread_count(tmp_path) -> None:
    base = big_base()
    arrival = fine_tuned(base, 1)
    path = save(arrival, tmp_path / "a.safetensors")
    base_path = save(base, tmp_path / "base.safetensors")
    direct = ContentHash()
    for key in open_checkpoint(base_path).meta:  # the engine hashes in the base's order
        direct.add_tensor(key, arrival[key])
    hashes = {
        Merger(base_path, strategy, workers=workers).fold(path).content_hash
        for strategy in ("magmax", "opcm")
        for workers in (1, 2, 4)
    }
    assert hashes == {direct.hexdigest()}
    assert LEAF_BYTES < arrival["layer.weight"].numel() * 4  # the big tensor spans leaves


@pytest.mark.parametrize("durable", [False, True])
def test_nan_in_a_late_chunk_leaves_the_state_untouched(tmp_path, durable) -> None:
    base = big_base()
    base_path = save(base, tmp_path / "base.safetensors")
    good = [save(fine_tuned(base, t), tmp_path / f"g{t}.safetensors") for t in range(3)]
    bad_model = fine_tuned(base, 9)
    bad_model["layer.weight"].view(-1)[-5] = float("nan")  # in the last chunk of that tensor
    bad = save(bad_model, tmp_path / "bad.safetensors")
    state = tmp_path / "state" if durable else None
    merger = Merger(base_path, "magmax", state_dir=state, workers=2)
    merger.fold(good[0])
    before = merger.emit_state_dict()
    with pytest.raises(CheckpointError) as caught:
        merger.fold(bad)
    assert caught.value.tensor == "layer.weight" and "NaN" in str(caught.value)
    assert merger.count == 1
    after = merger.emit_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # and the buffers the failed fold wrote into are reused correctly afterwards
    merger.fold(good[1])
    merger.fold(good[2])
    reference = Merger(base_path, "magmax", workers=1)
    for path in good:
        reference.fold(path)
    for (key, a), (_, b) in zip(merger.iter_merged(), reference.iter_merged()):
        assert torch.equal(a, b), key


def test_file_cut_short_after_opening_is_an_error_not_a_crash(tmp_path) -> None:
    base = big_base()
    base_path = save(base, tmp_path / "base.safetensors")
    path = save(fine_tuned(base, 1), tmp_path / "a.safetensors")
    merger = Merger(base_path, "average", workers=2)
    checkpoint = open_checkpoint(path)  # header checked while the file was whole
    os.truncate(path, path.stat().st_size - 1000)
    with pytest.raises(CheckpointError, match="truncated") as caught:
        merger.fold(checkpoint)
    assert caught.value.tensor is not None
    assert merger.count == 0


@dataclass
class _Shadow(Strategy):
    """Elementwise with no compiled loop (default ``fold_into``), emitting its state itself."""

    name = "shadow"
    elementwise = True

    def fold(self, info, state: State, delta, base, ctx) -> State:
        return {"value": base + delta}  # the latest model

    def emit(self, info, state: State, base, globals) -> torch.Tensor:
        return state["value"]  # the store's own tensor: the engine must hand out a copy


def test_rules_without_a_kernel_fold_chunked_and_emits_are_never_overwritten(tmp_path) -> None:
    base = big_base()
    base_path = save(base, tmp_path / "base.safetensors")
    models = [fine_tuned(base, t) for t in range(3)]
    merger = Merger(base_path, _Shadow(), workers=2)
    emitted = []
    for t, model in enumerate(models):
        merger.fold(save(model, tmp_path / f"a{t}.safetensors"))
        emitted.append(merger.emit_state_dict())
    # every emit still shows the model folded last at its time, though buffers were reused
    for model, snapshot in zip(models, emitted):
        for key in ("layer.weight", "head.weight"):
            torch.testing.assert_close(snapshot[key], model[key], rtol=0, atol=1e-6)


def test_durable_state_reuses_the_previous_generation_file(tmp_path) -> None:
    base = big_base()
    base_path = save(base, tmp_path / "base.safetensors")
    paths = [save(fine_tuned(base, t), tmp_path / f"a{t}.safetensors") for t in range(4)]
    state = tmp_path / "state"
    with Merger(base_path, "task_arithmetic", state_dir=state) as merger:
        for path in paths[:3]:
            merger.fold(path)
        names = sorted(p.name for p in state.iterdir())
        assert names == [".lock", SPARE, "manifest.json", merger.manifest.state_file]
    spare = (state / SPARE).stat().st_ino
    with Merger(base_path, state_dir=state) as merger:  # reopening deletes nothing
        assert SPARE in {p.name for p in state.iterdir()}
        merger.fold(paths[3])
        assert (state / merger.manifest.state_file).stat().st_ino == spare  # overwritten
        durable = merger.emit_state_dict()
    memory = Merger(base_path, "task_arithmetic")
    for path in paths:
        memory.fold(path)
    for key, value in memory.iter_merged():
        assert torch.equal(value, durable[key]), key


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_loop_is_exact_from_any_alignment_and_length(dtype) -> None:
    """The loop stores plainly up to the first aligned address and streams from there: every
    offset and length (shorter than the plain head, too) gives numpy's result bit for bit."""
    rng = np.random.default_rng(0)
    n = 4000
    x, base, old = (rng.standard_normal(n).astype(dtype) for _ in range(3))
    old[::7] = -(x - base)[::7]  # ties of magnitude: the arrival wins
    update = MagMax().entry_fold(None, None).update  # type: ignore[arg-type]
    loop = fused_fold(keep_delta, update)
    per_line = STREAM_ALIGN // np.dtype(dtype).itemsize
    for start in range(per_line + 1):
        for length in (0, 1, per_line - 1, 3 * per_line + 5, n - start):
            stop = start + length
            out = np.full(n, 7.0, dtype=dtype)
            total = loop(
                (),
                (),
                np.uint64(start),
                x[start:stop],
                base[start:stop],
                old[start:stop],
                out[start:stop],
            )
            delta = x[start:stop] - base[start:stop]
            want = np.where(np.abs(delta) >= np.abs(old[start:stop]), delta, old[start:stop])
            assert np.array_equal(out[start:stop], want), (start, length)
            assert (out[:start] == 7.0).all() and (out[stop:] == 7.0).all()  # nothing else
            assert total == pytest.approx(float(np.sum(delta.astype(np.float64) ** 2)))


def test_fused_loop_takes_entries_off_their_natural_alignment() -> None:
    """An output whose entries straddle alignment (a float32 view at an odd byte) can never be
    streamed: stored plainly, with the same result."""
    update = MagMax().entry_fold(None, None).update  # type: ignore[arg-type]
    loop = fused_fold(keep_delta, update)
    rng = np.random.default_rng(1)
    x, base, old = (rng.standard_normal(3000).astype(np.float32) for _ in range(3))
    raw = np.zeros(3000 * 4 + 1, dtype=np.uint8)
    out = np.frombuffer(raw.data, dtype=np.float32, count=3000, offset=1)
    assert out.ctypes.data % 4
    loop((), (), np.uint64(0), x, base, old, out)
    delta = x - base
    assert np.array_equal(out, np.where(np.abs(delta) >= np.abs(old), delta, old))


def test_fused_loop_sums_nan_and_inf_through() -> None:
    update = MagMax().entry_fold(None, None).update  # type: ignore[arg-type]
    loop = fused_fold(keep_delta, update)
    for bad in (np.nan, np.inf):
        x = np.ones(1000, dtype=np.float32)
        x[997] = bad
        zeros = np.zeros(1000, dtype=np.float32)
        assert not np.isfinite(loop((), (), np.uint64(0), x, zeros, zeros, np.empty_like(x)))


def test_chain_of_two_preprocessors_folds_unfused_and_the_same(tmp_path) -> None:
    two = Chain(Dare(p=0.5, seed=1), Dare(p=0.3, seed=2), MagMax())
    info = TensorInfo("w", TensorMeta((10,), torch.float32), False, torch.float32)
    ctx = FoldContext(index=1, globals={})
    assert two.entry_fold(info, ctx) is None  # falls back to fold_into on δ
    one = Chain(Dare(p=0.5, seed=1), MagMax()).entry_fold(info, ctx)
    assert isinstance(one, EntryFold) and one.before is not None
    base = big_base()
    base_path = save(base, tmp_path / "base.safetensors")
    paths = [save(fine_tuned(base, t), tmp_path / f"a{t}.safetensors") for t in range(2)]
    fast, slow = Merger(base_path, two, workers=2), Merger(base_path, whole(two), workers=2)
    for path in paths:
        fast.fold(path)
        slow.fold(path)
    for (key, a), (_, b) in zip(fast.iter_merged(), slow.iter_merged()):
        assert torch.equal(bits(a), bits(b)), key


def test_runner_returns_results_in_order_however_uneven_the_items() -> None:
    runner = ChunkRunner(3)
    try:
        sizes = [1, 50_000, 3, 7, 200_000, 0, 11] * 5
        got = runner.map(sizes, lambda n: float(np.ones(n).sum()))
        assert got == [float(n) for n in sizes]
        assert runner.map([], lambda n: n) == []
    finally:
        runner.close()


def test_runner_raises_the_first_error_after_every_thread_stopped() -> None:
    runner = ChunkRunner(2)
    done: list[int] = []

    def work(k: int) -> int:
        if k == 3:
            raise ValueError("item 3")
        time.sleep(0.002)  # items take a while: a thread that stopped taking them shows
        done.append(k)
        return k

    try:
        with pytest.raises(ValueError, match="item 3"):
            runner.map(list(range(200)), work)
        settled = len(done)
        assert settled < 50  # taking stopped soon after the failure, not at the end
        assert runner.map([1, 2], lambda k: k * 2) == [2, 4]  # and the runner still works
        assert len(done) == settled  # nothing of the failed map ran on afterwards
    finally:
        runner.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(0,), (3, 0), (), (5, 7), (1100, 1024)])  # last: > 4 MiB
def test_buffers_have_the_shape_and_dtype_asked_and_zeros_are_zero(shape, dtype) -> None:
    from contmerge import buffers

    for made in (buffers.empty(shape, dtype), buffers.zeros(shape, dtype)):
        assert made.shape == shape and made.dtype == dtype and made.is_contiguous()
    zeros = buffers.zeros(shape, dtype)
    assert not zeros.any()
    zeros.fill_(1)  # writable, and owns its memory
    assert zeros.numel() == 0 or bool(zeros.all())
