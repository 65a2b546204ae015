"""The benchmark (``python -m bench``): one configuration measured through the engine, the report."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from bench import figures, tables
from bench.__main__ import Outcome, main, render_report
from bench.cohort import BASE_SITES, CohortError, CohortRequest, groups, merge_site
from bench.machine import describe_machine
from bench.options import bench_params, parse_args, specs
from bench.params import SECTIONS, BenchParams
from bench.proctree import TreeSampler, descendants, parse_kib, parse_ppid, sampling_wait, tree_sample
from bench.report import format_report
from bench.sections import latest_simulate_run
from bench.throughput import BenchError, Spec, bench_config, measure, runtime, warmup_patients
from common.config import to_dict
from common.configfile import load_config

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_one_configuration_measures_throughput_memory_and_prints_the_machine() -> None:
    result = measure(Spec(kind="densenet3d", preset="tiny", patients=4, arch="small"))
    assert result.loop == "common.engine" and result.input == "32^3" and result.train_steps == 1
    for rate in (result.train_pps, result.infer_pps):
        assert math.isfinite(rate) and rate > 0
    assert 0 < result.train_load_s < result.train_s and 0 < result.train_load_fraction < 1
    assert result.recal_s > 0  # the tiny preset recalibrates BatchNorm
    assert 50 < result.base_rss_mib <= result.peak_rss_mib < 16 * 1024

    machine = describe_machine("python -m bench --test")
    text = format_report(machine, [result])
    assert text.splitlines()[0].startswith(f"Machine: {machine.cpu_model}, {machine.cpu_count} cores")
    assert "Command: python -m bench --test" in text and "torch " in text
    row = next(line for line in text.splitlines() if line.startswith("densenet3d"))
    assert f"{result.train_pps:.3g}" in row and f"{result.peak_rss_mib / 1024:.2f}" in row
    busy = dataclasses.replace(result, load_avg_1m=machine.usable_cpus + 1.0)
    assert "WARNING: the 1-minute load average" in format_report(machine, [busy])
    idle = dataclasses.replace(result, load_avg_1m=0.0)
    assert "WARNING" not in format_report(machine, [idle])


def test_the_gpu_section_path_runs_through_the_engine_on_cpu_tensors() -> None:
    """What ``--device cuda`` measures (augmentation batched on the device), on the CPU at tiny size."""
    result = measure(Spec(kind="densenet2d", preset="tiny", patients=4, arch="small", augment_on="device"))
    assert (result.loop, result.device, result.device_name) == ("common.engine", "cpu", "cpu")
    assert (result.amp, result.augment_on, result.gpu_peak_mib) == ("off", "device", None)
    assert result.train_steps == 2 and 0 < result.train_load_s < result.train_s  # 12 slices, batch 8
    machine = describe_machine("python -m bench --augment-on device")
    text = format_report(machine, [result])
    header = next(line for line in text.splitlines() if line.startswith("model"))
    assert "amp" in header and "aug" in header and "GPU peak GiB" in header
    row = next(line for line in text.splitlines() if line.startswith("densenet2d"))
    assert " off " in row and " device " in row and row.rstrip().endswith("-")
    assert result.layout == "channels_last" and " channels_last " in row  # train.memory_format: auto
    plain = measure(
        Spec(kind="densenet2d", preset="tiny", patients=4, arch="small", memory_format="contiguous")
    )
    assert plain.layout == "contiguous" and plain.train_steps == result.train_steps
    with pytest.raises(BenchError, match=r"train\.amp: bf16 needs a CUDA device"):
        measure(Spec(kind="densenet3d", preset="tiny", patients=4, arch="small", amp="bf16"))


def test_the_bench_imports_no_unittest_mock_and_keeps_no_copy_of_the_engine() -> None:
    for path in sorted(BENCH.glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(m == "unittest" or m.startswith("unittest.") for m in imported), path
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert not defined & {"mirror_train_epoch", "mirror_recalibrate", "mirror_predict"}, path
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert "mock" not in names and "patch" not in names, path  # torch imports unittest.mock itself


def test_warmup_fills_a_batch_and_never_leaves_a_single_item() -> None:
    assert warmup_patients(16, 8, 1) == 8  # 3D: one full batch of patients
    assert warmup_patients(16, 8, 3) == 4  # 2D: 3 patients = 9 slices would leave 1 slice; 4 = 8 + 4
    assert warmup_patients(16, 20, 3) == 8  # 7 patients = 21 slices would leave 1
    assert warmup_patients(5, 20, 3) == 5  # capped at the patients there are


def test_cli_defaults_and_refusals() -> None:
    quick = specs(parse_args(["--quick-only"]))
    assert [(s.kind, s.preset, s.patients) for s in quick] == [
        ("densenet3d", "quick", 16),
        ("densenet2d", "quick", 16),
    ]
    full = specs(parse_args(["--patients", "5", "--batch", "4", "--threads", "1"]))
    assert {s.preset for s in full} == {"quick", "study"} and all(
        (s.patients, s.batch, s.threads) == (5, 4, 1) for s in full
    )
    assert [
        s.amp for s in specs(parse_args(["--device", "cuda", "--quick-only", "--kinds", "densenet3d"]))
    ] == [
        "off",
        "auto",
    ]
    assert {s.amp for s in full} == {"off"} and {s.memory_format for s in full} == {"auto"}
    both = specs(parse_args(["--quick-only", "--kinds", "densenet2d", "--memory-format", "auto,contiguous"]))
    assert [s.memory_format for s in both] == ["auto", "contiguous"]
    with pytest.raises(SystemExit):
        parse_args(["--amp", "half"])
    with pytest.raises(SystemExit):
        parse_args(["--memory-format", "nhwc"])
    if not torch.cuda.is_available():
        with pytest.raises(BenchError, match=r"^--device: cuda requested but no CUDA device"):
            runtime(bench_config(Spec(kind="densenet3d", preset="tiny", patients=4, device="cuda"))[0])
        assert main(["--device", "cuda", "--quick-only"]) == 2  # refused before anything is measured
    # 5 patients x 3 slices with batch 2 leaves one slice in the last batch: refused with a reason
    with pytest.raises(BenchError, match="single slice"):
        measure(
            dataclasses.replace(Spec(kind="densenet2d", preset="tiny", patients=5, arch="small"), batch=2)
        )


# ---------------------------------------------------------------- the whole suite's pure parts


def test_steady_round_ratio_and_verdict_arithmetic() -> None:
    assert figures.steady_mean([10.0, 4.0, 6.0]) == 5.0  # round 1 (warm-up) left out
    assert math.isnan(figures.steady_mean([10.0]))
    assert figures.ratio(6.0, 4.0) == 1.5
    assert math.isnan(figures.ratio(1.0, 0.0)) and math.isnan(figures.ratio(float("nan"), 2.0))
    assert figures.verdict(1.1, 1.15) == "met" and figures.verdict(1.2, 1.15) == "missed"
    assert figures.verdict(float("nan"), 1.15) == "n/a"
    assert figures.human_bytes(512) == "512 B" and figures.human_bytes(3 * 2**20) == "3.0 MiB"
    summary = {"rounds": {"densenet3d/fold0": [{"round": 2, "seconds": 3.0}, {"round": 1, "seconds": 9.0}]}}
    assert figures.round_seconds(summary) == [9.0, 3.0]
    assert figures.pooled_auc({"models": {"densenet3d": {"internal": {"pooled": {"auc": 0.8}}}}}) == 0.8
    assert math.isnan(figures.pooled_auc({"models": {}}))


def test_site_traffic_counts_the_round_exchange_the_fold_evaluate_and_the_whole_run() -> None:
    entry = {
        "bytes_sent": 1000,
        "bytes_received": 3000,
        "by_message_type": {  # 2 folds of 2 rounds: 4 train exchanges, one evaluate per fold
            "train": {"messages": 4, "bytes_received": 1600, "bytes_sent": 1400},
            "evaluate": {"messages": 2, "bytes_received": 800, "bytes_sent": 100},
            "query.siteinfo": {"messages": 1, "bytes_received": 50, "bytes_sent": 10},
        },
    }
    t = figures.site_traffic(entry, rounds=4, folds=2)
    assert (t["round_received"], t["round_sent"], t["round_total"]) == (400.0, 350.0, 750.0)
    assert (t["fold_evaluate_received"], t["fold_evaluate_sent"]) == (400.0, 50.0)
    assert (t["run_total"], t["messages"]) == (4000.0, 7.0)


def test_scaling_groups_keep_one_scanner_per_site_and_every_patient_once() -> None:
    for n in (3, 6, 12):
        g = groups(n)
        assert sorted(i for members in g for i in members) == list(range(BASE_SITES))
        assert all(len({i % 3 for i in members}) == 1 for members in g)  # one scanner profile per site
        assert len({len(members) for members in g}) == 1
    with pytest.raises(CohortError):
        groups(4)
    with pytest.raises(CohortError, match="multiple of 24"):
        CohortRequest(patients=100)


def test_merged_site_links_every_case_and_concatenates_the_tables(tmp_path: Path) -> None:
    sources = []
    for s in ("a", "b"):
        site = tmp_path / s
        (site / "images").mkdir(parents=True)
        (site / "masks").mkdir()
        for i in (1, 2):
            (site / "images" / f"{s}{i}.nii.gz").write_bytes(b"image " + s.encode())
            (site / "masks" / f"{s}{i}.nii.gz").write_bytes(b"mask")
        rows = "".join(f"{s}{i},{i % 2},images/{s}{i}.nii.gz,masks/{s}{i}.nii.gz,7,40,M\n" for i in (1, 2))
        (site / "manifest.csv").write_text("patient_id,label,image,mask,radiologist_score,age,sex\n" + rows)
        (site / "reader_study.csv").write_text(
            f"patient_id,reader,tier,score_without_ai,score_with_ai\n{s}1,r1,junior,3,4\n"
        )
        sources.append(site)
    out = tmp_path / "merged"
    merge_site(sources, out)
    lines = (out / "manifest.csv").read_text().splitlines()
    assert lines[0].startswith("patient_id,label,image") and len(lines) == 5
    assert (out / "images" / "b2.nii.gz").read_bytes() == b"image b"  # resolves to the original file
    assert len((out / "reader_study.csv").read_text().splitlines()) == 3


def test_proc_parsing_and_a_real_process_tree() -> None:
    assert parse_ppid("42 (a (weird) name) S 7 42 42 0") == 7
    assert parse_kib("Name:\tx\nVmRSS:\t  2048 kB\n", "VmRSS") == 2048 and parse_kib("", "Pss") == 0
    assert descendants(1, {2: 1, 3: 2, 4: 9}) == {1, 2, 3}
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 << 20); time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and tree_sample([child.pid])[0] < 60:
            time.sleep(0.1)
        total, largest, count = tree_sample([os.getpid()])
        assert count >= 2 and total >= 60 and largest >= 60  # this process and the child holding 64 MiB
        with TreeSampler(interval_s=0.05, max_share=1.0) as sampler:
            sampler.add(child.pid, "child")
            time.sleep(0.3)
        assert (
            sampler.peak.samples >= 2 and sampler.peak.total_pss_mib >= 60 and sampler.peak.max_processes == 1
        )
        assert sampler.peak.per_root_pss_mib["child"] == sampler.peak.total_pss_mib
        assert sampler.peak.sampler_cpu_s > 0 and sampler.peak.to_dict()["sampler_cpu_s"] >= 0
    finally:
        child.kill()
        child.wait()


def test_sampling_waits_longer_when_a_sample_costs_more_than_its_share() -> None:
    assert sampling_wait(1.0, cost_s=0.005, max_share=0.02) == 1.0
    assert sampling_wait(1.0, cost_s=0.1, max_share=0.02) == pytest.approx(5.0)


def _overhead_result() -> dict[str, object]:
    def run(wall: float, rounds: list[float], ratio_w: float, ratio_s: float) -> dict[str, object]:
        mem = {"peak_total_pss_gib": 1.5, "peak_process_rss_gib": 0.9, "max_processes": 4}
        return {
            "wall_s": wall,
            "round_s": rounds,
            "steady_round_s": figures.steady_mean(rounds),
            "memory": mem,
            "ratio_whole": ratio_w,
            "ratio_steady": ratio_s,
            "import_s": 5.0,
            "threads": 2,
        }

    return {
        "experiment": "x",
        "transport": "float16",
        "preprocess_s_per_patient": 0.07,
        "preprocess_cold": True,
        "cache_load_s": 0.03,
        "plain": run(40.0, [12.0, 10.0, 10.0], 1.0, 1.0),
        "simulation": run(60.0, [14.0, 11.0, 11.0], 1.5, 1.1),
        "deployment": run(100.0, [30.0, 25.0, 25.0], 2.5, 2.5),
    }


def test_overhead_table_states_each_target_and_renders_as_text_and_markdown() -> None:
    t = tables.overhead_table(_overhead_result())
    sim = next(r for r in t.rows if r[0] == "Flower simulation")
    dep = next(r for r in t.rows if r[0].startswith("loopback"))
    assert sim[2:5] == ("1.50x", "11.0", "1.10x") and sim[5].endswith("per steady round: met")
    assert dep[5] == "<= 2.00x whole run: missed"
    text = tables.render(t)
    assert text.splitlines()[0] == t.title and "plain loop (one process)" in text
    md = tables.render(t, markdown=True)
    assert md.startswith(f"### {t.title}") and "|---|" in md and "- Experiment: x; federated runs with float16 model transport" in md


def test_overhead_table_adds_the_standing_hospitals_row_when_measured() -> None:
    r = _overhead_result()
    assert [row[0] for row in tables.overhead_table(r).rows][-1] == "loopback deployment (TLS)"  # an older bench.json
    r["deployment_standing"] = {**r["deployment"], "wall_s": 78.0, "ratio_whole": 1.95}  # type: ignore[dict-item]
    t = tables.overhead_table(r)
    row = t.rows[-1]
    assert row[0] == "loopback deployment, hospitals running" and row[1:3] == ("78", "1.95x")
    assert row[5] == "<= 2.00x whole run: met"
    assert any("deployment_standing 30.0, 25.0, 25.0" in note for note in t.notes)


def test_ratios_use_the_plain_loop_measured_first_and_last() -> None:
    first = {"wall_s": 90.0, "steady_round_s": 24.0}
    last = {"wall_s": 130.0, "steady_round_s": 36.0}
    assert figures.bracketed(first, last) == {"wall_s": 110.0, "steady_round_s": 30.0}
    r = _overhead_result()
    assert not any("plain loop again" in row[0] for row in tables.overhead_table(r).rows)  # an older bench.json
    r["plain"] = {**r["plain"], "ratio_whole": 0.8, "ratio_steady": 0.9}  # type: ignore[dict-item]
    r["plain_again"] = {**r["plain"], "wall_s": 60.0, "ratio_whole": 1.2, "ratio_steady": 1.1}  # type: ignore[dict-item]
    t = tables.overhead_table(r)
    assert [row[0] for row in t.rows][:2] == ["plain loop (one process)", "plain loop again, after the others"]
    assert t.rows[0][2] == "0.80x" and t.rows[1][1:3] == ("60", "1.20x")
    assert any(note.startswith("Ratios are to the mean of the two plain-loop runs (40 s first, 60 s last") for note in t.notes)


def test_a_rerun_starts_from_a_clean_run_folder(tmp_path: Path) -> None:
    from bench.federation import fresh

    left = tmp_path / "deploy" / "certs"
    left.mkdir(parents=True)
    (left / "ca.crt").write_text("from an interrupted attempt")
    fresh(tmp_path / "deploy")
    assert not (tmp_path / "deploy").exists()
    fresh(tmp_path / "never-made")  # nothing to remove: no error


def test_params_round_trip_and_section_names() -> None:
    p = BenchParams(rounds=4, scaling_sites=(3, 6))
    assert BenchParams.from_json(p.to_json()) == p
    assert SECTIONS[0] == "throughput" and set(SECTIONS) >= {"overhead", "comm", "quality", "e2e", "scaling"}
    args = parse_args(["--only", "scaling,overhead"])
    assert args.only == ("overhead", "scaling")  # report order, whatever the order asked
    assert parse_args(["--device", "cuda"]).only == ("throughput",)
    with pytest.raises(SystemExit):
        parse_args(["--only", "nonsense"])
    assert bench_params(parse_args(["--repeats", "3"])).repeats == 3 and bench_params(parse_args([])).repeats == 1
    with pytest.raises(SystemExit):
        parse_args(["--repeats", "0"])


def test_latest_simulate_run_prefers_the_current_quick_preset(tmp_path: Path) -> None:
    assert latest_simulate_run(tmp_path) is None
    for name, lr, mtime in (("default", None, 100), ("tuned", 0.01, 200)):
        run = tmp_path / name
        run.mkdir()
        cfg = to_dict(load_config("quick", {"train": {"lr": lr}} if lr else None))
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        (run / "summary.json").write_text(
            json.dumps({"config": "quick", "wall_seconds_total": 900.0 + mtime})
        )
        os.utime(run / "summary.json", (mtime, mtime))
    latest = latest_simulate_run(tmp_path)
    assert latest is not None and (latest["run"], latest["wall_s"], latest["preset_as_now"]) == (
        "default",
        1000.0,
        True,
    )


def test_report_from_an_earlier_run_renders_every_section_and_the_busy_warning(tmp_path: Path) -> None:
    machine = dataclasses.replace(
        describe_machine("python -m bench"), load_avg=(0.5, 0.5, 0.5), usable_cpus=2
    )
    out = Outcome(machine, BenchParams(), tmp_path, ("overhead", "comm"), "torch threads: 2")
    out.sections["overhead"] = _overhead_result()
    out.section_failures["comm"] = "comm: stopped after 420 s (section timeout)"
    out.seconds, out.total_s, out.end_load = {"overhead": 100.0, "comm": 420.0}, 520.0, 3.5
    (tmp_path / "bench.json").write_text(json.dumps(out.payload()))
    doc = tmp_path / "benchmarks.md"
    assert main(["--report-from", str(tmp_path / "bench.json"), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Benchmarks") and "- Command: python -m bench" in text
    assert "### Federation overhead" in text and "### comm: FAILED" in text and "section timeout" in text
    assert "**WARNING**: the machine was busy" in text and "3.5 at the end" in text
    assert render_report(Outcome.from_payload(out.payload())) == render_report(out)


def test_median_agrees_with_numpy_and_refuses_to_hide_a_missing_value() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 4, 7):
        values = [float(v) for v in rng.normal(size=n)]
        assert figures.median(values) == pytest.approx(float(np.median(values)), abs=0.0)
    assert math.isnan(figures.median([])) and math.isnan(figures.median([1.0, float("nan"), 2.0]))
    blocks: list[dict[str, dict[str, float]]] = [
        {"simulation": {"ratio_steady": 1.2}},
        {"simulation": {"ratio_steady": 1.1}},
        {"deployment": {}},
    ]
    assert figures.block_values(blocks, "simulation", "ratio_steady") == [1.2, 1.1]


def test_repeated_overhead_blocks_are_each_bracketed_by_their_own_plain_loops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The orchestration and arithmetic of ``--repeats`` (the runs' launchers are replaced: each is tested live elsewhere)."""
    from bench import runs, sections

    calls: list[str] = []
    plain_walls = iter([20.0, 30.0, 40.0])  # block 1 between 20 and 30 s, block 2 between 30 and 40 s

    def fed(name: str, wall: float, steady: float) -> dict[str, object]:
        calls.append(name)
        rounds = [{"round": 1, "seconds": 9.0}, {"round": 2, "seconds": steady}, {"round": 3, "seconds": steady}]
        return {"wall_s": wall, "memory": {"peak_total_pss_gib": wall / 10}, "run_dir": name, "summary": {"wall_seconds": wall - 5, "rounds": {"densenet3d/fold0": rounds}}}

    def plain(cfg: Path, cache: Path, threads: int, timeout: float) -> dict[str, object]:
        wall = next(plain_walls)
        calls.append(f"plain {wall:.0f}")
        return {"wall_s": wall, "memory": {}, "models": {"densenet3d": {"round_seconds": [9.0, wall / 10, wall / 10]}}, "import_s": 3.0, "threads": threads}

    sims = iter([(50.0, 3.0), (75.0, 3.0)])
    def prepared(p: BenchParams, work: Path, n: int) -> dict[str, object]:
        return {
            "configs": {"float16": "c16.yaml", "float32": "c32.yaml"},
            "cache": "cache",
            "preprocess": {"sites": {"site01": {"seconds": 6.0, "patients": 100, "cold": True, "warm_load_s": 0.05}}},
        }

    for module in (runs, sections):  # the section's own call, and the shared simulation's
        monkeypatch.setattr(module, "prepared", prepared)
    monkeypatch.setattr(sections, "run_plain", plain)
    monkeypatch.setattr(runs, "run_simulation", lambda cfg, cache, run_dir, t: fed(Path(run_dir).name, *next(sims)))
    monkeypatch.setattr(
        sections, "run_deployment", lambda cfg, cache, run_dir, t, standing: fed(Path(run_dir).name, 100.0, 6.0)
    )
    r = sections.section_overhead(BenchParams(repeats=2), tmp_path)
    assert calls == [
        "plain 20",
        "sim-sites3-float16",
        "deploy-sites3-float16",
        "deploy-standing-sites3-float16",
        "plain 30",
        "sim-sites3-float16-r1",
        "deploy-sites3-float16-r1",
        "deploy-standing-sites3-float16-r1",
        "plain 40",
    ]
    first, second = r["blocks"]
    assert first["reference"] == {"wall_s": 25.0, "steady_round_s": 2.5} and second["reference"]["wall_s"] == 35.0
    assert first["simulation"]["ratio_whole"] == 2.0 and second["simulation"]["ratio_whole"] == pytest.approx(75 / 35)
    assert first["simulation"]["ratio_steady"] == pytest.approx(3.0 / 2.5) and r["simulation"] is first["simulation"]
    assert (r["plain"]["wall_s"], r["plain_again"]["wall_s"]) == (20.0, 40.0)
    again = sections.section_overhead(BenchParams(repeats=2), tmp_path)  # every run remembered: nothing reruns
    assert len(calls) == 9 and again["blocks"][1]["simulation"]["wall_s"] == 75.0

    t = tables.overhead_table(r)
    sim_row = next(row for row in t.rows if row[0].startswith("Flower simulation"))
    # medians of two blocks: 2.0x and 2.14x whole; steady 1.2x and 3/3.5
    assert sim_row[0] == "Flower simulation, median of 2" and sim_row[2] == f"{(2.0 + 75 / 35) / 2:.2f}x"
    # judged on the median (1.03x: met), though the first block alone (1.20x) missed
    assert sim_row[4] == f"{(3 / 2.5 + 3 / 3.5) / 2:.2f}x" and sim_row[5].endswith("per steady round: met")
    assert sim_row[6] == "7.50"  # the larger peak of the two blocks
    note = next(n for n in t.notes if n.startswith("Repeated in 2 blocks"))
    assert "Simulation steady round 1.20x, 0.86x (median 1.03x)" in note and "Plain loop whole run s: 20, 30, 40" in note


@pytest.mark.parametrize(("rounds", "select_from"), [(2, 2), (3, 3), (5, 3)])
def test_the_experiment_config_loads_at_any_round_count(tmp_path: Path, rounds: int, select_from: int) -> None:
    """``--rounds 2`` (the README's quick try) was refused: the quick preset selects from round 3."""
    from bench.federation import Experiment

    (tmp_path / "cohort.json").write_text(json.dumps({"scale": 0.0, "seed": 0, "sites": {"site01": "site01"}}))
    cfg = load_config(Experiment(rounds=rounds).write(tmp_path, tmp_path / "exp.yaml", "bench-x"))
    assert cfg.train.rounds == rounds and cfg.for_model("densenet3d").train.rounds == rounds
    assert cfg.for_model("densenet3d").evaluation.select_from_round == select_from


def test_site_folders_start_with_the_cache_and_a_copy_of_the_file_check_memo(tmp_path: Path) -> None:
    from bench.federation import link_caches
    from common.checkmemo import VALIDATION_MEMO

    src = tmp_path / "cache" / "site01" / "cache"
    src.mkdir(parents=True)
    (src / "p001.npz").write_bytes(b"arrays")
    (src / VALIDATION_MEMO).write_text('{"version": 1, "entries": {}}')
    link_caches(tmp_path / "cache", ["site01"], tmp_path / "run")
    dest = tmp_path / "run" / "site01" / "cache"
    assert os.path.samefile(dest / "p001.npz", src / "p001.npz")  # linked, not copied
    assert (dest / VALIDATION_MEMO).read_text() == (src / VALIDATION_MEMO).read_text()
    assert not os.path.samefile(dest / VALIDATION_MEMO, src / VALIDATION_MEMO)  # the run rewrites its own
