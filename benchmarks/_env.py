"""What every benchmark records about where it ran (device name, git commit, the command line,
default data root), and its plotting module."""
from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def device_name(device: str | torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """HEAD, with "-dirty" when tracked files differ from it (as `git describe --dirty`)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=ROOT).returncode != 0
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line(argv=None) -> str:
    """The command that ran this script, as typed from the repository root: ``python`` and the
    script's path, then ``argv`` (when ``main`` was given it) or the process's arguments."""
    args = list(argv) if argv is not None else sys.argv[1:]
    return "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *args])


def default_data_root() -> str | None:
    """The full MNIST named by the environment variable RSO_EXT_MNIST_ROOT (README.md), if set."""
    return os.environ.get("RSO_EXT_MNIST_ROOT") or None


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (saying so) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib missing, no PNG", flush=True)
        return None
    return plt

