"""Tissue- and subject-specific elastic regularization with HyperMorph (TensorFlow).

Importing the package applies the compatibility shims of the top-level :mod:`tf_compat` (it does
not import TensorFlow); submodules rely on that and do not re-apply them. Import floors and
array conventions: CONVENTIONS.md. Submodules (every one, one line each):

- :mod:`.artifacts`               names of the files the stages hand over; typed readers (RunInfo, Identification)
- :mod:`.calibration`             the energy scale ``K`` calibrated to a dataset (``benchmarks/calibrate_energy.py``)
- :mod:`.cli`                     the scripts' command-line helpers: ``cli_main``, argparse value checks, ``--refine-*`` options
- :mod:`.configs`                 settings as types: LossConfig (``config.json["loss"]``), RefineConfig (refinement)
- :mod:`.csain`                   CSAIN conditioning: the U-Net modulated by the spatial parameter map
- :mod:`.figures`                 Fig. 2, Fig. 3, training curves, Dice box plots (no TensorFlow)
- :mod:`.folders`                 folder locks, staged (all-or-nothing) stage outputs, --overwrite set-aside, safe file names
- :mod:`.forward`                 batched compiled forward passes of a trained model (Registrar)
- :mod:`.gradient_identification` hyperparameters identified by gradient descent (Adam per pair or for a population)
- :mod:`.grid_identification`     grid identification with the global model (paper sec. 2.2)
- :mod:`.intervals`               confidence intervals, p-values and multiplicity control of paired comparisons
- :mod:`.jobs`                    child processes: parallel stage commands (``run_pipeline.py --jobs``), one child with a log
- :mod:`.losses`                  training loss, paper eq. (1) (NCC + elastic / diffusion)
- :mod:`.models`                  HyperVxmDense builders (global and spatially adaptive)
- :mod:`.pair_geometry`           world geometry of one pair: model grid, resampling, ITK displacement fields
- :mod:`.pair_registration`       one pair of NIfTI images with a run folder (``register.py``)
- :mod:`.params`                  hyperparameter layout (ParamSpec), SA parameter maps, HypMapping; no voxelmorph
- :mod:`.profiles`                fidelity profiles: the paper's text or the authors' code
- :mod:`.provenance`              content hashes of data and weights recorded by every stage and compared by the next
- :mod:`.refinement`              instance optimization of a displacement per pair on the training loss (Refiner)
- :mod:`.run_folder`              run folders: config JSON, weights, rebuilding a trained model (``load_run``)
- :mod:`.tables`                  per-pair metrics, the Table 1 layout, paired comparisons, stiffness-order Spearman
- :mod:`.tf_ops`                  TensorFlow field operations: linear warp, Jacobian determinant, soft Dice, box smoothing
- :mod:`.timing`                  wall time per pipeline stage (``stage_times.csv``)
- :mod:`.trainer`                 the shared trainer behind the four ``train_hypermorph_*`` scripts
- :mod:`.unrolled`                per-sample voxelmorph/neurite layers unrolled for static batches (speed)
"""
import tf_compat  # noqa: F401  (applies the shims on import)

__version__ = "0.1.0"
