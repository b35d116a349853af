"""NIfTI / CSV reading with validation (errors name the file), and the small voxel-grid helpers the
loaders share (windowing, slicing, index maps, keypoint mapping). nibabel is imported lazily.

Arrays keep the NIfTI voxel index order (``img.dataobj`` order, no reorientation).
"""
from __future__ import annotations

import os
import warnings

import numpy as np


def import_nibabel():
    try:
        import nibabel
    except ImportError as exc:  # pragma: no cover - environment problem
        raise ImportError("nibabel is needed to read NIfTI datasets: pip install nibabel") from exc
    return nibabel


def require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def nifti_stem(path: str) -> str:
    base = os.path.basename(path)
    for ext in (".nii.gz", ".nii"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


def find_nifti(folder: str, stem: str, what: str) -> str:
    """``folder/stem.nii.gz`` or ``folder/stem.nii``; FileNotFoundError naming the .nii.gz."""
    for ext in (".nii.gz", ".nii"):
        path = os.path.join(folder, stem + ext)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{what} not found: {os.path.join(folder, stem + '.nii.gz')}")


def nifti_shape(path: str, what: str) -> tuple:
    require_file(path, what)
    try:
        return tuple(int(s) for s in import_nibabel().load(path).shape)
    except Exception as exc:
        raise ValueError(f"cannot read NIfTI header of {what} {path}: {exc}") from exc


def read_nifti(path: str, what: str):
    """(data as stored, affine 4x4, zooms) -- FileNotFoundError / ValueError naming ``path``."""
    require_file(path, what)
    nib = import_nibabel()
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


def as_3d(data: np.ndarray, path: str, what: str) -> np.ndarray:
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise ValueError(f"{what} {path} has shape {data.shape}; expected a 2D or 3D image")
    return data


def load_image(path: str, what: str = "image"):
    data, affine, zooms = read_nifti(path, what)
    data = data.astype(np.float32, copy=False)
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{what} {path} contains NaN or infinite values")
    return data, affine, zooms


def load_labels(path: str, num_classes: int | None, what: str = "label map") -> np.ndarray:
    data, _, _ = read_nifti(path, what)
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


def load_keypoints(path: str, ncols: int | tuple, what: str = "keypoint file") -> np.ndarray:
    """Comma-separated voxel coordinates, one keypoint per row (a header row is tolerated)."""
    require_file(path, what)
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


def crop_window(arr: np.ndarray, starts, size, fill) -> np.ndarray:
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


def translation_matrix(starts) -> np.ndarray:
    """4x4 mapping new voxel index -> raw voxel index for ``raw = new + start``."""
    m = np.eye(4)
    m[:3, 3] = np.asarray(list(starts) + [0] * (3 - len(starts)), dtype=np.float64)[:3]
    return m


def slice_matrix(axis: int, index: float) -> np.ndarray:
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


def points_to_grid(points: np.ndarray, new_to_raw: np.ndarray, ndim: int) -> np.ndarray:
    """Map raw voxel coordinates [K, 3] into the preprocessed grid (first ``ndim`` columns)."""
    raw_to_new = np.linalg.inv(new_to_raw)
    homog = np.concatenate([points, np.ones((len(points), 1))], axis=1)
    return (homog @ raw_to_new.T)[:, :ndim]


def warn_outside(kp: np.ndarray, shape, what: str) -> None:
    if len(kp) == 0:
        return
    hi = np.asarray(shape, np.float64) - 1
    outside = np.any((kp < -0.5) | (kp > hi + 0.5), axis=1)
    if np.any(outside):
        warnings.warn(f"{int(outside.sum())} of {len(kp)} {what} lie outside the preprocessed "
                      f"grid {tuple(shape)}; they are kept", stacklevel=3)


def check_same_shape(a: np.ndarray, path_a: str, b: np.ndarray, path_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {path_a} has shape {a.shape} but {path_b} has "
                         f"shape {b.shape}")


def check_label_grid(img_shape, img_affine, img_path: str, lab_shape, lab_affine, lab_path: str,
                     atol: float = 1e-3) -> None:
    """A label map must lie on its image's voxel grid: same shape and the same voxel -> world
    affine (within ``atol`` mm). A map of the right shape but another affine (axes swapped or
    flipped, e.g. a TotalSegmentator map written in another orientation) would load silently and
    score wrong Dice; it is refused with both affines printed."""
    if tuple(img_shape) != tuple(lab_shape):
        raise ValueError(f"shape mismatch: {img_path} has shape {tuple(img_shape)} but {lab_path} has "
                         f"shape {tuple(lab_shape)}")
    a, b = np.asarray(img_affine, np.float64), np.asarray(lab_affine, np.float64)
    if a.shape != (4, 4) or b.shape != (4, 4) or not np.allclose(a, b, rtol=0.0, atol=atol):
        with np.printoptions(precision=4, suppress=True):
            raise ValueError(
                f"label map {lab_path} is not on the grid of its image {img_path}: same shape "
                f"{tuple(img_shape)} but different voxel -> world affines (axes swapped or flipped?).\n"
                f"image affine:\n{a}\nlabel affine:\n{b}\nResample or reorient the label map onto the "
                f"image (e.g. rerun TotalSegmentator on this very file)")


def resample_grid(shape, zooms, target: float):
    """The isotropic ``target`` mm grid over the same field of view as a ``shape`` grid of voxel
    size ``zooms`` (voxel corners aligned, as torchio's ``Resample``): ``n_out = round(n z / t)``
    per axis, and output voxel ``o`` sits at raw voxel ``(o + 1/2) t / z - 1/2``. Returns
    ``(out_shape, scale [D], offset [D])`` with ``raw = scale * o + offset``."""
    z = np.asarray(zooms, np.float64)[:len(shape)]
    scale = float(target) / z
    offset = 0.5 * scale - 0.5
    out_shape = tuple(max(1, int(np.floor(n * zz / target + 0.5))) for n, zz in zip(shape, z))
    return out_shape, scale, offset


def resample_image(img: np.ndarray, out_shape, scale, offset) -> np.ndarray:
    """Linear resampling of ``img`` onto ``raw = scale * o + offset`` (edge values beyond the
    border); float32. The map is diagonal, so (bi/tri)linear interpolation is done one axis at a
    time (the same numbers as ``scipy.ndimage.affine_transform(order=1, mode="nearest")``, a few
    times faster)."""
    out = img.astype(np.float32, copy=False)
    for axis, (n, s, o) in enumerate(zip(out_shape, scale, offset)):
        size = out.shape[axis]
        c = np.clip(s * np.arange(n, dtype=np.float64) + o, 0.0, size - 1)
        i0 = np.floor(c).astype(np.int64)
        i1 = np.minimum(i0 + 1, size - 1)
        w = (c - i0).astype(np.float32)
        shape = [1] * out.ndim
        shape[axis] = n
        w = w.reshape(shape)
        out = np.take(out, i0, axis=axis) * (1.0 - w) + np.take(out, i1, axis=axis) * w
    return out.astype(np.float32, copy=False)


def resample_labels(lab: np.ndarray, out_shape, scale, offset) -> np.ndarray:
    """Nearest-neighbour resampling of a label map onto ``raw = scale * o + offset``."""
    idx = [np.clip(np.floor(s * np.arange(n) + o + 0.5).astype(np.int64), 0, m - 1)
           for n, s, o, m in zip(out_shape, scale, offset, lab.shape)]
    return lab[np.ix_(*idx)]


def scale_offset_matrix(scale, offset) -> np.ndarray:
    """4x4 of ``raw = scale * new + offset`` (3 axes)."""
    m = np.eye(4)
    m[:3, :3] = np.diag(np.asarray(list(scale) + [1.0] * (3 - len(scale)), np.float64)[:3])
    m[:3, 3] = np.asarray(list(offset) + [0.0] * (3 - len(offset)), np.float64)[:3]
    return m


def crop_or_pad_starts(shape, target) -> list:
    """Window starts of a centred crop-or-pad of ``shape`` to ``target`` as torchio's ``CropOrPad``
    (an odd difference puts the extra voxel before): crop start ``ceil(d/2)``, pad ``-ceil(d/2)``."""
    starts = []
    for n, t in zip(shape, target):
        d = int(n) - int(t)
        starts.append(-((-d) // 2) if d >= 0 else -((-d + 1) // 2))
    return starts


def _fill_lines(lead: np.ndarray, eq: np.ndarray, n_last: int, chunk: int = 2048) -> np.ndarray:
    """Inside test of the half-spaces ``eq`` (``[F, D + 1]``, ``normal . x + offset <= 0``) for
    every voxel of the lines ``(lead, t)``, ``t = 0..n_last-1``: ``[L, n_last]`` bool. Along a
    line each half-space bounds ``t`` from one side, so the inside is one interval per line."""
    tol = 1e-6
    normal_last, rest = eq[:, -2], eq[:, :-2]
    pos, neg, zero = normal_last > tol, normal_last < -tol, np.abs(normal_last) <= tol
    t = np.arange(n_last, dtype=np.float64)
    out = np.zeros((len(lead), n_last), bool)
    for s in range(0, len(lead), chunk):
        c = -(lead[s:s + chunk] @ rest.T + eq[:, -1])  # [L, F]: normal_last * t <= c
        hi = np.min(c[:, pos] / normal_last[pos], axis=1) if pos.any() else np.full(len(c), np.inf)
        lo = np.max(c[:, neg] / normal_last[neg], axis=1) if neg.any() else np.full(len(c), -np.inf)
        ok = np.all(c[:, zero] >= -tol, axis=1) if zero.any() else np.ones(len(c), bool)
        out[s:s + chunk] = ok[:, None] & (t[None] >= lo[:, None] - tol) & (t[None] <= hi[:, None] + tol)
    return out


def convex_hull_mask(mask: np.ndarray) -> np.ndarray | None:
    """Boolean convex hull of the ``True`` voxels of a 2D or 3D ``mask`` (voxel centres on or
    inside the hull of the ``True`` voxel centres), the authors' body mask. Computed line by line
    along the last axis from the hull's half-spaces; in 3D each slice along axis 0 uses only the
    facets that reach it (the cross-section of a convex polytope is bounded by those), so a
    224 x 192 x 224 volume takes well under a second. ``None`` if the voxels span no
    full-dimensional hull."""
    from scipy import ndimage
    from scipy.spatial import ConvexHull, QhullError

    mask = np.asarray(mask, bool)
    edge = mask & ~ndimage.binary_erosion(mask)  # the hull of the boundary voxels is the same hull
    pts = np.argwhere(edge)
    if len(pts) <= mask.ndim:
        return None
    try:
        hull = ConvexHull(pts)
    except QhullError:
        return None
    eq = hull.equations
    if mask.ndim == 2:
        return _fill_lines(np.arange(mask.shape[0])[:, None], eq, mask.shape[1]).reshape(mask.shape)
    x = hull.points[hull.simplices][..., 0]  # [F, 3] axis-0 coordinates of each facet's vertices
    xmin, xmax = x.min(axis=1), x.max(axis=1)
    out = np.zeros(mask.shape, bool)
    ys = np.arange(mask.shape[1])
    for i in range(int(np.floor(xmin.min())), int(np.ceil(xmax.max())) + 1):
        if not 0 <= i < mask.shape[0]:
            continue
        reach = (xmin <= i + 1e-6) & (xmax >= i - 1e-6)
        lead = np.stack([np.full(len(ys), float(i)), ys], axis=1)
        out[i] = _fill_lines(lead, eq[reach], mask.shape[2])
    return out
