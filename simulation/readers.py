"""Simulated human reading: the radiologist of record and the six-reader study.

Latent model (per patient, in units of the within-class SD):

* ``evidence`` e | y ~ N(d_e (y - 1/2), 1): what the image shows (drawn by the
  planner in ``simulation.synth``; every visual feature is a noisy function
  of it).
* ``clinical`` c | y ~ N(d_c (y - 1/2), 1), independent of e given y: what the
  image does not show (history, symptoms, course).  Only humans use it, which
  is why radiologist + image model can beat both.

A reader's internal reading is ``e + sigma * n + beta * c`` (``sigma``: how
badly the reader reads the image; ``beta``: how much clinical context they
use), standardised to unit within-class SD.  With AI, the second session (four
weeks later, part of the image error re-drawn) blends the reader's reading with
the *same* model reading shown to every reader, ``e + sigma_m * n_m``.  The
binormal AUC of each reading is ``Phi(mean difference / sqrt(2))`` in these
units (``expected_auc``); the defaults below were solved for the paper's tiers.
Readings become 9-point scores (5 excluded) by fixed cut points in SD units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

# Separation (d') of the image evidence and of the hidden clinical variable.
EVIDENCE_SEPARATION = 2.26  # oracle AUC Phi(2.26 / sqrt 2) = 0.945
CLINICAL_SEPARATION = 0.74  # clinical variable alone: AUC 0.70
MODEL_NOISE = 1.1  # the model-like reading shown in session 2: AUC 0.86
SESSION_CORRELATION = 0.7  # share of a reader's image error kept between sessions
SCORE_CUTS = (-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5)  # standardised reading -> 1-4 | 6-9
SCORE_VALUES = (1, 2, 3, 4, 6, 7, 8, 9)


@dataclass(frozen=True)
class ReaderProfile:
    """How one reader reads: image error, use of clinical context, use of the AI, bias."""

    reader: str
    tier: str
    image_noise: float
    clinical_weight: float
    ai_weight: float = 0.0
    bias: float = 0.0

    def within_sd(self) -> float:
        """Within-class SD of the raw reading ``e + sigma n + beta c``."""
        return math.sqrt(1.0 + self.image_noise**2 + self.clinical_weight**2)


# Solved so that the tier AUCs match the paper's external reader study
# (junior 0.666 -> 0.768, mid 0.776 -> 0.871, senior 0.872 -> 0.911) and the
# radiologist of record reaches ~0.856.  Two readers per tier, slightly apart.
RADIOLOGIST = ReaderProfile("radiologist", "senior", image_noise=1.41, clinical_weight=1.0, bias=0.15)
READERS: tuple[ReaderProfile, ...] = (
    ReaderProfile("junior1", "junior", 3.7, 0.3, ai_weight=0.28, bias=0.25),
    ReaderProfile("junior2", "junior", 4.2, 0.3, ai_weight=0.26, bias=-0.1),
    ReaderProfile("mid1", "mid", 2.15, 0.7, ai_weight=0.46, bias=0.2),
    ReaderProfile("mid2", "mid", 2.4, 0.7, ai_weight=0.44, bias=0.0),
    ReaderProfile("senior1", "senior", 1.1, 1.3, ai_weight=0.42, bias=0.15),
    ReaderProfile("senior2", "senior", 1.2, 1.3, ai_weight=0.40, bias=0.05),
)


def expected_auc(profile: ReaderProfile, with_ai: bool = False) -> float:
    """Binormal AUC of a reader's (continuous) reading under the latent model."""
    de, dc = EVIDENCE_SEPARATION, CLINICAL_SEPARATION
    s_r = profile.within_sd()
    own = (de + profile.clinical_weight * dc) / s_r
    if not with_ai:
        return float(norm.cdf(own / math.sqrt(2.0)))
    s_m = math.sqrt(1.0 + MODEL_NOISE**2)
    w = profile.ai_weight
    mean = (1 - w) * own + w * de / s_m
    var = (1 - w) ** 2 + w**2 + 2 * w * (1 - w) / (s_r * s_m)
    return float(norm.cdf(mean / math.sqrt(2.0 * var)))


def to_score(z: np.ndarray) -> np.ndarray:
    """Standardised readings -> integer scores 1-4, 6-9 (the 50 % midpoint is never given)."""
    idx = np.searchsorted(np.asarray(SCORE_CUTS), np.asarray(z, dtype=np.float64), side="right")
    return np.asarray(SCORE_VALUES, dtype=np.int64)[idx]


def model_reading(evidence: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The model-like reading shown to readers with AI, standardised (within-class SD 1)."""
    return (evidence + MODEL_NOISE * rng.standard_normal(evidence.shape)) / math.sqrt(1.0 + MODEL_NOISE**2)


def read(
    profile: ReaderProfile,
    evidence: np.ndarray,
    clinical: np.ndarray,
    model: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Continuous standardised readings of one reader: (session 1 without AI, session 2 with AI)."""
    n1 = rng.standard_normal(evidence.shape)
    n2 = SESSION_CORRELATION * n1 + math.sqrt(1 - SESSION_CORRELATION**2) * rng.standard_normal(
        evidence.shape
    )
    s_r = profile.within_sd()
    own1 = (evidence + profile.image_noise * n1 + profile.clinical_weight * clinical) / s_r
    own2 = (evidence + profile.image_noise * n2 + profile.clinical_weight * clinical) / s_r
    w = profile.ai_weight
    s_m = math.sqrt(1.0 + MODEL_NOISE**2)
    blend_sd = math.sqrt((1 - w) ** 2 + w**2 + 2 * w * (1 - w) / (s_r * s_m))
    with_ai = ((1 - w) * own2 + w * model) / blend_sd
    return own1 + profile.bias, with_ai + profile.bias
