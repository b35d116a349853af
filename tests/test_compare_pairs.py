"""benchmarks/compare_pairs.py: two rows of two per-pair tables compared over their shared pairs."""
import os
import sys

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import compare_pairs  # noqa: E402


def _tables(tmp_path):
    ids = [f"p{i}" for i in range(6)]
    refine = pd.DataFrame({"mode": ["stress"] * 6 + ["demo"] * 6, "row": "r", "pair_id": ids * 2,
                           "mean_dice": [0.9, 0.8, 0.85, 0.9, 0.7, 0.95] * 2,
                           "dense_epe": [0.1, 0.2, 0.3, 0.1, 0.5, 0.2] * 2})
    peer = pd.DataFrame({"method": ["ants"] * 5 + ["initial"] * 5, "pair_id": ids[1:] * 2,
                         "mean_dice": [0.7, 0.9, 0.8, 0.6, 0.9] + [0.5] * 5,
                         "dense_epe": [0.3, 0.2, 0.2, 0.4, 0.3] + [1.0] * 5})
    a, b = tmp_path / "bench_refine_pairs.csv", tmp_path / "per_pair_metrics.csv"
    refine.to_csv(a, index=False)
    peer.to_csv(b, index=False)
    return str(a), str(b)


def test_shared_pairs_differences_and_wins(tmp_path):
    a, b = _tables(tmp_path)
    comp = compare_pairs.main(["--a", f"{a}:r", "--b", f"{b}:ants", "--mode", "stress", "--bootstrap", "200"])
    comp = comp.set_index("metric")
    dice = np.array([0.8, 0.85, 0.9, 0.7, 0.95]) - np.array([0.7, 0.9, 0.8, 0.6, 0.9])  # p1..p5
    epe = np.array([0.2, 0.3, 0.1, 0.5, 0.2]) - np.array([0.3, 0.2, 0.2, 0.4, 0.3])
    assert comp.loc["mean_dice", "n_pairs"] == 5
    assert comp.loc["mean_dice", "mean_diff"] == pytest.approx(dice.mean())
    assert comp.loc["dense_epe", "mean_diff"] == pytest.approx(epe.mean())
    assert comp.loc["mean_dice", "a_wins"] == 4 and comp.loc["dense_epe", "a_wins"] == 3
    assert comp.loc["mean_dice", "ci_low"] < dice.mean() < comp.loc["mean_dice", "ci_high"]


def test_bad_sides_are_refused_with_what_is_missing(tmp_path):
    a, b = _tables(tmp_path)
    with pytest.raises(ValueError, match="give --mode"):
        compare_pairs.main(["--a", f"{a}:r", "--b", f"{b}:ants"])
    with pytest.raises(ValueError, match="no row named 'x'"):
        compare_pairs.main(["--a", f"{a}:r", "--b", f"{b}:x", "--mode", "stress"])
    with pytest.raises(ValueError, match="CSV:ROW"):
        compare_pairs.main(["--a", a, "--b", f"{b}:ants", "--mode", "stress"])
    with pytest.raises(FileNotFoundError):
        compare_pairs.main(["--a", "nope.csv:r", "--b", f"{b}:ants"])
