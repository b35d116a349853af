"""Building datasets by name and from the command line: :func:`get_dataset`,
:func:`add_dataset_args` (the "data" argument group), :func:`dataset_options` (the JSON dict saved
as ``config.json["data"]``) and :func:`dataset_from_args`.
"""
from __future__ import annotations

import argparse
import os

from .acdc import ACDCDataset
from .base import RegistrationDataset
from .folder import FolderDataset
from .learn2reg import L2RLungDataset, NLSTDataset
from .synthetic import SYNTHETIC_MOTION_PRESETS, SyntheticDataset, _motion_arg

DATASET_NAMES = ("synthetic", "nlst", "acdc", "l2r-lung", "folder")


_REGISTRY = {
    "synthetic": (SyntheticDataset, {"ndim", "image_size", "num_pairs", "data_seed",
                                     "cache_dir", "motion"}),
    "nlst": (NLSTDataset, {"ndim", "image_size", "label_dir", "slice_axis"}),
    "l2r-lung": (L2RLungDataset, {"ndim", "image_size", "label_dir", "slice_axis"}),
    "acdc": (ACDCDataset, {"ndim", "image_size", "target_spacing", "crop_size"}),
    "folder": (FolderDataset, {"ndim", "image_size", "pairs_csv", "num_classes", "class_names",
                               "clip_percentiles", "slice_axis"}),
}
_ALIASES = {"l2r_lung": "l2r-lung", "l2rlung": "l2r-lung", "lungct": "l2r-lung"}


def get_dataset(name: str, data_dir: str | None = None, **options) -> RegistrationDataset:
    """Build a dataset by name. ``options`` set to ``None`` are ignored; options that the
    dataset does not know raise a ``ValueError`` (``ndim``/``image_size`` are accepted by all,
    and ignored with a warning where the dataset fixes them)."""
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASET_NAMES}")
    cls, allowed = _REGISTRY[key]
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"dataset {key!r} does not take option(s) {unknown}; "
                         f"allowed: {sorted(allowed)}")
    return cls(data_dir=data_dir, **options)


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    """Add the data options (a "data" argument group) to ``parser``."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASET_NAMES, default="synthetic",
                   help="dataset to use")
    g.add_argument("--data-dir", default=None,
                   help="dataset root: NLST/LungCT folder with imagesTr/, ACDC folder with "
                        "patientXXX/, synthetic: cache folder (optional)")
    g.add_argument("--label-dir", default=None,
                   help="nlst/l2r-lung: folder of tissue label maps named like the images "
                        "(0 background, 1 lung, 2 bone, 3 liver; e.g. from TotalSegmentator)")
    g.add_argument("--ndim", type=int, choices=(2, 3), default=None,
                   help="2D or 3D (if not given: synthetic/nlst/acdc 2, l2r-lung 3, folder: as the "
                        "images)")
    g.add_argument("--image-size", type=int, nargs="+", default=None,
                   help="synthetic image size, e.g. 64 64 (one value = cube; default 64 per "
                        "axis); ignored by the other datasets")
    g.add_argument("--num-pairs", type=int, default=40,
                   help="synthetic: total number of pairs, split 70/15/15")
    g.add_argument("--data-seed", type=int, default=0,
                   help="synthetic: base seed; pair i uses seed data_seed*100003+i")
    g.add_argument("--motion", type=_motion_arg, default=SYNTHETIC_MOTION_PRESETS["default"],
                   help="synthetic: peak displacement as a fraction of the mean image size "
                        "(varied by +-25%% between pairs), with the 95th percentile of the lung "
                        "principal strain capped at 5 x motion; or a preset: 'default' = 0.05 "
                        "(lung strain p95 <= 0.25, breathing-like; initial mean Dice ~0.78 at "
                        "64^2), 'stress' = 0.1 (lung strain p95 up to 0.5, min Jacobian >= 0.3, "
                        "initial mean Dice ~0.63)")
    g.add_argument("--pairs-csv", default=None,
                   help="folder dataset: CSV with columns pair_id,fixed,moving,fixed_seg,"
                        "moving_seg[,fixed_kp,moving_kp][,split], paths relative to the CSV")
    g.add_argument("--cache-dir", default=None,
                   help="synthetic: cache folder (if not given: --data-dir, else ./.cache/synthetic)")
    g.add_argument("--slice-axis", type=int, choices=(0, 1, 2), default=None,
                   help="2D slices of 3D volumes: array axis to slice (if not given: nlst/l2r-lung 1 "
                        "= coronal, folder 2)")
    g.add_argument("--num-classes", type=int, default=None,
                   help="folder: number of tissue classes (if not given: largest fixed label)")
    g.add_argument("--class-names", default=None,
                   help="folder: comma-separated class names (if not given: class1, class2, ...)")
    g.add_argument("--clip-percentiles", type=float, nargs=2, default=None,
                   metavar=("LO", "HI"),
                   help="folder: clip intensities at these percentiles before min-max scaling")
    g.add_argument("--target-spacing", type=float, default=None,
                   help="acdc: in-plane spacing in mm after resampling (if not given: the smaller "
                        "in-plane spacing of each image)")


def _abs(path):
    return None if path is None else os.path.abspath(path)


def dataset_options(args) -> dict:
    """JSON-serializable options rebuilding the dataset of ``args``: ``get_dataset(**opts)``.
    Paths are made absolute; the synthetic cache folder and size are resolved."""
    get = lambda key, default=None: getattr(args, key, default)  # noqa: E731
    name = get("dataset", "synthetic")
    name = _ALIASES.get(str(name).lower(), str(name).lower())
    opts = {"name": name, "data_dir": _abs(get("data_dir"))}
    if name == "synthetic":
        probe = SyntheticDataset(data_dir=get("data_dir"), ndim=get("ndim"),
                                 image_size=get("image_size"), num_pairs=get("num_pairs", 40),
                                 data_seed=get("data_seed", 0), cache_dir=get("cache_dir"),
                                 motion=get("motion", SYNTHETIC_MOTION_PRESETS["default"]))
        opts.update(ndim=probe.ndim, image_size=list(probe.image_shape),
                    num_pairs=probe.num_pairs, data_seed=probe.data_seed, motion=probe.motion,
                    cache_dir=probe.cache_dir)
    elif name in ("nlst", "l2r-lung"):
        opts.update(label_dir=_abs(get("label_dir")), ndim=get("ndim"),
                    slice_axis=get("slice_axis"))
    elif name == "acdc":
        opts.update(ndim=get("ndim"), target_spacing=get("target_spacing"))
    elif name == "folder":
        cp = get("clip_percentiles")
        opts.update(pairs_csv=_abs(get("pairs_csv")), ndim=get("ndim"),
                    num_classes=get("num_classes"), class_names=get("class_names"),
                    clip_percentiles=None if cp is None else [float(p) for p in cp],
                    slice_axis=get("slice_axis"))
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASET_NAMES}")
    return {k: v for k, v in opts.items() if v is not None or k == "data_dir"}


def dataset_from_args(args) -> RegistrationDataset:
    """``get_dataset(**dataset_options(args))``."""
    return get_dataset(**dataset_options(args))
