"""Alias of the top-level :mod:`tf_compat` (the shims live there, one floor below the package).

Kept so ``from hypermorph_spatially_adaptive import compat; compat.apply()`` keeps working;
new code imports :mod:`tf_compat` directly.
"""
from tf_compat import NOISE, apply, filtered_stderr, import_voxelmorph  # noqa: F401
