"""The paper networks and the PyTorch example net: shapes, parameter counts, init."""
import math

import pytest
import torch
from torch import nn

from rso_ext import models


@pytest.mark.parametrize("name,shape,weights,bn", [
    ("paper_mnist", (1, 28, 28), 11_824, 192),
    ("paper_cifar", (3, 32, 32), 56_560, 544),
    ("pytorch_example", (1, 28, 28), 1_199_882, 0),
])
def test_counts_and_output_shape(name, shape, weights, bn):
    m = models.get_model(name, torch.Generator().manual_seed(0))
    assert models.count_weights(m) == {"weights": weights, "bn": bn}
    m.eval()
    assert m(torch.randn(3, *shape)).shape == (3, 10)


def test_paper_nets_have_no_bias_and_he_init():
    for name in ("paper_mnist", "paper_cifar"):
        m = models.get_model(name, torch.Generator().manual_seed(1))
        for mod in m.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                assert mod.bias is None
            if isinstance(mod, nn.BatchNorm2d):
                assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)
    conv = models.paper_mnist(torch.Generator().manual_seed(2)).conv3.weight
    assert float(conv.std()) == pytest.approx(math.sqrt(2 / 144), rel=0.1)
    fc1 = models.pytorch_example(torch.Generator().manual_seed(2)).fc1.weight
    assert float(fc1.std()) == pytest.approx(math.sqrt(2 / 9216), rel=0.02)


def test_paper_mnist_layout():
    m = models.paper_mnist()
    x = torch.randn(2, 1, 28, 28)
    sizes = {}
    for name, mod in m.named_children():
        x = mod(x)
        sizes[name] = tuple(x.shape[1:])
    assert sizes["bn2"] == (16, 14, 14) and sizes["bn4"] == (16, 7, 7) and sizes["fc"] == (10,)


def test_seeded_init_is_reproducible_and_unknown_name_is_refused():
    a = models.paper_mnist(torch.Generator().manual_seed(5))
    b = models.paper_mnist(torch.Generator().manual_seed(5))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        models.get_model("resnet")
