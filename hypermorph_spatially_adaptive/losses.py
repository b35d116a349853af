"""Loss assembly of paper eq. (1). Every loss returns one value per sample.

With ``cc(x)`` the local NCC map (window ``win`` per axis) between fixed and warped moving
image, and ``Lambda, Gamma`` (elastic) or ``W`` (diffusion) either per-sample constants
(global models) or voxelwise maps from the fixed segmentation (SA models):

- elastic:   ``mean_x[(2 - Lambda - Gamma) * (-cc)] + K * mean_x[elastic density(u; Lambda, Gamma)]``
- diffusion: ``mean_x[(1 - W) * (-cc)] + K * mean_x[W * |grad u|^2]``

With ``--hyp-mapping log`` (:class:`.params.HypMapping`) the weights are ``0.5 * 10^(D (h - 0.5))``
and the similarity weight is constant, its linear value at the box centre (1 elastic, 0.5
diffusion), so both mappings give the same loss at ``h = 0.5``. ``K`` is the energy scale
(``--energy-scale``, ``config["loss"]["energy_scale"]``, :class:`.configs.LossConfig`); ``K = 1`` is the
eq. (1) of the paper text exactly (the authors' code differs: docs/fidelity.md). On breathing-like motion the paper's energy is ~1/100 of the weighted
NCC term over most of the hyperparameter box, so the best field hardly depends on the
hyperparameters; ``K`` brings the two terms to the same order (docs/extensions.md "Calibrated energy",
``benchmarks/calibrate_energy.py`` estimates it on a dataset).

SA models with ``spec.weight_range == 'paper'`` (CSAIN paper) use weights ``10 * hyp`` and an
unweighted similarity ``mean_x[-cc]``; ``spec.smooth_sigma > 0`` smooths the maps first (both
in :func:`.params.regularization_parameters`).

``fidelity`` (:class:`.profiles.Fidelity`, ``--profile``; docs/fidelity.md) switches three pieces to
the authors' code: ``similarity_weight='authors'`` weights the elastic similarity by
``max(1 - Lambda - Gamma, 0)``, ``diffusion_energy='voxelmorph'`` uses voxelmorph's ``Grad('l2')``
scale (:func:`regularizers.diffusion_regularizer_voxelmorph`) and ``ncc='voxelmorph'`` voxelmorph's
NCC numerics (:func:`ncc_map_voxelmorph`). ``None`` is the ``paper`` profile.

Shapes: images ``[B, *spatial, 1]``, field ``[B, *spatial, D]`` in voxels; all outputs ``[B]``.
Units: ``cc`` is dimensionless in [0, 1]; the regularizer is in squared strain (see
:mod:`regularizers`), so with unit spacing it is plain voxel arithmetic.
"""
from __future__ import annotations

from typing import Dict, Optional

import tensorflow as tf

import regularizers

from .configs import LossConfig
from .params import ParamSpec, regularization_parameters
from .profiles import PAPER, Fidelity


def _ncc_inputs(fixed: tf.Tensor, warped: tf.Tensor):
    """``(D, fixed, warped)`` as float32 after checking both are ``[B, *spatial, 1]`` with D = 2 or 3."""
    ndim = fixed.shape.rank - 2
    if ndim not in (2, 3):
        raise ValueError(f"images must be [B, *spatial, 1] with 2 or 3 spatial axes; got {fixed.shape}")
    if fixed.shape[-1] != 1 or warped.shape[-1] != 1:
        raise ValueError("NCC expects single-channel images [B, *spatial, 1]")
    return ndim, tf.cast(fixed, tf.float32), tf.cast(warped, tf.float32)


def ncc_map(fixed: tf.Tensor, warped: tf.Tensor, win: int = 9, eps: float = 1e-5) -> tf.Tensor:
    """Local squared normalized cross-correlation map, ``[B, *spatial]`` in [0, 1].

    ``cc = cov(F, W)^2 / (var(F) var(W) + eps')`` over a ``win^D`` box (windows are clipped at
    the border: only voxels inside the image are averaged). ``eps`` is given in the units of
    voxelmorph's windowed *sums* and converted to the windowed *means* used here
    (``eps' = eps / win^(2D)``), so the value matches voxelmorph's NCC. A constant patch
    gives ``cc = 0`` (no NaN): variances are clamped at 0 before the division.
    """
    ndim, f, w = _ncc_inputs(fixed, warped)
    stack = tf.concat([f, w, f * f, w * w, f * w], axis=-1)
    # the clipped box mean is separable (box and image are both products of intervals), so one
    # 1D mean per axis gives it exactly with D * win instead of win^D terms per voxel
    pool = tf.nn.avg_pool2d if ndim == 2 else tf.nn.avg_pool3d
    m = stack
    for ax in range(ndim):
        ksize = [1] * ndim
        ksize[ax] = win
        m = pool(m, ksize=ksize, strides=1, padding="SAME")
    mf, mw, mff, mww, mfw = [m[..., k] for k in range(5)]
    cross = mfw - mf * mw
    var_f = tf.maximum(mff - mf * mf, 0.0)
    var_w = tf.maximum(mww - mw * mw, 0.0)
    eps_mean = eps / float(win ** (2 * ndim))
    return cross * cross / (var_f * var_w + eps_mean)


def _box_sums(x: tf.Tensor, win: int, ndim: int) -> tf.Tensor:
    """Windowed sums of every channel of ``x [B, *spatial, K]`` over a ``win^D`` box with zero
    padding (voxelmorph's ``SAME`` convolution with a ones filter), separable: one 1D sum per axis."""
    k = int(x.shape[-1])
    perm = [0, ndim + 1] + list(range(1, ndim + 1))
    shape = tf.shape(x)
    y = tf.reshape(tf.transpose(x, perm), tf.concat([[-1], shape[1:-1], [1]], 0))  # channels into the batch
    for ax in range(ndim):
        kshape = [1] * ndim + [1, 1]
        kshape[ax] = win
        y = tf.nn.convolution(y, tf.ones(kshape), padding="SAME")
    y = tf.reshape(y, tf.concat([[-1, k], shape[1:-1]], 0))
    return tf.transpose(y, [0] + list(range(2, ndim + 2)) + [1])


def ncc_map_voxelmorph(fixed: tf.Tensor, warped: tf.Tensor, win: int = 9, eps: float = 1e-5) -> tf.Tensor:
    """voxelmorph's local squared NCC (``vxm.losses.NCC().ncc``, what the authors train with),
    ``[B, *spatial]``.

    Windowed sums with zero padding at the border, means divided by the full window size
    ``win^D`` (also where part of the window lies outside the image); the cross term and both
    variances (in sum units) are clamped at ``eps`` before ``cc = (cross / var_F) (cross / var_W)``.
    So an anticorrelated window (cross < 0) scores ~0, where :func:`ncc_map` scores its square.
    """
    ndim, f, w = _ncc_inputs(fixed, warped)
    sums = _box_sums(tf.concat([f, w, f * f, w * w, f * w], axis=-1), win, ndim)
    s_f, s_w, s_ff, s_ww, s_fw = [sums[..., k] for k in range(5)]
    n = float(win ** ndim)
    m_f, m_w = s_f / n, s_w / n
    cross = tf.maximum(s_fw - m_w * s_f - m_f * s_w + m_f * m_w * n, eps)
    var_f = tf.maximum(s_ff - 2.0 * m_f * s_f + m_f * m_f * n, eps)
    var_w = tf.maximum(s_ww - 2.0 * m_w * s_w + m_w * m_w * n, eps)
    return (cross / var_f) * (cross / var_w)


def _weighted_mean(weight, values: tf.Tensor) -> tf.Tensor:
    ndim = values.shape.rank - 1
    weight = tf.convert_to_tensor(weight, tf.float32)
    if weight.shape.rank == 1:
        weight = tf.reshape(weight, [-1] + [1] * ndim)
    return tf.reduce_mean(weight * values, axis=list(range(1, ndim + 1)))


def loss_terms(spec: ParamSpec, fixed: tf.Tensor, warped: tf.Tensor, field: tf.Tensor,
               hyp: tf.Tensor, fixed_seg: Optional[tf.Tensor] = None, config: Optional[LossConfig] = None,
               fidelity: Optional[Fidelity] = None) -> Dict[str, tf.Tensor]:
    """Per-sample loss terms for any of the four presets.

    Args:
        spec: which regularizer / global or SA / number of classes.
        fixed, warped: ``[B, *spatial, 1]``.
        field: the regularized field ``[B, *spatial, D]`` in voxels (the displacement by default;
            the caller picks it by ``config.reg_field``).
        hyp: ``[B, P]`` hyperparameters in [0, 1] (layout in :mod:`.models`).
        fixed_seg: ``[B, *spatial]`` labels 0..C (needed for SA models).
        config: :class:`.configs.LossConfig` (None: its defaults, paper eq. 1 at unit spacing):
            ``spacing`` (mm per voxel), ``ncc_win`` (voxels per axis), ``energy_scale`` ``K >= 0``
            on the regularization energy, ``hyp_mapping`` (how ``hyp`` becomes weights).
        fidelity: similarity weight, diffusion energy scale, NCC numerics and ``crop_in_loss``
            (the warped image zeroed where ``fixed == 0`` before the similarity)
            (:class:`.profiles.Fidelity`; None = the ``paper`` profile, see the module docstring).

    Returns:
        dict with ``loss``, ``similarity`` (weighted -NCC), ``regularization`` (the scaled
        energy ``K * E``, the term that enters ``loss``) and ``ncc`` (unweighted mean NCC), each ``[B]``.
    """
    config = LossConfig() if config is None else config
    if not isinstance(config, LossConfig):
        raise TypeError(f"config must be a LossConfig, got {type(config).__name__}")
    spacing, win, energy_scale, mapping = config.spacing, config.ncc_win, config.energy_scale, config.hyp_mapping
    fid = fidelity or PAPER
    if fid.crop_in_loss:  # authors' crop_in_loss: no similarity from where the fixed image is empty
        warped = tf.where(tf.equal(fixed, 0.0), tf.zeros_like(warped), warped)
    cc = ncc_map_voxelmorph(fixed, warped, win) if fid.ncc == "voxelmorph" else ncc_map(fixed, warped, win)
    lam, mu = regularization_parameters(spec, hyp, fixed_seg)
    linear = mapping.weighted_similarity
    if not linear and spec.weight_range != "unit":
        raise ValueError("the paper weight range and a non-linear hyperparameter mapping exclude each other")
    if spec.regularizer == "elastic":
        if not linear:
            sim_weight = 1.0
        elif fid.similarity_weight == "authors":  # authors' 1 - lambda - mu, kept >= 0 (docs/fidelity.md)
            sim_weight = tf.maximum(1.0 - lam - mu, 0.0)
        else:
            sim_weight = 2.0 - lam - mu
        if not linear:
            lam, mu = mapping.weight(lam), mapping.weight(mu)
        reg = regularizers.elastic_regularizer(field, lam, mu, spacing)
    else:
        sim_weight = 1.0 - lam if linear else 0.5
        if not linear:
            lam = mapping.weight(lam)
        if fid.diffusion_energy == "voxelmorph":
            reg = regularizers.diffusion_regularizer_voxelmorph(field, lam, spacing)
        else:
            reg = regularizers.diffusion_regularizer(field, lam, spacing)
    if energy_scale != 1.0:
        reg = float(energy_scale) * reg
    ncc = tf.reduce_mean(cc, axis=list(range(1, cc.shape.rank)))
    # 'paper' weight range (CSAIN): -NCC + ||Lambda_gau grad phi||^2, no similarity weight
    sim = _weighted_mean(sim_weight, -cc) if spec.weighted_similarity else -ncc
    return {"loss": sim + reg, "similarity": sim, "regularization": reg, "ncc": ncc}
