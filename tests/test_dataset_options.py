"""Each dataset declares its options once (``OPTIONS``); the CLI, config.json["data"] and the
pipeline's argv are all derived from that declaration and agree with each other."""
import argparse
import os

import pytest

import datasets as D
from datasets.cli import _REGISTRY


def parser():
    p = argparse.ArgumentParser()
    D.add_dataset_args(p)
    return p


def test_every_declared_option_is_on_the_command_line_and_accepted():
    dests = {a.dest for a in parser()._actions}
    for name, cls in _REGISTRY.items():
        assert cls.OPTIONS, name
        for opt in cls.OPTIONS:
            assert opt.key in dests, (name, opt.key)
            prefix = "--no-" if opt.action == "store_false" else "--"
            assert opt.flag == prefix + opt.key.replace("_", "-")


@pytest.mark.parametrize("argv", [
    [],
    ["--cache-dir", "c", "--image-size", "32", "32", "--num-pairs", "12", "--motion", "stress"],
    ["--dataset", "nlst", "--data-dir", "d", "--label-dir", "l", "--ndim", "3", "--slice-axis", "0"],
    ["--dataset", "nlst", "--data-dir", "d", "--label-dir", "l", "--split-scheme", "ordered", "--no-body-mask"],
    ["--dataset", "l2r-lung", "--data-dir", "d", "--label-dir", "l", "--target-spacing", "1.5"],
    ["--dataset", "acdc", "--data-dir", "d", "--target-spacing", "1.5", "--crop-size", "96", "112"],
    ["--dataset", "acdc", "--data-dir", "d", "--split-scheme", "paper-text"],
    ["--dataset", "folder", "--pairs-csv", "p.csv", "--clip-percentiles", "1", "99", "--class-names", "a,b",
     "--num-classes", "2", "--slice-axis", "1"],
])
def test_argv_and_config_round_trip(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = parser().parse_args(argv)
    opts = D.dataset_options(args)
    again = parser().parse_args(D.dataset_argv(args))
    assert D.dataset_options(again) == opts
    # the argv of a saved config["data"] rebuilds the same options too
    assert D.dataset_options(parser().parse_args(D.dataset_argv(opts))) == opts
    cls = D.dataset_class(opts["name"])
    assert set(opts) <= {"name", "data_dir"} | {o.key for o in cls.OPTIONS}


def test_crop_size_reaches_config_and_argv():
    args = parser().parse_args(["--dataset", "acdc", "--data-dir", "d", "--crop-size", "96", "112"])
    assert D.dataset_options(args)["crop_size"] == [96, 112]
    assert D.dataset_argv(args)[-3:] == ["--crop-size", "96", "112"]


def test_synthetic_argv_unchanged_for_the_demo():
    """run_pipeline.py decides "same command, reuse the run" by comparing this argv."""
    p = parser()
    p.set_defaults(num_pairs=60)
    args = p.parse_args(["--cache-dir", os.path.join(".cache", "synthetic")])
    assert D.dataset_argv(args) == ["--dataset", "synthetic", "--num-pairs", "60", "--data-seed", "0",
                                    "--motion", "0.05", "--cache-dir", os.path.join(".cache", "synthetic")]


def test_old_config_data_still_loads(tmp_path):
    """config.json["data"] as written before the options were declared per dataset."""
    old = {"name": "synthetic", "data_dir": None, "ndim": 2, "image_size": [16, 16], "num_pairs": 5,
           "data_seed": 3, "motion": 0.05, "cache_dir": str(tmp_path)}
    ds = D.dataset_from_config(old)
    assert isinstance(ds, D.SyntheticDataset) and ds.image_shape == (16, 16) and ds.data_seed == 3
    moved = D.dataset_from_config(old, data_dir=str(tmp_path / "x"))
    assert moved.cache_dir == str(tmp_path)  # an explicit cache_dir wins over data_dir, as before
    with pytest.raises(ValueError, match="does not take"):
        D.dataset_from_config({**old, "pairs_csv": "x.csv"})


@pytest.mark.parametrize("name,expected", [
    ("nlst", {"split_scheme": "authors", "body_mask": True}),
    ("acdc", {"split_scheme": "authors", "target_spacing": 1.8}),
    ("l2r-lung", {"split_scheme": "authors", "target_spacing": 2.0}),
])
def test_paper_dataset_defaults_are_recorded(name, expected):
    """The split scheme (and resampling / body mask) is written into config.json["data"] even when
    not given, so runs trained on different splits have different data entries (refused later)."""
    opts = D.dataset_options(parser().parse_args(["--dataset", name, "--data-dir", "d"]))
    assert {k: opts[k] for k in expected} == expected
    other = D.dataset_options(parser().parse_args(["--dataset", name, "--data-dir", "d", "--split-scheme", "ordered"]))
    assert other != opts and other["split_scheme"] == "ordered"
    if name == "nlst":
        off = D.dataset_options(parser().parse_args(["--dataset", name, "--data-dir", "d", "--no-body-mask"]))
        assert off["body_mask"] is False and D.dataset_argv(off)[-1] == "--no-body-mask"
