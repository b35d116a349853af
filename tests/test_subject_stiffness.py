"""Subject-specific stiffness in the synthetic generator (--stiffness-spread) and the score of
identified against true per-pair stiffness (benchmarks/stiffness_recovery.py)."""
import os
import sys

import numpy as np
import pandas as pd
import pytest

from datasets import phantoms
from datasets.synthetic import SyntheticDataset, parse_stiffness_spread, subject_lame

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from stiffness_recovery import stiffness_recovery  # noqa: E402

NAMES = ("lung", "bone", "liver")


def test_subject_lame_scales_each_tissue_by_one_lognormal_factor():
    base = phantoms.DEFAULT_LAME
    assert subject_lame(7, 0.0, base) == {c: tuple(map(float, v)) for c, v in base.items()}
    a, b = subject_lame(7, 0.5, base), subject_lame(7, 0.5, base)
    assert a == b  # a function of the pair's seed
    assert a != subject_lame(8, 0.5, base)
    for c, (lam, mu) in a.items():
        assert lam / base[c][0] == pytest.approx(mu / base[c][1])  # Poisson ratio kept
    # log factors over many subjects: mean 0, standard deviation = the spread
    logs = np.array([[np.log(subject_lame(s, 0.5, base)[c][1] / base[c][1]) for c in base] for s in range(2000)])
    assert abs(logs.mean()) < 4 * 0.5 / np.sqrt(logs.size)
    assert logs.std() == pytest.approx(0.5, rel=0.05)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        parse_stiffness_spread("3")


def test_dataset_pairs_carry_their_own_stiffness(tmp_path):
    plain = SyntheticDataset(image_size=[32, 32], num_pairs=2, cache_dir=str(tmp_path))
    spread = SyntheticDataset(image_size=[32, 32], num_pairs=2, cache_dir=str(tmp_path), stiffness_spread=0.5)
    assert plain.cache_path("synthetic_0000") != spread.cache_path("synthetic_0000")
    p0, s0, s1 = plain.load_pair("synthetic_0000"), spread.load_pair("synthetic_0000"), spread.load_pair("synthetic_0001")
    assert s0.extras["lame"] == subject_lame(spread.seed_of("synthetic_0000"), 0.5, phantoms.DEFAULT_LAME)
    assert s0.extras["lame"] != s1.extras["lame"] and p0.extras["lame"] == {
        c: tuple(map(float, v)) for c, v in phantoms.DEFAULT_LAME.items()}
    np.testing.assert_array_equal(p0.fixed_seg, s0.fixed_seg)  # same subject anatomy, other stiffness
    assert np.abs(p0.extras["disp_true"] - s0.extras["disp_true"]).max() > 0.05
    # the default stays out of the config and the command line (the demo's runs are reused)
    opts = SyntheticDataset.config_options(None, {"image_size": [32, 32], "cache_dir": str(tmp_path)})
    assert opts["stiffness_spread"] is None
    assert SyntheticDataset.config_options(None, {"stiffness_spread": 0.5, "cache_dir": str(tmp_path)})[
        "stiffness_spread"] == 0.5


def _truth(n, seed=0):
    return {f"p{i}": subject_lame(i + 100 * seed, 0.8, phantoms.DEFAULT_LAME) for i in range(n)}


def _identified(truth, transform):
    rows = []
    for p, lame in truth.items():
        row = {"pair_id": p}
        for c, name in enumerate(NAMES, 1):
            row[f"lambda_{name}"], row[f"mu_{name}"] = transform(lame[c][0]), transform(lame[c][1])
        rows.append(row)
    return pd.DataFrame(rows)


def test_stiffness_recovery_ranks():
    truth = _truth(12)
    across, within = stiffness_recovery(_identified(truth, lambda v: np.log(v) / 10), truth, NAMES, n_boot=50)
    assert np.allclose(across["spearman"], 1.0) and (across["n"] == 12).all()
    assert within.query("pair_id == 'mean'")["spearman"].tolist() == [1.0, 1.0]
    across, within = stiffness_recovery(_identified(truth, lambda v: 1 / v), truth, NAMES, n_boot=50)
    assert np.allclose(across["spearman"], -1.0)
    # noisy identification: rho strictly inside (-1, 1), interval around it
    rng = np.random.default_rng(0)
    noisy = _identified(truth, lambda v: np.log(v) + rng.normal(0, 0.6))
    across, _ = stiffness_recovery(noisy, truth, NAMES, n_boot=200)
    assert ((across["lo"] <= across["spearman"]) & (across["spearman"] <= across["hi"])).all()
    assert (across["spearman"].abs() < 1).any()
    # a constant identification carries no rank information
    across, within = stiffness_recovery(_identified(truth, lambda v: 0.5), truth, NAMES, n_boot=50)
    assert across["spearman"].isna().all() and within["spearman"].isna().all()
    with pytest.raises(ValueError, match="no identified pair"):
        stiffness_recovery(_identified(truth, np.log), {"x": truth["p0"]}, NAMES)
