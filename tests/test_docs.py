"""The Sphinx site builds without a warning, its examples run, and every public name is on it.

CI equivalent: ``python -m sphinx -W --keep-going -b html docs <out>/html`` and
``python -m sphinx -W --keep-going -b doctest docs <out>/doctest``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import mgll

for _name in ("sphinx", "furo", "sphinx_copybutton"):
    pytest.importorskip(_name, reason=f"the docs extra is not installed (no {_name!r})")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
OPTIONAL = {"triton", "open_clip", "transformers"}  # third-party imports a public module may need


def sphinx(builder: str, src: Path, out: Path, doctrees: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder]
    command += [str(src), str(out / builder), "-d", str(doctrees)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)


def report(result: subprocess.CompletedProcess) -> str:
    return f"exit code {result.returncode}\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """The HTML build of ``docs/``; the doctest build reuses its parsed pages."""
    out = tmp_path_factory.mktemp("docs")
    return out, sphinx("html", DOCS, out, out / "doctrees")


def test_html_builds_without_warnings(build):
    _, result = build
    assert result.returncode == 0, report(result)


def test_doctests_pass(build):
    out, html = build
    assert html.returncode == 0, "the HTML build failed; see test_html_builds_without_warnings"
    result = sphinx("doctest", DOCS, out, out / "doctrees")
    assert result.returncode == 0, report(result)
    summary = (out / "doctest" / "output.txt").read_text()
    assert "0 failures in tests" in summary, summary[-4000:]


def inventory(path: Path) -> set[str]:
    """Names of the Python objects in a Sphinx ``objects.inv``."""
    raw = path.read_bytes()
    body = raw.split(b"\n", 4)[4]  # four header lines, then zlib
    names = set()
    for line in zlib.decompress(body).decode().splitlines():
        name, role = line.split(" ", 2)[:2]
        if role.startswith("py:"):
            names.add(name)
    return names


def public_modules() -> list[str]:
    """``mgll`` and every submodule with an ``__all__`` and no ``_private`` part, by name.

    Found from the files, without importing them, so that one broken module fails its own
    test case, not the collection of this file.
    """
    names = ["mgll"]
    for info in pkgutil.walk_packages(mgll.__path__, "mgll.", onerror=lambda name: None):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        spec = importlib.util.find_spec(info.name)
        source = Path(spec.origin).read_text(encoding="utf-8") if spec and spec.origin else ""
        if re.search(r"^__all__\b", source, re.MULTILINE):
            names.append(info.name)
    return names


def public_names(module_name: str) -> dict[str, object]:
    """``{dotted name: object}`` for the public functions and classes of a module."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:  # an optional dependency that is not installed
        if (getattr(error, "name", None) or "").split(".")[0] in OPTIONAL:
            pytest.skip(f"{module_name} needs {error.name}, which is not installed")
        raise
    names = {}
    for name in module.__all__:
        obj = getattr(module, name)
        if not name.startswith("__") and not inspect.ismodule(obj):
            names[f"{module_name}.{name}"] = obj
    return names


def resolve(dotted: str) -> object | None:
    """The object a documented dotted name refers to, or None."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        try:
            for attr in parts[end:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


@pytest.fixture(scope="module")
def documented(build) -> set[int]:
    """ids of the objects with an entry in the built docs (under whatever name)."""
    out, result = build
    assert result.returncode == 0, "the HTML build failed; see test_html_builds_without_warnings"
    names = inventory(out / "html" / "objects.inv")
    return {id(obj) for obj in map(resolve, names) if obj is not None}


@pytest.mark.parametrize("module_name", public_modules())
def test_public_names_are_documented(documented, module_name):
    missing = [
        dotted for dotted, obj in public_names(module_name).items() if id(obj) not in documented
    ]
    assert not missing, f"public but without an entry in the API reference (docs/api/): {missing}"


@pytest.mark.parametrize("module_name", public_modules())
def test_public_callables_have_examples(module_name):
    missing = [
        dotted
        for dotted, obj in public_names(module_name).items()
        if callable(obj) and ">>>" not in (inspect.getdoc(obj) or "")
    ]
    assert not missing, f"docstrings without an example (a '>>>' doctest): {missing}"


def test_missing_pages_are_left_out_and_failing_examples_fail(tmp_path):
    """The harness itself: a page not yet written is skipped, a wrong example fails the build."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(DOCS / "conf.py", src / "conf.py")
    (src / "index.rst").write_text(
        "Home\n====\n\n.. present-toctree::\n\n   page\n   not_written_yet\n\n>>> 1 + 1\n3\n"
    )
    (src / "page.rst").write_text("Page\n====\n\nText.\n")
    html = sphinx("html", src, tmp_path, tmp_path / "doctrees")
    assert html.returncode == 0, report(html)
    doctest = sphinx("doctest", src, tmp_path, tmp_path / "doctrees")
    assert doctest.returncode != 0, report(doctest)
    assert "1 failure in tests" in (tmp_path / "doctest" / "output.txt").read_text()


REMOTE = re.compile(
    r"""<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=["'](?:https?:)?//""", re.I
)


def test_html_loads_nothing_from_the_network(build):
    """No page loads a script, stylesheet or image from elsewhere: math renders offline."""
    out, result = build
    assert result.returncode == 0, "the HTML build failed; see test_html_builds_without_warnings"
    html = out / "html"
    pages = sorted(html.rglob("*.html"))
    assert len(pages) > 10, pages
    remote = {}
    for page in pages:
        text = page.read_text(encoding="utf-8")
        # <a href="https://..."> links are fine; only what the browser fetches by itself counts.
        found = [m.group(0) for m in REMOTE.finditer(text)]
        if found:
            remote[str(page.relative_to(html))] = found[:3]
    assert not remote, f"pages that load remote resources: {remote}"
    concepts = (html / "concepts.html").read_text(encoding="utf-8")
    script = re.search(r'<script[^>]*src="(_static/mathjax/[^"?]+)', concepts)
    assert script, "concepts.html has formulas but loads no local MathJax"
    assert (html / script.group(1)).is_file(), script.group(1)
    fonts = html / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2"
    assert any(fonts.glob("*.woff")), "MathJax's fonts were not copied"
    assert (html / "_static" / "mgll.css").is_file()


def test_remote_pattern_catches_a_cdn_script():
    assert REMOTE.search('<script defer src="https://cdn.example.org/mathjax/tex-chtml.js">')
    assert REMOTE.search("<link rel='stylesheet' href='//fonts.example.org/a.css'>")
    assert not REMOTE.search('<script src="_static/mathjax/tex-chtml.js">')
    assert not REMOTE.search('<a href="https://arxiv.org/abs/2511.15943">')
