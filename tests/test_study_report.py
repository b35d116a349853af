"""The study report of docs/results.md (benchmarks/study_report.py): the Holm family is exactly the reported
pooled rows, stiffness intervals come from the seeds x pairs table, and the report is written."""
import os
import sys

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import study_report  # noqa: E402


def _comp_row(setting, protocol, comparison, seed, mean, p, metric="mean_dice"):
    return {"setting": setting, "protocol": protocol, "comparison": comparison, "seed": seed, "metric": metric,
            "n_seeds": 2 if seed == "all" else 1, "n_pairs": 5, "n": 10, "mean_diff": mean, "ci_low": mean - 0.01,
            "ci_high": mean + 0.01, "interval": "x", "p": p, "p_holm": p, "wilcoxon_p": p, "n_nonzero": 5,
            "better": "a"}


def _fake_comparisons():
    rows = [
        _comp_row("paper", "oracle", "elas-sas - elas-g", "all", 0.02, 0.01),
        _comp_row("paper", "oracle", "elas-sas - elas-g", "0", 0.01, 0.2),
        _comp_row("paper", "oracle", "elas-sas - elas-g", "1", 0.03, 0.02),
        _comp_row("paper", "oracle", "elas-sas - elas-g", "all", 0.5, 0.0001, metric="hd95"),  # other metric
        _comp_row("paper", "oracle", "diff-sas@g - diff-g", "all", 0.0, 0.0001),  # not reported
        _comp_row("paper", "population", "elas-sas+io - ants-syn", "all", 0.01, 0.04),
        _comp_row("calibrated", "oracle", "elas-sas - elas-g", "all", -0.01, 0.3),
        _comp_row("calibrated - paper", "oracle", "elas-sas [calibrated] - elas-sas [paper]", "all", -0.04, 0.002),
        _comp_row("calibrated - paper", "oracle", "initial [calibrated] - initial [paper]", "all", 0.0, 1.0),
    ]
    return pd.DataFrame(rows)


def test_family_is_the_reported_pooled_rows_with_holm_over_them():
    fam = study_report.reported_family(_fake_comparisons())
    assert set(fam["metric"]) == {"mean_dice"}
    assert "diff-sas@g - diff-g" not in set(fam["comparison"])
    assert "initial [calibrated] - initial [paper]" not in set(fam["comparison"])
    pooled = fam[fam["seed"] == "all"].set_index(["setting", "comparison"])["p_family"]
    # 4 pooled rows, p = 0.002, 0.01, 0.04, 0.3 -> Holm 0.008, 0.03, 0.08, 0.3 (by hand)
    assert pooled[("calibrated - paper", "elas-sas [calibrated] - elas-sas [paper]")] == pytest.approx(0.008)
    assert pooled[("paper", "elas-sas - elas-g")] == pytest.approx(0.03)
    assert pooled[("paper", "elas-sas+io - ants-syn")] == pytest.approx(0.08)
    assert pooled[("calibrated", "elas-sas - elas-g")] == pytest.approx(0.3)
    assert fam.loc[fam["seed"] != "all", "p_family"].isna().all()  # per-seed rows are not in the family
    md = study_report.family_markdown(fam)
    assert "| oracle | elas-sas - elas-g | +0.020 [+0.010, +0.030] (2 x 5) | 0.01 / 0.03 | +0.010, +0.030 |" in md
    assert "+0.040" not in study_report.cross_markdown(fam) and "-0.040 [-0.050, -0.030]" in study_report.cross_markdown(fam)


def test_stiffness_summary_pools_seeds_by_pairs_and_drops_missing_pairs():
    rows = []
    values = {0: [1.0, 0.5, 0.5, -0.5], 1: [1.0, 1.0, 0.5, np.nan]}  # pair 3 missing under seed 1
    for seed, vals in values.items():
        for k, v in enumerate(vals):
            rows.append({"setting": "paper", "objective": "dice", "pair_id": f"p{k}", "seed": str(seed),
                         "spearman_mu": v, "spearman_lambda": -v})
    s = study_report.stiffness_summary(pd.DataFrame(rows)).set_index("parameter")
    assert s.loc["mu", "n_pairs"] == 3 and s.loc["mu", "n_seeds"] == 2
    assert s.loc["mu", "mean"] == pytest.approx((1 + 0.5 + 0.5 + 1 + 1 + 0.5) / 6)
    assert s.loc["lambda", "mean"] == pytest.approx(-s.loc["mu", "mean"])
    assert s.loc["mu", "ci_low"] < s.loc["mu", "mean"] < s.loc["mu", "ci_high"]
    assert s.loc["mu", "per_seed"] == "0.67, 0.83"
    assert s.loc["mu", "ci_high"] == 1.0  # the t interval over 2 seeds exceeds 1: clipped to the range


def test_main_writes_report_and_figure(tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    _fake_comparisons().to_csv(study / "study_comparisons.csv", index=False)
    table = pd.DataFrame([{"setting": s, "protocol": p, "method": m, "n_seeds": 2, "n_pairs": 5, "mean_dice": d,
                           "mean_dice_seed_range": 0.01, "hd95": 2.0, "dense_epe": 1.0, "percent_neg_jac": 0.0,
                           "seconds": 0.5}
                          for s, d in (("paper", 0.8), ("calibrated", 0.7))
                          for p, m in (("", "initial"), ("oracle", "elas-g"))])
    table.to_csv(study / "study_table.csv", index=False)
    pd.DataFrame([{"regularizer": "elastic", "grid_spread_mean": 0.03, "interior_fraction": 0.4, "setting": "paper",
                   "seed": 0}]).to_csv(study / "grid_response.csv", index=False)
    pd.DataFrame([{"setting": "paper", "objective": "dice", "pair_id": f"p{k}", "seed": 0, "spearman_mu": 0.5 * k,
                   "spearman_lambda": 0.5} for k in range(3)]).to_csv(study / "stiffness.csv", index=False)
    fig = tmp_path / "forest.png"
    out = study_report.main(["--study", str(study), "--figure", str(fig), "--metrics", "mean_dice"])
    text = open(out).read()
    assert "| - | initial | 0.800 (0.010) | 2.00 | 1.00 | 0.000 | 0.700 (0.010) |" in text
    assert "Holm over these 4 pooled rows" in text
    assert "| paper | elastic | 0.030 (0.030) | 40 % (40 %) |" in text
    assert fig.stat().st_size > 1000


def test_profile_cross_rows_and_the_preset_join_the_family_per_metric():
    """paper-authors - paper is a cross-setting comparison like calibrated - paper; the preset rows
    are in the family; each metric is its own Holm family; dense EPE is the primary metric."""
    assert study_report.METRICS[0] == "dense_epe"
    rows = [_comp_row("paper", "oracle", "elas-sas - ants-synpreset", "all", -0.1, 0.01, metric="dense_epe"),
            _comp_row("paper-authors", "oracle", "elas-sas - elas-g", "all", -0.2, 0.02, metric="dense_epe"),
            _comp_row("paper-authors - paper", "oracle", "elas-sas [paper-authors] - elas-sas [paper]", "all", 0.3,
                      0.04, metric="dense_epe"),
            _comp_row("paper-authors - paper", "oracle", "initial [paper-authors] - initial [paper]", "all", 0.0, 1.0,
                      metric="dense_epe"),
            _comp_row("paper", "oracle", "elas-sas - elas-g", "all", 0.02, 0.5)]  # another metric's family
    fam = study_report.reported_family(pd.DataFrame(rows), "dense_epe")
    pooled = fam.set_index(["setting", "comparison"])["p_family"]
    assert len(pooled) == 3  # initial is not a reported method; the mean Dice row is another family
    # Holm over p = 0.01, 0.02, 0.04: 0.03, 0.04, 0.04 (by hand)
    assert pooled[("paper", "elas-sas - ants-synpreset")] == pytest.approx(0.03)
    assert pooled[("paper-authors", "elas-sas - elas-g")] == pytest.approx(0.04)
    assert pooled[("paper-authors - paper", "elas-sas [paper-authors] - elas-sas [paper]")] == pytest.approx(0.04)
    md = study_report.cross_markdown(fam, "paper-authors - paper")
    assert "| oracle | elas-sas | +0.300 [+0.290, +0.310] | 2 x 5 | 0.04 / 0.04 |" in md
    family = study_report.family_markdown(fam)
    assert "paper-authors: pooled" in family and "paper-authors - paper" not in family


def test_missing_input_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="study_comparisons.csv"):
        study_report.main(["--study", str(tmp_path)])


def test_oracle_gain_sits_beside_the_models_sas_minus_g_in_dense_epe():
    """The oracle's tissue - global difference per selection (t interval over pairs, by hand) and
    the family's pooled -sas - g rows of the same metric in one table."""
    oracle = pd.DataFrame({"selection": ["per pair"] * 3, "pair_id": ["a", "b", "c"],
                           "epe_global": [0.3, 0.4, 0.5], "epe_tissue": [0.2, 0.35, 0.47]})
    gain = study_report.oracle_gain(oracle).iloc[0]
    d = np.array([-0.1, -0.05, -0.03])
    half = 4.302653 * d.std(ddof=1) / np.sqrt(3)  # t(0.975, 2)
    assert gain["mean_diff"] == pytest.approx(-0.06) and gain["wins"] == 3
    assert gain["ci_low"] == pytest.approx(-0.06 - half, rel=1e-5) and gain["ci_high"] == pytest.approx(-0.06 + half, rel=1e-5)
    fam = study_report.reported_family(pd.DataFrame([
        _comp_row("paper", "oracle", "elas-sas - elas-g", "all", -0.2, 0.02, metric="dense_epe"),
        _comp_row("paper", "oracle", "elas-sas - elas-g", "0", -0.3, 0.02, metric="dense_epe"),
        _comp_row("paper", "oracle", "elas-sas - ants-syn", "all", -0.1, 0.02, metric="dense_epe")]), "dense_epe")
    md = study_report.claim_markdown(study_report.oracle_gain(oracle), fam)
    assert "| oracle, per pair (no network) | tissue-specific - best global | -0.060 [" in md
    assert "0.400 -> 0.340 mm (-15 %), tissue lower on 3/3 |" in md
    assert "| paper, oracle | elas-sas - elas-g | -0.200 [-0.210, -0.190] | 2 x 5 | per seed -0.300 |" in md
    assert "ants-syn" not in md


def test_stiffness_across_pairs_mean_over_seeds():
    across = pd.DataFrame([{"setting": "paper", "objective": "epe", "param": "mu", "tissue": "lung", "seed": s,
                            "spearman": v} for s, v in ((0, 0.2), (1, 0.4), (2, 0.6))])
    md = study_report.stiffness_across_markdown(across)
    half = 4.302653 * 0.2 / np.sqrt(3)
    assert f"| paper | epe | mu | lung | +0.40 [{0.4 - half:+.2f}, {0.4 + half:+.2f}] | +0.20, +0.40, +0.60 |" in md


def test_network_oracle_gain_crossed_over_seeds_and_pairs():
    """elas-sas - elas-g per setting over seeds x pairs: the mean, the crossed interval computed by
    hand (mean squares of seeds and pairs), the per-seed means; a pair missing under a seed is dropped."""
    from scipy import stats

    d = np.array([[-0.10, -0.02, 0.03, -0.05], [-0.06, 0.01, -0.04, -0.08], [-0.12, -0.03, 0.00, -0.02]])
    rows = [{"setting": "wide", "seed": s, "pair_id": f"p{j}", "g": 0.6, "sas": 0.6 + d[s, j]}
            for s in range(3) for j in range(4)]
    rows.append({"setting": "wide", "seed": 0, "pair_id": "p9", "g": 0.6, "sas": 0.1})  # only under seed 0
    r = study_report.network_oracle_gain(pd.DataFrame(rows)).iloc[0]
    S, P = d.shape
    ms_seed = P * ((d.mean(1) - d.mean()) ** 2).sum() / (S - 1)
    ms_pair = S * ((d.mean(0) - d.mean()) ** 2).sum() / (P - 1)
    half = np.sqrt((stats.t.ppf(0.975, S - 1) ** 2 * ms_seed + stats.t.ppf(0.975, P - 1) ** 2 * ms_pair) / (S * P))
    assert (r["n_seeds"], r["n_pairs"]) == (3, 4) and r["mean_diff"] == pytest.approx(d.mean())
    assert r["ci_low"] == pytest.approx(d.mean() - half) and r["ci_high"] == pytest.approx(d.mean() + half)
    assert np.allclose([float(v) for v in r["per_seed"].split(", ")], d.mean(1), atol=6e-4)
    assert r["sas_lower"] == pytest.approx((d < 0).mean())
    assert r["epe_g"] == pytest.approx(0.6) and r["epe_sas"] == pytest.approx(0.6 + d.mean())  # the dropped pair aside
    fam = study_report.reported_family(pd.DataFrame([
        _comp_row("wide", "oracle", "elas-sas - elas-g", "all", -0.2, 0.02, metric="dense_epe")]), "dense_epe")
    oracle = pd.DataFrame({"selection": ["per pair"] * 2, "pair_id": ["a", "b"], "epe_global": [0.3, 0.4],
                           "epe_tissue": [0.2, 0.35]})
    md = study_report.claim_markdown(study_report.oracle_gain(oracle), fam,
                                     study_report.network_oracle_gain(pd.DataFrame(rows)))
    assert f"| wide, networks' EPE oracle (parameters chosen per pair on the true EPE) | elas-sas - elas-g | {d.mean():+.3f} [" in md
