"""Per-pair metrics, the paper's Table 1 layout and paired comparisons (paper sec. 3.3; docs/reading_results.md "How to read the comparison").

Also the stiffness-order statistics of an identification on synthetic pairs with known Lamé values
(:func:`stiffness_order_summary`, recorded by ``parameter_identification.py --objective epe``).

Method names follow the paper, with the additions of docs/reading_results.md "How to read the comparison" and issue-driven rows:

- ``initial``                  no registration
- ``diff-g`` / ``elas-g``      global model, the pair's best mean-Dice grid point
- ``diff-sas`` / ``elas-sas``  spatially adaptive (SA) model with the per-tissue parameters
- ``*-sas@g``                  ablation: the SA model with *every* class at the pair's -g values
                               (separates "another network" from "per-tissue values")
- ``* zero+io``                (``inference.py --zero-io``) the same refinement started from a zero
                               field instead of the network's: what the network contributes to +io
- ``*+io``                     the row's displacement refined per pair (instance optimization
                               on the training loss, :mod:`.refinement`)
- ``* (csain)``                the SA rows of a CSAIN-conditioned SA model (:mod:`.csain`)

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
from scipy.stats import spearmanr

import eval_metrics

SHORT = {"diffusion": "diff", "elastic": "elas"}
PROTOCOLS = ("oracle", "population")
_VARIANTS = ("g", "sas", "sas@g", "g+io", "sas+io", "g zero+io", "sas zero+io", "sas (csain)", "sas@g (csain)",
             "sas+io (csain)")
METHOD_ORDER = ["initial"] + [f"{s}-{v}" for s in ("diff", "elas") for v in _VARIANTS]
#: metrics compared pair by pair (lower is better for all but Dice)
COMPARED = ("mean_dice", "hd95", "tre", "dense_epe")
#: +io rows whose mean %negJ exceeds this are flagged in Table 1 (dagger + :data:`FOLD_FOOTNOTE`)
FOLD_FLAG_PERCENT = 0.05
FOLD_MARK = "\u2020"
FOLD_FOOTNOTE = (f"{FOLD_MARK} mean %negJ > {FOLD_FLAG_PERCENT:g}: folds: Dice rises with tearing, so this row's "
                 "Dice is not comparable with rows that do not fold.")


def pair_metrics(pair, disp: np.ndarray, num_classes: int, class_names: Sequence[str]) -> Dict:
    """Metrics of one registered pair; ``disp [*spatial, D]`` in voxels on the fixed grid.

    Keys: ``dice_<class>``, ``mean_dice``, ``hd95_<class>`` (mm; a class present in the fixed
    labels but empty after warping, or the reverse, is *lost* and penalised with the image
    diagonal in mm, ``eval_metrics.image_diagonal_mm``; NaN only when it is empty in both),
    ``hd95`` (mean over the classes where it is defined, lost ones included),
    ``lost_classes`` (number of lost classes), ``tre`` (mm, NaN without keypoints),
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
        epe = eval_metrics.dense_epe(disp, truth, pair.spacing, pair.fixed_seg, num_classes)
        row["dense_epe"] = epe["mean"]
        row.update({f"dense_epe_{n}": float(v) for n, v in zip(class_names, epe["per_class"])})
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


def _aggregate_block(sub: pd.DataFrame, protocol: str, metrics: Sequence[str], n_classes: int) -> List[Dict]:
    """Table 1 rows of one protocol block (``sub``: its per-pair rows and ``initial``'s), in
    :func:`_method_order`: ``n_pairs``, ``<metric>_mean``/``_std`` over the pairs where the metric is
    finite (NaN if none), ``maps``, ``lost_classes`` (sum), ``pair_classes`` (pairs x ``n_classes``)
    and ``tre_pairs`` (pairs with a finite TRE: pairs without keypoints score every metric but TRE)."""
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
        maps = sorted({str(v) for v in df.get("maps", pd.Series(dtype=object)).dropna() if str(v)})
        row["maps"] = "; ".join(maps)
        row["lost_classes"] = int(df["lost_classes"].sum())
        row["pair_classes"] = int(len(df) * n_classes)
        row["tre_pairs"] = int(np.isfinite(df["tre"].to_numpy(float)).sum()) if "tre" in df else 0
        block.append(row)
    return block


def _markdown_block(protocol: str, block: Sequence[Dict], head: Sequence[str], class_names: Sequence[str],
                    has_tre: bool, epe: Sequence[str]) -> str:
    """One protocol's Markdown table (columns ``head``; TRE and EPE columns as :func:`table1` chose
    them), titled by its protocol and followed by the folding footnote when a +io row is flagged."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    flagged = False
    for r in block:
        cls = "[" + ", ".join(f"{r[f'dice_{n}_mean']:.3f}" for n in class_names) + "]"
        hd = _fmt(r["hd95_mean"], r["hd95_std"])
        if r["lost_classes"]:
            hd += f" ({r['lost_classes']}/{r['pair_classes']} pair-classes lost, at the image diagonal)"
        folds = "+io" in r["method"] and r["percent_neg_jac_mean"] > FOLD_FLAG_PERCENT
        flagged = flagged or folds
        label = r["method"] + (f" [maps: {r['maps']}]" if r["maps"] else "") + (f" {FOLD_MARK}" if folds else "")
        cells = [label, cls, _fmt(r["mean_dice_mean"], r["mean_dice_std"]), hd]
        if has_tre:
            tre = _fmt(r["tre_mean"], r["tre_std"])
            cells.append(tre + (f" (n={r['tre_pairs']})" if r["tre_pairs"] < r["n_pairs"] else ""))
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
    if flagged:
        lines += ["", FOLD_FOOTNOTE]
    return (title + "\n\n" if title else "") + "\n".join(lines) + "\n"


def _with_defaults(per_pair: pd.DataFrame, **defaults) -> pd.DataFrame:
    """A copy of ``per_pair`` with every missing column of ``defaults`` set to its value and a missing
    protocol (NaN) read as ``''``."""
    per_pair = per_pair.copy()
    for column, value in defaults.items():
        if column not in per_pair:
            per_pair[column] = value
    per_pair["protocol"] = per_pair["protocol"].fillna("")
    return per_pair


def table1(per_pair: pd.DataFrame, class_names: Sequence[str]) -> Tuple[pd.DataFrame, str]:
    """Aggregate per-pair metrics into Table 1, one block per protocol.

    Returns ``(numeric, markdown)``: a DataFrame with ``protocol``, ``method``, ``n_pairs``, ``maps``
    (what built a refined SA row's parameter maps, from the per-pair column ``maps``; '' otherwise),
    ``<metric>_mean`` / ``<metric>_std`` and ``lost_classes`` (sum over pairs) / ``hd95_pairs``
    (pairs whose HD95 is defined), and the Markdown tables as the paper prints them (class DSC
    as means, the rest as mean(std); %negJ is '-' for ``initial``; a ``+io`` row whose mean %negJ
    exceeds :data:`FOLD_FLAG_PERCENT` is marked with a dagger and explained under its block:
    Dice rises with tearing). Without a ``protocol``
    column there is one block; ``initial`` (protocol-free) is repeated in every block.
    A metric's mean is taken over the pairs where it is finite; HD95 counts a lost class at the
    image diagonal (:func:`pair_metrics`) and says how many pair-classes were lost.
    """
    metrics = [f"dice_{n}" for n in class_names] + ["mean_dice", "hd95", "tre", "percent_neg_jac", "sdlogj"]
    epe = [c for c in ["dense_epe", *[f"dense_epe_{n}" for n in class_names]] if c in per_pair]
    metrics += epe
    missing = [c for c in ["method", *metrics] if c not in per_pair]
    if missing:
        raise ValueError(f"per-pair table lacks columns {missing}")
    per_pair = _with_defaults(per_pair, protocol="", lost_classes=0)
    blocks = [(protocol, _aggregate_block(per_pair[(per_pair["protocol"] == protocol)
                                                   | (per_pair["method"] == "initial")],
                                          protocol, metrics, len(class_names)))
              for protocol in _protocols(per_pair)]
    rows: List[Dict] = []
    for k, (_, block) in enumerate(blocks):  # numeric table: 'initial' once, then every protocol's rows
        rows.extend(r for r in block if r["method"] != "initial" or k == 0)
    numeric = pd.DataFrame(rows)

    has_tre = bool(np.isfinite(numeric["tre_mean"]).any())
    head = ["Model", f"Class DSC [{', '.join(class_names)}]", "Mean DSC", "HD95 (mm)"]
    if has_tre:
        head.append("TRE (mm)")
    if "dense_epe" in epe:
        head.append("dense EPE (mm)")
    if len(epe) > 1:
        head.append(f"EPE [{', '.join(class_names)}]")
    head += ["%negJ", "SDlogJ", "lost"]
    texts = [_markdown_block(protocol, block, head, class_names, has_tre, epe) for protocol, block in blocks]
    return numeric, "\n".join(texts)


# ---------------------------------------------------------------------------- paired statistics

#: columns of :func:`paired_comparison`
COMPARISON_COLUMNS = ["protocol", "seed", "comparison", "metric", "n_seeds", "n_pairs", "n", "mean_diff", "ci_low",
                      "ci_high", "interval", "p", "p_holm", "wilcoxon_p", "n_nonzero", "better"]


def _cell_values(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``df`` (one method) indexed by (seed, pair_id), the metric's value or, for ``hd95``, its
    per-class columns ``hd95_<class>`` when present (so pair-classes can be matched)."""
    cols = [c for c in df.columns if c.startswith("hd95_") and f"dice_{c[5:]}" in df] if metric == "hd95" else []
    return df.set_index(["seed", "pair_id"])[cols or [metric]].astype(float)


def _broadcast_seedless(rows: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """A method without training seed (``seed`` NaN in all its rows: ``initial``, ANTs SyN) is the
    same under every seed of the method it is compared with: repeat its rows for those seeds."""
    if rows.empty or rows["seed"].notna().any():
        return rows
    seeds = other["seed"].dropna().unique()
    return pd.concat([rows.assign(seed=s) for s in seeds]) if len(seeds) else rows.assign(seed=0)


def difference_table(per_pair: pd.DataFrame, a: str, b: str, metric: str) -> pd.DataFrame:
    """Paired differences ``a - b`` of ``metric`` as a seeds x pairs table (NaN where undefined).

    ``per_pair`` holds one protocol's rows with ``seed`` (added as 0 when absent; NaN in every
    row of a method that has no training seed, such as ``initial`` or ANTs SyN, which is then
    compared under every seed), ``pair_id``, ``method`` and the metric. For ``hd95`` with per-class columns ``hd95_<class>``, the
    difference of a cell is the mean over the classes where *both* methods' HD95 is finite
    (the same pair-classes; a lost class carries the image diagonal, see ``eval_metrics``),
    not the difference of two means over different classes.
    """
    if "seed" not in per_pair:
        per_pair = per_pair.assign(seed=0)
    rows_a, rows_b = per_pair[per_pair["method"] == a], per_pair[per_pair["method"] == b]
    rows_a, rows_b = _broadcast_seedless(rows_a, rows_b), _broadcast_seedless(rows_b, rows_a)
    A = _cell_values(rows_a, metric)
    B = _cell_values(rows_b, metric)
    for name, X in ((a, A), (b, B)):
        if X.index.duplicated().any():
            raise ValueError(f"{name}: more than one row per (seed, pair_id) for {metric}")
    common = A.index.intersection(B.index)
    diff = A.loc[common].to_numpy() - B.loc[common].to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # cells where no class is defined in both: NaN
        cell = np.nanmean(diff, axis=1) if diff.shape[1] > 1 else diff[:, 0]
    s = pd.Series(cell, index=common)
    return s.unstack("pair_id") if len(s) else pd.DataFrame()


def _summary(table: pd.DataFrame, level: float, n_boot: int, seed: int) -> Optional[Dict]:
    """Interval, p and Wilcoxon of one seeds x pairs difference table: seeds without any value are
    dropped, then pairs not finite under every remaining seed."""
    if not table.empty:
        table = table.dropna(how="all", axis=0)
        table = table.loc[:, table.notna().all(axis=0)]
    if table.shape[0] < 1 or table.shape[1] < 2:
        return None
    from .intervals import crossed_interval, wilcoxon_test

    d = table.to_numpy(np.float64)
    lo, hi, p = crossed_interval(d, level, n_boot=n_boot, seed=seed)
    w_p, nonzero = wilcoxon_test(d.mean(axis=0))  # pairs as the unit: the seed-mean difference of each pair
    return {"n_seeds": d.shape[0], "n_pairs": d.shape[1], "n": int(d.size), "mean_diff": float(d.mean()),
            "ci_low": float(lo), "ci_high": float(hi),
            "interval": "bootstrap-t over pairs" if d.shape[0] == 1 else "crossed seeds x pairs t",
            "p": float(p), "wilcoxon_p": w_p, "n_nonzero": nonzero}


def paired_comparison(per_pair: pd.DataFrame, comparisons: Sequence[Tuple[str, str]],
                      metrics: Sequence[str] = COMPARED, level: float = 0.95, n_boot: int = 2000, seed: int = 0,
                      per_seed: bool = False) -> pd.DataFrame:
    """Per protocol and ``(a, b)`` in ``comparisons``: the mean of the paired differences ``a - b``.

    ``per_pair``: long table, one row per (``seed``, ``pair_id``, ``method``[, ``protocol``]) with
    the metric columns (``seed`` optional: absent = one seed). Per (protocol, comparison, metric)
    the differences form a seeds x pairs table; pairs not finite under every seed are dropped.
    Rows: ``n_seeds``, ``n_pairs``, ``n`` (cells), ``mean_diff``, ``ci_low``/``ci_high`` (``level``
    interval of :func:`.intervals.crossed_interval`: the studentized bootstrap over pairs for one
    seed, ``n_boot`` resamples seeded by ``seed``; the crossed seeds x pairs t for several),
    ``interval`` (which), ``p`` (the test that interval inverts), ``p_holm`` (Holm over every
    row of the returned family with the same ``seed`` value), ``wilcoxon_p`` and ``n_nonzero``
    (signed-rank test on the per-pair differences averaged over seeds; zero differences are
    dropped by the test and not counted) and ``better`` (which of a / b the mean favours:
    higher Dice, lower distances; '=' for no difference). ``seed`` is ``'all'`` for the pooled
    rows; ``per_seed=True`` adds one row per seed as well (its own Holm family per seed).
    HD95 differences compare the same pair-classes (:func:`difference_table`). Rows without a
    protocol ('': ``initial``, ANTs SyN) join every protocol, rows without a seed every seed.
    """
    per_pair = _with_defaults(per_pair, protocol="", seed=0)
    seeds = sorted(per_pair["seed"].dropna().unique().tolist())
    scopes = [("all", seeds)] + ([(s, [s]) for s in seeds] if per_seed and len(seeds) > 1 else [])
    rows = []
    for protocol in _protocols(per_pair):
        sub = per_pair[(per_pair["protocol"] == protocol) | (per_pair["protocol"] == "")]  # '' rows: every block
        for a, b in comparisons:
            for metric in metrics:
                if metric not in sub or not {a, b} <= set(sub["method"]):
                    continue
                table = difference_table(sub, a, b, metric)
                for label, keep in scopes:
                    part = table.loc[[s for s in keep if s in table.index]] if not table.empty else table
                    r = _summary(part, level, n_boot, seed)
                    if r is None:
                        continue
                    sign = r["mean_diff"] if metric.startswith(("mean_dice", "dice")) else -r["mean_diff"]
                    rows.append({"protocol": protocol, "seed": label, "comparison": f"{a} - {b}", "metric": metric,
                                 **r, "better": a if sign > 0 else (b if sign < 0 else "=")})
    out = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    if not out.empty:
        from .intervals import holm

        out["p_holm"] = out.groupby(out["seed"].astype(str))["p"].transform(lambda p: holm(p.to_numpy()))
    return out


def default_comparisons(methods: Sequence[str]) -> List[Tuple[str, str]]:
    """The comparisons of docs/reading_results.md "How to read the comparison" that the given methods allow, per regularizer, as
    (a, b) method names (a - b is reported); rows of a gradient identification add
    ``sas (gradient) - g (gradient)`` and ``sas (gradient) - sas`` (gradient vs grid proxy); CSAIN
    rows add ``sas (csain) - g``, ``sas (csain) - sas`` (CSAIN vs HyperMorph-SA),
    ``sas (csain) - sas@g (csain)``, ``sas+io (csain) - sas+io`` and, for gradient rows,
    ``sas (csain) (gradient)`` against ``g (gradient)`` and ``sas (gradient)``."""
    present = set(methods)
    out = []
    for s in ("diff", "elas"):
        for a, b in ((f"{s}-sas", f"{s}-g"), (f"{s}-sas@g", f"{s}-g"), (f"{s}-sas", f"{s}-sas@g"),
                     (f"{s}-sas+io", f"{s}-g+io"),
                     # gradient identification (docs/extensions.md "Gradient identification"): -sas vs -g, and vs the grid proxy
                     (f"{s}-sas (gradient)", f"{s}-g (gradient)"), (f"{s}-sas (gradient)", f"{s}-sas"),
                     # CSAIN conditioning (docs/extensions.md "CSAIN conditioning"): vs -g, vs HyperMorph-SA, its own ablation
                     (f"{s}-sas (csain)", f"{s}-g"), (f"{s}-sas (csain)", f"{s}-sas"),
                     (f"{s}-sas (csain)", f"{s}-sas@g (csain)"), (f"{s}-sas+io (csain)", f"{s}-sas+io"),
                     (f"{s}-sas (csain) (gradient)", f"{s}-g (gradient)"),
                     (f"{s}-sas (csain) (gradient)", f"{s}-sas (gradient)")):
            if a in present and b in present:
                out.append((a, b))
    return out


def comparison_markdown(comp: pd.DataFrame) -> str:
    """Paired comparison as a Markdown table: one row per (protocol, seed, comparison), the number of
    seeds x pairs, one cell per metric with ``mean difference [95% CI] p_H=<Holm p> W=<Wilcoxon p>/<n
    non-zero>``; ``*`` marks a Holm-adjusted p < 0.05."""
    if comp.empty:
        return ""
    metrics = [m for m in COMPARED if m in set(comp["metric"])]
    lines = ["| protocol | seed | a - b | seeds x pairs | " + " | ".join(f"d {m}" for m in metrics) + " |",
             "|---|---|---|---|" + "---|" * len(metrics)]
    for (protocol, seed, name), df in comp.groupby(["protocol", comp["seed"].astype(str), "comparison"], sort=False):
        cells = []
        by = df.set_index("metric")
        for m in metrics:
            if m not in by.index:
                cells.append("-")
                continue
            r = by.loc[m]
            star = "*" if r["p_holm"] < 0.05 else ""
            cells.append(f"{r['mean_diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]{star} "
                         f"p_H={r['p_holm']:.2g} W={r['wilcoxon_p']:.2g}/{int(r['n_nonzero'])}")
        size = f"{int(df['n_seeds'].max())} x {int(df['n_pairs'].max())}"
        lines.append(f"| {protocol} | {seed} | {name} | {size} | " + " | ".join(cells) + " |")
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


def stiffness_spearman(mu: np.ndarray, true_mu: np.ndarray) -> float:
    """Spearman rank correlation between identified and true per-class values (NaN if constant)."""
    if np.ptp(mu) == 0 or np.ptp(true_mu) == 0:
        return float("nan")
    return float(spearmanr(mu, true_mu).statistic)


def stiffness_order_summary(pairs, h_sa: np.ndarray, class_names: Sequence[str], elastic: bool) -> Dict:
    """Per pair: Spearman between identified and true per-tissue Lamé values (synthetic data).

    Uses ``pair.extras['lame'] = {class: (lambda, mu)}``; tissue classes 1..C (background
    excluded; its row ``'*_with_background'`` includes it). Identified values are ``mu_<class>``
    (elastic) or the diffusion weight ``w_<class>`` compared with the true ``mu``.
    """
    C = len(class_names)
    k = C + 1
    out: Dict[str, Dict[str, float]] = {}
    for p, h in zip(pairs, h_sa):
        lame = {int(c): v for c, v in (p.extras or {}).get("lame", {}).items()}
        if not all(c in lame for c in range(k)):
            return {}
        true_lam = np.array([lame[c][0] for c in range(k)], float)
        true_mu = np.array([lame[c][1] for c in range(k)], float)
        ident_mu = h[k:2 * k] if elastic else h[:k]
        row = {"mu": stiffness_spearman(ident_mu[1:], true_mu[1:]),
               "mu_with_background": stiffness_spearman(ident_mu, true_mu)}
        if elastic:
            row["lambda"] = stiffness_spearman(h[1:k], true_lam[1:])
        out[p.pair_id] = row
    return out


def summarize_spearman(values: Sequence[float]) -> Dict[str, float]:
    v = np.asarray([x for x in values if np.isfinite(x)], float)
    if v.size == 0:
        return {"n": 0}
    return {"n": int(v.size), "mean": round(float(v.mean()), 3), "median": round(float(np.median(v)), 3),
            "min": round(float(v.min()), 3), "fraction_perfect": round(float(np.mean(v > 0.999)), 3)}
