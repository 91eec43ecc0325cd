"""The package's layout: public names import from the paths the docs give, and the layers import
only downward, with no import circle (lazy imports included)."""

from __future__ import annotations

import ast
import importlib
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

# The layers, lowest first: a module imports only from its own layer or one listed before it.
# The loss's data model (the batch a backend receives, the term sums, the input checks) sits
# below the kernels that read it; the loss's entry points (``mgll_loss``, ``MGLLLoss``) above
# them.  The readers and the collate hand annotations to the text layer's builders.
LAYERS = (
    ("text", ("mgll.text",)),
    ("targets", ("mgll.targets",)),
    ("data", ("mgll.datasets",)),
    ("loss model", ("mgll._problem", "mgll._terms", "mgll._validation", "mgll.distributed")),
    ("kernels", ("mgll.backends",)),
    ("loss", ("mgll.functional", "mgll.loss")),
    ("evaluation", ("mgll.evaluation",)),
    ("integrations", ("mgll.integrations",)),
)


def _modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "mgll").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Every import of an ``mgll`` module, at module level or inside a function."""
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = edges.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    if sub in modules:
                        found.add(sub)
                    elif node.module in modules:
                        found.add(node.module)
        found.discard(name)
    return edges


def _layer(module: str) -> int | None:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def test_top_level_holds_only_the_loss_layer():
    top = sorted(p.name for p in (SRC / "mgll").iterdir() if not p.name.startswith("__"))
    expected = ["_problem.py", "_terms.py", "_validation.py", "backends", "datasets"]
    expected += ["distributed.py", "evaluation", "functional.py", "integrations", "loss.py"]
    expected += ["py.typed", "targets", "text"]
    assert top == sorted(expected)


def test_every_module_belongs_to_a_layer():
    assert [m for m in _modules() if m != "mgll" and _layer(m) is None] == []


def test_imports_run_only_downward():
    edges = _imports(_modules())
    upward = [
        f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
        for m, targets in edges.items()
        if m != "mgll"
        for t in targets
        if t != "mgll" and _layer(t) > _layer(m)
    ]
    assert upward == []


def test_no_import_circle():
    edges = _imports(_modules())
    # a package's own __init__ importing its submodules is how packages re-export; a submodule
    # importing its parent package is not a circle unless the parent imports it back
    state: dict[str, int] = {}
    circles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                circles.append(" -> ".join([*stack[stack.index(t) :], t]))
            elif t not in state:
                visit(t, [*stack, t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert circles == []


def test_demo_has_no_import_circle():
    modules = {
        f"mgll_demo.{p.stem}": p for p in (SRC / "mgll_demo").glob("*.py") if p.stem != "__init__"
    }
    edges = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "") in modules:
                edges[name].add(node.module)
    order: list[str] = []
    pending = dict(edges)
    while pending:  # Kahn's algorithm: a circle leaves modules that never become free
        free = [m for m, deps in pending.items() if not deps - set(order)]
        assert free, f"import circle among {sorted(pending)}"
        order += free
        for m in free:
            del pending[m]


# ------------------------------------------------------------------ documented import paths

_DIRECTIVE = re.compile(r"^\.\. auto(?:function|class|module|data):: (mgll[\w.]*)", re.M)
_ROLE = re.compile(r":(?:func|class|mod|data|meth):`~?(mgll[\w.]*)`")
_FROM = re.compile(r"^\s*(?:>>> )?from (mgll[\w.]*) import ([\w, ]+)$", re.M)


def _documented() -> list[str]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.rst"))]
    paths = set()
    for page in pages:
        text = page.read_text(encoding="utf-8")
        paths.update(_DIRECTIVE.findall(text))
        paths.update(_ROLE.findall(text))
        for module, names in _FROM.findall(text):
            paths.update(f"{module}.{n.split()[0]}" for n in names.split(",") if n.strip())
    return sorted(paths)


def _resolve(path: str) -> object:
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


@pytest.mark.parametrize("path", _documented())
def test_documented_path_imports(path):
    pytest.importorskip("open_clip") if ".integrations." in path else None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a documented path must not be a deprecated one
        assert _resolve(path) is not None


@pytest.mark.parametrize(
    "package", ["mgll", "mgll.text", "mgll.targets", "mgll.evaluation", "mgll.datasets"]
)
def test_every_public_name_imports(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"


@pytest.mark.parametrize("name", ["ZeroShotClassifier", "multilabel_auroc"])
def test_moved_module_still_imports_with_a_warning(name):
    import mgll.evaluation

    with pytest.warns(DeprecationWarning, match=r"mgll\.zeroshot` moved into `mgll\.evaluation"):
        old = getattr(importlib.import_module("mgll.zeroshot"), name)
    assert old is getattr(mgll.evaluation, name)
