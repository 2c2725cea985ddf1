"""``.. analysis-script:: analysis/landscapes.py`` runs a script at build time and shows it.

The page gets the script's docstring, the exact command that was run (the same command a
reader types in the repository root, with small arguments given by ``:args:``), its printed
output, the Markdown files it wrote (converted like ``markdown-include``) and its figures.
The script runs in a subprocess (``sys.executable``, repository root as working directory,
one thread), writing into a fresh directory under the build's doctree directory.

A script that fails or exceeds ``:timeout:`` (default 300 s) stops the build with its error
output: a page must not show results that were not produced.  ``:no-run: reason`` shows the
docstring and the command without running it (for scripts that need data or hours).

Options: ``:args:`` (command-line arguments, shell syntax), ``:out-arg:`` (the option that
takes the output directory, default ``--out``), ``:timeout:``, ``:no-run:``,
``:output-lines:`` (printed lines kept, from the end; default 30).
"""

from __future__ import annotations

import ast
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import Directive, directives
from docutils.statemachine import StringList
from kgdocs import md_to_rst
from sphinx.errors import ExtensionError
from sphinx.util import logging
from sphinx.util.nodes import nested_parse_with_titles

__all__ = ["run_script", "setup"]

logger = logging.getLogger(__name__)


def run_script(root: Path, script: str, args: list[str], out: Path, timeout: float
               ) -> tuple[str, float]:
    """Run ``python script *args`` in ``root`` (``out`` is created); return output and time.

    Raises
    ------
    sphinx.errors.ExtensionError
        On a non-zero exit status or a time-out, with the end of the script's output.
    """
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONHASHSEED="0")
    t0 = time.perf_counter()
    try:
        res = subprocess.run([sys.executable, script, *args], cwd=root, env=env,
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise ExtensionError(f"analysis-script: {script} ran longer than {timeout:.0f} s; "
                             "give it smaller :args:") from err
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).splitlines()[-25:])
        raise ExtensionError(f"analysis-script: {script} {shlex.join(args)} exited with "
                             f"status {res.returncode}:\n{tail}")
    return res.stdout, time.perf_counter() - t0


def _command_lines(words: list[str], width: int = 76) -> list[str]:
    """A shell command as console lines of at most ``width`` characters (``\\`` joins)."""
    lines, cur = [], "$"
    for w in (shlex.quote(w) for w in words):
        if len(cur) + 1 + len(w) > width and cur.strip() not in ("$", ""):
            lines.append(cur + " \\")
            cur = "   "
        cur += " " + w
    lines.append(cur)
    return ["   " + ln for ln in lines]


def _docstring(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text()))
    if not doc:
        raise ExtensionError(f"analysis-script: {path} has no module docstring")
    return doc


class AnalysisScript(Directive):
    required_arguments = 1
    option_spec = {"args": directives.unchanged, "out-arg": directives.unchanged,
                   "timeout": directives.positive_int, "no-run": directives.unchanged,
                   "output-lines": directives.nonnegative_int}

    def run(self):
        env = self.state.document.settings.env
        root = Path(env.srcdir).parent
        script = self.arguments[0]
        path = root / script
        if not path.is_file():
            raise ExtensionError(f"analysis-script: {script} does not exist (relative to the "
                                 f"repository root {root})")
        env.note_dependency(str(path))
        args = shlex.split(self.options.get("args", ""))
        out_arg = self.options.get("out-arg", "--out")
        name = path.stem
        shown_out = f"results/{name}"
        lines = ["**Command** (from the repository root):", "", ".. code-block:: console", ""]
        lines += _command_lines(["python", script, *args, out_arg, shown_out]) + [""]
        doc = _docstring(path).splitlines()
        body = ["**What it does** (the script's docstring):", ""]
        body += ["   " + ln if ln.strip() else "" for ln in doc]
        body.append("")
        # a block quote keeps the docstring's own markup (literal blocks, ``code``)
        lines = body + lines
        if "no-run" in self.options:
            lines += [".. note::", "",
                      f"   Not run when these pages are built: {self.options['no-run']}", ""]
            return self._parse(lines, script)
        out = Path(env.doctreedir) / "analysis-gallery" / name
        if out.exists():
            for f in sorted(out.rglob("*"), reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
        stdout, seconds = run_script(root, script, [*args, out_arg, str(out)],
                                     out, self.options.get("timeout", 300))
        logger.info(f"analysis-script: {script} ran in {seconds:.1f} s")
        keep = self.options.get("output-lines", 30)
        printed = [ln.replace(str(out), shown_out) for ln in stdout.rstrip().splitlines()]
        if keep and printed:
            cut = len(printed) > keep
            lines += [f"**Printed output** ({'last ' + str(keep) + ' lines, ' if cut else ''}"
                      f"run in {seconds:.0f} s when these pages were built):", "",
                      ".. code-block:: text", ""]
            lines += ["   " + ln for ln in printed[-keep:]] + [""]
        docdir = Path(env.doc2path(env.docname)).parent
        rel = os.path.relpath(out, docdir)
        mds = sorted(out.glob("*.md"))
        for md in mds:
            lines += [f"**{shown_out}/{md.name}**, as written:", ""]
            # the file's title repeats the section's; its "##" sections go one level down
            text = "\n".join(ln for ln in md.read_text().splitlines()
                              if not ln.startswith("# "))
            lines += md_to_rst(text, top_level=1, image_dir=rel).splitlines() + [""]
        shown = {ln.split("(", 1)[1].split(")", 1)[0] for md in mds
                 for ln in md.read_text().splitlines() if ln.startswith("![")}
        for png in sorted(out.glob("*.png")):
            if png.name in shown:
                continue
            lines += [f".. figure:: {rel}/{png.name}", "   :width: 100%", "",
                      f"   {shown_out}/{png.name}", ""]
        return self._parse(lines, script)

    def _parse(self, lines, script):
        holder = nodes.section()
        holder.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source=f"<{script}>"), holder)
        return holder.children


def setup(app):
    app.add_directive("analysis-script", AnalysisScript)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
