"""Per-pair metrics, the paper's Table 1 layout and paired comparisons (paper sec. 3.3; README "How to read the comparison").

Method names follow the paper, with the additions of the README "How to read the comparison" and issue-driven rows:

- ``initial``                  no registration
- ``diff-g`` / ``elas-g``      global model, the pair's best mean-Dice grid point
- ``diff-sas`` / ``elas-sas``  spatially adaptive (SA) model with the per-tissue parameters
- ``*-sas@g``                  ablation: the SA model with *every* class at the pair's -g values
                               (separates "another network" from "per-tissue values")
- ``*+io``                     the row's displacement refined per pair (instance optimization
                               on the training loss, :mod:`.refinement`)

Rows also carry a ``protocol``: ``oracle`` (the paper's: parameters identified on each test
pair's own labels) or ``population`` (identified on the validation split, one setting for all
test pairs; test labels only score). ``initial`` does not depend on it and is shown in every
protocol block.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

import eval_metrics

SHORT = {"diffusion": "diff", "elastic": "elas"}
PROTOCOLS = ("oracle", "population")
_VARIANTS = ("g", "sas", "sas@g", "g+io", "sas+io")
METHOD_ORDER = ["initial"] + [f"{s}-{v}" for s in ("diff", "elas") for v in _VARIANTS]
#: metrics compared pair by pair (lower is better for all but Dice)
COMPARED = ("mean_dice", "hd95", "tre", "dense_epe")


def pair_metrics(pair, disp: np.ndarray, num_classes: int, class_names: Sequence[str]) -> Dict:
    """Metrics of one registered pair; ``disp [*spatial, D]`` in voxels on the fixed grid.

    Keys: ``dice_<class>``, ``mean_dice``, ``hd95_<class>`` (mm, NaN when the class is empty in the
    fixed or the warped labels), ``hd95`` (mean over the classes where it is defined),
    ``lost_classes`` (number of classes present in the fixed labels but empty after warping, or
    the reverse: their HD95 is undefined), ``tre`` (mm, NaN without keypoints),
    ``percent_neg_jac``, ``sdlogj`` and, where the pair has a true displacement (synthetic data),
    ``dense_epe`` (mean end-point error in mm inside the tissues, labels > 0) and
    ``dense_epe_<class>`` (the same inside each tissue of the fixed labels).
    """
    m = eval_metrics.registration_metrics(pair.fixed_seg, pair.moving_seg, disp, num_classes, pair.spacing,
                                          fixed_kp=pair.fixed_kp, moving_kp=pair.moving_kp)
    row = {f"dice_{n}": float(m["dice"][c]) for c, n in enumerate(class_names)}
    row["mean_dice"] = float(m["mean_dice"])
    row.update({f"hd95_{n}": float(m["hd95"][c]) for c, n in enumerate(class_names)})
    row["hd95"] = float(m["mean_hd95"])
    warped = eval_metrics.warp_labels(pair.moving_seg, disp)
    in_fixed = np.array([np.any(pair.fixed_seg == c) for c in range(1, num_classes + 1)])
    in_warped = np.array([np.any(warped == c) for c in range(1, num_classes + 1)])
    row["lost_classes"] = int(np.sum(in_fixed != in_warped))
    row["tre"] = float(m["tre_mean"])
    row["percent_neg_jac"] = float(m["percent_neg_jac"])
    row["sdlogj"] = float(m["sdlogj"])
    truth = (pair.extras or {}).get("disp_true")
    if truth is not None:  # synthetic data: dense end-point error against the true field, mm
        err = np.linalg.norm((disp - truth) * np.asarray(pair.spacing), axis=-1)
        row["dense_epe"] = float(err[pair.fixed_seg > 0].mean())
        for c, n in enumerate(class_names, 1):
            inside = pair.fixed_seg == c
            row[f"dense_epe_{n}"] = float(err[inside].mean()) if inside.any() else float("nan")
    return row


def _fmt(mean: float, std: float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}({std:.{digits}f})"


def _method_order(methods) -> List[str]:
    present = set(methods)
    ordered = [m for m in METHOD_ORDER if m in present]
    return ordered + sorted(present - set(ordered))


def _protocols(per_pair: pd.DataFrame) -> List[str]:
    if "protocol" not in per_pair:
        return [""]
    found = [p for p in per_pair["protocol"].fillna("").unique() if p]
    return [p for p in PROTOCOLS if p in found] + sorted(set(found) - set(PROTOCOLS)) or [""]


def table1(per_pair: pd.DataFrame, class_names: Sequence[str]) -> Tuple[pd.DataFrame, str]:
    """Aggregate per-pair metrics into Table 1, one block per protocol.

    Returns ``(numeric, markdown)``: a DataFrame with ``protocol``, ``method``, ``n_pairs``,
    ``<metric>_mean`` / ``<metric>_std`` and ``lost_classes`` (sum over pairs) / ``hd95_pairs``
    (pairs whose HD95 is defined), and the Markdown tables as the paper prints them (class DSC
    as means, the rest as mean(std); %negJ is '-' for ``initial``). Without a ``protocol``
    column there is one block; ``initial`` (protocol-free) is repeated in every block.
    A metric's mean is taken over the pairs where it is finite; HD95 states over how many
    pair-classes it is defined when some are lost.
    """
    metrics = [f"dice_{n}" for n in class_names] + ["mean_dice", "hd95", "tre", "percent_neg_jac", "sdlogj"]
    epe = [c for c in ["dense_epe", *[f"dense_epe_{n}" for n in class_names]] if c in per_pair]
    metrics += epe
    missing = [c for c in ["method", *metrics] if c not in per_pair]
    if missing:
        raise ValueError(f"per-pair table lacks columns {missing}")
    per_pair = per_pair.copy()
    if "protocol" not in per_pair:
        per_pair["protocol"] = ""
    per_pair["protocol"] = per_pair["protocol"].fillna("")
    if "lost_classes" not in per_pair:
        per_pair["lost_classes"] = 0
    rows: List[Dict] = []
    blocks: List[Tuple[str, List[Dict]]] = []
    for protocol in _protocols(per_pair):
        sub = per_pair[(per_pair["protocol"] == protocol) | (per_pair["method"] == "initial")]
        block = []
        for method in _method_order(sub["method"]):
            df = sub[sub["method"] == method]
            row: Dict = {"protocol": "" if method == "initial" else protocol, "method": method,
                         "n_pairs": len(df)}
            for k in metrics:
                v = df[k].to_numpy(float)
                v = v[np.isfinite(v)]
                row[f"{k}_mean"] = float(v.mean()) if v.size else np.nan
                row[f"{k}_std"] = float(v.std()) if v.size else np.nan
            row["lost_classes"] = int(df["lost_classes"].sum())
            row["pair_classes"] = int(len(df) * len(class_names))
            block.append(row)
        blocks.append((protocol, block))
    for k, (_, block) in enumerate(blocks):  # numeric table: 'initial' once, then every protocol's rows
        rows.extend(r for r in block if r["method"] != "initial" or k == 0)
    numeric = pd.DataFrame(rows)

    has_tre = np.isfinite(numeric["tre_mean"]).any()
    head = ["Model", f"Class DSC [{', '.join(class_names)}]", "Mean DSC", "HD95 (mm)"]
    if has_tre:
        head.append("TRE (mm)")
    if "dense_epe" in epe:
        head.append("dense EPE (mm)")
    if len(epe) > 1:
        head.append(f"EPE [{', '.join(class_names)}]")
    head += ["%negJ", "SDlogJ", "lost"]
    texts = []
    for protocol, block in blocks:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in block:
            cls = "[" + ", ".join(f"{r[f'dice_{n}_mean']:.3f}" for n in class_names) + "]"
            hd = _fmt(r["hd95_mean"], r["hd95_std"])
            if r["lost_classes"]:
                hd += f" over {r['pair_classes'] - r['lost_classes']}/{r['pair_classes']} pair-classes"
            cells = [r["method"], cls, _fmt(r["mean_dice_mean"], r["mean_dice_std"]), hd]
            if has_tre:
                cells.append(_fmt(r["tre_mean"], r["tre_std"]))
            if "dense_epe" in epe:
                cells.append(_fmt(r["dense_epe_mean"], r["dense_epe_std"]))
            if len(epe) > 1:
                cells.append("[" + ", ".join(f"{r[f'dense_epe_{n}_mean']:.2f}" for n in class_names) + "]")
            initial = r["method"] == "initial"
            cells.append("-" if initial else _fmt(r["percent_neg_jac_mean"], r["percent_neg_jac_std"]))
            cells.append("-" if initial else _fmt(r["sdlogj_mean"], r["sdlogj_std"]))
            cells.append(str(r["lost_classes"]))
            lines.append("| " + " | ".join(cells) + " |")
        title = {"oracle": "**oracle protocol** (the paper's): parameters identified on each test pair's "
                           "own labels, scored on the same labels",
                 "population": "**population protocol** (label-free at test time): one setting identified "
                               "on the validation split, applied to every test pair"}.get(protocol)
        texts.append((title + "\n\n" if title else "") + "\n".join(lines) + "\n")
    return numeric, "\n".join(texts)


# ---------------------------------------------------------------------------- paired statistics

def bootstrap_ci(diffs: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Tuple[float, float]:
    """Percentile bootstrap CI of the mean of paired differences ``diffs [n]`` (seeded)."""
    d = np.asarray(diffs, np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1D array of differences")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(int(n_boot), d.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def wilcoxon_p(diffs: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (``scipy.stats.wilcoxon``).

    All-zero differences (nothing to rank) give p = 1.
    """
    from scipy import stats

    d = np.asarray(diffs, np.float64)
    if d.size == 0:
        return float("nan")
    if np.all(d == 0):
        return 1.0
    with warnings.catch_warnings():  # small n: scipy warns about the normal approximation / ties
        warnings.simplefilter("ignore")
        return float(stats.wilcoxon(d).pvalue)


def paired_comparison(per_pair: pd.DataFrame, comparisons: Sequence[Tuple[str, str]],
                      metrics: Sequence[str] = COMPARED, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per protocol and ``(a, b)`` in ``comparisons``: differences ``a - b`` pair by pair.

    Returns one row per (protocol, comparison, metric) present: ``n`` (pairs where both values
    are finite), ``mean_diff``, ``ci_low``/``ci_high`` (seeded 95% percentile bootstrap over
    pairs, ``n_boot`` resamples), ``wilcoxon_p`` and ``better`` (which of a / b the mean favours:
    higher Dice, lower distances; '=' for no difference).
    """
    per_pair = per_pair.copy()
    if "protocol" not in per_pair:
        per_pair["protocol"] = ""
    per_pair["protocol"] = per_pair["protocol"].fillna("")
    rows = []
    for protocol in _protocols(per_pair):
        sub = per_pair[per_pair["protocol"] == protocol]
        for a, b in comparisons:
            A = sub[sub["method"] == a].set_index("pair_id")
            B = sub[sub["method"] == b].set_index("pair_id")
            if A.empty or B.empty:
                continue
            common = A.index.intersection(B.index)
            for metric in metrics:
                if metric not in sub:
                    continue
                d = (A.loc[common, metric].astype(float) - B.loc[common, metric].astype(float)).to_numpy()
                d = d[np.isfinite(d)]
                if d.size == 0:
                    continue
                lo, hi = bootstrap_ci(d, n_boot, seed)
                mean = float(d.mean())
                sign = mean if metric.startswith(("mean_dice", "dice")) else -mean
                rows.append({"protocol": protocol, "comparison": f"{a} - {b}", "metric": metric, "n": int(d.size),
                             "mean_diff": mean, "ci_low": lo, "ci_high": hi, "wilcoxon_p": wilcoxon_p(d),
                             "better": a if sign > 0 else (b if sign < 0 else "=")})
    return pd.DataFrame(rows, columns=["protocol", "comparison", "metric", "n", "mean_diff", "ci_low", "ci_high",
                                       "wilcoxon_p", "better"])


def default_comparisons(methods: Sequence[str]) -> List[Tuple[str, str]]:
    """The comparisons of the README "How to read the comparison" that the given methods allow, per regularizer, as
    (a, b) method names (a - b is reported); rows of a gradient identification add
    ``sas (gradient) - g (gradient)`` and ``sas (gradient) - sas`` (gradient vs grid proxy)."""
    present = set(methods)
    out = []
    for s in ("diff", "elas"):
        for a, b in ((f"{s}-sas", f"{s}-g"), (f"{s}-sas@g", f"{s}-g"), (f"{s}-sas", f"{s}-sas@g"),
                     (f"{s}-sas+io", f"{s}-g+io"),
                     # gradient identification (README "Gradient identification"): -sas vs -g, and vs the grid proxy
                     (f"{s}-sas (gradient)", f"{s}-g (gradient)"), (f"{s}-sas (gradient)", f"{s}-sas")):
            if a in present and b in present:
                out.append((a, b))
    return out


def comparison_markdown(comp: pd.DataFrame) -> str:
    """Paired comparison as a Markdown table: one row per (protocol, comparison), one cell per
    metric with ``mean difference [95% CI] p=<Wilcoxon p>``; ``*`` marks a CI that excludes 0."""
    if comp.empty:
        return ""
    metrics = [m for m in COMPARED if m in set(comp["metric"])]
    lines = ["| protocol | a - b | n | " + " | ".join(f"d {m}" for m in metrics) + " |",
             "|---|---|---|" + "---|" * len(metrics)]
    for (protocol, name), df in comp.groupby(["protocol", "comparison"], sort=False):
        cells = []
        by = df.set_index("metric")
        for m in metrics:
            if m not in by.index:
                cells.append("-")
                continue
            r = by.loc[m]
            star = "*" if (r["ci_low"] > 0 or r["ci_high"] < 0) else ""
            cells.append(f"{r['mean_diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]{star} p={r['wilcoxon_p']:.2g}")
        lines.append(f"| {protocol} | {name} | {int(df['n'].max())} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
