"""Analytic checks of the elastic and diffusion regularizers (paper eq. (1); CONVENTIONS.md)."""
import numpy as np
import pytest
import tensorflow as tf

import regularizers as R


def _coords(shape, spacing):
    """Physical coordinates [*shape, D] in mm."""
    grids = np.meshgrid(*[np.arange(n) * h for n, h in zip(shape, spacing)], indexing="ij")
    return np.stack(grids, -1)


def _disp_from_physical(u_mm, spacing):
    """Physical displacement (mm) -> voxel units, batch axis added."""
    return tf.constant((u_mm / np.asarray(spacing))[None], tf.float32)


def _interior(x, ndim):
    """Drop the last slice along every spatial axis (forward differences are 0 there)."""
    return x[(slice(None),) + (slice(0, -1),) * ndim]


CASES = [((12, 10), (1.0, 1.0)), ((12, 10), (0.7, 2.5)),
         ((8, 7, 9), (1.0, 1.0, 1.0)), ((8, 7, 9), (1.5, 0.8, 3.0))]


@pytest.mark.parametrize("shape,spacing", CASES)
def test_dilation_energy(shape, spacing):
    d, a = len(shape), 0.03
    x = _coords(shape, spacing)
    disp = _disp_from_physical(a * x, spacing)
    dens = R.elastic_energy_density(disp, 1.0, 1.0, spacing).numpy()
    expected = 0.5 * (d * a) ** 2 + a ** 2 * d
    np.testing.assert_allclose(_interior(dens, d), expected, rtol=1e-4)
    # with other parameters: lam/2 (D a)^2 + mu a^2 D
    dens = R.elastic_energy_density(disp, 0.3, 0.8, spacing).numpy()
    np.testing.assert_allclose(_interior(dens, d), 0.15 * (d * a) ** 2 + 0.8 * a ** 2 * d, rtol=1e-4)


@pytest.mark.parametrize("shape,spacing", CASES)
def test_rotation_and_translation_have_no_energy(shape, spacing):
    d, theta = len(shape), 0.02
    x = _coords(shape, spacing)
    rot = np.zeros_like(x)
    rot[..., 0], rot[..., 1] = -theta * x[..., 1], theta * x[..., 0]  # infinitesimal rotation
    trans = np.broadcast_to(np.array([1.3, -0.4, 2.0][:d]), x.shape)
    e = R.elastic_regularizer(_disp_from_physical(trans, spacing), 1.0, 1.0, spacing).numpy()
    assert e.shape == (1,) and abs(e[0]) < 1e-10
    # a rotation is strain free wherever both forward neighbours exist (interior); on the last
    # slices the missing neighbour zeroes one of the two shear terms (the zero-outside boundary rule, CONVENTIONS.md)
    dens = R.elastic_energy_density(_disp_from_physical(rot, spacing), 1.0, 1.0, spacing).numpy()
    assert np.abs(_interior(dens, d)).max() < 1e-9
    assert dens.max() > 1e-6  # the boundary rule is real, not an accident of the test field
    # the rotation does have diffusion energy: 2 theta^2 in the interior
    dens = R.diffusion_energy_density(_disp_from_physical(rot, spacing), 1.0, spacing).numpy()
    np.testing.assert_allclose(_interior(dens, d), 2 * theta ** 2, rtol=1e-4)


def test_shear_with_anisotropic_spacing():
    """u_0 = g * x_1 (physical): eps_01 = g/2, energy mu g^2 / 2 (+0 from div)."""
    shape, spacing, g = (10, 12, 6), (0.5, 2.0, 1.2), 0.05
    x = _coords(shape, spacing)
    u = np.zeros_like(x)
    u[..., 0] = g * x[..., 1]
    disp = _disp_from_physical(u, spacing)
    dens = R.elastic_energy_density(disp, 0.7, 0.6, spacing).numpy()
    np.testing.assert_allclose(_interior(dens, 3), 0.6 * g ** 2 / 2, rtol=1e-4)
    # the same voxel field read with unit spacing gives a different (wrong) strain
    dens_vox = R.elastic_energy_density(disp, 0.7, 0.6).numpy()
    assert not np.allclose(_interior(dens_vox, 3), 0.6 * g ** 2 / 2, rtol=1e-2)


def test_last_slice_difference_is_zero():
    """A forward neighbour outside the image contributes nothing."""
    disp = np.zeros((1, 5, 4, 2), np.float32)
    disp[0, -1, :, 0] = 1.0  # only the last row moves, along axis 0
    g = R.forward_gradients(tf.constant(disp))
    np.testing.assert_allclose(g[0].numpy()[0, 3, :, 0], 1.0)
    np.testing.assert_allclose(g[0].numpy()[0, 4, :, 0], 0.0)
    assert np.all(g[1].numpy() == 0)


def test_per_sample_parameters_do_not_mix():
    rng = np.random.default_rng(0)
    disp = tf.constant(rng.normal(size=(3, 9, 8, 2)), tf.float32)
    lam, mu = np.array([0.1, 0.5, 0.9], np.float32), np.array([0.2, 0.0, 1.0], np.float32)
    batched = R.elastic_regularizer(disp, lam, mu).numpy()
    single = [R.elastic_regularizer(disp[b:b + 1], lam[b:b + 1], mu[b:b + 1]).numpy()[0] for b in range(3)]
    np.testing.assert_allclose(batched, single, rtol=1e-6)


@pytest.mark.parametrize("shape", [(9, 8), (6, 5, 7)])
def test_constant_maps_equal_global(shape):
    rng = np.random.default_rng(1)
    d = len(shape)
    disp = tf.constant(rng.normal(size=(2, *shape, d)), tf.float32)
    lam, mu = np.array([0.3, 0.8], np.float32), np.array([0.6, 0.1], np.float32)
    lam_map = np.broadcast_to(lam.reshape(2, *([1] * d), 1), (2, *shape, 1))
    mu_map = np.broadcast_to(mu.reshape(2, *([1] * d), 1), (2, *shape, 1))
    np.testing.assert_allclose(R.elastic_regularizer(disp, lam_map, mu_map).numpy(),
                               R.elastic_regularizer(disp, lam, mu).numpy(), rtol=1e-6)
    np.testing.assert_allclose(R.diffusion_regularizer(disp, lam_map).numpy(),
                               R.diffusion_regularizer(disp, lam).numpy(), rtol=1e-6)


def test_spatial_map_weights_voxels():
    """Energy only where the map is non-zero: map = indicator of the left half."""
    rng = np.random.default_rng(2)
    disp = tf.constant(rng.normal(size=(1, 8, 8, 2)), tf.float32)
    m = np.zeros((1, 8, 8, 1), np.float32)
    m[:, :4] = 1.0
    dens = R.elastic_energy_density(disp, 1.0, 1.0).numpy()
    np.testing.assert_allclose(R.elastic_regularizer(disp, m, m).numpy()[0], dens[0, :4].sum() / 64, rtol=1e-5)


def test_gradient_is_finite():
    rng = np.random.default_rng(3)
    disp = tf.Variable(rng.normal(size=(2, 7, 6, 5, 3)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(R.elastic_regularizer(disp, [0.5, 1.0], [0.2, 0.4], (1.0, 2.0, 0.5))
                             + R.diffusion_regularizer(disp, [0.5, 1.0]))
    grad = tape.gradient(loss, disp).numpy()
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


def test_bad_input_raises():
    with pytest.raises(ValueError, match="channels"):
        R.elastic_regularizer(tf.zeros((1, 8, 8, 3)), 1.0, 1.0)
    with pytest.raises(ValueError, match="shape"):
        R.elastic_regularizer(tf.zeros((8, 8)), 1.0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        R.elastic_regularizer(tf.zeros((1, 8, 8, 2)), 1.0, 1.0, spacing=(1.0, -1.0))
    with pytest.raises(ValueError, match="entries"):
        R.elastic_regularizer(tf.zeros((1, 8, 8, 2)), 1.0, 1.0, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="lam"):
        R.elastic_regularizer(tf.zeros((1, 8, 8, 2)), tf.zeros((1, 4, 4, 2)), 1.0)
