"""The study: every Table 1 row over several training seeds and >= 30 test pairs, in both settings.

One demo run is one sample: floating point differs between CPUs and training amplifies it, so a
claim about the method needs intervals over seeds *and* pairs. For each setting (``paper``:
the paper's eq. 1, K = 1; ``calibrated``: the energy scales of docs/extensions.md 'Calibrated energy') and
each seed this runs ``run_pipeline.py`` (four models, grid identification in both protocols,
gradient identification, refinement, Table 1; CSAIN models beside HyperMorph-SA) into ``--out/<setting>/seed<S>/``, on synthetic
data chosen off the ceiling (default ``--motion stress``, 200 pairs = 140/30/30 at 64 x 64: ANTs
SyN reaches mean Dice 0.937 there, against 0.970 at the demo's motion), and ANTs SyN once on the
same test pairs when antspyx is installed (``make bench-setup``). Then it writes

- ``study.csv``: one row per setting x seed x test pair x method (inference.py's per-pair
  columns plus ``setting`` and ``seed``; SyN rows are repeated for every seed of a setting so
  that paired comparisons line up);
- ``study_comparisons.csv`` / ``.md``: the paired comparisons docs/results.md reports, pooled over
  seeds and pairs (and per seed), with crossed seeds x pairs intervals and Holm-adjusted p-values;
- ``study_table.csv`` / ``.md``: per setting, protocol and method the mean over seeds x pairs and
  the range of the per-seed means (run-to-run variation);
- ``grid_response.csv``: per unit and regularizer, the grid's mean-Dice spread and the fraction
  of -g choices inside the box (does the hyperparameter matter?);
- ``stiffness.csv``: Spearman of the elastic SA model's identified per-tissue values against the
  pair's true Lame values, over the tissues of each pair (Dice and EPE-oracle gradient identification);
- ``stiffness_across.csv`` (with ``--stiffness-spread``: every pair has its own tissue stiffness):
  per unit, objective, tissue and parameter, Spearman of identified vs true values across the
  test pairs with a BCa interval over pairs (does a stiffer subject get a larger value?);
- ``study_forest_mean_dice.png``, ``study_forest_percent_neg_jac.png``: the comparisons as forest
  plots, pooled and per seed.

``--profiles paper authors`` (docs/fidelity.md) runs every setting also under ``run_pipeline.py
--profile authors`` (the authors' released code). Those units are named ``<setting>-authors``
(folders ``<setting>-authors/seed<S>``), so the recorded ``paper``-profile units keep their names and
stay valid; with both profiles the comparisons add ``<setting>-authors - <setting>`` per method.

Resumable: a unit (setting, seed) whose ``DONE.json`` exists is skipped, and a unit kept in the
record (``--record``, in git: ``benchmarks/study_record.py``) is restored from it; an interrupted unit
resumes inside ``run_pipeline.py`` (finished models are reused, an unfinished one resumes from
its checkpoint). ``--refresh`` re-runs identification and inference of finished units (training
reused), e.g. after a change of the evaluation code. Progress and an ETA are printed per unit.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import study_record  # noqa: E402
from datasets.atomic import atomic_write  # noqa: E402
from datasets.synthetic import SyntheticDataset, subject_lame  # noqa: E402
from hypermorph_spatially_adaptive import artifacts as art  # noqa: E402  (stage file names; no TensorFlow)
from hypermorph_spatially_adaptive.jobs import last_error_line, run_child  # noqa: E402

#: run_pipeline.py options per regularization setting. "calibrated" (docs/extensions.md 'Calibrated energy'): the
#: log mapping over 2 decades centred where benchmarks/calibrate_energy.py puts the optimal amplitude
#: of the true field at ~0.85 (elastic K 10, diffusion K 3), no endpoint oversampling (0.2 doubled the
#: global models' response but cost the SA models 0.02-0.06 Dice in one measured run). "wide": a box
#: that holds the oracle's optimum (docs/oracle.md, its table of boxes): elastic weights 0.063-63 per unit
#: similarity, where the oracle's tissue-specific settings on the stress data (0.1-18) and its global
#: ones (0.1-3) lie; calibrated's 0.5-50 misses the lung's 0.1-0.3
SETTINGS = {"paper": [],
            "calibrated": ["--elastic-energy-scale", "10", "--diffusion-energy-scale", "3", "--hyp-mapping", "log",
                           "--log-decades", "2"],
            "wide": ["--elastic-energy-scale", "4", "--diffusion-energy-scale", "3", "--hyp-mapping", "log",
                     "--log-decades", "3"]}
QUICK_ARGS = ["--quick", "--num-pairs", "24"]
#: run_pipeline.py --profile values (docs/fidelity.md); a profile other than paper suffixes the unit name
PROFILES = ("paper", "authors")


def unit_setting(setting: str, profile: str = "paper") -> str:
    """The unit's setting name: ``setting`` for the paper profile (the recorded units' names),
    ``<setting>-<profile>`` otherwise."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {PROFILES}")
    return setting if profile == "paper" else f"{setting}-{profile}"


def split_setting(name: str):
    """Inverse of :func:`unit_setting`: ``(setting, profile)``."""
    for profile in PROFILES[1:]:
        if name.endswith(f"-{profile}"):
            return name[: -len(profile) - 1], profile
    return name, "paper"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.path.join("outputs", "study"), help="study folder")
    p.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["paper", "calibrated"],
                   help="regularization settings to run (run_pipeline.py options: " +
                        "; ".join(f"{k}: {' '.join(v) or 'defaults'}" for k, v in SETTINGS.items()) + ")")
    p.add_argument("--profiles", nargs="+", choices=list(PROFILES), default=["paper"],
                   help="run_pipeline.py --profile of the units: paper (paper text) and/or authors (authors' code; "
                        "units named <setting>-authors, docs/fidelity.md)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--motion", default="stress", help="synthetic motion (see run_pipeline.py --help)")
    p.add_argument("--num-pairs", type=int, default=200, help="synthetic pairs (70/15/15 split: 200 -> 30 test)")
    p.add_argument("--steps", type=int, default=3000, help="training steps per model")
    p.add_argument("--refine", type=int, default=100, help="refinement steps of the +io rows")
    p.add_argument("--stiffness-spread", type=float, default=None,
                   help="synthetic subject-specific stiffness (run_pipeline.py --stiffness-spread): every pair's tissue "
                        "Lame values drawn around the phantom's (log-normal sigma); the units and the ANTs rows use "
                        "the same data, and stiffness.csv scores identification against each pair's own values")
    p.add_argument("--no-csain", action="store_true",
                   help="skip the CSAIN models (run_pipeline.py --csain): the -sas vs -g study at a third less cost")
    p.add_argument("--pipeline-args", default="", help="extra options for every run_pipeline.py call")
    p.add_argument("--no-syn", action="store_true", help="skip ANTs SyN even if antspyx is installed")
    p.add_argument("--refresh", action="store_true",
                   help="re-run identification and inference of finished units (the trained models are reused)")
    p.add_argument("--quick", action="store_true", help="smoke run: run_pipeline --quick, one seed, 24 pairs")
    p.add_argument("--bootstrap", type=int, default=4000, help="resamples of the seeds x pairs intervals")
    p.add_argument("--record", default=None,
                   help="durable record of finished units in git (benchmarks/study_record.py): a unit found there "
                        "is restored instead of re-run, a finished unit is saved there. Default: docs/study_record "
                        "(none with --quick); '' for none")
    return p


def _pipeline_argv(args, setting: str, seed: int, out: str) -> List[str]:
    """run_pipeline.py's command line of the unit ``setting`` (a :func:`unit_setting` name)."""
    base, profile = split_setting(setting)
    argv = ["--out", out, "--seed", str(seed), *([] if args.no_csain else ["--csain"]), "--zero-io",
            "--gradient-population", *SETTINGS[base], "--cache-dir", os.path.join(".cache", "synthetic")]
    if profile != "paper":  # paper units keep their recorded command
        argv += ["--profile", profile]
    if args.stiffness_spread:
        argv += ["--stiffness-spread", repr(args.stiffness_spread)]
    if args.quick:
        return argv + QUICK_ARGS + shlex.split(args.pipeline_args)
    return argv + ["--motion", args.motion, "--num-pairs", str(args.num_pairs), "--steps", str(args.steps),
                   "--refine", str(args.refine), "--panels", "1"] + shlex.split(args.pipeline_args)


def _without_out(argv: Sequence[str]) -> List[str]:
    """A run_pipeline.py command line without its ``--out`` value (units move between folders)."""
    argv = list(argv)
    if "--out" in argv:
        i = argv.index("--out")
        del argv[i:i + 2]
    return argv


def check_unit_command(done_json: str, argv: Sequence[str]) -> None:
    """Refuse a finished or recorded unit whose run_pipeline.py command (``--out`` aside) is not the
    one this study would run: e.g. a 3000-step unit in a study of 8000 steps, or other data.
    Raises ValueError naming the file and the first differing options."""
    with open(done_json) as f:
        recorded = json.load(f).get("argv", [])
    if _without_out(recorded) != _without_out(argv):
        old, new = " ".join(_without_out(recorded)), " ".join(_without_out(argv))
        raise ValueError(f"{done_json} was made by another command than this study's:\n  recorded: {old}\n"
                         f"  this study: {new}\nuse another --out and --record for a study with other options")


def _run_unit(args, setting: str, seed: int) -> Dict:
    """One (setting, seed): run_pipeline.py in a subprocess (its own TensorFlow state), then DONE.json."""
    out = os.path.join(args.out, setting, f"seed{seed}")
    done = os.path.join(out, "DONE.json")
    argv = _pipeline_argv(args, setting, seed, out)
    if os.path.isfile(done) and not args.refresh:
        check_unit_command(done, argv)
        with open(done) as f:
            return json.load(f)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    with open(os.path.join(out, "pipeline.log"), "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} run_pipeline.py {' '.join(argv)}\n")
        log.flush()
        rc = run_child([sys.executable, "run_pipeline.py", *argv], stdout=log, stderr=subprocess.STDOUT,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dies with the study
    if rc != 0:
        raise RuntimeError(f"run_pipeline.py failed for {setting} seed {seed} (exit {rc}: "
                           f"{last_error_line(os.path.join(out, 'pipeline.log'))}); see {out}/pipeline.log")
    info = {"setting": setting, "seed": seed, "argv": argv, "seconds": round(time.time() - t0, 1),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "git": _git_head()}
    atomic_write(done, json.dumps(info, indent=2) + "\n")
    return info


def _identify_epe(args, unit_dir: str) -> str:
    """Gradient identification with the EPE-oracle objective on the elastic SA model of a unit
    (the synthetic truth; for the stiffness-recovery check), or the existing folder."""
    out = os.path.join(unit_dir, art.IDENTIFICATION_DIRS["gradient"] + "_epe", "elastic")
    if os.path.isfile(os.path.join(out, art.IDENTIFIED_PARAMETERS)) and not args.refresh:
        return out
    runs = os.path.join(unit_dir, "runs")
    steps = "3" if args.quick else "50"

    rc = run_child([sys.executable, "parameter_identification.py", "--run", os.path.join(runs, "elastic_global"),
                    "--sa-run", os.path.join(runs, "elastic_sa"), "--method", "gradient", "--objective", "epe",
                    "--init", "center", "--steps", steps, "--out", out],
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), stdout=subprocess.DEVNULL)
    if rc != 0:
        raise RuntimeError(f"EPE-oracle identification failed in {unit_dir} (exit {rc})")
    return out


def _identified_elastic(unit_dir: str):
    """``(objective, identified_parameters.csv as a DataFrame)`` of the elastic SA model's gradient
    identifications of a unit: objective ``dice`` and, when present, ``epe`` (the synthetic truth)."""
    import pandas as pd

    gradient = art.IDENTIFICATION_DIRS["gradient"]
    for objective, sub in (("dice", gradient), ("epe", gradient + "_epe")):
        path = os.path.join(unit_dir, sub, "elastic", art.IDENTIFIED_PARAMETERS)
        if os.path.isfile(path):
            yield objective, pd.read_csv(path, dtype={"pair_id": str})


def network_epe_oracle(unit_dir: str):
    """The networks' own oracle on synthetic data: per test pair, the dense EPE (mm, tissue voxels)
    that the elastic SA model (``sas``) and the global model (``g``) reach with hyperparameters
    chosen per pair by gradient descent on the true EPE (``identification_gradient_epe``; best
    iterate of 50 steps from the box's centre). The network counterpart of bench_oracle's per-pair
    row. Empty when the unit has no EPE identification."""
    import pandas as pd

    for objective, df in _identified_elastic(unit_dir):
        if objective == "epe":
            return pd.DataFrame({"pair_id": df["pair_id"], "sas": df["objective"].astype(float),
                                 "g": df["g_objective"].astype(float)})
    return pd.DataFrame(columns=["pair_id", "sas", "g"])


def stiffness_recovery(unit_dir: str, class_names: Sequence[str], true_lame: Callable[[str], Dict[int, Sequence[float]]]):
    """Per pair and objective (dice, epe): Spearman correlation over the tissue classes between
    the identified per-class (lambda, mu) of the elastic SA model and the pair's true values
    (``true_lame(pair_id)``: ``{class index: (lambda, mu)}``, class 1..C = ``class_names``; the
    phantom's one table, or the pair's own with ``--stiffness-spread``)."""
    import pandas as pd
    from scipy.stats import spearmanr

    rows = []
    for objective, df in _identified_elastic(unit_dir):
        for _, r in df.iterrows():
            truth_of_pair = true_lame(r["pair_id"])
            row = {"pair_id": r["pair_id"], "objective": objective}
            for j, field in enumerate(("lambda", "mu")):
                ident = np.array([r[f"{field}_{c}"] for c in class_names], float)
                truth = np.array([truth_of_pair[k][j] for k in range(1, len(class_names) + 1)], float)
                row[f"spearman_{field}"] = float(spearmanr(ident, truth).statistic)
                row.update({f"{field}_{c}": float(r[f"{field}_{c}"]) for c in class_names})
            rows.append(row)
    return pd.DataFrame(rows)


def stiffness_across_pairs(unit_dir: str, class_names: Sequence[str],
                           true_lame: Callable[[str], Dict[int, Sequence[float]]], n_boot: int = 2000):
    """Subject-specific recovery (``--stiffness-spread`` data): per objective, tissue and parameter,
    Spearman rho over the unit's test pairs of identified vs true values (does a stiffer subject
    get a larger value?) with a BCa interval over pairs (benchmarks/stiffness_recovery.py)."""
    import pandas as pd
    from stiffness_recovery import stiffness_recovery as recovery

    frames = []
    for objective, df in _identified_elastic(unit_dir):
        truth = {p: true_lame(p) for p in df["pair_id"]}
        across, _ = recovery(df, truth, class_names, n_boot=n_boot)
        frames.append(across.assign(objective=objective))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def grid_response(unit_dir: str):
    """How much the global models' grid matters, per regularizer (issue targets: elastic spread
    >= 0.05, interior choices on most pairs): mean and median over the test pairs of the grid's
    mean-Dice spread (max - min over grid points), and the fraction of pairs whose -g choice lies
    inside the box (every coordinate strictly between 0 and 1)."""
    import pandas as pd

    rows = []
    for reg, cols in (("elastic", ["g_lambda", "g_mu"]), ("diffusion", ["g_lambda"])):
        folder = os.path.join(unit_dir, art.IDENTIFICATION_DIRS["oracle"], reg)
        if not os.path.isfile(os.path.join(folder, art.GRID_DICE)):
            continue
        grid = pd.read_csv(os.path.join(folder, art.GRID_DICE), dtype={"pair_id": str})
        spread = grid.groupby("pair_id")["mean_dice"].agg(lambda x: x.max() - x.min())
        choice = pd.read_csv(os.path.join(folder, art.IDENTIFIED_PARAMETERS), dtype={"pair_id": str})
        inside = ((choice[cols] > 0) & (choice[cols] < 1)).all(axis=1)
        rows.append({"regularizer": reg, "grid_spread_mean": float(spread.mean()),
                     "grid_spread_median": float(spread.median()), "interior_fraction": float(inside.mean()),
                     "n_pairs": int(len(choice))})
    return pd.DataFrame(rows)


def true_lame_of(args) -> Callable[[str], Dict[int, Sequence[float]]]:
    """``pair_id -> {class index: (lambda, mu)}`` of the study's data: the phantom's one table, or
    with ``--stiffness-spread`` each pair's own (the generator's ``subject_lame``; no pair is loaded)."""
    from datasets.phantoms import DEFAULT_LAME

    if not args.stiffness_spread:
        return lambda pair_id: DEFAULT_LAME
    data = SyntheticDataset(num_pairs=args.num_pairs, motion=args.motion, stiffness_spread=args.stiffness_spread,
                            cache_dir=os.path.join(".cache", "synthetic"))
    return lambda pair_id: subject_lame(data.seed_of(pair_id), args.stiffness_spread, DEFAULT_LAME)


def _git_head() -> Optional[str]:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


#: bench_peer.py's ANTs rows (its --transform values and their row names): the preset first
PEER_TRANSFORMS = ["antsRegistrationSyN[s]", "SyN"]
PEER_ROWS = ("ants-synpreset", "ants-syn")


def _methods_of(table: str) -> List[str]:
    import pandas as pd

    return list(pd.read_csv(table, usecols=["method"])["method"].unique())


def _run_syn(args) -> Optional[str]:
    """ANTs on the study's test pairs (once; deterministic with one thread): the
    antsRegistrationSyN[s] preset (row ants-synpreset) and the quick SyN (ants-syn), or None."""
    try:
        import ants  # noqa: F401
    except ImportError:
        print("[study] antspyx not installed (make bench-setup): no SyN rows", flush=True)
        return None
    out = os.path.join(args.out, "ants_syn")
    table = os.path.join(out, art.PER_PAIR_METRICS)
    if os.path.isfile(table) and PEER_ROWS[0] in set(_methods_of(table)):
        return table
    data = (["--image-size", "32", "32", "--num-pairs", "24"] if args.quick
            else ["--motion", args.motion, "--num-pairs", str(args.num_pairs)])
    if args.stiffness_spread:
        data += ["--stiffness-spread", repr(args.stiffness_spread)]
    here = os.path.dirname(os.path.abspath(__file__))
    rc = subprocess.call([sys.executable, os.path.join(here, "bench_peer.py"), *data, "--cache-dir",
                          os.path.join(".cache", "synthetic"), "--threads", "1", "--transform", *PEER_TRANSFORMS,
                          "--out", out],
                         cwd=os.path.dirname(here))
    if rc != 0:
        raise RuntimeError(f"bench_peer.py failed (exit {rc})")
    return table


def collect(args, units: Sequence[Dict], syn_table: Optional[str]):
    """``study.csv``: every unit's per-pair metrics with ``setting`` and ``seed`` (SyN per seed)."""
    import pandas as pd

    frames = []
    syn = pd.read_csv(syn_table, dtype={"pair_id": str}) if syn_table else None
    for u in units:
        res = os.path.join(args.out, u["setting"], f"seed{u['seed']}", "results", art.PER_PAIR_METRICS)
        df = pd.read_csv(res, dtype={"pair_id": str})
        if syn is not None:
            s = syn[syn["method"].isin(PEER_ROWS)].copy()
            for protocol in df["protocol"].dropna().unique():
                frames.append(s.assign(protocol=protocol, setting=u["setting"], seed=u["seed"]))
        frames.append(df.assign(setting=u["setting"], seed=u["seed"]))
    return pd.concat(frames, ignore_index=True, sort=False)


def study_comparisons(methods: Sequence[str]) -> List[tuple]:
    """The family docs/results.md reports, per regularizer: -sas vs -g (network, ablation, +io,
    gradient), gradient vs grid proxy, +io vs network, zero+io vs +io, ours vs ANTs SyN."""
    from hypermorph_spatially_adaptive.tables import default_comparisons

    present, out = set(methods), list(default_comparisons(methods))
    for s in ("diff", "elas"):
        for a, b in ((f"{s}-sas+io", f"{s}-sas"), (f"{s}-g+io", f"{s}-g"),
                     (f"{s}-sas zero+io", f"{s}-sas+io"), (f"{s}-g zero+io", f"{s}-g+io"),
                     *((f"{s}-sas (gradient)", peer) for peer in PEER_ROWS), *((f"{s}-sas", peer) for peer in PEER_ROWS),
                     *((f"{s}-sas+io", peer) for peer in PEER_ROWS)):
            if a in present and b in present and (a, b) not in out:
                out.append((a, b))
    return out


#: metrics of the study's paired comparisons (Table 1's compared metrics plus folding and Jacobian spread)
STUDY_METRICS = ("mean_dice", "hd95", "tre", "dense_epe", "percent_neg_jac", "sdlogj")
#: columns of the study table
TABLE_METRICS = ("mean_dice", "hd95", "dense_epe", "percent_neg_jac", "sdlogj", "seconds")


def study_table(study):
    """Per setting, protocol and method: the mean over seeds x pairs of each metric, and the
    spread of the per-seed means (max - min over seeds) as the run-to-run variation. Returns a
    DataFrame with ``<metric>`` and ``<metric>_seed_range`` columns and ``n_seeds``, ``n_pairs``."""
    import pandas as pd

    rows = []
    df = study.assign(protocol=study["protocol"].fillna(""))
    for (setting, protocol, method), g in df.groupby(["setting", "protocol", "method"], sort=False):
        row = {"setting": setting, "protocol": protocol, "method": method, "n_seeds": int(g["seed"].nunique()),
               "n_pairs": int(g["pair_id"].nunique())}
        for m in TABLE_METRICS:
            if m in g:
                per_seed = g.groupby("seed")[m].mean()
                row[m] = float(g[m].mean())
                row[f"{m}_seed_range"] = float(per_seed.max() - per_seed.min())
        rows.append(row)
    return pd.DataFrame(rows)


def table_markdown(table) -> str:
    """The study table as Markdown: ``mean (seed range)`` per metric, one block per setting."""
    out = []
    metrics = [m for m in TABLE_METRICS if m in table]
    for setting, t in table.groupby("setting", sort=False):
        out += [f"#### {setting}", "", "| protocol | method | seeds x pairs | " + " | ".join(metrics) + " |",
                "|---|---|---|" + "---|" * len(metrics)]
        for _, r in t.iterrows():
            cells = [f"{r[m]:.3f} ({r[m + '_seed_range']:.3f})" for m in metrics]
            out.append(f"| {r['protocol']} | {r['method']} | {r['n_seeds']} x {r['n_pairs']} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def compare(study, n_boot: int):
    """Paired comparisons per setting (pooled over seeds and per seed) and calibrated - paper per
    method (pooled); one table with a ``setting`` column."""
    import pandas as pd

    from hypermorph_spatially_adaptive.tables import paired_comparison

    frames = []
    for setting, df in study.groupby("setting", sort=False):
        comp = paired_comparison(df, study_comparisons(df["method"].unique()), metrics=STUDY_METRICS, n_boot=n_boot,
                                 per_seed=True)
        frames.append(comp.assign(setting=setting))
    settings = list(study["setting"].unique())
    methods = [m for m in study["method"].unique() if m not in ("initial", *PEER_ROWS)]
    for name in settings:  # the authors' code against the paper text, per method (same seeds and pairs)
        base, profile = split_setting(name)
        if profile != "paper" and base in settings:
            pair_df = study[study["setting"].isin([name, base])]
            both = pair_df.assign(method=pair_df["method"] + " [" + pair_df["setting"] + "]")
            frames.append(paired_comparison(both, [(f"{m} [{name}]", f"{m} [{base}]") for m in methods],
                                            metrics=STUDY_METRICS, n_boot=n_boot).assign(setting=f"{name} - {base}"))
    if {"paper", "calibrated"} <= set(settings):
        both = study.assign(method=study["method"] + " [" + study["setting"] + "]")
        pairs = [(f"{m} [calibrated]", f"{m} [paper]") for m in methods]
        frames.append(paired_comparison(both, pairs, metrics=STUDY_METRICS, n_boot=n_boot)
                      .assign(setting="calibrated - paper"))
    return pd.concat(frames, ignore_index=True)


def run_units(args) -> List[Dict]:
    """Every (setting, seed) unit in order: restored from the record if kept there, else run (or
    resumed), then the EPE-oracle identification and the record; progress and ETA per unit."""
    units_todo = [(unit_setting(s, pr), seed) for pr in args.profiles for s in args.settings for seed in args.seeds]
    print(f"[study] {len(units_todo)} units (settings {args.settings} x seeds {args.seeds}) -> {args.out}", flush=True)

    t0, units, spent = time.time(), [], []
    for k, (setting, seed) in enumerate(units_todo, 1):
        t_unit = time.time()
        unit = os.path.join(setting, f"seed{seed}")
        unit_dir = os.path.join(args.out, unit)
        recorded = bool(args.record) and os.path.isfile(os.path.join(args.record, unit, "DONE.json"))
        if recorded:
            check_unit_command(os.path.join(args.record, unit, "DONE.json"),
                               _pipeline_argv(args, setting, seed, unit_dir))
        if recorded and not os.path.isfile(os.path.join(unit_dir, "DONE.json")):
            study_record.restore_unit(args.out, args.record, unit)
            print(f"[study] {unit}: restored from the record {args.record} (not re-run)", flush=True)
        info = _run_unit(args, setting, seed)
        _identify_epe(args, unit_dir)
        if args.record and (not recorded or args.refresh):
            study_record.save_unit(args.out, args.record, unit)
        units.append(info)
        if time.time() - t_unit > 5:
            spent.append(time.time() - t_unit)
        eta = (len(units_todo) - k) * (sum(spent) / len(spent)) / 60 if spent else 0.0
        print(f"[study] {k}/{len(units_todo)} {setting} seed {seed} done ({info['seconds'] / 60:.1f} min); "
              f"elapsed {(time.time() - t0) / 60:.1f} min, eta {eta:.0f} min", flush=True)
    return units


def write_comparisons(args, study) -> None:
    """``study_comparisons.csv/.md``, ``study_table.csv/.md`` and the forest plots (within settings)."""
    from hypermorph_spatially_adaptive.tables import comparison_markdown
    from hypermorph_spatially_adaptive.figures import plot_comparison_forest

    comp = compare(study, args.bootstrap)
    atomic_write(os.path.join(args.out, "study_comparisons.csv"), comp)
    md = "\n\n".join(f"### {setting}\n\n" + comparison_markdown(c.drop(columns="setting"))
                       for setting, c in comp.groupby("setting", sort=False))
    atomic_write(os.path.join(args.out, "study_comparisons.md"), md + "\n")
    table = study_table(study)
    atomic_write(os.path.join(args.out, "study_table.csv"), table)
    atomic_write(os.path.join(args.out, "study_table.md"), table_markdown(table) + "\n")
    within = comp[~comp["setting"].str.contains(" - ")]  # not the between-setting / between-profile rows
    for metric in ("mean_dice", "percent_neg_jac"):
        plot_comparison_forest(within, os.path.join(args.out, f"study_forest_{metric}.png"), metric)


def write_response_and_stiffness(args, units: Sequence[Dict]) -> None:
    """``grid_response.csv`` and ``stiffness.csv`` over every unit, with their means printed."""
    import pandas as pd

    from datasets.phantoms import CLASS_NAMES

    dirs = [(u, os.path.join(args.out, u["setting"], f"seed{u['seed']}")) for u in units]
    response = pd.concat([grid_response(d).assign(setting=u["setting"], seed=u["seed"]) for u, d in dirs],
                         ignore_index=True)
    atomic_write(os.path.join(args.out, "grid_response.csv"), response)
    print("[study] grid response of the global models (mean over seeds):\n"
          + response.groupby(["setting", "regularizer"])[["grid_spread_mean", "interior_fraction"]].mean()
          .round(3).to_string(), flush=True)
    truth = true_lame_of(args)
    stiff = pd.concat([stiffness_recovery(d, CLASS_NAMES, truth).assign(setting=u["setting"], seed=u["seed"])
                       for u, d in dirs], ignore_index=True)
    atomic_write(os.path.join(args.out, "stiffness.csv"), stiff)
    summary = stiff.groupby(["setting", "objective"])[["spearman_mu", "spearman_lambda"]].agg(["mean", "count"])
    print("[study] stiffness order recovered by the elastic SA model (Spearman over lung/bone/liver vs the "
          "pair's true Lame values, mean over seeds x pairs):\n" + summary.round(3).to_string(), flush=True)
    oracle = pd.concat([network_epe_oracle(d).assign(setting=u["setting"], seed=u["seed"]) for u, d in dirs],
                       ignore_index=True)
    if len(oracle):
        atomic_write(os.path.join(args.out, "network_epe_oracle.csv"), oracle)
        print("[study] the networks' EPE oracle (per pair, parameters chosen on the true EPE; mean dense EPE mm "
              "over pairs):\n" + oracle.groupby(["setting", "seed"])[["sas", "g"]].mean().round(3).to_string(),
              flush=True)
    if args.stiffness_spread:
        across = pd.concat([stiffness_across_pairs(d, CLASS_NAMES, truth, n_boot=args.bootstrap)
                            .assign(setting=u["setting"], seed=u["seed"]) for u, d in dirs], ignore_index=True)
        atomic_write(os.path.join(args.out, "stiffness_across.csv"), across)
        print("[study] subject-specific stiffness recovered across pairs (Spearman of identified vs each pair's "
              "true values per tissue; mean over seeds, per-seed values in stiffness_across.csv):\n"
              + across.groupby(["setting", "objective", "param", "tissue"])["spearman"].agg(["mean", "min", "max"])
              .round(3).to_string(), flush=True)


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
    if args.record is None:
        args.record = "" if args.quick else os.path.join("docs", "study_record")
    units = run_units(args)
    syn_table = None if args.no_syn else _run_syn(args)

    study = collect(args, units, syn_table)
    path = os.path.join(args.out, "study.csv")
    atomic_write(path, study)
    print(f"[study] wrote {path} ({len(study)} rows)", flush=True)
    write_comparisons(args, study)
    write_response_and_stiffness(args, units)
    print(f"[study] wrote study_comparisons.csv/.md, study_table.csv/.md, grid_response.csv, stiffness.csv in "
          f"{args.out} (docs/results.md tables: benchmarks/study_report.py)", flush=True)
    return path


if __name__ == "__main__":
    from hypermorph_spatially_adaptive.cli import cli_main

    cli_main(main)
