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
import os
import shlex
from typing import List, Optional, Sequence

import datasets
import inference
import parameter_identification
from hypermorph_spatially_adaptive import artifacts as art
from hypermorph_spatially_adaptive import jobs as jobs_mod
from hypermorph_spatially_adaptive import run_folder, trainer
from hypermorph_spatially_adaptive.artifacts import read_train_logs
from hypermorph_spatially_adaptive.cli import add_refine_args, arg_argv, arg_float, arg_int
from hypermorph_spatially_adaptive.configs import RefineConfig
from hypermorph_spatially_adaptive.timing import StageTimer

REGULARIZERS = ("elastic", "diffusion")
PRESETS = ["elastic_global", "elastic_sa", "diffusion_global", "diffusion_sa"]
QUICK = {"image_size": [32, 32], "num_pairs": 12, "steps": 30, "grid_steps": 3, "refine": 5, "gradient_steps": 3,
         "arch": ["--enc-features", "8", "16", "16", "16", "--dec-features", "16", "16", "16", "16", "16", "8", "8",
                  "--hyp-units", "32", "--hyp-layers", "2"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    datasets.add_dataset_args(p)
    p.set_defaults(num_pairs=60)  # synthetic: 42 train / 9 val / 9 test pairs
    g = p.add_argument_group("pipeline")
    g.add_argument("--out", default="outputs/demo", help="folder for runs, identification and results")
    g.add_argument("--steps", type=arg_int(1), default=3000,
                   help="training steps per model (at lr 1e-4 the demo's validation NCC is within 0.01 of its "
                        "plateau by 2750-3000 steps, docs/experiments.md 'Training budget'; the study's stress data "
                        "needs >= 6000: its networks leave a plateau between 3000 and 6000 steps, docs/budget.md)")
    g.add_argument("--lr", type=arg_float(0.0), default=1e-4,
                   help="Adam learning rate of the four trainings. 1e-3 plateaus sooner in validation NCC but its "
                        "networks learn to ignore their hyperparameters (docs/experiments.md 'Training budget')")
    for reg in REGULARIZERS:
        g.add_argument(f"--{reg}-energy-scale", type=arg_float(0.0), default=1.0, metavar="K",
                       help=f"factor K on the energy in the loss of the two {reg} models (1 = paper text, eq. 1); "
                            f"refinement uses the same K. benchmarks/calibrate_energy.py proposes K for a dataset "
                            f"(docs/extensions.md 'Calibrated energy')")
    g.add_argument("--hyp-mapping", choices=["linear", "log"], default="linear",
                   help="hyperparameter-to-weight mapping of the four models' loss (see the training scripts' --help)")
    g.add_argument("--profile", choices=["paper", "authors"], default="paper",
                   help="paper: the paper text as this project reads it; authors: the authors' released code "
                        "(integration at full resolution, energy on the SVF, endpoint oversampling 0.2, constrained "
                        "global elastic sampling, similarity weight 1 - lambda - mu clipped at 0, voxelmorph's Grad "
                        "scale and NCC, background fixed at 0, zero point excluded, TRE objective where keypoints "
                        "exist). Passed to every stage (docs/fidelity.md); single settings through --train-args")
    g.add_argument("--log-decades", type=arg_float(0.0), default=2.0, metavar="D",
                   help="--hyp-mapping log: decades of regularization strength the box spans")
    g.add_argument("--zero-io", action="store_true",
                   help="also the 'zero+io' rows: refinement from a zero field with the same parameters (what the "
                        "network contributes to +io; the study turns it on)")
    g.add_argument("--csain", action="store_true",
                   help="also train both SA presets with CSAIN conditioning (runs/<reg>_sa_csain), identify them by "
                        "gradient and add their rows to Table 1 (docs/extensions.md 'CSAIN conditioning')")
    g.add_argument("--sa-train-args", default="", type=arg_argv,
                   help="extra options for the SA models only (HyperMorph-SA and CSAIN), e.g. \"--smooth-maps 0.8\"")
    g.add_argument("--batch-size", type=arg_int(1), default=1, help="training batch size")
    g.add_argument("--jobs", type=arg_int(0), default=0,
                   help="models trained side by side, each in its own process with its share of the cores' "
                        "TensorFlow threads; 0: one per core (1 with --quick). Same weights whatever the value "
                        "(op determinism). On 2 cores the gain is small (1.15x steps per second measured); more cores "
                        "gain more (each model keeps its own)")
    g.add_argument("--regularizers", nargs="+", choices=list(REGULARIZERS), default=list(REGULARIZERS),
                   help="regularizers whose models are trained, identified and registered (Table 1 has only their "
                        "rows); 'elastic' alone halves the cost of a study of the paper's claim")
    g.add_argument("--grid-steps", type=arg_int(2), default=11, help="identification grid values per axis")
    g.add_argument("--seed", type=arg_int(0), default=0, help="training seed (all four models)")
    g.add_argument("--refine", type=arg_int(0), default=100,
                   help="instance optimization steps per test pair after the networks (the +io rows; 0: off). "
                        "Default 100 here because Table 1 reports the +io rows; inference.py and register.py default "
                        "to 0 (opt-in: N more loss and gradient evaluations per pair)")
    add_refine_args(g)
    g.add_argument("--gradient-steps", type=arg_int(0), default=50,
                   help="gradient identification (oracle protocol, every parameter started at 0.5): Adam steps per "
                        "pair on the SA and global models' hyperparameters, the '(gradient)' rows; 0: off")
    g.add_argument("--gradient-population", action="store_true",
                   help="also the population protocol of gradient identification (the CSAIN paper's): one setting "
                        "per model optimized on the validation pairs' mean soft Dice, applied to every test pair "
                        "(population '(gradient)' rows; the study turns it on)")
    g.add_argument("--panels", type=arg_int(0), default=2, help="Fig. 3 panels for the first N test pairs (0: none)")
    g.add_argument("--force", action="store_true", help="retrain even if a finished run with the same command exists")
    g.add_argument("--quick", action="store_true",
                   help="CI smoke mode: 32 x 32 synthetic images, 12 pairs, 30 steps, small nets, 3 x 3 grid")
    g.add_argument("--train-args", default="", type=arg_argv,
                   help="extra options passed to every training script, e.g. \"--ncc-win 7 --oversample-endpoints 0.2\"")
    return p


def _check_inputs(args, preset_argv: dict) -> None:
    """Before anything is trained: every stage's options and every pair of every split (the test
    split included: it must be non-empty and readable); the NCC window and the identification
    grid against the image size."""
    from hypermorph_spatially_adaptive import grid_identification

    targs = [trainer.build_parser(p.replace("_csain", "")).parse_args(argv) for p, argv in preset_argv.items()]
    for a in targs:
        trainer.check_args(a)
    iargs = parameter_identification.build_parser().parse_args(["--run", targs[0].out,
                                                                "--grid-steps", str(args.grid_steps)])
    summary = datasets.validate_dataset(datasets.dataset_from_args(args), require=("train", "val", "test"),
                                        multiple=2 ** len(targs[0].enc_features),
                                        log=lambda line: print(line, flush=True))
    for a in targs:
        trainer.check_ncc_window(a, summary["image_shape"])
    grid_identification.check_grid_size("elastic", args.grid_steps, summary["image_shape"], iargs.max_grid_gb)


def _plot_training_curves(runs: dict, out_png: str) -> None:
    """Training loss/NCC and validation NCC of the four runs in one figure (``train_log.csv``)."""
    from hypermorph_spatially_adaptive.figures import plot_training_curves

    logs = read_train_logs(runs)
    if logs:
        plot_training_curves(logs, out_png)
        print(f"-- training curves: {out_png}", flush=True)


def _refuse_shorter(args, run_dir: str) -> None:
    """A run already trained past ``--steps`` cannot be resumed to fewer steps: say so in the
    pipeline's own options (not the trainer's ``--resume``, which the user never typed)."""
    try:
        latest = run_folder.latest_checkpoint(run_dir)
    except (OSError, ValueError):
        return  # the trainer's --resume reports a broken checkpoint itself
    done = latest[1] if latest else 0
    if done > args.steps:
        raise ValueError(f"--steps {args.steps}: {run_dir} is already trained to step {done}, and the pipeline only "
                         f"continues runs, never shortens them: use --steps {done} or more, --force to retrain the "
                         f"models with {args.steps} steps, or another --out")


def _training_plan(args, preset_argv: dict, runs: dict) -> list:
    """What stage 1 does with every model: ``(name, preset, argv or None, message)``; ``argv`` is
    the training command (``--overwrite``/``--resume`` added as needed), None for a reused run."""
    plan = []
    n = len(preset_argv)
    for k, (name, argv_p) in enumerate(preset_argv.items(), 1):
        preset = name.replace("_csain", "")  # the CSAIN runs are the SA presets with --conditioning csain
        state = art.run_state(runs[name], argv_p)
        if state != "none" and args.force:
            plan.append((name, preset, argv_p + ["--overwrite"],
                         f"-- [{k}/{n}] {name}: --force: the run in {runs[name]} is replaced (--overwrite)"))
        elif state == "finished":
            plan.append((name, preset, None, f"-- [{k}/{n}] {name}: finished run with the same command found, reused"))
        elif state == "none":
            plan.append((name, preset, argv_p, f"-- [{k}/{n}] {name}"))
        else:
            _refuse_shorter(args, runs[name])
            plan.append((name, preset, argv_p + ["--resume"], f"-- [{k}/{n}] {name}: " + (
                "unfinished run with the same command found, resuming it" if state == "unfinished" else
                f"{runs[name]} holds a run made with another command; resuming it "
                "(refused unless only the step target or logging changed)")))
    return plan


def _resume_refused(exc_text: str) -> ValueError:
    return ValueError(f"{exc_text} [run_pipeline.py: --force retrains the models]")


def _train_all(args, preset_argv: dict, runs: dict, timer: "StageTimer") -> None:
    """Stage 1: train every model (reuse finished runs with the same command, resume unfinished
    ones); ``--jobs`` > 1 trains them side by side in child processes (same weights: see
    :mod:`hypermorph_spatially_adaptive.jobs`)."""
    plan = _training_plan(args, preset_argv, runs)
    todo = [(name, preset, argv) for name, preset, argv, _ in plan if argv is not None]
    parallel = _jobs(args, len(todo))
    threads = jobs_mod.threads_per_job(parallel)
    print(f"== stage 1/3: training {len(plan)} models ({args.steps} steps each) -> {args.out}/runs"
          + (f" ({parallel} at a time, {threads} TensorFlow thread(s) each; --jobs)" if parallel > 1 else ""),
          flush=True)
    for *_, message in plan:
        print(message, flush=True)
    if parallel == 1:
        for name, preset, argv in todo:
            with timer.stage(f"train {name}"):
                try:
                    trainer.main(preset, argv)
                except ValueError as exc:
                    if "--resume" in argv and "--resume refused" in str(exc):
                        raise _resume_refused(str(exc)) from exc
                    raise
        return
    work = [jobs_mod.script_job(name, f"train_hypermorph_{preset}.py", argv, weight=_TRAIN_WEIGHT.get(name, 1.0))
            for name, preset, argv in todo]
    with timer.stage(f"train {len(work)} models, {parallel} at a time"):
        try:
            seconds = jobs_mod.run_jobs(work, parallel, threads)
        except jobs_mod.JobFailed as exc:
            if "--resume refused" in exc.message:
                raise _resume_refused(f"{exc.name}: {exc.message}") from exc
            raise ValueError(f"training {exc} (its output is above)") from exc
    for name, s in seconds.items():
        timer.record(f"  train {name} (in parallel)", s, counted=False)


# relative cost of one training step (2D, CPU): heavier runs start first when trained side by side
_TRAIN_WEIGHT = {"elastic_sa": 4.0, "diffusion_sa": 3.0, "elastic_global": 2.0, "diffusion_global": 1.0,
                 "elastic_sa_csain": 6.0, "diffusion_sa_csain": 5.0}


def _jobs(args, n_work: int) -> int:
    """Parallel child processes for ``n_work`` independent jobs: ``--jobs`` or, at 0 (auto), one
    per core (at most ``n_work``); ``--quick`` auto stays in-process (1)."""
    if n_work <= 1:
        return 1
    if args.jobs:
        return min(args.jobs, n_work)
    return 1 if args.quick else jobs_mod.default_jobs(n_work)


def _identification_plan(args, runs: dict) -> tuple:
    """Stage 2's calls of ``parameter_identification.py``: ``(ident, calls)`` with ``ident[reg]``
    the identification folders inference reads and ``calls`` a list of ``(name, argv, weight)``."""
    ident, calls = {}, []
    for reg in args.regularizers:
        ident[reg] = []
        for protocol in ("oracle", "population"):
            ident[reg].append(os.path.join(args.out, art.IDENTIFICATION_DIRS[protocol], reg))
            calls.append((f"identify {reg} grid ({protocol})",
                          ["--run", runs[f"{reg}_global"], "--out", ident[reg][-1], "--grid-steps",
                           str(args.grid_steps), "--protocol", protocol, *_profile_argv(args)],
                          1.0 if protocol == "oracle" else 0.5))
        if not args.gradient_steps:
            continue
        # docs/extensions.md "Gradient identification": Adam on the models' own inputs from 0.5 (not from the grid's
        # choice: grid values of 0 or 1 sit where the sigmoid is flat; benchmarks/README.md)
        for sa, folder in ((f"{reg}_sa", art.IDENTIFICATION_DIRS["gradient"]),
                           (f"{reg}_sa_csain", art.IDENTIFICATION_DIRS["gradient"] + "_csain")):
            if sa not in runs:
                continue
            for protocol in ("oracle", "population") if args.gradient_population else ("oracle",):
                ident[reg].append(os.path.join(args.out, folder + ("_population" if protocol == "population" else ""),
                                               reg))
                calls.append((f"identify {sa} gradient ({protocol})",
                              ["--run", runs[f"{reg}_global"], "--sa-run", runs[sa], "--method", "gradient",
                               "--init", "center", "--protocol", protocol, "--steps", str(args.gradient_steps),
                               "--out", ident[reg][-1], *_profile_argv(args)], 2.0))
    return ident, calls


def _identify_all(args, runs: dict, timer: "StageTimer") -> dict:
    """Stage 2: grid identification in both protocols, gradient identification per SA run;
    ``--jobs`` > 1 runs the calls side by side in child processes."""
    ident, calls = _identification_plan(args, runs)
    parallel = _jobs(args, len(calls))
    print("== stage 2/3: parameter identification (grid: oracle and population protocol; gradient: oracle"
          + (" and population)" if args.gradient_population else ")")
          + (f", {parallel} at a time" if parallel > 1 else ""), flush=True)
    if parallel == 1:
        for name, argv, _ in calls:
            with timer.stage(name):
                parameter_identification.main(argv)
        return ident
    work = [jobs_mod.script_job(name, "parameter_identification.py", argv, weight) for name, argv, weight in calls]
    with timer.stage(f"identification, {len(work)} calls, {parallel} at a time"):
        try:
            seconds = jobs_mod.run_jobs(work, parallel, jobs_mod.threads_per_job(parallel))
        except jobs_mod.JobFailed as exc:
            raise ValueError(f"{exc} (its output is above)") from exc
    for name, sec in seconds.items():
        timer.record(f"  {name} (in parallel)", sec, counted=False)
    return ident


def _profile_argv(args) -> List[str]:
    """``--profile X`` for every stage, or nothing for the default paper profile (commands, and so
    the reuse of runs made before the option, stay as they were)."""
    return [] if args.profile == "paper" else ["--profile", args.profile]


def _apply_quick_and_cache(args) -> None:
    """``--quick`` sizes (only where the user kept the defaults) and the demo's synthetic cache
    folder ``.cache/synthetic`` when no data or cache folder is given; edits ``args`` in place."""
    if args.quick:
        if args.dataset == "synthetic" and args.image_size is None:
            args.image_size = QUICK["image_size"]
        if args.dataset == "synthetic" and args.num_pairs == 60:
            args.num_pairs = QUICK["num_pairs"]
        args.steps, args.grid_steps, args.refine = QUICK["steps"], QUICK["grid_steps"], QUICK["refine"]
        args.gradient_steps = min(args.gradient_steps, QUICK["gradient_steps"])
    if args.dataset == "synthetic" and args.cache_dir is None and args.data_dir is None:
        args.cache_dir = os.path.join(".cache", "synthetic")


def _preset_argv(args, runs: dict) -> dict:
    """The training command line (argv of train_hypermorph_*.py) of every preset in ``runs``
    (preset -> run folder): data options, steps and schedule, ``--train-args``, the energy
    scale unless 1, the hyp mapping unless linear, ``--sa-train-args`` for SA presets, CSAIN
    conditioning for ``*_csain``."""
    common = datasets.dataset_argv(args) + ["--steps", str(args.steps), "--lr", repr(args.lr), "--batch-size", str(args.batch_size),
                                 "--seed", str(args.seed), "--log-every", str(max(1, min(50, args.steps // 10))),
                                 "--val-every", str(max(1, args.steps // 4))]
    if args.quick:
        common += QUICK["arch"]
    common += _profile_argv(args) + shlex.split(args.train_args)
    mapping = [] if args.hyp_mapping == "linear" else ["--hyp-mapping", args.hyp_mapping,
                                                        "--log-decades", repr(args.log_decades)]
    preset_argv = {}
    for p in runs:
        k = getattr(args, f"{p.split('_')[0]}_energy_scale")
        sa_only = shlex.split(args.sa_train_args) if "_sa" in p else []
        csain = ["--conditioning", "csain"] if p.endswith("_csain") else []
        # K = 1 leaves the command (and so the reuse of runs made before --energy-scale) as it was
        preset_argv[p] = (common + (["--energy-scale", repr(k)] if k != 1.0 else []) + mapping + sa_only + csain
                          + ["--out", runs[p]])
    return preset_argv


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = build_parser().parse_args(argv)
    _apply_quick_and_cache(args)

    timer = StageTimer()
    regs = [r for r in REGULARIZERS if r in args.regularizers]  # a fixed order whatever the command's
    names = [p for p in PRESETS if p.split("_")[0] in regs] + ([f"{r}_sa_csain" for r in regs] if args.csain else [])
    runs = {p: os.path.join(args.out, "runs", p) for p in names}
    preset_argv = _preset_argv(args, runs)
    with timer.stage("check data and options"):
        _check_inputs(args, preset_argv)
    _train_all(args, preset_argv, runs, timer)
    with timer.stage("training curves figure"):
        _plot_training_curves({p: runs[p] for p in PRESETS if p in runs}, os.path.join(args.out, "training_curves.png"))
    ident = _identify_all(args, runs, timer)

    print("== stage 3/3: registration with the identified parameters, Table 1, figures", flush=True)
    results = os.path.join(args.out, "results")

    groups = [a for r in regs for a in (f"--{r}-sa", *[runs[p] for p in (f"{r}_sa", f"{r}_sa_csain") if p in runs],
                                         f"--{r}-ident", *ident[r])]
    with timer.stage("inference: register, refine, Table 1, figures"):
        inference.main(["--out", results, "--panels", str(args.panels), "--refine", str(args.refine),
                        *RefineConfig.from_args(args).argv(), *(["--zero-io"] if args.zero_io else []),
                        *_profile_argv(args), *groups])
    # in --out, not in results/: inference's folder holds only what inference wrote (its completion marker)
    timer.write_csv(os.path.join(args.out, art.STAGE_TIMES))
    minutes = timer.total() / 60
    print(f"\nWall time per stage ({args.out}/{art.STAGE_TIMES}):\n{timer.table()}", flush=True)
    print(f"\nPipeline finished in {minutes:.1f} min.\n  Table 1: {results}/{art.TABLE1_MD} (and .csv)\n"
          f"  per-pair metrics: {results}/{art.PER_PAIR_METRICS}\n  figures: {results}/*.png, "
          f"{args.out}/{art.IDENTIFICATION_DIRS['oracle']}/*/{art.FIG2}, {args.out}/training_curves.png\n"
          f"  models: {args.out}/runs/", flush=True)
    return results


if __name__ == "__main__":
    from hypermorph_spatially_adaptive.cli import cli_main

    cli_main(main)
