#!/usr/bin/env python
"""Training budget of the elastic networks: network dense EPE against training steps (issue 34).

For each ``--runs PRESET:LR`` (``elastic_global``, ``elastic_sa``; any preset works) this trains
one run folder ``OUT/<preset>_lr<lr>/`` up to each ``--rungs`` step count in turn (the trainer's
``--resume``: the step target grows, nothing is retrained), and after every rung registers the
first ``--max-pairs`` pairs of ``--split`` with the **network alone** and scores them against the
true field (synthetic deformation pairs): dense EPE in mm inside the tissues
(``eval_metrics.dense_epe``) and mean Dice. The hyperparameter inputs are chosen by dense EPE,
i.e. with the true field, so the numbers are what the network *can express*, not what an
identification finds:

- ``global``: the grid of ``--grid-steps`` values per axis over ``(lambda, mu)`` (an SA model gets
  the same value in every class), ``one for all`` (the grid point with the best mean EPE over the
  pairs) and ``per pair`` (each pair's best point): the network analogue of bench_oracle.py's
  global family;
- ``tissue`` (SA models): from the best global point, one sweep of coordinate descent over the
  classes (background included), each class's ``(lambda, mu)`` over the same grid with the others
  kept, again ``one for all`` and ``per pair``: what the SA network gains from tissue-specific
  inputs.

Beside them: the pairs' initial EPE (zero field), the run's last validation NCC and seconds per
training step. Written to ``OUT/budget.csv`` (one row per run x rung; rungs already there are not
re-evaluated, so the script resumes across sessions as long as ``OUT`` is kept), ``OUT/budget.md``
and ``OUT/budget.png`` (EPE against steps, log axis). Reference lines for the figure (e.g. the
study's refined rows, the oracle optimizer) come from ``--reference LABEL=MM``.

Example (the study's data; about 25 min per 12000 steps of one preset on 2 free cores)::

    python benchmarks/bench_budget.py --out outputs/budget --runs elastic_global:1e-4 elastic_sa:1e-4 \\
        --rungs 1500 3000 6000 12000
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import eval_metrics  # noqa: E402
from hypermorph_spatially_adaptive import artifacts as art  # noqa: E402
from hypermorph_spatially_adaptive import run_folder, trainer  # noqa: E402
from hypermorph_spatially_adaptive.forward import Registrar  # noqa: E402
from hypermorph_spatially_adaptive.grid_identification import grid_values, make_grid  # noqa: E402

CSV = "budget.csv"
#: the study's data (benchmarks/study.py: --motion stress, 200 pairs = 140/30/30 at 64 x 64)
STUDY_DATA = "--motion stress --num-pairs 200 --cache-dir .cache/synthetic"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="outputs/budget", help="folder of the run folders and of budget.csv/.md/.png")
    p.add_argument("--runs", nargs="+", default=["elastic_global:1e-4", "elastic_sa:1e-4"], metavar="PRESET:LR",
                   help="runs to train and score (preset and learning rate)")
    p.add_argument("--rungs", type=int, nargs="+", default=[1500, 3000, 6000, 12000],
                   help="training step counts at which the network is scored (increasing)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--batch-size", type=int, default=1, help="training batch size")
    p.add_argument("--train-args", default=STUDY_DATA,
                   help="data and model options passed to every training run (default: the study's data)")
    p.add_argument("--val-every", type=int, default=500, help="validation NCC every N training steps")
    p.add_argument("--split", default="val", choices=["train", "val", "test"], help="pairs that are scored")
    p.add_argument("--max-pairs", type=int, default=30, help="first N pairs of the split (0: all)")
    p.add_argument("--grid-steps", type=int, default=6, help="grid values per axis in [0, 1] (6: 0, 0.2, ..., 1)")
    p.add_argument("--reference", nargs="*", default=[], metavar="LABEL=MM",
                   help="horizontal reference lines of the figure, e.g. 'refined elas-sas+io (study)=0.44'")
    p.add_argument("--score-only", action="store_true", help="train nothing; score the rungs already trained")
    return p


def _check_args(args: argparse.Namespace) -> List[Tuple[str, str]]:
    if sorted(set(args.rungs)) != list(args.rungs) or min(args.rungs) < 1:
        raise SystemExit(f"error: --rungs must be increasing positive step counts, got {args.rungs}")
    if args.grid_steps < 2:
        raise SystemExit("error: --grid-steps needs at least 2")
    runs = []
    for spec in args.runs:
        preset, _, lr = spec.partition(":")
        if not lr:
            raise SystemExit(f"error: --runs entries are PRESET:LR, got {spec!r}")
        runs.append((preset, lr))
    for spec in args.reference:
        label, _, value = spec.rpartition("=")
        try:
            float(value)
        except ValueError:
            raise SystemExit(f"error: --reference entries are LABEL=MM, got {spec!r}") from None
        if not label:
            raise SystemExit(f"error: --reference entries are LABEL=MM, got {spec!r}")
    return runs


def trained_steps(folder: str) -> int:
    """Steps of the run in ``folder`` whose final weights exist (0: no finished run)."""
    if not os.path.isfile(os.path.join(folder, art.CONFIG)):
        return 0
    config = art.read_run(folder, require_finished=False).config
    if art.unusable_run(folder, config) is not None:
        return 0
    return int(config["training"]["steps"])


def train_to(preset: str, lr: str, rung: int, folder: str, args: argparse.Namespace) -> float:
    """Train (or resume) the run in ``folder`` up to ``rung`` steps; returns the wall seconds."""
    argv = shlex.split(args.train_args) + [
        "--steps", str(rung), "--lr", lr, "--seed", str(args.seed), "--batch-size", str(args.batch_size),
        "--val-every", str(args.val_every), "--log-every", str(args.val_every),
        "--checkpoint-every", str(args.val_every), "--out", folder]
    if os.path.exists(os.path.join(folder, art.CONFIG)):
        argv.append("--resume")
    t0 = time.perf_counter()
    trainer.main(preset, argv)
    return time.perf_counter() - t0


def _score(reg, pairs, hyp: np.ndarray, num_classes: int) -> np.ndarray:
    """``[N pairs, H, 2]``: dense EPE (mm) and mean Dice of every pair at every row of ``hyp [H, P]``."""
    out = np.empty((len(pairs), len(hyp), 2))
    for i, pair in enumerate(pairs):
        truth = pair.extras["disp_true"]
        for start, _, disp in reg.chunks(pair.moving, pair.fixed, hyp, pair.fixed_seg):
            for k, d in enumerate(disp):
                out[i, start + k, 0] = eval_metrics.dense_epe(d, truth, pair.spacing, pair.fixed_seg, num_classes)["mean"]
                out[i, start + k, 1] = eval_metrics.mean_dice(pair.fixed_seg, eval_metrics.warp_labels(pair.moving_seg, d),
                                                              num_classes)
    return out


def _global_hyp(grid: np.ndarray, sa: bool, k: int) -> np.ndarray:
    """Network inputs ``[G, P]`` of the global grid ``[G, 2]``: an SA model gets each point in every class."""
    if not sa:
        return grid.astype(np.float32)
    return np.concatenate([np.repeat(grid[:, :1], k, axis=1), np.repeat(grid[:, 1:], k, axis=1)], axis=1).astype(np.float32)


def _sweep(reg, pairs, start: np.ndarray, grid: np.ndarray, k: int, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """One coordinate-descent sweep over the classes of an SA elastic input, minimizing the mean
    dense EPE over ``pairs``; ``start [P]``. Returns the final input ``[P]`` and its scores
    ``[N pairs, 2]`` (EPE, Dice; as :func:`_score`), so the choice is not registered again."""
    cur, best = start.astype(np.float32).copy(), None
    for c in range(k):
        cand = np.repeat(cur[None], len(grid), axis=0)
        cand[:, c], cand[:, k + c] = grid[:, 0], grid[:, 1]
        scores = _score(reg, pairs, cand, num_classes)
        j = int(np.argmin(scores[:, :, 0].mean(axis=0)))
        cur, best = cand[j], scores[:, j]
    return cur, best


def score_run(folder: str, split: str, max_pairs: int, grid_steps: int) -> Dict[str, float]:
    """The network of ``folder`` on the first ``max_pairs`` pairs of ``split``: dense EPE (mm) and mean
    Dice under the global (and, for SA models, tissue) selections of the module docstring."""
    model, config = run_folder.load_run(folder)
    if config["model"]["regularizer"] != "elastic":
        raise SystemExit(f"error: {folder}: the budget scores elastic runs (lambda, mu grid)")
    data = art.load_dataset(config)
    ids = data.split_ids(split)
    pairs = [data.load_pair(i) for i in (ids[:max_pairs] if max_pairs else ids)]
    if not pairs or any((p.extras or {}).get("disp_true") is None for p in pairs):
        raise SystemExit(f"error: {folder}: the {split} pairs need a true field (synthetic deformation pairs)")
    C = int(config["model"]["num_classes"])
    sa, k = bool(config["model"]["spatially_adaptive"]), C + 1
    reg = Registrar(model)
    grid = make_grid("elastic", grid_values(grid_steps))
    glob = _score(reg, pairs, _global_hyp(grid, sa, k), C)  # [N, G, 2]
    n = np.arange(len(pairs))
    one = int(np.argmin(glob[:, :, 0].mean(axis=0)))
    per = np.argmin(glob[:, :, 0], axis=1)
    row = {"pairs": len(pairs),
           "initial_epe": float(np.mean([eval_metrics.dense_epe(np.zeros_like(p.extras["disp_true"]), p.extras["disp_true"],
                                                                p.spacing, p.fixed_seg, C)["mean"] for p in pairs])),
           "global_one_epe": float(glob[:, one, 0].mean()), "global_one_dice": float(glob[:, one, 1].mean()),
           "global_one_lambda": float(grid[one, 0]), "global_one_mu": float(grid[one, 1]),
           "global_pair_epe": float(glob[n, per, 0].mean()), "global_pair_dice": float(glob[n, per, 1].mean())}
    if sa:
        hyp_g = _global_hyp(grid, True, k)
        best_one, s_one = _sweep(reg, pairs, hyp_g[one], grid, k, C)
        s_pair = np.concatenate([_sweep(reg, [p], hyp_g[per[i]], grid, k, C)[1] for i, p in enumerate(pairs)])
        row.update({"tissue_one_epe": float(s_one[:, 0].mean()), "tissue_one_dice": float(s_one[:, 1].mean()),
                    "tissue_pair_epe": float(s_pair[:, 0].mean()), "tissue_pair_dice": float(s_pair[:, 1].mean()),
                    "tissue_one_hyp": " ".join(f"{v:g}" for v in best_one)})
    return row


def _train_log_facts(folder: str) -> Dict[str, float]:
    """Last validation NCC and median seconds per step of the run's training log."""
    log = art.read_train_logs({"run": folder}).get("run")
    if log is None:
        return {"val_ncc": float("nan"), "sec_per_step": float("nan")}
    val = pd.to_numeric(log["val_ncc"], errors="coerce").dropna()
    sps = pd.to_numeric(log["sec_per_step"], errors="coerce").dropna()
    return {"val_ncc": float(val.iloc[-1]) if len(val) else float("nan"),
            "sec_per_step": float(sps.median()) if len(sps) else float("nan")}


def write_report(df: pd.DataFrame, out: str, references: Sequence[str]) -> None:
    """``budget.md`` (the table) and ``budget.png`` (EPE against steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["run", "step", "pairs", "initial_epe", "global_one_epe", "global_pair_epe", "tissue_one_epe",
            "tissue_pair_epe", "global_one_dice", "tissue_one_dice", "val_ncc", "sec_per_step"]
    show = df[[c for c in cols if c in df.columns]]
    lines = ["| " + " | ".join(show.columns) + " |", "|" + "---|" * len(show.columns)]
    for _, r in show.iterrows():
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.to_numpy()) + " |")
    with open(os.path.join(out, "budget.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"global_one_epe": ("-", "global, one for all"), "global_pair_epe": ("--", "global, per pair"),
              "tissue_one_epe": ("-.", "tissue, one for all"), "tissue_pair_epe": (":", "tissue, per pair")}
    for i, (run, g) in enumerate(df.groupby("run", sort=False)):
        for col, (ls, label) in styles.items():
            if col in g and g[col].notna().any():
                ax.plot(g["step"], g[col], ls, marker="o", color=f"C{i}", label=f"{run}: {label}")
    ax.set_xscale("log", base=2)
    for spec in references:
        label, _, value = spec.rpartition("=")
        ax.axhline(float(value), color="0.5", lw=0.8, ls=":")
        ax.text(0.01, float(value), label, transform=ax.get_yaxis_transform(), fontsize=7, va="bottom", color="0.3")
    ax.set_xlabel("training steps")
    ax.set_ylabel("network dense EPE, mm (inputs chosen with the true field)")
    ax.set_title(f"network dense EPE vs training budget ({int(df['pairs'].iloc[0])} pairs)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "budget.png"), dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> pd.DataFrame:
    args = build_parser().parse_args(argv)
    runs = _check_args(args)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, CSV)
    done = pd.read_csv(path) if os.path.isfile(path) else pd.DataFrame(columns=["run", "step"])
    rows = done.to_dict("records")
    for preset, lr in runs:
        name, folder = f"{preset}_lr{lr}", os.path.join(args.out, f"{preset}_lr{lr}")
        for rung in args.rungs:
            if ((done["run"] == name) & (done["step"] == rung)).any():
                continue
            have = trained_steps(folder)
            if have > rung:
                print(f"[budget] {name}: trained to {have} steps already, rung {rung} cannot be scored; skipped",
                      flush=True)
                continue
            seconds = float("nan")
            if have < rung:
                if args.score_only:
                    print(f"[budget] {name}: rung {rung} not trained (--score-only); stopped here", flush=True)
                    break
                print(f"[budget] {name}: training to {rung} steps", flush=True)
                seconds = train_to(preset, lr, rung, folder, args)
            t0 = time.perf_counter()
            row = {"run": name, "step": rung, "train_seconds": seconds,
                   **score_run(folder, args.split, args.max_pairs, args.grid_steps), **_train_log_facts(folder),
                   "score_seconds": time.perf_counter() - t0}
            print(f"[budget] {name} @ {rung}: EPE global one/pair {row['global_one_epe']:.3f}/"
                  f"{row['global_pair_epe']:.3f} mm" + (f", tissue one/pair {row['tissue_one_epe']:.3f}/"
                                                        f"{row['tissue_pair_epe']:.3f}" if "tissue_one_epe" in row else "")
                  + f" (initial {row['initial_epe']:.3f}); Dice {row['global_one_dice']:.3f}", flush=True)
            rows.append(row)
            df = pd.DataFrame(rows)
            tmp = path + ".tmp"
            df.to_csv(tmp, index=False)
            os.replace(tmp, path)
    df = pd.DataFrame(rows)
    if df.empty:
        raise SystemExit("error: nothing scored")
    df = df.sort_values(["run", "step"], kind="stable")
    write_report(df, args.out, args.reference)
    print(open(os.path.join(args.out, "budget.md")).read())
    return df


if __name__ == "__main__":
    main()
