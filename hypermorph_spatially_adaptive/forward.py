"""Batched, compiled forward passes of a trained HyperMorph model (no Python loop per sample).

A :class:`Registrar` wraps a model in one ``tf.function`` with a fixed input signature (batch
axis left open), so grid searches and inference never retrace, and splits large requests into
chunks of ``batch_size`` samples.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np



def auto_batch_size(image_shape, n: int, voxel_budget: int = 2 ** 18) -> int:
    """Largest chunk (<= n) whose images hold about ``voxel_budget`` voxels in total.

    On CPU, voxelmorph's hyper-convolutions loop over the batch anyway, so big chunks do not
    pay: at 128^2 chunks of 16 were ~14 % faster than one call of 121 (benchmarks/).
    """
    vox = int(np.prod(image_shape))
    return int(max(1, min(n, voxel_budget // vox)))


class Registrar:
    """Compiled forward pass ``(moving, fixed, hyp[, fixed_seg]) -> (warped, disp)``.

    Shapes: ``moving``/``fixed`` ``[N, *spatial, 1]`` (or ``[*spatial, 1]`` broadcast to all N
    hyperparameter rows), ``hyp`` ``[N, P]``, ``fixed_seg`` ``[N, *spatial]`` or ``[*spatial]``
    int labels (required by CSAIN models, which build their conditioning map from it; ignored
    by HyperMorph models); returns numpy ``warped [N, *spatial, 1]`` and ``disp [N, *spatial, D]``
    (integrated displacement, voxels).
    """

    def __init__(self, model, batch_size: Optional[int] = None):
        import tensorflow as tf

        from .models import call_model, needs_segmentation

        self.model = model
        self.image_shape = tuple(int(s) for s in model.inputs[0].shape[1:-1])
        self.num_params = int(model.inputs[2].shape[-1])
        self.batch_size = batch_size
        self.needs_segmentation = needs_segmentation(model)
        nd = len(self.image_shape)
        img = tf.TensorSpec([None, *self.image_shape, 1], tf.float32)
        hyp = tf.TensorSpec([None, self.num_params], tf.float32)
        seg = tf.TensorSpec([None, *self.image_shape], tf.int32)

        @tf.function(input_signature=[img, img, hyp, seg], autograph=False)
        def _forward(moving, fixed, h, s):
            warped, disp, _ = call_model(model, moving, fixed, h, s, training=False)
            return warped, disp

        self._forward = _forward
        self._ndim = nd

    def __call__(self, moving: np.ndarray, fixed: np.ndarray, hyp: np.ndarray,
                 fixed_seg: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        warped, disp = [], []
        for _, w, d in self.chunks(moving, fixed, hyp, fixed_seg):
            warped.append(w)
            disp.append(d)
        return np.concatenate(warped), np.concatenate(disp)

    def chunks(self, moving: np.ndarray, fixed: np.ndarray, hyp: np.ndarray,
               fixed_seg: Optional[np.ndarray] = None) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
        """The forward pass chunk by chunk: yields ``(start, warped, disp)`` for hyperparameter rows
        ``start .. start + len(disp) - 1`` (inputs as in the class docstring).

        Only one chunk's outputs exist at a time, so a caller that reduces each chunk (a grid
        search computing Dice) needs memory for ``batch_size`` fields, not for all N: at
        192 x 128 x 192 the 121 displacements of an 11 x 11 grid alone are 6.8 GB of float32.
        """
        hyp = np.asarray(hyp, np.float32)
        if hyp.ndim != 2 or hyp.shape[1] != self.num_params:
            raise ValueError(f"hyp must be [N, {self.num_params}], got {hyp.shape}")
        if not np.all(np.isfinite(hyp)) or hyp.min() < 0 or hyp.max() > 1:
            raise ValueError("hyperparameters must be finite and in [0, 1]")
        n = hyp.shape[0]
        moving = self._expand(moving, n, "moving")
        fixed = self._expand(fixed, n, "fixed")
        seg = self._segmentation(fixed_seg, n)
        bs = self.batch_size or auto_batch_size(self.image_shape, n)
        for i in range(0, n, bs):
            sl = slice(i, i + bs)
            w, d = self._forward(moving[sl], fixed[sl], hyp[sl], seg[sl])
            yield i, w.numpy(), d.numpy()

    def _segmentation(self, seg: Optional[np.ndarray], n: int) -> np.ndarray:
        """``[N, *spatial]`` int32 (zeros, unused, for models that do not take it)."""
        if seg is None:
            if self.needs_segmentation:
                raise ValueError("this model (CSAIN) builds its conditioning map from the fixed segmentation: "
                                 "pass fixed_seg")
            return np.broadcast_to(np.zeros(self.image_shape, np.int32), (n, *self.image_shape))  # no n copies
        seg = np.asarray(seg)
        if seg.shape == self.image_shape:
            return np.broadcast_to(seg[None].astype(np.int32), (n, *seg.shape))
        if seg.shape == (n, *self.image_shape):
            return seg.astype(np.int32)
        raise ValueError(f"fixed_seg has shape {seg.shape}; the model expects [N, *{self.image_shape}] "
                         f"or [*{self.image_shape}]")

    def _expand(self, x: np.ndarray, n: int, name: str) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if x.shape == (*self.image_shape, 1):
            return np.broadcast_to(x[None], (n, *x.shape))
        if x.shape == (n, *self.image_shape, 1):
            return x
        raise ValueError(f"{name} has shape {x.shape}; the model expects [N, *{self.image_shape}, 1] "
                         f"or [*{self.image_shape}, 1]")


def warped_moving_segmentation(pairs, disp) -> np.ndarray:
    """Label-free segmentation in the fixed frame, as with an atlas: each pair's *moving*
    segmentation warped by its displacement ``disp [N, *spatial, D]`` (voxels, nearest neighbour,
    ``eval_metrics.warp_labels``). Reads no fixed segmentation. Returns ``[N, *spatial]`` int32.

    Used wherever the population protocol needs a segmentation of the fixed image (refinement
    maps of the -sas+io rows, the conditioning map of a CSAIN network)."""
    import eval_metrics

    return np.stack([eval_metrics.warp_labels(p.moving_seg, d) for p, d in zip(pairs, disp)]).astype(np.int32)
