"""``python -m datasets``: commands for the paper's datasets.

* ``check``: build a dataset from the usual data options and print the split and geometry a
  training run would use (split scheme, ids per split, pairs on disk left out, keypoints,
  preprocessing, image shape and spacing of the first training pair, ``crop_in_loss`` default);
  ``--all`` also reads and validates every pair (:func:`datasets.validate_dataset`).
* ``make-labels``: merge TotalSegmentator output folders into 1 lung / 2 bone / 3 liver label maps
  (:mod:`datasets.labels`).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

from .base import SPLITS, validate_dataset
from .cli import add_dataset_args, dataset_from_args
from .splits import describe_ids


def check_lines(dataset) -> List[str]:
    """The lines ``check`` prints for ``dataset`` (loads the first training pair)."""
    table = dataset._splits()
    lines = [f"dataset {dataset.name}: {getattr(dataset, 'data_dir', '')}",
             f"split scheme: {getattr(dataset, 'split_scheme', None) or 'fixed by the dataset'}"]
    for split in SPLITS:
        ids = table[split]
        lines.append(f"  {split:<5} {len(ids):>4} pairs: {describe_ids(sorted(ids)) if ids else '-'}")
    if dataset.name == "nlst" and getattr(dataset, "split_scheme", None) == "authors":
        lines.append("  (NLST_0030 is a test pair only; the authors' code also trains on it)")
    found = getattr(dataset, "_found", None)
    if found is not None:
        unused = sorted(set(found) - {p for s in SPLITS for p in table[s]})
        if unused:
            lines.append(f"  on disk, in no split: {len(unused)} pairs ({describe_ids(unused)})")
    if getattr(dataset, "ndim", 2) == 3 and hasattr(dataset, "keypoint_status"):
        status = dataset.keypoint_status()
        without = sorted(p for p, ok in status.items() if not ok)
        lines.append(f"keypoints: {len(status) - len(without)} of {len(status)} pairs"
                     + (f" (without: {describe_ids(without)}; TRE over the others)" if without else ""))
    if hasattr(dataset, "preprocessing_summary"):
        lines.append(f"preprocessing: {dataset.preprocessing_summary()}")
    first = next((table[s][0] for s in SPLITS if table[s]), None)
    pair = dataset.load_pair(first)
    lines.append(f"geometry: {dataset.ndim}D {' x '.join(map(str, dataset.image_shape))} voxels at "
                 f"{' x '.join(f'{s:g}' for s in pair.spacing)} mm (pair {first})")
    lines.append(f"classes: {', '.join(dataset.class_names)}")
    lines.append(f"crop_in_loss default: {getattr(dataset, 'crop_in_loss_default', False)}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m datasets", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="print the split and geometry a run would train on",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataset_args(c)
    c.add_argument("--all", action="store_true", help="also read and validate every pair of every split")
    m = sub.add_parser("make-labels", help="merge TotalSegmentator outputs into 1 lung / 2 bone / 3 liver maps",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m.add_argument("--ts-dir", required=True,
                   help="folder with one TotalSegmentator output folder per image, named like the image "
                        "without extension (e.g. NLST_0001_0000/)")
    m.add_argument("--out", required=True, help="folder to write <image stem>.nii.gz label maps to (--label-dir)")
    m.add_argument("--lung-masks", default=None,
                   help="folder of <case>.nii.gz lung masks (e.g. <data>/masksTr) for class 1 instead of "
                        "TotalSegmentator's lobes: the paper text uses the datasets' own lung masks")
    m.add_argument("--images", default=None,
                   help="optional image folder (e.g. imagesTr): every map is checked against its image's affine")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        ds = dataset_from_args(args)
        for line in check_lines(ds):
            print(line)
        if args.all:
            validate_dataset(ds)
        return 0
    from .labels import make_labels

    make_labels(args.ts_dir, args.out, args.images, args.lung_masks)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
