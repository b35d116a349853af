"""benchmarks/smooth_maps.py: the smoothed-vs-unsmoothed comparison and the replayed inference
command, on made-up per-pair tables (no training)."""
import json
import os
import sys

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import smooth_maps  # noqa: E402


def _per_pair(path, seed, shift, negj):
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(10):
        for method in ("initial", "elas-g", "elas-sas", "elas-sas+io"):
            rows.append({"pair_id": f"{k:04d}", "protocol": "" if method == "initial" else "oracle",
                         "method": method, "mean_dice": 0.8 + 0.01 * k + (shift if "sas" in method else 0.0)
                         + rng.normal(0, 1e-3), "hd95": 2.0, "dense_epe": 1.0,
                         "percent_neg_jac": negj if "sas" in method else 0.0, "sdlogj": 0.1})
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def test_compare_units_pairs_each_sa_row_with_its_unsmoothed_twin(tmp_path):
    units = []
    for seed in (0, 1):
        base = _per_pair(tmp_path / f"b{seed}.csv", seed, 0.0, 0.5)
        smooth = _per_pair(tmp_path / f"s{seed}.csv", seed + 10, 0.02, 0.1)
        units.append((seed, base, smooth))
    comp = smooth_maps.compare_units(units, 0.8, n_boot=200)
    pooled = comp[comp["seed"].astype(str) == "all"]
    assert set(pooled["comparison"]) == {"elas-sas [sigma 0.8] - elas-sas [sigma 0]",
                                         "elas-sas+io [sigma 0.8] - elas-sas+io [sigma 0]"}
    dice = pooled[(pooled.metric == "mean_dice")].set_index("comparison")["mean_diff"]
    assert dice.to_numpy() == pytest.approx([0.02, 0.02], abs=2e-3)  # the made-up effect
    negj = pooled[(pooled.metric == "percent_neg_jac")]["mean_diff"].to_numpy()
    assert negj == pytest.approx([-0.4, -0.4])
    assert (pooled["n_seeds"] == 2).all() and (pooled["n_pairs"] == 10).all()
    md = smooth_maps.markdown(comp)
    assert "elas-sas+io [sigma 0.8] - elas-sas+io [sigma 0]" in md and "| oracle | all |" in md


def test_replayed_inference_swaps_sa_runs_and_drops_gradient_identifications(tmp_path, monkeypatch):
    unit = tmp_path / "seed0"
    (unit / "results").mkdir(parents=True)
    recorded = ["run_pipeline.py", "--out", "u/results", "--panels", "1", "--refine", "100", "--zero-io",
                "--elastic-sa", "u/runs/elastic_sa", "u/runs/elastic_sa_csain",
                "--elastic-ident", "u/identification/elastic", "u/identification_gradient/elastic",
                "u/identification_population/elastic", "--no-refine-svf"]
    (unit / "results" / "inference.json").write_text(json.dumps({"command": recorded}))
    seen = {}
    monkeypatch.setattr(smooth_maps, "_run_inference", lambda argv: seen.setdefault("argv", argv))
    new = {"elastic_sa": "new/elastic_sa"}
    smooth_maps._replay_inference(str(unit), new, 0.8)
    argv = seen["argv"]
    assert argv[argv.index("--out") + 1] == os.path.join(str(unit), "smooth0.8", "results")
    assert argv[argv.index("--panels") + 1] == "0" and "--zero-io" not in argv
    i = argv.index("--elastic-sa")
    assert argv[i + 1:i + 3] == ["new/elastic_sa", "--elastic-ident"]  # CSAIN not retrained: left out
    i = argv.index("--elastic-ident")
    assert argv[i + 1:i + 3] == ["u/identification/elastic", "u/identification_population/elastic"]
    assert argv[-1] == "--no-refine-svf" and argv[argv.index("--refine") + 1] == "100"
