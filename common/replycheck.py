"""Checks on what a site sends back, before the server uses any of it.

Every reply comes from another party, so each value is checked against what an
honest site can send: a finite positive example count no larger than the
patients the site declared, histograms of the configured grid whose counts fit
the site's patients and whose sums are finite and possible for scores in
[0, 1], feature moments and DeLong sums that are finite.  Each check raises
:class:`ReplyRejected` with a reason that names the field, never a value that
could come from a patient; the caller drops that site for that step and records
the reason (see ``server.strategy`` and ``server.runner``).

Pure functions on plain numbers and numpy arrays: this module imports nothing
from the project, so ``common.gridstats`` and every server module can use it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "MAX_REPORTED_CHARS",
    "MAX_SITE_PATIENTS",
    "REPORTED_KEYS",
    "ReplyLimits",
    "ReplyRejected",
    "check_delong_sums",
    "check_feature_moments",
    "check_histogram_arrays",
    "check_num_examples",
    "check_params",
    "check_site_info",
    "histogram_groups",
    "reported",
]

MAX_SITE_PATIENTS = 1_000_000
"""More patients than any hospital's sacral tumour cohort: a larger claim is a lie or a bug."""

COUNT_KEYS = ("neg", "pos")
SUM_KEYS = ("neg_sum", "pos_sum", "neg_sq", "pos_sq")
_KEY_PART = re.compile(r"(?!\.+$)[A-Za-z0-9_.+-]+")
# Sums of float64 scores in [0, 1] can exceed count * 1 by rounding only.
_SUM_TOL = 1e-6


class ReplyRejected(ValueError):
    """A site's reply is not what an honest site can send; the message says which field and why."""


@dataclass(frozen=True)
class ReplyLimits:
    """What the run's own configuration allows a reply to hold.

    ``bins``: the grid every histogram must use; ``noise_scale``: the Laplace
    scale the sites add to counts (``evaluation.stats_noise``), which adds
    phantom patients that the count bound must allow for.
    """

    bins: int
    noise_scale: float = 0.0

    def max_count(self, patients: int | None) -> int | None:
        """Most patients a histogram of a site with ``patients`` may hold (None: no bound).

        With noise each of the ``2 * bins`` cells may gain up to ``50 * scale``
        (a Laplace draw beyond that has probability ``e^-50 / 2``).
        """
        if patients is None:
            return None
        return int(
            patients + (2 * self.bins * math.ceil(50 * self.noise_scale) if self.noise_scale > 0 else 0)
        )


def _finite_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ReplyRejected(f"{name} is a {type(value).__name__}, not a number")
    x = float(value)
    if not math.isfinite(x):
        raise ReplyRejected(f"{name} is not finite")
    return x


def _count(value: Any, name: str, cap: int = MAX_SITE_PATIENTS) -> int:
    x = _finite_number(value, name)
    if x < 0 or x != round(x):
        raise ReplyRejected(f"{name} must be a non-negative whole number")
    if x > cap:
        raise ReplyRejected(f"{name} {x:.0f} exceeds {cap}")
    return int(x)


def check_site_info(metrics: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(patients, benign, malignant)`` of a ``siteinfo`` reply: whole numbers that add up."""
    try:
        patients, benign, malignant = (_count(metrics[k], k) for k in ("patients", "benign", "malignant"))
    except KeyError as exc:
        raise ReplyRejected(f"site information lacks {exc}") from None
    if benign + malignant != patients:
        raise ReplyRejected(f"benign {benign} + malignant {malignant} != patients {patients}")
    return patients, benign, malignant


def check_num_examples(value: Any, cap: int | None) -> float:
    """A training reply's example count: finite, > 0 and at most the site's declared patients.

    The count weights the site's update in the average, so an unchecked one
    lets a single site take over the global model (n = 1e12) or poison it (NaN).
    """
    n = _finite_number(value, "num-examples")
    if n <= 0:
        raise ReplyRejected(f"num-examples {n:g} must be > 0")
    limit = MAX_SITE_PATIENTS if cap is None else cap
    if n > limit:
        raise ReplyRejected(f"num-examples {n:.6g} exceeds the site's {limit} declared patients")
    return n


def check_histogram_arrays(
    arrays: Mapping[str, Any],
    *,
    bins: int | None = None,
    max_patients: int | None = None,
) -> dict[str, NDArray[Any]]:
    """The arrays of one :class:`common.gridstats.ClassHistogram`, checked; absent sums stay absent.

    Counts: ``bins`` long (when given), finite non-negative whole numbers, in
    all at most ``max_patients`` (when given).  Sums, when present: same
    shape, finite, and possible for scores in [0, 1] (``0 <= sum <= count``,
    ``0 <= sum of squares <= sum``).
    """
    unknown = sorted(set(arrays) - set(COUNT_KEYS) - set(SUM_KEYS))
    if unknown:
        raise ReplyRejected(f"histogram has unknown fields {unknown[:3]}")
    missing = [k for k in COUNT_KEYS if k not in arrays]
    if missing:
        raise ReplyRejected(f"histogram lacks {missing}")
    out: dict[str, NDArray[Any]] = {}
    for key in (*COUNT_KEYS, *SUM_KEYS):
        if key not in arrays:
            continue
        arr = np.asarray(arrays[key])
        if arr.dtype.kind not in "biuf":
            raise ReplyRejected(f"histogram field {key!r} has dtype {arr.dtype}, not numeric")
        arr = arr.astype(np.float64)
        n_bins = bins if bins is not None else np.asarray(arrays["neg"]).size
        if arr.shape != (n_bins,):
            raise ReplyRejected(f"histogram field {key!r} has shape {arr.shape}, the grid has ({n_bins},)")
        if not np.all(np.isfinite(arr)):
            raise ReplyRejected(f"histogram field {key!r} holds non-finite values")
        out[key] = arr
    for key in COUNT_KEYS:
        c = out[key]
        if np.any(c < 0) or np.any(c != np.round(c)):
            raise ReplyRejected(f"histogram counts {key!r} must be non-negative whole numbers")
    total = float(out["neg"].sum() + out["pos"].sum())
    if max_patients is not None and total > max_patients:
        raise ReplyRejected(f"histogram holds {total:.0f} patients, more than the site's {max_patients}")
    for cls in COUNT_KEYS:
        count = out[cls]
        s, sq = out.get(f"{cls}_sum"), out.get(f"{cls}_sq")
        tol = _SUM_TOL * np.maximum(count, 1.0)
        if s is not None and (np.any(s < -tol) or np.any(s > count + tol)):
            raise ReplyRejected(f"histogram sums '{cls}_sum' are impossible for scores in [0, 1]")
        if sq is not None and (np.any(sq < -tol) or np.any(sq > count + tol)):
            raise ReplyRejected(f"histogram sums '{cls}_sq' are impossible for scores in [0, 1]")
        if s is not None and sq is not None and np.any(sq > s + tol):
            raise ReplyRejected(
                f"histogram sums '{cls}_sq' exceed '{cls}_sum' (impossible for scores in [0, 1])"
            )
    return {k: (v.astype(np.int64) if k in COUNT_KEYS else v) for k, v in out.items()}


def histogram_groups(
    arrays: Mapping[str, Any],
    parts: int,
    limits: ReplyLimits,
    *,
    max_patients: int | None = None,
    expected: Collection[tuple[str, ...]] | None = None,
) -> dict[tuple[str, ...], dict[str, NDArray[Any]]]:
    """Split ``"<a>/<b>/.../<field>"`` keys into checked histograms keyed by ``(a, b, ...)``.

    ``parts``: the number of ``/``-separated parts of every key, the field
    last.  ``expected``: when given, the reply must hold exactly these groups
    (e.g. one histogram per candidate the server asked for).
    """
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for key, value in arrays.items():
        bits = key.split("/")
        if len(bits) != parts or not all(_KEY_PART.fullmatch(b) for b in bits):
            raise ReplyRejected(f"malformed statistics key (expected {parts} parts)")
        groups.setdefault(tuple(bits[:-1]), {})[bits[-1]] = value
    if expected is not None:
        got, want = set(groups), set(expected)
        if got != want:
            raise ReplyRejected(
                f"statistics cover {len(got & want)} of the {len(want)} requested histograms "
                f"({len(got - want)} unrequested)"
            )
    out = {}
    for group, fields in groups.items():
        try:
            out[group] = check_histogram_arrays(fields, bins=limits.bins, max_patients=max_patients)
        except ReplyRejected as exc:
            raise ReplyRejected(f"{'/'.join(group)}: {exc}") from None
    return out


def check_feature_moments(
    arrays: Mapping[str, Any], n_features: int, max_patients: int | None
) -> dict[str, NDArray[np.float64]]:
    """``n``, ``sum``, ``sumsq`` of the handcrafted features: shapes, finite, n within the site's patients."""
    try:
        n = np.asarray(arrays["n"], dtype=np.float64)
        total = np.asarray(arrays["sum"], dtype=np.float64)
        sumsq = np.asarray(arrays["sumsq"], dtype=np.float64)
    except KeyError as exc:
        raise ReplyRejected(f"feature moments lack {exc}") from None
    except (TypeError, ValueError):
        raise ReplyRejected("feature moments are not numeric") from None
    if n.shape != (1,) or total.shape != (n_features,) or sumsq.shape != (n_features,):
        raise ReplyRejected(f"feature moments have shapes {n.shape}, {total.shape}, {sumsq.shape}")
    count = _count(n[0], "feature count", max_patients if max_patients is not None else MAX_SITE_PATIENTS)
    if not (np.all(np.isfinite(total)) and np.all(np.isfinite(sumsq))):
        raise ReplyRejected("feature moments hold non-finite values")
    # Cauchy-Schwarz: sum^2 <= n * sum of squares for any real features.
    if np.any(sumsq < 0) or np.any(total**2 > count * sumsq * (1 + 1e-9) + 1e-9):
        raise ReplyRejected("feature moments are impossible (sum of squares too small for the sum)")
    return {"n": n, "sum": total, "sumsq": sumsq}


def check_params(
    value: Any, size: int, name: str = "parameters", *, max_abs: float = math.inf
) -> NDArray[np.float64]:
    """A model vector of a known length with finite values, each at most ``max_abs`` in size.

    ``max_abs`` bounds what one site adds to an average of few sites (e.g. the
    radiomics logistic regression on standardised features, whose honest
    coefficients are of order 1).
    """
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ReplyRejected(f"{name} are not numeric") from None
    if arr.shape != (size,):
        raise ReplyRejected(f"{name} have shape {arr.shape}, expected ({size},)")
    if not np.all(np.isfinite(arr)):
        raise ReplyRejected(f"{name} hold non-finite values")
    if np.any(np.abs(arr) > max_abs):
        raise ReplyRejected(f"{name} exceed {max_abs:g} in size")
    return arr


def check_delong_sums(
    metrics: Mapping[str, Any], n_specs: int, max_patients: int | None
) -> dict[int, dict[str, float]]:
    """DeLong step-2 scalars ``"<spec index>/<field>"``: known indices, finite, counts within the site's patients."""
    per: dict[int, dict[str, float]] = {}
    cap = max_patients if max_patients is not None else MAX_SITE_PATIENTS
    for key, value in metrics.items():
        if "/" not in key:
            continue
        idx, field = key.split("/", 1)
        if not idx.isdigit() or int(idx) >= n_specs:
            raise ReplyRejected("DeLong sums name a comparison that was not requested")
        x = (
            _count(value, f"DeLong {field}", cap)
            if field.startswith("n_")
            else _finite_number(value, f"DeLong {field}")
        )
        per.setdefault(int(idx), {})[field] = x
    return per


# A site's training device (common.device.Runtime.describe), as the server keeps it.
REPORTED_KEYS = ("device", "name", "amp", "augment_on", "layout")
MAX_REPORTED_CHARS = 80


def reported(record: Mapping[str, object]) -> dict[str, str]:
    """A site's :meth:`Runtime.describe` as the server keeps it (another party's input: trust nothing).

    Only the known keys, only strings, printable characters, at most
    ``MAX_REPORTED_CHARS`` each; anything else is dropped.
    """
    out: dict[str, str] = {}
    for k in REPORTED_KEYS:
        v = record.get(k)
        if isinstance(v, str):
            clean = "".join(c for c in v if c.isprintable())[:MAX_REPORTED_CHARS]
            if clean:
                out[k] = clean
    return out
