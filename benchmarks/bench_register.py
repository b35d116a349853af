"""Benchmark: seconds per pair for each step of ``register.py`` (load, resample, forward, refine, output).

For each size (default 128 x 128 and 64^3) the benchmark writes a small folder dataset of
random smooth images with 3 tissue classes (``--work``), trains an elastic SA model on it for
``--train-steps`` steps with the trainer (speed does not depend on the weights; default
architecture) unless ``--run`` names trained runs, then registers one pair through
:class:`hypermorph_spatially_adaptive.pair_registration.PairRegistrar` ``--repeats`` times:

- load:     rebuilding the model from its run folder (once per process),
- first:    the first pair's forward pass, which traces the compiled function (once per process),
- resample: normalization + resampling of images and labels to the model grid (here: a fixed
            image with axis 0 reversed, so the resampling is not skipped as an identity),
- forward:  one forward pass, traced,
- refine:   ``--refine`` Adam steps; each call traces its step function again, so the same with
            1 step is reported too, and the difference per extra step,
- output:   field back to the fixed grid, warped image and labels.

Medians over the repeats. If ``import ants`` works (antspyx, ``benchmarks/requirements-bench.txt``):
ANTs SyN on the same pair (one thread), and ``ants.apply_transforms`` with our ITK field
against our warped image (largest difference where the sample point lies inside the image).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.atomic import atomic_write  # noqa: E402
from hypermorph_spatially_adaptive import artifacts as art  # noqa: E402
from hypermorph_spatially_adaptive import pair_geometry as geo  # noqa: E402
from hypermorph_spatially_adaptive import trainer  # noqa: E402
from hypermorph_spatially_adaptive.pair_registration import PairRegistrar  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["128x128", "64x64x64"], help="image sizes, e.g. 128x128 64x64x64")
    p.add_argument("--run", nargs="+", default=None,
                   help="trained elastic SA run folders, one per size (default: train --train-steps on random data)")
    p.add_argument("--work", default=".cache/bench_register", help="folder for the random data and runs")
    p.add_argument("--train-steps", type=int, default=1, help="training steps of the benchmark runs")
    p.add_argument("--refine", type=int, default=20, help="refinement steps timed")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--no-syn", action="store_true", help="skip ANTs SyN even if antspyx is installed")
    return p


def _write_data(folder: str, shape: Sequence[int], n_pairs: int = 3) -> str:
    """A folder dataset (pairs.csv) of random smooth images with labels 0..3; returns the CSV path."""
    import nibabel as nib
    from scipy import ndimage

    csv = os.path.join(folder, "pairs.csv")
    if os.path.isfile(csv):
        return csv
    rng = np.random.default_rng(0)
    rows = ["pair_id,fixed,moving,fixed_seg,moving_seg,split"]
    for k in range(n_pairs):
        names = {}
        for role in ("fixed", "moving"):
            img = ndimage.gaussian_filter(rng.normal(size=shape), 3.0)
            img = (img - img.min()) / (img.max() - img.min())
            seg = np.digitize(img, [0.35, 0.5, 0.65]).astype(np.int16)
            for kind, arr in ((role, img.astype(np.float32)), (role + "_seg", seg)):
                names[kind] = f"{kind}_{k}.nii.gz"
                atomic_write(os.path.join(folder, names[kind]),
                             lambda tmp, a=arr: nib.save(nib.Nifti1Image(a, np.eye(4)), tmp))
        split = ["train", "val", "test"][k]
        rows.append(f"p{k},{names['fixed']},{names['moving']},{names['fixed_seg']},{names['moving_seg']},{split}")
    atomic_write(csv, "\n".join(rows) + "\n")
    return csv


def _train(folder: str, csv: str, steps: int) -> str:
    run = os.path.join(folder, "elastic_sa")
    if not (os.path.isfile(os.path.join(run, art.CONFIG)) and art.read_run(run, require_finished=False).finished):
        trainer.main("elastic_sa", ["--dataset", "folder", "--pairs-csv", csv, "--num-classes", "3", "--out", run,
                                  "--steps", str(steps), "--val-every", "0", "--log-every", str(steps), "--overwrite"])
    return run


def _median(values: List[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def bench_size(run: str, folder: str, refine: int, repeats: int, syn: bool) -> Dict[str, float]:
    """Seconds per step for one run (see the module docstring)."""
    import nibabel as nib

    fixed = nib.load(os.path.join(folder, "fixed_2.nii.gz"))
    moving = nib.load(os.path.join(folder, "moving_2.nii.gz"))
    fseg = nib.load(os.path.join(folder, "fixed_seg_2.nii.gz"))
    mseg = nib.load(os.path.join(folder, "moving_seg_2.nii.gz"))
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, fixed.shape[0] - 1.0  # axis 0 reversed, same world grid
    fixed_r = (np.asarray(fixed.dataobj)[::-1], fixed.affine @ flip)
    fseg_r = (np.asarray(fseg.dataobj)[::-1], fseg.affine @ flip)
    registrar = PairRegistrar(run)
    out = {"load": registrar.load_seconds}
    params = ["lambda=0.5", "mu=0.5"]
    t0 = time.perf_counter()
    registrar(fixed_r, moving, params, fseg_r, mseg)
    out["first (trace)"] = time.perf_counter() - t0
    steps: Dict[str, List[float]] = {}
    for _ in range(repeats):
        res = registrar(fixed_r, moving, params, fseg_r, mseg, refine=refine)
        for k, v in res.seconds.items():
            steps.setdefault(k, []).append(v)
    out.update({k: _median(v) for k, v in steps.items() if k not in ("check", "load")})
    one = [registrar(fixed_r, moving, params, fseg_r, mseg, refine=1).seconds["refine"] for _ in range(repeats)]
    out["refine, 1 step (tracing)"] = _median(one)
    out["refine per step"] = (out["refine"] - out["refine, 1 step (tracing)"]) / max(refine - 1, 1)
    out["total (warm)"] = sum(out[k] for k in ("resample", "forward", "refine", "output") if k in out)
    if syn:
        res = registrar(fixed, moving, params, fseg, mseg, refine=refine)
        out.update(_with_ants(fixed, moving, res, repeats, folder))
    return out


def _with_ants(fixed, moving, res, repeats: int, folder: str) -> Dict[str, Optional[float]]:
    """ANTs SyN seconds (one thread) and the largest difference between ``ants.apply_transforms``
    with our ITK field and our warped image (voxels whose sample point is inside the moving image)."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
    try:
        import ants
    except ImportError:
        return {"ants SyN": None}

    f, m = ants.image_read(fixed.get_filename()), ants.image_read(moving.get_filename())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ants.registration(f, m, type_of_transform="SyN")
        times.append(time.perf_counter() - t0)
    warp = os.path.join(folder, "warp_itk.nii.gz")
    res.itk_field().to_filename(warp)
    theirs = ants.apply_transforms(f, m, [warp], interpolator="linear").numpy()
    points = geo.grid_points(res.affine, res.warped.shape) + res.disp_mm
    inv = np.linalg.inv(moving.affine)
    idx = (points @ inv[:3, :3].T + inv[:3, 3])[..., :res.warped.ndim]
    inside = np.all((idx >= 0) & (idx <= np.asarray(res.warped.shape) - 1), axis=-1)
    return {"ants SyN": _median(times),
            "ants.apply_transforms(our ITK field) - our warp, max": float(np.abs(theirs - res.warped)[inside].max())}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    args = build_parser().parse_args(argv)
    if args.run is not None and len(args.run) != len(args.sizes):
        raise SystemExit("error: give one --run per --sizes entry")
    results = {}
    for i, size in enumerate(args.sizes):
        shape = tuple(int(s) for s in size.lower().split("x"))
        folder = os.path.join(args.work, size)
        _write_data(folder, shape)
        run = args.run[i] if args.run else _train(folder, os.path.join(folder, "pairs.csv"), args.train_steps)
        results[size] = bench_size(run, folder, args.refine, args.repeats, not args.no_syn)
        print(f"[bench_register] {size}: " + json.dumps({k: (None if v is None else round(v, 3))
                                                          for k, v in results[size].items()}), flush=True)
    print(f"\nseconds per pair (median of {args.repeats}; refine = {args.refine} steps; load and first once per process)")
    keys = [k for k in results[args.sizes[0]]]
    print("| step | " + " | ".join(args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    for k in keys:
        cells = [results[s].get(k) for s in args.sizes]
        print(f"| {k} | " + " | ".join("n/a (antspyx not installed)" if c is None else f"{c:.3g}" for c in cells) + " |")
    return results


if __name__ == "__main__":
    main()
