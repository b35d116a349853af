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

Options that keep the refined field plausible (fields of :class:`.configs.RefineConfig`, the
``options`` of :class:`Refiner`; its defaults are the refinement that does not tear,
``RefineConfig.original()`` turns them all off: the original refinement, which optimizes ``u``
voxel by voxel and tears anatomy):

* ``fold_weight`` w: adds ``w * mean_x relu(fold_eps - det(I + grad u))^2`` to the objective,
  with the Jacobian determinant of ``x + u(x)`` from central differences (one-sided at the
  border), the discretization of the reported %negJ (``eval_metrics.jacobian_determinant``).
* ``logj_weight`` w: adds ``w * mean_x log(max(det, fold_eps))^2``, a penalty on local volume
  change in both directions (what SDlogJ measures).
* ``smooth`` k: the optimized update passes through k successive 3-voxel box filters per axis
  (stride 1, 'SAME'), a B-spline-like smoother (ConvexAdam / VoxelMorph++ use three).
* ``grid`` g: the update lives on a grid g times coarser per axis (``ceil(n / g)`` nodes, corners
  aligned) and is upsampled (bi/trilinearly) to the image grid.
* ``svf``: the update is a stationary velocity field ``v``; ``d = exp(v)`` by scaling and squaring
  (``int_steps`` squarings) and the result is the composition ``u(x) = d(x) + u0(x + d(x))``
  (the network's map after the refinement's), diffeomorphic if ``u0`` is, up to discretization.

* ``scale`` s: the objective is evaluated on a level s times coarser per axis (block means of
  the images, ``u0`` as block mean / s in coarse voxels, the label at each block's centre, voxel
  size s times larger): s^D times fewer voxels per step. The best coarse update is upsampled to
  the block centres and multiplied by s; a pair keeps ``u0`` if the full-resolution objective
  of the result is not below its start. ``scale = 0`` chooses :func:`auto_scale` per call.
* ``levels`` (s_1, ..., s_L): a coarse-to-fine pyramid (ANTs' shrink factors, e.g. 4x2x1;
  ConvexAdam's coarse-then-fine instance optimization): the ``steps`` are split over the levels
  (``level_split`` weights, equal by default, the remainder to the finest level) and level k runs
  the ``scale = s_k`` refinement above from the field level k - 1 returned, with its own fresh
  Adam, the same ``lr`` in that level's voxels (so a coarse step moves s_k times as far), and the
  same penalties, smoothing and update grid at every level. Every factor must divide every image
  size. ``levels = None`` is the single level ``scale``.

Without ``svf`` the result is ``u = u0 + S(P(p))`` (``P``: upsampling, ``S``: smoothing, ``p``
the optimized array, zero at the start); with ``grid = 1, smooth = 0`` this is Adam on ``u``
itself. The energy and the fold penalty always act on the full displacement ``u`` (the paper's
field), also for runs trained with ``--reg-field svf``.

Conventions: CONVENTIONS.md (``u [N, *spatial, D]``); the warp is :func:`.tf_ops.warp_linear`
(``'floor'`` stencil), (bi/tri)linear with coordinates clamped to the image (voxelmorph's
``SpatialTransformer`` with ``fill_value=None``). The result is a displacement in the same
convention, so every metric applies unchanged.

Pairs run as one batch, in chunks of at most ``pair_batch`` pairs (default: as many as hold
about ``2**21`` voxels, :data:`PAIR_VOXEL_BUDGET`; all pairs of a 2D test split, one pair per
chunk at 128^3 and above, so 3D memory does not grow with the number of test pairs); each
pair's objective only depends on its own variables, so the summed objective gives every pair its
own gradient (Adam's update is elementwise, so pairs do not interact and chunking does not
change the result). Each pair keeps its best iterate (lowest objective = training loss + the
Jacobian penalties), so the returned objective is never above the start (at every level of a
pyramid too); zero steps return ``u0`` unchanged.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from .configs import LossConfig, RefineConfig, split_steps
from .forward import auto_batch_size
from .losses import loss_terms
from .params import ParamSpec
from .tf_ops import box_smooth, jacobian_determinant, warp_linear


def fold_penalty(u: tf.Tensor, eps: float = 0.1, det: Optional[tf.Tensor] = None) -> tf.Tensor:
    """``mean_x relu(eps - det(I + grad u))^2`` per pair, ``[N]`` (0 where every det >= eps);
    ``det``: :func:`jacobian_determinant` of ``u`` if already computed."""
    det = jacobian_determinant(u) if det is None else det
    return tf.reduce_mean(tf.square(tf.nn.relu(eps - det)), axis=list(range(1, det.shape.rank)))


def log_jacobian_penalty(u: tf.Tensor, eps: float = 0.1, det: Optional[tf.Tensor] = None) -> tf.Tensor:
    """``mean_x log(max(det(I + grad u), eps))^2`` per pair, ``[N]``: penalizes local volume
    change in both directions (its spread is SDlogJ); flat below ``eps`` (the fold penalty's
    business). ``det`` as in :func:`fold_penalty`."""
    det = jacobian_determinant(u) if det is None else det
    logj = tf.math.log(tf.maximum(det, eps))
    return tf.reduce_mean(tf.square(logj), axis=list(range(1, det.shape.rank)))


def _interp_matrix(n: int, m: int, centred: bool = False) -> np.ndarray:
    """``[n, m]`` weights of linear interpolation from ``m`` nodes onto ``n`` points: with aligned
    corners (node ``k`` at fine coordinate ``k (n - 1) / (m - 1)``), or ``centred`` (node ``k`` at
    the centre ``(k + 1/2) n / m - 1/2`` of its block of fine points, as after average pooling;
    points beyond the outer nodes take their value)."""
    if centred:
        pos = np.clip((np.arange(n) + 0.5) * m / n - 0.5, 0.0, m - 1.0)
    else:
        pos = np.linspace(0.0, m - 1.0, n) if m > 1 else np.zeros(n)
    lo = np.minimum(np.floor(pos).astype(np.int64), max(m - 2, 0))
    frac = pos - lo
    w = np.zeros((n, m), np.float32)
    w[np.arange(n), lo] += 1.0 - frac
    w[np.arange(n), np.minimum(lo + 1, m - 1)] += frac
    return w


def upsample_linear(p: tf.Tensor, shape: Sequence[int], centred: bool = False) -> tf.Tensor:
    """(Bi/tri)linear interpolation of ``p [N, *coarse, K]`` onto ``shape`` with aligned corners
    (coarse node ``k`` sits at fine coordinate ``k (n - 1) / (m - 1)``) or, ``centred``, at block
    centres (:func:`_interp_matrix`); the identity when the shapes agree. One small dense matrix
    product per axis (its gradient is a matrix product too, much faster than a gather's scatter)."""
    out = tf.convert_to_tensor(p, tf.float32)
    letters = "abcdefgh"
    for i, n in enumerate(shape):
        ax = i + 1
        m = out.shape[ax]
        if m == n:
            continue
        src = letters[: out.shape.rank]
        dst = src[:ax] + "z" + src[ax + 1:]
        out = tf.einsum(f"{src},z{src[ax]}->{dst}", out, tf.constant(_interp_matrix(int(n), int(m), centred)))
    return out


def integrate_svf(v: tf.Tensor, steps: int = 7) -> tf.Tensor:
    """``exp(v)``: the displacement of the flow of the stationary velocity ``v [N, *spatial, D]``
    (voxels) by scaling and squaring, ``d <- d + d(x + d)`` ``steps`` times from ``v / 2^steps``."""
    d = v / float(2 ** int(steps))
    for _ in range(int(steps)):
        d = d + warp_linear(d, d)
    return d


def downsample(x: tf.Tensor, factor: int) -> tf.Tensor:
    """Block means of ``x [N, *spatial, K]`` over ``factor^D`` voxels (every spatial size must be
    divisible by ``factor``); the identity for ``factor = 1``."""
    x = tf.convert_to_tensor(x, tf.float32)
    if factor == 1:
        return x
    pool = tf.nn.avg_pool2d if x.shape.rank == 4 else tf.nn.avg_pool3d
    return pool(x, ksize=factor, strides=factor, padding="VALID")


#: ``scale = 0`` (auto) keeps at least this many voxels along every axis of the coarse level
AUTO_SCALE_MIN_SIDE = 64


def auto_scale(shape: Sequence[int], min_side: int = AUTO_SCALE_MIN_SIDE) -> int:
    """The largest power of two ``s`` that divides every size of ``shape`` and leaves at least
    ``min_side`` voxels per axis (1 if none): 1 at 64^2 (where a 32^2 level lost 0.02-0.05
    Dice), 2 at 128^2 (4x faster per step and no Dice lost; docs/extensions.md "Refinement that does not
    tear")."""
    s = 1
    while all(int(n) % (2 * s) == 0 and int(n) // (2 * s) >= min_side for n in shape):
        s *= 2
    return s


PAIR_VOXEL_BUDGET = 2 ** 21  # voxels per refinement chunk (64^3: 8 pairs; ~2.4 GB at the ~1.2 kB per voxel of docs/pipeline.md "3D")


def _coarse_shape(shape: Sequence[int], grid: int) -> Tuple[int, ...]:
    return tuple(max(2, -(-int(n) // int(grid))) if grid > 1 else int(n) for n in shape)


class Refiner:
    """Compiled per-pair refinement for one model's loss (``spec`` and :class:`.configs.LossConfig`).

    ``Refiner(spec, loss, options)(moving, fixed, u0, hyp, fixed_seg, steps, lr)`` returns
    ``(u, loss_start, loss_end)``: the refined displacement ``[N, *spatial, D]`` (numpy, voxels)
    and the per-pair objective ``[N]`` (:meth:`loss`) before and after (that of the returned
    ``u``).

    ``loss``: the run's loss (None: ``LossConfig()``, unit spacing, NCC window 9, ``K = 1``,
    linear mapping; :meth:`from_config` reads a run's). ``options``: :class:`.configs.RefineConfig`
    (module docstring; None: its defaults, the refinement that does not tear;
    ``RefineConfig.original()`` is the original voxelwise one). ``pair_batch``: pairs per chunk
    (None: about :data:`PAIR_VOXEL_BUDGET` voxels per chunk; the result does not depend on it).
    """

    def __init__(self, spec: ParamSpec, loss: Optional[LossConfig] = None, options: Optional[RefineConfig] = None,
                 *, pair_batch: Optional[int] = None):
        self.spec = spec
        self.loss_config = LossConfig() if loss is None else loss
        self.options = RefineConfig() if options is None else options
        if not isinstance(self.loss_config, LossConfig) or not isinstance(self.options, RefineConfig):
            raise TypeError(f"Refiner(spec, loss: LossConfig, options: RefineConfig), got "
                            f"{type(self.loss_config).__name__} and {type(self.options).__name__}")
        opt = self.options
        self.spacing = None if self.loss_config.spacing is None else list(self.loss_config.spacing)
        self.scale_option = opt.scale
        self.scale = max(opt.scale, 1)  # the level being refined (plan() sets it per level)
        self.levels, self.level_split = opt.levels, opt.level_split
        self.fold_weight, self.fold_eps, self.logj_weight = opt.fold_weight, opt.fold_eps, opt.logj_weight
        self.smooth, self.grid, self.svf, self.int_steps = opt.smooth, opt.grid, opt.svf, opt.int_steps
        if pair_batch is not None and (int(pair_batch) != pair_batch or pair_batch < 1):
            raise ValueError(f"pair_batch must be an integer >= 1 or None, got {pair_batch}")
        self.pair_batch = None if pair_batch is None else int(pair_batch)

    @classmethod
    def from_config(cls, config: dict, spacing: Optional[Sequence[float]] = None,
                    options: Optional[RefineConfig] = None, *, pair_batch: Optional[int] = None) -> "Refiner":
        """The refiner of a saved run (``config.json``): its spec and loss
        (:meth:`.configs.LossConfig.from_run_config`: spacing, NCC window, energy scale ``K``,
        hyperparameter mapping; runs made before these existed: ``K = 1``, linear), on voxels of
        ``spacing`` mm if given (e.g. a resampled grid); ``options`` as in the class docstring."""
        loss = LossConfig.from_run_config(config)
        if spacing is not None:
            loss = loss.with_spacing(spacing)
        return cls(ParamSpec.from_model_config(config["model"]), loss, options, pair_batch=pair_batch)

    def loss(self, moving, fixed, u, hyp, fixed_seg, spacing: Optional[Sequence[float]] = None) -> tf.Tensor:
        """Per-pair objective ``[N]`` of displacement ``u``: the training loss
        (:func:`.losses.loss_terms`) plus ``fold_weight *`` :func:`fold_penalty` plus
        ``logj_weight *`` :func:`log_jacobian_penalty` (one Jacobian for both). ``spacing``
        overrides the refiner's (mm per voxel; the coarse level of ``scale`` uses ``scale`` times it)."""
        moving, fixed = tf.convert_to_tensor(moving, tf.float32), tf.convert_to_tensor(fixed, tf.float32)
        hyp, u = tf.convert_to_tensor(hyp, tf.float32), tf.convert_to_tensor(u, tf.float32)
        warped = warp_linear(moving, u)
        loss = self.loss_config if spacing is None else self.loss_config.with_spacing(spacing)
        out = loss_terms(self.spec, fixed, warped, u, hyp, fixed_seg, loss)["loss"]
        det = jacobian_determinant(u) if self.fold_weight > 0 or self.logj_weight > 0 else None
        if self.fold_weight > 0:
            out = out + self.fold_weight * fold_penalty(u, self.fold_eps, det)
        if self.logj_weight > 0:
            out = out + self.logj_weight * log_jacobian_penalty(u, self.fold_eps, det)
        return out

    def field(self, p: tf.Tensor, u0: tf.Tensor) -> tf.Tensor:
        """The displacement ``[N, *spatial, D]`` of the optimized array ``p [N, *coarse, D]``
        (``u0`` for ``p = 0``; module docstring)."""
        v = box_smooth(upsample_linear(p, u0.shape[1:-1]), self.smooth)
        if not self.svf:
            return u0 + v
        d = integrate_svf(v, self.int_steps)
        return d + warp_linear(u0, d)

    def _check(self, moving, u0, hyp, steps) -> None:
        if u0.shape[:-1] != tuple(moving.shape[:-1]) or u0.shape[-1] != len(moving.shape) - 2:
            raise ValueError(f"u0 has shape {u0.shape}; expected {[*moving.shape[:-1], len(moving.shape) - 2]}")
        if hyp.shape[0] != u0.shape[0] or hyp.shape[1] != self.spec.num_params:
            raise ValueError(f"hyp has shape {hyp.shape}; expected [{u0.shape[0]}, {self.spec.num_params}]")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")

    def __call__(self, moving: np.ndarray, fixed: np.ndarray, u0: np.ndarray, hyp: np.ndarray,
                 fixed_seg: Optional[np.ndarray] = None, steps: int = 100,
                 lr: float = 0.1) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        moving, fixed, hyp = (np.asarray(a, np.float32) for a in (moving, fixed, hyp))
        u0 = np.asarray(u0, np.float32)
        self._check(moving, u0, hyp, steps)
        n = moving.shape[0]
        chunk = self.pair_batch or auto_batch_size(moving.shape[1:-1], n, PAIR_VOXEL_BUDGET)
        if chunk < n:  # pairs are independent (module docstring): refine chunk by chunk
            parts = [self(moving[i:i + chunk], fixed[i:i + chunk], u0[i:i + chunk], hyp[i:i + chunk],
                          None if fixed_seg is None else np.asarray(fixed_seg)[i:i + chunk], steps, lr)
                     for i in range(0, n, chunk)]
            return tuple(np.concatenate(p) for p in zip(*parts))
        moving, fixed, hyp = tf.constant(moving), tf.constant(fixed), tf.constant(hyp)
        seg = None
        if self.spec.spatially_adaptive:
            if fixed_seg is None:
                raise ValueError("refining with a spatially adaptive model needs the fixed segmentation")
            seg = tf.constant(np.asarray(fixed_seg, np.int32))
        plan = self.plan(moving.shape[1:-1], steps)  # fails on a factor that does not divide the shape
        start = self.loss(moving, fixed, u0, hyp, seg).numpy()
        if steps == 0:
            return u0.copy(), start, start.copy()
        u_np, end = u0, start
        for s, n in plan:
            if n > 0:
                self.scale = s
                u_np, end = self._refine_level(moving, fixed, u_np, hyp, seg, end, n, lr)
        if not (np.all(np.isfinite(u_np)) and np.all(np.isfinite(end))):
            raise FloatingPointError("refinement diverged (non-finite displacement or loss); lower --refine-lr")
        return u_np, start, end

    def plan(self, shape: Sequence[int], steps: int) -> List[Tuple[int, int]]:
        """``[(scale, steps), ...]`` coarse to fine for images of ``shape`` (spatial sizes): the
        single level ``scale`` (``auto_scale`` for 0), or the ``levels`` with ``steps`` split by
        ``level_split``. ``ValueError`` naming the factor and the shape if one does not divide
        every size."""
        if self.levels is None:
            factors = [auto_scale(shape) if self.scale_option == 0 else self.scale_option]
            parts = [int(steps)]
        else:
            factors = list(self.levels)
            parts = split_steps(steps, self.level_split or [1.0] * len(factors))
        for f in factors:
            if any(int(n) % f for n in shape):
                raise ValueError(f"refinement {'level' if self.levels else 'scale'} {f}: every image size must be "
                                 f"divisible by it, got {list(shape)}")
        return list(zip(factors, parts))

    def _refine_level(self, moving, fixed, u0: np.ndarray, hyp, seg, start: np.ndarray, steps: int, lr: float):
        """One level (``self.scale``) of ``steps`` Adam steps from ``u0`` (full resolution, numpy)
        whose full-resolution objective is ``start``: ``(u, objective)``, never above ``start``."""
        level = self._level(moving, fixed, u0, seg)
        state = self._state(tuple(level[0].shape), seg is not None)
        state.reset(level[0], level[1], level[2], hyp, level[3],
                    start if self.scale == 1 else self._level_loss(level, hyp), lr)
        for _ in range(int(steps)):
            state.step()
        u_np, end = state.finish()
        if self.scale > 1:
            u_np, end = self._finish_full(state, moving, fixed, u0, hyp, seg, start)
        return u_np, end

    def _level(self, moving, fixed, u0: np.ndarray, seg):
        """The optimization level ``(moving, fixed, u0, seg)``: the inputs themselves, or with
        ``scale`` s > 1 block means of the images, ``u0`` in coarse voxels (block mean / s) and
        the label at each block's centre voxel."""
        s = self.scale
        if s == 1:
            return moving, fixed, tf.constant(u0), seg
        bad = [n for n in moving.shape[1:-1] if n % s]
        if bad:
            raise ValueError(f"refinement scale {s}: every image size must be divisible by it, got "
                             f"{list(moving.shape[1:-1])}")
        nd = len(moving.shape) - 2
        seg_c = None
        if seg is not None:
            seg_c = seg[(slice(None),) + (slice(s // 2, None, s),) * nd]
        return downsample(moving, s), downsample(fixed, s), downsample(u0, s) / float(s), seg_c

    def level_spacing(self, ndim: int) -> Optional[List[float]]:
        """Voxel size of the optimization level: the refiner's, times ``scale`` when it is > 1."""
        if self.scale == 1:
            return self.spacing
        return [float(v) * self.scale for v in (self.spacing or [1.0] * ndim)]

    def _level_loss(self, level, hyp) -> np.ndarray:
        return self.loss(level[0], level[1], level[2], hyp, level[3],
                         self.level_spacing(len(level[0].shape) - 2)).numpy()

    def _finish_full(self, state: "_RefineState", moving, fixed, u0: np.ndarray, hyp, seg, start: np.ndarray):
        """Scale > 1: the full-resolution field of the best coarse iterate, ``s`` times the coarse
        update upsampled to block centres (composed with ``u0`` under ``svf``); a pair whose
        full-resolution objective is not below ``start`` keeps ``u0``."""
        s = self.scale
        v = box_smooth(upsample_linear(state.best_p, state.u0.shape[1:-1]), self.smooth)  # coarse update
        if self.svf:
            v = integrate_svf(v, self.int_steps)
        d = s * upsample_linear(v, u0.shape[1:-1], centred=True)  # fine voxels
        u0_t = tf.constant(u0)
        u = d + warp_linear(u0_t, d) if self.svf else u0_t + d
        end = self.loss(moving, fixed, u, hyp, seg).numpy()
        better = end < start
        keep = better.reshape([-1] + [1] * (u0.ndim - 1))
        return np.where(keep, u.numpy(), u0), np.where(better, end, start)

    def _state(self, shape: Tuple[int, ...], with_seg: bool) -> "_RefineState":
        """The compiled optimization of one level shape and scale (the traced step bakes in the
        level's voxel size), traced once and reused by later calls."""
        cache = self.__dict__.setdefault("_states", {})
        key = (shape, with_seg, self.scale)
        if key not in cache:
            cache[key] = _RefineState(self, shape, with_seg)
        return cache[key]


class _RefineState:
    """Variables and the compiled Adam step of :class:`Refiner` for one batch shape
    ``[N, *spatial, 1]``: every call assigns its inputs and resets ``p``, the best iterate and the
    optimizer, so a traced step serves all later calls of that shape (tracing costs seconds)."""

    def __init__(self, refiner: Refiner, shape: Tuple[int, ...], with_seg: bool):
        n, spatial, nd = shape[0], shape[1:-1], len(shape) - 2
        self.refiner = refiner
        self.moving = tf.Variable(tf.zeros(shape), trainable=False)
        self.fixed = tf.Variable(tf.zeros(shape), trainable=False)
        self.hyp = tf.Variable(tf.zeros([n, refiner.spec.num_params]), trainable=False)
        self.seg = tf.Variable(tf.zeros([n, *spatial], tf.int32), trainable=False) if with_seg else None
        self.u0 = tf.Variable(tf.zeros([n, *spatial, nd]), trainable=False)
        self.p = tf.Variable(tf.zeros([n, *_coarse_shape(spatial, refiner.grid), nd]))
        self.best_u = tf.Variable(tf.zeros([n, *spatial, nd]), trainable=False)
        self.best_p = tf.Variable(tf.zeros_like(self.p), trainable=False)
        self.best = tf.Variable(tf.zeros([n]), trainable=False)
        self.opt = tf.keras.optimizers.Adam(learning_rate=0.1)
        self.opt.build([self.p])
        self.expand = [-1] + [1] * (nd + 1)
        self.step = tf.function(self._step, autograph=False)

    def reset(self, moving, fixed, u0, hyp, seg, start, lr: float) -> None:
        for var, value in ((self.moving, moving), (self.fixed, fixed), (self.u0, u0), (self.hyp, hyp),
                           (self.best_u, u0), (self.best, start)):
            var.assign(value)
        if self.seg is not None:
            self.seg.assign(seg)
        self.p.assign(tf.zeros_like(self.p))
        self.best_p.assign(tf.zeros_like(self.p))
        for var in self.opt.variables:  # iterations and moments: a fresh Adam
            var.assign(tf.zeros_like(var))
        self.opt.learning_rate.assign(float(lr))

    def _keep_best(self, u, per_pair) -> None:
        better = per_pair < self.best  # keep each pair's best iterate: never worse than the start
        self.best_u.assign(tf.where(tf.reshape(better, self.expand), u, self.best_u))
        self.best_p.assign(tf.where(tf.reshape(better, self.expand), self.p, self.best_p))
        self.best.assign(tf.where(better, per_pair, self.best))

    def _loss(self, u):
        r = self.refiner
        if r.scale == 1:
            return r.loss(self.moving, self.fixed, u, self.hyp, self.seg)
        return r.loss(self.moving, self.fixed, u, self.hyp, self.seg, r.level_spacing(len(u.shape) - 2))

    def _step(self):
        with tf.GradientTape() as tape:
            u = self.refiner.field(self.p, self.u0)
            per_pair = self._loss(u)
            total = tf.reduce_sum(per_pair)
        grad = tape.gradient(total, self.p)
        self._keep_best(u, per_pair)
        self.opt.apply_gradients([(grad, self.p)])
        return per_pair

    def finish(self) -> Tuple[np.ndarray, np.ndarray]:
        """Evaluate the last iterate, keep it if best; return ``(best u, its loss)`` as numpy."""
        last_u = self.refiner.field(self.p, self.u0)
        self._keep_best(last_u, self._loss(last_u))
        return self.best_u.numpy(), self.best.numpy()
