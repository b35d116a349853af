"""Instance optimization (hypermorph_spatially_adaptive.refinement): warp convention, zero steps,
loss decrease, recovery of a known translation."""
import numpy as np
import pytest
import scipy.ndimage as ndi

from hypermorph_spatially_adaptive.params import ParamSpec
from hypermorph_spatially_adaptive.refinement import Refiner, linear_warp


def _smooth_image(shape, seed=0, sigma=3.0):
    rng = np.random.default_rng(seed)
    img = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    img = (img - img.min()) / (img.max() - img.min())
    return img.astype(np.float32)


def test_linear_warp_matches_map_coordinates():
    rng = np.random.default_rng(1)
    img = rng.random((2, 12, 10, 1)).astype(np.float32)
    disp = rng.uniform(-2.5, 2.5, (2, 12, 10, 2)).astype(np.float32)
    out = linear_warp(img, disp).numpy()
    for b in range(2):
        coords = np.indices((12, 10)).astype(np.float64) + np.moveaxis(disp[b], -1, 0)
        ref = ndi.map_coordinates(img[b, ..., 0].astype(np.float64), coords, order=1, mode="nearest")
        np.testing.assert_allclose(out[b, ..., 0], ref, atol=1e-5)


def test_linear_warp_3d_zero_flow_is_identity():
    img = np.random.default_rng(2).random((1, 6, 5, 4, 2)).astype(np.float32)
    out = linear_warp(img, np.zeros((1, 6, 5, 4, 3), np.float32)).numpy()
    np.testing.assert_allclose(out, img, atol=1e-6)


def _pair(shape=(32, 32), shift=(1.5, -1.0)):
    """moving(x) = fixed(x - shift): the displacement that registers it is u = +shift... checked below."""
    big = _smooth_image((shape[0] + 16, shape[1] + 16))
    fixed = big[8:-8, 8:-8]
    coords = np.indices(shape).astype(np.float64) + 8 - np.asarray(shift)[:, None, None]
    moving = ndi.map_coordinates(big.astype(np.float64), coords, order=3).astype(np.float32)
    return moving[None, ..., None], fixed[None, ..., None]


def test_zero_steps_returns_the_start_unchanged():
    moving, fixed = _pair()
    u0 = np.random.default_rng(3).normal(0, 0.3, (1, 32, 32, 2)).astype(np.float32)
    r = Refiner(ParamSpec("elastic", False, 3), [1.0, 1.0], win=5)
    u, before, after = r(moving, fixed, u0, np.array([[0.2, 0.2]]), steps=0)
    np.testing.assert_array_equal(u, u0)
    assert before == pytest.approx(after)


def test_few_steps_lower_the_loss_and_keep_shape():
    moving, fixed = _pair()
    seg = np.zeros((1, 32, 32), np.int32)
    seg[:, 8:20, 8:20] = 1
    seg[:, 20:28, 4:30] = 2
    spec = ParamSpec("elastic", True, 3)
    hyp = np.array([[0.2, 0.5, 0.9, 0.3, 0.2, 0.5, 0.9, 0.3]], np.float32)
    u0 = np.zeros((1, 32, 32, 2), np.float32)
    u, before, after = Refiner(spec, [1.0, 1.0], win=5)(moving, fixed, u0, hyp, seg, steps=10, lr=0.1)
    assert u.shape == u0.shape and u.dtype == np.float32
    assert after[0] < before[0] - 1e-3


def test_known_translation_is_recovered():
    """warped(x) = moving(x + u(x)) = fixed(x) for moving(y) = fixed(y - s) needs u = s."""
    shift = np.array([1.5, -1.0])
    moving, fixed = _pair((48, 48), tuple(shift))
    u0 = np.zeros((1, 48, 48, 2), np.float32)
    r = Refiner(ParamSpec("diffusion", False, 1), [1.0, 1.0], win=7)
    u, before, after = r(moving, fixed, u0, np.array([[0.3]], np.float32), steps=150, lr=0.1)
    inner = u[0, 12:-12, 12:-12]  # away from the clamped border
    err = np.abs(inner - shift).max(axis=(0, 1))
    assert np.all(err < 0.1), (err, inner.mean(axis=(0, 1)))
    assert after[0] < before[0]


def test_bad_inputs_are_refused():
    moving, fixed = _pair()
    r = Refiner(ParamSpec("elastic", True, 3), [1.0, 1.0], win=5)
    u0 = np.zeros((1, 32, 32, 2), np.float32)
    with pytest.raises(ValueError, match="fixed segmentation"):
        r(moving, fixed, u0, np.full((1, 8), 0.5), None, steps=1)
    with pytest.raises(ValueError, match="hyp has shape"):
        r(moving, fixed, u0, np.full((1, 2), 0.5), np.zeros((1, 32, 32), np.int32), steps=1)
    with pytest.raises(ValueError, match="u0 has shape"):
        r(moving, fixed, u0[..., :1], np.full((1, 8), 0.5), np.zeros((1, 32, 32), np.int32), steps=1)


def test_never_ends_above_the_start():
    """lambda = mu = 1: the NCC weight 2 - lambda - mu is 0 and the loss is the energy alone; Adam's
    first steps move every voxel by about lr and can raise it, the best iterate is kept."""
    moving, fixed = _pair()
    u0 = ndi.gaussian_filter(np.random.default_rng(4).normal(0, 1.0, (1, 32, 32, 2)), (0, 3, 3, 0)).astype(np.float32)
    r = Refiner(ParamSpec("elastic", False, 3), [1.0, 1.0], win=5)
    for steps in (1, 3, 30):
        u, before, after = r(moving, fixed, u0, np.array([[1.0, 1.0]], np.float32), steps=steps, lr=0.5)
        assert after[0] <= before[0]
        recomputed = r.loss(moving, fixed, u, np.array([[1.0, 1.0]], np.float32), None).numpy()
        assert recomputed[0] == pytest.approx(after[0], rel=1e-5, abs=1e-7)
