"""benchmarks/study.py's tables and figure on a made-up study (no training)."""
import json
import os
import sys

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import study  # noqa: E402

from hypermorph_spatially_adaptive.figures import plot_comparison_forest  # noqa: E402


def _fake_study(effect=0.02, n_pairs=8, seeds=(0, 1, 2)):
    rng = np.random.default_rng(0)
    rows = []
    for setting, shift in (("paper", 0.0), ("calibrated", 0.01)):
        for seed in seeds:
            for k in range(n_pairs):
                base = 0.8 + 0.01 * k + 0.005 * seed
                for method, d in (("initial", -0.2), ("elas-g", 0.0), ("elas-sas", effect), ("elas-g+io", 0.1)):
                    proto = "" if method == "initial" else "oracle"
                    rows.append({"setting": setting, "seed": seed, "pair_id": f"p{k}", "protocol": proto,
                                 "method": method, "mean_dice": base + d + shift + rng.normal(0, 0.002),
                                 "hd95": 3.0 - d, "tre": np.nan, "dense_epe": 0.5 - d, "seconds": 0.01,
                                 "percent_neg_jac": 0.1 if method.endswith("+io") else 0.0, "sdlogj": 0.2})
    return pd.DataFrame(rows)


def test_study_table_means_and_seed_ranges():
    s = _fake_study()
    t = study.study_table(s).set_index(["setting", "protocol", "method"])
    g = s[(s.setting == "paper") & (s.method == "elas-sas")]
    row = t.loc[("paper", "oracle", "elas-sas")]
    assert row["mean_dice"] == pytest.approx(g["mean_dice"].mean())
    per_seed = g.groupby("seed")["mean_dice"].mean()
    assert row["mean_dice_seed_range"] == pytest.approx(per_seed.max() - per_seed.min())
    assert row["n_seeds"] == 3 and row["n_pairs"] == 8
    md = study.table_markdown(study.study_table(s))
    assert "#### paper" in md and "| oracle | elas-sas | 3 x 8 |" in md


def test_compare_finds_the_planted_effect_and_plots_it(tmp_path):
    s = _fake_study(effect=0.02)
    comp = study.compare(s, n_boot=200)
    pooled = comp[(comp.setting == "paper") & (comp.seed.astype(str) == "all") & (comp.metric == "mean_dice")
                  & (comp.comparison == "elas-sas - elas-g")].iloc[0]
    assert pooled["mean_diff"] == pytest.approx(0.02, abs=0.002)
    assert pooled["ci_low"] > 0 and pooled["n_seeds"] == 3 and pooled["n_pairs"] == 8
    assert set(comp.metric) >= {"mean_dice", "percent_neg_jac"}
    cal = comp[(comp.setting == "calibrated - paper") & (comp.metric == "mean_dice")
               & (comp.comparison == "elas-g [calibrated] - elas-g [paper]")].iloc[0]
    assert cal["mean_diff"] == pytest.approx(0.01, abs=0.002)
    out = plot_comparison_forest(comp[comp.setting != "calibrated - paper"], str(tmp_path / "f.png"))
    assert os.path.getsize(out) > 5000
    with pytest.raises(ValueError, match="no rows for metric"):
        plot_comparison_forest(comp, str(tmp_path / "g.png"), metric="nope")


def test_grid_response_spread_and_interior(tmp_path):
    folder = tmp_path / "identification" / "elastic"
    folder.mkdir(parents=True)
    grid = pd.DataFrame([{"pair_id": p, "lambda": l, "mu": m, "mean_dice": d + 0.1 * l * k}
                         for k, (p, d) in enumerate((("a", 0.7), ("b", 0.8))) for l in (0.0, 1.0) for m in (0.0, 1.0)])
    grid.to_csv(folder / "grid_dice.csv", index=False)
    pd.DataFrame({"pair_id": ["a", "b"], "g_lambda": [0.5, 1.0], "g_mu": [0.3, 0.2]}).to_csv(
        folder / "identified_parameters.csv", index=False)
    r = study.grid_response(str(tmp_path)).set_index("regularizer").loc["elastic"]
    assert r["grid_spread_mean"] == pytest.approx(0.05)  # pair a: 0, pair b: 0.1
    assert r["interior_fraction"] == pytest.approx(0.5)   # b sits on lambda = 1


def test_a_unit_made_by_another_command_is_refused_and_the_data_options_reach_units_and_peer(tmp_path):
    """A recorded 3000-step unit must not be collected into an 8000-step study; --stiffness-spread and
    --no-csain change the unit's command (so the guard sees them)."""
    base = study.build_parser().parse_args([])
    done = tmp_path / "DONE.json"
    done.write_text(json.dumps({"argv": study._pipeline_argv(base, "paper", 0, "elsewhere")}))
    study.check_unit_command(str(done), study._pipeline_argv(base, "paper", 0, "here"))  # --out aside: same
    longer = study.build_parser().parse_args(["--steps", "8000", "--stiffness-spread", "0.5", "--no-csain"])
    argv = study._pipeline_argv(longer, "paper", 0, "here")
    assert "--csain" not in argv and argv[argv.index("--stiffness-spread") + 1] == "0.5"
    with pytest.raises(ValueError, match="--steps 3000.*\n.*--steps 8000"):
        study.check_unit_command(str(done), argv)


def test_stiffness_scores_each_pair_against_its_own_values_with_spread(tmp_path):
    """With --stiffness-spread the truth is each pair's own (the generator's subject_lame): an
    identification that follows it has rank 1 within and across pairs; against the shared table the
    across-pair ranks are undefined (one value per tissue)."""
    from datasets.phantoms import CLASS_NAMES
    from hypermorph_spatially_adaptive import artifacts as art

    args = study.build_parser().parse_args(["--stiffness-spread", "0.5"])
    truth = study.true_lame_of(args)
    ids = [f"synthetic_{i:04d}" for i in range(170, 180)]
    assert truth(ids[0]) != truth(ids[1])
    folder = tmp_path / art.IDENTIFICATION_DIRS["gradient"] / "elastic"
    folder.mkdir(parents=True)
    rows = [{"pair_id": p, **{f"{f}_{n}": np.log(truth(p)[c][k]) for c, n in enumerate(CLASS_NAMES, 1)
                              for k, f in enumerate(("lambda", "mu"))}} for p in ids]
    pd.DataFrame(rows).to_csv(folder / art.IDENTIFIED_PARAMETERS, index=False)
    within = study.stiffness_recovery(str(tmp_path), CLASS_NAMES, truth)
    assert len(within) == 10 and np.allclose(within[["spearman_lambda", "spearman_mu"]], 1.0)
    across = study.stiffness_across_pairs(str(tmp_path), CLASS_NAMES, truth, n_boot=50)
    assert len(across) == 6 and np.allclose(across["spearman"], 1.0) and (across["n"] == 10).all()
    shared = study.true_lame_of(study.build_parser().parse_args([]))
    assert shared(ids[0]) == shared(ids[1])
    assert study.stiffness_across_pairs(str(tmp_path), CLASS_NAMES, shared, n_boot=50)["spearman"].isna().all()


def test_network_epe_oracle_reads_the_epe_identification_only(tmp_path):
    """The networks' own oracle is the EPE identification's best objective of the SA model (sas) and
    of the global model (g); a unit with only a Dice identification has none."""
    from hypermorph_spatially_adaptive import artifacts as art

    dice = tmp_path / art.IDENTIFICATION_DIRS["gradient"] / "elastic"
    dice.mkdir(parents=True)
    pd.DataFrame({"pair_id": ["0001"], "objective": [0.9], "g_objective": [0.8]}).to_csv(
        dice / art.IDENTIFIED_PARAMETERS, index=False)
    assert study.network_epe_oracle(str(tmp_path)).empty
    epe = tmp_path / (art.IDENTIFICATION_DIRS["gradient"] + "_epe") / "elastic"
    epe.mkdir(parents=True)
    pd.DataFrame({"pair_id": ["0001", "0002"], "objective": [0.5, 0.7], "g_objective": [0.6, 0.65]}).to_csv(
        epe / art.IDENTIFIED_PARAMETERS, index=False)
    got = study.network_epe_oracle(str(tmp_path))
    assert list(got["pair_id"]) == ["0001", "0002"]  # ids stay strings
    assert np.allclose(got["sas"], [0.5, 0.7]) and np.allclose(got["g"], [0.6, 0.65])
