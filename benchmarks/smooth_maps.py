"""Smoothed parameter maps (``--smooth-maps SIGMA``, the CSAIN paper's Lambda_gau): their effect on
Dice and folding, measured over the study's seeds x pairs.

For each finished unit (setting, seed) of ``benchmarks/study.py`` this

1. retrains the unit's spatially adaptive models (HyperMorph-SA, and CSAIN with ``--csain``) with the
   unit's own training command plus ``--smooth-maps SIGMA`` into ``<unit>/smooth<SIGMA>/runs/``
   (resumable: a finished run is reused, an unfinished one resumes from its checkpoint);
2. registers the unit's test pairs with them through ``inference.py``, replaying the unit's own
   inference command (same global models, same grid identifications in both protocols, same
   refinement options) into ``<unit>/smooth<SIGMA>/results/``. The gradient identifications are
   left out: they were made on the unsmoothed SA networks, so they would not be the smoothed
   model's own;
3. compares every SA row with its unsmoothed twin of the same unit, paired over seeds x pairs with
   the study's crossed intervals, and writes ``smooth_maps.csv`` / ``smooth_maps.md`` into the study
   folder (Dice, HD95, %negJ, SDlogJ, dense EPE).

Usage (after the study's units exist)::

    .venv/bin/python benchmarks/smooth_maps.py --study outputs/study --setting paper --sigma 0.8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from datasets.atomic import atomic_write  # noqa: E402
from hypermorph_spatially_adaptive import artifacts as art  # noqa: E402  (no TensorFlow)
from hypermorph_spatially_adaptive import trainer  # noqa: E402
from hypermorph_spatially_adaptive.jobs import run_child  # noqa: E402

#: SA rows compared with their unsmoothed twins (those present in both tables are used)
SA_METHODS = ("elas-sas", "diff-sas", "elas-sas@g", "diff-sas@g", "elas-sas+io", "diff-sas+io",
              "elas-sas (csain)", "diff-sas (csain)", "elas-sas@g (csain)", "diff-sas@g (csain)",
              "elas-sas+io (csain)", "diff-sas+io (csain)")
#: metrics compared
METRICS = ("mean_dice", "hd95", "dense_epe", "percent_neg_jac", "sdlogj")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--study", default=os.path.join("outputs", "study"), help="study folder (benchmarks/study.py --out)")
    p.add_argument("--setting", default="paper", help="study setting whose units are used")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="units (training seeds) to use")
    p.add_argument("--sigma", type=float, default=0.8, help="Gaussian sigma of the smoothed maps, in voxels "
                   "(CSAIN paper: 0.8 with a window of 5)")
    p.add_argument("--csain", action="store_true", help="also retrain and compare the unit's CSAIN models")
    p.add_argument("--bootstrap", type=int, default=4000, help="resamples of the intervals")
    return p


def _tag(sigma: float) -> str:
    return f"smooth{sigma:g}"


def _sa_runs(unit: str, csain: bool) -> Dict[str, str]:
    """The unit's SA run folders to retrain: ``{name: run_dir}``."""
    names = ["elastic_sa", "diffusion_sa"] + (["elastic_sa_csain", "diffusion_sa_csain"] if csain else [])
    runs = {n: os.path.join(unit, "runs", n) for n in names}
    missing = [d for d in runs.values() if not os.path.isfile(os.path.join(d, art.CONFIG))]
    if missing:
        raise FileNotFoundError(f"no trained run in {missing[0]} (run benchmarks/study.py first)")
    return runs


def _train_smoothed(unit: str, runs: Dict[str, str], sigma: float) -> Dict[str, str]:
    """Retrain each SA run with its own command plus ``--smooth-maps sigma``; returns the new run folders."""
    out = {}
    for k, (name, run_dir) in enumerate(runs.items(), 1):
        cfg = art.read_config(run_dir)
        argv = [a for a in (cfg.get("resumed") or [cfg])[-1]["command"][1:] if a not in ("--resume", "--overwrite")]
        new_dir = os.path.join(unit, _tag(sigma), "runs", name)
        argv[argv.index("--out") + 1] = new_dir
        argv += ["--smooth-maps", f"{sigma:g}"]
        out[name] = new_dir
        state = art.run_state(new_dir, argv)  # the pipeline's reuse rule: same command and finished
        if state == "finished":
            print(f"[smooth] [{k}/{len(runs)}] {new_dir}: finished, reused", flush=True)
            continue
        print(f"[smooth] [{k}/{len(runs)}] training {name} with --smooth-maps {sigma:g} -> {new_dir}", flush=True)
        trainer.main(cfg["preset"], argv + (["--resume"] if state != "none" else []))
    return out


def _replay_inference(unit: str, new_runs: Dict[str, str], sigma: float) -> str:
    """The unit's own inference command with the smoothed SA runs in place of the unit's (SA runs
    not retrained are left out) and without the gradient identifications (made on the unsmoothed
    networks); returns the per-pair metrics CSV."""
    with open(os.path.join(unit, "results", art.INFERENCE_META)) as f:
        recorded = json.load(f)["command"][1:]
    results = os.path.join(unit, _tag(sigma), "results")
    argv, i = [], 0
    opts_with_lists = ("--elastic-sa", "--diffusion-sa", "--elastic-ident", "--diffusion-ident")
    while i < len(recorded):
        a = recorded[i]
        if a in opts_with_lists:
            j = i + 1
            while j < len(recorded) and not recorded[j].startswith("--"):
                j += 1
            values = recorded[i + 1:j]
            if a.endswith("-sa"):
                # only the retrained SA models (an unsmoothed one would be compared with itself)
                values = [new_runs[n] for n in (os.path.basename(v.rstrip("/")) for v in values) if n in new_runs]
            else:
                values = [v for v in values if art.IDENTIFICATION_DIRS["gradient"] not in v]
            argv += [a, *values]
            i = j
            continue
        if a == "--out":
            argv += ["--out", results]
            i += 2
            continue
        if a == "--panels":
            argv += ["--panels", "0"]
            i += 2
            continue
        argv.append(a)
        i += 1
    argv = [a for a in argv if a != "--zero-io"]
    print(f"[smooth] inference -> {results}", flush=True)
    _run_inference(argv)
    return _results_csv(unit, sigma)


def _run_inference(argv: Sequence[str]) -> None:
    """``inference.py argv`` as a child process (a benchmark imports no script); its output is
    passed through."""
    rc = run_child([sys.executable, os.path.join(ROOT, "inference.py"), *argv], cwd=ROOT)
    if rc != 0:
        raise RuntimeError(f"inference.py failed (exit {rc}); its output is above")


def _results_csv(unit: str, sigma: float) -> str:
    """The smoothed models' per-pair metrics of a unit."""
    return os.path.join(unit, _tag(sigma), "results", art.PER_PAIR_METRICS)


def _reusable(csv: str, csain: bool) -> bool:
    """Whether a unit's smoothed table is finished and holds the rows asked for (CSAIN rows with
    ``--csain``); such a unit is not retrained, so its models need not exist here (e.g. restored
    from the study's record)."""
    import pandas as pd

    return os.path.isfile(csv) and (not csain or bool(
        pd.read_csv(csv, usecols=["method"])["method"].str.contains("csain").any()))


def compare_units(pairs: Sequence[tuple], sigma: float, n_boot: int):
    """Paired comparisons smoothed - unsmoothed per SA row over the given ``(seed, unsmoothed_csv,
    smoothed_csv)`` units, pooled over seeds and per seed. Returns the comparison DataFrame."""
    import pandas as pd

    from hypermorph_spatially_adaptive.tables import paired_comparison

    frames = []
    for seed, base_csv, smooth_csv in pairs:
        for tag, path in (("0", base_csv), (f"{sigma:g}", smooth_csv)):
            df = pd.read_csv(path, dtype={art.PAIR_ID: str})
            df = df[df["method"].isin(SA_METHODS)]
            frames.append(df.assign(method=df["method"] + f" [sigma {tag}]", seed=seed))
    both = pd.concat(frames, ignore_index=True)
    present = set(both["method"])
    comps = [(f"{m} [sigma {sigma:g}]", f"{m} [sigma 0]") for m in SA_METHODS
             if f"{m} [sigma {sigma:g}]" in present and f"{m} [sigma 0]" in present]
    return paired_comparison(both, comps, metrics=METRICS, n_boot=n_boot, per_seed=len(pairs) > 1)


def markdown(comp) -> str:
    """One row per (protocol, seed, comparison); per metric ``mean difference [95 % interval]``."""
    metrics = [m for m in METRICS if m in set(comp["metric"])]
    out = ["| protocol | seed | smoothed - unsmoothed | seeds x pairs | " + " | ".join(metrics) + " |",
           "|---|---|---|---|" + "---|" * len(metrics)]
    c = comp.assign(seed=comp["seed"].astype(str) if "seed" in comp else "all")
    for (proto, seed, name), g in c.groupby(["protocol", "seed", "comparison"], sort=False):
        by = g.set_index("metric")
        first = by.iloc[0]
        cells = [f"{by.loc[m, 'mean_diff']:+.4f} [{by.loc[m, 'ci_low']:+.4f}, {by.loc[m, 'ci_high']:+.4f}]"
                 if m in by.index else "-" for m in metrics]
        out.append(f"| {proto} | {seed} | {name} | {int(first['n_seeds'])} x {int(first['n_pairs'])} | "
                   + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = build_parser().parse_args(argv)
    if args.sigma <= 0:
        raise SystemExit("--sigma must be > 0 (0 is the unsmoothed model the study already has)")
    units: List[tuple] = []
    t0 = time.time()
    for k, seed in enumerate(args.seeds, 1):
        unit = os.path.join(args.study, args.setting, f"seed{seed}")
        if not os.path.isfile(os.path.join(unit, "DONE.json")):
            raise FileNotFoundError(f"{unit}: the study unit is not finished (no DONE.json)")
        print(f"[smooth] unit {k}/{len(args.seeds)}: {unit}", flush=True)
        smooth_csv = _results_csv(unit, args.sigma)
        if _reusable(smooth_csv, args.csain):
            print(f"[smooth] {smooth_csv}: exists, reused", flush=True)
        else:
            new_runs = _train_smoothed(unit, _sa_runs(unit, args.csain), args.sigma)
            smooth_csv = _replay_inference(unit, new_runs, args.sigma)
        units.append((seed, os.path.join(unit, "results", art.PER_PAIR_METRICS), smooth_csv))
        print(f"[smooth] unit {k}/{len(args.seeds)} done ({(time.time() - t0) / 60:.1f} min so far)", flush=True)
    comp = compare_units(units, args.sigma, args.bootstrap)
    stem = os.path.join(args.study, f"smooth_maps_{args.setting}_{_tag(args.sigma)}")
    atomic_write(stem + ".csv", comp)
    md = markdown(comp)
    atomic_write(stem + ".md", md + "\n")
    print(md, flush=True)
    return stem + ".csv"


if __name__ == "__main__":
    main()
