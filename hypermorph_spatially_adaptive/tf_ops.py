"""The TensorFlow home of the differentiable field operations: linear warp, Jacobian determinant,
soft Dice and box smoothing. Their numpy counterparts (warps of one pair, the Jacobian
determinant, hard Dice, ``nanmean``) live in the top-level ``eval_metrics.py``; the determinant of
``I + G`` from its entries, :func:`eval_metrics.det_from_grads`, is shared by both.

Conventions: CONVENTIONS.md. Batched tensors ``[B, *spatial, K]`` with 2 or 3 static spatial
axes; displacements ``[B, *spatial, D]`` in voxels, channel ``j`` along array axis ``j``, on the
fixed grid (``warped(x) = moving(x + u(x))``). Everything is float32 and differentiable.
"""
from __future__ import annotations

import itertools

import numpy as np
import tensorflow as tf

from eval_metrics import det_from_grads

#: the two interpolation stencils of :func:`warp_linear`
WARP_STENCILS = ("floor", "cell")


def warp_linear(image: tf.Tensor, disp: tf.Tensor, stencil: str = "floor") -> tf.Tensor:
    """``image(x + disp(x))`` with (bi/tri)linear interpolation, batched (no ``map_fn``).

    Sample coordinates are clamped to the image, so edge values repeat (voxelmorph's
    ``SpatialTransformer`` with ``fill_value=None``; ``scipy.ndimage.map_coordinates(order=1,
    mode='nearest')``). Differentiable in ``disp`` and ``image``.

    Args:
        image: ``[B, *spatial, K]`` float (images, one-hot labels or displacements).
        disp: ``[B, *spatial, D]`` displacement in voxels (channel j along axis j), the same
            static spatial shape.
        stencil: which two nodes bracket a sample coordinate ``c`` along an axis of ``n`` voxels,
            and how the ``2^D`` corner terms are assembled. Both interpolate the same values (to
            float32 rounding: ``tests/test_tf_ops.py``); each caller keeps the one its recorded
            results were computed with, so they stay byte-identical (the order of the float sums
            differs, and TensorFlow's graph optimizer rewrites the two graphs differently):

            * ``'floor'`` (refinement, inference, calibration): nodes ``floor(c)`` and
              ``min(floor(c) + 1, n - 1)``; corners summed with axis 0 varying fastest. At
              ``c = n - 1`` the derivative in ``disp`` is 0.
            * ``'cell'`` (gradient identification): the cell ``[b, b + 1]`` with
              ``b = min(floor(c), n - 2)``; corners summed with the last axis varying fastest.
              At ``c = n - 1`` the derivative is the backward difference. Every spatial size
              must be >= 2.

    Returns:
        ``[B, *spatial, K]`` float32.
    """
    if stencil not in WARP_STENCILS:
        raise ValueError(f"stencil must be one of {WARP_STENCILS}, got {stencil!r}")
    image = tf.convert_to_tensor(image, tf.float32)
    disp = tf.convert_to_tensor(disp, tf.float32)
    sizes = [int(s) for s in image.shape[1:-1]]
    if int(disp.shape[-1]) != len(sizes) or [int(s) for s in disp.shape[1:-1]] != sizes:
        raise ValueError(f"disp {disp.shape} does not fit the image {image.shape}")
    if stencil == "cell":
        if min(sizes) < 2:
            raise ValueError("warp_linear(stencil='cell') needs every spatial size >= 2")
        return _warp_cell(image, disp, sizes)
    return _warp_floor(image, disp, sizes)


def _warp_floor(image: tf.Tensor, disp: tf.Tensor, sizes) -> tf.Tensor:
    """:func:`warp_linear` with ``stencil='floor'``: all axes at once, ``gather_nd``."""
    ndim = len(sizes)
    grid = tf.stack(tf.meshgrid(*[tf.range(s, dtype=tf.float32) for s in sizes], indexing="ij"), axis=-1)
    coords = grid[None] + disp
    upper = tf.constant([float(s - 1) for s in sizes], tf.float32)
    coords = tf.clip_by_value(coords, 0.0, upper)
    lo = tf.floor(coords)
    frac = coords - lo
    lo = tf.cast(lo, tf.int32)
    hi = tf.minimum(lo + 1, tf.cast(upper, tf.int32))
    out = 0.0
    for corner in range(2 ** ndim):
        bits = [(corner >> a) & 1 for a in range(ndim)]
        idx = tf.stack([hi[..., a] if bits[a] else lo[..., a] for a in range(ndim)], axis=-1)
        w = 1.0
        for a in range(ndim):
            w = w * (frac[..., a] if bits[a] else 1.0 - frac[..., a])
        out = out + w[..., None] * tf.gather_nd(image, idx, batch_dims=1)
    return out


def _warp_cell(image: tf.Tensor, disp: tf.Tensor, sizes) -> tf.Tensor:
    """:func:`warp_linear` with ``stencil='cell'``: axis by axis, flat indices and ``gather``."""
    nd = len(sizes)
    k = int(image.shape[-1])
    n_vox = int(np.prod(sizes))
    strides = [int(np.prod(sizes[j + 1:])) for j in range(nd)]
    grid = tf.meshgrid(*[tf.range(s, dtype=tf.float32) for s in sizes], indexing="ij")
    lo, frac = [], []
    for j in range(nd):
        loc = tf.clip_by_value(grid[j][None] + disp[..., j], 0.0, sizes[j] - 1.0)
        base = tf.clip_by_value(tf.floor(loc), 0.0, sizes[j] - 2.0)
        lo.append(tf.cast(base, tf.int32))
        frac.append(loc - base)
    flat = tf.reshape(image, [-1, n_vox, k])
    out = 0.0
    for corner in itertools.product((0, 1), repeat=nd):
        index = 0
        weight = 1.0
        for j, c in enumerate(corner):
            index += (lo[j] + c) * strides[j]
            weight *= frac[j] if c else 1.0 - frac[j]
        vals = tf.gather(flat, tf.reshape(index, [-1, n_vox]), batch_dims=1)
        out += tf.reshape(vals, tf.shape(image)) * weight[..., None]
    return out


def jacobian_determinant(u: tf.Tensor) -> tf.Tensor:
    """``det(I + grad u)`` ``[B, *spatial]`` of displacements ``u [B, *spatial, D]`` (voxels).

    Central differences inside, one-sided at the border: the discretization of ``np.gradient``,
    so the values match :func:`eval_metrics.jacobian_determinant` (float32 against float64).
    Dimensionless (a volume ratio). Every spatial axis needs at least 2 voxels.
    """
    u = tf.convert_to_tensor(u, tf.float32)
    ndim = u.shape.rank - 2
    grads = []  # grads[i][..., j] = d u_j / d x_i
    for i in range(ndim):
        ax = i + 1
        n = u.shape[ax]
        if n is None or n < 2:
            raise ValueError(f"jacobian_determinant: spatial axis {i} has {n} voxels (needs >= 2)")

        def sl(a, b, ax=ax):
            idx = [slice(None)] * u.shape.rank
            idx[ax] = slice(a, b)
            return u[tuple(idx)]

        parts = [sl(1, 2) - sl(0, 1)]
        if n > 2:
            parts.append(0.5 * (sl(2, None) - sl(None, -2)))
        parts.append(sl(n - 1, n) - sl(n - 2, n - 1))
        grads.append(tf.concat(parts, axis=ax))
    return det_from_grads([[grads[i][..., j] for j in range(ndim)] for i in range(ndim)])


def soft_dice(fixed_onehot: tf.Tensor, warped_onehot: tf.Tensor, eps: float = 1e-6) -> tf.Tensor:
    """Soft Dice per sample and class: ``2 sum(a b) / (sum a + sum b + eps)``.

    Args:
        fixed_onehot: ``[B, *spatial, K]`` fixed labels, one-hot (or soft) per class.
        warped_onehot: ``[B, *spatial, K]`` warped moving labels (e.g. linearly interpolated).

    Returns:
        ``[B, K]``, unitless. On binary inputs it equals the hard Dice
        (:func:`eval_metrics.dice_per_class`) up to ``eps``; a class absent from both is 0 (not
        NaN: callers mask absent classes themselves).
    """
    a = tf.convert_to_tensor(fixed_onehot, tf.float32)
    b = tf.convert_to_tensor(warped_onehot, tf.float32)
    axes = list(range(1, a.shape.rank - 1))
    inter = tf.reduce_sum(a * b, axis=axes)
    denom = tf.reduce_sum(a, axis=axes) + tf.reduce_sum(b, axis=axes)
    return 2.0 * inter / (denom + eps)


def box_smooth(v: tf.Tensor, passes: int) -> tf.Tensor:
    """``passes`` successive 3-voxel means along every axis (stride 1, 'SAME': the border means
    average only the voxels inside), per channel; ``v [B, *spatial, K]``, same shape out (a
    B-spline-like smoother for 3 passes; 0 passes: ``v`` unchanged)."""
    v = tf.convert_to_tensor(v, tf.float32)
    ndim = v.shape.rank - 2
    pool = tf.nn.avg_pool2d if ndim == 2 else tf.nn.avg_pool3d
    for _ in range(int(passes)):
        v = pool(v, ksize=3, strides=1, padding="SAME")
    return v

