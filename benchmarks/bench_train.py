#!/usr/bin/env python
"""Benchmark one training step: our four HyperMorph presets against the plain voxelmorph step.

What is measured (per configuration x model, on the same random input):

- seconds per optimizer step: median over ``--steps`` timed steps after ``--warmup`` untimed
  steps (the first warm-up step traces and compiles the ``tf.function``);
- peak memory: growth of the process peak RSS (``VmHWM``) over the RSS after TensorFlow and
  voxelmorph were imported. Peak RSS is monotone, so every configuration x model runs in its
  own subprocess (this script re-invoked with ``--single``); the peak is reset at start with
  ``/proc/self/clear_refs`` when the kernel allows it.

Models:

- ``sa_elastic``, ``global_elastic``, ``sa_diffusion``, ``global_diffusion``: our models
  (:func:`hypermorph_spatially_adaptive.models.build_model`) with the trainer's own optimizer
  and compiled step (:func:`~hypermorph_spatially_adaptive.trainer.make_optimizer`,
  :func:`~hypermorph_spatially_adaptive.trainer.make_train_step`: model forward, ``loss_terms``,
  gradient, Adam inside ``strategy.run`` of the default strategy, ``step`` counter), per-term
  outputs fetched to Python every step like the trainer's log accumulator;
- ``sa_elastic_csain``, ``sa_diffusion_csain``: the SA presets with ``--conditioning csain``
  (:mod:`hypermorph_spatially_adaptive.csain`: the same U-Net sizes, conditioned on the parameter
  map by CSAIN layers instead of a hypernetwork), same trainer step;
- ``sa_elastic_mapfn``: ``sa_elastic`` with voxelmorph's own ``tf.map_fn`` per-sample layers
  (``build_model(..., unroll=False)``); ``plain_unrolled``: ``plain`` with our unrolled
  per-sample layers (:mod:`hypermorph_spatially_adaptive.unrolled`, active for batch <= 2), so the
  like-for-like ratios separate our loss from the layer implementation;
- ``plain``: nothing of ours. ``vxm.networks.HyperVxmDense(inshape, nb_hyp_params=1,
  int_steps=7, int_resolution=2, svf_resolution=1)`` (regularized field: the pre-integrated SVF
  at half resolution, voxelmorph's default) with ``(1 - h) * NCC(win 9) + h * Grad('l2',
  loss_mult=2)`` in a plain ``tf.function`` + ``GradientTape`` + Adam step.

Input: moving and fixed images uniform in [0, 1], a blocky random fixed segmentation with labels
0..3 (background + 3 classes, so SA elastic has 8 hyperparameters), hyperparameters U(0, 1);
seeded, so every subprocess sees the same data.

``--breakdown`` additionally times, per model, the compiled forward pass, forward + loss,
forward + loss + gradient, and the loss pieces alone (NCC, regularizer, each with its backward)
on fixed tensors; for our models also voxelmorph's NCC on the same tensors, for comparison.

Examples::

    python benchmarks/bench_train.py --quick
    python benchmarks/bench_train.py --determinism --csv bench.csv
    python benchmarks/bench_train.py --configs 2d_b1 --models sa_elastic plain --breakdown
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
from typing import Dict, List, Optional, Sequence

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from hypermorph_spatially_adaptive.configs import LossConfig  # noqa: E402
from hypermorph_spatially_adaptive.params import regularization_parameters  # noqa: E402
from hypermorph_spatially_adaptive.trainer import make_optimizer, make_train_step  # noqa: E402
from procmem import peak_rss_kb, reset_peak_rss, rss_kb  # noqa: E402
from tf_compat import import_voxelmorph  # noqa: E402

# name -> (ndim, batch size); the image size comes from --size-2d / --size-3d (or --quick)
CONFIGS = {"2d_b1": (2, 1), "2d_b8": (2, 8), "3d_b1": (3, 1)}
# name -> (regularizer, spatially adaptive, unrolled) for ours; ("plain", unrolled) for voxelmorph's
# own step. "unrolled": per-sample map_fn layers run as unrolled loops (hypermorph_spatially_adaptive
# .unrolled), the default of build_model; "plain" is voxelmorph exactly as shipped.
MODELS = {
    "sa_elastic": ("elastic", True, True),
    "global_elastic": ("elastic", False, True),
    "sa_diffusion": ("diffusion", True, True),
    "global_diffusion": ("diffusion", False, True),
    "sa_elastic_mapfn": ("elastic", True, False),
    "sa_elastic_csain": ("elastic", True, True, "csain"),
    "sa_diffusion_csain": ("diffusion", True, True, "csain"),
    "plain": ("plain", False),
    "plain_unrolled": ("plain", True),
}
NUM_CLASSES = 3          # labels 0..3: background + 3 tissue classes ("4-class" segmentation)
GOAL_MODEL, GOAL_RATIO = "sa_elastic", 1.15
RESULT_TAG = "BENCH_RESULT "


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Seconds per training step and peak memory of our HyperMorph presets vs the "
                    "plain voxelmorph HyperMorph step (each configuration in its own subprocess).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                   help="configurations to run (2D batch 1, 2D batch 8, 3D batch 1)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                   help="models to run; 'plain' is the voxelmorph reference step (as shipped) used for "
                        "the ratios; '*_mapfn' / 'plain_unrolled' are ours without / plain with the "
                        "unrolled per-sample layers, for like-for-like ratios")
    p.add_argument("--size-2d", type=int, default=128, help="2D image size (square)")
    p.add_argument("--size-3d", type=int, default=64, help="3D image size (cube)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per 2D run")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed warm-up steps per 2D run (the first one compiles)")
    p.add_argument("--steps-3d", type=int, default=5, help="timed steps per 3D run")
    p.add_argument("--warmup-3d", type=int, default=2, help="untimed warm-up steps per 3D run")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: sizes 32^2 / 16^3, 3 timed steps and 1 warm-up step everywhere")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the whole set of runs this many times, interleaved, and report the "
                        "median over rounds (reduces the effect of load changes on a shared machine)")
    p.add_argument("--determinism", action="store_true",
                   help="also run the --determinism-models with tf.config.experimental."
                        "enable_op_determinism() (the trainer's default) on the --determinism-configs "
                        "and report the cost; all other runs have it off")
    p.add_argument("--determinism-configs", nargs="+", choices=list(CONFIGS), default=["2d_b1"],
                   help="configurations for the determinism comparison")
    p.add_argument("--determinism-models", nargs="+", choices=list(MODELS), default=[GOAL_MODEL],
                   help="models for the determinism comparison")
    p.add_argument("--paired", action="store_true",
                   help="also time all --models of each configuration in ONE extra subprocess with "
                        "interleaved steps (robust to load changes on a shared machine) and report the "
                        "median per-step ratio to plain; uses --paired-steps rounds")
    p.add_argument("--paired-steps", type=int, default=None,
                   help="interleaved rounds per paired run (default: the run's --steps / --steps-3d)")
    p.add_argument("--skip-separate", action="store_true",
                   help="with --paired: skip the one-subprocess-per-model runs (no memory numbers, no "
                        "--determinism or --breakdown)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time forward / loss / gradient / Adam and the loss pieces separately")
    p.add_argument("--breakdown-steps", type=int, default=None,
                   help="timed calls per breakdown item (default: the run's --steps / --steps-3d)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (as the trainer)")
    p.add_argument("--ncc-win", type=int, default=9, help="NCC window per axis (as the trainer)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input and of the weights")
    p.add_argument("--csv", metavar="OUT", default=None, help="write the result table to this CSV file")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per subprocess")
    p.add_argument("--verbose", action="store_true", help="show the subprocesses' stderr")
    p.add_argument("--single", metavar="JSON", default=None,
                   help="internal: run one measurement described by this JSON job in this process "
                        "and print its result as one JSON line")
    return p


# --------------------------------------------------------------------------------------------
# measurement helpers (run inside the subprocess)
# --------------------------------------------------------------------------------------------

def _time_calls(fn, warmup: int, steps: int) -> Dict[str, float]:
    """Call ``fn`` (which must block until its result is on the host) warmup + steps times."""
    first = None
    for i in range(warmup):
        t = time.perf_counter()
        fn()
        if i == 0:
            first = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"median": statistics.median(times), "min": min(times), "mean": statistics.fmean(times),
            "max": max(times), "first": first if first is not None else float("nan"), "n": len(times)}


def _make_inputs(ndim: int, size: int, batch: int, num_params_ours: int, seed: int):
    """Same arrays in every subprocess: images U(0,1), blocky labels 0..NUM_CLASSES, hyp U(0,1)."""
    rng = np.random.default_rng(seed)
    shape = (batch,) + (size,) * ndim
    moving = rng.random(shape + (1,), dtype=np.float32)
    fixed = rng.random(shape + (1,), dtype=np.float32)
    block = max(1, size // 8)
    coarse = rng.integers(0, NUM_CLASSES + 1, size=(batch,) + (-(-size // block),) * ndim)
    seg = coarse
    for ax in range(1, ndim + 1):
        seg = np.repeat(seg, block, axis=ax)
    seg = seg[(slice(None),) + (slice(0, size),) * ndim].astype(np.int32)
    # one stream of U(0,1) for the largest hyp vector; every model takes its first P columns
    hyp_all = rng.random((batch, max(num_params_ours, 1)), dtype=np.float32)
    return moving, fixed, seg, hyp_all


def _value_and_grad_fn(tf, f, n_watch: int):
    """Compiled ``f(*watched, *rest)`` forward + backward w.r.t. the first n_watch args;
    returns the summed value (gradients forced by a control dependency)."""

    @tf.function
    def run(*args):
        watched = list(args[:n_watch])
        with tf.GradientTape() as tape:
            for x in watched:
                tape.watch(x)
            v = tf.reduce_sum(f(*args))
        grads = tape.gradient(v, watched)
        with tf.control_dependencies([g for g in grads if g is not None]):
            return tf.identity(v)

    return run


def _setup(job: Dict):
    """Import the stack (shims first), set determinism and seeds, make the input tensors."""
    tf, vxm, _ne = import_voxelmorph()
    if job["determinism"]:
        tf.config.experimental.enable_op_determinism()
    tf.keras.utils.set_random_seed(int(job["seed"]))
    ndim, size, bsz = int(job["ndim"]), int(job["size"]), int(job["batch"])
    moving_np, fixed_np, seg_np, hyp_np = _make_inputs(ndim, size, bsz, 2 * (NUM_CLASSES + 1), int(job["seed"]))
    data = {"moving": tf.constant(moving_np), "fixed": tf.constant(fixed_np),
            "fixed_seg": tf.constant(seg_np), "hyp_all": hyp_np}
    return tf, vxm, data


def _build(name: str, job: Dict, tf, vxm, data: Dict) -> Dict:
    """Model + optimizer + compiled train step of model ``name``; returns ``step`` (a callable
    that runs one step and fetches its outputs), ``model``, and for --breakdown ``pieces``."""
    if MODELS[name][0] != "plain":
        return _build_ours(name, job, tf, vxm, data)
    return _build_plain(name, job, tf, vxm, data)


def _build_ours(name: str, job: Dict, tf, vxm, data: Dict) -> Dict:
    """Our model ``name`` with the trainer's optimizer and compiled step (same computation as
    trainer.run's per_replica / train_step); the :func:`_build` contract."""
    from hypermorph_spatially_adaptive.models import ModelConfig, build_model

    ndim, size, bsz = int(job["ndim"]), int(job["size"]), int(job["batch"])
    win, spacing = int(job["ncc_win"]), [1.0] * ndim
    reg, sa, unroll, *cond = MODELS[name]
    mc = ModelConfig(image_shape=(size,) * ndim, regularizer=reg, spatially_adaptive=sa,
                     num_classes=NUM_CLASSES, conditioning=cond[0] if cond else "hypernetwork")
    mc.validate()
    spec = mc.spec
    strategy = tf.distribute.get_strategy()
    with strategy.scope():
        model = build_model(mc, unroll=unroll)
        optimizer = make_optimizer(model, float(job["lr"]))
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    hyp = tf.constant(data["hyp_all"][:, :spec.num_params])
    batch = {"moving": data["moving"], "fixed": data["fixed"], "fixed_seg": data["fixed_seg"], "hyp": hyp}
    loss = LossConfig(ncc_win=win, spacing=spacing)  # trainer default --reg-field disp
    train_step = make_train_step(model, optimizer, strategy, step_var, spec, loss, bsz)  # the trainer's own step

    def step():
        out = train_step(batch)
        return {k: float(v) for k, v in out.items()}  # the trainer fetches every term each step

    pieces = _ours_pieces(tf, vxm, model, spec, batch, step, job) if job["breakdown"] else {}
    return {"step": step, "model": model, "pieces": pieces}


def _ours_passes(tf, model, spec, spacing: list, win: int, bsz: int) -> tuple:
    """Compiled ``(forward, forward + loss, forward + loss + gradient)`` of our model on a
    batch dict (moving, fixed, hyp, fixed_seg), the loss as in the trainer (sum / batch)."""
    from hypermorph_spatially_adaptive.losses import loss_terms
    from hypermorph_spatially_adaptive.models import call_model

    @tf.function
    def fwd(batch):
        warped, disp, _svf = call_model(model, batch["moving"], batch["fixed"], batch["hyp"], batch["fixed_seg"],
                                        training=True)
        return warped, disp

    @tf.function
    def fwd_loss(batch):
        warped, disp, svf = call_model(model, batch["moving"], batch["fixed"], batch["hyp"], batch["fixed_seg"],
                                       training=True)
        terms = loss_terms(spec, batch["fixed"], warped, disp, batch["hyp"], batch["fixed_seg"],
                           LossConfig(ncc_win=win, spacing=spacing))
        return tf.reduce_sum(terms["loss"]) / bsz

    @tf.function
    def fwd_loss_grad(batch):
        with tf.GradientTape() as tape:
            warped, disp, svf = call_model(model, batch["moving"], batch["fixed"], batch["hyp"], batch["fixed_seg"],
                                           training=True)
            terms = loss_terms(spec, batch["fixed"], warped, disp, batch["hyp"], batch["fixed_seg"],
                               LossConfig(ncc_win=win, spacing=spacing))
            loss = tf.reduce_sum(terms["loss"]) / bsz
        grads = tape.gradient(loss, model.trainable_variables)
        with tf.control_dependencies(grads):
            return tf.identity(loss)

    return fwd, fwd_loss, fwd_loss_grad


def _ours_pieces(tf, vxm, model, spec, batch: Dict, step, job: Dict) -> Dict:
    """--breakdown callables of our model: forward, +loss, +gradient, the step, and the loss
    pieces (``loss_terms``, our / voxelmorph's NCC, our regularizer, parameter maps) fwd+bwd
    on the warped image and field of one forward pass. Values: a callable, or
    ``(compiled fn, args)``."""
    from hypermorph_spatially_adaptive import losses as hm_losses
    from hypermorph_spatially_adaptive.losses import loss_terms
    import regularizers

    ndim = int(job["ndim"])
    win, spacing = int(job["ncc_win"]), [1.0] * ndim
    fixed, hyp, fixed_seg = batch["fixed"], batch["hyp"], batch["fixed_seg"]
    fwd, fwd_loss, fwd_loss_grad = _ours_passes(tf, model, spec, spacing, win, int(job["batch"]))
    warped0, disp0 = fwd(batch)
    warped0, disp0 = tf.identity(warped0), tf.identity(disp0)

    def reg_ours(d, h, s):
        lam, mu = regularization_parameters(spec, h, s)
        if spec.regularizer == "elastic":
            return regularizers.elastic_regularizer(d, lam, mu, spacing)
        return regularizers.diffusion_regularizer(d, lam, spacing)

    pm = tf.function(lambda h, s: regularization_parameters(spec, h, s))
    return {
        "forward": lambda: [t.numpy() for t in fwd(batch)],
        "forward+loss": lambda: float(fwd_loss(batch)),
        "forward+loss+grad": lambda: float(fwd_loss_grad(batch)),
        "step": step,
        "loss_terms fwd+bwd": (_value_and_grad_fn(
            tf, lambda w, d, f, h, s: loss_terms(spec, f, w, d, h, s, LossConfig(ncc_win=win, spacing=spacing))["loss"],
            2),
            (warped0, disp0, fixed, hyp, fixed_seg)),
        "ncc ours fwd+bwd": (_value_and_grad_fn(
            tf, lambda w, f: hm_losses.ncc_map(f, w, win), 1), (warped0, fixed)),
        "ncc vxm fwd+bwd": (_value_and_grad_fn(
            tf, lambda w, f: vxm.losses.NCC(win=[win] * ndim).loss(f, w), 1), (warped0, fixed)),
        "reg ours fwd+bwd": (_value_and_grad_fn(tf, reg_ours, 1), (disp0, hyp, fixed_seg)),
        "param maps fwd": (pm, (hyp, fixed_seg)),
    }


def _build_plain(name: str, job: Dict, tf, vxm, data: Dict) -> Dict:
    """The plain voxelmorph HyperMorph step, nothing of ours (``plain_unrolled``: with our
    unrolled per-sample layers); the :func:`_build` contract."""
    ndim, size = int(job["ndim"]), int(job["size"])
    win = int(job["ncc_win"])
    moving, fixed = data["moving"], data["fixed"]
    model = vxm.networks.HyperVxmDense((size,) * ndim, nb_hyp_params=1, int_steps=7, int_resolution=2,
                                       svf_resolution=1)
    if MODELS[name][1]:
        from hypermorph_spatially_adaptive.unrolled import unroll_per_sample_layers
        unroll_per_sample_layers(model)
    optimizer = tf.keras.optimizers.Adam(learning_rate=float(job["lr"]))
    ncc_loss = vxm.losses.NCC(win=[win] * ndim).loss
    grad_loss = vxm.losses.Grad("l2", loss_mult=2).loss
    hyp = tf.constant(data["hyp_all"][:, :1])

    def plain_loss(moving, fixed, hyp):
        warped, flow = model([moving, fixed, hyp], training=True)
        h = hyp[:, 0]
        per_sample = (1.0 - h) * ncc_loss(fixed, warped) + h * grad_loss(None, flow)
        return tf.reduce_mean(per_sample)

    @tf.function
    def train_step(moving, fixed, hyp):
        with tf.GradientTape() as tape:
            loss = plain_loss(moving, fixed, hyp)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    def step():
        return float(train_step(moving, fixed, hyp))

    pieces = {}
    if job["breakdown"]:
        pieces = _plain_pieces(tf, model, plain_loss, ncc_loss, grad_loss, (moving, fixed, hyp), step)
    return {"step": step, "model": model, "pieces": pieces}


def _plain_pieces(tf, model, plain_loss, ncc_loss, grad_loss, inputs: tuple, step) -> Dict:
    """--breakdown callables of the plain step (``inputs`` = moving, fixed, hyp): forward,
    +loss, +gradient, the step, and voxelmorph's loss pieces fwd+bwd on one forward pass."""
    moving, fixed, hyp = inputs

    @tf.function
    def fwd(moving, fixed, hyp):
        return model([moving, fixed, hyp], training=True)

    @tf.function
    def fwd_loss(moving, fixed, hyp):
        return plain_loss(moving, fixed, hyp)

    @tf.function
    def fwd_loss_grad(moving, fixed, hyp):
        with tf.GradientTape() as tape:
            loss = plain_loss(moving, fixed, hyp)
        grads = tape.gradient(loss, model.trainable_variables)
        with tf.control_dependencies(grads):
            return tf.identity(loss)

    warped0, flow0 = [tf.identity(t) for t in fwd(moving, fixed, hyp)]
    return {
        "forward": lambda: [t.numpy() for t in fwd(moving, fixed, hyp)],
        "forward+loss": lambda: float(fwd_loss(moving, fixed, hyp)),
        "forward+loss+grad": lambda: float(fwd_loss_grad(moving, fixed, hyp)),
        "step": step,
        "loss_terms fwd+bwd": (_value_and_grad_fn(
            tf, lambda w, d, f, h: (1.0 - h[:, 0]) * ncc_loss(f, w) + h[:, 0] * grad_loss(None, d), 2),
            (warped0, flow0, fixed, hyp)),
        "ncc vxm fwd+bwd": (_value_and_grad_fn(tf, lambda w, f: ncc_loss(f, w), 1), (warped0, fixed)),
        "grad vxm (half-res svf) fwd+bwd": (_value_and_grad_fn(tf, lambda d: grad_loss(None, d), 1), (flow0,)),
    }


def _time_pieces(tf, pieces: Dict, steps: int) -> Dict[str, float]:
    out = {}
    for key, item in pieces.items():
        if isinstance(item, tuple):
            fn, args = item
            call = (lambda fn=fn, args=args: [t.numpy() for t in tf.nest.flatten(fn(*args)) if t is not None])
        else:
            call = item
        out[key] = _time_calls(call, 1, steps)["median"]
    return out


def run_single(job: Dict) -> Dict:
    """One (configuration, model, determinism) measurement in this process: time and peak RSS."""
    tf, vxm, data = _setup(job)
    reset_ok = reset_peak_rss()
    rss0 = rss_kb()
    hwm0 = peak_rss_kb()
    built = _build(job["model"], job, tf, vxm, data)
    model = built["model"]
    timing = _time_calls(built["step"], int(job["warmup"]), int(job["steps"]))
    hwm1 = peak_rss_kb()
    result = {
        "job": job, "sec": timing, "peak_growth_mb": (hwm1 - rss0) / 1024.0, "peak_rss_mb": hwm1 / 1024.0,
        "baseline_rss_mb": rss0 / 1024.0, "peak_reset": reset_ok, "hwm_before_mb": hwm0 / 1024.0,
        "loadavg": os.getloadavg()[0], "params": int(sum(int(tf.size(v)) for v in model.trainable_variables)),
        "tf": tf.__version__,
    }
    if job["breakdown"]:
        result["breakdown"] = _time_pieces(tf, built["pieces"], int(job["breakdown_steps"]))
    return result


def run_paired(job: Dict) -> Dict:
    """All ``job['models']`` built in this one process and timed with interleaved steps
    (round r runs every model once, in an order rotated by r), so that load changes on a shared
    machine hit all models alike. Returns per-model timings and the median over rounds of the
    per-round ratio to ``plain``. No memory numbers (all models share the process)."""
    tf, vxm, data = _setup(job)
    names = list(job["models"])
    steps = {m: _build(m, job, tf, vxm, data)["step"] for m in names}
    for m in names:
        for _ in range(int(job["warmup"])):
            steps[m]()
    times: Dict[str, List[float]] = {m: [] for m in names}
    for r in range(int(job["steps"])):
        order = names[r % len(names):] + names[:r % len(names)]
        for m in order:
            t = time.perf_counter()
            steps[m]()
            times[m].append(time.perf_counter() - t)
    res = {"job": job, "loadavg": os.getloadavg()[0], "sec": {}, "paired_ratio": {}}
    for m in names:
        res["sec"][m] = {"median": statistics.median(times[m]), "min": min(times[m]), "n": len(times[m])}
        if "plain" in times and m != "plain":
            res["paired_ratio"][m] = statistics.median(a / b for a, b in zip(times[m], times["plain"]))
    return res


# --------------------------------------------------------------------------------------------
# orchestration (parent process)
# --------------------------------------------------------------------------------------------

def _config_label(cfg: str, size: int) -> str:
    ndim, b = CONFIGS[cfg]
    return f"{ndim}D {size}^{ndim} b{b}"


def _spawn(job: Dict, timeout: float, verbose: bool) -> Dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--single", json.dumps(job)]
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"job": job, "error": f"timeout after {timeout:.0f} s"}
    if verbose and proc.stderr:
        sys.stderr.write(proc.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            res["wall_s"] = time.time() - t0
            return res
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    return {"job": job, "error": f"exit code {proc.returncode}: {tail}"}


def _median_or_nan(xs: List[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def _fmt(x: float, nd: int = 3) -> str:
    return "-" if x is None or x != x else f"{x:.{nd}f}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.single is not None:
        job = json.loads(args.single)
        res = run_paired(job) if job.get("paired") else run_single(job)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0

    size2d, size3d = (32, 16) if args.quick else (args.size_2d, args.size_3d)
    steps2d, warm2d = (3, 1) if args.quick else (args.steps, args.warmup)
    steps3d, warm3d = (3, 1) if args.quick else (args.steps_3d, args.warmup_3d)
    if min(steps2d, steps3d) < 1 or min(warm2d, warm3d) < 1:
        raise SystemExit("--steps/--steps-3d and --warmup/--warmup-3d must be >= 1 (the first call compiles)")

    def job_for(cfg: str, model: str, det: bool) -> Dict:
        ndim, b = CONFIGS[cfg]
        steps, warm = (steps2d, warm2d) if ndim == 2 else (steps3d, warm3d)
        return {"config": cfg, "model": model, "determinism": det, "ndim": ndim, "batch": b,
                "size": size2d if ndim == 2 else size3d, "steps": steps, "warmup": warm,
                "breakdown": bool(args.breakdown), "breakdown_steps": args.breakdown_steps or steps,
                "lr": args.lr, "ncc_win": args.ncc_win, "seed": args.seed}

    if args.skip_separate and not args.paired:
        raise SystemExit("--skip-separate needs --paired")
    keys = [] if args.skip_separate else [(c, m, False) for c in args.configs for m in args.models]
    if args.determinism and not args.skip_separate:
        keys += [(c, m, True) for c in args.determinism_configs for m in args.determinism_models]
    print(f"bench_train: {len(keys)} runs x {args.rounds} round(s), each in its own subprocess; "
          f"2D {size2d}^2 ({warm2d} warm-up + {steps2d} timed steps), 3D {size3d}^3 "
          f"({warm3d} + {steps3d}); load average {os.getloadavg()[0]:.2f}", flush=True)
    results = _run_separate(args, keys, job_for)
    rows, agg = _aggregate(keys, results, job_for)

    # ---- table ----
    if rows:
        _print_separate(rows, agg, args)

    if args.paired:
        rows += _run_and_print_paired(args, job_for, agg)

    if args.breakdown and keys:
        _print_breakdown(keys, results, args)

    if args.csv:
        _write_csv(rows, args.csv)
    return 0 if all(r["rounds_ok"] > 0 for r in rows) else 1


def _run_separate(args, keys: List[tuple], job_for) -> Dict[tuple, List[Dict]]:
    """Run every ``(config, model, determinism)`` key ``args.rounds`` times, each in its own
    subprocess (:func:`_spawn`), printing one line per run; returns the results per key."""
    results: Dict[tuple, List[Dict]] = {k: [] for k in keys}
    n_total = len(keys) * args.rounds
    i = 0
    for r in range(args.rounds):
        for key in keys:
            i += 1
            cfg, model, det = key
            job = job_for(cfg, model, det)
            res = _spawn(job, args.timeout, args.verbose)
            results[key].append(res)
            label = f"[{i}/{n_total}] {_config_label(cfg, job['size'])} {model}{' +determinism' if det else ''}"
            if "error" in res:
                print(f"{label}: FAILED {res['error']}", flush=True)
            else:
                s = res["sec"]
                print(f"{label}: {s['median']:.4f} s/step (min {s['min']:.4f}, first {s['first']:.1f} s), "
                      f"peak +{res['peak_growth_mb']:.0f} MB, load {res['loadavg']:.2f}, "
                      f"subprocess {res['wall_s']:.0f} s", flush=True)
    return results


def _aggregate(keys: List[tuple], results: Dict[tuple, List[Dict]], job_for) -> tuple:
    """``(rows, agg)``: one table/CSV row per key (medians over the successful rounds, the
    ratio to ``plain`` of the same configuration without determinism), ``agg`` keyed like
    ``results``."""
    rows = []
    agg = {}
    for key in keys:
        cfg, model, det = key
        ok = [r for r in results[key] if "error" not in r]
        job = job_for(cfg, model, det)
        row = {"config": cfg, "label": _config_label(cfg, job["size"]), "size": job["size"],
               "batch": job["batch"], "model": model, "determinism": det, "steps": job["steps"],
               "warmup": job["warmup"], "rounds_ok": len(ok),
               "sec_median": _median_or_nan([r["sec"]["median"] for r in ok]),
               "sec_min": min([r["sec"]["min"] for r in ok], default=float("nan")),
               "first_step_s": _median_or_nan([r["sec"]["first"] for r in ok]),
               "peak_mb": _median_or_nan([r["peak_growth_mb"] for r in ok]),
               "peak_rss_mb": _median_or_nan([r["peak_rss_mb"] for r in ok]),
               "params": ok[0]["params"] if ok else "",
               "loadavg": _median_or_nan([r["loadavg"] for r in ok]),
               "ratio_vs_plain": float("nan"),
               "error": "; ".join(r["error"].splitlines()[-1] for r in results[key] if "error" in r)}
        agg[key] = row
        rows.append(row)
    for row in rows:
        plain = agg.get((row["config"], "plain", False))
        if plain is not None and plain["sec_median"] == plain["sec_median"]:
            row["ratio_vs_plain"] = row["sec_median"] / plain["sec_median"]
    return rows, agg


def _write_csv(rows: List[Dict], path: str) -> None:
    """The aggregated (and paired) rows as a CSV at ``path``."""
    fields = ["config", "label", "size", "batch", "model", "determinism", "steps", "warmup", "rounds_ok",
              "sec_median", "sec_min", "first_step_s", "peak_mb", "peak_rss_mb", "ratio_vs_plain",
              "paired_sec_median", "paired_ratio_vs_plain", "params",
              "loadavg", "error"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"\nwrote {path}")


def _print_separate(rows, agg, args) -> None:
    print()
    hdr = f"{'config':<14} {'model':<28} {'s/step':>9} {'min':>9} {'peak MB':>9} {'x plain':>8} {'load':>5}"
    print(hdr)
    print("-" * len(hdr))
    for row in rows:
        mname = row["model"] + (" +determinism" if row["determinism"] else "")
        if row["rounds_ok"] == 0:
            print(f"{row['label']:<14} {mname:<28} FAILED: {row['error'][:80]}")
            continue
        print(f"{row['label']:<14} {mname:<28} {_fmt(row['sec_median'], 4):>9} {_fmt(row['sec_min'], 4):>9} "
              f"{_fmt(row['peak_mb'], 0):>9} {_fmt(row['ratio_vs_plain'], 2):>8} {_fmt(row['loadavg'], 2):>5}")
    print("(s/step: median over timed steps, median over rounds; peak MB: growth of peak RSS in the "
          "run's own subprocess; x plain: s/step ratio to the plain voxelmorph step)")

    # ---- ratios and goal ----
    print()
    print(f"ratios ours / plain (s/step); goal: {GOAL_MODEL} <= {GOAL_RATIO:.2f}x plain")
    for cfg in args.configs:
        plain = agg.get((cfg, "plain", False))
        if plain is None or plain["sec_median"] != plain["sec_median"]:
            print(f"  {cfg}: no plain measurement")
            continue
        parts = [f"{m} {agg[(cfg, m, False)]['ratio_vs_plain']:.2f}x" for m in args.models
                 if m != "plain" and agg[(cfg, m, False)]["ratio_vs_plain"] == agg[(cfg, m, False)]["ratio_vs_plain"]]
        line = f"  {plain['label']}: " + ", ".join(parts)
        goal = agg.get((cfg, GOAL_MODEL, False))
        if goal is not None and goal["ratio_vs_plain"] == goal["ratio_vs_plain"]:
            met = goal["ratio_vs_plain"] <= GOAL_RATIO
            line += f"  -> goal {'MET' if met else 'NOT MET'} ({goal['ratio_vs_plain']:.2f}x)"
        print(line)

    pairs = [("sa_elastic", "plain_unrolled", "both unrolled"), ("sa_elastic_mapfn", "plain", "both map_fn"),
             ("sa_elastic", "sa_elastic_mapfn", "ours: unrolled / map_fn"),
             ("plain_unrolled", "plain", "plain: unrolled / map_fn")]
    lines = []
    for cfg in args.configs:
        for a, b, what in pairs:
            ra, rb = agg.get((cfg, a, False)), agg.get((cfg, b, False))
            if ra and rb and ra["sec_median"] == ra["sec_median"] and rb["sec_median"] == rb["sec_median"]:
                lines.append(f"  {ra['label']}: {a} / {b} ({what}) = {ra['sec_median'] / rb['sec_median']:.2f}x "
                             f"s/step, first step {ra['first_step_s']:.1f} s / {rb['first_step_s']:.1f} s")
    if lines:
        print()
        print("like-for-like ratios (first step = tracing + compilation + one step):")
        print("\n".join(lines))

    if args.determinism:
        print()
        print("determinism cost (enable_op_determinism on / off, s/step):")
        for cfg in args.determinism_configs:
            for m in args.determinism_models:
                on, off = agg.get((cfg, m, True)), agg.get((cfg, m, False))
                if on is None or off is None or off["sec_median"] != off["sec_median"]:
                    on_s = _fmt(on["sec_median"], 4) if on else "-"
                    print(f"  {cfg} {m}: on {on_s} s/step, off not measured (add it to --configs/--models)")
                    continue
                print(f"  {on['label']} {m}: on {on['sec_median']:.4f} / off {off['sec_median']:.4f} "
                      f"= {on['sec_median'] / off['sec_median']:.2f}x")


def _run_and_print_paired(args, job_for, agg) -> List[Dict]:
    print()
    new_rows: List[Dict] = []
    print("paired timing: all models of a configuration in one subprocess, steps interleaved "
          "(round r runs each model once, order rotated); ratio = median over rounds of ours/plain")
    for cfg in args.configs:
        job = dict(job_for(cfg, args.models[0], False))
        job.update(model=None, models=list(args.models), paired=True, breakdown=False)
        if args.paired_steps:
            job["steps"] = args.paired_steps
        res = _spawn(job, args.timeout * max(1, len(args.models)), args.verbose)
        label = _config_label(cfg, job["size"])
        if "error" in res:
            print(f"  {label}: FAILED {res['error']}")
            new_rows.append({"config": cfg, "label": label, "model": "(paired)", "rounds_ok": 0,
                             "error": res["error"].splitlines()[-1]})
            continue
        print(f"  {label} ({job['warmup']} warm-up + {job['steps']} interleaved rounds, load "
              f"{res['loadavg']:.2f}, subprocess {res['wall_s']:.0f} s)")
        for m in args.models:
            s = res["sec"][m]
            ratio = res["paired_ratio"].get(m)
            extra = f"  ratio {ratio:.2f}x" if ratio is not None else ""
            if m == GOAL_MODEL and ratio is not None:
                extra += f"  -> goal {'MET' if ratio <= GOAL_RATIO else 'NOT MET'}"
            print(f"    {m:<18} {s['median']:.4f} s/step (min {s['min']:.4f}){extra}")
            row = agg.get((cfg, m, False))
            if row is None:
                row = {"config": cfg, "label": label, "size": job["size"], "batch": job["batch"], "model": m,
                       "determinism": False, "steps": job["steps"], "warmup": job["warmup"],
                       "rounds_ok": 1, "loadavg": res["loadavg"]}
                new_rows.append(row)
            row["paired_sec_median"] = s["median"]
            row["paired_ratio_vs_plain"] = ratio if ratio is not None else (1.0 if m == "plain" else "")
    return new_rows


def _print_breakdown(keys, results, args) -> None:
    print()
    print("breakdown (median seconds per compiled call):")
    for cfg in args.configs:
        cols = [(m, results[(cfg, m, False)]) for m in args.models if (cfg, m, False) in results]
        cols = [(m, [r for r in rs if "breakdown" in r]) for m, rs in cols]
        cols = [(m, rs) for m, rs in cols if rs]
        if not cols:
            continue
        items: List[str] = []
        for _, rs in cols:
            for k in rs[0]["breakdown"]:
                if k not in items:
                    items.append(k)
        med = {m: {k: _median_or_nan([r["breakdown"].get(k, float("nan")) for r in rs]) for k in items}
               for m, rs in cols}
        for m in med:  # derived pieces
            b = med[m]
            b["= loss (fwd+loss - fwd)"] = b["forward+loss"] - b["forward"]
            b["= backward (grad - fwd+loss)"] = b["forward+loss+grad"] - b["forward+loss"]
            b["= Adam + rest (step - grad)"] = b["step"] - b["forward+loss+grad"]
        items += ["= loss (fwd+loss - fwd)", "= backward (grad - fwd+loss)", "= Adam + rest (step - grad)"]
        label = _config_label(cfg, cols[0][1][0]["job"]["size"])
        print(f"\n  {label}")
        w = max(len(k) for k in items) + 2
        print("  " + " " * w + "".join(f"{m:>17}" for m, _ in cols))
        for k in items:
            print("  " + f"{k:<{w}}" + "".join(f"{_fmt(med[m].get(k), 4):>17}" for m, _ in cols))


if __name__ == "__main__":
    sys.exit(main())
