"""Building datasets by name, from the command line and from a run's ``config.json``.

* :func:`get_dataset` -- a dataset by name and keyword options.
* :func:`add_dataset_args` -- the "data" argument group: ``--dataset``, ``--data-dir`` and the
  union of every dataset's declared options (:mod:`datasets.options`).
* :func:`dataset_options` -- the JSON dict saved as ``config.json["data"]`` (``name``,
  ``data_dir`` and the chosen dataset's options; paths absolute, synthetic values resolved).
* :func:`dataset_argv` -- the same options as command-line tokens (what ``run_pipeline.py`` passes
  on to the training scripts).
* :func:`dataset_from_args`, :func:`dataset_from_config` -- the dataset of parsed arguments, or of
  a saved ``config["data"]`` (optionally with moved folders).

All of them read the options from the dataset classes' ``OPTIONS``; nothing is listed twice.
"""
from __future__ import annotations

import argparse
import os
from typing import List, Mapping

from .acdc import ACDCDataset
from .base import RegistrationDataset
from .folder import FolderDataset
from .learn2reg import L2RLungDataset, NLSTDataset
from .options import ACCEPTED_BY_ALL
from .synthetic import SyntheticDataset

_REGISTRY = {cls.name: cls for cls in (SyntheticDataset, NLSTDataset, ACDCDataset, L2RLungDataset,
                                       FolderDataset)}
DATASET_NAMES = tuple(_REGISTRY)
_ALIASES = {"l2r_lung": "l2r-lung", "l2rlung": "l2r-lung", "lungct": "l2r-lung"}


def dataset_class(name: str) -> type:
    """The dataset class registered under ``name`` (aliases and case accepted)."""
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASET_NAMES}")
    return _REGISTRY[key]


def get_dataset(name: str, data_dir: str | None = None, **options) -> RegistrationDataset:
    """Build a dataset by name. ``options`` set to ``None`` are ignored; options that the
    dataset does not declare raise a ``ValueError`` (``ndim``/``image_size`` are accepted by all,
    and ignored with a warning where the dataset fixes them)."""
    cls = dataset_class(name)
    allowed = {opt.key for opt in cls.OPTIONS} | set(ACCEPTED_BY_ALL)
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"dataset {cls.name!r} does not take option(s) {unknown}; "
                         f"allowed: {sorted(allowed)}")
    return cls(data_dir=data_dir, **options)


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    """Add the data options (a "data" argument group) to ``parser``."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASET_NAMES, default="synthetic",
                   help="dataset to use")
    g.add_argument("--data-dir", default=None,
                   help="dataset root: NLST/LungCT folder with imagesTr/ (or the folder holding its "
                        "NLST/ or LungCT/), ACDC release folder with training/ and testing/ (or "
                        "database/, or a folder of patientXXX/), synthetic: cache folder (optional)")
    seen: dict = {}
    for cls in _REGISTRY.values():
        for opt in cls.OPTIONS:
            if opt.key in seen:
                if seen[opt.key] is not opt:
                    raise TypeError(f"option {opt.key!r} is declared differently by two datasets; "
                                    f"share one Option object (datasets.options)")
                continue
            seen[opt.key] = opt
            opt.add_to(g)


def _abs(path):
    return None if path is None else os.path.abspath(path)


def dataset_options(args) -> dict:
    """JSON-serializable options rebuilding the dataset of ``args``: ``get_dataset(**opts)``.
    Paths are made absolute; the synthetic cache folder and size are resolved."""
    name = getattr(args, "dataset", None) or "synthetic"
    cls = dataset_class(name)
    data_dir = getattr(args, "data_dir", None)
    values = {opt.key: getattr(args, opt.key, None) for opt in cls.OPTIONS}
    opts = {"name": cls.name, "data_dir": _abs(data_dir), **cls.config_options(data_dir, values)}
    return {k: v for k, v in opts.items() if v is not None or k == "data_dir"}


def dataset_argv(args) -> List[str]:
    """Command-line tokens that give the data options of ``args`` (a parsed Namespace or a
    ``config["data"]`` dict) to another script's :func:`add_dataset_args` parser: ``--dataset``,
    ``--data-dir`` and the options the chosen dataset declares, ``None`` ones left out."""
    get = args.get if isinstance(args, Mapping) else (lambda key, default=None: getattr(args, key, default))
    name = get("dataset") or get("name") or "synthetic"
    cls = dataset_class(name)
    out: List[str] = ["--dataset", str(name)]
    if get("data_dir") is not None:
        out += ["--data-dir", str(get("data_dir"))]
    for opt in cls.OPTIONS:
        out += opt.to_argv(get(opt.key))
    return out


def dataset_from_args(args) -> RegistrationDataset:
    """``get_dataset(**dataset_options(args))``."""
    return get_dataset(**dataset_options(args))


def _moved_csv(saved: str, data_dir: str) -> str:
    """The pairs CSV of a folder dataset moved to ``data_dir``: its saved file name there (else
    ``pairs.csv``); a clear error if neither exists."""
    names = list(dict.fromkeys((os.path.basename(saved), "pairs.csv")))
    for name in names:
        if os.path.isfile(os.path.join(data_dir, name)):
            return os.path.join(data_dir, name)
    raise FileNotFoundError(f"--data-dir {data_dir}: no {' or '.join(names)} there (the run's pairs CSV was {saved})")


def dataset_from_config(data: Mapping, data_dir: str | None = None,
                        label_dir: str | None = None) -> RegistrationDataset:
    """The dataset of a saved ``config.json["data"]`` dict (any version of this codebase wrote
    the same keys); ``data_dir`` / ``label_dir`` override the folders saved there."""
    opts = dict(data)
    if data_dir is not None:
        opts["data_dir"] = os.path.abspath(data_dir)
        if opts.get("pairs_csv"):  # a folder dataset: its saved (absolute) CSV path would win over data_dir
            opts["pairs_csv"] = _moved_csv(opts["pairs_csv"], opts["data_dir"])
    if label_dir is not None:
        opts["label_dir"] = os.path.abspath(label_dir)
    name = opts.pop("name")
    return get_dataset(name, **opts)
