"""Registration datasets: one interface for synthetic phantoms, NLST, ACDC, Learn2Reg LungCT and
user folders (paper text Sec. 3.1 "Implementation Details and Datasets"; how the three paper
datasets follow the paper text and the authors' code: ``docs/paper_datasets.md``; all datasets: docs/data.md "Datasets (``--dataset``)").

Every script builds its data through this package::

    parser = argparse.ArgumentParser(); add_dataset_args(parser); args = parser.parse_args()
    ds = dataset_from_args(args)                  # or get_dataset(**dataset_options(args))
    for pair in ds.pairs("test"): ...             # RegistrationPair, validated
    tfds = make_tf_dataset(ds, "train", batch_size=4, seed=0)

Importing it does no work and imports neither TensorFlow nor the model package
(``hypermorph_spatially_adaptive``); only :func:`make_tf_dataset` imports TensorFlow, lazily.
nibabel / scipy are imported lazily too, so the synthetic dataset works without them.

Where things are
----------------
==================  ===============================================================================
``base``            :class:`RegistrationPair`, :class:`RegistrationDataset` (ids, splits, loading),
                    :func:`validate_pair`, :func:`validate_dataset`
``nifti``           NIfTI / keypoint CSV reading with validation, voxel-grid helpers
``synthetic``       the ``synthetic`` dataset (cached phantoms), ``--motion`` presets
``phantoms``        the phantom generator (anatomy, forces, exact inverse; numpy + scipy)
``elasticity``      its linear-elastic solver: Q1 assembly, multigrid-preconditioned CG, strains
``cache``           synthetic cache codec: generator version in the file name, JSON of extras
``learn2reg``       ``nlst`` and ``l2r-lung`` loaders
``acdc``            ``acdc`` loader
``folder``          ``folder`` loader (pairs CSV)
``options``         :class:`~datasets.options.Option`: each dataset declares its options once
``cli``             :func:`get_dataset`, :func:`add_dataset_args`, :func:`dataset_options`
                    (config.json), :func:`dataset_argv` (pipeline), :func:`dataset_from_args`,
                    :func:`dataset_from_config`
``tfdata``          :func:`make_tf_dataset` (the only TensorFlow code)
``splits``          ``--split-scheme``: the authors' subject lists, the ordered and paper-text cuts
``labels``          TotalSegmentator outputs -> 1 lung / 2 bone / 3 liver maps (``make-labels``)
``commands``        ``python -m datasets check`` / ``make-labels``
``atomic``          the atomic file writer
==================  ===============================================================================

Each loader module's docstring describes the folder layout it expects and its preprocessing.

Conventions shared by all datasets
----------------------------------
Registration conventions (channels-last, flow channels, ``warped(x) = moving(x + u(x))``, voxels
vs mm): see ``CONVENTIONS.md``. Data-side specifics:

* Images ``float32 [*spatial, 1]`` in [0, 1], label maps ``int32 [*spatial]`` with 0 =
  background and 1..C the tissue classes.
* Arrays keep the NIfTI voxel index order (``img.dataobj`` order, no reorientation). Keypoints,
  spacings and slice axes all refer to that order. ``spacing`` is in mm per array axis of the
  *preprocessed* arrays; ``affine`` maps preprocessed voxel indices to world (scanner) mm. For 2D
  pairs it is the 4x4 of a one-voxel-thick 3D grid: columns 0 and 1 are the two kept array axes,
  column 2 is the dropped (slice) axis, so ``nib.Nifti1Image(arr2d[..., None], affine)`` lands
  at the right place in world space.
* Splits are fixed and deterministic. ``nlst``, ``acdc`` and ``l2r-lung`` take
  ``--split-scheme`` (:mod:`datasets.splits`): ``authors`` (default) is the subject lists of the
  authors' code; ``ordered`` cuts the pairs in sorted id order into train / val / test blocks
  in the paper text's proportions (the only scheme of ``synthetic``; ``folder``: row order, or
  its CSV's split column). The ordered cut uses the paper text's counts when the dataset has
  exactly that many pairs; otherwise the counts are scaled proportionally (largest remainder),
  every split is kept non-empty when there are at least three pairs, and asking for an empty
  split raises a ``ValueError``. The scheme is saved in ``config.json["data"]`` and is part of
  the data hash (``provenance``), so later stages refuse a run trained on another split.
* Bad input raises: missing file/folder -> ``FileNotFoundError`` naming the path (the paper
  datasets list every missing file of their splits in one message when built); a label map on
  another grid than its image (affine, not only shape) -> ``ValueError`` printing both affines; unreadable
  NIfTI, NaN/inf intensities, non-integer or out-of-range labels, image/label shape mismatch,
  empty split, unknown dataset -> ``ValueError`` naming the file / option; an unknown pair id ->
  :class:`PairNotFoundError` (both a ``KeyError`` and a ``ValueError``).

Validation before training
--------------------------
:func:`validate_dataset` reads every pair of every split once (headers, shapes, intensities,
label sets, keypoints), checks that the required splits are non-empty and the image size fits
the U-Net, and prints a one-line summary; the trainer and ``run_pipeline.py`` call it before
anything is trained.
"""
from __future__ import annotations

from .acdc import ACDCDataset
from .atomic import atomic_write
from .base import (SPLITS, PairNotFoundError, RegistrationDataset, RegistrationPair, split_sizes,
                   validate_dataset, validate_pair)
from .cache import generator_version
from .cli import (DATASET_NAMES, add_dataset_args, dataset_argv, dataset_class, dataset_from_args,
                  dataset_from_config, dataset_options, get_dataset)
from .folder import FolderDataset
from .learn2reg import L2RLungDataset, NLSTDataset
from .synthetic import (SYNTHETIC_MOTION_PRESETS, SYNTHETIC_SEED_STRIDE, SyntheticDataset,
                        synthetic_motion)
from .tfdata import make_tf_dataset

__all__ = [
    "RegistrationPair",
    "RegistrationDataset",
    "SyntheticDataset",
    "NLSTDataset",
    "L2RLungDataset",
    "ACDCDataset",
    "FolderDataset",
    "PairNotFoundError",
    "DATASET_NAMES",
    "SPLITS",
    "SYNTHETIC_MOTION_PRESETS",
    "get_dataset",
    "add_dataset_args",
    "dataset_from_args",
    "dataset_options",
    "dataset_argv",
    "dataset_class",
    "dataset_from_config",
    "make_tf_dataset",
    "synthetic_motion",
    "validate_pair",
    "validate_dataset",
    "atomic_write",
]
