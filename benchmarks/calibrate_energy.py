"""Propose the energy scale K (``--energy-scale``) for a dataset, and show what K does at the box centre.

For the first ``--max-pairs`` pairs of a split it takes a reference displacement (the true one
of synthetic data, ``--reference true``; or, on any data, the field of a trained model at
all-zero hyperparameters, ``--run RUN``), evaluates the loss at the centre of the
hyperparameter box along ``a * u_ref`` and prints, per regularizer:

- the ratio of the energy of ``u_ref`` to its weighted similarity gain (K = 1, median over pairs);
- the optimal amplitude ``a*(K)`` for each candidate K (median and quartiles over pairs);
- the K that puts ``a*`` at ``--target`` (median over pairs, with quartiles).

Method and formulas: :mod:`hypermorph_spatially_adaptive.calibration`. Examples::

    python benchmarks/calibrate_energy.py                              # the demo's synthetic data
    python benchmarks/calibrate_energy.py --dataset folder --pairs-csv my_pairs.csv --run runs/elastic_global
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
import hypermorph_spatially_adaptive  # noqa: E402,F401
from datasets.atomic import atomic_write  # noqa: E402
from hypermorph_spatially_adaptive import artifacts as art  # noqa: E402
from hypermorph_spatially_adaptive import run_folder  # noqa: E402
from hypermorph_spatially_adaptive.calibration import amplitude_curves, propose_energy_scale  # noqa: E402
from hypermorph_spatially_adaptive.forward import Registrar  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    datasets.add_dataset_args(p)
    p.set_defaults(num_pairs=60)  # synthetic: the demo's 60 pairs (run_pipeline.py), so its cache is reused
    g = p.add_argument_group("calibration")
    g.add_argument("--run", default=None,
                   help="trained run folder: its dataset (the dataset options are then ignored) and its field at "
                        "all-zero hyperparameters as the reference (needed on data without a true displacement)")
    g.add_argument("--reference", choices=["auto", "true", "run"], default="auto",
                   help="reference displacement: the dataset's true one, the --run model's, or auto (true if the "
                        "pairs have one, else --run)")
    g.add_argument("--split", choices=["train", "val", "test"], default="train", help="pairs to calibrate on")
    g.add_argument("--max-pairs", type=int, default=30, help="first N pairs of the split")
    g.add_argument("--center", type=float, default=0.5, help="hyperparameter value (every entry) calibrated")
    g.add_argument("--target", type=float, default=0.5,
                   help="optimal amplitude of the reference field wanted at the centre of the box")
    g.add_argument("--candidates", type=float, nargs="+", default=[1, 3, 10, 30, 100, 300],
                   help="K values whose optimal amplitude is printed")
    g.add_argument("--ncc-win", type=int, default=9, help="NCC window of the loss (the run's if --run)")
    g.add_argument("--csv", default=None, help="write the per-pair curves' summary to this CSV")
    return p


def _pairs_and_reference(args):
    """``(dataset pairs, reference displacements [N, *s, D], source label, spacing, ncc window)``."""
    if args.run:
        config = art.read_config(args.run)
        dataset = art.load_dataset(config)
        win = int(config.get("loss", {}).get("ncc_win", args.ncc_win))
    else:
        dataset, win = datasets.dataset_from_args(args), args.ncc_win
    pairs = list(itertools.islice(dataset.pairs(args.split), args.max_pairs))
    if not pairs:
        raise ValueError(f"the {args.split} split is empty")
    has_true = all("disp_true" in p.extras for p in pairs)
    source = args.reference if args.reference != "auto" else ("true" if has_true else "run")
    if source == "true":
        if not has_true:
            raise ValueError("--reference true: the pairs have no true displacement (synthetic data only); "
                             "give a trained --run")
        ref = np.stack([p.extras["disp_true"] for p in pairs]).astype(np.float32)
    else:
        if not args.run:
            raise ValueError("these pairs have no true displacement: give a trained --run whose field at all-zero "
                             "hyperparameters serves as the reference")

        model, _ = run_folder.load_run(args.run)
        reg = Registrar(model)
        moving = np.stack([p.moving for p in pairs])
        fixed = np.stack([p.fixed for p in pairs])
        _, ref = reg(moving, fixed, np.zeros((len(pairs), reg.num_params), np.float32),
                     np.stack([p.fixed_seg for p in pairs]))
        source = f"run {args.run} at h = 0"
    return pairs, ref, source, [float(s) for s in pairs[0].spacing], win


def main(argv: Optional[Sequence[str]] = None) -> None:
    import pandas as pd

    args = build_parser().parse_args(argv)
    pairs, ref, source, spacing, win = _pairs_and_reference(args)
    moving = np.stack([p.moving for p in pairs])
    fixed = np.stack([p.fixed for p in pairs])
    print(f"{len(pairs)} {args.split} pairs, reference: {source}, box centre h = {args.center}, "
          f"mean |u_ref| {float(np.linalg.norm(ref, axis=-1).mean()):.3f} voxel", flush=True)
    rows = []
    for reg in ("elastic", "diffusion"):
        curves = amplitude_curves(moving, fixed, ref, reg, spacing, win, args.center)
        ratio = curves.energy_ratio()
        prop = propose_energy_scale(curves, args.target)
        print(f"\n{reg}: energy / weighted similarity gain of u_ref at K = 1: median {np.median(ratio):.4f} "
              f"(1/{1 / np.median(ratio):.0f}; quartiles {np.percentile(ratio, 25):.4f}-{np.percentile(ratio, 75):.4f})")
        print(f"{reg}: optimal amplitude a*(K) at the centre (median [quartiles] over pairs)")
        for k in args.candidates:
            a = curves.optimal_amplitude(k)
            q = np.percentile(a, [25, 50, 75])
            print(f"  K = {k:g}: a* = {q[1]:.2f} [{q[0]:.2f}, {q[2]:.2f}]")
            rows.append({"regularizer": reg, "K": k, "a_star_median": q[1], "a_star_q25": q[0], "a_star_q75": q[2],
                         "energy_ratio_median_K1": float(np.median(ratio))})
        print(f"{reg}: proposed K for a* = {args.target}: {prop['K']:.1f} (quartiles over pairs "
              f"{prop['K_q25']:.1f}-{prop['K_q75']:.1f}, {prop['n_pairs']} pairs)", flush=True)
        rows.append({"regularizer": reg, "K": prop["K"], "a_star_median": args.target, "proposed": True,
                     "energy_ratio_median_K1": float(np.median(ratio))})
    if args.csv:
        atomic_write(args.csv, pd.DataFrame(rows))
        print(f"\nwrote {args.csv}")


if __name__ == "__main__":
    from hypermorph_spatially_adaptive.cli import cli_main

    cli_main(main)
