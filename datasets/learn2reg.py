"""Learn2Reg lung CT loaders: ``nlst`` (:class:`NLSTDataset`) and ``l2r-lung``
(:class:`L2RLungDataset`), one shared implementation. What each step is, and where it follows
the paper text or the authors' code: ``docs/paper_datasets.md``.

Folder layout (both)
    ``--data-dir`` is the folder holding ``imagesTr/`` or a folder with an ``NLST/`` (``LungCT/``)
    sub-folder holding it (the NLST 2023 archive unpacks that way). ``imagesTr/<P>_XXXX_0000.nii.gz``
    is the fixed image, ``<P>_XXXX_0001.nii.gz`` the moving one (``imagesTs/`` too: LungCT's
    0021-0030), ``keypointsTr/`` / ``keypointsTs/`` hold ``<image stem>.csv`` (one keypoint per
    row, voxel indices ``i,j,k`` in the NIfTI's voxel order, no header). An optional
    ``<P>_dataset.json`` names pairs under ``training_paired_images`` and ``registration_val``
    (``{"fixed": "./imagesTr/...", "moving": ...}``). Pair id = ``<P>_XXXX``.

    Tissue labels (required): ``--label-dir`` holds one label map per image with the *image's*
    file name, on the image's voxel grid (same shape and affine: checked, a mismatch is refused
    with both affines printed), values 0 background, 1 lung, 2 bone (vertebrae, ribs, sternum),
    3 liver. ``python -m datasets make-labels`` builds them from TotalSegmentator output.

    Every file the chosen splits need (images, label maps) is checked when the dataset is built;
    all missing ones are listed in one ``FileNotFoundError``. A pair without keypoint files loads
    without keypoints (every metric but TRE).

Splits (``--split-scheme``, :mod:`datasets.splits`)
    ``authors`` (default): the authors' subject lists; ``ordered``: contiguous blocks of the sorted
    pairs in the paper text's proportions (NLST 169/10/30, LungCT 20/4/4).

``nlst`` (Learn2Reg NLST, 224 x 192 x 224 at 1.5 mm)
    Body mask (authors' code; ``--no-body-mask`` turns it off): the convex hull of the voxels with
    HU > -20, computed on the raw image (on the slice in 2D). Intensities: clip HU to
    (-980, 1518), min-max scale to [0, 1], then zero outside the body mask. 3D: the full volume;
    2D (default, paper text): the middle coronal slice, index ``n // 2`` (96) along array axis 1
    (``--slice-axis``), no keypoints.

``l2r-lung`` (Learn2Reg LungCT, 192 x 192 x 208 at 1.75 x 1.25 x 1.75 mm)
    Resampled to ``--target-spacing`` (default 2 mm isotropic, authors' code; linear for images,
    nearest for labels, voxel corners aligned), clip HU to (-980, 600), min-max scale to [0, 1],
    then crop-or-pad (pad 0) centred to 192 x 128 x 192 (the paper text's size; an odd
    difference puts the extra voxel first, as torchio's ``CropOrPad``). Keypoints go through
    the same voxel -> voxel map (their world position is unchanged); keypoint pairs whose fixed
    or moving point leaves the grid are dropped and counted (``extras["keypoints_dropped"]``).
    Default 3D; 2D = middle slice along ``--slice-axis`` (default 1), no keypoints.

Both: ``crop_in_loss_default = True`` (the authors' training zeroes the warped image where the
fixed image is 0; the trainer reads this attribute).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from typing import Sequence

import numpy as np

from .base import SPLITS, RegistrationDataset, RegistrationPair, assemble_pair
from .options import NDIM, SLICE_AXIS, SPLIT_SCHEME, TARGET_SPACING, Option
from .nifti import (as_3d, check_label_grid, crop_or_pad_starts, find_nifti, load_image,
                    load_keypoints, load_labels, nifti_shape, nifti_stem, points_to_grid,
                    read_nifti, require_dir, resample_grid, resample_image, resample_labels,
                    scale_offset_matrix, slice_matrix, translation_matrix, crop_window, convex_hull_mask)
from .splits import LUNGCT_AUTHORS, NLST_AUTHORS, check_scheme, missing_files_error

LABEL_DIR = Option("label_dir", path=True,
                   help="nlst/l2r-lung: folder of tissue label maps named like the images, on their grids "
                        "(0 background, 1 lung, 2 bone, 3 liver; the paper text's classes; build them with "
                        "python -m datasets make-labels from TotalSegmentator output)")
BODY_MASK = Option("body_mask", action="store_false",
                   help="nlst: do not zero the image outside the body (default: on, as the authors' code: "
                        "convex hull of HU > -20; the paper text does not mention it)")

#: HU threshold of the body mask (authors' code)
BODY_HU = -20.0


def normalize_ct(img: np.ndarray, hu_window: Sequence[float], body_mask: bool, what: str = "a CT image") -> np.ndarray:
    """The CT intensity normalization of NLST / Learn2Reg Lung CT training, in one place (training's
    ``_prepare`` and ``register.py`` both call it).

    ``img`` in HU, any shape; with ``body_mask`` the body is the convex hull of the voxels with HU >
    ``BODY_HU`` (authors' code; computed before clipping; a warning naming ``what`` if there is none);
    then clip to ``hu_window``, min-max of the clipped image to [0, 1], zero outside the body.
    Returns float32 of the same shape.
    """
    body = None
    if body_mask:
        body = convex_hull_mask(img > BODY_HU)
        if body is None:
            warnings.warn(f"{what}: no body (HU > {BODY_HU:g}) to mask; the image is not masked", stacklevel=3)
    img = np.clip(img, *hu_window)
    vmin, vmax = float(img.min()), float(img.max())
    img = ((img - vmin) / (vmax - vmin) if vmax > vmin else np.zeros_like(img)).astype(np.float32)
    if body is not None:
        img = (img * body).astype(np.float32)
    return img


def _image_folder_of(path: str) -> str:
    return os.path.basename(os.path.dirname(os.path.abspath(path)))


class _Learn2RegCT(RegistrationDataset):
    prefix = ""
    json_name = ""
    subfolder = ""
    hu_window = (-980.0, 1518.0)
    pad_shape: tuple | None = None
    default_ndim = 2
    default_slice_axis = 1
    default_target_spacing: float | None = None
    authors_splits: dict = {}
    split_schemes = ("authors", "ordered")
    has_body_mask = False
    #: the authors' training zeroes the warped image where the fixed image is 0 (``crop_in_loss``)
    crop_in_loss_default = True
    CLASS_NAMES = ("lung", "bone", "liver")
    OPTIONS = (LABEL_DIR, NDIM, SLICE_AXIS, SPLIT_SCHEME)

    @classmethod
    def config_options(cls, data_dir, values: dict) -> dict:
        """The options with the defaults resolved, so every run's config.json names its split scheme
        (and body mask / target spacing) and a later default change cannot silently change a run."""
        out = super().config_options(data_dir, values)
        out["split_scheme"] = values.get("split_scheme") or "authors"
        if cls.has_body_mask:
            out["body_mask"] = values.get("body_mask") is not False
        if cls.default_target_spacing is not None:
            out["target_spacing"] = float(values.get("target_spacing") or cls.default_target_spacing)
        return out

    def __init__(self, data_dir=None, label_dir=None, ndim=None, slice_axis=None, split_scheme=None,
                 body_mask=None, target_spacing=None, image_size=None):
        super().__init__()
        if data_dir is None:
            raise ValueError(f"dataset {self.name!r} needs --data-dir (the folder holding "
                             f"imagesTr/, masksTr/, keypointsTr/)")
        root = require_dir(os.path.abspath(data_dir), f"{self.name} data folder")
        if not os.path.isdir(os.path.join(root, "imagesTr")) and os.path.isdir(
                os.path.join(root, self.subfolder, "imagesTr")):
            root = os.path.join(root, self.subfolder)  # the archive's own top folder
        self.data_dir = root
        self.images_dir = require_dir(os.path.join(root, "imagesTr"), f"{self.name} image folder")
        if label_dir is None:
            raise ValueError(
                f"dataset {self.name!r} needs --label-dir: a folder with one tissue label map "
                f"per image named like the image ({self.prefix}_XXXX_0000.nii.gz, "
                f"{self.prefix}_XXXX_0001.nii.gz), values 0 background, 1 lung, 2 bone, "
                f"3 liver (python -m datasets make-labels merges TotalSegmentator output)")
        self.label_dir = require_dir(os.path.abspath(label_dir), f"{self.name} label folder")
        if image_size is not None:
            warnings.warn(f"--image-size is ignored for dataset {self.name!r}", stacklevel=3)
        self.ndim = self.default_ndim if ndim is None else int(ndim)
        if self.ndim not in (2, 3):
            raise ValueError(f"{self.name}: ndim must be 2 or 3, got {ndim}")
        self.slice_axis = self.default_slice_axis if slice_axis is None else int(slice_axis)
        if self.slice_axis not in (0, 1, 2):
            raise ValueError(f"{self.name}: slice_axis must be 0, 1 or 2, got {slice_axis}")
        self.split_scheme = check_scheme(self.name, split_scheme or "authors", self.split_schemes)
        if body_mask is not None and not self.has_body_mask:
            raise ValueError(f"dataset {self.name!r} has no body mask option")
        self.body_mask = bool(self.has_body_mask and body_mask is not False)
        if target_spacing is not None and self.default_target_spacing is None:
            raise ValueError(f"dataset {self.name!r} is not resampled (no --target-spacing)")
        self.target_spacing = (None if self.default_target_spacing is None
                               else float(target_spacing or self.default_target_spacing))
        if self.target_spacing is not None and not self.target_spacing > 0:
            raise ValueError(f"{self.name}: target_spacing must be > 0, got {target_spacing}")
        self._class_names = self.CLASS_NAMES
        self._found = self._discover()
        self._table = self._make_table()
        self._pairs = {pid: self._pair_paths(pid) for split in SPLITS for pid in self._table[split]}
        self._pairs = {pid: self._pairs[pid] for pid in sorted(self._pairs)}
        if not self._pairs:
            raise ValueError(f"no {self.prefix} image pairs found in {self.images_dir}")
        self._check_files()

    # ---- discovery and splits ---------------------------------------------------------------
    def _discover(self) -> dict:
        """Every pair the folder holds: ``{pair id: (fixed path, moving path)}`` from the JSON if
        there is one, else every ``_0000`` image of ``imagesTr/`` and ``imagesTs/`` with its
        ``_0001`` partner (as expected: a missing partner is reported with the other missing files)."""
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
        pattern = re.compile(re.escape(self.prefix) + r"_(\d+)_0000\.nii(\.gz)?$")
        for sub in (() if entries else ("imagesTr", "imagesTs")):  # the JSON, if any, names the pairs
            folder = os.path.join(self.data_dir, sub)
            if not os.path.isdir(folder):
                continue
            for fname in sorted(os.listdir(folder)):
                if pattern.match(fname):
                    stem = nifti_stem(fname)[: -len("_0000")]
                    moving = os.path.join(folder, stem + "_0001" + fname[len(stem) + 5:])
                    entries.append((os.path.join(folder, fname), moving))
        pairs: dict = {}
        for fixed, moving in entries:
            fs, ms = nifti_stem(fixed), nifti_stem(moving)
            fcase, mcase = fs.rsplit("_", 1)[0], ms.rsplit("_", 1)[0]
            pid = fcase if fcase == mcase else f"{fs}__{ms}"
            if pid in pairs and pairs[pid] != (fixed, moving):
                if pid == fcase and nifti_stem(pairs[pid][0]) == fs:
                    continue  # the same pair under both file name extensions / JSON and folder
                pid = f"{fs}__{ms}"
            pairs.setdefault(pid, (fixed, moving))
        return pairs

    def _expected_folder(self, split: str) -> str:
        return "imagesTr"

    def _make_table(self) -> dict:
        if self.split_scheme == "ordered":
            from .base import split_sizes

            ids = sorted(self._found)
            table, start = {}, 0
            for split, size in zip(SPLITS, split_sizes(len(ids), self.split_ratios)):
                table[split] = ids[start:start + size]
                start += size
            return table
        return {split: list(ids) for split, ids in self.authors_splits.items()}

    def _pair_paths(self, pid: str) -> tuple:
        if pid in self._found:
            return self._found[pid]
        split = next(s for s in SPLITS if pid in self._table[s])
        folder = os.path.join(self.data_dir, self._expected_folder(split))
        return (os.path.join(folder, pid + "_0000.nii.gz"), os.path.join(folder, pid + "_0001.nii.gz"))

    def _label_path(self, image_path: str) -> str | None:
        for ext in (".nii.gz", ".nii"):
            path = os.path.join(self.label_dir, nifti_stem(image_path) + ext)
            if os.path.isfile(path):
                return path
        return None

    def _keypoint_path(self, image_path: str) -> str | None:
        sub = _image_folder_of(image_path).replace("images", "keypoints", 1)
        path = os.path.join(self.data_dir, sub, nifti_stem(image_path) + ".csv")
        return path if os.path.isfile(path) else None

    def missing_files(self) -> list:
        """Every image and label map the splits need that is not on disk, sorted."""
        missing = []
        for fixed, moving in self._pairs.values():
            for path in (fixed, moving):
                if not os.path.isfile(path):
                    missing.append(path)
                if self._label_path(path) is None:
                    missing.append(os.path.join(self.label_dir, nifti_stem(path) + ".nii.gz"))
        return sorted(missing)

    def _check_files(self) -> None:
        missing = self.missing_files()
        if missing:
            raise missing_files_error(self.name, self.split_scheme, f"{len(self._pairs)} pairs", missing,
                                      f"images under {self.data_dir}, label maps under {self.label_dir}")

    def keypoint_status(self) -> dict:
        """``{pair id: True/False}``: whether both keypoint files of the pair exist (3D only uses them)."""
        return {pid: all(self._keypoint_path(p) is not None for p in paths) for pid, paths in self._pairs.items()}

    def _split_table(self):
        return {split: list(self._table[split]) for split in SPLITS}

    def _all_ids(self):
        return list(self._pairs)

    def pair_files(self, pair_id: str) -> tuple:
        """(fixed image path, moving image path) of ``pair_id``."""
        self._check_id(pair_id)
        return self._pairs[pair_id]

    # ---- geometry -----------------------------------------------------------------------------
    def preprocessing_summary(self) -> str:
        """One line naming every preprocessing step with its values (``python -m datasets check``)."""
        steps = []
        if self.target_spacing is not None:
            steps.append(f"resample to {self.target_spacing:g} mm isotropic")
        if self.body_mask:
            steps.append(f"body mask (convex hull of HU > {BODY_HU:g})")
        steps.append(f"clip HU to ({self.hu_window[0]:g}, {self.hu_window[1]:g}), min-max to [0, 1]")
        if self.pad_shape is not None:
            steps.append(f"crop-or-pad to {' x '.join(map(str, self.pad_shape))}")
        if self.ndim == 2:
            steps.append(f"middle slice along array axis {self.slice_axis}")
        return "; ".join(steps)

    def _infer_image_shape(self):
        fixed = next(iter(self._pairs.values()))[0]
        shape = nifti_shape(fixed, f"{self.name} image")
        grid = tuple(shape[:3]) + (1,) * (3 - len(shape[:3]))
        if self.pad_shape is not None:
            grid = tuple(self.pad_shape)
        elif self.target_spacing is not None:
            zooms = read_nifti(fixed, f"{self.name} image")[2]
            grid = resample_grid(grid, zooms, self.target_spacing)[0]
        if self.ndim == 3:
            return grid
        return tuple(s for a, s in enumerate(grid) if a != self.slice_axis)

    def _prepare(self, image_path: str, what: str):
        """Load one image + label map and preprocess them. Returns (image, labels, new->raw 4x4,
        raw affine, spacing)."""
        img, affine, zooms = load_image(image_path, f"{self.name} {what} image")
        img = as_3d(img, image_path, f"{self.name} {what} image")
        label_path = find_nifti(self.label_dir, nifti_stem(image_path), f"{self.name} {what} label map")
        lab = load_labels(label_path, len(self.CLASS_NAMES), f"{self.name} {what} label map")
        lab = as_3d(lab, label_path, "label map")
        check_label_grid(img.shape, affine, image_path, lab.shape, _read_nifti_affine(label_path), label_path)
        new_to_raw = np.eye(4)
        spacing = tuple(float(z) for z in zooms[:3])
        if self.target_spacing is not None:
            out_shape, scale, offset = resample_grid(img.shape, spacing, self.target_spacing)
            img = resample_image(img, out_shape, scale, offset)
            lab = resample_labels(lab, out_shape, scale, offset)
            new_to_raw = scale_offset_matrix(scale, offset)
            spacing = (self.target_spacing,) * 3
        if self.ndim == 2 and self.pad_shape is None:  # slice first (NLST: the mask of the slice)
            index = img.shape[self.slice_axis] // 2
            img, lab = np.take(img, index, axis=self.slice_axis), np.take(lab, index, axis=self.slice_axis)
            new_to_raw = new_to_raw @ slice_matrix(self.slice_axis, index)
        img = normalize_ct(img, self.hu_window, self.body_mask, image_path)
        if self.pad_shape is not None:
            starts = crop_or_pad_starts(img.shape, self.pad_shape)
            img = crop_window(img, starts, self.pad_shape, np.float32(0.0))
            lab = crop_window(lab, starts, self.pad_shape, np.int32(0))
            new_to_raw = new_to_raw @ translation_matrix(starts)
            if self.ndim == 2:
                index = img.shape[self.slice_axis] // 2
                img, lab = np.take(img, index, axis=self.slice_axis), np.take(lab, index, axis=self.slice_axis)
                new_to_raw = new_to_raw @ slice_matrix(self.slice_axis, index)
        if self.ndim == 2:
            spacing = tuple(s for a, s in enumerate(spacing) if a != self.slice_axis)
        return img.astype(np.float32), lab.astype(np.int32), new_to_raw, affine, spacing

    def _keypoints(self, image_path: str, new_to_raw: np.ndarray, what: str):
        if self.ndim != 3:
            return None
        path = self._keypoint_path(image_path)
        if path is None:
            return None
        kp = load_keypoints(path, 3, f"{self.name} {what} keypoint file")
        return points_to_grid(kp, new_to_raw, 3)

    def _load_pair(self, pair_id: str) -> RegistrationPair:
        fixed_path, moving_path = self._pairs[pair_id]
        fimg, flab, f_map, f_aff, spacing = self._prepare(fixed_path, "fixed")
        mimg, mlab, m_map, _, _ = self._prepare(moving_path, "moving")
        if fimg.shape != mimg.shape:
            raise ValueError(f"shape mismatch: fixed {fixed_path} gives {fimg.shape} but moving "
                             f"{moving_path} gives {mimg.shape}")
        fkp = self._keypoints(fixed_path, f_map, "fixed")
        mkp = self._keypoints(moving_path, m_map, "moving")
        dropped, total = 0, 0
        if fkp is None or mkp is None:
            fkp = mkp = None
        elif len(fkp) == len(mkp):
            hi = np.asarray(fimg.shape, np.float64) - 0.5
            inside = np.all((fkp >= -0.5) & (fkp <= hi) & (mkp >= -0.5) & (mkp <= hi), axis=1)
            total, dropped = len(fkp), int(np.sum(~inside))
            fkp, mkp = fkp[inside].astype(np.float32), mkp[inside].astype(np.float32)
        pair = assemble_pair(pair_id, (fixed_path, fimg, flab), (moving_path, mimg, mlab), spacing,
                             f_aff @ f_map, (fkp, mkp))
        if fkp is not None:
            pair.extras.update(keypoints_total=total, keypoints_dropped=dropped)
        return pair


def _read_nifti_affine(path: str) -> np.ndarray:
    """The voxel -> world affine of a NIfTI header (no data read)."""
    from .nifti import import_nibabel

    try:
        return np.asarray(import_nibabel().load(path).affine, np.float64)
    except Exception as exc:
        raise ValueError(f"cannot read NIfTI header of {path}: {exc}") from exc


class NLSTDataset(_Learn2RegCT):
    """Learn2Reg NLST (see the module docstring)."""

    name = "nlst"
    prefix = "NLST"
    subfolder = "NLST"
    json_name = "NLST_dataset.json"
    hu_window = (-980.0, 1518.0)
    pad_shape = None
    default_ndim = 2
    split_ratios = (169, 10, 30)
    authors_splits = NLST_AUTHORS
    has_body_mask = True
    OPTIONS = (LABEL_DIR, NDIM, SLICE_AXIS, SPLIT_SCHEME, BODY_MASK)


class L2RLungDataset(_Learn2RegCT):
    """Learn2Reg LungCT (see the module docstring)."""

    name = "l2r-lung"
    prefix = "LungCT"
    subfolder = "LungCT"
    json_name = "LungCT_dataset.json"
    hu_window = (-980.0, 600.0)
    pad_shape = (192, 128, 192)
    default_ndim = 3
    default_target_spacing = 2.0
    split_ratios = (20, 4, 4)
    authors_splits = LUNGCT_AUTHORS
    OPTIONS = (LABEL_DIR, NDIM, SLICE_AXIS, SPLIT_SCHEME, TARGET_SPACING)

    def _expected_folder(self, split: str) -> str:
        return "imagesTr" if split == "train" else "imagesTs"
