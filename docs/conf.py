"""Sphinx configuration of ztfd's documentation site (MyST Markdown pages; ``bin/docs`` builds it with -W -n)."""

from __future__ import annotations

project = "ztfd"
author = "ztfd contributors"
extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Headings up to ### get anchors, so that a link to a section of another page (`store.md#schema-version`) is
# resolved and checked: a link to a page or anchor that does not exist is a warning, and the build runs with -W.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]
suppress_warnings: list[str] = []

html_theme = "furo"
html_title = "ztfd"
