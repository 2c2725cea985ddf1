"""Small Sphinx extension of the kernelgeo docs: include Markdown result files.

``.. markdown-include:: ../bench/RESULTS.md`` converts a Markdown file (the subset the
benchmark and comparison scripts write: ATX headings, paragraphs, bullet lists, pipe tables,
fenced code, inline code, bold, italics and links) to reStructuredText and parses it in place.
A missing file gives a short note instead of an error, so the docs build before any result
exists.  No Markdown parser is needed (the docs must build offline with the packages in
``setup.cfg``'s ``docs`` extra).

Every other character is escaped, so arbitrary text in a result file cannot produce reST
markup errors (which ``-W`` would turn into a failed build).
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import Directive, directives
from docutils.statemachine import StringList
from sphinx.util.nodes import nested_parse_with_titles

__all__ = ["md_to_rst", "inline_md_to_rst", "setup"]

_SPECIAL = re.compile(r"([\\`*_|<>\[\]])")
_INLINE = re.compile(
    r"(?P<code>`+)(?P<codebody>.+?)(?P=code)"
    r"|\*\*(?P<bold>[^*]+?)\*\*"
    r"|(?<![\w*])\*(?P<ital>[^*\s][^*]*?)\*(?![\w*])"
    r"|(?<!\w)_(?P<ital2>[^_\s][^_]*?)_(?!\w)"
    r"|\[(?P<ltext>[^\]]+)\]\((?P<lurl>[^)\s]+)\)"
)
_HEADING_CHARS = "=-~^\"'"


def _escape(text: str) -> str:
    return _SPECIAL.sub(r"\\\1", text)


def inline_md_to_rst(text: str) -> str:
    """Convert one line of Markdown inline markup to reST; everything else is escaped."""
    out, pos = [], 0

    def emit(markup: str, start: int, end: int) -> None:
        # reST inline markup must be delimited by whitespace or punctuation: where the
        # Markdown lets it touch a word character, add an escaped (invisible) space
        if start > 0 and re.match(r"\w", text[start - 1]):
            markup = "\\ " + markup
        if end < len(text) and re.match(r"\w", text[end]):
            markup += "\\ "
        out.append(markup)

    for m in _INLINE.finditer(text):
        out.append(_escape(text[pos:m.start()]))
        if m.group("code"):
            body = m.group("codebody").strip()
            if body:
                emit(f":code:`{_escape(body)}`", m.start(), m.end())
        elif m.group("bold"):
            emit(f"**{_escape(m.group('bold').strip())}**", m.start(), m.end())
        elif m.group("ital") or m.group("ital2"):
            emit(f"*{_escape((m.group('ital') or m.group('ital2')).strip())}*",
                 m.start(), m.end())
        else:
            label = _escape(m.group("ltext")).replace("`", "")
            url = m.group("lurl")
            if re.match(r"^[a-z]+://", url):
                emit(f"`{label} <{url}>`__", m.start(), m.end())
            else:  # relative links point into the repository, not the site
                out.append(f"{label} (:code:`{_escape(url)}`)")
        pos = m.end()
    out.append(_escape(text[pos:]))
    s = "".join(out)
    # a line that would start a list, an enumeration or a comment is plain text here
    if re.match(r"^([-+]|\d+[.)]|#\.|\.\.)(\s|$)", s):
        s = "\\" + s
    return s


def _split_row(line: str) -> list[str]:
    s = line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|") and not s.endswith("\\|"):
        s = s[:-1]
    cells, cur, i = [], [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s) and s[i + 1] == "|":
            cur.append("|")
            i += 2
            continue
        if s[i] == "|":
            cells.append("".join(cur).strip())
            cur = []
        else:
            cur.append(s[i])
        i += 1
    cells.append("".join(cur).strip())
    return cells


def _is_sep(line: str) -> bool:
    return bool(re.fullmatch(r"\s*\|?\s*:?-{1,}:?\s*(\|\s*:?-{1,}:?\s*)*\|?\s*", line))


def _table(lines: list[str]) -> list[str]:
    header = _split_row(lines[0])
    rows = [_split_row(r) for r in lines[2:]]
    ncol = len(header)
    out = [".. list-table::", "   :header-rows: 1", ""]
    for row in [header] + rows:
        row = (row + [""] * ncol)[:ncol]
        for j, cell in enumerate(row):
            txt = inline_md_to_rst(cell) or r"\ "
            out.append(("   * - " if j == 0 else "     - ") + txt)
    out.append("")
    return out


def md_to_rst(md: str, *, top_level: int = 1, image_dir: str | None = None) -> str:
    """Convert Markdown text to reST.

    Parameters
    ----------
    md : str
        Markdown source.
    top_level : int
        reST section level that a Markdown ``#`` heading maps to (1 = the page's
        sub-sections, underlined with ``-``); deeper Markdown levels map below it.
    image_dir : str, optional
        Directory, relative to the including document, of the Markdown file: a line that is
        only an image ``![alt](file.png)`` with a relative path becomes an ``image``
        directive pointing there (without it, images stay text).
    """
    lines = md.replace("\r\n", "\n").split("\n")
    out: list[str] = []
    item_indent = None  # indentation of the text of the open bullet item, if any
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^\s*(```|~~~)\s*([\w+-]*)", line)
        if fence:
            lang = fence.group(2) or "text"
            body = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence.group(1)):
                body.append(lines[i])
                i += 1
            i += 1
            out += [f".. code:: {lang}", ""] + ["   " + b for b in body] + [""]
            continue
        img = re.fullmatch(r"\s*!\[([^\]]*)\]\(([\w./-]+\.(?:png|jpg|jpeg|svg|gif))\)\s*",
                           line)
        if img and image_dir is not None and not img.group(2).startswith("/") \
                and ".." not in img.group(2):
            alt = img.group(1).replace("\n", " ") or img.group(2)
            out += ["", f".. image:: {image_dir}/{img.group(2)}", f"   :alt: {alt}", ""]
            item_indent = None
            i += 1
            continue
        h = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if h:
            level = min(len(h.group(1)) - 1 + top_level, len(_HEADING_CHARS) - 1)
            title = inline_md_to_rst(h.group(2)) or r"\ "
            out += ["", title, _HEADING_CHARS[level] * max(len(title), 4), ""]
            i += 1
            continue
        if "|" in line and i + 1 < len(lines) and _is_sep(lines[i + 1]):
            block = [line, lines[i + 1]]
            i += 2
            while i < len(lines) and "|" in lines[i] and lines[i].strip():
                block.append(lines[i])
                i += 1
            out += [""] + _table(block)
            continue
        b = re.match(r"^(\s*)[-*+]\s+(.*)$", line)
        if b and not re.fullmatch(r"\s*([-*_])(\s*\1){2,}\s*", line):
            indent = "  " * (len(b.group(1)) // 2)
            if out and out[-1].strip() and not re.match(r"^\s*- ", out[-1]):
                out.append("")
            out.append(f"{indent}- {inline_md_to_rst(b.group(2))}")
            item_indent = indent + "  "
            i += 1
            continue
        if re.fullmatch(r"\s*([-*_])(\s*\1){2,}\s*", line):  # horizontal rule
            out += ["", ""]
            i += 1
            continue
        if not line.strip():
            out.append("")
            item_indent = None
        elif item_indent is not None and line.startswith(" "):
            # a continuation line of a (possibly multi-line) bullet item
            out.append(item_indent + inline_md_to_rst(line.strip()))
        else:
            if item_indent is not None:  # text after a list needs a blank line in reST
                out.append("")
                item_indent = None
            out.append(inline_md_to_rst(line.strip()))
        i += 1
    return "\n".join(out) + "\n"


class MarkdownInclude(Directive):
    """``.. markdown-include:: path [path ...]`` (relative to the current document; glob
    patterns allowed; every existing match is included, in order)."""

    required_arguments = 1
    final_argument_whitespace = True
    option_spec = {"top-level": directives.positive_int, "missing": directives.unchanged}

    def run(self):
        env = self.state.document.settings.env
        paths = []
        for pattern in self.arguments[0].split():
            _, abs_ = env.relfn2path(pattern)
            paths += sorted(Path(p) for p in glob.glob(abs_) if Path(p).is_file())
        if not paths:
            msg = self.options.get("missing") or f"{self.arguments[0]} has not been generated yet."
            return [nodes.note("", nodes.paragraph(text=msg))]
        out = []
        for path in dict.fromkeys(paths):
            env.note_dependency(str(path))
            docdir = Path(env.doc2path(env.docname)).parent
            rst = md_to_rst(path.read_text(encoding="utf-8"),
                            top_level=self.options.get("top-level", 1),
                            image_dir=os.path.relpath(path.parent, docdir).replace(os.sep, "/"))
            node = nodes.section()
            node.document = self.state.document
            nested_parse_with_titles(self.state, StringList(rst.split("\n"), source=str(path)),
                                     node)
            out += node.children
        return out


def setup(app):
    app.add_directive("markdown-include", MarkdownInclude)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}


# ------------------------------------------------------------- docstring table repair
_BORDER = re.compile(r"^(\s*)(=+)((\s+=+)+)\s*$")


def _column_starts(border: str) -> list[int]:
    return [m.start() for m in re.finditer(r"=+", border)]


def repair_simple_tables(lines: list[str]) -> bool:
    """Re-align reST simple tables whose cell text runs into the gap between columns.

    Cells are cut at the column starts of the border line (what the author meant), then the
    border is widened to fit.  Returns whether anything changed.  Used on docstrings, where a
    misaligned table is a docutils error that ``-W`` turns into a failed build.
    """
    changed = False
    i = 0
    while i < len(lines):
        m = _BORDER.match(lines[i])
        if not m:
            i += 1
            continue
        starts = _column_starts(lines[i])
        indent = m.group(1)
        # the table runs to the second border after the first (header form) or the next one
        borders = [i]
        j = i + 1
        while j < len(lines) and lines[j].strip() and len(borders) < 3:
            if _BORDER.match(lines[j]) and _column_starts(lines[j]) == starts:
                borders.append(j)
            j += 1
        end = borders[-1]
        if len(borders) < 2:
            i += 1
            continue
        rows = {}
        for k in range(i + 1, end):
            if k in borders:
                continue
            line = lines[k]
            bounds = starts[1:] + [None]
            rows[k] = [line[a:b].strip() if b else line[a:].strip()
                       for a, b in zip(starts, bounds)]
        widths = [0] * len(starts)
        for c in range(len(starts)):
            border_w = len(re.findall(r"=+", lines[i])[c])
            widths[c] = max([border_w] + [len(r[c]) for r in rows.values()])
        ok = all(
            all(len(r[c]) <= len(re.findall(r"=+", lines[i])[c]) for c in range(len(starts) - 1))
            and not any(lines[k][starts[c + 1] - 1:starts[c + 1]].strip()
                        for c in range(len(starts) - 1) if len(lines[k]) >= starts[c + 1])
            for k, r in rows.items())
        if not ok:
            border = indent + "  ".join("=" * w for w in widths)
            for b in borders:
                lines[b] = border
            for k, r in rows.items():
                lines[k] = indent + "  ".join(
                    cell.ljust(w) for cell, w in zip(r[:-1], widths[:-1])) + "  " + r[-1]
                lines[k] = lines[k].rstrip()
            changed = True
        i = end + 1
    return changed


def _process_docstring(app, what, name, obj, options, lines):
    repair_simple_tables(lines)


def _setup_repair(app):
    app.connect("autodoc-process-docstring", _process_docstring)


_base_setup = setup


def setup(app):  # noqa: F811 - extends the directive registration above
    meta = _base_setup(app)
    _setup_repair(app)
    return meta
