"""The main job: train the four models, identify parameters, register, Table 1 and figures.

Stages (each hands over through files in ``--out``):

1. ``runs/{elastic,diffusion}_{global,sa}/``  the four trained models (``train_hypermorph_*``)
2. ``identification/{elastic,diffusion}/``   per-pair, per-tissue parameters from the global
   models (``parameter_identification.py``)
3. ``results/``                               per-pair metrics, ``table1.md``/``.csv`` and
   figures (``inference.py``)

Finished runs whose training command is unchanged are reused, so a rerun only redoes what
changed (``--force`` retrains). Default: the built-in synthetic dataset (2D 64 x 64 phantoms
with tissues of known stiffness); any dataset works with ``--dataset``/``--data-dir``.
``--quick`` runs the same path on tiny images in about a minute (CI).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import List, Optional, Sequence

import hypermorph_spatially_adaptive  # noqa: F401  (shims before TensorFlow)

PRESETS = ["elastic_global", "elastic_sa", "diffusion_global", "diffusion_sa"]
QUICK = {"image_size": [32, 32], "num_pairs": 12, "steps": 30, "grid_steps": 3,
         "arch": ["--enc-features", "8", "16", "16", "16", "--dec-features", "16", "16", "16", "16", "16", "8", "8",
                  "--hyp-units", "32", "--hyp-layers", "2"]}


def build_parser() -> argparse.ArgumentParser:
    import datasets

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    datasets.add_dataset_args(p)
    p.set_defaults(num_pairs=60)  # synthetic: 42 train / 9 val / 9 test pairs
    g = p.add_argument_group("pipeline")
    g.add_argument("--out", default="outputs/demo", help="folder for runs, identification and results")
    g.add_argument("--steps", type=int, default=1000, help="training steps per model")
    g.add_argument("--batch-size", type=int, default=1, help="training batch size")
    g.add_argument("--grid-steps", type=int, default=11, help="identification grid values per axis")
    g.add_argument("--seed", type=int, default=0, help="training seed (all four models)")
    g.add_argument("--panels", type=int, default=2, help="Fig. 3 panels for the first N test pairs")
    g.add_argument("--force", action="store_true", help="retrain even if a finished run with the same command exists")
    g.add_argument("--quick", action="store_true",
                   help="CI smoke mode: 32 x 32 synthetic images, 12 pairs, 30 steps, small nets, 3 x 3 grid")
    g.add_argument("--train-args", default="",
                   help="extra options passed to every training script, e.g. \"--lr 3e-4 --ncc-win 7\"")
    return p


def _data_argv(args) -> List[str]:
    """Re-serialize the data options for the training scripts."""
    out: List[str] = ["--dataset", args.dataset]
    for key in ("data_dir", "label_dir", "ndim", "num_pairs", "data_seed", "motion", "pairs_csv", "cache_dir",
                "slice_axis", "num_classes", "class_names", "target_spacing"):
        val = getattr(args, key, None)
        if val is not None:
            out += [f"--{key.replace('_', '-')}", str(val)]
    for key in ("image_size", "clip_percentiles"):
        val = getattr(args, key, None)
        if val is not None:
            out += [f"--{key.replace('_', '-')}", *[str(v) for v in val]]
    return out


def _finished_with(run_dir: str, argv: List[str]) -> bool:
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        cfg = json.load(f)
    return bool(cfg.get("finished")) and cfg.get("command", [None])[1:] == argv \
        and os.path.isfile(os.path.join(run_dir, "weights.h5"))


def main(argv: Optional[Sequence[str]] = None) -> str:
    import shlex

    args = build_parser().parse_args(argv)
    if args.quick:
        if args.dataset == "synthetic" and args.image_size is None:
            args.image_size = QUICK["image_size"]
        if args.dataset == "synthetic" and args.num_pairs == 60:
            args.num_pairs = QUICK["num_pairs"]
        args.steps, args.grid_steps = QUICK["steps"], QUICK["grid_steps"]
    if args.dataset == "synthetic" and args.cache_dir is None and args.data_dir is None:
        args.cache_dir = os.path.join(".cache", "synthetic")

    from hypermorph_spatially_adaptive import trainer
    import inference
    import parameter_identification

    t0 = time.time()
    runs = {p: os.path.join(args.out, "runs", p) for p in PRESETS}
    common = _data_argv(args) + ["--steps", str(args.steps), "--batch-size", str(args.batch_size),
                                 "--seed", str(args.seed), "--log-every", str(max(1, min(50, args.steps // 10))),
                                 "--val-every", str(max(1, args.steps // 4))]
    if args.quick:
        common += QUICK["arch"]
    common += shlex.split(args.train_args)
    print(f"== stage 1/3: training 4 models ({args.steps} steps each) -> {args.out}/runs", flush=True)
    for k, preset in enumerate(PRESETS, 1):
        argv_p = common + ["--out", runs[preset]]
        if not args.force and _finished_with(runs[preset], argv_p):
            print(f"-- [{k}/4] {preset}: finished run with the same command found, reused", flush=True)
            continue
        print(f"-- [{k}/4] {preset}", flush=True)
        trainer.main(preset, argv_p)

    print("== stage 2/3: parameter identification with the global models", flush=True)
    ident = {}
    for reg in ("elastic", "diffusion"):
        ident[reg] = os.path.join(args.out, "identification", reg)
        parameter_identification.main(["--run", runs[f"{reg}_global"], "--out", ident[reg],
                                       "--grid-steps", str(args.grid_steps)])

    print("== stage 3/3: registration with the identified parameters, Table 1, figures", flush=True)
    results = os.path.join(args.out, "results")
    inference.main(["--out", results, "--panels", str(args.panels),
                    "--elastic-sa", runs["elastic_sa"], "--elastic-ident", ident["elastic"],
                    "--diffusion-sa", runs["diffusion_sa"], "--diffusion-ident", ident["diffusion"]])
    minutes = (time.time() - t0) / 60
    print(f"\nPipeline finished in {minutes:.1f} min.\n  Table 1: {results}/table1.md (and .csv)\n"
          f"  per-pair metrics: {results}/per_pair_metrics.csv\n  figures: {results}/*.png, "
          f"{args.out}/identification/*/fig2_parameters.png\n  models: {args.out}/runs/", flush=True)
    return results


if __name__ == "__main__":
    main()
