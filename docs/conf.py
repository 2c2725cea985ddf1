"""Sphinx configuration of the kernelgeo documentation.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (``make docs``).

Offline by design: CI reaches PyPI only, so nothing here may need the network to build.

* intersphinx (links to torch, geoopt, numpy, scipy) is configured but only switched on with
  ``KERNELGEO_DOCS_INTERSPHINX=1``, because fetching the inventories fails without internet
  and ``-W`` would turn that into an error.  Without it, type names such as
  ``torch.Tensor`` render as plain (unlinked) code.
* MathJax 3 is part of the built site (``_ext/kgmathjax.py`` copies it from the
  ``sphinx-mathjax-offline`` package of the ``docs`` extra): formulas render with no network,
  from ``file://`` too.  ``KERNELGEO_DOCS_MATHJAX=URL`` loads MathJax 3 from ``URL`` instead.
* The command-line reference is generated from the argparse parsers (``_ext/kgcli.py``) and
  the ``analysis/`` scripts are run with small arguments at build time (``_ext/kggallery.py``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))

import kernelgeo  # noqa: E402

project = "kernelgeo"
author = "kernelgeo developers"
copyright = "2025, kernelgeo developers"
release = kernelgeo.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
    "numpydoc",
    "matplotlib.sphinxext.plot_directive",
    "kgdocs",
    "kgmathjax",
    "kgcli",
    "kggallery",
]

templates_path = []
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "screenshots"]
root_doc = "index"
default_role = "py:obj"  # `name` links to a Python object when it can

# --------------------------------------------------------------------------- HTML / theme
html_theme = "furo"
html_title = f"kernelgeo {release}"
html_static_path = []
html_theme_options = {"sidebar_hide_name": False}

_MACROS = {
    "R": r"\mathbb{R}",
    "St": r"\mathrm{St}",
    "OB": r"\mathcal{OB}",
    "Exp": r"\mathrm{Exp}",
    "Log": r"\mathrm{Log}",
    "sym": r"\mathrm{sym}",
    "skew": r"\mathrm{skew}",
    "tr": r"\operatorname{tr}",
}
# MathJax 3 (served from _static by kgmathjax); the SVG renderer needs no web fonts
mathjax3_config = {"tex": {"macros": _MACROS}, "svg": {"fontCache": "global"}}

# ----------------------------------------------------------------------- autodoc/numpydoc
autodoc_default_options = {"members": True, "undoc-members": True, "member-order": "bysource",
                           "show-inheritance": True}
autodoc_typehints = "none"  # numpydoc's Parameters sections carry the types
autodoc_inherit_docstrings = False  # geoopt's docstrings use another style
autosummary_generate = False  # tables only; the objects are documented by automodule
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks = set()

# ------------------------------------------------------------------------------ intersphinx
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "torch": ("https://docs.pytorch.org/docs/stable", None),
    "geoopt": ("https://geoopt.readthedocs.io/en/latest", None),
    "numpy": ("https://numpy.org/doc/stable", None),
    "scipy": ("https://docs.scipy.org/doc/scipy", None),
}
if os.environ.get("KERNELGEO_DOCS_INTERSPHINX") != "1":
    # no network in CI: keep the mapping documented above but fetch nothing
    intersphinx_disabled_reftypes = ["*"]
    intersphinx_mapping = {}

# ------------------------------------------------------------------- executed tutorials
plot_include_source = True
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 90)]
plot_rcparams = {"figure.figsize": (6.4, 3.6), "figure.dpi": 90}
plot_pre_code = (
    "import numpy as np\n"
    "import torch\n"
    "import matplotlib\n"
    "matplotlib.use('Agg')\n"
    "from matplotlib import pyplot as plt\n"
    "torch.set_num_threads(1)\n"
)
# ``plot_working_directory`` is the repository root so tutorials can read bench/ files
plot_working_directory = str(ROOT)

# Broken links to kernelgeo's own objects are errors; links to other projects cannot be
# resolved offline (intersphinx is off by default) and are ignored.
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(?!kernelgeo\b).*")]
