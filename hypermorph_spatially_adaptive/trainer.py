"""The one trainer behind ``train_hypermorph_{elastic,diffusion}_{global,sa}.py``.

Each script is a preset (regularizer + global/SA); everything else is shared: the data
pipeline, per-sample hyperparameter sampling, the compiled train step (``tf.function``), the
``tf.distribute`` strategy, validation, logs, atomic checkpoints and ``--resume``.

Determinism: for a given ``--seed`` the data order, the hyperparameters of every sample (drawn
with stateless RNG from ``(seed, step)``) and the weight initialization are fixed, and TF op
determinism is enabled, so a run is reproducible and a resumed run continues exactly where
the interrupted one stopped.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence

from .compat import apply as _apply_shims

_apply_shims()

PRESETS = {
    "elastic_global": ("elastic", False),
    "elastic_sa": ("elastic", True),
    "diffusion_global": ("diffusion", False),
    "diffusion_sa": ("diffusion", True),
}

LOG_FIELDS = ["step", "loss", "similarity", "regularization", "ncc", "val_loss", "val_ncc", "sec_per_step"]


def build_parser(preset: str) -> argparse.ArgumentParser:
    import datasets

    reg, sa = PRESETS[preset]
    p = argparse.ArgumentParser(
        description=f"Train the {'spatially adaptive' if sa else 'global'} HyperMorph model with the "
                    f"{reg} regularizer (preset {preset}). Writes a self-contained run folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    datasets.add_dataset_args(p)
    g = p.add_argument_group("training")
    g.add_argument("--out", default=os.path.join("runs", preset), help="run folder to write")
    g.add_argument("--steps", type=int, default=2000, help="number of optimizer steps")
    g.add_argument("--epochs", type=float, default=None,
                   help="train for this many passes over the training split instead of --steps")
    g.add_argument("--batch-size", type=int, default=1, help="global batch size")
    g.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    g.add_argument("--ncc-win", type=int, default=9, help="local NCC window per axis")
    g.add_argument("--reg-field", choices=["disp", "svf"], default="disp",
                   help="field the regularizer acts on: integrated displacement (paper) or the SVF")
    g.add_argument("--oversample-endpoints", type=float, default=0.0, metavar="P",
                   help="probability that a sampled hyperparameter is replaced by 0 or 1 "
                        "(HyperMorph's endpoint oversampling; the paper uses 0)")
    g.add_argument("--seed", type=int, default=0, help="seed for data order, hyperparameters and init")
    g.add_argument("--val-every", type=int, default=200, help="validation loss every N steps (0: never)")
    g.add_argument("--log-every", type=int, default=20, help="log/progress every N steps")
    g.add_argument("--checkpoint-every", type=int, default=500, help="checkpoint every N steps")
    g.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in --out (same optimizer state and step)")
    g.add_argument("--strategy", choices=["default", "mirrored", "multiworker"], default="default",
                   help="tf.distribute strategy: one device, MirroredStrategy over local GPUs, or "
                        "MultiWorkerMirroredStrategy configured by TF_CONFIG")
    g.add_argument("--cpu-replicas", type=int, default=0,
                   help="split the CPU into N logical devices (to try --strategy mirrored without GPUs)")
    g.add_argument("--no-determinism", action="store_true",
                   help="do not enable TF op determinism (may be faster on GPU)")
    m = p.add_argument_group("model (HyperVxmDense)")
    m.add_argument("--enc-features", type=int, nargs="+", default=[16, 32, 32, 32], help="U-Net encoder features")
    m.add_argument("--dec-features", type=int, nargs="+", default=[32, 32, 32, 32, 32, 16, 16],
                   help="U-Net decoder features")
    m.add_argument("--int-steps", type=int, default=7, help="scaling-and-squaring steps")
    m.add_argument("--int-resolution", type=int, default=2, help="relative voxel size of the integration")
    m.add_argument("--hyp-layers", type=int, default=6, help="dense layers of the hypernetwork")
    m.add_argument("--hyp-units", type=int, default=128, help="units per hypernetwork layer")
    return p


def _setup_devices(args) -> None:
    import tensorflow as tf

    if args.cpu_replicas and args.cpu_replicas > 1:
        cpus = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(args.cpu_replicas)])


def _strategy(name: str):
    import tensorflow as tf

    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def sample_hyperparameters(seed: int, step, batch: int, num_params: int, oversample: float = 0.0):
    """Per-sample hyperparameters ``[batch, num_params]`` ~ U(0, 1), stateless in ``(seed, step)``.

    With ``oversample = p > 0`` each value is independently replaced with probability ``p`` by
    an endpoint, 0 or 1 with equal odds (HyperMorph's endpoint oversampling).
    """
    import tensorflow as tf

    s = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)])
    u = tf.random.stateless_uniform([batch, num_params], seed=s)
    if oversample > 0:
        s2 = tf.stack([tf.cast(seed, tf.int64) + 7919, tf.cast(step, tf.int64)])
        r = tf.random.stateless_uniform([2, batch, num_params], seed=s2)
        u = tf.where(r[0] < oversample, tf.round(r[1]), u)
    return u


def _dataset_spacing(dataset, split: str) -> List[float]:
    """Voxel spacing (mm) used by the loss: that of the split's first pair. The loaders put all
    pairs of a dataset on one preprocessed grid, so this is the spacing of every pair."""
    pair = dataset.load_pair(dataset.split_ids(split)[0])
    return [float(s) for s in pair.spacing]


class _Progress:
    def __init__(self, name: str, total: int):
        self.name, self.total, self.tty = name, total, sys.stdout.isatty()

    def update(self, step: int, text: str, sec_per_step: float) -> None:
        eta = (self.total - step) * sec_per_step
        line = f"[{self.name}] step {step}/{self.total} {text} {sec_per_step:.3f} s/step eta {eta / 60:.1f} min"
        if self.tty:
            print("\r" + line.ljust(110), end="" if step < self.total else "\n", flush=True)
        else:
            print(line, flush=True)


def _write_checkpoint(ckpt, ckpt_dir: str, step: int, keep: int = 2) -> None:
    """tf.train.Checkpoint into a temp folder, renamed into place, then ``latest`` updated."""
    from .runio import atomic_write_text

    name = f"step_{step:08d}"
    final = os.path.join(ckpt_dir, name)
    tmp = os.path.join(ckpt_dir, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    ckpt.write(os.path.join(tmp, "ckpt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_text(os.path.join(ckpt_dir, "latest"), name + "\n")
    old = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step_") and d != name)
    for d in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)


def _latest_checkpoint(ckpt_dir: str) -> Optional[str]:
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    prefix = os.path.join(ckpt_dir, name, "ckpt")
    if not os.path.isfile(prefix + ".index"):
        raise FileNotFoundError(f"{ckpt_dir}/latest names {name}, but {prefix}.index is missing")
    return prefix


def _read_log(path: str, upto: int) -> List[Dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [r for r in csv.DictReader(f) if int(r["step"]) <= upto]


def make_optimizer(model, lr: float):
    """Adam with its slot variables created now (call inside the strategy scope).

    Slots created lazily inside the first compiled step force a second trace of the whole step
    (measured: ~40% of the tracing time).
    """
    import tensorflow as tf

    optimizer = tf.keras.optimizers.Adam(learning_rate=lr)
    optimizer.build(model.trainable_variables)
    return optimizer


def make_train_step(model, optimizer, strategy, step_var, spec, spacing, win: int, use_svf: bool,
                    global_batch: int):
    """The compiled training step: ``train_step(batch) -> {term: scalar}``.

    ``batch`` is a (distributed) dict ``moving, fixed, fixed_seg, hyp``. Each replica sums its
    per-sample loss terms and divides by the *global* batch size, so gradients add up correctly
    across replicas; the returned terms are summed over replicas (= means over the global batch).
    ``step_var`` is incremented once per call.
    """
    import tensorflow as tf

    from .losses import loss_terms

    def replica_step(batch):
        with tf.GradientTape() as tape:
            warped, disp, svf = model([batch["moving"], batch["fixed"], batch["hyp"]], training=True)
            terms = loss_terms(spec, batch["fixed"], warped, svf if use_svf else disp, batch["hyp"],
                               batch["fixed_seg"], spacing, win)
            loss = tf.reduce_sum(terms["loss"]) / global_batch
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return {k: tf.reduce_sum(v) / global_batch for k, v in terms.items()}

    # autograph=False: the step has no data-dependent Python control flow, and skipping the
    # autograph conversion of the model and loss code roughly halves the tracing time
    @tf.function(autograph=False)
    def train_step(batch):
        out = strategy.run(replica_step, args=(batch,))
        step_var.assign_add(1)
        return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in out.items()}

    return train_step


def run(preset: str, args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> str:
    """Train ``preset`` with parsed ``args``; returns the run folder."""
    _setup_devices(args)
    import numpy as np
    import tensorflow as tf

    import datasets

    from . import runio
    from .losses import loss_terms
    from .models import ModelConfig, build_model

    reg, sa = PRESETS[preset]
    tf.keras.utils.set_random_seed(args.seed)
    if not args.no_determinism:
        tf.config.experimental.enable_op_determinism()
    run_dir = args.out
    ckpt_dir = os.path.join(run_dir, "checkpoints")

    dataset = datasets.dataset_from_args(args)
    n_train = len(dataset.split_ids("train"))
    steps = args.steps if args.epochs is None else int(math.ceil(args.epochs * n_train / args.batch_size))
    spacing = _dataset_spacing(dataset, "train")
    mc = ModelConfig(image_shape=tuple(dataset.image_shape), regularizer=reg, spatially_adaptive=sa,
                     num_classes=dataset.num_classes, enc_features=tuple(args.enc_features),
                     dec_features=tuple(args.dec_features), int_steps=args.int_steps,
                     int_resolution=args.int_resolution, hyp_layers=args.hyp_layers, hyp_units=args.hyp_units)
    mc.validate()
    spec = mc.spec
    config = {
        "preset": preset, "model": mc.to_dict(),
        "hyperparameters": spec.names(dataset.class_names), "class_names": list(dataset.class_names),
        "loss": {"ncc_win": args.ncc_win, "reg_field": args.reg_field, "spacing": spacing,
                 "hyp_sampling": "per-sample U(0,1)", "oversample_endpoints": args.oversample_endpoints},
        "training": {"steps": steps, "batch_size": args.batch_size, "lr": args.lr, "optimizer": "Adam",
                     "strategy": args.strategy, "n_train_pairs": n_train},
        "data": datasets.dataset_options(args), "seed": args.seed, "versions": runio.versions(),
        "command": [os.path.basename(sys.argv[0])] + list(argv if argv is not None else sys.argv[1:]),
        "finished": False,
    }

    resume_prefix = None
    if args.resume:
        resume_prefix = _latest_checkpoint(ckpt_dir)
        if resume_prefix is None:
            print(f"[{preset}] --resume: no checkpoint in {ckpt_dir}, starting from scratch", flush=True)
        else:
            old = runio.load_config(run_dir)
            if old["preset"] != preset or old["model"] != config["model"]:
                raise ValueError(f"{run_dir}: --resume with a different preset or architecture "
                                 f"(saved {old['preset']} {old['model']}, now {preset} {config['model']})")
    elif os.path.isfile(os.path.join(run_dir, runio.CONFIG_NAME)):
        print(f"[{preset}] {run_dir} already holds a run; it is overwritten (use --resume to continue it)",
              flush=True)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        shutil.rmtree(os.path.join(run_dir, "tensorboard"), ignore_errors=True)
    os.makedirs(run_dir, exist_ok=True)
    runio.save_config(run_dir, config)

    strategy = _strategy(args.strategy)
    replicas = strategy.num_replicas_in_sync
    if args.batch_size % replicas:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the {replicas} replicas")
    with strategy.scope():
        model = build_model(mc)
        optimizer = make_optimizer(model, args.lr)
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_var)
    if resume_prefix is not None:
        ckpt.read(resume_prefix).assert_existing_objects_matched()
        print(f"[{preset}] resumed from {resume_prefix} at step {int(step_var.numpy())}", flush=True)
    start = int(step_var.numpy())

    # data: deterministic stream of batches; batch k always carries the same pairs and the
    # hyperparameters drawn from (seed, k), so skipping `start` batches resumes exactly
    seed = int(args.seed)
    nparams, oversample, bsz = spec.num_params, float(args.oversample_endpoints), int(args.batch_size)

    def add_hyp(k, batch):
        batch = dict(batch)
        batch["hyp"] = sample_hyperparameters(seed, k, bsz, nparams, oversample)
        return batch

    ds = datasets.make_tf_dataset(dataset, "train", bsz, seed, shuffle=True, repeat=True)
    ds = ds.enumerate().skip(start).map(add_hyp).prefetch(tf.data.AUTOTUNE)
    it = iter(strategy.experimental_distribute_dataset(ds))

    use_svf = args.reg_field == "svf"
    win = int(args.ncc_win)

    train_step = make_train_step(model, optimizer, strategy, step_var, spec, spacing, win, use_svf, bsz)

    # validation: every val pair with fixed hyperparameters (seeded), one compiled forward pass
    val_ids = dataset.split_ids("val") if args.val_every > 0 else []
    val = dataset.arrays("val") if val_ids else None

    @tf.function(autograph=False)
    def eval_batch(moving, fixed, seg, hyp):
        warped, disp, svf = model([moving, fixed, hyp], training=False)
        t = loss_terms(spec, fixed, warped, svf if use_svf else disp, hyp, seg, spacing, win)
        return t["loss"], t["ncc"]

    def validate():
        if val is None:
            return float("nan"), float("nan")
        losses, nccs = [], []
        n = len(val["fixed"])
        hyp_all = sample_hyperparameters(seed + 104729, 0, n, nparams).numpy()
        for i in range(0, n, bsz):
            sl = slice(i, i + bsz)
            l, c = eval_batch(val["moving"][sl], val["fixed"][sl], val["fixed_seg"][sl], hyp_all[sl])
            losses.append(l.numpy())
            nccs.append(c.numpy())
        return float(np.mean(np.concatenate(losses))), float(np.mean(np.concatenate(nccs)))

    log_path = os.path.join(run_dir, "train_log.csv")
    rows = _read_log(log_path, start) if resume_prefix else []
    writer = tf.summary.create_file_writer(os.path.join(run_dir, "tensorboard"))
    progress = _Progress(preset, steps)
    acc: Dict[str, List[float]] = {}
    t_last, n_last = time.time(), 0
    t0 = time.time()
    print(f"[{preset}] {n_train} training pairs, image {tuple(mc.image_shape)}, {spec.num_params} "
          f"hyperparameters, {steps} steps, batch {bsz}, {replicas} replica(s) -> {run_dir}", flush=True)
    if start == 0 and val is not None:  # step-0 validation: the untrained baseline of the curve
        v_loss, v_ncc = validate()
        rows.append({"step": 0, "loss": "", "similarity": "", "regularization": "", "ncc": "",
                     "val_loss": v_loss, "val_ncc": v_ncc, "sec_per_step": ""})
    for step in range(start + 1, steps + 1):
        out = train_step(next(it))
        for k, v in out.items():
            acc.setdefault(k, []).append(float(v))
        n_last += 1
        val_due = args.val_every > 0 and (step % args.val_every == 0 or step == steps)
        if step % args.log_every == 0 or step == steps or val_due:
            sps = (time.time() - t_last) / max(n_last, 1)
            row = {"step": step, **{k: float(np.mean(v)) for k, v in acc.items()},
                   "val_loss": "", "val_ncc": "", "sec_per_step": sps}
            if val_due:
                row["val_loss"], row["val_ncc"] = validate()
            if not all(np.isfinite(row[k]) for k in ("loss", "ncc")):
                raise FloatingPointError(f"[{preset}] non-finite loss at step {step}: {row}")
            rows.append(row)
            with writer.as_default(step=step):
                for k in ("loss", "similarity", "regularization", "ncc", "val_loss", "val_ncc"):
                    if row[k] != "":
                        tf.summary.scalar(k, row[k])
            runio.atomic_save(log_path, lambda tmp: _write_log(tmp, rows))
            val_txt = f" val {row['val_loss']:.4f}" if row["val_loss"] != "" else ""
            progress.update(step, f"loss {row['loss']:.4f} (ncc {row['ncc']:.3f} reg {row['regularization']:.4f}){val_txt}", sps)
            acc, t_last, n_last = {}, time.time(), 0
        if step % args.checkpoint_every == 0 and step < steps:
            _write_checkpoint(ckpt, ckpt_dir, step)
    writer.flush()
    _write_checkpoint(ckpt, ckpt_dir, steps)
    runio.atomic_save(os.path.join(run_dir, runio.WEIGHTS_NAME), lambda tmp: model.save_weights(tmp))
    config.update(finished=True, final_step=steps, train_seconds=round(time.time() - t0, 1))
    runio.save_config(run_dir, config)
    print(f"[{preset}] done in {time.time() - t0:.0f} s -> {run_dir}", flush=True)
    return run_dir


def _write_log(path: str, rows: List[Dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def main(preset: str, argv: Optional[Sequence[str]] = None) -> str:
    """Entry point of the four training scripts."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    args = build_parser(preset).parse_args(argv)
    return run(preset, args, argv)
