"""What a run leaves for a person and a study: progress lines, TensorBoard scalars, a reproducible record.

The plan runs in process against the real ClientApp on the tiny preset
(``tests/inprocess.py``); the console side of the progress (the launching
command following ``progress.log``) is tested on its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from common.config import SiteConfig, with_sites
from common.configfile import load_config
from server.launch import REPORT_MODULES, follow, import_once_written
from server.progress import TENSORBOARD_DIR, time_left
from server.runfiles import PROGRESS_NAME
from server.runner import PlanRunner

from .inprocess import InProcessGrid

pytestmark = pytest.mark.usefixtures("task_identity")
SITES = ("centre1", "centre2", "centre3")


class ReversedGrid(InProcessGrid):
    """Sites answer in the opposite order (as a slower first site would make them)."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return list(reversed(list(super().send_and_receive(list(reversed(list(messages))), timeout=timeout))))


def _cfg():  # type: ignore[no-untyped-def]
    overrides = {"run_folds": [0], "models": {"densenet2d": {"enabled": False}}, "train": {"rounds": 2}}
    return with_sites(load_config("tiny", overrides), tuple(SiteConfig(name=s) for s in SITES))


@pytest.fixture(scope="module")
def sites_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("record-sites")


def test_progress_lines_and_tensorboard_scalars_per_round(
    cohort: dict[str, Path], sites_out: Path, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    summary = PlanRunner(InProcessGrid(cohort, sites_out), _cfg(), run_dir, "p1").run(
        expected_sites=3, wait_s=1
    )
    lines = (run_dir / PROGRESS_NAME).read_text().splitlines()
    rounds = [line for line in lines if "densenet3d fold 0 round" in line]
    assert len(rounds) == 2, lines
    for r, line in zip(summary["rounds"]["densenet3d/fold0"], rounds, strict=True):
        assert f"round {r['round']}/2: sites answered 3/3" in line
        assert (
            f"pooled validation AUC {r['val_auc']:.4f}" in line
            if r["val_auc"] is not None
            else "AUC n/a" in line
        )
        assert " left (" in line and line.startswith("[0:")  # elapsed and estimated remaining time
    assert any(line.endswith("2/2 rounds)") and "0:00:00 left" in line for line in rounds)
    assert any("evaluation: final pooled statistics" in line for line in lines)
    assert any("summary written" in line for line in lines)

    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    acc.Reload()
    events = acc.Scalars("densenet3d/fold0/val_auc")
    expected = [
        (r["round"], r["val_auc"]) for r in summary["rounds"]["densenet3d/fold0"] if r["val_auc"] is not None
    ]
    assert [(e.step, round(e.value, 5)) for e in events] == [(s, round(v, 5)) for s, v in expected]
    assert [e.value for e in acc.Scalars("densenet3d/fold0/sites_answered")] == [3.0, 3.0]


def test_console_follows_the_progress_file_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / PROGRESS_NAME
    seen: list[str] = []

    def writer() -> None:
        for i in range(5):
            with path.open("a") as fh:
                fh.write(f"line {i}")
                fh.flush()
                time.sleep(0.05)
                fh.write("\n")  # a line is echoed only once complete

    with follow(path, seen.append, interval_s=0.01):
        t = threading.Thread(target=writer)
        t.start()
        t.join()
    assert seen == [f"line {i}" for i in range(5)]


def test_the_report_modules_load_once_the_summary_is_written_anew(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "reportlike.py").write_text("LOADED = True\n")
    monkeypatch.delitem(sys.modules, "reportlike", raising=False)
    summary = tmp_path / "summary.json"
    summary.write_text("{}")  # an earlier run's summary in the folder: not this run's
    with import_once_written(summary, ["reportlike"], interval_s=0.01):
        time.sleep(0.1)
        assert "reportlike" not in sys.modules
        tmp = tmp_path / "summary.tmp"
        tmp.write_text('{"plan": "federated"}')
        tmp.replace(summary)  # as the ServerApp writes it: atomically
        deadline = time.monotonic() + 5
        while "reportlike" not in sys.modules and time.monotonic() < deadline:
            time.sleep(0.01)
    assert "reportlike" in sys.modules
    from common.report import render_report

    assert render_report.__module__ in REPORT_MODULES  # what the launching command imports after the run


def test_no_summary_no_report_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "reportlike2.py").write_text("LOADED = True\n")
    with import_once_written(tmp_path / "summary.json", ["reportlike2"], interval_s=0.01):
        time.sleep(0.1)  # a failed run writes none
    assert "reportlike2" not in sys.modules


def test_same_config_and_seed_give_identical_results_whatever_order_sites_answer(
    cohort: dict[str, Path], sites_out: Path, tmp_path: Path
) -> None:
    a = PlanRunner(InProcessGrid(cohort, sites_out), _cfg(), tmp_path / "a", "order-a").run(
        expected_sites=3, wait_s=1
    )
    b = PlanRunner(ReversedGrid(cohort, sites_out), _cfg(), tmp_path / "b", "order-b").run(
        expected_sites=3, wait_s=1
    )
    assert a["models"] == b["models"]
    assert (
        a["selection"] == b["selection"]
        and a["delong"] == b["delong"]
        and a["reader_study"] == b["reader_study"]
    )
    assert [r["val_auc"] for r in a["rounds"]["densenet3d/fold0"]] == [
        r["val_auc"] for r in b["rounds"]["densenet3d/fold0"]
    ]
    for rnd in (1, 2):  # the global models themselves, bit for bit
        with (
            np.load(tmp_path / "a" / "checkpoints" / "densenet3d_fold0" / f"round{rnd}.npz") as za,
            np.load(tmp_path / "b" / "checkpoints" / "densenet3d_fold0" / f"round{rnd}.npz") as zb,
        ):
            assert np.array_equal(za["weights"], zb["weights"])
    # and the summary says what the numbers depend on
    env = a["environment"]
    assert a["seed"] == _cfg().seed and a["train_seed"] == _cfg().train.seed
    assert a["config_digest"] == _cfg().digest()
    for party in (env["server"], *env["sites"].values()):
        assert {
            "cpu",
            "torch",
            "torch_blas",
            "torch_threads",
            "numpy",
            "numpy_blas",
            "device",
            "flwr",
            "monai",
        } <= set(party)
    assert sorted(env["sites"]) == list(SITES)


def test_report_reads_what_the_launching_command_wrote_beside_the_summary(tmp_path: Path) -> None:
    import json

    from common.report import header_section, load_summary

    env = {
        "cpu": "AMD EPYC 7B13",
        "cpu_capability": "AVX2",
        "torch": "2.8.0",
        "torch_blas": "mkl",
        "device": "cpu",
    }
    summary = {
        "plan": "federated",
        "models": {},
        "seed": 7,
        "train_seed": 2,
        "environment": {"server": env, "sites": {"centre1": env}},
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "launch.json").write_text(
        json.dumps({"wall_seconds_total": 12.5, "cohort": {"oracle_auc": {"all": 0.9}}})
    )
    (tmp_path / "baselines.json").write_text(json.dumps({"pooled": {}, "wall_seconds": 3.0}))
    loaded = load_summary(tmp_path)
    assert loaded["wall_seconds_total"] == 12.5 and loaded["cohort"]["oracle_auc"]["all"] == 0.9
    assert loaded["baselines"] == {"pooled": {}, "wall_seconds": 3.0}
    from common.reportdoc import Table

    table = header_section(loaded, tmp_path, None).blocks[0]
    assert isinstance(table, Table)
    facts = {str(row[0]): str(row[1]) for row in table.rows}
    assert facts["seed"] == "splits 7, training 2"
    machine = facts["machine (server, centre1)"]
    assert "AMD EPYC 7B13 (AVX2" in machine and "BLAS mkl" in machine
    (tmp_path / "baselines.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"baselines\.json: expected a JSON object"):
        load_summary(tmp_path)


def test_time_left_counts_each_networks_rounds_at_its_own_rate() -> None:
    # 3D: 10 of 40 rounds done at 6 s each; 2D: none timed yet, so it borrows the mean of all timed rounds
    assert time_left({"densenet3d": 30, "densenet2d": 20}, {"densenet3d": 60.0, "densenet2d": 0.0}, {"densenet3d": 10, "densenet2d": 0}) == 30 * 6 + 20 * 6
    # both timed: 3D rounds of 6 s, 2D rounds of 9 s
    assert time_left({"densenet3d": 2, "densenet2d": 4}, {"densenet3d": 60.0, "densenet2d": 27.0}, {"densenet3d": 10, "densenet2d": 3}) == 2 * 6 + 4 * 9
    assert time_left({"densenet3d": 5}, {"densenet3d": 0.0}, {"densenet3d": 0}) == 0.0  # nothing timed: no estimate yet
