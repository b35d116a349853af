"""Registration datasets: one interface for synthetic phantoms, NLST, ACDC, Learn2Reg LungCT and
user folders (SPEC sections 1 and 6).

Every script builds its data through this module::

    parser = argparse.ArgumentParser(); add_dataset_args(parser); args = parser.parse_args()
    ds = dataset_from_args(args)                  # or get_dataset(**dataset_options(args))
    for pair in ds.pairs("test"): ...             # RegistrationPair, validated
    tfds = make_tf_dataset(ds, "train", batch_size=4, seed=0)

Importing this module does no work and never imports TensorFlow (only :func:`make_tf_dataset`
does, lazily). nibabel / scipy are imported lazily too, so the synthetic dataset works without them.

Conventions shared by all datasets
----------------------------------
* Arrays are channels-last: images ``float32 [*spatial, 1]`` in [0, 1], label maps
  ``int32 [*spatial]`` with 0 = background and 1..C the tissue classes.
* Arrays keep the NIfTI voxel index order (``img.dataobj`` order, no reorientation). Keypoints,
  spacings and slice axes all refer to that order. ``spacing`` is in mm per array axis of the
  *preprocessed* arrays; ``affine`` maps preprocessed voxel indices to world (scanner) mm. For 2D
  pairs it is the 4x4 of a one-voxel-thick 3D grid: columns 0 and 1 are the two kept array axes,
  column 2 is the dropped (slice) axis, so ``nib.Nifti1Image(arr2d[..., None], affine)`` lands
  at the right place in world space.
* Splits are fixed and deterministic: pairs in sorted id order (folder: row order) are cut into
  train / val / test blocks, in that order. The paper's counts are used when the dataset has
  exactly that many pairs; otherwise the counts are scaled proportionally (largest remainder),
  every split is kept non-empty when there are at least three pairs, and asking for an empty
  split raises a ``ValueError``.
* Bad input raises: missing file/folder -> ``FileNotFoundError`` naming the path; unreadable
  NIfTI, NaN/inf intensities, non-integer or out-of-range labels, image/label shape mismatch,
  empty split, unknown dataset -> ``ValueError`` naming the file / option; an unknown pair id ->
  :class:`PairNotFoundError` (both a ``KeyError`` and a ``ValueError``).

Dataset layouts (``--data-dir``)
--------------------------------
``synthetic``
    ``hypermorph_spatially_adaptive.synthetic.generate_pair(seed, shape)`` with
    ``seed = data_seed * 100003 + index``; ``num_pairs`` pairs (default 40) split 70/15/15.
    Each pair is cached as one compressed ``.npz`` in ``cache_dir`` (default ``<data_dir>`` if
    given, else ``./.cache/synthetic``), named ``synthetic_<version>_<shape>_seed<seed>.npz``
    where ``<version>`` combines the generator's ``GENERATOR_VERSION``/``VERSION``/``__version__``
    attribute (if any) with a hash of its source file, so a changed generator never reuses old
    phantoms. Writes are atomic (temp file + ``os.replace``); unreadable cache files are
    regenerated with a warning. Spacing 1 mm, identity affine, keypoints from the generator,
    ``extras = {"disp_true": float32 [*shape, D], "lame": {class: (lambda, mu)}, "seed": int,
    "meta": {...}}`` (``meta``: the generator's checks, e.g. inverse residual, min Jacobian, lung
    strain p95, air Lamé parameters; ``{}`` for generators without it). ``--motion``: peak
    displacement / mean image size (or a preset, see :class:`SyntheticDataset`).

``nlst`` (Learn2Reg NLST)
    ``imagesTr/NLST_XXXX_0000.nii.gz`` (fixed) and ``NLST_XXXX_0001.nii.gz`` (moving),
    ``masksTr/`` (lung masks, same names; not used: the lung class comes from the label maps),
    ``keypointsTr/NLST_XXXX_0000.csv`` / ``_0001.csv`` (one keypoint per row, ``i,j,k`` voxel
    indices in the NIfTI's voxel order, comma separated, no header), optional
    ``NLST_dataset.json``: if present, its ``training_paired_images`` and ``registration_val``
    lists (``{"fixed": "./imagesTr/...", "moving": ...}``) define the pairs, else every
    ``imagesTr/NLST_*_0000.nii.gz`` with its ``_0001`` partner is a pair. Pair id =
    ``NLST_XXXX``.

    Tissue labels (required): ``--label-dir`` holds one label map per image with the *image's*
    file name (``NLST_XXXX_0000.nii.gz``, ``NLST_XXXX_0001.nii.gz``), same grid as the image,
    integer values 0 background, 1 lung, 2 bone (vertebrae, ribs, sternum), 3 liver. Users
    build these from TotalSegmentator output (merge the lung lobes -> 1, vertebrae/ribs/sternum
    -> 2, liver -> 3; or lung from ``masksTr``).

    Intensities: clip HU to (-980, 1518) and scale to [0, 1]. 3D: the full volume
    (224 x 192 x 224 at 1.5 mm in the release). 2D (default, paper): the middle coronal slice,
    i.e. index ``n // 2`` along array axis 1 (the anterior-posterior axis of the NLST volumes;
    change with ``--slice-axis``); 2D pairs have no keypoints (``None``). Split 169/10/30.

``l2r-lung`` (Learn2Reg LungCT)
    Same layout with prefix ``LungCT`` (``imagesTr/LungCT_00XX_0000.nii.gz`` fixed, ``_0001``
    moving, ``masksTr/``, ``keypointsTr/``, optional ``LungCT_dataset.json``), labels from
    ``--label-dir`` as for NLST. Clip HU to (-980, 600), scale to [0, 1], then centre-pad with 0
    to 192 x 128 x 192 (an axis that is longer is centre-cropped, with a warning); keypoints are
    shifted by the same offsets (a warning lists keypoints that end up outside the grid).
    Default 3D; 2D = middle slice of the padded volume along ``--slice-axis`` (default 1), no
    keypoints. Split 20/4/4.

``acdc``
    ``<data_dir>/patientXXX/patientXXX_frameYY.nii.gz`` + ``patientXXX_frameYY_gt.nii.gz`` and
    ``Info.cfg`` with lines ``ED: <frame>`` / ``ES: <frame>`` (frame files are named with the
    2-digit frame number; ``.nii`` is accepted too). If ``<data_dir>`` has no ``patient*``
    folders but a ``training/`` (or ``database/training/``) sub-folder, that one is used.
    Fixed = middle slice (index ``nz // 2`` of the last axis) of the ED frame, moving = the same
    slice of the ES frame. Intensities: per frame volume, clip to [min, 99.5th percentile] and
    min-max scale to [0, 1]. In-plane resampling to isotropic spacing (default: the smaller
    in-plane spacing; ``--target-spacing``) with a diagonal ``scipy.ndimage.affine_transform``
    (linear for images, nearest for labels): output voxel ``o`` samples raw voxel
    ``o * target / spacing``, so the output spacing is exactly the target. Then a 128 x 128
    window centred on the centre of mass of the fixed labels > 0 (padded with 0 where it leaves
    the image; image centre if the fixed slice has no labels, with a warning). Labels 1 RV,
    2 myocardium, 3 LV blood pool. 2D only, no keypoints, correct affine. Split 50/20/30 in
    sorted patient order.

``folder``
    ``--pairs-csv FILE`` with columns ``pair_id,fixed,moving,fixed_seg,moving_seg``, optional
    ``fixed_kp,moving_kp`` (keypoint CSV files, voxel indices in NIfTI order, as for NLST; a
    header row is tolerated) and optional ``split`` (train/val/test; without it 70/15/15 in row
    order). Relative paths are relative to the CSV's folder. Images are NIfTI, min-max scaled to
    [0, 1] (optionally after clipping at ``--clip-percentiles LO HI``). ``num_classes`` = the
    largest label in the fixed and moving label maps unless ``--num-classes``/``--class-names``
    declare the classes: declared classes make any other label an error (fixed or moving);
    inferred ones warn about classes with no voxels in any label map (a stray label 7 would
    otherwise silently create empty classes 4..6). Spacing from the fixed image header. A 2D
    NIfTI, or a 3D one with exactly one singleton axis, gives a 2D pair (keypoint files may
    have 2 columns or 3, the singleton axis' column is dropped); ``--ndim 2`` on 3D volumes
    takes the middle slice along ``--slice-axis`` (default 2, no keypoints). A 3D volume in a
    dataset whose first image is 2D is an error unless ``--ndim 2`` asks for its middle slice.
    All pairs must have the same preprocessed shape. No resampling: for training the image
    size must be divisible by 16 (:func:`validate_dataset` refuses other sizes).

Validation before training
--------------------------
:func:`validate_dataset` reads every pair of every split once (headers, shapes, intensities,
label sets, keypoints), checks that the required splits are non-empty and the image size fits
the U-Net, and prints a one-line summary; the trainer and ``run_pipeline.py`` call it before
anything is trained.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

__all__ = [
    "RegistrationPair",
    "RegistrationDataset",
    "SyntheticDataset",
    "NLSTDataset",
    "L2RLungDataset",
    "ACDCDataset",
    "FolderDataset",
    "PairNotFoundError",
    "DATASET_NAMES",
    "SPLITS",
    "get_dataset",
    "add_dataset_args",
    "dataset_from_args",
    "dataset_options",
    "make_tf_dataset",
    "validate_pair",
    "validate_dataset",
    "atomic_write_npz",
]

SPLITS = ("train", "val", "test")
DATASET_NAMES = ("synthetic", "nlst", "acdc", "l2r-lung", "folder")
SYNTHETIC_SEED_STRIDE = 100003


# --------------------------------------------------------------------------------------------
# interface
# --------------------------------------------------------------------------------------------
@dataclass
class RegistrationPair:
    """One fixed/moving pair, preprocessed. See the module docstring for the conventions."""

    pair_id: str
    moving: np.ndarray  # float32 [*spatial, 1] in [0, 1]
    fixed: np.ndarray  # float32 [*spatial, 1]
    moving_seg: np.ndarray  # int32 [*spatial], 0 background, 1..C
    fixed_seg: np.ndarray  # int32 [*spatial]
    spacing: tuple  # mm per array axis of the preprocessed arrays
    fixed_kp: np.ndarray | None = None  # float [K, D] voxel coords in the preprocessed fixed grid
    moving_kp: np.ndarray | None = None  # float [K, D] in the preprocessed moving grid
    affine: np.ndarray | None = None  # 4x4 voxel -> world of the preprocessed fixed grid
    extras: dict = field(default_factory=dict)


class PairNotFoundError(KeyError, ValueError):
    """A pair id that the dataset does not contain (catchable as KeyError or ValueError)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def _split_sizes(n: int, ratios) -> list[int]:
    """Split ``n`` items by ``ratios``: exact when ``n == sum(ratios)``, else proportional with
    largest-remainder rounding; every split with a positive ratio gets at least one item when
    there are enough items (taken from the currently largest split)."""
    ratios = [float(r) for r in ratios]
    total = sum(ratios)
    ideal = [n * r / total for r in ratios]
    sizes = [int(np.floor(x + 1e-9)) for x in ideal]
    rest = n - sum(sizes)
    order = sorted(range(len(ratios)), key=lambda i: (-(ideal[i] - sizes[i]), i))
    for i in order[:rest]:
        sizes[i] += 1
    for i in range(len(sizes)):
        if sizes[i] == 0 and ratios[i] > 0:
            donor = max(range(len(sizes)), key=lambda j: sizes[j])
            if sizes[donor] > 1:
                sizes[donor] -= 1
                sizes[i] += 1
    return sizes


class RegistrationDataset:
    """Base class. Subclasses set ``name``, ``ndim``, ``class_names`` and either
    ``self._image_shape`` or override :meth:`_infer_image_shape`; they implement
    :meth:`_all_ids` (fixed order) and :meth:`_load_pair`, and may override
    :meth:`_split_table` (default: contiguous blocks of ``split_ratios``)."""

    name: str = "base"
    ndim: int = 2
    split_ratios: tuple = (70, 15, 15)

    def __init__(self) -> None:
        self._image_shape: tuple | None = None
        self._class_names: tuple | None = None
        self._splits_cache: dict | None = None
        self._id_set: set | None = None
        self._arrays_cache: dict = {}

    # ---- attributes -------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple:
        if self._image_shape is None:
            self._image_shape = tuple(int(s) for s in self._infer_image_shape())
        return self._image_shape

    @property
    def class_names(self) -> tuple:
        if self._class_names is None:
            self._class_names = tuple(self._infer_class_names())
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _infer_image_shape(self) -> tuple:  # pragma: no cover - abstract
        raise NotImplementedError

    def _infer_class_names(self) -> tuple:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- ids and splits -----------------------------------------------------------------------
    def _all_ids(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _split_table(self) -> dict:
        ids = list(self._all_ids())
        sizes = _split_sizes(len(ids), self.split_ratios)
        table, start = {}, 0
        for split, size in zip(SPLITS, sizes):
            table[split] = ids[start:start + size]
            start += size
        return table

    def _splits(self) -> dict:
        if self._splits_cache is None:
            self._splits_cache = {k: list(v) for k, v in self._split_table().items()}
        return self._splits_cache

    def all_ids(self) -> list[str]:
        """Every pair id, in the dataset's fixed order."""
        return list(self._all_ids())

    def split_ids(self, split: str) -> list[str]:
        """Pair ids of ``split`` ("train", "val" or "test"), fixed deterministic order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        table = self._splits()
        ids = table[split]
        if not ids:
            sizes = {k: len(v) for k, v in table.items()}
            raise ValueError(
                f"split {split!r} of dataset {self.name!r} is empty (split sizes {sizes}, "
                f"{sum(sizes.values())} pairs in total): add more pairs or use another split"
            )
        return list(ids)

    # ---- loading ------------------------------------------------------------------------------
    def _load_pair(self, pair_id: str) -> RegistrationPair:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_id(self, pair_id: str) -> None:
        if self._id_set is None:
            self._id_set = set(self._all_ids())
        if pair_id not in self._id_set:
            raise PairNotFoundError(
                f"pair id {pair_id!r} is not in dataset {self.name!r} "
                f"({len(self._id_set)} pairs)"
            )

    def load_pair(self, pair_id: str) -> RegistrationPair:
        """Load, preprocess and validate one pair."""
        self._check_id(pair_id)
        pair = self._load_pair(pair_id)
        validate_pair(pair, self)
        return pair

    def pairs(self, split: str) -> Iterator[RegistrationPair]:
        """Validated pairs of ``split`` in fixed order (no progress output)."""
        for pair_id in self.split_ids(split):
            yield self.load_pair(pair_id)

    def arrays(self, split: str) -> dict:
        """Stacked arrays of a split, cached in memory: ``moving``/``fixed`` float32
        ``[N, *s, 1]``, ``moving_seg``/``fixed_seg`` int32 ``[N, *s]``, plus ``pair_ids``."""
        if split not in self._arrays_cache:
            ids = self.split_ids(split)
            shape = self.image_shape
            out = {
                "moving": np.zeros((len(ids), *shape, 1), np.float32),
                "fixed": np.zeros((len(ids), *shape, 1), np.float32),
                "moving_seg": np.zeros((len(ids), *shape), np.int32),
                "fixed_seg": np.zeros((len(ids), *shape), np.int32),
            }
            for n, pair_id in enumerate(ids):
                pair = self.load_pair(pair_id)
                for key in ("moving", "fixed", "moving_seg", "fixed_seg"):
                    out[key][n] = getattr(pair, key)
            out["pair_ids"] = list(ids)
            self._arrays_cache[split] = out
        return self._arrays_cache[split]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} ndim={self.ndim}>"


def validate_pair(pair: RegistrationPair, dataset: RegistrationDataset | None = None) -> None:
    """Raise ``ValueError`` if ``pair`` breaks the interface contract (dtypes, shapes,
    channels-last, finite intensities in [0, 1], labels in 0..C, keypoints [K, D])."""
    where = f"pair {pair.pair_id!r}" + (f" of dataset {dataset.name!r}" if dataset else "")
    shape = None
    for key in ("fixed", "moving"):
        arr = getattr(pair, key)
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32:
            raise ValueError(f"{where}: {key} must be a float32 numpy array, got "
                             f"{getattr(arr, 'dtype', type(arr))}")
        if arr.ndim not in (3, 4) or arr.shape[-1] != 1:
            raise ValueError(f"{where}: {key} must be [*spatial, 1] (2D or 3D), got {arr.shape}")
        if shape is None:
            shape = arr.shape[:-1]
        elif arr.shape[:-1] != shape:
            raise ValueError(f"{where}: moving shape {arr.shape[:-1]} != fixed shape {shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{where}: {key} image contains NaN or infinite values")
        if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
            raise ValueError(f"{where}: {key} intensities outside [0, 1] "
                             f"({arr.min()}..{arr.max()})")
    ndim = len(shape)
    if dataset is not None:
        if ndim != dataset.ndim:
            raise ValueError(f"{where}: {ndim}D arrays in a {dataset.ndim}D dataset")
        if tuple(shape) != tuple(dataset.image_shape):
            raise ValueError(f"{where}: image shape {tuple(shape)} differs from the dataset's "
                             f"image_shape {tuple(dataset.image_shape)}")
    num_classes = dataset.num_classes if dataset is not None else None
    for key in ("fixed_seg", "moving_seg"):
        seg = getattr(pair, key)
        if not isinstance(seg, np.ndarray) or seg.dtype != np.int32:
            raise ValueError(f"{where}: {key} must be an int32 numpy array, got "
                             f"{getattr(seg, 'dtype', type(seg))}")
        if seg.shape != tuple(shape):
            raise ValueError(f"{where}: {key} shape {seg.shape} != image shape {tuple(shape)}")
        if seg.size:
            lo, hi = int(seg.min()), int(seg.max())
            if lo < 0 or (num_classes is not None and hi > num_classes):
                raise ValueError(f"{where}: {key} has labels outside 0..{num_classes}: "
                                 f"{np.unique(seg).tolist()}")
    if len(pair.spacing) != ndim or not all(float(s) > 0 for s in pair.spacing):
        raise ValueError(f"{where}: spacing {pair.spacing} must have {ndim} positive entries")
    if (pair.fixed_kp is None) != (pair.moving_kp is None):
        raise ValueError(f"{where}: fixed_kp and moving_kp must both be given or both be None")
    if pair.fixed_kp is not None:
        for key in ("fixed_kp", "moving_kp"):
            kp = getattr(pair, key)
            if not isinstance(kp, np.ndarray) or kp.ndim != 2 or kp.shape[1] != ndim:
                raise ValueError(f"{where}: {key} must be [K, {ndim}], got "
                                 f"{getattr(kp, 'shape', type(kp))}")
            if not np.all(np.isfinite(kp)):
                raise ValueError(f"{where}: {key} contains NaN or infinite values")
        if pair.fixed_kp.shape != pair.moving_kp.shape:
            raise ValueError(f"{where}: {pair.fixed_kp.shape[0]} fixed keypoints but "
                             f"{pair.moving_kp.shape[0]} moving keypoints")
    if pair.affine is not None:
        aff = np.asarray(pair.affine)
        if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
            raise ValueError(f"{where}: affine must be a finite 4x4 matrix")


# --------------------------------------------------------------------------------------------
# file helpers
# --------------------------------------------------------------------------------------------
def _nibabel():
    try:
        import nibabel
    except ImportError as exc:  # pragma: no cover - environment problem
        raise ImportError("nibabel is needed to read NIfTI datasets: pip install nibabel") from exc
    return nibabel


def _require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _nifti_stem(path: str) -> str:
    base = os.path.basename(path)
    for ext in (".nii.gz", ".nii"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


def _find_nifti(folder: str, stem: str, what: str) -> str:
    """``folder/stem.nii.gz`` or ``folder/stem.nii``; FileNotFoundError naming the .nii.gz."""
    for ext in (".nii.gz", ".nii"):
        path = os.path.join(folder, stem + ext)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{what} not found: {os.path.join(folder, stem + '.nii.gz')}")


def _nifti_shape(path: str, what: str) -> tuple:
    _require_file(path, what)
    try:
        return tuple(int(s) for s in _nibabel().load(path).shape)
    except Exception as exc:
        raise ValueError(f"cannot read NIfTI header of {what} {path}: {exc}") from exc


def _read_nifti(path: str, what: str):
    """(data as stored, affine 4x4, zooms) -- FileNotFoundError / ValueError naming ``path``."""
    _require_file(path, what)
    nib = _nibabel()
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
        zooms = tuple(float(z) for z in img.header.get_zooms())
    except Exception as exc:
        raise ValueError(f"cannot read NIfTI {what} {path}: {type(exc).__name__}: {exc}") from exc
    data = np.asarray(data)
    # drop trailing singleton dimensions beyond the third (e.g. 4D files with one time point)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data, affine, zooms


def _as_3d(data: np.ndarray, path: str, what: str) -> np.ndarray:
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise ValueError(f"{what} {path} has shape {data.shape}; expected a 2D or 3D image")
    return data


def _load_image(path: str, what: str = "image"):
    data, affine, zooms = _read_nifti(path, what)
    data = data.astype(np.float32, copy=False)
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{what} {path} contains NaN or infinite values")
    return data, affine, zooms


def _load_labels(path: str, num_classes: int | None, what: str = "label map") -> np.ndarray:
    data, _, _ = _read_nifti(path, what)
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)):
            raise ValueError(f"{what} {path} contains NaN or infinite values")
        if np.any(data != np.round(data)):
            raise ValueError(f"{what} {path} has non-integer label values")
        data = np.round(data)
    elif not np.issubdtype(data.dtype, np.integer) and data.dtype != np.bool_:
        raise ValueError(f"{what} {path} has unsupported data type {data.dtype}")
    labels = data.astype(np.int64)
    if labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or (num_classes is not None and hi > num_classes):
            raise ValueError(f"{what} {path} has labels outside 0..{num_classes}: "
                             f"{np.unique(labels).tolist()}")
    return labels.astype(np.int32)


def _load_keypoints(path: str, ncols: int | tuple, what: str = "keypoint file") -> np.ndarray:
    """Comma-separated voxel coordinates, one keypoint per row (a header row is tolerated)."""
    _require_file(path, what)
    allowed = (ncols,) if isinstance(ncols, int) else tuple(ncols)
    kp = None
    for skip in (0, 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # empty file warning
                kp = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2, skiprows=skip)
            break
        except ValueError as exc:
            err = exc
    if kp is None:
        raise ValueError(f"cannot parse {what} {path}: {err}")
    if kp.size == 0:
        kp = np.zeros((0, allowed[0]), np.float64)
    if kp.shape[1] not in allowed:
        raise ValueError(f"{what} {path} has {kp.shape[1]} columns; expected {allowed}")
    if not np.all(np.isfinite(kp)):
        raise ValueError(f"{what} {path} contains NaN or infinite values")
    return kp


def _window(arr: np.ndarray, starts, size, fill) -> np.ndarray:
    """``out[n] = arr[n + start]`` on a ``size`` grid; outside ``arr`` -> ``fill``."""
    out = np.full(tuple(size), fill, dtype=arr.dtype)
    src, dst = [], []
    for n, s, t in zip(arr.shape, starts, size):
        lo, hi = max(s, 0), min(s + t, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def _translation(starts) -> np.ndarray:
    """4x4 mapping new voxel index -> raw voxel index for ``raw = new + start``."""
    m = np.eye(4)
    m[:3, 3] = np.asarray(list(starts) + [0] * (3 - len(starts)), dtype=np.float64)[:3]
    return m


def _slice_matrix(axis: int, index: float) -> np.ndarray:
    """4x4 mapping a 2D index (a, b, c=0) of the slice ``index`` along ``axis`` of a 3D grid to
    the 3D index; columns 0/1 are the kept axes in increasing order, column 2 the sliced one."""
    kept = [a for a in range(3) if a != axis]
    m = np.zeros((4, 4))
    m[kept[0], 0] = 1.0
    m[kept[1], 1] = 1.0
    m[axis, 2] = 1.0
    m[axis, 3] = float(index)
    m[3, 3] = 1.0
    return m


def _points_to_grid(points: np.ndarray, new_to_raw: np.ndarray, ndim: int) -> np.ndarray:
    """Map raw voxel coordinates [K, 3] into the preprocessed grid (first ``ndim`` columns)."""
    raw_to_new = np.linalg.inv(new_to_raw)
    homog = np.concatenate([points, np.ones((len(points), 1))], axis=1)
    return (homog @ raw_to_new.T)[:, :ndim]


def _warn_outside(kp: np.ndarray, shape, what: str) -> None:
    if len(kp) == 0:
        return
    hi = np.asarray(shape, np.float64) - 1
    outside = np.any((kp < -0.5) | (kp > hi + 0.5), axis=1)
    if np.any(outside):
        warnings.warn(f"{int(outside.sum())} of {len(kp)} {what} lie outside the preprocessed "
                      f"grid {tuple(shape)}; they are kept", stacklevel=3)


def _check_same_shape(a: np.ndarray, path_a: str, b: np.ndarray, path_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {path_a} has shape {a.shape} but {path_b} has "
                         f"shape {b.shape}")


def atomic_write_npz(path: str, payload: dict) -> None:
    """``np.savez_compressed(path, **payload)`` atomically and durably, with the permissions of
    a plain file (``0o666 & ~umask``): the one writer for dataset caches (shared temp-file
    helper :func:`hypermorph_spatially_adaptive.runio.atomic_save`)."""
    from hypermorph_spatially_adaptive.runio import atomic_save

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **payload)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_save(path, write)


def validate_dataset(dataset: RegistrationDataset, require=("train",), multiple: int | None = None,
                     log=print) -> dict:
    """Read every pair of every split once and fail before any training if something is wrong.

    Checks: the splits in ``require`` are non-empty; the image size is divisible by
    ``multiple`` (the U-Net's 2^levels; None: no check); every pair of every split loads and
    validates (NIfTI headers and data, shapes, finite intensities, labels within the classes,
    keypoints). Train and val arrays stay cached in memory for training. Warns when pairs have
    different voxel spacings (the loss uses the first training pair's). Prints (``log``) one
    summary line and returns ``{"sizes", "image_shape", "spacing", "classes", "seconds"}``.
    Raises ``ValueError``/``FileNotFoundError`` naming the split, pair or file.
    """
    import time

    t0 = time.time()
    table = dataset._splits()
    sizes = {split: len(table[split]) for split in SPLITS}
    for split in require:
        if not sizes[split]:
            raise ValueError(f"dataset {dataset.name!r}: the {split} split is empty (split sizes {sizes}, "
                             f"{sum(sizes.values())} pairs); add pairs or fix the split column")
    shape = tuple(dataset.image_shape)
    if multiple:
        bad = [ax for ax, n in enumerate(shape) if int(n) % int(multiple)]
        if bad:
            fix = " x ".join(str(int(-(-n // multiple) * multiple)) for n in shape)
            where = f" ({dataset.pairs_csv})" if isinstance(dataset, FolderDataset) else ""
            raise ValueError(
                f"dataset {dataset.name!r}{where}: image size {' x '.join(map(str, shape))} is not divisible by "
                f"{multiple} along axis {', '.join(map(str, bad))} (the U-Net halves the image "
                f"{int(multiple).bit_length() - 1} times); crop or pad the images, e.g. to {fix}")
    spacings = {}
    for split in SPLITS:
        ids = table[split]
        if not ids:
            continue
        if split in ("train", "val"):
            dataset.arrays(split)  # loads and validates every pair, kept for training
            for pid in ids[:1]:
                spacings[pid] = tuple(float(v) for v in dataset.load_pair(pid).spacing)
        else:
            for pid in ids:
                spacings[pid] = tuple(float(v) for v in dataset.load_pair(pid).spacing)
    first = next(iter(spacings.values()))
    odd = [pid for pid, sp in spacings.items() if not np.allclose(sp, first, rtol=1e-3)]
    if odd:
        warnings.warn(f"dataset {dataset.name!r}: pairs {odd[:5]} have a voxel spacing other than "
                      f"{first} mm; the loss uses {first}", stacklevel=2)
    seconds = time.time() - t0
    if log is not None:
        log(f"[data] {dataset.name}: {sum(sizes.values())} pairs checked in {seconds:.1f} s (train "
            f"{sizes['train']}, val {sizes['val']}, test {sizes['test']}), {len(shape)}D "
            f"{' x '.join(map(str, shape))}, spacing {first} mm, {dataset.num_classes} classes "
            f"({', '.join(dataset.class_names)})")
    return {"sizes": sizes, "image_shape": shape, "spacing": first, "classes": list(dataset.class_names),
            "seconds": seconds}


# --------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------
def _synthetic_module():
    """The phantom generator module (a function so tests can substitute it)."""
    from hypermorph_spatially_adaptive import synthetic

    return synthetic


def _generator_version(module) -> str:
    parts = []
    for attr in ("GENERATOR_VERSION", "VERSION", "__version__"):
        value = getattr(module, attr, None)
        if value is not None:
            parts.append(str(value))
            break
    src = getattr(module, "__file__", None)
    if src and os.path.isfile(src):
        with open(src, "rb") as fh:
            parts.append(hashlib.sha1(fh.read()).hexdigest()[:10])
    version = "-".join(parts) if parts else "0"
    return "v" + re.sub(r"[^A-Za-z0-9.-]", "_", version)


def _encode(value):
    """Structure-preserving JSON encoding (dict/tuple/list/ndarray/numpy scalars)."""
    if isinstance(value, dict):
        return {"d": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"t": [_encode(v) for v in value]}
    if isinstance(value, list):
        return {"l": [_encode(v) for v in value]}
    if isinstance(value, np.ndarray):
        return {"a": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode(value):
    if isinstance(value, dict):
        if "d" in value:
            return {_decode(k): _decode(v) for k, v in value["d"]}
        if "t" in value:
            return tuple(_decode(v) for v in value["t"])
        if "l" in value:
            return [_decode(v) for v in value["l"]]
        if "a" in value:
            return np.asarray(value["a"], dtype=value["dtype"])
    return value


def _roundtrip(value):
    return _decode(json.loads(json.dumps(_encode(value))))


#: ``--motion`` presets (same values as ``synthetic.MOTION_PRESETS``): peak displacement as a
#: fraction of the mean image size; the lung strain p95 is capped at 5 x motion.
SYNTHETIC_MOTION_PRESETS = {"default": 0.05, "stress": 0.1}


def synthetic_motion(value) -> float:
    """``--motion`` value: a number in (0, 0.5) or a preset name ("default", "stress")."""
    key = str(value).strip().lower()
    if key in SYNTHETIC_MOTION_PRESETS:
        return SYNTHETIC_MOTION_PRESETS[key]
    try:
        motion = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"synthetic dataset: motion must be a number in (0, 0.5) or one of "
                         f"{sorted(SYNTHETIC_MOTION_PRESETS)}, got {value!r}") from None
    if not 0 < motion < 0.5:
        raise ValueError(f"synthetic dataset: motion must be in (0, 0.5), got {value}")
    return motion


def _motion_arg(text: str) -> float:
    try:
        return synthetic_motion(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class SyntheticDataset(RegistrationDataset):
    """Phantoms from ``hypermorph_spatially_adaptive.synthetic`` (see the module docstring).

    ``motion``: peak displacement as a fraction of the mean image size (+-25 % per pair), with
    the 95th percentile of the lung principal strain capped at 5 x motion (the real generator's
    ``motion_to_max_disp``), or a preset name: "default" (0.05: lung strain p95 <= 0.25,
    breathing-like) or "stress" (0.1: the larger motion of generator version 1). The
    generator's checks (inverse residual, Jacobian, lung strain) are in ``extras["meta"]``.
    """

    name = "synthetic"
    split_ratios = (70, 15, 15)
    _KEYS = ("fixed", "moving", "fixed_seg", "moving_seg", "disp", "fixed_kp", "moving_kp")

    def __init__(self, data_dir=None, ndim=None, image_size=None, num_pairs=40, data_seed=0,
                 cache_dir=None, motion=SYNTHETIC_MOTION_PRESETS["default"]):
        super().__init__()
        self.motion = synthetic_motion(motion)
        if image_size is not None:
            image_size = [int(s) for s in np.atleast_1d(image_size)]
            if ndim is None:
                ndim = len(image_size) if len(image_size) > 1 else 2
            if len(image_size) == 1:
                image_size = image_size * int(ndim)
        ndim = 2 if ndim is None else int(ndim)
        if ndim not in (2, 3):
            raise ValueError(f"synthetic dataset: ndim must be 2 or 3, got {ndim}")
        if image_size is None:
            image_size = [64] * ndim
        if len(image_size) != ndim or min(image_size) < 1:
            raise ValueError(f"synthetic dataset: image_size {image_size} does not match "
                             f"ndim={ndim}")
        if int(num_pairs) < 1:
            raise ValueError(f"synthetic dataset: num_pairs must be >= 1, got {num_pairs}")
        self.ndim = ndim
        self._image_shape = tuple(image_size)
        self.num_pairs = int(num_pairs)
        self.data_seed = int(data_seed)
        if cache_dir is None:
            cache_dir = data_dir if data_dir is not None else os.path.join(".", ".cache",
                                                                            "synthetic")
        self.cache_dir = os.path.abspath(cache_dir)
        self._module = None

    @property
    def module(self):
        if self._module is None:
            self._module = _synthetic_module()
        return self._module

    def _infer_class_names(self):
        return tuple(self.module.CLASS_NAMES)

    def _all_ids(self):
        return [f"synthetic_{i:04d}" for i in range(self.num_pairs)]

    def seed_of(self, pair_id: str) -> int:
        self._check_id(pair_id)
        return self.data_seed * SYNTHETIC_SEED_STRIDE + int(pair_id.rsplit("_", 1)[1])

    def cache_path(self, pair_id: str) -> str:
        shape = "x".join(str(s) for s in self.image_shape)
        name = (f"synthetic_{_generator_version(self.module)}_{shape}_m{self.motion:g}_"
                f"seed{self.seed_of(pair_id)}.npz")
        return os.path.join(self.cache_dir, name)

    def _read_cache(self, path: str):
        try:
            with np.load(path, allow_pickle=False) as npz:
                rec = {k: np.array(npz[k]) for k in npz.files}
            missing = [k for k in self._KEYS + ("lame_json",) if k not in rec]
            if missing:
                raise ValueError(f"missing arrays {missing}")
            if tuple(rec["fixed"].shape) != self.image_shape:
                raise ValueError(f"shape {rec['fixed'].shape} != {self.image_shape}")
            rec["lame"] = _decode(json.loads(str(rec.pop("lame_json"))))
            rec["meta"] = (_decode(json.loads(str(rec.pop("meta_json"))))
                           if "meta_json" in rec else {})
            return rec
        except Exception as exc:  # any unreadable / truncated / inconsistent file
            warnings.warn(f"synthetic cache file {path} is unreadable ({type(exc).__name__}: "
                          f"{exc}); regenerating it", stacklevel=3)
            return None

    def _write_cache(self, path: str, rec: dict) -> None:
        os.makedirs(self.cache_dir, exist_ok=True)
        payload = {k: np.asarray(rec[k]) for k in self._KEYS}
        payload["lame_json"] = np.array(json.dumps(_encode(rec["lame"])))
        payload["meta_json"] = np.array(json.dumps(_encode(rec.get("meta", {}))))
        atomic_write_npz(path, payload)

    def _generate(self, seed: int) -> dict:
        # peak displacement: `motion` x mean image size, varied by +-25 % between pairs; the
        # real generator also caps the lung strain (motion_to_max_disp)
        kwargs = {}
        if hasattr(self.module, "motion_to_max_disp"):
            max_disp, kwargs["max_lung_strain"] = self.module.motion_to_max_disp(
                seed, tuple(self.image_shape), self.motion)
        else:
            jitter = np.random.default_rng([seed, 7]).uniform(0.75, 1.25)
            max_disp = self.motion * float(np.mean(self.image_shape)) * jitter
        out = self.module.generate_pair(seed, tuple(self.image_shape), max_disp=max_disp,
                                        **kwargs)
        missing = [k for k in self._KEYS + ("lame",) if k not in out]
        if missing:
            raise ValueError(f"synthetic.generate_pair(seed={seed}) returned no {missing}")
        rec = {k: np.asarray(out[k]) for k in self._KEYS}
        rec["lame"] = out["lame"]
        rec["meta"] = dict(out.get("meta", {}))
        return rec

    def _load_pair(self, pair_id: str) -> RegistrationPair:
        seed = self.seed_of(pair_id)
        path = self.cache_path(pair_id)
        rec = self._read_cache(path) if os.path.exists(path) else None
        if rec is None:
            rec = self._generate(seed)
            self._write_cache(path, rec)
            rec["lame"] = _roundtrip(rec["lame"])  # same types as when read from the cache
            rec["meta"] = _roundtrip(rec["meta"])
        D = self.ndim

        def image(a):
            return np.clip(np.asarray(a, np.float32), 0.0, 1.0)[..., None]

        def kp(a):
            return np.asarray(a, np.float32).reshape(-1, D)

        return RegistrationPair(
            pair_id=pair_id,
            moving=image(rec["moving"]),
            fixed=image(rec["fixed"]),
            moving_seg=np.asarray(rec["moving_seg"]).astype(np.int32),
            fixed_seg=np.asarray(rec["fixed_seg"]).astype(np.int32),
            spacing=(1.0,) * D,
            fixed_kp=kp(rec["fixed_kp"]),
            moving_kp=kp(rec["moving_kp"]),
            affine=np.eye(4),
            extras={"disp_true": np.asarray(rec["disp"], np.float32), "lame": rec["lame"],
                    "seed": seed, "meta": rec.get("meta", {})},
        )


# --------------------------------------------------------------------------------------------
# Learn2Reg lung CT (NLST, LungCT)
# --------------------------------------------------------------------------------------------
class _Learn2RegCT(RegistrationDataset):
    prefix = ""
    json_name = ""
    hu_window = (-980.0, 1518.0)
    pad_shape: tuple | None = None
    default_ndim = 2
    default_slice_axis = 1
    CLASS_NAMES = ("lung", "bone", "liver")

    def __init__(self, data_dir=None, label_dir=None, ndim=None, slice_axis=None,
                 image_size=None):
        super().__init__()
        if data_dir is None:
            raise ValueError(f"dataset {self.name!r} needs --data-dir (the folder holding "
                             f"imagesTr/, masksTr/, keypointsTr/)")
        self.data_dir = _require_dir(os.path.abspath(data_dir), f"{self.name} data folder")
        self.images_dir = _require_dir(os.path.join(self.data_dir, "imagesTr"),
                                       f"{self.name} image folder")
        if label_dir is None:
            raise ValueError(
                f"dataset {self.name!r} needs --label-dir: a folder with one tissue label map "
                f"per image named like the image ({self.prefix}_XXXX_0000.nii.gz, "
                f"{self.prefix}_XXXX_0001.nii.gz), values 0 background, 1 lung, 2 bone, "
                f"3 liver (e.g. merged from TotalSegmentator output)")
        self.label_dir = _require_dir(os.path.abspath(label_dir), f"{self.name} label folder")
        if image_size is not None:
            warnings.warn(f"--image-size is ignored for dataset {self.name!r}", stacklevel=3)
        self.ndim = self.default_ndim if ndim is None else int(ndim)
        if self.ndim not in (2, 3):
            raise ValueError(f"{self.name}: ndim must be 2 or 3, got {ndim}")
        self.slice_axis = self.default_slice_axis if slice_axis is None else int(slice_axis)
        if self.slice_axis not in (0, 1, 2):
            raise ValueError(f"{self.name}: slice_axis must be 0, 1 or 2, got {slice_axis}")
        self._class_names = self.CLASS_NAMES
        self._pairs = self._discover()
        if not self._pairs:
            raise ValueError(f"no {self.prefix} image pairs found in {self.images_dir}")
        for pid, (fixed, moving) in self._pairs.items():
            for path in (fixed, moving):
                _require_file(path, f"{self.name} image of pair {pid}")
                _find_nifti(self.label_dir, _nifti_stem(path),
                            f"{self.name} label map of pair {pid}")
        kp_dir = os.path.join(self.data_dir, "keypointsTr")
        self.keypoints_dir = kp_dir if os.path.isdir(kp_dir) else None
        if self.ndim == 3 and self.keypoints_dir is None:
            warnings.warn(f"{self.name}: no keypoint folder {kp_dir}; pairs have no keypoints",
                          stacklevel=3)

    def _discover(self) -> dict:
        json_path = os.path.join(self.data_dir, self.json_name)
        entries = []
        if os.path.isfile(json_path):
            try:
                with open(json_path) as fh:
                    info = json.load(fh)
            except (OSError, ValueError) as exc:
                raise ValueError(f"cannot read {json_path}: {exc}") from exc
            for key in ("training_paired_images", "registration_val"):
                for item in info.get(key, []) or []:
                    try:
                        fixed, moving = item["fixed"], item["moving"]
                    except (TypeError, KeyError) as exc:
                        raise ValueError(f"{json_path}: entry {item!r} of {key!r} has no "
                                         f"'fixed'/'moving'") from exc
                    entries.append((os.path.normpath(os.path.join(self.data_dir, fixed)),
                                    os.path.normpath(os.path.join(self.data_dir, moving))))
            if not entries:
                raise ValueError(f"{json_path} lists no pairs under 'training_paired_images' "
                                 f"or 'registration_val'")
        else:
            pattern = re.compile(re.escape(self.prefix) + r"_(\d+)_0000\.nii(\.gz)?$")
            for fname in sorted(os.listdir(self.images_dir)):
                if pattern.match(fname):
                    stem = _nifti_stem(fname)[: -len("_0000")]
                    moving = _find_nifti(self.images_dir, stem + "_0001",
                                         f"moving image (partner of {fname})")
                    entries.append((os.path.join(self.images_dir, fname), moving))
        pairs: dict = {}
        for fixed, moving in entries:
            fs, ms = _nifti_stem(fixed), _nifti_stem(moving)
            fcase, mcase = fs.rsplit("_", 1)[0], ms.rsplit("_", 1)[0]
            pid = fcase if fcase == mcase else f"{fs}__{ms}"
            if pid in pairs and pairs[pid] != (fixed, moving):
                pid = f"{fs}__{ms}"
            pairs[pid] = (fixed, moving)
        return {pid: pairs[pid] for pid in sorted(pairs)}

    def _all_ids(self):
        return list(self._pairs)

    def pair_files(self, pair_id: str) -> tuple:
        """(fixed image path, moving image path) of ``pair_id``."""
        self._check_id(pair_id)
        return self._pairs[pair_id]

    def _grid_shape3d(self, raw_shape) -> tuple:
        return tuple(self.pad_shape) if self.pad_shape is not None else tuple(raw_shape)

    def _infer_image_shape(self):
        fixed = next(iter(self._pairs.values()))[0]
        shape = _nifti_shape(fixed, f"{self.name} image")
        shape3 = tuple(shape[:3]) + (1,) * (3 - len(shape[:3]))
        grid = self._grid_shape3d(shape3)
        if self.ndim == 3:
            return grid
        return tuple(s for a, s in enumerate(grid) if a != self.slice_axis)

    def _prepare(self, image_path: str, what: str):
        """Load one image + label map, normalize, pad/crop, slice. Returns (image, labels,
        new->raw 4x4, raw affine, zooms, pad starts)."""
        img, affine, zooms = _load_image(image_path, f"{self.name} {what} image")
        img = _as_3d(img, image_path, f"{self.name} {what} image")
        label_path = _find_nifti(self.label_dir, _nifti_stem(image_path),
                                 f"{self.name} {what} label map")
        lab = _as_3d(_load_labels(label_path, len(self.CLASS_NAMES),
                                  f"{self.name} {what} label map"), label_path, "label map")
        _check_same_shape(img, image_path, lab, label_path)
        lo, hi = self.hu_window
        img = ((np.clip(img, lo, hi) - lo) / (hi - lo)).astype(np.float32)
        starts = [0, 0, 0]
        if self.pad_shape is not None:
            for a, (n, t) in enumerate(zip(img.shape, self.pad_shape)):
                if n > t:
                    starts[a] = (n - t) // 2
                    warnings.warn(f"{image_path}: axis {a} has {n} voxels > {t}; centre-cropping "
                                  f"to {t}", stacklevel=4)
                else:
                    starts[a] = -((t - n) // 2)
            img = _window(img, starts, self.pad_shape, np.float32(0.0))
            lab = _window(lab, starts, self.pad_shape, np.int32(0))
        new_to_raw = _translation(starts)
        spacing = tuple(float(z) for z in zooms[:3])
        if self.ndim == 2:
            ax = self.slice_axis
            index = img.shape[ax] // 2
            img = np.take(img, index, axis=ax)
            lab = np.take(lab, index, axis=ax)
            new_to_raw = new_to_raw @ _slice_matrix(ax, index)
            spacing = tuple(s for a, s in enumerate(spacing) if a != ax)
        return img, lab, new_to_raw, affine, spacing, starts

    def _keypoints(self, image_path: str, new_to_raw: np.ndarray, shape, what: str):
        if self.ndim != 3 or self.keypoints_dir is None:
            return None
        path = os.path.join(self.keypoints_dir, _nifti_stem(image_path) + ".csv")
        kp = _load_keypoints(path, 3, f"{self.name} {what} keypoint file")
        kp = _points_to_grid(kp, new_to_raw, 3).astype(np.float32)
        _warn_outside(kp, shape, f"keypoints of {path}")
        return kp

    def _load_pair(self, pair_id: str) -> RegistrationPair:
        fixed_path, moving_path = self._pairs[pair_id]
        fimg, flab, f_map, f_aff, spacing, _ = self._prepare(fixed_path, "fixed")
        mimg, mlab, m_map, _, _, _ = self._prepare(moving_path, "moving")
        if fimg.shape != mimg.shape:
            raise ValueError(f"shape mismatch: fixed {fixed_path} gives {fimg.shape} but moving "
                             f"{moving_path} gives {mimg.shape}")
        fkp = self._keypoints(fixed_path, f_map, fimg.shape, "fixed")
        mkp = self._keypoints(moving_path, m_map, mimg.shape, "moving")
        if fkp is not None and len(fkp) != len(mkp):
            raise ValueError(f"pair {pair_id}: {len(fkp)} fixed but {len(mkp)} moving keypoints")
        return RegistrationPair(
            pair_id=pair_id,
            moving=mimg[..., None],
            fixed=fimg[..., None],
            moving_seg=mlab,
            fixed_seg=flab,
            spacing=spacing,
            fixed_kp=fkp,
            moving_kp=mkp,
            affine=f_aff @ f_map,
            extras={"fixed_path": fixed_path, "moving_path": moving_path},
        )


class NLSTDataset(_Learn2RegCT):
    """Learn2Reg NLST (see the module docstring)."""

    name = "nlst"
    prefix = "NLST"
    json_name = "NLST_dataset.json"
    hu_window = (-980.0, 1518.0)
    pad_shape = None
    default_ndim = 2
    split_ratios = (169, 10, 30)


class L2RLungDataset(_Learn2RegCT):
    """Learn2Reg LungCT (see the module docstring)."""

    name = "l2r-lung"
    prefix = "LungCT"
    json_name = "LungCT_dataset.json"
    hu_window = (-980.0, 600.0)
    pad_shape = (192, 128, 192)
    default_ndim = 3
    split_ratios = (20, 4, 4)


# --------------------------------------------------------------------------------------------
# ACDC
# --------------------------------------------------------------------------------------------
def _read_info_cfg(path: str) -> dict:
    _require_file(path, "ACDC Info.cfg")
    info = {}
    with open(path) as fh:
        for line in fh:
            if ":" in line:
                key, value = line.split(":", 1)
                info[key.strip()] = value.strip()
    frames = {}
    for key in ("ED", "ES"):
        try:
            frames[key] = int(float(info[key]))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path}: no valid '{key}: <frame>' line") from exc
    return frames


class ACDCDataset(RegistrationDataset):
    """ACDC cardiac cine MRI, ED (fixed) -> ES (moving) middle slices (module docstring)."""

    name = "acdc"
    split_ratios = (50, 20, 30)
    CLASS_NAMES = ("RV", "myocardium", "LV_blood_pool")

    def __init__(self, data_dir=None, ndim=None, target_spacing=None, crop_size=(128, 128),
                 image_size=None):
        super().__init__()
        if data_dir is None:
            raise ValueError("dataset 'acdc' needs --data-dir (the folder holding patientXXX/)")
        root = _require_dir(os.path.abspath(data_dir), "ACDC data folder")
        if ndim is not None and int(ndim) != 2:
            raise ValueError("dataset 'acdc' is 2D only (middle slices); use --ndim 2")
        if image_size is not None:
            warnings.warn("--image-size is ignored for dataset 'acdc' (crop 128 x 128)",
                          stacklevel=3)
        self.ndim = 2
        self.target_spacing = None if target_spacing is None else float(target_spacing)
        if self.target_spacing is not None and self.target_spacing <= 0:
            raise ValueError(f"acdc: target_spacing must be > 0, got {target_spacing}")
        self.crop_size = tuple(int(s) for s in crop_size)
        self._image_shape = self.crop_size
        self._class_names = self.CLASS_NAMES
        pattern = re.compile(r"patient\d+$")

        def patients(folder):
            return sorted(d for d in os.listdir(folder)
                          if pattern.match(d) and os.path.isdir(os.path.join(folder, d)))

        ids = patients(root)
        if not ids:
            for sub in ("training", os.path.join("database", "training")):
                if os.path.isdir(os.path.join(root, sub)) and patients(os.path.join(root, sub)):
                    root = os.path.join(root, sub)
                    ids = patients(root)
                    break
        if not ids:
            raise ValueError(f"no ACDC patientXXX folders found in {root}")
        self.data_dir = root
        self._frames = {pid: _read_info_cfg(os.path.join(root, pid, "Info.cfg")) for pid in ids}

    def _all_ids(self):
        return list(self._frames)

    def frame_files(self, pair_id: str) -> dict:
        """{"ED": (image, gt), "ES": (image, gt)} paths of ``pair_id``."""
        self._check_id(pair_id)
        folder = os.path.join(self.data_dir, pair_id)
        out = {}
        for key, frame in self._frames[pair_id].items():
            stem = f"{pair_id}_frame{frame:02d}"
            out[key] = (_find_nifti(folder, stem, f"ACDC {key} image"),
                        _find_nifti(folder, stem + "_gt", f"ACDC {key} label map"))
        return out

    @staticmethod
    def _normalize(volume: np.ndarray) -> tuple:
        lo = float(volume.min())
        hi = float(np.percentile(volume, 99.5))
        return lo, hi

    def _load_pair(self, pair_id: str) -> RegistrationPair:
        from scipy import ndimage

        files = self.frame_files(pair_id)
        raw = {}
        for key, (img_path, gt_path) in files.items():
            img, affine, zooms = _load_image(img_path, f"ACDC {key} image")
            img = _as_3d(img, img_path, f"ACDC {key} image")
            lab = _as_3d(_load_labels(gt_path, 3, f"ACDC {key} label map"), gt_path,
                         "label map")
            _check_same_shape(img, img_path, lab, gt_path)
            raw[key] = (img, lab, affine, zooms, img_path)
        _check_same_shape(raw["ED"][0], raw["ED"][4], raw["ES"][0], raw["ES"][4])
        ed_img, _, affine, zooms, _ = raw["ED"]
        nz = ed_img.shape[2]
        z = nz // 2
        sx, sy = float(zooms[0]), float(zooms[1])
        target = self.target_spacing or min(sx, sy)
        ratio = (target / sx, target / sy)
        out_shape = tuple(int(np.floor((n - 1) * s / target + 1e-6)) + 1
                          for n, s in zip(ed_img.shape[:2], (sx, sy)))

        def resample(a, order):
            return ndimage.affine_transform(a, ratio, offset=0.0, output_shape=out_shape,
                                            order=order, mode="nearest")

        sl = {}
        for key, (img, lab, _, _, _) in raw.items():
            lo, hi = self._normalize(img)
            s = img[:, :, z]
            s = (np.clip(s, lo, hi) - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
            sl[key] = (np.clip(resample(s.astype(np.float32), 1), 0.0, 1.0).astype(np.float32),
                       resample(lab[:, :, z].astype(np.int32), 0).astype(np.int32))
        fixed_lab = sl["ED"][1]
        if np.any(fixed_lab > 0):
            centre = np.round(np.argwhere(fixed_lab > 0).mean(axis=0)).astype(int)
        else:
            warnings.warn(f"ACDC {pair_id}: the ED middle slice has no labels; cropping around "
                          f"the image centre", stacklevel=3)
            centre = np.asarray(out_shape) // 2
        starts = [int(c) - t // 2 for c, t in zip(centre, self.crop_size)]
        crop = {key: (_window(im, starts, self.crop_size, np.float32(0.0)),
                      _window(lb, starts, self.crop_size, np.int32(0)))
                for key, (im, lb) in sl.items()}
        # preprocessed (a, b, c) -> raw voxel (ratio_x (a + start_a), ratio_y (b + start_b), z + c)
        new_to_raw = np.diag([ratio[0], ratio[1], 1.0, 1.0])
        new_to_raw[:3, 3] = [ratio[0] * starts[0], ratio[1] * starts[1], z]
        return RegistrationPair(
            pair_id=pair_id,
            moving=crop["ES"][0][..., None],
            fixed=crop["ED"][0][..., None],
            moving_seg=crop["ES"][1],
            fixed_seg=crop["ED"][1],
            spacing=(target, target),
            fixed_kp=None,
            moving_kp=None,
            affine=affine @ new_to_raw,
            extras={"frames": dict(self._frames[pair_id]), "slice_index": z,
                    "fixed_path": files["ED"][0], "moving_path": files["ES"][0]},
        )


# --------------------------------------------------------------------------------------------
# folder (pairs table)
# --------------------------------------------------------------------------------------------
class FolderDataset(RegistrationDataset):
    """User data listed in a pairs CSV (see the module docstring)."""

    name = "folder"
    split_ratios = (70, 15, 15)
    REQUIRED = ("pair_id", "fixed", "moving", "fixed_seg", "moving_seg")

    def __init__(self, data_dir=None, pairs_csv=None, ndim=None, num_classes=None,
                 class_names=None, clip_percentiles=None, slice_axis=None, image_size=None):
        super().__init__()
        if pairs_csv is None and data_dir is not None:
            pairs_csv = os.path.join(data_dir, "pairs.csv")
        if pairs_csv is None:
            raise ValueError("dataset 'folder' needs --pairs-csv (columns pair_id,fixed,moving,"
                             "fixed_seg,moving_seg[,fixed_kp,moving_kp][,split])")
        self.pairs_csv = _require_file(os.path.abspath(pairs_csv), "pairs CSV")
        if image_size is not None:
            warnings.warn("--image-size is ignored for dataset 'folder' (no resampling)",
                          stacklevel=3)
        self.clip_percentiles = (None if clip_percentiles is None
                                 else tuple(float(p) for p in clip_percentiles))
        if self.clip_percentiles is not None and not (
                len(self.clip_percentiles) == 2
                and 0 <= self.clip_percentiles[0] < self.clip_percentiles[1] <= 100):
            raise ValueError(f"clip_percentiles must be LO HI with 0 <= LO < HI <= 100, got "
                             f"{clip_percentiles}")
        self._requested_ndim = None if ndim is None else int(ndim)
        self.slice_axis = 2 if slice_axis is None else int(slice_axis)
        self._given_num_classes = None if num_classes is None else int(num_classes)
        if class_names is not None:
            if isinstance(class_names, str):
                class_names = [c.strip() for c in class_names.split(",") if c.strip()]
            class_names = tuple(class_names)
            if num_classes is not None and len(class_names) != int(num_classes):
                raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
            self._given_num_classes = len(class_names)
        self._given_class_names = class_names
        self._rows, self._has_split = self._read_csv()
        self._layout = self._infer_layout()
        self.ndim = len(self._layout["kept"])

    def _read_csv(self):
        base = os.path.dirname(self.pairs_csv)
        with open(self.pairs_csv, newline="") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in self.REQUIRED if c not in columns]
            if missing:
                raise ValueError(f"pairs CSV {self.pairs_csv} lacks column(s) {missing}; "
                                 f"found {columns}")
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
        if not rows:
            raise ValueError(f"pairs CSV {self.pairs_csv} lists no pairs")
        has_split = "split" in columns
        has_kp = "fixed_kp" in columns and "moving_kp" in columns
        out, seen = {}, set()
        for line, row in enumerate(rows, start=2):
            pid = row["pair_id"]
            if not pid:
                raise ValueError(f"{self.pairs_csv} line {line}: empty pair_id")
            if pid in seen:
                raise ValueError(f"{self.pairs_csv} line {line}: duplicate pair_id {pid!r}")
            seen.add(pid)
            entry = {}
            for key in ("fixed", "moving", "fixed_seg", "moving_seg"):
                if not row[key]:
                    raise ValueError(f"{self.pairs_csv} line {line}: empty {key!r} column")
                entry[key] = _require_file(os.path.normpath(os.path.join(base, row[key])),
                                           f"{key} of pair {pid} ({self.pairs_csv})")
            for key in ("fixed_kp", "moving_kp"):
                value = row.get(key, "") if has_kp else ""
                entry[key] = (_require_file(os.path.normpath(os.path.join(base, value)),
                                            f"{key} of pair {pid} ({self.pairs_csv})")
                              if value else None)
            if (entry["fixed_kp"] is None) != (entry["moving_kp"] is None):
                raise ValueError(f"{self.pairs_csv} line {line}: give both fixed_kp and "
                                 f"moving_kp or neither")
            if has_split:
                split = row["split"].lower()
                if split not in SPLITS:
                    raise ValueError(f"{self.pairs_csv} line {line}: split {row['split']!r} is "
                                     f"not one of {SPLITS}")
                entry["split"] = split
            out[pid] = entry
        return out, has_split

    def _infer_layout(self) -> dict:
        first = next(iter(self._rows.values()))["fixed"]
        shape = _nifti_shape(first, "fixed image")
        if len(shape) > 3 and any(s != 1 for s in shape[3:]):
            raise ValueError(f"fixed image {first} has shape {shape}; expected 2D or 3D")
        shape3 = tuple(shape[:3]) + (1,) * (3 - len(shape[:3]))
        non_single = [a for a in range(3) if shape3[a] > 1]
        if len(non_single) == 3:
            if self._requested_ndim == 2:
                ax = self.slice_axis
                if ax not in (0, 1, 2):
                    raise ValueError(f"slice_axis must be 0, 1 or 2, got {ax}")
                return {"kept": [a for a in range(3) if a != ax], "drop": ax, "mode": "slice"}
            return {"kept": [0, 1, 2], "drop": None, "mode": "3d"}
        if len(non_single) == 2:
            if self._requested_ndim == 3:
                raise ValueError(f"--ndim 3 requested but {first} is a 2D image {shape}")
            drop = [a for a in range(3) if a not in non_single][0]
            return {"kept": non_single, "drop": drop, "mode": "squeeze"}
        raise ValueError(f"fixed image {first} has shape {shape}: need at least two axes "
                         f"longer than 1")

    def _all_ids(self):
        return list(self._rows)

    def _split_table(self):
        if not self._has_split:
            return super()._split_table()
        return {s: [pid for pid, e in self._rows.items() if e["split"] == s] for s in SPLITS}

    def _infer_image_shape(self):
        first = next(iter(self._rows.values()))["fixed"]
        shape = _nifti_shape(first, "fixed image")
        shape3 = tuple(shape[:3]) + (1,) * (3 - len(shape[:3]))
        return tuple(shape3[a] for a in self._layout["kept"])

    def _infer_class_names(self):
        if self._given_class_names is not None:
            return self._given_class_names
        if self._given_num_classes is not None:
            n = self._given_num_classes
        else:
            found: set = set()
            for entry in self._rows.values():
                for key in ("fixed_seg", "moving_seg"):
                    found.update(np.unique(_load_labels(entry[key], None, key.replace("_seg", " label map"))).tolist())
            n = max(found)
            if n == 0:
                raise ValueError(f"no foreground labels in the fixed label maps of "
                                 f"{self.pairs_csv}; pass --num-classes")
            empty = [c for c in range(1, n + 1) if c not in found]
            if empty:
                warnings.warn(
                    f"folder dataset {self.pairs_csv}: classes {', '.join(f'class{c}' for c in empty)} have no "
                    f"voxels in any label map (labels found: {sorted(found)}); the class count {n} comes from "
                    f"the largest label. Declare the classes with --num-classes/--class-names (other labels "
                    f"are then an error) or fix the label maps", stacklevel=2)
        return tuple(f"class{c}" for c in range(1, n + 1))

    def _normalize(self, img: np.ndarray, path: str) -> np.ndarray:
        if self.clip_percentiles is not None:
            lo, hi = np.percentile(img, self.clip_percentiles)
            img = np.clip(img, lo, hi)
        lo, hi = float(img.min()), float(img.max())
        if hi <= lo:
            warnings.warn(f"image {path} is constant; it becomes all zeros", stacklevel=4)
            return np.zeros_like(img, dtype=np.float32)
        return ((img - lo) / (hi - lo)).astype(np.float32)

    def _prepare(self, img_path: str, seg_path: str, what: str):
        img, affine, zooms = _load_image(img_path, f"{what} image")
        img = _as_3d(img, img_path, f"{what} image")
        lay = self._layout
        if lay["mode"] == "squeeze" and img.shape[lay["drop"]] > 1 and self._requested_ndim != 2:
            first = next(iter(self._rows.values()))["fixed"]
            raise ValueError(f"{what} image {img_path} is a 3D volume {img.shape} but the dataset is 2D "
                             f"(its first image {first} is 2D); pass --ndim 2 to use the middle slice "
                             f"along axis {lay['drop']}, or list only 2D images")
        lab = _as_3d(_load_labels(seg_path, self.num_classes, f"{what} label map"), seg_path,
                     "label map")
        _check_same_shape(img, img_path, lab, seg_path)
        img = self._normalize(img, img_path)
        zooms3 = tuple(float(z) for z in zooms[:3]) + (1.0,) * (3 - len(zooms[:3]))
        lay = self._layout
        if lay["mode"] == "3d":
            new_to_raw = np.eye(4)
        else:
            index = img.shape[lay["drop"]] // 2
            img = np.take(img, index, axis=lay["drop"])
            lab = np.take(lab, index, axis=lay["drop"])
            new_to_raw = _slice_matrix(lay["drop"], index)
        spacing = tuple(zooms3[a] for a in lay["kept"])
        return img, lab, affine, new_to_raw, spacing

    def _keypoints(self, path, new_to_raw, shape):
        lay = self._layout
        if path is None or lay["mode"] == "slice":
            return None
        kp = _load_keypoints(path, (2, 3) if lay["mode"] == "squeeze" else 3)
        if kp.shape[1] == 2:
            full = np.zeros((len(kp), 3))
            full[:, lay["kept"]] = kp
            kp = full
        kp = _points_to_grid(kp, new_to_raw, self.ndim).astype(np.float32)
        _warn_outside(kp, shape, f"keypoints of {path}")
        return kp

    def _load_pair(self, pair_id: str) -> RegistrationPair:
        e = self._rows[pair_id]
        fimg, flab, faff, fmap, spacing = self._prepare(e["fixed"], e["fixed_seg"], "fixed")
        mimg, mlab, _, mmap, _ = self._prepare(e["moving"], e["moving_seg"], "moving")
        if fimg.shape != mimg.shape:
            raise ValueError(f"shape mismatch: fixed {e['fixed']} gives {fimg.shape} but moving "
                             f"{e['moving']} gives {mimg.shape}")
        if self._layout["mode"] == "slice" and e["fixed_kp"] is not None:
            warnings.warn(f"pair {pair_id}: keypoints are dropped for 2D slices of 3D volumes",
                          stacklevel=3)
        fkp = self._keypoints(e["fixed_kp"], fmap, fimg.shape)
        mkp = self._keypoints(e["moving_kp"], mmap, mimg.shape)
        if fkp is not None and len(fkp) != len(mkp):
            raise ValueError(f"pair {pair_id}: {len(fkp)} fixed keypoints ({e['fixed_kp']}) but "
                             f"{len(mkp)} moving keypoints ({e['moving_kp']})")
        return RegistrationPair(
            pair_id=pair_id,
            moving=mimg[..., None],
            fixed=fimg[..., None],
            moving_seg=mlab,
            fixed_seg=flab,
            spacing=spacing,
            fixed_kp=fkp,
            moving_kp=mkp,
            affine=faff @ fmap,
            extras={"fixed_path": e["fixed"], "moving_path": e["moving"]},
        )


# --------------------------------------------------------------------------------------------
# factory and CLI
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# tf.data
# --------------------------------------------------------------------------------------------
def make_tf_dataset(dataset: RegistrationDataset, split: str, batch_size: int, seed: int,
                    shuffle: bool = True, repeat: bool = True):
    """``tf.data.Dataset`` of dict(moving float32 [B,*s,1], fixed float32 [B,*s,1],
    fixed_seg int32 [B,*s]) batches of ``split``. Pair order is shuffled with ``seed`` (every
    epoch reshuffled, deterministically); with ``repeat`` the stream is infinite and batches are
    always full (``drop_remainder``), else one pass with a possibly smaller last batch. Batches
    are gathered from the in-memory :meth:`RegistrationDataset.arrays` (no copy of the whole
    split into the TF graph), then ``prefetch(AUTOTUNE)``."""
    if "tensorflow" not in sys.modules:
        try:  # Keras-2 / neurite shims must be in place before TensorFlow is first imported
            from hypermorph_spatially_adaptive import compat

            compat.apply()
        except ImportError:
            os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf

    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    arrays = dataset.arrays(split)
    moving, fixed, fixed_seg = arrays["moving"], arrays["fixed"], arrays["fixed_seg"]
    n = len(fixed)
    spatial = tuple(fixed.shape[1:-1])

    def gather(idx):
        idx = np.asarray(idx, dtype=np.int64)
        return moving[idx], fixed[idx], fixed_seg[idx]

    def lookup(idx):
        m, f, s = tf.numpy_function(gather, [idx], [tf.float32, tf.float32, tf.int32],
                                    stateful=False)
        b = int(batch_size) if repeat else None
        m.set_shape((b, *spatial, 1))
        f.set_shape((b, *spatial, 1))
        s.set_shape((b, *spatial))
        return {"moving": m, "fixed": f, "fixed_seg": s}

    ds = tf.data.Dataset.range(n)
    if shuffle:
        ds = ds.shuffle(n, seed=int(seed), reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(int(batch_size), drop_remainder=bool(repeat))
    ds = ds.map(lookup)
    return ds.prefetch(tf.data.AUTOTUNE)
