"""Sphinx configuration of the celery-batches documentation.

Build with ``make docs`` (or ``sphinx-build -W -b html docs docs/_build/html``):
warnings are errors, and nothing is fetched from the network.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

# autodoc imports the package from this checkout, installed or not.
sys.path.insert(0, str(ROOT))

import celery_batches  # noqa: E402

project = "celery-batches"
author = "the celery-batches developers"
copyright = "the celery-batches developers"
release = celery_batches.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.graphviz",
    "sphinx.ext.viewcode",
]

# No intersphinx: the build must not touch the network. References to
# Celery's objects render as plain code, and nitpicky stays off so that
# they are not reported as broken.
nitpicky = False

master_doc = "index"
root_doc = "index"
source_suffix = {".rst": "restructuredtext"}
# docs/examples holds Python modules pulled in with literalinclude, not pages.
exclude_patterns = ["_build", "examples", "Thumbs.db", ".DS_Store"]

# -- autodoc / napoleon ------------------------------------------------------

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Show signatures as written (``list[SimpleRequest]``), not with every
# alias resolved.
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- graphviz ----------------------------------------------------------------

graphviz_output_format = "svg"

# -- HTML --------------------------------------------------------------------

html_theme = "alabaster"
html_title = f"celery-batches {release}"
html_theme_options = {
    "description": "Run many calls of a Celery task as one batch.",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "240px",
}
# _static holds the benchmark charts when they have been generated; a missing
# directory would be a warning, and warnings fail the build.
html_static_path = ["_static"] if (DOCS / "_static").is_dir() else []


# Attribute docs in the package are ``#:`` comments, never Google-style
# sections; napoleon would read a first line such as "Seconds after which
# ... Default: 30." as ``type: description``. Keep them as written: save
# them before napoleon's handler (priority 500) and put them back after it.
_attribute_docs: dict[str, list[str]] = {}


def _save_attribute_doc(
    app: object, what: str, name: str, obj: object, options: object, lines: list[str]
) -> None:
    if what in {"attribute", "data"}:
        _attribute_docs[name] = list(lines)


def _restore_attribute_doc(
    app: object, what: str, name: str, obj: object, options: object, lines: list[str]
) -> None:
    if what in {"attribute", "data"} and name in _attribute_docs:
        lines[:] = _attribute_docs.pop(name)


def setup(app: Any) -> None:
    app.connect("autodoc-process-docstring", _save_attribute_doc, priority=400)
    app.connect("autodoc-process-docstring", _restore_attribute_doc, priority=600)
