"""Pretraining, linear-probe heads and fine-tuning (independent and sequential), with a disk cache.

Protocol (the CLIP analogue used by OPCM and MagMax):
1. Pretrain the backbone on the pretraining split. Its labels are coarse super-classes (tops,
   bottoms/dresses, footwear, bags for Fashion-MNIST; digit ranges for the fallback) so the
   features are general but not already a solution of the downstream 10-way tasks.
2. Per task, the head is the pretrained backbone's normalised class-mean features with cosine
   logits × 100 (``heads``), the papers' kind of head (CLIP's zero-shot text embeddings): fixed,
   never trained, so every backbone (pretrained, fine-tuned, merged) is judged with the same
   head, and heads never enter the merge. (``fit_probe_head``, a linear probe, is kept for
   diagnostics.)
3. Fine-tune the backbone with that head: *independently* (each task from θ0) and *sequentially*
   (MagMax's recipe: task k starts from task k-1's fine-tuned checkpoint, in one arrival order).

Checkpoints are ``.safetensors`` files in ``cache_dir/<hash of every setting that affects them>``,
so reruns load instead of training. ``TRAINING_RUNS`` counts the trainings actually performed.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import DataConfig, Task, TaskSuite
from .heads import class_mean_heads
from .models import (
    Backbone,
    ModelConfig,
    StateDict,
    backbone_from_state,
    get_state,
    head_from_state,
    make_head,
    set_state,
)

CACHE_FORMAT = 2  # bump when the training code changes in a way that invalidates checkpoints
TRAINING_RUNS: Counter[str] = Counter()  # kind -> trainings performed in this process

# Coarse pretraining labels. Fashion: tops {t-shirt, pullover, coat, shirt}, bottoms/dress
# {trouser, dress}, footwear {sandal, sneaker, ankle boot}, bag. Digits: 0-2, 3-5, 6-9.
FASHION_SUPERCLASS = (0, 1, 0, 1, 0, 2, 0, 2, 3, 2)
DIGITS_SUPERCLASS = (0, 0, 0, 1, 1, 1, 2, 2, 2, 2)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    pretrain_epochs: int = 5
    pretrain_lr: float = 1e-3
    probe_epochs: int = 30  # cheap: runs on cached features
    probe_lr: float = 1e-2
    finetune_epochs: int = 8
    finetune_lr: float = 3e-4
    batch_size: int = 128
    weight_decay: float = 0.0
    # 1 thread: these matmuls are small, and on a 2-core machine shared with other jobs a second
    # thread was measured 1.6-25x slower (oversubscription). Capped at 2.
    threads: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def _derive_seed(seed: int, *parts: str) -> int:
    digest = hashlib.sha256("/".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _fit(
    params: Sequence[nn.Parameter],
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
    on_epoch: Callable[[], object] | None = None,
) -> None:
    """Mini-batch AdamW with a one-cycle (warm-up + cosine) schedule; deterministic given seed."""
    if epochs <= 0:
        return
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n = len(x)
    steps = epochs * ((n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            loss = nn.functional.cross_entropy(forward(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if on_epoch is not None:
            on_epoch()


def superclass_labels(task: Task, sources: str) -> torch.Tensor:
    table = FASHION_SUPERCLASS if sources == "fashion+digits" else DIGITS_SUPERCLASS
    return torch.tensor(table)[task.y_train]


def pretrain_backbone(
    suite: TaskSuite, model_cfg: ModelConfig, cfg: TrainConfig, *, progress: bool = True
) -> StateDict:
    """Train θ0 on the pretraining split (coarse labels); its head is thrown away."""
    torch.manual_seed(_derive_seed(cfg.seed, "pretrain-init"))
    backbone = Backbone(model_cfg)
    y = superclass_labels(suite.pretrain, suite.sources)
    head = make_head(model_cfg, int(y.max()) + 1)
    bar = tqdm(total=cfg.pretrain_epochs, desc="pretrain backbone", disable=not progress)
    _fit(
        [*backbone.parameters(), *head.parameters()],
        lambda x: head(backbone(x)),
        suite.pretrain.x_train,
        y,
        epochs=cfg.pretrain_epochs,
        lr=cfg.pretrain_lr,
        batch_size=cfg.batch_size,
        weight_decay=cfg.weight_decay,
        seed=_derive_seed(cfg.seed, "pretrain-batches"),
        on_epoch=lambda: bar.update(1),
    )
    bar.close()
    TRAINING_RUNS["pretrain"] += 1
    return get_state(backbone)


@torch.no_grad()
def features(backbone_state: StateDict, x: torch.Tensor, model_cfg: ModelConfig) -> torch.Tensor:
    return backbone_from_state(backbone_state, model_cfg)(x)


def fit_probe_head(
    base: StateDict, task: Task, model_cfg: ModelConfig, cfg: TrainConfig
) -> StateDict:
    """Linear probe on frozen pretrained features: the task's fixed head."""
    torch.manual_seed(_derive_seed(cfg.seed, task.name, "head-init"))
    head = make_head(model_cfg, task.num_classes)
    feats = features(base, task.x_train, model_cfg)
    _fit(
        list(head.parameters()),
        head,
        feats,
        task.y_train,
        epochs=cfg.probe_epochs,
        lr=cfg.probe_lr,
        batch_size=cfg.batch_size,
        weight_decay=cfg.weight_decay,
        seed=_derive_seed(cfg.seed, task.name, "head-batches"),
    )
    TRAINING_RUNS["probe"] += 1
    return get_state(head)


def class_mean_head(base: StateDict, task: Task, model_cfg: ModelConfig) -> StateDict:
    """The task's fixed head: unit class means of θ0's features on its training data."""
    feats = features(base, task.x_train, model_cfg)
    return {"weight": class_mean_heads(feats, task.y_train, task.num_classes)}


def finetune_backbone(
    start: StateDict,
    head_state: StateDict,
    task: Task,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    *,
    seed: int,
) -> StateDict:
    """Fine-tune every backbone parameter on one task through its frozen head."""
    backbone = set_state(Backbone(model_cfg), start).train()
    head = head_from_state(head_state, model_cfg)
    head.requires_grad_(False)
    _fit(
        list(backbone.parameters()),
        lambda x: head(backbone(x)),
        task.x_train,
        task.y_train,
        epochs=cfg.finetune_epochs,
        lr=cfg.finetune_lr,
        batch_size=cfg.batch_size,
        weight_decay=cfg.weight_decay,
        seed=seed,
    )
    TRAINING_RUNS["finetune"] += 1
    return get_state(backbone)


# --------------------------------------------------------------------------------------------
# Disk cache


def save_safetensors(
    path: Path, tensors: StateDict, metadata: dict[str, str] | None = None
) -> None:
    """Atomic write (temp file + rename) so an interrupted run never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_safetensors(path: Path) -> StateDict:
    # Copy out of the memory map: the file may be replaced by a later run while we hold tensors.
    return {k: v.clone() for k, v in safetensors.torch.load_file(str(path)).items()}


def _code_fingerprint() -> str:
    """Hash of the data/model/training source: editing how checkpoints are made invalidates them."""
    from . import data, heads, models

    digest = hashlib.sha256()
    for module in (data, heads, models, sys.modules[__name__]):
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:16]


def cache_key(data_cfg: DataConfig, model_cfg: ModelConfig, cfg: TrainConfig, sources: str) -> str:
    """Hash of every setting that changes a checkpoint (threads and progress bars do not)."""
    train = cfg.to_dict()
    train.pop("threads")
    payload = {
        "format": CACHE_FORMAT,
        "code": _code_fingerprint(),
        "data": {k: v for k, v in asdict(data_cfg).items() if k not in ("tasks", "fashion_dir")},
        "sources": sources,
        "model": model_cfg.to_dict(),
        "train": train,
    }
    blob = json.dumps(payload, sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _prefix_id(prefix: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(prefix).encode()).hexdigest()[:16]


@dataclass
class Checkpoints:
    """Paths of everything trained for one suite: θ0, heads, independent and sequential models."""

    root: Path
    pretrained: Path
    heads: dict[str, Path]
    independent: dict[str, Path]
    sequential: dict[tuple[str, ...], dict[str, Path]] = field(default_factory=dict)  # order ->

    def base_state(self) -> StateDict:
        return load_safetensors(self.pretrained)

    def head_states(self) -> dict[str, StateDict]:
        return {name: load_safetensors(p) for name, p in self.heads.items()}

    def paths(self, kind: str, order: Sequence[str]) -> list[Path]:
        """Checkpoint files in arrival order: 'independent' or 'sequential' fine-tuning."""
        if kind == "independent":
            return [self.independent[name] for name in order]
        if kind == "sequential":
            seq = self.sequential[tuple(order)]
            return [seq[name] for name in order]
        raise ValueError(f"unknown checkpoint kind {kind!r}")


class CheckpointCache:
    """Load-or-train for every checkpoint of one (data, model, training) configuration."""

    def __init__(
        self,
        suite: TaskSuite,
        data_cfg: DataConfig,
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        cache_dir: str | Path,
        *,
        progress: bool = True,
    ) -> None:
        self.suite = suite
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.progress = progress
        self.key = cache_key(data_cfg, model_cfg, cfg, suite.sources)
        self.root = Path(cache_dir) / self.key
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "config.json").write_text(
            json.dumps(
                {
                    "data": asdict(data_cfg),
                    "sources": suite.sources,
                    "model": model_cfg.to_dict(),
                    "train": cfg.to_dict(),
                    "format": CACHE_FORMAT,
                },
                indent=2,
                default=list,
            )
        )
        self.tasks = {t.name: t for t in suite.tasks}
        self._base: StateDict | None = None
        self._heads: dict[str, StateDict] = {}

    # -- single artefacts ------------------------------------------------------------------

    def pretrained(self) -> Path:
        path = self.root / "pretrained.safetensors"
        if not path.exists():
            with _threads(self.cfg.threads):
                state = pretrain_backbone(
                    self.suite, self.model_cfg, self.cfg, progress=self.progress
                )
            save_safetensors(path, state, {"kind": "pretrained"})
        return path

    def base(self) -> StateDict:
        if self._base is None:
            self._base = load_safetensors(self.pretrained())
        return self._base

    def head(self, name: str) -> Path:
        path = self.root / "heads" / f"{name}.safetensors"
        if not path.exists():
            with _threads(self.cfg.threads):
                state = class_mean_head(self.base(), self.tasks[name], self.model_cfg)
            save_safetensors(path, state, {"kind": "head", "task": name})
        return path

    def _head_state(self, name: str) -> StateDict:
        if name not in self._heads:
            self._heads[name] = load_safetensors(self.head(name))
        return self._heads[name]

    def independent(self, name: str) -> Path:
        path = self.root / "independent" / f"{name}.safetensors"
        if not path.exists():
            with _threads(self.cfg.threads):
                state = finetune_backbone(
                    self.base(),
                    self._head_state(name),
                    self.tasks[name],
                    self.model_cfg,
                    self.cfg,
                    seed=_derive_seed(self.cfg.seed, "finetune", name),
                )
            save_safetensors(path, state, {"kind": "independent", "task": name})
        return path

    def sequential(self, prefix: Sequence[str]) -> Path:
        """Checkpoint after fine-tuning along ``prefix``; its last task is the one just learned.

        A length-1 prefix starts from θ0, so it *is* the independent checkpoint (same seed).
        """
        prefix = tuple(prefix)
        if len(prefix) == 1:
            return self.independent(prefix[0])
        path = self.root / "sequential" / f"{_prefix_id(prefix)}.safetensors"
        if not path.exists():
            start = load_safetensors(self.sequential(prefix[:-1]))
            name = prefix[-1]
            with _threads(self.cfg.threads):
                state = finetune_backbone(
                    start,
                    self._head_state(name),
                    self.tasks[name],
                    self.model_cfg,
                    self.cfg,
                    seed=_derive_seed(self.cfg.seed, "finetune-seq", *prefix),
                )
            save_safetensors(path, state, {"kind": "sequential", "prefix": ",".join(prefix)})
        return path

    # -- everything at once ----------------------------------------------------------------

    def prepare(
        self, orders: Sequence[Sequence[str]] = (), *, sequential: bool = True
    ) -> Checkpoints:
        """Make sure θ0, all heads, all independent and (optionally) sequential models exist."""
        names = [t.name for t in self.suite.tasks]
        pretrained = self.pretrained()
        heads = {n: self.head(n) for n in names}
        independent = {}
        for n in tqdm(names, desc="fine-tune independent", disable=not self.progress):
            independent[n] = self.independent(n)
        ckpts = Checkpoints(self.root, pretrained, heads, independent)
        if sequential and orders:
            jobs = [(tuple(o), k) for o in orders for k in range(1, len(o) + 1)]
            seq: dict[tuple[str, ...], dict[str, Path]] = {}
            for order, k in tqdm(jobs, desc="fine-tune sequential", disable=not self.progress):
                seq.setdefault(order, {})[order[k - 1]] = self.sequential(order[:k])
            ckpts.sequential = seq
        return ckpts


class _threads:
    """Cap torch's intra-op threads while training, restoring the previous value afterwards."""

    def __init__(self, n: int) -> None:
        self.n = max(1, min(int(n), 2))

    def __enter__(self) -> None:
        self.prev = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.prev)
