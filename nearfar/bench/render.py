"""Rendering of the report's blocks (``("h", level, text)``, ``("p", text)``, ``("table", header, rows)``,
``("img", path, caption)``) as Markdown and as one self-contained HTML page.

Both treat every text as plain text: names, notes and errors come from the results file (hand-edited ones too) and
must neither break a table nor inject markup; HTML escapes them with ``html.escape``, Markdown with ``md_escape``.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from urllib.parse import quote

ReportItem = tuple  # ("h", level, text) | ("p", text) | ("table", header, rows) | ("img", path, caption)

#: characters that start markup anywhere in a line ("|" ends a cell, "`" opens code, "<" HTML, "[" "]" links)
_MD_SPECIAL = re.compile(r"([\\`*\[\]|<>~])")
#: "_" opens emphasis only at a word's edge: "streaming_llm" stays readable in the raw file
_MD_UNDERSCORE = re.compile(r"(?<![^\W_])_|_(?![^\W_])")
_NEWLINE = re.compile(r"\r\n|\r|\n")


def md_escape(text: object) -> str:
    """``str(text)`` as literal text in a Markdown table cell, heading or paragraph (CommonMark / GFM): markup
    characters backslash-escaped, line breaks as ``<br>`` (a table row is one line)."""
    escaped = _MD_UNDERSCORE.sub(r"\\_", _MD_SPECIAL.sub(r"\\\1", str(text)))
    return _NEWLINE.sub("<br>", escaped)


def render_markdown(blocks: list[ReportItem], base: Path) -> str:
    lines = []
    for b in blocks:
        if b[0] == "h":
            lines += ["#" * b[1] + " " + md_escape(b[2]), ""]
        elif b[0] == "p":
            lines += [md_escape(b[1]), ""]
        elif b[0] == "table":
            lines += ["| " + " | ".join(md_escape(c) for c in b[1]) + " |", "|" + "---|" * len(b[1])]
            lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in b[2]] + [""]
        elif b[0] == "img":
            lines += [f"![{md_escape(b[2])}]({quote(Path(b[1]).relative_to(base).as_posix())})", ""]
    return "\n".join(lines)


def render_html(blocks: list[ReportItem], title: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child{text-align:left}"
             "</style></head><body>"]
    for b in blocks:
        if b[0] == "h":
            parts.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            parts.append(f"<p>{html.escape(b[1])}</p>")
        elif b[0] == "table":
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in b[1])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in b[2])
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        elif b[0] == "img":  # embedded, so the page is one self-contained file
            data = base64.b64encode(Path(b[1]).read_bytes()).decode()
            parts.append(f"<p><img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'></p>")
    return "".join(parts) + "</body></html>"
