"""benchmarks/bench_oracle.py: the box report's reachability rules against the mappings they model."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_oracle  # noqa: E402


def test_linear_box_reaches_exactly_the_band_abs_diff_le_k():
    rng = np.random.default_rng(0)
    for K in (1.0, 10.0):
        lam, mu = rng.uniform(0, 1, (2, 5000))
        t = 2.0 - lam - mu  # eq. 1's similarity weight; per unit similarity the weights are K x / t
        w = np.stack([K * lam / t, K * mu / t], 1)
        assert all(bench_oracle.expressible(v, "linear", K, None) for v in w)
        assert np.abs(w[:, 0] - w[:, 1]).max() <= K + 1e-9
        # the inverse map of the docstring reproduces (lam, mu) inside the box
        s = K + w.sum(1)
        np.testing.assert_allclose(2 * w[:, 0] / s, lam, atol=1e-9)
    assert not bench_oracle.expressible(np.array([3.0, 1.0]), "linear", 1.0, None)
    assert bench_oracle.expressible(np.array([3.0, 1.0]), "linear", 2.0, None)


def test_log_and_authors_boxes():
    lo, hi = 10 * 0.5 * 10 ** -1, 10 * 0.5 * 10 ** 1  # K 10, 2 decades: [0.5, 50]
    assert bench_oracle.expressible(np.array([lo, hi]), "log", 10.0, 2.0)
    assert not bench_oracle.expressible(np.array([lo * 0.9, 1.0]), "log", 10.0, 2.0)
    assert not bench_oracle.expressible(np.array([1.0, hi * 1.1]), "log", 10.0, 2.0)
    # 1 - lambda - mu: any positive pair, with lambda + mu < 1
    w = np.array([600.0, 0.001])
    assert bench_oracle.expressible(w, "authors", 1.0, None)
    lam, mu = w / (1.0 + w.sum())
    assert lam + mu < 1 and lam / (1 - lam - mu) == pytest.approx(w[0])


@pytest.mark.slow
def test_oracle_runs_end_to_end(tmp_path):
    out = bench_oracle.main(["--image-size", "32", "32", "--num-pairs", "24", "--max-pairs", "3", "--scales", "0.01",
                             "0.1", "--global-values", "0.1", "1", "--level-steps", "5", "5", "10", "--cache-dir",
                             str(tmp_path / "cache"), "--out", str(tmp_path / "o")])
    assert len(out["pairs"]) == 6 and set(out["summary"].selection) == {"per pair", "one for all"}
    assert (tmp_path / "o" / "oracle_summary.md").read_text().count("|") > 20
