"""The TensorFlow field operations (hypermorph_spatially_adaptive.tf_ops) against their numpy
homes in eval_metrics: linear warp (both stencils), Jacobian determinant, box smoothing."""
import numpy as np
import pytest
import scipy.ndimage as ndi
import tensorflow as tf

import eval_metrics
from hypermorph_spatially_adaptive.tf_ops import WARP_STENCILS, box_smooth, jacobian_determinant, warp_linear


def _smooth_field(shape, seed, amplitude, sigma=2.0):
    """A random smooth displacement ``[1, *shape, D]`` (voxels), float32."""
    rng = np.random.default_rng(seed)
    comps = [ndi.gaussian_filter(rng.standard_normal(shape), sigma) for _ in shape]
    u = np.stack([c / np.abs(c).max() for c in comps], axis=-1) * amplitude
    return u[None].astype(np.float32)


@pytest.mark.parametrize("stencil", WARP_STENCILS)
@pytest.mark.parametrize("shape", [(9, 7), (5, 6, 4)])
def test_warp_linear_matches_scipy_linear_interpolation(shape, stencil):
    rng = np.random.default_rng(0)
    vol = rng.random((2, *shape, 3)).astype(np.float32)
    disp = rng.uniform(-3, 3, (2, *shape, len(shape))).astype(np.float32)  # reaches outside: edge clamp
    out = warp_linear(vol, disp, stencil).numpy()
    for b in range(2):
        ref = eval_metrics.warp_image(vol[b], disp[b], order=1)
        np.testing.assert_allclose(out[b], ref, atol=1e-5)


@pytest.mark.parametrize("stencil", WARP_STENCILS)
@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 4)])
def test_warp_linear_of_the_identity_field_is_the_identity(shape, stencil):
    img = np.random.default_rng(2).random((1, *shape, 2)).astype(np.float32)
    out = warp_linear(img, np.zeros((1, *shape, len(shape)), np.float32), stencil).numpy()
    np.testing.assert_array_equal(out, img)


@pytest.mark.parametrize("stencil", WARP_STENCILS)
def test_warp_linear_gradient_wrt_displacement_is_finite_difference(stencil):
    rng = np.random.default_rng(1)
    vol = tf.constant(rng.random((1, 8, 8, 1)), tf.float32)
    disp = tf.Variable(rng.uniform(-1.5, 1.5, (1, 8, 8, 2)).astype(np.float32))
    with tf.GradientTape() as tape:
        s = tf.reduce_sum(warp_linear(vol, disp, stencil) ** 2)
    g = tape.gradient(s, disp).numpy()
    d = np.zeros((1, 8, 8, 2), np.float32)
    d[0, 3, 4, 1] = 1e-2

    def total(x):
        return float(tf.reduce_sum(warp_linear(vol, x, stencil) ** 2))

    fd = (total(disp + d) - total(disp - d)) / 2e-2
    assert g[0, 3, 4, 1] == pytest.approx(fd, rel=1e-2, abs=1e-4)


def test_warp_stencils_agree_in_value_and_inner_gradient():
    """The two stencils interpolate the same function; they differ only in float rounding and
    in the derivative exactly on the last voxel plane (tf_ops.warp_linear)."""
    rng = np.random.default_rng(3)
    vol = tf.constant(rng.random((2, 10, 9, 2)), tf.float32)
    disp = tf.Variable(rng.uniform(-2, 2, (2, 10, 9, 2)).astype(np.float32))
    out, grads = {}, {}
    for stencil in WARP_STENCILS:
        with tf.GradientTape() as tape:
            out[stencil] = warp_linear(vol, disp, stencil)
            s = tf.reduce_sum(tf.sin(out[stencil]))
        grads[stencil] = tape.gradient(s, disp).numpy()
    np.testing.assert_allclose(out["floor"].numpy(), out["cell"].numpy(), atol=1e-6)
    np.testing.assert_allclose(grads["floor"], grads["cell"], atol=1e-5)


def test_warp_linear_refuses_a_misfit_field_and_an_unknown_stencil():
    with pytest.raises(ValueError, match="does not fit"):
        warp_linear(np.zeros((1, 6, 5, 1), np.float32), np.zeros((1, 6, 4, 2), np.float32))
    with pytest.raises(ValueError, match="stencil"):
        warp_linear(np.zeros((1, 6, 5, 1), np.float32), np.zeros((1, 6, 5, 2), np.float32), "cubic")


@pytest.mark.parametrize("shape", [(24, 20), (12, 10, 9)])
def test_tf_and_numpy_jacobian_determinants_agree_on_a_smooth_field(shape):
    u = _smooth_field(shape, seed=len(shape), amplitude=2.0)
    got = jacobian_determinant(u).numpy()[0]
    want = eval_metrics.jacobian_determinant(u[0])
    assert got.shape == want.shape == shape
    assert want.min() < 0.95 and want.max() > 1.05  # the field deforms
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_tf_and_numpy_jacobian_determinants_agree_on_a_rough_field():
    rng = np.random.default_rng(5)
    for u in (rng.normal(0, 0.7, (2, 9, 7, 2)), rng.normal(0, 0.7, (1, 5, 6, 4, 3))):
        u = u.astype(np.float32)
        got = jacobian_determinant(u).numpy()
        for b in range(u.shape[0]):
            np.testing.assert_allclose(got[b], eval_metrics.jacobian_determinant(u[b]), rtol=1e-5, atol=1e-5)


def test_box_smooth_keeps_a_linear_field_inside_and_zero_passes_is_the_identity():
    lin = (2.0 * np.indices((10, 10))[0] - 0.5 * np.indices((10, 10))[1]).astype(np.float32)[None, ..., None]
    np.testing.assert_allclose(box_smooth(lin, 3).numpy()[0, 3:-3, 3:-3], lin[0, 3:-3, 3:-3], atol=1e-5)
    np.testing.assert_array_equal(box_smooth(lin, 0).numpy(), lin)
