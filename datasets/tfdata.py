"""The ``tf.data`` adapter :func:`make_tf_dataset`, the only TensorFlow code on the data side.
TensorFlow is imported inside the function, never when this module is imported; the model
package is never imported.
"""
from __future__ import annotations

import numpy as np

from .base import RegistrationDataset


def make_tf_dataset(dataset: RegistrationDataset, split: str, batch_size: int, seed: int,
                    shuffle: bool = True, repeat: bool = True):
    """``tf.data.Dataset`` of dict(moving float32 [B,*s,1], fixed float32 [B,*s,1],
    fixed_seg int32 [B,*s]) batches of ``split``. Pair order is shuffled with ``seed`` (every
    epoch reshuffled, deterministically); with ``repeat`` the stream is infinite and batches are
    always full (``drop_remainder``), else one pass with a possibly smaller last batch. Batches
    are gathered from the in-memory :meth:`RegistrationDataset.arrays` (no copy of the whole
    split into the TF graph), then ``prefetch(AUTOTUNE)``."""
    import tf_compat  # noqa: F401  (the shims must precede the first TensorFlow import; stdlib only)
    import tensorflow as tf

    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    arrays = dataset.arrays(split)
    moving, fixed, fixed_seg = arrays["moving"], arrays["fixed"], arrays["fixed_seg"]
    n = len(fixed)
    spatial = tuple(fixed.shape[1:-1])

    def gather(idx):
        idx = np.asarray(idx, dtype=np.int64)
        return moving[idx], fixed[idx], fixed_seg[idx]

    def lookup(idx):
        m, f, s = tf.numpy_function(gather, [idx], [tf.float32, tf.float32, tf.int32],
                                    stateful=False)
        b = int(batch_size) if repeat else None
        m.set_shape((b, *spatial, 1))
        f.set_shape((b, *spatial, 1))
        s.set_shape((b, *spatial))
        return {"moving": m, "fixed": f, "fixed_seg": s}

    ds = tf.data.Dataset.range(n)
    if shuffle:
        ds = ds.shuffle(n, seed=int(seed), reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(int(batch_size), drop_remainder=bool(repeat))
    ds = ds.map(lookup)
    return ds.prefetch(tf.data.AUTOTUNE)
