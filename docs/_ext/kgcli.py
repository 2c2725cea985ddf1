"""``.. cli-reference:: kernelgeo.cli`` renders the ``--help`` of a command and every subcommand.

The parser is the one the command's ``main`` really uses, whatever function builds it:
:func:`capture_parser` calls ``main([])`` with ``ArgumentParser.parse_args`` (and its
siblings) replaced by a function that raises with the parser it was called on, so nothing
runs.  Subcommands are found through the parser's ``add_subparsers`` action, recursively.
If ``main`` no longer parses its arguments with argparse (or the module or ``main`` moves),
the build stops with an error that says so, instead of publishing a stale page.

Help texts are formatted with a fixed width (``COLUMNS``), so the page does not depend on the
terminal of whoever builds it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import textwrap

from docutils import nodes
from docutils.parsers.rst import Directive, directives
from docutils.statemachine import StringList
from sphinx.errors import ExtensionError
from sphinx.util.nodes import nested_parse_with_titles

__all__ = ["capture_parser", "commands", "setup"]

WIDTH = 90


class _Captured(Exception):
    def __init__(self, parser):
        super().__init__("parser captured")
        self.parser = parser


@contextlib.contextmanager
def _patched(prog: str):
    names = ("parse_args", "parse_known_args", "parse_intermixed_args",
             "parse_known_intermixed_args")
    saved = {n: getattr(argparse.ArgumentParser, n) for n in names
             if hasattr(argparse.ArgumentParser, n)}

    def grab(self, *args, **kwargs):
        raise _Captured(self)

    argv0 = sys.argv[0]
    sys.argv[0] = prog  # a parser built without prog= takes its name from argv[0]
    try:
        for n in saved:
            setattr(argparse.ArgumentParser, n, grab)
        yield
    finally:
        for n, f in saved.items():
            setattr(argparse.ArgumentParser, n, f)
        sys.argv[0] = argv0


def capture_parser(module: str, entry: str = "main", prog: str | None = None):
    """The :class:`argparse.ArgumentParser` that ``module.entry(argv)`` parses with.

    Raises
    ------
    sphinx.errors.ExtensionError
        When the module or entry point cannot be imported or the entry point returns or
        fails without parsing its arguments with argparse.
    """
    prog = prog or module.split(".")[0]
    try:
        mod = importlib.import_module(module)
        fn = getattr(mod, entry)
    except (ImportError, AttributeError) as err:
        raise ExtensionError(f"cli-reference: cannot import {module}.{entry}: {err}; update "
                             "the cli-reference directive in docs/cli.rst") from err
    with _patched(prog):
        try:
            fn([])
        except _Captured as cap:
            return cap.parser
        except Exception as err:  # noqa: BLE001 - reported with the reason
            raise ExtensionError(
                f"cli-reference: {module}.{entry}([]) raised {type(err).__name__}: {err} "
                "before parsing its arguments with argparse") from err
    raise ExtensionError(f"cli-reference: {module}.{entry}([]) returned without calling "
                         "ArgumentParser.parse_args: the command line is no longer built "
                         "with argparse there; update docs/_ext/kgcli.py")


def commands(parser, path=()):
    """``[(words, help line, parser)]`` of the parser and every (nested) subcommand."""
    out = [(tuple(path), None, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if sub is None or any(sub is p for _, _, p in out):
                    continue  # aliases point to the same parser
                for item in commands(sub, (*path, name)):
                    if item[0] == (*path, name):
                        item = (item[0], helps.get(name), item[2])
                    out.append(item)
    return out


def _wrap(line: str) -> list[str]:
    # descriptions and epilogs of RawDescriptionHelpFormatter parsers are not wrapped by
    # argparse; a web page has no horizontal room for them either
    if len(line) <= WIDTH:
        return [line]
    indent = line[:len(line) - len(line.lstrip())]
    more = indent + ("    " if indent else "")
    return textwrap.wrap(line, WIDTH, subsequent_indent=more, break_long_words=False,
                         break_on_hyphens=False) or [line]


def format_help(parser) -> str:
    """``parser``'s help at :data:`WIDTH` columns, whatever the terminal."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)
    try:
        text = parser.format_help().rstrip()
        return "\n".join(w for line in text.splitlines() for w in _wrap(line))
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


class CliReference(Directive):
    """One section per command: its one-line help and its full ``--help`` output."""

    required_arguments = 1
    option_spec = {"prog": directives.unchanged, "entry": directives.unchanged,
                   "heading": directives.single_char_or_unicode}

    def run(self):
        module = self.arguments[0]
        prog = self.options.get("prog", module.split(".")[0])
        parser = capture_parser(module, self.options.get("entry", "main"), prog)
        cmds = commands(parser)
        if len(cmds) < 2:
            raise ExtensionError(f"cli-reference: the parser of {module} has no subcommands")
        ch = self.options.get("heading", "-")
        lines: list[str] = []
        for words, helpline, p in cmds:
            title = "``" + " ".join((prog, *words)) + "``"
            lines += [title, ch * len(title), ""]
            if helpline:
                lines += [helpline.replace("`", "``").replace("````", "``"), ""]
            lines += [".. code-block:: text", ""]
            lines += ["   " + ln if ln.strip() else "" for ln in format_help(p).splitlines()]
            lines.append("")
        holder = nodes.section()
        holder.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source=f"<{module} --help>"),
                                 holder)
        return holder.children


def setup(app):
    app.add_directive("cli-reference", CliReference)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
