"""Tissue- and subject-specific elastic regularization with HyperMorph (TensorFlow).

Importing the package installs the compatibility shims of :mod:`.compat` (it does not import
TensorFlow). Submodules:

- :mod:`.models`     HyperVxmDense builders (global and spatially adaptive) and parameter maps
- :mod:`.losses`     loss assembly of SPEC section 3 (NCC + elastic / diffusion)
- :mod:`.trainer`    the shared trainer behind the four ``train_hypermorph_*`` scripts
- :mod:`.unrolled`   per-sample voxelmorph/neurite layers unrolled for static batches (speed)
- :mod:`.runio`      run folders: config JSON, weights, atomic writes
"""
from . import compat as _compat

_compat.apply()

__version__ = "0.1.0"
