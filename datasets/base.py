"""The dataset interface: :class:`RegistrationPair`, :class:`RegistrationDataset` (ids, fixed
splits, validated loading, in-memory split arrays), :func:`validate_pair` and
:func:`validate_dataset` (every pair read once before training). numpy only.

Array and coordinate conventions of a pair: see the package docstring (``datasets``) and
``CONVENTIONS.md``.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

SPLITS = ("train", "val", "test")


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


def assemble_pair(pair_id: str, fixed: tuple, moving: tuple, spacing: tuple, affine: np.ndarray,
                  keypoints: tuple = (None, None)) -> RegistrationPair:
    """The NIfTI loaders' last step: check the keypoint counts and build the pair.

    ``fixed`` / ``moving`` are ``(path, image [*spatial], labels [*spatial])`` of the same shape
    (the loaders check it first); ``keypoints`` is ``(fixed_kp, moving_kp)``, each ``[K, D]`` or
    None. Raises ``ValueError`` naming the files when the keypoint counts differ.
    """
    (fpath, fimg, flab), (mpath, mimg, mlab) = fixed, moving
    fkp, mkp = keypoints
    if fkp is not None and len(fkp) != len(mkp):
        raise ValueError(f"pair {pair_id}: {len(fkp)} fixed keypoints but {len(mkp)} moving keypoints "
                         f"(keypoint files of {fpath} and {mpath})")
    return RegistrationPair(pair_id=pair_id, moving=mimg[..., None], fixed=fimg[..., None],
                            moving_seg=mlab, fixed_seg=flab, spacing=spacing, fixed_kp=fkp,
                            moving_kp=mkp, affine=affine,
                            extras={"fixed_path": fpath, "moving_path": mpath})


class PairNotFoundError(KeyError, ValueError):
    """A pair id that the dataset does not contain (catchable as KeyError or ValueError)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def split_sizes(n: int, ratios) -> list[int]:
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
    #: the options this dataset takes (:class:`datasets.options.Option`), declared once: the
    #: keyword arguments of ``__init__`` besides ``data_dir``, the command line and config.json
    OPTIONS: tuple = ()
    #: whether training should zero the warped image where the fixed image is 0 (the authors'
    #: ``crop_in_loss``; True for the lung CT datasets, whose images are 0 outside the body/grid)
    crop_in_loss_default: bool = False
    #: the named split scheme (``--split-scheme``) or None where the dataset has none
    split_scheme: str | None = None

    @classmethod
    def config_options(cls, data_dir, values: dict) -> dict:
        """``config.json["data"]`` entries for the option ``values`` (``{key: value or None}``);
        subclasses may resolve defaults here."""
        return {opt.key: opt.to_config(values.get(opt.key)) for opt in cls.OPTIONS}

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
        sizes = split_sizes(len(ids), self.split_ratios)
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

    def select_ids(self, split: str, pair_ids: Sequence[str] | None = None) -> list[str]:
        """``split_ids(split)``, or the given ``pair_ids`` after checking that all are in it."""
        ids = self.split_ids(split)
        if pair_ids:
            unknown = [p for p in pair_ids if p not in ids]
            if unknown:
                raise ValueError(f"pair id(s) {unknown} are not in the {split} split of {self.name}")
            ids = list(pair_ids)
        return ids

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
            where = f" ({dataset.pairs_csv})" if getattr(dataset, "pairs_csv", None) else ""
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
