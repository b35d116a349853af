"""Refinement variants side by side: Dice, folding, field regularity, dense error and seconds per
pair of instance optimization (``hypermorph_spatially_adaptive.refinement``) on synthetic data.

Rows are named ``<start>[+io[+option...]]``:

* start ``net``: the displacement a trained model (``--run``, a global or SA run folder)
  predicts at the hyperparameters ``--hyp``; ``zero``: the zero displacement (no model needed);
* ``+io``: refined for ``--steps`` Adam steps at ``--lr`` on the model's training loss (today's
  refinement, the +io rows of Table 1), with the :class:`Refiner` options given by the further
  tokens: ``fold<W>`` (folding penalty weight), ``eps<E>`` (its threshold), ``logj<W>``
  (log-Jacobian penalty weight), ``smooth<K>``
  (box-filter passes of the update), ``grid<G>`` (update grid coarsening), ``scale<S>`` (objective
  on S times coarser images), ``levels<A>x<B>x...`` (coarse-to-fine pyramid of shrink factors,
  e.g. ``levels4x2x1``; the row's steps split over the levels), ``split<A>x<B>x...`` (relative
  steps per level), ``svf`` (velocity
  field, composed with the start), ``steps<N>`` / ``lr<X>`` (override the defaults). E.g.
  ``net+io+svf+smooth3+fold10``.

Data modes (``--modes``), the synthetic dataset of the demo (``--num-pairs 60``, 42/9/9 split,
cache ``.cache/synthetic``) at ``--image-size``: ``demo`` (default motion), ``stress``
(``--motion stress``) and ``inter-subject`` (``--pairing inter-subject``: different anatomies,
no true field, so no dense EPE). Every row registers the ``--split`` pairs of a mode in one batch,
as ``inference.py`` does; seconds per pair = wall clock of that call (tracing included, unless
``--warm`` traced it first) / pairs; CPU s/pair the same for the process's CPU time (with
``--threads 1`` the fairer cost on a loaded machine; a ``net`` row counts its prediction's wall clock).
Metrics are ``tables.pair_metrics`` (the ones of Table 1), means over pairs; ``gain kept`` =
(Dice - Dice of ``net``) / (Dice of ``net+io`` - Dice of ``net``), the share of today's
refinement's Dice gain a row keeps.

Writes ``bench_refine_pairs.csv`` (per pair), ``bench_refine.csv`` (per mode and row) and
``bench_refine.md`` (the table printed) to ``--out``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
from datasets.atomic import atomic_write  # noqa: E402
from hypermorph_spatially_adaptive import run_folder  # noqa: E402
from hypermorph_spatially_adaptive.configs import LossConfig, RefineConfig  # noqa: E402
from hypermorph_spatially_adaptive.forward import Registrar  # noqa: E402
from hypermorph_spatially_adaptive.params import ParamSpec  # noqa: E402

WARM_STEPS = 20  # --warm: untimed steps that trace every level of a row
MODES = {"demo": {}, "stress": {"motion": "stress"}, "inter-subject": {"pairing": "inter-subject"}}
#: the rows of docs/experiments.md "Refinement options": the original refinement, each option alone, and the chosen default
#: (``grid2+smooth3+fold100+logj1``: the penalties, smoothing and grid of ``configs.RefineConfig()`` at one
#: full-resolution level; a row adds its options to ``RefineConfig.original()``)
DEFAULT_ROWS = ["net", "net+io", "net+io+fold100", "net+io+smooth3", "net+io+grid2", "net+io+grid4", "net+io+svf",
                "net+io+svf+smooth3", "net+io+fold100+logj1", "net+io+grid2+smooth3+fold100+logj1", "zero+io",
                "zero+io+grid2+smooth3+fold100+logj1"]


def _factors(text: str) -> Tuple[int, ...]:
    """``"4x2x1"`` -> ``(4, 2, 1)``."""
    return tuple(int(t) for t in text.split("x"))


def _weights(text: str) -> Tuple[float, ...]:
    return tuple(float(t) for t in text.split("x"))


_OPTION_TOKENS = {"fold": ("fold_weight", float), "eps": ("fold_eps", float), "logj": ("logj_weight", float),
                  "smooth": ("smooth", int), "grid": ("grid", int), "scale": ("scale", int), "steps": ("steps", int),
                  "lr": ("lr", float), "levels": ("levels", _factors), "split": ("level_split", _weights)}


def parse_row(name: str) -> Tuple[str, bool, Dict]:
    """``(start, refine, options)`` of a row name (module docstring); ``ValueError`` if malformed."""
    tokens = [t for t in name.strip().split("+") if t]
    if not tokens or tokens[0] not in ("net", "zero"):
        raise ValueError(f"row {name!r}: must start with 'net' or 'zero'")
    if len(tokens) == 1:
        if tokens[0] == "zero":
            raise ValueError("row 'zero' is the initial alignment: name it 'zero+io...' to refine it")
        return tokens[0], False, {}
    if tokens[1] != "io":
        raise ValueError(f"row {name!r}: the second token must be 'io'")
    opts: Dict = {}
    for tok in tokens[2:]:
        if tok == "svf":
            opts["svf"] = True
            continue
        key = next((k for k in _OPTION_TOKENS if tok.startswith(k)), None)
        if key is None:
            raise ValueError(f"row {name!r}: unknown option {tok!r} (svf, {', '.join(_OPTION_TOKENS)})")
        field, conv = _OPTION_TOKENS[key]
        try:
            opts[field] = conv(tok[len(key):])
        except ValueError:
            raise ValueError(f"row {name!r}: {tok!r} needs a number after {key!r}") from None
    return tokens[0], True, opts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", default=None, metavar="RUN",
                   help="trained run folder (global or SA, trained on --image-size images) whose displacement "
                        "the 'net' rows start from and whose loss every row refines; without it only 'zero' rows "
                        "run, on the elastic global loss")
    p.add_argument("--hyp", type=float, nargs="+", default=[0.1],
                   help="hyperparameters of the network and the loss (one value: every entry), in [0, 1]")
    p.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, help="rows to run (names: module docstring)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), help="synthetic data modes")
    p.add_argument("--image-size", type=int, nargs=2, default=[64, 64], help="synthetic image size")
    p.add_argument("--num-pairs", type=int, default=60, help="synthetic pairs (60: the demo's 42/9/9 split)")
    p.add_argument("--data-seed", type=int, default=0, help="synthetic base seed")
    p.add_argument("--cache-dir", default=os.path.join(".cache", "synthetic"), help="synthetic cache folder")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="pairs to register")
    p.add_argument("--max-pairs", type=int, default=None, help="only the first N pairs of the split")
    p.add_argument("--steps", type=int, default=100, help="Adam steps of every +io row (a row's steps<N> overrides)")
    p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate, voxels (a row's lr<X> overrides)")
    p.add_argument("--ncc-win", type=int, default=9, help="NCC window without --run (else the run's)")
    p.add_argument("--warm", action="store_true",
                   help="run every refined row once untimed (%d steps) first, so s/pair is the steady state without "
                        "TensorFlow's tracing (seconds per level, paid once per process and batch shape)" % WARM_STEPS)
    p.add_argument("--threads", type=int, default=0,
                   help="TensorFlow intra- and inter-op threads (0: TensorFlow's default, all cores); 1 compares "
                        "with bench_peer.py --threads 1 on the same cores")
    p.add_argument("--out", default=os.path.join("outputs", "bench_refine"), help="output folder")
    p.add_argument("--panel", default=None, metavar="PNG",
                   help="also draw a Fig. 3 panel (figures.plot_registration_panel) of the first pair of "
                        "--panel-mode with the --panel-rows rows")
    p.add_argument("--panel-mode", default="inter-subject", choices=list(MODES), help="data mode of the panel")
    p.add_argument("--panel-rows", nargs="+", default=["net", "net+io"], help="rows of the panel (must be in --rows)")
    return p


def _load_mode(mode: str, args) -> Tuple[object, List]:
    opts = dict(MODES[mode])
    ds = datasets.get_dataset("synthetic", image_size=list(args.image_size), num_pairs=args.num_pairs,
                              data_seed=args.data_seed, cache_dir=args.cache_dir, **opts)
    ids = ds.split_ids(args.split)[: args.max_pairs]
    return ds, [ds.load_pair(i) for i in ids]


def _model(args):
    """``(registrar or None, ParamSpec, run config or None, ncc window)``."""
    if args.run is None:
        return None, ParamSpec("elastic", False, 3), None, args.ncc_win
    model, cfg = run_folder.load_run(args.run)
    reg = Registrar(model)
    if list(reg.image_shape) != list(args.image_size):
        raise ValueError(f"{args.run} was trained on {reg.image_shape} images, not --image-size {args.image_size}")
    return reg, ParamSpec.from_model_config(cfg["model"]), cfg, LossConfig.from_run_config(cfg).ncc_win


def run_mode(mode: str, args, reg, spec, cfg, win, panel: Optional[Dict] = None) -> List[Dict]:
    """Per-pair metric rows of every ``--rows`` entry on one data mode; with a ``panel`` dict,
    the first pair and its displacement of every ``--panel-rows`` row are stored in it. The
    refinement uses the run's loss (``Refiner.from_config``: spacing, NCC window, energy scale)
    or, without ``cfg``, the elastic global loss with window ``win``."""
    from hypermorph_spatially_adaptive import tables
    from hypermorph_spatially_adaptive.refinement import Refiner

    ds, pairs = _load_mode(mode, args)
    names = list(ds.class_names)
    moving = np.stack([p.moving for p in pairs])
    fixed = np.stack([p.fixed for p in pairs])
    seg = np.stack([p.fixed_seg for p in pairs])
    hyp = np.asarray(args.hyp if len(args.hyp) > 1 else args.hyp * spec.num_params, np.float32)
    if hyp.shape != (spec.num_params,):
        raise ValueError(f"--hyp needs 1 or {spec.num_params} values for this model, got {len(args.hyp)}")
    hyp = np.repeat(hyp[None], len(pairs), axis=0)
    starts = {"zero": (np.zeros((*moving.shape[:-1], moving.ndim - 2), np.float32), 0.0)}
    if reg is not None:
        reg(moving[:1], fixed[:1], hyp[:1])  # trace outside the timing
        t0 = time.time()
        starts["net"] = (reg(moving, fixed, hyp)[1], time.time() - t0)
    rows = [{"mode": mode, "row": "initial", "pair_id": p.pair_id, "seconds": 0.0, "cpu_seconds": 0.0,
             **tables.pair_metrics(p, starts["zero"][0][k], len(names), names)} for k, p in enumerate(pairs)]
    for name in args.rows:
        start, refine, opts = parse_row(name)
        if start not in starts:
            raise ValueError(f"row {name!r} needs --run")
        u, seconds = starts[start]
        cpu = seconds  # the network's start: its wall clock (refinement rows add their CPU time)
        if refine:
            steps, lr = opts.pop("steps", args.steps), opts.pop("lr", args.lr)
            options = replace(RefineConfig.original(), **opts)  # a row names what it adds to the original
            refiner = (Refiner.from_config(cfg, options=options) if cfg is not None
                       else Refiner(spec, LossConfig(ncc_win=win), options))
            if args.warm:  # trace every level's compiled step outside the timing (20 steps reach each level)
                refiner(moving, fixed, u, hyp, seg, WARM_STEPS, lr)
            t0, c0 = time.time(), time.process_time()
            u = refiner(moving, fixed, u, hyp, seg, steps, lr)[0]
            seconds += time.time() - t0
            cpu += time.process_time() - c0
        if panel is not None and name in args.panel_rows:
            panel["pair"], panel.setdefault("disp", {})[name] = pairs[0], u[0]
        for k, p in enumerate(pairs):
            rows.append({"mode": mode, "row": name, "pair_id": p.pair_id, "seconds": seconds / len(pairs),
                         "cpu_seconds": cpu / len(pairs),
                         **tables.pair_metrics(p, u[k], len(names), names)})
        print(f"[bench_refine] {mode:13s} {name:32s} Dice {np.mean([r['mean_dice'] for r in rows[-len(pairs):]]):.3f} "
              f"%negJ {np.mean([r['percent_neg_jac'] for r in rows[-len(pairs):]]):.3f} "
              f"{seconds / len(pairs):.3f} s/pair", flush=True)
    return rows


def summarize(per_pair) -> "pd.DataFrame":
    """Means per (mode, row) and the share of today's +io Dice gain kept (module docstring)."""
    import pandas as pd

    cols = [c for c in ("mean_dice", "hd95", "percent_neg_jac", "sdlogj", "dense_epe", "seconds", "cpu_seconds")
            if c in per_pair]
    summary = per_pair.groupby(["mode", "row"], sort=False)[cols].mean().reset_index()
    summary.insert(2, "n_pairs", per_pair.groupby(["mode", "row"], sort=False).size().to_numpy())
    kept = []
    for _, r in summary.iterrows():
        mode = summary[summary["mode"] == r["mode"]].set_index("row")["mean_dice"]
        ok = "net" in mode and "net+io" in mode and mode["net+io"] != mode["net"]
        kept.append((r["mean_dice"] - mode["net"]) / (mode["net+io"] - mode["net"]) if ok else float("nan"))
    summary["gain_kept"] = kept
    return summary


def markdown(summary) -> str:
    head = "| data | row | Dice | HD95 (mm) | %negJ | SDlogJ | dense EPE (mm) | s/pair | CPU s/pair | gain kept |"
    lines = [head, "|" + "---|" * 10]

    def f(v, d=3):
        return "-" if v != v else f"{v:.{d}f}"

    for _, r in summary.iterrows():
        kept = f"{100 * r['gain_kept']:.0f} %" if r["gain_kept"] == r["gain_kept"] else "-"
        lines.append(f"| {r['mode']} | {r['row']} | {f(r['mean_dice'])} | {f(r['hd95'])} | "
                     f"{f(r['percent_neg_jac'])} | {f(r['sdlogj'])} | {f(r.get('dense_epe', float('nan')))} | "
                     f"{f(r['seconds'])} | {f(r['cpu_seconds'])} | {kept} |")
    return "\n".join(lines) + "\n"


def draw_panel(panel: Dict, path: str, order: Sequence[str]) -> str:
    """Fig. 3 panel of the stored pair: one row per stored displacement, in ``order``."""
    import eval_metrics
    from hypermorph_spatially_adaptive import figures
    from hypermorph_spatially_adaptive.tf_ops import warp_linear

    pair = panel["pair"]
    results = {}
    for name in [n for n in order if n in panel["disp"]]:
        u = panel["disp"][name]
        warped = warp_linear(pair.moving[None], u[None]).numpy()[0, ..., 0]
        seg = eval_metrics.warp_labels(pair.moving_seg, u)
        results[name] = {"warped": warped, "disp": u, "warped_seg": seg,
                         "dice": eval_metrics.mean_dice(pair.fixed_seg, seg, 3),
                         "negj": eval_metrics.percent_negative_jacobian(u)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return figures.plot_registration_panel(pair.moving[..., 0], pair.fixed[..., 0], pair.fixed_seg, results, path,
                                           title=f"{pair.pair_id}: refinement variants")


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = build_parser().parse_args(argv)
    for name in args.rows:  # fail before any work
        parse_row(name)
    import pandas as pd

    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    reg, spec, cfg, win = _model(args)
    rows: List[Dict] = []
    panel: Dict = {}
    for mode in args.modes:
        rows += run_mode(mode, args, reg, spec, cfg, win, panel if args.panel and mode == args.panel_mode else None)
    if panel:
        draw_panel(panel, args.panel, args.panel_rows)
    per_pair = pd.DataFrame(rows)
    summary = summarize(per_pair)
    md = (f"Refinement variants ({args.split} pairs, {args.image_size[0]}x{args.image_size[1]}, start "
          f"{args.run or 'zero'}, hyp {args.hyp}, {args.steps} steps at lr {args.lr}, "
          f"{args.threads or 'default'} TensorFlow threads, s/pair {'after warm-up' if args.warm else 'with tracing'})\n\n" + markdown(summary))
    os.makedirs(args.out, exist_ok=True)
    atomic_write(os.path.join(args.out, "bench_refine_pairs.csv"), per_pair)
    atomic_write(os.path.join(args.out, "bench_refine.csv"), summary)
    atomic_write(os.path.join(args.out, "bench_refine.md"), md)
    print(md, flush=True)
    return args.out


if __name__ == "__main__":
    main()
