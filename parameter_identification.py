"""Identify per-tissue, per-pair regularization parameters with a trained *global* model.

For every pair of the chosen split the parameter grid (default 11 x 11 for elastic, 11 for
diffusion) runs through the global model as batched forward passes; the grid point with the
best class Dice is kept per tissue, the best mean-Dice point for the background and the global
baseline (ties: larger regularization). Writes into ``--out``:

- ``identified_parameters.csv``  one row per pair: the SA model's hyperparameters
  (``lambda_<class>``, ``mu_<class>``, background included), the Dice that chose them and the
  global baseline ``g_lambda, g_mu, g_mean_dice``
- ``grid_dice.csv``              the whole grid: pair, lambda, mu, class Dice..., mean Dice
- ``identification.json``        run folder, dataset options, grid, split, tie rule, timing
- ``fig2_parameters.png``        identified parameters per tissue (paper Fig. 2)

``--protocol population`` (docs/reading_results.md "How to read the comparison") searches the grid on the validation pairs instead,
keeps one setting (per class the best mean class Dice over them) and writes it for every pair of
``--split`` into ``<run>/identification_population``: the test labels then only score.

The dataset is rebuilt from the run folder's config; ``--data-dir``/``--label-dir`` override
its paths (e.g. when the data moved).

Outputs are written into a temporary sibling folder that replaces ``--out`` at the end (a killed
or failed run leaves the old folder complete; no file of an earlier run survives), ``--out`` is
locked while written, and ``identification.json`` records ``provenance``: the data hashes of the
split(s) used and the sha256 of the weights (:mod:`hypermorph_spatially_adaptive.provenance`);
data or weights that differ from what the run's config.json recorded are refused unless ``--force``.

``--method gradient --sa-run RUN`` identifies the SA model's own parameters by gradient descent
(:mod:`hypermorph_spatially_adaptive.gradient_identification`; this script's ``--method gradient``
section reads the runs and writes the files) and writes the same CSV columns
(Dice = hard Dice after the identified registration) plus ``objective_trace.csv`` into
``<run>/identification_gradient`` (``_epe`` with ``--objective epe``). With ``--protocol population``
it optimizes one setting per model on the mean soft Dice of the ``--population-split`` pairs (the
CSAIN paper's protocol) and applies it unchanged to every pair of ``--split``
(``<run>/identification_gradient_population``; Dice columns = validation means).

``--profile`` (default: the run's, config.json 'fidelity'; another profile is refused) sets the
defaults of ``--background``, ``--zero-point``, ``--grid-objective`` and ``--ident-unit``
(docs/fidelity.md): ``authors`` fixes the background at 0, excludes the zero point and picks the -g
baseline by TRE where the pairs have keypoints. A global elastic run trained with constrained
sampling (``mu ~ U[0, 1 - lambda]``) is searched on the grid points with ``lambda + mu <= 1`` only:
the network never saw the others.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from datasets.atomic import atomic_write
from hypermorph_spatially_adaptive import artifacts as art
from hypermorph_spatially_adaptive import cli, run_folder
from hypermorph_spatially_adaptive import provenance as prov
from hypermorph_spatially_adaptive.artifacts import IDENTIFICATION_META
from hypermorph_spatially_adaptive.folders import staged_folder
from hypermorph_spatially_adaptive.forward import Registrar, auto_batch_size, warped_moving_segmentation
from hypermorph_spatially_adaptive.profiles import CHOICES, PAPER, PROFILES, Fidelity, check_same_profile


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", required=True, help="run folder of a trained GLOBAL model (elastic or diffusion)")
    p.add_argument("--out", default=None, help="output folder (default: <run>/identification)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="pairs to identify")
    p.add_argument("--protocol", default="oracle", choices=["oracle", "population"],
                   help="oracle (paper text, sec. 2.2): identify each pair of --split on its own labels; population "
                        "(label-free at test time): search the grid on --population-split, keep per class the "
                        "point with the best mean class Dice over its pairs (background and -g: best mean Dice) "
                        "and apply that one setting to every pair of --split (with --method gradient: Adam on one setting "
                        "per model, minimizing the mean soft Dice over the --population-split pairs)")
    p.add_argument("--population-split", default="val", choices=["train", "val"],
                   help="population protocol: the split whose labels choose the setting")
    p.add_argument("--grid-steps", type=cli.arg_int(2), default=11,
                   help="grid values per parameter axis, equidistant in [0, 1] (11 -> step 0.1)")
    p.add_argument("--grid", type=cli.arg_float(0.0, 1.0, inclusive=True), nargs="+", default=None,
                   help="explicit grid values in [0, 1] (overrides --grid-steps)")
    p.add_argument("--max-grid-gb", type=cli.arg_float(0.0), default=4.0, metavar="GB",
                   help="refuse a grid chunk (--batch-size points) whose displacements and warped images would "
                        "exceed this many GB (float32: points x voxels x (D + 1) x 4 bytes), before the model loads")
    p.add_argument("--batch-size", type=cli.arg_int(0), default=0,
                   help="grid points per forward pass (0: as many as fit ~260k voxels, e.g. 16 at 128^2)")
    p.add_argument("--pairs", nargs="+", default=None, help="only these pair ids (default: the whole split)")
    p.add_argument("--data-dir", default=None, help="override the dataset folder saved in the run config")
    p.add_argument("--label-dir", default=None, help="override the tissue label folder saved in the run config")
    p.add_argument("--no-figure", action="store_true", help="skip the Fig. 2 scatter plot")
    p.add_argument("--force", action="store_true",
                   help="proceed although the run's recorded data or weights hashes (config.json 'provenance') "
                        "differ from the data and weights now; recorded in identification.json")
    f = p.add_argument_group("fidelity (docs/fidelity.md; grid method)")
    f.add_argument("--profile", choices=list(PROFILES), default=None,
                   help="paper (paper text) or authors (authors' code): the defaults of the four options below. "
                        "Default: the profile the run was trained with; another one is refused")
    f.add_argument("--background", choices=list(CHOICES["background"]), default=None,
                   help="background parameters: best-mean = the grid point with the best mean Dice (this project; "
                        "the paper text does not say); zero = lambda = mu = 0 / weight 0 (authors' code, "
                        "parameter_identification.py background_val). Default: the profile's")
    f.add_argument("--zero-point", choices=list(CHOICES["zero_point"]), default=None,
                   help="include or exclude the grid point lambda = mu = 0 (weight 0) from every choice (authors' "
                        "code: greater_zero=True excludes it). Default: the profile's (paper include, authors "
                        "exclude)")
    f.add_argument("--grid-objective", choices=list(CHOICES["objective"]), default=None,
                   help="what picks the -g baseline (and a best-mean background): dice = best mean Dice (paper "
                        "text: class Dice); tre = smallest mean keypoint TRE (authors' code offers it); auto = tre "
                        "where the pairs have keypoints, else dice. Tissues are always chosen by their class Dice. "
                        "Default: the profile's (paper dice, authors auto)")
    f.add_argument("--ident-unit", choices=list(CHOICES["unit"]), default=None,
                   help="oracle protocol: pair = one choice per pair (paper text, sec. 2.2); set = one choice from "
                        "the grid Dice averaged over the identified pairs (the authors' released script reads "
                        "per-grid-point means). Default: the profile's (pair for both)")
    g = p.add_argument_group("method (grid: paper sec. 2.2; gradient: docs/extensions.md 'Gradient identification')")
    g.add_argument("--method", default="grid", choices=["grid", "gradient"],
                   help="grid: grid search with the global model (paper text, sec. 2.2); gradient: Adam on the "
                        "SA model's own hyperparameters (every class, background included) and on the global "
                        "model's for the -g row")
    g.add_argument("--sa-run", default=None, metavar="RUN",
                   help="gradient: run folder of the trained SPATIALLY ADAPTIVE model (same regularizer and data "
                        "as --run)")
    g.add_argument("--init", default="center", choices=["center", "grid"], help=(
        "gradient start point: 0.5 for every parameter, or the grid proxy's choice per pair (see --init-from; "
        "0.5 where none is found). 0.5 measured better: grid values of 0 or 1 sit where the sigmoid is flat"))
    g.add_argument("--init-from", default=None, metavar="DIR", help=(
        "gradient, --init grid: folder with the grid method's identified_parameters.csv (default: <run>/identification)"))
    g.add_argument("--objective", default="dice", choices=["dice", "epe"],
                   help="gradient: 1 - mean soft Dice over tissues (linearly warped one-hot labels), or the mean "
                        "end-point error in mm against the true displacement in the body (synthetic data only)")
    g.add_argument("--steps", type=cli.arg_int(1), default=50,
                   help="gradient: maximum Adam steps (forward+backward passes)")
    g.add_argument("--lr", type=cli.arg_float(0.0), default=0.05,
                   help="gradient: Adam learning rate on z, h = sigmoid(z)")
    g.add_argument("--patience", type=cli.arg_int(0), default=10,
                   help="gradient: stop a pair after this many steps without improvement (0: never)")
    return p


def default_out(args: argparse.Namespace) -> str:
    """``--out`` or the default identification folder inside ``--run`` (by method/protocol)."""
    if args.out:
        return args.out
    if args.method == "gradient":
        return os.path.join(args.run, art.IDENTIFICATION_DIRS["gradient"]
                            + ("" if args.objective == "dice" else f"_{args.objective}")
                            + ("_population" if args.protocol == "population" else ""))
    return os.path.join(args.run, art.IDENTIFICATION_DIRS[args.protocol])


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = build_parser().parse_args(argv)
    out = default_out(args)
    # written into a temporary sibling that replaces --out only when everything succeeded

    inputs = [args.run, args.sa_run, args.init_from, args.data_dir, args.label_dir]  # never replaced (CONVENTIONS.md)
    with staged_folder(out, "identification folder", log=lambda line: print(line, flush=True), inputs=inputs,
                       legacy_meta=IDENTIFICATION_META) as dest:
        _identify(args, argv, out, dest)
    return out


def _load_global_run(args: argparse.Namespace) -> Tuple[object, Dict, object, List[str]]:
    """The global run and its data: ``(model, config, dataset, ids of the --split/--pairs pairs)``. A grid
    too large for --max-grid-gb is refused before the model loads (docs/troubleshooting.md "Bad inputs")."""
    from hypermorph_spatially_adaptive import grid_identification as ident

    if args.method == "grid":
        info = art.read_run(args.run, expect_sa=False)
        n_values = len(set(args.grid)) if args.grid is not None else args.grid_steps
        ident.check_grid_size(info.regularizer, n_values, info.config["model"]["image_shape"], args.max_grid_gb,
                              args.batch_size or None)
    # loading first: a truncated or foreign weights.h5 gets the load error that names the checkpoint to redo it
    model, config = run_folder.load_run(args.run, expect_sa=False)
    dataset = art.load_dataset(config, args.data_dir, args.label_dir)
    run_folder.check_compatible(args.run, config, dataset)
    return model, config, dataset, dataset.select_ids(args.split, args.pairs)


def _search_grid(registrar, dataset, search_ids: Sequence[str], grid, class_names: List[str], regularizer: str,
                 with_tre: bool = False):
    """Class and mean Dice of every grid point for every pair of ``search_ids`` (one table, progress
    printed per pair)."""
    import pandas as pd

    from hypermorph_spatially_adaptive import grid_identification as ident

    t0 = time.time()
    tables = []
    for k, pid in enumerate(search_ids, 1):
        pair = dataset.load_pair(pid)
        tables.append(ident.grid_dice(registrar, pair, grid, class_names, with_tre))
        best = tables[-1]["mean_dice"].max()
        per_pair = (time.time() - t0) / k
        print(f"[identify {regularizer}] {k}/{len(search_ids)} {pid}: best mean Dice {best:.3f} "
              f"({per_pair:.2f} s/pair, ETA {ident.format_eta(per_pair * (len(search_ids) - k))})", flush=True)
    return pd.concat(tables, ignore_index=True)


def identification_fidelity(args: argparse.Namespace, config: Dict):
    """The :class:`~hypermorph_spatially_adaptive.profiles.Fidelity` of this identification: the run's
    training settings (config.json 'fidelity'), ``--profile`` (refused if it is not the run's) and its
    identification defaults overridden by the options given."""
    trained = check_same_profile({args.run: config}, args.profile)
    base = Fidelity.of(trained.profile)

    return replace(trained, **{k: v if v is not None else getattr(base, k) for k, v in (
        ("background", args.background), ("zero_point", args.zero_point), ("objective", args.grid_objective),
        ("unit", args.ident_unit))})


def _identify(args: argparse.Namespace, argv: Optional[Sequence[str]], out: str, dest: str) -> None:
    """The body of :func:`main`: identify and write every file into ``dest`` (the staging folder of ``out``)."""
    from hypermorph_spatially_adaptive import grid_identification as ident

    model, config, dataset, ids = _load_global_run(args)
    fidelity = identification_fidelity(args, config)
    if args.method == "gradient":  # docs/extensions.md "Gradient identification"; writes <run>/identification_gradient[_epe]
        _identify_gradient(args, argv, model, config, dataset, ids, dest=dest, profile=fidelity.profile)
        return
    regularizer = config["model"]["regularizer"]
    class_names = list(config["class_names"])
    values = args.grid if args.grid is not None else ident.grid_values(args.grid_steps)
    grid = ident.make_grid(regularizer, values)
    if regularizer == "elastic" and fidelity.constrained(False):  # the network never saw lambda + mu > 1
        grid = grid[grid.sum(axis=1) <= 1.0 + 1e-9]
    population = args.protocol == "population"
    search_split = args.population_split if population else args.split
    search_ids = dataset.split_ids(search_split) if population else ids
    objective = fidelity.objective
    if objective == "auto":
        first = dataset.load_pair(search_ids[0]) if search_ids else None
        objective = "tre" if first is not None and first.fixed_kp is not None else "dice"
    choice_opts = {"background": fidelity.background, "exclude_zero": fidelity.zero_point == "exclude",
                   "objective": objective}
    if not search_ids:
        raise ValueError(f"the {search_split} split of {dataset.name} is empty: nothing to identify on")
    provenance = prov.check_runs([(args.run, config)], dataset, [args.split, search_split], args.force,
                                 args.data_dir, log=lambda line: print(line, flush=True))
    provenance["global_weights_sha256"] = prov.weights_sha256(args.run)

    registrar = Registrar(model, batch_size=args.batch_size or None)
    mb = ident.grid_bytes(regularizer, len(set(values)), dataset.image_shape, args.batch_size or None) / 1e6
    print(f"[identify {regularizer}] {args.protocol}: {len(search_ids)} {search_split} pairs x {len(grid)} grid "
          f"points ({len(values)} values per axis, {mb:.1f} MB of fields per chunk) with {args.run}", flush=True)
    t0 = time.time()
    grid_df = _search_grid(registrar, dataset, search_ids, grid, class_names, regularizer, objective == "tre")
    if population or fidelity.unit == "set":
        choice = ident.population_choice(grid_df, regularizer, class_names, ids, **choice_opts)
    else:
        choice = ident.choose_parameters(grid_df, regularizer, class_names, **choice_opts)
    choice.insert(1, art.REGULARIZER, regularizer)
    seconds = time.time() - t0

    atomic_write(os.path.join(dest, art.GRID_DICE), grid_df)
    atomic_write(os.path.join(dest, art.IDENTIFIED_PARAMETERS), choice)
    meta = {"global_run": os.path.abspath(args.run), "regularizer": regularizer, "class_names": class_names,
            "data": config["data"], "split": args.split, "protocol": args.protocol, "method": "grid",
            "identified_on": search_split, "grid_values": [float(v) for v in values],
            "n_grid_points": int(len(grid)), "pairs": ids,
            "tie_rule": "equal Dice -> larger regularization: larger lambda+mu (diffusion: weight), "
                        "then larger mu, then larger lambda; background and -g use the best mean Dice",
            "seconds": round(seconds, 2), "seconds_per_pair": round(seconds / max(len(search_ids), 1), 3),
            "provenance": provenance, "force": bool(args.force),
            **({} if fidelity == PAPER else {"fidelity": {**fidelity.to_dict(), "objective_used": objective}}),
            "command": ["parameter_identification.py"] + list(argv if argv is not None else sys.argv[1:])}
    atomic_write(os.path.join(dest, art.IDENTIFICATION_META), json.dumps(meta, indent=2))
    if not args.no_figure:
        from hypermorph_spatially_adaptive import figures

        figures.plot_parameter_scatter(choice, class_names, regularizer, os.path.join(dest, art.FIG2))
    print(f"[identify {regularizer}] done in {seconds:.1f} s -> {out}/{art.IDENTIFIED_PARAMETERS}", flush=True)

# ----------------------------------------------------------------------------------------------
# --method gradient (docs/extensions.md "Gradient identification"; the algorithm:
# hypermorph_spatially_adaptive.gradient_identification)
# ----------------------------------------------------------------------------------------------
def _check_gradient_pair(pair, objective: str) -> None:
    """Fail clearly on a pair the objective cannot use."""
    for name in ("fixed_seg", "moving_seg"):
        seg = getattr(pair, name, None)
        if seg is None or not np.any(np.asarray(seg) > 0):
            raise ValueError(f"pair {pair.pair_id}: {name} has no tissue labels; gradient identification "
                             "needs the labels of both images (Dice objective, body mask, final Dice)")
    if objective == "epe" and (pair.extras or {}).get("disp_true") is None:
        raise ValueError(f"pair {pair.pair_id}: the dataset provides no true displacement "
                         "(pair.extras['disp_true']); --objective epe works on synthetic data only")


def _gradient_start_points(init: str, init_dir: Optional[str], ids: Sequence[str], sa_names: Sequence[str],
                  g_names: Sequence[str]) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], str]:
    """Start points ``(h0_sa [N, P_sa], h0_g [N, P_g], description)`` (``None`` = 0.5)."""
    if init == "center":
        return None, None, "center (0.5)"
    path = os.path.join(init_dir, art.IDENTIFIED_PARAMETERS) if init_dir else None
    if path is None or not os.path.isfile(path):
        print(f"[identify gradient] --init grid: no grid identification at {path}; starting at 0.5", flush=True)
        return None, None, "center (0.5; no grid identification found)"
    df = art.read_table(path, fix="rerun the grid identification").set_index(art.PAIR_ID)
    cols = list(sa_names) + list(g_names)
    missing_cols = [c for c in cols if c not in df]
    missing_ids = [p for p in ids if p not in df.index]
    if missing_cols or missing_ids:
        raise ValueError(f"{path}: cannot start from it: columns {missing_cols} / pairs {missing_ids[:5]} missing")
    rows = df.loc[list(ids)]
    return (rows[list(sa_names)].to_numpy(np.float64), rows[list(g_names)].to_numpy(np.float64),
            f"grid proxy ({os.path.abspath(path)})")


def _hard_dice(model, pairs, hyp: np.ndarray, num_classes: int, net_seg=None) -> np.ndarray:
    """Hard class Dice ``[N, C]`` after registering each pair with its ``hyp [N, P]`` (a CSAIN
    model builds its map from ``net_seg [N, *spatial]``, default the fixed segmentations)."""
    import eval_metrics

    seg = np.stack([p.fixed_seg for p in pairs]) if net_seg is None else net_seg
    _, disp = Registrar(model)(np.stack([p.moving for p in pairs]), np.stack([p.fixed for p in pairs]), hyp, seg)
    return np.stack([eval_metrics.dice_per_class(p.fixed_seg, eval_metrics.warp_labels(p.moving_seg, disp[k]),
                                                 num_classes) for k, p in enumerate(pairs)])


def _gradient_rows(ids: Sequence[str], regularizer: str, sa_names, g_cols, class_names, h_sa, dice_sa, h_g, dice_g,
                 res_sa, res_g, fallback: Sequence[str]) -> List[Dict]:
    """Rows of identified_parameters.csv: row ``k`` uses row ``k`` of every array (or row 0 when
    the array has one row: the population protocol's single setting)."""
    import eval_metrics

    def at(x, k):
        return x[k if len(x) > 1 else 0]

    rows = []
    for k, pid in enumerate(ids):
        row: Dict = {art.PAIR_ID: pid, art.REGULARIZER: regularizer}
        row.update({n: float(v) for n, v in zip(sa_names, at(h_sa, k))})
        row.update({f"dice_{n}": float(at(dice_sa, k)[c]) for c, n in enumerate(class_names)})
        row["mean_dice"] = eval_metrics.nanmean(at(dice_sa, k))
        row.update({c: float(v) for c, v in zip(g_cols, at(h_g, k))})
        row[art.G_MEAN_DICE] = eval_metrics.nanmean(at(dice_g, k))
        row["fallback"] = fallback[k]
        row.update({"objective": float(at(res_sa.best, k)), "start_objective": float(at(res_sa.start, k)),
                    "g_objective": float(at(res_g.best, k)), "g_start_objective": float(at(res_g.start, k)),
                    "steps": int(at(res_sa.steps, k)), "g_steps": int(at(res_g.steps, k))})
        rows.append(row)
    return rows


def _gradient_oracle(args, g_model, sa_model, dataset, ids, names, C: int, bs: int, kw: Dict) -> Tuple:
    """Per test pair, on its own labels: ``(rows, trace_rows, meta, pairs, res_sa, res_g)``."""
    from hypermorph_spatially_adaptive import gradient_identification as gid

    pairs = [dataset.load_pair(pid) for pid in ids]
    for p in pairs:
        _check_gradient_pair(p, args.objective)
    sa_names, g_cols, class_names, regularizer = names
    init_dir = args.init_from or os.path.join(args.run, art.IDENTIFICATION_DIRS["oracle"])
    h0_sa, h0_g, init_desc = _gradient_start_points(args.init, init_dir if args.init == "grid" else None, ids,
                                                    sa_names, g_cols)
    print(f"[identify gradient {regularizer}] oracle: {len(ids)} pairs, objective {args.objective}, "
          f"<= {args.steps} steps, lr {args.lr}, start {init_desc}; SA {args.sa_run}, global {args.run}", flush=True)
    res_sa = gid.identify_in_batches(sa_model, pairs, bs, args.objective, h0_sa, **kw)
    print(f"[identify gradient {regularizer}] SA: objective {np.mean(res_sa.start):.4f} -> {np.mean(res_sa.best):.4f} "
          f"(mean over pairs), {res_sa.seconds:.1f} s", flush=True)
    res_g = gid.identify_in_batches(g_model, pairs, bs, args.objective, h0_g, **kw)
    print(f"[identify gradient {regularizer}] -g: objective {np.mean(res_g.start):.4f} -> {np.mean(res_g.best):.4f}, "
          f"{res_g.seconds:.1f} s", flush=True)
    fallback = [";".join(n for c, n in enumerate(class_names, 1)
                         if not (np.any(p.fixed_seg == c) or np.any(p.moving_seg == c))) for p in pairs]
    rows = _gradient_rows(ids, regularizer, sa_names, g_cols, class_names, res_sa.h, _hard_dice(sa_model, pairs, res_sa.h, C),
                        res_g.h, _hard_dice(g_model, pairs, res_g.h, C), res_sa, res_g, fallback)
    traces = [{art.PAIR_ID: p.pair_id, "model": name, "step": s, "objective": float(o)}
              for k, p in enumerate(pairs) for name, res in (("sa", res_sa), ("g", res_g))
              for s, o in enumerate(res.traces[k])]
    meta = {"protocol": "oracle", "identified_on": args.split, "init": args.init, "init_description": init_desc,
            "parametrization": "h = sigmoid(z), Adam on z, best iterate per pair kept"}
    return rows, traces, meta, pairs, res_sa, res_g


def _gradient_population(args, g_model, sa_model, dataset, ids, names, C: int, bs: int, kw: Dict) -> Tuple:
    """One setting per model from the --population-split pairs, applied to every pair of ``ids``:
    ``(rows, trace_rows, meta, val_pairs, res_sa, res_g)``. A CSAIN model sees, on the validation pairs
    as on the test pairs (inference ``--population-maps warped-moving``), maps built from the
    moving labels warped by the -g network at its population setting."""
    import eval_metrics
    from hypermorph_spatially_adaptive import gradient_identification as gid
    from hypermorph_spatially_adaptive.models import needs_segmentation

    if args.objective != "dice" or args.init != "center":
        raise ValueError("--method gradient --protocol population supports --objective dice and --init center")
    sa_names, g_cols, class_names, regularizer = names
    val_ids = dataset.split_ids(args.population_split)
    if not val_ids:
        raise ValueError(f"the {args.population_split} split of {dataset.name} is empty: nothing to identify on")
    val = [dataset.load_pair(pid) for pid in val_ids]
    for p in val:
        _check_gradient_pair(p, "dice")
    print(f"[identify gradient {regularizer}] population: one setting from {len(val)} {args.population_split} "
          f"pairs (mean soft Dice, <= {args.steps} steps, lr {args.lr}) for {len(ids)} {args.split} pairs; "
          f"SA {args.sa_run}, global {args.run}", flush=True)
    pkw = dict(steps=kw["steps"], lr=kw["lr"], patience=kw["patience"], num_classes=C, batch_size=bs)
    res_g = gid.identify_population(g_model, val, **pkw)
    print(f"[identify gradient {regularizer}] -g: mean objective {res_g.start[0]:.4f} -> {res_g.best[0]:.4f}, "
          f"{res_g.steps[0]} steps, {res_g.seconds:.1f} s", flush=True)
    net_segs, maps = None, "fixed seg of the validation pairs"
    if needs_segmentation(sa_model):
        _, disp_g = Registrar(g_model)(np.stack([p.moving for p in val]), np.stack([p.fixed for p in val]),
                                       np.repeat(res_g.h.astype(np.float32), len(val), 0))
        net_segs, maps = warped_moving_segmentation(val, disp_g), "moving seg warped by the -g network"
    res_sa = gid.identify_population(sa_model, val, net_segs=net_segs, **pkw)
    print(f"[identify gradient {regularizer}] SA: mean objective {res_sa.start[0]:.4f} -> {res_sa.best[0]:.4f}, "
          f"{res_sa.steps[0]} steps, {res_sa.seconds:.1f} s", flush=True)
    n = len(val)
    dice_sa = _hard_dice(sa_model, val, np.repeat(res_sa.h.astype(np.float32), n, 0), C, net_segs)
    dice_g = _hard_dice(g_model, val, np.repeat(res_g.h.astype(np.float32), n, 0), C)
    val_sa = np.array([[eval_metrics.nanmean(dice_sa[:, c]) for c in range(C)]])
    val_g = np.array([[eval_metrics.nanmean(dice_g[:, c]) for c in range(C)]])
    rows = _gradient_rows(ids, regularizer, sa_names, g_cols, class_names, res_sa.h, val_sa, res_g.h, val_g,
                        res_sa, res_g, [""] * len(ids))
    traces = [{art.PAIR_ID: "population", "model": name, "step": s, "objective": float(o)}
              for name, res in (("sa", res_sa), ("g", res_g)) for s, o in enumerate(res.traces[0])]
    meta = {"protocol": "population", "identified_on": args.population_split, "validation_pairs": list(val_ids),
            "init": "center", "init_description": "center (0.5)", "csain_maps": maps if net_segs is not None else "",
            "dice_columns": "means over the validation pairs at the chosen setting",
            "parametrization": "h = sigmoid(z), one z for all pairs, Adam on the mean objective, best iterate kept"}
    return rows, traces, meta, val, res_sa, res_g


def _load_sa_for(args, g_config: Dict, dataset) -> Tuple:
    """The SA run ``--sa-run`` of the global run's regularizer, trained on the same data and classes and
    compatible with ``dataset``: ``(model, config)``."""
    if args.sa_run is None:
        raise ValueError("--method gradient needs --sa-run (the spatially adaptive run folder)")
    sa_model, sa_config = run_folder.load_run(args.sa_run, expect_regularizer=g_config["model"]["regularizer"],
                                         expect_sa=True)
    if sa_config["data"] != g_config["data"] or list(sa_config["class_names"]) != list(g_config["class_names"]):
        raise ValueError(f"{args.sa_run} and {args.run} were trained on different datasets/classes")
    run_folder.check_compatible(args.sa_run, sa_config, dataset)
    return sa_model, sa_config


def _add_stiffness_order(meta: Dict, pairs, h_sa: np.ndarray, class_names: Sequence[str], regularizer: str) -> None:
    """``--objective epe`` on synthetic pairs with known Lamé values: put the per-pair Spearman
    correlations and their summary (:func:`hypermorph_spatially_adaptive.tables.stiffness_order_summary`)
    into ``meta`` and print the summary."""
    from hypermorph_spatially_adaptive import tables

    per_pair = tables.stiffness_order_summary(pairs, h_sa, class_names, regularizer == "elastic")
    if not per_pair:
        return
    summary = {key: tables.summarize_spearman([r[key] for r in per_pair.values()]) for key in next(iter(per_pair.values()))}
    meta["stiffness_order_spearman"] = {"summary": summary, "per_pair": per_pair}
    print(f"[identify gradient {regularizer}] stiffness order, Spearman(identified, true) per pair over "
          f"tissues {class_names}:", flush=True)
    for key, s in summary.items():
        print(f"    {key:20s} {json.dumps(s)}", flush=True)


def _write_gradient_files(dest: str, choice, trace_rows: List[Dict], meta: Dict, figure: bool,
                          class_names: Sequence[str], regularizer: str) -> None:
    """identified_parameters.csv, the objective trace, identification.json and (``figure``) Fig. 2 into ``dest``."""
    import pandas as pd

    atomic_write(os.path.join(dest, art.IDENTIFIED_PARAMETERS), choice)
    atomic_write(os.path.join(dest, art.OBJECTIVE_TRACE), pd.DataFrame(trace_rows))
    atomic_write(os.path.join(dest, art.IDENTIFICATION_META), json.dumps(meta, indent=2))
    if figure:
        from hypermorph_spatially_adaptive import figures

        figures.plot_parameter_scatter(choice, class_names, regularizer, os.path.join(dest, art.FIG2),
                                       jitter=0.0)  # continuous values: no grid clusters to spread


def _identify_gradient(args, argv, g_model, g_config: Dict, dataset, ids: Sequence[str], dest: Optional[str] = None,
                       profile: str = "paper") -> str:
    """``parameter_identification.py --method gradient``: identify, then write all files at once.

    ``args`` are the parsed options (``sa_run``, ``protocol``, ``population_split``, ``init``,
    ``init_from``, ``objective``, ``steps``, ``lr``, ``patience``, ``batch_size``, ``out``,
    ``run``, ``no_figure``); ``g_model``/``g_config`` the global run, ``dataset``/``ids`` the
    pairs to identify (oracle) or to apply the population setting to. Files are written into
    ``dest`` (the caller's temporary folder that replaces the output folder at the end; default:
    the output folder itself). The runs' recorded data/weights hashes are checked first
    (:func:`.provenance.check_runs`, ``--force``). ``profile`` is the runs' ``--profile``, recorded
    in identification.json 'fidelity' for the later stages' check (the gradient method itself is the
    project's under either profile: docs/fidelity.md). Returns the output folder.
    """
    import pandas as pd

    from hypermorph_spatially_adaptive import gradient_identification as gid

    sa_model, sa_config = _load_sa_for(args, g_config, dataset)
    regularizer = g_config["model"]["regularizer"]
    class_names = list(g_config["class_names"])
    C = len(class_names)
    names = (art.sa_columns(regularizer, class_names), art.global_columns(regularizer), class_names, regularizer)
    protocol = getattr(args, "protocol", "oracle")
    out = default_out(args)
    dest = dest or out
    splits = [args.split] + ([args.population_split] if protocol == "population" else [])
    provenance = prov.check_runs([(args.run, g_config), (args.sa_run, sa_config)], dataset, splits,
                            bool(getattr(args, "force", False)), getattr(args, "data_dir", None),
                            log=lambda line: print(line, flush=True))
    provenance.update(global_weights_sha256=prov.weights_sha256(args.run),
                      sa_weights_sha256=prov.weights_sha256(args.sa_run))
    n_opt = len(dataset.split_ids(args.population_split)) if protocol == "population" else len(ids)
    bs = args.batch_size or auto_batch_size(dataset.image_shape, n_opt, gid.GRADIENT_VOXEL_BUDGET)
    kw = dict(steps=args.steps, lr=args.lr, patience=args.patience, num_classes=C)
    t0 = time.time()
    identify = _gradient_population if protocol == "population" else _gradient_oracle
    rows, trace_rows, meta_p, opt_pairs, res_sa, res_g = identify(
        args, g_model, sa_model, dataset, ids, names, C, bs, kw)
    seconds = time.time() - t0
    choice = pd.DataFrame(rows)
    meta = {"method": "gradient", "objective": args.objective, **meta_p, "global_run": os.path.abspath(args.run),
            "sa_run": os.path.abspath(args.sa_run), "regularizer": regularizer, "class_names": class_names,
            "data": g_config["data"], "split": args.split, "pairs": list(ids), "steps": args.steps, "lr": args.lr,
            "patience": args.patience, "min_delta": gid.MIN_DELTA, "pairs_per_batch": int(bs),
            "forward_backward_passes": {"sa": int(res_sa.steps.sum()), "g": int(res_g.steps.sum())},
            "seconds": round(seconds, 2), "seconds_per_pair": round(seconds / max(len(opt_pairs), 1), 3),
            "seconds_sa": round(res_sa.seconds, 2), "seconds_g": round(res_g.seconds, 2),
            "provenance": provenance, "force": bool(getattr(args, "force", False)),
            "command": ["parameter_identification.py"] + list(argv if argv is not None else sys.argv[1:])}
    if profile != "paper":  # as the grid method records it (none = paper); its rules are the grid's only
        meta["fidelity"] = {"profile": profile, "method": "gradient (the project's under every profile)"}
    if args.objective == "epe":
        _add_stiffness_order(meta, opt_pairs, res_sa.h, class_names, regularizer)
    _write_gradient_files(dest, choice, trace_rows, meta, not args.no_figure, class_names, regularizer)
    print(f"[identify gradient {regularizer}] {protocol}: SA mean Dice {choice['mean_dice'].mean():.3f}, -g "
          f"{choice[art.G_MEAN_DICE].mean():.3f}"
          f"{' (validation means)' if protocol == 'population' else ''}; done in {seconds:.1f} s -> "
          f"{out}/{art.IDENTIFIED_PARAMETERS}", flush=True)
    return out


if __name__ == "__main__":
    from hypermorph_spatially_adaptive.cli import cli_main

    cli_main(main)
