"""The README's Python examples run, in order, in one namespace, as a user would paste them.

Every fenced block opened with ```python (or ```py) runs; a block directly preceded by the line
``<!-- readme-test: skip -->`` does not (for a snippet that needs a GPU or a dataset).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP_MARK = "<!-- readme-test: skip -->"
_OPEN = re.compile(r"^```\s*(python|py)\s*$")
_FENCE = re.compile(r"^```")


class Block(NamedTuple):
    line: int  # 1-based line of the first code line
    code: str


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of a Markdown text, without those marked to skip."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if _OPEN.match(lines[i].strip()):
            skip = i > 0 and lines[i - 1].strip() == SKIP_MARK
            start = i + 1
            i = start
            while i < len(lines) and not _FENCE.match(lines[i].strip()):
                i += 1
            if not skip:
                blocks.append(Block(start + 1, textwrap.dedent("\n".join(lines[start:i]))))
        i += 1
    return blocks


def run_blocks(blocks: list[Block], cwd: Path) -> subprocess.CompletedProcess:
    """Run the blocks in one fresh interpreter; tracebacks name ``README.md:<line>``."""
    script = "\n".join(
        f"exec(compile({b.code!r} + '\\n', 'README.md:{b.line}', 'exec'), namespace)"
        for b in blocks
    )
    script = "namespace = {'__name__': '__main__'}\n" + script
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env=env,
    )


def is_stub(text: str) -> bool:
    """A README that is still a placeholder: a title and at most one more line."""
    return len([line for line in text.splitlines() if line.strip()]) <= 2


def test_readme_examples_run(tmp_path):
    if not README.exists():
        pytest.skip("README.md is not written yet")
    text = README.read_text(encoding="utf-8")
    if is_stub(text):
        pytest.skip("README.md is still a stub without content")
    blocks = python_blocks(text)
    assert blocks, "README.md has no ```python example; the README must show runnable code"
    result = run_blocks(blocks, tmp_path)
    assert result.returncode == 0, (
        f"a README example failed (exit code {result.returncode}):\n"
        f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )


SAMPLE = """\
# title

```python
x = 1
```

```bash
pip install mgll
```

<!-- readme-test: skip -->
```python
raise RuntimeError("needs a GPU")
```

```py
    assert x == 1
    y = x + 1
```
"""


def test_extraction_finds_python_blocks_only():
    blocks = python_blocks(SAMPLE)
    assert [b.code for b in blocks] == ["x = 1", "assert x == 1\ny = x + 1"]
    assert [b.line for b in blocks] == [4, 17]


def test_blocks_share_a_namespace_and_failures_are_reported(tmp_path):
    assert run_blocks(python_blocks(SAMPLE), tmp_path).returncode == 0
    failing = [Block(3, "x = 1"), Block(9, "assert x == 2, 'wrong'")]
    result = run_blocks(failing, tmp_path)
    assert result.returncode != 0
    assert "README.md:9" in result.stderr and "wrong" in result.stderr


def test_a_stub_readme_is_recognised():
    assert is_stub("# mgll\n")
    assert not is_stub(SAMPLE)


def test_install_lines_work_as_written():
    """Every ``pip install`` line in the README, the docs and the sources names files and extras
    that exist, and none installs ``mgll`` from PyPI before it is released."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = README.parent
    extras = set(
        tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    files = [README, *(root / "docs").glob("*.rst"), *(root / "examples").glob("*.py")]
    files += [*(root / "src").rglob("*.py"), root / "benchmarks" / "README.md"]
    problems = []
    for path in files:
        if not path.exists():
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if "pip install" not in line:
                continue
            where = f"{path.relative_to(root)}:{number}"
            for constraint in re.findall(r"-c\s+(\S+)", line):
                if not (root / constraint).is_file():
                    problems.append(f"{where}: no file {constraint}")
            for group in re.findall(r"(?:\.|whl|mgll|\))\[([\w,-]+)\]", line):
                if unknown := set(group.split(",")) - extras:
                    problems.append(f"{where}: unknown extra(s) {sorted(unknown)}")
            context = " ".join(lines[max(0, number - 2) : number]).lower()
            if re.search(r"pip install [\"']?mgll\b", line) and "once" not in context:
                problems.append(f"{where}: installs mgll from PyPI, where it is not released yet")
    assert not problems, "\n".join(problems)
