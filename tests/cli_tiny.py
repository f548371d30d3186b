"""``python -m rso_ext`` with one more model, ``tiny``, for tests that run the CLI in a process of
its own (a subprocess cannot be monkeypatched).

    python tests/cli_tiny.py run  train --model tiny ...   # cli.main(argv) in this process
    python tests/cli_tiny.py serve                         # fork server, see below

``serve`` imports torch once and then, for each JSON request ``{"argv": [...], "log": path}`` on
stdin, forks a child that runs ``cli.main(argv)`` with stdout/stderr to ``log``; it answers
``pid N`` when the child starts and ``exit RC`` when it ends (RC < 0: killed by signal -RC). A
child is a whole process of its own, so SIGKILL hits it at a random moment exactly as it would hit
``python -m rso_ext train``, without paying the interpreter's and torch's start-up on every resume.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from helpers import tiny_net  # noqa: E402
from rso_ext import cli, models  # noqa: E402


def tiny_mnist_net(generator=None):
    """paper_mnist's layer kinds at toy width (28x28 input, 10 classes), as in test_cli."""
    net = tiny_net()
    net.fc = torch.nn.Linear(4, 10, bias=False)
    return models.he_init_(net, generator)


models.MODELS["tiny"] = tiny_mnist_net


def _die_on_cue() -> None:
    """Under torchrun, for the killed-rank test: with RSO_EXT_TEST_KILL="RANK:N" the worker of
    that rank SIGKILLs itself at the start of its N-th unit sweep, on the first launch only
    (torchrun then restarts the whole worker group)."""
    cue = os.environ.get("RSO_EXT_TEST_KILL")
    if not cue or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    rank, n = (int(v) for v in cue.split(":"))
    if int(os.environ.get("RANK", "0")) != rank:
        return
    import signal

    from rso_ext.rso import RSO
    sweep, calls = RSO._sweep, {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return sweep(self, *a, **k)
    RSO._sweep = dying


_die_on_cue()

# RSO_EXT_TEST_DEVICE_GENERIC=1: the fused operators take the device-generic passes for the
# whole process (rso_ext.ops.device_generic_paths), as they do over several ranks
if os.environ.get("RSO_EXT_TEST_DEVICE_GENERIC") == "1":
    from rso_ext import _C
    _C._set_device_generic_paths(True)


def serve() -> None:
    out = sys.stdout
    print("ready", file=out, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:                                   # child: run the CLI, never return
            rc = 1
            try:
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout = os.fdopen(1, "w", buffering=1)
                sys.stderr = os.fdopen(2, "w", buffering=1)
                rc = cli.main(req["argv"])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 2
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        print(f"pid {pid}", file=out, flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", file=out, flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve()
    elif sys.argv[1:2] == ["run"]:
        sys.exit(cli.main(sys.argv[2:]))
    else:
        sys.exit(f"usage: {sys.argv[0]} run ARGS... | serve")
