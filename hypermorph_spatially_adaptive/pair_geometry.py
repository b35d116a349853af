"""World-space geometry of single-pair registration: the model grid, resampling, ITK fields.

numpy, scipy and nibabel only (no TensorFlow), used by :mod:`.pair_registration`.

Coordinates. An image is an array ``[*spatial]`` (D = 2 or 3 axes) with a 4x4 ``affine`` that maps
voxel indices to NIfTI world coordinates (RAS, mm). A 2D image keeps the 4x4 of a
one-voxel-thick 3D grid (column 2 = the slice normal), as nibabel stores it; its third voxel index
is 0. Displacements follow CONVENTIONS.md: channel ``j`` along array axis ``j``, in voxels,
``warped(x) = moving(x + u(x))``.

The model grid (:func:`model_grid`), i.e. the rule for inputs of any size, spacing or orientation:

1. **Orientation.** The fixed image's D array axes are permuted and flipped (nibabel's
   ``io_orientation``) so that model axis ``k`` runs along the k-th world axis the image spans
   (in x, y, z order) in the direction the training orientation code gives (default ``RAS``:
   index increasing towards Right, Anterior, Superior; the identity affine of the synthetic data).
2. **Field of view.** The model grid covers exactly the fixed image's field of view (voxel edges
   to voxel edges) with the model's shape, so its spacing along model axis ``k`` is
   ``fixed extent / model size``; grid centre = centre of the fixed image. With the training size,
   spacing and orientation the model grid *is* the fixed grid (resampling is the identity).
3. **Resampling.** Images are resampled to the model grid with linear interpolation, label maps
   with nearest neighbour (``scipy.ndimage``, edge values repeated outside). The moving image is
   resampled from its own affine onto the same world grid, so it may have another geometry too.
4. **Back to the fixed grid.** The model-grid displacement becomes a world displacement ``d``
   (mm), is interpolated linearly at the fixed voxels and the moving image / labels are sampled
   at the world points ``x + d(x)`` (linear / nearest neighbour) on the fixed grid.

ITK convention (:func:`itk_displacement_image`): a NIfTI of shape ``(X, Y, Z, 1, 3)`` (2D:
``(X, Y, 1, 1, 2)``), intent ``NIFTI_INTENT_VECTOR`` (1007), the fixed image's affine, vectors in
mm in ITK's LPS world (the RAS x and y components negated). A point ``p`` of the fixed image maps
to ``p + d(p)`` in the moving image: the fixed -> moving sampling field of ANTs' forward
transform, applied by ``antsApplyTransforms`` or SimpleITK's ``DisplacementFieldTransform`` to
warp the moving image onto the fixed one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

#: warn when the model-grid spacing differs from training by more than this factor along an axis
SPACING_WARN_FACTOR = 1.25


def _nib():
    import nibabel

    return nibabel


@dataclass(frozen=True)
class ModelGrid:
    """The model's voxel grid placed in world space for one fixed image.

    ``affine`` 4x4 model voxel -> world (mm, RAS); ``shape`` the model's spatial shape;
    ``spacing`` mm per model axis; ``axes[k]`` the fixed image axis that model axis ``k`` runs
    along and ``flips[k]`` whether it runs backwards.
    """

    affine: np.ndarray
    shape: Tuple[int, ...]
    spacing: Tuple[float, ...]
    axes: Tuple[int, ...]
    flips: Tuple[bool, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)


def model_grid(fixed_affine: np.ndarray, fixed_shape: Sequence[int], model_shape: Sequence[int],
               orientation: str = "RAS") -> ModelGrid:
    """The model grid for a fixed image (rules 1 and 2 of the module docstring).

    Args:
        fixed_affine: 4x4 voxel -> world of the fixed image.
        fixed_shape: its spatial shape (D = 2 or 3 entries).
        model_shape: the model's spatial shape (D entries).
        orientation: three axis codes of the training orientation (nibabel's, e.g. ``'RAS'``,
            ``'LPS'``); for 2D only the codes of the two world axes the image spans are used.
    """
    nib = _nib()
    A = np.asarray(fixed_affine, np.float64)
    D = len(model_shape)
    if len(fixed_shape) != D:
        raise ValueError(f"fixed image has {len(fixed_shape)} spatial axes, the model {D}")
    ornt = nib.orientations.io_orientation(A)[:D]  # per array axis: world axis, +-1
    target = nib.orientations.axcodes2ornt(tuple(orientation.upper()))
    sign_of = {int(w): float(s) for w, s in target}
    axes = tuple(int(a) for a in np.argsort(ornt[:, 0], kind="stable"))
    cols, spacing, flips = [], [], []
    for k, a in enumerate(axes):
        col = A[:3, a]
        length = float(np.linalg.norm(col))
        flip = bool(ornt[a, 1] != sign_of[int(ornt[a, 0])])
        sp = int(fixed_shape[a]) * length / int(model_shape[k])
        cols.append(col / length * sp * (-1.0 if flip else 1.0))
        spacing.append(sp)
        flips.append(flip)
    M = np.eye(4)
    M[:3, :D] = np.stack(cols, axis=1)
    if D == 2:
        M[:3, 2] = A[:3, 2]
    centre_fixed = np.array([(int(n) - 1) / 2.0 for n in fixed_shape] + [0.0] * (3 - D) + [1.0])
    centre_model = np.array([(int(n) - 1) / 2.0 for n in model_shape] + [0.0] * (3 - D))
    M[:3, 3] = (A @ centre_fixed)[:3] - M[:3, :3] @ centre_model
    return ModelGrid(affine=M, shape=tuple(int(n) for n in model_shape), spacing=tuple(spacing), axes=axes,
                     flips=tuple(flips))


def spacing_warning(grid: ModelGrid, train_spacing: Sequence[float] | None) -> str | None:
    """A message if a model-grid spacing differs from training by more than ``SPACING_WARN_FACTOR``."""
    if not train_spacing:
        return None
    ratio = np.asarray(grid.spacing) / np.asarray(train_spacing, np.float64)
    if np.all(np.abs(np.log(ratio)) <= np.log(SPACING_WARN_FACTOR)):
        return None
    return (f"the images are registered at a spacing of {tuple(round(s, 3) for s in grid.spacing)} mm on the "
            f"model grid {grid.shape}, but the model was trained at {tuple(float(s) for s in train_spacing)} mm "
            f"(ratio {tuple(round(float(r), 2) for r in ratio)}); expect a worse registration. Crop or pad the "
            f"images to a field of view of about {tuple(round(n * s, 1) for n, s in zip(grid.shape, train_spacing))} mm")


def _index_map(src_affine: np.ndarray, dst_affine: np.ndarray, D: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(matrix [D, D], offset [D])`` with ``src index = matrix @ dst index + offset``.

    For 2D grids the out-of-plane component is dropped (both images are taken to lie in one plane).
    """
    T = np.linalg.solve(np.asarray(src_affine, np.float64), np.asarray(dst_affine, np.float64))
    return T[:D, :D], T[:D, 3]


def resample(data: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: Sequence[int],
             order: int) -> np.ndarray:
    """``data`` (on ``src_affine``) sampled on the grid ``dst_affine``/``dst_shape``.

    ``order`` 1 (linear, images) or 0 (nearest neighbour, label maps; dtype kept); values outside
    repeat the edge (``mode='nearest'``). An identity index map returns a copy (exact).
    """
    from scipy import ndimage

    D = len(dst_shape)
    matrix, offset = _index_map(src_affine, dst_affine, D)
    if data.shape == tuple(dst_shape) and np.allclose(matrix, np.eye(D), atol=1e-9) and np.allclose(offset, 0, atol=1e-9):
        return data.copy()
    out = ndimage.affine_transform(np.asarray(data, np.float64), matrix, offset, output_shape=tuple(dst_shape),
                                   order=order, mode="nearest")
    return np.rint(out).astype(data.dtype) if order == 0 else out.astype(np.float32)


def grid_points(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """World coordinates ``[*shape, 3]`` (mm) of every voxel of a grid."""
    D = len(shape)
    idx = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    A = np.asarray(affine, np.float64)
    return np.stack(idx, axis=-1) @ A[:3, :D].T + A[:3, 3]


def world_displacement(u_model: np.ndarray, grid: ModelGrid, fixed_affine: np.ndarray,
                       fixed_shape: Sequence[int]) -> np.ndarray:
    """World displacement ``d [*fixed_shape, 3]`` (mm, RAS) at the fixed voxels from ``u_model``.

    ``u_model [*grid.shape, D]`` in model voxels is turned into mm (``grid.affine``) and
    interpolated linearly at the fixed voxel centres (edge values repeated outside the grid).
    """
    from scipy import ndimage

    D = grid.ndim
    d_model = np.asarray(u_model, np.float64) @ grid.affine[:3, :D].T  # [*model, 3] mm
    matrix, offset = _index_map(grid.affine, fixed_affine, D)
    if tuple(fixed_shape) == grid.shape and np.allclose(matrix, np.eye(D), atol=1e-9) and np.allclose(offset, 0, atol=1e-9):
        return d_model
    idx = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in fixed_shape], indexing="ij")
    coords = np.einsum("ij,j...->i...", matrix, np.stack(idx)) + offset.reshape((D,) + (1,) * D)
    return np.stack([ndimage.map_coordinates(d_model[..., c], coords, order=1, mode="nearest")
                     for c in range(3)], axis=-1)


def voxel_displacement(d_world: np.ndarray, fixed_affine: np.ndarray) -> np.ndarray:
    """``u [*spatial, D]`` in fixed voxels from ``d_world [*spatial, 3]`` (mm): ``A_lin u = d``."""
    D = d_world.ndim - 1
    lin = np.asarray(fixed_affine, np.float64)[:3, :D]
    return (d_world @ np.linalg.pinv(lin).T).astype(np.float32)


def sample_at_world(data: np.ndarray, affine: np.ndarray, points: np.ndarray, order: int) -> np.ndarray:
    """``data`` (on ``affine``) sampled at world points ``[*out, 3]`` (linear or nearest, edges repeated)."""
    from scipy import ndimage

    D = data.ndim
    inv = np.linalg.inv(np.asarray(affine, np.float64))
    idx = points @ inv[:3, :3].T + inv[:3, 3]
    coords = np.moveaxis(idx[..., :D], -1, 0)
    out = ndimage.map_coordinates(np.asarray(data, np.float64), coords, order=order, mode="nearest")
    return np.rint(out).astype(data.dtype) if order == 0 else out.astype(np.float32)


def itk_displacement_image(d_world: np.ndarray, fixed_affine: np.ndarray):
    """The ITK/ANTs displacement field of ``d_world [*spatial, 3]`` (mm, RAS) as a nibabel image.

    Shape ``(X, Y, Z, 1, 3)`` (2D: ``(X, Y, 1, 1, 2)``, the first two LPS components, as ITK reads a
    2D NIfTI), float32, intent vector (1007), the fixed affine; components in LPS mm.
    """
    nib = _nib()
    D = d_world.ndim - 1
    lps = np.asarray(d_world, np.float32) * np.array([-1.0, -1.0, 1.0], np.float32)
    if D == 2:
        field = lps[:, :, None, None, :2]
    else:
        field = lps[:, :, :, None, :]
    img = nib.Nifti1Image(np.ascontiguousarray(field), np.asarray(fixed_affine, np.float64))
    img.header.set_intent("vector")
    return img
