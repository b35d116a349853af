"""The 3D path (issue 23): the elastic models through all three stages on a tiny 3D synthetic case,
the whole pipeline on it and the Learn2Reg Lung CT loader through all three stages on a fake tree,
a known 3D translation recovered by refinement (warp convention ``warped(x) = moving(x + u(x))``),
and the chunked grid search that keeps 3D identification within memory.

Budget: the elastic chain (two trainings, one grid identification, inference with refinement and a
panel) and the unit checks run in ``make test``; the two whole pipelines (4 trainings, 4 grid
identifications each) are marked ``slow`` (``make test PYTEST_ARGS='-m slow'``); the 2D ``--quick``
pipeline of tests/conftest.py covers the pipeline's own hand-overs in ``make test``. Sizes are the
smallest that still mean something: 32^3 (at 16^3 the synthetic motion leaves the label maps
unchanged, initial Dice 1.0, so Table 1 would be all ties), 3 training steps, a 2 x 2 grid, 3
refinement steps, tiny networks. The numbers of the models are not checked (they are not trained);
shapes, hand-over files and conventions are.
"""
import json
import warnings
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi

from hypermorph_spatially_adaptive import artifacts as art
from hypermorph_spatially_adaptive.configs import LossConfig, RefineConfig

SIZE = (32, 32, 32)
# tiny networks (one scaling-and-squaring step: the integration stays in every traced graph at a
# fraction of its tracing time), and no validation pass (run_pipeline's --val-every is overridden: a last option wins)
TRAIN_ARGS = ("--enc-features 4 8 8 8 --dec-features 8 8 8 8 8 4 4 --hyp-units 8 --hyp-layers 1 "
              "--int-steps 1 --val-every 0")
PRESETS = ["elastic_global", "elastic_sa", "diffusion_global", "diffusion_sa"]


def _pipeline_argv(out, *data_args, steps=3, refine=3, panels=1):
    return [*data_args, "--out", str(out), "--steps", str(steps), "--grid-steps", "2", "--refine", str(refine),
            "--gradient-steps", "0", "--panels", str(panels), "--train-args", TRAIN_ARGS,
            "--jobs", "1"]  # in process: no child imports TensorFlow again (pytest-xdist uses the other cores)


def _check_handovers(out, shape, n_test, panels=1):
    """Every file a stage hands to the next exists, with the 3D shapes."""
    for p in PRESETS:
        cfg = art.read_config(str(out / "runs" / p))
        assert cfg.get("finished") and (out / "runs" / p / art.WEIGHTS).stat().st_size > 0, p
        assert list(cfg["model"]["image_shape"]) == list(shape), p
    for reg in ("elastic", "diffusion"):
        for folder in ("identification", "identification_population"):
            d = out / folder / reg
            ident = pd.read_csv(d / "identified_parameters.csv", dtype={"pair_id": str})
            assert len(ident) == n_test and json.loads((d / "identification.json").read_text())
            grid = pd.read_csv(d / "grid_dice.csv", dtype={"pair_id": str})
            assert len(grid) == (4 if reg == "elastic" else 2) * grid["pair_id"].nunique()
            assert grid["mean_dice"].between(0, 1).all()
    res = out / "results"
    for f in ("table1.csv", "table1.md", "per_pair_metrics.csv", "inference.json", "dice_boxplots.png"):
        assert (res / f).stat().st_size > 0, f
    assert len(list(res.glob("fig3_*.png"))) == 2 * panels  # {elastic, diffusion} per pair, drawn as slices
    per_pair = pd.read_csv(res / "per_pair_metrics.csv", dtype={"pair_id": str})
    assert per_pair["pair_id"].nunique() == n_test
    return per_pair


def _check_initial_pair(out, per_pair):
    """The synthetic 3D test pair really moves (not the 16^3 degenerate case), and its initial TRE
    equals an independent computation from the 3D keypoints: mean ||p_F - p_M|| (spacing 1 mm)."""
    import datasets

    initial = per_pair[per_pair["method"] == "initial"].iloc[0]
    assert 0.3 < initial["mean_dice"] < 0.99
    ds = datasets.get_dataset("synthetic", None, ndim=3, image_size=list(SIZE), num_pairs=6,
                              cache_dir=str(out / "cache"))
    pair = ds.load_pair(initial["pair_id"])
    assert pair.fixed_kp.shape[1] == 3
    expected = np.linalg.norm(pair.fixed_kp - pair.moving_kp, axis=1).mean()
    assert initial["tre"] == pytest.approx(expected, rel=1e-4) and expected > 0.1


@pytest.fixture(scope="module")
def synthetic_3d(tmp_path_factory):
    import run_pipeline

    out = tmp_path_factory.mktemp("p3d")
    run_pipeline.main(_pipeline_argv(out, "--dataset", "synthetic", "--ndim", "3", "--image-size", *map(str, SIZE),
                                     "--num-pairs", "6", "--cache-dir", str(out / "cache")))
    return out


@pytest.fixture(scope="module")
def elastic_3d(tmp_path_factory):
    """The elastic models (3 steps) of the 3D synthetic case, their oracle grid identification and
    inference with refinement and one panel, stage by stage (the scripts' ``main``)."""
    import inference
    import parameter_identification
    from hypermorph_spatially_adaptive.trainer import main as train_main

    out = tmp_path_factory.mktemp("e3d")
    data = ["--dataset", "synthetic", "--ndim", "3", "--image-size", *map(str, SIZE), "--num-pairs", "6",
            "--cache-dir", str(out / "cache")]
    for preset in ("elastic_global", "elastic_sa"):
        train_main(preset, data + TRAIN_ARGS.split() + ["--out", str(out / "runs" / preset), "--steps", "3",
                                                        "--log-every", "1"])
    ident = str(out / "identification" / "elastic")
    parameter_identification.main(["--run", str(out / "runs" / "elastic_global"), "--grid-steps", "2", "--out", ident,
                                   "--no-figure"])
    inference.main(["--out", str(out / "results"), "--elastic-sa", str(out / "runs" / "elastic_sa"),
                    "--elastic-ident", ident, "--refine", "3", "--panels", "1", "--bootstrap", "100"])
    return out


def test_3d_elastic_chain_hands_over_every_file(elastic_3d):
    for p in ("elastic_global", "elastic_sa"):
        cfg = art.read_config(str(elastic_3d / "runs" / p))
        assert cfg.get("finished") and list(cfg["model"]["image_shape"]) == list(SIZE), p
    d = elastic_3d / "identification" / "elastic"
    ident = pd.read_csv(d / "identified_parameters.csv", dtype={"pair_id": str})
    grid = pd.read_csv(d / "grid_dice.csv", dtype={"pair_id": str})
    assert len(ident) == 1 and len(grid) == 4 * grid["pair_id"].nunique() and grid["mean_dice"].between(0, 1).all()
    res = elastic_3d / "results"
    for f in ("table1.csv", "per_pair_metrics.csv", "inference.json"):
        assert (res / f).stat().st_size > 0, f
    assert len(list(res.glob("fig3_*.png"))) == 1  # elastic only, one pair, drawn as slices
    t1 = pd.read_csv(res / "table1.csv")
    rows = t1.set_index(t1["method"] + "/" + t1["protocol"].fillna(""))
    for col in ("mean_dice_mean", "hd95_mean", "tre_mean", "dense_epe_mean", "percent_neg_jac_mean", "sdlogj_mean"):
        assert np.isfinite(rows.loc["elas-sas+io/oracle", col]), col  # 3D keypoints, true field, Jacobian
    per_pair = pd.read_csv(res / "per_pair_metrics.csv", dtype={"pair_id": str})
    _check_initial_pair(elastic_3d, per_pair)


@pytest.mark.slow  # the whole pipeline (4 trainings, 4 grid identifications); make test PYTEST_ARGS='-m slow'
def test_3d_pipeline_hands_over_every_file(synthetic_3d):
    per_pair = _check_handovers(synthetic_3d, SIZE, n_test=1)
    t1 = pd.read_csv(synthetic_3d / "results" / "table1.csv")
    # TRE from 3D keypoints, dense EPE from the true 3D field, Jacobian statistics in 3D
    for col in ("mean_dice_mean", "hd95_mean", "tre_mean", "dense_epe_mean"):
        assert np.isfinite(t1[col].to_numpy(float)).all(), col
    rows = t1.set_index(t1["method"] + "/" + t1["protocol"].fillna(""))
    assert np.isfinite(rows.loc["elas-sas+io/oracle", "percent_neg_jac_mean"])
    assert np.isfinite(rows.loc["elas-sas+io/oracle", "sdlogj_mean"])
    _check_initial_pair(synthetic_3d, per_pair)


# --------------------------------------------------------- Learn2Reg Lung CT, fake tree

@pytest.fixture(scope="module")
def l2r_3d(tmp_path_factory):
    """Fake LungCT tree (4 cases of 28 x 34 x 30 voxels, resampled to 2 mm: 21 x 21 x 26, padded
    to the test size as the loader does to 192 x 128 x 192; ``--split-scheme ordered``) through the pipeline: 1 training step per preset,
    grid identification in both protocols, inference without refinement or panels (the synthetic
    case covers those)."""
    import run_pipeline
    from datasets.learn2reg import L2RLungDataset
    from test_datasets import make_l2r_tree

    root = tmp_path_factory.mktemp("l2r3d")
    data, labels, _ = make_l2r_tree(root, "LungCT", n=4, shape=(28, 34, 30), zooms=(1.5, 1.25, 1.75),
                                    n_kp=6, kp_margin=(3, 5, 3))
    mp = pytest.MonkeyPatch()
    mp.setattr(L2RLungDataset, "pad_shape", SIZE)  # the loader's padding, at a test size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the centre-crop warning of axis 1
            run_pipeline.main(_pipeline_argv(root / "out", "--dataset", "l2r-lung", "--data-dir", str(data),
                                             "--label-dir", str(labels), "--split-scheme", "ordered",
                                             steps=1, refine=0,
                                             panels=0))
    finally:
        mp.undo()
    return root / "out"


@pytest.mark.slow  # a second full pipeline (4 trainings); make test PYTEST_ARGS='-m slow' runs it
def test_l2r_lung_3d_through_all_three_stages(l2r_3d):
    per_pair = _check_handovers(l2r_3d, SIZE, n_test=1, panels=0)
    assert set(per_pair["pair_id"]) == {"LungCT_0004"}
    cfg = art.read_config(str(l2r_3d / "runs" / "elastic_sa"))
    assert list(cfg["loss"]["spacing"]) == [2.0, 2.0, 2.0]  # resampled to 2 mm (authors' code)
    assert cfg["data"]["split_scheme"] == "ordered" and cfg["data"]["target_spacing"] == 2.0
    initial = per_pair[per_pair["method"] == "initial"].iloc[0]
    assert np.isfinite(initial["tre"])  # keypoints read, shifted by the padding, in mm


# --------------------------------------------------------- conventions in 3D

def _shifted_pair(shape, shift, seed=0):
    """``moving(y) = fixed(y - shift)``, from one smooth volume (cubic resampling)."""
    rng = np.random.default_rng(seed)
    pad = 6
    big = ndi.gaussian_filter(rng.standard_normal([s + 2 * pad for s in shape]), 2.5)
    big = (big - big.min()) / (big.max() - big.min())
    fixed = big[tuple(slice(pad, -pad) for _ in shape)]
    coords = np.indices(shape).astype(np.float64) + pad - np.asarray(shift).reshape(-1, *[1] * len(shape))
    moving = ndi.map_coordinates(big, coords, order=3)
    return moving[None, ..., None].astype(np.float32), fixed[None, ..., None].astype(np.float32)


def test_refinement_recovers_a_3d_translation():
    """warped(x) = moving(x + u(x)) = fixed(x) for moving(y) = fixed(y - s) needs u = +s, channel j
    along array axis j."""
    from hypermorph_spatially_adaptive.params import ParamSpec
    from hypermorph_spatially_adaptive.refinement import Refiner

    shift = np.array([1.5, -1.0, 0.5])
    shape = (20, 20, 20)
    moving, fixed = _shifted_pair(shape, shift)
    r = Refiner(ParamSpec("diffusion", False, 1), LossConfig(ncc_win=5, spacing=(1.0, 1.0, 1.0)),
                replace(RefineConfig.original(), smooth=2))
    u, before, after = r(moving, fixed, np.zeros((1, *shape, 3), np.float32), np.array([[0.3]], np.float32),
                         steps=60, lr=0.2)
    inner = u[0, 5:-5, 5:-5, 5:-5].reshape(-1, 3)
    np.testing.assert_allclose(inner.mean(axis=0), shift, atol=0.1)
    assert after[0] < before[0]


# --------------------------------------------------------- grid search within memory

class _FakeRegistrar:
    """Stands in for :class:`Registrar`: displacement = a constant shift of hyp[0] * 4 voxels along
    axis 0, reported chunk by chunk; records the chunk sizes."""

    def __init__(self, shape, batch_size):
        self.shape, self.batch_size, self.sizes = shape, batch_size, []

    def chunks(self, moving, fixed, hyp):
        for i in range(0, len(hyp), self.batch_size):
            h = hyp[i:i + self.batch_size]
            disp = np.zeros((len(h), *self.shape, len(self.shape)), np.float32)
            disp[..., 0] = 4.0 * h[:, 0].reshape(-1, *[1] * len(self.shape))
            self.sizes.append(len(h))
            yield i, None, disp


def test_grid_dice_runs_chunk_by_chunk_and_matches_per_point_dice():
    import types

    import eval_metrics
    from hypermorph_spatially_adaptive import grid_identification as ident

    shape = (12, 10, 8)
    fixed_seg = np.zeros(shape, np.int32)
    fixed_seg[3:9, 2:8, 2:6] = 1
    fixed_seg[1:3, :, :] = 2
    moving_seg = np.roll(fixed_seg, 1, axis=0)  # the best grid point has u = +1 along axis 0
    pair = types.SimpleNamespace(pair_id="p", moving=None, fixed=None, moving_seg=moving_seg, fixed_seg=fixed_seg)
    grid = ident.make_grid("diffusion", [0.0, 0.25, 0.5, 0.75, 1.0])
    fake = _FakeRegistrar(shape, batch_size=2)
    df = ident.grid_dice(fake, pair, grid, ["a", "b"])
    assert fake.sizes == [2, 2, 1]
    for g, h in enumerate(grid[:, 0]):
        disp = np.zeros((*shape, 3), np.float32)
        disp[..., 0] = 4.0 * h
        expected = eval_metrics.dice_per_class(fixed_seg, eval_metrics.warp_labels(moving_seg, disp), 2)
        np.testing.assert_allclose(df.loc[g, ["dice_a", "dice_b"]].to_numpy(float), expected)
    assert df["mean_dice"].idxmax() == 1 and df.loc[1, "mean_dice"] == pytest.approx(1.0)


def test_registrar_chunks_equal_the_whole_call():
    """Registrar.chunks yields the rows of __call__ in order, ``batch_size`` at a time (3D model)."""
    import tensorflow as tf

    from hypermorph_spatially_adaptive.forward import Registrar

    shape = (8, 8, 8)
    mov = tf.keras.Input((*shape, 1))
    fix = tf.keras.Input((*shape, 1))
    hyp = tf.keras.Input((2,))
    scale = tf.keras.layers.Dense(3, use_bias=False, kernel_initializer="ones")(hyp)
    disp = tf.keras.layers.Lambda(lambda t: t[1][:, None, None, None, :] * tf.ones_like(t[0][..., :1]))([mov, scale])
    model = tf.keras.Model([mov, fix, hyp], [mov, disp, disp])  # (warped, disp, svf) as HyperMorph
    rng = np.random.default_rng(0)
    m, f = rng.random((*shape, 1), np.float32), rng.random((*shape, 1), np.float32)
    h = rng.random((5, 2)).astype(np.float32)
    reg = Registrar(model, batch_size=2)
    whole = reg(m, f, h)[1]
    starts, parts = zip(*[(s, d) for s, _, d in reg.chunks(m, f, h)])
    assert starts == (0, 2, 4) and [len(p) for p in parts] == [2, 2, 1]
    np.testing.assert_allclose(np.concatenate(parts), whole)
    np.testing.assert_allclose(whole[:, 0, 0, 0], np.repeat(h.sum(1, keepdims=True), 3, axis=1), rtol=1e-6)


def test_refinement_in_pair_chunks_equals_one_batch():
    """Refiner(pair_batch=k) refines k pairs at a time (3D memory independent of the number of
    test pairs); pairs do not interact, so the result equals the one-batch refinement."""
    from hypermorph_spatially_adaptive.params import ParamSpec
    from hypermorph_spatially_adaptive.refinement import PAIR_VOXEL_BUDGET, Refiner
    from hypermorph_spatially_adaptive.forward import auto_batch_size

    shape = (12, 12, 8)
    rng = np.random.default_rng(1)
    pairs = [_shifted_pair(shape, s, seed=k) for k, s in enumerate([(1.0, 0.5, 0.0), (-0.5, 1.0, 0.5), (0.5, 0, -1)])]
    moving, fixed = (np.concatenate(a) for a in zip(*pairs))
    seg = rng.integers(0, 4, (3, *shape)).astype(np.int32)
    hyp = rng.random((3, 8)).astype(np.float32)
    u0 = rng.normal(0, 0.2, (3, *shape, 3)).astype(np.float32)
    spec = ParamSpec("elastic", True, 3)
    loss = LossConfig(ncc_win=5, spacing=(1.0, 1.5, 2.0))
    opts = replace(RefineConfig.original(), fold_weight=100.0, logj_weight=1.0, smooth=1, grid=2)
    whole = Refiner(spec, loss, opts)(moving, fixed, u0, hyp, seg, steps=4, lr=0.1)
    chunked = Refiner(spec, loss, opts, pair_batch=2)(moving, fixed, u0, hyp, seg, steps=4, lr=0.1)
    # float32 sums over another batch size round differently (seen once under load: 6e-6 after 4 Adam
    # steps); an interaction between pairs would differ by the size of the steps (>= 1e-3, below)
    for a, b in zip(whole, chunked):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5)
    assert np.abs(whole[0] - u0).max() > 1e-3  # the steps did move the field
    assert auto_batch_size((192, 128, 192), 4, PAIR_VOXEL_BUDGET) == 1  # paper size: one pair per chunk
    assert auto_batch_size((64, 64), 9, PAIR_VOXEL_BUDGET) == 9  # the 2D demo's test split: one batch
    with pytest.raises(ValueError, match="pair_batch"):
        Refiner(spec, pair_batch=0)
