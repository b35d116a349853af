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
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hypermorph_spatially_adaptive  # noqa: E402,F401
from datasets.atomic import atomic_write  # noqa: E402
from hypermorph_spatially_adaptive import artifacts as art  # noqa: E402
from hypermorph_spatially_adaptive import run_folder  # noqa: E402
from hypermorph_spatially_adaptive.forward import Registrar  # noqa: E402

PRESETS = ["elastic_global", "elastic_sa", "diffusion_global", "diffusion_sa"]


def response(run: str, split: str = "test", num_pairs: int = 3) -> Dict[str, float]:
    """Displacement response of the model in ``run`` to its hyperparameters (voxels)."""
    model, config = run_folder.load_run(run)
    sa, num_classes = bool(config["model"]["spatially_adaptive"]), int(config["model"]["num_classes"])
    pairs = list(itertools.islice(art.load_dataset(config).pairs(split), num_pairs))
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
        _, disp = reg(moving, fixed, np.asarray(hyp, np.float32), pair.fixed_seg)
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


def _axes(config: Dict) -> List[Tuple[str, List[int], Optional[int]]]:
    """Axes of the response curves: ``(name, indices of hyp that vary, class whose voxels count or None)``.

    Every model gets ``all`` (every entry together); elastic global models ``lambda`` and ``mu``;
    SA models every field of every class (``lambda_lung``, ``mu_bone``, ...), measured inside
    that class.
    """
    names = list(config["hyperparameters"])
    sa = bool(config["model"]["spatially_adaptive"])
    axes: List[Tuple[str, List[int], Optional[int]]] = [("all", list(range(len(names))), None)]
    if len(names) == 1:
        return axes
    k = int(config["model"]["num_classes"]) + 1 if sa else 1
    for i, name in enumerate(names):
        axes.append((name, [i], (i % k) if sa else None))
    return axes


def response_curves(run: str, split: str = "test", num_pairs: int = 3, steps: int = 11,
                    rest: float = 0.5) -> "pd.DataFrame":
    """Response curves of the model in ``run`` along each axis of its hyperparameter box.

    Along each axis of :func:`_axes` the varying entries take ``steps`` evenly spaced values in
    [0, 1] and the others stay at ``rest``. Per pair and value: mean |u| (voxels, inside the
    axis' class for SA per-class axes), the change to the previous value (mean |u(h_k) -
    u(h_k-1)|, same region) and the mean Dice (nearest-neighbour warped moving labels against
    the fixed labels). Returns one row per axis and value, averaged over the pairs: columns
    ``run, preset, axis, h, mean_u, step_change, dice``.
    """
    import pandas as pd

    import eval_metrics

    model, config = run_folder.load_run(run)
    pairs = list(itertools.islice(art.load_dataset(config).pairs(split), num_pairs))
    if not pairs:
        raise ValueError(f"{run}: the {split} split is empty")
    reg, axes, hs = Registrar(model), _axes(config), np.linspace(0.0, 1.0, steps)
    num_classes = int(config["model"]["num_classes"])
    rows = []
    for pair in pairs:
        hyp = []
        for _, idx, _ in axes:
            for h in hs:
                v = np.full(reg.num_params, rest)
                v[idx] = h
                hyp.append(v)
        _, disp = reg(pair.moving, pair.fixed, np.asarray(hyp, np.float32), pair.fixed_seg)
        disp = disp.reshape(len(axes), steps, *disp.shape[1:])
        seg = np.asarray(pair.fixed_seg)
        for a, (name, _, cls) in enumerate(axes):
            mask = np.ones(seg.shape, bool) if cls is None else seg == cls
            if not mask.any():
                continue
            mag = np.linalg.norm(disp[a], axis=-1)[:, mask].mean(axis=1)
            change = np.linalg.norm(np.diff(disp[a], axis=0), axis=-1)[:, mask].mean(axis=1)
            for j, h in enumerate(hs):
                dice = eval_metrics.mean_dice(eval_metrics.warp_labels(pair.moving_seg, disp[a, j]), seg, num_classes)
                rows.append({"pair_id": pair.pair_id, "axis": name, "h": float(h), "mean_u": float(mag[j]),
                             "step_change": float(change[j - 1]) if j else float("nan"), "dice": dice})
    df = pd.DataFrame(rows).groupby(["axis", "h"], sort=False).mean(numeric_only=True).reset_index()
    df.insert(0, "preset", config["preset"])
    df.insert(0, "run", run)
    return df


def summarize_curves(curves: "pd.DataFrame", tol: float = 0.02) -> "pd.DataFrame":
    """Per run and axis: ``change_01`` (|u| at h = 0 minus at h = 1, voxels), ``rel_change``
    (that over mean |u| at h = 0.5 of the ``all`` axis), ``monotone`` (mean |u| never rises by more
    than ``tol`` x its value at h = 0 from one value to the next) and ``dice_spread`` (max - min
    mean Dice along the axis)."""
    import pandas as pd

    out = []
    for (run, axis), c in curves.groupby(["run", "axis"], sort=False):
        u = c["mean_u"].to_numpy()
        mid = curves[(curves.run == run) & (curves.axis == "all")]
        u_mid = float(np.interp(0.5, mid["h"], mid["mean_u"]))
        out.append({"run": run, "preset": c["preset"].iloc[0], "axis": axis, "u_at_0": u[0], "u_at_1": u[-1],
                    "change_01": u[0] - u[-1], "rel_change": (u[0] - u[-1]) / max(u_mid, 1e-9),
                    "monotone": bool(np.all(np.diff(u) <= tol * max(u[0], 1e-9))),
                    "dice_spread": float(c["dice"].max() - c["dice"].min())})
    return pd.DataFrame(out)


def interior_fraction(ident_dir: str) -> Optional[float]:
    """Fraction of pairs whose identified global parameters (``g_lambda``, ``g_mu``: the grid's
    choice for the -g row) all lie strictly inside (0, 1), or None."""
    import pandas as pd

    path = os.path.join(ident_dir, art.IDENTIFIED_PARAMETERS)
    if not os.path.isfile(path):
        return None
    df = pd.read_csv(path)
    cols = [c for c in ("g_lambda", "g_mu") if c in df.columns] or [c for c in ("lambda", "mu") if c in df.columns]
    if not cols:
        return None
    vals = df[cols].to_numpy(float)
    return float(np.mean(np.all((vals > 1e-6) & (vals < 1 - 1e-6), axis=1)))


def grid_spread(ident_dir: str) -> Optional[float]:
    """Mean over pairs of (max - min) mean Dice over the grid points, or None without a grid."""
    import pandas as pd

    path = os.path.join(ident_dir, art.GRID_DICE)
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
    p.add_argument("--curves", type=int, default=0, metavar="STEPS",
                   help="also the response curves along every axis with STEPS values per axis (e.g. 11): "
                        "table, CSV and figure")
    p.add_argument("--out", default=os.path.join("outputs", "bench_response"),
                   help="folder for response_curves.csv, response_summary.csv and response_curves.png (--curves)")
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
            s = grid_spread(os.path.join(args.pipeline, art.IDENTIFICATION_DIRS["oracle"], reg))
            if s is not None:
                print(f"{reg} grid search: mean over pairs of (max - min) mean Dice over the grid = {s:.4f}")
            for protocol in (art.IDENTIFICATION_DIRS["oracle"], art.IDENTIFICATION_DIRS["population"]):
                f = interior_fraction(os.path.join(args.pipeline, protocol, reg))
                if f is not None:
                    print(f"{reg} {protocol}: fraction of pairs whose -g parameters lie inside the box: {f:.2f}")
    if args.curves:
        _write_curves(runs, args)


def _write_curves(runs: Sequence[str], args) -> None:
    import pandas as pd

    from hypermorph_spatially_adaptive.figures import plot_response_curves

    curves = pd.concat([response_curves(r, args.split, args.num_pairs, args.curves) for r in runs], ignore_index=True)
    summary = summarize_curves(curves)
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print("\nresponse along each axis (others at 0.5; mean |u| in voxels, Dice = mean Dice):")
        print(summary.drop(columns=["run"]).round(4).to_string(index=False))
    os.makedirs(args.out, exist_ok=True)
    atomic_write(os.path.join(args.out, "response_curves.csv"), curves)
    atomic_write(os.path.join(args.out, "response_summary.csv"), summary)
    png = plot_response_curves(curves, os.path.join(args.out, "response_curves.png"))
    print(f"wrote {args.out}/response_curves.csv, response_summary.csv, {os.path.basename(png)}")


if __name__ == "__main__":
    main()
