"""The report as a document: tables, figures and notes in sections, written as HTML, CSV and JSON.

``common.report`` decides what a run's report says; this module only knows
how a report is laid out and stored, so the clinical section
(``common.clinical_report``) and any later section build on the same blocks.
The HTML is one file: inline CSS, PNGs as data URIs, no script and no
external reference (it can be mailed or archived as it is).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

__all__ = ["Block", "Cell", "Note", "Plot", "Preformatted", "Section", "SectionBlocks", "Table", "write_report"]

Cell = str | int | float | None


@dataclass(frozen=True)
class Table:
    """A table as written to CSV/JSON (full precision) and shown in HTML (rounded, ``html_columns``)."""

    name: str  # file stem
    title: str
    caption: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    html_columns: tuple[str, ...] = ()
    collapsed: bool = False  # long tables go in a <details> element
    group_column: str = ""  # a new value here starts a ruled-off group of rows (a score, a model)

    def shown(self) -> tuple[str, ...]:
        return self.html_columns or self.columns


@dataclass(frozen=True)
class Plot:
    """A rendered figure and the one line saying what it shows."""

    name: str  # file stem
    title: str
    caption: str
    png: bytes


@dataclass(frozen=True)
class Note:
    """Something the report skipped or the reader must know, said where it matters."""

    text: str


@dataclass(frozen=True)
class Preformatted:
    """Verbatim text (the run's configuration), collapsed."""

    title: str
    text: str


Block = Table | Plot | Note | Preformatted


@dataclass(frozen=True)
class Section:
    anchor: str
    title: str
    blocks: tuple[Block, ...]


@dataclass
class SectionBlocks:
    """Collects a section's blocks in order (local to one section builder)."""

    blocks: list[Block] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.blocks.append(Note(text))

    def add(self, block: Block) -> None:
        self.blocks.append(block)


_HEADINGS: Mapping[str, str] = MappingProxyType(
    {"auc": "AUC", "f1": "F1", "n_pos": "malignant", "tn": "TN", "fp": "FP", "fn": "FN", "tp": "TP",
     "mae": "MAE", "val_auc": "validation AUC", "val_n": "validation n", "n_neg": "benign",
     "internal_fold_mean_auc": "internal AUC (mean of folds)", "internal_pooled_auc": "internal AUC (pooled)",
     "external_auc": "external AUC", "delong_p": "DeLong p"}
)


def _fmt(value: Cell) -> str:
    """HTML view of a cell: 4 decimals for rates, thousands separators for counts."""
    if value is None:
        return "–"
    if isinstance(value, bool | str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return "–"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.2e}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4f}"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1280px;
padding:1.2em 2em;color:#1b1b1b;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
nav a{margin-right:1em}table{border-collapse:collapse;margin:.3em 0 1.4em;font-size:.86em}
p.cap{margin:.8em 0 .2em;color:#444;font-size:.9em}p.cap b{color:#1b1b1b}p.cap i{color:#888}
th,td{border:1px solid #d4d4d4;padding:.25em .55em}th{background:#f2f4f7}tr.group td{border-top:2px solid #999}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr:nth-child(even) td{background:#fafafa}
figure{margin:1em 0 1.6em}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#444;font-size:.9em}figcaption b{color:#1b1b1b}
.note{color:#7a5a00;background:#fff8e1;border-left:4px solid #f0c000;padding:.3em .7em;font-size:.9em}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.8em}details{margin:.4em 0 1.2em}
summary{cursor:pointer;font-weight:600}
"""


def _heading(column: str) -> str:
    return _HEADINGS.get(column, column.replace("_", " "))


def _table_html(t: Table) -> str:
    cols = t.shown()
    idx = [t.columns.index(c) for c in cols]
    head = "".join(f"<th>{html.escape(_heading(c))}</th>" for c in cols)
    body: list[str] = []
    key = t.columns.index(t.group_column) if t.group_column else None
    previous: Cell = None
    for row in t.rows:
        group = ' class="group"' if key is not None and body and row[key] != previous else ""
        previous = row[key] if key is not None else None
        cells = []
        for i in idx:
            v = row[i]
            cls = ' class="num"' if isinstance(v, int | float) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{html.escape(_fmt(v))}</td>")
        body.append(f"<tr{group}>" + "".join(cells) + "</tr>")
    if not t.rows:
        body.append(f'<tr><td colspan="{len(cols)}">no rows</td></tr>')
    table = (f'<p class="cap"><b>{html.escape(t.title)}.</b> {html.escape(t.caption)} <i>({t.name}.csv)</i></p>'
             f'<table id="{t.name}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')
    if t.collapsed:
        return f"<details><summary>{html.escape(t.title)} ({len(t.rows)} rows)</summary>{table}</details>"
    return table


def _plot_html(p: Plot) -> str:
    data = base64.b64encode(p.png).decode("ascii")
    return (f'<figure id="{p.name}"><img alt="{html.escape(p.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption><b>{html.escape(p.title)}.</b> {html.escape(p.caption)}</figcaption></figure>")


def _block_html(block: Block) -> str:
    if isinstance(block, Table):
        return _table_html(block)
    if isinstance(block, Plot):
        return _plot_html(block)
    if isinstance(block, Note):
        return f'<p class="note">{html.escape(block.text)}</p>'
    return f"<details><summary>{html.escape(block.title)}</summary><pre>{html.escape(block.text)}</pre></details>"


def render_html(title: str, sections: Sequence[Section]) -> str:
    """The whole page: inline CSS, images as data URIs, no script and no external reference."""
    nav = "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections)
    body = "".join(
        f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>{"".join(_block_html(b) for b in s.blocks)}</section>'
        for s in sections
    )
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><nav>{nav}</nav>{body}</body></html>\n")


def _write_table(t: Table, folder: Path) -> None:
    with (folder / f"{t.name}.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(t.columns)
        writer.writerows(["" if v is None else v for v in row] for row in t.rows)


def _blocks(sections: Iterable[Section]) -> Iterable[Block]:
    return (b for s in sections for b in s.blocks)


def write_report(folder: Path, title: str, sections: Sequence[Section], curves: Any) -> Path:
    """Write the HTML, PNGs, CSV tables, ``tables.json`` and ``curves.json`` (``curves``, JSON-ready) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    tables = [b for b in _blocks(sections) if isinstance(b, Table)]
    plots = [b for b in _blocks(sections) if isinstance(b, Plot)]
    for kind, items in (("table", tables), ("figure", plots)):
        dupes = [n for n, c in Counter(x.name for x in items).items() if c > 1]
        if dupes:  # a programming error: two blocks would overwrite one file
            raise ValueError(f"duplicate {kind} names in the report: {dupes}")
    for t in tables:
        _write_table(t, folder)
    for p in plots:
        (folder / f"{p.name}.png").write_bytes(p.png)
    (folder / "tables.json").write_text(json.dumps(
        {t.name: {"title": t.title, "caption": t.caption, "columns": list(t.columns), "rows": [list(r) for r in t.rows]}
         for t in tables}, indent=1))
    (folder / "curves.json").write_text(json.dumps(curves))
    path = folder / "report.html"
    path.write_text(render_html(title, sections), encoding="utf-8")
    return path
