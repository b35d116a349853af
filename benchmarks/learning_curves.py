"""Learning curves of the four presets on the demo's synthetic data, to choose the demo's budget.

Trains each requested (preset, learning rate) for ``--steps`` steps with a validation pass every
``--val-every`` steps, in ``OUT/<preset>_lr<lr>/`` (an existing run folder is resumed, so the
script can span sessions), then plots training loss/NCC and validation NCC of every run with
:func:`hypermorph_spatially_adaptive.figures.plot_training_curves` and prints, per run, the
plateau step: the first validation step whose NCC is within ``--tol`` of the run's best.

    python benchmarks/learning_curves.py                       # the 4 presets at lr 1e-4 (the demo's)
    python benchmarks/learning_curves.py --runs elastic_global:1e-3 elastic_sa:1e-3 ...
    python benchmarks/learning_curves.py --plot-only --png docs/learning_curves.png
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from hypermorph_spatially_adaptive import trainer  # noqa: E402
from hypermorph_spatially_adaptive.artifacts import CONFIG, read_train_logs  # noqa: E402

DEFAULT_RUNS = ["elastic_global:1e-4", "elastic_sa:1e-4", "diffusion_global:1e-4", "diffusion_sa:1e-4"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="outputs/long", help="folder of the run folders")
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, metavar="PRESET:LR",
                   help="runs to train/plot, e.g. elastic_sa:1e-3")
    p.add_argument("--steps", type=int, default=4000, help="training steps per run")
    p.add_argument("--val-every", type=int, default=250, help="validation pass every N steps")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--train-args", default="--num-pairs 60 --cache-dir .cache/synthetic",
                   help="data options passed to every training run (the demo's data by default)")
    p.add_argument("--plot-only", action="store_true", help="do not train, only plot the existing logs")
    p.add_argument("--png", default=None, help="figure path (default: OUT/learning_curves.png)")
    p.add_argument("--tol", type=float, default=0.01, help="plateau: validation NCC within this of the run's best")
    return p


def plateau_step(log, tol: float) -> Optional[int]:
    """First validation step whose ``val_ncc`` is within ``tol`` of the run's best (None: no validation)."""
    val = log.dropna(subset=["val_ncc"])
    if val.empty:
        return None
    best = float(val["val_ncc"].max())
    return int(val.loc[val["val_ncc"] >= best - tol, "step"].iloc[0])


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    args = build_parser().parse_args(argv)
    folders = []
    for spec in args.runs:
        preset, _, lr = spec.partition(":")
        if not lr:
            raise SystemExit(f"error: --runs entries are PRESET:LR, got {spec!r}")
        folder = os.path.join(args.out, f"{preset}_lr{lr}")
        folders.append((f"{preset} lr {lr}", folder))
        if args.plot_only:
            continue

        argv_run = shlex.split(args.train_args) + [
            "--steps", str(args.steps), "--lr", lr, "--seed", str(args.seed), "--val-every", str(args.val_every),
            "--log-every", str(args.val_every), "--checkpoint-every", str(2 * args.val_every), "--out", folder]
        if os.path.exists(os.path.join(folder, CONFIG)):
            argv_run.append("--resume")
        print(f"== {preset} lr {lr} -> {folder}", flush=True)
        trainer.main(preset, argv_run)

    from hypermorph_spatially_adaptive.figures import plot_training_curves

    logs = read_train_logs(dict(folders))
    for name, folder in folders:
        if name not in logs:
            print(f"{name}: no training log in {folder}, skipped", flush=True)
    if not logs:
        raise SystemExit("error: no training logs to plot")
    png = args.png or os.path.join(args.out, "learning_curves.png")
    plot_training_curves(logs, png)
    print(f"{'run':<28} {'steps':>6} {'val NCC @0':>10} {'best val NCC':>12} {'plateau step':>12}")
    for name, log in logs.items():
        val = log.dropna(subset=["val_ncc"])
        first = f"{val['val_ncc'].iloc[0]:.3f}" if len(val) else "-"
        best = f"{val['val_ncc'].max():.3f}" if len(val) else "-"
        print(f"{name:<28} {int(log['step'].max()):>6} {first:>10} {best:>12} {str(plateau_step(log, args.tol)):>12}")
    print(f"figure: {png}")
    return [f for _, f in folders]


if __name__ == "__main__":
    main()
