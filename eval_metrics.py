"""Evaluation metrics for image registration: the metrics of the paper's Table 1 (Sec. 3.3: class
Dice, mean Dice, HD95, TRE, %negJ) plus SDlogJ (docs/reading_results.md "Metrics"). Pure numpy / scipy.

Conventions (every public function follows them)
-------------------------------------------------
* Registration conventions (channels-last, flow channel ``j`` = displacement along array axis
  ``j`` in voxels, ``disp`` on the FIXED grid, ``warped(x) = moving(x + disp(x))``): see
  ``CONVENTIONS.md``. ``D`` (2 or 3) is the number of spatial dimensions; moving and fixed
  arrays must have the same spatial shape.
* ``spacing`` is a length-``D`` sequence of positive voxel sizes in mm, in array-axis order.
* Keypoints are float arrays ``[K, D]`` in voxel index coordinates (axis order = array
  axis order, voxel centres at integer coordinates).
* Label maps are integer(-valued) arrays ``[*spatial]``: 0 = background, classes 1..C.
  Float label arrays are accepted if all values are integral (e.g. NIfTI ``get_fdata``).
* Invalid input raises ``ValueError`` with a message naming the problem.

Metric definitions
------------------
* Dice per class c in 1..C: ``2 |A_c & B_c| / (|A_c| + |B_c|)``; NaN when the class is
  absent from both maps (0 when it is absent from exactly one).  ``mean_dice`` = nanmean.
* HD95 (mm): surface voxels of a binary mask M are ``M & ~erode(M)`` with the face-connected
  (connectivity 1) structuring element and everything outside the image counted as
  background (so mask voxels on the image border are surface voxels).  For every surface
  voxel of A the Euclidean distance (in mm, using ``spacing``) to the nearest surface voxel
  of B is taken, and vice versa.  Default (``mode='pooled'``, MedPy's ``hd95``): both directed
  distance sets are concatenated and ``np.percentile(..., 95)`` (linear interpolation) is
  returned.  ``mode='max'``: the maximum of the two directed 95th percentiles (unweighted;
  DeepMind surface-distance / Learn2Reg use a surfel-area-weighted variant of this).
  A class empty in both maps gives NaN (nothing to compare).  A class empty in exactly one map
  (lost by the registration, or spurious) is penalised, not skipped: by default
  (``lost='diagonal'``) its HD95 is the image diagonal in mm,
  ``||(shape - 1) * spacing||`` (:func:`image_diagonal_mm`), the largest distance between two
  voxel centres, so no registration that keeps the class scores worse; ``lost='nan'`` gives NaN.
* TRE (mm): ``|| (p_F + u(p_F) - p_M) * spacing ||_2`` per keypoint, with ``u(p_F)`` sampled
  by linear interpolation (Learn2Reg's convention; their script samples with scipy's default
  cubic spline; we use linear, like every other sampling of ``u`` in this codebase).
* Dense end-point error (mm, synthetic data with a known field): ``|| (u - u_true) * spacing ||_2``
  per voxel, averaged over the voxels of a mask (the tissues, labels > 0, by default).
* Jacobian determinant of ``phi(x) = x + u(x)``: ``det(I + grad u)`` with ``np.gradient``
  (central differences inside, one-sided at the border), voxel units.  %negJ is the
  percentage (0..100) of voxels with ``det <= 0``.
* SDlogJ: ``convention='standard'`` (default) is ``std(log(clip(det, 1e-9, 1e9)))`` over all
  voxels.  ``convention='learn2reg'`` reproduces the official Learn2Reg evaluation script:
  central differences with zero padding outside the image, a 2-voxel border cropped on
  every side, then ``std(log(clip(det + 3, 1e-9, 1e9)))`` -- note their ``+ 3`` shift, which
  makes the numbers smaller than (and not comparable with) the standard definition.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "warp_image",
    "warp_labels",
    "warp_keypoints",
    "dice_per_class",
    "mean_dice",
    "nanmean",
    "hd95_per_class",
    "image_diagonal_mm",
    "tre",
    "dense_epe",
    "jacobian_determinant",
    "percent_negative_jacobian",
    "sdlogj",
    "registration_metrics",
]

_LOG_CLIP = (1e-9, 1e9)


# --------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------
def _check_disp(disp) -> np.ndarray:
    """Validate a displacement field and return it as float64 ``[*spatial, D]``."""
    disp = np.asarray(disp)
    if disp.ndim not in (3, 4):
        raise ValueError(
            f"disp must have shape [*spatial, D] with D = 2 or 3 spatial axes, got shape "
            f"{disp.shape}"
        )
    ndim = disp.ndim - 1
    if disp.shape[-1] != ndim:
        raise ValueError(
            f"disp has {disp.shape[-1]} channels but {ndim} spatial axes (shape {disp.shape}); "
            f"the number of channels must equal the number of spatial axes"
        )
    if not np.issubdtype(disp.dtype, np.number) or np.iscomplexobj(disp):
        raise ValueError(f"disp must be a real numeric array, got dtype {disp.dtype}")
    disp = disp.astype(np.float64, copy=False)
    if not np.all(np.isfinite(disp)):
        raise ValueError("disp contains NaN or inf values")
    return disp


def _check_spacing(spacing, ndim: int) -> np.ndarray:
    """Validate ``spacing`` (length ``ndim``, finite, > 0) and return a float64 array."""
    if spacing is None:
        raise ValueError(f"spacing is required: a length-{ndim} sequence of positive mm values")
    sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sp.size != ndim:
        raise ValueError(f"spacing has length {sp.size} but the data has {ndim} spatial axes")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be finite and positive, got {tuple(sp.tolist())}")
    return sp


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def _check_labels(seg, num_classes: int, name: str) -> np.ndarray:
    """Validate a label map (integral values in 0..num_classes) and return it as int64."""
    seg = np.asarray(seg)
    if seg.dtype == bool:
        seg = seg.astype(np.int64)
    if not np.issubdtype(seg.dtype, np.number) or np.iscomplexobj(seg):
        raise ValueError(f"{name} must be a numeric label map, got dtype {seg.dtype}")
    if np.issubdtype(seg.dtype, np.floating):
        if not np.all(np.isfinite(seg)):
            raise ValueError(f"{name} contains NaN or inf values")
        if np.any(seg != np.round(seg)):
            raise ValueError(f"{name} contains non-integer label values")
    if seg.size:
        lo, hi = seg.min(), seg.max()
        if lo < 0 or hi > num_classes:
            raise ValueError(
                f"{name} has labels outside 0..{num_classes} (found min {lo}, max {hi})"
            )
    return seg.astype(np.int64, copy=False)


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"spatial shape mismatch: {name_a} {a.shape} vs {name_b} {b.shape}")


def _check_spatial(arr: np.ndarray, disp: np.ndarray, name: str, allow_channels: bool) -> None:
    spatial = disp.shape[:-1]
    if arr.shape[: len(spatial)] != spatial or (
        arr.ndim != len(spatial) and not (allow_channels and arr.ndim == len(spatial) + 1)
    ):
        raise ValueError(
            f"spatial shape mismatch: {name} has shape {arr.shape} but disp has spatial "
            f"shape {spatial}"
        )


def _check_keypoints(kp, ndim: int, name: str) -> np.ndarray:
    kp = np.asarray(kp)
    if kp.ndim != 2 or kp.shape[1] != ndim:
        raise ValueError(f"{name} must have shape [K, {ndim}], got shape {kp.shape}")
    if not np.issubdtype(kp.dtype, np.number) or np.iscomplexobj(kp):
        raise ValueError(f"{name} must be a real numeric array, got dtype {kp.dtype}")
    kp = kp.astype(np.float64, copy=False)
    if not np.all(np.isfinite(kp)):
        raise ValueError(f"{name} contains NaN or inf values")
    return kp


def nanmean(values) -> float:
    """Mean over the non-NaN entries as a float; NaN (without a RuntimeWarning) when everything is
    NaN or nothing is given (the mean over classes of :func:`registration_metrics`)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


# --------------------------------------------------------------------------------------
# warping
# --------------------------------------------------------------------------------------
def _sample_coords(disp: np.ndarray) -> np.ndarray:
    """Sampling positions ``x + disp(x)`` as an array ``[D, *spatial]`` (voxel units)."""
    spatial = disp.shape[:-1]
    grid = np.indices(spatial, dtype=np.float64)
    return grid + np.moveaxis(disp, -1, 0)


def warp_image(moving: np.ndarray, disp: np.ndarray, order: int = 1) -> np.ndarray:
    """Warp a moving image with a displacement field: ``warped(x) = moving(x + disp(x))``.

    Args:
        moving: ``[*spatial]`` or ``[*spatial, C]`` (channels-last) image on the same grid
            shape as ``disp``.
        disp: ``[*spatial, D]`` displacement in voxels on the fixed grid.
        order: spline order for ``scipy.ndimage.map_coordinates`` (1 = linear).
            Out-of-image samples use ``mode='nearest'`` (edge value repeated).

    Returns:
        float64 array with the shape of ``moving``.
    """
    disp = _check_disp(disp)
    moving = np.asarray(moving)
    _check_spatial(moving, disp, "moving image", allow_channels=True)
    coords = _sample_coords(disp)
    if moving.ndim == disp.ndim - 1:
        return ndimage.map_coordinates(
            moving.astype(np.float64, copy=False), coords, order=order, mode="nearest"
        )
    out = np.empty(moving.shape, dtype=np.float64)
    for c in range(moving.shape[-1]):
        out[..., c] = ndimage.map_coordinates(
            moving[..., c].astype(np.float64, copy=False), coords, order=order, mode="nearest"
        )
    return out


def warp_labels(seg: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """Warp a label map with nearest-neighbour interpolation (``order=0``, ``mode='nearest'``).

    Args:
        seg: integer label map ``[*spatial]`` (same spatial shape as ``disp``).
        disp: ``[*spatial, D]`` displacement in voxels on the fixed grid.

    Returns:
        label map ``[*spatial]`` with the dtype of ``seg``: ``seg(round(x + disp(x)))``.
    """
    disp = _check_disp(disp)
    seg = np.asarray(seg)
    _check_spatial(seg, disp, "label map", allow_channels=False)
    coords = _sample_coords(disp)
    # map_coordinates with order 0 preserves label values; the float copy avoids integer
    # dtype corner cases, labels are small integers and stay exact in float64.
    out = ndimage.map_coordinates(seg.astype(np.float64), coords, order=0, mode="nearest")
    return np.rint(out).astype(seg.dtype)


def warp_keypoints(fixed_kp: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """Map fixed-image keypoints into the moving image: ``p_F + u(p_F)``.

    Args:
        fixed_kp: ``[K, D]`` keypoints in fixed-image voxel coordinates.
        disp: ``[*spatial, D]`` displacement in voxels on the fixed grid.

    Returns:
        ``[K, D]`` float64 positions in moving-image voxel coordinates.  ``u`` is sampled with
        linear interpolation; keypoints outside the grid use the nearest border value.
    """
    disp = _check_disp(disp)
    ndim = disp.ndim - 1
    kp = _check_keypoints(fixed_kp, ndim, "fixed_kp")
    if kp.shape[0] == 0:
        return kp.copy()
    u = np.stack(
        [
            ndimage.map_coordinates(disp[..., j], kp.T, order=1, mode="nearest")
            for j in range(ndim)
        ],
        axis=-1,
    )
    return kp + u


# --------------------------------------------------------------------------------------
# overlap / surface metrics
# --------------------------------------------------------------------------------------
def dice_per_class(seg_a: np.ndarray, seg_b: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice coefficient for classes 1..C.

    Args:
        seg_a, seg_b: integer label maps ``[*spatial]`` of the same shape, values 0..C.
        num_classes: C (number of foreground classes).

    Returns:
        ``[C]`` float64; entry ``c-1`` is the Dice of class ``c``.  NaN when the class is
        absent from both maps; 0 when it is present in exactly one.
    """
    num_classes = _check_num_classes(num_classes)
    a = _check_labels(seg_a, num_classes, "seg_a")
    b = _check_labels(seg_b, num_classes, "seg_b")
    _check_same_shape(a, b, "seg_a", "seg_b")
    n = num_classes + 1
    count_a = np.bincount(a.ravel(), minlength=n)[1:].astype(np.float64)
    count_b = np.bincount(b.ravel(), minlength=n)[1:].astype(np.float64)
    both = np.bincount(a[a == b].ravel(), minlength=n)[1:].astype(np.float64)
    denom = count_a + count_b
    dice = np.full(num_classes, np.nan)
    ok = denom > 0
    dice[ok] = 2.0 * both[ok] / denom[ok]
    return dice


def mean_dice(seg_a: np.ndarray, seg_b: np.ndarray, num_classes: int) -> float:
    """NaN-mean over classes 1..C of :func:`dice_per_class` (NaN if every class is NaN)."""
    return nanmean(dice_per_class(seg_a, seg_b, num_classes))


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: mask minus its face-connected erosion (outside image = background)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _directed_surface_distances(
    mask_a: np.ndarray, mask_b: np.ndarray, spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) surface(A) -> nearest surface(B) voxel and surface(B) -> surface(A)."""
    # Crop to the joint bounding box plus a 1-voxel margin (clipped to the image).  Crop
    # borders are then either background or true image borders, so the erosion and the
    # exact EDT give the same values as on the full image, only faster.
    nz = np.nonzero(mask_a | mask_b)
    sl = tuple(
        slice(max(int(idx.min()) - 1, 0), min(int(idx.max()) + 2, size))
        for idx, size in zip(nz, mask_a.shape)
    )
    a, b = mask_a[sl], mask_b[sl]
    surf_a, surf_b = _surface(a), _surface(b)
    dist_to_b = ndimage.distance_transform_edt(~surf_b, sampling=spacing)
    dist_to_a = ndimage.distance_transform_edt(~surf_a, sampling=spacing)
    return dist_to_b[surf_a], dist_to_a[surf_b]


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Distance in mm between the centres of the first and the last voxel of an image of
    ``shape`` (D axes) with voxel size ``spacing``: ``||(shape - 1) * spacing||_2``.  No surface
    distance inside the image exceeds it; it is the HD95 of a lost class."""
    sp = _check_spacing(spacing, len(shape))
    return float(np.linalg.norm((np.asarray(shape, np.float64) - 1.0) * sp))


def hd95_per_class(
    seg_a: np.ndarray,
    seg_b: np.ndarray,
    num_classes: int,
    spacing: Sequence[float],
    mode: str = "pooled",
    lost: str = "diagonal",
) -> np.ndarray:
    """95th-percentile symmetric surface distance (HD95) in mm for classes 1..C.

    Surface voxels of a mask: the mask minus its face-connected binary erosion, with the
    outside of the image treated as background.  Directed distances: for each surface voxel
    of A, the Euclidean distance in mm (``distance_transform_edt(..., sampling=spacing)``) to
    the nearest surface voxel of B, and likewise B -> A.

    Args:
        seg_a, seg_b: integer label maps ``[*spatial]`` (same shape), values 0..C.
        num_classes: C.
        spacing: length-D voxel size in mm.
        mode: ``'pooled'`` (default): ``np.percentile(concat(d_AB, d_BA), 95)`` (MedPy hd95).
            ``'max'``: ``max(percentile(d_AB, 95), percentile(d_BA, 95))``.
        lost: a class present in exactly one map: ``'diagonal'`` (default) ->
            :func:`image_diagonal_mm` (penalised), ``'nan'`` -> NaN.

    Returns:
        ``[C]`` float64 in mm; NaN for a class empty in both maps (never 0).
    """
    if mode not in ("pooled", "max"):
        raise ValueError(f"mode must be 'pooled' or 'max', got {mode!r}")
    if lost not in ("diagonal", "nan"):
        raise ValueError(f"lost must be 'diagonal' or 'nan', got {lost!r}")
    num_classes = _check_num_classes(num_classes)
    a = _check_labels(seg_a, num_classes, "seg_a")
    b = _check_labels(seg_b, num_classes, "seg_b")
    _check_same_shape(a, b, "seg_a", "seg_b")
    if a.ndim not in (2, 3):
        raise ValueError(f"label maps must be 2D or 3D, got {a.ndim} dimensions")
    sp = _check_spacing(spacing, a.ndim)
    out = np.full(num_classes, np.nan)
    for c in range(1, num_classes + 1):
        mask_a, mask_b = a == c, b == c
        if not mask_a.any() or not mask_b.any():
            if (mask_a.any() or mask_b.any()) and lost == "diagonal":
                out[c - 1] = image_diagonal_mm(a.shape, sp)
            continue
        d_ab, d_ba = _directed_surface_distances(mask_a, mask_b, sp)
        if mode == "pooled":
            out[c - 1] = np.percentile(np.concatenate([d_ab, d_ba]), 95)
        else:
            out[c - 1] = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    return out


# --------------------------------------------------------------------------------------
# dense end-point error (synthetic data: the true field is known)
# --------------------------------------------------------------------------------------
def dense_epe(disp: np.ndarray, disp_true: np.ndarray, spacing: Sequence[float], fixed_seg: np.ndarray,
              num_classes: Optional[int] = None) -> dict:
    """Dense end-point error in mm of ``disp`` against the true field ``disp_true``.

    Both are ``[*spatial, D]`` in voxels on the fixed grid; ``fixed_seg`` ``[*spatial]`` int labels.
    Returns ``{"mean": mean over the tissue voxels (labels > 0), "per_class": [C] means inside each
    class 1..C of the fixed labels (NaN for an absent class)}``; ``num_classes`` defaults to the
    largest label. ``mean`` is NaN when there is no tissue voxel.
    """
    _check_same_shape(_check_disp(disp), _check_disp(disp_true), "disp", "disp_true")
    disp, truth = np.asarray(disp), np.asarray(disp_true)  # difference in the inputs' precision
    sp = _check_spacing(spacing, disp.ndim - 1)
    seg = np.asarray(fixed_seg)
    _check_spatial(seg, disp, "fixed_seg", allow_channels=False)
    err = np.linalg.norm((disp - truth) * sp, axis=-1)
    C = int(seg.max()) if num_classes is None else _check_num_classes(num_classes)
    tissue = seg > 0
    per_class = np.array([err[seg == c].mean() if np.any(seg == c) else np.nan for c in range(1, C + 1)])
    return {"mean": float(err[tissue].mean()) if tissue.any() else float("nan"), "per_class": per_class}


# --------------------------------------------------------------------------------------
# landmarks
# --------------------------------------------------------------------------------------
def tre(
    fixed_kp: np.ndarray,
    moving_kp: np.ndarray,
    disp: np.ndarray,
    spacing: Sequence[float],
) -> np.ndarray:
    """Target registration error per keypoint, in mm (Learn2Reg convention).

    ``TRE_k = || (p_F,k + u(p_F,k) - p_M,k) * spacing ||_2`` with ``u`` linearly interpolated.

    Args:
        fixed_kp: ``[K, D]`` fixed keypoints (voxel coordinates).
        moving_kp: ``[K, D]`` corresponding moving keypoints (voxel coordinates).
        disp: ``[*spatial, D]`` displacement in voxels on the fixed grid.
        spacing: length-D voxel size in mm (the images share one grid).

    Returns:
        ``[K]`` float64 distances in mm.
    """
    disp = _check_disp(disp)
    ndim = disp.ndim - 1
    fkp = _check_keypoints(fixed_kp, ndim, "fixed_kp")
    mkp = _check_keypoints(moving_kp, ndim, "moving_kp")
    if fkp.shape[0] != mkp.shape[0]:
        raise ValueError(
            f"fixed_kp has {fkp.shape[0]} keypoints but moving_kp has {mkp.shape[0]}"
        )
    sp = _check_spacing(spacing, ndim)
    landed = warp_keypoints(fkp, disp)
    return np.linalg.norm((landed - mkp) * sp, axis=1)


# --------------------------------------------------------------------------------------
# Jacobian
# --------------------------------------------------------------------------------------
def det_from_grads(g):
    """det(I + G) with ``g[i][j] = d u_j / d x_i`` (the determinant ignores the transpose), 2D or 3D.

    Arithmetic only, so it takes numpy arrays or TensorFlow tensors (the refinement's
    differentiable Jacobian penalties use it)."""
    if len(g) == 2:
        return (1.0 + g[0][0]) * (1.0 + g[1][1]) - g[0][1] * g[1][0]
    a00, a01, a02 = 1.0 + g[0][0], g[0][1], g[0][2]
    a10, a11, a12 = g[1][0], 1.0 + g[1][1], g[1][2]
    a20, a21, a22 = g[2][0], g[2][1], 1.0 + g[2][2]
    return (
        a00 * (a11 * a22 - a12 * a21)
        - a01 * (a10 * a22 - a12 * a20)
        + a02 * (a10 * a21 - a11 * a20)
    )


def jacobian_determinant(disp: np.ndarray) -> np.ndarray:
    """Jacobian determinant of ``phi(x) = x + u(x)`` at every voxel.

    ``det(I + grad u)`` with derivatives from ``np.gradient`` (second-order central
    differences inside, first-order one-sided at the image border), in voxel units.

    The value is spacing invariant: with physical coordinates ``y = S x`` (``S = diag
    (spacing)``) the physical displacement is ``S u``, so the physical Jacobian is
    ``S (I + grad_x u) S^-1`` -- a similarity transform of the voxel Jacobian with the same
    determinant.  (This holds because ``disp`` is in voxels; it is a volume ratio.)

    Args:
        disp: ``[*spatial, D]`` displacement in voxels.

    Returns:
        ``[*spatial]`` float64 determinant.
    """
    disp = _check_disp(disp)
    ndim = disp.ndim - 1
    per_channel = [np.gradient(disp[..., j]) for j in range(ndim)]  # [j][i] = d u_j / d x_i
    g = [[per_channel[j][i] for j in range(ndim)] for i in range(ndim)]
    return det_from_grads(g)


def percent_negative_jacobian(disp: np.ndarray) -> float:
    """Percentage (0..100) of voxels with ``jacobian_determinant(disp) <= 0``."""
    det = jacobian_determinant(disp)
    return float(100.0 * np.count_nonzero(det <= 0) / det.size)


def _jacobian_determinant_l2r(disp: np.ndarray) -> np.ndarray:
    """Learn2Reg-script Jacobian: zero-padded central differences, 2-voxel border cropped."""
    ndim = disp.ndim - 1
    if any(s <= 4 for s in disp.shape[:-1]):
        raise ValueError(
            f"learn2reg SDlogJ crops 2 voxels per border; spatial shape {disp.shape[:-1]} "
            f"is too small"
        )
    padded = np.pad(disp, [(1, 1)] * ndim + [(0, 0)], mode="constant")
    g = []
    for i in range(ndim):
        hi = [slice(1, -1)] * ndim
        lo = [slice(1, -1)] * ndim
        hi[i], lo[i] = slice(2, None), slice(None, -2)
        diff = 0.5 * (padded[tuple(hi)] - padded[tuple(lo)])  # [*spatial, D]
        g.append([diff[..., j] for j in range(ndim)])
    det = det_from_grads(g)
    return det[(slice(2, -2),) * ndim]


def sdlogj(disp: np.ndarray, convention: str = "standard") -> float:
    """Standard deviation of the log Jacobian determinant (SDlogJ).

    Args:
        disp: ``[*spatial, D]`` displacement in voxels.
        convention: ``'standard'`` (default): ``std(log(clip(det, 1e-9, 1e9)))`` over all
            voxels, ``det`` from :func:`jacobian_determinant`.  ``'learn2reg'``: the official
            Learn2Reg evaluation script: zero-padded central differences, 2-voxel border
            cropped, ``std(log(clip(det + 3, 1e-9, 1e9)))`` (their ``+ 3`` shift included).

    Returns:
        float (population std, ``ddof=0``).
    """
    disp = _check_disp(disp)
    if convention == "standard":
        det = jacobian_determinant(disp)
    elif convention == "learn2reg":
        det = _jacobian_determinant_l2r(disp) + 3.0
    else:
        raise ValueError(f"convention must be 'standard' or 'learn2reg', got {convention!r}")
    return float(np.std(np.log(np.clip(det, *_LOG_CLIP))))


# --------------------------------------------------------------------------------------
# all metrics of one registered pair
# --------------------------------------------------------------------------------------
def registration_metrics(
    fixed_seg: np.ndarray,
    moving_seg: np.ndarray,
    disp: np.ndarray,
    num_classes: int,
    spacing: Sequence[float],
    fixed_kp: Optional[np.ndarray] = None,
    moving_kp: Optional[np.ndarray] = None,
    hd95_mode: str = "pooled",
    sdlogj_convention: str = "standard",
    hd95_lost: str = "diagonal",
) -> dict:
    """All metrics of this module (paper Table 1 plus SDlogJ) for one pair.

    ``moving_seg`` is warped with ``disp`` (nearest neighbour) and compared to ``fixed_seg``.
    The "initial" (unregistered) metrics are obtained by passing ``np.zeros_like(disp)``.

    Args:
        fixed_seg, moving_seg: integer label maps ``[*spatial]``, values 0..C.
        disp: ``[*spatial, D]`` displacement in voxels on the fixed grid.
        num_classes: C.
        spacing: length-D voxel size in mm.
        fixed_kp, moving_kp: optional ``[K, D]`` keypoints (both or neither).
        hd95_mode, hd95_lost: ``mode`` and ``lost`` of :func:`hd95_per_class` (a class lost by
            the warp gets the image diagonal by default).
        sdlogj_convention: see :func:`sdlogj`.

    Returns:
        dict with ``dice`` ([C] array), ``mean_dice``, ``hd95`` ([C] array, mm),
        ``mean_hd95`` (nanmean over the classes present in either map, lost ones at the
        image diagonal; mm), ``tre_mean`` (mm; NaN without keypoints),
        ``percent_neg_jac`` (0..100) and ``sdlogj``.
    """
    disp = _check_disp(disp)
    num_classes = _check_num_classes(num_classes)
    ndim = disp.ndim - 1
    sp = _check_spacing(spacing, ndim)
    fseg = _check_labels(fixed_seg, num_classes, "fixed_seg")
    mseg = _check_labels(moving_seg, num_classes, "moving_seg")
    _check_spatial(fseg, disp, "fixed_seg", allow_channels=False)
    _check_spatial(mseg, disp, "moving_seg", allow_channels=False)
    if (fixed_kp is None) != (moving_kp is None):
        raise ValueError("fixed_kp and moving_kp must be given together (or both omitted)")

    warped = warp_labels(mseg, disp)
    dice = dice_per_class(fseg, warped, num_classes)
    hd95 = hd95_per_class(fseg, warped, num_classes, sp, mode=hd95_mode, lost=hd95_lost)
    if fixed_kp is not None:
        errors = tre(fixed_kp, moving_kp, disp, sp)
        tre_mean = float(errors.mean()) if errors.size else float("nan")
    else:
        tre_mean = float("nan")
    return {
        "dice": dice,
        "mean_dice": nanmean(dice),
        "hd95": hd95,
        "mean_hd95": nanmean(hd95),
        "tre_mean": tre_mean,
        "percent_neg_jac": percent_negative_jacobian(disp),
        "sdlogj": sdlogj(disp, convention=sdlogj_convention),
    }
