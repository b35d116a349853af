"""Classical peer for Table 1: register the test pairs with ANTs (antspyx) and score them
exactly like inference.py scores our models.

For every selected pair of any dataset (default: the demo's synthetic test pairs) this runs
``ants.registration(fixed, moving, type_of_transform=T)`` for every ``--transform`` T (antspyx, a
benchmark-only dependency: ``make bench-setup``), turns ANTs' forward transforms into our
displacement field and computes the per-pair metrics with ``tables.pair_metrics`` (Dice,
HD95, TRE, %negJ, SDlogJ, dense EPE on synthetic data), plus the wall-clock seconds of the
registration. Rows: ``initial`` (zero displacement) and one per transform (:func:`method_name`):

* ``ants-synpreset``: ``antsRegistrationSyN[s]``, the ``antsRegistrationSyN.sh`` preset that
  practitioners run (rigid + affine stages with MI, then SyN with cross-correlation of radius 2,
  100x70x50x20 iterations at shrink factors 8x4x2x1 with smoothing 3x2x1x0 voxels; antspyx 0.6.3
  ``registration.py``), the default peer;
* ``ants-syn``: ``SyN``, antspyx' quick default (mutual information, affine + SyN with few
  iterations), the row of the earlier tables, kept as the quick peer.

``--merge RESULTS_DIR`` adds the rows of an inference.py output folder so one table holds our
models and the peers.

Conventions
-----------
* Our displacement ``u``: CONVENTIONS.md (fixed grid, voxels, channel ``j`` along array axis ``j``).
* The arrays go to ANTs with ``ants.from_numpy`` with origin 0, identity direction and the
  pair's voxel spacing (mm per array axis), so ITK index axis ``j`` == array axis ``j`` and a
  physical point is ``index * spacing``. ANTs' forward transforms (``fwdtransforms``: the SyN
  warp, then the affine) map a fixed-space point to the corresponding moving-space point, which
  is our convention; ``apply_transforms(..., compose=...)`` composes them into one displacement
  field on the fixed image's grid, in mm along those axes; dividing component ``j`` by
  ``spacing[j]`` gives ``u``. ``--self-check`` verifies this on known translations (isotropic
  and anisotropic spacing): ``u`` must equal the shift with the right sign on the right axis,
  and ``eval_metrics.warp_labels(moving_seg, u)`` must agree with ANTs' own nearest-neighbour
  ``apply_transforms`` of the moving labels almost everywhere.
* Determinism: ANTs' metric sampling is seeded with ``--seed`` (>= 1: antsRegistration treats 0
  as "seed from the clock"; antspyx >= 0.6 takes the seed from ``ants.config``, a
  ``random_seed=`` keyword to ``ants.registration`` would be swallowed silently). ITK's thread
  count is ``--threads`` (ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS, set before antspyx is imported);
  results are bitwise repeatable only with ``--threads 1``, with more threads the order of ITK's
  parallel sums varies from run to run.

Outputs in ``--out``: ``per_pair_metrics.csv`` (inference.py's columns plus ``seconds`` and ``cpu_seconds``, the
process's CPU time: on a loaded machine the fairer cost with one thread), ``table1.csv`` /
``table1.md`` (``tables.table1``; table1.csv adds ``seconds_mean/std``, ``cpu_seconds_mean``),
``bench_peer.json`` (versions, options, pairs, data version).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
from datasets.atomic import atomic_write  # noqa: E402
from hypermorph_spatially_adaptive import artifacts as art  # noqa: E402
from hypermorph_spatially_adaptive.artifacts import PER_PAIR_METRICS, read_config  # noqa: E402

METHOD = "ants-syn"  # the quick SyN row's name (the earlier tables' and the study's)
#: row names of the ANTs presets (other transforms: ``ants-<name in lower case, letters and digits>``)
METHOD_NAMES = {"SyN": METHOD, "antsRegistrationSyN[s]": "ants-synpreset"}
DEFAULT_TRANSFORMS = ["antsRegistrationSyN[s]", "SyN"]
DEMO_NUM_PAIRS = 60  # run_pipeline.py's default: 42 train / 9 val / 9 test synthetic pairs
DEMO_CACHE_DIR = os.path.join(".cache", "synthetic")  # run_pipeline.py's synthetic cache
THREADS_ENV = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"


def method_name(transform: str) -> str:
    """The table row of an ANTs ``type_of_transform``: :data:`METHOD_NAMES`, else ``ants-`` and
    its letters and digits in lower case."""
    if transform in METHOD_NAMES:
        return METHOD_NAMES[transform]
    return "ants-" + "".join(ch for ch in transform.lower() if ch.isalnum())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    datasets.add_dataset_args(p)
    # the demo's synthetic data (run_pipeline.py): 60 pairs, so the 9 test pairs are the demo's
    p.set_defaults(num_pairs=DEMO_NUM_PAIRS)
    g = p.add_argument_group("selection")
    g.add_argument("--from-run", default=None, metavar="RUN_FOLDER",
                   help="rebuild the dataset from a trained run's config.json (its 'data' entry) "
                        "instead of the data options above; --data-dir / --label-dir still override "
                        "the folders saved there")
    g.add_argument("--split", default="test", choices=("train", "val", "test"), help="split to register")
    g.add_argument("--pairs", nargs="+", default=None, metavar="ID",
                   help="only these pair ids (must be in --split)")
    g.add_argument("--max-pairs", type=int, default=None,
                   help="only the first N pairs of the split (smoke runs)")
    a = p.add_argument_group("ANTs")
    a.add_argument("--transform", nargs="+", default=DEFAULT_TRANSFORMS, metavar="TYPE",
                   help="ants.registration type_of_transform values, one table row each (antspyx docs): "
                        "antsRegistrationSyN[s] = the antsRegistrationSyN.sh preset (rigid + affine + SyN, "
                        "CC, shrink factors 8x4x2x1), row ants-synpreset; SyN = antspyx' quick default "
                        "(MI, affine + SyN, few iterations), row ants-syn; others: ants-<name>")
    a.add_argument("--seed", type=int, default=1,
                   help="ANTs random seed (antsRegistration --random-seed: the metric sampling); must be "
                        ">= 1, because ANTs treats 0 as 'seed from the system clock'")
    a.add_argument("--threads", type=int, default=1,
                   help="ITK threads (sets ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS before antspyx is imported). "
                        "Only 1 gives bitwise repeatable results (with more threads the order of ITK's "
                        "parallel sums varies: mean Dice moved by up to 0.005 between runs with 2), and on "
                        "2 shared cores 1 thread was also faster for 64x64 pairs; the timings depend on it")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=os.path.join("outputs", "bench_peer"), help="output folder")
    o.add_argument("--merge", default=None, metavar="RESULTS_DIR",
                   help="inference.py output folder: add the rows of its per_pair_metrics.csv (all "
                        "methods except 'initial') to the table; its pairs must be ours and its "
                        "'initial' rows must match ours (same data)")
    o.add_argument("--self-check", action="store_true",
                   help="only verify the ANTs -> u conversion on known translations of the first "
                        "selected pair's fixed image (isotropic and anisotropic spacing) and exit "
                        "(non-zero exit status on failure); writes nothing")
    return p


# ----------------------------------------------------------------------------------------------
# dataset
# ----------------------------------------------------------------------------------------------
def load_dataset(args: argparse.Namespace) -> Tuple[Any, Dict]:
    """The dataset of ``args`` (or of ``--from-run``) and the JSON options that rebuild it."""
    if args.from_run:
        opts = dict(read_config(args.from_run)["data"])
        if args.data_dir is not None:
            opts["data_dir"] = os.path.abspath(args.data_dir)
        if args.label_dir is not None:
            opts["label_dir"] = os.path.abspath(args.label_dir)
    else:
        if args.dataset == "synthetic" and args.cache_dir is None and args.data_dir is None:
            args.cache_dir = DEMO_CACHE_DIR
        opts = datasets.dataset_options(args)
    opts = dict(opts)
    name = opts.pop("name")
    return datasets.get_dataset(name, **opts), {"name": name, **opts}


def select_ids(dataset, args: argparse.Namespace) -> List[str]:
    ids = dataset.select_ids(args.split, args.pairs)
    if args.max_pairs is not None:
        if args.max_pairs < 1:
            raise ValueError(f"--max-pairs must be >= 1, got {args.max_pairs}")
        ids = ids[: args.max_pairs]
    return ids


def data_version(dataset, pair_id: str) -> str:
    """What identifies the data: the synthetic cache file name (holds the generator version)."""
    path_of = getattr(dataset, "cache_path", None)
    return os.path.basename(path_of(pair_id)) if path_of is not None else dataset.name


# ----------------------------------------------------------------------------------------------
# ANTs
# ----------------------------------------------------------------------------------------------
def import_ants(threads: int, seed: int):
    """Import antspyx with ``threads`` ITK threads and ANTs' random seed set to ``seed``."""
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if seed < 1:
        raise ValueError(f"--seed must be >= 1, got {seed}: ANTs seeds from the system clock for 0")
    if "ants" in sys.modules and os.environ.get(THREADS_ENV) != str(threads):
        print("[bench_peer] warning: antspyx was imported before; ITK may keep its thread count",
              file=sys.stderr, flush=True)
    os.environ[THREADS_ENV] = str(threads)
    try:
        import ants
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit(f"antspyx is not installed ({e}); run `make bench-setup` "
                         f"(pip install --no-deps -r benchmarks/requirements-bench.txt)") from e
    config = getattr(ants, "config", None)
    if "random_seed" not in inspect.signature(ants.registration).parameters:
        # antspyx >= 0.6 reads the seed from ants.config (registration(**kwargs) would swallow a
        # random_seed= silently); set_ants_deterministic also forces 1 thread, so restore ours.
        if config is None or not hasattr(config, "set_ants_deterministic"):
            raise RuntimeError(f"antspyx {getattr(ants, '__version__', '?')}: no way to seed ANTs found")
        config.set_ants_deterministic(True, int(seed))
        os.environ[THREADS_ENV] = str(threads)
    return ants


def _ants_image(ants, arr: np.ndarray, spacing: Sequence[float]):
    """numpy array -> ANTsImage with origin 0, identity direction, ``spacing`` per array axis."""
    d = arr.ndim
    return ants.from_numpy(np.ascontiguousarray(arr, dtype=np.float32), origin=(0.0,) * d,
                           spacing=tuple(float(s) for s in spacing), direction=np.eye(d))


def register(ants, fixed: np.ndarray, moving: np.ndarray, spacing: Sequence[float], transform: str,
             seed: int, workdir: str) -> Tuple[np.ndarray, List[str], Any, Any]:
    """Register ``moving`` to ``fixed`` (both ``[*spatial]``) with ANTs.

    Returns ``(u, fwdtransforms, fixed_img, moving_img)``: ``u [*spatial, D]`` float32 in voxels
    on the fixed grid in our convention (see the module docstring), the transform files (valid
    while ``workdir`` exists) and the two ANTsImages.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (fixed.ndim,) or fixed.shape != moving.shape:
        raise ValueError(f"shapes {fixed.shape} / {moving.shape} and spacing {spacing} do not match")
    fixed_img = _ants_image(ants, fixed, spacing)
    moving_img = _ants_image(ants, moving, spacing)
    kwargs: Dict[str, Any] = {}
    if "random_seed" in inspect.signature(ants.registration).parameters:
        kwargs["random_seed"] = int(seed)
    reg = ants.registration(fixed_img, moving_img, type_of_transform=transform,
                            outprefix=os.path.join(workdir, "reg_"), **kwargs)
    fwd = list(reg["fwdtransforms"])
    # one displacement field (mm, ITK axis order = array axis order) on the fixed image's grid
    field_path = ants.apply_transforms(fixed_img, moving_img, fwd, compose=os.path.join(workdir, "fwd_"))
    field = ants.image_read(field_path)
    if tuple(field.shape) != tuple(fixed.shape) or field.components != fixed.ndim:
        raise RuntimeError(f"composed field has shape {field.shape} x {field.components}, "
                           f"expected {fixed.shape} x {fixed.ndim}")
    if not (np.allclose(field.spacing, spacing) and np.allclose(field.origin, 0.0)
            and np.allclose(field.direction, np.eye(fixed.ndim))):
        raise RuntimeError(f"composed field is not on the fixed grid: spacing {field.spacing}, "
                           f"origin {field.origin}, direction {field.direction}")
    u = field.numpy() / spacing
    return u.astype(np.float32), fwd, fixed_img, moving_img


def ants_warp_labels(ants, seg: np.ndarray, fixed_img, fwd: List[str], spacing: Sequence[float]) -> np.ndarray:
    """ANTs' own nearest-neighbour warp of a moving label map onto the fixed grid."""
    seg_img = _ants_image(ants, seg.astype(np.float32), spacing)
    out = ants.apply_transforms(fixed_img, seg_img, fwd, interpolator="nearestNeighbor")
    return np.rint(out.numpy()).astype(seg.dtype)


# ----------------------------------------------------------------------------------------------
# self-check
# ----------------------------------------------------------------------------------------------
def self_check(ants, pair, num_classes: int, transform: str, seed: int, tol_vox: float = 0.25,
               min_agreement: float = 0.99) -> bool:
    """Known translations of ``pair.fixed``: ``u`` must be the shift, labels must agree with ANTs'.

    ``moving = fixed shifted by s`` (integer voxels, ``moving(x) = fixed(x - s)``), so the true
    displacement is ``u = +s`` everywhere. Checked per axis on the median of ``u`` over the
    fixed body (labels > 0, away from the border), for spacing 1 and an anisotropic spacing.
    """
    import eval_metrics
    from scipy import ndimage

    fixed = pair.fixed[..., 0].astype(np.float32)
    seg = pair.fixed_seg.astype(np.int32)
    d = fixed.ndim
    shift = np.array([3, -2, 1][:d], dtype=float)
    body = seg > 0
    margin = 4
    inner = np.zeros_like(body)
    inner[tuple(slice(margin, n - margin) for n in body.shape)] = True
    ok = True
    for spacing in ([1.0] * d, [2.0, 1.0, 1.5][:d]):
        moving = ndimage.shift(fixed, shift, order=0, mode="constant", cval=0.0)
        moving_seg = ndimage.shift(seg, shift, order=0, mode="constant", cval=0)
        with tempfile.TemporaryDirectory(prefix="bench_peer_") as work:
            u, fwd, fixed_img, _ = register(ants, fixed, moving, spacing, transform, seed, work)
            ours = eval_metrics.warp_labels(moving_seg, u)
            theirs = ants_warp_labels(ants, moving_seg, fixed_img, fwd, spacing)
            u2 = register(ants, fixed, moving, spacing, transform, seed, work)[0]
        med = np.median(u[body & inner], axis=0)
        axis_ok = np.abs(med - shift) <= tol_vox
        agree = float(np.mean(ours == theirs))
        agree_inner = float(np.mean(ours[inner] == theirs[inner]))
        dice = eval_metrics.dice_per_class(seg, ours, num_classes)
        repeat = float(np.abs(u - u2).max())
        case_ok = bool(axis_ok.all()) and agree >= min_agreement
        ok &= case_ok
        fmt = lambda v: "[" + ", ".join(f"{x:.3f}" for x in v) + "]"  # noqa: E731
        print(f"[self-check] spacing {spacing}: shift {fmt(shift)} vox -> median u {fmt(med)} vox ({'ok' if axis_ok.all() else 'WRONG'}, tol {tol_vox}); "
              f"labels warp_labels(u) == ANTs nearest-neighbour on {100 * agree:.2f}% of voxels "
              f"({100 * agree_inner:.2f}% away from the border; need {100 * min_agreement:.0f}%); "
              f"Dice vs fixed labels {fmt(np.asarray(dice))}; "
              f"same seed twice: max |du| = {repeat:.2g} vox (0 expected only with --threads 1) -> "
              f"{'PASS' if case_ok else 'FAIL'}", flush=True)
        if not case_ok:
            wrong_sign = np.abs(med + shift) <= tol_vox
            if wrong_sign.any():
                print(f"[self-check] axes {np.flatnonzero(wrong_sign).tolist()} have the opposite sign",
                      flush=True)
    return ok


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def read_merge(results_dir: str, pair_ids: Sequence[str]):
    """``results_dir/per_pair_metrics.csv`` (inference.py) restricted to ``pair_ids``, which it
    must all contain; checked before any registration runs."""
    import pandas as pd

    path = os.path.join(results_dir, PER_PAIR_METRICS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; give an inference.py output folder to --merge")
    theirs = pd.read_csv(path, dtype={"pair_id": str, "params": str})
    missing = sorted(set(pair_ids) - set(theirs["pair_id"]))
    if missing:
        raise ValueError(f"{path}: has no rows for the pair(s) {missing}; select the same dataset/split")
    return theirs[theirs["pair_id"].isin(set(pair_ids))]


def merge_rows(per_pair, theirs, path: str):
    """``theirs`` without its 'initial' rows, after checking those equal ours (same data)."""
    mine_init = per_pair[per_pair["method"] == "initial"].set_index("pair_id")["mean_dice"]
    their_init = theirs[theirs["method"] == "initial"]
    if len(their_init):  # (one or more 'initial' rows per pair)
        diff = (their_init["mean_dice"] - their_init["pair_id"].map(mine_init)).abs()
        if not (diff.fillna(np.inf) < 1e-6).all():
            raise ValueError(f"{path}: its 'initial' mean Dice differs from ours by up to {diff.max():.4f}: "
                             f"not the same data (e.g. another synthetic generator version)")
    return theirs[theirs["method"] != "initial"]


def _repeat_per_protocol(per_pair):
    """For the table only: ANTs, like ``initial``, identifies no parameters, so when merged rows
    carry a ``protocol`` (oracle / population blocks of inference.py) its rows join every block."""
    import pandas as pd

    if "protocol" not in per_pair:
        return per_pair
    protocols = [p for p in per_pair["protocol"].dropna().unique() if p]
    mine = per_pair["method"].str.startswith("ants-")
    if not protocols:
        return per_pair
    copies = [per_pair[mine].assign(protocol=p) for p in protocols]
    return pd.concat([per_pair[~mine], *copies], ignore_index=True)


def _versions(antspyx: str) -> Dict[str, str]:
    """Library versions (run_folder.versions() would import TensorFlow, which this script never needs)."""
    import pandas
    import scipy

    return {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
            "pandas": pandas.__version__, "antspyx": antspyx}


def main(argv: Optional[Sequence[str]] = None) -> Optional[str]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seed < 1:
        parser.error(f"--seed must be >= 1 (ANTs seeds from the system clock for 0), got {args.seed}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.max_pairs is not None and args.max_pairs < 1:
        parser.error(f"--max-pairs must be >= 1, got {args.max_pairs}")
    names = [method_name(t) for t in args.transform]
    if len(set(names)) != len(names):
        parser.error(f"--transform names the same row twice: {args.transform} -> {names}")
    ants = import_ants(args.threads, args.seed)
    import pandas as pd

    from hypermorph_spatially_adaptive import tables

    dataset, data_opts = load_dataset(args)
    ids = select_ids(dataset, args)
    version = getattr(ants, "__version__", "unknown")
    print(f"[bench_peer] antspyx {version}, type_of_transform {', '.join(args.transform)}, seed {args.seed}, "
          f"{THREADS_ENV}={os.environ[THREADS_ENV]}; {len(ids)} {args.split} pairs of {dataset.name} "
          f"(data: {data_version(dataset, ids[0])})", flush=True)

    if args.self_check:
        ok = True
        for transform in args.transform:
            print(f"[self-check] type_of_transform={transform}", flush=True)
            ok &= self_check(ants, dataset.load_pair(ids[0]), dataset.num_classes, transform, args.seed)
        print(f"[self-check] {'PASSED' if ok else 'FAILED'}", flush=True)
        if not ok:
            raise SystemExit(1)
        return None

    merged = read_merge(args.merge, ids) if args.merge else None
    class_names = list(dataset.class_names)
    rows, total = _register_all(ants, dataset, ids, args)

    per_pair = pd.DataFrame(rows)
    problem = tables.check_range(per_pair, class_names)
    if problem:
        raise FloatingPointError(f"metrics out of range: {problem}")
    table_rows = per_pair
    if args.merge:
        per_pair = pd.concat([per_pair, merge_rows(per_pair, merged, args.merge)], ignore_index=True)
        table_rows = _repeat_per_protocol(per_pair)
    _write_results(args, argv, per_pair, table_rows, dataset, data_opts, ids, version, total)
    return args.out


def _register_all(ants, dataset, ids: Sequence[str], args: argparse.Namespace) -> Tuple[List[Dict], float]:
    """Register every pair of ``ids`` with every ``--transform`` (one temporary folder each),
    printing one line per pair and transform. Returns the per-pair metric rows (an ``initial`` row
    and one :func:`method_name` row per transform and pair) and the total seconds."""
    from hypermorph_spatially_adaptive import tables

    class_names = list(dataset.class_names)
    C = len(class_names)
    rows: List[Dict] = []
    t_all = time.perf_counter()
    for k, pid in enumerate(ids, 1):
        pair = dataset.load_pair(pid)
        zero = np.zeros((*pair.fixed.shape[:-1], pair.fixed.ndim - 1), np.float32)
        init = tables.pair_metrics(pair, zero, C, class_names)
        rows.append({"pair_id": pid, "method": "initial", "params": "", **init, "seconds": 0.0, "cpu_seconds": 0.0})
        for transform in args.transform:
            params = json.dumps({"type_of_transform": transform, "seed": args.seed, "threads": args.threads})
            with tempfile.TemporaryDirectory(prefix="bench_peer_") as work:
                t0, c0 = time.perf_counter(), time.process_time()
                u = register(ants, pair.fixed[..., 0], pair.moving[..., 0], pair.spacing, transform,
                             args.seed, work)[0]
                seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            m = tables.pair_metrics(pair, u, C, class_names)
            rows.append({"pair_id": pid, "method": method_name(transform), "params": params, **m,
                         "seconds": seconds, "cpu_seconds": cpu})
            print(f"[bench_peer] {k}/{len(ids)} {pid} {method_name(transform)}: mean Dice {init['mean_dice']:.3f} -> "
                  f"{m['mean_dice']:.3f}, %negJ {m['percent_neg_jac']:.3f}, {seconds:.2f} s", flush=True)
    return rows, time.perf_counter() - t_all


def _write_results(args: argparse.Namespace, argv: Optional[Sequence[str]], per_pair, table_rows,
                   dataset, data_opts: Dict, ids: Sequence[str], version: str, total: float) -> None:
    """Table 1 of ``table_rows`` plus seconds per method, written to ``args.out`` (per-pair CSV,
    table CSV / markdown, ``bench_peer.json`` with versions and the command) and printed."""
    from hypermorph_spatially_adaptive import tables

    class_names = list(dataset.class_names)
    numeric, markdown = tables.table1(table_rows, class_names)
    secs = per_pair.groupby("method")["seconds"]
    numeric["seconds_mean"] = numeric["method"].map(secs.mean())
    numeric["seconds_std"] = numeric["method"].map(secs.std(ddof=0))
    numeric["cpu_seconds_mean"] = numeric["method"].map(per_pair.groupby("method")["cpu_seconds"].mean())
    methods = {method_name(t): t for t in args.transform}
    sec = {name: per_pair.loc[per_pair["method"] == name, "seconds"] for name in methods}
    header = (f"Table 1 on {dataset.name} ({len(ids)} {args.split} pairs), mean(std) over pairs; "
              f"class DSC order: {', '.join(class_names)}; "
              + "; ".join(f"{name} = antspyx {version} ants.registration(type_of_transform={t!r})"
                          for name, t in methods.items())
              + f"; seed {args.seed}, {args.threads} ITK threads\n\n")
    cpu = {name: per_pair.loc[per_pair["method"] == name, "cpu_seconds"] for name in methods}
    footer = "\n" + "\n".join(f"{name}: {sec[name].mean():.2f}({sec[name].std(ddof=0):.2f}) s per pair with "
                               f"{args.threads} ITK thread{'s' if args.threads > 1 else ''} (registration + field "
                               f"composition; {cpu[name].mean():.2f} CPU s of this process)" for name in methods) + "\n"

    os.makedirs(args.out, exist_ok=True)
    atomic_write(os.path.join(args.out, art.PER_PAIR_METRICS), per_pair)
    atomic_write(os.path.join(args.out, art.TABLE1_CSV), numeric)
    atomic_write(os.path.join(args.out, art.TABLE1_MD), header + markdown + footer)
    meta = {"methods": methods, "antspyx": version, "type_of_transform": list(args.transform), "seed": args.seed,
            "threads": args.threads, "dataset": data_opts, "data_version": data_version(dataset, ids[0]),
            "split": args.split, "pairs": ids, "from_run": os.path.abspath(args.from_run) if args.from_run else None,
            "merged": os.path.abspath(args.merge) if args.merge else None,
            "seconds_per_pair": {name: round(float(v.mean()), 3) for name, v in sec.items()},
            "seconds_total": round(total, 2),
            "versions": _versions(version),
            "command": [os.path.basename(sys.argv[0])] + list(argv if argv is not None else sys.argv[1:])}
    atomic_write(os.path.join(args.out, "bench_peer.json"), json.dumps(meta, indent=2))
    print(header + markdown + footer, flush=True)
    print(f"[bench_peer] wrote {args.out}/per_pair_metrics.csv, table1.md, table1.csv, bench_peer.json", flush=True)


if __name__ == "__main__":
    main()
