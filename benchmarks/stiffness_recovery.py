"""How well identified per-tissue parameters recover subject-specific true stiffness across pairs
(synthetic ``--stiffness-spread`` data, docs/oracle.md "Subject-specific stiffness").

Analysis of an identification's ``identified_parameters.csv`` against the pairs' true Lamé values
(``pair.extras["lame"]``); no stage uses it. The per-pair tissue order that
``parameter_identification.py --objective epe`` records is
:func:`hypermorph_spatially_adaptive.tables.stiffness_order_summary`.
"""
from __future__ import annotations

import warnings
from typing import Dict, Sequence, Tuple

import numpy as np
import pandas as pd
from scipy import stats


def stiffness_recovery(identified: pd.DataFrame, true_lame: Dict[str, Dict[int, Tuple[float, float]]],
                       class_names: Sequence[str], level: float = 0.95, n_boot: int = 2000,
                       seed: int = 0) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """How well identified per-tissue parameters recover subject-specific true stiffness
    (synthetic ``--stiffness-spread`` data: ``pair.extras["lame"]``).

    Args:
        identified: one row per pair, ``pair_id`` plus ``lambda_<class>``/``mu_<class>`` for the
            tissue classes (``ParamSpec.names``; values in [0, 1] of any mapping: only ranks count).
        true_lame: ``{pair_id: {class index: (lambda, mu)}}``, class 1..C = ``class_names``.
    Returns:
        ``(across, within)``. ``across``: per tissue and parameter, Spearman rho of identified vs
        true values over the pairs (does a stiffer subject get a larger value?), with a BCa
        bootstrap interval over pairs (``scipy.stats.bootstrap``, paired), ``n`` pairs; NaN when
        the identified or true values are constant. ``within``: per pair and parameter, Spearman
        rho over the C tissues of identified vs true values (is the tissue order right?); the
        last rows (``pair_id`` "mean") hold the mean over pairs with a t interval.
    """
    ids = [p for p in identified["pair_id"].astype(str) if p in true_lame]
    if not ids:
        raise ValueError("stiffness_recovery: no identified pair has true Lame values")
    ident = identified.set_index(identified["pair_id"].astype(str)).loc[ids]
    across, within = [], []
    for k, param in enumerate(("lambda", "mu")):
        true = np.array([[true_lame[p][c][k] for c in range(1, len(class_names) + 1)] for p in ids], float)
        found = ident[[f"{param}_{name}" for name in class_names]].to_numpy(float)
        for j, name in enumerate(class_names):
            x, y = found[:, j], true[:, j]
            row = {"tissue": name, "param": param, "n": len(ids), "spearman": np.nan, "lo": np.nan, "hi": np.nan}
            if len(ids) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
                row["spearman"] = float(stats.spearmanr(x, y).statistic)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # degenerate resamples (constant x) give NaN statistics
                    res = stats.bootstrap((x, y), lambda a, b: stats.spearmanr(a, b).statistic, paired=True,
                                          vectorized=False, confidence_level=level, n_resamples=n_boot,
                                          method="BCa", random_state=np.random.default_rng(seed))
                row["lo"], row["hi"] = float(res.confidence_interval.low), float(res.confidence_interval.high)
            across.append(row)
        rhos = []
        for i, p in enumerate(ids):
            ok = np.ptp(found[i]) > 0 and np.ptp(true[i]) > 0
            rho = float(stats.spearmanr(found[i], true[i]).statistic) if ok else np.nan
            rhos.append(rho)
            within.append({"pair_id": p, "param": param, "spearman": rho, "lo": np.nan, "hi": np.nan})
        r = np.array([v for v in rhos if np.isfinite(v)])
        mean = {"pair_id": "mean", "param": param, "spearman": float(r.mean()) if r.size else np.nan,
                "lo": np.nan, "hi": np.nan}
        if r.size >= 2:
            half = stats.t.ppf(0.5 + level / 2, r.size - 1) * r.std(ddof=1) / np.sqrt(r.size)
            mean["lo"], mean["hi"] = max(-1.0, mean["spearman"] - half), min(1.0, mean["spearman"] + half)
        within.append(mean)
    return pd.DataFrame(across), pd.DataFrame(within)
