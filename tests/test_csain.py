"""CSAIN conditioning, smoothed parameter maps and the paper weight range (docs/extensions.md "CSAIN conditioning")."""
import os

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from scipy.ndimage import gaussian_filter

from hypermorph_spatially_adaptive import artifacts as art
from hypermorph_spatially_adaptive import losses, run_folder
from hypermorph_spatially_adaptive.configs import LossConfig
from hypermorph_spatially_adaptive.csain import CSAIN, IN_EPS
from hypermorph_spatially_adaptive.models import ModelConfig, build_model, call_model
from hypermorph_spatially_adaptive.params import ParamSpec, gaussian_kernel_1d, smooth_maps
from hypermorph_spatially_adaptive.forward import Registrar
from hypermorph_spatially_adaptive.trainer import changed_options, main as train_main, sample_hyperparameters

SMALL = dict(enc_features=(8, 16, 16, 16), dec_features=(16, 16, 16, 16, 16, 8, 8), csain_blocks=1)
SMALL_ARGV = ["--enc-features", "8", "16", "16", "16", "--dec-features", "16", "16", "16", "16", "16", "8", "8",
              "--csain-blocks", "1"]


def _instance_norm(h):
    """numpy instance normalization over the spatial axes, per sample and channel."""
    axes = tuple(range(1, h.ndim - 1))
    mean = h.mean(axis=axes, keepdims=True)
    var = h.var(axis=axes, keepdims=True)
    return (h - mean) / np.sqrt(var + IN_EPS)


def _layer(channels=3, maps=2, nd=2):
    layer = CSAIN()
    layer.build([(None, *([8] * nd), channels), (None, *([8] * nd), maps)])
    rng = np.random.default_rng(3)
    for conv in (layer.gamma_conv, layer.beta_conv):
        k, b = conv.get_weights()
        conv.set_weights([rng.normal(size=k.shape).astype(np.float32), rng.normal(size=b.shape).astype(np.float32)])
    return layer


def test_constant_map_is_conditional_instance_norm_per_sample_and_channel():
    """A constant map gives per-channel constants gamma, beta: the layer is then conditional IN,
    with statistics per sample and channel (two samples of very different scale and offset)."""
    layer = _layer()
    rng = np.random.default_rng(0)
    h = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    h[0] = h[0] * np.array([1.0, 5.0, 0.1]) + np.array([3.0, -2.0, 0.0])
    h[1] = h[1] * np.array([0.2, 1.0, 9.0]) + np.array([-7.0, 1.0, 4.0])
    consts = np.array([[0.2, 0.7], [0.9, 0.1]], np.float32)  # per sample, per map channel
    m = np.broadcast_to(consts[:, None, None, :], (2, 8, 8, 2)).astype(np.float32)
    got = layer([tf.constant(h), tf.constant(m)]).numpy()
    # gamma_c = 1 + b_c + sum_{taps, f} W[taps, f, c] * const_f (valid conv of a constant map)
    kg, bg = layer.gamma_conv.get_weights()
    kb, bb = layer.beta_conv.get_weights()
    gamma = 1.0 + bg + np.einsum("ijfc,bf->bc", kg, consts)
    beta = bb + np.einsum("ijfc,bf->bc", kb, consts)
    want = gamma[:, None, None, :] * _instance_norm(h.astype(np.float64)) + beta[:, None, None, :]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # each sample is normalized with its own statistics: alone it gives the same output
    alone = layer([tf.constant(h[1:]), tf.constant(m[1:])]).numpy()
    np.testing.assert_allclose(alone[0], got[1], rtol=1e-5, atol=1e-5)
    # invariance to a per-sample, per-channel affine change of the features (up to the eps of the variance)
    shifted = h * np.array([2.0, 0.5, 3.0], np.float32) + np.array([10.0, -4.0, 1.0], np.float32)
    np.testing.assert_allclose(layer([tf.constant(shifted), tf.constant(m)]).numpy(), got, rtol=2e-3, atol=1e-3)


def test_spatial_map_gives_spatial_modulation():
    """A map with a step modulates the two halves differently (gamma, beta follow the map)."""
    layer = _layer(channels=2, maps=1)
    h = np.random.default_rng(1).normal(size=(1, 8, 8, 2)).astype(np.float32)
    m = np.zeros((1, 8, 8, 1), np.float32)
    m[:, :, 4:] = 1.0
    gamma, beta = [t.numpy() for t in layer.modulation(tf.constant(m))]
    assert np.allclose(gamma[0, :, 0], gamma[0, 0, 0]) and np.allclose(gamma[0, :, 7], gamma[0, 0, 7])
    assert np.abs(gamma[0, 0, 0] - gamma[0, 0, 7]).max() > 1e-2
    assert layer([tf.constant(h), tf.constant(m)]).shape == h.shape


def test_gaussian_smoothing_constant_mean_identity_and_scipy_interior():
    assert len(gaussian_kernel_1d(0.8)) == 5 and abs(gaussian_kernel_1d(0.8).sum() - 1) < 1e-12
    rng = np.random.default_rng(2)
    const = np.full((2, 32, 32, 2), 0.37, np.float32)
    np.testing.assert_allclose(smooth_maps(const, 0.8).numpy(), const, atol=1e-6)  # border included
    const3 = np.full((1, 16, 16, 16, 1), 0.6, np.float32)
    np.testing.assert_allclose(smooth_maps(const3, 1.3).numpy(), const3, atol=1e-6)
    x = rng.random((2, 32, 32, 2)).astype(np.float32)
    assert smooth_maps(x, 0.0) is not None
    np.testing.assert_array_equal(smooth_maps(x, 0.0).numpy(), x)  # sigma 0: identity
    # interior: the plain Gaussian filter (scipy, truncated at the same radius 2)
    got = smooth_maps(x, 0.8).numpy()
    ref = gaussian_filter(x[1, ..., 1].astype(np.float64), 0.8, truncate=2.5, mode="constant")
    np.testing.assert_allclose(got[1, 2:-2, 2:-2, 1], ref[2:-2, 2:-2], atol=1e-5)
    # a map whose support keeps 2 radii from the border keeps its mean exactly
    inner = np.zeros((1, 32, 32, 1), np.float32)
    inner[0, 4:-4, 4:-4, 0] = rng.random((24, 24))
    np.testing.assert_allclose(smooth_maps(inner, 0.8).numpy().mean(), inner.mean(), rtol=1e-5)
    # a piecewise constant (segmentation) map keeps its mean closely, border included
    seg_map = np.where(rng.random((1, 32, 32, 1)) > 0.5, 1.0, 0.2).astype(np.float32)
    assert abs(smooth_maps(seg_map, 0.8).numpy().mean() - seg_map.mean()) < 0.01


def test_smoothing_and_paper_range_in_the_loss():
    """SA loss with smoothing uses the smoothed maps; 'paper' = 10x the energy, unit similarity."""
    rng = np.random.default_rng(5)
    seg = rng.integers(0, 4, (1, 32, 32)).astype(np.int32)
    hyp = rng.random((1, 4)).astype(np.float32)
    fixed, warped = [tf.constant(rng.random((1, 32, 32, 1)), tf.float32) for _ in range(2)]
    u = tf.constant(rng.normal(size=(1, 32, 32, 2)), tf.float32)
    unit = losses.loss_terms(ParamSpec("diffusion", True, 3), fixed, warped, u, hyp, seg)
    paper = losses.loss_terms(ParamSpec("diffusion", True, 3, weight_range="paper"), fixed, warped, u, hyp, seg)
    np.testing.assert_allclose(paper["regularization"], 10 * unit["regularization"], rtol=1e-5)
    np.testing.assert_allclose(paper["similarity"], -unit["ncc"], rtol=1e-6)
    smooth = losses.loss_terms(ParamSpec("diffusion", True, 3, smooth_sigma=0.8), fixed, warped, u, hyp, seg)
    assert abs(float(smooth["regularization"][0]) - float(unit["regularization"][0])) > 1e-4
    with pytest.raises(ValueError, match="spatially adaptive"):
        ParamSpec("diffusion", False, 3, smooth_sigma=0.8)


def test_gradients_reach_gamma_beta_convolutions_and_hyp():
    cfg = ModelConfig((32, 32), "elastic", True, 3, conditioning="csain", smooth_sigma=0.8, **SMALL)
    model = build_model(cfg)
    rng = np.random.default_rng(6)
    x = tf.constant(rng.random((2, 32, 32, 1)).astype(np.float32))
    hyp = tf.Variable(rng.random((2, 8)).astype(np.float32))
    seg = tf.constant(rng.integers(0, 4, (2, 32, 32)).astype(np.int32))
    target = tf.constant(rng.normal(size=(2, 32, 32, 2)).astype(np.float32))
    with tf.GradientTape() as tape:
        _, _, svf = call_model(model, x, x[::-1], hyp, seg, training=True)
        loss = tf.reduce_sum(svf * target)
    variables = [v for v in model.trainable_variables if "/gamma/" in v.name or "/beta/" in v.name]
    assert len(variables) == 2 * 2 * (2 * 1 + 7)  # kernel + bias, 2 CSAIN per block, 7 decoder convs
    grads = tape.gradient(loss, variables + [hyp])
    for v, g in zip(variables + [hyp], grads):
        assert g is not None and np.all(np.isfinite(g.numpy())) and np.abs(g.numpy()).max() > 0, v.name


def test_csain_run_saves_reloads_and_reproduces(tmp_path):
    cfg = ModelConfig((32, 32), "diffusion", True, 3, conditioning="csain", smooth_sigma=0.8,
                      weight_range="paper", **SMALL)
    model = build_model(cfg)
    flow = [layer for layer in model.layers if layer.name.endswith("_flow")][0]
    k, b = flow.get_weights()
    flow.set_weights([k * 2e4, b + 0.3])  # a sizeable displacement, so the comparison means something
    run_folder.save_config(str(tmp_path), {"model": cfg.to_dict(), "preset": "diffusion_sa"})
    from datasets.atomic import atomic_write
    atomic_write(str(tmp_path / art.WEIGHTS), lambda p: model.save_weights(p))
    loaded, config = run_folder.load_run(str(tmp_path), expect_sa=True)
    assert config["model"]["conditioning"] == "csain" and len(loaded.inputs) == 4
    rng = np.random.default_rng(4)
    x = rng.random((2, 32, 32, 1)).astype(np.float32)
    h = rng.random((2, 4)).astype(np.float32)
    seg = rng.integers(0, 4, (2, 32, 32)).astype(np.int32)
    ref = [t.numpy() for t in call_model(model, x, x[::-1], h, seg)]
    assert np.abs(ref[1]).max() > 0.1
    for a, b_ in zip(ref, call_model(loaded, x, x[::-1], h, seg)):
        np.testing.assert_array_equal(a, b_.numpy())
    registrar = Registrar(loaded)
    warped, disp = registrar(x, x[::-1], h, seg)
    np.testing.assert_allclose(disp, ref[1], atol=1e-5)
    # the map enters the network: another segmentation changes the displacement
    disp2 = call_model(loaded, x, x[::-1], h, seg[::-1])[1].numpy()
    assert np.abs(disp2 - disp).max() > 1e-4
    with pytest.raises(ValueError, match="fixed segmentation"):
        registrar(x, x[::-1], h)


def test_short_csain_training_lowers_the_loss_and_logged_val_loss_reproduces(tmp_path):
    out = tmp_path / "run"
    argv = ["--dataset", "synthetic", "--image-size", "32", "32", "--num-pairs", "12",
            "--cache-dir", str(tmp_path / "cache"), "--motion", "stress"] + SMALL_ARGV + [
        "--conditioning", "csain", "--smooth-maps", "0.8", "--out", str(out), "--steps", "50",
        "--val-every", "50", "--log-every", "25", "--lr", "1e-3"]
    train_main("diffusion_sa", argv)
    val = pd.read_csv(out / art.TRAIN_LOG).dropna(subset=["val_loss"]).set_index("step")
    assert list(val.index) == [0, 50]
    assert val.loc[50, "val_loss"] < val.loc[0, "val_loss"] - 0.002, val
    model, cfg = run_folder.load_run(str(out))
    m = cfg["model"]
    assert (m["conditioning"], m["smooth_sigma"], m["weight_range"]) == ("csain", 0.8, "unit")
    # the reloaded run reproduces the logged validation loss (same maps, same smoothing)
    dataset = art.load_dataset(cfg)
    v = dataset.arrays("val")
    spec = ParamSpec.from_model_config(m)
    hyp = sample_hyperparameters(cfg["seed"] + 104729, 0, len(v["fixed"]), spec.num_params).numpy()
    warped, disp, _ = call_model(model, v["moving"], v["fixed"], hyp, v["fixed_seg"])
    loss = losses.loss_terms(spec, tf.constant(v["fixed"]), warped, disp, hyp, v["fixed_seg"],
                             LossConfig.from_run_config(cfg))["loss"]
    assert abs(float(np.mean(loss)) - val.loc[50, "val_loss"]) < 1e-4


def test_old_runs_resume_without_the_new_config_entries():
    old = {"model": {"regularizer": "elastic", "int_steps": 7}}
    new = {"model": {"regularizer": "elastic", "int_steps": 7, "conditioning": "hypernetwork",
                     "smooth_sigma": 0.0, "weight_range": "unit", "csain_blocks": 2}}
    assert changed_options(old, new) == {}
    new["model"]["smooth_sigma"] = 0.8
    assert changed_options(old, new) == {"model.smooth_sigma": (0.0, 0.8)}
    with pytest.raises(ValueError, match="spatially adaptive"):
        build_model(ModelConfig((32, 32), "elastic", False, 3, conditioning="csain"))
