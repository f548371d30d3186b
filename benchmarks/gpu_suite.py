#!/usr/bin/env python
"""The GPU checks in one command: build, CUDA tests, memcheck, benchmark, the paper's recipe.

    python benchmarks/gpu_suite.py OUT_DIR                # on a machine with a GPU
    python benchmarks/gpu_suite.py OUT_DIR --rehearse     # the same steps on the CPU, tiny

A GPU lease is short (one command of a few minutes on a bare machine), so every step gets its
own time limit inside one total budget (``--budget``, default 540 s): a step that hangs is
killed at its limit and the next one still runs. Everything goes under OUT_DIR: one log per
step, the tests' JUnit XML, the benchmark JSONs and ``gpu_suite.json`` (device, torch and CUDA
versions, commit, and per step its command, exit status, seconds and whether it timed out or
was skipped); a one-screen summary is printed last. Exit status: 0 when every step that ran
passed, else 1.

``--rehearse`` runs the same steps on the CPU with tiny sizes and without the nvcc build or
compute-sanitizer (recorded as skipped), so that CI checks this script, its JSON keys and its
time accounting on every submission (benchmarks/GPU.md).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import command_line, git_commit  # noqa: E402

PY = sys.executable


@dataclass
class Step:
    """One command of the suite: ``limit`` seconds at most (less if the budget runs out)."""

    name: str
    argv: list[str]
    limit: float
    env: dict[str, str] = field(default_factory=dict)
    skip: Optional[str] = None        # why it does not run here
    optional: bool = False            # a failure is reported but does not fail the suite


def run_steps(steps: Sequence[Step], budget: float, out: Path,
              clock=time.monotonic) -> list[dict]:
    """Run ``steps`` in order, each under min(its limit, what is left of ``budget``), logging to
    ``out/<name>.log``; returns one record per step (never raises for a failing step)."""
    out.mkdir(parents=True, exist_ok=True)
    start = clock()
    records = []
    for st in steps:
        rec = dict(name=st.name, command=shlex.join(st.argv), limit_s=st.limit, rc=None,
                   seconds=0.0, timed_out=False, skipped=st.skip, optional=st.optional)
        left = budget - (clock() - start)
        if st.skip is None and left < 1:
            rec["skipped"] = "the total budget was spent"
        if rec["skipped"] is not None:
            records.append(rec)
            continue
        limit = min(st.limit, left)
        log = out / f"{st.name}.log"
        t = clock()
        with log.open("w") as fh:
            fh.write(f"$ {rec['command']}\n")
            fh.flush()
            try:
                proc = subprocess.run(st.argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                      env={**os.environ, **st.env}, timeout=limit)
                rec["rc"] = proc.returncode
            except subprocess.TimeoutExpired:
                rec["timed_out"] = True
                fh.write(f"\ngpu_suite: killed at its limit of {limit:.0f} s\n")
            except OSError as e:          # the program is missing
                rec["rc"] = 127
                fh.write(f"\ngpu_suite: could not start: {e}\n")
        rec["seconds"] = clock() - t
        rec["limit_s"] = limit
        records.append(rec)
    return records


def passed(rec: dict) -> bool:
    return rec["skipped"] is not None or (rec["rc"] == 0 and not rec["timed_out"])


def build_steps(out: Path, rehearse: bool, data_root: Optional[str]) -> list[Step]:
    """The suite's steps; ``rehearse``: on the CPU, tiny sizes, no nvcc build, no sanitizer."""
    dev = "cpu" if rehearse else "cuda"
    data = ["--data-root", "embedded" if rehearse or not data_root else data_root]
    sanitizer = shutil.which("compute-sanitizer")
    env_probe = ("import torch, json; print(json.dumps(dict(torch=torch.__version__, "
                 "cuda=torch.version.cuda, available=torch.cuda.is_available(), "
                 "device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)))")
    steps = [
        Step("environment", [PY, "-c", env_probe], 60),
        Step("nvidia_smi", ["nvidia-smi"], 30, optional=True,
             skip="rehearsal on the CPU" if rehearse else None),
        Step("nvcc", ["nvcc", "--version"], 30, optional=True,
             skip="rehearsal on the CPU" if rehearse else None),
    ]
    if rehearse:
        steps.append(Step("build", [], 0, skip="rehearsal: no nvcc build"))
        steps.append(Step("tests", [PY, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                    "tests/test_ops.py", "-k", "opcheck",
                                    f"--junitxml={out / 'tests.xml'}"], 180))
    else:
        arch = ("import torch; c = torch.cuda.get_device_capability(0); "
                "print(f'{c[0]}.{c[1]}')")
        try:
            cc = subprocess.run([PY, "-c", arch], capture_output=True, text=True,
                                timeout=60).stdout.strip() or "9.0"
        except (OSError, subprocess.TimeoutExpired):
            cc = "9.0"
        steps.append(Step("build", [PY, "-m", "pip", "install", "--no-build-isolation",
                                    "--no-deps", "-e", "."], 240,
                          # the system's g++: the GPU image's $CXX linked libstdc++ statically,
                          # which setup.py refuses (2026-12-04)
                          env=dict(RSO_EXT_CUDA="1", TORCH_CUDA_ARCH_LIST=cc, CXX="g++",
                                   MAX_JOBS=str(os.cpu_count() or 4))))
        # two processes: a kernel fault poisons the CUDA context of the rest of its process, so
        # the op tests and the fused-sweep tests each report their own failures
        per_test = (["--timeout", "60"] if importlib.util.find_spec("pytest_timeout") else [])
        for name, files, limit in (("tests_ops", ["tests/", "--ignore",
                                                  "tests/test_fused_cuda.py"], 90),
                                   ("tests_fused", ["tests/test_fused_cuda.py", "-k",
                                                    "not memcheck"], 180)):
            steps.append(Step(name, [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                     "-m", "cuda or build", *per_test, *files,
                                     f"--junitxml={out / (name + '.xml')}"], limit,
                              env=dict(CUDA_LAUNCH_BLOCKING="1")))
    if importlib.util.find_spec("pytest") is None:
        for st in steps:
            if st.name.startswith("tests"):
                st.skip = "pytest is not installed (pip install -e '.[test]')"
    # tests/test_fused_cuda.py runs a small sweep under compute-sanitizer memcheck itself;
    # correctness first: the tests, then memcheck, then timings
    steps.append(Step(
        "memcheck",
        [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
         "tests/test_fused_cuda.py", "-k", "memcheck", f"--junitxml={out / 'memcheck.xml'}"], 150,
        skip="rehearsal on the CPU" if rehearse else
        (None if sanitizer else "compute-sanitizer is not on PATH")))
    bench = [PY, "benchmarks/bench_perturb.py", "--model", "paper_mnist", "--device", dev,
             "--quick", "--backends", "torch-cached,fused",
             "--out", str(out / f"bench_perturb_paper_mnist_{dev}.json"),
             "--profile", str(out / f"profile_paper_mnist_{dev}.txt")]
    bench += (["--batch-size", "32", "--train-size", "128", "--calib-size", "64", "--budget", "4",
               "--data-root", "embedded"] if rehearse
              else ["--batch-size", "5000", "--budget", "60", *data])
    steps.append(Step("bench_perturb", bench, 120))
    repro = [PY, "benchmarks/reproduce_paper.py", "--device", dev, "--no-plot",
             "--out", str(out / f"reproduce_paper_{dev}.json")]
    repro += (["--quick", "--cycles", "1", "--train-size", "200", "--val-size", "50",
               "--calib-size", "64", "--max-seconds", "60"] if rehearse
              else ["--batch-size", "5000", "--max-seconds", "60", *data])
    steps.append(Step("reproduce_paper", repro, 120))
    return steps


def summary(doc: dict) -> str:
    lines = [f"gpu_suite: {doc['device'] or 'no GPU'} | torch {doc['torch']} | CUDA "
             f"{doc['cuda']} | commit {doc['commit']} | {'rehearsal' if doc['rehearse'] else 'GPU'}"]
    for r in doc["steps"]:
        state = ("skipped (" + r["skipped"] + ")" if r["skipped"] is not None else
                 f"TIMED OUT at {r['limit_s']:.0f} s" if r["timed_out"] else
                 "ok" if r["rc"] == 0 else f"FAILED rc={r['rc']}")
        lines.append(f"  {r['name']:<16} {r['seconds']:7.1f} s  {state}")
    for name, key in (("bench_perturb", "ratio_cycle_vs_torch_cached"),
                      ("reproduce_paper", "test_acc_1")):
        res = doc["results"].get(name)
        if res:
            lines.append(f"  {name}: {key}={res.get(key)}")
    lines.append(f"gpu_suite: {'PASS' if doc['ok'] else 'FAIL'} in {doc['seconds']:.0f} s "
                 f"of a {doc['budget_s']:.0f} s budget; logs and JSON in {doc['out']}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder for logs, JUnit XML and JSON (created)")
    p.add_argument("--rehearse", action="store_true",
                   help="the same steps on the CPU with tiny sizes (CI)")
    p.add_argument("--budget", type=float, default=540.0, help="total seconds (default 540)")
    p.add_argument("--data-root", default=os.environ.get("RSO_EXT_MNIST_ROOT"),
                   help="full MNIST for the GPU steps (default $RSO_EXT_MNIST_ROOT; see "
                        "benchmarks/GPU.md for the folder that travels with the repository)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    t0 = time.monotonic()
    records = run_steps(build_steps(out, args.rehearse, args.data_root), args.budget, out)
    env = {}
    env_log = out / "environment.log"
    if env_log.exists():
        for line in env_log.read_text().splitlines():
            if line.startswith("{"):
                env = json.loads(line)
    results = {}
    for name, path in (("bench_perturb", out.glob("bench_perturb_*.json")),
                       ("reproduce_paper", out.glob("reproduce_paper_*.json"))):
        for f in path:
            results[name] = json.loads(f.read_text()).get("result", {})
    doc = dict(benchmark="gpu_suite", rehearse=args.rehearse, device=env.get("device"),
               torch=env.get("torch"), cuda=env.get("cuda"), cuda_available=env.get("available"),
               commit=git_commit(), command=command_line(argv),
               budget_s=args.budget, seconds=time.monotonic() - t0, out=str(out),
               steps=records, results=results,
               ok=all(passed(r) or r["optional"] for r in records))
    (out / "gpu_suite.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(summary(doc), flush=True)
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
