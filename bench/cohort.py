"""The benchmark's synthetic cohorts: one set of patients split into 12, 6 or 3 sites.

Scaling "with the same total patients" needs the *same* patients at every
site count, so the generator runs once, for 12 sites, and the 6- and 3-site
cohorts regroup those site folders (hard-linked images, concatenated
manifests and reader studies).  Sites are grouped by scanner profile, so a
merged site still has one scanner, as a hospital would.  Everything is
cached under one folder and regenerated only when the request changes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.sitedata import MANIFEST, READER_STUDY

log = logging.getLogger(__name__)

PROFILES = 3  # the study's three scanner profiles (simulation.centres.default_centres)
BASE_SITES = 12
COHORT_JSON = "cohort.json"
REFERENCE_KEYS = ("oracle_auc", "radiologist_auc", "handcrafted_lr_auc", "size_only_auc")


class CohortError(RuntimeError):
    """The benchmark cohort cannot be made as asked; the message says why."""


@dataclasses.dataclass(frozen=True)
class CohortRequest:
    """``patients`` in total, evenly over ``BASE_SITES`` sites, each half benign; generator ``seed``."""

    patients: int = 192
    seed: int = 0

    def __post_init__(self) -> None:
        per_site = self.patients // BASE_SITES
        if self.patients % BASE_SITES or per_site < 10 or per_site % 2:
            raise CohortError(
                f"{self.patients} patients: need a multiple of {2 * BASE_SITES} with at least 10 per site "
                f"(5 per class, so every site can make 5 stratified folds)"
            )

    @property
    def per_site(self) -> int:
        return self.patients // BASE_SITES

    def tag(self) -> str:
        return f"n{self.patients}-s{self.seed}"


def site_name(i: int) -> str:
    return f"site{i + 1:02d}"


def groups(n_sites: int, base: int = BASE_SITES, profiles: int = PROFILES) -> list[list[int]]:
    """Which base sites (0-based) make up each of ``n_sites`` merged sites.

    Base site ``i`` has scanner profile ``i % profiles``; a merged site only
    joins sites of one profile, and every merged site gets the same number.
    """
    if n_sites < 1 or base % n_sites or n_sites % profiles:
        raise CohortError(
            f"{n_sites} sites: must divide {base} and be a multiple of the {profiles} scanner profiles"
        )
    size = base // n_sites
    by_profile = [[i for i in range(base) if i % profiles == p] for p in range(profiles)]
    ordered = [i for members in by_profile for i in members]
    return [sorted(ordered[k * size : (k + 1) * size]) for k in range(n_sites)]


def base_centres(request: CohortRequest) -> tuple[Any, ...]:
    """``BASE_SITES`` centre specs cycling over the study's three scanners, balanced classes."""
    from simulation.synth import default_centres

    protos = default_centres(1.0)
    half = request.per_site // 2
    return tuple(
        dataclasses.replace(
            protos[i % PROFILES],
            name=site_name(i),
            benign=half,
            malignant=request.per_site - half,
            external=False,
        )
        for i in range(BASE_SITES)
    )


def _matches(folder: Path, request: CohortRequest) -> bool:
    path = folder / COHORT_JSON
    if not path.is_file():
        return False
    info = json.loads(path.read_text())
    complete = all((folder / d / MANIFEST).is_file() for d in info.get("sites", {}).values())
    return bool(complete and info.get("bench") == dataclasses.asdict(request))


def _reference(info: dict[str, Any]) -> dict[str, Any]:
    """Whole-cohort reference AUCs (per-centre ones do not survive regrouping)."""
    return {
        k: {"all": info[k]["all"]}
        for k in REFERENCE_KEYS
        if isinstance(info.get(k), dict) and "all" in info[k]
    }


def ensure_base(root: Path, request: CohortRequest, workers: int = 2) -> Path:
    """The 12-site cohort under ``root``, generated on first use (about 0.5 s per patient per core)."""
    from simulation.synth import generate_cohort

    folder = root / f"{request.tag()}-sites{BASE_SITES}"
    if _matches(folder, request):
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    log.info(
        "generating the benchmark cohort (%d patients, %d sites) in %s", request.patients, BASE_SITES, folder
    )
    info = generate_cohort(
        folder, scale=0.0, seed=request.seed, workers=workers, centres=base_centres(request)
    )
    info["bench"] = dataclasses.asdict(request)
    (folder / COHORT_JSON).write_text(json.dumps(info, indent=2) + "\n")
    return folder


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _link(target: Path, link: Path) -> None:
    """A hard link (a copy across file systems): site folders refuse symbolic links that leave them."""
    try:
        os.link(target, link)
    except OSError:
        shutil.copy2(target, link)


def merge_site(sources: Sequence[Path], out: Path) -> None:
    """One site folder holding every patient of ``sources`` (images and masks hard-linked)."""
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    header: list[str] = []
    rows: list[list[str]] = []
    readers: list[list[str]] = []
    reader_header: list[str] = []
    for src in sources:
        h, site_rows = _read_csv(src / MANIFEST)
        header = header or h
        if h != header:
            raise CohortError(f"{src / MANIFEST}: columns {h} differ from {header}")
        col = {c: h.index(c) for c in ("image", "mask")}
        for row in site_rows:
            for c, i in col.items():
                target = (src / row[i]).resolve()
                link = out / f"{c}s" / target.name
                _link(target, link)
                row[i] = f"{c}s/{target.name}"
            rows.append(row)
        if (src / READER_STUDY).is_file():
            reader_header, r = _read_csv(src / READER_STUDY)
            readers += r
    _write_csv(out / MANIFEST, header, rows)
    if readers:
        _write_csv(out / READER_STUDY, reader_header, readers)


def ensure_cohort(root: Path, request: CohortRequest, n_sites: int, workers: int = 2) -> Path:
    """The cohort of ``request`` split into ``n_sites`` sites (3, 6 or 12), made on first use."""
    base = ensure_base(root, request, workers)
    if n_sites == BASE_SITES:
        return base
    folder = root / f"{request.tag()}-sites{n_sites}"
    if _matches(folder, request):
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    info = json.loads((base / COHORT_JSON).read_text())
    sites: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    for k, group in enumerate(groups(n_sites)):
        name = site_name(k)
        merge_site([base / site_name(i) for i in group], folder / name)
        sites[name] = name
        members[name] = [site_name(i) for i in group]
    merged = {
        "generator": info["generator"],
        "seed": info["seed"],
        "scale": info["scale"],
        "sites": sites,
        "merged_from": {"cohort": str(base), "sites": members},
        **_reference(info),
        "bench": dataclasses.asdict(request),
    }
    (folder / COHORT_JSON).write_text(json.dumps(merged, indent=2) + "\n")
    return folder
