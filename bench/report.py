"""The benchmark's printed report: machine header, one table row per configuration, notes."""

from __future__ import annotations

from collections.abc import Sequence

from .machine import Machine
from .throughput import Measurement

COLUMNS = (
    "model",
    "input",
    "arch",
    "device",
    "layout",
    "thr",
    "pts",
    "batch tr/ev",
    "train pat/s",
    "load %",
    "BN recal s",
    "infer pat/s",
    "peak RSS GiB",
    "load avg",
)
GPU_COLUMNS = (*COLUMNS[:4], "amp", "aug", *COLUMNS[4:], "GPU peak GiB")
"""The GPU section's table: AMP, where augmentation ran and peak GPU memory as well."""


def _gpu_table(results: Sequence[Measurement]) -> bool:
    return any(r.device != "cpu" or r.amp != "off" or r.augment_on != "workers" for r in results)


def table_rows(results: Sequence[Measurement]) -> list[tuple[str, ...]]:
    """One row of formatted cells per measurement (figures as measured, rounded for reading)."""
    rows: list[tuple[str, ...]] = []
    gpu = _gpu_table(results)
    for r in results:
        row: tuple[str, ...] = (
            r.kind,
            r.input,
            r.arch,
            r.device,
            r.layout,
            str(r.threads),
            str(r.patients),
            f"{r.train_batch}/{r.eval_batch}",
            f"{r.train_pps:.3g}",
            f"{100 * r.train_load_fraction:.1f}",
            f"{r.recal_s:.2f}" if r.recal_s > 0 else "-",
            f"{r.infer_pps:.3g}",
            f"{r.peak_rss_mib / 1024:.2f}",
            f"{r.load_avg_1m:.1f}",
        )
        if gpu:
            peak = "-" if r.gpu_peak_mib is None else f"{r.gpu_peak_mib / 1024:.2f}"
            row = (*row[:4], r.amp, r.augment_on, *row[4:], peak)
        rows.append(row)
    return rows


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    first_number = list(header).index("thr") if "thr" in header else 4
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), line]
    out += [
        "  ".join(
            c.rjust(w) if i >= first_number else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    return "\n".join(out)


def format_report(
    machine: Machine, results: Sequence[Measurement], failures: Sequence[str] = (), threads_note: str = ""
) -> str:
    """The whole printed report (machine lines first, so no figure is read without them)."""
    out = [*machine.lines()]
    if threads_note:
        out.append(threads_note)
    out.append("")
    columns = GPU_COLUMNS if _gpu_table(results) else COLUMNS
    out.append(format_table(columns, table_rows(results)) if results else "(no configuration measured)")
    names = sorted({f"{r.device}: {r.device_name}" for r in results if r.device != "cpu" and r.device_name})
    if names:
        out += ["", *(f"GPU {n}" for n in names)]
    loops = sorted({r.loop for r in results})
    workers = sorted({r.num_workers for r in results})
    base = [r.base_rss_mib for r in results]
    out += [
        "",
        "Notes:",
        "  train pat/s: patients / seconds of one epoch of optimiser steps (common.engine.train, epochs=1),",
        "    after an untimed warm-up step; 2D trains on single slices, so its train batch counts slices.",
        f"  load %: share of that epoch spent waiting for the DataLoader's next batch (augmentation included,"
        f" num_workers={','.join(map(str, workers)) or '-'}).",
        "  BN recal s: the engine's BatchNorm recalibration pass that follows every local epoch (these patients).",
        "  infer pat/s: common.engine.predict (eval mode; 2D averages the slice probabilities).",
        "  peak RSS: VmHWM of the process measuring that row alone (one subprocess per row), including"
        + (f" ~{min(base) / 1024:.2f} GiB of imports." if base else " the imports."),
        "  load avg: the machine's 1-minute load average when the row's measurement ended.",
        "  data: random in-memory SiteArrays (float16, as cached); no disk reads or preprocessing are timed.",
        f"  loop: {', '.join(loops) or '-'}",
    ]
    if columns is GPU_COLUMNS:
        out += [
            "  amp: train.amp as resolved (off, bf16, or fp16 with a gradient scaler); aug: where the random",
            "    augmentation ran (device: batched on the training device, common.device_augment; workers: MONAI per item).",
            "    With aug device, load % is the wait for the un-augmented batch; the augmentation counts as compute.",
            "  GPU peak: torch.cuda.max_memory_allocated over the timed epoch, recalibration and prediction.",
        ]
    busy = [r for r in results if r.load_avg_1m > machine.usable_cpus]
    if busy:
        out += [
            "",
            f"WARNING: the 1-minute load average exceeded the {machine.usable_cpus} usable cores during "
            f"{len(busy)} of {len(results)} rows: other processes competed for the CPUs, so these figures are",
            "  lower than this machine's own and vary between runs; with --threads > 1 torch's OpenMP threads",
            "  also wait for each other when descheduled, which can cost far more than the lost share.",
            "  Compare with --threads 1, or rerun on an idle machine.",
        ]
    if failures:
        out += ["", "FAILED:", *(f"  {f}" for f in failures)]
    return "\n".join(out)
