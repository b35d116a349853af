"""Content hashes that tie every stage's output to the data and weights that produced it.

Recorded as ``"provenance"`` in ``config.json`` (training), ``identification.json`` and
``inference.json``:

- ``data``: ``{split: sha256}`` per split (:func:`data_hashes`). A folder dataset hashes its
  pairs CSV rows of the split (pair id, split, keypoint columns present) and the *bytes* of every
  file a row names (so a replaced image, or a train/val swap in the same CSV, changes it, while
  the same files under another folder do not); the synthetic dataset hashes its generator key
  (the cache file name of every pair: generator version, image size, motion, seed) and options;
  any other dataset hashes the loaded arrays of every pair, and its split scheme, target spacing
  and body mask where it has them (``--split-scheme``: a run trained on another scheme's split
  never matches).
- ``weights_sha256`` (training, at the end) and, in the later stages, the sha256 of every
  ``weights.h5`` they used (:func:`.artifacts.file_sha256`).

Later stages compare with :func:`mismatches` and refuse unless ``--force`` (then the messages are
recorded under ``forced``). Hashing is cheap: each file's bytes are hashed once per process,
cached by ``(path, size, mtime)``.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from datasets.base import SPLITS

from .artifacts import CONFIG, WEIGHTS, file_sha256, short

def _digest(items: Iterable) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def _folder_rows(dataset, ids: Sequence[str]) -> List:
    rows = []
    for pid in ids:
        entry = dataset._rows[pid]
        files = {k: (file_sha256(v) if v else None) for k, v in entry.items() if k != "split"}
        rows.append([pid, entry.get("split", ""), files])
    return rows


def _synthetic_rows(dataset, ids: Sequence[str]) -> List:
    return [[pid, os.path.basename(dataset.cache_path(pid))] for pid in ids]


def _array_rows(dataset, ids: Sequence[str]) -> List:
    rows = []
    for pid in ids:
        pair = dataset.load_pair(pid)
        h = hashlib.sha256()
        for name in ("fixed", "moving", "fixed_seg", "moving_seg"):
            a = np.ascontiguousarray(getattr(pair, name))
            h.update(f"{name}{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
        rows.append([pid, h.hexdigest()])
    return rows


def data_hashes(dataset, splits: Sequence[str] = ("train", "val", "test")) -> Dict[str, str]:
    """``{split: sha256}`` of the pairs of each split (see the module docstring); an empty split
    hashes the empty list. Class names and spacing-relevant options are part of every hash."""
    if getattr(dataset, "name", "") == "folder" and hasattr(dataset, "_rows"):
        rows_of, kind = _folder_rows, "folder"
    elif getattr(dataset, "name", "") == "synthetic" and hasattr(dataset, "cache_path"):
        rows_of, kind = _synthetic_rows, "synthetic"
    else:
        rows_of, kind = _array_rows, dataset.name
    extra = {"kind": kind, "classes": list(dataset.class_names),
             "pairing": getattr(dataset, "pairing", None), "clip": getattr(dataset, "clip_percentiles", None),
             "ndim": getattr(dataset, "ndim", None), "slice_axis": getattr(dataset, "slice_axis", None)}
    # the named split scheme and resampling of the paper's datasets (absent elsewhere: old hashes stay)
    for key in ("split_scheme", "target_spacing", "body_mask"):
        if getattr(dataset, key, None) is not None:
            extra[key] = getattr(dataset, key)
    out = {}
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
        try:
            ids = dataset.split_ids(split)
        except ValueError:  # empty split
            ids = []
        out[split] = _digest([extra, *rows_of(dataset, ids)])
    return out


def weights_sha256(run_dir: str) -> Optional[str]:
    """sha256 of ``<run>/weights.h5`` (None if it does not exist)."""
    path = os.path.join(run_dir, WEIGHTS)
    return file_sha256(path) if os.path.isfile(path) else None


def data_mismatches(recorded: Optional[Dict], current: Dict[str, str], recorded_by: str,
                    current_from: str) -> List[str]:
    """Messages for every split whose hash in ``recorded`` (a provenance ``data`` dict; missing:
    nothing to compare) differs from ``current``."""
    if not recorded:
        return []
    return [f"the {split} pairs differ from those {recorded_by} recorded (data sha256 {short(recorded[split])} "
            f"in {recorded_by}, {short(h)} from {current_from}: pairs CSV rows, splits or the files they name changed)"
            for split, h in current.items() if split in recorded and recorded[split] != h]


def weight_mismatch(recorded: Optional[str], run_dir: str, recorded_by: str) -> List[str]:
    """A message if ``<run>/weights.h5`` no longer has the sha256 ``recorded`` by ``recorded_by``."""
    if not recorded:
        return []
    now = weights_sha256(run_dir)
    if now == recorded:
        return []
    return [f"{os.path.join(run_dir, WEIGHTS)} (sha256 {short(now)}) is not the file {recorded_by} used "
            f"(sha256 {short(recorded)}): the run was retrained or replaced since"]


def run_problems(run_dir: str, config: Dict, current: Dict[str, str], data_from: str = "the dataset now") -> List[str]:
    """Mismatches between a run folder's recorded provenance (``config.json``) and now: its
    ``weights.h5`` replaced, or the data of the splits in ``current`` changed."""
    rec = config.get("provenance") or {}
    where = os.path.join(run_dir, CONFIG)
    return (weight_mismatch(rec.get("weights_sha256"), run_dir, where)
            + data_mismatches(rec.get("data"), current, where, data_from))


def refuse_or_force(problems: Sequence[str], force: bool, stage: str, log=print) -> List[str]:
    """Raise a ValueError listing ``problems`` unless ``force``; with ``force`` print them and
    return them (to be recorded as ``provenance.forced``)."""
    if not problems:
        return []
    text = "; ".join(problems)
    if not force:
        raise ValueError(f"{stage}: provenance mismatch: {text}. Redo the earlier stage with the current "
                         f"data/weights, or pass --force to proceed anyway (recorded in the output)")
    log(f"[{stage}] --force: proceeding despite: {text}")
    return list(problems)


def check_runs(runs: Sequence[Tuple[str, Dict]], dataset, splits: Sequence[str], force: bool,
               data_dir: Optional[str] = None, stage: str = "identification", log=print) -> Dict:
    """Compare each ``(run folder, config)`` of ``runs`` with the data (``splits`` of ``dataset``)
    and weights now; refuse a mismatch unless ``force``. Returns the output's ``provenance``
    entry: ``{"data": {split: sha256}, "weights_sha256": {run: sha256}, "forced": [messages]}``."""
    hashes = data_hashes(dataset, sorted(set(splits)))
    data_from = "the dataset now" + (f" (--data-dir {data_dir})" if data_dir else "")
    problems = [p for run, cfg in runs for p in run_problems(run, cfg, hashes, data_from)]
    forced = refuse_or_force(problems, force, stage, log=log)
    return {"data": hashes, "weights_sha256": {os.path.abspath(run): weights_sha256(run) for run, _ in runs},
            "forced": forced}
