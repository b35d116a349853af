"""Tissue- and subject-specific elastic regularization with HyperMorph (TensorFlow).

Importing the package applies the compatibility shims of the top-level :mod:`tf_compat` (it does
not import TensorFlow); submodules rely on that and do not re-apply them. Import floors and
array conventions: CONVENTIONS.md. Submodules:

- :mod:`.params`     hyperparameter layout (ParamSpec) and SA parameter maps; no voxelmorph
- :mod:`.models`     HyperVxmDense builders (global and spatially adaptive)
- :mod:`.losses`     training loss, paper eq. (1) (NCC + elastic / diffusion)
- :mod:`.configs`    settings as types: LossConfig (``config.json["loss"]``), RefineConfig (refinement options)
- :mod:`.tf_ops`     TensorFlow field operations: linear warp, Jacobian determinant, soft Dice, box smoothing
- :mod:`.trainer`    the shared trainer behind the four ``train_hypermorph_*`` scripts
- :mod:`.unrolled`   per-sample voxelmorph/neurite layers unrolled for static batches (speed)
- :mod:`.artifacts`  names of run-folder and stage files; typed readers (RunInfo, Identification)
- :mod:`.runio`      run folders: config JSON, weights, CLI helpers
- :mod:`.folders`    folder locks, staged (all-or-nothing) stage outputs, --overwrite set-aside, safe file names
- :mod:`.provenance` content hashes of data and weights recorded by every stage and compared by the next
- :mod:`.pair_registration`  one pair of NIfTI images with a run folder (``register.py``)
- :mod:`.pair_geometry`      its world geometry: model grid, resampling, ITK displacement fields
- :mod:`.jobs`       child processes: parallel stage commands (``run_pipeline.py --jobs``), one child with a log
- :mod:`.timing`     wall time per pipeline stage (``stage_times.csv``)
"""
import tf_compat  # noqa: F401  (applies the shims on import)

__version__ = "0.1.0"
