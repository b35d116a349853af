"""The ``folder`` loader (:class:`FolderDataset`): user NIfTI pairs listed in a CSV table.

``folder``
    ``--pairs-csv FILE`` with columns ``pair_id,fixed,moving,fixed_seg,moving_seg``, optional
    ``fixed_kp,moving_kp`` (keypoint CSV files, voxel indices in NIfTI order, as for NLST; a
    header row is tolerated) and optional ``split`` (train/val/test; without it 70/15/15 in row
    order). The CSV is UTF-8 (a byte order mark and CRLF line ends are fine); pair ids are kept
    as written (``NA``, ``None`` stay strings). Relative paths are relative to the CSV's folder.
    Images are NIfTI, min-max scaled to [0, 1] (optionally after clipping at
    ``--clip-percentiles LO HI``; :func:`datasets.nifti.minmax_scale`, which ``register.py``
    shares); an image whose range is set by a few outlier voxels (99% of its voxels in the
    lowest 5% of the range) warns, naming the file and suggesting ``--clip-percentiles``.
    ``num_classes`` = the largest label in the fixed label maps unless
    ``--num-classes``/``--class-names`` declare the classes: declared classes make any other
    label an error (fixed or moving); inferred ones refuse a moving label larger than every
    fixed label (it would invent a class no fixed segmentation has) and warn about classes with
    no voxels in any label map (a stray label 7 would otherwise silently create empty classes
    4..6). Spacing from the fixed image header; a moving image whose voxel size or orientation
    (affine) differs from its fixed image's warns, naming the pair and both (nothing is
    resampled: the arrays are registered voxel to voxel). A 2D NIfTI, or a 3D one with exactly
    one singleton axis, gives a 2D pair (keypoint files may have 2 columns or 3, the singleton
    axis' column is dropped); ``--ndim 2`` on 3D volumes takes the middle slice along
    ``--slice-axis`` (default 2, no keypoints). A 3D volume in a dataset whose first image is 2D
    is an error unless ``--ndim 2`` asks for its middle slice. All pairs must have the same
    preprocessed shape. No resampling: for training the image size must be divisible by 16
    (:func:`validate_dataset` refuses other sizes).
"""
from __future__ import annotations

import csv
import os
import warnings

import numpy as np

from .base import SPLITS, RegistrationDataset, RegistrationPair, assemble_pair
from .options import CLASS_NAMES, NDIM, SLICE_AXIS, Option, arg_type, positive_int, split_class_names
from .nifti import (as_3d, check_same_shape, load_image, load_keypoints, load_labels,
                    nifti_shape, points_to_grid, require_file, slice_matrix, warn_outside,
                    minmax_scale)


def _directions(affine: np.ndarray) -> np.ndarray:
    """Unit axis directions (columns) of a 4x4 voxel -> world affine."""
    m = np.asarray(affine, np.float64)[:3, :3]
    return m / np.maximum(np.linalg.norm(m, axis=0), 1e-12)


class FolderDataset(RegistrationDataset):
    """User data listed in a pairs CSV (see the module docstring)."""

    name = "folder"
    split_ratios = (70, 15, 15)
    REQUIRED = ("pair_id", "fixed", "moving", "fixed_seg", "moving_seg")
    OPTIONS = (
        Option("pairs_csv", path=True,
               help="folder dataset: CSV with columns pair_id,fixed,moving,fixed_seg,moving_seg"
                    "[,fixed_kp,moving_kp][,split], paths relative to the CSV"),
        NDIM,
        Option("num_classes", type=arg_type(positive_int),
               help="folder: number of tissue classes (if not given: largest fixed label)"),
        CLASS_NAMES,
        Option("clip_percentiles", type=float, nargs=2, metavar=("LO", "HI"),
               help="folder: clip intensities at these percentiles before min-max scaling"),
        SLICE_AXIS,
    )

    def __init__(self, data_dir=None, pairs_csv=None, ndim=None, num_classes=None,
                 class_names=None, clip_percentiles=None, slice_axis=None, image_size=None):
        super().__init__()
        if pairs_csv is None and data_dir is not None:
            pairs_csv = os.path.join(data_dir, "pairs.csv")
        if pairs_csv is None:
            raise ValueError("dataset 'folder' needs --pairs-csv (columns pair_id,fixed,moving,"
                             "fixed_seg,moving_seg[,fixed_kp,moving_kp][,split])")
        self.pairs_csv = require_file(os.path.abspath(pairs_csv), "pairs CSV")
        if image_size is not None:
            warnings.warn("--image-size is ignored for dataset 'folder' (no resampling)",
                          stacklevel=3)
        self.clip_percentiles = (None if clip_percentiles is None
                                 else tuple(float(p) for p in clip_percentiles))
        if self.clip_percentiles is not None and not (
                len(self.clip_percentiles) == 2
                and 0 <= self.clip_percentiles[0] < self.clip_percentiles[1] <= 100):
            raise ValueError(f"clip_percentiles must be LO HI with 0 <= LO < HI <= 100, got "
                             f"{clip_percentiles}")
        self._requested_ndim = None if ndim is None else int(ndim)
        self.slice_axis = 2 if slice_axis is None else int(slice_axis)
        self._given_num_classes = None if num_classes is None else int(num_classes)
        if class_names is not None:
            class_names = split_class_names(class_names)
            if num_classes is not None and len(class_names) != int(num_classes):
                raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
            self._given_num_classes = len(class_names)
        self._given_class_names = class_names
        self._rows, self._has_split = self._read_csv()
        self._layout = self._infer_layout()
        self.ndim = len(self._layout["kept"])

    def _read_csv(self):
        base = os.path.dirname(self.pairs_csv)
        # utf-8-sig: the byte order mark spreadsheet programs write is not part of the first column
        try:
            with open(self.pairs_csv, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                columns = [c.strip() for c in (reader.fieldnames or [])]
                missing = [c for c in self.REQUIRED if c not in columns]
                if missing:
                    raise ValueError(f"pairs CSV {self.pairs_csv} lacks column(s) {missing}; "
                                     f"found {columns}")
                rows = []
                for r in reader:
                    if None in r:  # DictReader's key for the fields beyond the header
                        raise ValueError(f"pairs CSV {self.pairs_csv} line {reader.line_num} has more fields "
                                         f"than its header ({len(columns)}); quote values that contain commas")
                    rows.append({(k or "").strip(): (v or "").strip() for k, v in r.items()})
        except UnicodeDecodeError as exc:
            raise ValueError(f"pairs CSV {self.pairs_csv} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                             f"at offset {exc.start}); save it as UTF-8 CSV") from None
        except csv.Error as exc:
            raise ValueError(f"pairs CSV {self.pairs_csv} is not a readable CSV table ({exc})") from None
        if not rows:
            raise ValueError(f"pairs CSV {self.pairs_csv} lists no pairs")
        has_split = "split" in columns
        has_kp = "fixed_kp" in columns and "moving_kp" in columns
        out, seen = {}, set()
        for line, row in enumerate(rows, start=2):
            pid = row["pair_id"]
            if not pid:
                raise ValueError(f"{self.pairs_csv} line {line}: empty pair_id")
            if pid in seen:
                raise ValueError(f"{self.pairs_csv} line {line}: duplicate pair_id {pid!r}")
            seen.add(pid)
            entry = {}
            for key in ("fixed", "moving", "fixed_seg", "moving_seg"):
                if not row[key]:
                    raise ValueError(f"{self.pairs_csv} line {line}: empty {key!r} column")
                entry[key] = require_file(os.path.normpath(os.path.join(base, row[key])),
                                           f"{key} of pair {pid} ({self.pairs_csv})")
            for key in ("fixed_kp", "moving_kp"):
                value = row.get(key, "") if has_kp else ""
                entry[key] = (require_file(os.path.normpath(os.path.join(base, value)),
                                            f"{key} of pair {pid} ({self.pairs_csv})")
                              if value else None)
            if (entry["fixed_kp"] is None) != (entry["moving_kp"] is None):
                raise ValueError(f"{self.pairs_csv} line {line}: give both fixed_kp and "
                                 f"moving_kp or neither")
            if has_split:
                split = row["split"].lower()
                if split not in SPLITS:
                    raise ValueError(f"{self.pairs_csv} line {line}: split {row['split']!r} is "
                                     f"not one of {SPLITS}")
                entry["split"] = split
            out[pid] = entry
        return out, has_split

    def _infer_layout(self) -> dict:
        first = next(iter(self._rows.values()))["fixed"]
        shape = nifti_shape(first, "fixed image")
        if len(shape) > 3 and any(s != 1 for s in shape[3:]):
            raise ValueError(f"fixed image {first} has shape {shape}; expected 2D or 3D")
        shape3 = tuple(shape[:3]) + (1,) * (3 - len(shape[:3]))
        non_single = [a for a in range(3) if shape3[a] > 1]
        if len(non_single) == 3:
            if self._requested_ndim == 2:
                ax = self.slice_axis
                if ax not in (0, 1, 2):
                    raise ValueError(f"slice_axis must be 0, 1 or 2, got {ax}")
                return {"kept": [a for a in range(3) if a != ax], "drop": ax, "mode": "slice"}
            return {"kept": [0, 1, 2], "drop": None, "mode": "3d"}
        if len(non_single) == 2:
            if self._requested_ndim == 3:
                raise ValueError(f"--ndim 3 requested but {first} is a 2D image {shape}")
            drop = [a for a in range(3) if a not in non_single][0]
            return {"kept": non_single, "drop": drop, "mode": "squeeze"}
        raise ValueError(f"fixed image {first} has shape {shape}: need at least two axes "
                         f"longer than 1")

    def _all_ids(self):
        return list(self._rows)

    def _split_table(self):
        if not self._has_split:
            return super()._split_table()
        return {s: [pid for pid, e in self._rows.items() if e["split"] == s] for s in SPLITS}

    def _infer_image_shape(self):
        first = next(iter(self._rows.values()))["fixed"]
        shape = nifti_shape(first, "fixed image")
        shape3 = tuple(shape[:3]) + (1,) * (3 - len(shape[:3]))
        return tuple(shape3[a] for a in self._layout["kept"])

    def _infer_class_names(self):
        if self._given_class_names is not None:
            return self._given_class_names
        if self._given_num_classes is not None:
            n = self._given_num_classes
        else:
            found_fixed: set = set()
            moving_labels = {}
            for entry in self._rows.values():
                found_fixed.update(np.unique(load_labels(entry["fixed_seg"], None, "fixed label map")).tolist())
                moving_labels[entry["moving_seg"]] = set(
                    np.unique(load_labels(entry["moving_seg"], None, "moving label map")).tolist())
            n = max(found_fixed)
            if n == 0:
                raise ValueError(f"no foreground labels in the fixed label maps of "
                                 f"{self.pairs_csv}; pass --num-classes")
            # the fixed maps define the classes: a label only some moving map has would become a class
            # that no fixed segmentation (no Dice, no parameter map) ever contains
            extra = {path: sorted(c for c in labels if c > n) for path, labels in moving_labels.items()}
            extra = {path: labels for path, labels in extra.items() if labels}
            if extra:
                path, labels = next(iter(extra.items()))
                raise ValueError(f"moving label map {path} has label(s) {labels} that no fixed label map of "
                                 f"{self.pairs_csv} has (fixed labels 0..{n}; {len(extra)} moving map(s) affected); "
                                 f"fix the label map, or declare the classes with --num-classes/--class-names")
            found = found_fixed.union(*moving_labels.values())
            empty = [c for c in range(1, n + 1) if c not in found]
            if empty:
                warnings.warn(
                    f"folder dataset {self.pairs_csv}: classes {', '.join(f'class{c}' for c in empty)} have no "
                    f"voxels in any label map (labels found: {sorted(found)}); the class count {n} comes from "
                    f"the largest label. Declare the classes with --num-classes/--class-names (other labels "
                    f"are then an error) or fix the label maps", stacklevel=2)
        return tuple(f"class{c}" for c in range(1, n + 1))

    def _normalize(self, img: np.ndarray, path: str) -> np.ndarray:
        return minmax_scale(img, self.clip_percentiles, f"image {path}")

    def _prepare(self, img_path: str, seg_path: str, what: str):
        img, affine, zooms = load_image(img_path, f"{what} image")
        img = as_3d(img, img_path, f"{what} image")
        lay = self._layout
        if lay["mode"] == "squeeze" and img.shape[lay["drop"]] > 1 and self._requested_ndim != 2:
            first = next(iter(self._rows.values()))["fixed"]
            raise ValueError(f"{what} image {img_path} is a 3D volume {img.shape} but the dataset is 2D "
                             f"(its first image {first} is 2D); pass --ndim 2 to use the middle slice "
                             f"along axis {lay['drop']}, or list only 2D images")
        lab = as_3d(load_labels(seg_path, self.num_classes, f"{what} label map"), seg_path,
                     "label map")
        check_same_shape(img, img_path, lab, seg_path)
        img = self._normalize(img, img_path)
        zooms3 = tuple(float(z) for z in zooms[:3]) + (1.0,) * (3 - len(zooms[:3]))
        lay = self._layout
        if lay["mode"] == "3d":
            new_to_raw = np.eye(4)
        else:
            index = img.shape[lay["drop"]] // 2
            img = np.take(img, index, axis=lay["drop"])
            lab = np.take(lab, index, axis=lay["drop"])
            new_to_raw = slice_matrix(lay["drop"], index)
        spacing = tuple(zooms3[a] for a in lay["kept"])
        return img, lab, affine, new_to_raw, spacing

    def _warn_geometry(self, pair_id: str, fixed: tuple, moving: tuple) -> None:
        """Warn when the moving image's voxel size or axis directions (``(spacing, affine)``)
        differ from the fixed image's: the arrays are registered voxel to voxel, not resampled."""
        (fsp, faff), (msp, maff) = fixed, moving
        e = self._rows[pair_id]
        what = []
        if not np.allclose(fsp, msp, rtol=1e-3, atol=1e-6):
            what.append(f"voxel size ({', '.join(f'{v:g}' for v in msp)} mm vs "
                        f"{', '.join(f'{v:g}' for v in fsp)} mm)")
        if not np.allclose(_directions(faff), _directions(maff), atol=1e-3):
            what.append("axis directions (affine)")
        if what:
            warnings.warn(f"pair {pair_id}: moving image {e['moving']} differs from its fixed image {e['fixed']} "
                          f"in {' and '.join(what)}; nothing is resampled (the arrays are registered voxel to voxel, "
                          f"with the fixed spacing): resample the moving image onto the fixed grid first",
                          stacklevel=4)

    def _keypoints(self, path, new_to_raw, shape):
        lay = self._layout
        if path is None or lay["mode"] == "slice":
            return None
        kp = load_keypoints(path, (2, 3) if lay["mode"] == "squeeze" else 3)
        if kp.shape[1] == 2:
            full = np.zeros((len(kp), 3))
            full[:, lay["kept"]] = kp
            kp = full
        kp = points_to_grid(kp, new_to_raw, self.ndim).astype(np.float32)
        warn_outside(kp, shape, f"keypoints of {path}")
        return kp

    def _load_pair(self, pair_id: str) -> RegistrationPair:
        e = self._rows[pair_id]
        fimg, flab, faff, fmap, spacing = self._prepare(e["fixed"], e["fixed_seg"], "fixed")
        mimg, mlab, maff, mmap, mspacing = self._prepare(e["moving"], e["moving_seg"], "moving")
        self._warn_geometry(pair_id, (spacing, faff), (mspacing, maff))
        if fimg.shape != mimg.shape:
            raise ValueError(f"shape mismatch: fixed {e['fixed']} gives {fimg.shape} but moving "
                             f"{e['moving']} gives {mimg.shape}")
        if self._layout["mode"] == "slice" and e["fixed_kp"] is not None:
            warnings.warn(f"pair {pair_id}: keypoints are dropped for 2D slices of 3D volumes",
                          stacklevel=3)
        keypoints = (self._keypoints(e["fixed_kp"], fmap, fimg.shape),
                     self._keypoints(e["moving_kp"], mmap, mimg.shape))
        return assemble_pair(pair_id, (e["fixed"], fimg, flab), (e["moving"], mimg, mlab), spacing,
                             faff @ fmap, keypoints)
