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

The dataset is rebuilt from the run folder's config; ``--data-dir``/``--label-dir`` override
its paths (e.g. when the data moved).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

import hypermorph_spatially_adaptive  # noqa: F401  (shims before TensorFlow)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", required=True, help="run folder of a trained GLOBAL model (elastic or diffusion)")
    p.add_argument("--out", default=None, help="output folder (default: <run>/identification)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="pairs to identify")
    p.add_argument("--grid-steps", type=int, default=11,
                   help="grid values per parameter axis, equidistant in [0, 1] (11 -> step 0.1)")
    p.add_argument("--grid", type=float, nargs="+", default=None,
                   help="explicit grid values in [0, 1] (overrides --grid-steps)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="grid points per forward pass (0: as many as fit ~260k voxels, e.g. 16 at 128^2)")
    p.add_argument("--pairs", nargs="+", default=None, help="only these pair ids (default: the whole split)")
    p.add_argument("--data-dir", default=None, help="override the dataset folder saved in the run config")
    p.add_argument("--label-dir", default=None, help="override the tissue label folder saved in the run config")
    p.add_argument("--no-figure", action="store_true", help="skip the Fig. 2 scatter plot")
    return p


def load_dataset(config: dict, data_dir: Optional[str] = None, label_dir: Optional[str] = None):
    """Rebuild the dataset a run was trained on (optionally with moved folders)."""
    import datasets

    opts = dict(config["data"])
    if data_dir is not None:
        opts["data_dir"] = data_dir
    if label_dir is not None:
        opts["label_dir"] = label_dir
    name = opts.pop("name")
    return datasets.get_dataset(name, **opts)


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = build_parser().parse_args(argv)
    import pandas as pd

    from hypermorph_spatially_adaptive import identification as ident
    from hypermorph_spatially_adaptive import runio
    from hypermorph_spatially_adaptive.registration import Registrar

    model, config = runio.load_run(args.run, expect_sa=False)
    regularizer = config["model"]["regularizer"]
    class_names = list(config["class_names"])
    dataset = load_dataset(config, args.data_dir, args.label_dir)
    runio.check_compatible(args.run, config, dataset)
    ids = dataset.split_ids(args.split)
    if args.pairs:
        unknown = [p for p in args.pairs if p not in ids]
        if unknown:
            raise ValueError(f"pair id(s) {unknown} are not in the {args.split} split of {dataset.name}")
        ids = list(args.pairs)
    values = args.grid if args.grid is not None else ident.grid_values(args.grid_steps)
    grid = ident.make_grid(regularizer, values)
    out = args.out or os.path.join(args.run, "identification")
    os.makedirs(out, exist_ok=True)

    registrar = Registrar(model, batch_size=args.batch_size or None)
    print(f"[identify {regularizer}] {len(ids)} {args.split} pairs x {len(grid)} grid points "
          f"({len(values)} values per axis) with {args.run}", flush=True)
    t0 = time.time()
    tables = []
    for k, pid in enumerate(ids, 1):
        pair = dataset.load_pair(pid)
        tables.append(ident.grid_dice(registrar, pair, grid, class_names))
        best = tables[-1]["mean_dice"].max()
        print(f"[identify {regularizer}] {k}/{len(ids)} {pid}: best mean Dice {best:.3f} "
              f"({(time.time() - t0) / k:.2f} s/pair)", flush=True)
    grid_df = pd.concat(tables, ignore_index=True)
    choice = ident.choose_parameters(grid_df, regularizer, class_names)
    choice.insert(1, "regularizer", regularizer)
    seconds = time.time() - t0

    runio.atomic_to_csv(grid_df, os.path.join(out, "grid_dice.csv"))
    runio.atomic_to_csv(choice, os.path.join(out, "identified_parameters.csv"))
    meta = {"global_run": os.path.abspath(args.run), "regularizer": regularizer, "class_names": class_names,
            "data": config["data"], "split": args.split, "grid_values": [float(v) for v in values],
            "n_grid_points": int(len(grid)), "pairs": ids,
            "tie_rule": "equal Dice -> larger regularization: larger lambda+mu (diffusion: weight), "
                        "then larger mu, then larger lambda; background and -g use the best mean Dice",
            "seconds": round(seconds, 2), "seconds_per_pair": round(seconds / max(len(ids), 1), 3),
            "command": [os.path.basename(sys.argv[0])] + list(argv if argv is not None else sys.argv[1:])}
    runio.atomic_write_text(os.path.join(out, "identification.json"), json.dumps(meta, indent=2))
    if not args.no_figure:
        from hypermorph_spatially_adaptive import figures

        figures.plot_parameter_scatter(choice, class_names, regularizer, os.path.join(out, "fig2_parameters.png"))
    print(f"[identify {regularizer}] done in {seconds:.1f} s -> {out}/identified_parameters.csv", flush=True)
    return out


if __name__ == "__main__":
    main()
