"""The HTML of the run report and the compare page: one self-contained file, every picture a data: URI, no script
and no request leaving the page (it opens offline and survives being copied or mailed)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1000px; color: #1f2328; }
table { border-collapse: collapse; margin-bottom: 1.5rem; } th, td { padding: 2px 12px; text-align: left; }
th { color: #59636e; font-weight: normal; } figure { margin: 1.5rem 0; } img { max-width: 100%; }
table.grid th, table.grid td { border-bottom: 1px solid #d1d9e0; } table.grid thead th { font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figcaption { color: #59636e; font-size: 0.9rem; } code { background: #f6f8fa; padding: 1px 4px; }
"""


def escape(value: Any) -> str:
    return html.escape(str(value))


def figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(caption)}" data-file="{escape(path.name)}">'
            f"<figcaption>{escape(caption)} ({escape(path.name)})</figcaption></figure>\n")  # fmt: skip


def cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return f"<td>{escape('—' if value is None else value)}</td>"
    if isinstance(value, float):  # 4 decimals, and 4 significant digits where those would hide the value (lr 3e-5)
        return f'<td class="num">{value:.4f}</td>' if value == 0 or 1e-3 <= abs(value) < 1e6 else f'<td class="num">{value:.4g}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    return f"<td>{escape(value)}</td>"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, row_headers: bool = False) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = ""
    for row in rows:
        first, rest = (f"<th>{escape(row[0])}</th>", row[1:]) if row_headers else ("", row)
        body += "<tr>" + first + "".join(cell(v) for v in rest) + "</tr>"
    return f'<table class="grid"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n'


def page(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>\n'
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")  # fmt: skip
