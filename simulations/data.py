"""Real offline classification tasks sharing one 28x28 grayscale input space.

Sources: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (gzipped IDX files) and
scikit-learn's bundled ``load_digits`` (8x8, upsampled to 28x28). Tasks are domains of these sources
(rotated, flipped, inverted, patch-shuffled, pixel-permuted) or class subsets, so every task needs a
different feature transformation from one shared backbone: that is what makes merging non-trivial.

Everything is deterministic given ``DataConfig.seed``; images are float32 in [0, 1], flattened to
784 features.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from contmerge.errors import Notice

from .options import check_names

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"
IMAGE_SIDE = 28
INPUT_DIM = IMAGE_SIDE * IMAGE_SIDE

FASHION_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip

TRANSFORMS = (
    "none", "rot90", "rot180", "rot270", "vflip", "hflip", "transpose",
    "invert", "patch_shuffle", "permute",
)  # fmt: skip


@dataclass(frozen=True)
class TaskSpec:
    """Recipe for one task: which source, which pixel transform, which classes."""

    name: str
    source: str  # "fashion" or "digits"
    transform: str = "none"
    classes: tuple[int, ...] | None = None  # source labels kept, relabelled 0..k-1 in this order


@dataclass
class Task:
    """One downstream classification task: train/test tensors and its number of classes."""

    name: str
    x_train: torch.Tensor  # (n_train, 784) float32 in [0, 1]
    y_train: torch.Tensor  # (n_train,) int64 in [0, num_classes)
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    spec: TaskSpec


@dataclass(frozen=True)
class DataConfig:
    """What to load. Sizes are small on purpose: everything must train in seconds on 2 CPU cores."""

    seed: int = 0
    n_train: int = 2000  # per task (digits tasks are capped by the ~1.2k digits available)
    n_test: int = 1000  # per task
    n_pretrain: int = 10000  # pretraining split, disjoint from the task training images
    use_fashion: bool | None = None  # None: use it when installed, else digits-only fallback
    fashion_dir: str = str(FASHION_DIR)
    tasks: tuple[str, ...] | None = None  # subset of the default task names, in this order


@dataclass
class TaskSuite:
    """The pretraining task plus the downstream tasks of one scenario."""

    pretrain: Task
    tasks: list[Task]
    sources: str  # "fashion+digits" or "digits-only"
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]


# --------------------------------------------------------------------------------------------
# Task registries. Fashion scenario: backbone pretrained on upright Fashion-MNIST (coarse labels);
# downstream tasks are new domains of fashion images plus the unseen digits source. The upright
# fashion task itself is not a downstream task: the pretrained model already solves it.

FASHION_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("fashion_rot90", "fashion", "rot90"),
    TaskSpec("fashion_vflip", "fashion", "vflip"),
    TaskSpec("fashion_invert", "fashion", "invert"),
    TaskSpec("fashion_patch", "fashion", "patch_shuffle"),
    TaskSpec("fashion_permuted", "fashion", "permute"),
    TaskSpec("digits", "digits", "none"),
    TaskSpec("digits_rot90", "digits", "rot90"),
    TaskSpec("digits_invert", "digits", "invert"),
)
FASHION_PRETRAIN = TaskSpec("pretrain_fashion", "fashion", "none")

# Fallback when Fashion-MNIST is not installed: pretrain on upright digits, tasks are digit domains.
DIGITS_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("digits_rot90", "digits", "rot90"),
    TaskSpec("digits_rot180", "digits", "rot180"),
    TaskSpec("digits_rot270", "digits", "rot270"),
    TaskSpec("digits_transpose", "digits", "transpose"),
    TaskSpec("digits_invert", "digits", "invert"),
    TaskSpec("digits_patch", "digits", "patch_shuffle"),
    TaskSpec("digits_permuted", "digits", "permute"),
    TaskSpec("digits_invert_rot180", "digits", "invert+rot180"),
)
DIGITS_PRETRAIN = TaskSpec("pretrain_digits", "digits", "none")


# --------------------------------------------------------------------------------------------
# Raw sources


def fashion_available(fashion_dir: str | Path = FASHION_DIR) -> bool:
    d = Path(fashion_dir)
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")  # fmt: skip
    return all((d / n).is_file() for n in names)


def read_idx_gz(path: str | Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST container format) into a uint8 array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:  # 0x08 = unsigned byte, the only type MNIST-likes use
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated IDX file ({data.size} of {np.prod(shape)} values)")
    return data.reshape(shape)


@lru_cache(maxsize=2)
def load_fashion(fashion_dir: str = str(FASHION_DIR)) -> tuple[np.ndarray, ...]:
    """(x_train (60000,28,28) uint8, y_train, x_test (10000,28,28), y_test)."""
    d = Path(fashion_dir)
    if not fashion_available(d):
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {d}; install it with `{FASHION_INSTALL_HINT}`"
        )
    return (
        read_idx_gz(d / "train-images-idx3-ubyte.gz"),
        read_idx_gz(d / "train-labels-idx1-ubyte.gz").astype(np.int64),
        read_idx_gz(d / "t10k-images-idx3-ubyte.gz"),
        read_idx_gz(d / "t10k-labels-idx1-ubyte.gz").astype(np.int64),
    )


@lru_cache(maxsize=1)
def load_digits_28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits (1797 images) upsampled to 28x28 float32 in [0, 1].

    Like MNIST, the digit fills a 20x20 box centred in the 28x28 frame (bilinear upsampling).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # (n,1,8,8)
    x = torch.nn.functional.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    x = torch.nn.functional.pad(x, (4, 4, 4, 4)).squeeze(1).clamp_(0.0, 1.0)
    return x.numpy(), bunch.target.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Transforms: fixed per task (the permutations are seeded by the task name and the data seed).


def _rng(seed: int, *parts: str) -> np.random.Generator:
    # Why hashlib and not hash(): str hashing is salted per process, hashlib is stable.
    digest = hashlib.sha256("/".join([str(seed), *parts]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def apply_transform(images: np.ndarray, transform: str, rng: np.random.Generator) -> np.ndarray:
    """Apply one named pixel transform to (n, 28, 28) float images; returns a new array."""
    x = images
    if transform == "none":
        out = x
    elif transform in ("rot90", "rot180", "rot270"):
        out = np.rot90(x, k=int(transform[3:]) // 90, axes=(1, 2))
    elif transform == "vflip":
        out = x[:, ::-1, :]
    elif transform == "hflip":
        out = x[:, :, ::-1]
    elif transform == "transpose":
        out = x.transpose(0, 2, 1)
    elif transform == "invert":
        out = 1.0 - x
    elif transform == "patch_shuffle":  # 4x4 grid of 7x7 patches, one fixed shuffle
        p = 7
        g = IMAGE_SIDE // p
        perm = rng.permutation(g * g)
        patches = x.reshape(-1, g, p, g, p).transpose(0, 1, 3, 2, 4).reshape(-1, g * g, p, p)
        out = patches[:, perm].reshape(-1, g, g, p, p).transpose(0, 1, 3, 2, 4)
        out = out.reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    elif transform == "permute":  # one fixed pixel permutation (permuted-MNIST style)
        perm = rng.permutation(INPUT_DIM)
        out = x.reshape(-1, INPUT_DIM)[:, perm].reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    elif "+" in transform:  # composition, applied left to right
        out = x
        for part in transform.split("+"):
            out = apply_transform(out, part, rng)
    else:
        raise ValueError(f"unknown transform {transform!r}; known: {', '.join(TRANSFORMS)}")
    return np.ascontiguousarray(out, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Splits


@dataclass(frozen=True)
class _Pools:
    """Index pools into the raw sources; pretraining and task training images never overlap."""

    fashion_pre: np.ndarray
    fashion_task: np.ndarray
    digits_pre: np.ndarray
    digits_task: np.ndarray
    digits_test: np.ndarray


def _pools(seed: int, n_fashion_train: int, n_digits: int, n_pretrain: int,
           digits_pretrain: bool) -> _Pools:  # fmt: skip
    fperm = _rng(seed, "fashion-pools").permutation(n_fashion_train)
    dperm = _rng(seed, "digits-pools").permutation(n_digits)
    n_dtest = int(round(0.3 * n_digits))  # 30 % of digits held out for testing
    dtest, dtrain = dperm[:n_dtest], dperm[n_dtest:]
    # Digits-only fallback: 40 % of the digits training images pretrain the backbone.
    n_dpre = int(round(0.4 * len(dtrain))) if digits_pretrain else 0
    return _Pools(
        fashion_pre=fperm[:n_pretrain],
        fashion_task=fperm[n_pretrain:],
        digits_pre=dtrain[:n_dpre],
        digits_task=dtrain[n_dpre:],
        digits_test=dtest,
    )


def _select(labels: np.ndarray, pool: np.ndarray, classes: tuple[int, ...] | None, n: int,
            rng: np.random.Generator) -> np.ndarray:  # fmt: skip
    """Up to n indices from pool whose label is in classes, drawn without replacement."""
    if classes is not None:
        pool = pool[np.isin(labels[pool], classes)]
    return np.sort(rng.permutation(pool)[: min(n, len(pool))])


def _make_task(spec: TaskSpec, cfg: DataConfig, pools: _Pools, n_train: int, *,
               pretrain: bool = False) -> Task:  # fmt: skip
    rng_split = _rng(cfg.seed, spec.name, "split")
    rng_tf = _rng(cfg.seed, spec.name, "transform")
    if spec.source == "fashion":
        xtr_all, ytr_all, xte_all, yte_all = load_fashion(cfg.fashion_dir)
        train_pool = pools.fashion_pre if pretrain else pools.fashion_task
        itr = _select(ytr_all, train_pool, spec.classes, n_train, rng_split)
        ite = _select(yte_all, np.arange(len(yte_all)), spec.classes, cfg.n_test, rng_split)
        xtr = xtr_all[itr].astype(np.float32) / 255.0
        xte = xte_all[ite].astype(np.float32) / 255.0
        ytr, yte = ytr_all[itr], yte_all[ite]
    elif spec.source == "digits":
        x_all, y_all = load_digits_28()
        train_pool = pools.digits_pre if pretrain else pools.digits_task
        itr = _select(y_all, train_pool, spec.classes, n_train, rng_split)
        ite = _select(y_all, pools.digits_test, spec.classes, cfg.n_test, rng_split)
        xtr, xte, ytr, yte = x_all[itr], x_all[ite], y_all[itr], y_all[ite]
    else:
        raise ValueError(f"unknown source {spec.source!r}")

    # Both splits must see the *same* fixed permutation: re-seed identically for each call.
    state = rng_tf.bit_generator.state
    xtr = apply_transform(xtr, spec.transform, rng_tf)
    rng_tf.bit_generator.state = state
    xte = apply_transform(xte, spec.transform, rng_tf)

    classes = spec.classes if spec.classes is not None else tuple(range(10))
    remap = np.full(10, -1, dtype=np.int64)
    remap[list(classes)] = np.arange(len(classes))
    return Task(
        name=spec.name,
        x_train=torch.from_numpy(xtr.reshape(len(xtr), INPUT_DIM)),
        y_train=torch.from_numpy(remap[ytr]),
        x_test=torch.from_numpy(xte.reshape(len(xte), INPUT_DIM)),
        y_test=torch.from_numpy(remap[yte]),
        num_classes=len(classes),
        spec=spec,
    )


def default_task_specs(use_fashion: bool) -> list[TaskSpec]:
    """The 8 default downstream tasks of the fashion+digits scenario, or the digits-only one."""
    return list(FASHION_TASKS if use_fashion else DIGITS_TASKS)


def resolve_use_fashion(cfg: DataConfig) -> tuple[bool, list[str]]:
    """Decide whether Fashion-MNIST is used; returns (flag, notes explaining a fallback)."""
    present = fashion_available(cfg.fashion_dir)
    if cfg.use_fashion is None:
        if present:
            return True, []
        msg = (
            f"Fashion-MNIST not found in {cfg.fashion_dir}: install it with "
            f"`{FASHION_INSTALL_HINT}`. Falling back to the digits-only tasks."
        )
        warnings.warn(Notice(msg), stacklevel=2)
        return False, [msg]
    if cfg.use_fashion and not present:
        raise FileNotFoundError(
            f"Fashion-MNIST requested but not found in {cfg.fashion_dir}; "
            f"install it with `{FASHION_INSTALL_HINT}`"
        )
    return bool(cfg.use_fashion), []


def load_suite(cfg: DataConfig | None = None) -> TaskSuite:
    """Build the pretraining task and the downstream tasks described by cfg (deterministic)."""
    cfg = cfg or DataConfig()
    use_fashion, notes = resolve_use_fashion(cfg)
    specs = default_task_specs(use_fashion)
    if cfg.tasks is not None:
        by_name = {s.name: s for s in specs}
        kind = "with Fashion-MNIST" if use_fashion else "digits-only (no Fashion-MNIST)"
        check_names(cfg.tasks, by_name, "--tasks", f"for the {kind} suite")
        specs = [by_name[n] for n in cfg.tasks]
    n_fashion = len(load_fashion(cfg.fashion_dir)[1]) if use_fashion else 0
    n_digits = len(load_digits_28()[1])
    if use_fashion and cfg.n_pretrain >= n_fashion:
        raise ValueError(f"n_pretrain={cfg.n_pretrain} leaves no fashion images for the tasks")
    pools = _pools(cfg.seed, n_fashion, n_digits, cfg.n_pretrain, digits_pretrain=not use_fashion)
    pre_spec = FASHION_PRETRAIN if use_fashion else DIGITS_PRETRAIN
    pretrain = _make_task(pre_spec, cfg, pools, cfg.n_pretrain, pretrain=True)
    tasks = [_make_task(s, cfg, pools, cfg.n_train) for s in specs]
    return TaskSuite(
        pretrain=pretrain,
        tasks=tasks,
        sources="fashion+digits" if use_fashion else "digits-only",
        notes=notes,
    )
