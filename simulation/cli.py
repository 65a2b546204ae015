"""``flower-simulation``: the synthetic cohort and a single-machine federated run.

``flower-simulation run`` with no argument is the project's first run: it
generates the built-in synthetic cohort on first use, validates every site,
and runs the default plan with Flower's simulation engine (a local
SuperLink in simulation mode, started and stopped here), writing a new
folder under ``runs/`` whose path it prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from common.checkmemo import site_memo
from common.config import ConfigError, ExperimentConfig, SiteConfig, with_sites
from common.configfile import load_config
from common.processes import exit_on_sigterm
from common.validation import validate_site

log = logging.getLogger("flower-simulation")
REPO = Path(__file__).resolve().parents[1]


def ensure_cohort(cfg: ExperimentConfig, root: Path) -> Path:
    """The configured synthetic cohort folder, generated when it has no ``cohort.json``."""
    from .synth import generate_cohort

    cohort_dir = Path(cfg.cohort.dir)
    if not cohort_dir.is_absolute():
        cohort_dir = root / cohort_dir
    info_path = cohort_dir / "cohort.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if (float(info.get("scale", -1)), int(info.get("seed", -1))) != (cfg.cohort.scale, cfg.cohort.seed):
            print(f"{cohort_dir} holds a cohort of scale {info.get('scale')} seed {info.get('seed')}; regenerating for scale {cfg.cohort.scale} seed {cfg.cohort.seed}", flush=True)
            shutil.rmtree(cohort_dir)
    if not info_path.is_file():
        print(f"Generating the synthetic cohort (scale {cfg.cohort.scale}, seed {cfg.cohort.seed}) in {cohort_dir} ...", flush=True)
        t0 = time.perf_counter()
        info = generate_cohort(cohort_dir, scale=cfg.cohort.scale, seed=cfg.cohort.seed)
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
        _print_cohort(info)
    return cohort_dir


def _print_cohort(info: dict) -> None:  # type: ignore[type-arg]
    for name, c in info.get("demographics", {}).items():
        print(f"  {name}: {c.get('patients')} patients ({c.get('benign')} benign / {c.get('malignant')} malignant)")
    for key in ("oracle_auc", "radiologist_auc", "handcrafted_lr_auc", "size_only_auc"):
        if key in info:
            print(f"  {key}: {json.dumps(info[key])}")


def cohort_sites(cohort_dir: Path) -> tuple[SiteConfig, ...]:
    info = json.loads((cohort_dir / "cohort.json").read_text())
    return tuple(SiteConfig(name=name, data_dir=str(cohort_dir / folder)) for name, folder in info["sites"].items())


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import generate_cohort

    t0 = time.perf_counter()
    info = generate_cohort(Path(args.out), scale=args.scale, seed=args.seed, workers=args.workers)
    print(f"Synthetic cohort written to {args.out} in {time.perf_counter() - t0:.0f} s")
    _print_cohort(info)
    return 0


def new_run_dir(base: Path, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = base / f"{stamp}-{name}"
    i = 1
    while run_dir.exists():
        run_dir = base / f"{stamp}-{name}-{i}"
        i += 1
    run_dir.mkdir(parents=True)
    return run_dir


def _experiment(args: argparse.Namespace) -> tuple[ExperimentConfig, Path | None]:
    """The config (preset ``quick`` by default) with its sites resolved, and the synthetic cohort folder.

    Raises ``ConfigError`` for a bad config; generates the synthetic cohort on first use.
    With ``cohort: {synthetic: false}`` no cohort is generated or used (``None``):
    the sites' own folders must be listed.
    """
    gpus = getattr(args, "gpus_per_site", None)
    cfg = load_config(args.config or "quick", {"federation": {"sim_gpus_per_site": gpus}} if gpus is not None else None)
    if not cfg.cohort.synthetic:
        if not cfg.sites:
            raise ConfigError("cohort.synthetic is false: list the sites and their data folders under 'sites'")
        return cfg, None
    cohort_dir = ensure_cohort(cfg, Path.cwd())
    return with_sites(cfg, cfg.sites or cohort_sites(cohort_dir)), cohort_dir


def simulation_resources(cfg: ExperimentConfig, cpus: int, gpus: int) -> dict[str, int | float]:
    """Flower's simulation backend config: sites, each site's CPUs and, when configured, its GPU share.

    ``federation.sim_gpus_per_site`` (e.g. 0.25: four sites share a GPU)
    goes to ``client-resources-num-gpus`` when the machine has ``gpus``; at
    0 (the default), or on a machine without a GPU, the key is left out and
    the run is exactly the CPU one (Ray would otherwise schedule no site at
    all).  Ray hides the GPUs from a site without a share, so on a GPU
    machine a share is what lets ``train.device: auto`` find one.

    Ray is told of enough CPU slots to run every site of a round at once (up
    to twice the real ``cpus``): with 3 one-thread sites on 2 cores, 2 slots
    make the third site train alone after the others (2 site-epochs per
    round) where the OS sharing the cores among all 3 takes 1.5.
    """
    threads = max(cfg.train.threads, 1)
    federation: dict[str, int | float] = {
        "num-supernodes": len(cfg.sites),
        "client-resources-num-cpus": threads,
        "init-args-num-cpus": max(cpus, min(len(cfg.sites) * threads, 2 * cpus)),
    }
    if cfg.federation.sim_gpus_per_site > 0 and gpus > 0:
        federation["client-resources-num-gpus"] = cfg.federation.sim_gpus_per_site
    return federation


def _gpus(cfg: ExperimentConfig) -> int:
    """CUDA devices here when the run asks for any (torch is imported only then); raises ``ConfigError``."""
    if cfg.federation.sim_gpus_per_site <= 0 and not cfg.train.device.startswith("cuda"):
        return 0
    import torch

    from common.device import for_config

    for_config(cfg)  # an explicit cuda without a GPU fails here, before any site starts
    if cfg.train.device.startswith("cuda") and cfg.federation.sim_gpus_per_site <= 0:
        raise ConfigError(
            f"federation.sim_gpus_per_site: train.device {cfg.train.device} needs a GPU share per simulated site "
            "(Ray hides the GPUs from a site without one): set it, e.g. 0.5, or --gpus-per-site 0.5"
        )
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        print("warning: federation.sim_gpus_per_site is set but this machine has no CUDA device: sites run on the CPU")
    return n


def cmd_run(args: argparse.Namespace) -> int:
    from server.launch import BASELINES_NAME, RunLaunch, finish, timed_launch, write_config
    from server.superlink import local_spec

    try:
        cfg, cohort_dir = _experiment(args)
        gpus = _gpus(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    root = Path.cwd()
    run_dir = Path(args.out).resolve() if args.out else new_run_dir(root / "runs", cfg.name).resolve()
    site_out = {s.name: run_dir / "sites" / s.name for s in cfg.sites}
    for s in cfg.sites:  # the NIfTI reads in threads (zlib and numpy release the GIL), one per allowed CPU
        # with the memo the site keeps beside its cache: a resumed run re-reads no unchanged file
        report = validate_site(Path(s.data_dir), workers=max(1, args.cpus), memo=site_memo(site_out[s.name]))
        print(f"  validate {report.summary()}")
    write_config(run_dir, cfg)
    sim_sites = [
        {"name": s.name, "data_dir": str(Path(s.data_dir).resolve()), "out_dir": str(site_out[s.name]), "threads": cfg.train.threads}
        for s in cfg.sites
    ]
    (run_dir / "simulation-sites.json").write_text(json.dumps(sim_sites, indent=2))
    run_config = {
        "config-path": str(run_dir / "config.yaml"),
        "run-dir": str(run_dir),
        "run-id": run_dir.name,
        "sim-sites-file": str(run_dir / "simulation-sites.json"),
        "expected-sites": len(cfg.sites),
    }
    federation = simulation_resources(cfg, args.cpus, gpus)
    print(f"Run folder: {run_dir}", flush=True)
    print(f"Plan {cfg.plan}: " + ", ".join(f"{s.name} ({s.role})" for s in cfg.sites), flush=True)
    launch = RunLaunch(run_dir, local_spec(simulation=True), "sim", run_config, federation_config=federation)
    rc, seconds = timed_launch(launch, lambda line: print(line, flush=True))
    ref = cohort_reference(cfg, cohort_dir)  # only a run on the synthetic cohort's own folders has one
    data = finish(run_dir, rc, seconds, {"cohort": ref} if ref else None)
    if data is None:
        return 1
    if args.baselines or cfg.baselines.pooled or cfg.baselines.local:
        from .baselines import run_baselines

        print("Baselines (pooled and local-only, same engine, folds and epoch budget) ...", flush=True)
        t1 = time.perf_counter()
        pooled = args.baselines or cfg.baselines.pooled
        local = args.baselines or cfg.baselines.local
        data["baselines"] = run_baselines(cfg, run_dir / "baseline-cache", pooled=pooled, local=local)
        data["baselines"]["wall_seconds"] = round(time.perf_counter() - t1, 1)
        (run_dir / BASELINES_NAME).write_text(json.dumps(data["baselines"], indent=2))
    _print_summary(data)
    if data.get("plan") != "loco":
        from common.report import render_report

        print(f"Report: {render_report(run_dir)}")
    print(run_dir)
    return 0


def cohort_reference(cfg: ExperimentConfig, cohort_dir: Path | None) -> dict[str, object] | None:
    """The synthetic cohort's reference AUCs (oracle, radiologist, handcrafted LR), for runs on that cohort only.

    ``None`` unless the run is synthetic and every site's folder is one of the
    cohort's own (from its ``cohort.json``): a run on hospital folders, or on
    folders listed beside a synthetic cohort, has no reference figures.
    """
    if cohort_dir is None or not cfg.cohort.synthetic:
        return None
    info_path = cohort_dir / "cohort.json"
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    own = {(cohort_dir / str(folder)).resolve() for folder in info.get("sites", {}).values()}
    if not cfg.sites or any(Path(s.data_dir).resolve() not in own for s in cfg.sites):
        return None
    keys = ("oracle_auc", "radiologist_auc", "handcrafted_lr_auc", "size_only_auc", "generator", "scale", "seed")
    return {k: info[k] for k in keys if k in info}


def cmd_baselines(args: argparse.Namespace) -> int:
    """Centralised (pooled) and local-only fivefold runs through the same engine, no Flower."""
    from .baselines import run_baselines

    try:
        cfg, cohort_dir = _experiment(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    root = Path.cwd()
    out = Path(args.out).resolve() if args.out else new_run_dir(root / "runs", f"{cfg.name}-baselines").resolve()
    out.mkdir(parents=True, exist_ok=True)
    models = args.models.split(",") if args.models else None
    t0 = time.perf_counter()
    res = run_baselines(cfg, out / "cache", pooled=args.kind in ("pooled", "both"), local=args.kind in ("local", "both"), models=models)
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    ref = cohort_reference(cfg, cohort_dir)
    if ref:
        res["cohort"] = ref
    (out / "baselines.json").write_text(json.dumps(res, indent=2))
    print_baselines(res, ref or {})
    print(f"\nwritten to {out / 'baselines.json'} in {res['wall_seconds']} s")
    return 0


def print_baselines(res: dict, ref: dict) -> None:  # type: ignore[type-arg]
    """Per-fold validation/test figures of every baseline, beside the cohort's reference AUCs."""
    if ref:
        print(f"\nCohort reference AUCs: oracle {json.dumps(ref.get('oracle_auc'))}; handcrafted LR {json.dumps(ref.get('handcrafted_lr_auc'))}")
    for setting in ("pooled", "local"):
        if setting not in res:
            continue
        groups = {"pooled": res["pooled"]} if setting == "pooled" else res["local"]
        for group, per_model in groups.items():
            print(f"\n[{setting} {group}]")
            for name, m in per_model.items():
                sel = m.get("selection", [])
                vals = m.get("validation", {}).get("folds", [])
                for i, f in enumerate(m["internal"]["folds"]):
                    val = ""
                    if i < len(sel):
                        val = f"  | selected epoch {sel[i]['best_epoch']}"
                    if i < len(vals):
                        v = vals[i]
                        val += f" val AUC {_f(v['auc'])} F1 {_f(v['f1'])} CM {v['confusion_matrix']}"
                    print(f"  {name:12s} fold {i}: test AUC {_f(f['auc'])} F1 {_f(f['f1'])} CM {f['confusion_matrix']}{val}")
                p = m["internal"]["pooled"]
                print(f"  {name:12s} pooled internal: AUC {_f(p['auc'])} F1 {_f(p['f1'])} CM {p['confusion_matrix']} (fold mean AUC {_f(m['internal']['fold_mean_auc'])})")
                if "external" in m:
                    print(f"  {name:12s} external: AUC {_f(m['external']['pooled']['auc'])}")


def _print_summary(data: dict) -> None:  # type: ignore[type-arg]
    print(f"\nFinished in {data.get('wall_seconds_total', data.get('wall_seconds'))} s")
    if "passes" in data:
        for held_out, p in data["passes"].items():
            print(f"\n[leave-one-centre-out: {held_out} held out]")
            _print_summary(p)
        return
    print(f"{'score':32s} {'internal AUC (pooled)':>22s} {'fold mean':>10s} {'external AUC':>13s}")
    for name, m in data.get("models", {}).items():
        internal = m.get("internal", {})
        ext = m.get("external", {}).get("pooled", {})
        auc_i = internal.get("pooled", {}).get("auc")
        fm = internal.get("fold_mean_auc")
        auc_e = ext.get("auc")
        print(f"{name:32s} {_f(auc_i):>22s} {_f(fm):>10s} {_f(auc_e):>13s}")
    base = data.get("baselines")
    if base:
        print_baselines(base, data.get("cohort", {}))
        print(f"\n{'internal AUC (pooled over folds)':32s} {'federated':>10s} {'pooled':>10s} {'local, all sites':>17s} {'local mean':>11s}")
        for name in ("densenet3d", "densenet2d", "radiomics"):
            fed = data.get("models", {}).get(name, {}).get("internal", {}).get("pooled", {}).get("auc")
            pooled = base.get("pooled", {}).get(name, {}).get("internal", {}).get("pooled", {}).get("auc")
            local = base.get("local_mean", {}).get(name, {}).get("internal_auc")
            local_all = base.get("local_pooled", {}).get(name, {}).get("internal", {}).get("pooled", {}).get("auc")
            print(f"{name:32s} {_f(fed):>10s} {_f(pooled):>10s} {_f(local_all):>17s} {_f(local):>11s}")
    ref = data.get("cohort", {})
    if ref:
        print(f"cohort oracle AUC {json.dumps(ref.get('oracle_auc', {}).get('all'))}, radiologist {json.dumps(ref.get('radiologist_auc', {}).get('all'))}, handcrafted LR {json.dumps(ref.get('handcrafted_lr_auc', {}).get('all'))}")


def _f(v: object) -> str:
    return "-" if v is None else f"{float(v):.4f}"  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flower-simulation", description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--log-level", default="WARNING")
    sub = p.add_subparsers(dest="command")
    s = sub.add_parser("synth", help="write the synthetic multicentre cohort")
    s.add_argument("--out", required=True)
    s.add_argument("--scale", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=1)
    s.set_defaults(handler=cmd_synth)
    r = sub.add_parser("run", help="run the federated plan on one machine (default: quick preset)")
    r.add_argument("--config", help="YAML file or preset name (quick, study, tiny)")
    r.add_argument("--out", help="run folder (default: a new folder under runs/)")
    r.add_argument("--cpus", type=int, default=2, help="CPUs the simulation may use")
    r.add_argument("--baselines", action="store_true", help="also run the pooled and local-only baselines")
    r.add_argument(
        "--gpus-per-site",
        type=float,
        metavar="F",
        help="share of a GPU per site (federation.sim_gpus_per_site; e.g. 0.5: two sites per GPU)",
    )
    r.set_defaults(handler=cmd_run)
    b = sub.add_parser("baselines", help="pooled (centralised) and local-only fivefold baselines, no Flower")
    b.add_argument("--config", help="YAML file or preset name (default quick)")
    b.add_argument("--kind", choices=("pooled", "local", "both"), default="both")
    b.add_argument("--models", help="comma-separated subset of densenet3d,densenet2d,radiomics")
    b.add_argument("--out", help="output folder (default: a new folder under runs/)")
    b.set_defaults(handler=cmd_baselines)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exit_on_sigterm()
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "command", None):
        args = build_parser().parse_args(["run", *(argv or [])])
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
