"""NIfTI / CSV reading with validation (errors name the file), and the small voxel-grid helpers the
loaders share (windowing, slicing, index maps, keypoint mapping). nibabel is imported lazily.

Arrays keep the NIfTI voxel index order (``img.dataobj`` order, no reorientation).
"""
from __future__ import annotations

import os
import warnings

import numpy as np


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
        if lo < 0:
            raise ValueError(f"{what} {path} has negative labels {np.unique(labels[labels < 0]).tolist()}; "
                             f"labels are 0 (background) and 1..C (tissue classes)")
        if num_classes is not None and hi > num_classes:
            raise ValueError(f"{what} {path} has labels outside 0..{num_classes}: "
                             f"{np.unique(labels).tolist()}")
    return labels.astype(np.int32)


#: an image warns when its 99th percentile lies in the lowest this fraction of its min-max range
OUTLIER_FRACTION = 0.05


def minmax_scale(img: np.ndarray, clip_percentiles=None, what: str = "image") -> np.ndarray:
    """The folder datasets' intensity scaling, the same wherever an image is read (training
    data and ``register.py``): clip at the ``clip_percentiles`` ``(LO, HI)`` if given, then map
    ``[min, max]`` to ``[0, 1]`` (float32). A constant image becomes zeros (warning). An image
    whose range is set by a few outliers (its 99th percentile in the lowest
    :data:`OUTLIER_FRACTION` of the range, e.g. one voxel at 1e6) warns, naming ``what`` and the
    fix ``--clip-percentiles``; it is scaled as asked (warnings point to the caller's caller)."""
    if clip_percentiles is not None:
        img = np.clip(img, *np.percentile(img, clip_percentiles))
    lo, hi = float(img.min()), float(img.max())
    if hi <= lo:
        warnings.warn(f"{what} is constant; it becomes all zeros", stacklevel=3)
        return np.zeros_like(img, dtype=np.float32)
    p99 = float(np.percentile(img, 99))
    if p99 - lo < OUTLIER_FRACTION * (hi - lo):
        warnings.warn(f"{what}: its maximum {hi:g} lies far above its 99th percentile {p99:g}, so min-max scaling "
                      f"squeezes 99% of its voxels into [0, {(p99 - lo) / (hi - lo):.2g}]; pass --clip-percentiles "
                      f"0.5 99.5 (applied to every image) if these are outliers", stacklevel=3)
    return ((img - lo) / (hi - lo)).astype(np.float32)


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
