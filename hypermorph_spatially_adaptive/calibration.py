"""Calibrating the energy scale ``K`` of the loss to a dataset (``benchmarks/calibrate_energy.py``).

The loss (paper eq. 1, :func:`.losses.loss_terms`) at the centre of the hyperparameter box
``h = c`` (every entry; 0.5 by default) is, for a field ``a * u_ref`` (amplitude ``a`` of a
reference displacement ``u_ref``)::

    L_K(a) = -w_s * NCC(a) + K * a^2 * E_1

with ``w_s = 2 - 2c`` (elastic) or ``1 - c`` (diffusion) the similarity weight, ``NCC(a)`` the
mean local NCC of the moving image warped by ``a * u_ref`` and ``E_1`` the energy of ``u_ref``
with every parameter at ``c`` (the energy is quadratic in the field, so ``E(a u) = a^2 E_1``).
The minimising amplitude ``a*(K)`` says how strongly the centre of the box regularizes: ``a* ~ 1``
means the energy does not matter there (the paper's ``K = 1`` on breathing-like motion: the
energy is ~1/100 of the similarity), ``a* ~ 0`` that it crushes the motion. A useful box has the
similarity and the energy balanced at its centre, so that lower ``h`` approaches the
unregularized fit and higher ``h`` the rigid limit; :func:`propose_energy_scale` solves
``dL_K/da = 0`` at ``a = target`` per pair::

    K_pair = w_s * NCC'(target) / (2 * target * E_1)

and takes the median over pairs. ``u_ref`` is the true displacement where a dataset has one
(synthetic) or, on real data, the field of a trained model at all-zero hyperparameters (no
regularization in the loss).

Shapes: images ``[N, *spatial, 1]``, displacements ``[N, *spatial, D]`` in voxels (CONVENTIONS.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np

#: amplitudes at which the similarity is evaluated
AMPLITUDES = np.round(np.linspace(0.0, 1.5, 31), 4)


@dataclass
class AmplitudeCurves:
    """Per-pair similarity curves along ``a * u_ref`` (see the module docstring).

    ``ncc [N, A]`` mean local NCC at each amplitude, ``energy [N]`` the energy ``E_1`` of ``u_ref``
    at the box centre (K = 1), ``sim_weight`` the similarity weight ``w_s`` at the centre.
    """

    amplitudes: np.ndarray
    ncc: np.ndarray
    energy: np.ndarray
    sim_weight: float

    def loss(self, energy_scale: float) -> np.ndarray:
        """``L_K(a)`` per pair and amplitude, ``[N, A]``."""
        a = self.amplitudes[None]
        return -self.sim_weight * self.ncc + float(energy_scale) * a ** 2 * self.energy[:, None]

    def optimal_amplitude(self, energy_scale: float) -> np.ndarray:
        """``a*(K)`` per pair ``[N]`` (grid minimum refined by a parabola through its neighbours)."""
        loss = self.loss(energy_scale)
        out = np.empty(len(loss))
        step = float(self.amplitudes[1] - self.amplitudes[0])
        for n, row in enumerate(loss):
            i = int(np.argmin(row))
            a = float(self.amplitudes[i])
            if 0 < i < len(row) - 1:
                den = row[i - 1] - 2 * row[i] + row[i + 1]
                if den > 0:
                    a += 0.5 * step * (row[i - 1] - row[i + 1]) / den
            out[n] = a
        return out

    def energy_ratio(self) -> np.ndarray:
        """Energy of ``u_ref`` over the weighted similarity *gain* of ``u_ref`` over the identity,
        per pair (K = 1): ``E_1 / (w_s (NCC(1) - NCC(0)))``."""
        i1 = int(np.argmin(np.abs(self.amplitudes - 1.0)))
        gain = self.sim_weight * (self.ncc[:, i1] - self.ncc[:, 0])
        return self.energy / np.maximum(gain, 1e-12)


def amplitude_curves(moving: np.ndarray, fixed: np.ndarray, ref_disp: np.ndarray, regularizer: str,
                     spacing: Optional[Sequence[float]] = None, win: int = 9, center: float = 0.5,
                     amplitudes: np.ndarray = AMPLITUDES) -> AmplitudeCurves:
    """Similarity along ``a * ref_disp`` and the energy of ``ref_disp`` for N pairs (see module).

    Args:
        moving, fixed: ``[N, *spatial, 1]``.
        ref_disp: ``[N, *spatial, D]`` reference displacement (voxels).
        regularizer: ``'elastic'`` (lambda = mu = ``center``) or ``'diffusion'`` (w = ``center``).
        spacing: voxel size in mm (the regularizer's derivatives are per mm).
        win: NCC window of the loss.
        center: the hyperparameter value at which the loss is calibrated.
    """
    import tensorflow as tf

    import regularizers

    from .losses import ncc_map
    from .tf_ops import warp_linear

    if regularizer not in ("elastic", "diffusion"):
        raise ValueError(f"unknown regularizer {regularizer!r}")
    if not 0.0 < center < 1.0:
        raise ValueError(f"center must be inside (0, 1), got {center}")
    moving, fixed = np.asarray(moving, np.float32), np.asarray(fixed, np.float32)
    ref_disp = np.asarray(ref_disp, np.float32)
    if ref_disp.shape[:-1] != moving.shape[:-1] or fixed.shape != moving.shape:
        raise ValueError(f"shapes differ: moving {moving.shape}, fixed {fixed.shape}, reference {ref_disp.shape}")
    amplitudes = np.asarray(amplitudes, np.float64)
    n, a = len(moving), len(amplitudes)
    ncc = np.zeros((n, a))
    axes = list(range(1, moving.ndim - 1))
    for i in range(n):
        disp = tf.constant(amplitudes[:, None].reshape([a] + [1] * (ref_disp.ndim - 1)) * ref_disp[i:i + 1],
                           tf.float32)
        warped = warp_linear(np.repeat(moving[i:i + 1], a, axis=0), disp)
        cc = ncc_map(tf.constant(np.repeat(fixed[i:i + 1], a, axis=0)), warped, win)
        ncc[i] = tf.reduce_mean(cc, axis=axes).numpy()
    u = tf.constant(ref_disp)
    c = tf.fill([n], float(center))
    if regularizer == "elastic":
        energy = regularizers.elastic_regularizer(u, c, c, spacing).numpy()
        sim_weight = 2.0 - 2.0 * center
    else:
        energy = regularizers.diffusion_regularizer(u, c, spacing).numpy()
        sim_weight = 1.0 - center
    return AmplitudeCurves(amplitudes, ncc, energy.astype(np.float64), sim_weight)


def propose_energy_scale(curves: AmplitudeCurves, target: float = 0.5) -> Dict[str, float]:
    """``K`` that puts the optimal amplitude at ``target`` at the box centre (median over pairs).

    Returns ``{"K": median K_pair, "K_q25", "K_q75", "n_pairs"}`` where
    ``K_pair = w_s NCC'(target) / (2 target E_1)`` (pairs whose NCC does not rise at ``target``
    are left out; ``n_pairs`` counts the others).
    """
    if not 0.0 < target < float(curves.amplitudes.max()):
        raise ValueError(f"target amplitude must be inside (0, {curves.amplitudes.max()}), got {target}")
    slope = np.array([np.interp(target, curves.amplitudes, np.gradient(row, curves.amplitudes))
                      for row in curves.ncc])
    ok = (slope > 0) & (curves.energy > 0)
    if not np.any(ok):
        raise ValueError("no pair's similarity rises along its reference field at the target amplitude: "
                         "the reference displacement does not register the pairs")
    k_pair = curves.sim_weight * slope[ok] / (2.0 * target * curves.energy[ok])
    q25, med, q75 = np.percentile(k_pair, [25, 50, 75])
    return {"K": float(med), "K_q25": float(q25), "K_q75": float(q75), "n_pairs": int(ok.sum())}
