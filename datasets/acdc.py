"""The ``acdc`` loader (:class:`ACDCDataset`): ACDC cardiac cine MRI, ED -> ES middle slices.

``acdc``
    ``<data_dir>/patientXXX/patientXXX_frameYY.nii.gz`` + ``patientXXX_frameYY_gt.nii.gz`` and
    ``Info.cfg`` with lines ``ED: <frame>`` / ``ES: <frame>`` (frame files are named with the
    2-digit frame number; ``.nii`` is accepted too). If ``<data_dir>`` has no ``patient*``
    folders but a ``training/`` (or ``database/training/``) sub-folder, that one is used.
    Fixed = middle slice (index ``nz // 2`` of the last axis) of the ED frame, moving = the same
    slice of the ES frame. Intensities: per frame volume, clip to [min, 99.5th percentile] and
    min-max scale to [0, 1]. In-plane resampling to isotropic spacing (default: the smaller
    in-plane spacing; ``--target-spacing``) with a diagonal ``scipy.ndimage.affine_transform``
    (linear for images, nearest for labels): output voxel ``o`` samples raw voxel
    ``o * target / spacing``, so the output spacing is exactly the target. Then a 128 x 128 (``--crop-size``)
    window centred on the centre of mass of the fixed labels > 0 (padded with 0 where it leaves
    the image; image centre if the fixed slice has no labels, with a warning). Labels 1 RV,
    2 myocardium, 3 LV blood pool. 2D only, no keypoints, correct affine. Split 50/20/30 in
    sorted patient order.
"""
from __future__ import annotations

import os
import re
import warnings

import numpy as np

from .base import RegistrationDataset, RegistrationPair
from .options import NDIM, Option
from .nifti import (_as_3d, _check_same_shape, _find_nifti, _load_image, _load_labels,
                    _require_dir, _require_file, _window)


def _read_info_cfg(path: str) -> dict:
    _require_file(path, "ACDC Info.cfg")
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
    return frames


class ACDCDataset(RegistrationDataset):
    """ACDC cardiac cine MRI, ED (fixed) -> ES (moving) middle slices (module docstring)."""

    name = "acdc"
    split_ratios = (50, 20, 30)
    CLASS_NAMES = ("RV", "myocardium", "LV_blood_pool")
    OPTIONS = (
        NDIM,
        Option("target_spacing", type=float,
               help="acdc: in-plane spacing in mm after resampling (if not given: the smaller in-plane "
                    "spacing of each image)"),
        Option("crop_size", type=int, nargs=2, metavar=("H", "W"),
               help="acdc: size of the window around the heart (if not given: 128 128, the paper's)"),
    )

    def __init__(self, data_dir=None, ndim=None, target_spacing=None, crop_size=(128, 128),
                 image_size=None):
        super().__init__()
        if data_dir is None:
            raise ValueError("dataset 'acdc' needs --data-dir (the folder holding patientXXX/)")
        root = _require_dir(os.path.abspath(data_dir), "ACDC data folder")
        if ndim is not None and int(ndim) != 2:
            raise ValueError("dataset 'acdc' is 2D only (middle slices); use --ndim 2")
        if image_size is not None:
            warnings.warn(f"--image-size is ignored for dataset 'acdc' (crop {' x '.join(map(str, crop_size))})",
                          stacklevel=3)
        self.ndim = 2
        self.target_spacing = None if target_spacing is None else float(target_spacing)
        if self.target_spacing is not None and self.target_spacing <= 0:
            raise ValueError(f"acdc: target_spacing must be > 0, got {target_spacing}")
        self.crop_size = tuple(int(s) for s in crop_size)
        self._image_shape = self.crop_size
        self._class_names = self.CLASS_NAMES
        pattern = re.compile(r"patient\d+$")

        def patients(folder):
            return sorted(d for d in os.listdir(folder)
                          if pattern.match(d) and os.path.isdir(os.path.join(folder, d)))

        ids = patients(root)
        if not ids:
            for sub in ("training", os.path.join("database", "training")):
                if os.path.isdir(os.path.join(root, sub)) and patients(os.path.join(root, sub)):
                    root = os.path.join(root, sub)
                    ids = patients(root)
                    break
        if not ids:
            raise ValueError(f"no ACDC patientXXX folders found in {root}")
        self.data_dir = root
        self._frames = {pid: _read_info_cfg(os.path.join(root, pid, "Info.cfg")) for pid in ids}

    def _all_ids(self):
        return list(self._frames)

    def frame_files(self, pair_id: str) -> dict:
        """{"ED": (image, gt), "ES": (image, gt)} paths of ``pair_id``."""
        self._check_id(pair_id)
        folder = os.path.join(self.data_dir, pair_id)
        out = {}
        for key, frame in self._frames[pair_id].items():
            stem = f"{pair_id}_frame{frame:02d}"
            out[key] = (_find_nifti(folder, stem, f"ACDC {key} image"),
                        _find_nifti(folder, stem + "_gt", f"ACDC {key} label map"))
        return out

    @staticmethod
    def _normalize(volume: np.ndarray) -> tuple:
        lo = float(volume.min())
        hi = float(np.percentile(volume, 99.5))
        return lo, hi

    def _load_pair(self, pair_id: str) -> RegistrationPair:
        from scipy import ndimage

        files = self.frame_files(pair_id)
        raw = {}
        for key, (img_path, gt_path) in files.items():
            img, affine, zooms = _load_image(img_path, f"ACDC {key} image")
            img = _as_3d(img, img_path, f"ACDC {key} image")
            lab = _as_3d(_load_labels(gt_path, 3, f"ACDC {key} label map"), gt_path,
                         "label map")
            _check_same_shape(img, img_path, lab, gt_path)
            raw[key] = (img, lab, affine, zooms, img_path)
        _check_same_shape(raw["ED"][0], raw["ED"][4], raw["ES"][0], raw["ES"][4])
        ed_img, _, affine, zooms, _ = raw["ED"]
        nz = ed_img.shape[2]
        z = nz // 2
        sx, sy = float(zooms[0]), float(zooms[1])
        target = self.target_spacing or min(sx, sy)
        ratio = (target / sx, target / sy)
        out_shape = tuple(int(np.floor((n - 1) * s / target + 1e-6)) + 1
                          for n, s in zip(ed_img.shape[:2], (sx, sy)))

        def resample(a, order):
            return ndimage.affine_transform(a, ratio, offset=0.0, output_shape=out_shape,
                                            order=order, mode="nearest")

        sl = {}
        for key, (img, lab, _, _, _) in raw.items():
            lo, hi = self._normalize(img)
            s = img[:, :, z]
            s = (np.clip(s, lo, hi) - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
            sl[key] = (np.clip(resample(s.astype(np.float32), 1), 0.0, 1.0).astype(np.float32),
                       resample(lab[:, :, z].astype(np.int32), 0).astype(np.int32))
        fixed_lab = sl["ED"][1]
        if np.any(fixed_lab > 0):
            centre = np.round(np.argwhere(fixed_lab > 0).mean(axis=0)).astype(int)
        else:
            warnings.warn(f"ACDC {pair_id}: the ED middle slice has no labels; cropping around "
                          f"the image centre", stacklevel=3)
            centre = np.asarray(out_shape) // 2
        starts = [int(c) - t // 2 for c, t in zip(centre, self.crop_size)]
        crop = {key: (_window(im, starts, self.crop_size, np.float32(0.0)),
                      _window(lb, starts, self.crop_size, np.int32(0)))
                for key, (im, lb) in sl.items()}
        # preprocessed (a, b, c) -> raw voxel (ratio_x (a + start_a), ratio_y (b + start_b), z + c)
        new_to_raw = np.diag([ratio[0], ratio[1], 1.0, 1.0])
        new_to_raw[:3, 3] = [ratio[0] * starts[0], ratio[1] * starts[1], z]
        return RegistrationPair(
            pair_id=pair_id,
            moving=crop["ES"][0][..., None],
            fixed=crop["ED"][0][..., None],
            moving_seg=crop["ES"][1],
            fixed_seg=crop["ED"][1],
            spacing=(target, target),
            fixed_kp=None,
            moving_kp=None,
            affine=affine @ new_to_raw,
            extras={"frames": dict(self._frames[pair_id]), "slice_index": z,
                    "fixed_path": files["ED"][0], "moving_path": files["ES"][0]},
        )
