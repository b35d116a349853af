"""The energy scale K of the loss (``--energy-scale``): K = 1 is the paper's eq. (1) exactly, K
multiplies the energy and nothing else, runs record their K and every later stage uses it."""
import json

import numpy as np
import pytest
import tensorflow as tf

import inference
import regularizers
from hypermorph_spatially_adaptive import losses
from hypermorph_spatially_adaptive.params import ParamSpec
from hypermorph_spatially_adaptive.configs import LossConfig, RefineConfig
from hypermorph_spatially_adaptive.refinement import Refiner
from hypermorph_spatially_adaptive.trainer import main as train_main

SPECS = [ParamSpec("elastic", False, 3), ParamSpec("elastic", True, 3), ParamSpec("diffusion", False, 3),
         ParamSpec("diffusion", True, 3)]


def _case(spec, seed=0, shape=(32, 32)):
    rng = np.random.default_rng(seed)
    fixed = rng.random((2, *shape, 1)).astype(np.float32)
    warped = rng.random((2, *shape, 1)).astype(np.float32)
    field = rng.normal(0, 0.5, (2, *shape, 2)).astype(np.float32)
    hyp = rng.random((2, spec.num_params)).astype(np.float32)
    seg = rng.integers(0, 4, (2, *shape)).astype(np.int32)
    return fixed, warped, field, hyp, seg


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.regularizer}-{'sa' if s.spatially_adaptive else 'g'}")
def test_k1_is_the_paper_loss_and_k_scales_only_the_energy(spec):
    fixed, warped, field, hyp, seg = _case(spec)
    fixed, warped, field = tf.constant(fixed), tf.constant(warped), tf.constant(field)
    spacing = [1.5, 0.8]
    t1 = losses.loss_terms(spec, fixed, warped, field, hyp, seg, LossConfig(ncc_win=5, spacing=spacing))
    # eq. (1) computed independently from the regularizers and the NCC map
    cc = losses.ncc_map(fixed, warped, 5).numpy()
    k = spec.num_classes + 1
    if spec.spatially_adaptive:
        lam = hyp[np.arange(2)[:, None, None], seg]
        mu = hyp[np.arange(2)[:, None, None], k + seg] if spec.regularizer == "elastic" else None
    else:
        lam = hyp[:, 0][:, None, None] * np.ones_like(cc)
        mu = hyp[:, 1][:, None, None] * np.ones_like(cc) if spec.regularizer == "elastic" else None
    if spec.regularizer == "elastic":
        sim = np.mean((2 - lam - mu) * -cc, axis=(1, 2))
        energy = regularizers.elastic_regularizer(field, tf.constant(lam, tf.float32), tf.constant(mu, tf.float32), spacing).numpy()
    else:
        sim = np.mean((1 - lam) * -cc, axis=(1, 2))
        energy = regularizers.diffusion_regularizer(field, tf.constant(lam, tf.float32), spacing).numpy()
    assert np.all(energy > 0)
    np.testing.assert_allclose(t1["similarity"].numpy(), sim, rtol=1e-5)
    np.testing.assert_allclose(t1["regularization"].numpy(), energy, rtol=1e-5)
    np.testing.assert_allclose(t1["loss"].numpy(), sim + energy, rtol=1e-5)
    # the default is K = 1, bit for bit
    t_default = losses.loss_terms(spec, fixed, warped, field, hyp, seg,
                                  LossConfig(ncc_win=5, spacing=spacing, energy_scale=1.0))
    for key in t1:
        np.testing.assert_array_equal(t1[key].numpy(), t_default[key].numpy())
    t30 = losses.loss_terms(spec, fixed, warped, field, hyp, seg, LossConfig(ncc_win=5, spacing=spacing, energy_scale=30.0))
    np.testing.assert_array_equal(t30["similarity"].numpy(), t1["similarity"].numpy())
    np.testing.assert_array_equal(t30["ncc"].numpy(), t1["ncc"].numpy())
    np.testing.assert_allclose(t30["regularization"].numpy(), 30 * energy, rtol=1e-5)
    np.testing.assert_allclose(t30["loss"].numpy(), sim + 30 * energy, rtol=1e-5)


def test_refiner_uses_the_runs_energy_scale():
    spec = ParamSpec("elastic", False, 3)
    cfg = {"model": {"regularizer": "elastic", "spatially_adaptive": False, "num_classes": 3},
           "loss": {"spacing": [1.0, 1.0], "ncc_win": 5, "energy_scale": 30.0}}
    r30 = Refiner.from_config(cfg, options=RefineConfig.original())
    assert r30.loss_config.energy_scale == 30.0 and r30.loss_config.ncc_win == 5
    old = json.loads(json.dumps(cfg))
    del old["loss"]["energy_scale"]  # a run made before --energy-scale existed
    r1 = Refiner.from_config(old, options=RefineConfig.original())
    assert r1.loss_config.energy_scale == 1.0
    fixed, moving, u, hyp, _ = _case(spec, seed=1)
    l30, l1 = r30.loss(moving, fixed, u, hyp, None).numpy(), r1.loss(moving, fixed, u, hyp, None).numpy()
    energy = regularizers.elastic_regularizer(tf.constant(u), tf.constant(hyp[:, 0]), tf.constant(hyp[:, 1]), [1.0, 1.0]).numpy()
    np.testing.assert_allclose(l30 - l1, 29 * energy, rtol=1e-4, atol=1e-6)
    # a larger K keeps the refined field closer to the (zero) start
    u0 = np.zeros_like(u)
    hyp_c = np.full((2, 2), 0.5, np.float32)
    far = np.linalg.norm(r1(moving, fixed, u0, hyp_c, steps=30, lr=0.05)[0])
    near = np.linalg.norm(r30(moving, fixed, u0, hyp_c, steps=30, lr=0.05)[0])
    assert near < 0.8 * far, (near, far)


def test_mixed_energy_scales_are_refused_by_inference():
    from hypermorph_spatially_adaptive.configs import check_same_weighting

    a = {"loss": {"energy_scale": 30.0}}
    assert check_same_weighting({"sa": a, "g": {"loss": {"energy_scale": 30.0}}}) == 30.0
    assert check_same_weighting({"sa": {"loss": {}}, "g": {"loss": {"energy_scale": 1.0}}}) == 1.0
    with pytest.raises(ValueError, match="different --energy-scale.*sa: K = 30.*g: K = 1"):
        check_same_weighting({"sa": a, "g": {"loss": {}}})


def test_training_records_k_and_resume_refuses_another(tmp_path):
    from hypermorph_spatially_adaptive import artifacts as art

    out = tmp_path / "run"
    argv = ["--dataset", "synthetic", "--image-size", "32", "32", "--num-pairs", "6", "--cache-dir",
            str(tmp_path / "cache"), "--enc-features", "8", "16", "16", "16", "--dec-features", "16", "16", "16",
            "16", "16", "8", "8", "--hyp-layers", "2", "--hyp-units", "16", "--out", str(out), "--steps", "2", "--val-every", "0",
                                                         "--energy-scale", "30"]
    train_main("elastic_global", argv)
    cfg = art.read_config(str(out))
    assert cfg["loss"]["energy_scale"] == 30.0
    assert Refiner.from_config(cfg).loss_config.energy_scale == 30.0
    with pytest.raises(ValueError, match="--resume refused: changed --energy-scale 30.0 -> 1.0"):
        train_main("elastic_global", [a for a in argv if a not in ("--energy-scale", "30")] + ["--resume", "--steps", "3"])


def test_log_mapping_is_monotone_invertible_and_spans_its_range():
    from hypermorph_spatially_adaptive.params import HypMapping

    m = HypMapping("log", 2.0)
    h = np.linspace(0, 1, 101)
    w = m.weight(h)
    assert np.all(np.diff(w) > 0)
    np.testing.assert_allclose(m.range, (0.05, 5.0))
    np.testing.assert_allclose(w[[0, 50, 100]], [0.05, 0.5, 5.0])
    np.testing.assert_allclose(m.inverse(w), h, atol=1e-12)
    np.testing.assert_allclose(m.weight(tf.constant(h, tf.float32)).numpy(), w, rtol=1e-5)
    lin = HypMapping()
    np.testing.assert_array_equal(lin.weight(h), h)
    assert HypMapping.from_loss_config({}) == lin
    assert HypMapping.from_loss_config({"hyp_mapping": m.to_dict()}) == m
    with pytest.raises(ValueError, match="unknown hyperparameter mapping"):
        HypMapping("exp")


@pytest.mark.parametrize("spec", SPECS[:3], ids=["elastic-g", "elastic-sa", "diffusion-g"])
def test_log_mapping_loss_has_unit_similarity_and_mapped_weights(spec):
    from hypermorph_spatially_adaptive.params import HypMapping, regularization_parameters

    fixed, warped, field, hyp, seg = _case(spec, seed=2)
    fixed, warped, field = tf.constant(fixed), tf.constant(warped), tf.constant(field)
    m = HypMapping("log", 2.0)
    t = losses.loss_terms(spec, fixed, warped, field, hyp, seg, LossConfig(ncc_win=5, energy_scale=3.0, hyp_mapping=m))
    cc = losses.ncc_map(fixed, warped, 5).numpy()
    sim_weight = 1.0 if spec.regularizer == "elastic" else 0.5  # linear mapping's value at the centre
    np.testing.assert_allclose(t["similarity"].numpy(), -sim_weight * cc.mean(axis=(1, 2)), rtol=1e-5)
    lam, mu = regularization_parameters(spec, hyp, seg)
    if spec.regularizer == "elastic":
        energy = regularizers.elastic_regularizer(field, m.weight(lam), m.weight(mu)).numpy()
    else:
        energy = regularizers.diffusion_regularizer(field, m.weight(lam)).numpy()
    np.testing.assert_allclose(t["regularization"].numpy(), 3.0 * energy, rtol=1e-5)
    # at h = 0.5 everywhere the log mapping is the linear mapping's centre
    half = np.full_like(hyp, 0.5)
    a = losses.loss_terms(spec, fixed, warped, field, half, seg,
                          LossConfig(ncc_win=5, energy_scale=3.0, hyp_mapping=m))["loss"].numpy()
    b = losses.loss_terms(spec, fixed, warped, field, half, seg, LossConfig(ncc_win=5, energy_scale=3.0))["loss"].numpy()
    np.testing.assert_allclose(a, b, rtol=1e-5)
