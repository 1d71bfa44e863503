"""DIMAT: topologies, permutation specs, the pairwise merge and the WA baseline."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import scipy.optimize
import torch
from torch import nn

from contmerge.simulations.cnn import CNNConfig, SmallResNet, resnet_spec
from contmerge.strategies import dimat as D

CFG = CNNConfig(width=6, blocks_per_stage=2, num_classes=5)


def resnet() -> SmallResNet:
    return SmallResNet(CFG)


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(784, 24),
        nn.BatchNorm1d(24),
        nn.ReLU(),
        nn.Linear(24, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )


MODELS = {"resnet": (resnet, resnet_spec(CFG)), "mlp": (mlp, D.sequential_spec(mlp()))}


def init_state(factory, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return factory().state_dict()


def calibration(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 784, generator=g) for n in (40, 40, 24)]  # uneven last batch


def random_perms(spec: D.PermutationSpec, state, seed: int) -> D.Permutations:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randperm(n, generator=g) for name, n in spec.sizes(state).items()}


def model_from(factory, state) -> nn.Module:
    model = factory()
    model.load_state_dict(state)
    return model.eval()


# ------------------------------------------------------------------------------------------
# Topologies


def test_topology_rows_match_the_reference():
    fc = D.make_topology("fc", 4)
    assert np.allclose(fc.pi, 0.25) and fc.neighbours(2) == [0, 1, 3]
    r = D.make_topology("ring", 5)
    assert np.allclose(r.pi[0], [1 / 3, 1 / 3, 0, 0, 1 / 3])
    assert r.neighbours(0) == [1, 4] and r.neighbours(4) == [0, 3]
    b5 = D.make_topology("bipartite", 5)
    assert np.allclose(b5.pi[0], [0.5, 0, 0, 0.25, 0.25])
    assert np.allclose(b5.pi[3], [0.25, 0.25, 0.25, 0.25, 0])
    assert np.allclose(b5.pi[4], [0.25, 0.25, 0.25, 0, 0.25])
    assert np.allclose(b5.pi.sum(0), 1)  # doubly stochastic at N = 5
    b10 = D.make_topology("bipartite", 10)
    leaf = np.zeros(10)
    leaf[[0, 8, 9]] = [0.78, 0.11, 0.11]
    assert np.allclose(b10.pi[0], leaf)
    hub = np.full(10, 0.11)
    hub[8], hub[9] = 0.12, 0.0
    assert np.allclose(b10.pi[8], hub)
    assert b10.neighbours(0) == [8, 9] and b10.neighbours(9) == list(range(8))
    assert np.isclose(D.make_topology("bipartite", 20).pi[0, 0], 0.9)
    assert np.array_equal(D.make_topology("disconnected", 3).pi, np.eye(3))
    for name in D.TOPOLOGIES:
        assert np.allclose(D.make_topology(name, 6).pi.sum(1), 1)


def test_topology_validation():
    with pytest.raises(ValueError, match="at least 3"):
        D.make_topology("ring", 2)
    with pytest.raises(ValueError, match="unknown topology"):
        D.make_topology("star", 4)
    with pytest.raises(ValueError, match="sums to"):
        D.topology_from_matrix([[0.5, 0.4], [0.5, 0.5]])
    with pytest.raises(ValueError, match="negative"):
        D.topology_from_matrix([[1.5, -0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="square"):
        D.topology_from_matrix([[1.0, 0.0]])
    custom = D.topology_from_matrix([[0.7, 0.3, 0], [0, 1, 0], [0.2, 0.2, 0.6]])
    assert custom.neighbours(0) == [1] and custom.neighbours(1) == []
    assert D.neighbourhood(custom, 2) == (0.6, [(0, 0.2), (1, 0.2)])


# ------------------------------------------------------------------------------------------
# Permutation specs


@pytest.mark.parametrize("kind", MODELS)
def test_permuting_hidden_units_preserves_the_function(kind):
    factory, spec = MODELS[kind]
    state = init_state(factory, 0)
    x = calibration()[0]
    D.reset_bn(model_from(factory, state), calibration())  # non-trivial running statistics
    perms = random_perms(spec, state, 1)
    assert all(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    permuted = D.apply_permutations(state, spec, perms)
    assert any(not torch.equal(permuted[k], state[k]) for k in state)
    with torch.no_grad():
        out, out_p = model_from(factory, state)(x), model_from(factory, permuted)(x)
    torch.testing.assert_close(out_p, out, rtol=1e-5, atol=1e-5)


def test_resnet_spec_covers_every_channel_tensor():
    """Every conv/BN/linear-input tensor is permuted on its channel axes (no unit left behind)."""
    state = resnet().state_dict()
    moves = resnet_spec(CFG).by_key()
    for key, t in state.items():
        if key.endswith("num_batches_tracked") or key == "linear.bias":
            assert key not in moves
        elif key == "conv1.weight":
            assert [a for a, _ in moves[key]] == [0]  # image channels are not permuted
        elif key == "linear.weight":
            assert [a for a, _ in moves[key]] == [1]  # logits stay aligned
        elif t.dim() == 4:
            assert sorted(a for a, _ in moves[key]) == [0, 1], key
        else:
            assert [a for a, _ in moves[key]] == [0], key
    # a residual stream shares ONE permutation across all blocks that add into it
    stream1 = {k for k, _ in resnet_spec(CFG).points[0].axes}
    assert {"bn1.weight", "layer1.0.bn2.weight", "layer1.1.bn2.weight"} <= stream1


def test_spec_validation_errors():
    state = mlp().state_dict()
    bad_size = D.PermutationSpec((D.AlignmentPoint("p", "3", (("0.weight", 0), ("3.weight", 0))),))
    with pytest.raises(ValueError, match="units"):
        bad_size.sizes(state)
    twice = D.PermutationSpec(
        (
            D.AlignmentPoint("a", "3", (("0.weight", 0),)),
            D.AlignmentPoint("b", "3", (("0.weight", 0),)),
        )
    )
    with pytest.raises(ValueError, match="two points"):
        twice.sizes(state)
    with pytest.raises(ValueError, match="no tensor"):
        D.PermutationSpec((D.AlignmentPoint("a", "3", (("nope", 0),)),)).sizes(state)
    with pytest.raises(ValueError, match="cannot handle"):
        D.sequential_spec(nn.Sequential(nn.Linear(4, 4), nn.Flatten(), nn.Linear(4, 2)))


# ------------------------------------------------------------------------------------------
# The merge


@pytest.mark.parametrize("kind", MODELS)
def test_merging_a_permuted_copy_recovers_the_original(kind):
    factory, spec = MODELS[kind]
    calib = calibration()
    state = init_state(factory, 0)
    perms = random_perms(spec, state, 1)
    permuted = D.apply_permutations(state, spec, perms)
    fold = D.DimatFold(state, 0.5, model_factory=factory, spec=spec, calibration=calib)
    found = fold.add(permuted, 0.5)
    merged = fold.finish()
    for name, perm in perms.items():  # the matching undoes the permutation exactly
        assert torch.equal(perm[found[name]], torch.arange(len(perm))), name
    expected = D.reset_bn(model_from(factory, state), calib).state_dict()
    for key, value in expected.items():
        if key.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(merged[key], value), key


def _kway_reference(factory, spec, anchor, others, weights, calib):
    """DIMAT's K-way merge all at once, written like the reference: BN reset of every model,
    one joint forward pass, correlation from the joint (K·d)² covariance, the anchor-vs-j
    blocks solved, permutation matrices applied, Σ w_j P_j(θ_j), BN reset of the result."""
    models = [D.reset_bn(model_from(factory, s), calib) for s in (anchor, *others)]
    feats: dict[str, list[torch.Tensor]] = {}

    def hook_for(k: int, name: str):
        def hook(_m, args):
            x = args[0]
            feats.setdefault(name, [None] * len(models))[k] = (
                x.transpose(0, 1).reshape(x.shape[1], -1).double()
            )

        return hook

    handles = []
    for k, model in enumerate(models):
        named = dict(model.named_modules())
        for p in spec.points:
            handles.append(named[p.tap].register_forward_pre_hook(hook_for(k, p.name)))
    sums: dict[str, list] = {}
    numel = 0
    with torch.no_grad():
        for x in calib:
            for model in models:
                model(x)
            numel += len(x)
            for name, per_model in feats.items():
                joint = torch.cat(per_model, 0)
                mean, outer = joint.mean(1), joint @ joint.T / joint.shape[1]
                acc = sums.setdefault(name, [0.0, 0.0])
                acc[0] = acc[0] + mean * len(x)
                acc[1] = acc[1] + outer * len(x)
    for h in handles:
        h.remove()
    mats: list[dict[str, torch.Tensor]] = [{} for _ in models]
    for name, (mean, outer) in sums.items():
        mean, outer = mean / numel, outer / numel
        cov = outer - torch.outer(mean, mean)
        std = cov.diagonal().sqrt()
        corr = cov / torch.outer(std, std).clamp_min(1e-7)
        d = len(mean) // len(models)
        mats[0][name] = torch.eye(d, dtype=torch.float32)
        for j in range(1, len(models)):
            _, col = scipy.optimize.linear_sum_assignment(
                corr[:d, j * d : (j + 1) * d].numpy(), maximize=True
            )
            mats[j][name] = torch.eye(d)[torch.as_tensor(col)].T  # M[col[k], k] = 1
    merged = {}
    moves = spec.by_key()
    for key in anchor:
        if not anchor[key].is_floating_point():
            merged[key] = anchor[key].clone()
            continue
        total = 0
        for model, mat, w in zip(models, mats, weights):
            t = model.state_dict()[key]
            for axis, name in moves.get(key, ()):
                t = torch.movedim(torch.tensordot(mat[name].T, t, dims=([1], [axis])), 0, axis)
            total = total + w * t
        merged[key] = total
    return D.reset_bn(model_from(factory, merged), calib).state_dict(), mats


@pytest.mark.parametrize("kind", MODELS)
def test_pairwise_fold_equals_the_kway_merge(kind, tmp_path):
    factory, spec = MODELS[kind]
    calib = calibration(3)
    states = [init_state(factory, s) for s in range(4)]
    weights = [0.4, 0.3, 0.2, 0.1]
    expected, mats = _kway_reference(factory, spec, states[0], states[1:], weights, calib)

    # neighbours streamed from disk, one at a time
    paths = []
    for k, s in enumerate(states[1:]):
        paths.append(tmp_path / f"n{k}.safetensors")
        safetensors.torch.save_file(s, str(paths[-1]))
    fold = D.DimatFold(states[0], weights[0], model_factory=factory, spec=spec, calibration=calib)
    found = [fold.add(p, w) for p, w in zip(paths, weights[1:])]
    merged = fold.finish()

    nontrivial = 0
    for j, perms in enumerate(found, start=1):
        for name, perm in perms.items():
            assert torch.equal(mats[j][name].T.argmax(1), perm), (j, name)
            nontrivial += not torch.equal(perm, torch.arange(len(perm)))
    assert nontrivial > 0  # different inits really get reordered
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # the convenience wrapper is the same fold
    again = D.dimat_merge(
        states[0],
        weights[0],
        zip(weights[1:], paths),
        model_factory=factory,
        spec=spec,
        calibration=calib,
    )
    for key, value in merged.items():
        assert torch.equal(again[key], value), key


def test_merge_differs_from_plain_averaging_and_checks_weights():
    factory, spec = MODELS["resnet"]
    calib = calibration()
    a, b = init_state(factory, 0), init_state(factory, 1)
    merged = D.dimat_merge(a, 0.5, [(0.5, b)], model_factory=factory, spec=spec, calibration=calib)
    avg = D.weighted_average([(0.5, a), (0.5, b)])
    assert not torch.allclose(merged["layer1.0.conv1.weight"], avg["layer1.0.conv1.weight"])
    fold = D.DimatFold(a, 0.5, model_factory=factory, spec=spec, calibration=calib)
    fold.add(b, 0.3)
    with pytest.raises(ValueError, match="sum to"):
        fold.finish()


def test_weighted_average_is_the_plain_weighted_sum():
    factory = MODELS["resnet"][0]
    states = [init_state(factory, s) for s in range(3)]
    for s in states:  # distinct buffers, so averaging them is observable
        for k, v in s.items():
            if k.endswith("running_mean"):
                v.normal_()
    w = [0.5, 0.3, 0.2]
    out = D.weighted_average(list(zip(w, states)))
    for key in states[0]:
        if states[0][key].is_floating_point():
            ref = w[0] * states[0][key] + w[1] * states[1][key] + w[2] * states[2][key]
            torch.testing.assert_close(out[key], ref, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(out[key], states[0][key])
    with pytest.raises(ValueError, match="sum to"):
        D.weighted_average([(0.5, states[0])])


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.register_buffer("scale", torch.full((3,), 2.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


def test_build_model_assigns_weights_and_keeps_non_persistent_buffers(tmp_path):
    state = init_state(_Scaled, 0)
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(state, str(path))
    model = D.build_model(_Scaled, path)
    assert torch.equal(model.fc.weight, state["fc.weight"])
    assert torch.equal(model.scale, torch.full((3,), 2.0))  # not left on the meta device
    assert not model.training


# ------------------------------------------------------------------------------------------
# Diagnostics and the reference's BatchNorm momentum


@pytest.mark.parametrize("kind", MODELS)
def test_diagnostics_say_how_far_each_assignment_is_from_the_identity(kind):
    factory, spec = MODELS[kind]
    calib = calibration()
    state = init_state(factory, 0)
    fold = D.DimatFold(state, 0.5, model_factory=factory, spec=spec, calibration=calib)
    fold.add(state, 0.25)  # the same model: every unit matches its own index
    perms = random_perms(spec, state, 1)
    fold.add(D.apply_permutations(state, spec, perms), 0.25)
    same, permuted = fold.diagnostics
    assert set(same) == set(permuted) == {p.name for p in spec.points}
    for name, d in same.items():
        assert d.identity == 1.0, name
        assert d.matched == pytest.approx(d.diagonal)
    for name, d in permuted.items():
        expected = float((perms[name] == torch.arange(len(perms[name]))).double().mean())
        assert d.identity == pytest.approx(expected), name
        assert d.matched > d.diagonal, name  # the assignment found better pairs than the index


def test_cumulative_bn_keeps_averaging_from_the_reset_as_the_reference():
    factory = MODELS["mlp"][0]
    calib = calibration()
    model = D.reset_bn(model_from(factory, init_state(factory, 0)), calib)
    bn = model[1]
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == len(calib)
    after_reset = bn.running_mean.clone()
    D.cumulative_bn(model).train()
    extra = torch.rand(40, 784, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        batch_mean = model[0](extra).mean(0)
        model(extra)
    # momentum None: running stats are the plain average over every batch since the reset
    k = len(calib) + 1
    torch.testing.assert_close(bn.running_mean, ((k - 1) * after_reset + batch_mean) / k)
    assert bn.momentum is None
