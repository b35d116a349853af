"""Run folders: one JSON config next to the weights, atomic writes, loading with no flags.

A run folder holds::

    config.json        architecture (ModelConfig), preset, loss and data options, seed,
                       versions, command line
    weights.h5         final weights (written atomically)
    checkpoints/       periodic tf.train checkpoints (model, optimizer, step, data iterator)
    train_log.csv      step, losses, validation loss, seconds per step
    tensorboard/       TensorBoard scalars
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from typing import Dict, Tuple

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "weights.h5"


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder + rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(path: str, writer) -> None:
    """Call ``writer(tmp_path)`` then rename to ``path``; the temp name keeps the extension."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    tmp = os.path.join(folder, f".tmp-{base}-{os.getpid()}{ext}")
    try:
        writer(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)


def atomic_to_csv(df, path: str, **kwargs) -> None:
    """pandas DataFrame -> CSV, atomically."""
    atomic_save(path, lambda tmp: df.to_csv(tmp, index=False, **kwargs))


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
    atomic_write_text(os.path.join(run_dir, CONFIG_NAME), json.dumps(config, indent=2, sort_keys=True))


def load_config(run_dir: str) -> Dict:
    path = os.path.join(run_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no run config; is {run_dir!r} a training run folder?")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: unreadable run config ({e})") from e


def load_run(run_dir: str, expect_regularizer: str = None, expect_sa: bool = None):
    """Rebuild a trained model from its run folder alone.

    Returns ``(model, config)``. ``expect_*`` make a mismatched folder fail with a message that
    names the folder and the mismatch (e.g. an SA run given where a global run is needed).
    """
    from .models import ModelConfig, build_model

    config = load_config(run_dir)
    mc = ModelConfig.from_dict(config["model"])
    kind = lambda sa: "spatially adaptive" if sa else "global"  # noqa: E731
    if expect_regularizer is not None and mc.regularizer != expect_regularizer:
        raise ValueError(f"{run_dir}: run uses the {mc.regularizer} regularizer, expected {expect_regularizer}")
    if expect_sa is not None and mc.spatially_adaptive != expect_sa:
        raise ValueError(f"{run_dir}: run is a {kind(mc.spatially_adaptive)} model, expected a {kind(expect_sa)} one")
    weights = os.path.join(run_dir, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights}: no final weights (training unfinished? resume it with --resume)")
    model = build_model(mc)
    model.load_weights(weights)
    return model, config


def check_compatible(run_dir: str, config: Dict, dataset) -> None:
    """Fail clearly if a run folder does not fit the dataset (class count, image size)."""
    mc = config["model"]
    if int(mc["num_classes"]) != dataset.num_classes:
        raise ValueError(f"{run_dir}: model trained for {mc['num_classes']} tissue classes, "
                         f"dataset {dataset.name!r} has {dataset.num_classes}")
    if tuple(mc["image_shape"]) != tuple(dataset.image_shape):
        raise ValueError(f"{run_dir}: model image size {tuple(mc['image_shape'])} != dataset image "
                         f"size {tuple(dataset.image_shape)}")


def model_and_spec(config: Dict) -> Tuple:
    from .models import ModelConfig

    mc = ModelConfig.from_dict(config["model"])
    return mc, mc.spec
