"""Learn2Reg lung CT loaders: ``nlst`` (:class:`NLSTDataset`) and ``l2r-lung``
(:class:`L2RLungDataset`), one shared implementation.

``nlst`` (Learn2Reg NLST)
    ``imagesTr/NLST_XXXX_0000.nii.gz`` (fixed) and ``NLST_XXXX_0001.nii.gz`` (moving),
    ``masksTr/`` (lung masks, same names; not used: the lung class comes from the label maps),
    ``keypointsTr/NLST_XXXX_0000.csv`` / ``_0001.csv`` (one keypoint per row, ``i,j,k`` voxel
    indices in the NIfTI's voxel order, comma separated, no header), optional
    ``NLST_dataset.json``: if present, its ``training_paired_images`` and ``registration_val``
    lists (``{"fixed": "./imagesTr/...", "moving": ...}``) define the pairs, else every
    ``imagesTr/NLST_*_0000.nii.gz`` with its ``_0001`` partner is a pair. Pair id =
    ``NLST_XXXX``.

    Tissue labels (required): ``--label-dir`` holds one label map per image with the *image's*
    file name (``NLST_XXXX_0000.nii.gz``, ``NLST_XXXX_0001.nii.gz``), same grid as the image,
    integer values 0 background, 1 lung, 2 bone (vertebrae, ribs, sternum), 3 liver. Users
    build these from TotalSegmentator output (merge the lung lobes -> 1, vertebrae/ribs/sternum
    -> 2, liver -> 3; or lung from ``masksTr``).

    Intensities: clip HU to (-980, 1518) and scale to [0, 1]. 3D: the full volume
    (224 x 192 x 224 at 1.5 mm in the release). 2D (default, paper): the middle coronal slice,
    i.e. index ``n // 2`` along array axis 1 (the anterior-posterior axis of the NLST volumes;
    change with ``--slice-axis``); 2D pairs have no keypoints (``None``). Split 169/10/30.

``l2r-lung`` (Learn2Reg LungCT)
    Same layout with prefix ``LungCT`` (``imagesTr/LungCT_00XX_0000.nii.gz`` fixed, ``_0001``
    moving, ``masksTr/``, ``keypointsTr/``, optional ``LungCT_dataset.json``), labels from
    ``--label-dir`` as for NLST. Clip HU to (-980, 600), scale to [0, 1], then centre-pad with 0
    to 192 x 128 x 192 (an axis that is longer is centre-cropped, with a warning); keypoints are
    shifted by the same offsets (a warning lists keypoints that end up outside the grid).
    Default 3D; 2D = middle slice of the padded volume along ``--slice-axis`` (default 1), no
    keypoints. Split 20/4/4.
"""
from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np

from .base import RegistrationDataset, RegistrationPair, assemble_pair
from .options import NDIM, SLICE_AXIS, Option
from .nifti import (_as_3d, _check_same_shape, _find_nifti, _load_image, _load_keypoints,
                    _load_labels, _nifti_shape, _nifti_stem, _points_to_grid, _require_dir,
                    _require_file, _slice_matrix, _translation, _warn_outside, _window)


class _Learn2RegCT(RegistrationDataset):
    prefix = ""
    json_name = ""
    hu_window = (-980.0, 1518.0)
    pad_shape: tuple | None = None
    default_ndim = 2
    default_slice_axis = 1
    CLASS_NAMES = ("lung", "bone", "liver")
    OPTIONS = (
        Option("label_dir", path=True,
               help="nlst/l2r-lung: folder of tissue label maps named like the images (0 background, "
                    "1 lung, 2 bone, 3 liver; e.g. from TotalSegmentator)"),
        NDIM,
        SLICE_AXIS,
    )

    def __init__(self, data_dir=None, label_dir=None, ndim=None, slice_axis=None,
                 image_size=None):
        super().__init__()
        if data_dir is None:
            raise ValueError(f"dataset {self.name!r} needs --data-dir (the folder holding "
                             f"imagesTr/, masksTr/, keypointsTr/)")
        self.data_dir = _require_dir(os.path.abspath(data_dir), f"{self.name} data folder")
        self.images_dir = _require_dir(os.path.join(self.data_dir, "imagesTr"),
                                       f"{self.name} image folder")
        if label_dir is None:
            raise ValueError(
                f"dataset {self.name!r} needs --label-dir: a folder with one tissue label map "
                f"per image named like the image ({self.prefix}_XXXX_0000.nii.gz, "
                f"{self.prefix}_XXXX_0001.nii.gz), values 0 background, 1 lung, 2 bone, "
                f"3 liver (e.g. merged from TotalSegmentator output)")
        self.label_dir = _require_dir(os.path.abspath(label_dir), f"{self.name} label folder")
        if image_size is not None:
            warnings.warn(f"--image-size is ignored for dataset {self.name!r}", stacklevel=3)
        self.ndim = self.default_ndim if ndim is None else int(ndim)
        if self.ndim not in (2, 3):
            raise ValueError(f"{self.name}: ndim must be 2 or 3, got {ndim}")
        self.slice_axis = self.default_slice_axis if slice_axis is None else int(slice_axis)
        if self.slice_axis not in (0, 1, 2):
            raise ValueError(f"{self.name}: slice_axis must be 0, 1 or 2, got {slice_axis}")
        self._class_names = self.CLASS_NAMES
        self._pairs = self._discover()
        if not self._pairs:
            raise ValueError(f"no {self.prefix} image pairs found in {self.images_dir}")
        for pid, (fixed, moving) in self._pairs.items():
            for path in (fixed, moving):
                _require_file(path, f"{self.name} image of pair {pid}")
                _find_nifti(self.label_dir, _nifti_stem(path),
                            f"{self.name} label map of pair {pid}")
        kp_dir = os.path.join(self.data_dir, "keypointsTr")
        self.keypoints_dir = kp_dir if os.path.isdir(kp_dir) else None
        if self.ndim == 3 and self.keypoints_dir is None:
            warnings.warn(f"{self.name}: no keypoint folder {kp_dir}; pairs have no keypoints",
                          stacklevel=3)

    def _discover(self) -> dict:
        json_path = os.path.join(self.data_dir, self.json_name)
        entries = []
        if os.path.isfile(json_path):
            try:
                with open(json_path) as fh:
                    info = json.load(fh)
            except (OSError, ValueError) as exc:
                raise ValueError(f"cannot read {json_path}: {exc}") from exc
            for key in ("training_paired_images", "registration_val"):
                for item in info.get(key, []) or []:
                    try:
                        fixed, moving = item["fixed"], item["moving"]
                    except (TypeError, KeyError) as exc:
                        raise ValueError(f"{json_path}: entry {item!r} of {key!r} has no "
                                         f"'fixed'/'moving'") from exc
                    entries.append((os.path.normpath(os.path.join(self.data_dir, fixed)),
                                    os.path.normpath(os.path.join(self.data_dir, moving))))
            if not entries:
                raise ValueError(f"{json_path} lists no pairs under 'training_paired_images' "
                                 f"or 'registration_val'")
        else:
            pattern = re.compile(re.escape(self.prefix) + r"_(\d+)_0000\.nii(\.gz)?$")
            for fname in sorted(os.listdir(self.images_dir)):
                if pattern.match(fname):
                    stem = _nifti_stem(fname)[: -len("_0000")]
                    moving = _find_nifti(self.images_dir, stem + "_0001",
                                         f"moving image (partner of {fname})")
                    entries.append((os.path.join(self.images_dir, fname), moving))
        pairs: dict = {}
        for fixed, moving in entries:
            fs, ms = _nifti_stem(fixed), _nifti_stem(moving)
            fcase, mcase = fs.rsplit("_", 1)[0], ms.rsplit("_", 1)[0]
            pid = fcase if fcase == mcase else f"{fs}__{ms}"
            if pid in pairs and pairs[pid] != (fixed, moving):
                pid = f"{fs}__{ms}"
            pairs[pid] = (fixed, moving)
        return {pid: pairs[pid] for pid in sorted(pairs)}

    def _all_ids(self):
        return list(self._pairs)

    def pair_files(self, pair_id: str) -> tuple:
        """(fixed image path, moving image path) of ``pair_id``."""
        self._check_id(pair_id)
        return self._pairs[pair_id]

    def _grid_shape3d(self, raw_shape) -> tuple:
        return tuple(self.pad_shape) if self.pad_shape is not None else tuple(raw_shape)

    def _infer_image_shape(self):
        fixed = next(iter(self._pairs.values()))[0]
        shape = _nifti_shape(fixed, f"{self.name} image")
        shape3 = tuple(shape[:3]) + (1,) * (3 - len(shape[:3]))
        grid = self._grid_shape3d(shape3)
        if self.ndim == 3:
            return grid
        return tuple(s for a, s in enumerate(grid) if a != self.slice_axis)

    def _prepare(self, image_path: str, what: str):
        """Load one image + label map, normalize, pad/crop, slice. Returns (image, labels,
        new->raw 4x4, raw affine, zooms, pad starts)."""
        img, affine, zooms = _load_image(image_path, f"{self.name} {what} image")
        img = _as_3d(img, image_path, f"{self.name} {what} image")
        label_path = _find_nifti(self.label_dir, _nifti_stem(image_path),
                                 f"{self.name} {what} label map")
        lab = _as_3d(_load_labels(label_path, len(self.CLASS_NAMES),
                                  f"{self.name} {what} label map"), label_path, "label map")
        _check_same_shape(img, image_path, lab, label_path)
        lo, hi = self.hu_window
        img = ((np.clip(img, lo, hi) - lo) / (hi - lo)).astype(np.float32)
        starts = [0, 0, 0]
        if self.pad_shape is not None:
            for a, (n, t) in enumerate(zip(img.shape, self.pad_shape)):
                if n > t:
                    starts[a] = (n - t) // 2
                    warnings.warn(f"{image_path}: axis {a} has {n} voxels > {t}; centre-cropping "
                                  f"to {t}", stacklevel=4)
                else:
                    starts[a] = -((t - n) // 2)
            img = _window(img, starts, self.pad_shape, np.float32(0.0))
            lab = _window(lab, starts, self.pad_shape, np.int32(0))
        new_to_raw = _translation(starts)
        spacing = tuple(float(z) for z in zooms[:3])
        if self.ndim == 2:
            ax = self.slice_axis
            index = img.shape[ax] // 2
            img = np.take(img, index, axis=ax)
            lab = np.take(lab, index, axis=ax)
            new_to_raw = new_to_raw @ _slice_matrix(ax, index)
            spacing = tuple(s for a, s in enumerate(spacing) if a != ax)
        return img, lab, new_to_raw, affine, spacing, starts

    def _keypoints(self, image_path: str, new_to_raw: np.ndarray, shape, what: str):
        if self.ndim != 3 or self.keypoints_dir is None:
            return None
        path = os.path.join(self.keypoints_dir, _nifti_stem(image_path) + ".csv")
        kp = _load_keypoints(path, 3, f"{self.name} {what} keypoint file")
        kp = _points_to_grid(kp, new_to_raw, 3).astype(np.float32)
        _warn_outside(kp, shape, f"keypoints of {path}")
        return kp

    def _load_pair(self, pair_id: str) -> RegistrationPair:
        fixed_path, moving_path = self._pairs[pair_id]
        fimg, flab, f_map, f_aff, spacing, _ = self._prepare(fixed_path, "fixed")
        mimg, mlab, m_map, _, _, _ = self._prepare(moving_path, "moving")
        if fimg.shape != mimg.shape:
            raise ValueError(f"shape mismatch: fixed {fixed_path} gives {fimg.shape} but moving "
                             f"{moving_path} gives {mimg.shape}")
        keypoints = (self._keypoints(fixed_path, f_map, fimg.shape, "fixed"),
                     self._keypoints(moving_path, m_map, mimg.shape, "moving"))
        return assemble_pair(pair_id, (fixed_path, fimg, flab), (moving_path, mimg, mlab), spacing,
                             f_aff @ f_map, keypoints)


class NLSTDataset(_Learn2RegCT):
    """Learn2Reg NLST (see the module docstring)."""

    name = "nlst"
    prefix = "NLST"
    json_name = "NLST_dataset.json"
    hu_window = (-980.0, 1518.0)
    pad_shape = None
    default_ndim = 2
    split_ratios = (169, 10, 30)


class L2RLungDataset(_Learn2RegCT):
    """Learn2Reg LungCT (see the module docstring)."""

    name = "l2r-lung"
    prefix = "LungCT"
    json_name = "LungCT_dataset.json"
    hu_window = (-980.0, 600.0)
    pad_shape = (192, 128, 192)
    default_ndim = 3
    split_ratios = (20, 4, 4)
