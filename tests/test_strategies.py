"""Each streaming strategy against a direct computation of its paper's formula, all models in
memory, on random models with non-square linears, biases, norms, embeddings and int buffers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from contmerge import Merger
from contmerge.strategies.dare import Dare
from contmerge.strategies.opcm import (
    GRAM_MIN_RATIO,
    project_out,
    project_out_fast,
    singular_basis,
    split_rank,
)
from contmerge.strategy import FoldContext, TensorInfo
from contmerge.tensorfile import TensorMeta

from helpers import Model, fine_tuned, float_names, random_base, whole_norm

LINEAR = ("encoder.0.weight", "encoder.1.weight")


def run(
    strategy: str,
    base: Model,
    models: list[Model],
    linear: str | None = None,
    workers: int | None = None,
    state_dir: Path | None = None,
    device: str | None = None,
    **settings: object,
) -> Model:
    """The Merger's own options by name; every other keyword is a setting of the strategy."""
    options = {"linear": linear, "workers": workers, "device": device}
    merger = Merger(base, strategy, state_dir, settings=settings, **options)
    for model in models:
        assert merger.fold(model).status == "folded"
    return merger.emit_state_dict()


def deltas(base: Model, models: list[Model]) -> list[Model]:
    return [{n: m[n].double() - base[n].double() for n in float_names(base)} for m in models]


def assert_close(merged: Model, expected: Model, base: Model, tol: float = 1e-5) -> None:
    for name, value in base.items():
        if not value.is_floating_point():
            assert torch.equal(merged[name], value), f"{name}: int buffers are not merged"
            continue
        assert merged[name].dtype == value.dtype
        torch.testing.assert_close(
            merged[name].double(), expected[name].double(), atol=tol, rtol=tol, msg=name
        )


@pytest.fixture(scope="module")
def setup() -> tuple[Model, list[Model]]:
    base = random_base()
    return base, [fine_tuned(base, seed) for seed in range(5)]


def test_average_is_the_mean_of_the_models(setup):
    base, models = setup
    expected = {n: torch.stack([m[n].double() for m in models]).mean(0) for n in float_names(base)}
    assert_close(run("average", base, models), expected, base)


def test_task_arithmetic(setup):
    base, models = setup
    taus = deltas(base, models)
    expected = {n: base[n] + 0.3 * sum(t[n] for t in taus) for n in float_names(base)}
    assert_close(run("task_arithmetic", base, models), expected, base)
    expected = {n: base[n] + 0.7 * sum(t[n] for t in taus) for n in float_names(base)}
    assert_close(run("task_arithmetic", base, models, scaling_factor=0.7), expected, base)


def test_magmax_picks_the_largest_magnitude(setup):
    base, models = setup
    taus = deltas(base, models)
    expected = {}
    for name in float_names(base):
        stacked = torch.stack([t[name] for t in taus])
        pick = stacked.abs().argmax(0)
        expected[name] = base[name] + 0.5 * torch.gather(stacked, 0, pick[None])[0]
    assert_close(run("magmax", base, models), expected, base)


def test_magmax_ties_go_to_the_later_model():
    # dyadic values keep θ0 ± δ exact, so τ_2 = −τ_1 is a magnitude tie at every entry
    dyadic = {
        n: (torch.round(v * 256) / 256 if v.is_floating_point() else v)
        for n, v in random_base().items()
    }
    step = {n: torch.round(torch.randn(v.shape) * 64) / 1024 for n, v in dyadic.items()}
    first = {n: v + step[n] if v.is_floating_point() else v for n, v in dyadic.items()}
    mirrored = {n: v - step[n] if v.is_floating_point() else v for n, v in dyadic.items()}
    merged = run("magmax", dyadic, [first, mirrored])
    expected = {n: dyadic[n] - 0.5 * step[n] for n in float_names(dyadic)}
    assert_close(merged, expected, dyadic, tol=0)


def reference_opcm(base: Model, models: list[Model], alpha: float) -> Model:
    """The authors' form: merged model and λ_t, full-matrix SVD of the normalised merged vector."""
    names = float_names(base)
    taus = deltas(base, models)
    merged = {n: models[0][n].double() for n in names}
    lam, norms = 1.0, [whole_norm(taus[0], names)]
    for tau in taus[1:]:
        norms.append(whole_norm(tau, names))
        unnormalised = {}
        for n in names:
            m = merged[n] - base[n].double()
            if n in LINEAR and m.abs().sum() > 0:
                u, s, vh = torch.linalg.svd(m, full_matrices=True)
                share = torch.cumsum(s, 0) / s.sum()
                r = int(torch.argmax((share > alpha).int()))  # argmax of all-False is 0
                c = u.T @ tau[n] @ vh.T
                c[torch.arange(min(c.shape)), torch.arange(min(c.shape))] = 0
                c[:r, :r] = 0
                d_clean = u @ c @ vh
            else:
                d_clean = tau[n]
            unnormalised[n] = lam * m + d_clean
        lam = whole_norm(unnormalised, names) / (sum(norms) / len(norms))
        merged = {n: base[n].double() + unnormalised[n] / lam for n in names}
    return merged


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.9])
def test_opcm_matches_the_authors_form(alpha):
    # float64 end to end: the thin-SVD streaming form equals the full-SVD λ-recurrence exactly
    base = random_base(dtype=torch.float64)
    models = [fine_tuned(base, s) for s in range(5)]
    merged = run("opcm", base, models, alpha=alpha, linear=r"^encoder\.\d\.weight$")
    assert_close(merged, reference_opcm(base, models, alpha), base, tol=1e-10)


def test_opcm_float32_stays_within_svd_rounding(setup):
    base, models = setup
    merged = run("opcm", base, models, linear=r"^encoder\.\d\.weight$")
    assert_close(merged, reference_opcm(base, models, 0.5), base, tol=2e-4)


def test_opcm_only_projects_linear_weights_by_default_heuristic(setup):
    base, models = setup
    merger = Merger(base, "opcm")
    assert {n for n, i in merger.infos.items() if i.is_linear} == set(LINEAR)


def test_opcm_emitted_norm_is_the_mean_arrival_norm(setup):
    base, models = setup
    merged = run("opcm", base, models)
    names = float_names(base)
    merged_tau = {n: merged[n].double() - base[n].double() for n in names}
    mean_norm = sum(whole_norm(t, names) for t in deltas(base, models)) / len(models)
    assert whole_norm(merged_tau, names) == pytest.approx(mean_norm, rel=1e-5)


def test_opcm_projection_removes_diagonal_and_top_block():
    g = torch.Generator().manual_seed(3)
    merged = torch.randn(40, 24, generator=g, dtype=torch.float64)
    delta = torch.randn(40, 24, generator=g, dtype=torch.float64)
    kept = project_out(merged, delta, alpha=0.5)
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    r = split_rank(s, 0.5)
    assert 0 < r < 24
    coeffs = u.T @ kept @ vh.T
    assert coeffs.diagonal().abs().max() < 1e-12
    assert coeffs[:r, :r].abs().max() < 1e-12
    # everything else of the delta survives untouched
    original = u.T @ delta @ vh.T
    mask = torch.ones_like(original, dtype=torch.bool)
    mask[:r, :r] = False
    mask.fill_diagonal_(False)
    torch.testing.assert_close(coeffs[mask], original[mask])
    outside = delta - u @ original @ vh  # the part of delta outside U's column space
    torch.testing.assert_close(kept - u @ coeffs @ vh, outside)


def test_split_rank_edges():
    sigma = torch.tensor([5.0, 3.0, 2.0])  # shares 0.5, 0.8, 1.0
    assert split_rank(sigma, 0.5) == 1  # strictly greater than α
    assert split_rank(sigma, 0.0) == 0
    assert split_rank(sigma, 0.8) == 2
    assert split_rank(sigma, 0.99) == 2
    with pytest.raises(ValueError, match="alpha"):
        Merger(random_base(), "opcm", settings={"alpha": 1.0})


def test_opcm_adds_unprojected_where_the_merged_layer_is_all_zero():
    base = random_base()
    first = fine_tuned(base, 0)
    first["encoder.1.weight"] = base["encoder.1.weight"].clone()  # a frozen layer
    second = fine_tuned(base, 1)
    merger = Merger(base, "opcm")
    merger.fold(first)
    merger.fold(second)
    state = merger.store.read("encoder.1.weight")["value"]
    expected = second["encoder.1.weight"] - base["encoder.1.weight"]
    torch.testing.assert_close(state, expected)


def test_opcm_skips_the_svd_of_a_layer_the_arrival_leaves_unchanged(setup, monkeypatch):
    # δ = 0 on a linear layer (frozen in that fine-tune) projects to 0 whatever the basis: the
    # fold adds nothing there and takes no SVD, and the merge equals the authors' loop
    from contmerge.strategies import opcm

    base, models = setup
    second = dict(models[1])
    second["encoder.1.weight"] = base["encoder.1.weight"].clone()
    bases: list[tuple[int, ...]] = []
    real = opcm.singular_basis

    def spy(tall):
        bases.append(tuple(tall.shape))
        return real(tall)

    monkeypatch.setattr(opcm, "singular_basis", spy)
    merger = Merger(base, "opcm", linear=r"^encoder\.\d\.weight$", workers=1)
    merger.fold(models[0])
    before = merger.store.read("encoder.1.weight")["value"].clone()
    merger.fold(second)
    assert torch.equal(merger.store.read("encoder.1.weight")["value"], before)
    shape0 = tuple(base["encoder.0.weight"].shape)
    assert bases == [shape0 if shape0[0] >= shape0[1] else shape0[::-1]]  # encoder.0's only
    merger.fold(models[2])
    expected = reference_opcm(base, [models[0], second, models[2]], 0.5)
    assert_close(merger.emit_state_dict(), expected, base, tol=2e-4)


def _layer_pair(shape: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A merged update (low rank plus noise, as fine-tuned deltas are) and an arriving one."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    low = torch.randn(m, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, n, generator=g, dtype=torch.float64
    )
    merged = low + 0.2 * torch.randn(m, n, generator=g, dtype=torch.float64)
    return merged, torch.randn(m, n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(48, 48), (60, 24), (24, 60)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_fast_projection_equals_the_reference_in_float64(shape, alpha):
    merged, delta = _layer_pair(shape, seed=sum(shape))
    fast = project_out_fast(merged, delta, alpha)
    assert fast.shape == delta.shape and fast.is_contiguous()
    torch.testing.assert_close(fast, project_out(merged, delta, alpha), atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(96, 96), (160, 64), (64, 160)])
def test_fast_float32_projection_is_closer_to_float64_than_a_float32_svd(shape):
    # float32 is the fast path's Gram route: it must be at least as exact as the reference
    # computed in float32 (the float32 SVD that FusionBench and the reference use)
    merged, delta = _layer_pair(shape, seed=7 + shape[0])
    merged32, delta32 = merged.float(), delta.float()
    truth = project_out(merged32.double(), delta32.double(), 0.5)
    fast_error = (project_out_fast(merged32, delta32, 0.5).double() - truth).abs().max()
    reference_error = (project_out(merged32, delta32, 0.5).double() - truth).abs().max()
    assert fast_error <= reference_error
    assert fast_error < 1e-5 * truth.abs().max()


def test_rank_deficient_float32_layer_takes_its_basis_from_an_svd():
    # a merged update of rank 2 (one LoRA arrival): the Gram matrix cannot resolve its null
    # space, so the basis comes from a float64 SVD and stays orthonormal
    g = torch.Generator().manual_seed(5)
    merged = (torch.randn(40, 2, generator=g) @ torch.randn(2, 30, generator=g)).float()
    delta = torch.randn(40, 30, generator=g)
    u, sigma, v = singular_basis(merged)
    assert float(sigma[-1]) < GRAM_MIN_RATIO * float(sigma[0])
    torch.testing.assert_close(u.T @ u, torch.eye(30), atol=1e-5, rtol=0)
    torch.testing.assert_close(v.T @ v, torch.eye(30), atol=1e-5, rtol=0)
    removed = delta.double() - project_out_fast(merged, delta, 0.5).double()
    reference = delta.double() - project_out(merged.double(), delta.double(), 0.5)
    # what is removed along the two directions merged spans does not depend on the basis its
    # null space gets (which is arbitrary, in any SVD)
    u2, _, vh2 = torch.linalg.svd(merged.double(), full_matrices=False)
    u2, v2 = u2[:, :2], vh2[:2].T
    torch.testing.assert_close(u2.T @ removed @ v2, u2.T @ reference @ v2, atol=1e-5, rtol=0)


def test_opcm_folds_several_layers_at_once_with_the_same_result(setup):
    # the engine folds OPCM's layers on several threads (per_tensor_parallel): written in
    # order, with the norms summed in order, the merge is the same bit for bit as one thread
    base, models = setup
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one intra-op thread on both sides, as inside the parallel folds
    try:
        one = run("opcm", base, models, workers=1)
        several = run("opcm", base, models, workers=3)
    finally:
        torch.set_num_threads(before)
    for name in base:
        assert torch.equal(one[name], several[name]), name


def reference_ties(base: Model, models: list[Model], lam=0.3, k=20, merge_func="sum") -> Model:
    """The authors' continual TIES on whole-model flattened vectors (kthvalue, sign election)."""
    names = float_names(base)
    taus = deltas(base, models)

    def flat(model: Model) -> torch.Tensor:
        return torch.cat([model[n].reshape(-1) for n in names])

    merged_tv = {n: lam * taus[0][n] for n in names}
    for tau in taus[1:]:
        rows = torch.stack([flat(merged_tv), flat(tau)])
        d = rows.shape[1]
        kth = rows.abs().kthvalue(d - int(d * k / 100), dim=1, keepdim=True).values
        rows = rows * (rows.abs() >= kth)
        signs = torch.sign(rows.sum(0))
        signs[signs == 0] = torch.sign(signs.sum())
        keep = torch.where(signs > 0, rows > 0, rows < 0)
        selected = rows * keep
        combined = selected.sum(0)
        if merge_func == "mean":
            combined = combined / (selected != 0).sum(0).clamp(min=1)
        offset = 0
        for n in names:
            size = merged_tv[n].numel()
            merged_tv[n] = merged_tv[n] + lam * combined[offset : offset + size].view_as(tau[n])
            offset += size
    return {n: base[n].double() + merged_tv[n] for n in names}


@pytest.mark.parametrize("merge_func", ["sum", "mean"])
def test_continual_ties_matches_whole_model_reference(merge_func):
    base = random_base(dtype=torch.float64)  # float64: the reference's kthvalue is exact too
    models = [fine_tuned(base, s) for s in range(4)]
    merged = run("ties", base, models, merge_func=merge_func)
    assert_close(merged, reference_ties(base, models, merge_func=merge_func), base, tol=1e-10)


def test_continual_ties_float32_thresholds_are_exact():
    base = random_base()
    models = [fine_tuned(base, s) for s in range(3)]
    merged = run("ties", base, models, threshold=35.0)
    assert_close(merged, reference_ties(base, models, k=35), base, tol=1e-5)


def _ties_models(seed: int = 0) -> tuple[Model, list[Model]]:
    """Large enough that a sample of each chunk says where the thresholds are."""
    g = torch.Generator().manual_seed(seed)
    base = {
        "layer.weight": torch.randn(600, 500, generator=g),
        "layer.bias": torch.randn(600, generator=g),
        "head.weight": torch.randn(200, 600, generator=g),
    }
    return base, [fine_tuned(base, s) for s in range(4)]


def test_ties_finds_thresholds_in_one_exact_pass(monkeypatch):
    import contmerge.strategies.ties as ties

    def no_radix(*args):
        raise AssertionError("the radix passes ran: the sampled window missed")

    monkeypatch.setattr(ties._MajoritySignPass, "__init__", no_radix)  # the fallback's last
    base, models = _ties_models()
    merged = run("ties", base, models)
    assert_close(merged, reference_ties(base, models), base, tol=1e-5)


@pytest.mark.parametrize("why", ["window missed", "too many inside"])
def test_ties_falls_back_to_the_radix_passes_with_the_same_result(monkeypatch, why):
    import contmerge.strategies.ties as ties

    base, models = _ties_models(1)
    usual = run("ties", base, models)
    if why == "window missed":  # a window below every magnitude: the k-th is never inside
        monkeypatch.setattr(ties, "sample_window", lambda *args: (0.0, 1e-30))
    else:
        monkeypatch.setattr(ties, "MAX_CANDIDATES", 0)
    radix = []
    original = ties._MajoritySignPass.__init__
    monkeypatch.setattr(
        ties._MajoritySignPass, "__init__", lambda self: radix.append(1) or original(self)
    )
    fallen_back = run("ties", base, models)
    assert len(radix) == len(models) - 1  # the radix passes, every fold after the first
    for name in base:
        assert torch.equal(fallen_back[name], usual[name]), name


def test_window_helpers_bound_and_pick_the_kth():
    from contmerge.kth import KthSmallestAbs, kth_in_window, sample_window

    g = torch.Generator().manual_seed(4)
    values = torch.randn(200_000, generator=g)
    k = 160_000
    exact = float(values.abs().kthvalue(k).values)
    sample = KthSmallestAbs(k)
    sample.update(values[::16].contiguous())
    lo, hi = sample_window(sample.histogram(), k, values.numel())
    assert lo <= exact <= hi
    magnitude = values.abs().numpy()
    inside = magnitude[(magnitude >= lo) & (magnitude <= hi)]
    assert inside.size < 0.2 * magnitude.size  # a narrow window, not the whole row
    below = int((magnitude < lo).sum())
    assert kth_in_window(k, below, inside) == exact
    assert kth_in_window(below, below, inside) is None  # the k-th lies below the window


def test_kth_counts_from_several_threads_add_up():
    from concurrent.futures import ThreadPoolExecutor

    from contmerge.kth import KthSmallestAbs

    values = torch.randn(300_001, generator=torch.Generator().manual_seed(8))
    pieces = [p.numpy() for p in values.split(7_919)]
    for k in (1, 150_000, 300_001):
        kth = KthSmallestAbs(k)
        with ThreadPoolExecutor(4) as pool:
            while not kth.done:
                list(pool.map(kth.update_array, pieces))
                kth.next_digit()
        assert kth.value == float(values.abs().kthvalue(k).values)


def test_ties_depends_on_order(setup):
    base, models = setup
    forward = run("ties", base, models)
    backward = run("ties", base, models[::-1])
    assert not torch.allclose(forward["encoder.0.weight"], backward["encoder.0.weight"])


def dare_info(name: str, shape: tuple[int, ...]) -> TensorInfo:
    return TensorInfo(name, TensorMeta(shape, torch.float32), False, torch.float32)


def test_dare_drops_with_probability_p_and_rescales_survivors():
    delta = torch.randn(200, 300)
    ctx = FoldContext(index=1, globals={})
    out = Dare(p=0.9, seed=1).transform(dare_info("w", tuple(delta.shape)), delta, ctx)
    kept = out != 0
    assert 0.08 < kept.float().mean() < 0.12
    torch.testing.assert_close(out[kept], delta[kept] / 0.1)
    again = Dare(p=0.9, seed=1).transform(dare_info("w", tuple(delta.shape)), delta, ctx)
    assert torch.equal(out, again)
    other = Dare(p=0.9, seed=2).transform(dare_info("w", tuple(delta.shape)), delta, ctx)
    assert not torch.equal(out, other)
    with pytest.raises(ValueError):
        Dare(p=1.0)


def test_dare_chain_applies_the_rule_to_dropped_deltas(setup):
    base, models = setup
    merged = run("chain(dare(p=0.5, seed=3), task_arithmetic())", base, models)
    dare = Dare(p=0.5, seed=3)
    expected = {n: base[n].double().clone() for n in float_names(base)}
    for index, tau in enumerate(deltas(base, models), start=1):
        ctx = FoldContext(index=index, globals={})
        for n in float_names(base):
            dropped = dare.transform(dare_info(n, tuple(base[n].shape)), tau[n].float(), ctx)
            expected[n] += 0.3 * dropped.double()
    assert_close(merged, expected, base)


def test_fisher_is_the_fisher_weighted_average(setup):
    base, models = setup
    g = torch.Generator().manual_seed(9)
    fishers = [
        {n: torch.rand(base[n].shape, generator=g) for n in float_names(base)} for _ in models
    ]
    for f in fishers:
        f["norm.bias"][:5] = 0  # where every Fisher is zero: plain average
    merger = Merger(base, "fisher")
    for model, fisher in zip(models, fishers):
        merger.fold(model, extras={"fisher": fisher})
    merged = merger.emit_state_dict()
    expected = {}
    for n in float_names(base):
        num = sum(f[n].double() * m[n].double() for f, m in zip(fishers, models))
        den = sum(f[n].double() for f in fishers)
        mean = sum(m[n].double() for m in models) / len(models)
        expected[n] = torch.where(den > 0, num / den.clamp(min=1e-300), mean)
    assert_close(merged, expected, base)


def test_regmean_solves_the_regression_for_linear_weights(setup):
    base, models = setup
    g = torch.Generator().manual_seed(11)
    grams = []
    for _ in models:
        grams.append({})
        for n in LINEAR:
            x = torch.randn(64, base[n].shape[1], generator=g)
            grams[-1][n] = x.T @ x
    merger = Merger(base, "regmean", linear=r"^encoder\.\d\.weight$")
    for model, gram in zip(models, grams):
        merger.fold(model, extras={"gram": gram})
    merged = merger.emit_state_dict()
    expected = {}
    for n in float_names(base):
        if n in LINEAR:
            weighted = sum(m[n].double() @ gr[n].double() for m, gr in zip(models, grams))
            total = sum(gr[n].double() for gr in grams)
            expected[n] = torch.linalg.solve(total, weighted.T).T
        else:
            expected[n] = sum(m[n].double() for m in models) / len(models)
    assert_close(merged, expected, base, tol=1e-4)


def test_strategy_needing_statistics_says_so(setup):
    base, models = setup
    with pytest.raises(Exception, match="fisher"):
        Merger(base, "fisher").fold(models[0])


@pytest.mark.parametrize("strategy", ["average", "magmax", "opcm", "ties", "task_arithmetic"])
def test_disk_and_memory_states_agree_exactly(setup, tmp_path, strategy):
    base, models = setup
    in_memory = run(strategy, base, models)
    on_disk = run(strategy, base, models, state_dir=tmp_path / "state")
    for name in base:
        assert torch.equal(in_memory[name], on_disk[name]), name


@pytest.mark.parametrize("strategy", ["average", "magmax", "opcm", "ties"])
def test_half_precision_bases_merge_in_float32(strategy):
    base = random_base(dtype=torch.bfloat16)
    models = [fine_tuned(base, s) for s in range(3)]
    merged = run(strategy, base, models)
    as_float = run(
        strategy,
        {k: (v.float() if v.is_floating_point() else v) for k, v in base.items()},
        [{k: (v.float() if v.is_floating_point() else v) for k, v in m.items()} for m in models],
    )
    for name in float_names(base):
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(merged[name], as_float[name].to(torch.bfloat16)), name


# --- a device for the per-tensor work ------------------------------------------------------


@pytest.mark.parametrize("strategy", ["opcm", "ties"])
def test_device_cpu_gives_the_same_merge(setup, strategy):
    base, models = setup
    plain = run(strategy, base, models)
    on_cpu = run(strategy, base, models, device="cpu")
    for name in base:
        assert torch.equal(on_cpu[name], plain[name]), name


def test_the_device_reaches_the_strategy_and_the_state_stays_on_the_cpu(setup):
    from contmerge.strategies.opcm import OPCM

    seen = []

    class Probe(OPCM):
        def fold(self, info, state, delta, base, ctx):
            seen.append(ctx.device)
            new = super().fold(info, state, delta, base, ctx)
            assert all(t.device.type == "cpu" for t in new.values())
            return new

    base, models = setup
    merger = Merger(base, Probe(), device="cpu")
    merger.fold(models[0])
    merger.fold(models[1])
    assert seen and set(seen) == {torch.device("cpu")}
    assert FoldContext(index=1, globals={}).to_device(torch.ones(2))[0].device.type == "cpu"


@pytest.mark.parametrize("device", ["nosuch", "meta", "cuda:7"])
def test_a_device_that_cannot_be_used_is_a_clear_error(setup, device):
    from contmerge.errors import ContmergeError

    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(ContmergeError, match=f"device '{device}' cannot be used here"):
        Merger(setup[0], "opcm", device=device)


def test_merge_command_takes_a_device(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from contmerge.cli import main

    base = random_base()
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for seed in range(3):
        paths.append(str(tmp_path / f"ft{seed}.safetensors"))
        save_file(fine_tuned(base, seed), paths[-1])
    common = ["merge", "--base", str(tmp_path / "base.safetensors"), "--strategy", "opcm"]
    out = str(tmp_path / "merged.safetensors")
    state = str(tmp_path / "state")
    assert (
        main([*common, "--state", state, "--quiet", "--device", "cpu", "--out", out, *paths]) == 0
    )
    expected = run("opcm", base, [load_file(p) for p in paths])
    merged = load_file(out)
    assert all(torch.equal(merged[n], expected[n]) for n in base)
    capsys.readouterr()
    assert main([*common, "--state", str(tmp_path / "s2"), "--device", "nosuch", *paths]) == 1
    assert "device 'nosuch' cannot be used here" in capsys.readouterr().err
