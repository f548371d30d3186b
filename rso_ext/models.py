"""The networks of the RSO paper and the PyTorch MNIST example net, as plain ``nn.Module``s.

All conv/linear weights start from He init, N(0, sqrt(2 / fan_in)); BatchNorm starts at
gamma = 1, beta = 0; biases (pytorch_example only) start at 0 (docs/design.md §1).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Dict

import torch
from torch import nn

__all__ = ["paper_mnist", "paper_cifar", "pytorch_example", "he_init_", "get_model", "MODELS",
           "count_weights"]


def he_init_(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Re-initialise ``model`` in place: He-normal conv/linear weights, zero biases, BN gamma=1/beta=0."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                w = torch.randn(m.weight.shape, generator=generator, dtype=m.weight.dtype)
                m.weight.copy_(w * math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_parameters()
    return model


def _conv(cin: int, cout: int, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)


def paper_mnist(generator: torch.Generator | None = None) -> nn.Sequential:
    """The paper's MNIST net: 6 x [3x3 conv, 16 ch, no bias], ReLU before every conv but the first,
    avg-pool 2x2 after conv2 and conv4 (28->14->7), BatchNorm after each conv (after the pool where
    there is one), global average pool, linear 16->10 without bias. 11,824 weights + 192 BN params."""
    layers: list[tuple[str, nn.Module]] = []
    for i in range(1, 7):
        if i > 1:
            layers.append((f"relu{i}", nn.ReLU()))
        layers.append((f"conv{i}", _conv(1 if i == 1 else 16, 16)))
        if i in (2, 4):
            layers.append((f"pool{i}", nn.AvgPool2d(2)))
        layers.append((f"bn{i}", nn.BatchNorm2d(16)))
    layers += [("gap", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
               ("fc", nn.Linear(16, 10, bias=False))]
    return he_init_(nn.Sequential(OrderedDict(layers)), generator)


class PaperCifar(nn.Module):
    """The paper's CIFAR-10 net: 9 convs [16,16,16,32,32,32,32,32,32] with BN, ReLU before every
    conv but the first, avg-pool after conv3 and conv5, residual adds into conv3 (from conv1),
    conv5 (from conv3 via a 1x1 conv 16->32 + BN), conv7 (from conv5) and conv9 (from conv7), global
    average pool, linear 32->10. 56,560 weights + 544 BN parameters.

    Each stage is ``conv -> (+ skip) -> (pool) -> BN``: the skip is added to the conv output, then
    pooled and normalised with it, mirroring paper_mnist's "BN after the pool"."""

    widths = (16, 16, 16, 32, 32, 32, 32, 32, 32)

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        cin = in_channels
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        for w in self.widths:
            self.convs.append(_conv(cin, w))
            self.bns.append(nn.BatchNorm2d(w))
            cin = w
        self.shortcut = nn.Conv2d(16, 32, 1, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(32)
        self.pool = nn.AvgPool2d(2)
        self.relu = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h: list[torch.Tensor] = []
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            # The projection runs before conv5 so that, in execution order, every BN directly
            # follows the conv it normalises (the sweep order relies on that).
            skip = self.shortcut_bn(self.shortcut(h[2])) if i == 4 else None
            z = conv(x if i == 0 else self.relu(h[-1]))
            if i == 2:                                   # conv3 += conv1 branch
                z = z + h[0]
            elif i == 4:                                 # conv5 += 1x1 projection of conv3 branch
                z = z + skip
            elif i in (6, 8):                            # conv7 += conv5, conv9 += conv7
                z = z + h[i - 2]
            if i in (2, 4):
                z = self.pool(z)
            h.append(bn(z))
        return self.fc(torch.flatten(self.gap(h[-1]), 1))


def paper_cifar(generator: torch.Generator | None = None) -> PaperCifar:
    """The paper's CIFAR-10 net (see :class:`PaperCifar`), He-initialised."""
    return he_init_(PaperCifar(), generator)


def pytorch_example(generator: torch.Generator | None = None) -> nn.Sequential:
    """The PyTorch MNIST example net: conv 1->32 3x3, ReLU, conv 32->64 3x3, ReLU, max-pool 2,
    dropout 0.25, flatten, linear 9216->128, ReLU, dropout 0.5, linear 128->10 (biases kept).
    1,199,882 parameters, 98 % of them in fc1. Dropout is off during search."""
    net = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 32, 3)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(32, 64, 3)), ("relu2", nn.ReLU()),
        ("pool", nn.MaxPool2d(2)), ("dropout1", nn.Dropout(0.25)), ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(9216, 128)), ("relu3", nn.ReLU()), ("dropout2", nn.Dropout(0.5)),
        ("fc2", nn.Linear(128, 10)),
    ]))
    return he_init_(net, generator)


MODELS: Dict[str, Callable[..., nn.Module]] = {
    "paper_mnist": paper_mnist,
    "paper_cifar": paper_cifar,
    "pytorch_example": pytorch_example,
}


def get_model(name: str, generator: torch.Generator | None = None) -> nn.Module:
    """Build a model by name (one of :data:`MODELS`)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](generator)


def count_weights(model: nn.Module) -> dict[str, int]:
    """Count conv/linear parameters (``weights``) and BatchNorm parameters (``bn``)."""
    weights = bn = 0
    for m in model.modules():
        n = sum(p.numel() for p in m.parameters(recurse=False))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            bn += n
        else:
            weights += n
    return {"weights": weights, "bn": bn}
