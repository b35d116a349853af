"""Evidence tools of docs/reading_results.md "How to read the comparison": population protocol, paired statistics, lost classes."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from hypermorph_spatially_adaptive import tables
from hypermorph_spatially_adaptive import grid_identification as ident
from hypermorph_spatially_adaptive import intervals

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
    comp = tables.paired_comparison(_per_pair(), [("elas-sas", "elas-g")], n_boot=500, seed=0)
    dice = comp[comp["metric"] == "mean_dice"].set_index("protocol")
    assert set(dice.index) == {"oracle", "population"}
    r = dice.loc["oracle"]
    assert (r["n"], r["n_seeds"], r["n_pairs"], r["seed"]) == (6, 1, 6, "all")
    assert r["mean_diff"] == pytest.approx(0.035) and r["better"] == "elas-sas"
    lo, hi, p = intervals.one_sample_interval(0.01 * np.arange(1, 7), n_boot=500, seed=0)
    assert (r["ci_low"], r["ci_high"], r["p"]) == pytest.approx((float(lo), float(hi), float(p)))
    assert r["wilcoxon_p"] == pytest.approx(stats.wilcoxon(0.01 * np.arange(1, 7)).pvalue) and r["n_nonzero"] == 6
    # Holm over the whole family of rows (2 protocols x 3 finite metrics; tre is NaN everywhere: no row)
    assert "tre" not in set(comp["metric"])
    np.testing.assert_allclose(comp["p_holm"], intervals.holm(comp["p"].to_numpy()))
    # hd95 equal: '=' and no non-zero difference
    hd = comp[comp["metric"] == "hd95"]
    assert hd["better"].eq("=").all() and (hd["n_nonzero"] == 0).all() and (hd["p"] == 1).all()


def _seeds_x_pairs():
    """3 seeds x 5 pairs; a - b = 0.02 + seed effect + pair effect (known), so the pooled mean is 0.02."""
    seed_eff, pair_eff = [-0.01, 0.0, 0.01], [0.004, -0.002, 0.0, 0.001, -0.003]
    rows = []
    for s, se in enumerate(seed_eff):
        for k, pe in enumerate(pair_eff):
            for method, dice in (("elas-g", 0.8), ("elas-sas", 0.82 + se + pe)):
                rows.append({"seed": s, "pair_id": f"p{k}", "protocol": "population", "method": method,
                             "mean_dice": dice})
    return pd.DataFrame(rows)


def test_paired_comparison_over_seeds_and_pairs():
    df = _seeds_x_pairs()
    comp = tables.paired_comparison(df, [("elas-sas", "elas-g")], metrics=["mean_dice"], per_seed=True)
    pooled = comp[comp["seed"] == "all"].iloc[0]
    assert (pooled["n_seeds"], pooled["n_pairs"], pooled["n"]) == (3, 5, 15)
    assert pooled["mean_diff"] == pytest.approx(0.02) and pooled["interval"] == "crossed seeds x pairs t"
    d = np.array([[0.02 + se + pe for pe in [0.004, -0.002, 0.0, 0.001, -0.003]] for se in [-0.01, 0.0, 0.01]])
    lo, hi, p = intervals.crossed_interval(d)
    assert (pooled["ci_low"], pooled["ci_high"], pooled["p"]) == pytest.approx((float(lo), float(hi), float(p)))
    # Wilcoxon on the seed-averaged per-pair differences (0.02 + pair effect): 5 non-zero
    assert pooled["wilcoxon_p"] == pytest.approx(stats.wilcoxon(d.mean(0)).pvalue) and pooled["n_nonzero"] == 5
    per_seed = comp[comp["seed"] != "all"].set_index("seed")
    assert list(per_seed.index) == [0, 1, 2]
    assert per_seed.loc[2, "mean_diff"] == pytest.approx(0.03) and per_seed.loc[2, "n_seeds"] == 1
    # a method without seed or protocol (e.g. ANTs SyN) is compared under every seed and protocol
    syn = df[(df["method"] == "elas-g") & (df["seed"] == 0)].assign(method="ants-syn", seed=np.nan, protocol="")
    vs = tables.paired_comparison(pd.concat([df, syn]), [("elas-sas", "ants-syn")], metrics=["mean_dice"])
    assert (vs["protocol"].iloc[0], vs["n"].iloc[0]) == ("population", 15)
    assert vs["mean_diff"].iloc[0] == pytest.approx(0.02)
    # a pair missing under one seed is dropped from the pooled table (pairs must be crossed with seeds)
    part = tables.paired_comparison(df.drop(df[(df["seed"] == 1) & (df["pair_id"] == "p0")].index),
                                        [("elas-sas", "elas-g")], metrics=["mean_dice"])
    assert (part["n_pairs"].iloc[0], part["n"].iloc[0]) == (4, 12)


def test_hd95_comparison_matches_pair_classes():
    """A class lost by a (HD95 = diagonal 40) and NaN (absent everywhere) for b must not turn into a
    comparison of means over different classes: per pair, only classes defined in both count."""
    rows = []
    for k in range(4):
        base = {"pair_id": f"p{k}", "protocol": "oracle"}
        rows.append({**base, "method": "a", "dice_lung": 0.9, "dice_bone": 0.0, "hd95_lung": 2.0,
                     "hd95_bone": 40.0, "hd95": 21.0})
        rows.append({**base, "method": "b", "dice_lung": 0.9, "dice_bone": np.nan, "hd95_lung": 3.0 + k,
                     "hd95_bone": np.nan, "hd95": 3.0 + k})
    comp = tables.paired_comparison(pd.DataFrame(rows), [("a", "b")], metrics=["hd95"])
    assert comp["mean_diff"].iloc[0] == pytest.approx(np.mean([2.0 - (3.0 + k) for k in range(4)]))
    table = tables.difference_table(pd.DataFrame(rows), "a", "b", "hd95")
    assert table.shape == (1, 4)


def test_table1_has_one_block_per_protocol_and_initial_once_in_numeric():
    numeric, md = tables.table1(_per_pair(), CLASSES)
    assert list(numeric["method"]) == ["initial", "elas-g", "elas-sas", "elas-g", "elas-sas"]
    assert list(numeric["protocol"]) == ["", "oracle", "oracle", "population", "population"]
    assert "**oracle protocol**" in md and "**population protocol**" in md
    assert md.count("| initial |") == 2


def test_lost_class_is_counted_and_penalised_with_the_image_diagonal():
    from datasets import RegistrationPair

    fixed_seg = np.zeros((24, 24), np.int32)
    fixed_seg[4:10, 4:10] = 1
    fixed_seg[14:20, 4:10] = 2
    fixed_seg[4:10, 14:20] = 3
    moving_seg = fixed_seg.copy()
    moving_seg[moving_seg == 3] = 0  # class 3 vanishes in the moving (and warped) labels
    img = np.zeros((24, 24, 1), np.float32)
    pair = RegistrationPair(pair_id="x", fixed=img, moving=img, fixed_seg=fixed_seg, moving_seg=moving_seg,
                            spacing=(1.0, 2.0))
    m = tables.pair_metrics(pair, np.zeros((24, 24, 2), np.float32), 3, CLASSES)
    diagonal = np.hypot(23 * 1.0, 23 * 2.0)
    assert m["lost_classes"] == 1 and m["hd95_liver"] == pytest.approx(diagonal)
    assert m["hd95_lung"] == 0.0 and m["hd95"] == pytest.approx(diagonal / 3)
    df = pd.DataFrame([{"pair_id": "x", "protocol": "oracle", "method": "elas-g", **m},
                       {"pair_id": "y", "protocol": "oracle", "method": "elas-g", **m, "lost_classes": 0}])
    numeric, md = tables.table1(df, CLASSES)
    assert int(numeric["lost_classes"].iloc[0]) == 1
    assert "(1/6 pair-classes lost, at the image diagonal)" in md


def test_folding_io_rows_are_flagged():
    """+io rows whose mean %negJ exceeds 0.05 get a dagger and the footnote; others do not."""
    df = _per_pair()
    extra = []
    for method, negj in (("elas-g+io", 0.06), ("elas-sas+io", 0.05), ("elas-g", 0.5)):
        for k in range(6):
            extra.append({**df.iloc[0].to_dict(), "pair_id": f"p{k}", "protocol": "oracle", "method": method,
                          "percent_neg_jac": negj})
    numeric, md = tables.table1(pd.concat([df, pd.DataFrame(extra)], ignore_index=True), CLASSES)
    oracle = md.split("**population protocol**")[0]
    assert f"| elas-g+io {tables.FOLD_MARK} |" in oracle
    assert "| elas-sas+io |" in oracle and "| elas-g |" in oracle  # 0.05 is not above; -g is no +io row
    assert oracle.count(tables.FOLD_FOOTNOTE) == 1 and "Dice rises with tearing" in oracle
    assert tables.FOLD_FOOTNOTE not in md.split("**population protocol**")[1]


def test_tre_is_averaged_over_the_pairs_that_have_keypoints_and_says_how_many():
    """Pairs without keypoints (e.g. NLST pairs whose keypoint file is missing) score every
    metric but TRE; Table 1's TRE is their mean over the pairs that have one, with n shown."""
    df = _per_pair().copy()
    df["tre"] = 1.0
    sel = (df["method"] == "elas-g") & (df["protocol"] == "oracle")
    first = df.index[sel][0]
    df.loc[first, "tre"] = np.nan
    df.loc[df.index[sel][1], "tre"] = 3.0
    numeric, md = tables.table1(df, CLASSES)
    row = numeric[(numeric["method"] == "elas-g") & (numeric["protocol"] == "oracle")].iloc[0]
    n = int(sel.sum())
    assert row["tre_pairs"] == n - 1 and row["n_pairs"] == n
    assert row["tre_mean"] == pytest.approx((3.0 + (n - 2) * 1.0) / (n - 1))
    assert f"(n={n - 1})" in md.split("**population protocol**")[0]
    assert "(n=" not in md.split("**population protocol**")[1]  # every pair there has its TRE
