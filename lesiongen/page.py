"""A report page as sections (the demo report, the audit), rendered twice: Markdown (``report.md``) and self-contained HTML (``report.html``).

Each section is a title, notes, figures (PNG files, embedded as data URIs in the HTML so the one file can
be mailed or opened anywhere), an optional table and optional commands; both renderers walk the same list,
so the two files cannot drift apart, and both leave out a section with nothing to show.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#222}
h1{margin-bottom:4px} h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.note{color:#444;font-size:14px} table{border-collapse:collapse;margin:8px 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left} th{background:#f3f3f3}
.fig{display:inline-block;margin:6px 14px 10px 0;vertical-align:top;max-width:560px}
.fig img{image-rendering:pixelated;display:block;border:1px solid #bbb}
.fig .cap{font-size:13px;margin-bottom:2px} pre{background:#f6f6f6;padding:8px;white-space:pre-wrap;word-break:break-all;font-size:12.5px}
"""


@dataclass
class Figure:
    caption: str
    path: Path
    width: int | None = None  # display width in the HTML (tiles are small; pixelated upscaling keeps them crisp)


@dataclass
class Section:
    title: str
    notes: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    table: tuple[list[str], list[list[str]]] | None = None  # (headers, rows of cells)
    commands: list[tuple[str, str]] = field(default_factory=list)  # (what it does, command)

    def shows_something(self) -> bool:
        return bool(self.notes or self.figures or self.table or self.commands)


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def to_markdown(title: str, sections: list[Section], files: str) -> str:
    """``files`` is the figures' folder relative to the page."""
    lines = [f"# {title}", ""]
    for s in filter(Section.shows_something, sections):
        lines += [f"## {s.title}", ""]
        lines += [n + "\n" for n in s.notes]
        for f in s.figures:
            lines += [f"**{f.caption}**  ", f"![{f.caption}]({files}/{f.path.name})", ""]
        if s.table:
            lines += [markdown_table(*s.table), ""]
        for what, command in s.commands:
            lines += [f"{what}:", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def to_html(title: str, sections: list[Section], intro: str) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p class='note'>{e(intro)}</p>",
    ]
    for s in filter(Section.shows_something, sections):
        parts.append(f"<h2>{e(s.title)}</h2>")
        parts += [f"<p class='note'>{e(n)}</p>" for n in s.notes]
        for f in s.figures:
            width = f" width='{f.width}'" if f.width else ""
            parts.append(
                f"<div class='fig'><div class='cap'>{e(f.caption)}</div>"
                f"<img alt='{e(f.caption)}' src='{data_uri(f.path)}'{width}></div>"
            )
        if s.table:
            headers, rows = s.table
            head = "".join(f"<th>{e(h)}</th>" for h in headers)
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        for what, command in s.commands:
            parts.append(f"<p>{e(what)}:</p><pre>{e(command)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)
