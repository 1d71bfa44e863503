"""The decentralized (DIMAT) scenario's models and their permutation specs: an MLP with
BatchNorm (the default: wide enough that a one-shot merge keeps the agents' accuracy) and a small
residual CNN with BatchNorm.

MLP: ``784 -> h -> ... -> h -> classes``, each hidden layer Linear + BatchNorm1d + ReLU; its spec
is :func:`~contmerge.strategies.dimat.sequential_spec` (one alignment point per hidden layer).

Layout (ResNet-20 style, shrunk for 2 CPU cores; the input is a flattened 28x28 image):

    stem:   conv1 (3x3, stride 2 -> 14x14) + bn1 + relu               residual stream 1 (w)
    layer1: 2 basic blocks, identity shortcuts                         residual stream 1 (w)
    layer2: block 0 with a 3x3 stride-2 conv shortcut (+BN), block 1   residual stream 2 (2w)
    pool -> linear head

A basic block is ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``. Alignment points
(as in DIMAT's ResNet-20 graph): the hidden activation of every block (input of conv2), and
one point per residual stream, measured at the stream's last value (input of the next stage,
or input of the pool). Every block adding into a stream shares that stream's permutation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from contmerge.strategies.dimat import AlignmentPoint, PermutationSpec, sequential_spec

IMAGE_SIDE = 28
AGENT_MODELS = ("mlp", "cnn")


def bn_mlp(hidden: int, depth: int = 2, num_classes: int = 10, inputs: int = 784) -> nn.Sequential:
    """``depth`` hidden layers of ``hidden`` units, each Linear + BatchNorm1d + ReLU."""
    layers: list[nn.Module] = []
    width = inputs
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class CNNConfig:
    width: int = 16
    blocks_per_stage: int = 2
    num_classes: int = 10

    def to_dict(self) -> dict:
        return asdict(self)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # 3x3 conv shortcut, as in DIMAT's ResNet-20
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, cfg: CNNConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or CNNConfig()
        self.cfg = cfg
        w, n = cfg.width, cfg.blocks_per_stage
        self.conv1 = nn.Conv2d(1, w, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.layer1 = nn.Sequential(*(BasicBlock(w, w, 1) for _ in range(n)))
        self.layer2 = nn.Sequential(
            BasicBlock(w, 2 * w, 2), *(BasicBlock(2 * w, 2 * w, 1) for _ in range(n - 1))
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(2 * w, cfg.num_classes)
        for m in self.modules():  # Kaiming init, as the reference ResNet-20
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE) * 2.0 - 1.0  # centre [0, 1] pixels
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.layer2(self.layer1(h))
        return self.linear(self.pool(h).flatten(1))


def _bn(prefix: str) -> list[tuple[str, int]]:
    return [(f"{prefix}.{k}", 0) for k in ("weight", "bias", "running_mean", "running_var")]


def _out(conv: str, bn: str) -> list[tuple[str, int]]:
    """A conv's output channels and the BatchNorm that follows it."""
    return [(f"{conv}.weight", 0), *_bn(bn)]


def resnet_spec(cfg: CNNConfig | None = None) -> PermutationSpec:
    """Which tensor axes each alignment point of :class:`SmallResNet` permutes."""
    cfg = cfg or CNNConfig()
    n = cfg.blocks_per_stage
    points: list[AlignmentPoint] = []
    # Stream 1: the stem writes it, layer1 blocks add into it (identity shortcuts) and read it.
    stream1 = _out("conv1", "bn1")
    for b in range(n):
        blk = f"layer1.{b}"
        stream1 += [(f"{blk}.conv1.weight", 1), *_out(f"{blk}.conv2", f"{blk}.bn2")]
    stream1 += [("layer2.0.conv1.weight", 1), ("layer2.0.shortcut.0.weight", 1)]
    points.append(AlignmentPoint("stream1", "layer2.0", tuple(stream1)))
    # Stream 2: layer2.0's conv shortcut and every layer2 block's conv2 write it; head reads it.
    stream2 = _out("layer2.0.shortcut.0", "layer2.0.shortcut.1")
    for b in range(n):
        blk = f"layer2.{b}"
        stream2 += _out(f"{blk}.conv2", f"{blk}.bn2")
        if b > 0:
            stream2.append((f"{blk}.conv1.weight", 1))
    stream2.append(("linear.weight", 1))
    points.append(AlignmentPoint("stream2", "pool", tuple(stream2)))
    # Hidden units inside each block: conv1 + bn1 outputs, conv2 inputs.
    for stage in ("layer1", "layer2"):
        for b in range(n):
            blk = f"{stage}.{b}"
            axes = (*_out(f"{blk}.conv1", f"{blk}.bn1"), (f"{blk}.conv2.weight", 1))
            points.append(AlignmentPoint(f"{blk}.hidden", f"{blk}.conv2", axes))
    return PermutationSpec(tuple(points))


def agent_model(
    kind: str, size: int, num_classes: int
) -> tuple[Callable[[], nn.Module], PermutationSpec]:
    """(factory, permutation spec) of the scenario's model: ``mlp`` (``size`` = hidden units)
    or ``cnn`` (``size`` = width of the first stage)."""
    if kind == "mlp":
        return (lambda: bn_mlp(size, num_classes=num_classes)), sequential_spec(
            bn_mlp(size, num_classes=num_classes)
        )
    if kind == "cnn":
        cfg = CNNConfig(width=size, num_classes=num_classes)
        return (lambda: SmallResNet(cfg)), resnet_spec(cfg)
    raise ValueError(f"unknown model {kind!r}; known: {', '.join(AGENT_MODELS)}")
