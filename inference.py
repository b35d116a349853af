"""Register the test pairs with the identified parameters; Table 1 and the paired comparison.

For each regularizer given (elastic and/or diffusion) this loads the spatially adaptive (SA)
run, one or more identification folders of the global run (``identified_parameters.csv`` and
its ``identification.json``: grid or gradient method, oracle or population protocol) and the
global run itself. Rows per identification (``<reg>`` = ``elas`` / ``diff``):

- ``<reg>-g``      the global model with the pair's -g parameters,
- ``<reg>-sas``    one forward pass of the SA model with the per-class parameters,
- ``<reg>-sas@g``  ablation: the SA model with every class at the -g parameters,
- ``<reg>-g+io`` / ``<reg>-sas+io`` with ``--refine N``: the displacement refined per pair for
  N Adam steps on the training loss (global values / tissue-specific maps, see
  :mod:`hypermorph_spatially_adaptive.refinement`). The maps of ``-sas+io`` are built from a
  segmentation in the fixed frame: in the oracle protocol the test pair's fixed segmentation
  (paper text); in the population protocol, where no test label may touch the registration,
  the *moving* segmentation carried into the fixed frame by the network's own displacement
  (nearest neighbour, ``eval_metrics.warp_labels``), the moving image playing the atlas whose
  labels are known, as in atlas-based segmentation (``--population-maps``). Rows say what
  built their maps in the column ``maps``.
  By default the refinement runs coarse to fine (``--refine-levels 4 2 1``, the steps split equally),
  adds a folding and a log-Jacobian penalty and smooths a coarser update so that the field stays
  plausible (``--refine-fold-weight``, ``--refine-logj-weight``, ``--refine-smooth``,
  ``--refine-grid``, ``--refine-svf``; docs/extensions.md "Refinement that does not tear"); Table 1 marks a +io row whose mean %negJ exceeds 0.05 with a dagger (Dice rises with tearing).
- ``initial``: no registration.

Gradient identifications (``parameter_identification.py --method gradient``) add
``<reg>-g (gradient)`` and ``<reg>-sas (gradient)`` rows (``gradient-epe`` for the EPE
oracle). Every row carries its protocol; Table 1 shows one block per protocol.

``--<reg>-sa`` takes one or more SA runs. The rows of an SA run trained with
``--conditioning csain`` carry its conditioning: ``<reg>-sas (csain)``, ``<reg>-sas@g (csain)``,
``<reg>-sas+io (csain)``, ``<reg>-sas (csain) (gradient)``; HyperMorph-SA rows keep their names,
so ``--elastic-sa runs/elastic_sa runs/elastic_sa_csain`` puts both in one table with paired
comparisons between them. Grid identifications (of the global run) apply to every SA run of the
``unit`` weight range (not to ``--weight-range paper`` runs, whose hyp means other weights); a
gradient identification applies only to the SA run it optimized (``sa_run`` in its
identification.json). A CSAIN network builds its input map from a segmentation of the fixed
frame: the fixed labels in the oracle protocol; in the population protocol (with the default
``--population-maps warped-moving``) the moving labels warped by the -g network with the same
source's values, so no test label enters the forward pass (column ``maps`` says which).

Writes into ``--out``: ``per_pair_metrics.csv`` (class Dice, mean Dice, HD95 per class and
mean, lost classes, TRE where keypoints exist, %negJ, SDlogJ, seconds per pair and, for synthetic
data, the dense error against the true field overall and per tissue), ``table1.csv`` /
``table1.md`` (mean(std) in the paper's layout, with the paired comparison under it),
``comparison.csv`` (per protocol: -sas minus -g, -sas@g minus -g, -sas minus -sas@g and
-sas+io minus -g+io; mean difference, 95% studentized-bootstrap interval and its p, Holm-adjusted p,
Wilcoxon p and its number of non-zero differences, n; see ``tables.paired_comparison``), Fig. 3-style panels
``fig3_<pair>.png``, ``dice_boxplots.png``, and with ``--save-nifti`` the warped image, warped
labels and displacement of every pair as NIfTI with the fixed image's affine (file names from
pair ids are sanitized, ``folders.safe_file_names``).

``--profile`` (docs/fidelity.md) is checked, not applied: every run must have been trained with the
same profile (and the settings that decide what a hyperparameter means), every identification made
under it; a mismatch is refused. Default: the runs' profile.

``--out`` is locked while written and replaced whole at the end from a temporary sibling, so a
killed run leaves the old results complete. ``inference.json`` records ``provenance``; an
identification whose recorded weights (global, or the SA run of a gradient identification) or
data hashes differ from the runs and data now is refused unless ``--force`` (recorded).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from datasets.atomic import atomic_write
from hypermorph_spatially_adaptive import artifacts as art
from hypermorph_spatially_adaptive import cli, run_folder
from hypermorph_spatially_adaptive import provenance as prov
from hypermorph_spatially_adaptive.artifacts import INFERENCE_META
from hypermorph_spatially_adaptive.configs import RefineConfig, check_same_weighting
from hypermorph_spatially_adaptive.folders import safe_file_names, staged_folder
from hypermorph_spatially_adaptive.forward import Registrar, warped_moving_segmentation
from hypermorph_spatially_adaptive.profiles import check_same_profile

REGS = ("elastic", "diffusion")
MAP_SOURCES = ("warped-moving", "fixed")
#: fewest --bootstrap resamples accepted
MIN_BOOTSTRAP = 100
#: the ``maps`` column: what built a -sas+io row's refinement maps
MAP_LABELS = {"warped-moving": "moving seg warped by the network", "fixed": "fixed seg (test label)"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for reg in REGS:
        g = p.add_argument_group(f"{reg} models")
        g.add_argument(f"--{reg}-sa", default=None, nargs="+", metavar="RUN",
                       help=f"run folder(s) of SA {reg} models, at most one per conditioning (HyperMorph "
                            "hypernetwork, CSAIN); CSAIN rows are labelled '(csain)'")
        g.add_argument(f"--{reg}-ident", default=None, nargs="+", metavar="DIR",
                       help=f"identification folder(s) of the global {reg} model (each holds "
                            "identified_parameters.csv and identification.json; e.g. the oracle and the "
                            "population protocol, grid and gradient method)")
        g.add_argument(f"--{reg}-global", default=None, metavar="RUN",
                       help=f"run folder of the global {reg} model (default: the one named in identification.json)")
    p.add_argument("--out", default="results", help="output folder")
    p.add_argument("--refine", type=cli.arg_int(0), default=0, metavar="N",
                   help="instance optimization: refine the -g and -sas displacements of every pair for N Adam "
                        "steps on the training loss (adds the +io rows; 0: off, the default: refinement costs N loss "
                        "and gradient evaluations per pair; run_pipeline.py passes --refine 100 for Table 1)")
    p.add_argument("--refine-lr", type=cli.arg_float(0.0), default=0.1,
                   help="Adam learning rate of the refinement (voxels)")
    p.add_argument("--population-maps", choices=MAP_SOURCES, default="warped-moving",
                   help="segmentation that builds the -sas+io refinement's parameter maps in the population "
                        "protocol: 'warped-moving' (label-free at test time: the moving segmentation warped by the "
                        "network's displacement) or 'fixed' (the test pair's fixed segmentation, which also scores "
                        "the row: a label leak, for measuring it). The oracle protocol always uses 'fixed'")
    cli.add_refine_args(p)
    p.add_argument("--bootstrap", type=cli.arg_int(MIN_BOOTSTRAP), default=2000,
                   help="resamples of the studentized bootstrap interval of the paired comparison (at least "
                        f"{MIN_BOOTSTRAP}: the interval's 2.5%% tails need several resamples each)")
    p.add_argument("--seed", type=cli.arg_int(0), default=0, help="seed of the bootstrap")
    p.add_argument("--zero-io", action="store_true",
                   help="with --refine: also refine from a zero field with the same parameters and maps (rows "
                        "'<reg>-g zero+io', '<reg>-sas zero+io'): what the network contributes to the +io rows")
    p.add_argument("--panels", type=cli.arg_int(0), default=2, help="Fig. 3 panels for the first N test pairs (0: none)")
    p.add_argument("--save-nifti", action="store_true", help="write warped image/labels and displacement as NIfTI")
    p.add_argument("--data-dir", default=None, help="override the dataset folder saved in the run config")
    p.add_argument("--label-dir", default=None, help="override the tissue label folder saved in the run config")
    p.add_argument("--profile", choices=["paper", "authors"], default=None,
                   help="paper (paper text) or authors (authors' code), docs/fidelity.md: checked against the runs' "
                        "config.json 'fidelity' and every identification's profile; a mismatch is refused. Default: "
                        "the runs' profile")
    p.add_argument("--force", action="store_true",
                   help="proceed although an identification's recorded weights or data hashes differ from the runs "
                        "and data now (identification.json / config.json 'provenance'); recorded in inference.json")
    return p


def sa_tag(config: Dict) -> str:
    """Row-name tag of an SA run: ``''`` (HyperMorph hypernetwork) or ``' (csain)'``."""
    cond = config["model"].get("conditioning", "hypernetwork")
    return "" if cond == "hypernetwork" else f" ({cond})"


def _load_sa_runs(reg: str, sa_runs: Sequence[str]) -> List[Dict]:
    """Load the SA runs of one regularizer: ``[{run, model, cfg, tag}]`` (one per conditioning)."""
    out = []
    for run in sa_runs:
        model, cfg = run_folder.load_run(run, expect_regularizer=reg, expect_sa=True)
        out.append({"run": run, "model": model, "cfg": cfg, "tag": sa_tag(cfg)})
    tags = [s["tag"] for s in out]
    if len(set(tags)) != len(tags):
        raise ValueError(f"--{reg}-sa: two runs with the same conditioning ({', '.join(sa_runs)}); their rows "
                         "would share names: give one per conditioning (run inference once per variant)")
    if any(s["cfg"]["data"] != out[0]["cfg"]["data"] or s["cfg"]["class_names"] != out[0]["cfg"]["class_names"]
           for s in out):
        raise ValueError(f"--{reg}-sa: the runs {', '.join(sa_runs)} were trained on different datasets/classes")
    return out


def applies_to(source, sa_run: str, sa_config: Dict) -> bool:
    """A grid identification (of the global run) applies to every SA run trained in the global
    run's weight range ('unit'); a gradient one only to the SA run it optimized (``sa_run`` in its
    identification.json). Values of the [0, 1] range mean other weights under the CSAIN paper's
    range (``10 * hyp``, unit similarity weight), so grid values never go to such a run."""
    if source.method == "grid":
        return sa_config["model"].get("weight_range", "unit") == "unit"
    own = source.meta.get("sa_run")
    return own is None or os.path.abspath(own) == os.path.abspath(sa_run)


def _load_group(reg: str, sa_runs: Sequence[str], ident_dirs: Sequence[str], global_run: Optional[str]) -> Dict:
    """Load and cross-check one regularizer's SA model(s), global model and identifications."""
    sas = _load_sa_runs(reg, sa_runs)
    sa_cfg = sas[0]["cfg"]
    sa_names = art.sa_columns(reg, sa_cfg["class_names"])
    sources = [art.read_identification(d, reg, sa_names) for d in ident_dirs]
    global_run = global_run or sources[0].global_run
    g_model, g_cfg = run_folder.load_run(global_run, expect_regularizer=reg, expect_sa=False)
    for src in sources:
        for run, cfg in ((sas[0]["run"], sa_cfg), (global_run, g_cfg)):
            if cfg["data"] != src.data:
                raise ValueError(f"{src.csv}: identified on dataset {src.data}, but {run} was "
                                 f"trained on {cfg['data']}")
    # runs in the paper weight range get only their own gradient identification (see applies_to)
    check_same_weighting({**{sa["run"]: sa["cfg"] for sa in sas
                            if sa["cfg"]["model"].get("weight_range", "unit") == "unit"}, global_run: g_cfg})
    # gradient identifications of different SA runs (e.g. HyperMorph-SA and CSAIN) may share protocol and method
    labels = [(s.protocol, s.suffix, os.path.abspath(s.meta.get("sa_run") or "") if s.method != "grid" else "")
              for s in sources]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--{reg}-ident: two identification folders have the same protocol and method {labels}")
    return {"reg": reg, "sas": sas, "global_run": global_run, "sa_cfg": sa_cfg,
            "sa_names": sa_names, "g_model": g_model, "g_cfg": g_cfg, "sources": sources}


def _save_nifti(folder: str, pair, method: str, warped, warped_seg, disp) -> None:
    import nibabel as nib

    affine = pair.affine if pair.affine is not None else np.diag([*pair.spacing, *[1.0] * (4 - len(pair.spacing))])
    os.makedirs(folder, exist_ok=True)
    for name, arr in (("warped", warped[..., 0].astype(np.float32)), ("warped_seg", warped_seg.astype(np.int16)),
                      ("disp_vox", disp.astype(np.float32))):
        path = os.path.join(folder, f"{method.replace(' ', '_')}_{name}.nii.gz")
        atomic_write(path, lambda tmp, a=arr: nib.save(nib.Nifti1Image(a, affine), tmp))


def check_provenance(groups: List[Dict], dataset, split: str, args) -> Dict:
    """Every identification must come from the weights of the global run (and, gradient, of the
    SA run) used now and from the same data; every run's weights and data must be those its
    config.json recorded. Refuses a mismatch unless ``--force``; returns inference.json's
    ``provenance`` (data hash of the split, sha256 of every weights.h5 and identified_parameters.csv,
    forced messages)."""
    runs = {}
    for g in groups:
        runs[g["global_run"]] = g["g_cfg"]
        runs.update({sa["run"]: sa["cfg"] for sa in g["sas"]})
    log = lambda line: print(line, flush=True)  # noqa: E731
    out = prov.check_runs(list(runs.items()), dataset, [split], args.force, args.data_dir, "inference", log)
    problems, idents = [], {}
    for g in groups:
        for src in g["sources"]:
            idents[os.path.abspath(src.csv)] = art.file_sha256(src.csv)
            rec = src.meta.get("provenance")
            meta_path = os.path.join(src.folder, art.IDENTIFICATION_META)
            if not isinstance(rec, dict):
                log(f"[inference] {meta_path}: no provenance recorded (made before it existed); weights and data "
                    f"not checked")
                continue
            checks = [("global", rec.get("global_weights_sha256"), g["global_run"])]
            if src.method != "grid":
                own = [sa["run"] for sa in g["sas"] if applies_to(src, sa["run"], sa["cfg"])]
                checks += [("SA", rec.get("sa_weights_sha256"), run) for run in own]
                if not own:
                    problems.append(f"{meta_path} is a gradient identification of the SA run {src.meta.get('sa_run')}, "
                                    f"which is none of the --{g['reg']}-sa runs given")
            for what, recorded, run in checks:
                now = prov.weights_sha256(run)
                if recorded and recorded != now:
                    problems.append(f"{meta_path} was made with {what} weights sha256 {prov.short(recorded)}, but "
                                    f"{os.path.join(run, art.WEIGHTS)} is {prov.short(now)} (another run, or "
                                    f"retrained since)")
            problems += prov.data_mismatches(rec.get("data"), {split: out["data"][split]}, meta_path,
                                             "the dataset now")
    out["forced"] += prov.refuse_or_force(problems, args.force, "inference", log)
    out["identified_parameters_sha256"] = idents
    return out


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = build_parser().parse_args(argv)
    # written into a temporary sibling that replaces --out only when everything succeeded: a killed
    # or failed run leaves the old results folder complete, never a mixture of old and new files

    inputs = [args.data_dir, args.label_dir] + [p for reg in REGS for opt in ("sa", "ident")
                                                for p in (getattr(args, f"{reg}_{opt}") or [])]
    inputs += [getattr(args, f"{reg}_global") for reg in REGS]  # never replaced (CONVENTIONS.md)
    with staged_folder(args.out, "results folder", log=lambda line: print(line, flush=True), inputs=inputs,
                       legacy_meta=INFERENCE_META) as dest:
        _infer(args, argv, dest)
    return args.out


def _load_groups(args: argparse.Namespace) -> List[Dict]:
    """One group (:func:`_load_group`) per regularizer whose ``--<reg>-sa`` and ``--<reg>-ident`` are given."""
    groups = []
    for reg in REGS:
        sa, ident, glob = (getattr(args, f"{reg}_sa"), getattr(args, f"{reg}_ident"), getattr(args, f"{reg}_global"))
        if sa is None and ident is None:
            continue
        if sa is None or ident is None:
            raise ValueError(f"--{reg}-sa and --{reg}-ident must be given together")
        groups.append(_load_group(reg, sa, ident, glob))
    if not groups:
        raise SystemExit("nothing to do: give --elastic-sa/--elastic-ident and/or --diffusion-sa/--diffusion-ident")
    args.resolved_profile = check_profiles(groups, args.profile)
    return groups


def check_profiles(groups: List[Dict], profile: Optional[str]) -> str:
    """The runs' common profile (:func:`~hypermorph_spatially_adaptive.profiles.check_same_profile`:
    every run of every group, ``--profile`` if given); ValueError if an identification was made under
    another profile (identification.json 'fidelity'; none recorded = paper)."""
    runs = {}
    for g in groups:
        runs[g["global_run"]] = g["g_cfg"]
        runs.update({sa["run"]: sa["cfg"] for sa in g["sas"]})
    fid = check_same_profile(runs, profile)
    for g in groups:
        for src in g["sources"]:
            made = (src.meta.get("fidelity") or {}).get("profile", "paper")
            if made != fid.profile:
                raise ValueError(f"{src.folder}: identified under --profile {made}, but the runs were trained with "
                                 f"--profile {fid.profile}: identify again with the runs' profile")
    return fid.profile


def _load_test_set(groups: List[Dict], args: argparse.Namespace) -> Tuple[object, str, List[str]]:
    """The dataset all runs were trained on, the split and the pair ids every identification was made
    on (those of the first one): ``(dataset, split, pair_ids)``. Refuses runs of different datasets or
    incompatible with the dataset now, and identifications of other pairs or another split."""
    cfg0 = groups[0]["sa_cfg"]
    for g in groups[1:]:
        if g["sa_cfg"]["data"] != cfg0["data"]:
            raise ValueError(f"the {groups[0]['reg']} and {g['reg']} models were trained on different datasets")
    dataset = art.load_dataset(cfg0, args.data_dir, args.label_dir)
    first = groups[0]["sources"][0]
    split = first.split
    split_ids = dataset.split_ids(split)
    pair_ids = first.pair_ids
    for g in groups:
        for sa in g["sas"]:
            run_folder.check_compatible(sa["run"], sa["cfg"], dataset)
        for src in g["sources"]:
            ids = src.pair_ids
            foreign = [p for p in ids if p not in split_ids]
            if foreign or src.split != split:
                raise ValueError(f"{src.csv}: pair id(s) {foreign[:5]} are not in the {split} split of "
                                 f"{dataset.name}")
            if set(ids) != set(pair_ids):
                raise ValueError(f"{src.csv}: identified pairs differ from {first.csv}")
    return dataset, split, pair_ids


class _Rows:
    """The rows of ``per_pair_metrics.csv`` and what the Fig. 3 panels need.

    ``rows`` holds one dict per (pair, method); ``results[pair_id][method]`` the oracle-protocol
    outputs of the first ``panels`` pairs (``warped [*spatial]``, ``disp [*spatial, D]`` in voxels,
    ``warped_seg [*spatial]`` nearest-neighbour warped moving labels, mean Dice, %negJ). With
    ``nifti_dir`` every recorded pair is also written as NIfTI under ``nifti_dir/<protocol>/<file name>``.
    """

    def __init__(self, pairs: Sequence, class_names: Sequence[str], panels: int, nifti_dir: Optional[str],
                 file_names: Dict[str, str]):
        self.pairs = list(pairs)
        self.class_names = list(class_names)
        self.nifti_dir = nifti_dir
        self.file_names = file_names
        self.rows: List[Dict] = []
        self.results: Dict[str, Dict[str, dict]] = {p.pair_id: {} for p in self.pairs[: max(panels, 0)]}

    def add_initial(self, image_shape: Sequence[int]) -> None:
        """The ``initial`` rows: every pair scored with a zero displacement (no registration)."""
        from hypermorph_spatially_adaptive import tables

        zero = np.zeros((*image_shape, len(image_shape)), np.float32)
        for pair in self.pairs:
            self.rows.append({"pair_id": pair.pair_id, "protocol": "", "method": "initial", "params": "",
                              "seconds": 0.0, **tables.pair_metrics(pair, zero, len(self.class_names),
                                                                        self.class_names)})

    def record(self, method: str, protocol: str, warped, disp, hyp, cols: Sequence[str], seconds: float,
               maps: str = "") -> None:
        """Score every pair registered by one method: ``warped [N, *spatial, 1]``, ``disp [N, *spatial, D]``
        (voxels), ``hyp [N, P]`` with column names ``cols``; ``seconds`` is the time of all N pairs."""
        import eval_metrics
        from hypermorph_spatially_adaptive import tables

        n = len(self.pairs)
        for k, pair in enumerate(self.pairs):
            m = tables.pair_metrics(pair, disp[k], len(self.class_names), self.class_names)
            params = json.dumps({c.replace(art.G_PREFIX, ""): round(float(v), 4) for c, v in zip(cols, hyp[k])})
            self.rows.append({"pair_id": pair.pair_id, "protocol": protocol, "method": method, "params": params,
                              "maps": maps, "seconds": seconds / n, **m})
            panel = pair.pair_id in self.results and protocol == "oracle"
            warped_seg = None
            if panel or self.nifti_dir:
                warped_seg = eval_metrics.warp_labels(pair.moving_seg, disp[k])
            if panel:
                self.results[pair.pair_id][method] = {"warped": warped[k, ..., 0], "disp": disp[k],
                                                      "warped_seg": warped_seg, "dice": m["mean_dice"],
                                                      "negj": m["percent_neg_jac"]}
            if self.nifti_dir:
                _save_nifti(os.path.join(self.nifti_dir, protocol, self.file_names[pair.pair_id]), pair, method,
                            warped[k], warped_seg, disp[k])
        print(f"[inference] {protocol} {method}: mean Dice "
              f"{np.mean([r['mean_dice'] for r in self.rows[-n:]]):.3f} ({seconds / n:.3f} s/pair)", flush=True)


def _traced_registrars(models: Dict[str, tuple], moving, fixed, fixed_seg) -> Dict:
    """A :class:`Registrar` per model key, each called once on the first pair (hyp 0.5) so that tracing
    stays outside the timed calls."""
    registrars = {key: Registrar(m) for key, (m, _, _, _) in models.items()}
    for key, (model, _, _, _) in models.items():
        registrars[key](moving[:1], fixed[:1], np.full((1, int(model.inputs[2].shape[-1])), 0.5, np.float32),
                        fixed_seg[:1])
    return registrars


def _source_runs(src, g: Dict, models: Dict[str, tuple], g_hyp, sa_hyp, with_g: bool,
                 num_classes: int) -> List[tuple]:
    """The network rows one identification asks for, as ``(variant, tag, model key, hyp [N, P], columns)``:
    ``g`` (when ``with_g``: not made yet for this protocol and method), ``sas`` of every SA run the
    identification applies to (:func:`applies_to`) and, for a grid identification, the ``sas@g``
    ablation (every class at the pair's -g values ``g_hyp [N, P_g]``, docs/reading_results.md "How to read the comparison")."""
    runs = [("g", "", "g", g_hyp, art.global_columns(g["reg"]))] if with_g else []
    for key, (_, cfg, tag, run) in models.items():
        if key == "g" or not applies_to(src, run, cfg):
            continue
        runs.append(("sas", tag, key, sa_hyp, g["sa_names"]))
        if src.method == "grid":
            runs.append(("sas@g", tag, key, np.repeat(g_hyp, num_classes + 1, axis=1), g["sa_names"]))
    return runs


def _register_group(g: Dict, rec: _Rows, pair_ids: Sequence[str], moving, fixed, fixed_seg,
                    args: argparse.Namespace) -> None:
    """Register the test pairs (``moving``/``fixed [N, *spatial, 1]``, ``fixed_seg [N, *spatial]``) with
    every model of one regularizer group and every identification of it, network rows and (grid
    identifications, ``--refine``) the refined +io rows, into ``rec``."""
    from hypermorph_spatially_adaptive import tables
    from hypermorph_spatially_adaptive.models import needs_segmentation
    from hypermorph_spatially_adaptive.refinement import Refiner
    from hypermorph_spatially_adaptive.tf_ops import warp_linear

    short = tables.SHORT[g["reg"]]
    g_cols = art.global_columns(g["reg"])
    # one model per key: "g" and "sa0", "sa1", ... (one per conditioning)
    models = {"g": (g["g_model"], g["g_cfg"], "", g["global_run"])}
    models.update({f"sa{i}": (sa["model"], sa["cfg"], sa["tag"], sa["run"]) for i, sa in enumerate(g["sas"])})
    registrars = _traced_registrars(models, moving, fixed, fixed_seg)
    options = RefineConfig.from_args(args)
    refiners = ({key: Refiner.from_config(cfg, options=options) for key, (_, cfg, _, _) in models.items()}
                if args.refine else {})
    g_done = set()  # (protocol, suffix) whose -g row exists: gradient folders of two SA runs both hold one
    for src in g["sources"]:
        choice = src.table.loc[pair_ids]
        g_hyp = choice[g_cols].to_numpy(np.float32)
        runs = _source_runs(src, g, models, g_hyp, choice[g["sa_names"]].to_numpy(np.float32),
                            (src.protocol, src.suffix) not in g_done, len(rec.class_names))
        g_done.add((src.protocol, src.suffix))
        source = "fixed" if src.protocol == "oracle" else args.population_maps
        net_seg = fixed_seg  # the segmentation a CSAIN network builds its input map from
        if source != "fixed" and any(needs_segmentation(models[k][0]) for _, _, k, _, _ in runs):
            # label-free at test time: the moving labels warped by the -g network with this source's values
            net_seg = warped_moving_segmentation(rec.pairs, registrars["g"](moving, fixed, g_hyp)[1])
        for variant, tag, key, hyp, cols in runs:
            csain = needs_segmentation(models[key][0])
            t0 = time.time()
            warped, disp = registrars[key](moving, fixed, hyp, net_seg if csain else None)
            seconds = time.time() - t0
            rec.record(f"{short}-{variant}{tag}{src.suffix}", src.protocol, warped, disp, hyp, cols, seconds,
                       maps=(MAP_LABELS[source].replace("the network", "the -g network") if csain else ""))
            if not (args.refine and src.method == "grid" and "@" not in variant):
                continue
            seg = None
            if key != "g":
                seg = fixed_seg if source == "fixed" else warped_moving_segmentation(rec.pairs, disp)
            starts = [("+io", disp, seconds)] + ([(" zero+io", np.zeros_like(disp), 0.0)] if args.zero_io else [])
            for label, u0, spent in starts:
                t1 = time.time()
                u, before, after = refiners[key](moving, fixed, u0, hyp, seg, args.refine, args.refine_lr)
                rec.record(f"{short}-{variant}{label}{tag}", src.protocol, warp_linear(moving, u).numpy(), u, hyp,
                           cols, spent + time.time() - t1, maps=MAP_LABELS[source] if key != "g" else "")
                print(f"[inference]   refinement{label.replace('+io', '')} loss {before.mean():.4f} -> "
                      f"{after.mean():.4f}", flush=True)


def _write_tables(per_pair, class_names: Sequence[str], scope: str, dest: str, args: argparse.Namespace) -> str:
    """Check the metrics' range, write ``per_pair_metrics.csv``, ``table1.csv``, ``comparison.csv`` and
    ``table1.md`` into ``dest``; returns the Markdown text (``scope`` names the dataset, pairs and split)."""
    from hypermorph_spatially_adaptive import tables

    problem = tables.check_range(per_pair, class_names)
    if problem:
        raise FloatingPointError(f"metrics out of range: {problem}")
    numeric, markdown = tables.table1(per_pair, class_names)
    comparison = tables.paired_comparison(per_pair, tables.default_comparisons(per_pair["method"]),
                                              n_boot=args.bootstrap, seed=args.seed)
    atomic_write(os.path.join(dest, art.PER_PAIR_METRICS), per_pair)
    atomic_write(os.path.join(dest, art.TABLE1_CSV), numeric)
    atomic_write(os.path.join(dest, art.COMPARISON), comparison)
    header = (f"Table 1 on {scope}, mean(std) over pairs; "
              f"class DSC order: {', '.join(class_names)}; lost = pair-classes empty after warping (their HD95 is "
              "the image diagonal); [maps: ...] = what built a -sas+io row's refinement maps\n\n")
    comp_md = tables.comparison_markdown(comparison)
    if comp_md:
        comp_md = (f"\nPaired comparison, a - b per pair: mean [95% CI: studentized bootstrap over pairs, "
                   f"{args.bootstrap} resamples, seed {args.seed}], p_H = its p Holm-adjusted over the table's "
                   "family, W = two-sided Wilcoxon signed-rank p / number of non-zero differences; * = p_H < 0.05. "
                   "Dice: > 0 favours a; HD95 (same pair-classes), TRE, EPE (mm): < 0 favours a.\n\n" + comp_md)
    text = header + markdown + comp_md
    atomic_write(os.path.join(dest, art.TABLE1_MD), text)
    return text


def _write_figures(per_pair, rec: _Rows, groups: List[Dict], panels: int, dest: str) -> None:
    """``dice_boxplots.png`` (population rows labelled ``[pop]``) and a Fig. 3 panel per regularizer
    for each of the first ``panels`` pairs (oracle protocol)."""
    from hypermorph_spatially_adaptive import figures, tables

    labelled = per_pair.assign(method=[m if p in ("", "oracle") else f"{m} [{p[:3]}]"
                                       for m, p in zip(per_pair["method"], per_pair["protocol"])])
    figures.plot_dice_boxplots(labelled, rec.class_names, os.path.join(dest, "dice_boxplots.png"))
    for pair in rec.pairs[: max(panels, 0)]:
        for g in groups:
            short = tables.SHORT[g["reg"]]
            res = {m: r for m, r in rec.results[pair.pair_id].items() if m.startswith(short + "-")}
            figures.plot_registration_panel(pair.moving[..., 0], pair.fixed[..., 0], pair.fixed_seg, res,
                                            os.path.join(dest, f"fig3_{short}_{rec.file_names[pair.pair_id]}.png"),
                                            title=f"{pair.pair_id}: {short} models (oracle protocol)",
                                            class_names=rec.class_names)


def _inference_meta(groups: List[Dict], args: argparse.Namespace, argv: Optional[Sequence[str]], split: str,
                    n: int, provenance: Dict, file_names: Dict[str, str]) -> Dict:
    """The content of ``inference.json``: runs and identifications used (absolute paths), dataset,
    split, options, provenance, the pair ids whose file names differ and the command."""
    return {"groups": {g["reg"]: {"sa_run": os.path.abspath(g["sas"][0]["run"]),
                                  "sa_runs": {sa["tag"].strip(" ()") or "hypernetwork": os.path.abspath(sa["run"])
                                              for sa in g["sas"]},
                                  "global_run": os.path.abspath(g["global_run"]),
                                  "identification": [os.path.abspath(s.csv) for s in g["sources"]]}
                       for g in groups},
            "dataset": groups[0]["sa_cfg"]["data"], "split": split, "n_pairs": n, "refine_steps": args.refine,
            "refine_lr": args.refine_lr, "refine_options": RefineConfig.from_args(args).to_dict(),
            "bootstrap": args.bootstrap, "seed": args.seed, "provenance": provenance, "force": bool(args.force),
            "file_names": {p: f for p, f in file_names.items() if p != f},
            **({"profile": args.resolved_profile} if getattr(args, "resolved_profile", "paper") != "paper" else {}),
            "command": ["inference.py"] + list(argv if argv is not None else sys.argv[1:])}


def _infer(args: argparse.Namespace, argv: Optional[Sequence[str]], dest: str) -> None:
    """The body of :func:`main`; every file goes to ``dest`` (the staging folder)."""
    import pandas as pd

    groups = _load_groups(args)
    dataset, split, pair_ids = _load_test_set(groups, args)
    provenance = check_provenance(groups, dataset, split, args)
    file_names = safe_file_names(pair_ids)  # pair ids made safe for file names (no '/', '..', leading dot)
    pairs = [dataset.load_pair(p) for p in pair_ids]
    moving = np.stack([p.moving for p in pairs])
    fixed = np.stack([p.fixed for p in pairs])
    fixed_seg = np.stack([p.fixed_seg for p in pairs])
    n = len(pairs)
    print(f"[inference] {n} {split} pairs of {dataset.name}; regularizers: "
          f"{', '.join(g['reg'] for g in groups)}; refinement: {args.refine} steps", flush=True)

    rec = _Rows(pairs, groups[0]["sa_cfg"]["class_names"], args.panels,
                os.path.join(dest, "nifti") if args.save_nifti else None, file_names)
    rec.add_initial(dataset.image_shape)
    for g in groups:
        _register_group(g, rec, pair_ids, moving, fixed, fixed_seg, args)

    per_pair = pd.DataFrame(rec.rows)
    text = _write_tables(per_pair, rec.class_names, f"{dataset.name} ({n} {split} pairs)", dest, args)
    _write_figures(per_pair, rec, groups, args.panels, dest)
    meta = _inference_meta(groups, args, argv, split, n, provenance, file_names)
    atomic_write(os.path.join(dest, art.INFERENCE_META), json.dumps(meta, indent=2))
    print(text, flush=True)
    print(f"[inference] table: {os.path.join(args.out, art.TABLE1_MD)}  figures: {args.out}/*.png", flush=True)


if __name__ == "__main__":
    from hypermorph_spatially_adaptive.cli import cli_main

    cli_main(main)
