"""The multi-reader analysis in a federation: per-reader histograms, DeLong step-2 specs, results.

Sites send, per reader group (a tier, or ``all``), one grid histogram per
reading ``reader@session`` (``mrmc/<group>/<reader>@<session>/<field>``) of the
cases every reader of the group read.  The server sums them
(:func:`mrmc_histograms`), asks the sites for the placement sums of every pair
of readings through the ordinary DeLong step 2 (:func:`mrmc_specs`), and runs
the Obuchowski-Rockette analysis on the assembled covariance matrix
(:func:`mrmc_results`, ``common.mrmc``).  Pure functions: the server sends,
the sites answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from common.gridstats import ClassHistogram
from common.mrmc import cov_from_pairs, or_analysis

__all__ = ["MRMC_PREFIX", "mrmc_histograms", "mrmc_results", "mrmc_specs", "reading_key"]

MRMC_PREFIX = "mrmc/"


def reading_key(reader: str, session: str) -> str:
    """One reader's readings under one session, as named on the wire (``reader@session``)."""
    return f"{reader}@{session}"


def mrmc_histograms(
    parts: Iterable[tuple[str, str, Any]], bins: int
) -> tuple[dict[str, dict[str, ClassHistogram]], list[str]]:
    """Sum the sites' per-reader arrays ``(site, "mrmc/<group>/<reader@session>/<field>", array)``.

    Returns ``{group: {reading: global histogram}}`` and the problems found; a
    malformed key, an invalid histogram or one on another grid than the run's
    ``bins`` drops that site's reading (named in the problem), never the run.
    """
    fields: dict[tuple[str, str, str], dict[str, Any]] = {}
    problems: list[str] = []
    for site, key, value in parts:
        bits = key.split("/")
        if len(bits) != 4 or bits[0] + "/" != MRMC_PREFIX or "@" not in bits[2] or not all(bits):
            problems.append(
                f"{site}: reader statistic {key!r} is not mrmc/<group>/<reader>@<session>/<field>"
            )
            continue
        fields.setdefault((site, bits[1], bits[2]), {})[bits[3]] = value
    out: dict[str, dict[str, ClassHistogram]] = {}
    for (site, group, reading), d in sorted(fields.items()):
        try:
            h = ClassHistogram.from_arrays(d)
            if h.bins != bins:
                raise ValueError(f"{h.bins} bins, the run's grid has {bins}")
            per = out.setdefault(group, {})
            per[reading] = per[reading] + h if reading in per else h
        except ValueError as exc:
            problems.append(f"{site}: reader statistics {group}/{reading} dropped: {exc}")
    return out, problems


def mrmc_specs(
    hists: Mapping[str, Mapping[str, Any]],
    sessions: Sequence[str] = ("without_ai", "with_ai"),
) -> tuple[dict[str, Any], list[list[str]], list[str]]:
    """DeLong step-2 specs for every pair of readings of every reader group.

    ``hists[group][reading]`` are the global histograms (``reading = reader@session``).
    Returns the histograms to send keyed ``"<reading>/mrmc/<group>"``, the specs
    ``[reading_a, reading_b, "mrmc/<group>"]`` (``a <= b``; ``a == b`` gives the variance
    of a lone reading) and their names ``"mrmc/<group>/<a> vs <b>"``.
    """
    global_h: dict[str, Any] = {}
    specs: list[list[str]] = []
    names: list[str] = []
    for group, readings in sorted(hists.items()):
        keys = _ordered_keys(readings, sessions)
        if not keys:
            continue
        subset = f"{MRMC_PREFIX}{group}"
        for k in keys:
            global_h[f"{k}/{subset}"] = readings[k]
        for a in range(len(keys)):
            for b in range(a + 1 if len(keys) > 1 else a, len(keys)):
                specs.append([keys[a], keys[b], subset])
                names.append(f"{subset}/{keys[a]} vs {keys[b]}")
    return global_h, specs, names


def _ordered_keys(readings: Mapping[str, Any], sessions: Sequence[str]) -> list[str]:
    """Modality-major order (``i * J + j``) over readers who have every session."""
    readers = sorted({k.rsplit("@", 1)[0] for k in readings})
    full = [r for r in readers if all(reading_key(r, s) in readings for s in sessions)]
    return [reading_key(r, s) for s in sessions for r in full]


def mrmc_results(
    hists: Mapping[str, Mapping[str, Any]],
    pairs: Mapping[str, Mapping[str, Any]],
    sessions: Sequence[str] = ("without_ai", "with_ai"),
    alpha: float = 0.05,
) -> dict[str, dict[str, Any]]:
    """OR analysis per reader group from the pairwise DeLong results named by :func:`mrmc_specs`.

    ``pairs[name]`` is a ``DeLongResult.to_dict()``.  A group whose readers did not
    read the same cases, or whose pairs are incomplete, gets ``{"skipped": why}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for group, readings in sorted(hists.items()):
        keys = _ordered_keys(readings, sessions)
        if not keys:
            out[group] = {"skipped": "no reader has readings in every session"}
            continue
        counts = {(int(readings[k].n_pos), int(readings[k].n_neg)) for k in keys}
        if len(counts) != 1:
            out[group] = {
                "skipped": "the readers of this group did not read the same cases (not fully crossed)"
            }
            continue
        n_pos, n_neg = counts.pop()
        subset = f"{MRMC_PREFIX}{group}"
        found: dict[tuple[int, int], tuple[float, float, float]] = {}
        auc = np.full(len(keys), np.nan)
        for a in range(len(keys)):
            for b in range(a + 1 if len(keys) > 1 else a, len(keys)):
                r = pairs.get(f"{subset}/{keys[a]} vs {keys[b]}")
                if r is None or r.get("var1") is None or r.get("var2") is None or r.get("cov") is None:
                    continue
                found[(a, b)] = (float(r["var1"]), float(r["var2"]), float(r["cov"]))
                auc[a], auc[b] = float(r["auc1"]), float(r["auc2"])
        try:
            cov = cov_from_pairs(len(keys), found)
        except ValueError as exc:
            out[group] = {"skipped": f"incomplete DeLong covariances ({exc})"}
            continue
        readers = [k.rsplit("@", 1)[0] for k in keys[: len(keys) // len(sessions)]]
        res = or_analysis(
            auc.reshape(len(sessions), len(readers)),
            cov,
            modalities=sessions,
            readers=readers,
            n_pos=n_pos,
            n_neg=n_neg,
            alpha=alpha,
        )
        out[group] = res.to_dict()
    return out
