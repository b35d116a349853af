"""The ``acdc`` loader (:class:`ACDCDataset`): ACDC cardiac cine MRI, ED (fixed) -> ES (moving),
one 2D slice per patient. What each step is, and where it follows the paper text or the authors'
code: ``docs/paper_datasets.md``.

Folder layout
    ``patientXXX/patientXXX_frameYY.nii.gz`` + ``patientXXX_frameYY_gt.nii.gz`` and ``Info.cfg``
    with lines ``ED: <frame>`` / ``ES: <frame>`` (and ``Group: <pathology>``); frame files are
    named with the 2-digit frame number (``.nii`` is accepted too; ED is not always frame 01).
    ``--data-dir`` is either a folder of ``patient*`` folders, or the release root holding
    ``training/`` (patient001-100) and ``testing/`` (patient101-150), directly or under
    ``database/``. Every file the chosen splits need is checked when the dataset is built; all
    missing ones are listed in one ``FileNotFoundError``.

Splits (``--split-scheme``, :mod:`datasets.splits`)
    ``authors`` (default): train training/001-100, val testing/101-120, test testing/121-150;
    ``paper-text``: the text's 50/20/30 of training/, 10/4/6 per pathology group; ``ordered``:
    contiguous 50/20/30 blocks of every patient found, in sorted order.

Preprocessing (authors' code)
    Both frames are resampled (as 3D volumes) to ``--target-spacing`` mm isotropic (default 1.8;
    linear for images, nearest for labels, voxel corners aligned); a ``--crop-size`` (128 x 128)
    window is centred on the bounding box of the fixed (ED) labels (padded with 0 where it leaves
    the volume), and the slice through the middle of that bounding box along the slice axis
    (array axis 2) is kept: the labelled middle slice. Intensities: min-max to [0, 1] per slice.
    Only the slice is ever resampled (the same numbers as resampling the volume, without the
    cost). Labels 1 RV, 2 myocardium, 3 LV blood pool. 2D only, no keypoints, correct affine
    (column 2 = the slice axis). ``crop_in_loss_default = False`` (the authors' ACDC training
    does not mask the loss).
"""
from __future__ import annotations

import os
import re
import warnings

import numpy as np

from .base import SPLITS, RegistrationDataset, RegistrationPair, split_sizes
from .options import NDIM, SPLIT_SCHEME, TARGET_SPACING, Option
from .nifti import (as_3d, check_label_grid, find_nifti, load_image, load_labels, read_nifti,
                    require_dir, require_file, resample_grid, resample_labels, scale_offset_matrix,
                    translation_matrix)
from .splits import ACDC_AUTHORS, check_scheme, grouped_cut, missing_files_error


def _read_info_cfg(path: str) -> dict:
    """``{"ED": frame, "ES": frame, "Group": text or ""}`` of an ACDC ``Info.cfg``."""
    require_file(path, "ACDC Info.cfg")
    info = {}
    with open(path) as fh:
        for line in fh:
            if ":" in line:
                key, value = line.split(":", 1)
                info[key.strip()] = value.strip()
    frames = {}
    for key in ("ED", "ES"):
        try:
            frames[key] = int(float(info[key]))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path}: no valid '{key}: <frame>' line") from exc
    frames["Group"] = info.get("Group", "")
    return frames


_PATIENT = re.compile(r"patient\d+$")


def _patients(folder: str) -> list:
    if not os.path.isdir(folder):
        return []
    return sorted(d for d in os.listdir(folder) if _PATIENT.match(d) and os.path.isdir(os.path.join(folder, d)))


class ACDCDataset(RegistrationDataset):
    """ACDC cardiac cine MRI, ED (fixed) -> ES (moving) labelled middle slices (module docstring)."""

    name = "acdc"
    split_ratios = (50, 20, 30)
    split_schemes = ("authors", "ordered", "paper-text")
    default_target_spacing = 1.8
    #: the authors' ACDC training does not zero the warped image outside the fixed image
    crop_in_loss_default = False
    CLASS_NAMES = ("RV", "myocardium", "LV_blood_pool")
    OPTIONS = (
        NDIM,
        TARGET_SPACING,
        Option("crop_size", type=int, nargs=2, metavar=("H", "W"),
               help="acdc: size of the window around the heart (if not given: 128 128, paper text and "
                    "authors' code)"),
        SPLIT_SCHEME,
    )

    @classmethod
    def config_options(cls, data_dir, values: dict) -> dict:
        """The options with the split scheme and target spacing resolved (recorded in every run)."""
        out = super().config_options(data_dir, values)
        out["split_scheme"] = values.get("split_scheme") or "authors"
        out["target_spacing"] = float(values.get("target_spacing") or cls.default_target_spacing)
        return out

    def __init__(self, data_dir=None, ndim=None, target_spacing=None, crop_size=(128, 128),
                 split_scheme=None, image_size=None):
        super().__init__()
        if data_dir is None:
            raise ValueError("dataset 'acdc' needs --data-dir (the ACDC release folder with training/ and "
                             "testing/, or a folder holding patientXXX/)")
        root = require_dir(os.path.abspath(data_dir), "ACDC data folder")
        if ndim is not None and int(ndim) != 2:
            raise ValueError("dataset 'acdc' is 2D only (labelled middle slices); use --ndim 2")
        if image_size is not None:
            warnings.warn(f"--image-size is ignored for dataset 'acdc' (crop {' x '.join(map(str, crop_size))})",
                          stacklevel=3)
        self.ndim = 2
        self.target_spacing = float(target_spacing or self.default_target_spacing)
        if not self.target_spacing > 0:
            raise ValueError(f"acdc: target_spacing must be > 0, got {target_spacing}")
        self.crop_size = tuple(int(s) for s in crop_size)
        self._image_shape = self.crop_size
        self._class_names = self.CLASS_NAMES
        self.split_scheme = check_scheme(self.name, split_scheme or "authors", self.split_schemes)
        self._folders = self._discover(root)
        if not self._folders:
            raise ValueError(f"no ACDC patientXXX folders found in {root} (nor in its training/, testing/, "
                             f"database/training/ or database/testing/)")
        self._table = self._make_table()
        ids = sorted({pid for split in SPLITS for pid in self._table[split]})
        self._check_files(ids)
        self._frames = {pid: _read_info_cfg(os.path.join(self._folders[pid], "Info.cfg")) for pid in ids}

    def _discover(self, root: str) -> dict:
        """``{patient id: folder}``: the ``patient*`` folders of ``root``, else those of its
        ``training/`` and ``testing/`` (directly or under ``database/``)."""
        self.data_dir = root
        found = {pid: os.path.join(root, pid) for pid in _patients(root)}
        self._flat = bool(found)  # patient folders directly under --data-dir
        if found:
            return found
        for base in (root, os.path.join(root, "database")):
            for sub in ("training", "testing"):
                folder = os.path.join(base, sub)
                for pid in _patients(folder):
                    found.setdefault(pid, os.path.join(folder, pid))
            if found:
                self.data_dir = base
                return found
        return found

    def _make_table(self) -> dict:
        ids = sorted(self._folders)
        if self.split_scheme == "authors":
            return {split: list(v) for split, v in ACDC_AUTHORS.items()}
        if self.split_scheme == "paper-text":
            training = [pid for pid in ids if int(pid[len("patient"):]) <= 100]
            groups: dict = {}
            for pid in training:
                cfg = os.path.join(self._folders[pid], "Info.cfg")
                group = _read_info_cfg(cfg)["Group"] if os.path.isfile(cfg) else ""
                groups.setdefault(group, []).append(pid)
            return grouped_cut(groups, self.split_ratios)
        table, start = {}, 0
        for split, size in zip(SPLITS, split_sizes(len(ids), self.split_ratios)):
            table[split] = ids[start:start + size]
            start += size
        return table

    def _expected_folder(self, pid: str) -> str:
        if pid in self._folders:
            return self._folders[pid]
        if self._flat:
            return os.path.join(self.data_dir, pid)
        sub = "training" if int(pid[len("patient"):]) <= 100 else "testing"
        return os.path.join(self.data_dir, sub, pid)

    def missing_files(self, ids=None) -> list:
        """Every Info.cfg, frame image and label map the splits need that is not on disk."""
        ids = sorted({pid for split in SPLITS for pid in self._table[split]}) if ids is None else ids
        missing = []
        for pid in ids:
            folder = self._expected_folder(pid)
            cfg = os.path.join(folder, "Info.cfg")
            if not os.path.isfile(cfg):
                missing.append(cfg)
                continue
            frames = _read_info_cfg(cfg)
            for key in ("ED", "ES"):
                stem = f"{pid}_frame{frames[key]:02d}"
                for name in (stem, stem + "_gt"):
                    if not any(os.path.isfile(os.path.join(folder, name + ext)) for ext in (".nii.gz", ".nii")):
                        missing.append(os.path.join(folder, name + ".nii.gz"))
        return missing

    def _check_files(self, ids) -> None:
        missing = self.missing_files(ids)
        if missing:
            raise missing_files_error("acdc", self.split_scheme, f"{len(ids)} patients", missing,
                                      f"under {self.data_dir}", unit="patients")
        for pid in ids:
            self._folders.setdefault(pid, self._expected_folder(pid))

    @staticmethod
    def _normalize(image: np.ndarray) -> tuple:
        """``(lo, hi)`` of the intensity scaling: the image's min and max (the authors' min-max,
        which the loader applies per slice; ``register.py`` applies it to the image it is given)."""
        return float(image.min()), float(image.max())

    def preprocessing_summary(self) -> str:
        """One line naming every preprocessing step with its values (``python -m datasets check``)."""
        return (f"resample to {self.target_spacing:g} mm isotropic (3D); {' x '.join(map(str, self.crop_size))} "
                f"window centred on the ED labels' bounding box; the slice through its middle; min-max per slice")

    def _split_table(self):
        return {split: list(self._table[split]) for split in SPLITS}

    def _all_ids(self):
        return list(self._frames)

    def frame_files(self, pair_id: str) -> dict:
        """{"ED": (image, gt), "ES": (image, gt)} paths of ``pair_id``."""
        self._check_id(pair_id)
        folder = self._folders[pair_id]
        out = {}
        for key in ("ED", "ES"):
            stem = f"{pair_id}_frame{self._frames[pair_id][key]:02d}"
            out[key] = (find_nifti(folder, stem, f"ACDC {key} image"),
                        find_nifti(folder, stem + "_gt", f"ACDC {key} label map"))
        return out

    def _load_pair(self, pair_id: str) -> RegistrationPair:
        from scipy import ndimage

        files = self.frame_files(pair_id)
        raw = {}
        for key, (img_path, gt_path) in files.items():
            img, affine, zooms = load_image(img_path, f"ACDC {key} image")
            img = as_3d(img, img_path, f"ACDC {key} image")
            lab = as_3d(load_labels(gt_path, 3, f"ACDC {key} label map"), gt_path, "label map")
            check_label_grid(img.shape, affine, img_path, lab.shape, read_nifti(gt_path, "label map")[1], gt_path)
            raw[key] = (img, lab, affine, zooms, img_path)
        if raw["ED"][0].shape != raw["ES"][0].shape:
            raise ValueError(f"shape mismatch: {raw['ED'][4]} has shape {raw['ED'][0].shape} but "
                             f"{raw['ES'][4]} has shape {raw['ES'][0].shape}")
        ed_img, ed_lab, affine, zooms, _ = raw["ED"]
        t = self.target_spacing
        out_shape, scale, offset = resample_grid(ed_img.shape, zooms[:3], t)
        fixed_rs = resample_labels(ed_lab, out_shape, scale, offset)
        if np.any(fixed_rs > 0):
            where = np.argwhere(fixed_rs > 0)
            centre = (where.min(axis=0) + where.max(axis=0) + 1) // 2  # bounding-box centre
        else:
            warnings.warn(f"ACDC {pair_id}: the ED frame has no labels; cropping around the volume centre",
                          stacklevel=3)
            centre = np.asarray(out_shape) // 2
        z = int(centre[2])
        starts = [int(c) - n // 2 for c, n in zip(centre[:2], self.crop_size)]
        # resampled in-plane indices of the window; outside the resampled volume -> 0 (padding)
        axes = [np.arange(s, s + n) for s, n in zip(starts, self.crop_size)]
        inside = [(a >= 0) & (a < n) for a, n in zip(axes, out_shape[:2])]
        raw_xy = [sc * a + off for a, sc, off in zip(axes, scale[:2], offset[:2])]
        raw_z = scale[2] * z + offset[2]
        gx, gy = np.meshgrid(*raw_xy, indexing="ij")
        coords = np.stack([gx, gy, np.full_like(gx, raw_z)])
        keep = np.logical_and.outer(*inside)
        sl = {}
        for key, (img, lab, _, _, _) in raw.items():
            im = ndimage.map_coordinates(img.astype(np.float32), coords, order=1, mode="nearest")
            im = np.where(keep, im, 0.0)
            lo, hi = float(im.min()), float(im.max())
            im = (im - lo) / (hi - lo) if hi > lo else np.zeros_like(im)
            idx = [np.clip(np.floor(c + 0.5).astype(np.int64), 0, m - 1) for c, m in zip(raw_xy, lab.shape[:2])]
            iz = int(np.clip(np.floor(raw_z + 0.5), 0, lab.shape[2] - 1))
            lb = np.where(keep, lab[np.ix_(idx[0], idx[1])][:, :, iz], 0)
            sl[key] = (np.clip(im, 0.0, 1.0).astype(np.float32), lb.astype(np.int32))
        # preprocessed (a, b, c) -> resampled (a + start_a, b + start_b, z + c) -> raw voxel
        new_to_raw = scale_offset_matrix(scale, offset) @ translation_matrix([starts[0], starts[1], z])
        return RegistrationPair(
            pair_id=pair_id,
            moving=sl["ES"][0][..., None],
            fixed=sl["ED"][0][..., None],
            moving_seg=sl["ES"][1],
            fixed_seg=sl["ED"][1],
            spacing=(t, t),
            fixed_kp=None,
            moving_kp=None,
            affine=affine @ new_to_raw,
            extras={"frames": {k: self._frames[pair_id][k] for k in ("ED", "ES")}, "slice_index": z,
                    "raw_slice": float(raw_z), "fixed_path": files["ED"][0], "moving_path": files["ES"][0]},
        )
