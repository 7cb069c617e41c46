"""``report.html``: one self-contained page per evaluation or predict batch.

Tables, curves (inline SVG, or PNG files of the output folder by relative path) and a gallery of
panels sorted by score, filterable by class and decision with a few lines of inline JavaScript.
Nothing is fetched from the network and no server is needed: open the file in a browser. When its
script has run, the page shows ``id="status"`` with ``data-ready="1"`` (what the browser test reads).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPORT_FILE = "report.html"

_STYLE = """
body{font-family:sans-serif;margin:1.2em;color:#222}
table{border-collapse:collapse;margin:.6em 0}
td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}
.figs{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0}
figcaption{font-size:90%}
#gallery{display:flex;flex-direction:column;gap:10px}
.card{border:1px solid #ccc;padding:4px}
.card img{max-width:100%;height:auto;display:block}
.anomalous .tag{color:#b00;font-weight:bold}
.normal .tag{color:#070}
.note{color:#555;font-size:90%}
"""

_SCRIPT = """
(function(){
  var cards = Array.prototype.slice.call(document.querySelectorAll('#gallery .card'));
  var cls = document.getElementById('f-class'), dec = document.getElementById('f-decision');
  var status = document.getElementById('status');
  function apply(){
    var shown = 0;
    cards.forEach(function(c){
      var ok = (cls.value === '' || c.dataset.cls === cls.value) &&
               (dec.value === '' || c.dataset.decision === dec.value);
      c.style.display = ok ? '' : 'none';
      if (ok) shown++;
    });
    status.textContent = shown + ' of ' + cards.length + ' images shown (sorted by score, highest first)';
  }
  cls.addEventListener('change', apply);
  dec.addEventListener('change', apply);
  apply();
  status.dataset.ready = '1';
})();
"""


@dataclass
class GalleryItem:
    """One image of the gallery: its panel (path relative to the page), class, decision and score."""

    src: str
    cls: str
    decision: str
    score: float
    text: str


def line_chart(
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    marker: float | None = None,
    width: int = 320,
    height: int = 240,
) -> str:
    """An inline SVG line chart of ``(label, xs, ys)`` series; ``marker`` draws a vertical line at x."""
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    xs_all = [float(x) for _, xs, _ in series for x in xs if math.isfinite(float(x))]
    ys_all = [float(y) for _, _, ys in series for y in ys if math.isfinite(float(y))]
    if marker is not None and math.isfinite(marker):
        xs_all.append(float(marker))
    if not xs_all or not ys_all:
        return f'<p class="note">{html.escape(title)}: no curve (undefined for this data)</p>'
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = min(0.0, min(ys_all)), max(1.0, max(ys_all))
    x1 = x1 if x1 > x0 else x0 + 1.0
    left, bottom, top, right = 40, 30, 20, 10

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - bottom - top)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
        f'<text x="{width / 2}" y="14" text-anchor="middle" font-size="12">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
        'fill="none" stroke="#999"/>',
        f'<text x="{width / 2}" y="{height - 4}" text-anchor="middle" font-size="11">{html.escape(xlabel)}'
        f" ({x0:.3g} .. {x1:.3g})</text>",
        f'<text x="10" y="{height / 2}" font-size="11" transform="rotate(-90 10 {height / 2})" '
        f'text-anchor="middle">{html.escape(ylabel)}</text>',
    ]
    for i, (label, xs, ys) in enumerate(series):
        pts = " ".join(
            f"{px(float(x)):.1f},{py(float(y)):.1f}"
            for x, y in zip(xs, ys, strict=True)
            if math.isfinite(float(x)) and math.isfinite(float(y))
        )
        colour = colours[i % len(colours)]
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        parts.append(
            f'<text x="{left + 6}" y="{top + 14 + 13 * i}" font-size="11" fill="{colour}">'
            f"{html.escape(label)}</text>"
        )
    if marker is not None and math.isfinite(marker):
        parts.append(
            f'<line x1="{px(marker):.1f}" x2="{px(marker):.1f}" y1="{top}" y2="{height - bottom}" '
            'stroke="#c0c" stroke-dasharray="4 3"/>'
        )
    parts.append("</svg>")
    return "".join(parts)


def table_html(caption: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain HTML table (cells escaped)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="metrics"><caption>{html.escape(caption)}</caption><tr>{head}</tr>{body}</table>'


def write_report(
    path: str | Path,
    title: str,
    notes: Sequence[str],
    tables: Sequence[str],
    figures: Sequence[tuple[str, str]],
    gallery: Sequence[GalleryItem],
    legend: str,
    counts: Mapping[str, int] | None = None,
) -> Path:
    """Write the page: ``tables`` (HTML from :func:`table_html`), ``figures`` as ``(caption, svg or
    relative image path)``, the gallery sorted by score (highest first), ``legend`` the colour scale."""
    items = sorted(gallery, key=lambda g: -g.score if math.isfinite(g.score) else math.inf)
    classes = sorted({g.cls for g in items})
    decisions = sorted({g.decision for g in items})
    figs = []
    for caption, content in figures:
        body = content if content.lstrip().startswith("<") else f'<img src="{html.escape(content)}" alt="">'
        figs.append(f"<figure>{body}<figcaption>{html.escape(caption)}</figcaption></figure>")
    cards = [
        f'<div class="card {html.escape(g.decision)}" data-cls="{html.escape(g.cls)}" '
        f'data-decision="{html.escape(g.decision)}"><div><span class="tag">{html.escape(g.decision)}</span> '
        f"{html.escape(g.text)}</div>"
        f'<img loading="lazy" src="{html.escape(g.src)}" alt="{html.escape(g.text)}"></div>'
        for g in items
    ]
    options_cls = "".join(f'<option value="{html.escape(c)}">{html.escape(c)}</option>' for c in classes)
    options_dec = "".join(f'<option value="{html.escape(d)}">{html.escape(d)}</option>' for d in decisions)
    summary = ", ".join(f"{k}: {v}" for k, v in (counts or {}).items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
{"".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)}
<h2>Results</h2>
{"".join(tables)}
<h2>Curves</h2>
<div class="figs">{"".join(figs) or '<p class="note">no curves</p>'}</div>
<h2>Gallery</h2>
<p class="note">{html.escape(legend)}</p>
<p class="note">{html.escape(summary)}</p>
<label>class <select id="f-class"><option value="">all</option>{options_cls}</select></label>
<label>decision <select id="f-decision"><option value="">all</option>{options_dec}</select></label>
<p id="status">script not run</p>
<div id="gallery">{"".join(cards)}</div>
<script>{_SCRIPT}</script>
</body></html>
"""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
