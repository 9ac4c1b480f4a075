"""Sphinx configuration for the pyarraypool documentation (`make docs`).

The pages are Markdown read by myst-parser; the API reference comes from the
docstrings of the built package (`make install` first: autodoc imports
pyarraypool._core). `make docs` runs with -W, so any warning fails the build.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the package, with its built extension
sys.path.insert(0, str(HERE / "_ext"))

import pyarraypool  # noqa: E402

project = "pyarraypool"
author = "the pyarraypool authors"
copyright = "2026, the pyarraypool authors"
release = pyarraypool.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "cli_help",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "diagrams", "recipes/README.md"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
# The docstrings say the types in their Parameters/Returns sections; the
# annotations (overloads written for type checkers) would only repeat them.
autodoc_typehints = "none"
autodoc_preserve_defaults = True
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

html_theme = "alabaster"
html_title = f"pyarraypool {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "numpy arrays between processes through one shared-memory pool",
    "page_width": "1180px",
    "sidebar_width": "240px",
    "fixed_sidebar": True,
}


def _hide_ndarray_signature(app, what, name, obj, options, signature, return_annotation):
    # TransferableArray inherits ndarray's constructor signature, but cannot be
    # constructed directly: show no signature rather than a misleading one.
    if name == "pyarraypool.TransferableArray":
        return "", None
    return None


def setup(app):
    app.connect("autodoc-process-signature", _hide_ndarray_signature)
