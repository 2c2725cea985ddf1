"""Write the API reference pages ``docs/api/*.rst`` from the modules' ``__all__``.

Run ``python docs/_ext/gen_api.py`` after adding a module or a public name, and commit the
result; ``tests/test_docs.py::test_api_pages_cover_all`` fails until then.

Each public object is documented once, at its *canonical* name: the package that exports it
when the package's ``__all__`` re-exports it (``kernelgeo.manifolds.Sphere``), otherwise the
submodule that defines it (``kernelgeo.analysis.curvature.jacobi_curvature``).  The
top-level names of :mod:`kernelgeo` (``kernelgeo.constrain`` ...) are documented on the
``kernelgeo`` page.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(DOCS.parent))

#: (page, package, title, intro)
PAGES = [
    ("kernelgeo", "kernelgeo", "kernelgeo (top level)",
     "Declaring manifold parameters in any model."),
    ("manifolds", "kernelgeo.manifolds", "kernelgeo.manifolds",
     "The kernel manifolds (derivations: :doc:`../theory/index`)."),
    ("nn", "kernelgeo.nn", "kernelgeo.nn", "Convolution layers with manifold kernels."),
    ("optim", "kernelgeo.optim", "kernelgeo.optim",
     "Convergent Riemannian SGD (theory: :doc:`../optimization`) and Riemannian Adam "
     "(:doc:`../adam`)."),
    ("analysis", "kernelgeo.analysis", "kernelgeo.analysis",
     "Curvature, geodesics, landscapes, sharpness and the normalization report "
     "(:doc:`../analysis`)."),
    ("data", "kernelgeo.data", "kernelgeo.data",
     "Data sets held in memory or streamed from image folders, and their batch loaders."),
    ("models", "kernelgeo.models", "kernelgeo.models", "Classification models by name."),
    ("training", None, "Training, comparison and the command line",
     "The modules behind ``kernelgeo train``, ``kernelgeo compare``, ``kernelgeo demo`` and "
     "``kernelgeo analyze``."),
]
#: documented after the kernelgeo.training package (kernelgeo.train only re-exports it)
TRAINING_MODULES = ["kernelgeo.compare", "kernelgeo.cli", "kernelgeo.checkpoint",
                    "kernelgeo.runs", "kernelgeo.distributed"]
#: modules documented at the end of a page (top-level modules that are not packages)
EXTRA_MODULES = {"data": ["kernelgeo.folder"]}
#: modules documented on the kernelgeo page instead of their own (name clash with a function)
FOLDED_INTO_TOP = {"kernelgeo.constraints"}


def public(mod) -> list[str]:
    return [n for n in getattr(mod, "__all__", []) if not inspect.ismodule(getattr(mod, n, None))]


def submodules(pkg) -> list[str]:
    if not hasattr(pkg, "__path__"):
        return []
    return sorted(f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)
                  if not m.name.startswith("_"))


def _kind(obj) -> str:
    if inspect.isclass(obj):
        return "autoclass"
    if callable(obj):
        return "autofunction"
    return "autodata"


def module_block(modname: str, names: list[str], *, heading: bool = True,
                 under: str = "-") -> list[str]:
    out = [f":mod:`{modname}`", under * (len(modname) + 7), ""] if heading else []
    mod = importlib.import_module(modname)
    out += [f".. currentmodule:: {modname}", ""] + table(names)
    # autodoc skips module-level data it cannot trace to the module: list those explicitly
    from sphinx.pycode import ModuleAnalyzer

    try:
        commented = {k[1] for k in ModuleAnalyzer.for_module(modname).find_attr_docs()}
    except Exception:  # no source: treat every data name as undocumented
        commented = set()
    data = [n for n in names if _kind(getattr(mod, n)) == "autodata" and n not in commented]
    code = [n for n in names if n not in data]
    out += [f".. automodule:: {modname}"]
    out += ([f"   :members: {', '.join(code)}"] if code else ["   :no-members:"])
    out += [""]
    for n in data:
        out += [f".. autodata:: {modname}.{n}", "   :no-value:" if len(repr(getattr(mod, n))) > 300
                else "", ""]
    return out


def shadowed_block(modname: str, names: list[str]) -> list[str]:
    """A submodule whose name the package re-uses for a function (``models.resnet_cifar``):
    a module target would clash with the function's, so document its remaining names only."""
    if not names:
        return []
    mod = importlib.import_module(modname)
    out = [f"``{modname}``", "-" * (len(modname) + 4), ""]
    out += [f".. currentmodule:: {modname}", ""] + table(names)
    for n in names:
        out += [f".. {_kind(getattr(mod, n))}:: {modname}.{n}", ""]
    return out


def table(qualnames: list[str]) -> list[str]:
    if not qualnames:
        return []
    return [".. autosummary::", "   :nosignatures:", ""] + [f"   {q}" for q in qualnames] + [""]


def page_for_package(pkgname: str, title: str, intro: str) -> str:
    pkg = importlib.import_module(pkgname)
    own = public(pkg)
    lines = [title, "=" * len(title), "", intro, ""]
    if pkgname == "kernelgeo":
        top = [n for n in own if n != "__version__"]
        folded = [n for n in top if getattr(pkg, n).__module__.startswith("kernelgeo.constraints")]
        linked = [n for n in top if n not in folded]
        lines += [".. py:module:: kernelgeo", "", ".. autosummary::", "   :nosignatures:", ""]
        lines += [f"   {n}" for n in folded]
        manifolds = importlib.import_module("kernelgeo.manifolds")
        runs = importlib.import_module("kernelgeo.runs")
        lines += [f"   {'manifolds.' if n in manifolds.__all__ else ''}"
                  f"{'runs.' if n in runs.__all__ else ''}{n}" for n in linked]
        lines += ["", f"``kernelgeo.__version__`` is ``{pkg.__version__}``.  The functions "
                  "below are defined in ``kernelgeo/constraints.py``.", ""]
        for n in folded:
            lines += [f".. {_kind(getattr(pkg, n))}:: kernelgeo.{n}", ""]
        return "\n".join(lines)
    lines += module_block(pkgname, own, heading=False)
    for sub in submodules(pkg):
        smod = importlib.import_module(sub)
        rest = [n for n in public(smod) if n not in own]
        if sub.rsplit(".", 1)[1] in own:
            lines += shadowed_block(sub, rest)
        else:
            lines += module_block(sub, rest)
    return "\n".join(lines)


def page_for_modules(modnames: list[str], title: str, intro: str) -> str:
    lines = [page_for_package("kernelgeo.training", title, intro), ""]
    for m in modnames:
        try:
            mod = importlib.import_module(m)
        except ImportError:
            continue
        lines += module_block(m, public(mod))
    return "\n".join(lines)


def main() -> None:
    api = DOCS / "api"
    api.mkdir(exist_ok=True)
    written = []
    for page, pkgname, title, intro in PAGES:
        try:
            text = (page_for_package(pkgname, title, intro) if pkgname
                    else page_for_modules(TRAINING_MODULES, title, intro))
            for m in EXTRA_MODULES.get(page, []):
                text = "\n".join([text.rstrip(), ""]
                                  + module_block(m, public(importlib.import_module(m))))
        except ImportError as err:
            print(f"skip {page}: {err}")
            continue
        (api / f"{page}.rst").write_text(text.rstrip() + "\n")
        written.append(page)
    index = ["API reference", "=============", "",
             "Every public name of kernelgeo (each module's ``__all__``), documented from its "
             "docstring.", "", ".. toctree::", "   :maxdepth: 1", ""]
    index += [f"   {p}" for p in written]
    (api / "index.rst").write_text("\n".join(index) + "\n")
    print("wrote", ", ".join(written))


if __name__ == "__main__":
    main()
