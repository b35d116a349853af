"""Tissue label maps for ``nlst`` / ``l2r-lung`` from TotalSegmentator output
(``python -m datasets make-labels``; the paper text: lung, bone = vertebrae + ribs + sternum, liver
"generated with the TotalSegmentator tool").

Input: one TotalSegmentator output folder per image, named like the image without extension
(``<ts-dir>/NLST_0001_0000/``, what ``TotalSegmentator -i NLST_0001_0000.nii.gz -o
<ts-dir>/NLST_0001_0000`` writes), holding its documented per-structure masks:

* 1 lung: ``lung_upper_lobe_left``, ``lung_lower_lobe_left``, ``lung_upper_lobe_right``,
  ``lung_middle_lobe_right``, ``lung_lower_lobe_right``
* 2 bone: every ``vertebrae_*``, every ``rib_*`` (``rib_left_1`` .. ``rib_right_12``), ``sternum``
* 3 liver: ``liver``

(``.nii.gz``; absent files are simply absent structures). The paper text takes the lung from the
masks the datasets provide ("in addition to the already provided lung segmentation masks"):
``--lung-masks <data>/masksTr`` uses ``<lung-masks>/<case>.nii.gz`` (> 0) for class 1 instead of
TotalSegmentator's lobes. Where masks overlap the later class wins
(liver over bone over lung). Output: ``<out>/<image stem>.nii.gz``, uint8, on the masks' grid (all
masks of a case must share shape and affine; with ``--images`` each map is also checked against its
image's affine and refused on a mismatch) -- the names and values ``--label-dir`` expects.
"""
from __future__ import annotations

import glob
import os
from typing import Dict, List, Optional

import numpy as np

from .nifti import check_label_grid, import_nibabel, read_nifti, require_dir

CLASSES = ("lung", "bone", "liver")
LUNG_LOBES = ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
              "lung_middle_lobe_right", "lung_lower_lobe_right")


def structure_files(case_dir: str) -> Dict[int, List[str]]:
    """``{class value: [mask files]}`` of one TotalSegmentator output folder."""
    def present(names):
        return sorted(p for p in names if os.path.isfile(p))

    def pattern(p):
        return glob.glob(os.path.join(case_dir, p))

    return {
        1: present([os.path.join(case_dir, n + ".nii.gz") for n in LUNG_LOBES]),
        2: present(pattern("vertebrae_*.nii.gz") + pattern("rib_*.nii.gz") + [os.path.join(case_dir, "sternum.nii.gz")]),
        3: present([os.path.join(case_dir, "liver.nii.gz")]),
    }


def merge_case(case_dir: str, image_path: Optional[str] = None, lung_mask: Optional[str] = None):
    """The merged label map of one case: ``(labels uint8, affine 4x4, voxels per class {1,2,3})``;
    ``lung_mask``: a lung mask file used for class 1 instead of the lobes. Raises ``ValueError``
    naming the files when masks disagree on the grid (or with the image)."""
    files = structure_files(case_dir)
    if lung_mask is not None:
        files[1] = [lung_mask]
    if not any(files.values()):
        raise FileNotFoundError(f"{case_dir}: none of TotalSegmentator's lung lobe, vertebrae, rib, sternum or "
                                f"liver masks found")
    labels, affine, first = None, None, None
    for value in (1, 2, 3):
        for path in files[value]:
            data, aff, _ = read_nifti(path, "TotalSegmentator mask")
            if labels is None:
                labels, affine, first = np.zeros(data.shape, np.uint8), aff, path
            check_label_grid(labels.shape, affine, first, data.shape, aff, path)
            labels[np.asarray(data) > 0] = value
    if image_path is not None:
        nib = import_nibabel()
        img = nib.load(image_path)
        check_label_grid(img.shape[:3], img.affine, image_path, labels.shape, affine, case_dir)
    counts = {v: int(np.sum(labels == v)) for v in (1, 2, 3)}
    return labels, affine, counts


def make_labels(ts_dir: str, out_dir: str, images_dir: Optional[str] = None, lung_masks: Optional[str] = None,
                log=print) -> Dict[str, Dict[int, int]]:
    """Merge every case folder of ``ts_dir`` into ``out_dir/<case>.nii.gz``; print (``log``) the
    voxels per class of each case and the cases missing a class. ``lung_masks``: a folder of
    ``<case>.nii.gz`` lung masks (e.g. the dataset's ``masksTr``) for class 1. Returns
    ``{case: {class: voxels}}``."""
    from .atomic import atomic_write

    require_dir(ts_dir, "TotalSegmentator output folder")
    cases = sorted(d for d in os.listdir(ts_dir) if os.path.isdir(os.path.join(ts_dir, d)))
    if not cases:
        raise ValueError(f"{ts_dir} holds no case folders (one TotalSegmentator output folder per image)")
    os.makedirs(out_dir, exist_ok=True)
    nib = import_nibabel()
    report: Dict[str, Dict[int, int]] = {}
    for case in cases:
        image = None
        if images_dir is not None:
            for ext in (".nii.gz", ".nii"):
                if os.path.isfile(os.path.join(images_dir, case + ext)):
                    image = os.path.join(images_dir, case + ext)
        lung = None
        if lung_masks is not None:
            from .nifti import find_nifti

            lung = find_nifti(lung_masks, case, "lung mask")
        labels, affine, counts = merge_case(os.path.join(ts_dir, case), image, lung)
        path = os.path.join(out_dir, case + ".nii.gz")
        atomic_write(path, lambda tmp, a=labels, f=affine: nib.save(nib.Nifti1Image(a, f), tmp))
        report[case] = counts
    if log is not None:
        log(f"{'case':<24}" + "".join(f"{c:>12}" for c in CLASSES))
        for case, counts in report.items():
            log(f"{case:<24}" + "".join(f"{counts[v]:>12d}" for v in (1, 2, 3)))
        for v, name in enumerate(CLASSES, 1):
            without = [c for c, counts in report.items() if counts[v] == 0]
            if without:
                log(f"{len(without)} case(s) without {name}: {', '.join(without)}")
        log(f"wrote {len(report)} label maps (1 lung, 2 bone, 3 liver) to {out_dir}")
    return report
