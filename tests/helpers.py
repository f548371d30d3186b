"""Small models and data shared by the tests."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from rso_ext import ops
from rso_ext.models import he_init_


def tiny_net(seed: int = 0, bias: bool = False) -> nn.Sequential:
    """conv(1->3) + BN + ReLU + avg-pool + conv(3->4) + BN + GAP + linear(4->3): every op kind of
    the paper nets at toy size (8x8 inputs, 3 classes)."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 3, 3, padding=1, bias=bias)), ("bn1", nn.BatchNorm2d(3)),
        ("relu1", nn.ReLU()), ("pool1", nn.AvgPool2d(2)),
        ("conv2", nn.Conv2d(3, 4, 3, padding=1, bias=bias)), ("bn2", nn.BatchNorm2d(4)),
        ("gap", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
        ("fc", nn.Linear(4, 3, bias=bias)),
    ]))
    return he_init_(net, g)


class TinyDag(nn.Module):
    """The same layers as :func:`tiny_net` written as a non-Sequential module with a residual add,
    so the driver must take the full-forward path."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 3, bias=False)
        he_init_(self, torch.Generator().manual_seed(seed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.conv1(x))
        h = self.bn2(self.conv2(torch.relu(h))) + h
        return self.fc(h.mean((2, 3)))


class CatDag(nn.Module):
    """A non-Sequential net the fused planner cannot lower: it concatenates two branches
    (torch.cat is outside the fused op set), so backend="fused" names it and "auto" falls back
    to torch."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.fc = nn.Linear(6, 3, bias=False)
        he_init_(self, torch.Generator().manual_seed(seed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.conv1(x))
        h = torch.cat([self.conv2(torch.relu(h)), h], 1)
        return self.fc(h.mean((2, 3)))


class SmallRes(nn.Module):
    """paper_cifar's structure at toy size (1x8x8 inputs, 3 classes): an identity add into
    conv2, a projection (1x1 conv + BN, computed first as in paper_cifar) added into conv3 before
    its pool, BN after every add."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.proj = nn.Conv2d(4, 6, 1, bias=False)
        self.proj_bn = nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.pool = nn.AvgPool2d(2)
        self.bn3 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3, bias=False)
        he_init_(self, torch.Generator().manual_seed(seed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.bn1(self.conv1(x))
        h2 = self.bn2(self.conv2(torch.relu(h1)) + h1)
        skip = self.proj_bn(self.proj(h2))
        # (a ReLU before bn3: with the add straight into a BatchNorm of batch statistics, as in
        # paper_cifar, proj_bn's beta would be cancelled and its decisions float noise)
        h3 = self.bn3(torch.relu(self.pool(self.conv3(torch.relu(h2)) + skip)))
        return self.fc(torch.flatten(h3.mean((2, 3), keepdim=True), 1))


def toy_data(n: int = 120, seed: int = 1, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Images 1x8x8 whose class is which quadrant is brighter: learnable, not trivial."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    for c in range(classes):
        r, col = divmod(c, 2)
        x[y == c, :, r * 4:(r + 1) * 4, col * 4:(col + 1) * 4] += 1.0
    return x, y


def mnist_root(root, n_train: int, n_test: int):
    """An MNIST-format root (``<root>/MNIST/raw/*.gz``) holding the first ``n_train`` training and
    ``n_test`` test images of the embedded subset."""
    from rso_ext import data

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    src = data.embedded_root() / "MNIST" / "raw"
    for split, n in (("train", n_train), ("t10k", n_test)):
        for kind in ("images-idx3", "labels-idx1"):
            data.write_idx(raw / f"{split}-{kind}-ubyte.gz",
                           data.read_idx(src / f"{split}-{kind}-ubyte.gz")[:n])
    return root


def fused_sweep(sw, values: torch.Tensor, batches: torch.Tensor, k0: int = 0):
    """``rso_ext.ops.fused_sweep`` on the caches and program of a begun FusedSweeper ``sw``."""
    return ops.fused_sweep(sw.x, sw.z, sw.unit.param.data, sw.y, sw.prog.program,
                           unit_kind=sw.prog.unit_kind, unit_op=sw.prog.unit_op, k0=k0,
                           values=values, batches=batches)


class BlogStyle(nn.Module):
    """The PyTorch MNIST example's forward at toy width (8x8 input): functional ReLU,
    ``F.max_pool2d``, dropout (module and function), ``torch.flatten`` and a final
    ``F.log_softmax``."""

    def __init__(self, seed: int = 0, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, 1)
        self.conv2 = nn.Conv2d(3, 4, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.fc1 = nn.Linear(16, 6)
        self.fc2 = nn.Linear(6, classes)
        he_init_(self, torch.Generator().manual_seed(seed))

    def forward(self, x):
        x = torch.nn.functional.relu(self.conv1(x))
        x = torch.nn.functional.relu(self.conv2(x))
        x = torch.nn.functional.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = torch.nn.functional.relu(self.fc1(x))
        x = torch.nn.functional.dropout(x, 0.5, training=self.training)
        return torch.nn.functional.log_softmax(self.fc2(x), dim=1)
