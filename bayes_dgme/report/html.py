"""The page shell of the HTML reports: style, tables, sections, embedded PNG figures.

A report is a single HTML file with its figures embedded as base64 PNG (no external asset, no
JavaScript), so it can be mailed, archived or opened offline.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["esc", "png", "img", "figure_img", "badge", "table", "section", "page", "fmt", "fmt_ess", "one_line",
           "note"]

_CSS = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --accent:#2c7fb8; --pass:#1e8e3e; --fail:#c0392b; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color:var(--ink); background:#f5f7fa; }
header { background:linear-gradient(120deg,#1d3557,#2c7fb8); color:white; padding:26px 40px 20px; }
header h1 { margin:0 0 4px; font-size:26px; font-weight:600; }
header p { margin:2px 0; opacity:.92; }
nav { position:sticky; top:0; z-index:2; background:white; border-bottom:1px solid var(--line);
      padding:8px 40px; font-size:13.5px; }
nav a { color:var(--accent); text-decoration:none; margin-right:16px; white-space:nowrap; }
main { max-width:1180px; margin:0 auto; padding:18px 28px 60px; }
section { background:white; border:1px solid var(--line); border-radius:10px; padding:16px 24px 18px;
          margin:18px 0; box-shadow:0 1px 2px rgba(0,0,0,.04); }
h2 { margin:2px 0 10px; font-size:19px; color:#1d3557; }
h3 { margin:14px 0 6px; font-size:15px; color:#334e68; }
p.note { color:var(--muted); font-size:13.5px; margin:6px 0; }
img { max-width:100%; height:auto; display:block; margin:8px auto; }
table { border-collapse:collapse; font-size:13px; margin:6px 0 4px; }
th, td { padding:4px 10px; border-bottom:1px solid var(--line); text-align:right; white-space:nowrap; }
th { background:#f0f4f8; color:#334e68; font-weight:600; }
td:first-child, th:first-child { text-align:left; }
tr:hover td { background:#fafcff; }
.badge { display:inline-block; padding:1px 9px; border-radius:10px; font-size:12px; font-weight:600;
         color:white; }
.pass { background:var(--pass); } .fail { background:var(--fail); } .na { background:#9aa5b1; }
.verdict { display:inline-block; margin-top:10px; padding:4px 12px; border-radius:14px; font-weight:600;
           background:rgba(255,255,255,.18); }
.grid { display:grid; grid-template-columns:repeat(auto-fit,minmax(300px,1fr)); gap:8px 28px; }
.kv td { text-align:left; white-space:normal; } .kv td:first-child { color:var(--muted); white-space:nowrap; }
.kv thead { display:none; }
.outside { color:var(--fail); font-weight:600; }
.scroll { overflow-x:auto; }
details { margin:10px 0; } summary { cursor:pointer; color:#334e68; }
code { background:#f0f4f8; padding:1px 5px; border-radius:4px; font-size:13px; }
footer { color:var(--muted); font-size:12.5px; text-align:center; margin-top:30px; }
"""




def esc(x: Any) -> str:
    """HTML-escaped text."""
    return html.escape(str(x))


def png(fig, dpi: int = 96) -> str:
    """A matplotlib figure as a base64 PNG string (the figure is closed if pyplot manages it)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    import matplotlib.pyplot as plt

    if plt.fignum_exists(getattr(fig, "number", -1)):
        plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def img(b64: str, alt: str) -> str:
    """An ``<img>`` with an embedded PNG."""
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{b64}">'


def figure_img(fig, alt: str) -> str:
    """A matplotlib figure as an embedded ``<img>``."""
    return img(png(fig), alt)


def badge(status: str) -> str:
    """A coloured PASS / FAIL / N/A badge."""
    cls = {"pass": "pass", "fail": "fail"}.get(status, "na")
    return f'<span class="badge {cls}">{esc(status.upper())}</span>'


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "", raw: bool = False,
          table_id: str | None = None) -> str:
    """An HTML table; cells are escaped unless ``raw``."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(f"<td>{c if raw else esc(c)}</td>" for c in row)
        body.append(f"<tr>{cells}</tr>")
    ident = f' id="{table_id}"' if table_id else ""
    return f'<div class="scroll"><table{ident} class="{cls}"><thead><tr>{head}</tr></thead><tbody>' \
           f'{"".join(body)}</tbody></table></div>'


def note(text: str) -> str:
    """A muted paragraph (``text`` is HTML)."""
    return f'<p class="note">{text}</p>'


def section(sid: str, title: str, body: str) -> str:
    """A report section with its anchor id."""
    return f'<section id="{sid}"><h2>{esc(title)}</h2>{body}</section>'


def page(title: str, subtitle: list[str], verdict: str, nav: list[tuple[str, str]], sections: list[str]) -> str:
    """The whole HTML document."""
    from .. import __version__

    navhtml = "".join(f'<a href="#{sid}">{esc(name)}</a>' for sid, name in nav)
    sub = "".join(f"<p>{s}</p>" for s in subtitle if s)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
        f"<style>{_CSS}</style></head><body><header><h1>{esc(title)}</h1>{sub}{verdict}</header>"
        f"<nav>{navhtml}</nav><main>{''.join(sections)}"
        f"<footer>bayes_dgme {__version__} · generated {stamp} · self-contained report (figures embedded)"
        "</footer></main></body></html>\n"
    )


def fmt(x: Any, digits: int = 4) -> str:
    """A number for a table (``—`` for None/NaN)."""
    if x is None:
        return "—"
    if isinstance(x, (float, np.floating)):
        if not np.isfinite(x):
            return "—"
        return f"{x:.{digits}g}"
    return str(x)


def fmt_ess(x: Any) -> str:
    """An effective sample size, rounded (``—`` when missing)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "—"
    return f"{x:.0f}" if np.isfinite(x) else "—"


def one_line(err: BaseException) -> str:
    """An exception as one line of text."""
    return " ".join(str(err).split()) or type(err).__name__
