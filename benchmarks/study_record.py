"""The study's durable record: the small files of each finished unit, kept in git.

A study unit (one setting x seed of ``benchmarks/study.py``) takes about an hour on 2 cores, and a
work tree does not always outlive a session. Its weights and volumes are large and stay in
``outputs/``; everything the study's tables, comparisons and response/stiffness checks read is
small. ``save`` copies those files of a finished unit into ``--record`` (CSV files gzipped, so a
unit costs a few hundred kB); ``restore`` puts them back, so that ``study.py`` finds the unit
finished (``DONE.json``) and collects it without re-running it, and ``smooth_maps.py`` finds its
smoothed results.

Kept per unit: ``DONE.json``; every ``.csv``, ``.json`` and ``.md`` below the unit except inside a
trained run folder (``runs/<name>/``), of which only ``config.json`` is kept (the command that
trained it), and the gradient identifications' ``objective_trace.csv``. Not kept: weights, checkpoints, NIfTI volumes, figures, logs.

Usage::

    .venv/bin/python benchmarks/study_record.py save    --study outputs/study --record docs/study_record
    .venv/bin/python benchmarks/study_record.py restore --study outputs/study --record docs/study_record
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import shutil
import sys
import zlib
from typing import Iterator, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.atomic import atomic_write  # noqa: E402
from hypermorph_spatially_adaptive.artifacts import CONFIG, OBJECTIVE_TRACE  # noqa: E402  (no TensorFlow)

#: file types kept from a unit
KEPT_SUFFIXES = (".csv", ".json", ".md")
#: files of those types left out: per-step traces of the gradient identification (~20 % of a unit's
#: record; nothing of the study reads them)
LEFT_OUT = (OBJECTIVE_TRACE,)


def _kept(rel: str) -> bool:
    """Whether the unit-relative path ``rel`` belongs to the record."""
    parts = rel.split(os.sep)
    if not rel.endswith(KEPT_SUFFIXES) or parts[-1] in LEFT_OUT:
        return False
    if "runs" in parts[:-1]:
        # inside runs/<name>/...: only the run's own config.json (its training command)
        i = parts.index("runs")
        return len(parts) == i + 3 and parts[-1] == CONFIG
    return True


def _unit_files(unit_dir: str) -> Iterator[str]:
    for root, _, files in os.walk(unit_dir):
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), unit_dir)
            if _kept(rel):
                yield rel


def units(folder: str) -> List[str]:
    """Unit folders ``<setting>/seed<S>`` (relative) below ``folder`` that hold a ``DONE.json``."""
    out = []
    if not os.path.isdir(folder):
        return out
    for setting in sorted(os.listdir(folder)):
        sdir = os.path.join(folder, setting)
        if not os.path.isdir(sdir):
            continue
        for seed in sorted(os.listdir(sdir)):
            if seed.startswith("seed") and os.path.isfile(os.path.join(sdir, seed, "DONE.json")):
                out.append(os.path.join(setting, seed))
    return out


#: what reading or writing a record file can raise (a read-only folder, a truncated or corrupt gzip)
_FILE_ERRORS = (OSError, EOFError, zlib.error)


class RecordError(ValueError):
    """A record or study file that cannot be read or written; the message names it."""


@contextlib.contextmanager
def _naming(path: str, doing: str) -> Iterator[None]:
    """Turn a file error inside the block into a :class:`RecordError` naming ``path``."""
    try:
        yield
    except _FILE_ERRORS as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise RecordError(f"{path}: cannot {doing} ({type(exc).__name__}: {reason})") from exc


def save_unit(study: str, record: str, unit: str) -> int:
    """Copy the kept files of ``study/unit`` into ``record/unit`` (CSV gzipped, deterministic bytes:
    no time stamp in the gzip header); the record folder of the unit is replaced as a whole: the new
    one is written into a hidden sibling and renamed into place before the old one is removed, so a
    failure leaves the old unit (never neither). Returns the number of files; a file error raises
    :class:`RecordError` naming the file."""
    src = os.path.join(study, unit)
    if not os.path.isfile(os.path.join(src, "DONE.json")):
        raise FileNotFoundError(f"{src}: the unit is not finished (no DONE.json)")
    dst = os.path.normpath(os.path.join(record, unit))
    parent, name = os.path.dirname(dst), os.path.basename(dst)
    tmp, old = os.path.join(parent, f".{name}.tmp-{os.getpid()}"), os.path.join(parent, f".{name}.old-{os.getpid()}")
    with _naming(parent, "create the record folder"):
        os.makedirs(parent, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    n = 0
    try:
        for rel in _unit_files(src):
            out = os.path.join(tmp, rel)
            with _naming(os.path.join(src, rel), "copy into the record"):
                os.makedirs(os.path.dirname(out), exist_ok=True)
                if rel.endswith(".csv"):
                    with open(os.path.join(src, rel), "rb") as f, open(out + ".gz", "wb") as raw:
                        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as g:
                            shutil.copyfileobj(f, g)
                else:
                    shutil.copyfile(os.path.join(src, rel), out)
            n += 1
        with _naming(dst, "replace the recorded unit"):
            if os.path.lexists(dst):
                os.replace(dst, old)  # the old unit stays whole until the new one is in place
            try:
                os.replace(tmp, dst)
            except BaseException:
                if os.path.lexists(old) and not os.path.lexists(dst):
                    os.replace(old, dst)
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return n


def restore_unit(study: str, record: str, unit: str) -> int:
    """Copy ``record/unit`` back into ``study/unit`` (CSV un-gzipped), without overwriting files
    that exist there; ``DONE.json`` last, so an interrupted restore leaves the unit unfinished.
    Returns the number of files written."""
    src, dst = os.path.join(record, unit), os.path.join(study, unit)
    files = []
    for root, _, names in os.walk(src):
        files += [os.path.relpath(os.path.join(root, n), src) for n in names]
    files.sort(key=lambda r: r == "DONE.json")
    n = 0
    for rel in files:
        target = os.path.join(dst, rel[:-3] if rel.endswith(".csv.gz") else rel)
        if os.path.exists(target):
            continue
        opener = gzip.open if rel.endswith(".csv.gz") else open
        with _naming(os.path.join(src, rel), "read the recorded file"):
            with opener(os.path.join(src, rel), "rb") as f:
                data = f.read()
        with _naming(target, "write the restored file"):
            atomic_write(target, data)
        n += 1
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("action", choices=["save", "restore"],
                   help="save: finished units of --study into --record; restore: recorded units back into --study")
    p.add_argument("--study", default=os.path.join("outputs", "study"), help="study folder (benchmarks/study.py --out)")
    p.add_argument("--record", default=os.path.join("docs", "study_record"), help="record folder (in git)")
    p.add_argument("--units", nargs="*", default=None,
                   help="units as <setting>/seed<S> (default: every finished unit of the source)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    args = build_parser().parse_args(argv)
    source = args.study if args.action == "save" else args.record
    todo = args.units if args.units is not None else units(source)
    for unit in todo:
        if args.action == "save":
            n = save_unit(args.study, args.record, unit)
            print(f"[record] saved {unit}: {n} files -> {os.path.join(args.record, unit)}", flush=True)
        else:
            n = restore_unit(args.study, args.record, unit)
            print(f"[record] restored {unit}: {n} files -> {os.path.join(args.study, unit)}", flush=True)
    return list(todo)


if __name__ == "__main__":
    try:
        main()
    except (RecordError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
