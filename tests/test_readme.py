"""README.md's quick-start commands are what CI runs, and they install what the tests import."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import readme_commands  # noqa: E402

LOCAL = {"rso_ext", "readme_commands"} | {p.stem for p in (ROOT / "tests").glob("*.py")}


def test_readme_has_both_quickstart_commands():
    cmds = readme_commands.commands()
    assert set(cmds) == {"main", "test"}
    for cmd in cmds.values():
        assert "torch==" in cmd, "the README pins torch (a range pulls the CUDA wheels)"
        assert "--no-build-isolation" in cmd and "wheel" in cmd and "setuptools" in cmd
    assert cmds["main"].endswith("python -m rso_ext train")
    assert '".[test]"' in cmds["test"] and cmds["test"].endswith("python -m pytest -q")


def test_ci_runs_the_readme_commands_through_the_one_reader():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv" in ci
    for name in ("main", "test"):
        assert f"python tools/readme_commands.py {name}" in ci
    assert 'bash -c "$test_cmd"' in ci and 'bash -c "$main_cmd"' in ci
    assert "pip install" not in ci, ".ci/run must not install anything the README does not"


def test_reader_refuses_a_missing_or_doubled_block():
    block = '<!-- quickstart:{} -->\n```bash\necho {}\n```\n'
    ok = block.format("main", 1) + block.format("test", 2)
    assert readme_commands.commands(ok) == {"main": "echo 1", "test": "echo 2"}
    with pytest.raises(ValueError, match="lacks"):
        readme_commands.commands(block.format("main", 1))
    with pytest.raises(ValueError, match="two"):
        readme_commands.commands(ok + block.format("test", 3))


def _declared() -> set[str]:
    """Distributions named by setup.py's install_requires and the test extra."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg in ("install_requires", "extras_require"):
            for s in ast.walk(node.value):
                if isinstance(s, ast.Constant) and isinstance(s.value, str):
                    names.add(re.split(r"[<>=!\[ ]", s.value)[0].lower())
    return names


def test_the_test_extra_installs_what_the_tests_import():
    """A module-level import of a third-party package in tests/ must be declared (a package
    installed by hand once made CI green while a new user's install failed)."""
    declared = _declared() | {"torch", "numpy"}
    missing = {}
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            for m in mods:
                top = m.split(".")[0]
                if top in sys.stdlib_module_names or top in LOCAL or top == "_pytest":
                    continue
                if top.lower() not in declared:
                    missing.setdefault(top, []).append(path.name)
    assert not missing, f"imported by tests but not declared in setup.py: {missing}"


def test_nothing_points_outside_the_repository():
    """No tracked file names a folder beside the checkout (results JSONs may keep the commands
    they were measured with)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    pattern = re.compile(r'\.\./shared|parents?\[\d\]\s*/\s*"shared"|parent\s*/\s*"shared"')
    bad = []
    for f in files:
        p = ROOT / f
        if f.startswith("benchmarks/results/") or not p.is_file() or p.suffix in (".gz", ".png", ".pt"):
            continue
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                bad.append(f"{f}:{i}")
    assert not bad, f"paths outside the repository: {bad}"
