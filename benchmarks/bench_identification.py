"""Benchmark: seconds per test pair for the grid search (batched vs one-by-one) and inference.

Measured in one process on the same pair, so the ratio is robust to a noisy machine:

- grid search, batched:     all grid points of the pair in chunked calls of one compiled function
- grid search, one-by-one:  the same compiled function called once per grid point
- grid search, predict loop: ``model.predict`` once per grid point (the naive way)
- SA inference:             one forward pass of the spatially adaptive model per pair

Each includes the Dice computation per grid point (as parameter_identification.py does).
Weights are random (speed does not depend on them) unless ``--run`` names a trained global run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hypermorph_spatially_adaptive  # noqa: E402,F401


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", type=int, nargs="+", default=[128, 128], help="image size (2D or 3D)")
    p.add_argument("--grid-steps", type=int, default=11, help="grid values per axis (elastic: steps^2 points)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--run", default=None, help="optional trained global elastic run folder")
    p.add_argument("--skip-predict", action="store_true", help="skip the slow model.predict loop")
    p.add_argument("--chunks", type=int, nargs="*", default=[8, 32],
                   help="extra chunk sizes (grid points per call) to time besides auto and 1")
    args = p.parse_args(argv)

    import numpy as np

    import eval_metrics
    from hypermorph_spatially_adaptive import identification as ident
    from hypermorph_spatially_adaptive import runio
    from hypermorph_spatially_adaptive.models import ModelConfig, build_model
    from hypermorph_spatially_adaptive.registration import Registrar

    shape = tuple(args.size)
    if args.run:
        g_model, cfg = runio.load_run(args.run, expect_sa=False)
        shape = tuple(cfg["model"]["image_shape"])
    else:
        g_model = build_model(ModelConfig(shape, "elastic", False, 3))
    sa_model = build_model(ModelConfig(shape, "elastic", True, 3))
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
    print(f"grid search, image {shape}, {len(grid)} grid points, one pair (median of {args.repeats}):")
    print(f"  batched (chunks of {batched.batch_size or 'auto'})  {t_b:8.2f} s/pair")
    print(f"  one-by-one compiled calls        {t_s:8.2f} s/pair   ratio one-by-one/batched {t_s / t_b:5.2f}")
    for c, t in t_chunks.items():
        print(f"  chunks of {c:<3d} grid points         {t:8.2f} s/pair   ratio chunked/batched    {t / t_b:5.2f}")
    print(f"  model.predict loop               {t_p:8.2f} s/pair   ratio predict/batched    {t_p / t_b:5.2f}")
    print(f"SA inference (one forward pass)    {t_sa:8.3f} s/pair")


if __name__ == "__main__":
    main()
