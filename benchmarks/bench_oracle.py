#!/usr/bin/env python
"""What tissue-specific regularization could gain on a dataset: the oracle, without a network.

Every test pair is registered by optimizing its displacement from zero (the project's
:class:`~hypermorph_spatially_adaptive.refinement.Refiner`, coarse to fine: update grid 4, then 2,
then 1, Adam) on ``-NCC + E``, the elastic energy of paper eq. 1 with per-voxel Lame weights from
the fixed segmentation. Two families of settings, the same optimizer for both:

- **tissue-specific (true)**: every class gets ``s x`` its true Lame values (``pair.extras["lame"]``:
  the generator's, per pair with ``--stiffness-spread``), ``s`` from a log grid (``--scales``);
- **global**: one ``(lambda, mu)`` for every class, from a log grid (``--global-values`` squared).

Selections (dense EPE, mm, inside the tissues: an oracle criterion, the true field is known):

- ``per pair``: each pair's best ``s`` vs its best ``(lambda, mu)``;
- ``one for all``: the ``s`` and the ``(lambda, mu)`` with the best mean EPE over the
  ``--select-split`` pairs (default val), applied to every test pair.

Printed and written (``--out``): per pair and selection the EPE and mean Dice of both families,
the paired difference tissue - global with t intervals over pairs, and the **box report**: which
share of the selected settings each hyperparameter box can express. Under eq. 1's linear mapping a
per-voxel weight pair ``(w_lambda, w_mu)`` relative to a unit similarity weight is reachable with
``Lambda, Gamma`` in [0, 1] only if ``|w_lambda - w_mu| <= K`` (from ``w = K Lambda / (2 - Lambda -
Gamma)``); under the log mapping (unit similarity) iff both weights lie in ``K x [0.5 x
10^(-D/2), 0.5 x 10^(D/2)]``; under the authors' code's ``1 - lambda - mu`` weight every positive pair is
reachable (``Lambda = w_lambda / (K + w_lambda + w_mu)``).

Example (the study's stress data, 12 test pairs; about 10 min on 2 cores)::

    python benchmarks/bench_oracle.py --motion stress --num-pairs 200 --max-pairs 12 --out outputs/oracle
    python benchmarks/bench_oracle.py --motion stress --num-pairs 200 --stiffness-spread 0.5 --out outputs/oracle_s05
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
from datasets.atomic import atomic_write  # noqa: E402
from hypermorph_spatially_adaptive.configs import LossConfig, RefineConfig  # noqa: E402
from hypermorph_spatially_adaptive.params import HypMapping, ParamSpec  # noqa: E402

#: the boxes of the box report: name -> (kind, K, decades)
BOXES = {"eq. 1 linear, K 1 (paper text)": ("linear", 1.0, None),
         "log, K 10, 2 decades (study 'calibrated')": ("log", 10.0, 2.0),
         "log, K 4, 3 decades (study 'wide')": ("log", 4.0, 3.0),
         "1 - lambda - mu, K 1 (authors' code)": ("authors", 1.0, None)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    datasets.add_dataset_args(p)
    p.set_defaults(num_pairs=200, motion=0.1)  # the study's data: --motion stress, 140/30/30
    g = p.add_argument_group("oracle")
    g.add_argument("--split", default="test", help="pairs that are scored")
    g.add_argument("--select-split", default="val", help="pairs that choose the 'one for all' settings")
    g.add_argument("--max-pairs", type=int, default=12, help="first N pairs of each split (0: all)")
    g.add_argument("--scales", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1, 0.3],
                   help="factors s of the true Lame values (tissue-specific family)")
    g.add_argument("--global-values", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
                   help="values of lambda and of mu of the global family (all combinations)")
    g.add_argument("--levels", type=int, nargs="+", default=[4, 2, 1],
                   help="update-grid coarsening per level, coarse to fine")
    g.add_argument("--level-steps", type=int, nargs="+", default=[100, 100, 200],
                   help="Adam steps per level")
    g.add_argument("--lr", type=float, default=0.1, help="Adam learning rate (voxels)")
    g.add_argument("--ncc-win", type=int, default=9, help="local NCC window")
    g.add_argument("--out", default=None, help="folder for oracle_pairs.csv, oracle_summary.md and oracle.json")
    return p


def _weights(lame: Dict[int, Sequence[float]], C: int, s: float) -> np.ndarray:
    """``[2 (C + 1)]`` weights ``[lambda_0..lambda_C, mu_0..mu_C]`` = s x the true values."""
    return s * np.array([lame[c][0] for c in range(C + 1)] + [lame[c][1] for c in range(C + 1)], np.float64)


def expressible(w: np.ndarray, kind: str, K: float, decades: Optional[float]) -> bool:
    """Whether every class's ``(w_lambda, w_mu)`` of ``w [2 (C + 1)]`` (per unit similarity) is
    reachable in a box (module docstring)."""
    half = len(w) // 2
    wl, wm = w[:half], w[half:]
    if kind == "linear":
        return bool(np.all(np.abs(wl - wm) <= K + 1e-12))
    if kind == "log":
        lo, hi = K * 0.5 * 10 ** (-decades / 2), K * 0.5 * 10 ** (decades / 2)
        return bool(np.all((w >= lo - 1e-12) & (w <= hi + 1e-12)))
    return bool(np.all(w >= 0))


def register_all(pairs, settings: np.ndarray, args, C: int, spacing) -> np.ndarray:
    """Displacements ``[len(pairs), len(settings[0]), *shape, D]``: pair i with its settings
    ``settings[i] [S, 2 (C + 1)]`` (weights per unit similarity), coarse to fine from zero."""
    from hypermorph_spatially_adaptive.refinement import Refiner

    S = settings.shape[1]
    span = np.abs(np.log10(settings[settings > 0] / 0.5)).max() if np.any(settings > 0) else 1.0
    mapping = HypMapping("log", float(2 * np.ceil(span) + 2))  # every weight inside the box, unit similarity
    hyp = mapping.inverse(np.maximum(settings, 1e-12)).reshape(-1, settings.shape[-1])
    spec = ParamSpec("elastic", True, C)
    rep = lambda a: np.repeat(np.stack(a), S, axis=0)  # noqa: E731
    moving, fixed = rep([p.moving for p in pairs]), rep([p.fixed for p in pairs])
    seg = rep([p.fixed_seg for p in pairs])
    u = np.zeros(moving.shape[:-1] + (moving.ndim - 2,), np.float32)
    for grid, steps in zip(args.levels, args.level_steps):
        loss = LossConfig(ncc_win=args.ncc_win, spacing=spacing, hyp_mapping=mapping)
        refiner = Refiner(spec, loss, replace(RefineConfig.original(), grid=grid))
        u, _, _ = refiner(moving, fixed, u, hyp, seg, steps=steps, lr=args.lr)
    return u.reshape((len(pairs), S) + u.shape[1:])


def score(pairs, fields: np.ndarray, C: int, names) -> np.ndarray:
    """``[pairs, settings, 2]``: dense EPE (mm) and mean Dice of every field."""
    from hypermorph_spatially_adaptive.tables import pair_metrics

    out = np.zeros(fields.shape[:2] + (2,))
    for i, pair in enumerate(pairs):
        for j in range(fields.shape[1]):
            m = pair_metrics(pair, fields[i, j], C, names)
            out[i, j] = m["dense_epe"], m["mean_dice"]
    return out


def _settings(pairs, args, C: int):
    glob = [(lam, mu) for lam in args.global_values for mu in args.global_values]
    rows = []
    for p in pairs:
        lame = p.extras["lame"]
        tissue = [_weights(lame, C, s) for s in args.scales]
        global_ = [np.array([lam] * (C + 1) + [mu] * (C + 1), np.float64) for lam, mu in glob]
        rows.append(np.stack(tissue + global_))
    return np.stack(rows), glob


def evaluate(pairs, args, C: int, names, spacing, log=print):
    settings, glob = _settings(pairs, args, C)
    t0 = time.time()
    fields = register_all(pairs, settings, args, C, spacing)
    log(f"  {len(pairs)} pairs x {settings.shape[1]} settings registered in {time.time() - t0:.0f} s")
    return settings, glob, score(pairs, fields, C, names)


def _t_interval(d: np.ndarray):
    from hypermorph_spatially_adaptive.intervals import one_sample_interval

    lo, hi, p = one_sample_interval(d, method="t")
    return float(lo), float(hi), float(p)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = build_parser().parse_args(argv)
    if len(args.levels) != len(args.level_steps):
        raise SystemExit("--levels and --level-steps need one value each per level")
    data = datasets.dataset_from_args(args)
    names = list(data.class_names)
    C = len(names)

    def load(split):
        ids = data.split_ids(split)
        ids = ids[:args.max_pairs] if args.max_pairs else ids
        pairs = [data.load_pair(i) for i in ids]
        if not pairs or any((p.extras or {}).get("disp_true") is None or "lame" not in p.extras for p in pairs):
            raise SystemExit(f"{split}: the oracle needs synthetic deformation pairs (true field and Lame values)")
        return pairs

    test, select = load(args.split), load(args.select_split)
    spacing = list(test[0].spacing)
    S_t = len(args.scales)
    print(f"oracle: {len(test)} {args.split} pairs, {len(select)} {args.select_split} pairs to select; "
          f"{S_t} tissue-specific scales, {len(args.global_values) ** 2} global settings; levels "
          f"{args.levels} x steps {args.level_steps}", flush=True)
    set_t, glob, sc_t = evaluate(test, args, C, names, spacing)
    _, _, sc_v = evaluate(select, args, C, names, spacing)

    rows, summary = [], []
    best_one_t = int(np.argmin(sc_v[:, :S_t, 0].mean(0)))
    best_one_g = S_t + int(np.argmin(sc_v[:, S_t:, 0].mean(0)))
    for sel in ("per pair", "one for all"):
        for i, pair in enumerate(test):
            jt = int(np.argmin(sc_t[i, :S_t, 0])) if sel == "per pair" else best_one_t
            jg = S_t + int(np.argmin(sc_t[i, S_t:, 0])) if sel == "per pair" else best_one_g
            rows.append({"selection": sel, "pair_id": pair.pair_id, "scale": args.scales[jt],
                         "global_lambda": glob[jg - S_t][0], "global_mu": glob[jg - S_t][1],
                         "epe_tissue": sc_t[i, jt, 0], "epe_global": sc_t[i, jg, 0],
                         "dice_tissue": sc_t[i, jt, 1], "dice_global": sc_t[i, jg, 1],
                         **{f"box_tissue[{b}]": expressible(set_t[i, jt], *spec) for b, spec in BOXES.items()},
                         **{f"box_global[{b}]": expressible(set_t[i, jg], *spec) for b, spec in BOXES.items()}})
    df = pd.DataFrame(rows)
    for sel, g in df.groupby("selection", sort=False):
        d_epe, d_dice = (g.epe_tissue - g.epe_global).to_numpy(), (g.dice_tissue - g.dice_global).to_numpy()
        lo, hi, p = _t_interval(d_epe)
        dlo, dhi, _ = _t_interval(d_dice)
        summary.append({"selection": sel, "n": len(g), "epe_global": g.epe_global.mean(),
                        "epe_tissue": g.epe_tissue.mean(), "d_epe": d_epe.mean(), "d_epe_lo": lo, "d_epe_hi": hi,
                        "d_epe_pct": 100 * d_epe.mean() / g.epe_global.mean(), "tissue_wins": int((d_epe < 0).sum()),
                        "dice_global": g.dice_global.mean(), "dice_tissue": g.dice_tissue.mean(),
                        "d_dice": d_dice.mean(), "d_dice_lo": dlo, "d_dice_hi": dhi, "p_epe": p,
                        **{f"share tissue in {b}": g[f"box_tissue[{b}]"].mean() for b in BOXES},
                        **{f"share global in {b}": g[f"box_global[{b}]"].mean() for b in BOXES}})
    summ = pd.DataFrame(summary)
    md = _markdown(summ, args)
    print(md, flush=True)
    if args.out:
        command = " ".join(["python", "benchmarks/bench_oracle.py", *(argv or sys.argv[1:])])
        atomic_write(os.path.join(args.out, "oracle_pairs.csv"), df)
        atomic_write(os.path.join(args.out, "oracle_summary.md"), f"`{command}`\n\n{md}\n")
        atomic_write(os.path.join(args.out, "oracle.json"),
                     json.dumps({"args": vars(args), "summary": summ.to_dict("records")}, indent=1, default=str))
    return {"pairs": df, "summary": summ}


def _markdown(summ: pd.DataFrame, args) -> str:
    lines = ["| selection | n | global: EPE mm / Dice | tissue-specific: EPE / Dice | EPE difference [95% t] | "
             "tissue wins | Dice difference [95% t] |", "|---|---|---|---|---|---|---|"]
    for r in summ.itertuples():
        lines.append(f"| {r.selection} | {r.n} | {r.epe_global:.3f} / {r.dice_global:.3f} | "
                     f"{r.epe_tissue:.3f} / {r.dice_tissue:.3f} | {r.d_epe:+.3f} [{r.d_epe_lo:+.3f}, "
                     f"{r.d_epe_hi:+.3f}] ({r.d_epe_pct:+.0f} %) | {r.tissue_wins}/{r.n} | {r.d_dice:+.3f} "
                     f"[{r.d_dice_lo:+.3f}, {r.d_dice_hi:+.3f}] |")
    lines += ["", "Share of the selected settings each box can express (tissue-specific / global):", "",
              "| box | " + " | ".join(summ.selection) + " |", "|---|" + "---|" * len(summ)]
    for b in BOXES:
        cells = [f"{r[f'share tissue in {b}']:.2f} / {r[f'share global in {b}']:.2f}" for _, r in summ.iterrows()]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
