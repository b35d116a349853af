"""Compatibility shims that must run *before* voxelmorph / neurite are imported.

Two facts about the pinned stack make this module necessary:

1. neurite 0.2 (``neurite/tf/modelio.py``) calls ``inspect.getargspec``, which was
   removed in Python 3.11. We restore it as a thin alias of ``inspect.getfullargspec``
   returning the old 4-tuple ``(args, varargs, varkw, defaults)``.
2. TensorFlow >= 2.16 makes ``tf.keras`` point to Keras 3, but voxelmorph/neurite 0.2 are
   written for Keras 2. With the ``tf-keras`` package installed, setting
   ``TF_USE_LEGACY_KERAS=1`` *before TensorFlow is first imported* makes ``tf.keras`` be
   Keras 2 again. For TensorFlow <= 2.15 the variable is harmless.

Use :func:`import_voxelmorph` (or import ``hypermorph_spatially_adaptive.tfstack``) instead of
importing voxelmorph directly anywhere in this codebase.
"""
from __future__ import annotations

import collections
import inspect
import os
import sys

_ArgSpec = collections.namedtuple("ArgSpec", ["args", "varargs", "keywords", "defaults"])


def _getargspec(func):  # pragma: no cover - trivial
    spec = inspect.getfullargspec(func)
    return _ArgSpec(spec.args, spec.varargs, spec.varkw, spec.defaults)


def apply() -> None:
    """Install the shims. Idempotent. Must be called before TensorFlow is imported."""
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
        # keep TF's C++ start-up chatter (oneDNN notices, CPU feature lines) out of user output
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    elif os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        import tensorflow as tf  # noqa: F401  (already imported)

        if int(tf.__version__.split(".")[1]) >= 16 and tf.__version__.startswith("2."):
            raise RuntimeError(
                "TensorFlow was imported before hypermorph_spatially_adaptive.compat could set "
                "TF_USE_LEGACY_KERAS=1; voxelmorph 0.2 needs Keras 2. Import this package first "
                "or export TF_USE_LEGACY_KERAS=1."
            )
    if not hasattr(inspect, "getargspec"):
        inspect.getargspec = _getargspec  # type: ignore[attr-defined]


def import_voxelmorph():
    """Apply the shims, then import and return ``(tensorflow, voxelmorph, neurite)``."""
    apply()
    os.environ.setdefault("VXM_BACKEND", "tensorflow")
    os.environ.setdefault("NEURITE_BACKEND", "tensorflow")
    import tensorflow as tf
    import neurite as ne
    import voxelmorph as vxm

    return tf, vxm, ne
