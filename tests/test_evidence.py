"""Evidence tools of README "How to read the comparison": population protocol, paired statistics, lost classes."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from hypermorph_spatially_adaptive import evaluation
from hypermorph_spatially_adaptive import identification as ident

CLASSES = ["lung", "bone", "liver"]


def _val_grid():
    """Two validation pairs on a 2 x 2 elastic grid, Dice values chosen by hand."""
    pts = [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)]
    lung = {"v1": [0.90, 0.80, 0.70, 0.60], "v2": [0.50, 0.70, 0.60, 0.40]}   # means .70 .75 .65 .50
    bone = {"v1": [0.20, 0.30, 0.40, 0.50], "v2": [0.60, 0.30, 0.40, 0.20]}   # means .40 .30 .40 .35
    liver = {"v1": [0.70, 0.70, 0.80, 0.90], "v2": [0.70, 0.70, 0.80, 0.50]}  # means .70 .70 .80 .70
    rows = []
    for pid in ("v1", "v2"):
        for k, (lam, mu) in enumerate(pts):
            d = [lung[pid][k], bone[pid][k], liver[pid][k]]
            rows.append({"pair_id": pid, "lambda": lam, "mu": mu, "dice_lung": d[0], "dice_bone": d[1],
                         "dice_liver": d[2], "mean_dice": float(np.mean(d))})
    return pd.DataFrame(rows)


def test_population_choice_equals_hand_computation():
    out = ident.population_choice(_val_grid(), "elastic", CLASSES, ["t1", "t2", "t3"])
    assert list(out["pair_id"]) == ["t1", "t2", "t3"]
    r = out.iloc[0]
    # lung: mean Dice (.70, .75, .65, .50) -> (0, 1)
    assert (r["lambda_lung"], r["mu_lung"]) == (0.0, 1.0) and r["dice_lung"] == pytest.approx(0.75)
    # bone: (.40, .30, .40, .35): tie between (0,0) and (1,0) -> larger regularization (1, 0)
    assert (r["lambda_bone"], r["mu_bone"]) == (1.0, 0.0) and r["dice_bone"] == pytest.approx(0.40)
    # liver: (.70, .70, .80, .70) -> (1, 0)
    assert (r["lambda_liver"], r["mu_liver"]) == (1.0, 0.0)
    # mean over pairs of the per-pair mean Dice: (.6, .5833, .6167, .5167) -> (1, 0) for -g and background
    assert (r["g_lambda"], r["g_mu"]) == (1.0, 0.0)
    assert (r["lambda_background"], r["mu_background"]) == (1.0, 0.0)
    assert r["g_mean_dice"] == pytest.approx((0.7 + 0.4 + 0.8 + 0.6 + 0.4 + 0.8) / 6)
    # every test pair gets the same setting
    assert (out.drop(columns="pair_id").nunique() <= 1).all()


def test_population_choice_diffusion_uses_one_axis():
    df = _val_grid()
    df = df[df["mu"] == 0.0].drop(columns="mu")
    r = ident.population_choice(df, "diffusion", CLASSES, ["t"]).iloc[0]
    assert r["lambda_lung"] == 0.0 and r["lambda_liver"] == 1.0 and "g_mu" not in r


def test_bootstrap_ci_contains_a_known_shift_and_is_seeded():
    rng = np.random.default_rng(0)
    d = 0.02 + rng.normal(0, 0.01, 40)
    lo, hi = evaluation.bootstrap_ci(d, 2000, seed=7)
    assert lo < 0.02 < hi and hi - lo < 0.02
    assert (lo, hi) == evaluation.bootstrap_ci(d, 2000, seed=7)
    assert (lo, hi) != evaluation.bootstrap_ci(d, 2000, seed=8)
    # the CI of a mean shrinks like 1/sqrt(n): half width about 1.96 * sd / sqrt(n)
    assert (hi - lo) / 2 == pytest.approx(1.96 * d.std() / np.sqrt(d.size), rel=0.2)


def test_wilcoxon_equals_scipy():
    d = np.array([0.01, -0.02, 0.03, 0.05, 0.012, -0.004, 0.02, 0.031, 0.007])
    assert evaluation.wilcoxon_p(d) == pytest.approx(stats.wilcoxon(d).pvalue)
    assert evaluation.wilcoxon_p(np.zeros(5)) == 1.0


def _per_pair():
    rows = []
    for k in range(6):
        base = {"pair_id": f"p{k}", "params": "", "hd95": 2.0, "tre": np.nan, "percent_neg_jac": 0.0,
                "sdlogj": 0.1, "lost_classes": 0, "dense_epe": 1.0}
        for method, dice in (("elas-g", 0.80), ("elas-sas", 0.80 + 0.01 * (k + 1))):
            for protocol in ("oracle", "population"):
                rows.append({**base, "protocol": protocol, "method": method, "mean_dice": dice,
                             **{f"dice_{n}": dice for n in CLASSES}})
        rows.append({**base, "protocol": "", "method": "initial", "mean_dice": 0.7,
                     **{f"dice_{n}": 0.7 for n in CLASSES}})
    return pd.DataFrame(rows)


def test_paired_comparison_per_protocol():
    comp = evaluation.paired_comparison(_per_pair(), [("elas-sas", "elas-g")], n_boot=500, seed=0)
    dice = comp[comp["metric"] == "mean_dice"].set_index("protocol")
    assert set(dice.index) == {"oracle", "population"}
    r = dice.loc["oracle"]
    assert r["n"] == 6 and r["mean_diff"] == pytest.approx(0.035)
    assert r["ci_low"] <= 0.035 <= r["ci_high"] and r["better"] == "elas-sas"
    assert r["wilcoxon_p"] == pytest.approx(stats.wilcoxon(0.01 * np.arange(1, 7)).pvalue)
    # tre is NaN everywhere: no row; hd95 equal: '='
    assert "tre" not in set(comp["metric"])
    assert comp[comp["metric"] == "hd95"]["better"].eq("=").all()


def test_table1_has_one_block_per_protocol_and_initial_once_in_numeric():
    numeric, md = evaluation.table1(_per_pair(), CLASSES)
    assert list(numeric["method"]) == ["initial", "elas-g", "elas-sas", "elas-g", "elas-sas"]
    assert list(numeric["protocol"]) == ["", "oracle", "oracle", "population", "population"]
    assert "**oracle protocol**" in md and "**population protocol**" in md
    assert md.count("| initial |") == 2


def test_lost_class_is_counted_and_left_out_of_the_hd95_mean():
    from datasets import RegistrationPair

    fixed_seg = np.zeros((24, 24), np.int32)
    fixed_seg[4:10, 4:10] = 1
    fixed_seg[14:20, 4:10] = 2
    fixed_seg[4:10, 14:20] = 3
    moving_seg = fixed_seg.copy()
    moving_seg[moving_seg == 3] = 0  # class 3 vanishes in the moving (and warped) labels
    img = np.zeros((24, 24, 1), np.float32)
    pair = RegistrationPair(pair_id="x", fixed=img, moving=img, fixed_seg=fixed_seg, moving_seg=moving_seg,
                            spacing=(1.0, 1.0))
    m = evaluation.pair_metrics(pair, np.zeros((24, 24, 2), np.float32), 3, CLASSES)
    assert m["lost_classes"] == 1 and np.isnan(m["hd95_liver"])
    assert m["hd95"] == pytest.approx(np.mean([m["hd95_lung"], m["hd95_bone"]]))
    df = pd.DataFrame([{"pair_id": "x", "protocol": "oracle", "method": "elas-g", **m},
                       {"pair_id": "y", "protocol": "oracle", "method": "elas-g", **m, "lost_classes": 0}])
    numeric, md = evaluation.table1(df, CLASSES)
    assert int(numeric["lost_classes"].iloc[0]) == 1
    assert "over 5/6 pair-classes" in md
