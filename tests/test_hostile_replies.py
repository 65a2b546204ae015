"""A hostile site's replies are checked before use: the run finishes, the global model is the honest sites'.

Replies of one site are rewritten after the real ClientApp produced them (as
a site running modified code would send them) and fed into the real
strategy and plan runner.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.config import SiteConfig, with_sites
from common.configfile import load_config
from common.gridstats import ClassHistogram, ScoreGrid
from common.records import arrays_from_record, arrays_record, weights_from_record, weights_record
from common.replycheck import (
    ReplyLimits,
    ReplyRejected,
    check_delong_sums,
    check_feature_moments,
    check_histogram_arrays,
    check_num_examples,
    check_params,
    check_site_info,
    histogram_groups,
)
from server.aggregation import screen_updates
from server.runner import PlanRunner

from .inprocess import InProcessGrid

SITES = ("centre1", "centre2")
Tamper = Callable[[Message], RecordDict | None]


# -- the checks themselves ---------------------------------------------------------------------
@pytest.mark.parametrize("n", [1e12, float("nan"), float("inf"), -1, 0, "12", True])
def test_num_examples_must_be_finite_positive_and_within_the_declared_patients(n: object) -> None:
    with pytest.raises(ReplyRejected, match="num-examples"):
        check_num_examples(n, cap=40)


def test_num_examples_within_the_cap_is_kept() -> None:
    assert check_num_examples(30, cap=40) == 30.0


def test_site_info_must_be_whole_numbers_that_add_up() -> None:
    assert check_site_info({"patients": 20, "benign": 12, "malignant": 8}) == (20, 12, 8)
    for bad in (
        {"patients": 1e12, "benign": 1e12, "malignant": 0},
        {"patients": 20, "benign": 1, "malignant": 1},
    ):
        with pytest.raises(ReplyRejected):
            check_site_info(bad)


def _hist_arrays(bins: int = 100) -> dict[str, np.ndarray]:
    return ClassHistogram.from_scores([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9], ScoreGrid(bins)).to_arrays()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda a: a.update(neg=a["neg"][:50]), "shape"),
        (lambda a: a.update(neg_sum=np.full(100, np.nan)), "non-finite"),
        (lambda a: a.update(pos=a["pos"] * 1e12), "more than"),
        (lambda a: a.update(neg=-a["neg"]), "non-negative"),
        (lambda a: a.update(pos=a["pos"] + 0.5), "whole"),
        (lambda a: a.update(pos_sum=a["pos_sum"] * 3), "impossible"),
        (lambda a: a.update(extra=np.zeros(100)), "unknown"),
        (lambda a: a.pop("pos"), "lacks"),
    ],
)
def test_histograms_of_another_shape_or_impossible_content_are_rejected(
    edit: Callable[[dict[str, np.ndarray]], object], match: str
) -> None:
    arrays = _hist_arrays()
    edit(arrays)
    with pytest.raises(ReplyRejected, match=match):
        check_histogram_arrays(arrays, bins=100, max_patients=10)
    with pytest.raises(ValueError, match=match):  # the record decoder applies the same checks
        ClassHistogram.from_arrays(arrays, bins=100, max_patients=10)


def test_an_honest_histogram_passes_and_the_noise_bound_allows_phantom_patients() -> None:
    h = ClassHistogram.from_arrays(_hist_arrays(), bins=100, max_patients=4)
    assert h.n == 4
    assert ReplyLimits(100, 1.0).max_count(4) == 4 + 2 * 100 * 50
    assert ReplyLimits(100).max_count(4) == 4


def test_grouped_statistics_need_well_formed_keys_and_exactly_the_requested_groups() -> None:
    arrays = {f"a+b/{i}/{k}": v for i in range(2) for k, v in _hist_arrays().items()}
    limits = ReplyLimits(100)
    assert set(histogram_groups(arrays, 3, limits, expected={("a+b", "0"), ("a+b", "1")})) == {
        ("a+b", "0"),
        ("a+b", "1"),
    }
    with pytest.raises(ReplyRejected, match="requested"):
        histogram_groups(arrays, 3, limits, expected={("a+b", "0"), ("a+b", "1"), ("a+b", "2")})
    with pytest.raises(ReplyRejected, match="malformed"):
        histogram_groups({"a/b/c/neg": np.zeros(100)}, 3, limits)
    with pytest.raises(ReplyRejected, match="malformed"):
        histogram_groups({"../x/neg": np.zeros(100)}, 3, limits)


def test_model_parameters_must_be_finite_and_bounded() -> None:
    assert check_params(np.ones(7), 7, max_abs=1e3).shape == (7,)
    for bad in (np.ones(6), np.full(7, np.nan), np.full(7, 1e300)):
        with pytest.raises(ReplyRejected):
            check_params(bad, 7, max_abs=1e3)


def test_feature_moments_and_delong_sums_are_checked() -> None:
    good = {"n": np.array([4.0]), "sum": np.ones(6), "sumsq": np.ones(6)}
    assert check_feature_moments(good, 6, 10)["n"][0] == 4
    for bad in (
        {**good, "n": np.array([1e12])},
        {**good, "sum": np.full(6, np.nan)},
        {**good, "sum": np.ones(5)},
        {**good, "sum": np.full(6, 100.0)},  # impossible: sum^2 > n * sum of squares
    ):
        with pytest.raises(ReplyRejected):
            check_feature_moments(bad, 6, 10)
    assert check_delong_sums({"0/n_pos": 3, "0/pos_v1": 1.5, "num-examples": 0}, 1, 10) == {
        0: {"n_pos": 3, "pos_v1": 1.5}
    }
    for bad in ({"0/n_pos": 1e12}, {"0/pos_v1": float("nan")}, {"7/pos_v1": 1.0}, {"x/pos_v1": 1.0}):
        with pytest.raises(ReplyRejected):
            check_delong_sums(bad, 1, 10)


def test_the_absolute_norm_bound_applies_with_only_two_updates() -> None:
    ref = np.zeros(10, np.float32)
    honest, hostile = np.full(10, 0.1, np.float32), np.full(10, 1e6 / np.sqrt(10), np.float32)
    relative_only = screen_updates([honest, hostile], ref, norm_bound_factor=10.0)
    assert relative_only.kept == (0, 1)  # the relative screen needs 3 updates: this was the hole
    both = screen_updates([honest, hostile], ref, norm_bound_factor=10.0, max_norm=1e4, names=["a", "b"])
    assert both.kept == (0,) and "absolute bound" in both.dropped[1] and both.dropped[1].startswith("b:")


# -- the real strategy and plan ---------------------------------------------------------------
class HostileGrid(InProcessGrid):
    """The in-process grid where one site's replies of some message types are rewritten."""

    def __init__(self, *args: object, bad_site: str, tamper: dict[str, Tamper], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.bad_site, self.tamper = bad_site, tamper
        self.honest_updates: list[np.ndarray] = []
        self.honest_val_n: list[int] = []
        self.honest_train_val_n: list[int] = []  # validation carried by train replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        by_node = {m.metadata.dst_node_id: m for m in messages}
        out = []
        for r in super().send_and_receive(messages, timeout=timeout):
            node, mtype = r.metadata.src_node_id, r.metadata.message_type
            if self.nodes[node] != self.bad_site:
                if mtype == "train":
                    self.honest_updates.append(weights_from_record(r.content.array_records["arrays"]))
                    if "stats" in r.content.array_records:
                        val = ClassHistogram.from_arrays(arrays_from_record(r.content.array_records["stats"]))
                        self.honest_train_val_n.append(val.n)
                if mtype == "evaluate":
                    self.honest_val_n.append(int(r.content.metric_records["metrics"]["num-examples"]))  # type: ignore[arg-type]
            elif mtype in self.tamper:
                content = self.tamper[mtype](r)
                if content is not None:
                    r = Message(content, reply_to=by_node[node])
            out.append(r)
        return out


def _with(
    r: Message, *, metrics: dict[str, object] | None = None, arrays: dict[str, ArrayRecord] | None = None
) -> RecordDict:
    """The reply's content with some metrics or array records replaced."""
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {
        "status": r.content.config_records["status"],
    }
    records.update(r.content.array_records)
    m = dict(r.content.metric_records["metrics"])
    if metrics:
        m.update(metrics)
    records["metrics"] = MetricRecord(m)  # type: ignore[arg-type]
    records.update(arrays or {})
    return RecordDict(records)


def _stats(r: Message, edit: Callable[[dict[str, np.ndarray]], None]) -> RecordDict:
    arrays = arrays_from_record(r.content.array_records["stats"])
    edit(arrays)
    return _with(r, arrays={"stats": arrays_record(arrays)})


def _blow_up(r: Message) -> RecordDict:
    vec = weights_from_record(r.content.array_records["arrays"])
    return _with(r, arrays={"arrays": weights_record(vec + np.float32(1e6 / np.sqrt(vec.size)))})


TRAIN_ATTACKS: dict[str, tuple[Tamper, str]] = {
    "n=1e12": (lambda r: _with(r, metrics={"num-examples": 1e12}), "exceeds"),
    "n=nan": (lambda r: _with(r, metrics={"num-examples": float("nan")}), "not finite"),
    "n=inf": (lambda r: _with(r, metrics={"num-examples": float("inf")}), "not finite"),
    "n=-1": (lambda r: _with(r, metrics={"num-examples": -1}), "must be > 0"),
    "norm=1e6": (_blow_up, "absolute bound"),
}
EVALUATE_ATTACKS: dict[str, tuple[Tamper, str]] = {
    "bins=50": (lambda r: _stats(r, lambda a: a.update({k: v[:50] for k, v in a.items()})), "shape"),
    "nan sums": (
        lambda r: _stats(r, lambda a: a.update(neg_sum=np.full_like(a["neg_sum"], np.nan))),
        "non-finite",
    ),
    "counts 1e12": (lambda r: _stats(r, lambda a: a.update(pos=a["pos"] + 10**12)), "more than"),
    "counts -1": (lambda r: _stats(r, lambda a: a.update(neg=a["neg"] - 1)), "non-negative"),
    "counts > patients": (lambda r: _stats(r, lambda a: a.update(pos=a["pos"] + 21)), "more than"),
}


@pytest.fixture(scope="module")
def cohort(tiny_cohort: Path) -> dict[str, Path]:
    return {s: tiny_cohort / s for s in SITES}


@pytest.fixture(scope="module")
def sites_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile-sites")


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(
    ("train_attack", "evaluate_attack"), list(zip(TRAIN_ATTACKS, EVALUATE_ATTACKS, strict=True))
)
def test_a_hostile_site_with_two_sites_changes_nothing_and_is_recorded(
    train_attack: str, evaluate_attack: str, cohort: dict[str, Path], sites_out: Path, tmp_path: Path
) -> None:
    """Two training sites (the relative norm screen is off): the round completes on the honest site alone."""
    cfg = load_config("tiny", {"train": {"rounds": 1}, "models": {"densenet2d": {"enabled": False}}})
    cfg = with_sites(cfg, tuple(SiteConfig(name=s) for s in SITES))
    train_tamper, train_reason = TRAIN_ATTACKS[train_attack]
    eval_tamper, eval_reason = EVALUATE_ATTACKS[evaluate_attack]
    grid = HostileGrid(
        cohort, sites_out, bad_site="centre2", tamper={"train": train_tamper, "evaluate": eval_tamper}
    )
    run_id = "hostile-" + re.sub(r"[^A-Za-z0-9._-]", "_", train_attack)  # sites refuse other run ids
    runner = PlanRunner(grid, cfg, tmp_path / "run", run_id)
    runner.discover(expected=2, wait_s=1)
    runner.train_fold("densenet3d", 0)

    (rlog,) = runner.participation["densenet3d/fold0"]
    assert rlog["trained"] == ["centre1"] and rlog["evaluated"] == ["centre1"]
    assert train_reason in rlog["dropped"]["centre2"] and eval_reason in rlog["dropped"]["centre2"]
    # the round's global model is the honest site's update, untouched by the hostile one
    (honest,) = grid.honest_updates
    np.testing.assert_array_equal(runner.ckpt.load("densenet3d", 0, 1), honest)
    # the pooled validation statistics are the honest site's alone
    assert rlog["val_n"] == grid.honest_val_n[0] > 0


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("attack", ["nan sums", "counts > patients"])
def test_hostile_validation_statistics_in_a_train_reply_are_rejected_and_do_not_steer_selection(
    attack: str, cohort: dict[str, Path], sites_out: Path, tmp_path: Path
) -> None:
    """Round 2's train reply carries the validation of round 1's model: a bad one drops the whole reply."""
    cfg = load_config("tiny", {"train": {"rounds": 2}, "models": {"densenet2d": {"enabled": False}}})
    cfg = with_sites(cfg, tuple(SiteConfig(name=s) for s in SITES))
    edit, reason = EVALUATE_ATTACKS[attack]

    def tamper(r: Message) -> RecordDict | None:  # only the train replies that carry validation statistics
        return edit(r) if "stats" in r.content.array_records else None

    grid = HostileGrid(cohort, sites_out, bad_site="centre2", tamper={"train": tamper})
    runner = PlanRunner(grid, cfg, tmp_path / "run", "hostile-val-" + re.sub(r"[^a-z]", "_", attack))
    runner.discover(expected=2, wait_s=1)
    runner.train_fold("densenet3d", 0)

    first, second = runner.participation["densenet3d/fold0"]
    # round 1's model is validated by the honest site alone; why centre2 is out is recorded against it
    assert first["evaluated"] == ["centre1"] and reason in first["dropped"]["centre2"]
    (honest_n,) = grid.honest_train_val_n
    assert first["val_n"] == honest_n > 0
    meta = runner.ckpt.meta("densenet3d", 0, 1)
    assert meta["val_n"] == honest_n and meta["evaluated"] == ["centre1"]
    # and round 2's update is the honest site's alone (the reply is dropped as a whole)
    assert second["trained"] == ["centre1"] and reason in second["dropped"]["centre2"]
    np.testing.assert_array_equal(runner.ckpt.load("densenet3d", 0, 2), grid.honest_updates[-1])
    assert second["evaluated"] == ["centre1", "centre2"]  # the last round's evaluate was not tampered with


def _metrics_only(r: Message, **values: object) -> RecordDict:
    return _with(r, metrics=dict(values))


PLAN_ATTACKS: dict[str, Tamper] = {
    "query.featstats": lambda r: _stats(r, lambda a: a.update(sum=np.full_like(a["sum"], np.nan))),
    "train.radiomics": lambda r: _metrics_only(r, **{"num-examples": 1e12}),
    "evaluate.ensemble": lambda r: _stats(
        r, lambda a: [a.pop(k) for k in [k for k in a if k.split("/")[1] == "0"]]
    ),
    "evaluate.final": lambda r: _stats(
        r, lambda a: a.update({k: v + 10**12 for k, v in a.items() if k.endswith("/pos")})
    ),
    "evaluate.readers": lambda r: _stats(r, lambda a: a.update({"readers/../x/neg": np.zeros(1000)})),
    "evaluate.delong": lambda r: _metrics_only(r, **{"0/n_pos": 1e12}),
}


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(
    "attacked",
    [
        ("query.featstats", "train.radiomics", "evaluate.ensemble", "evaluate.final", "evaluate.readers"),
        # DeLong on its own: a site whose final statistics were dropped cannot place its patients
        ("evaluate.delong",),
    ],
    ids=["statistics", "delong"],
)
def test_a_hostile_site_in_every_plan_step_is_dropped_with_reasons_and_the_run_finishes(
    attacked: tuple[str, ...], cohort: dict[str, Path], sites_out: Path, tmp_path: Path
) -> None:
    models = {"densenet2d": {"enabled": False}, "radiomics": "train.radiomics" in attacked}
    cfg = load_config("tiny", {"run_folds": [0], "train": {"rounds": 1}, "models": models})
    cfg = with_sites(cfg, tuple(SiteConfig(name=s) for s in SITES))
    grid = HostileGrid(cohort, sites_out, bad_site="centre2", tamper={k: PLAN_ATTACKS[k] for k in attacked})
    run_id = f"hostile-plan-{len(attacked)}"
    summary = PlanRunner(grid, cfg, tmp_path / "run", run_id).run(expected_sites=2, wait_s=1)

    steps = {reason.split(":")[0] for reason in summary["rejected_replies"]["centre2"]}
    assert steps == {k.split(".")[1] for k in attacked}
    assert "centre1" not in summary["rejected_replies"]
    # DeLong needs every site's placement sums: without centre2's it is not computed (rather than wrong)
    assert bool(summary["delong"]) == ("evaluate.delong" not in attacked)
    if "evaluate.final" in attacked:  # every pooled figure comes from the honest site alone
        from common.splits import load_splits

        _, folds = load_splits(sites_out / "centre1" / run_id / "splits.json")
        for score in ("densenet3d", "radiomics", "radiologist", "ensemble_3d_radiologist"):
            assert summary["models"][score]["internal"]["pooled"]["n"] == len(folds[0].test), score


@pytest.mark.usefixtures("task_identity")
def test_a_site_claiming_impossible_patient_counts_is_left_out(
    cohort: dict[str, Path], sites_out: Path, tmp_path: Path
) -> None:
    cfg = with_sites(load_config("tiny"), tuple(SiteConfig(name=s) for s in SITES))
    lie: Tamper = lambda r: _metrics_only(r, patients=10**12, benign=10**12, malignant=0)  # noqa: E731
    grid = HostileGrid(cohort, sites_out, bad_site="centre2", tamper={"query.siteinfo": lie})
    runner = PlanRunner(grid, cfg, tmp_path / "run", "hostile-info")
    assert {s.site for s in runner.discover(expected=2, wait_s=1).values()} == {"centre1"}
    assert "siteinfo: patients" in runner.rejected["centre2"][0]


@pytest.mark.usefixtures("task_identity")
def test_unrequested_validation_statistics_cannot_make_a_round_compete(
    cohort: dict[str, Path], sites_out: Path, tmp_path: Path
) -> None:
    """Round 1 does not compete (``select_from_round: 2``): a site claiming a perfect validation of it is ignored."""
    cfg = load_config(
        "tiny",
        {"train": {"rounds": 2}, "evaluation": {"select_from_round": 2}, "models": {"densenet2d": {"enabled": False}}},
    )
    cfg = with_sites(cfg, tuple(SiteConfig(name=s) for s in SITES))
    perfect = ClassHistogram.from_scores([0, 1], [0.0, 1.0], ScoreGrid(cfg.evaluation.grid_bins)).to_arrays()

    def claim(r: Message) -> RecordDict:  # round 2's train reply, as if it had validated round 1's model
        return _with(r, arrays={"stats": arrays_record(perfect)})

    grid = HostileGrid(cohort, sites_out, bad_site="centre2", tamper={"train": claim})
    runner = PlanRunner(grid, cfg, tmp_path / "run", "hostile-unrequested")
    runner.discover(expected=2, wait_s=1)
    best = runner.train_fold("densenet3d", 0)

    first, second = runner.participation["densenet3d/fold0"]
    assert first["evaluated"] == [] and first["val_auc"] is None and first["val_n"] == 0
    assert not runner.ckpt.meta("densenet3d", 0, 1)["validated"]
    assert second["trained"] == ["centre1", "centre2"]  # well-formed, so the update itself counts
    assert best["round"] == 2 and second["evaluated"] == ["centre1", "centre2"]  # by the honest evaluate exchange


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ({"resend": 1, "predicted": 0}, "in reply to a request that carried them"),  # asks again, and again
        ({"resend": 1, "predicted": 7}, "also reports 7 rows"),
    ],
    ids=["resend-forever", "resend-and-rows"],
)
def test_a_site_cannot_loop_or_contradict_itself_on_a_prediction_by_digest(
    reply: dict[str, object], reason: str, cohort: dict[str, Path], sites_out: Path, tmp_path: Path
) -> None:
    """The fold's one round is selected, so the sites are sent its digest; a site asking for the weights
    gets them once, and a reply that makes no sense is rejected with why, never re-sent."""
    from common.protocol import PREDICT

    cfg = load_config("tiny", {"run_folds": [0], "train": {"rounds": 1}, "models": {"densenet2d": {"enabled": False}}})
    cfg = with_sites(cfg, tuple(SiteConfig(name=s) for s in SITES))
    tamper: Tamper = lambda r: _metrics_only(r, **reply)  # noqa: E731
    grid = HostileGrid(cohort, sites_out, bad_site="centre2", tamper={PREDICT.type: tamper})
    runner = PlanRunner(grid, cfg, tmp_path / "run", f"hostile-predict-{reply['predicted']}")
    runner.discover(expected=2, wait_s=1)
    best = runner.trainer.train_fold("densenet3d", 0)
    runner.trainer.predict_fold("densenet3d", 0, best)
    (why,) = runner.rejected["centre2"]
    assert why.startswith("predict:") and reason in why
    assert grid.calls[("centre2", PREDICT.type)] == 1 + (reply["predicted"] == 0)  # weights sent once at most
    assert grid.calls[("centre1", PREDICT.type)] == 1  # the honest site predicted from its kept probabilities
