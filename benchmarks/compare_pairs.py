"""Paired comparison of two rows from any two per-pair tables, with Table 1's statistics.

Each side is ``CSV:ROW``: a per-pair CSV of this project (``inference.py``'s / ``bench_peer.py``'s
``per_pair_metrics.csv``, whose rows are named in ``method``, or ``bench_refine.py``'s
``bench_refine_pairs.csv``, named in ``row`` and split by ``mode``: ``--mode``) and the row's name
in it. The pairs both tables share (by ``pair_id``) are compared with
:func:`hypermorph_spatially_adaptive.tables.paired_comparison`: mean of the differences a - b per
metric, its 95 % studentized-bootstrap interval over the pairs, the test it inverts, the Wilcoxon
signed-rank p and which side the mean favours; plus how many pairs a wins. One table per side
means one run per side: the interval is over pairs only (a deterministic row, such as a refinement
from a zero field or ANTs with one thread, has no seed to vary). E.g. the refinement against the
ANTs preset on the study's stress pairs::

    .venv/bin/python benchmarks/compare_pairs.py \\
        --a outputs/refine_200/bench_refine_pairs.csv:zero+io+fold100+logj1+levels4x2x1+grid2+smooth3 \\
        --b outputs/study/ants_syn/per_pair_metrics.csv:ants-synpreset --mode stress
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.atomic import atomic_write  # noqa: E402

#: metrics compared when present in both tables (lower is better except Dice)
METRICS = ("mean_dice", "hd95", "dense_epe", "percent_neg_jac", "sdlogj", "cpu_seconds")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--a", required=True, metavar="CSV:ROW", help="first side (the differences are a - b)")
    p.add_argument("--b", required=True, metavar="CSV:ROW", help="second side")
    p.add_argument("--mode", default=None,
                   help="bench_refine_pairs.csv: the data mode of its rows (stress, demo, inter-subject); required "
                        "when a table holds several")
    p.add_argument("--metrics", nargs="+", default=list(METRICS),
                   help="metric columns compared when both tables have them")
    p.add_argument("--bootstrap", type=int, default=4000, help="resamples of the studentized bootstrap")
    p.add_argument("--out", default=None, help="also write the comparison as this CSV")
    return p


def load_side(spec: str, mode: Optional[str] = None):
    """The rows named ``ROW`` of ``CSV`` (``spec`` = ``CSV:ROW``; the last ':' splits), one per
    pair, with ``method`` = ROW. Raises ValueError naming what is missing."""
    import pandas as pd

    path, sep, row = spec.rpartition(":")
    if not sep or not path or not row:
        raise ValueError(f"expected CSV:ROW, got {spec!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    df = pd.read_csv(path, dtype={"pair_id": str})
    name = "method" if "method" in df else "row"
    if name not in df or "pair_id" not in df:
        raise ValueError(f"{path}: no 'pair_id' and 'method' (or 'row') columns")
    if "mode" in df:
        modes = sorted(df["mode"].unique())
        if mode is None and len(modes) > 1:
            raise ValueError(f"{path} holds the modes {modes}: give --mode")
        df = df[df["mode"] == (mode or modes[0])]
    df = df[df[name] == row]
    if df.empty:
        raise ValueError(f"{path}: no row named {row!r}")
    if "protocol" in df and df["protocol"].nunique() > 1:
        raise ValueError(f"{path}: row {row!r} appears under several protocols; keep one in the CSV")
    if df["pair_id"].duplicated().any():
        raise ValueError(f"{path}: row {row!r} has several entries for a pair")
    return df.drop(columns=[c for c in ("method", "row", "mode", "protocol") if c in df]).assign(method=row)


def compare(a, b, metrics: Sequence[str], n_boot: int = 4000):
    """:func:`tables.paired_comparison` of the two sides over their shared pairs, plus ``a_wins``
    (pairs where a is better: higher Dice, lower otherwise)."""
    import pandas as pd

    from hypermorph_spatially_adaptive.tables import paired_comparison

    shared = sorted(set(a["pair_id"]) & set(b["pair_id"]))
    if len(shared) < 2:
        raise ValueError(f"the two tables share {len(shared)} pairs; at least 2 are needed")
    metrics = [m for m in metrics if m in a and m in b]
    ra, rb = a["method"].iloc[0], b["method"].iloc[0]
    if ra == rb:
        rb = f"{rb} (b)"
        b = b.assign(method=rb)
    both = pd.concat([a[a["pair_id"].isin(shared)], b[b["pair_id"].isin(shared)]], ignore_index=True)
    comp = paired_comparison(both, [(ra, rb)], metrics=metrics, n_boot=n_boot)
    wide = {m: both.pivot(index="pair_id", columns="method", values=m) for m in metrics}
    comp["a_wins"] = [int(((wide[m][ra] > wide[m][rb]) if m == "mean_dice" else (wide[m][ra] < wide[m][rb])).sum())
                      for m in comp["metric"]]
    comp["a_mean"] = [float(np.mean(wide[m][ra])) for m in comp["metric"]]
    comp["b_mean"] = [float(np.mean(wide[m][rb])) for m in comp["metric"]]
    return comp


def markdown(comp) -> str:
    lines = ["| metric | a | b | a - b [95 %] | p | Wilcoxon p | a better on |", "|---|---|---|---|---|---|---|"]
    for _, r in comp.iterrows():
        lines.append(f"| {r['metric']} | {r['a_mean']:.3f} | {r['b_mean']:.3f} | {r['mean_diff']:+.3f} "
                     f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | {r['p']:.2g} | {r['wilcoxon_p']:.2g} | "
                     f"{r['a_wins']}/{r['n_pairs']} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None):
    args = build_parser().parse_args(argv)
    a, b = load_side(args.a, args.mode), load_side(args.b, args.mode)
    comp = compare(a, b, args.metrics, args.bootstrap)
    print(f"a = {a['method'].iloc[0]}, b = {b['method'].iloc[0]}, {int(comp['n_pairs'].max())} shared pairs\n")
    print(markdown(comp), flush=True)
    if args.out:
        atomic_write(args.out, comp)
    return comp


if __name__ == "__main__":
    from hypermorph_spatially_adaptive.cli import cli_main

    cli_main(main)
