"""One model exchange per round: round r+1's train message validates round r's aggregate.

The plan runs in process against the real ClientApp on the tiny preset
(``tests/inprocess.py``).  What is checked: every round's pooled validation
AUC (and its Platt fit) is the validation of exactly that round's checkpoint,
as a direct validation at each site gives it; a site receives the model once
per round (plus one evaluate per fold); an interrupted fold resumes with the
first round validating the last checkpoint, which is never rewritten.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import figures
from client.site import SiteContext, SiteRunner
from common.config import ExperimentConfig, SiteConfig, with_sites
from common.configfile import load_config
from common.foldcalibration import fit_platt
from common.gridstats import ClassHistogram, ScoreGrid, pooled_metrics
from common.models import build_model
from common.protocol import PREDICT, TRAIN
from common.records import ModelCodec, to_transport
from server.checkpoints import CheckpointStore
from server.runfiles import PROGRESS_NAME
from server.runner import PlanRunner

from .inprocess import InProcessGrid, Interrupted

pytestmark = pytest.mark.usefixtures("task_identity")
SITES = ("centre1", "centre2", "centre3")
ROUNDS = 3


def _cfg(select_from_round: int = 1) -> ExperimentConfig:
    overrides = {
        "run_folds": [0],
        "models": {"densenet2d": {"enabled": False}, "radiomics": False},
        "train": {"rounds": ROUNDS},
        "evaluation": {"calibrate_folds": True, "select_from_round": select_from_round},
    }
    return with_sites(load_config("tiny", overrides), tuple(SiteConfig(name=s) for s in SITES))


@pytest.fixture(scope="module")
def sites_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exchange-sites")


def _direct_validation(
    cfg: ExperimentConfig,
    cohort: dict[str, Path],
    sites_out: Path,
    run_id: str,
    store: CheckpointStore,
    rnd: int,
) -> ClassHistogram:
    """Round ``rnd``'s checkpoint validated at every site directly (as the sites receive it), pooled."""
    received = to_transport(store.load("densenet3d", 0, rnd), cfg.federation.transport_dtype).astype(
        np.float32
    )
    hists = [
        SiteRunner(SiteContext(s, cohort[s], sites_out / s), cfg, run_id).validate_round(
            "densenet3d", 0, received, rnd
        )
        for s in SITES
    ]
    return ClassHistogram.aggregate(hists)


def _check_rounds(
    cfg: ExperimentConfig,
    cohort: dict[str, Path],
    sites_out: Path,
    run_id: str,
    run_dir: Path,
    summary: dict[str, Any],
) -> None:
    store = CheckpointStore(run_dir / "checkpoints", cfg.digest())
    first = cfg.evaluation.select_from_round  # earlier rounds do not compete and are not validated
    rounds = summary["rounds"]["densenet3d/fold0"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for r in rounds[: first - 1]:
        assert r["evaluated"] == [] and r["val_auc"] is None and r["val_n"] == 0
        assert not store.meta("densenet3d", 0, r["round"])["validated"]
    rounds = rounds[first - 1 :]
    for r in rounds:
        pooled = _direct_validation(cfg, cohort, sites_out, run_id, store, r["round"])
        m = pooled_metrics(pooled, cfg.evaluation.fixed_threshold)
        assert r["evaluated"] == list(SITES) and r["val_n"] == m.n > 0
        assert r["val_auc"] == (None if np.isnan(m.auc) else pytest.approx(m.auc, abs=1e-12)), r["round"]
        meta = store.meta("densenet3d", 0, r["round"])
        assert meta["validated"] and meta["val_auc"] == r["val_auc"]
        np.testing.assert_allclose(meta["platt"], fit_platt(pooled), rtol=1e-9, atol=1e-12)
    aucs = [-1.0 if r["val_auc"] is None else r["val_auc"] for r in rounds]
    assert summary["selection"]["densenet3d"]["0"]["round"] == aucs.index(max(aucs)) + first


def test_each_round_is_validated_once_with_the_next_train_message(
    cohort: dict[str, Path], sites_out: Path, tmp_path: Path
) -> None:
    cfg = _cfg()
    grid = InProcessGrid(cohort, sites_out)
    run_dir = tmp_path / "run"
    summary = PlanRunner(grid, cfg, run_dir, "x1").run(expected_sites=3, wait_s=1)
    for s in SITES:  # R rounds: R train messages and one evaluate per fold, instead of R of each
        assert grid.calls[(s, "train")] == ROUNDS and grid.calls[(s, "evaluate")] == 1
    _check_rounds(cfg, cohort, sites_out, "x1", run_dir, summary)

    # what the bench reports: at most one model's bytes each way per round, plus the one evaluate per fold
    model = build_model("densenet3d", cfg.models.densenet3d, mask_channel=cfg.preprocess.mask_channel)
    model_bytes = ModelCodec.for_state_dict(model.state_dict()).size * 2  # float16 transport
    empty = ClassHistogram.from_scores(np.zeros(0), np.zeros(0), ScoreGrid(cfg.evaluation.grid_bins))
    hist_bytes = sum(a.nbytes for a in empty.to_arrays().values())  # a validation histogram up (at most: it
    # travels compressed when that halves it, common.records)
    overhead = 8192  # the request's config (the experiment as JSON), the reply's status and scalars
    for s in SITES:
        t = figures.site_traffic(summary["communication"][s], rounds=ROUNDS, folds=1)
        assert model_bytes <= t["round_received"] <= model_bytes + overhead
        assert model_bytes <= t["round_sent"] <= model_bytes + hist_bytes + overhead
        assert model_bytes <= t["fold_evaluate_received"] <= model_bytes + overhead
        assert 0 < t["fold_evaluate_sent"] <= hist_bytes + overhead  # statistics only


def test_an_interrupted_fold_validates_its_last_checkpoint_first(
    cohort: dict[str, Path], sites_out: Path, tmp_path: Path
) -> None:
    cfg = _cfg()
    run_dir = tmp_path / "run"
    first = InProcessGrid(cohort, sites_out, fail_after_train=6)  # dies as round 3 starts
    with pytest.raises(Interrupted):
        PlanRunner(first, cfg, run_dir, "x2").run(expected_sites=3, wait_s=1)
    ckpt = run_dir / "checkpoints" / "densenet3d_fold0"
    assert (ckpt / "round1.validation.json").is_file()  # validated by round 2's train message
    assert not (ckpt / "round2.validation.json").exists()  # its validation was to come with round 3
    before = (ckpt / "round2.npz").stat().st_mtime_ns

    second = InProcessGrid(cohort, sites_out)
    summary = PlanRunner(second, cfg, run_dir, "x2").run(expected_sites=3, wait_s=1)
    for s in SITES:  # round 3 only: its train message validates round 2, then the one evaluate
        assert second.calls[(s, "train")] == 1 and second.calls[(s, "evaluate")] == 1
    assert (ckpt / "round2.npz").stat().st_mtime_ns == before  # the checkpoint itself is never rewritten
    assert summary["resumed"] == {"densenet3d/fold0": 2}
    _check_rounds(cfg, cohort, sites_out, "x2", run_dir, summary)


@pytest.mark.parametrize("first", [1, 2])
def test_cross_site_local_models_are_validated_the_same_way(
    cohort: dict[str, Path], sites_out: Path, tmp_path: Path, first: int
) -> None:
    """A site's local-only rounds: one exchange each, the best round by the site's own validation AUC.

    ``first``: ``evaluation.select_from_round``; earlier local models are not validated, as in the federation.
    """
    from common.gridstats import auc
    from server.crosssite import CrossSiteEvaluation

    cfg = _cfg(first)
    grid = InProcessGrid(cohort, sites_out)
    runner = PlanRunner(grid, cfg, tmp_path / "run", "x3")
    runner.discover(expected=3, wait_s=1)
    node = next(n for n, s in runner.registry.sites.items() if s.site == "centre1")
    trained: list[np.ndarray] = []
    validated: list[bool] = []  # whether each train reply carried the previous local model's validation
    grid_send = grid.send_and_receive

    def record(messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = list(grid_send(messages, timeout=timeout))
        for r in replies:
            if r.metadata.message_type == TRAIN.type:
                reply = TRAIN.read_reply(r)
                trained.append(reply.weights)
                validated.append(reply.validation is not None)
        return replies

    grid.send_and_receive = record  # type: ignore[method-assign]
    cs = CrossSiteEvaluation(cfg, runner.messenger, runner.registry, runner.ckpt, runner.trainer)
    best = cs.train_local("densenet3d", 0, node, "centre1")
    assert grid.calls[("centre1", "train")] == ROUNDS and grid.calls[("centre1", "evaluate")] == 1
    assert len(trained) == ROUNDS and best is not None
    assert validated == [False] + [r >= first for r in range(1, ROUNDS)]  # round r+1's reply validates round r
    site = SiteRunner(
        SiteContext("centre1", cohort["centre1"], sites_out / "centre1"), cfg, "x3-local-centre1"
    )
    dtype = cfg.federation.transport_dtype
    aucs = [
        auc(site.validate_round("densenet3d", 0, to_transport(v, dtype).astype(np.float32), r))
        for r, v in enumerate(trained, 1)
    ]
    scores = [a if np.isfinite(a) and r >= first else -np.inf for r, a in enumerate(aucs, 1)]
    np.testing.assert_array_equal(best, trained[int(np.argmax(scores))])


def test_a_train_message_builds_the_received_model_once_and_validates_it_unchanged(
    cohort: dict[str, Path], tmp_path: Path
) -> None:
    """``train_round(validate=True)`` validates and trains one built model: bit for bit what two separate builds give."""
    cfg = _cfg()
    state = build_model("densenet3d", cfg.models.densenet3d, mask_channel=cfg.preprocess.mask_channel).state_dict()
    flat = ModelCodec.for_state_dict(state).pack(state)

    def site(name: str) -> SiteRunner:
        return SiteRunner(SiteContext("centre1", cohort["centre1"], tmp_path / name), cfg, name)

    apart = site("apart")
    h_apart = apart.validate_round("densenet3d", 0, flat, 1)
    t_apart = apart.train_round("densenet3d", 0, flat, 2, ROUNDS)

    t_once = site("once").train_round("densenet3d", 0, flat, 2, ROUNDS, validate=True)
    h_once = t_once.validation
    assert h_once is not None

    for field in ("neg", "pos", "neg_sum", "pos_sum"):
        np.testing.assert_array_equal(getattr(h_once, field), getattr(h_apart, field))
    assert h_once.n > 0
    np.testing.assert_array_equal(t_once.weights, t_apart.weights)
    assert not np.array_equal(t_once.weights, flat)  # it trained


def test_rounds_before_select_from_round_are_neither_validated_nor_recalibrated(
    cohort: dict[str, Path], sites_out: Path, tmp_path: Path
) -> None:
    """Round 1 does not compete (``select_from_round: 2``): no validation, no BatchNorm pass, no change after it.

    Training mode normalises with batch statistics and round 2's recalibration
    starts afresh, so rounds 2 and 3 are bit for bit the rounds of a run that
    validates every round; round 1's aggregate differs in its running statistics only.
    """
    every, window = _cfg(), _cfg(select_from_round=2)
    runs = {}
    for name, cfg in (("x5-every", every), ("x5-window", window)):
        grid = InProcessGrid(cohort, sites_out)
        summary = PlanRunner(grid, cfg, tmp_path / name, name).run(expected_sites=3, wait_s=1)
        for s in SITES:
            assert grid.calls[(s, "train")] == ROUNDS and grid.calls[(s, "evaluate")] == 1
        runs[name] = CheckpointStore(tmp_path / name / "checkpoints", cfg.digest())
    _check_rounds(window, cohort, sites_out, "x5-window", tmp_path / "x5-window", summary)
    lines = (tmp_path / "x5-window" / PROGRESS_NAME).read_text().splitlines()
    round1 = [line for line in lines if "densenet3d fold 0 round 1/" in line]
    assert len(round1) == 1 and "sites answered 3/3, not validated" in round1[0], lines

    for rnd in (2, 3):
        np.testing.assert_array_equal(runs["x5-window"].load("densenet3d", 0, rnd), runs["x5-every"].load("densenet3d", 0, rnd))
    state = build_model("densenet3d", every.models.densenet3d, mask_channel=every.preprocess.mask_channel).state_dict()
    codec = ModelCodec.for_state_dict(state)
    a, b = (codec.unpack(runs[n].load("densenet3d", 0, 1)) for n in ("x5-every", "x5-window"))
    differs = {k for k in a if not np.array_equal(np.asarray(a[k]), np.asarray(b[k]))}
    assert differs and all(k.endswith(("running_mean", "running_var")) for k in differs), differs


def test_an_interrupted_fold_does_not_validate_a_round_that_does_not_compete(
    cohort: dict[str, Path], sites_out: Path, tmp_path: Path
) -> None:
    cfg = _cfg(select_from_round=2)
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupted):  # dies as round 2 starts: round 1's checkpoint, never to be validated
        PlanRunner(InProcessGrid(cohort, sites_out, fail_after_train=3), cfg, run_dir, "x6").run(expected_sites=3, wait_s=1)
    second = InProcessGrid(cohort, sites_out)
    summary = PlanRunner(second, cfg, run_dir, "x6").run(expected_sites=3, wait_s=1)
    for s in SITES:
        assert second.calls[(s, "train")] == ROUNDS - 1 and second.calls[(s, "evaluate")] == 1
    assert summary["resumed"] == {"densenet3d/fold0": 1}
    _check_rounds(cfg, cohort, sites_out, "x6", run_dir, summary)


def test_each_network_trains_its_own_rounds_and_selection_window(
    cohort: dict[str, Path], sites_out: Path, tmp_path: Path
) -> None:
    """``models.densenet3d.rounds`` 3 from round 3, the 2D network the run's 2 rounds from round 1."""
    overrides = {
        "run_folds": [0],
        "models": {"densenet3d": {"rounds": 3, "select_from_round": 3}, "radiomics": False},
        "train": {"rounds": 2},
        "evaluation": {"select_from_round": 1},
    }
    cfg = with_sites(load_config("tiny", overrides), tuple(SiteConfig(name=s) for s in SITES))
    grid = InProcessGrid(cohort, sites_out)
    summary = PlanRunner(grid, cfg, tmp_path / "run", "x8").run(expected_sites=3, wait_s=1)
    for s in SITES:  # 3 + 2 rounds, one evaluate per network and fold
        assert grid.calls[(s, "train")] == 5 and grid.calls[(s, "evaluate")] == 2
    d3, d2 = summary["rounds"]["densenet3d/fold0"], summary["rounds"]["densenet2d/fold0"]
    assert [r["round"] for r in d3] == [1, 2, 3] and [r["round"] for r in d2] == [1, 2]
    assert [r["val_auc"] is None for r in d3] == [True, True, False]  # only round 3 competes
    assert all(r["evaluated"] == list(SITES) for r in d2)  # every 2D round does
    assert summary["selection"]["densenet3d"]["0"]["round"] == 3
    lines = (tmp_path / "run" / PROGRESS_NAME).read_text().splitlines()
    assert any("densenet3d fold 0 round 3/3" in line and "(3/5 rounds)" in line for line in lines), lines
    assert any("densenet2d fold 0 round 2/2" in line and "(5/5 rounds)" in line for line in lines), lines


def test_the_selected_last_round_predicts_from_what_the_sites_kept_at_its_validation(
    cohort: dict[str, Path], sites_out: Path, tmp_path: Path
) -> None:
    """Only the last round competes, so it is selected: its closing validation kept each site's
    probabilities, and the prediction sends its digest, not its weights.  The rows are those the
    weights give; a site that lost its kept file asks, and gets the weights."""
    cfg = _cfg(select_from_round=ROUNDS)
    run_id, run_dir = "x9", tmp_path / "run"
    grid = InProcessGrid(cohort, sites_out)
    send = grid.send_and_receive
    lost = sites_out / "centre2" / run_id / "state" / "densenet3d_fold0_staged.npz"

    def lose_centre2s_file(messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        if any(m.metadata.message_type == PREDICT.type and PREDICT.read_request(m)[1].staged for m in messages):
            assert lost.is_file()  # kept by the closing evaluate
            lost.unlink()
        return send(messages, timeout=timeout)

    grid.send_and_receive = lose_centre2s_file  # type: ignore[method-assign]
    runner = PlanRunner(grid, cfg, run_dir, run_id)
    summary = runner.run(expected_sites=3, wait_s=1)
    assert summary["selection"]["densenet3d"]["0"]["round"] == ROUNDS
    assert {s: grid.calls[(s, PREDICT.type)] for s in SITES} == {"centre1": 1, "centre2": 2, "centre3": 1}

    model = build_model("densenet3d", cfg.models.densenet3d, mask_channel=cfg.preprocess.mask_channel)
    model_bytes = ModelCodec.for_state_dict(model.state_dict()).size * 2  # float16 transport
    received = {
        s: summary["communication"][s]["by_message_type"][PREDICT.type]["bytes_received"] for s in SITES
    }
    assert received["centre1"] < 16384 and received["centre3"] < 16384  # the request, no model
    assert received["centre2"] > model_bytes  # the digest, then the weights

    store = CheckpointStore(run_dir / "checkpoints", cfg.digest())
    weights = to_transport(store.load("densenet3d", 0, ROUNDS), cfg.federation.transport_dtype).astype(np.float32)
    platt = store.meta("densenet3d", 0, ROUNDS)["platt"]
    for s in SITES:
        site = SiteRunner(SiteContext(s, cohort[s], sites_out / s), cfg, run_id)
        with (site.run_dir / "predictions" / "densenet3d_fold0.csv").open() as fh:
            kept_rows = fh.read()
        direct = SiteRunner(SiteContext(s, cohort[s], tmp_path / "direct" / s), cfg, run_id)
        direct.predict_fold("densenet3d", 0, weights, ROUNDS, "train", platt=platt)
        assert kept_rows == (direct.run_dir / "predictions" / "densenet3d_fold0.csv").read_text(), s
        assert not (site.run_dir / "state" / "densenet3d_fold0_staged.npz").exists()

    # an earlier round selected (as when it validates better): its weights are sent, as before
    runner.trainer.predict_fold("densenet3d", 0, {"round": 1})
    assert {s: grid.calls[(s, PREDICT.type)] for s in SITES} == {"centre1": 2, "centre2": 3, "centre3": 2}
    for s in SITES:
        direct = SiteRunner(SiteContext(s, cohort[s], tmp_path / "direct1" / s), cfg, run_id)
        received1 = to_transport(store.load("densenet3d", 0, 1), cfg.federation.transport_dtype).astype(np.float32)
        direct.predict_fold("densenet3d", 0, received1, 1, "train")
        site_csv = sites_out / s / run_id / "predictions" / "densenet3d_fold0.csv"
        assert site_csv.read_text() == (direct.run_dir / "predictions" / "densenet3d_fold0.csv").read_text(), s
