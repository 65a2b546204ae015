"""Drawing for the run report: data in, PNG bytes out.

The report (``common.report_figures``) computes every curve from the pooled grid
statistics; this module only draws them, so what is plotted is exactly what
the report's JSON tables hold.  Figures are built with matplotlib's
object-oriented API on an explicit Agg canvas: no display, no ``pyplot`` and
its global figure registry, so concurrent reports cannot interfere.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from numpy.typing import ArrayLike

__all__ = [
    "BarGroup",
    "Panel",
    "Series",
    "bar_figure",
    "confusion_figure",
    "line_figure",
    "png_bytes",
]

_DPI = 110


@dataclass(frozen=True)
class Series:
    """One line on a panel; ``marker`` draws points too (calibration bins, selected rounds)."""

    label: str
    x: ArrayLike
    y: ArrayLike
    color: str | None = None
    linestyle: str = "-"
    marker: str | None = None
    linewidth: float = 1.6


@dataclass(frozen=True)
class Panel:
    """One subplot: its title, lines, and the axis set-up the kind of curve needs."""

    title: str
    series: Sequence[Series]
    xlabel: str = ""
    ylabel: str = ""
    xlim: tuple[float, float] | None = None
    ylim: tuple[float, float] | None = None
    diagonal: bool = False  # chance line (ROC) or perfect calibration
    square: bool = False
    integer_x: bool = False  # rounds
    note: str = ""  # drawn in the panel when it has no series


@dataclass(frozen=True)
class BarGroup:
    """Bars of one category (a score, a site): one value per series, NaN for none."""

    label: str
    values: Sequence[float]
    points: Sequence[float] = field(default_factory=tuple)  # extra dots (e.g. each local site)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure) -> bytes:
    """Render to PNG; the Software tag is dropped so a rerun gives the same bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def _draw_panel(ax: Axes, panel: Panel, legend: bool) -> None:
    if panel.diagonal:
        ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1.0)
    for s in panel.series:
        ax.plot(
            np.asarray(s.x, dtype=float),
            np.asarray(s.y, dtype=float),
            label=s.label,
            color=s.color,
            linestyle=s.linestyle,
            marker=s.marker,
            markersize=4,
            linewidth=s.linewidth,
        )
    if not panel.series and panel.note:
        ax.text(0.5, 0.5, panel.note, ha="center", va="center", transform=ax.transAxes, color="0.4", wrap=True)
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    if panel.xlim:
        ax.set_xlim(*panel.xlim)
    if panel.ylim:
        ax.set_ylim(*panel.ylim)
    if panel.square:
        ax.set_aspect("equal", adjustable="box")
    if panel.integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, color="0.92", linewidth=0.8)
    if legend and panel.series:
        ax.legend(fontsize=7, loc="lower right" if panel.diagonal else "best", frameon=False)


def line_figure(
    panels: Sequence[Panel], panel_width: float = 4.6, panel_height: float = 4.2, shared_legend: bool = False
) -> Figure:
    """Panels side by side (ROC, calibration, decision curves, AUC per round).

    ``shared_legend`` puts one legend under the panels instead of one per
    panel: for busy curves (calibration, decision) that a legend would hide.
    """
    if not panels:
        raise ValueError("a line figure needs at least one panel")
    width = panel_width * len(panels)
    fig = _figure(width, panel_height + (0.5 if shared_legend else 0.0))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        _draw_panel(ax, panel, legend=not shared_legend)
    if shared_legend:
        by_label: dict[str, Artist] = {}
        for ax in axes:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                by_label.setdefault(label, handle)
        if by_label:
            fig.legend(list(by_label.values()), list(by_label), loc="outside lower center",
                       ncols=max(1, min(4, len(by_label), int(width // 2.3))), fontsize=8, frameon=False)
    return fig


def confusion_figure(
    rows: Sequence[str],
    columns: Sequence[str],
    matrices: Sequence[Sequence[Sequence[Sequence[int]] | None]],
) -> Figure:
    """Grid of 2x2 confusion matrices ``[[TN, FP], [FN, TP]]``; ``None`` cells are left blank.

    Shading is per matrix (row-normalised), so a small external set is as
    readable as the internal one; the cells print the counts.
    """
    fig = _figure(2.3 * max(len(columns), 1) + 0.6, 2.3 * max(len(rows), 1) + 0.4)
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for i, row in enumerate(rows):
        for j, col in enumerate(columns):
            ax = axes[i][j]
            cm = matrices[i][j]
            ax.set_xticks([0, 1], ["benign", "malignant"], fontsize=7)
            ax.set_yticks([0, 1], ["benign", "malignant"], fontsize=7)
            ax.set_title(f"{col}\n{row}", fontsize=7.5)
            if cm is None:
                ax.text(0.5, 0.5, "not available", ha="center", va="center", transform=ax.transAxes, color="0.4")
                continue
            arr = np.asarray(cm, dtype=float)
            totals = arr.sum(axis=1, keepdims=True)
            share = np.divide(arr, totals, out=np.zeros_like(arr), where=totals > 0)
            ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
            for (r, c), v in np.ndenumerate(arr):
                ax.text(c, r, f"{int(v)}", ha="center", va="center", fontsize=10,
                        color="white" if share[r, c] > 0.6 else "black")
            if j == 0:
                ax.set_ylabel("actual", fontsize=7)
            if i == len(rows) - 1:
                ax.set_xlabel("predicted", fontsize=7)
    return fig


def bar_figure(
    groups: Sequence[BarGroup],
    series: Sequence[str],
    ylabel: str,
    colors: Sequence[str] | None = None,
    hlines: Sequence[tuple[str, float]] = (),
    ylim: tuple[float, float] | None = None,
    points_label: str = "",
    points_series: int = -1,
) -> Figure:
    """Grouped bars (one group per category, one bar per series) with optional reference lines.

    A group's ``points`` are drawn as dots over the bar of series ``points_series``
    (e.g. each site's local-only AUC over the local-only mean).
    """
    if not groups or not series:
        raise ValueError("a bar figure needs at least one group and one series")
    fig = _figure(4.5 + 0.45 * len(groups) * len(series), 4.0)
    ax = fig.subplots()
    ax.set_axisbelow(True)
    width = 0.8 / len(series)
    x = np.arange(len(groups), dtype=float)
    offsets = (np.arange(len(series)) - (len(series) - 1) / 2) * width
    for k, name in enumerate(series):
        vals = np.array([g.values[k] for g in groups], dtype=float)
        color = colors[k] if colors else None
        bars = ax.bar(x + offsets[k], np.nan_to_num(vals), width, label=name, color=color)
        for bar, v in zip(bars, vals, strict=True):
            if np.isfinite(v):
                ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
    dots = [(i + offsets[points_series], p) for i, g in enumerate(groups) for p in g.points if np.isfinite(p)]
    if dots:
        ax.scatter([d[0] for d in dots], [d[1] for d in dots], color="black", s=12, zorder=3, label=points_label)
    styles = ("--", "-.", ":", (0, (5, 1)))
    for k, (label, value) in enumerate(hlines):
        ax.axhline(value, color="0.3", linestyle=styles[k % len(styles)], linewidth=1.0, label=f"{label} ({value:.3f})")
    ax.set_xticks(x, [g.label for g in groups], fontsize=8, rotation=15 if len(groups) > 4 else 0)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(True, axis="y", color="0.92")
    fig.legend(fontsize=7, frameon=False, loc="outside right upper")
    return fig
