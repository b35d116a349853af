"""Register one pair of NIfTI images with a trained run; write the warped image, labels and fields.

Inputs of any size, spacing or orientation are resampled to the model's grid and the results
brought back to the fixed image's grid (rule: ``hypermorph_spatially_adaptive/pair_geometry.py``);
intensities are normalized as the run's training data were. Parameters come from the command line
(``--params lambda_lung=0.3 ...``), an identification folder (``--ident``) or are identified on
the pair's labels (``--identify grid|gradient``). Every output carries the fixed image's affine:

- ``--out-warped``      the moving image warped onto the fixed grid (original intensities)
- ``--out-warped-seg``  the moving segmentation warped (nearest neighbour)
- ``--out-disp``        displacement ``[*spatial, D]`` in fixed-grid voxels, ``warped(x) = moving(x + u(x))``
- ``--out-itk-warp``    the same field for ITK/ANTs/SimpleITK/Slicer: 5D vector NIfTI in LPS mm, fixed -> moving
  (ANTs' forward transform: ``antsApplyTransforms -i moving -r fixed -t WARP``)

Bad inputs (missing file, label outside the model's classes, 2D/3D mismatch, unknown or repeated
parameter, a label map off its image's grid, images that do not overlap, an unfinished run) and
bad outputs (an output that is an input or another output, wrong extension, unwritable folder) are
refused with one ``error:`` line before any model is loaded; nothing is written then.
"""
from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

from datasets.atomic import atomic_write
from hypermorph_spatially_adaptive.cli import add_refine_args, arg_float, arg_int
from hypermorph_spatially_adaptive.configs import RefineConfig
from hypermorph_spatially_adaptive.folders import check_output_files
from hypermorph_spatially_adaptive.pair_registration import PairRegistrar, save_result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("inputs")
    g.add_argument("--fixed", required=True, help="fixed image (NIfTI, 2D or 3D as the model)")
    g.add_argument("--moving", required=True, help="moving image (NIfTI; may have another grid than the fixed one)")
    g.add_argument("--fixed-seg", default=None, help="fixed label map (0 background, 1..C the model's classes); "
                   "needed for --identify and for --refine with an SA run")
    g.add_argument("--moving-seg", default=None, help="moving label map (needed for --identify and --out-warped-seg)")
    g = p.add_argument_group("model")
    g.add_argument("--run", required=True, help="run folder of the trained model (spatially adaptive or global)")
    g.add_argument("--global-run", default=None,
                   help="run folder of the global model of the same regularizer (only for --identify grid with an SA run)")
    g.add_argument("--orientation", default="RAS",
                   help="orientation code of the training images (index increasing towards R/L, A/P, S/I); "
                        "RAS = the identity affine of the synthetic data")
    g = p.add_argument_group("parameters (exactly one of --params, --ident, --identify)")
    g.add_argument("--params", nargs="+", default=None, metavar="NAME=V",
                   help="hyperparameters in [0, 1] by name (e.g. lambda_lung=0.3 mu_lung=0.2; lambda=0.5 sets every "
                        "class not named) or as P numbers in the run's order (config.json 'hyperparameters')")
    g.add_argument("--ident", default=None, metavar="DIR",
                   help="identification folder (identified_parameters.csv, identification.json), e.g. the "
                        "population protocol's single setting")
    g.add_argument("--ident-pair", default=None, metavar="ID", help="row of a per-pair identification folder to use")
    g.add_argument("--identify", default=None, choices=["grid", "gradient"],
                   help="identify on this pair's labels: grid (global model, best class Dice per tissue) or "
                        "gradient (Adam on the run's own hyperparameters, soft Dice)")
    g.add_argument("--grid-steps", type=arg_int(2), default=11, help="--identify grid: values per parameter axis")
    g.add_argument("--gradient-steps", type=arg_int(1), default=50, help="--identify gradient: Adam steps")
    g.add_argument("--gradient-lr", type=arg_float(0.0), default=0.05, help="--identify gradient: Adam learning rate")
    g = p.add_argument_group("refinement")
    g.add_argument("--refine", type=arg_int(0), default=0, metavar="N",
                   help="instance optimization: N Adam steps on the training loss from the network's field (0: off, "
                        "the default: opt-in, N more loss and gradient evaluations; the README example uses 100)")
    g.add_argument("--refine-lr", type=arg_float(0.0), default=0.1, help="Adam learning rate of the refinement (voxels)")
    add_refine_args(g)
    g = p.add_argument_group("outputs (at least one)")
    g.add_argument("--out-warped", default=None, help="warped moving image (NIfTI)")
    g.add_argument("--out-warped-seg", default=None, help="warped moving segmentation (NIfTI, needs --moving-seg)")
    g.add_argument("--out-disp", default=None, help="displacement in fixed-grid voxels (NIfTI, [*spatial, D])")
    g.add_argument("--out-itk-warp", default=None, help="ITK/ANTs displacement field (NIfTI, LPS mm, fixed -> moving)")
    g.add_argument("--out-json", default=None, help="parameters used, model grid and seconds per step (JSON)")
    return p


def main(argv: Optional[Sequence[str]] = None):
    args = build_parser().parse_args(argv)
    outs = (args.out_warped, args.out_warped_seg, args.out_disp, args.out_itk_warp, args.out_json)
    if all(o is None for o in outs):
        raise ValueError("no output: give at least one of --out-warped, --out-warped-seg, --out-disp, "
                         "--out-itk-warp, --out-json")
    if args.out_warped_seg and not args.moving_seg:
        raise ValueError("--out-warped-seg needs --moving-seg")

    nifti = (".nii", ".nii.gz")  # every output checked before anything is read or computed (CONVENTIONS.md)
    check_output_files({"--out-warped": args.out_warped, "--out-warped-seg": args.out_warped_seg,
                        "--out-disp": args.out_disp, "--out-itk-warp": args.out_itk_warp, "--out-json": args.out_json},
                       {"--fixed": args.fixed, "--moving": args.moving, "--fixed-seg": args.fixed_seg,
                        "--moving-seg": args.moving_seg},
                       {"--out-warped": nifti, "--out-warped-seg": nifti, "--out-disp": nifti,
                        "--out-itk-warp": nifti, "--out-json": (".json",)})

    registrar = PairRegistrar(args.run, args.global_run, args.orientation, load=False)
    result = registrar(args.fixed, args.moving, args.params, args.fixed_seg, args.moving_seg, args.refine,
                       refine_lr=args.refine_lr, ident=args.ident, ident_pair=args.ident_pair,
                       identify=args.identify, grid_steps=args.grid_steps, gradient_steps=args.gradient_steps,
                       gradient_lr=args.gradient_lr, refine_options=RefineConfig.from_args(args))
    written = save_result(result, args.out_warped, args.out_disp, args.out_itk_warp, args.out_warped_seg)
    summary = {"params": result.params(), "model_grid_spacing": [round(s, 4) for s in result.grid.spacing],
               "seconds": {k: round(v, 4) for k, v in result.seconds.items()}}
    if result.refine_loss is not None:
        summary["refine_loss"] = [round(v, 6) for v in result.refine_loss]
    if args.out_json:
        atomic_write(args.out_json, json.dumps(summary, indent=2))
        written.append(args.out_json)
    print(f"[register] parameters {json.dumps(summary['params'])}", flush=True)
    print(f"[register] seconds {json.dumps(summary['seconds'])}; wrote {', '.join(written)}", flush=True)
    return result


if __name__ == "__main__":
    from hypermorph_spatially_adaptive.cli import cli_main

    cli_main(main)
