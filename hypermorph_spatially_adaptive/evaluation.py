"""Per-pair metrics and the paper's Table 1 layout (mean(std) over test pairs).

Method names follow the paper: ``initial`` (no registration), ``diff-g`` / ``elas-g`` (global
model, best mean-Dice grid point per pair), ``diff-sas`` / ``elas-sas`` (spatially adaptive
model with the per-pair, per-tissue identified parameters).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

import eval_metrics

METHOD_ORDER = ["initial", "diff-g", "diff-sas", "elas-g", "elas-sas"]
SHORT = {"diffusion": "diff", "elastic": "elas"}


def pair_metrics(pair, disp: np.ndarray, num_classes: int, class_names: Sequence[str]) -> Dict:
    """Metrics of one registered pair; ``disp [*spatial, D]`` in voxels on the fixed grid."""
    m = eval_metrics.registration_metrics(pair.fixed_seg, pair.moving_seg, disp, num_classes, pair.spacing,
                                          fixed_kp=pair.fixed_kp, moving_kp=pair.moving_kp)
    row = {f"dice_{n}": float(m["dice"][c]) for c, n in enumerate(class_names)}
    row["mean_dice"] = float(m["mean_dice"])
    row.update({f"hd95_{n}": float(m["hd95"][c]) for c, n in enumerate(class_names)})
    row["hd95"] = float(m["mean_hd95"])
    row["tre"] = float(m["tre_mean"])
    row["percent_neg_jac"] = float(m["percent_neg_jac"])
    row["sdlogj"] = float(m["sdlogj"])
    truth = (pair.extras or {}).get("disp_true")
    if truth is not None:  # synthetic data: dense end-point error against the true field, mm
        err = np.linalg.norm((disp - truth) * np.asarray(pair.spacing), axis=-1)
        row["dense_epe"] = float(err[pair.fixed_seg > 0].mean())
    return row


def _fmt(mean: float, std: float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}({std:.{digits}f})"


def table1(per_pair: pd.DataFrame, class_names: Sequence[str]):
    """Aggregate per-pair metrics into Table 1.

    Returns ``(numeric, markdown)``: a DataFrame with ``<metric>_mean`` / ``<metric>_std`` per
    method (rows in the paper's order) and the Markdown table as the paper prints it
    (class DSC as means, the rest as mean(std); %negJ is '-' for ``initial``).
    """
    metrics = [f"dice_{n}" for n in class_names] + ["mean_dice", "hd95", "tre", "percent_neg_jac", "sdlogj"]
    if "dense_epe" in per_pair:
        metrics.append("dense_epe")
    missing = [c for c in ["method", *metrics] if c not in per_pair]
    if missing:
        raise ValueError(f"per-pair table lacks columns {missing}")
    methods = [m for m in METHOD_ORDER if m in set(per_pair["method"])]
    methods += sorted(set(per_pair["method"]) - set(methods))
    rows: List[Dict] = []
    for method in methods:
        df = per_pair[per_pair["method"] == method]
        row: Dict = {"method": method, "n_pairs": len(df)}
        for k in metrics:
            v = df[k].to_numpy(float)
            v = v[np.isfinite(v)]
            row[f"{k}_mean"] = float(v.mean()) if v.size else np.nan
            row[f"{k}_std"] = float(v.std()) if v.size else np.nan
        rows.append(row)
    numeric = pd.DataFrame(rows)

    has_tre = np.isfinite(numeric["tre_mean"]).any()
    has_epe = "dense_epe_mean" in numeric
    head = ["Model", f"Class DSC [{', '.join(class_names)}]", "Mean DSC", "HD95 (mm)"]
    if has_tre:
        head.append("TRE (mm)")
    if has_epe:
        head.append("dense EPE (mm)")
    head += ["%negJ", "SDlogJ"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cls = "[" + ", ".join(f"{r[f'dice_{n}_mean']:.3f}" for n in class_names) + "]"
        cells = [r["method"], cls, _fmt(r["mean_dice_mean"], r["mean_dice_std"]), _fmt(r["hd95_mean"], r["hd95_std"])]
        if has_tre:
            cells.append(_fmt(r["tre_mean"], r["tre_std"]))
        if has_epe:
            cells.append(_fmt(r["dense_epe_mean"], r["dense_epe_std"]))
        initial = r["method"] == "initial"
        cells.append("-" if initial else _fmt(r["percent_neg_jac_mean"], r["percent_neg_jac_std"]))
        cells.append("-" if initial else _fmt(r["sdlogj_mean"], r["sdlogj_std"]))
        lines.append("| " + " | ".join(cells) + " |")
    return numeric, "\n".join(lines) + "\n"


def check_range(per_pair: pd.DataFrame, class_names: Sequence[str]) -> Optional[str]:
    """Return a message if any metric is out of its valid range (Dice in [0,1], %negJ in [0,100])."""
    for n in [*class_names]:
        v = per_pair[f"dice_{n}"].dropna()
        if ((v < 0) | (v > 1)).any():
            return f"dice_{n} outside [0, 1]"
    v = per_pair["percent_neg_jac"]
    if ((v < 0) | (v > 100)).any():
        return "percent_neg_jac outside [0, 100]"
    return None
