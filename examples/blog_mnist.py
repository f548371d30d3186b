#!/usr/bin/env python
"""The blog's question, "Can we train neural networks without gradient descent?", as a program.

The network and the training loop are the PyTorch MNIST example's (github.com/pytorch/examples,
mnist/main.py), as the blog draft shows them. Two ways to train it without a gradient:

``--mode loop`` (default): the blog's loop with one line changed -- the optimizer is
``rso_ext.optim.TicketFinder(model.parameters())`` -- and the step given a closure that returns the
loss (no ``backward``). Each ``step`` visits the next 32 weights (``weights_per_step``), each
weight kept at its initial value or pruned by the loss on the current minibatch, the candidates
of one weight under the same dropout mask. The ``StepLR`` line of the blog goes: there is no
learning rate to decay (the schedule of a per-weight method runs over its sweeps, ``cycles``).

``--mode fast``: the same network, unchanged, trained by the class form ``rso_ext.RSO`` on the
fused backend (the blog's ``forward`` with ``F.max_pool2d`` and ``F.log_softmax`` lowers through
the torch.fx planner; the final log-softmax folds into the cross-entropy, which is the blog's NLL
loss of it). RSO visits the layers last to first and evaluates the candidates of one weight in
one compiled pass.

Both print the test accuracy as the blog's ``test()`` does. Data: torchvision's MNIST when
torchvision is importable and ``--data-root`` is given (as the blog loads it), otherwise
``rso_ext.data`` (the same files; without ``--data-root`` the 10,000/2,000-image subset shipped
in the package).

    python examples/blog_mnist.py --data-root MNIST_DIR --epochs 1              # the blog's loop
    python examples/blog_mnist.py --data-root MNIST_DIR --mode fast --cycles 1  # RSO, fused
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import rso_ext
import rso_ext.optim
from rso_ext import data


class Net(nn.Module):
    """The PyTorch MNIST example's network, as the blog shows it."""

    def __init__(self):
        super(Net, self).__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


def train(args, model, device, train_loader, optimizer, epoch):
    """The blog's train(): the optimizer is gradient-free, so the step takes a closure."""
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        data, target = data.to(device), target.to(device)

        def closure():                      # was: zero_grad, loss.backward(), step()
            return F.nll_loss(model(data), target)

        loss = optimizer.step(closure)
        if batch_idx % args.log_interval == 0:
            print('Train Epoch: {} [{}/{} ({:.0f}%)]\tLoss: {:.6f}'.format(
                epoch, batch_idx * len(data), len(train_loader.dataset),
                100. * batch_idx / len(train_loader), loss.item()))
        if args.max_steps and batch_idx + 1 >= args.max_steps:
            break


def test(model, device, test_loader):
    """The blog's test()."""
    model.eval()
    test_loss = 0
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction='sum').item()
            pred = output.argmax(dim=1, keepdim=True)
            correct += pred.eq(target.view_as(pred)).sum().item()
    test_loss /= len(test_loader.dataset)
    print('\nTest set: Average loss: {:.4f}, Accuracy: {}/{} ({:.2f}%)\n'.format(
        test_loss, correct, len(test_loader.dataset),
        100. * correct / len(test_loader.dataset)))
    return correct / len(test_loader.dataset)


def datasets(args):
    """(train, test) datasets of normalised [1, 28, 28] images, as the blog's transform makes."""
    if args.data_root:
        try:
            from torchvision import datasets as tv, transforms
        except ImportError:
            pass
        else:
            transform = transforms.Compose([transforms.ToTensor(),
                                            transforms.Normalize((0.1307,), (0.3081,))])
            return (tv.MNIST(args.data_root, train=True, transform=transform),
                    tv.MNIST(args.data_root, train=False, transform=transform))
    s = data.load_splits("mnist", root=args.data_root, normalize="meanstd")
    return (torch.utils.data.TensorDataset(s.train_x, s.train_y),
            torch.utils.data.TensorDataset(s.test_x, s.test_y))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["loop", "fast"], default="loop")
    p.add_argument("--data-root", default=None, help="MNIST folder (default: the embedded subset)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--test-batch-size", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=1, help="loop: passes over the training set")
    p.add_argument("--max-steps", type=int, default=0,
                   help="loop: stop an epoch after this many steps (0: the whole epoch)")
    p.add_argument("--weights-per-step", type=int, default=rso_ext.optim.WEIGHTS_PER_STEP)
    p.add_argument("--sparsity", type=float, default=0.5, help="loop: TicketFinder's target")
    p.add_argument("--cycles", type=int, default=1, help="fast: RSO cycles")
    p.add_argument("--rso-batch-size", type=int, default=512, help="fast: RSO's minibatch")
    p.add_argument("--pool-size", type=int, default=10000,
                   help="fast: training images each unit sweep searches on, drawn afresh (the "
                        "caches of conv2 over all 60,000 would take 26 GB)")
    p.add_argument("--max-units", type=int, default=0,
                   help="fast: stop after this many unit sweeps (0: all cycles)")
    p.add_argument("--train-size", type=int, default=None,
                   help="use only the first N training images (smoke tests)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--log-interval", type=int, default=10)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    train_set, test_set = datasets(args)
    if args.train_size:
        train_set = torch.utils.data.Subset(train_set, range(args.train_size))
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=args.test_batch_size)
    model = Net().to(device)
    t0 = time.perf_counter()

    if args.mode == "loop":
        train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size,
                                                   shuffle=True)
        optimizer = rso_ext.optim.TicketFinder(model.parameters(), sparsity=args.sparsity,
                                               weights_per_step=args.weights_per_step)
        # no StepLR: a gradient-free optimizer has no learning rate to decay
        for epoch in range(1, args.epochs + 1):
            train(args, model, device, train_loader, optimizer, epoch)
            acc = test(model, device, test_loader)
        total = sum(p.numel() for p in model.parameters())
        print(f"visited {optimizer.visited:,} of {total:,} weights "
              f"({optimizer.sweeps} full sweeps) in {time.perf_counter() - t0:.0f} s")
    else:
        x, y = (torch.stack([d[0] for d in train_set]),
                torch.tensor([int(d[1]) for d in train_set]))
        rso = rso_ext.RSO(model, cycles=args.cycles, batch_size=min(args.rso_batch_size, len(x)),
                          pool_size=min(args.pool_size, len(x)),
                          generator=torch.Generator().manual_seed(args.seed))
        rso.check(x, y)                     # data, model and memory; picks the backend
        print(f"RSO backend {rso.backend_reason}")
        for n, st in enumerate(rso.run(x, y), 1):
            print(f"  {st.layer}: {st.weights} weights, {st.accepted} moved, "
                  f"mean loss {st.mean_loss:.4f} ({st.seconds:.1f} s)")
            if st.cycle_done or n == args.max_units:
                rso.calibrate(x)            # BatchNorm statistics (none in this net)
                acc = test(model, device, test_loader)
            if n == args.max_units:
                break
        print(f"{n} unit sweeps of RSO in {time.perf_counter() - t0:.0f} s")
    return acc


if __name__ == "__main__":
    main()
