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

The command line is ``parameter_identification.py --method gradient`` (both protocols): it loads
the runs, calls these functions and writes the identification folder.
"""
from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from tf_compat import import_voxelmorph

from .models import call_model, needs_segmentation
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
