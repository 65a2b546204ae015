"""Obuchowski-Rockette MRMC: the published Van Dyke example, the federated path, duplicated readers."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from common.delong import PlacementSums, delong_from_sums, delong_pooled, delong_step2_site
from common.gridstats import ClassHistogram, ScoreGrid
from common.mrmc import cov_from_pairs, delong_cov, or_analysis
from common.readerstudy import mrmc_histograms, mrmc_results, mrmc_specs, reading_key

FIXTURE = Path(__file__).parent / "fixtures" / "vandyke.csv"


def _vandyke() -> tuple[np.ndarray, np.ndarray]:
    """Labels (114 cases) and ratings as probabilities, shape (2 modalities, 5 readers, 114)."""
    with FIXTURE.open() as fh:
        rows = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    ratings = np.zeros((2, 5, 114))
    truth = np.zeros(114, dtype=int)
    for r in rows:
        ratings[int(r["modality"]), int(r["reader"]) - 1, int(r["case"])] = int(r["rating"]) / 5.0
        truth[int(r["case"])] = int(r["truth"])
    return truth, ratings


def test_vandyke_matches_the_published_or_analysis_with_delong_covariance() -> None:
    # Reference: MRMCaov (Smith & Hillis), docs/jss/MRMCaov.tex, "mrmc(empirical_auc(truth, rating),
    # treatment, reader, case, data = VanDyke, cov = DeLong)"; summary(est) prints
    #   Var 0.0007921325, Cov1 0.0003420090, Cov2 0.0003395265, Cov3 0.0002358497,
    #   MS(T) 0.004796171, MS(T:R) 0.0005510306, F 4.484854, df1 1, df2 15.06611, p 0.05123303,
    #   1 - 2: estimate -0.04380032, StdErr 0.0206825, CI (-0.0878671960, 0.0002665519),
    #   treatment 1: 0.8970370, StdErr 0.03307642, df 12.59597, CI (0.8253461, 0.9687280),
    #   treatment 2: 0.9408374, StdErr 0.02150464, df 12.56530, CI (0.8942155, 0.9874592).
    y, r = _vandyke()
    assert (int(y.sum()), int((1 - y).sum())) == (45, 69)
    auc, cov = delong_cov(y, r.reshape(10, 114))
    res = or_analysis(auc.reshape(2, 5), cov, modalities=("cine", "spin_echo"))
    assert res.method == "RRRC"
    for got, want in [
        (res.var, 0.0007921325),
        (res.cov1, 0.0003420090),
        (res.cov2, 0.0003395265),
        (res.cov3, 0.0002358497),
        (res.ms_t, 0.004796171),
        (res.ms_tr, 0.0005510306),
        (res.se_diff, 0.0206825),
        (res.se_mean[0], 0.03307642),
        (res.se_mean[1], 0.02150464),
    ]:
        assert got == pytest.approx(want, abs=5e-8)
    assert res.f == pytest.approx(4.484854, abs=1e-3)
    assert res.df1 == 1
    assert res.df2 == pytest.approx(15.06611, abs=1e-3)
    assert res.p == pytest.approx(0.05123303, abs=1e-3)
    # ours reports modality 1 - modality 0, the reference 1 - 2 (= 0 - 1)
    assert res.diff == pytest.approx(0.04380032, abs=1e-3)
    assert res.ci_diff[0] == pytest.approx(-0.0002665519, abs=1e-3)
    assert res.ci_diff[1] == pytest.approx(0.0878671960, abs=1e-3)
    assert res.mean_auc == pytest.approx([0.8970370, 0.9408374], abs=1e-3)
    assert res.df_mean == pytest.approx([12.59597, 12.56530], abs=1e-3)
    assert res.ci_mean[0] == pytest.approx([0.8253461, 0.9687280], abs=1e-3)
    assert res.ci_mean[1] == pytest.approx([0.8942155, 0.9874592], abs=1e-3)


def _federated_pairs(
    y: np.ndarray, scores: dict[str, np.ndarray], sites: list[np.ndarray], grid: ScoreGrid, group: str
) -> tuple[dict[str, dict[str, ClassHistogram]], dict[str, dict[str, object]]]:
    """Both federated steps, each site seeing only its own cases."""
    hists = {
        group: {
            k: ClassHistogram.aggregate(ClassHistogram.from_scores(y[i], s[i], grid) for i in sites)
            for k, s in scores.items()
        }
    }
    global_h, specs, names = mrmc_specs(hists)
    pairs = {}
    for (a, b, subset), name in zip(specs, names, strict=True):
        sums = PlacementSums.aggregate(
            delong_step2_site(
                y[i], scores[a][i], scores[b][i], global_h[f"{a}/{subset}"], global_h[f"{b}/{subset}"]
            )
            for i in sites
        )
        pairs[name] = delong_from_sums(global_h[f"{a}/{subset}"], global_h[f"{b}/{subset}"], sums).to_dict()
    return hists, pairs


def test_vandyke_federated_over_two_sites_equals_the_pooled_analysis() -> None:
    y, r = _vandyke()
    sessions = ("without_ai", "with_ai")
    scores = {reading_key(f"R{j + 1}", sessions[i]): r[i, j] for i in range(2) for j in range(5)}
    rng = np.random.default_rng(3)
    order = rng.permutation(114)
    sites = [order[:40], order[40:]]
    hists, pairs = _federated_pairs(y, scores, sites, ScoreGrid(100), "all")
    out = mrmc_results(hists, pairs)["all"]
    assert out["method"] == "RRRC"
    assert out["F"] == pytest.approx(4.484854, abs=1e-6)
    assert out["df2"] == pytest.approx(15.06611, abs=1e-5)
    assert out["p"] == pytest.approx(0.05123303, abs=1e-7)
    assert out["difference"]["se"] == pytest.approx(0.0206825, abs=1e-7)
    assert out["patients"] == 114
    assert out["reader_auc"]["R1"]["without_ai"] == pytest.approx(0.9196457, abs=1e-6)


def test_duplicating_a_reader_does_not_shrink_the_variance() -> None:
    rng = np.random.default_rng(0)
    n = 150
    y = (rng.random(n) < 0.4).astype(int)
    base = rng.normal(0, 1, n)
    without = 1 / (1 + np.exp(-(0.9 * y + 0.8 * base + rng.normal(0, 1, n))))
    with_ai = 1 / (1 + np.exp(-(1.3 * y + 0.8 * base + rng.normal(0, 1, n))))
    single = delong_pooled(y, with_ai, without)
    se_single = math.sqrt(single.var1 + single.var2 - 2 * single.cov)

    auc, cov = delong_cov(y, np.stack([without, without, with_ai, with_ai]))
    dup = or_analysis(auc.reshape(2, 2), cov, readers=("A", "A-copy"))
    assert dup.method == "RRRC"
    assert dup.ms_tr == pytest.approx(0.0, abs=1e-15)
    assert dup.se_diff == pytest.approx(se_single, rel=1e-9)
    assert dup.p == pytest.approx(single.p, rel=1e-6)
    # what the old pooled-readings test did: each case counted twice, the variance halved
    pooled = delong_pooled(
        np.concatenate([y, y]), np.concatenate([with_ai, with_ai]), np.concatenate([without, without])
    )
    assert pooled.var1 + pooled.var2 - 2 * pooled.cov < 0.6 * se_single**2
    assert pooled.p < single.p


def test_one_reader_falls_back_to_fixed_readers_which_is_delongs_test() -> None:
    y, r = _vandyke()
    auc, cov = delong_cov(y, np.stack([r[0, 0], r[1, 0]]))
    res = or_analysis(auc.reshape(2, 1), cov)
    ref = delong_pooled(y, r[1, 0], r[0, 0])
    assert res.method == "FRRC"
    assert res.p == pytest.approx(ref.p, rel=1e-9)
    assert res.se_diff == pytest.approx(math.sqrt(ref.var1 + ref.var2 - 2 * ref.cov), rel=1e-9)


def test_readers_on_different_cases_are_skipped_not_analysed() -> None:
    y, r = _vandyke()
    grid = ScoreGrid(100)
    hists = {
        "junior": {
            reading_key("A", "without_ai"): ClassHistogram.from_scores(y[:60], r[0, 0, :60], grid),
            reading_key("A", "with_ai"): ClassHistogram.from_scores(y[:60], r[1, 0, :60], grid),
            reading_key("B", "without_ai"): ClassHistogram.from_scores(y[60:], r[0, 1, 60:], grid),
            reading_key("B", "with_ai"): ClassHistogram.from_scores(y[60:], r[1, 1, 60:], grid),
        }
    }
    assert "not fully crossed" in mrmc_results(hists, {})["junior"]["skipped"]


def test_cov_from_pairs_rejects_missing_pairs() -> None:
    with pytest.raises(ValueError, match=r"no variance|missing"):
        cov_from_pairs(3, {(0, 1): (1.0, 1.0, 0.5)})
    with pytest.raises(ValueError, match="missing"):
        cov_from_pairs(3, {(0, 1): (1.0, 1.0, 0.5), (1, 2): (1.0, 1.0, 0.5)})
    c = cov_from_pairs(2, {(0, 1): (2.0, 3.0, 0.5)})
    assert c.tolist() == [[2.0, 0.5], [0.5, 3.0]]


def test_hostile_reader_statistics_are_dropped_with_a_reason_not_a_crash() -> None:
    grid = ScoreGrid(100)
    y = np.array([0, 0, 1, 1])
    good = ClassHistogram.from_scores(y, np.array([0.1, 0.3, 0.6, 0.9]), grid).to_arrays()
    parts = [("honest", f"mrmc/junior/A@without_ai/{k}", v) for k, v in good.items()]
    parts += [("honest", f"mrmc/junior/A@with_ai/{k}", v) for k, v in good.items()]
    parts += [
        ("evil", "mrmc/junior/A@with_ai", good["neg"]),  # too few fields
        ("evil", "mrmc/../../etc/passwd/neg", good["neg"]),
        ("evil", "mrmc/junior/noreader/neg", good["neg"]),  # no reader@session
        ("evil", "mrmc/junior/B@with_ai/neg", -good["neg"]),  # negative counts
        ("evil", "mrmc/junior/B@with_ai/pos", good["pos"]),
        ("evil", "mrmc/junior/C@with_ai/neg", np.ones(7)),  # another grid
        ("evil", "mrmc/junior/C@with_ai/pos", np.ones(7)),
        ("evil", "mrmc/junior/D@with_ai/neg", good["neg"]),  # a reader with one session only
        ("evil", "mrmc/junior/D@with_ai/pos", good["pos"]),
        ("evil2", "mrmc/junior/A@with_ai/neg", np.ones(7)),  # cannot be added to the honest grid
        ("evil2", "mrmc/junior/A@with_ai/pos", np.ones(7)),
    ]
    hists, problems = mrmc_histograms(parts, 100)
    assert set(hists["junior"]) == {"A@without_ai", "A@with_ai", "D@with_ai"}
    assert hists["junior"]["A@with_ai"].n == 4  # the honest site's; the other grids dropped
    assert len(problems) == 6 and all(p.startswith(("evil:", "evil2:")) for p in problems)
    # D has no without_ai session: it takes no part; A alone is analysed
    _, specs, _ = mrmc_specs(hists)
    assert {s[0] for s in specs} | {s[1] for s in specs} == {"A@without_ai", "A@with_ai"}
