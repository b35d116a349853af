"""The one trainer behind ``train_hypermorph_{elastic,diffusion}_{global,sa}.py``.

Each script is a preset (regularizer + global/SA); everything else is shared: the data
pipeline, per-sample hyperparameter sampling, the compiled train step (``tf.function``), the
``tf.distribute`` strategy, validation, logs, atomic checkpoints and ``--resume``.

Run folders never lie and never vanish:

- a run folder is recognized by its ``config.json`` *content* (a JSON object with ``format``
  :data:`.artifacts.RUN_FORMAT`, or, for runs made before the marker, ``preset`` and ``model``), never
  by the file name alone; any other non-empty folder is refused, never written or deleted;
- training into a run folder refuses unless ``--resume`` (continue the run in it) or
  ``--overwrite`` (replace it, derived outputs such as ``identification/`` included).
  ``--overwrite`` first checks every option and the whole dataset, then renames the old run to
  a hidden sibling (:func:`.folders.move_aside`) that is deleted only once the new run has
  written its first checkpoint; an attempt that fails before that puts the old run back, and a
  failed first attempt into a new folder leaves nothing that would block the corrected command;
- one process at a time: the folder is locked while it is written (:class:`.folders.FolderLock`,
  a stale lock of a dead process is taken over);
- ``config.json`` records ``provenance`` (:mod:`.provenance`): sha256 of the data per split and,
  at the end, of ``weights.h5``; ``--resume`` refuses data whose hash changed. Its ``command`` is
  the preset's training script with its arguments, also when run_pipeline.py trained it, so it
  replays;
- ``--resume`` refuses any change of the options that decide the weights (data, loss,
  optimizer, architecture, seed, batch size; :data:`RESUME_MAY_CHANGE` lists those that may
  change: the step target ``--steps``/``--epochs`` may grow, logging/validation/checkpoint
  intervals, strategy, devices) and names each changed option; the original ``command`` stays
  in ``config.json`` and every resume adds a dated entry to ``resumed``;
- every argument is checked at parse time and the dataset (every pair of every split) before
  the first model is built (:func:`datasets.validate_dataset`).

``--profile paper|authors`` (:mod:`.profiles`, docs/fidelity.md) sets the defaults of the settings where
the paper text and the authors' released code differ (integration resolution, regularized field,
endpoint oversampling, constrained elastic sampling, similarity weight, diffusion energy scale, NCC
numerics); each is also its own option. The resolved settings are ``config.json["fidelity"]``
(runs made before it: ``paper`` with their recorded three settings) and ``--resume`` refuses a change.

Determinism: for a given ``--seed`` the data order, the hyperparameters of every sample (drawn
with stateless RNG from ``(seed, step)``) and the weight initialization are fixed, and TF op
determinism is enabled, so a run is reproducible and a resumed run continues exactly where
the interrupted one stopped.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

import datasets
from datasets.atomic import atomic_write
from tf_compat import xla_matches_tensorflow

from . import artifacts as art
from . import folders, run_folder
from .artifacts import file_sha256, run_config_problem
from .cli import arg_float, arg_int
from .configs import LossConfig
from .folders import FolderLock
from .params import HypMapping
from .profiles import CHOICES, PROFILES, TRAINING_FIELDS, Fidelity
from .provenance import data_hashes, data_mismatches


PRESETS = {
    "elastic_global": ("elastic", False),
    "elastic_sa": ("elastic", True),
    "diffusion_global": ("diffusion", False),
    "diffusion_sa": ("diffusion", True),
}

#: config.json entries (dotted) that ``--resume`` may change; any other difference is refused
RESUME_MAY_CHANGE = ("training.steps", "training.epochs", "training.strategy", "training.val_every",
                     "training.log_every", "training.checkpoint_every", "training.determinism")

#: command-line option behind a config.json entry, for refusal messages (default: --<key>)
_OPTION_NAMES = {"data.name": "--dataset", "training.n_train_pairs": "number of training pairs (dataset)",
                 "training.optimizer": "optimizer", "loss.spacing": "voxel spacing (dataset)",
                 "loss.hyp_sampling": "hyperparameter sampling", "model.image_shape": "image size (dataset)",
                 "model.num_classes": "number of classes (dataset)", "class_names": "class names (dataset)",
                 "hyperparameters": "hyperparameter names (classes)", "preset": "preset (training script)",
                 "model.regularizer": "preset (training script)",
                 "model.spatially_adaptive": "preset (training script)", "fidelity.profile": "--profile",
                 "fidelity.ncc": "--ncc-numerics", "fidelity.background": "--profile (identification default)",
                 "fidelity.zero_point": "--profile (identification default)",
                 "fidelity.objective": "--profile (identification default)",
                 "fidelity.unit": "--profile (identification default)"}

#: values that config.json entries added later had before they existed: a run saved without
#: them is compared (``--resume``) as if it had these, so older runs still resume
LEGACY_DEFAULTS = {"model.conditioning": "hypernetwork", "model.smooth_sigma": 0.0, "model.weight_range": "unit",
                   "model.csain_blocks": 2}

LOG_FIELDS = ["step", "loss", "similarity", "regularization", "ncc", "val_loss", "val_ncc", "sec_per_step"]


def _add_optimization_args(g: argparse._ArgumentGroup, preset: str) -> None:
    """Run folder, step budget, batch size and learning rate (into the ``training`` group)."""
    g.add_argument("--out", default=os.path.join("runs", preset), help="run folder to write")
    g.add_argument("--steps", type=arg_int(1), default=2000, help="number of optimizer steps")
    g.add_argument("--epochs", type=arg_float(0.0), default=None,
                   help="train for this many passes over the training split instead of --steps")
    g.add_argument("--batch-size", type=arg_int(1), default=1, help="global batch size")
    g.add_argument("--lr", type=arg_float(0.0), default=1e-4, help="Adam learning rate")


def _add_loss_args(g: argparse._ArgumentGroup) -> None:
    """Similarity window, regularized field, energy scale, hyperparameter mapping and sampling."""
    g.add_argument("--ncc-win", type=arg_int(1, odd=True), default=9, help="local NCC window per axis (odd)")
    g.add_argument("--profile", choices=list(PROFILES), default="paper",
                   help="defaults of every setting where the paper text and the authors' released code differ "
                        "(docs/fidelity.md): paper = the paper text as this project reads it; authors = the authors' "
                        "code (--int-resolution 1, --reg-field svf, --oversample-endpoints 0.2, --elastic-sampling "
                        "constrained-global, --similarity-weight authors, --diffusion-energy voxelmorph, "
                        "--ncc-numerics voxelmorph; identification defaults recorded for the later stages). Each "
                        "setting below overrides its profile value. Saved in config.json 'fidelity'")
    g.add_argument("--reg-field", choices=["disp", "svf"], default=argparse.SUPPRESS,
                   help="field the energy acts on: disp = the integrated displacement u (paper text, eq. 1); svf = "
                        "the stationary velocity field before integration (authors' code: voxelmorph's default "
                        "reg_field). Default: the profile's (paper disp, authors svf)")
    g.add_argument("--elastic-sampling", choices=list(CHOICES["elastic_sampling"]), default=argparse.SUPPRESS,
                   help="elastic presets: independent = lambda, mu ~ U(0, 1) each (paper text); constrained-global = "
                        "the global preset draws mu ~ U[0, 1 - lambda] (authors' code, train_hypermorph_elastic.py; "
                        "their SA script samples independently); constrained = every elastic preset, per class. "
                        "Default: the profile's (paper independent, authors constrained-global)")
    g.add_argument("--similarity-weight", choices=list(CHOICES["similarity_weight"]), default=argparse.SUPPRESS,
                   help="elastic similarity weight: paper = 2 - Lambda - Gamma (paper text, eq. 1); authors = "
                        "1 - Lambda - Gamma (authors' code) clipped at 0 (their SA script lets it go negative). "
                        "Diffusion: 1 - W in both. Default: the profile's")
    g.add_argument("--diffusion-energy", choices=list(CHOICES["diffusion_energy"]), default=argparse.SUPPRESS,
                   help="diffusion energy scale: sum = w * sum_ij (d_i u_j)^2 averaged over voxels (this project); "
                        "voxelmorph = voxelmorph's Grad('l2') (authors' code): mean squared difference over valid "
                        "differences and components, summed over axes, / D (about 1/D^2 of sum). Default: the "
                        "profile's (paper sum, authors voxelmorph)")
    g.add_argument("--ncc-numerics", choices=list(CHOICES["ncc"]), default=argparse.SUPPRESS,
                   help="local NCC: clipped = border windows over the inside voxels, cross term squared (this "
                        "project); voxelmorph = voxelmorph's NCC (authors' code): cross term and variances clamped "
                        "at eps, zero-padded border windows over the full window. Default: the profile's")
    g.add_argument("--crop-in-loss", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                   help="zero the warped image where the fixed image is 0 before the similarity (authors' code "
                        "crop_in_loss: their NLST and LungCT training; the fixed images are 0 outside the body mask "
                        "or the padded field of view). Default: the dataset's (on for nlst and l2r-lung, off "
                        "elsewhere), under either profile. Saved in config.json 'fidelity'")
    g.add_argument("--energy-scale", type=arg_float(0.0), default=1.0, metavar="K",
                   help="factor K on the regularization energy in the loss (1 = paper text, eq. 1). The paper's "
                        "energy is ~1/100 of the similarity term on breathing-like motion, so the networks barely "
                        "respond to their hyperparameters; benchmarks/calibrate_energy.py proposes K for a dataset "
                        "(docs/extensions.md 'Calibrated energy'). Saved in config.json; refinement uses the run's K")
    g.add_argument("--hyp-mapping", choices=["linear", "log"], default="linear",
                   help="how the hyperparameters h in [0, 1] become weights: linear = paper text, eq. 1 (weight h, "
                        "similarity weighted by 2 - lambda - mu or 1 - w); log = weight 0.5 * 10^(D (h - 0.5)) with "
                        "unit similarity weight (equal to linear at h = 0.5; docs/extensions.md 'Calibrated energy')")
    g.add_argument("--log-decades", type=arg_float(0.0), default=2.0, metavar="D",
                   help="--hyp-mapping log: decades of regularization strength the box spans")
    g.add_argument("--oversample-endpoints", type=arg_float(0.0, 1.0, inclusive=True), default=argparse.SUPPRESS,
                   metavar="P",
                   help="probability that a sampled hyperparameter is replaced by 0 or 1 (HyperMorph's endpoint "
                        "oversampling). The paper text names plain U(0, 1) sampling; the authors' code "
                        "(utils.random_hyperparam) uses 0.2. Default: the profile's (paper 0, authors 0.2)")


def _add_session_args(g: argparse._ArgumentGroup) -> None:
    """Seed, logging/validation/checkpoint intervals, resume/overwrite, devices and determinism."""
    g.add_argument("--seed", type=arg_int(0), default=0, help="seed for data order, hyperparameters and init")
    g.add_argument("--val-every", type=arg_int(0), default=200, help="validation loss every N steps (0: never)")
    g.add_argument("--log-every", type=arg_int(1), default=20, help="log/progress every N steps")
    g.add_argument("--checkpoint-every", type=arg_int(1), default=500, help="checkpoint every N steps")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (same optimizer state and step); "
                        "refused if a data, loss, optimizer or architecture option differs from its config.json "
                        "(the step target --steps may grow)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (weights, checkpoints, logs, derived outputs such as "
                        "identification/): after every check it is moved aside and deleted once the new run has "
                        "its first checkpoint (restored if the new run fails before); without it (or --resume) "
                        "a non-empty --out is refused, and a folder that is not a run is never replaced")
    g.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    g.add_argument("--strategy", choices=["default", "mirrored", "multiworker"], default="default",
                   help="tf.distribute strategy: one device, MirroredStrategy over local GPUs, or "
                        "MultiWorkerMirroredStrategy configured by TF_CONFIG")
    g.add_argument("--cpu-replicas", type=arg_int(0), default=0,
                   help="split the CPU into N logical devices (to try --strategy mirrored without GPUs)")
    g.add_argument("--no-determinism", action="store_true",
                   help="do not enable TF op determinism (may be faster on GPU)")


def _add_model_args(m: argparse._ArgumentGroup) -> None:
    """The HyperVxmDense architecture: U-Net features, integration and hypernetwork size."""
    m.add_argument("--enc-features", type=arg_int(1), nargs="+", default=[16, 32, 32, 32],
                   help="U-Net encoder features (image sizes must be divisible by 2^levels, 16 by default)")
    m.add_argument("--dec-features", type=arg_int(1), nargs="+", default=[32, 32, 32, 32, 32, 16, 16],
                   help="U-Net decoder features")
    m.add_argument("--int-steps", type=arg_int(0), default=7, help="scaling-and-squaring steps")
    m.add_argument("--int-resolution", type=arg_int(1), default=argparse.SUPPRESS,
                   help="relative voxel size of the scaling-and-squaring integration (the paper text gives none; "
                        "authors' code: 1). Default: the profile's (paper 2, authors 1)")
    m.add_argument("--hyp-layers", type=arg_int(1), default=6, help="dense layers of the hypernetwork")
    m.add_argument("--hyp-units", type=arg_int(1), default=128, help="units per hypernetwork layer")


def _add_conditioning_args(c: argparse._ArgumentGroup) -> None:
    """Spatially adaptive presets only: conditioning (hypernetwork / CSAIN), map smoothing, weight range."""
    c.add_argument("--conditioning", choices=["hypernetwork", "csain"], default="hypernetwork",
                   help="hypernetwork: HyperMorph (per-class values -> hyper-convolutions); csain: the same "
                        "U-Net conditioned on the voxelwise parameter map by CSAIN layers (Wang et al.; "
                        "--hyp-layers/--hyp-units unused)")
    c.add_argument("--smooth-maps", type=arg_float(0.0, inclusive=True), default=0.0, metavar="SIGMA",
                   help="Gaussian-smooth the parameter maps with this sigma in voxels (window 2 ceil(2.5 sigma) "
                        "+ 1; CSAIN paper: 0.8, window 5) in the loss, the CSAIN input, validation and every "
                        "later stage; 0: piecewise constant maps")
    c.add_argument("--weight-range", choices=["unit", "paper"], default="unit",
                   help="unit: hyperparameters in [0, 1] are the weights of paper eq. (1); paper: the CSAIN "
                        "paper's loss, regularization weights 10 * hyp ~ U(0, 10) and unit similarity weight "
                        "(hyp stays in [0, 1] in every file)")
    c.add_argument("--csain-blocks", type=arg_int(0), default=2,
                   help="CSAIN residual blocks at the U-Net bottleneck (--conditioning csain)")


def build_parser(preset: str) -> argparse.ArgumentParser:
    """The command line of one preset (every value checked at parse time)."""
    reg, sa = PRESETS[preset]
    p = argparse.ArgumentParser(
        description=f"Train the {'spatially adaptive' if sa else 'global'} HyperMorph model with the "
                    f"{reg} regularizer (preset {preset}). Writes a self-contained run folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    datasets.add_dataset_args(p)
    p.set_defaults(preset=preset)
    g = p.add_argument_group("training")
    _add_optimization_args(g, preset)
    _add_loss_args(g)
    _add_session_args(g)
    _add_model_args(p.add_argument_group("model (HyperVxmDense)"))
    if sa:
        _add_conditioning_args(p.add_argument_group("conditioning and parameter maps (spatially adaptive presets)"))
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


def sample_hyperparameters(seed: int, step, batch: int, num_params: int, oversample: float = 0.0,
                           constrain: bool = False):
    """Per-sample hyperparameters ``[batch, num_params]`` ~ U(0, 1), stateless in ``(seed, step)``.

    With ``oversample = p > 0`` each value is independently replaced with probability ``p`` by
    an endpoint, 0 or 1 with equal odds (HyperMorph's endpoint oversampling).
    With ``constrain`` (elastic layout ``[lambda..., mu...]``, even ``num_params``) each ``mu`` is
    scaled by ``1 - lambda`` of its class: ``mu ~ U[0, 1 - lambda]`` with its endpoints ``0`` and
    ``1 - lambda`` oversampled alike (the authors' ``random_hyperparam_in_range([0, 1 - lam])``),
    so ``lambda + mu <= 1``.
    """
    import tensorflow as tf

    s = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)])
    u = tf.random.stateless_uniform([batch, num_params], seed=s)
    if oversample > 0:
        s2 = tf.stack([tf.cast(seed, tf.int64) + 7919, tf.cast(step, tf.int64)])
        r = tf.random.stateless_uniform([2, batch, num_params], seed=s2)
        u = tf.where(r[0] < oversample, tf.round(r[1]), u)
    if constrain:
        if num_params % 2:
            raise ValueError(f"constrained sampling needs the elastic layout [lambda..., mu...]; got {num_params} values")
        k = num_params // 2
        u = tf.concat([u[:, :k], u[:, k:] * (1.0 - u[:, :k])], axis=1)
    return u



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
    name = f"step_{step:08d}"
    final = os.path.join(ckpt_dir, name)
    tmp = os.path.join(ckpt_dir, f".tmp-{name}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        ckpt.write(os.path.join(tmp, "ckpt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write(os.path.join(ckpt_dir, "latest"), name + "\n")
    except Exception as exc:  # OSError (disk full, quota, read-only) or TensorFlow's own write errors
        shutil.rmtree(tmp, ignore_errors=True)
        if not (isinstance(exc, OSError) or type(exc).__module__.startswith("tensorflow")):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OSError(f"{ckpt_dir}: cannot write the checkpoint of step {step} ({type(exc).__name__}: {first}); "
                      f"its temporary folder was removed and the previous checkpoint (if any) is intact: free "
                      f"disk space and rerun with --resume") from exc
    old = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step_") and d != name)
    for d in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)


def _flatten(d: Dict, prefix: str = "") -> Dict[str, object]:
    out: Dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def option_name(key: str) -> str:
    """The command-line option behind a dotted config.json key (``loss.ncc_win`` -> ``--ncc-win``)."""
    return _OPTION_NAMES.get(key, "--" + key.rsplit(".", 1)[-1].replace("_", "-"))


def changed_options(old: Dict, new: Dict) -> Dict[str, Tuple[object, object]]:
    """``{dotted key: (old, new)}`` for the result-deciding entries of ``new`` that differ in ``old``
    (entries in :data:`RESUME_MAY_CHANGE` and bookkeeping are ignored)."""
    skip = ("command", "versions", "finished", "final_step", "train_seconds", "resumed", "provenance", "format")
    a, b = _flatten(old), _flatten(new)
    a = {**{k: v for k, v in LEGACY_DEFAULTS.items() if k not in a}, **a}
    return {k: (a.get(k), v) for k, v in b.items()
            if not k.startswith(skip) and k not in RESUME_MAY_CHANGE and a.get(k) != v}


def _refuse_changes(run_dir: str, old: Dict, new: Dict) -> None:
    """ValueError naming every option whose value differs from the run being resumed."""
    diff = changed_options(old, new)
    if not diff:
        return
    by_option: Dict[str, List[str]] = {}
    for key, (a, b) in diff.items():
        by_option.setdefault(option_name(key), []).append(f"{json.dumps(a)} -> {json.dumps(b)}")
    what = "; ".join(f"{opt} {', '.join(v)}" for opt, v in by_option.items())
    raise ValueError(
        f"{run_dir}: --resume refused: changed {what} (config.json records what produced the run's "
        f"weights; its command: {' '.join(old.get('command', []))}). Resume with the original options, "
        f"or start over with --overwrite or another --out")


def _folder_state(run_dir: str):
    """``("empty", None)``, ``("run", config)`` or ``("foreign", reason)`` for ``run_dir``."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        return "foreign", "is a file, not a folder"
    entries = sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []
    if not entries:
        return "empty", None
    listing = f"{', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}"
    if not os.path.isfile(os.path.join(run_dir, art.CONFIG)):
        return "foreign", f"is not empty ({listing}) and holds no run (no config.json)"
    try:
        with open(os.path.join(run_dir, art.CONFIG)) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        return "foreign", f"holds a config.json that is not readable JSON ({type(exc).__name__}) besides {listing}"
    problem = run_config_problem(config, PRESETS)
    if problem:
        return "foreign", f"holds a config.json that is not a run config of this code ({problem}) besides {listing}"
    if isinstance(config.get("loss"), dict):  # runs made before these options existed: K = 1, linear
        trained_with = LossConfig()
        config["loss"].setdefault("energy_scale", trained_with.energy_scale)
        config["loss"].setdefault("hyp_mapping", trained_with.hyp_mapping.to_dict())

    # runs made before --profile: paper runs with their own three settings; settings added since
    # (crop_in_loss) take the value those runs were trained with (off)
    config["fidelity"] = Fidelity.from_run_config(config).to_dict()
    return "run", config


def _describe(config: Dict) -> str:
    """``a finished elastic_sa run (2000 steps)`` / ``an unfinished ... (target N steps)``."""
    if config.get("finished"):
        return f"a finished {config.get('preset')} run ({config.get('final_step')} steps)"
    return f"an unfinished {config.get('preset')} run (target {config.get('training', {}).get('steps')} steps)"


def resolve_fidelity(args: argparse.Namespace):
    """The run's :class:`.profiles.Fidelity`: the ``--profile`` defaults with every setting given on
    the command line; also sets ``args.int_resolution``, ``args.reg_field`` and
    ``args.oversample_endpoints`` (idempotent) and ``args.fidelity``."""
    given = {"int_resolution": getattr(args, "int_resolution", None), "reg_field": getattr(args, "reg_field", None),
             "oversample_endpoints": getattr(args, "oversample_endpoints", None),
             "elastic_sampling": getattr(args, "elastic_sampling", None),
             "similarity_weight": getattr(args, "similarity_weight", None),
             "diffusion_energy": getattr(args, "diffusion_energy", None), "ncc": getattr(args, "ncc_numerics", None),
             "crop_in_loss": getattr(args, "crop_in_loss", None)}
    if given["crop_in_loss"] is None and getattr(args, "dataset", None):  # the dataset's default (authors' code)

        given["crop_in_loss"] = bool(getattr(datasets.dataset_class(args.dataset), "crop_in_loss_default", False))
    fid = Fidelity.of(getattr(args, "profile", "paper"), **given)
    for name in TRAINING_FIELDS:
        setattr(args, "ncc_numerics" if name == "ncc" else name, getattr(fid, name))
    args.fidelity = fid
    return fid


def check_args(args: argparse.Namespace) -> None:
    """Checks of parsed options that argparse types cannot express (ValueError naming them); resolves
    the fidelity settings (:func:`resolve_fidelity`)."""
    resolve_fidelity(args)
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run or replace it")
    if len(args.dec_features) < len(args.enc_features):
        raise ValueError(f"--dec-features needs at least as many values as --enc-features "
                         f"({len(args.enc_features)}), got {len(args.dec_features)}")
    if getattr(args, "weight_range", "unit") == "paper" and args.hyp_mapping != "linear":
        raise ValueError("--weight-range paper (weights 10 h, unit similarity weight) and --hyp-mapping "
                         f"{args.hyp_mapping} are two different weightings: choose one")


def check_ncc_window(args: argparse.Namespace, image_shape: Sequence[int]) -> None:
    """Refuse an ``--ncc-win`` longer than the smallest image side (the window would be mostly
    zero padding, so the similarity would no longer be local); ``ValueError`` naming the option."""
    side = min(int(n) for n in image_shape)
    if int(args.ncc_win) > side:
        largest = side if side % 2 else side - 1
        raise ValueError(f"--ncc-win {args.ncc_win} is longer than the smallest image side ({side} voxels of "
                         f"{' x '.join(str(int(n)) for n in image_shape)}); use an odd window <= {largest} "
                         "(the default 9 suits most images)")


def _check_folder(args: argparse.Namespace):
    """Refuse a run folder that must not be touched; returns ``(state, old config or None)``."""
    run_dir = args.out
    state, info = _folder_state(run_dir)
    if state == "foreign":
        raise ValueError(f"{run_dir} {info}; refusing to write into it or delete it (--overwrite and --resume "
                         f"only act on run folders written by the training scripts): choose another --out")
    if state == "run" and not (args.resume or args.overwrite):
        raise ValueError(f"{run_dir} already holds {_describe(info)}; use --resume to continue it, "
                         f"--overwrite to replace it (deletes its weights, checkpoints, logs and outputs "
                         f"derived from it such as identification/, once the new run has written its first "
                         f"checkpoint), or another --out")
    return state, (info if state == "run" else None)


def _args_config(preset: str, args: argparse.Namespace) -> Dict:
    """The part of config.json that follows from the command line alone (no data read)."""
    reg, sa = PRESETS[preset]
    cond = _conditioning_options(args)
    sampling = "per-sample U(0,1)" + ("; regularization weights 10 * hyp ~ U(0,10)"
                                      if cond["weight_range"] == "paper" else "")
    if reg == "elastic" and resolve_fidelity(args).constrained(sa):
        sampling += "; mu ~ U[0, 1 - lambda]"
    return {
        "preset": preset,
        "model": {"regularizer": reg, "spatially_adaptive": sa, "enc_features": list(args.enc_features),
                  "dec_features": list(args.dec_features), "int_steps": args.int_steps,
                  "int_resolution": args.int_resolution, "hyp_layers": args.hyp_layers, "hyp_units": args.hyp_units,
                  **cond},
        "fidelity": resolve_fidelity(args).to_dict(),
        "loss": LossConfig(ncc_win=args.ncc_win, reg_field=args.reg_field, hyp_sampling=sampling,
                           oversample_endpoints=args.oversample_endpoints, energy_scale=args.energy_scale,
                           hyp_mapping=_mapping(args)).to_dict(),  # "spacing" is added from the data
        "training": {"batch_size": args.batch_size, "lr": args.lr, "optimizer": "Adam", "strategy": args.strategy,
                     "epochs": args.epochs, "val_every": args.val_every, "log_every": args.log_every,
                     "checkpoint_every": args.checkpoint_every, "determinism": not args.no_determinism},
        "data": datasets.dataset_options(args), "seed": args.seed,
    }


def _mapping(args: argparse.Namespace):
    return HypMapping(args.hyp_mapping, args.log_decades)


def _conditioning_options(args: argparse.Namespace) -> Dict:
    """ModelConfig's conditioning / map entries from the options (global presets: the defaults)."""
    return {"conditioning": getattr(args, "conditioning", "hypernetwork"),
            "smooth_sigma": float(getattr(args, "smooth_maps", 0.0)),
            "weight_range": getattr(args, "weight_range", "unit"),
            "csain_blocks": int(getattr(args, "csain_blocks", 2))}


def _merge(base: Dict, extra: Dict) -> Dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


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


#: fewest trainable weights for which :func:`make_train_step` compiles Adam with XLA by default: the
#: compile (~3 s per process) pays for itself within ~50 steps of the paper's network (14M weights),
#: never in the short runs of tiny networks (``--quick``, 0.9M: +2.5-5 s per training measured)
XLA_MIN_WEIGHTS = 4_000_000


def xla_adam_updates(optimizer, variables):
    """``updates(grads)``: Adam's own ``update_step`` of every variable in one XLA-compiled function.

    Why: the hypernetwork holds ~14M weights, and Adam's dozen elementwise passes over them (each
    a TensorFlow kernel writing a temporary) were ~70 % of a 64^2 CPU step; XLA fuses them into
    one loop per variable (the update 2.4x, the step 1.4-1.7x faster; benchmarks/README.md "Where a
    training step's time goes (CPU)"). One function for all variables compiles in ~3 s, the
    per-variable XLA path tf_keras takes on a GPU (``jit_compile``) in ~20 s. The arithmetic is
    the optimizer's own, so with FMA kept out (:func:`tf_compat.xla_matches_tensorflow`) the
    weights are the same bit for bit, and so are the optimizer variables and checkpoints. The
    caller increments ``optimizer.iterations`` afterwards, as ``apply_gradients`` does.
    """
    import tensorflow as tf

    @tf.function(jit_compile=True, autograph=False)
    def updates(grads):
        for grad, var in zip(grads, variables):
            optimizer.update_step(grad, var)

    return updates


def make_train_step(model, optimizer, strategy, step_var, spec, loss: LossConfig, global_batch: int,
                    fidelity=None, xla_updates: Optional[bool] = None):
    """The compiled training step: ``train_step(batch) -> {term: scalar}``.

    ``batch`` is a (distributed) dict ``moving [B, *spatial, 1], fixed [B, *spatial, 1],
    fixed_seg [B, *spatial] int, hyp [B, P]``. ``loss`` (:class:`.configs.LossConfig`): spacing
    (mm), NCC window (voxels), energy scale ``K``, hyperparameter mapping and ``reg_field``
    (``svf``: the energy acts on the velocity field, else on the displacement). Each replica sums
    its per-sample loss terms and divides by the *global* batch size, so gradients add up correctly
    across replicas; the returned terms are summed over replicas (= means over the global batch).
    ``step_var`` is incremented once per call. ``fidelity`` (:class:`.profiles.Fidelity`, None =
    paper) selects the similarity weight, diffusion energy and NCC numerics of the loss.
    ``xla_updates`` (None: on CPU-only machines where :func:`tf_compat.xla_matches_tensorflow`, for
    networks of at least :data:`XLA_MIN_WEIGHTS` weights) applies Adam through
    :func:`xla_adam_updates` on a one-replica strategy (same weights, faster on CPU); otherwise
    ``optimizer.apply_gradients``.
    """
    import tensorflow as tf

    from .losses import loss_terms
    from .models import call_model

    use_svf = loss.reg_field == "svf"
    variables = model.trainable_variables
    if xla_updates is None:  # CPU only: on a GPU XLA's own rounding would change the weights
        xla_updates = (xla_matches_tensorflow() and not tf.config.list_logical_devices("GPU")
                       and sum(int(np.prod(v.shape)) for v in variables) >= XLA_MIN_WEIGHTS)
    updates = xla_adam_updates(optimizer, variables) if xla_updates and strategy.num_replicas_in_sync == 1 else None

    def replica_step(batch):
        with tf.GradientTape() as tape:
            warped, disp, svf = call_model(model, batch["moving"], batch["fixed"], batch["hyp"], batch["fixed_seg"],
                                           training=True)
            terms = loss_terms(spec, batch["fixed"], warped, svf if use_svf else disp, batch["hyp"],
                               batch["fixed_seg"], loss, fidelity)
            total = tf.reduce_sum(terms["loss"]) / global_batch
        grads = tape.gradient(total, variables)
        if updates is None:
            optimizer.apply_gradients(zip(grads, variables))
        else:
            updates(grads)
            optimizer.iterations.assign_add(1)
        return {k: tf.reduce_sum(v) / global_batch for k, v in terms.items()}

    # autograph=False: the step has no data-dependent Python control flow, and skipping the
    # autograph conversion of the model and loss code roughly halves the tracing time
    @tf.function(autograph=False)
    def train_step(batch):
        out = strategy.run(replica_step, args=(batch,))
        step_var.assign_add(1)
        return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in out.items()}

    return train_step


def script_command(preset: str, argv: Optional[Sequence[str]] = None) -> List[str]:
    """The command that replays a training: the preset's script and its arguments (also when
    another script, e.g. run_pipeline.py, called :func:`main` in-process)."""
    return [f"train_hypermorph_{preset}.py"] + list(argv if argv is not None else sys.argv[1:])


def run(preset: str, args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> str:
    """Train ``preset`` with parsed ``args``; returns the run folder.

    Order: check the options, lock ``--out``, refuse an untouchable ``--out`` and (``--resume``)
    changed options, validate the whole dataset, only then move an ``--overwrite``-n run aside,
    import TensorFlow and build the model (see the module docstring for the guarantees).
    """
    check_args(args)
    with FolderLock(args.out, "run folder", log=lambda line: print(line, flush=True),
                    replaceable=art.attempt_without_checkpoint):  # a dead --overwrite's old run comes back
        return _run_locked(preset, args, argv)


def _checked_data(preset: str, args: argparse.Namespace, old: Optional[Dict]) -> Tuple[object, Dict, Dict]:
    """Load and validate the whole dataset (every pair of the splits training needs); with ``old``
    (the config of the run being resumed) refuse data whose hashes changed. Returns ``(dataset,
    summary of datasets.validate_dataset, data hashes per split)``."""
    dataset = datasets.dataset_from_args(args)
    levels = len(args.enc_features)
    summary = datasets.validate_dataset(dataset, require=("train", "val") if args.val_every > 0 else ("train",),
                                        multiple=2 ** levels, log=lambda line: print(line, flush=True))
    check_ncc_window(args, summary["image_shape"])
    hashes = data_hashes(dataset)
    if old is not None:
        changed = data_mismatches((old.get("provenance") or {}).get("data"), hashes,
                                  os.path.join(args.out, art.CONFIG), "the dataset now")
        if changed:
            raise ValueError(f"{args.out}: --resume refused: {'; '.join(changed)}. Resume with the original data, "
                             f"or start over with --overwrite or another --out")
    return dataset, summary, hashes


def new_config(preset: str, args: argparse.Namespace, dataset, spacing: List[float], steps: int, n_train: int,
                hashes: Dict):
    """The model configuration, its parameter spec and the run's config.json content (before the
    command/versions or resume entries): ``(ModelConfig, ParamSpec, config)``."""
    from .models import ModelConfig

    reg, sa = PRESETS[preset]
    mc = ModelConfig(image_shape=tuple(dataset.image_shape), regularizer=reg, spatially_adaptive=sa,
                     num_classes=dataset.num_classes, enc_features=tuple(args.enc_features),
                     dec_features=tuple(args.dec_features), int_steps=args.int_steps,
                     int_resolution=args.int_resolution, hyp_layers=args.hyp_layers, hyp_units=args.hyp_units,
                     **_conditioning_options(args))
    mc.validate()
    spec = mc.spec
    config = _merge(_args_config(preset, args), {
        "model": mc.to_dict(), "hyperparameters": spec.names(dataset.class_names),
        "class_names": list(dataset.class_names), "loss": {"spacing": spacing},
        "training": {"steps": steps, "n_train_pairs": n_train}})
    config["provenance"] = {"data": hashes}
    return mc, spec, config


def _resume_config(preset: str, run_dir: str, old: Dict, config: Dict, command: List[str], hashes: Dict,
                   steps: int) -> Optional[Tuple[Dict, int]]:
    """The config of a resumed run: the old one with the options that may change updated and a
    dated ``resumed`` entry added; returns ``(config, step of the latest checkpoint)``, or ``None``
    when the run is already finished at ``steps``. Refuses changed options and a shrinking target."""
    _refuse_changes(run_dir, old, config)
    latest = run_folder.latest_checkpoint(run_dir)
    start_step = latest[1] if latest else 0
    if start_step > steps:
        raise ValueError(f"{run_dir}: --resume with --steps {steps} (or --epochs), but the run's checkpoint "
                         f"is at step {start_step}; the step target can only grow")
    if old.get("finished") and old.get("final_step") == steps and \
            os.path.isfile(os.path.join(run_dir, art.WEIGHTS)):
        print(f"[{preset}] {run_dir} is already finished at step {steps}; nothing to do", flush=True)
        return None
    allowed = {k: v for k, v in _flatten(config).items()
               if k in RESUME_MAY_CHANGE and _flatten(old).get(k) != v}
    session = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "command": command, "from_step": start_step, "steps": steps,
               "changed": {option_name(k): [_flatten(old).get(k), v] for k, v in allowed.items()}}
    if run_folder.versions() != old.get("versions"):
        session["versions"] = run_folder.versions()
    config = _merge(old, {"training": {k.split(".", 1)[1]: v for k, v in allowed.items()}})
    config["provenance"] = {"data": hashes}  # unchanged (checked above); added to runs made before it
    config["resumed"] = list(old.get("resumed", [])) + [session]
    config["finished"] = False
    print(f"[{preset}] resuming {run_dir} at step {start_step} of {steps}"
          + (f" (changed: {', '.join(session['changed'])})" if session["changed"] else ""), flush=True)
    return config, start_step


def _run_locked(preset: str, args: argparse.Namespace, argv: Optional[Sequence[str]]) -> str:
    """:func:`run` with ``--out`` locked: check the folder, options and data, write the config, train."""
    run_dir = args.out
    state, old = _check_folder(args)
    resuming = bool(args.resume and old is not None)
    if args.resume and old is None:
        print(f"[{preset}] --resume: {run_dir} holds no run yet, starting a new one", flush=True)
    if resuming:  # options known before reading any data
        _refuse_changes(run_dir, old, _args_config(preset, args))

    dataset, summary, hashes = _checked_data(preset, args, old if resuming else None)
    n_train = summary["sizes"]["train"]
    steps = args.steps if args.epochs is None else int(math.ceil(args.epochs * n_train / args.batch_size))
    spacing = [float(s) for s in summary["spacing"]]
    mc, spec, config = new_config(preset, args, dataset, spacing, steps, n_train, hashes)
    command = script_command(preset, argv)

    start_step = 0
    if resuming:
        resumed = _resume_config(preset, run_dir, old, config, command, hashes, steps)
        if resumed is None:
            return run_dir
        config, start_step = resumed
    else:
        config.update(versions=run_folder.versions(), command=command, finished=False)
    return _start(preset, args, run_dir, state, old, config, (dataset, mc, spec, steps, start_step))


def _start(preset: str, args: argparse.Namespace, run_dir: str, state: str, old: Optional[Dict], config: Dict,
           train_args: tuple) -> str:
    """Write the config and train; ``--overwrite`` moves the old run aside until the first
    checkpoint exists (then deletes it), and a failure before that restores it (or, for a new
    folder, removes what this attempt wrote)."""
    overwrite = state == "run" and args.overwrite
    created = overwrite or not os.path.isdir(run_dir)
    pending = {"aside": None, "fresh": state != "run"}  # what a failure before the first checkpoint undoes

    def first_checkpoint() -> None:
        if pending["aside"]:
            folders.discard(pending["aside"])
            print(f"[{preset}] --overwrite: first checkpoint written; deleted the old run {pending['aside']}",
                  flush=True)
        pending.update(aside=None, fresh=False)

    try:
        if overwrite:  # inside the try: a signal right after the rename restores too (SIGTERM/SIGHUP as Ctrl-C)
            aside = folders.move_aside(run_dir, pending)
            print(f"[{preset}] --overwrite: {_describe(old)} in {run_dir} moved aside to {aside}; it is deleted once "
                  f"the new run has written its first checkpoint", flush=True)
        os.makedirs(run_dir, exist_ok=True)
        run_folder.save_config(run_dir, config)
        return _train(preset, args, run_dir, config, *train_args, on_checkpoint=first_checkpoint)
    except BaseException:
        if pending["aside"]:
            folders.restore(pending["aside"], run_dir)
            print(f"[{preset}] the new run failed before its first checkpoint: the old run is back in {run_dir}",
                  file=sys.stderr, flush=True)
        elif pending["fresh"] and os.path.isdir(run_dir):  # no stub that would block the corrected command
            shutil.rmtree(run_dir, ignore_errors=True)
            if not created:
                os.makedirs(run_dir, exist_ok=True)
        elif args.resume and old is not None and old.get("finished"):  # a failed resume keeps the run finished
            run_folder.save_config(run_dir, old)
        raise


def train_batches(dataset, strategy, num_params: int, args: argparse.Namespace, start: int):
    """Iterator over the distributed training batches from step ``start + 1`` on: a deterministic stream
    in which batch k always carries the same pairs and the hyperparameters ``hyp [batch, num_params]``
    drawn from ``(seed, k)``, so skipping ``start`` batches resumes exactly."""
    import tensorflow as tf

    seed = int(args.seed)
    oversample, bsz = float(args.oversample_endpoints), int(args.batch_size)
    constrain = _constrained(args)

    def add_hyp(k, batch):
        batch = dict(batch)
        batch["hyp"] = sample_hyperparameters(seed, k, bsz, num_params, oversample, constrain)
        return batch

    ds = datasets.make_tf_dataset(dataset, "train", bsz, seed, shuffle=True, repeat=True)
    ds = ds.enumerate().skip(start).map(add_hyp).prefetch(tf.data.AUTOTUNE)
    return iter(strategy.experimental_distribute_dataset(ds))


def _constrained(args: argparse.Namespace) -> bool:
    """Whether this preset draws ``mu ~ U[0, 1 - lambda]`` (``--elastic-sampling``)."""
    reg, sa = PRESETS[args.preset]
    return reg == "elastic" and resolve_fidelity(args).constrained(sa)


def _validator(model, dataset, spec, loss: LossConfig, args: argparse.Namespace):
    """``validate() -> (mean loss, mean NCC)`` of the training ``loss`` over every validation pair with fixed hyperparameters
    (drawn from ``seed + 104729``), one compiled forward pass per batch; ``(nan, nan)`` without
    validation (``--val-every 0``)."""
    import tensorflow as tf

    from .losses import loss_terms
    from .models import call_model

    use_svf = loss.reg_field == "svf"
    seed, bsz = int(args.seed), int(args.batch_size)
    val_ids = dataset.split_ids("val") if args.val_every > 0 else []
    val = dataset.arrays("val") if val_ids else None

    @tf.function(autograph=False)
    def eval_batch(moving, fixed, seg, hyp):
        warped, disp, svf = call_model(model, moving, fixed, hyp, seg, training=False)
        t = loss_terms(spec, fixed, warped, svf if use_svf else disp, hyp, seg, loss, args.fidelity)
        return t["loss"], t["ncc"]

    def validate():
        if val is None:
            return float("nan"), float("nan")
        losses, nccs = [], []
        n = len(val["fixed"])
        hyp_all = sample_hyperparameters(seed + 104729, 0, n, spec.num_params, constrain=_constrained(args)).numpy()
        for i in range(0, n, bsz):
            sl = slice(i, i + bsz)
            l, c = eval_batch(val["moving"][sl], val["fixed"][sl], val["fixed_seg"][sl], hyp_all[sl])
            losses.append(l.numpy())
            nccs.append(c.numpy())
        return float(np.mean(np.concatenate(losses))), float(np.mean(np.concatenate(nccs)))

    return validate, val is not None


#: A log window whose mean loss exceeds this factor times max(1, |first window's mean loss|) stops
#: training as diverged. The similarity term is bounded (NCC in [-1, 1], MSE of [0, 1] images by 1,
#: times a weight <= 1), so such a loss is the energy of an exploded field (measured: a 3D elastic SA
#: model at lr 1e-3 went from -0.87 to 4e4 within 150 steps and never came back).
DIVERGENCE_FACTOR = 1e3


def _check_divergence(preset: str, step: int, loss: float, first_loss: float) -> None:
    """Raise ``FloatingPointError`` when ``loss`` (mean of a log window) shows the run diverged."""
    limit = DIVERGENCE_FACTOR * max(1.0, abs(first_loss))
    if loss > limit:
        raise FloatingPointError(
            f"[{preset}] training diverged at step {step}: mean loss {loss:.4g} > {limit:.4g} "
            f"({DIVERGENCE_FACTOR:g} x max(1, |first logged loss {first_loss:.4g}|)); the run is left unfinished. "
            "Retrain with a lower --lr (e.g. half; --overwrite, or run_pipeline.py --force).")


def _run_steps(preset: str, args: argparse.Namespace, run_dir: str, train_step, batches, validate, has_val: bool,
               ckpt, start: int, steps: int, rows: List[Dict], on_checkpoint=None) -> None:
    """Steps ``start + 1 .. steps``: log means of the loss terms every ``--log-every`` steps (and at
    validations) to ``train_log.csv`` (``rows``: the log so far) and TensorBoard, checkpoint every
    ``--checkpoint-every`` steps and at the end (``on_checkpoint`` after each); a step-0 validation
    row first when starting from scratch. Non-finite loss or NCC, or a diverged loss
    (:func:`_check_divergence`), stops with ``FloatingPointError``."""
    import tensorflow as tf

    ckpt_dir = os.path.join(run_dir, art.CHECKPOINTS)
    log_path = os.path.join(run_dir, art.TRAIN_LOG)
    writer = tf.summary.create_file_writer(os.path.join(run_dir, art.TENSORBOARD))
    progress = _Progress(preset, steps)
    acc: Dict[str, List[float]] = {}
    t_last, n_last, first_loss = time.time(), 0, None
    if start == 0 and has_val:  # step-0 validation: the untrained baseline of the curve
        v_loss, v_ncc = validate()
        rows.append({"step": 0, "loss": "", "similarity": "", "regularization": "", "ncc": "",
                     "val_loss": v_loss, "val_ncc": v_ncc, "sec_per_step": ""})
    for step in range(start + 1, steps + 1):
        out = train_step(next(batches))
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
            first_loss = row["loss"] if first_loss is None else first_loss
            _check_divergence(preset, step, row["loss"], first_loss)
            rows.append(row)
            with writer.as_default(step=step):
                for k in ("loss", "similarity", "regularization", "ncc", "val_loss", "val_ncc"):
                    if row[k] != "":
                        tf.summary.scalar(k, row[k])
            atomic_write(log_path, lambda tmp: _write_log(tmp, rows))
            val_txt = f" val {row['val_loss']:.4f}" if row["val_loss"] != "" else ""
            progress.update(step, f"loss {row['loss']:.4f} (ncc {row['ncc']:.3f} reg {row['regularization']:.4f}){val_txt}", sps)
            acc, t_last, n_last = {}, time.time(), 0
        if step % args.checkpoint_every == 0 and step < steps:
            _write_checkpoint(ckpt, ckpt_dir, step)
            if on_checkpoint is not None:
                on_checkpoint()
    writer.flush()
    _write_checkpoint(ckpt, ckpt_dir, steps)
    if on_checkpoint is not None:
        on_checkpoint()


def _finish_run(preset: str, run_dir: str, config: Dict, model, steps: int, t0: float) -> str:
    """Write ``weights.h5`` atomically, record its sha256, the session's seconds and ``finished`` in
    config.json; returns the run folder."""
    weights = os.path.join(run_dir, art.WEIGHTS)
    try:
        atomic_write(weights, lambda tmp: model.save_weights(tmp))
    except OSError as exc:
        raise OSError(f"{weights}: cannot write the final weights ({run_folder.short_error(exc)}); the checkpoint of step "
                      f"{steps} is complete: free space and rerun with --resume to write them") from exc
    config.setdefault("provenance", {})["weights_sha256"] = file_sha256(weights)
    seconds = round(time.time() - t0, 1)
    if config.get("resumed"):
        config["resumed"][-1]["seconds"] = seconds
    # seconds of every session that reached its end (a killed session's time is unknown)
    config.update(finished=True, final_step=steps, train_seconds=round(float(config.get("train_seconds", 0.0)) + seconds, 1))
    run_folder.save_config(run_dir, config)
    print(f"[{preset}] done in {time.time() - t0:.0f} s -> {run_dir}", flush=True)
    return run_dir


def _train(preset: str, args: argparse.Namespace, run_dir: str, config: Dict, dataset, mc, spec, steps: int,
           resume_from: int, on_checkpoint=None) -> str:
    """The TensorFlow part of :func:`run` (folder and data already checked, config written; the
    loss is the one ``config["loss"]`` records, :class:`.configs.LossConfig`)."""
    _setup_devices(args)
    import tensorflow as tf

    from .models import build_model

    tf.keras.utils.set_random_seed(args.seed)
    if not args.no_determinism:
        tf.config.experimental.enable_op_determinism()
    n_train = config["training"]["n_train_pairs"]

    strategy = _strategy(args.strategy)
    replicas = strategy.num_replicas_in_sync
    if args.batch_size % replicas:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the {replicas} replicas")
    with strategy.scope():
        model = build_model(mc)
        optimizer = make_optimizer(model, args.lr)
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_var)
    resume_prefix = None
    if resume_from:
        resume_prefix = run_folder.latest_checkpoint(run_dir)[0]
        try:
            ckpt.read(resume_prefix).assert_existing_objects_matched()
        except Exception as exc:  # truncated or foreign checkpoint: name it and the intact earlier one
            raise ValueError(art.checkpoint_error(run_dir, resume_prefix, exc)) from exc
        print(f"[{preset}] resumed from {resume_prefix} at step {int(step_var.numpy())}", flush=True)
    start = int(step_var.numpy())
    batches = train_batches(dataset, strategy, spec.num_params, args, start)

    loss = LossConfig.from_run_config(config)
    train_step = make_train_step(model, optimizer, strategy, step_var, spec, loss, int(args.batch_size),
                                 fidelity=args.fidelity)
    validate, has_val = _validator(model, dataset, spec, loss, args)

    rows = _read_log(os.path.join(run_dir, art.TRAIN_LOG), start) if resume_prefix else []
    t0 = time.time()
    print(f"[{preset}] {n_train} training pairs, image {tuple(mc.image_shape)}, {spec.num_params} "
          f"hyperparameters, {steps} steps, batch {int(args.batch_size)}, {replicas} replica(s) -> {run_dir}",
          flush=True)
    _run_steps(preset, args, run_dir, train_step, batches, validate, has_val, ckpt, start, steps, rows, on_checkpoint)
    return _finish_run(preset, run_dir, config, model, steps, t0)


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
