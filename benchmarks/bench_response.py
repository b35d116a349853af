"""Diagnostic: how much do trained models respond to their hyperparameters?

Identification (grid or gradient) can only matter if a model's displacement changes with its
hyperparameter input. For every run folder this prints, over the first ``--num-pairs`` pairs
of a split (mean over pairs, in voxels):

- ``|u|``: mean displacement magnitude at h = 0.5 (every entry of the hyperparameter vector);
- ``|u(0) - u(1)|``: mean change between all-zero and all-one hyperparameters (weakest vs
  strongest regularization; at h = 1 the paper's loss has no similarity term at all, so a
  model that learned the loss returns a near-zero field there);
- ``|u(0.5) - u(0.5 +- 0.1)|``: local response around the middle of the box;
- SA models, per class c: ``|u(c at 0) - u(c at 1)|`` inside class c with the others at 0.5.

With ``--pipeline OUT`` (a ``run_pipeline.py`` output folder) it reads the four runs and adds
the spread of the grid search's mean Dice over its grid points per pair (max - min, from
``identification/<reg>/grid_dice.csv``): a spread near 0 means the identified parameters are
chosen among registrations that do not differ.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hypermorph_spatially_adaptive  # noqa: E402,F401

PRESETS = ["elastic_global", "elastic_sa", "diffusion_global", "diffusion_sa"]


def response(run: str, split: str = "test", num_pairs: int = 3) -> Dict[str, float]:
    """Displacement response of the model in ``run`` to its hyperparameters (voxels)."""
    from hypermorph_spatially_adaptive import runio
    from hypermorph_spatially_adaptive.artifacts import load_dataset
    from hypermorph_spatially_adaptive.registration import Registrar

    model, config = runio.load_run(run)
    sa, num_classes = bool(config["model"]["spatially_adaptive"]), int(config["model"]["num_classes"])
    pairs = list(itertools.islice(load_dataset(config).pairs(split), num_pairs))
    if not pairs:
        raise ValueError(f"{run}: the {split} split is empty")
    reg = Registrar(model)
    P = reg.num_params
    k = num_classes + 1 if sa else 1
    rows: List[Dict[str, float]] = []
    for pair in pairs:
        moving, fixed = pair.moving, pair.fixed  # [*spatial, 1]
        hyp = [np.zeros(P), np.ones(P), np.full(P, 0.5), np.full(P, 0.4), np.full(P, 0.6)]
        if sa:  # class c (all its fields) at 0 and at 1, the others at 0.5
            for c in range(k):
                for v in (0.0, 1.0):
                    h = np.full(P, 0.5)
                    h[c::k] = v
                    hyp.append(h)
        _, disp = reg(moving, fixed, np.asarray(hyp, np.float32))
        mag = lambda d: float(np.linalg.norm(d, axis=-1).mean())  # noqa: E731
        row = {"|u|": mag(disp[2]), "|u(0)-u(1)|": mag(disp[0] - disp[1]),
               "|u(.5)-u(.5+-.1)|": 0.5 * (mag(disp[2] - disp[3]) + mag(disp[2] - disp[4]))}
        if sa:
            seg = np.asarray(pair.fixed_seg)
            for c in range(k):
                d = np.linalg.norm(disp[5 + 2 * c] - disp[6 + 2 * c], axis=-1)
                row[f"class {c}"] = float(d[seg == c].mean()) if np.any(seg == c) else float("nan")
        rows.append(row)
    keys = rows[0].keys()
    return {key: float(np.mean([r[key] for r in rows])) for key in keys}


def grid_spread(ident_dir: str) -> Optional[float]:
    """Mean over pairs of (max - min) mean Dice over the grid points, or None without a grid."""
    import pandas as pd

    path = os.path.join(ident_dir, "grid_dice.csv")
    if not os.path.isfile(path):
        return None
    g = pd.read_csv(path).groupby("pair_id")["mean_dice"]
    return float((g.max() - g.min()).mean())


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="*", help="run folders (trained with any of the four presets)")
    p.add_argument("--pipeline", default=None,
                   help="a run_pipeline.py --out folder: use its four runs and its grid_dice.csv files")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="pairs to use")
    p.add_argument("--num-pairs", type=int, default=3, help="first N pairs of the split")
    args = p.parse_args(argv)
    runs = list(args.runs)
    if args.pipeline:
        runs += [os.path.join(args.pipeline, "runs", q) for q in PRESETS]
    if not runs:
        p.error("give run folders or --pipeline OUT")
    print(f"hyperparameter response, mean over the first {args.num_pairs} {args.split} pairs (voxels)")
    for run in runs:
        r = response(run, args.split, args.num_pairs)
        line = "  ".join(f"{key} {val:.4f}" for key, val in r.items())
        print(f"{run}: {line}", flush=True)
    if args.pipeline:
        for reg in ("elastic", "diffusion"):
            s = grid_spread(os.path.join(args.pipeline, "identification", reg))
            if s is not None:
                print(f"{reg} grid search: mean over pairs of (max - min) mean Dice over the grid = {s:.4f}")


if __name__ == "__main__":
    main()
