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
(:mod:`hypermorph_spatially_adaptive.gradient_identification`) and writes the same CSV columns
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
from typing import Dict, List, Optional, Sequence, Tuple


def build_parser() -> argparse.ArgumentParser:
    from hypermorph_spatially_adaptive import cli
    from hypermorph_spatially_adaptive.profiles import CHOICES, PROFILES

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
    from hypermorph_spatially_adaptive import artifacts as art

    if args.out:
        return args.out
    if args.method == "gradient":  # as gradient_identification.run_cli names it
        return os.path.join(args.run, art.IDENTIFICATION_DIRS["gradient"]
                            + ("" if args.objective == "dice" else f"_{args.objective}")
                            + ("_population" if args.protocol == "population" else ""))
    return os.path.join(args.run, art.IDENTIFICATION_DIRS[args.protocol])


def main(argv: Optional[Sequence[str]] = None) -> str:
    from hypermorph_spatially_adaptive.folders import staged_folder

    args = build_parser().parse_args(argv)
    out = default_out(args)
    # written into a temporary sibling that replaces --out only when everything succeeded
    from hypermorph_spatially_adaptive.artifacts import IDENTIFICATION_META

    inputs = [args.run, args.sa_run, args.init_from, args.data_dir, args.label_dir]  # never replaced (CONVENTIONS.md)
    with staged_folder(out, "identification folder", log=lambda line: print(line, flush=True), inputs=inputs,
                       legacy_meta=IDENTIFICATION_META) as dest:
        _identify(args, argv, out, dest)
    return out


def _load_global_run(args: argparse.Namespace) -> Tuple[object, Dict, object, List[str]]:
    """The global run and its data: ``(model, config, dataset, ids of the --split/--pairs pairs)``. A grid
    too large for --max-grid-gb is refused before the model loads (docs/troubleshooting.md "Bad inputs")."""
    from hypermorph_spatially_adaptive import artifacts as art
    from hypermorph_spatially_adaptive import grid_identification as ident
    from hypermorph_spatially_adaptive import run_folder

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
    from hypermorph_spatially_adaptive.profiles import Fidelity, check_same_profile

    trained = check_same_profile({args.run: config}, args.profile)
    base = Fidelity.of(trained.profile)
    from dataclasses import replace

    return replace(trained, **{k: v if v is not None else getattr(base, k) for k, v in (
        ("background", args.background), ("zero_point", args.zero_point), ("objective", args.grid_objective),
        ("unit", args.ident_unit))})


def _identify(args: argparse.Namespace, argv: Optional[Sequence[str]], out: str, dest: str) -> None:
    """The body of :func:`main`: identify and write every file into ``dest`` (the staging folder of ``out``)."""
    from datasets.atomic import atomic_write
    from hypermorph_spatially_adaptive import artifacts as art
    from hypermorph_spatially_adaptive import grid_identification as ident
    from hypermorph_spatially_adaptive import provenance as prov
    from hypermorph_spatially_adaptive.profiles import PAPER
    from hypermorph_spatially_adaptive.forward import Registrar

    model, config, dataset, ids = _load_global_run(args)
    fidelity = identification_fidelity(args, config)
    if args.method == "gradient":  # docs/extensions.md "Gradient identification"; writes <run>/identification_gradient[_epe]
        from hypermorph_spatially_adaptive import gradient_identification

        return gradient_identification.run_cli(args, argv, model, config, dataset, ids, dest=dest,
                                               profile=fidelity.profile)
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


if __name__ == "__main__":
    from hypermorph_spatially_adaptive.cli import cli_main

    cli_main(main)
