"""Named split schemes of the paper's datasets (``--split-scheme``), the subject lists of the
authors' released code, and the ordered cut. Standard library only.

``authors``
    The subject lists read off the authors' ``datasets.py`` (see ``docs/paper_datasets.md``):

    * NLST: test ``NLST_0001..0030``, val ``NLST_0101..0110`` (the ``registration_val`` pairs of
      ``NLST_dataset.json``), train ``NLST_0031..0100`` and ``NLST_0200..0299``. The authors'
      code starts its train range at 0030, so NLST_0030 is in their train *and* test set; here it
      is test only (170 training pairs, not their 171).
    * LungCT: train ``LungCT_0001..0020`` (``imagesTr``), val ``LungCT_0021..0023``, test
      ``LungCT_0024, 0025, 0028, 0029`` (``imagesTs``; 0026 and 0027 have no liver).
    * ACDC: train ``training/patient001..100``, val ``testing/patient101..120``, test
      ``testing/patient121..150``.

``ordered``
    Contiguous train / val / test blocks of the sorted pairs in the ratios of the paper text
    (:func:`datasets.base.split_sizes`), what this project did before the schemes existed.

``paper-text`` (ACDC only)
    The paper text's 50/20/30, taken from ``training/`` (the text does not say which subjects):
    each pathology group of ``Info.cfg`` (20 patients each) gives its first 10 to train, the next
    4 to val and the last 6 to test, so every split sees every group (a contiguous cut would put
    only NOR and RV patients in the test set).
"""
from __future__ import annotations

from typing import Dict, List, Sequence


def _ids(prefix: str, numbers, width: int = 4) -> List[str]:
    return [f"{prefix}{n:0{width}d}" for n in numbers]


#: the authors' NLST subject lists, without their NLST_0030 train/test overlap
NLST_AUTHORS: Dict[str, List[str]] = {
    "train": _ids("NLST_", [*range(31, 101), *range(200, 300)]),
    "val": _ids("NLST_", range(101, 111)),
    "test": _ids("NLST_", range(1, 31)),
}
#: the authors' Learn2Reg LungCT lists (val/test from imagesTs)
LUNGCT_AUTHORS: Dict[str, List[str]] = {
    "train": _ids("LungCT_", range(1, 21)),
    "val": _ids("LungCT_", range(21, 24)),
    "test": _ids("LungCT_", (24, 25, 28, 29)),
}
#: the authors' ACDC lists (train from training/, val and test from testing/)
ACDC_AUTHORS: Dict[str, List[str]] = {
    "train": _ids("patient", range(1, 101), 3),
    "val": _ids("patient", range(101, 121), 3),
    "test": _ids("patient", range(121, 151), 3),
}


def check_scheme(dataset: str, scheme: str, allowed: Sequence[str]) -> str:
    """``scheme`` if ``dataset`` offers it, else a ``ValueError`` naming the choices."""
    if scheme not in allowed:
        raise ValueError(f"dataset {dataset!r}: --split-scheme {scheme!r} is not offered; choose one of "
                         f"{tuple(allowed)} (docs/paper_datasets.md)")
    return scheme


def grouped_cut(ids_by_group: Dict[str, List[str]], ratios: Sequence[int]) -> Dict[str, List[str]]:
    """Cut every group's sorted ids into train/val/test blocks of ``ratios`` (scaled to the group
    size as :func:`datasets.base.split_sizes` does); each split lists its ids in sorted order."""
    from .base import SPLITS, split_sizes

    table: Dict[str, List[str]] = {s: [] for s in SPLITS}
    for group in sorted(ids_by_group):
        ids = sorted(ids_by_group[group])
        start = 0
        for split, size in zip(SPLITS, split_sizes(len(ids), ratios)):
            table[split] += ids[start:start + size]
            start += size
    return {s: sorted(v) for s, v in table.items()}


def describe_ids(ids: Sequence[str]) -> str:
    """``NLST_0001..0030, NLST_0200..0299`` style summary of sorted ids with numeric tails."""
    import re

    runs: List[List] = []
    for pid in ids:
        m = re.match(r"^(.*?)(\d+)$", pid)
        if not m:
            runs.append([pid, None, None, None])
            continue
        prefix, num, width = m.group(1), int(m.group(2)), len(m.group(2))
        last = runs[-1] if runs else None
        if last and last[1] is not None and last[0] == prefix and last[2] + 1 == num:
            last[2] = num
        else:
            runs.append([prefix, num, num, width])
    parts = []
    for prefix, lo, hi, width in runs:
        if lo is None:
            parts.append(prefix)
        elif lo == hi:
            parts.append(f"{prefix}{lo:0{width}d}")
        else:
            parts.append(f"{prefix}{lo:0{width}d}..{hi:0{width}d}")
    return ", ".join(parts)


def missing_files_error(dataset: str, scheme: str, count: str, missing: Sequence[str], where: str,
                        unit: str = "pairs") -> FileNotFoundError:
    """The one error a loader raises for every file its splits need and cannot find: the dataset,
    its split scheme, ``count`` (e.g. "30 pairs"), the files (:func:`describe_missing`), ``where``
    they were looked for, and that ``--split-scheme ordered`` uses only the ``unit`` on disk."""
    shown = "\n  ".join(describe_missing(missing))
    return FileNotFoundError(f"dataset {dataset!r} (--split-scheme {scheme}, {count}): {len(missing)} file(s) not "
                             f"found:\n  {shown}\n({where}; --split-scheme ordered uses only the {unit} that are there)")


def describe_missing(paths: Sequence[str], limit: int = 20) -> List[str]:
    """Missing files as lines: up to ``limit`` files one path per line; more, every file named but runs compressed: ``<folder>/: NLST_0007..0030,
    NLST_0101..0110 (_0000.nii.gz)`` for Learn2Reg images/label maps, ``<folder>/: patient101..150
    (<patient>/Info.cfg)`` for ACDC patient folders; anything else one path per line."""
    import os
    import re

    if len(paths) <= limit:
        return list(paths)
    groups: Dict[tuple, List[str]] = {}
    plain: List[str] = []
    for path in paths:
        folder, base = os.path.dirname(path), os.path.basename(path)
        m = re.match(r"^(.*?_\d+)(_\d{4})?(\.nii\.gz|\.nii|\.csv)$", base)
        if m:
            groups.setdefault((folder, (m.group(2) or "") + m.group(3)), []).append(m.group(1))
        elif base == "Info.cfg":
            groups.setdefault((os.path.dirname(folder), "<patient>/Info.cfg"), []).append(os.path.basename(folder))
        else:
            plain.append(path)
    lines = [f"{folder}{os.sep}: {describe_ids(sorted(ids))} ({tail})" for (folder, tail), ids in sorted(groups.items())]
    return lines + plain
