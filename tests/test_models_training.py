"""Models, losses and the shared trainer: shapes, save/load, SA == global, training, resume,
mirrored strategy."""
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from hypermorph_spatially_adaptive import artifacts as art
from hypermorph_spatially_adaptive import losses, run_folder
from hypermorph_spatially_adaptive.configs import LossConfig
from hypermorph_spatially_adaptive.models import ModelConfig, build_model
from hypermorph_spatially_adaptive.params import ParamSpec, parameter_maps, regularization_parameters
from hypermorph_spatially_adaptive.trainer import main as train_main, sample_hyperparameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(enc_features=(8, 16, 16, 16), dec_features=(16, 16, 16, 16, 16, 8, 8), hyp_layers=2, hyp_units=16)
SMALL_ARGV = ["--enc-features", "8", "16", "16", "16", "--dec-features", "16", "16", "16", "16", "16", "8", "8",
              "--hyp-layers", "2", "--hyp-units", "16"]


def _data_argv(tmp_path, size=32, pairs=10):
    return ["--dataset", "synthetic", "--image-size", str(size), str(size), "--num-pairs", str(pairs),
            "--cache-dir", str(tmp_path / "cache")]


@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 16)])
@pytest.mark.parametrize("reg,sa,nparams", [("elastic", True, 8), ("elastic", False, 2),
                                            ("diffusion", True, 4), ("diffusion", False, 1)])
def test_build_shapes(shape, reg, sa, nparams):
    # int_steps=1: the integration and its rescale are in the graph, at a fraction of 7 steps' build time
    cfg = ModelConfig(image_shape=shape, regularizer=reg, spatially_adaptive=sa, num_classes=3, int_steps=1, **SMALL)
    assert cfg.spec.num_params == nparams
    model = build_model(cfg)
    x = np.random.default_rng(0).random((2, *shape, 1)).astype(np.float32)
    warped, disp, svf = model([x, x[::-1], np.full((2, nparams), 0.5, np.float32)])
    assert warped.shape == (2, *shape, 1)
    assert disp.shape == svf.shape == (2, *shape, len(shape))


def test_disp_is_the_integrated_field_not_the_svf():
    """warped == moving warped by the returned disp (so disp is what moved the image)."""
    import eval_metrics

    shape = (32, 32)
    cfg = ModelConfig(image_shape=shape, regularizer="elastic", spatially_adaptive=False, num_classes=3, **SMALL)
    model = build_model(cfg)
    # make the flow layer produce a sizeable, smooth SVF
    flow = [layer for layer in model.layers if layer.name.endswith("_flow")][0]
    k, b = flow.get_weights()
    flow.set_weights([k * 2e4, b + 0.8])
    rng = np.random.default_rng(1)
    from scipy.ndimage import gaussian_filter
    mov = gaussian_filter(rng.random(shape), 2)[None, ..., None].astype(np.float32)
    warped, disp, svf = [t.numpy() for t in model([mov, mov, np.array([[0.3, 0.3]], np.float32)])]
    assert np.abs(disp).max() > 0.5
    ours = eval_metrics.warp_image(mov[0, ..., 0], disp[0])
    np.testing.assert_allclose(warped[0, 2:-2, 2:-2, 0], ours[2:-2, 2:-2], atol=1e-4)
    assert not np.allclose(disp, svf, atol=1e-3)


@pytest.mark.parametrize("shape,reg,sa", [((32, 32), "elastic", True), ((16, 16, 16), "diffusion", False)])
def test_unrolled_layers_equal_map_fn_layers(shape, reg, sa):
    """The unrolled per-sample layers give the library's map_fn outputs, in and out of tf.function,
    and their gradients; the weights (and so saved files) are shared unchanged."""
    from hypermorph_spatially_adaptive.unrolled import unroll_per_sample_layers

    cfg = ModelConfig(image_shape=shape, regularizer=reg, spatially_adaptive=sa, num_classes=3, int_steps=5, **SMALL)
    plain = build_model(cfg, unroll=False)
    fast = build_model(cfg, unroll=False)
    fast.set_weights(plain.get_weights())
    assert unroll_per_sample_layers(fast) >= 4  # hyperconvs, transformers, integration, rescale
    assert unroll_per_sample_layers(fast) == 0  # idempotent
    assert [w.name for w in fast.weights] == [w.name for w in plain.weights]
    # a sizeable flow so warping and integration are really exercised
    flow = [layer for layer in plain.layers if layer.name.endswith("_flow")][0]
    k, b = flow.get_weights()
    flow.set_weights([k * 2e4, b + 0.5])
    fast.set_weights(plain.get_weights())
    rng = np.random.default_rng(7)
    x = rng.random((2, *shape, 1)).astype(np.float32)
    h = rng.random((2, cfg.spec.num_params)).astype(np.float32)
    inputs = [tf.constant(x), tf.constant(x[::-1]), tf.constant(h)]

    def grads(model):
        with tf.GradientTape() as tape:
            out = model(inputs)
            loss = tf.reduce_mean(out[0] ** 2) + tf.reduce_mean(out[1] ** 2)
        return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]

    ref = [t.numpy() for t in plain(inputs)]
    assert np.abs(ref[1]).max() > 0.5
    for got in ([t.numpy() for t in fast(inputs)],
                [t.numpy() for t in tf.function(lambda a, b_, c: fast([a, b_, c]), autograph=False)(*inputs)]):
        for a, b_ in zip(ref, got):
            np.testing.assert_allclose(b_, a, atol=1e-5)
    for a, b_ in zip(grads(plain), grads(fast)):
        np.testing.assert_allclose(b_, a, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(a).max())))


def test_invalid_image_size():
    with pytest.raises(ValueError, match="divisible"):
        build_model(ModelConfig(image_shape=(30, 32), regularizer="elastic", spatially_adaptive=True, num_classes=3))


def test_parameter_maps_follow_fixed_segmentation():
    seg = np.array([[[0, 1], [2, 3]], [[3, 3], [0, 1]]], np.int32)
    params = np.array([[0.0, 0.1, 0.2, 0.3], [1.0, 0.9, 0.8, 0.7]], np.float32)
    m = parameter_maps(params, seg).numpy()
    np.testing.assert_allclose(m[0], [[0.0, 0.1], [0.2, 0.3]])
    np.testing.assert_allclose(m[1], [[0.7, 0.7], [1.0, 0.9]])
    spec = ParamSpec("elastic", True, 3)
    assert spec.names(["lung", "bone", "liver"])[:2] == ["lambda_background", "lambda_lung"]
    lam, mu = regularization_parameters(spec, np.concatenate([params, 1 - params], 1), seg)
    np.testing.assert_allclose(mu.numpy()[1], 1 - m[1], atol=1e-6)


@pytest.mark.parametrize("reg", ["elastic", "diffusion"])
@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 16)])
def test_sa_loss_with_equal_class_parameters_equals_global(reg, shape):
    rng = np.random.default_rng(2)
    d = len(shape)
    fixed = tf.constant(rng.random((2, *shape, 1)), tf.float32)
    warped = tf.constant(rng.random((2, *shape, 1)), tf.float32)
    disp = tf.constant(rng.normal(size=(2, *shape, d)), tf.float32)
    seg = tf.constant(rng.integers(0, 4, (2, *shape)), tf.int32)
    g_spec, sa_spec = ParamSpec(reg, False, 3), ParamSpec(reg, True, 3)
    glob = rng.random((2, g_spec.num_params)).astype(np.float32)
    sa = np.repeat(glob, 4, axis=1)  # [lam x4, mu x4] or [w x4]
    loss = LossConfig(spacing=(1.0, 2.0, 0.5)[:d])
    lg = losses.loss_terms(g_spec, fixed, warped, disp, glob, None, loss)
    ls = losses.loss_terms(sa_spec, fixed, warped, disp, sa, seg, loss)
    for k in ("loss", "similarity", "regularization"):
        assert lg[k].shape == (2,)
        np.testing.assert_allclose(ls[k].numpy(), lg[k].numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape,win", [((11, 13), 5), ((7, 8, 6), 3)])
def test_ncc_map_against_brute_force_clipped_windows(shape, win):
    """ncc_map == cov^2 / (var var + eps / win^(2D)) over windows clipped at the image border,
    computed voxel by voxel in numpy."""
    import itertools

    rng = np.random.default_rng(3)
    f = rng.random(shape)
    w = 0.5 * f + rng.random(shape)
    r, eps = win // 2, 1e-5
    ref = np.empty(shape)
    for idx in itertools.product(*[range(n) for n in shape]):
        sl = tuple(slice(max(i - r, 0), i + r + 1) for i in idx)
        a, b = f[sl].ravel(), w[sl].ravel()
        cov = np.mean(a * b) - a.mean() * b.mean()
        ref[idx] = cov ** 2 / (a.var() * b.var() + eps / win ** (2 * len(shape)))
    got = losses.ncc_map(tf.constant(f[None, ..., None], tf.float32), tf.constant(w[None, ..., None], tf.float32), win=win)
    np.testing.assert_allclose(got.numpy()[0], ref, rtol=2e-3, atol=2e-4)


def test_ncc_identical_flat_and_weights():
    rng = np.random.default_rng(3)
    x = tf.constant(rng.random((1, 32, 32, 1)), tf.float32)
    cc = losses.ncc_map(x, x).numpy()
    assert cc.shape == (1, 32, 32) and np.allclose(cc, 1.0, atol=1e-3)
    flat = tf.ones((1, 32, 32, 1)) * 0.3
    with tf.GradientTape() as tape:
        tape.watch(flat)
        v = tf.reduce_mean(losses.ncc_map(flat, flat))
    g = tape.gradient(v, flat).numpy()
    assert np.isfinite(v.numpy()) and abs(v.numpy()) < 1e-3 and np.all(np.isfinite(g))  # ~0, never NaN
    # elastic similarity weight is 2 - lam - mu: at lam = mu = 1 the similarity term vanishes
    spec = ParamSpec("elastic", False, 3)
    t = losses.loss_terms(spec, x, x, tf.zeros((1, 32, 32, 2)), np.array([[1.0, 1.0]], np.float32))
    assert abs(float(t["similarity"][0])) < 1e-6
    t = losses.loss_terms(spec, x, x, tf.zeros((1, 32, 32, 2)), np.array([[0.0, 0.0]], np.float32))
    np.testing.assert_allclose(float(t["similarity"][0]), -2 * cc.mean(), rtol=1e-5)


def test_hyperparameter_sampling_per_sample_and_seeded():
    a = sample_hyperparameters(0, 5, 4, 8).numpy()
    assert a.shape == (4, 8) and a.min() >= 0 and a.max() <= 1
    assert len(np.unique(a[:, 0])) == 4  # each sample has its own draw
    np.testing.assert_array_equal(a, sample_hyperparameters(0, 5, 4, 8).numpy())
    assert not np.array_equal(a, sample_hyperparameters(0, 6, 4, 8).numpy())
    e = sample_hyperparameters(0, 1, 2000, 2, oversample=0.5).numpy()
    frac = np.mean((e == 0) | (e == 1))
    assert 0.4 < frac < 0.6


def test_save_load_roundtrip_identical_predictions(tmp_path):
    cfg = ModelConfig(image_shape=(32, 32), regularizer="elastic", spatially_adaptive=True, num_classes=3, int_steps=1,
                      **SMALL)
    model = build_model(cfg)
    run_folder.save_config(str(tmp_path), {"model": cfg.to_dict()})
    from datasets.atomic import atomic_write
    atomic_write(str(tmp_path / art.WEIGHTS), lambda p: model.save_weights(p))
    loaded, _ = run_folder.load_run(str(tmp_path))
    rng = np.random.default_rng(4)
    x = rng.random((2, 32, 32, 1)).astype(np.float32)
    h = rng.random((2, 8)).astype(np.float32)
    for a, b in zip(model([x, x[::-1], h]), loaded([x, x[::-1], h])):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(ValueError, match="spatially adaptive"):
        run_folder.load_run(str(tmp_path), expect_sa=False)
    with pytest.raises(FileNotFoundError, match="config"):
        run_folder.load_run(str(tmp_path / "nope"))


def test_training_lowers_the_loss_and_run_folder_stands_alone(tmp_path):
    out = tmp_path / "run"
    # --motion stress: the larger motion the thresholds below were measured with (the default became
    # 0.05 with synthetic v2, whose smaller initial misalignment leaves less to learn in 50 steps)
    argv = _data_argv(tmp_path, pairs=12) + SMALL_ARGV + [
        "--out", str(out), "--steps", "50", "--val-every", "50", "--log-every", "10", "--lr", "1e-3",
        "--motion", "stress"]
    train_main("diffusion_sa", argv)
    log = pd.read_csv(out / "train_log.csv")
    val = log.dropna(subset=["val_loss"]).set_index("step")
    assert list(val.index) == [0, 50]
    # fixed validation pairs and hyperparameters: the loss falls and the registration improves
    # (measured: loss -0.4132 -> -0.4186, NCC 0.842 -> 0.864)
    assert val.loc[50, "val_loss"] < val.loc[0, "val_loss"] - 0.002, val
    assert val.loc[50, "val_ncc"] > val.loc[0, "val_ncc"] + 0.01, val
    model, cfg = run_folder.load_run(str(out))  # no architecture flags
    assert cfg["preset"] == "diffusion_sa" and cfg["finished"] and cfg["seed"] == 0
    assert cfg["hyperparameters"][0] == "lambda_background" and "tensorflow" in cfg["versions"]
    assert model.inputs[2].shape[-1] == 4
    assert os.path.isdir(out / "tensorboard")


def test_resume_matches_uninterrupted_run(tmp_path):
    # --int-steps 1: three short trainings, mostly graph building and tracing (half of it the 7 squarings)
    base = _data_argv(tmp_path) + SMALL_ARGV + ["--int-steps", "1", "--val-every", "0", "--log-every", "5",
                                                "--checkpoint-every", "5"]
    full, part = tmp_path / "full", tmp_path / "part"
    train_main("elastic_sa", base + ["--out", str(full), "--steps", "12"])
    train_main("elastic_sa", base + ["--out", str(part), "--steps", "7"])   # "interrupted" after step 7
    # only the checkpoint at step 5 survives the interruption (no final weights)
    os.remove(part / "weights.h5")
    import shutil
    shutil.rmtree(part / "checkpoints" / "step_00000007")
    (part / "checkpoints" / "latest").write_text("step_00000005\n")
    train_main("elastic_sa", base + ["--out", str(part), "--steps", "12", "--resume"])
    m_full, c_full = run_folder.load_run(str(full))
    m_part, c_part = run_folder.load_run(str(part))
    assert c_part["final_step"] == c_full["final_step"] == 12
    for a, b in zip(m_full.get_weights(), m_part.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    steps = pd.read_csv(part / "train_log.csv")["step"].tolist()
    assert steps == [5, 10, 12]


def test_xla_adam_updates_give_bit_identical_weights():
    """The trainer's XLA-compiled Adam (trainer.xla_adam_updates, its default) changes the speed,
    never the result: same seed -> the same loss trace, weights and optimizer state, bit for bit,
    as optimizer.apply_gradients (tf_compat keeps XLA's fused multiply-add out)."""
    import platform

    import tf_compat
    from hypermorph_spatially_adaptive import trainer

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the XLA Adam path is taken on x86-64 only (tf_compat fact 4)")
    assert tf_compat.xla_matches_tensorflow()
    cfg = ModelConfig(image_shape=(32, 32), regularizer="elastic", spatially_adaptive=True, num_classes=3,
                      int_steps=1, **SMALL)
    rng = np.random.default_rng(5)
    batches = [{"moving": rng.random((1, 32, 32, 1)).astype(np.float32),
                "fixed": rng.random((1, 32, 32, 1)).astype(np.float32),
                "fixed_seg": rng.integers(0, 4, (1, 32, 32)).astype(np.int32),
                "hyp": sample_hyperparameters(0, k, 1, cfg.spec.num_params)} for k in range(4)]

    init = []

    def train(xla):
        tf.keras.utils.set_random_seed(0)
        model = build_model(cfg)
        init.append(model.get_weights())
        opt = trainer.make_optimizer(model, 1e-3)
        step = trainer.make_train_step(model, opt, tf.distribute.get_strategy(), tf.Variable(0, dtype=tf.int64),
                                       cfg.spec, LossConfig(), 1, xla_updates=xla)
        trace = [float(step(b)["loss"]) for b in batches]
        return trace, model.get_weights(), [v.numpy() for v in opt.variables]

    (loss_tf, w_tf, opt_tf), (loss_xla, w_xla, opt_xla) = train(False), train(True)
    assert loss_tf == loss_xla
    assert len(w_tf) == len(w_xla) and all(np.array_equal(a, b) for a, b in zip(w_tf, w_xla))
    assert len(opt_tf) == len(opt_xla) and all(np.array_equal(a, b) for a, b in zip(opt_tf, opt_xla))
    assert all(np.array_equal(a, b) for a, b in zip(*init))  # same start
    assert not all(np.array_equal(a, b) for a, b in zip(init[0], w_tf))  # and the weights did move


@pytest.mark.slow  # 17-23 s of a subprocess; the suite's 10-min budget: make test PYTEST_ARGS='-m slow'
def test_mirrored_strategy_on_two_cpu_devices(tmp_path):
    code = ("import sys; sys.path.insert(0, %r); from hypermorph_spatially_adaptive.trainer import main; "
            "main('elastic_global', sys.argv[1:])" % ROOT)
    argv = _data_argv(tmp_path) + SMALL_ARGV + ["--out", str(tmp_path / "m"), "--steps", "3", "--batch-size", "2",
                                                "--strategy", "mirrored", "--cpu-replicas", "2", "--val-every", "0",
                                                "--log-every", "1"]
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 replica(s)" in r.stdout
    log = pd.read_csv(tmp_path / "m" / "train_log.csv")
    assert log["step"].tolist() == [1, 2, 3] and np.isfinite(log["loss"]).all()


def test_a_diverging_run_stops_with_a_clear_error_and_is_not_finished(tmp_path):
    """A loss that explodes (the energy of a blown-up field) stops training instead of saving a
    broken model as finished; the limit is relative to the first logged loss."""
    from hypermorph_spatially_adaptive import trainer

    trainer._check_divergence("x", 5, 999.0, -0.8)          # limit 1000 x max(1, 0.8)
    with pytest.raises(FloatingPointError, match="diverged at step 5"):
        trainer._check_divergence("x", 5, 1001.0, -0.8)
    trainer._check_divergence("x", 5, 4000.0, -5.0)         # limit 5000
    out = tmp_path / "run"
    argv = _data_argv(tmp_path) + SMALL_ARGV + ["--int-steps", "1", "--val-every", "0", "--log-every", "2",
                                                "--out", str(out), "--steps", "40", "--lr", "3",
                                                "--energy-scale", "1000"]
    with pytest.raises(FloatingPointError, match="diverged|non-finite"):
        train_main("elastic_global", argv)
    assert not os.path.isfile(out / "weights.h5")
