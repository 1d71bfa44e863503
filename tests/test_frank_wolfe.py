"""FW-Merging: the LMO, layer-wise composition, convergence, streaming and continual arrivals."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from contmerge.strategies.frank_wolfe import ClassifierObjective, FrankWolfeMerger
from contmerge.tensorfile import write_safetensors

HARD_COEF_T0 = (2 / 2 * 0.1) * 0.3  # the authors' first step: γ_0·λ


class LinearObjective:
    """ℓ(θ) = Σ_p ⟨G_p, θ_p⟩: the gradient is G wherever θ is (hand-built gradients)."""

    def __init__(self, grads: Mapping[str, Tensor], tasks: tuple[str, ...] = ("lin",)) -> None:
        self.grads = dict(grads)
        self.tasks = list(tasks)

    def loss(self, params: Mapping[str, Tensor], task: str) -> Tensor:
        return sum((self.grads[n] * params[n]).sum() for n in self.grads)

    def adaptation_loss(self, params: Mapping[str, Tensor], task: str, step: int) -> Tensor:
        return self.loss(params, task)


class QuadraticObjective:
    """ℓ(θ) = ½‖θ − c‖², L = 1; its minimiser over a hull that contains c is c."""

    def __init__(self, target: Mapping[str, Tensor]) -> None:
        self.target = dict(target)
        self.tasks = ["quad"]

    def loss(self, params: Mapping[str, Tensor], task: str) -> Tensor:
        return 0.5 * sum(((params[n] - c) ** 2).sum() for n, c in self.target.items())

    def adaptation_loss(self, params: Mapping[str, Tensor], task: str, step: int) -> Tensor:
        return self.loss(params, task)

    def value(self, theta: Mapping[str, Tensor]) -> float:
        return float(self.loss({n: theta[n].double() for n in self.target}, "quad"))


def t(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


def cos(a: Tensor, b: Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


# --- the LMO ----------------------------------------------------------------------------------


def hand_built() -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """Three candidates: 'aligned' has the lowest summed cosine, 'huge' the lowest ⟨g, s⟩."""
    grads = {"a": t(1.0, 0.0), "b": t(0.0, 1.0)}
    base = {"a": t(0.5, 0.5), "b": t(0.5, 0.5)}
    pool = {
        "weak": {"a": t(-1.0, 0.1), "b": t(1.0, 0.0)},  # cos −0.995 + 0
        "aligned": {"a": t(-10.0, 30.0), "b": t(0.0, -10.0)},  # cos −0.316 − 1
        "huge": {"a": t(-100.0, 1000.0), "b": t(1000.0, -100.0)},  # cos −0.0995 ×2, ⟨g,s⟩ −200
    }
    return base, pool, grads


def test_lmo_picks_the_candidate_with_the_smallest_summed_cosine() -> None:
    base, pool, grads = hand_built()
    expected = {
        label: sum(cos(grads[n], c[n]) for n in grads) for label, c in pool.items()
    }  # computed independently of the merger
    best = min(expected, key=expected.get)
    assert best == "aligned"
    fw = FrankWolfeMerger(base, pool, LinearObjective(grads), init="base", keep_initial=False)
    (record,) = fw.run(1)
    assert record.selected() == ["aligned"]
    assert record.scores["all"] == pytest.approx(expected, abs=1e-6)
    merged = fw.merged()
    for n in base:  # θ ← θ + (s − θ)·γ_0λ, exactly as the authors' merge call computes it
        assert torch.equal(merged[n], base[n] + (pool["aligned"][n] - base[n]) * HARD_COEF_T0)
    # the paper's linear LMO argmin ⟨g, s⟩ picks the huge-norm candidate instead
    linear = FrankWolfeMerger(
        base, pool, LinearObjective(grads), init="base", keep_initial=False, lmo="inner_product"
    )
    assert linear.run(1)[0].selected() == ["huge"]


def test_lmo_matches_a_brute_force_argmin_on_random_candidates() -> None:
    g = torch.Generator().manual_seed(3)
    shapes = {"w": (5, 4), "b": (5,), "v": (3, 5)}
    grads = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    pool = [
        {n: torch.randn(s, generator=g) * (1 + 5 * k) for n, s in shapes.items()} for k in range(7)
    ]
    totals = [sum(cos(grads[n], c[n]) for n in shapes) for c in pool]
    per_tensor = {n: min(range(7), key=lambda k, n=n: cos(grads[n], pool[k][n])) for n in shapes}
    fw = FrankWolfeMerger(base, pool, LinearObjective(grads), init="base", keep_initial=False)
    assert fw.run(1)[0].selected() == [f"candidate-{min(range(7), key=totals.__getitem__)}"]

    def layer_choices(uphill: str) -> dict:
        layer = FrankWolfeMerger(
            base, pool, LinearObjective(grads), granularity="layer", init="base",
            keep_initial=False, uphill_layers=uphill,
        )  # fmt: skip
        return layer.run(1)[0].choices["all"]

    argmin, skip = layer_choices("argmin"), layer_choices("skip")
    for n in shapes:
        best = cos(grads[n], pool[per_tensor[n]][n])
        assert argmin[n] == f"candidate-{per_tensor[n]}"  # the authors' ViT code: always
        assert skip[n] == (f"candidate-{per_tensor[n]}" if best < 0 else None)


@pytest.mark.parametrize("uphill", ["argmin", "skip", "zero"])
def test_layer_wise_composes_per_tensor_choices_and_follows_the_uphill_rule(uphill: str) -> None:
    grads = {"p": t(1.0, 0.0), "q": t(0.0, 1.0), "r": t(1.0, 1.0)}
    base = {"p": t(0.2, 0.1), "q": t(0.3, -0.4), "r": t(0.5, 0.6)}
    pool = {
        "A": {"p": t(-2.0, 0.0), "q": t(1.0, 0.0), "r": t(1.0, 0.0)},  # best on p
        "B": {"p": t(1.0, 1.0), "q": t(0.0, -3.0), "r": t(0.1, 2.0)},  # best on q
    }  # on r both cosines are > 0 (A: 0.71, B: 0.74): no candidate points downhill
    fw = FrankWolfeMerger(
        base, pool, LinearObjective(grads), granularity="layer", init="base", keep_initial=False,
        uphill_layers=uphill,
    )  # fmt: skip
    (record,) = fw.run(1)
    on_r = {"argmin": "A", "skip": None, "zero": "zeros"}[uphill]
    assert record.choices["all"] == {"p": "A", "q": "B", "r": on_r}
    merged = fw.merged()
    assert torch.equal(merged["p"], base["p"] + (pool["A"]["p"] - base["p"]) * HARD_COEF_T0)
    assert torch.equal(merged["q"], base["q"] + (pool["B"]["q"] - base["q"]) * HARD_COEF_T0)
    expected_r = {
        "argmin": base["r"] + (pool["A"]["r"] - base["r"]) * HARD_COEF_T0,  # the ViT code
        "skip": base["r"],
        "zero": base["r"] + (0 - base["r"]) * HARD_COEF_T0,  # the NLP code: toward zeros
    }[uphill]
    torch.testing.assert_close(merged["r"], expected_r, rtol=0, atol=1e-7)
    # the gap counts s_r = 0 for a zero choice, and nothing for a skipped tensor
    gap_r = {"argmin": float(grads["r"] @ (base["r"] - pool["A"]["r"])), "skip": 0.0,
             "zero": float(grads["r"] @ base["r"])}[uphill]  # fmt: skip
    gap_pq = float(
        grads["p"] @ (base["p"] - pool["A"]["p"]) + grads["q"] @ (base["q"] - pool["B"]["q"])
    )
    assert record.fw_gap["all"] == pytest.approx(gap_pq + gap_r)
    # task-wise cannot compose: it moves every tensor toward one candidate
    task = FrankWolfeMerger(base, pool, LinearObjective(grads), init="base", keep_initial=False)
    assert len(task.run(1)[0].selected()) == 1


# --- convergence on a known hull --------------------------------------------------------------


def sphere_vertices(count: int, dim: int, seed: int) -> list[Tensor]:
    """Vertices of equal norm around the origin: the cosine LMO equals argmin ⟨g, v⟩ there."""
    g = torch.Generator().manual_seed(seed)
    vs = [torch.randn(dim, generator=g, dtype=torch.float64) for _ in range(count)]
    return [2.0 * v / v.norm() for v in vs]


@pytest.mark.parametrize("lmo", ["cosine", "inner_product"])
def test_fw_iterates_decrease_a_quadratic_and_reach_the_known_minimiser(lmo: str) -> None:
    vertices = sphere_vertices(6, 4, seed=1)
    alpha = torch.tensor([0.3, 0.1, 0.2, 0.15, 0.05, 0.2], dtype=torch.float64)
    target = {"x": sum(a * v for a, v in zip(alpha, vertices))}
    objective = QuadraticObjective(target)
    diameter = max(float((a - b).norm()) for a in vertices for b in vertices)
    fw = FrankWolfeMerger(
        {"x": vertices[0]},
        [{"x": v} for v in vertices[1:]],
        objective,
        init="base",
        step_size=1.0,  # classic FW: γ_t = 2/(t+2), so the O(1/t) bound below applies
        scaling_factor=1.0,
        lmo=lmo,
    )
    values = [objective.value(fw.merged())]
    for _ in range(300):
        fw.run(1)
        values.append(objective.value(fw.merged()))
    for k, value in enumerate(values[1:], start=1):  # ℓ(θ_k) − ℓ* ≤ 2LD²/(k+1), ℓ* = 0
        assert value <= 2 * diameter**2 / (k + 1) + 1e-12
    assert values[-1] < 1e-3 * values[0]
    assert float((fw.merged()["x"] - target["x"]).norm()) < 0.02 * diameter


def test_layer_wise_reaches_a_minimiser_that_task_wise_cannot() -> None:
    """Over a product of hulls the per-tensor LMO is block FW; one whole model per step is not."""
    vx, vy = sphere_vertices(4, 3, seed=2), sphere_vertices(4, 3, seed=5)
    ax = torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64)
    ay = torch.tensor([0.1, 0.1, 0.1, 0.7], dtype=torch.float64)
    target = {"x": sum(a * v for a, v in zip(ax, vx)), "y": sum(a * v for a, v in zip(ay, vy))}
    objective = QuadraticObjective(target)
    pool = [{"x": vx[k], "y": vy[k]} for k in range(4)]
    start = {"x": sum(vx) / 4, "y": sum(vy) / 4}

    def final(granularity: str) -> float:
        fw = FrankWolfeMerger(
            start,
            pool,
            objective,
            granularity=granularity,
            init="base",
            keep_initial=False,
            step_size=1.0,
            scaling_factor=1.0,
            lmo="inner_product",
        )
        fw.run(400)
        return objective.value(fw.merged())

    assert final("layer") < 1e-3
    assert final("task") > 0.05  # the joint hull does not contain the target


# --- streaming from disk ----------------------------------------------------------------------


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.fc2(torch.relu(self.norm(self.fc1(x)))))


def tiny_setup(n_candidates: int = 5) -> tuple[dict, list[dict], ClassifierObjective]:
    torch.manual_seed(0)
    net = TinyNet()
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    pool = [
        {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        for _ in range(n_candidates)
    ]
    heads = {task: nn.Linear(4, 3) for task in ("t0", "t1")}
    labelled = {
        task: (torch.randn(20, 6, generator=g), torch.randint(0, 3, (20,), generator=g))
        for task in heads
    }
    unlabelled = {task: torch.randn(40, 6, generator=g) for task in heads}
    return base, pool, ClassifierObjective(net, heads, labelled, unlabelled, seed=1)


def save_pool(tmp: Path, base: dict, pool: list[dict]) -> tuple[Path, list[Path]]:
    def save(path: Path, tensors: dict) -> Path:
        with open(path, "wb") as handle:
            write_safetensors(handle, tensors)
        return path

    pool_dir = tmp / "pool"
    pool_dir.mkdir()
    paths = [save(pool_dir / f"candidate-{k}.safetensors", c) for k, c in enumerate(pool)]
    return save(tmp / "base.safetensors", base), paths


@pytest.mark.parametrize(
    ("variant", "granularity"), [("hard", "task"), ("hard", "layer"), ("soft", "task")]
)
def test_streaming_from_disk_is_bitwise_the_in_memory_pool(
    tmp_path: Path, variant: str, granularity: str
) -> None:
    base, pool, objective = tiny_setup()
    base_path, paths = save_pool(tmp_path, base, pool)
    kwargs = {"variant": variant, "granularity": granularity, "ada_iters": 20, "max_iters": 4}
    memory = FrankWolfeMerger(base, pool, objective, **kwargs)
    memory.run()
    disk = FrankWolfeMerger(base_path, tmp_path / "pool", objective, **kwargs)
    disk.run()
    a, b = memory.merged(), disk.merged()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [r.choices for r in memory.history] == [r.choices for r in disk.history]
    assert any(not torch.equal(a[n], base[n]) for n in a)  # it did move


def reference_hard(base: dict, pool: list[dict], objective: ClassifierObjective, iters: int):
    """The authors' fw_hard.py loop, every model in memory (no streaming), for comparison."""
    names = list(base)
    tv = None
    for model in pool:
        d = {n: model[n] - base[n] for n in names}
        tv = d if tv is None else {n: tv[n] + d[n] for n in names}
    theta = {n: base[n] + tv[n] * 0.3 for n in names}
    candidates = [*pool, {n: v.clone() for n, v in theta.items()}]
    for step_idx in range(iters):
        params = {n: theta[n].detach().requires_grad_(True) for n in names}
        loss = sum(objective.loss(params, task) for task in objective.tasks)
        grads = dict(zip(names, torch.autograd.grad(loss, list(params.values()))))
        scores = [sum(cos(grads[n], c[n]) for n in names) for c in candidates]
        s = candidates[min(range(len(scores)), key=scores.__getitem__)]
        step = 2 / (step_idx + 2) * 0.1
        theta = {n: theta[n] + (s[n] - theta[n]) * (step * 0.3) for n in names}
    return theta


def test_streamed_hard_variant_matches_the_authors_in_memory_loop(tmp_path: Path) -> None:
    base, pool, objective = tiny_setup()
    base_path, paths = save_pool(tmp_path, base, pool)
    fw = FrankWolfeMerger(base_path, paths, objective)
    fw.run()
    expected = reference_hard(base, pool, objective, 10)
    merged = fw.merged()
    for n in base:
        torch.testing.assert_close(merged[n], expected[n], rtol=0, atol=1e-6)


# --- continual arrivals -----------------------------------------------------------------------


def test_an_arrival_changes_nothing_until_iterations_run() -> None:
    base, pool, objective = tiny_setup(6)
    early, late = pool[:4], pool[4:]
    fw = FrankWolfeMerger(base, early, objective)
    fw.run(3)
    before = fw.merged()
    history = [r.choices for r in fw.history]
    for candidate in late:
        assert fw.add(candidate) == []
    after = fw.merged()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert fw.iteration == 3 and [r.choices for r in fw.history] == history
    assert len(fw.pool) == 6


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_an_arrival_acts_only_through_further_iterations(granularity: str) -> None:
    """Continuing after an arrival = FW from the same θ and step schedule on the grown pool."""
    base, pool, objective = tiny_setup(5)
    early, new = pool[:4], pool[4]
    kw = {"granularity": granularity, "init": "base", "keep_initial": False}
    fw = FrankWolfeMerger(base, early, objective, **kw)
    fw.run(3)
    snapshot = fw.merged()
    fw.add(new, label="new", iterations=4)
    fresh = FrankWolfeMerger(
        base,
        {**{f"c{k}": c for k, c in enumerate(early)}, "new": new},
        objective,
        **{**kw, "init": snapshot},
    )
    fresh.iteration = 3  # the schedule γ_t continues at t = 3
    fresh.run(4)
    a, b = fw.merged(), fresh.merged()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_downhill_arrival_is_picked_and_moves_the_merge() -> None:
    grads = {"a": t(1.0, -1.0), "b": t(2.0, 0.5)}
    base = {"a": t(0.0, 0.0), "b": t(0.0, 0.0)}
    pool = [{"a": t(1.0, 1.0), "b": t(0.5, -1.0)}, {"a": t(-1.0, 0.5), "b": t(1.0, 1.0)}]
    objective = LinearObjective(grads)
    with_arrival = FrankWolfeMerger(base, pool, objective)
    without = FrankWolfeMerger(base, pool, objective)
    with_arrival.run(2)
    without.run(2)
    arrival = {n: -3.0 * g for n, g in grads.items()}  # cosine −1 on every tensor
    records = with_arrival.add(arrival, label="arrival", iterations=2)
    without.run(2)
    assert [r.selected() for r in records] == [["arrival"], ["arrival"]]
    assert "arrival" not in {c for r in without.history for c in r.selected()}
    a, b = with_arrival.merged(), without.merged()
    assert objective.loss(a, "lin") < objective.loss(b, "lin")


# --- the soft variant -------------------------------------------------------------------------


def test_soft_picks_distinct_candidates_per_task_and_starts_as_task_arithmetic() -> None:
    grads = {"a": t(1.0, 0.0), "b": t(0.0, 1.0)}
    base = {"a": t(0.1, 0.2), "b": t(-0.3, 0.4)}
    pool = {
        "best": {"a": t(-1.0, 0.0), "b": t(0.0, -1.0)},
        "second": {"a": t(-1.0, 0.2), "b": t(0.1, -1.0)},
        "bad": {"a": t(1.0, 0.0), "b": t(0.0, 1.0)},
    }
    objective = LinearObjective(grads, tasks=("t0", "t1"))  # both tasks share one gradient
    fw = FrankWolfeMerger(base, pool, objective, variant="soft", ada_iters=0)
    (record,) = fw.run(1)
    assert record.selected("t0") == ["best"] and record.selected("t1") == ["second"]
    merged = fw.merged()
    for n in base:  # w starts at 0.3 at t = 0: θ0 + 0.3·Σ_j (s_j − θ0)
        expected = base[n] + 0.3 * (pool["best"][n] - base[n]) + 0.3 * (pool["second"][n] - base[n])
        torch.testing.assert_close(merged[n], expected, rtol=0, atol=1e-7)
    lone = FrankWolfeMerger(base, {"only": pool["best"]}, objective, variant="soft", ada_iters=0)
    assert list(lone.run(1)[0].choices) == ["t0"]  # stops once every candidate is taken


def test_soft_coefficients_lower_the_entropy_they_are_trained_on() -> None:
    base, pool, objective = tiny_setup()

    def entropy(fw: FrankWolfeMerger) -> float:
        params = fw.merged()
        losses = [
            float(objective.adaptation_loss(params, task, k))
            for task in objective.tasks
            for k in range(3)
        ]
        return sum(losses) / len(losses)

    untrained = FrankWolfeMerger(base, pool, objective, variant="soft", ada_iters=0)
    trained = FrankWolfeMerger(base, pool, objective, variant="soft", ada_iters=150, ada_lr=1e-2)
    untrained.run(1)
    trained.run(1)
    assert entropy(trained) < entropy(untrained)
    assert math.isfinite(entropy(trained))


# --- the AdaMerging start and the presets -----------------------------------------------------


def reference_adamerging(base: dict, pool: list[dict], objective, steps: int, lr: float) -> dict:
    """Layer-wise AdaMerging with every task vector in memory and autograd through the merge."""
    names = list(base)
    tvs = [{n: c[n] - base[n] for n in names} for c in pool]
    w = torch.full((len(pool), len(names)), 0.3, requires_grad=True)
    optimizer = torch.optim.Adam([w], lr=lr)

    def merge(weights: Tensor) -> dict:
        return {
            n: base[n] + sum(weights[i, j] * tvs[i][n] for i in range(len(pool)))
            for j, n in enumerate(names)
        }

    for step in range(steps):
        params = merge(w)
        loss = sum(objective.adaptation_loss(params, task, step) for task in objective.tasks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merge(w.detach())


def test_streamed_adamerging_start_matches_autograd_through_the_merge(tmp_path: Path) -> None:
    base, pool, objective = tiny_setup(4)
    base_path, paths = save_pool(tmp_path, base, pool)
    fw = FrankWolfeMerger(
        base_path, paths, objective, init="adamerging", adamerging_iters=25, adamerging_lr=1e-2
    )
    start = fw.merged()
    expected = reference_adamerging(base, pool, objective, 25, 1e-2)
    for n in base:
        torch.testing.assert_close(start[n], expected[n], rtol=0, atol=2e-5)
    record = fw.start_record
    assert record["kind"] == "adamerging" and record["loss_last"] < record["loss_first"]
    coefficients = record["mean_coefficient"]
    assert len(coefficients) == 4 and any(abs(c - 0.3) > 1e-3 for c in coefficients.values())
    # with no Adam step the start is task arithmetic at λ = 0.3, kept as the "initial" candidate
    plain = FrankWolfeMerger(base_path, paths, objective, init="adamerging", adamerging_iters=0)
    ta = FrankWolfeMerger(base_path, paths, objective)
    for n in base:
        torch.testing.assert_close(plain.merged()[n], ta.merged()[n], rtol=0, atol=1e-6)
    assert fw.run(1)[0].scores["all"].keys() == {*(p.stem for p in paths), "initial"}


def test_presets_are_the_yaml_defaults_and_the_readme_headlines() -> None:
    base, pool, objective = tiny_setup(3)
    hard = FrankWolfeMerger.from_preset("hard", base, pool, objective)
    assert (hard.init, hard.max_iters, hard.step_size, hard.granularity) == (
        "task_arithmetic",
        10,
        0.1,
        "task",
    )
    headline = FrankWolfeMerger.from_preset("hard-headline", base, pool, objective, max_iters=1)
    assert (headline.init, headline.max_iters, headline.step_size, headline.granularity) == (
        "adamerging",
        1,
        0.01,
        "layer",
    )
    soft = FrankWolfeMerger.from_preset("soft-headline", base, pool, objective)
    assert (soft.variant, soft.max_iters, soft.ada_coeff, soft.init) == ("soft", 5, 1e-2, "base")
    assert FrankWolfeMerger.from_preset("soft", base, pool, objective).ada_coeff == 1e-8
    with pytest.raises(ValueError, match="unknown preset"):
        FrankWolfeMerger.from_preset("fastest", base, pool, objective)
    with pytest.raises(ValueError, match="soft has none"):
        FrankWolfeMerger(base, pool, objective, variant="soft", uphill_layers="zero")
