"""Register the test pairs with the identified parameters and build Table 1.

For each regularizer given (elastic and/or diffusion) this loads the spatially adaptive (SA)
run, the identification output of the global run (``identified_parameters.csv`` and its
``identification.json``) and the global run itself, then

- ``<reg>-sas``: one forward pass of the SA model per pair with its per-class parameters,
- ``<reg>-g``:   the global model with the pair's best mean-Dice parameters,
- ``initial``:   no registration,

and writes into ``--out``: ``per_pair_metrics.csv`` (class Dice, mean Dice, HD95, TRE where
keypoints exist, %negJ, SDlogJ, and for synthetic data the dense error against the true field),
``table1.csv`` / ``table1.md`` (mean(std), the paper's layout), Fig. 3-style panels
``fig3_<pair>.png``, ``dice_boxplots.png``, and with ``--save-nifti`` the warped image, warped
labels and displacement of every pair as NIfTI with the fixed image's affine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import hypermorph_spatially_adaptive  # noqa: F401  (shims before TensorFlow)

REGS = ("elastic", "diffusion")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for reg in REGS:
        g = p.add_argument_group(f"{reg} models")
        g.add_argument(f"--{reg}-sa", default=None, metavar="RUN", help=f"run folder of the SA {reg} model")
        g.add_argument(f"--{reg}-ident", default=None, metavar="DIR",
                       help=f"identification folder of the global {reg} model (holds identified_parameters.csv)")
        g.add_argument(f"--{reg}-global", default=None, metavar="RUN",
                       help=f"run folder of the global {reg} model (default: the one named in identification.json)")
    p.add_argument("--out", default="results", help="output folder")
    p.add_argument("--panels", type=int, default=2, help="Fig. 3 panels for the first N test pairs (0: none)")
    p.add_argument("--save-nifti", action="store_true", help="write warped image/labels and displacement as NIfTI")
    p.add_argument("--data-dir", default=None, help="override the dataset folder saved in the run config")
    p.add_argument("--label-dir", default=None, help="override the tissue label folder saved in the run config")
    return p


def _load_group(reg: str, sa_run: str, ident_dir: str, global_run: Optional[str]):
    """Load and cross-check one regularizer's SA model, global model and identification."""
    import pandas as pd

    from hypermorph_spatially_adaptive import runio

    csv_path = os.path.join(ident_dir, "identified_parameters.csv")
    meta_path = os.path.join(ident_dir, "identification.json")
    for path in (csv_path, meta_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing; run parameter_identification.py first")
    with open(meta_path) as f:
        meta = json.load(f)
    choice = pd.read_csv(csv_path, dtype={"pair_id": str})
    sa_model, sa_cfg = runio.load_run(sa_run, expect_regularizer=reg, expect_sa=True)
    global_run = global_run or meta["global_run"]
    g_model, g_cfg = runio.load_run(global_run, expect_regularizer=reg, expect_sa=False)
    if meta["regularizer"] != reg:
        raise ValueError(f"{meta_path}: identification was done for the {meta['regularizer']} regularizer, "
                         f"not {reg}")
    for run, cfg in ((sa_run, sa_cfg), (global_run, g_cfg)):
        if cfg["data"] != meta["data"]:
            raise ValueError(f"{csv_path}: identified on dataset {meta['data']}, but {run} was trained on "
                             f"{cfg['data']}")
    spec = runio.model_and_spec(sa_cfg)[1]
    names = spec.names(sa_cfg["class_names"])
    missing = [c for c in ["pair_id", *names] if c not in choice]
    if missing:
        raise ValueError(f"{csv_path}: columns {missing} missing for the SA model {sa_run} "
                         f"(classes {sa_cfg['class_names']})")
    return {"reg": reg, "sa_run": sa_run, "global_run": global_run, "sa_model": sa_model, "sa_cfg": sa_cfg, "sa_names": names, "g_model": g_model,
            "g_cfg": g_cfg, "choice": choice.set_index("pair_id"), "meta": meta, "csv": csv_path}


def _save_nifti(folder: str, pair, method: str, warped, warped_seg, disp) -> None:
    import nibabel as nib
    import numpy as np

    from hypermorph_spatially_adaptive.runio import atomic_save

    affine = pair.affine if pair.affine is not None else np.diag([*pair.spacing, *[1.0] * (4 - len(pair.spacing))])
    os.makedirs(folder, exist_ok=True)
    for name, arr in (("warped", warped[..., 0].astype(np.float32)), ("warped_seg", warped_seg.astype(np.int16)),
                      ("disp_vox", disp.astype(np.float32))):
        path = os.path.join(folder, f"{method}_{name}.nii.gz")
        atomic_save(path, lambda tmp, a=arr: nib.save(nib.Nifti1Image(a, affine), tmp))


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = build_parser().parse_args(argv)
    import numpy as np
    import pandas as pd

    import eval_metrics
    from hypermorph_spatially_adaptive import evaluation, figures, runio
    from hypermorph_spatially_adaptive.registration import Registrar
    from parameter_identification import load_dataset

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

    cfg0 = groups[0]["sa_cfg"]
    for g in groups[1:]:
        if g["sa_cfg"]["data"] != cfg0["data"]:
            raise ValueError(f"the {groups[0]['reg']} and {g['reg']} models were trained on different datasets")
    dataset = load_dataset(cfg0, args.data_dir, args.label_dir)
    class_names = list(cfg0["class_names"])
    C = len(class_names)
    split = groups[0]["meta"]["split"]
    split_ids = dataset.split_ids(split)
    pair_ids = list(groups[0]["choice"].index)
    for g in groups:
        runio.check_compatible(g["csv"], g["sa_cfg"], dataset)
        ids = list(g["choice"].index)
        foreign = [p for p in ids if p not in split_ids]
        if foreign:
            raise ValueError(f"{g['csv']}: pair id(s) {foreign[:5]} are not in the {split} split of {dataset.name}")
        if set(ids) != set(pair_ids):
            raise ValueError(f"{g['csv']}: identified pairs differ from {groups[0]['csv']}")

    pairs = [dataset.load_pair(p) for p in pair_ids]
    moving = np.stack([p.moving for p in pairs])
    fixed = np.stack([p.fixed for p in pairs])
    os.makedirs(args.out, exist_ok=True)
    print(f"[inference] {len(pairs)} {split} pairs of {dataset.name}; regularizers: "
          f"{', '.join(g['reg'] for g in groups)}", flush=True)

    rows: List[Dict] = []
    results: Dict[str, Dict[str, dict]] = {p.pair_id: {} for p in pairs}
    zero = np.zeros((*dataset.image_shape, len(dataset.image_shape)), np.float32)
    for pair in pairs:
        rows.append({"pair_id": pair.pair_id, "method": "initial", "params": "",
                     **evaluation.pair_metrics(pair, zero, C, class_names)})
    for g in groups:
        short = evaluation.SHORT[g["reg"]]
        choice = g["choice"].loc[pair_ids]
        g_cols = ["g_lambda", "g_mu"] if g["reg"] == "elastic" else ["g_lambda"]
        runs = [(f"{short}-g", g["g_model"], choice[g_cols].to_numpy(np.float32), g_cols),
                (f"{short}-sas", g["sa_model"], choice[g["sa_names"]].to_numpy(np.float32), g["sa_names"])]
        for method, model, hyp, cols in runs:
            warped, disp = Registrar(model)(moving, fixed, hyp)
            for k, pair in enumerate(pairs):
                m = evaluation.pair_metrics(pair, disp[k], C, class_names)
                params = json.dumps({c.replace("g_", ""): round(float(v), 4) for c, v in zip(cols, hyp[k])})
                rows.append({"pair_id": pair.pair_id, "method": method, "params": params, **m})
                warped_seg = eval_metrics.warp_labels(pair.moving_seg, disp[k])
                results[pair.pair_id][method] = {"warped": warped[k, ..., 0], "disp": disp[k],
                                                 "warped_seg": warped_seg, "dice": m["mean_dice"],
                                                 "negj": m["percent_neg_jac"]}
                if args.save_nifti:
                    _save_nifti(os.path.join(args.out, "nifti", pair.pair_id), pair, method, warped[k], warped_seg, disp[k])
            print(f"[inference] {method}: mean Dice "
                  f"{np.mean([r['mean_dice'] for r in rows if r['method'] == method]):.3f}", flush=True)

    per_pair = pd.DataFrame(rows)
    problem = evaluation.check_range(per_pair, class_names)
    if problem:
        raise FloatingPointError(f"metrics out of range: {problem}")
    numeric, markdown = evaluation.table1(per_pair, class_names)
    runio.atomic_to_csv(per_pair, os.path.join(args.out, "per_pair_metrics.csv"))
    runio.atomic_to_csv(numeric, os.path.join(args.out, "table1.csv"))
    header = (f"Table 1 on {dataset.name} ({len(pairs)} {split} pairs), mean(std) over pairs; "
              f"class DSC order: {', '.join(class_names)}\n\n")
    runio.atomic_write_text(os.path.join(args.out, "table1.md"), header + markdown)

    figures.plot_dice_boxplots(per_pair, class_names, os.path.join(args.out, "dice_boxplots.png"))
    for pair in pairs[: max(args.panels, 0)]:
        for g in groups:
            short = evaluation.SHORT[g["reg"]]
            res = {m: results[pair.pair_id][m] for m in (f"{short}-g", f"{short}-sas")}
            figures.plot_registration_panel(pair.moving[..., 0], pair.fixed[..., 0], pair.fixed_seg, res,
                                            os.path.join(args.out, f"fig3_{short}_{pair.pair_id}.png"),
                                            title=f"{pair.pair_id}: {short}-g vs {short}-sas",
                                            class_names=class_names)
    meta = {"groups": {g["reg"]: {"sa_run": os.path.abspath(g["sa_run"]), "global_run": os.path.abspath(g["global_run"]),
                                  "identification": os.path.abspath(g["csv"])} for g in groups},
            "dataset": cfg0["data"], "split": split, "n_pairs": len(pairs),
            "command": [os.path.basename(sys.argv[0])] + list(argv if argv is not None else sys.argv[1:])}
    runio.atomic_write_text(os.path.join(args.out, "inference.json"), json.dumps(meta, indent=2))
    print(header + markdown, flush=True)
    print(f"[inference] table: {os.path.join(args.out, 'table1.md')}  figures: {args.out}/*.png", flush=True)
    return args.out


if __name__ == "__main__":
    main()
