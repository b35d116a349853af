"""Instance optimization: refine a network's displacement per pair on the training loss.

Starting from the displacement ``u0`` a trained HyperMorph model predicts for a pair, the
displacement itself is optimized with Adam for ``steps`` iterations on the very loss the
network was trained with (paper eq. 1, :func:`.losses.loss_terms`): weighted local NCC plus the
elastic or diffusion energy (times the run's energy scale ``K``), with the pair's hyperparameters.
For a spatially adaptive (SA) model the per-class values become voxelwise maps from a segmentation
on the fixed grid (the ``fixed_seg`` argument), so the refinement is regularized by the tissue-
and subject-specific energy; for a global model the maps are constant. Training and the oracle
protocol pass the fixed segmentation (the paper's); the population protocol of ``inference.py``
passes the moving segmentation warped by the network's displacement, so no test label touches
the registration.

Conventions: CONVENTIONS.md (``u [N, *spatial, D]``); the warp is (bi/tri)linear with coordinates
clamped to the image (voxelmorph's ``SpatialTransformer`` with
``fill_value=None``). The result is a displacement in the same convention, so every metric
applies unchanged. The refinement always regularizes the displacement (the paper's field), also
for runs trained with ``--reg-field svf``.

All pairs run as one batch; each pair's loss only depends on its own displacement, so the
summed loss gives every pair its own gradient (Adam's update is elementwise, so pairs do not
interact). Each pair keeps its best iterate, so the returned loss is never above the start;
zero steps return ``u0`` unchanged.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from .losses import loss_terms
from .params import HypMapping, ParamSpec


def linear_warp(image: tf.Tensor, disp: tf.Tensor) -> tf.Tensor:
    """``image(x + disp(x))`` with (bi/tri)linear interpolation, batched without ``map_fn``.

    Args:
        image: ``[B, *spatial, K]`` float.
        disp: ``[B, *spatial, D]`` displacement in voxels (channel j along axis j).

    Returns:
        ``[B, *spatial, K]``; sample coordinates outside the image are clamped to its border.
    """
    image = tf.convert_to_tensor(image, tf.float32)
    disp = tf.convert_to_tensor(disp, tf.float32)
    shape = image.shape[1:-1]
    ndim = len(shape)
    grid = tf.stack(tf.meshgrid(*[tf.range(s, dtype=tf.float32) for s in shape], indexing="ij"), axis=-1)
    coords = grid[None] + disp
    upper = tf.constant([float(s - 1) for s in shape], tf.float32)
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


class Refiner:
    """Compiled per-pair refinement for one model's loss (``spec``, spacing, NCC window).

    ``Refiner(spec, spacing, win, energy_scale)(moving, fixed, u0, hyp, fixed_seg, steps, lr)`` returns
    ``(u, loss_start, loss_end)``: the refined displacement ``[N, *spatial, D]`` (numpy, voxels)
    and the per-pair loss ``[N]`` before and after (the loss of the returned ``u``).
    """

    def __init__(self, spec: ParamSpec, spacing: Optional[Sequence[float]] = None, win: int = 9,
                 energy_scale: float = 1.0, mapping: Optional[HypMapping] = None):
        self.spec = spec
        self.mapping = mapping
        self.spacing = None if spacing is None else [float(s) for s in spacing]
        self.win = int(win)
        self.energy_scale = float(energy_scale)

    @classmethod
    def from_config(cls, config: dict) -> "Refiner":
        """The refiner of a saved run (``config.json``): its spec, spacing, NCC window, energy
        scale ``K`` and hyperparameter mapping (runs made before these existed: ``K = 1``, linear)."""
        loss = config.get("loss", {})
        return cls(ParamSpec.from_model_config(config["model"]), loss.get("spacing"), loss.get("ncc_win", 9),
                   loss.get("energy_scale", 1.0), HypMapping.from_loss_config(loss))

    def loss(self, moving, fixed, u, hyp, fixed_seg) -> tf.Tensor:
        """Per-pair training loss ``[N]`` of displacement ``u`` (see :func:`.losses.loss_terms`)."""
        moving, fixed = tf.convert_to_tensor(moving, tf.float32), tf.convert_to_tensor(fixed, tf.float32)
        hyp, u = tf.convert_to_tensor(hyp, tf.float32), tf.convert_to_tensor(u, tf.float32)
        warped = linear_warp(moving, u)
        return loss_terms(self.spec, fixed, warped, u, hyp, fixed_seg, self.spacing, self.win,
                          self.energy_scale, self.mapping)["loss"]

    def __call__(self, moving: np.ndarray, fixed: np.ndarray, u0: np.ndarray, hyp: np.ndarray,
                 fixed_seg: Optional[np.ndarray] = None, steps: int = 100,
                 lr: float = 0.1) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        moving = tf.constant(np.asarray(moving, np.float32))
        fixed = tf.constant(np.asarray(fixed, np.float32))
        hyp = tf.constant(np.asarray(hyp, np.float32))
        u0 = np.asarray(u0, np.float32)
        if u0.shape[:-1] != tuple(moving.shape[:-1]) or u0.shape[-1] != len(moving.shape) - 2:
            raise ValueError(f"u0 has shape {u0.shape}; expected {[*moving.shape[:-1], len(moving.shape) - 2]}")
        if hyp.shape[0] != u0.shape[0] or hyp.shape[1] != self.spec.num_params:
            raise ValueError(f"hyp has shape {hyp.shape}; expected [{u0.shape[0]}, {self.spec.num_params}]")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        seg = None
        if self.spec.spatially_adaptive:
            if fixed_seg is None:
                raise ValueError("refining with a spatially adaptive model needs the fixed segmentation")
            seg = tf.constant(np.asarray(fixed_seg, np.int32))
        u = tf.Variable(u0)
        start = self.loss(moving, fixed, u, hyp, seg).numpy()
        if steps == 0:
            return u0.copy(), start, start.copy()
        opt = tf.keras.optimizers.Adam(learning_rate=float(lr))
        best_u = tf.Variable(u0)
        best = tf.Variable(start)
        expand = [-1] + [1] * (len(u0.shape) - 1)

        @tf.function(autograph=False)
        def step():
            with tf.GradientTape() as tape:
                per_pair = self.loss(moving, fixed, u, hyp, seg)
                total = tf.reduce_sum(per_pair)
            grad = tape.gradient(total, u)
            better = per_pair < best  # keep each pair's best iterate: never worse than the start
            best_u.assign(tf.where(tf.reshape(better, expand), u, best_u))
            best.assign(tf.where(better, per_pair, best))
            opt.apply_gradients([(grad, u)])
            return per_pair

        for _ in range(int(steps)):
            step()
        last = self.loss(moving, fixed, u, hyp, seg)
        better = last < best
        best_u.assign(tf.where(tf.reshape(better, expand), u, best_u))
        best.assign(tf.where(better, last, best))
        u_np, end = best_u.numpy(), best.numpy()
        if not (np.all(np.isfinite(u_np)) and np.all(np.isfinite(end))):
            raise FloatingPointError("refinement diverged (non-finite displacement or loss); lower --refine-lr")
        return u_np, start, end
