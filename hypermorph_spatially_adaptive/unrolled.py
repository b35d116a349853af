"""Per-sample loops of voxelmorph/neurite layers, unrolled when the batch size is static.

Background. In voxelmorph 0.2 / neurite 0.2 every layer that does something different per
sample runs ``tf.map_fn`` over the batch: ``HyperConv*FromDense`` (one kernel per sample,
predicted by the hypernetwork), ``SpatialTransformer``, ``VecInt`` (scaling and squaring) and
``RescaleTransform``. Inside a ``tf.function`` each ``map_fn`` becomes a ``while`` loop, and
its gradient another loop with tensor-list accumulators. On CPU this makes graph tracing cost
tens of seconds per model and adds per-iteration overhead to every step.

:func:`unroll_per_sample_layers` swaps, *per model instance*, the class of those layers for a
subclass whose ``call`` applies the very same per-sample function (the library's own
``_convolve_batch``, ``_single_transform``, ``_single_int`` and ``rescale_dense_transform``) in a
Python loop over the batch whenever the batch size is known when the graph is traced and at most
:data:`MAX_UNROLL` (training steps at batch 1 or 2; eager calls). With an unknown batch size
(e.g. while Keras builds the functional model, or the :class:`~.forward.Registrar`'s
batch-agnostic forward pass) or a larger one the original ``map_fn`` runs. The arithmetic is
the same op for op, so outputs are identical; weights, names and saved files do not change, and
the voxelmorph/neurite classes themselves are left untouched for other code in the process.
"""
from __future__ import annotations

import functools
from typing import Callable, List

import tensorflow as tf

from tf_compat import import_voxelmorph

#: largest static batch that is unrolled; bigger batches keep ``tf.map_fn``. Measured on 2 CPU
#: cores with ``benchmarks/bench_train.py`` (2D 128^2, SA elastic): batch 1 unrolled traces and
#: compiles in 7.4 s instead of 17.2 s at the same s/step; batch 8 unrolled is slower (1.22x
#: s/step, 40 s vs 21 s first step), as the unrolled graph grows with the batch.
MAX_UNROLL = 2


def _static_batch(x: tf.Tensor):
    b = x.shape[0]
    return b if (b is not None and b <= MAX_UNROLL) else None


def per_sample(fn: Callable, elems, batch: int) -> tf.Tensor:
    """``tf.stack([fn(elems[i]) for i in range(batch)])``; ``elems`` is a tensor or a list of them."""
    if isinstance(elems, (list, tuple)):
        outs = [fn([e[i] for e in elems]) for i in range(batch)]
    else:
        outs = [fn(elems[i]) for i in range(batch)]
    return tf.stack(outs, axis=0)


@functools.lru_cache(maxsize=None)
def _layer_classes():
    _, vxm, ne = import_voxelmorph()

    class UnrolledHyperConv:
        """``HyperConv*FromDense`` with the per-sample convolution unrolled (static batch)."""

        def call(self, inputs):
            x, hyp = inputs[0], inputs[1]
            b = _static_batch(x)
            if b is None:
                return super().call(inputs)
            kernel = self._call_dense_pseudo_layer(hyp, self.hyperkernel)
            parts: List[tf.Tensor] = [x, kernel]
            if self.use_bias:
                parts.append(self._call_dense_pseudo_layer(hyp, self.hyperbias))
            out = per_sample(self._convolve_batch, parts, b)
            return self.activation(out) if self.activation is not None else out

    class UnrolledSpatialTransformer:
        """``SpatialTransformer`` (dense fields, 'ij' indexing) with the batch loop unrolled."""

        def call(self, inputs):
            b = _static_batch(inputs[0])
            if b is None or self.is_affine or self.indexing != "ij" or self.single_transform:
                return super().call(inputs)
            vol = tf.reshape(inputs[0], (-1, *self.imshape))
            trf = tf.reshape(inputs[1], (-1, *self.trfshape))
            return per_sample(self._single_transform, [vol, trf], b)

    class UnrolledVecInt:
        """``VecInt`` (scaling and squaring, 'ij' indexing) with the batch loop unrolled."""

        def call(self, inputs):
            x = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
            b = _static_batch(x)
            if b is None or self.indexing != "ij" or isinstance(inputs, (list, tuple)) and len(inputs) > 1:
                return super().call(inputs)
            x = tf.reshape(x, [-1, *self.inshape[1:]])
            return per_sample(lambda v: self._single_int([v]), x, b)

    class UnrolledRescaleTransform:
        """``RescaleTransform`` of a dense field with the batch loop unrolled."""

        def call(self, transform):
            b = _static_batch(transform)
            if b is None or self.is_affine:
                return super().call(transform)
            fn = lambda t: vxm.utils.rescale_dense_transform(t, self.zoom_factor, interp_method=self.interp_method)
            return per_sample(fn, transform, b)

    return (
        (ne.layers.HyperConvFromDense, UnrolledHyperConv),
        (vxm.layers.SpatialTransformer, UnrolledSpatialTransformer),
        (vxm.layers.VecInt, UnrolledVecInt),
        (vxm.layers.RescaleTransform, UnrolledRescaleTransform),
    )


@functools.lru_cache(maxsize=None)
def _unrolled_class(cls, mixin):
    """One subclass per (library class, mixin), so swapped layers of equal type share a class."""
    return type(f"{cls.__name__}Unrolled", (mixin, cls), {})


def unroll_per_sample_layers(model: tf.keras.Model) -> int:
    """Swap the per-sample layers of ``model`` (in place) for their unrolled versions.

    Returns the number of layers changed. Safe to call twice (already swapped layers are skipped).
    """
    pairs = _layer_classes()
    changed = 0
    for layer in model.submodules:
        if not isinstance(layer, tf.keras.layers.Layer):
            continue
        for base, mixin in pairs:
            if isinstance(layer, base) and not isinstance(layer, mixin):
                layer.__class__ = _unrolled_class(type(layer), mixin)
                changed += 1
                break
    return changed
