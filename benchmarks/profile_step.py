#!/usr/bin/env python
"""Where the time of one CPU training step goes: the trainer's own step taken apart.

Builds exactly what the trainer builds for a preset (its parser and option checks, the dataset,
``trainer.new_config`` -> model config and ``LossConfig``, ``models.build_model``,
``trainer.make_optimizer``, ``trainer.train_batches`` and ``trainer.make_train_step``) and times,
after a warm-up, each part of a step as its own compiled ``tf.function`` (``autograph=False``, like
the trainer) on one fixed batch:

- ``data``: ``next()`` of the trainer's batch iterator (tf.data, prefetched; host side);
- ``hyperparameters``: ``trainer.sample_hyperparameters`` (runs inside the tf.data map);
- ``parameter maps``: ``params.regularization_parameters`` (per-sample values or SA maps);
- ``forward: U-Net + hypernetwork`` (inputs -> SVF), ``forward: integration + warp`` (the
  model's own rescale / scaling-and-squaring / spatial-transformer layers applied to that SVF),
  ``forward: whole model``;
- ``loss: NCC``, ``loss: regularizer`` (maps + energy), ``loss: all terms`` (``losses.loss_terms``),
  each forward only on the model's outputs;
- ``forward + loss``, ``forward + loss + gradient`` and their difference ``backward``;
- ``optimizer apply``: Adam on fixed gradients, through TensorFlow's kernels
  (``optimizer.apply_gradients``, the trainer before) and through ``trainer.xla_adam_updates``
  (one XLA-compiled function, the trainer's default now);
- ``compiled step``: the trainer's ``train_step`` on the fixed batch with its terms fetched to
  Python as the trainer's loop does (``float`` per term), with either Adam; the one with
  TensorFlow's Adam is the 100 % of the shares (where the time went before the change);
- ``trainer loop step``: ``next(batches)`` + ``train_step`` + fetch, the loop's real step.

Timing: ``--steps`` rounds; in each round every part runs once, in turn, so a change of the load
of a shared machine hits all parts alike; the table gives the median per part and its share of
the median compiled step. Parts overlap (the step contains forward, loss, backward and Adam), so
shares do not add up to 100 %; the rows ``forward + loss``, ``backward`` and ``optimizer apply``
together approximate the step.

``--candidates`` also times, in the same rounds, variants of the step that could be cheaper (the
report in benchmarks/README.md "Where a training step's time goes (CPU)" names the ones kept).

Example (the study's setting, 64 x 64 synthetic pairs, batch 1)::

    nice -n 10 .venv/bin/python benchmarks/profile_step.py --preset elastic_global --steps 200 \\
        --out outputs/profile_step.md
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import datasets  # noqa: E402
from datasets.atomic import atomic_write  # noqa: E402
from hypermorph_spatially_adaptive import trainer  # noqa: E402
from hypermorph_spatially_adaptive.configs import LossConfig  # noqa: E402
from hypermorph_spatially_adaptive.params import regularization_parameters  # noqa: E402
from tf_compat import import_voxelmorph  # noqa: E402

PRESETS = ("elastic_global", "elastic_sa")
#: the part whose median is 100 % in the shares: the step as it was before the XLA Adam updates
WHOLE = "compiled step (TensorFlow Adam)"
#: the trainer's step now (trainer.xla_adam_updates)
XLA_WHOLE = "compiled step (XLA Adam, trainer default)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="elastic_global", help="training preset to take apart")
    p.add_argument("--image-size", type=int, default=64, help="side of the square synthetic images (voxels)")
    p.add_argument("--num-pairs", type=int, default=20,
                   help="synthetic pairs generated (the step cost does not depend on it; the study uses 200)")
    p.add_argument("--profile", choices=["paper", "authors"], default="paper",
                   help="the trainer's --profile (authors: full-resolution integration, energy on the SVF)")
    p.add_argument("--steps", type=int, default=100, help="timed rounds (every part once per round)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (the first one traces)")
    p.add_argument("--threads", type=int, default=0,
                   help="TensorFlow intra-op threads (0: TensorFlow's default, one per core)")
    p.add_argument("--inter-threads", type=int, default=0,
                   help="TensorFlow inter-op threads (0: TensorFlow's default)")
    p.add_argument("--seed", type=int, default=0, help="the trainer's --seed (data order, init, hyperparameters)")
    p.add_argument("--candidates", action="store_true",
                   help="also time candidate variants of the step in the same rounds")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                   help="further options of the preset's training script (e.g. --motion 0.1 --int-steps 7); "
                        "must come last")
    p.add_argument("--out", default=None, help="write the table to this .csv or .md file")
    return p


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming an option outside its range (before TensorFlow is imported)."""
    for name, low in (("image_size", 16), ("num_pairs", 3), ("steps", 1), ("warmup", 1)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.threads < 0 or args.inter_threads < 0:
        raise ValueError("--threads and --inter-threads must be >= 0")
    if args.out and os.path.splitext(args.out)[1] not in (".csv", ".md"):
        raise ValueError(f"--out {args.out}: expected a .csv or .md file")


def training_args(args: argparse.Namespace) -> argparse.Namespace:
    """The parsed and checked options of the preset's training script for this profile run."""
    argv = ["--dataset", "synthetic", "--image-size", str(args.image_size), "--num-pairs", str(args.num_pairs),
            "--profile", args.profile, "--seed", str(args.seed), "--val-every", "0", *args.train_args]
    targs = trainer.build_parser(args.preset).parse_args(argv)
    trainer.check_args(targs)
    return targs


def integration_layers(model) -> List:
    """The model's layers after the SVF, in order: rescale / scaling-and-squaring layers (field) and
    the last spatial transformer (image). HyperVxmDense models only."""
    _, vxm, _ = import_voxelmorph()
    field = [l for l in model.layers if isinstance(l, (vxm.layers.RescaleTransform, vxm.layers.VecInt))]
    warp = [l for l in model.layers if isinstance(l, vxm.layers.SpatialTransformer)]
    if len(warp) != 1:
        raise ValueError(f"{model.name}: expected one SpatialTransformer, found {len(warp)} (CSAIN models are not "
                         "taken apart)")
    return field + warp


def time_rounds(parts: Dict[str, Callable[[], object]], steps: int, warmup: int) -> Dict[str, List[float]]:
    """Seconds of every call of every part: ``warmup`` untimed rounds, then ``steps`` timed ones,
    each round calling every part once in turn."""
    times: Dict[str, List[float]] = {k: [] for k in parts}
    for r in range(warmup + steps):
        for name, fn in parts.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


def summarize(times: Dict[str, List[float]], whole: str = WHOLE) -> List[Dict]:
    """Rows ``part, median_ms, share`` (share of the median of ``whole``), in the order of ``times``;
    ``backward`` is added as the difference of the two forward + loss medians when both were timed."""
    med = {k: statistics.median(v) for k, v in times.items() if v}
    if "forward + loss + gradient" in med and "forward + loss" in med:
        med["backward (difference)"] = med["forward + loss + gradient"] - med["forward + loss"]
    base = med[whole]
    return [{"part": k, "median_ms": 1e3 * v, "share": v / base} for k, v in med.items()]


def format_table(rows: List[Dict]) -> str:
    lines = ["| part | median ms | share of the step (TensorFlow Adam) |", "|---|---|---|"]
    lines += [f"| {r['part']} | {r['median_ms']:.2f} | {100 * r['share']:.1f} % |" for r in rows]
    return "\n".join(lines)


def write_table(path: str, rows: List[Dict], header: str) -> None:
    """``path``: the rows as CSV (``.csv``) or the markdown table under ``header``, written atomically."""
    import pandas as pd

    if path.endswith(".csv"):
        atomic_write(path, pd.DataFrame(rows, columns=["part", "median_ms", "share"]))
    else:
        atomic_write(path, header + "\n\n" + format_table(rows) + "\n")


def build_parts(args: argparse.Namespace, targs: argparse.Namespace) -> Dict[str, Callable[[], object]]:
    """The timed callables (see the module docstring), each traced by its first call."""
    import tensorflow as tf

    from hypermorph_spatially_adaptive.losses import loss_terms, ncc_map, ncc_map_voxelmorph
    from hypermorph_spatially_adaptive.models import build_model, call_model, model_inputs
    import regularizers

    dataset = datasets.dataset_from_args(targs)
    levels = len(targs.enc_features)
    summary = datasets.validate_dataset(dataset, require=("train",), multiple=2 ** levels, log=lambda line: None)
    spacing = [float(s) for s in summary["spacing"]]
    n_train = summary["sizes"]["train"]
    mc, spec, config = trainer.new_config(args.preset, targs, dataset, spacing, targs.steps, n_train, {})
    loss = LossConfig.from_run_config(config)
    fid = targs.fidelity
    use_svf = loss.reg_field == "svf"

    tf.keras.utils.set_random_seed(targs.seed)
    if not targs.no_determinism:
        tf.config.experimental.enable_op_determinism()
    strategy = tf.distribute.get_strategy()
    model = build_model(mc)
    optimizer = trainer.make_optimizer(model, targs.lr)
    step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    batches = trainer.train_batches(dataset, strategy, spec.num_params, targs, 0)
    steps = {xla: trainer.make_train_step(model, optimizer, strategy, step_var, spec, loss, int(targs.batch_size),
                                          fidelity=fid, xla_updates=xla) for xla in (False, True)}
    batch = next(batches)
    moving, fixed, seg, hyp = batch["moving"], batch["fixed"], batch["fixed_seg"], batch["hyp"]
    variables = model.trainable_variables
    fn = tf.function(autograph=False)

    svf_model = tf.keras.Model(model.inputs, model.outputs[2])
    layers = integration_layers(model)

    @fn
    def integrate(mov, svf):
        x = svf
        for layer in layers[:-1]:
            x = layer(x)
        return layers[-1]([mov, x]), x

    warped, disp, svf = call_model(model, moving, fixed, hyp, seg, training=True)
    w2, d2 = integrate(moving, svf)
    gap = float(tf.reduce_max(tf.abs(w2 - warped))) + float(tf.reduce_max(tf.abs(d2 - disp)))
    if gap > 1e-5:
        raise RuntimeError(f"integration layers do not reproduce the model's outputs (max gap {gap:.3g})")
    field = svf if use_svf else disp

    def terms(w, f):
        return loss_terms(spec, fixed, w, f, hyp, seg, loss, fid)

    hyp_args = (int(targs.seed), int(targs.batch_size), spec.num_params, float(targs.oversample_endpoints),
                trainer.resolve_fidelity(targs).constrained(spec.spatially_adaptive) and spec.regularizer == "elastic")
    k_step = tf.Variable(1, dtype=tf.int64)
    ncc = ncc_map_voxelmorph if fid.ncc == "voxelmorph" else ncc_map
    sampled = fn(lambda: trainer.sample_hyperparameters(hyp_args[0], k_step, *hyp_args[1:]))
    maps = fn(lambda: regularization_parameters(spec, hyp, seg))
    net = fn(lambda: svf_model(model_inputs(model, moving, fixed, hyp, seg), training=True))
    whole = fn(lambda: call_model(model, moving, fixed, hyp, seg, training=True))
    ncc_fwd = fn(lambda: ncc(fixed, warped, loss.ncc_win))

    def energy():
        lam, mu = regularization_parameters(spec, hyp, seg)
        return regularizers.elastic_regularizer(field, lam, mu, loss.spacing)

    reg_fwd = fn(energy)
    loss_fwd = fn(lambda: terms(warped, field))

    def fwd_loss():
        w, d, s = call_model(model, moving, fixed, hyp, seg, training=True)
        return tf.reduce_sum(terms(w, s if use_svf else d)["loss"]) / int(targs.batch_size)

    fwd_loss_fn = fn(fwd_loss)

    @fn
    def fwd_loss_grad():
        with tf.GradientTape() as tape:
            total = fwd_loss()
        return tape.gradient(total, variables)

    grads = fwd_loss_grad()
    apply = fn(lambda g: optimizer.apply_gradients(zip(g, variables)))
    xla_updates = trainer.xla_adam_updates(optimizer, variables)

    @fn
    def apply_xla(g):
        xla_updates(g)
        optimizer.iterations.assign_add(1)

    def fetch(out):
        return {k: float(v) for k, v in out.items()}

    parts = {
        "data: next batch (host)": lambda: next(batches),
        "hyperparameters (tf.data map)": lambda: sampled(),
        "parameter maps": lambda: maps(),
        "forward: U-Net + hypernetwork": lambda: net(),
        "forward: integration + warp": lambda: integrate(moving, svf),
        "forward: whole model": lambda: whole(),
        "loss: NCC": lambda: ncc_fwd(),
        "loss: regularizer": lambda: reg_fwd(),
        "loss: all terms": lambda: loss_fwd(),
        "forward + loss": lambda: fwd_loss_fn(),
        "forward + loss + gradient": lambda: fwd_loss_grad(),
        "optimizer apply (Adam, TensorFlow kernels)": lambda: apply(grads),
        "optimizer apply (Adam, XLA: trainer.xla_adam_updates)": lambda: apply_xla(grads),
        WHOLE: lambda: fetch(steps[False](batch)),
        "trainer loop step (TensorFlow Adam)": lambda: fetch(steps[False](next(batches))),
        XLA_WHOLE: lambda: fetch(steps[True](batch)),
        "trainer loop step (XLA Adam)": lambda: fetch(steps[True](next(batches))),
    }
    if args.candidates:
        parts.update(candidate_parts(model, optimizer, steps[True], batch, grads))
    return parts


def candidate_parts(model, optimizer, train_step, batch, grads) -> Dict[str, Callable[[], object]]:
    """Variants of the step measured beside it (``--candidates``)."""
    import tensorflow as tf

    variables = model.trainable_variables
    legacy = tf.keras.optimizers.legacy.Adam(learning_rate=float(optimizer.learning_rate.numpy()))
    legacy._create_all_weights(variables)  # slots now, not inside the compiled function

    @tf.function(autograph=False)
    def legacy_apply(g):
        legacy.apply_gradients(zip(g, variables))

    per_var = tf.keras.optimizers.Adam(learning_rate=float(optimizer.learning_rate.numpy()))
    per_var.jit_compile = True  # tf_keras' own XLA path (one compilation per variable), off without a GPU
    per_var.build(variables)

    @tf.function(autograph=False)
    def per_var_apply(g):
        per_var.apply_gradients(zip(g, variables))

    stacked = tf.function(lambda b: tf.stack(list(train_step(b).values())), autograph=False)
    return {
        "candidate: fused Adam kernel (legacy optimizer)": lambda: legacy_apply(grads),
        "candidate: Adam, tf_keras per-variable XLA (jit_compile)": lambda: per_var_apply(grads),
        "candidate: step (XLA Adam), terms fetched as one array": lambda: stacked(batch).numpy(),
    }


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        targs = training_args(args)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    import tensorflow as tf  # after the package import: tf_compat's shims are in place

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    if args.inter_threads:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_threads)
    parts = build_parts(args, targs)
    t0 = time.time()
    times = time_rounds(parts, args.steps, args.warmup)
    rows = summarize(times)
    header = (f"profile_step: preset {args.preset}, {args.image_size}^2, batch {targs.batch_size}, profile "
              f"{args.profile} (int-resolution {targs.int_resolution}, int-steps {targs.int_steps}), "
              f"{args.steps} rounds after {args.warmup} warm-up, intra-op threads "
              f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'}, inter-op "
              f"{tf.config.threading.get_inter_op_parallelism_threads() or 'default'}, load average "
              f"{os.getloadavg()[0]:.2f}, {time.time() - t0:.0f} s")
    print(header)
    print(format_table(rows), flush=True)
    if args.out:
        write_table(args.out, rows, header)
    return rows


if __name__ == "__main__":
    main()
