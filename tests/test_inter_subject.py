"""The synthetic dataset's inter-subject pairing (datasets/synthetic.py, --pairing inter-subject):
deterministic per seed, different anatomies, loads through the normal loaders, scored without
a true field or keypoints."""
import argparse

import numpy as np
import pytest

import datasets
import eval_metrics

SIZE = [32, 32]


def _dataset(tmp_path, sub, **kw):
    return datasets.get_dataset("synthetic", image_size=SIZE, num_pairs=4, cache_dir=str(tmp_path / sub), **kw)


def _initial_dice(pair):
    return eval_metrics.mean_dice(pair.fixed_seg, pair.moving_seg, 3)


def test_deterministic_per_seed_and_shares_the_moving_subject(tmp_path):
    a = _dataset(tmp_path, "a", pairing="inter-subject")
    b = _dataset(tmp_path, "b", pairing="inter-subject")  # fresh cache: generated again
    deform = _dataset(tmp_path, "a")
    for pid in a.all_ids():
        pa, pb, pd_ = a.load_pair(pid), b.load_pair(pid), deform.load_pair(pid)
        for key in ("fixed", "moving", "fixed_seg", "moving_seg"):
            np.testing.assert_array_equal(getattr(pa, key), getattr(pb, key))
        np.testing.assert_array_equal(pa.moving, pd_.moving)  # same moving subject as the deformation pair
        assert not np.array_equal(pa.fixed_seg, pd_.fixed_seg)  # another fixed subject
        assert pa.fixed_kp is None and "disp_true" not in pa.extras and pa.extras["meta"]["pairing"] == "inter-subject"
    other = datasets.get_dataset("synthetic", image_size=SIZE, num_pairs=4, data_seed=1,
                                 cache_dir=str(tmp_path / "a"), pairing="inter-subject")
    assert not np.array_equal(other.load_pair(other.all_ids()[0]).fixed, a.load_pair(a.all_ids()[0]).fixed)


def test_anatomies_differ_more_than_deformation_pairs(tmp_path):
    inter = _dataset(tmp_path, "c", pairing="inter-subject")
    deform = _dataset(tmp_path, "c")
    d_inter = np.mean([_initial_dice(inter.load_pair(p)) for p in inter.all_ids()])
    d_deform = np.mean([_initial_dice(deform.load_pair(p)) for p in deform.all_ids()])
    assert d_inter < d_deform - 0.03, (d_inter, d_deform)


def test_loads_through_the_cli_and_is_scored_without_truth(tmp_path):
    from hypermorph_spatially_adaptive import tables

    p = argparse.ArgumentParser()
    datasets.add_dataset_args(p)
    args = p.parse_args(["--pairing", "inter-subject", "--image-size", "32", "32", "--num-pairs", "4",
                         "--cache-dir", str(tmp_path / "d")])
    ds = datasets.dataset_from_args(args)
    assert ds.pairing == "inter-subject"
    opts = datasets.dataset_options(args)
    assert opts["pairing"] == "inter-subject" and "--pairing" in datasets.dataset_argv(opts)
    rebuilt = datasets.dataset_from_config(opts)
    pair = rebuilt.load_pair(rebuilt.split_ids("test")[0])
    datasets.validate_pair(pair, rebuilt)
    arrays = rebuilt.arrays("train")
    assert arrays["fixed"].shape[1:] == (32, 32, 1)
    row = tables.pair_metrics(pair, np.zeros((32, 32, 2), np.float32), 3, rebuilt.class_names)
    assert "dense_epe" not in row and np.isnan(row["tre"]) and 0 < row["mean_dice"] < 1
    default = datasets.dataset_options(p.parse_args(["--image-size", "32", "32"]))
    assert "pairing" not in default  # the demo's config and argv are unchanged


def test_bad_pairing_is_refused():
    with pytest.raises(ValueError, match="pairing must be one of"):
        datasets.get_dataset("synthetic", pairing="siblings")
