"""Small real models and data for the FW/DIMAT door tests: MLPs fine-tuned on Fashion-MNIST
(sklearn digits where it is missing), written as safetensors, with the objective and calibration
files of contmerge.objectives. ``mlp`` and ``bn_mlp`` are the entry points the files name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from contmerge.simulations.data import fashion_available, load_digits_28, load_fashion

PIXELS = 14 * 14  # 2×2-pooled images: small models, quick tests
HIDDEN = 32


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(PIXELS, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


def bn_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(PIXELS, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10)
    )


#: the dataset the ``objective`` entry point reads (set by the test that uses it)
OBJECTIVE_FILE = ""


def objective() -> object:
    """An entry point returning an Objective (here: the one of a dataset file)."""
    from contmerge.objectives import load_objective

    return load_objective(OBJECTIVE_FILE)


def images(n: int = 3000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` real images (pooled to 14×14, scaled to [0, 1]) and their labels."""
    if fashion_available():
        x, y = load_fashion()[:2]
    else:
        x, y = load_digits_28()
    idx = np.random.default_rng(seed).permutation(len(x))[: min(n, len(x))]
    pixels = torch.from_numpy(np.asarray(x[idx], dtype=np.float32)).reshape(-1, 1, 28, 28)
    pixels = nn.functional.avg_pool2d(pixels / max(float(pixels.max()), 1.0), 2).flatten(1)
    return pixels, torch.from_numpy(np.asarray(y[idx], dtype=np.int64))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(x), (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    return model.eval()


def write_fw_setup(directory: Path, n_models: int = 3) -> dict[str, object]:
    """A base (briefly trained on everything), ``n_models`` fine-tunes each on a class subset,
    and an objective file of 100 labelled samples per target task."""
    directory.mkdir(parents=True, exist_ok=True)
    x, y = images()
    base = train(mlp(), x, y, steps=30, seed=0)
    base_path = directory / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, base_path)
    tasks = [tuple(range(k, 10, n_models)) for k in range(n_models)]
    paths = []
    for k, classes in enumerate(tasks):
        mask = torch.isin(y, torch.tensor(classes))
        model = mlp()
        model.load_state_dict(base.state_dict())
        train(model, x[mask], y[mask], steps=40, seed=1 + k)
        paths.append(directory / f"ft{k}.safetensors")
        save_file({n: v.contiguous() for n, v in model.state_dict().items()}, paths[-1])
    data = {}
    for k, classes in enumerate(tasks):
        chosen = torch.isin(y, torch.tensor(classes)).nonzero().flatten()[-100:]
        data[f"x.task{k}"], data[f"y.task{k}"] = x[chosen].contiguous(), y[chosen].contiguous()
    objective = directory / "objective.safetensors"
    save_file(data, objective, metadata={"model": "fwdoor_models:mlp"})
    return {"base": base_path, "pool": paths, "objective": objective}


def write_dimat_setup(directory: Path, n_agents: int = 3) -> dict[str, object]:
    """``n_agents`` BatchNorm MLPs trained from different inits on their own shards, and a
    calibration file of 256 unlabelled images."""
    directory.mkdir(parents=True, exist_ok=True)
    x, y = images()
    paths = []
    for k in range(n_agents):
        torch.manual_seed(100 + k)
        model = nn.Sequential(
            nn.Linear(PIXELS, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10)
        )
        shard = slice(k * 800, (k + 1) * 800)
        train(model, x[shard], y[shard], steps=60, seed=k)
        paths.append(directory / f"agent{k}.safetensors")
        save_file({n: v.contiguous() for n, v in model.state_dict().items()}, paths[-1])
    calibration = directory / "calibration.safetensors"
    save_file(
        {"x": x[-256:].contiguous()},
        calibration,
        metadata={"model": "fwdoor_models:bn_mlp", "batch_size": "64"},
    )
    return {"agents": paths, "calibration": calibration, "test": (x[2400:2900], y[2400:2900])}
