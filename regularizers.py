"""Linear elastic and diffusion regularizers of a displacement field (TensorFlow).

Array layout, flow channels, voxel/mm units: CONVENTIONS.md. Here in particular:

- ``disp``: displacement ``u`` ``[batch, *spatial, D]`` in voxels, D = 2 or 3.
- ``spacing``: voxel sizes in mm (all > 0). Derivatives are taken in physical units: the field
  is converted to mm (``u_j * spacing[j]``) and forward differences along axis ``i`` are divided
  by ``spacing[i]``; strains are dimensionless, and with unit spacing everything is plain voxel
  arithmetic.
- Forward differences: ``d_i u_j(x) = (u_j(x + e_i) - u_j(x)) / h_i``; where ``x + e_i`` lies
  outside the image the difference is 0 (it contributes nothing to the energy).
- ``d_i u_j`` = derivative along spatial axis ``i`` of component ``j``.
- Parameters ``lam``, ``mu`` (elastic) and ``weight`` (diffusion) are either one value per
  sample (shape ``[batch]`` or ``[batch, 1]``) or voxelwise maps (``[batch, *spatial]`` or
  ``[batch, *spatial, 1]``). A batch never mixes samples: sample ``b`` only sees its own
  parameters.

Energies (densities per voxel; the regularizers return their mean over voxels, shape ``[batch]``)
- elastic:   ``mu/4 * sum_ij (d_i u_j + d_j u_i)^2 + lam/2 * (div u)^2``
- diffusion: ``weight * sum_ij (d_i u_j)^2``   (= ``|grad u|_F^2``; voxelmorph's ``Grad('l2')``
  is this divided by ``D**2``, up to its border: see :func:`diffusion_regularizer_voxelmorph`)
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import tf_compat  # noqa: F401  (Keras-2 shim before TensorFlow loads; bottom floor)
import tensorflow as tf

TensorLike = Union[tf.Tensor, float, Sequence[float]]


def _check_disp(disp: tf.Tensor) -> int:
    shape = disp.shape
    if shape.rank is None or shape.rank not in (4, 5):
        raise ValueError(
            f"disp must have shape [batch, *spatial, D] with D in (2, 3); got shape {shape}")
    ndim = shape.rank - 2
    if shape[-1] is not None and shape[-1] != ndim:
        raise ValueError(
            f"disp has {shape[-1]} channels but {ndim} spatial axes; flow channel j must be the "
            f"displacement along spatial axis j (shape {shape})")
    return ndim


def _check_spacing(spacing: Optional[Sequence[float]], ndim: int) -> List[float]:
    if spacing is None:
        return [1.0] * ndim
    spacing = [float(s) for s in spacing]
    if len(spacing) != ndim:
        raise ValueError(f"spacing has {len(spacing)} entries, expected {ndim} (one per axis)")
    if any(not (s > 0) for s in spacing):
        raise ValueError(f"spacing must be positive (mm per voxel); got {spacing}")
    return spacing


def _as_param(p: TensorLike, ndim: int, name: str) -> tf.Tensor:
    """Reshape a per-sample scalar ``[B]``/``[B,1]`` or a map ``[B,*s]``/``[B,*s,1]`` to
    ``[B, *s or 1s]`` so that it broadcasts against a ``[B, *spatial]`` density."""
    p = tf.convert_to_tensor(p, dtype=tf.float32)
    r = p.shape.rank
    if r == 0:
        return tf.reshape(p, [1] * (ndim + 1))
    if r == 1:
        return tf.reshape(p, [-1] + [1] * ndim)
    if r == 2 and p.shape[1] == 1:
        return tf.reshape(p, [-1] + [1] * ndim)
    if r == ndim + 2 and p.shape[-1] == 1:
        return p[..., 0]
    if r == ndim + 1:
        return p
    raise ValueError(
        f"{name} must be per-sample [batch] / [batch, 1] or a map [batch, *spatial(, 1)] for a "
        f"{ndim}D field; got shape {p.shape}")


def forward_gradients(disp: tf.Tensor, spacing: Optional[Sequence[float]] = None) -> List[tf.Tensor]:
    """Physical-unit forward differences of ``disp``.

    Args:
        disp: ``[B, *spatial, D]`` displacement in voxels.
        spacing: voxel size in mm per axis (default 1).

    Returns:
        list ``g`` of length D; ``g[i][..., j]`` = ``d_i u_j`` (shape ``[B, *spatial, D]``),
        dimensionless, 0 on the last slice along axis ``i``.
    """
    ndim = _check_disp(disp)
    h = _check_spacing(spacing, ndim)
    u_mm = disp * tf.constant(h, dtype=disp.dtype)  # component j scaled by spacing[j]
    grads = []
    for i in range(ndim):
        ax = i + 1
        hi = [slice(None)] * (ndim + 2)
        lo = [slice(None)] * (ndim + 2)
        hi[ax], lo[ax] = slice(1, None), slice(None, -1)
        fwd = u_mm[tuple(hi)] - u_mm[tuple(lo)]  # strided slices: cheaper than gather, also backward
        pad = [[0, 0]] * (ndim + 2)
        pad[ax] = [0, 1]
        grads.append(tf.pad(fwd, pad) / h[i])
    return grads


def elastic_energy_density(disp: tf.Tensor, lam: TensorLike, mu: TensorLike,
                           spacing: Optional[Sequence[float]] = None) -> tf.Tensor:
    """Linear elastic energy density ``mu/4 sum_ij (d_i u_j + d_j u_i)^2 + lam/2 (div u)^2``.

    Args:
        disp: ``[B, *spatial, D]`` displacement in voxels.
        lam, mu: Lamé parameters, per sample or voxelwise (see module docstring).
        spacing: voxel size in mm per axis.

    Returns:
        ``[B, *spatial]`` energy density (dimensionless strain squared times the parameter units).
    """
    ndim = _check_disp(disp)
    g = forward_gradients(disp, spacing)
    lam_t = _as_param(lam, ndim, "lam")
    mu_t = _as_param(mu, ndim, "mu")
    div = tf.add_n([g[i][..., i] for i in range(ndim)])
    shear = tf.add_n([4.0 * tf.square(g[i][..., i]) for i in range(ndim)])
    for i in range(ndim):
        for j in range(i + 1, ndim):
            shear += 2.0 * tf.square(g[i][..., j] + g[j][..., i])
    return mu_t / 4.0 * shear + lam_t / 2.0 * tf.square(div)


def diffusion_energy_density(disp: tf.Tensor, weight: TensorLike = 1.0,
                             spacing: Optional[Sequence[float]] = None) -> tf.Tensor:
    """Diffusion energy density ``weight * sum_ij (d_i u_j)^2``; ``[B, *spatial]``."""
    ndim = _check_disp(disp)
    g = forward_gradients(disp, spacing)
    w = _as_param(weight, ndim, "weight")
    return w * tf.add_n([tf.reduce_sum(tf.square(gi), axis=-1) for gi in g])


def _mean_over_space(density: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(density, axis=list(range(1, density.shape.rank)))


def elastic_regularizer(disp: tf.Tensor, lam: TensorLike, mu: TensorLike,
                        spacing: Optional[Sequence[float]] = None) -> tf.Tensor:
    """Mean linear elastic energy over the image domain, shape ``[B]``.

    Global regularizer: pass ``lam``/``mu`` as ``[B]``; spatially varying: pass maps
    ``[B, *spatial, 1]``. Constant maps give exactly the global value.
    """
    return _mean_over_space(elastic_energy_density(disp, lam, mu, spacing))


def diffusion_regularizer(disp: tf.Tensor, weight: TensorLike = 1.0,
                          spacing: Optional[Sequence[float]] = None) -> tf.Tensor:
    """Mean diffusion energy ``weight * |grad u|^2`` over the image domain, shape ``[B]``."""
    return _mean_over_space(diffusion_energy_density(disp, weight, spacing))


def diffusion_regularizer_voxelmorph(disp: tf.Tensor, weight: TensorLike = 1.0,
                                     spacing: Optional[Sequence[float]] = None) -> tf.Tensor:
    """Diffusion energy on voxelmorph's ``Grad('l2')`` scale (the authors' code), shape ``[B]``.

    ``(1/D) sum_i mean_{x, j} weight(x) (d_i u_j(x))^2`` where the mean runs over the ``n_i - 1``
    valid forward differences along axis ``i`` (no zero padding) and the D components ``j``. With
    unit spacing and a per-sample weight it equals ``weight * voxelmorph.losses.Grad('l2')``; with a
    voxelwise weight each difference is weighted at its first voxel ``x`` (the authors'
    ``Grad.loss(..., weight_matrix)``). For a field whose squared differences are the same
    everywhere it is :func:`diffusion_regularizer` divided by ``D**2`` and multiplied by
    ``n_i / (n_i - 1)`` (ours averages the zero difference of the last slice too).
    """
    ndim = _check_disp(disp)
    g = forward_gradients(disp, spacing)
    w = _as_param(weight, ndim, "weight")
    terms = []
    for i in range(ndim):
        sl = [slice(None)] * (ndim + 1)
        sl[i + 1] = slice(None, -1)  # the valid differences along axis i
        dens = tf.reduce_mean(tf.square(g[i]), axis=-1)  # mean over the D components
        weighted = (w * dens)[tuple(sl)]  # a per-sample weight broadcasts, a map is taken at x
        terms.append(_mean_over_space(weighted))
    return tf.add_n(terms) / float(ndim)
