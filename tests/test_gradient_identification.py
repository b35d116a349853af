"""Gradient-based identification (docs/extensions.md "Gradient identification"): soft Dice objective, optimizer, CLI,
inference (the linear warp itself: tests/test_tf_ops.py)."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import eval_metrics
from hypermorph_spatially_adaptive import gradient_identification as gid
from hypermorph_spatially_adaptive import run_folder
from hypermorph_spatially_adaptive.tables import pair_metrics
from hypermorph_spatially_adaptive.forward import Registrar
from hypermorph_spatially_adaptive.tf_ops import soft_dice, warp_linear
from conftest import TINY_ARCH  # noqa: E402

ARCH = TINY_ARCH
CLASSES = ["lung", "bone", "liver"]


# ---------------------------------------------------------------- pieces without a network

def test_soft_dice_equals_hard_dice_on_binary_labels_with_identity_warp():
    rng = np.random.default_rng(2)
    fixed = rng.integers(0, 4, (2, 32, 32))
    moving = rng.integers(0, 4, (2, 32, 32))
    moving[1][moving[1] == 2] = 0       # class 2 only in fixed
    moving[1][moving[1] == 3] = 0
    fixed[1][fixed[1] == 3] = 0         # class 3 in neither image of pair 1
    warped = warp_linear(gid.tissue_onehot(moving, 3), tf.zeros((2, 32, 32, 2)), "cell").numpy()
    np.testing.assert_array_equal(warped, gid.tissue_onehot(moving, 3).numpy())
    soft = soft_dice(gid.tissue_onehot(fixed, 3), warped).numpy()
    for b in range(2):
        hard = eval_metrics.dice_per_class(fixed[b], moving[b], 3)
        ok = np.isfinite(hard)
        np.testing.assert_allclose(soft[b][ok], hard[ok], rtol=1e-5)
        assert soft[b][~ok].tolist() == [0.0] * int((~ok).sum())
    assert soft[1, 1] == 0.0 and soft[0].min() > 0.1
    # the objective averages over the classes present in fixed or moving: 1 - nanmean(hard Dice)
    fo, mo = gid.tissue_onehot(fixed, 3), gid.tissue_onehot(moving, 3)
    present = tf.cast(tf.reduce_sum(fo + mo, axis=[1, 2]) > 0, tf.float32)
    obj = gid.dice_objective(fo, mo, tf.zeros((2, 32, 32, 2)), present).numpy()
    expect = [1 - np.nanmean(eval_metrics.dice_per_class(fixed[b], moving[b], 3)) for b in range(2)]
    np.testing.assert_allclose(obj, expect, rtol=1e-5)


def test_logit_start_clips_and_defaults_to_center():
    z = gid.logit_start(None, 2, 3)
    np.testing.assert_allclose(z, 0.0)
    z = gid.logit_start([0.0, 1.0, 0.25], 2, 3)
    np.testing.assert_allclose(1 / (1 + np.exp(-z[1])), [1e-3, 1 - 1e-3, 0.25], rtol=1e-9)
    with pytest.raises(ValueError, match="expected"):
        gid.logit_start(np.zeros((3, 3)), 2, 3)


# ---------------------------------------------------------------- tiny trained models

@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A global and an SA elastic model, 32 x 32, trained for a few steps on 10 synthetic pairs."""
    from hypermorph_spatially_adaptive.trainer import main as train_main

    root = tmp_path_factory.mktemp("gid")
    data = ["--dataset", "synthetic", "--image-size", "32", "32", "--num-pairs", "10",
            "--cache-dir", str(root / "cache")]
    runs = {}
    for preset in ("elastic_global", "elastic_sa"):
        runs[preset] = str(root / preset)
        train_main(preset, data + ARCH + ["--out", runs[preset], "--steps", "12", "--lr", "1e-3",
                                          "--val-every", "0", "--log-every", "6"])
    return root, runs


@pytest.fixture(scope="module")
def tiny(tiny_runs):
    from hypermorph_spatially_adaptive.artifacts import load_dataset

    root, runs = tiny_runs
    sa, cfg = run_folder.load_run(runs["elastic_sa"])
    g, _ = run_folder.load_run(runs["elastic_global"])
    ds = load_dataset(cfg)
    pairs = [ds.load_pair(p) for p in ds.split_ids("train")[:2]]
    return {"sa": sa, "g": g, "pairs": pairs, "root": root, "runs": runs, "dataset": ds}


def _stack(pairs, key):
    return np.stack([getattr(p, key) for p in pairs])


def test_dice_objective_gradient_wrt_sa_hyperparameters_is_finite_and_nonzero(tiny):
    pairs = tiny["pairs"][:1]
    fo = gid.tissue_onehot(_stack(pairs, "fixed_seg"), 3)
    mo = gid.tissue_onehot(_stack(pairs, "moving_seg"), 3)
    h = tf.Variable(np.full((1, 8), 0.5, np.float32))
    with tf.GradientTape() as tape:
        _, disp, _ = tiny["sa"]([_stack(pairs, "moving"), _stack(pairs, "fixed"), h], training=False)
        obj = gid.dice_objective(fo, mo, disp, tf.ones((1, 3)))
    g = tape.gradient(obj, h).numpy()
    assert np.all(np.isfinite(g))
    assert np.abs(g).max() > 1e-6, g
    assert np.count_nonzero(np.abs(g) > 1e-9) >= 4  # several classes' parameters move the overlap


def test_identification_keeps_best_iterate_in_unit_box(tiny):
    pairs = tiny["pairs"]
    args = [tiny["sa"], _stack(pairs, "moving"), _stack(pairs, "fixed"), _stack(pairs, "fixed_seg"),
            _stack(pairs, "moving_seg")]
    h0 = np.array([[0.0, 0.3, 0.9, 1.0, 0.5, 0.5, 0.2, 0.7]] * 2)
    res = gid.identify_by_gradient(*args, h0=h0, steps=8, lr=0.3, patience=0, num_classes=3)
    assert res.h.shape == (2, 8) and np.all(res.h >= 0) and np.all(res.h <= 1)
    assert np.all(res.best <= res.start)
    for k in range(2):
        assert len(res.traces[k]) == 8 and res.traces[k][0] == res.start[k]
        assert res.best[k] == pytest.approx(res.traces[k].min())
    assert np.any(res.best < res.start - 1e-4), (res.start, res.best)  # it does optimize
    # the start is h0 clipped into [1e-3, 1 - 1e-3]: same objective as evaluating it directly
    fo, mo = gid.tissue_onehot(args[3], 3), gid.tissue_onehot(args[4], 3)
    present = tf.cast(tf.reduce_sum(fo + mo, axis=[1, 2]) > 0, tf.float32)

    def objective_at(h):
        _, disp, _ = tiny["sa"]([args[1], args[2], tf.constant(h, tf.float32)], training=False)
        return gid.dice_objective(fo, mo, disp, present).numpy()

    np.testing.assert_allclose(objective_at(np.clip(h0, 1e-3, 1 - 1e-3)), res.start, atol=2e-5)
    # the returned h is the iterate that scored `best` (not the one after its update)
    np.testing.assert_allclose(objective_at(res.h), res.best, atol=2e-5)
    # pairs in a batch do not influence each other: pair 1 alone ends at the same parameters
    alone = gid.identify_by_gradient(args[0], *[a[1:] for a in args[1:]], h0=h0[1:], steps=8, lr=0.3, patience=0,
                                     num_classes=3)
    np.testing.assert_allclose(alone.h[0], res.h[1], atol=1e-4)
    np.testing.assert_allclose(alone.traces[0], res.traces[1], atol=1e-5)


def test_early_stopping_on_plateau(tiny):
    pairs = tiny["pairs"][:1]
    # lr tiny -> no improvement beyond min_delta: stops after 1 + patience evaluations
    res = gid.identify_by_gradient(tiny["sa"], _stack(pairs, "moving"), _stack(pairs, "fixed"),
                                   _stack(pairs, "fixed_seg"), _stack(pairs, "moving_seg"),
                                   steps=30, lr=1e-7, patience=3, num_classes=3)
    assert res.steps.tolist() == [4] and res.batch_passes == 4


def test_epe_objective_matches_dense_epe_metric(tiny):
    pairs = tiny["pairs"][:1]
    p = pairs[0]
    res = gid.identify_by_gradient(tiny["sa"], _stack(pairs, "moving"), _stack(pairs, "fixed"),
                                   _stack(pairs, "fixed_seg"), None, steps=5, lr=0.2, patience=0,
                                   objective="epe", disp_true=p.extras["disp_true"][None], spacing=p.spacing)
    assert res.best[0] <= res.start[0] and np.all((res.h >= 0) & (res.h <= 1))
    _, disp = Registrar(tiny["sa"])(p.moving, p.fixed, np.full((1, 8), 0.5))
    assert res.start[0] == pytest.approx(pair_metrics(p, disp[0], 3, CLASSES)["dense_epe"], rel=1e-4)
    with pytest.raises(ValueError, match="true displacement"):
        gid.identify_by_gradient(tiny["sa"], _stack(pairs, "moving"), _stack(pairs, "fixed"),
                                 _stack(pairs, "fixed_seg"), None, steps=2, objective="epe")


def test_nan_objective_or_input_raises_clearly(tiny):
    pairs = tiny["pairs"][:1]
    truth = pairs[0].extras["disp_true"][None].copy()
    truth[0, 10, 10, 0] = np.nan  # inside the body -> the EPE objective is NaN
    assert pairs[0].fixed_seg[10, 10] > 0
    with pytest.raises(FloatingPointError, match="epe objective became non-finite at step 0"):
        gid.identify_by_gradient(tiny["sa"], _stack(pairs, "moving"), _stack(pairs, "fixed"),
                                 _stack(pairs, "fixed_seg"), None, steps=3, objective="epe", disp_true=truth)
    moving = _stack(pairs, "moving").copy()
    moving[0, 3, 3, 0] = np.nan
    with pytest.raises(ValueError, match="moving image has non-finite"):
        gid.identify_by_gradient(tiny["sa"], moving, _stack(pairs, "fixed"), _stack(pairs, "fixed_seg"),
                                 _stack(pairs, "moving_seg"), steps=3, num_classes=3)


def test_pairs_without_labels_or_truth_are_rejected(tiny):
    import dataclasses

    from parameter_identification import _check_gradient_pair

    p = tiny["pairs"][0]
    with pytest.raises(ValueError, match="no tissue labels"):
        _check_gradient_pair(dataclasses.replace(p, moving_seg=np.zeros_like(p.moving_seg)), "dice")
    with pytest.raises(ValueError, match="synthetic data only"):
        _check_gradient_pair(dataclasses.replace(p, extras={}), "epe")
    _check_gradient_pair(p, "epe")


# ---------------------------------------------------------------- CLI and inference

def test_cli_gradient_csv_is_read_by_inference(quick_run):
    """The gradient identification CLI's CSV and trace, and inference's '(gradient)' rows made from
    them: read from the session's --quick pipeline run (tests/conftest.py), which runs
    ``parameter_identification.py --method gradient --sa-run ... --init center`` and hands its folder
    to ``inference.py`` (a second CLI run and inference here would only repeat that)."""
    import run_pipeline
    from hypermorph_spatially_adaptive.artifacts import load_dataset, read_config

    out = quick_run / "identification_gradient" / "elastic"
    choice = pd.read_csv(out / "identified_parameters.csv", dtype={"pair_id": str})
    meta = json.loads((out / "identification.json").read_text())
    steps = run_pipeline.QUICK["gradient_steps"]
    assert meta["method"] == "gradient" and meta["objective"] == "dice" and meta["steps"] == steps
    test_ids = load_dataset(read_config(str(quick_run / "runs" / "elastic_sa"))).split_ids("test")
    assert list(choice["pair_id"]) == test_ids
    sa_cols = [f"{f}_{c}" for f in ("lambda", "mu") for c in ["background"] + CLASSES]
    expected = ["pair_id", "regularizer", *sa_cols, *[f"dice_{c}" for c in CLASSES], "mean_dice", "g_lambda",
                "g_mu", "g_mean_dice", "fallback"]
    assert list(choice.columns[:len(expected)]) == expected
    assert ((choice[sa_cols + ["g_lambda", "g_mu"]] >= 0) & (choice[sa_cols + ["g_lambda", "g_mu"]] <= 1)).all().all()
    assert (choice["objective"] <= choice["start_objective"]).all()
    assert (choice["g_objective"] <= choice["g_start_objective"]).all()
    trace = pd.read_csv(out / "objective_trace.csv", dtype={"pair_id": str})
    assert set(trace["model"]) == {"sa", "g"} and trace["step"].max() <= steps - 1
    first = trace[(trace.step == 0) & (trace.model == "sa")].set_index("pair_id")["objective"]
    np.testing.assert_allclose(first.loc[choice.pair_id].to_numpy(), choice["start_objective"].to_numpy())

    per_pair = pd.read_csv(quick_run / "results" / "per_pair_metrics.csv", dtype={"pair_id": str})
    # inference names the rows of a gradient identification "<reg>-sas (gradient)" / "<reg>-g (gradient)"
    sas = per_pair[per_pair.method == "elas-sas (gradient)"].set_index("pair_id")
    g = per_pair[per_pair.method == "elas-g (gradient)"].set_index("pair_id")
    assert len(sas) == len(g) == len(choice), sorted(set(per_pair.method))
    for _, row in choice.iterrows():
        used = json.loads(sas.loc[row.pair_id, "params"])
        for c in sa_cols:
            assert used[c] == pytest.approx(row[c], abs=1e-4)
        # the CSV's Dice is the hard Dice of exactly this registration
        assert sas.loc[row.pair_id, "mean_dice"] == pytest.approx(row["mean_dice"], abs=1e-6)
        assert g.loc[row.pair_id, "mean_dice"] == pytest.approx(row["g_mean_dice"], abs=1e-6)


def test_cli_bad_input_stops_clearly_and_writes_nothing(tiny, tmp_path):
    import parameter_identification

    runs = tiny["runs"]
    out = tmp_path / "x"
    with pytest.raises(ValueError, match="spatially adaptive"):
        parameter_identification.main(["--run", runs["elastic_global"], "--method", "gradient", "--sa-run",
                                       runs["elastic_global"], "--out", str(out), "--steps", "2"])
    with pytest.raises(ValueError, match="--sa-run"):
        parameter_identification.main(["--run", runs["elastic_global"], "--method", "gradient",
                                       "--out", str(out), "--steps", "2"])
    assert not out.exists()


# ---------------------------------------------------------------- population protocol (CSAIN paper)

def test_population_of_one_repeated_pair_follows_the_per_pair_optimizer(tiny):
    """The mean objective over k copies of one pair is that pair's objective: the shared Adam
    walks the same path as the per-pair one (float32 TF vs float64 NumPy Adam: close, not equal)."""
    p = tiny["pairs"][0]
    per_pair = gid.identify_by_gradient(tiny["sa"], p.moving[None], p.fixed[None], p.fixed_seg[None],
                                        p.moving_seg[None], steps=4, lr=0.3, patience=0, num_classes=3)
    pop = gid.identify_population(tiny["sa"], [p, p, p], steps=4, lr=0.3, patience=0, num_classes=3, batch_size=2)
    assert pop.h.shape == (1, 8) and pop.batch_passes == 8  # 2 chunks x 4 steps
    np.testing.assert_allclose(pop.traces[0], per_pair.traces[0], atol=2e-4)
    np.testing.assert_allclose(pop.h, per_pair.h, atol=2e-3)


def test_population_minimizes_the_mean_objective_and_keeps_its_best_iterate(tiny):
    pairs = tiny["pairs"]
    pop = gid.identify_population(tiny["sa"], pairs, steps=8, lr=0.3, patience=0, num_classes=3)
    assert pop.best[0] < pop.start[0] - 1e-4 and pop.best[0] == pytest.approx(pop.traces[0].min())
    # `best` is the mean over the pairs of each pair's objective at the returned setting
    each = gid.identify_by_gradient(tiny["sa"], _stack(pairs, "moving"), _stack(pairs, "fixed"),
                                    _stack(pairs, "fixed_seg"), _stack(pairs, "moving_seg"), h0=pop.h[0], steps=1,
                                    num_classes=3)
    assert each.start.mean() == pytest.approx(pop.best[0], abs=1e-4)


def test_cli_population_gradient_reads_no_test_label(tiny, tmp_path, monkeypatch):
    """One setting from the validation pairs, identical for every test pair; no test pair is even
    loaded (loading one raises here)."""
    import parameter_identification
    from hypermorph_spatially_adaptive import artifacts as art

    test_ids = set(tiny["dataset"].split_ids("test"))
    real_load = art.load_dataset

    def no_test_pairs(*a, **k):
        ds = real_load(*a, **k)
        load = ds.load_pair

        def load_pair(pid):
            if pid in test_ids:
                raise AssertionError(f"the population protocol loaded test pair {pid}")
            return load(pid)
        ds.load_pair = load_pair
        return ds

    monkeypatch.setattr(art, "load_dataset", no_test_pairs)
    out = parameter_identification.main(["--run", tiny["runs"]["elastic_global"], "--method", "gradient", "--sa-run",
                                         tiny["runs"]["elastic_sa"], "--protocol", "population", "--steps", "2",
                                         "--lr", "0.2", "--no-figure", "--out", str(tmp_path / "a")])
    choice = pd.read_csv(os.path.join(out, "identified_parameters.csv"), dtype={"pair_id": str})
    meta = json.loads(open(os.path.join(out, "identification.json")).read())
    assert meta["protocol"] == "population" and meta["identified_on"] == "val"
    assert list(choice.pair_id) == tiny["dataset"].split_ids("test")
    params = [c for c in choice.columns if c.startswith(("lambda_", "mu_", "g_lambda", "g_mu"))]
    assert (choice[params].nunique() == 1).all()
    assert (choice["objective"] <= choice["start_objective"]).all()
