"""Sphinx configuration for the mgll documentation.

Build: ``sphinx-build -W -b html docs docs/_build/html`` (a warning fails the build) and
``sphinx-build -W -b doctest docs docs/_build/doctest`` (runs every example on the pages and in
the docstrings).  Intersphinx links to Python and PyTorch need the network, so they are off
unless ``MGLL_DOCS_INTERSPHINX=1`` is set.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

from docutils import nodes
from sphinx.directives.other import TocTree
from sphinx.util import logging

import mgll

logger = logging.getLogger(__name__)
DOCS = Path(__file__).resolve().parent

# -- Project ---------------------------------------------------------------------------------

project = "mgll"
author = "mgll developers"
copyright = "2026, mgll developers"
release = mgll.__version__
version = ".".join(release.split(".")[:2])

# -- Extensions ------------------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
    # MathJax copied into _static/mathjax: formulas render with no network (the docs extra).
    "sphinx-mathjax-offline",
]

# Files named _*.rst are fragments for ``.. include::`` (e.g. generated tables), not pages.
exclude_patterns = ["_build", "_*.rst", "**/_*.rst", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
default_role = "py:obj"  # `name` in a docstring links to the object when it exists

# -- autodoc / napoleon ----------------------------------------------------------------------

autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_preserve_defaults = True
# nn.Module's generic "Define the computation performed at every call" is noise on every loss.
autodoc_inherit_docstrings = False
autodoc_mock_imports: list[str] = []  # nothing is mocked: optional parts import lazily

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True
# torch.nn-style "Shape:" sections: rendered under their own heading, bullets kept as written.
napoleon_custom_sections = ["Shape"]

# -- doctest ---------------------------------------------------------------------------------

# The names pytest's ``conftest.py`` gives docstring examples, and a fixed seed.
doctest_global_setup = """
import torch
import mgll
torch.manual_seed(0)
"""

# -- intersphinx (needs the network: opt in with MGLL_DOCS_INTERSPHINX=1) ---------------------

intersphinx_mapping = {}
if os.environ.get("MGLL_DOCS_INTERSPHINX") == "1":
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "torch": ("https://docs.pytorch.org/docs/stable", None),
    }

# -- HTML ------------------------------------------------------------------------------------

html_theme = "furo"
html_title = f"mgll {release}"
# mgll.css keeps code blocks inside the content column (they scroll there).  A copy of conf.py
# without _static (tests/test_docs.py builds one) gets neither.
html_static_path = ["_static"] if (DOCS / "_static").is_dir() else []
html_css_files = ["mgll.css"] if (DOCS / "_static" / "mgll.css").is_file() else []
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True

# -- Local extensions ------------------------------------------------------------------------

_DOCSTRING_OF = re.compile(r":docstring of (?P<name>[\w.]+)$")


def _module_of(dotted: str) -> str | None:
    """The longest importable module prefix of a dotted object name."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        return name
    return None


def _docstring_doctests_in_module_namespace(app, doctree: nodes.document) -> None:
    """Run each docstring's examples in its module's namespace, as ``pytest --doctest-modules``.

    The doctest builder would otherwise run every ``>>>`` block of a page in one shared namespace
    that holds only ``doctest_global_setup``; a docstring example that calls its own module's
    functions by their bare names (``soft_clip_loss(...)``) would then fail.  Each docstring
    gets its own group, set up by importing its module's globals.
    """
    for block in list(doctree.findall(nodes.doctest_block)):
        match = _DOCSTRING_OF.search(block.source or "")
        if match is None:
            continue
        module = _module_of(match["name"])
        if module is None:
            continue
        group = f"docstring:{match['name']}"
        block["groups"] = [group]
        code = f"import {module} as _m\nglobals().update(vars(_m))\ndel _m\n"
        setup = nodes.comment(code, code, testnodetype="testsetup", groups=[group])
        block.parent.insert(block.parent.index(block), setup)


class PresentTocTree(TocTree):
    """A ``toctree`` that lists only the entries whose page exists.

    Several pages (backends, distributed training, the demo, ...) are written alongside the
    code they describe; listing them here before they land would make ``-W`` fail, and
    forgetting them after they land would too ("document isn't included in any toctree").
    """

    def run(self):
        env = self.state.document.settings.env
        keep = []
        for index, line in enumerate(self.content):
            entry = line.strip()
            target = re.sub(r"^.*<(.+)>$", r"\1", entry)
            if entry and target not in env.found_docs:
                logger.info("toctree: %s is not written yet; left out", target)
                continue
            keep.append(index)
        self.content = type(self.content)(
            [self.content[i] for i in keep], items=[self.content.items[i] for i in keep]
        )
        return super().run()


def _reread_pages_with_present_toctrees(app, env, added, changed, removed) -> list[str]:
    """Re-read the pages that hold a ``present-toctree``: which pages exist may have changed."""
    return [doc for doc in ("index",) if doc in env.found_docs]


def setup(app):
    app.add_directive("present-toctree", PresentTocTree)
    app.connect("env-get-outdated", _reread_pages_with_present_toctrees)
    app.connect("doctree-read", _docstring_doctests_in_module_namespace)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
