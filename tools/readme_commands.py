"""The README's quick-start commands, read from README.md: the one place they are written.

    python tools/readme_commands.py main     # set up and run the main job
    python tools/readme_commands.py test     # set up and run the tests

Each command is the fenced ``bash`` block that follows a ``<!-- quickstart:NAME -->`` marker in
README.md. `.ci/run` executes the ``test`` command through this script, in a new virtual
environment, so CI runs exactly what a user copies (tests/test_readme.py checks the markers).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
NAMES = ("main", "test")
_BLOCK = re.compile(r"<!-- quickstart:(\w+) -->\s*```bash\n(.*?)\n```", re.S)


def commands(text: str | None = None) -> dict[str, str]:
    """``{name: command}`` of every quick-start block in the README (or in ``text``)."""
    found: dict[str, str] = {}
    for name, body in _BLOCK.findall(README.read_text() if text is None else text):
        if name in found:
            raise ValueError(f"README.md has two quickstart:{name} blocks")
        lines = [ln for ln in body.strip().splitlines() if ln.strip()]
        if len(lines) != 1:
            raise ValueError(f"README.md's quickstart:{name} block must be one line, got {len(lines)}")
        found[name] = lines[0].strip()
    missing = [n for n in NAMES if n not in found]
    if missing:
        raise ValueError(f"README.md lacks the quickstart block(s) {missing}")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in NAMES:
        print(f"usage: python tools/readme_commands.py {{{'|'.join(NAMES)}}}", file=sys.stderr)
        return 2
    print(commands()[argv[0]])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
