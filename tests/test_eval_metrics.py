"""Tests for eval_metrics against independent (hand-counted / brute-force) computations."""
import itertools
import os
import sys

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import eval_metrics as em  # noqa: E402


# --------------------------------------------------------------------------------------
# independent reference implementations
# --------------------------------------------------------------------------------------
def brute_surface_coords(mask):
    """Voxels of mask with a face neighbour outside the mask or outside the image (loops)."""
    coords = []
    shape = mask.shape
    for idx in itertools.product(*[range(s) for s in shape]):
        if not mask[idx]:
            continue
        boundary = False
        for ax in range(mask.ndim):
            for step in (-1, 1):
                nb = list(idx)
                nb[ax] += step
                if nb[ax] < 0 or nb[ax] >= shape[ax] or not mask[tuple(nb)]:
                    boundary = True
        if boundary:
            coords.append(idx)
    return np.array(coords, dtype=np.float64)


def brute_hd95(mask_a, mask_b, spacing, mode="pooled"):
    ca = brute_surface_coords(mask_a) * np.asarray(spacing)
    cb = brute_surface_coords(mask_b) * np.asarray(spacing)
    d = cdist(ca, cb)
    d_ab, d_ba = d.min(axis=1), d.min(axis=0)
    if mode == "pooled":
        return np.percentile(np.concatenate([d_ab, d_ba]), 95)
    return max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))


def brute_jacdet(disp):
    """Per-voxel det(I + J), J[i, j] = d u_j / d x_i by explicit central/one-sided diffs."""
    spatial = disp.shape[:-1]
    ndim = len(spatial)
    out = np.zeros(spatial)
    for idx in itertools.product(*[range(s) for s in spatial]):
        jac = np.eye(ndim)
        for i in range(ndim):
            lo, hi = list(idx), list(idx)
            if idx[i] == 0:
                hi[i] += 1
                h = 1.0
            elif idx[i] == spatial[i] - 1:
                lo[i] -= 1
                h = 1.0
            else:
                lo[i] -= 1
                hi[i] += 1
                h = 2.0
            for j in range(ndim):
                jac[i, j] += (disp[tuple(hi) + (j,)] - disp[tuple(lo) + (j,)]) / h
        out[idx] = np.linalg.det(jac)
    return out


def random_blob(rng, shape, threshold=0.55, sigma=1.5):
    noise = ndimage.gaussian_filter(rng.random(shape), sigma)
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    return noise > threshold


# --------------------------------------------------------------------------------------
# Dice
# --------------------------------------------------------------------------------------
def test_dice_identity_disjoint_and_absent():
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 3, size=(8, 9))
    seg[0, 0], seg[0, 1] = 1, 2
    np.testing.assert_allclose(em.dice_per_class(seg, seg, 2), [1.0, 1.0])

    a = np.zeros((6, 6), int)
    b = np.zeros((6, 6), int)
    a[:2, :] = 1
    b[4:, :] = 1
    d = em.dice_per_class(a, b, 3)
    assert d[0] == 0.0
    assert np.isnan(d[1]) and np.isnan(d[2])  # absent in both -> NaN
    assert em.mean_dice(a, b, 3) == 0.0


def test_dice_hand_counted():
    a = np.zeros((5, 5), int)
    b = np.zeros((5, 5), int)
    a[0:2, 0:3] = 1  # 6 voxels
    b[1:3, 0:2] = 1  # 4 voxels, overlap a[1, 0:2] = 2 voxels
    a[4, 4] = 2
    b[4, 3:5] = 2  # class 2: |A|=1, |B|=2, overlap 1
    d = em.dice_per_class(a, b, 2)
    np.testing.assert_allclose(d, [2 * 2 / (6 + 4), 2 * 1 / (1 + 2)])
    assert em.mean_dice(a, b, 2) == pytest.approx((0.4 + 2 / 3) / 2)


def test_dice_3d_float_labels():
    a = np.zeros((4, 4, 4))
    b = np.zeros((4, 4, 4))
    a[1:3, 1:3, 1:3] = 1.0  # 8
    b[1:3, 1:3, 2:4] = 1.0  # 8, overlap 4
    assert em.dice_per_class(a, b, 1)[0] == pytest.approx(0.5)


# --------------------------------------------------------------------------------------
# HD95
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,spacing,seed",
    [
        ((20, 24), (0.7, 1.3), 1),
        ((17, 15), (2.0, 0.5), 2),
        ((10, 12, 9), (1.5, 0.8, 2.5), 3),
        ((9, 11, 8), (0.6, 1.0, 1.7), 4),
    ],
)
@pytest.mark.parametrize("mode", ["pooled", "max"])
def test_hd95_against_brute_force(shape, spacing, seed, mode):
    rng = np.random.default_rng(seed)
    seg_a = np.zeros(shape, int)
    seg_b = np.zeros(shape, int)
    for c in (1, 2):
        seg_a[random_blob(rng, shape) & (seg_a == 0)] = c
        seg_b[random_blob(rng, shape) & (seg_b == 0)] = c
    got = em.hd95_per_class(seg_a, seg_b, 2, spacing, mode=mode)
    for c in (1, 2):
        ma, mb = seg_a == c, seg_b == c
        assert ma.any() and mb.any()
        np.testing.assert_allclose(got[c - 1], brute_hd95(ma, mb, spacing, mode), rtol=1e-10)


def test_hd95_known_value_and_empty_class():
    # two single-voxel "shapes" 3 voxels apart along axis 1 with spacing 2 mm -> 6 mm
    a = np.zeros((5, 7), int)
    b = np.zeros((5, 7), int)
    a[2, 1] = 1
    b[2, 4] = 1
    b[0, 0] = 2  # class 2 only in b -> lost: the image diagonal; class 3 in neither -> NaN
    h = em.hd95_per_class(a, b, 3, (1.0, 2.0))
    assert h[0] == pytest.approx(6.0)
    # diagonal between the centres of voxels (0, 0) and (4, 6): sqrt((4 * 1)^2 + (6 * 2)^2) mm
    assert h[1] == pytest.approx(np.sqrt(16.0 + 144.0)) and np.isnan(h[2])
    assert em.image_diagonal_mm((5, 7), (1.0, 2.0)) == pytest.approx(np.sqrt(160.0))
    # the penalty is at least any HD95 two non-empty masks can have in this image
    far = np.zeros((5, 7), int)
    far[0, 0], b2 = 1, np.zeros((5, 7), int)
    b2[4, 6] = 1
    assert em.hd95_per_class(far, b2, 1, (1.0, 2.0))[0] == pytest.approx(h[1])
    lost_nan = em.hd95_per_class(a, b, 3, (1.0, 2.0), lost="nan")
    assert lost_nan[0] == pytest.approx(6.0) and np.isnan(lost_nan[1]) and np.isnan(lost_nan[2])
    with pytest.raises(ValueError, match="lost must be"):
        em.hd95_per_class(a, b, 3, (1.0, 2.0), lost="skip")
    np.testing.assert_allclose(em.hd95_per_class(a, a, 1, (1.0, 2.0)), [0.0])


# --------------------------------------------------------------------------------------
# TRE and keypoints
# --------------------------------------------------------------------------------------
def affine_disp(shape, A, b):
    grid = np.indices(shape, dtype=np.float64)  # [D, *spatial]
    return np.moveaxis(np.tensordot(A, grid, axes=(1, 0)), 0, -1) + b


@pytest.mark.parametrize("ndim", [2, 3])
def test_tre_affine_field(ndim):
    rng = np.random.default_rng(10 + ndim)
    shape = (12, 10, 8)[:ndim]
    spacing = np.array((0.8, 1.7, 2.5)[:ndim])
    A = rng.uniform(-0.05, 0.05, size=(ndim, ndim))
    b = rng.uniform(-1.0, 1.0, size=ndim)
    disp = affine_disp(shape, A, b)
    K = 6
    p_f = rng.uniform(1.0, np.array(shape) - 2.0, size=(K, ndim))
    exact = p_f + p_f @ A.T + b
    np.testing.assert_allclose(em.warp_keypoints(p_f, disp), exact, atol=1e-10)
    np.testing.assert_allclose(em.tre(p_f, exact, disp, spacing), 0.0, atol=1e-10)

    offset = rng.normal(size=(K, ndim))
    p_m = exact + offset
    expected = np.sqrt(((offset * spacing) ** 2).sum(axis=1))
    np.testing.assert_allclose(em.tre(p_f, p_m, disp, spacing), expected, rtol=1e-10)


def test_tre_channel_convention():
    # displacement only along axis 1 (channel 1): keypoint moves along axis 1 only
    disp = np.zeros((6, 7, 2))
    disp[..., 1] = 2.0
    p_f = np.array([[2.0, 3.0]])
    np.testing.assert_allclose(em.warp_keypoints(p_f, disp), [[2.0, 5.0]])
    np.testing.assert_allclose(em.tre(p_f, [[2.0, 3.0]], disp, (1.0, 3.0)), [6.0])


# --------------------------------------------------------------------------------------
# Jacobian, %negJ, SDlogJ
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7, 8), (5, 6, 7)])
def test_zero_field_jacobian(shape):
    disp = np.zeros(shape + (len(shape),))
    np.testing.assert_array_equal(em.jacobian_determinant(disp), 1.0)
    assert em.percent_negative_jacobian(disp) == 0.0
    assert em.sdlogj(disp) == 0.0
    assert em.sdlogj(disp, convention="learn2reg") == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("shape", [(9, 8), (6, 7, 5)])
@pytest.mark.parametrize("a", [0.3, -0.2])
def test_dilation_jacobian(shape, a):
    ndim = len(shape)
    disp = affine_disp(shape, a * np.eye(ndim), np.zeros(ndim))
    np.testing.assert_allclose(em.jacobian_determinant(disp), (1 + a) ** ndim, rtol=1e-12)
    assert em.percent_negative_jacobian(disp) == 0.0
    assert em.sdlogj(disp) == pytest.approx(0.0, abs=1e-12)
    assert em.sdlogj(disp, convention="learn2reg") == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_folded_box_region(ndim):
    # u_0(x) = f(x_0) * 1[x_1, (x_2) inside a box], f piecewise linear, slope -3 on [a, b].
    # det = 1 + f'(x_0) * 1[box]: -2 strictly inside [a, b], 1 - 1.5 = -0.5 at the kinks
    # x_0 = a, b (central differences average the slopes), 1 elsewhere.
    shape = (14, 10, 9)[:ndim]
    lo_a, hi_b = 4, 8
    box = [(2, 7), (3, 6)][: ndim - 1]  # half-open ranges along axes 1..
    x0 = np.arange(shape[0], dtype=np.float64)
    f = -3.0 * (np.clip(x0, lo_a, hi_b) - lo_a)
    indicator = np.zeros(shape[1:])
    indicator[tuple(slice(s, e) for s, e in box)] = 1.0
    disp = np.zeros(shape + (ndim,))
    disp[..., 0] = f.reshape((-1,) + (1,) * (ndim - 1)) * indicator
    det = em.jacobian_determinant(disp)
    n_box = np.prod([e - s for s, e in box])
    expected_count = (hi_b - lo_a + 1) * n_box
    assert np.count_nonzero(det <= 0) == expected_count
    assert em.percent_negative_jacobian(disp) == pytest.approx(
        100.0 * expected_count / np.prod(shape)
    )
    inside = (slice(lo_a + 1, hi_b),) + tuple(slice(s, e) for s, e in box)
    np.testing.assert_allclose(det[inside], -2.0)
    np.testing.assert_allclose(det[(lo_a,) + inside[1:]], -0.5)
    np.testing.assert_allclose(det[(hi_b,) + inside[1:]], -0.5)
    np.testing.assert_allclose(em.jacobian_determinant(disp), brute_jacdet(disp), atol=1e-12)
    assert em.sdlogj(disp) > 1.0  # log(1e-9) clipped values dominate the spread


@pytest.mark.parametrize("shape", [(7, 6), (5, 6, 4)])
def test_jacobian_random_field_matches_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    disp = rng.normal(scale=0.4, size=shape + (len(shape),))
    det = em.jacobian_determinant(disp)
    np.testing.assert_allclose(det, brute_jacdet(disp), atol=1e-10)
    assert em.percent_negative_jacobian(disp) == pytest.approx(100.0 * np.mean(det <= 0))
    expected = np.std(np.log(np.clip(det, 1e-9, 1e9)))
    assert em.sdlogj(disp) == pytest.approx(expected, rel=1e-12)


def test_sdlogj_learn2reg_convention():
    # independent recomputation of the Learn2Reg recipe with scipy.ndimage.correlate
    rng = np.random.default_rng(7)
    disp = rng.normal(scale=0.3, size=(9, 8, 10, 3))
    kern = np.array([-0.5, 0.0, 0.5])
    jac = np.zeros((3, 3) + disp.shape[:-1])
    for i in range(3):
        k = kern.reshape([3 if ax == i else 1 for ax in range(3)])
        for j in range(3):
            jac[i, j] = ndimage.correlate(disp[..., j], k, mode="constant", cval=0.0)
    jac += np.eye(3).reshape(3, 3, 1, 1, 1)
    jac = jac[:, :, 2:-2, 2:-2, 2:-2]
    det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
    expected = np.log(np.clip(det + 3, 1e-9, 1e9)).std()
    assert em.sdlogj(disp, convention="learn2reg") == pytest.approx(expected, rel=1e-10)


# --------------------------------------------------------------------------------------
# warping
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(6, 7), (4, 5, 6)])
def test_zero_disp_is_identity(shape):
    rng = np.random.default_rng(3)
    ndim = len(shape)
    disp = np.zeros(shape + (ndim,))
    img = rng.normal(size=shape)
    np.testing.assert_allclose(em.warp_image(img, disp), img, atol=1e-12)
    img_c = rng.normal(size=shape + (2,))
    np.testing.assert_allclose(em.warp_image(img_c, disp), img_c, atol=1e-12)
    seg = rng.integers(0, 4, size=shape).astype(np.uint8)
    out = em.warp_labels(seg, disp)
    assert out.dtype == seg.dtype
    np.testing.assert_array_equal(out, seg)
    kp = rng.uniform(0, 3, size=(5, ndim))
    np.testing.assert_allclose(em.warp_keypoints(kp, disp), kp)


def test_integer_translation_of_labels_and_image():
    seg = np.zeros((12, 13), np.int32)
    seg[4:7, 5:9] = 1
    seg[6, 5] = 2
    t = (2, -1)
    disp = np.zeros((12, 13, 2))
    disp[..., 0], disp[..., 1] = t
    warped = em.warp_labels(seg, disp)
    # warped(x) = seg(x + t): the object moves by -t
    expected = np.zeros_like(seg)
    expected[2:5, 6:10] = 1
    expected[4, 6] = 2
    np.testing.assert_array_equal(warped, expected)
    img = seg.astype(float) * 1.5
    np.testing.assert_allclose(em.warp_image(img, disp), expected * 1.5)


def test_warp_image_linear_half_voxel():
    img = np.arange(5.0)[:, None] * np.ones((1, 3))
    disp = np.zeros((5, 3, 2))
    disp[..., 0] = 0.5
    out = em.warp_image(img, disp)
    np.testing.assert_allclose(out[:4, 1], [0.5, 1.5, 2.5, 3.5])
    assert out[4, 1] == 4.0  # nearest border mode


# --------------------------------------------------------------------------------------
# registration_metrics
# --------------------------------------------------------------------------------------
def test_registration_metrics_translation():
    fixed = np.zeros((16, 14), int)
    fixed[3:9, 4:10] = 1
    fixed[10:13, 2:6] = 2
    t = np.array([1, 2])
    moving = np.zeros_like(fixed)
    moving[3 + t[0]:9 + t[0], 4 + t[1]:10 + t[1]] = 1
    moving[10 + t[0]:13 + t[0], 2 + t[1]:6 + t[1]] = 2
    disp = np.zeros((16, 14, 2))
    disp[...] = t
    kp_f = np.array([[5.0, 6.0], [11.0, 3.5]])
    kp_m = kp_f + t
    spacing = (1.0, 0.5)
    m = em.registration_metrics(fixed, moving, disp, 3, spacing, kp_f, kp_m)
    assert set(m) == {"dice", "mean_dice", "hd95", "mean_hd95", "tre_mean",
                      "percent_neg_jac", "sdlogj"}
    np.testing.assert_allclose(m["dice"][:2], [1.0, 1.0])
    assert np.isnan(m["dice"][2]) and np.isnan(m["hd95"][2])
    assert m["mean_dice"] == 1.0 and m["mean_hd95"] == 0.0
    assert m["tre_mean"] == pytest.approx(0.0, abs=1e-12)
    assert m["percent_neg_jac"] == 0.0 and m["sdlogj"] == 0.0

    init = em.registration_metrics(fixed, moving, np.zeros_like(disp), 3, spacing)
    np.testing.assert_allclose(init["dice"][:2], em.dice_per_class(fixed, moving, 3)[:2])
    np.testing.assert_allclose(init["hd95"], em.hd95_per_class(fixed, moving, 3, spacing))
    assert np.isnan(init["tre_mean"])
    assert init["mean_dice"] < 1.0
    init_kp = em.registration_metrics(fixed, moving, np.zeros_like(disp), 3, spacing,
                                      kp_f, kp_m)
    assert init_kp["tre_mean"] == pytest.approx(np.hypot(1.0, 2 * 0.5))


# --------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------
def _ok():
    seg = np.zeros((6, 7), int)
    seg[1:3, 1:3] = 1
    return seg, np.zeros((6, 7, 2)), np.array([[1.0, 2.0], [3.0, 4.0]])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda s, d, k: em.jacobian_determinant(np.zeros((6, 7, 3))), "channels"),
        (lambda s, d, k: em.warp_labels(s, np.zeros((6, 7, 4, 2))), "channels"),
        (lambda s, d, k: em.jacobian_determinant(np.zeros((6, 7))), "shape"),
        (lambda s, d, k: em.warp_labels(np.zeros((5, 7), int), d), "shape mismatch"),
        (lambda s, d, k: em.warp_image(np.zeros((6, 8)), d), "shape mismatch"),
        (lambda s, d, k: em.registration_metrics(s, np.zeros((6, 6), int), d, 1, (1, 1)),
         "shape mismatch"),
        (lambda s, d, k: em.dice_per_class(s, np.zeros((7, 6), int), 1), "shape mismatch"),
        (lambda s, d, k: em.percent_negative_jacobian(np.where(d == 0, np.nan, d)), "NaN"),
        (lambda s, d, k: em.sdlogj(np.full((6, 7, 2), np.inf)), "NaN or inf"),
        (lambda s, d, k: em.tre(np.array([[np.nan, 1.0]]), k[:1], d, (1, 1)), "NaN"),
        (lambda s, d, k: em.warp_keypoints(np.array([[1.0, np.inf]]), d), "NaN"),
        (lambda s, d, k: em.tre(k, k, d, (1.0, 0.0)), "positive"),
        (lambda s, d, k: em.tre(k, k, d, (1.0, -2.0)), "positive"),
        (lambda s, d, k: em.tre(k, k, d, (1.0, 1.0, 1.0)), "length"),
        (lambda s, d, k: em.hd95_per_class(s, s, 1, (1.0,)), "length"),
        (lambda s, d, k: em.hd95_per_class(s, s, 1, (1.0, np.nan)), "positive"),
        (lambda s, d, k: em.registration_metrics(s, s, d, 1, (0.0, 1.0)), "positive"),
        (lambda s, d, k: em.dice_per_class(s + 1, s, 1), "outside 0..1"),
        (lambda s, d, k: em.dice_per_class(s - 1, s, 1), "outside 0..1"),
        (lambda s, d, k: em.hd95_per_class(s, s * 3, 2, (1, 1)), "outside 0..2"),
        (lambda s, d, k: em.registration_metrics(s * 5, s, d, 2, (1, 1)), "outside 0..2"),
        (lambda s, d, k: em.dice_per_class(s + 0.5, s, 2), "non-integer"),
        (lambda s, d, k: em.tre(k, k[:1], d, (1, 1)), "keypoints"),
        (lambda s, d, k: em.tre(k[:, :1], k[:, :1], d, (1, 1)), r"\[K, 2\]"),
        (lambda s, d, k: em.tre(k.ravel(), k.ravel(), d, (1, 1)), r"\[K, 2\]"),
        (lambda s, d, k: em.warp_keypoints(np.zeros((2, 3)), d), r"\[K, 2\]"),
        (lambda s, d, k: em.registration_metrics(s, s, d, 1, (1, 1), k, None), "together"),
        (lambda s, d, k: em.registration_metrics(s, s, d, 1, (1, 1), k, k[:1]), "keypoints"),
    ],
)
def test_validation_errors(call, match):
    seg, disp, kp = _ok()
    with pytest.raises(ValueError, match=match):
        call(seg, disp, kp)


def test_dense_epe_known_error_in_mm_and_per_class():
    """A constant error of (1, 0.5) voxel at spacing (2, 4) mm is sqrt(2^2 + 2^2) mm everywhere;
    the mean counts tissue voxels only and an absent class is NaN."""
    seg = np.zeros((8, 8), np.int32)
    seg[:4] = 1
    seg[4:, :4] = 3
    truth = np.random.default_rng(0).normal(size=(8, 8, 2)).astype(np.float32)
    disp = truth.copy()
    disp[seg == 1] += np.array([1.0, 0.5], np.float32)
    disp[seg == 0] += 100.0  # background: not counted
    out = em.dense_epe(disp, truth, (2.0, 4.0), seg, num_classes=3)
    # class 1 error sqrt(8), class 3 error 0, tissue mean weighted by voxel counts 32 : 16
    assert out["per_class"][0] == pytest.approx(np.sqrt(8.0), rel=1e-6)
    assert out["per_class"][2] == pytest.approx(0.0, abs=1e-6)
    assert np.isnan(out["per_class"][1])
    assert out["mean"] == pytest.approx(np.sqrt(8.0) * 32 / 48, rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        em.dense_epe(disp[:4], truth, (1.0, 1.0), seg)
