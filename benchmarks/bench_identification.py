"""Benchmark: seconds per test pair for the grid search (batched vs one-by-one) and inference.

Measured in one process on the same pair, so the ratio is robust to a noisy machine:

- grid search, batched:     all grid points of the pair in chunked calls of one compiled function
- grid search, one-by-one:  the same compiled function called once per grid point
- grid search, predict loop: ``model.predict`` once per grid point (the naive way)
- SA inference:             one forward pass of the spatially adaptive model per pair

Each includes the Dice computation per grid point (as parameter_identification.py does).
Weights are random (speed does not depend on them) unless ``--run`` names a trained global run.

``--compare-gradient`` (needs trained ``--run`` GLOBAL and ``--sa-run`` SA runs of the same data)
instead compares, per test pair and in one process, the two ways to choose the SA model's
parameters (paper sec. 2.2 and docs/extensions.md "Gradient identification"):

- grid proxy:  all grid points through the global model + hard Dice per point + per-class choice
  (``grid points`` forward passes), the choice handed to the SA model;
- gradient:    Adam on the SA model's own hyperparameters from 0.5 (``--steps`` forward +
  backward passes at most, early stop on a plateau);
- grid + gradient: the gradient method started at the grid proxy's choice (costs both).

Reported per pair: identification seconds (compiled functions traced beforehand on the first
pair; tracing reported separately), passes, and the hard mean Dice of the SA registration with
each method's parameters (nearest-neighbour label warp, eval_metrics). With ``--objective epe``
the gradient methods minimize the end-point error against the true field (synthetic data) and
the Spearman correlation between identified and true per-tissue stiffness is summarized.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.atomic import atomic_write  # noqa: E402
from hypermorph_spatially_adaptive import artifacts as art  # noqa: E402
from hypermorph_spatially_adaptive import run_folder  # noqa: E402
from hypermorph_spatially_adaptive.forward import Registrar  # noqa: E402
from hypermorph_spatially_adaptive.params import ParamSpec  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """Options of the speed benchmark and of the ``--compare-gradient`` mode."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", type=int, nargs="+", default=[128, 128], help="image size (2D or 3D)")
    p.add_argument("--grid-steps", type=int, default=11, help="grid values per axis (elastic: steps^2 points)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--run", default=None, help="optional trained global elastic run folder")
    p.add_argument("--skip-predict", action="store_true", help="skip the slow model.predict loop")
    p.add_argument("--chunks", type=int, nargs="*", default=[8, 32],
                   help="extra chunk sizes (grid points per call) to time besides auto and 1")
    g = p.add_argument_group("--compare-gradient mode")
    g.add_argument("--compare-gradient", action="store_true",
                   help="grid proxy vs gradient identification on real pairs (needs --run and --sa-run)")
    g.add_argument("--sa-run", default=None, help="trained SA run folder (same regularizer and data as --run)")
    g.add_argument("--split", default="test", choices=["train", "val", "test"], help="pairs to use")
    g.add_argument("--num-pairs", type=int, default=0, help="first N pairs of the split (0: all)")
    g.add_argument("--steps", type=int, default=50, help="gradient: maximum Adam steps")
    g.add_argument("--lr", type=float, default=0.05, help="gradient: Adam learning rate on z = logit(h)")
    g.add_argument("--patience", type=int, default=10, help="gradient: plateau patience (0: never stop early)")
    g.add_argument("--objective", default="dice", choices=["dice", "epe"], help="gradient objective")
    g.add_argument("--csv", default=None, help="also write the per-pair table here")
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.compare_gradient:
        return compare_gradient(args)
    _print_speed(args, _time_grid_search(args))


def _speed_models(args) -> tuple:
    """``(global elastic model, SA elastic model, image shape)``: the ``--run`` model and its
    shape, else a random-weight global model of ``--size``; the SA model has random weights
    (3 tissue classes)."""
    from hypermorph_spatially_adaptive.models import ModelConfig, build_model

    shape = tuple(args.size)
    if args.run:
        g_model, cfg = run_folder.load_run(args.run, expect_sa=False)
        shape = tuple(cfg["model"]["image_shape"])
    else:
        g_model = build_model(ModelConfig(shape, "elastic", False, 3))
    sa_model = build_model(ModelConfig(shape, "elastic", True, 3))
    return g_model, sa_model, shape


def _time_grid_search(args) -> dict:
    """Median seconds per pair of every grid-search variant and of SA inference on one random
    pair (random weights unless ``--run``); keys ``shape``, ``n_grid``, ``batch_size``,
    ``batched``, ``single``, ``chunks`` ({chunk size: s}), ``predict`` (NaN if skipped), ``sa``."""
    import eval_metrics
    from hypermorph_spatially_adaptive import grid_identification as ident

    g_model, sa_model, shape = _speed_models(args)
    rng = np.random.default_rng(0)
    moving = rng.random((*shape, 1)).astype(np.float32)
    fixed = rng.random((*shape, 1)).astype(np.float32)
    mseg = rng.integers(0, 4, shape).astype(np.int32)
    fseg = rng.integers(0, 4, shape).astype(np.int32)
    grid = ident.make_grid("elastic", ident.grid_values(args.grid_steps))

    def dice_all(disp):
        for d in disp:
            eval_metrics.dice_per_class(fseg, eval_metrics.warp_labels(mseg, d), 3)

    batched, single = Registrar(g_model), Registrar(g_model, batch_size=1)

    def run_batched():
        dice_all(batched(moving, fixed, grid)[1])

    def run_single():
        dice_all(single(moving, fixed, grid)[1])

    def run_predict():
        out = [g_model.predict([moving[None], fixed[None], grid[k:k + 1]], verbose=0)[1][0] for k in range(len(grid))]
        dice_all(out)

    sa = Registrar(sa_model)
    hyp = rng.random((1, 8)).astype(np.float32)

    def run_sa():
        sa(moving, fixed, hyp)

    def timeit(fn):
        fn()  # warm-up: tracing
        ts = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return float(np.median(ts))

    t_b = timeit(run_batched)
    t_s = timeit(run_single)
    t_chunks = {}
    for c in args.chunks:
        reg = Registrar(g_model, batch_size=c)
        t_chunks[c] = timeit(lambda: dice_all(reg(moving, fixed, grid)[1]))
    t_p = float("nan") if args.skip_predict else timeit(run_predict)
    t_sa = timeit(run_sa)
    return {"shape": shape, "n_grid": len(grid), "batch_size": batched.batch_size, "batched": t_b,
            "single": t_s, "chunks": t_chunks, "predict": t_p, "sa": t_sa}


def _print_speed(args, t: dict) -> None:
    """The speed table of :func:`_time_grid_search`'s result ``t``."""
    shape, t_b, t_s, t_p, t_sa = t["shape"], t["batched"], t["single"], t["predict"], t["sa"]
    print(f"grid search, image {shape}, {t['n_grid']} grid points, one pair (median of {args.repeats}):")
    print(f"  batched (chunks of {t['batch_size'] or 'auto'})  {t_b:8.2f} s/pair")
    print(f"  one-by-one compiled calls        {t_s:8.2f} s/pair   ratio one-by-one/batched {t_s / t_b:5.2f}")
    for c, tc in t["chunks"].items():
        print(f"  chunks of {c:<3d} grid points         {tc:8.2f} s/pair   ratio chunked/batched    {tc / t_b:5.2f}")
    print(f"  model.predict loop               {t_p:8.2f} s/pair   ratio predict/batched    {t_p / t_b:5.2f}")
    print(f"SA inference (one forward pass)    {t_sa:8.3f} s/pair")


def compare_gradient(args) -> None:
    """Grid proxy vs gradient identification per pair (see the module docstring)."""
    import pandas as pd

    import eval_metrics
    from hypermorph_spatially_adaptive import gradient_identification as gid
    from hypermorph_spatially_adaptive import grid_identification as ident

    g_model, sa_model, g_cfg, dataset, pairs = _load_compare_runs(args)
    reg = g_cfg["model"]["regularizer"]
    classes = list(g_cfg["class_names"])
    C = len(classes)
    sa_names = ParamSpec(reg, True, C).names(classes)
    grid = ident.make_grid(reg, ident.grid_values(args.grid_steps))
    g_reg, sa_reg = Registrar(g_model), Registrar(sa_model)

    def sa_dice(pair, h):
        _, disp = sa_reg(pair.moving, pair.fixed, np.asarray(h, np.float32)[None])
        return eval_metrics.mean_dice(pair.fixed_seg, eval_metrics.warp_labels(pair.moving_seg, disp[0]), C)

    def grid_proxy(pair):
        df = ident.grid_dice(g_reg, pair, grid, classes)
        return ident.choose_parameters(df, reg, classes).iloc[0][sa_names].to_numpy(np.float64)

    def gradient(pair, h0):
        truth = pair.extras["disp_true"][None] if args.objective == "epe" else None
        return gid.identify_by_gradient(sa_model, pair.moving[None], pair.fixed[None], pair.fixed_seg[None],
                                        pair.moving_seg[None], h0=h0, steps=args.steps, lr=args.lr,
                                        patience=args.patience, objective=args.objective, disp_true=truth,
                                        spacing=pair.spacing, num_classes=C)

    t = time.perf_counter()
    grid_proxy(pairs[0])
    t_trace_grid = time.perf_counter() - t
    t = time.perf_counter()
    gradient(pairs[0], None)
    t_trace_grad = time.perf_counter() - t
    sa_dice(pairs[0], np.full(len(sa_names), 0.5))
    print(f"[bench] {len(pairs)} {args.split} pairs of {dataset.name} {dataset.image_shape}, {reg}; grid "
          f"{len(grid)} points; gradient <= {args.steps} steps, lr {args.lr}, patience {args.patience}, "
          f"objective {args.objective}; first calls (tracing + one run): grid {t_trace_grid:.1f} s, "
          f"gradient {t_trace_grad:.1f} s", flush=True)
    rows = [_compare_pair(pair, len(grid), grid_proxy, gradient, sa_dice, classes, reg, args.objective)
            for pair in pairs]
    df = pd.DataFrame(rows)
    if args.csv:
        atomic_write(args.csv, df)
    _print_comparison(df, len(grid), classes, args.objective)


def _load_compare_runs(args) -> tuple:
    """``(global model, SA model, global run config, dataset, pairs)`` of ``--run`` /
    ``--sa-run`` (same regularizer and data, else SystemExit) and the first ``--num-pairs``
    pairs of ``--split``."""
    if not (args.run and args.sa_run):
        raise SystemExit("--compare-gradient needs --run (global) and --sa-run (SA)")
    g_model, g_cfg = run_folder.load_run(args.run, expect_sa=False)
    reg = g_cfg["model"]["regularizer"]
    sa_model, sa_cfg = run_folder.load_run(args.sa_run, expect_regularizer=reg, expect_sa=True)
    if sa_cfg["data"] != g_cfg["data"]:
        raise SystemExit(f"{args.run} and {args.sa_run} were trained on different data")
    dataset = art.load_dataset(g_cfg)
    ids = dataset.split_ids(args.split)
    ids = ids[: args.num_pairs] if args.num_pairs else ids
    pairs = [dataset.load_pair(i) for i in ids]
    return g_model, sa_model, g_cfg, dataset, pairs


def _compare_pair(pair, n_grid: int, grid_proxy, gradient, sa_dice, classes: list, reg: str,
                  objective: str) -> dict:
    """One pair of ``--compare-gradient``: grid proxy, gradient from 0.5 and gradient from the
    grid's choice, timed; prints one line and returns the CSV row (SA hard mean Dice of each
    choice, passes, objective values; with ``objective`` epe the Spearman rho of mu)."""
    from hypermorph_spatially_adaptive import tables

    t = time.perf_counter()
    h_grid = grid_proxy(pair)
    t_grid = time.perf_counter() - t
    res = gradient(pair, None)
    res_ref = gradient(pair, h_grid[None])
    row = {"pair_id": pair.pair_id, "grid_s": t_grid, "grid_passes": n_grid, "grid_dice": sa_dice(pair, h_grid),
           "grad_s": res.seconds, "grad_passes": int(res.steps[0]), "grad_dice": sa_dice(pair, res.h[0]),
           "grad_obj_start": res.start[0], "grad_obj_best": res.best[0],
           "refine_s": t_grid + res_ref.seconds, "refine_passes": f"{n_grid}+{int(res_ref.steps[0])}",
           "refine_dice": sa_dice(pair, res_ref.h[0])}
    if objective == "epe":
        for name, h in (("grid", h_grid), ("grad", res.h[0]), ("refine", res_ref.h[0])):
            rho = tables.stiffness_order_summary([pair], h[None], classes, reg == "elastic")
            row[f"{name}_rho_mu"] = rho[pair.pair_id]["mu"] if rho else float("nan")
    print(f"  {pair.pair_id}: grid {t_grid:6.2f} s {n_grid:4d} fwd  Dice {row['grid_dice']:.4f} | gradient "
          f"{res.seconds:6.2f} s {row['grad_passes']:3d} fwd+bwd Dice {row['grad_dice']:.4f} "
          f"(obj {res.start[0]:.4f} -> {res.best[0]:.4f}) | grid+gradient {row['refine_s']:6.2f} s "
          f"Dice {row['refine_dice']:.4f}", flush=True)
    return row


def _print_comparison(df, n_grid: int, classes: list, objective: str) -> None:
    """Summary of the per-pair table ``df`` of ``--compare-gradient`` (means, goal check,
    with ``objective`` epe the stiffness order)."""
    ratio = df["grad_s"].mean() / df["grid_s"].mean()
    print(f"\nmean over {len(df)} pairs (SA hard mean Dice; seconds per pair, tracing excluded):")
    print(f"  {'method':16s} {'seconds':>8s} {'passes':>14s} {'SA mean Dice':>13s}")
    print(f"  {'grid proxy':16s} {df.grid_s.mean():8.2f} {n_grid:>10d} fwd {df.grid_dice.mean():13.4f}")
    print(f"  {'gradient':16s} {df.grad_s.mean():8.2f} {df.grad_passes.mean():>6.1f} fwd+bwd {df.grad_dice.mean():13.4f}")
    extra = df.refine_passes.str.split("+").str[1].astype(int).mean()
    print(f"  {'grid + gradient':16s} {df.refine_s.mean():8.2f} {f'{n_grid} + {extra:.1f}':>14s} "
          f"{df.refine_dice.mean():13.4f}")
    diff = (df.grad_dice - df.grid_dice).to_numpy()
    print(f"  gradient - grid Dice per pair: mean {diff.mean():+.4f}, gradient >= grid in "
          f"{int((diff >= 0).sum())}/{len(diff)} pairs; time ratio gradient/grid {ratio:.3f}")
    goal = df.grad_dice.mean() >= df.grid_dice.mean() and ratio <= 0.2
    print(f"  goal (gradient Dice >= grid Dice in <= 1/5 of the grid's time): {'met' if goal else 'NOT met'}")
    if objective == "epe":
        for name in ("grid", "grad", "refine"):
            v = df[f"{name}_rho_mu"].to_numpy(float)
            v = v[np.isfinite(v)]
            print(f"  stiffness order, Spearman(identified mu, true mu) over {classes}, {name:6s}: "
                  f"mean {v.mean():+.3f}, median {np.median(v):+.3f}, rho = 1 in {int((v > 0.999).sum())}/{v.size}"
                  if v.size else f"  {name}: no finite Spearman")


if __name__ == "__main__":
    main()
