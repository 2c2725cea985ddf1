"""Serve MathJax from the built site itself, so that formulas render without a network.

MathJax 3 comes from the PyPI package ``sphinx-mathjax-offline`` (the ``docs`` extra of
``setup.cfg``), whose directory holds MathJax's ``es5`` build.  This extension copies that
build into ``_static/mathjax`` of the HTML output and points Sphinx's ``mathjax_path`` at its
SVG renderer: SVG output draws glyphs as paths, so it needs no web fonts, which browsers refuse
to load from ``file://`` pages.  The package's own Sphinx hook is not used (it selects the
CHTML renderer).  A missing package fails the build with the command that installs it.

``KERNELGEO_DOCS_MATHJAX`` overrides the URL (e.g. a CDN) and skips the copy.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from sphinx.errors import ConfigError
from sphinx.util.fileutil import copy_asset

__all__ = ["mathjax_dir", "setup"]

PACKAGE = "sphinx-mathjax-offline"  # its import name has hyphens, as published
ENTRY = "tex-svg.js"


def mathjax_dir() -> Path:
    """Directory of the bundled MathJax build (``tex-svg.js`` and its components)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the docs need MathJax from the {PACKAGE!r} package to render formulas offline; "
            "install the docs dependencies: pip install -e '.[docs]' (or make docs)")
    d = Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax"
    if not (d / ENTRY).is_file():
        raise ConfigError(f"{d / ENTRY} is missing: reinstall {PACKAGE}")
    return d


def _copy(app, exc):
    if exc is None and app.builder.format == "html" and app.config.kg_mathjax_local:
        copy_asset(str(mathjax_dir()), os.path.join(app.outdir, "_static", "mathjax"))


def _configure(app, config):
    url = os.environ.get("KERNELGEO_DOCS_MATHJAX")
    config.kg_mathjax_local = not url
    if url:
        config.mathjax_path = url
    else:
        mathjax_dir()  # fail early, before hours of building
        config.mathjax_path = f"mathjax/{ENTRY}"


def setup(app):
    app.add_config_value("kg_mathjax_local", True, "html")
    app.connect("config-inited", _configure, priority=900)
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
