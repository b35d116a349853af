"""Run folders: one JSON config next to the weights, loading with no flags.

The names of the files in a run folder (and of every other stage's files) and the typed
readers live in :mod:`.artifacts`; ``config.json`` records the architecture (ModelConfig),
preset, loss and data options, seed, versions, command line and, in ``resumed``, one dated
entry per ``--resume``.

Files are written with the one atomic writer :func:`datasets.atomic.atomic_write` (permissions
``0o666 & ~umask``, never a partial file).
"""
from __future__ import annotations

import json
import os
import platform
import sys
from typing import Dict, Optional, Tuple

from datasets.atomic import atomic_write

from .artifacts import CHECKPOINTS, CONFIG, RUN_FORMAT, WEIGHTS, read_run


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("tensorflow", "tf_keras", "voxelmorph", "neurite", "numpy", "scipy"):
        m = sys.modules.get(mod)
        if m is None:
            try:
                m = __import__(mod)
            except Exception:  # pragma: no cover - optional
                continue
        out[mod] = getattr(m, "__version__", "unknown")
    return out


def save_config(run_dir: str, config: Dict) -> None:
    config = {**config, "format": RUN_FORMAT}
    atomic_write(os.path.join(run_dir, CONFIG), json.dumps(config, indent=2, sort_keys=True))


def latest_checkpoint(run_dir: str) -> Optional[Tuple[str, int]]:
    """``(checkpoint prefix, step)`` named by ``<run>/checkpoints/latest``, or ``None``.

    A ``latest`` that names a missing checkpoint raises ``FileNotFoundError`` naming both.
    """
    ckpt_dir = os.path.join(run_dir, CHECKPOINTS)
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    prefix = os.path.join(ckpt_dir, name, "ckpt")
    if not os.path.isfile(prefix + ".index"):
        raise FileNotFoundError(f"{path} names {name}, but {prefix}.index is missing")
    try:
        step = int(name.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"{path}: unexpected checkpoint name {name!r}") from None
    return prefix, step


def short_error(exc: BaseException) -> str:
    """First line of an exception message, with its type."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def load_weights(model, run_dir: str, config: Dict) -> None:
    """``model.load_weights(<run>/weights.h5)``; any failure (truncated file, weights of another
    preset or architecture) raises a ``ValueError`` naming the file and the checkpoint that can
    rewrite it."""
    weights = os.path.join(run_dir, WEIGHTS)
    try:
        model.load_weights(weights)
    except Exception as exc:  # h5py OSError, Keras shape ValueError, ...
        try:
            latest = latest_checkpoint(run_dir)
        except (OSError, ValueError):
            latest = None
        if latest is None:
            hint = f"no checkpoint in {os.path.join(run_dir, CHECKPOINTS)} can replace it: retrain the run"
        else:
            hint = (f"checkpoint {os.path.dirname(latest[0])} (step {latest[1]}) is intact: delete {weights} "
                    f"and rerun the run's training command (\"command\" in {os.path.join(run_dir, CONFIG)}) "
                    f"with --resume to rewrite it from that checkpoint")
        raise ValueError(f"{weights}: cannot load the weights of this {config.get('preset', 'run')} model "
                         f"({short_error(exc)}); the file is truncated, corrupt or from another run; {hint}") from exc


def load_run(run_dir: str, expect_regularizer: str = None, expect_sa: bool = None):
    """Rebuild a trained model from its run folder alone.

    Returns ``(model, config)``. ``expect_*`` make a mismatched folder fail with a message that
    names the folder and the mismatch (e.g. an SA run given where a global run is needed).
    """
    from .models import ModelConfig, build_model

    info = read_run(run_dir, expect_regularizer, expect_sa)
    if not os.path.isfile(info.weights):
        raise FileNotFoundError(f"{info.weights}: no final weights (training unfinished? resume it with --resume)")
    model = build_model(ModelConfig.from_dict(info.config["model"]))
    load_weights(model, run_dir, info.config)
    return model, info.config


def check_compatible(run_dir: str, config: Dict, dataset) -> None:
    """Fail clearly if a run folder does not fit the dataset (class count, image size)."""
    mc = config["model"]
    if int(mc["num_classes"]) != dataset.num_classes:
        raise ValueError(f"{run_dir}: model trained for {mc['num_classes']} tissue classes, "
                         f"dataset {dataset.name!r} has {dataset.num_classes}")
    if tuple(mc["image_shape"]) != tuple(dataset.image_shape):
        raise ValueError(f"{run_dir}: model image size {tuple(mc['image_shape'])} != dataset image "
                         f"size {tuple(dataset.image_shape)}")
