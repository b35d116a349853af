"""Direct identification of a model's hyperparameters by gradient descent (docs/extensions.md "Gradient identification").

The grid method (:mod:`.grid_identification`) searches the *global* model and hands each tissue's
best grid point to the spatially adaptive (SA) model, a proxy. Both networks are differentiable
in their hyperparameter input, so the SA model's own parameters (every class, background
included) can be optimized directly:

- variable ``z`` in R^P per pair, hyperparameters ``h = sigmoid(z)`` in (0, 1); start
  ``z0 = logit(clip(h0, 1e-3, 1 - 1e-3))`` (``h0`` default 0.5);
- objective ``'dice'``: ``1 - mean_c softDice_c`` over the tissue classes ``c = 1..C`` present
  in the fixed or moving labels of that pair, with the moving one-hot labels warped by the
  predicted displacement with *linear* interpolation (differentiable);
  objective ``'epe'`` (synthetic data): mean end-point error in mm against the true
  displacement inside a mask (default: the body, ``fixed_seg > 0``);
- Adam on ``z``; all pairs of a batch in one forward + backward pass of the network with frozen
  weights; the per-pair objectives are *summed*, so each pair's gradient is its own (the
  networks have no batch coupling) and Adam, being elementwise, keeps the pairs independent;
- the best iterate per pair (lowest objective among the evaluated iterates) is returned, so the
  result is never worse than the start; a pair stops when its best objective has not improved
  by more than ``min_delta`` for ``patience`` steps, the batch when all its pairs stopped.

Conventions: CONVENTIONS.md (``disp [B, *spatial, D]``); sampling outside the image repeats the edge value (``scipy.ndimage`` ``mode='nearest'``, as
:func:`eval_metrics.warp_image`).

:func:`identify_population` is the population protocol of the CSAIN paper: one shared ``z`` for
all validation pairs, Adam on the mean objective, the result applied unchanged to the test pairs.

:func:`run_cli` is the ``--method gradient`` branch of ``parameter_identification.py`` (both
protocols).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.stats import spearmanr

import eval_metrics
from datasets.atomic import atomic_write
from tf_compat import import_voxelmorph

from . import artifacts as art
from . import run_folder
from .models import call_model, needs_segmentation
from .provenance import check_runs, weights_sha256
from .forward import Registrar, auto_batch_size, warped_moving_segmentation
from .tf_ops import soft_dice, warp_linear

tf, _vxm, _ne = import_voxelmorph()

OBJECTIVES = ("dice", "epe")
#: start values are clipped into [H_CLIP, 1 - H_CLIP] before the logit
H_CLIP = 1e-3
#: an objective must fall by more than this to count as an improvement (early stopping)
MIN_DELTA = 1e-4
#: voxels per gradient batch when the caller does not choose (2 pairs at 128^2, 16 at 64^2)
GRADIENT_VOXEL_BUDGET = 2 ** 16


# ----------------------------------------------------------------------------------------------
# differentiable pieces
# ----------------------------------------------------------------------------------------------
def tissue_onehot(seg, num_classes: int) -> tf.Tensor:
    """``seg [B, *spatial]`` int labels 0..C -> ``[B, *spatial, C]`` one-hot of classes 1..C."""
    return tf.one_hot(tf.cast(seg, tf.int32), num_classes + 1, dtype=tf.float32)[..., 1:]


def dice_objective(fixed_oh: tf.Tensor, moving_oh: tf.Tensor, disp: tf.Tensor,
                   present: tf.Tensor, mask: Optional[tf.Tensor] = None) -> tf.Tensor:
    """``1 - mean_c softDice_c`` per sample over the classes flagged in ``present [B, C]``.

    ``fixed_oh``/``moving_oh`` ``[B, *spatial, C]``; ``mask [B, *spatial]`` (optional) limits
    the voxels counted. Returns ``[B]``.
    """
    warped = warp_linear(moving_oh, disp, "cell")
    a = fixed_oh
    if mask is not None:
        a = a * mask[..., None]
        warped = warped * mask[..., None]
    dice = soft_dice(a, warped)
    n = tf.maximum(tf.reduce_sum(present, axis=1), 1.0)
    return 1.0 - tf.reduce_sum(dice * present, axis=1) / n


def epe_objective(disp: tf.Tensor, disp_true: tf.Tensor, mask: tf.Tensor, spacing: Sequence[float]) -> tf.Tensor:
    """Mean end-point error in mm inside ``mask [B, *spatial]`` per sample -> ``[B]``.

    ``disp``/``disp_true`` ``[B, *spatial, D]`` in voxels; ``spacing`` mm per axis. A tiny
    constant inside the square root keeps the gradient finite where the error is 0.
    """
    sp = tf.cast(tf.convert_to_tensor(spacing), tf.float32)
    err = tf.sqrt(tf.reduce_sum(tf.square((disp - disp_true) * sp), axis=-1) + 1e-12)
    axes = list(range(1, err.shape.rank))
    return tf.reduce_sum(err * mask, axis=axes) / tf.maximum(tf.reduce_sum(mask, axis=axes), 1.0)


# ----------------------------------------------------------------------------------------------
# optimizer
# ----------------------------------------------------------------------------------------------
@dataclass
class GradientResult:
    """Outcome of :func:`identify_by_gradient` for N pairs.

    ``h [N, P]`` best iterate (in (0, 1)); ``best``/``start`` ``[N]`` objective at the best
    iterate and at the start; ``traces`` one array per pair (objective of every evaluated
    iterate, ``traces[n][0] == start[n]``); ``steps [N]`` forward + backward passes spent on
    each pair; ``batch_passes`` batched forward + backward calls; ``seconds`` wall time
    (tracing included).
    """

    h: np.ndarray
    best: np.ndarray
    start: np.ndarray
    traces: List[np.ndarray]
    steps: np.ndarray
    batch_passes: int = 0
    seconds: float = 0.0
    objective: str = "dice"
    extra: Dict = field(default_factory=dict)


def logit_start(h0, n: int, num_params: int) -> np.ndarray:
    """Start variable ``z0 [n, P]`` from ``h0`` (``None`` -> 0.5, ``[P]`` or ``[n, P]``)."""
    if h0 is None:
        h0 = np.full((n, num_params), 0.5)
    h0 = np.asarray(h0, np.float64)
    if h0.ndim == 1:
        h0 = np.broadcast_to(h0[None], (n, h0.shape[0]))
    if h0.shape != (n, num_params):
        raise ValueError(f"h0 has shape {h0.shape}; expected [{n}, {num_params}] or [{num_params}]")
    if not np.all(np.isfinite(h0)):
        raise ValueError("h0 must be finite")
    h0 = np.clip(h0, H_CLIP, 1.0 - H_CLIP)
    return np.log(h0) - np.log1p(-h0)


#: compiled steps per (live) model and objective
_STEP_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _make_step(model, objective: str, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> Callable:
    """One compiled Adam step on ``z`` (weights frozen), cached per model and objective.

    ``step(z, m, v, t, lr, active, moving, fixed, seg, a, b, present, mask, spacing)`` returns
    ``(objective [B] at z, gradient finite [B], z', m', v')``; pairs with ``active = 0`` (or a
    non-finite gradient) keep ``z``, ``m``, ``v``. For ``'dice'`` ``a``/``b`` are the fixed/moving
    tissue one-hots ``[B, *spatial, C]`` and ``present [B, C]`` flags the classes that count; for
    ``'epe'`` ``a`` is the true displacement ``[B, *spatial, D]`` (``b``, ``present`` unused).
    ``t`` is the 1-based Adam step, ``spacing [D]`` mm per axis; ``seg [B, *spatial]`` int32 is
    the fixed segmentation, passed to models that build a conditioning map from it (CSAIN).
    """
    cache = _STEP_CACHE.setdefault(model, {})
    if objective in cache:
        return cache[objective]

    @tf.function(autograph=False)
    def step(z, m, v, t, lr, active, moving, fixed, seg, a, b, present, mask, spacing):
        with tf.GradientTape() as tape:
            tape.watch(z)
            h = tf.sigmoid(z)
            _, disp, _ = call_model(model, moving, fixed, h, seg, training=False)
            if objective == "dice":
                obj = dice_objective(a, b, disp, present, mask)
            else:
                obj = epe_objective(disp, a, mask, spacing)
            total = tf.reduce_sum(obj)
        g = tape.gradient(total, z)
        finite = tf.reduce_all(tf.math.is_finite(g), axis=1)
        keep = tf.logical_or(active[:, None] < 0.5, tf.logical_not(finite)[:, None])
        keep = tf.broadcast_to(keep, tf.shape(z))
        g = tf.where(keep, tf.zeros_like(g), g)
        m2 = beta1 * m + (1.0 - beta1) * g
        v2 = beta2 * v + (1.0 - beta2) * tf.square(g)
        mhat = m2 / (1.0 - tf.pow(beta1, t))
        vhat = v2 / (1.0 - tf.pow(beta2, t))
        z2 = z - lr * mhat / (tf.sqrt(vhat) + eps)
        return obj, finite, tf.where(keep, z, z2), tf.where(keep, m, m2), tf.where(keep, v, v2)

    cache[objective] = step
    return step


def _prepare(model, moving: np.ndarray, fixed: np.ndarray, fixed_seg, moving_seg, objective: str, disp_true,
             mask, spacing, num_classes: Optional[int], ids: Sequence[str], net_seg=None) -> List[tf.Tensor]:
    """Check one batch and build the constant inputs of the compiled step/gradient.

    ``moving``/``fixed [N, *spatial, 1]`` float32; other arguments as :func:`identify_by_gradient`;
    ``net_seg [N, *spatial]``: the segmentation a CSAIN model builds its conditioning map from
    (default ``fixed_seg``). Returns ``[moving, fixed, seg, a, b, present, mask, spacing]`` (see
    :func:`_make_step`)."""
    n = moving.shape[0]
    shape = tuple(moving.shape[1:-1])
    nd = len(shape)
    for name, img in (("moving", moving), ("fixed", fixed)):
        bad = [ids[k] for k in range(n) if not np.all(np.isfinite(img[k]))]
        if bad:
            raise ValueError(f"pair(s) {bad}: the {name} image has non-finite values")
    fseg = None if fixed_seg is None else np.asarray(fixed_seg)
    if objective == "dice":
        if fseg is None or moving_seg is None:
            raise ValueError("objective 'dice' needs the fixed and moving segmentations")
        mseg = np.asarray(moving_seg)
        C = int(num_classes) if num_classes else int(max(fseg.max(), mseg.max()))
        if C < 1:
            raise ValueError(f"pairs {ids}: no tissue labels (all background); the Dice objective needs labels")
        a = tissue_onehot(fseg, C).numpy()
        b = tissue_onehot(mseg, C).numpy()
        present = ((a.reshape(n, -1, C).sum(1) + b.reshape(n, -1, C).sum(1)) > 0).astype(np.float32)
        empty = [ids[k] for k in range(n) if present[k].sum() == 0]
        if empty:
            raise ValueError(f"pair(s) {empty}: no tissue labels in fixed or moving segmentation; "
                             "the Dice objective needs labels")
        msk = np.ones((n, *shape), np.float32) if mask is None else np.asarray(mask, np.float32)
        spc = np.ones(nd, np.float32)
    else:
        if disp_true is None:
            raise ValueError("objective 'epe' needs the true displacement (synthetic data only)")
        a = np.asarray(disp_true, np.float32)
        if a.shape != (n, *shape, nd):
            raise ValueError(f"disp_true has shape {a.shape}, expected {(n, *shape, nd)}")
        if mask is None:
            if fseg is None:
                raise ValueError("objective 'epe' needs a mask or the fixed segmentation (body = labels > 0)")
            mask = fseg > 0
        msk = np.asarray(mask, np.float32)
        if np.any(msk.reshape(n, -1).sum(1) == 0):
            raise ValueError(f"pairs {ids}: empty EPE mask (no body voxels)")
        b = np.zeros((n, 1), np.float32)
        present = np.zeros((n, 1), np.float32)
        spc = np.asarray(spacing if spacing is not None else (1.0,) * nd, np.float32)
    seg = net_seg if net_seg is not None else fseg
    if needs_segmentation(model) and seg is None:
        raise ValueError("this model (CSAIN) builds its conditioning map from the fixed segmentation: pass fixed_seg")
    seg = np.zeros((n, *shape), np.int32) if seg is None else np.asarray(seg).astype(np.int32)
    return [tf.constant(x) for x in (moving, fixed, seg, a, b, present, msk, spc)]


def _check_options(objective: str, steps: int, lr: float) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr}")


class _PairTracker:
    """Per-pair bookkeeping of the Adam loop of :func:`identify_by_gradient` for N pairs:
    ``active [N]`` (1.0 while a pair is optimized, float32 for the compiled step), ``best [N]`` and
    ``best_z [N, P]`` (lowest objective and its iterate), ``since [N]`` steps without an improvement
    > ``min_delta``, ``traces`` (objective of every evaluated iterate) and ``used [N]`` passes."""

    def __init__(self, z0: np.ndarray, patience: Optional[int], min_delta: float):
        n = z0.shape[0]
        self.patience, self.min_delta = patience, min_delta
        self.active = np.ones(n, np.float32)
        self.best = np.full(n, np.inf)
        self.best_z = z0.copy()
        self.since = np.zeros(n, int)
        self.traces: List[List[float]] = [[] for _ in range(n)]
        self.used = np.zeros(n, int)

    def update(self, k: int, obj: np.ndarray, finite: np.ndarray, z: np.ndarray, ids: Sequence[str],
               objective: str) -> None:
        """Record step ``k``: objective ``obj [N]`` at the iterate ``z [N, P]`` and ``finite [N]`` (gradient
        finite) for every active pair; keep the best iterate and stop pairs out of patience.
        ``FloatingPointError`` naming the pair if its objective or gradient is not finite."""
        for i in np.flatnonzero(self.active):
            if not (np.isfinite(obj[i]) and finite[i]):
                what = "objective" if not np.isfinite(obj[i]) else "gradient"
                raise FloatingPointError(
                    f"pair {ids[i]}: the {objective} {what} became non-finite at step {k} "
                    f"(h = {np.round(1 / (1 + np.exp(-z[i])), 4).tolist()}); try a smaller --lr")
            self.traces[i].append(float(obj[i]))
            self.used[i] += 1
            self.since[i] = 0 if (obj[i] < self.best[i] - self.min_delta or k == 0) else self.since[i] + 1
            if obj[i] < self.best[i]:
                self.best[i] = obj[i]
                self.best_z[i] = z[i]
            if self.patience and self.since[i] >= self.patience:
                self.active[i] = 0.0


def identify_by_gradient(model, moving, fixed, fixed_seg, moving_seg, h0=None, steps: int = 50,
                         lr: float = 0.05, patience: Optional[int] = 10, objective: str = "dice",
                         disp_true=None, mask=None, spacing: Optional[Sequence[float]] = None,
                         num_classes: Optional[int] = None, min_delta: float = MIN_DELTA,
                         pair_ids: Optional[Sequence[str]] = None, net_seg=None) -> GradientResult:
    """Optimize the hyperparameter input of ``model`` per pair by Adam on ``z`` (``h = sigmoid(z)``).

    Args:
        model: Keras model ``[moving, fixed, hyp(, fixed_seg)] -> (warped, disp, svf)`` (global,
            SA or CSAIN; see :mod:`.models`), weights frozen.
        moving, fixed: ``[N, *spatial, 1]`` float images.
        fixed_seg, moving_seg: ``[N, *spatial]`` int labels 0..C (needed for 'dice'; for 'epe'
            ``fixed_seg`` gives the default mask ``fixed_seg > 0``).
        h0: start ``[N, P]`` or ``[P]`` in [0, 1]; ``None`` = 0.5 everywhere.
        steps: maximum forward + backward passes per pair (the objective is evaluated at each
            iterate before its update; the last update is not evaluated, so it is not kept).
        lr: Adam step size on ``z``.
        patience: stop a pair after this many steps without an improvement > ``min_delta``
            (``None`` or 0: never stop early).
        objective: ``'dice'`` or ``'epe'``.
        disp_true: ``[N, *spatial, D]`` true displacement in voxels ('epe' only).
        mask: ``[N, *spatial]`` voxels where the objective is evaluated (default: all voxels for
            'dice', ``fixed_seg > 0`` for 'epe').
        spacing: mm per axis for 'epe' (default 1).
        num_classes: C (default: the largest label in the segmentations).
        pair_ids: names used in error messages.
        net_seg: ``[N, *spatial]`` segmentation a CSAIN model builds its map from (default ``fixed_seg``).

    Returns:
        :class:`GradientResult`. Raises ``FloatingPointError`` if an objective or gradient is
        not finite (nothing is returned then).
    """
    t_start = time.perf_counter()
    _check_options(objective, steps, lr)
    moving = np.asarray(moving, np.float32)
    fixed = np.asarray(fixed, np.float32)
    n = moving.shape[0]
    ids = list(pair_ids) if pair_ids is not None else [f"#{k}" for k in range(n)]
    z = logit_start(h0, n, int(model.inputs[2].shape[-1])).astype(np.float32)
    args_fixed = _prepare(model, moving, fixed, fixed_seg, moving_seg, objective, disp_true, mask, spacing,
                          num_classes, ids, net_seg)
    step = _make_step(model, objective)
    m = np.zeros_like(z)
    v = np.zeros_like(z)
    track = _PairTracker(z, patience, min_delta)
    passes = 0
    lr_t = tf.constant(lr, tf.float32)
    for k in range(steps):
        try:
            obj, finite, z_new, m, v = step(tf.constant(z), tf.constant(m), tf.constant(v),
                                            tf.constant(float(k + 1)), lr_t, tf.constant(track.active), *args_fixed)
        except tf.errors.InvalidArgumentError as e:  # e.g. NaN displacement -> invalid gather index
            raise FloatingPointError(f"pairs {ids}: the network failed at step {k} (non-finite displacement?); "
                                     f"try a smaller --lr. TensorFlow: {e.message.splitlines()[0]}") from e
        passes += 1
        track.update(k, obj.numpy().astype(np.float64), finite.numpy(), z, ids, objective)
        if not track.active.any():
            break
        z = z_new.numpy()
        m = m.numpy()
        v = v.numpy()
    h = 1.0 / (1.0 + np.exp(-track.best_z.astype(np.float64)))
    return GradientResult(h=h, best=track.best, start=np.array([t[0] for t in track.traces]),
                          traces=[np.asarray(t) for t in track.traces], steps=track.used, batch_passes=passes,
                          seconds=time.perf_counter() - t_start, objective=objective)


def _make_grad(model, objective: str) -> Callable:
    """Compiled objective and gradient, cached per model and objective:
    ``grad(z [B, P], moving, fixed, seg, a, b, present, mask, spacing) -> (objective [B], d sum(objective) / dz [B, P])``
    (inputs as :func:`_make_step`)."""
    cache = _STEP_CACHE.setdefault(model, {})
    key = ("grad", objective)
    if key in cache:
        return cache[key]

    @tf.function(autograph=False)
    def grad(z, moving, fixed, seg, a, b, present, mask, spacing):
        with tf.GradientTape() as tape:
            tape.watch(z)
            _, disp, _ = call_model(model, moving, fixed, tf.sigmoid(z), seg, training=False)
            if objective == "dice":
                obj = dice_objective(a, b, disp, present, mask)
            else:
                obj = epe_objective(disp, a, mask, spacing)
            total = tf.reduce_sum(obj)
        return obj, tape.gradient(total, z)

    cache[key] = grad
    return grad


def identify_population(model, pairs, steps: int = 50, lr: float = 0.05, patience: Optional[int] = 10,
                        objective: str = "dice", batch_size: int = 16, h0=None, net_segs=None,
                        num_classes: Optional[int] = None, min_delta: float = MIN_DELTA,
                        beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> GradientResult:
    """One setting for a population of pairs (the CSAIN paper's protocol): Adam on a shared ``z [P]``
    minimizing the *mean* objective over ``pairs`` (typically the validation split), weights frozen.

    Each step evaluates every pair (in chunks of ``batch_size``) at the same ``h = sigmoid(z)``,
    averages objectives and gradients over the pairs, and takes one Adam step; the iterate with
    the lowest mean objective is kept, and the run stops after ``patience`` steps without an
    improvement > ``min_delta``. ``net_segs [N, *spatial]`` is what a CSAIN model builds its map
    from (default each pair's fixed segmentation). Returns a :class:`GradientResult` with one
    row: ``h [1, P]``, ``best``/``start [1]`` (mean objectives), ``traces`` one array.
    """
    t_start = time.perf_counter()
    _check_options(objective, steps, lr)
    if not pairs:
        raise ValueError("population identification needs at least one pair")
    P = int(model.inputs[2].shape[-1])
    chunks = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        truth = np.stack([p.extras["disp_true"] for p in chunk]) if objective == "epe" else None
        chunks.append((len(chunk), _prepare(
            model, np.stack([p.moving for p in chunk]).astype(np.float32),
            np.stack([p.fixed for p in chunk]).astype(np.float32), np.stack([p.fixed_seg for p in chunk]),
            np.stack([p.moving_seg for p in chunk]), objective, truth, None, chunk[0].spacing, num_classes,
            [p.pair_id for p in chunk], None if net_segs is None else net_segs[i:i + batch_size])))
    grad_fn = _make_grad(model, objective)
    z = logit_start(h0, 1, P)[0]
    m = np.zeros(P)
    v = np.zeros(P)
    best, best_z, since, trace, passes = np.inf, z.copy(), 0, [], 0
    for k in range(steps):
        total, g = 0.0, np.zeros(P)
        for nb, tensors in chunks:
            obj, gb = grad_fn(tf.constant(np.broadcast_to(z, (nb, P)).astype(np.float32)), *tensors)
            total += float(np.sum(obj.numpy(), dtype=np.float64))
            g += gb.numpy().astype(np.float64).sum(0)
            passes += 1
        mean_obj, g = total / len(pairs), g / len(pairs)
        if not (np.isfinite(mean_obj) and np.all(np.isfinite(g))):
            raise FloatingPointError(f"population identification: the {objective} objective or its gradient became "
                                     f"non-finite at step {k} (h = {np.round(1 / (1 + np.exp(-z)), 4).tolist()}); "
                                     "try a smaller --lr")
        trace.append(mean_obj)
        since = 0 if (mean_obj < best - min_delta or k == 0) else since + 1
        if mean_obj < best:
            best, best_z = mean_obj, z.copy()
        if patience and since >= patience:
            break
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        z = z - lr * (m / (1 - beta1 ** (k + 1))) / (np.sqrt(v / (1 - beta2 ** (k + 1))) + eps)
    h = 1.0 / (1.0 + np.exp(-best_z[None].astype(np.float64)))
    return GradientResult(h=h, best=np.array([best]), start=np.array([trace[0]]), traces=[np.asarray(trace)],
                          steps=np.array([len(trace)]), batch_passes=passes,
                          seconds=time.perf_counter() - t_start, objective=objective)


def identify_in_batches(model, pairs, batch_size: int, objective: str, h0: Optional[np.ndarray], **kw) -> GradientResult:
    """:func:`identify_by_gradient` over ``pairs`` (``RegistrationPair`` list) in chunks.

    ``h0 [N, P]`` or ``None``; returns one :class:`GradientResult` for all pairs in order.
    """
    parts = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        truth = None
        if objective == "epe":
            truth = np.stack([p.extras["disp_true"] for p in chunk])
        parts.append(identify_by_gradient(
            model, np.stack([p.moving for p in chunk]), np.stack([p.fixed for p in chunk]),
            np.stack([p.fixed_seg for p in chunk]), np.stack([p.moving_seg for p in chunk]),
            h0=None if h0 is None else h0[i:i + batch_size], objective=objective, disp_true=truth,
            spacing=chunk[0].spacing, pair_ids=[p.pair_id for p in chunk], **kw))
    return GradientResult(h=np.concatenate([r.h for r in parts]), best=np.concatenate([r.best for r in parts]),
                          start=np.concatenate([r.start for r in parts]),
                          traces=[t for r in parts for t in r.traces], steps=np.concatenate([r.steps for r in parts]),
                          batch_passes=sum(r.batch_passes for r in parts), seconds=sum(r.seconds for r in parts),
                          objective=objective)


# ----------------------------------------------------------------------------------------------
# parameter_identification.py --method gradient
# ----------------------------------------------------------------------------------------------
def _check_pair(pair, objective: str) -> None:
    """Fail clearly on a pair the objective cannot use."""
    for name in ("fixed_seg", "moving_seg"):
        seg = getattr(pair, name, None)
        if seg is None or not np.any(np.asarray(seg) > 0):
            raise ValueError(f"pair {pair.pair_id}: {name} has no tissue labels; gradient identification "
                             "needs the labels of both images (Dice objective, body mask, final Dice)")
    if objective == "epe" and (pair.extras or {}).get("disp_true") is None:
        raise ValueError(f"pair {pair.pair_id}: the dataset provides no true displacement "
                         "(pair.extras['disp_true']); --objective epe works on synthetic data only")


def _start_points(init: str, init_dir: Optional[str], ids: Sequence[str], sa_names: Sequence[str],
                  g_names: Sequence[str]) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], str]:
    """Start points ``(h0_sa [N, P_sa], h0_g [N, P_g], description)`` (``None`` = 0.5)."""
    if init == "center":
        return None, None, "center (0.5)"
    path = os.path.join(init_dir, art.IDENTIFIED_PARAMETERS) if init_dir else None
    if path is None or not os.path.isfile(path):
        print(f"[identify gradient] --init grid: no grid identification at {path}; starting at 0.5", flush=True)
        return None, None, "center (0.5; no grid identification found)"
    df = art.read_table(path, fix="rerun the grid identification").set_index(art.PAIR_ID)
    cols = list(sa_names) + list(g_names)
    missing_cols = [c for c in cols if c not in df]
    missing_ids = [p for p in ids if p not in df.index]
    if missing_cols or missing_ids:
        raise ValueError(f"{path}: cannot start from it: columns {missing_cols} / pairs {missing_ids[:5]} missing")
    rows = df.loc[list(ids)]
    return (rows[list(sa_names)].to_numpy(np.float64), rows[list(g_names)].to_numpy(np.float64),
            f"grid proxy ({os.path.abspath(path)})")


def _hard_dice(model, pairs, hyp: np.ndarray, num_classes: int, net_seg=None) -> np.ndarray:
    """Hard class Dice ``[N, C]`` after registering each pair with its ``hyp [N, P]`` (a CSAIN
    model builds its map from ``net_seg [N, *spatial]``, default the fixed segmentations)."""
    seg = np.stack([p.fixed_seg for p in pairs]) if net_seg is None else net_seg
    _, disp = Registrar(model)(np.stack([p.moving for p in pairs]), np.stack([p.fixed for p in pairs]), hyp, seg)
    return np.stack([eval_metrics.dice_per_class(p.fixed_seg, eval_metrics.warp_labels(p.moving_seg, disp[k]),
                                                 num_classes) for k, p in enumerate(pairs)])


def stiffness_spearman(mu: np.ndarray, true_mu: np.ndarray) -> float:
    """Spearman rank correlation between identified and true per-class values (NaN if constant)."""
    if np.ptp(mu) == 0 or np.ptp(true_mu) == 0:
        return float("nan")
    return float(spearmanr(mu, true_mu).statistic)


def stiffness_order_summary(pairs, h_sa: np.ndarray, class_names: Sequence[str], elastic: bool) -> Dict:
    """Per pair: Spearman between identified and true per-tissue Lamé values (synthetic data).

    Uses ``pair.extras['lame'] = {class: (lambda, mu)}``; tissue classes 1..C (background
    excluded; its row ``'*_with_background'`` includes it). Identified values are ``mu_<class>``
    (elastic) or the diffusion weight ``w_<class>`` compared with the true ``mu``.
    """
    C = len(class_names)
    k = C + 1
    out: Dict[str, Dict[str, float]] = {}
    for p, h in zip(pairs, h_sa):
        lame = {int(c): v for c, v in (p.extras or {}).get("lame", {}).items()}
        if not all(c in lame for c in range(k)):
            return {}
        true_lam = np.array([lame[c][0] for c in range(k)], float)
        true_mu = np.array([lame[c][1] for c in range(k)], float)
        ident_mu = h[k:2 * k] if elastic else h[:k]
        row = {"mu": stiffness_spearman(ident_mu[1:], true_mu[1:]),
               "mu_with_background": stiffness_spearman(ident_mu, true_mu)}
        if elastic:
            row["lambda"] = stiffness_spearman(h[1:k], true_lam[1:])
        out[p.pair_id] = row
    return out


def _summarize(values: Sequence[float]) -> Dict[str, float]:
    v = np.asarray([x for x in values if np.isfinite(x)], float)
    if v.size == 0:
        return {"n": 0}
    return {"n": int(v.size), "mean": round(float(v.mean()), 3), "median": round(float(np.median(v)), 3),
            "min": round(float(v.min()), 3), "fraction_perfect": round(float(np.mean(v > 0.999)), 3)}


def _result_rows(ids: Sequence[str], regularizer: str, sa_names, g_cols, class_names, h_sa, dice_sa, h_g, dice_g,
                 res_sa: GradientResult, res_g: GradientResult, fallback: Sequence[str]) -> List[Dict]:
    """Rows of identified_parameters.csv: row ``k`` uses row ``k`` of every array (or row 0 when
    the array has one row: the population protocol's single setting)."""
    def at(x, k):
        return x[k if len(x) > 1 else 0]

    rows = []
    for k, pid in enumerate(ids):
        row: Dict = {art.PAIR_ID: pid, art.REGULARIZER: regularizer}
        row.update({n: float(v) for n, v in zip(sa_names, at(h_sa, k))})
        row.update({f"dice_{n}": float(at(dice_sa, k)[c]) for c, n in enumerate(class_names)})
        row["mean_dice"] = eval_metrics.nanmean(at(dice_sa, k))
        row.update({c: float(v) for c, v in zip(g_cols, at(h_g, k))})
        row[art.G_MEAN_DICE] = eval_metrics.nanmean(at(dice_g, k))
        row["fallback"] = fallback[k]
        row.update({"objective": float(at(res_sa.best, k)), "start_objective": float(at(res_sa.start, k)),
                    "g_objective": float(at(res_g.best, k)), "g_start_objective": float(at(res_g.start, k)),
                    "steps": int(at(res_sa.steps, k)), "g_steps": int(at(res_g.steps, k))})
        rows.append(row)
    return rows


def _oracle(args, g_model, sa_model, dataset, ids, names, C: int, bs: int, kw: Dict) -> Tuple:
    """Per test pair, on its own labels: ``(rows, trace_rows, meta, pairs, res_sa, res_g)``."""
    pairs = [dataset.load_pair(pid) for pid in ids]
    for p in pairs:
        _check_pair(p, args.objective)
    sa_names, g_cols, class_names, regularizer = names
    init_dir = args.init_from or os.path.join(args.run, art.IDENTIFICATION_DIRS["oracle"])
    h0_sa, h0_g, init_desc = _start_points(args.init, init_dir if args.init == "grid" else None, ids,
                                           sa_names, g_cols)
    print(f"[identify gradient {regularizer}] oracle: {len(ids)} pairs, objective {args.objective}, "
          f"<= {args.steps} steps, lr {args.lr}, start {init_desc}; SA {args.sa_run}, global {args.run}", flush=True)
    res_sa = identify_in_batches(sa_model, pairs, bs, args.objective, h0_sa, **kw)
    print(f"[identify gradient {regularizer}] SA: objective {np.mean(res_sa.start):.4f} -> {np.mean(res_sa.best):.4f} "
          f"(mean over pairs), {res_sa.seconds:.1f} s", flush=True)
    res_g = identify_in_batches(g_model, pairs, bs, args.objective, h0_g, **kw)
    print(f"[identify gradient {regularizer}] -g: objective {np.mean(res_g.start):.4f} -> {np.mean(res_g.best):.4f}, "
          f"{res_g.seconds:.1f} s", flush=True)
    fallback = [";".join(n for c, n in enumerate(class_names, 1)
                         if not (np.any(p.fixed_seg == c) or np.any(p.moving_seg == c))) for p in pairs]
    rows = _result_rows(ids, regularizer, sa_names, g_cols, class_names, res_sa.h, _hard_dice(sa_model, pairs, res_sa.h, C),
                        res_g.h, _hard_dice(g_model, pairs, res_g.h, C), res_sa, res_g, fallback)
    traces = [{art.PAIR_ID: p.pair_id, "model": name, "step": s, "objective": float(o)}
              for k, p in enumerate(pairs) for name, res in (("sa", res_sa), ("g", res_g))
              for s, o in enumerate(res.traces[k])]
    meta = {"protocol": "oracle", "identified_on": args.split, "init": args.init, "init_description": init_desc,
            "parametrization": "h = sigmoid(z), Adam on z, best iterate per pair kept"}
    return rows, traces, meta, pairs, res_sa, res_g


def _population(args, g_model, sa_model, dataset, ids, names, C: int, bs: int, kw: Dict) -> Tuple:
    """One setting per model from the --population-split pairs, applied to every pair of ``ids``:
    ``(rows, trace_rows, meta, val_pairs, res_sa, res_g)``. A CSAIN model sees, on the validation pairs
    as on the test pairs (inference ``--population-maps warped-moving``), maps built from the
    moving labels warped by the -g network at its population setting."""
    if args.objective != "dice" or args.init != "center":
        raise ValueError("--method gradient --protocol population supports --objective dice and --init center")
    sa_names, g_cols, class_names, regularizer = names
    val_ids = dataset.split_ids(args.population_split)
    if not val_ids:
        raise ValueError(f"the {args.population_split} split of {dataset.name} is empty: nothing to identify on")
    val = [dataset.load_pair(pid) for pid in val_ids]
    for p in val:
        _check_pair(p, "dice")
    print(f"[identify gradient {regularizer}] population: one setting from {len(val)} {args.population_split} "
          f"pairs (mean soft Dice, <= {args.steps} steps, lr {args.lr}) for {len(ids)} {args.split} pairs; "
          f"SA {args.sa_run}, global {args.run}", flush=True)
    pkw = dict(steps=kw["steps"], lr=kw["lr"], patience=kw["patience"], num_classes=C, batch_size=bs)
    res_g = identify_population(g_model, val, **pkw)
    print(f"[identify gradient {regularizer}] -g: mean objective {res_g.start[0]:.4f} -> {res_g.best[0]:.4f}, "
          f"{res_g.steps[0]} steps, {res_g.seconds:.1f} s", flush=True)
    net_segs, maps = None, "fixed seg of the validation pairs"
    if needs_segmentation(sa_model):
        _, disp_g = Registrar(g_model)(np.stack([p.moving for p in val]), np.stack([p.fixed for p in val]),
                                       np.repeat(res_g.h.astype(np.float32), len(val), 0))
        net_segs, maps = warped_moving_segmentation(val, disp_g), "moving seg warped by the -g network"
    res_sa = identify_population(sa_model, val, net_segs=net_segs, **pkw)
    print(f"[identify gradient {regularizer}] SA: mean objective {res_sa.start[0]:.4f} -> {res_sa.best[0]:.4f}, "
          f"{res_sa.steps[0]} steps, {res_sa.seconds:.1f} s", flush=True)
    n = len(val)
    dice_sa = _hard_dice(sa_model, val, np.repeat(res_sa.h.astype(np.float32), n, 0), C, net_segs)
    dice_g = _hard_dice(g_model, val, np.repeat(res_g.h.astype(np.float32), n, 0), C)
    val_sa = np.array([[eval_metrics.nanmean(dice_sa[:, c]) for c in range(C)]])
    val_g = np.array([[eval_metrics.nanmean(dice_g[:, c]) for c in range(C)]])
    rows = _result_rows(ids, regularizer, sa_names, g_cols, class_names, res_sa.h, val_sa, res_g.h, val_g,
                        res_sa, res_g, [""] * len(ids))
    traces = [{art.PAIR_ID: "population", "model": name, "step": s, "objective": float(o)}
              for name, res in (("sa", res_sa), ("g", res_g)) for s, o in enumerate(res.traces[0])]
    meta = {"protocol": "population", "identified_on": args.population_split, "validation_pairs": list(val_ids),
            "init": "center", "init_description": "center (0.5)", "csain_maps": maps if net_segs is not None else "",
            "dice_columns": "means over the validation pairs at the chosen setting",
            "parametrization": "h = sigmoid(z), one z for all pairs, Adam on the mean objective, best iterate kept"}
    return rows, traces, meta, val, res_sa, res_g


def _load_sa_for(args, g_config: Dict, dataset) -> Tuple:
    """The SA run ``--sa-run`` of the global run's regularizer, trained on the same data and classes and
    compatible with ``dataset``: ``(model, config)``."""
    if args.sa_run is None:
        raise ValueError("--method gradient needs --sa-run (the spatially adaptive run folder)")
    sa_model, sa_config = run_folder.load_run(args.sa_run, expect_regularizer=g_config["model"]["regularizer"],
                                         expect_sa=True)
    if sa_config["data"] != g_config["data"] or list(sa_config["class_names"]) != list(g_config["class_names"]):
        raise ValueError(f"{args.sa_run} and {args.run} were trained on different datasets/classes")
    run_folder.check_compatible(args.sa_run, sa_config, dataset)
    return sa_model, sa_config


def _add_stiffness_order(meta: Dict, pairs, h_sa: np.ndarray, class_names: Sequence[str], regularizer: str) -> None:
    """``--objective epe`` on synthetic pairs with known Lamé values: put the per-pair Spearman
    correlations and their summary (:func:`stiffness_order_summary`) into ``meta`` and print the summary."""
    per_pair = stiffness_order_summary(pairs, h_sa, class_names, regularizer == "elastic")
    if not per_pair:
        return
    summary = {key: _summarize([r[key] for r in per_pair.values()]) for key in next(iter(per_pair.values()))}
    meta["stiffness_order_spearman"] = {"summary": summary, "per_pair": per_pair}
    print(f"[identify gradient {regularizer}] stiffness order, Spearman(identified, true) per pair over "
          f"tissues {class_names}:", flush=True)
    for key, s in summary.items():
        print(f"    {key:20s} {json.dumps(s)}", flush=True)


def _write_identification(dest: str, choice, trace_rows: List[Dict], meta: Dict, figure: bool,
                          class_names: Sequence[str], regularizer: str) -> None:
    """identified_parameters.csv, the objective trace, identification.json and (``figure``) Fig. 2 into ``dest``."""
    import pandas as pd

    atomic_write(os.path.join(dest, art.IDENTIFIED_PARAMETERS), choice)
    atomic_write(os.path.join(dest, art.OBJECTIVE_TRACE), pd.DataFrame(trace_rows))
    atomic_write(os.path.join(dest, art.IDENTIFICATION_META), json.dumps(meta, indent=2))
    if figure:
        from . import figures

        figures.plot_parameter_scatter(choice, class_names, regularizer, os.path.join(dest, art.FIG2),
                                       jitter=0.0)  # continuous values: no grid clusters to spread


def run_cli(args, argv, g_model, g_config: Dict, dataset, ids: Sequence[str], dest: Optional[str] = None,
            profile: str = "paper") -> str:
    """``parameter_identification.py --method gradient``: identify, then write all files at once.

    ``args`` are the parsed options (``sa_run``, ``protocol``, ``population_split``, ``init``,
    ``init_from``, ``objective``, ``steps``, ``lr``, ``patience``, ``batch_size``, ``out``,
    ``run``, ``no_figure``); ``g_model``/``g_config`` the global run, ``dataset``/``ids`` the
    pairs to identify (oracle) or to apply the population setting to. Files are written into
    ``dest`` (the caller's temporary folder that replaces the output folder at the end; default:
    the output folder itself). The runs' recorded data/weights hashes are checked first
    (:func:`.provenance.check_runs`, ``--force``). ``profile`` is the runs' ``--profile``, recorded
    in identification.json 'fidelity' for the later stages' check (the gradient method itself is the
    project's under either profile: docs/fidelity.md). Returns the output folder.
    """
    import pandas as pd

    sa_model, sa_config = _load_sa_for(args, g_config, dataset)
    regularizer = g_config["model"]["regularizer"]
    class_names = list(g_config["class_names"])
    C = len(class_names)
    names = (art.sa_columns(regularizer, class_names), art.global_columns(regularizer), class_names, regularizer)
    protocol = getattr(args, "protocol", "oracle")
    default_dir = art.IDENTIFICATION_DIRS["gradient"] + ("" if args.objective == "dice" else f"_{args.objective}")
    out = args.out or os.path.join(args.run, default_dir + ("_population" if protocol == "population" else ""))
    dest = dest or out
    splits = [args.split] + ([args.population_split] if protocol == "population" else [])
    provenance = check_runs([(args.run, g_config), (args.sa_run, sa_config)], dataset, splits,
                            bool(getattr(args, "force", False)), getattr(args, "data_dir", None),
                            log=lambda line: print(line, flush=True))
    provenance.update(global_weights_sha256=weights_sha256(args.run), sa_weights_sha256=weights_sha256(args.sa_run))
    n_opt = len(dataset.split_ids(args.population_split)) if protocol == "population" else len(ids)
    bs = args.batch_size or auto_batch_size(dataset.image_shape, n_opt, GRADIENT_VOXEL_BUDGET)
    kw = dict(steps=args.steps, lr=args.lr, patience=args.patience, num_classes=C)
    t0 = time.time()
    rows, trace_rows, meta_p, opt_pairs, res_sa, res_g = (_population if protocol == "population" else _oracle)(
        args, g_model, sa_model, dataset, ids, names, C, bs, kw)
    seconds = time.time() - t0
    choice = pd.DataFrame(rows)
    meta = {"method": "gradient", "objective": args.objective, **meta_p, "global_run": os.path.abspath(args.run),
            "sa_run": os.path.abspath(args.sa_run), "regularizer": regularizer, "class_names": class_names,
            "data": g_config["data"], "split": args.split, "pairs": list(ids), "steps": args.steps, "lr": args.lr,
            "patience": args.patience, "min_delta": MIN_DELTA, "pairs_per_batch": int(bs),
            "forward_backward_passes": {"sa": int(res_sa.steps.sum()), "g": int(res_g.steps.sum())},
            "seconds": round(seconds, 2), "seconds_per_pair": round(seconds / max(len(opt_pairs), 1), 3),
            "seconds_sa": round(res_sa.seconds, 2), "seconds_g": round(res_g.seconds, 2),
            "provenance": provenance, "force": bool(getattr(args, "force", False)),
            "command": ["parameter_identification.py"] + list(argv if argv is not None else sys.argv[1:])}
    if profile != "paper":  # as the grid method records it (none = paper); its rules are the grid's only
        meta["fidelity"] = {"profile": profile, "method": "gradient (the project's under every profile)"}
    if args.objective == "epe":
        _add_stiffness_order(meta, opt_pairs, res_sa.h, class_names, regularizer)
    _write_identification(dest, choice, trace_rows, meta, not args.no_figure, class_names, regularizer)
    print(f"[identify gradient {regularizer}] {protocol}: SA mean Dice {choice['mean_dice'].mean():.3f}, -g "
          f"{choice[art.G_MEAN_DICE].mean():.3f}"
          f"{' (validation means)' if protocol == 'population' else ''}; done in {seconds:.1f} s -> "
          f"{out}/{art.IDENTIFIED_PARAMETERS}", flush=True)
    return out
