#!/usr/bin/env python
"""Peak memory and seconds of every 3D stage, measured at small sizes and extrapolated.

What is measured, per 3D size (batch 1, channels-last, CONVENTIONS.md) and stage, each in its own
child process (this script re-invoked with ``--single``) so that peak memory is that stage's:

- ``train_<preset>`` (four presets): one optimizer step of the trainer's own compiled step
  (:func:`~hypermorph_spatially_adaptive.trainer.make_train_step`: forward, paper eq. 1 loss,
  gradient, Adam);
- ``grid_point``: one grid point of the identification: the elastic global model's compiled
  forward pass (:class:`~hypermorph_spatially_adaptive.forward.Registrar`, batch 1) plus the
  nearest-neighbour label warp and class Dice that ``grid_identification.grid_dice`` does per point;
- ``forward``: the elastic SA model's forward pass (inference, batch 1);
- ``refine_step``: one Adam step of the elastic SA refinement
  (:class:`~hypermorph_spatially_adaptive.refinement.Refiner` with the pipeline's defaults
  ``configs.RefineConfig()``), timed as ``(t(1 + n steps) - t(1 step)) / n``, n = 20, after a traced call.

Seconds: median over ``--repeats`` calls after ``--warmup`` untimed ones (the first traces).
Memory: the child's peak resident set (``VmHWM``, i.e. ``ru_maxrss``) and its growth over the
resident set after TensorFlow, the model and the inputs were set up (``peak - base``: what the
step itself needs on top of the process). Inputs: random images in [0, 1], a blocky random
segmentation with labels 0..3 (3 tissue classes), hyperparameters U(0, 1), seeded.

Extrapolation (``--extrapolate``, default the paper's L2R Lung CT 192 x 128 x 192): per stage, a
least-squares line ``y = a + b V`` in the voxel count V through the measured sizes, for the
seconds and for the peak memory, evaluated at the target's V (U-Net cost and activations grow
linearly in V at fixed features; the fit is only as good as the largest measured size is
large). The CPU seconds say nothing about a GPU; the memory of the activations does (a GPU holds
the same tensors, plus the framework's workspace).

Examples::

    nice -n 19 python benchmarks/bench_3d.py --sizes 32 64 --out bench_3d.csv
    python benchmarks/bench_3d.py --sizes 48x32x48 --stages forward refine_step --enc-features 8 16 16 16
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from datasets.atomic import atomic_write  # noqa: E402
from hypermorph_spatially_adaptive.configs import LossConfig, RefineConfig  # noqa: E402
from hypermorph_spatially_adaptive.forward import Registrar  # noqa: E402
from hypermorph_spatially_adaptive.params import ParamSpec  # noqa: E402
from hypermorph_spatially_adaptive.trainer import make_optimizer, make_train_step  # noqa: E402
from procmem import peak_rss_kb, status_kb  # noqa: E402
from tf_compat import import_voxelmorph  # noqa: E402
PRESETS = ("elastic_global", "elastic_sa", "diffusion_global", "diffusion_sa")
STAGES = tuple(f"train_{p}" for p in PRESETS) + ("grid_point", "forward", "refine_step")
NUM_CLASSES = 3
L2R_LUNG = (192, 128, 192)
RESULT_TAG = "BENCH3D "


def parse_size(text: str) -> Tuple[int, int, int]:
    """``"64"`` -> (64, 64, 64); ``"48x32x48"`` -> (48, 32, 48)."""
    parts = text.lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected N or NxNxN (integers)") from None
    if len(dims) == 1:
        dims = dims * 3
    if len(dims) != 3 or min(dims) < 16 or any(d % 16 for d in dims):
        raise argparse.ArgumentTypeError(f"size {text!r}: three axes, each a multiple of 16 (the U-Net's 4 "
                                         f"poolings), got {dims}")
    return tuple(dims)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=parse_size, nargs="+", default=[parse_size("32"), parse_size("64")],
                   help="3D sizes to measure: N (cube) or NxNxN, multiples of 16. Check free RAM first "
                        "(free -g; docs/pipeline.md '3D' gives the peak per size)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to measure")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (the first traces)")
    p.add_argument("--extrapolate", type=parse_size, default=L2R_LUNG,
                   help="size to extrapolate to from the measured ones (default: the paper's L2R Lung CT)")
    p.add_argument("--enc-features", type=int, nargs="+", default=[16, 32, 32, 32],
                   help="U-Net encoder features (the trainer's default); fewer cut activation memory")
    p.add_argument("--dec-features", type=int, nargs="+", default=[32, 32, 32, 32, 32, 16, 16],
                   help="U-Net decoder features (the trainer's default)")
    p.add_argument("--int-steps", type=int, default=7, help="scaling-and-squaring steps of the networks")
    p.add_argument("--ncc-win", type=int, default=9, help="local NCC window of the loss")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs and weights")
    p.add_argument("--out", metavar="CSV", default=None, help="also write the table (measured + extrapolated) here")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per child process")
    p.add_argument("--single", metavar="JSON", default=None,
                   help="internal: run one measurement (a JSON job) in this process and print its result")
    return p


# ------------------------------------------------------------------ inside the child process

def _inputs(shape: Sequence[int], seed: int):
    """Images U(0, 1), blocky labels 0..NUM_CLASSES (blocks of size/8), hyp U(0, 1) [1, 8]."""
    rng = np.random.default_rng(seed)
    moving = rng.random((1, *shape, 1), dtype=np.float32)
    fixed = rng.random((1, *shape, 1), dtype=np.float32)
    blocks = [max(1, s // 8) for s in shape]
    seg = rng.integers(0, NUM_CLASSES + 1, size=[-(-s // b) for s, b in zip(shape, blocks)])
    for ax, b in enumerate(blocks):
        seg = np.repeat(seg, b, axis=ax)
    seg = seg[tuple(slice(0, s) for s in shape)][None].astype(np.int32)
    hyp = rng.random((1, 2 * (NUM_CLASSES + 1)), dtype=np.float32)
    return moving, fixed, seg, hyp


def _model(job: Dict, preset: str):
    from hypermorph_spatially_adaptive.models import ModelConfig, build_model

    reg, kind = preset.split("_")
    mc = ModelConfig(image_shape=tuple(job["shape"]), regularizer=reg, spatially_adaptive=kind == "sa",
                     num_classes=NUM_CLASSES, enc_features=tuple(job["enc"]), dec_features=tuple(job["dec"]),
                     int_steps=int(job["int_steps"]))
    mc.validate()
    return mc, build_model(mc)


def _train_call(job: Dict, data):
    import tensorflow as tf

    moving, fixed, seg, hyp = data
    mc, model = _model(job, job["stage"][len("train_"):])
    strategy = tf.distribute.get_strategy()
    with strategy.scope():
        optimizer = make_optimizer(model, 1e-4)
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    loss = LossConfig(ncc_win=int(job["ncc_win"]), spacing=(1.0,) * 3)
    step = make_train_step(model, optimizer, strategy, step_var, mc.spec, loss, 1)
    batch = {"moving": tf.constant(moving), "fixed": tf.constant(fixed), "fixed_seg": tf.constant(seg),
             "hyp": tf.constant(hyp[:, :mc.spec.num_params])}
    return lambda: {k: float(v) for k, v in step(batch).items()}


def _grid_point_call(job: Dict, data):
    import eval_metrics

    moving, fixed, seg, hyp = data
    _, model = _model(job, "elastic_global")
    reg = Registrar(model, batch_size=1)

    def call():
        _, disp = reg(moving[0], fixed[0], hyp[:, :2])
        eval_metrics.dice_per_class(seg[0], eval_metrics.warp_labels(seg[0], disp[0]), NUM_CLASSES)
    return call


def _forward_call(job: Dict, data):
    moving, fixed, seg, hyp = data
    _, model = _model(job, "elastic_sa")
    reg = Registrar(model, batch_size=1)
    return lambda: reg(moving, fixed, hyp)


def _refine_calls(job: Dict, data):
    from hypermorph_spatially_adaptive.refinement import Refiner

    moving, fixed, seg, hyp = data
    loss = LossConfig(ncc_win=int(job["ncc_win"]), spacing=(1.0,) * 3)
    r = Refiner(ParamSpec("elastic", True, NUM_CLASSES), loss, RefineConfig())
    u0 = np.zeros((*moving.shape[:-1], 3), np.float32)
    return lambda steps: r(moving, fixed, u0, hyp, seg, steps=steps, lr=0.1)


def _median_seconds(fn, warmup: int, repeats: int) -> Tuple[float, float]:
    """(first call's seconds, median of ``repeats`` timed calls after ``warmup`` untimed ones)."""
    first = None
    for _ in range(max(1, warmup)):
        t = time.perf_counter()
        fn()
        first = time.perf_counter() - t if first is None else first
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return first, statistics.median(times)


def run_single(job: Dict) -> Dict:
    """One measurement in this process: ``{seconds, first_seconds, peak_mb, base_mb}``."""
    tf, _, _ = import_voxelmorph()
    tf.keras.utils.set_random_seed(int(job["seed"]))
    data = _inputs(job["shape"], int(job["seed"]))
    stage = job["stage"]
    if stage == "refine_step":
        refine = _refine_calls(job, data)
        base = status_kb("VmRSS") or 0
        first, t1 = _median_seconds(lambda: refine(1), job["warmup"], job["repeats"])
        n = 20  # enough steps that the per-call overhead (start loss, reset) cancels in the difference
        _, tn = _median_seconds(lambda: refine(1 + n), 0, job["repeats"])
        seconds = max(tn - t1, 0.0) / n
    else:
        make = {"grid_point": _grid_point_call, "forward": _forward_call}.get(stage, _train_call)
        fn = make(job, data)
        base = status_kb("VmRSS") or 0
        first, seconds = _median_seconds(fn, job["warmup"], job["repeats"])
    return {"seconds": seconds, "first_seconds": first, "peak_mb": peak_rss_kb() / 1024, "base_mb": base / 1024}


# ------------------------------------------------------------------ parent: runs, table, fit

def measure(shape, stage: str, args) -> Dict:
    """Run one stage at one size in a child process; returns its result row."""
    job = {"shape": list(shape), "stage": stage, "enc": args.enc_features, "dec": args.dec_features,
           "int_steps": args.int_steps, "ncc_win": args.ncc_win, "seed": args.seed, "warmup": args.warmup,
           "repeats": args.repeats}
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--single", json.dumps(job)],
                          capture_output=True, text=True, timeout=args.timeout, env=env, cwd=REPO_ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    row = {"size": "x".join(map(str, shape)), "voxels": int(np.prod(shape)), "stage": stage, "kind": "measured"}
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{stage} at {row['size']} failed (exit {proc.returncode}): {tail[0]}")
    row.update(json.loads(lines[-1][len(RESULT_TAG):]))
    row["wall_seconds"] = time.perf_counter() - t
    return row


def fit_linear(voxels: Sequence[float], values: Sequence[float], target: float) -> float:
    """Least-squares ``a + b V`` through ``(voxels, values)`` evaluated at ``target`` (one point:
    proportional, ``value * target / V``)."""
    v, y = np.asarray(voxels, float), np.asarray(values, float)
    if len(np.unique(v)) < 2:
        return float(y.mean() * target / v.mean())
    b, a = np.polyfit(v, y, 1)
    return float(a + b * target)


def extrapolate(rows: List[Dict], shape) -> List[Dict]:
    """One row per stage at ``shape`` from the measured rows (:func:`fit_linear`)."""
    target = float(np.prod(shape))
    out = []
    for stage in dict.fromkeys(r["stage"] for r in rows):
        meas = [r for r in rows if r["stage"] == stage and r["kind"] == "measured"]
        vox = [r["voxels"] for r in meas]
        out.append({"size": "x".join(map(str, shape)), "voxels": int(target), "stage": stage,
                    "kind": f"extrapolated (linear in voxels from {len(meas)} sizes)",
                    **{k: fit_linear(vox, [r[k] for r in meas], target) for k in ("seconds", "peak_mb", "base_mb")}})
    return out


def markdown(rows: List[Dict]) -> str:
    lines = ["| size | stage | s/call | peak RSS (MB) | peak - base (MB) | kind |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['stage']} | {r['seconds']:.3f} | {r['peak_mb']:.0f} | "
                     f"{r['peak_mb'] - r['base_mb']:.0f} | {r['kind']} |")
    return "\n".join(lines)


def write_csv(rows: List[Dict], path: str) -> None:
    cols = ["size", "voxels", "stage", "kind", "seconds", "first_seconds", "peak_mb", "base_mb", "wall_seconds"]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    atomic_write(path, write)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = build_parser().parse_args(argv)
    if args.single:
        print(RESULT_TAG + json.dumps(run_single(json.loads(args.single))), flush=True)
        return []
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    rows = []
    for shape in args.sizes:
        for stage in args.stages:
            rows.append(measure(shape, stage, args))
            r = rows[-1]
            print(f"[bench_3d] {r['size']} {stage}: {r['seconds']:.3f} s, peak {r['peak_mb']:.0f} MB "
                  f"(+{r['peak_mb'] - r['base_mb']:.0f}), child {r['wall_seconds']:.0f} s", flush=True)
    if tuple(args.extrapolate) not in {tuple(s) for s in args.sizes}:
        rows += extrapolate(rows, args.extrapolate)
    print(markdown(rows))
    if args.out:
        write_csv(rows, args.out)
        print(f"-> {args.out}")
    return rows


if __name__ == "__main__":
    main()
