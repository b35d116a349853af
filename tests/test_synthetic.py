"""Tests of the synthetic elastic phantoms and the Navier-Cauchy solver (numpy + scipy only)."""
import numpy as np
import pytest
import scipy.ndimage as ndi

from hypermorph_spatially_adaptive import synthetic as S


# ----------------------------------------------------------------------------- helpers
def _manufactured(shape, lengths, lam, mu, modes, amps):
    """Grid, exact u* (sin products vanishing on the border) and f = -div sigma(u*)."""
    D = len(shape)
    axes = [np.linspace(0.0, L, n) for n, L in zip(shape, lengths)]
    X = np.meshgrid(*axes, indexing="ij")
    c = [[np.pi * modes[j][k] / lengths[k] for k in range(D)] for j in range(D)]

    def factor(j, k, deriv):
        arg = c[j][k] * X[k]
        if deriv == 0:
            return np.sin(arg)
        if deriv == 1:
            return c[j][k] * np.cos(arg)
        return -c[j][k] ** 2 * np.sin(arg)

    def deriv(j, orders):
        out = amps[j] * np.ones(shape)
        for k in range(D):
            out = out * factor(j, k, orders[k])
        return out

    u = np.stack([deriv(j, [0] * D) for j in range(D)], axis=-1)
    f = np.zeros(shape + (D,))
    for j in range(D):
        lap = sum(deriv(j, [2 if k == p else 0 for k in range(D)]) for p in range(D))
        graddiv = np.zeros(shape)
        for i in range(D):
            orders = [0] * D
            orders[i] += 1
            orders[j] += 1
            graddiv += deriv(i, orders)
        f[..., j] = -(mu * lap + (lam + mu) * graddiv)
    return u, f


def _manufactured_error(n, lengths, lam=3.0, mu=1.0, method="auto"):
    D = len(lengths)
    shape = (n,) * D
    modes = [[1 + (j + k) % 2 for k in range(D)] for j in range(D)]
    amps = [1.0, -0.7, 0.5][:D]
    u_star, f = _manufactured(shape, lengths, lam, mu, modes, amps)
    spacing = [L / (n - 1) for L in lengths]
    u = S.solve_navier_cauchy(np.full(shape, lam), np.full(shape, mu), f, spacing=spacing,
                              method=method, rtol=1e-12)
    return np.abs(u - u_star).max() / np.abs(u_star).max()


def _stiff_disk_strain(shape, stiff):
    D = len(shape)
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r2 = sum(x ** 2 for x in g)
    disk = r2 < 0.3 ** 2
    lam = np.full(shape, 2.0)
    mu = np.full(shape, 1.0)
    lam[disk] *= stiff
    mu[disk] *= stiff
    force = np.zeros(shape + (D,))
    blob = np.exp(-0.5 * ((g[0] - 0.2) ** 2 + sum(x ** 2 for x in g[1:])) / 0.35 ** 2)
    force[..., 0] = blob
    force[..., -1] = 0.5 * blob
    u = S.solve_navier_cauchy(lam, mu, force)
    inner = ndi.binary_erosion(disk)
    return S.strain_norm(u)[inner].mean()


def _dice(a, b, c):
    a, b = a == c, b == c
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def pair2d():
    return S.generate_pair(7, (64, 64))


@pytest.fixture(scope="module")
def pair3d():
    return S.generate_pair(11, (24, 28, 24), max_disp=2.0)


# ----------------------------------------------------------------------------- parameters
def test_default_lame_physics():
    assert S.CLASS_NAMES == ("lung", "bone", "liver")
    assert set(S.DEFAULT_LAME) == {0, 1, 2, 3}
    mu = {c: S.DEFAULT_LAME[c][1] for c in S.DEFAULT_LAME}
    assert mu[1] < mu[0] < mu[3] < mu[2]          # lung < background < liver < bone
    assert mu[2] / mu[1] >= 20
    for c, (lam, m) in S.DEFAULT_LAME.items():
        nu = lam / (2.0 * (lam + m))
        assert 0.0 < nu <= 0.45 + 1e-12, (c, nu)
    ratio = {c: lam / m for c, (lam, m) in S.DEFAULT_LAME.items()}
    assert ratio[1] < ratio[3]                    # lung compressible, liver nearly incompressible


# ----------------------------------------------------------------------------- discretization
@pytest.mark.parametrize("shape,spacing", [((9, 11), (1.0, 1.5)), ((6, 7, 5), (1.0, 0.7, 1.3))])
def test_assembly_symmetric_energy_spd(shape, spacing):
    rng = np.random.default_rng(0)
    D = len(shape)
    lam = rng.uniform(0.5, 60, shape)
    mu = rng.uniform(0.5, 40, shape)
    A, interior = S.assemble_elasticity(lam, mu, spacing)
    assert abs(A - A.T).max() == 0.0
    u = np.zeros(shape + (D,))
    u[interior] = rng.standard_normal((int(interior.sum()), D))
    x = np.concatenate([u[..., j][interior] for j in range(D)])
    assert np.isclose(0.5 * x @ (A @ x), S.elastic_energy(u, lam, mu, spacing), rtol=1e-12)
    assert np.linalg.eigvalsh(A.toarray()).min() > 0
    # rigid translation of the interior has only boundary strain: A applied to a constant
    # field in the deep interior vanishes (consistency)
    const = np.concatenate([np.full(int(interior.sum()), 1.0 + j) for j in range(D)])
    lam_c = np.full(shape, 3.0)
    Ac, _ = S.assemble_elasticity(lam_c, np.ones(shape), spacing)
    r = (Ac @ const).reshape((D,) + tuple(n - 2 for n in shape))
    deep = tuple(slice(1, -1) for _ in shape)
    assert np.abs(r[(slice(None),) + deep]).max() < 1e-12


def test_manufactured_solution_2d_second_order():
    e1 = _manufactured_error(17, (1.0, 1.5))
    e2 = _manufactured_error(33, (1.0, 1.5))
    e3 = _manufactured_error(65, (1.0, 1.5))
    assert e3 < 2e-3
    assert 3.3 < e1 / e2 < 4.8, (e1, e2)
    assert 3.6 < e2 / e3 < 4.4, (e2, e3)


def test_manufactured_solution_3d_second_order():
    e1 = _manufactured_error(9, (1.0, 1.0, 1.0), method="cg")
    e2 = _manufactured_error(17, (1.0, 1.0, 1.0), method="cg")
    assert e2 < 2e-2
    assert 3.0 < e1 / e2 < 5.0, (e1, e2)


@pytest.mark.parametrize("shape", [(40, 44), (10, 11, 10)])
def test_cg_matches_direct_on_phantom(shape):
    rng = np.random.default_rng(3)
    seg, _ = S.make_phantom(shape, rng)
    lam, mu = S.lame_maps(seg)
    f = S.random_body_force(shape, rng, seg=seg)
    ud, info_d = S.solve_navier_cauchy(lam, mu, f, method="direct", return_info=True)
    uc, info_c = S.solve_navier_cauchy(lam, mu, f, method="cg", return_info=True)
    assert info_c["method"] == "cg" and info_c["iterations"] > 0
    assert np.abs(uc - ud).max() <= 1e-6 * np.abs(ud).max()
    # Dirichlet border
    for ax in range(len(shape)):
        assert np.all(np.take(uc, 0, axis=ax) == 0) and np.all(np.take(uc, -1, axis=ax) == 0)


# ----------------------------------------------------------------------------- heterogeneity
@pytest.mark.parametrize("shape", [(48, 48), (20, 20, 20)])
def test_stiff_region_deforms_less(shape):
    soft = _stiff_disk_strain(shape, 1.0)
    stiff = _stiff_disk_strain(shape, 40.0)
    assert stiff < 0.25 * soft, (stiff, soft)


def test_generated_pair_bone_strains_less_than_lung(pair2d, pair3d):
    for p in (pair2d, pair3d):
        e = S.strain_norm(p["disp"])
        seg = p["fixed_seg"]
        bone = ndi.binary_erosion(seg == 2) if ndi.binary_erosion(seg == 2).sum() > 20 else seg == 2
        assert e[bone].mean() < 0.5 * e[seg == 1].mean()


# ----------------------------------------------------------------------------- pairs
def test_determinism():
    a = S.generate_pair(5, (40, 36))
    b = S.generate_pair(5, (40, 36))
    c = S.generate_pair(6, (40, 36))
    for k in ("fixed", "moving", "fixed_seg", "moving_seg", "disp", "force", "fixed_kp",
              "moving_kp"):
        np.testing.assert_array_equal(a[k], b[k])
    assert a["lame"] == b["lame"]
    for k in ("fixed", "moving", "disp"):
        assert not np.array_equal(a[k], c[k])


@pytest.mark.parametrize("which", ["pair2d", "pair3d"])
def test_pair_shapes_dtypes_labels(which, request):
    p = request.getfixturevalue(which)
    shape = p["fixed"].shape
    D = len(shape)
    assert p["moving"].shape == shape and p["fixed_seg"].shape == shape
    assert p["moving_seg"].shape == shape and p["disp"].shape == shape + (D,)
    assert p["fixed"].dtype == np.float32 and p["moving"].dtype == np.float32
    assert p["disp"].dtype == np.float32
    assert p["fixed_seg"].dtype == np.int32 and p["moving_seg"].dtype == np.int32
    for k in ("fixed", "moving"):
        assert p[k].min() >= 0.0 and p[k].max() <= 1.0
    assert set(np.unique(p["fixed_seg"])) == {0, 1, 2, 3}
    assert set(np.unique(p["moving_seg"])) == {0, 1, 2, 3}
    assert p["lame"] == S.DEFAULT_LAME
    assert p["fixed_kp"].shape == (50, D) and p["moving_kp"].shape == (50, D)
    assert p["force"].shape == shape + (D,)
    # textured: intensity varies inside every tissue
    for c in range(4):
        assert p["fixed"][p["fixed_seg"] == c].std() > 0.01
    # displacement size: proportional default (2.5-5 voxels at 128) or max_disp; Jacobian > 0
    mag = np.linalg.norm(p["disp"], axis=-1).max()
    if which == "pair2d":
        assert 2.5 * np.mean(shape) / 128 - 1e-4 <= mag <= 5.0 * np.mean(shape) / 128 + 1e-4
    else:
        assert abs(mag - 2.0) < 1e-4
    g = np.stack([np.stack(np.gradient(p["disp"][..., j].astype(float)), -1) for j in range(D)],
                 -2)
    assert np.linalg.det(np.eye(D) + g).min() > 0.3


@pytest.mark.parametrize("which", ["pair2d", "pair3d"])
def test_pair_convention_warp_reproduces_fixed(which, request):
    p = request.getfixturevalue(which)
    fixed, moving, disp = p["fixed"], p["moving"], p["disp"]
    body = ndi.binary_erosion(fixed > 0.1, iterations=2)

    def err(scale):
        return np.abs(S.warp(moving, scale * disp) - fixed)[body].mean()

    # the ground truth brings moving onto fixed: small error (floor = linear interpolation of
    # the texture twice), much better than no warp, than the opposite sign convention and than
    # a too short / too long displacement
    e1 = err(1.0)
    assert e1 < 0.02 and e1 < (0.6 if which == "pair2d" else 0.75) * err(0.0), (e1, err(0.0))
    assert err(-1.0) > 1.5 * e1
    assert e1 < err(0.6) and e1 < err(1.4)
    seg_w = S.warp(p["moving_seg"], disp, order=0)
    for c in (1, 2, 3):
        assert _dice(seg_w, p["fixed_seg"], c) > 0.95
    # keypoints: inside tissues, moving_kp = fixed_kp + disp(fixed_kp) (ground-truth TRE 0)
    fkp, mkp = p["fixed_kp"], p["moving_kp"]
    idx = tuple(np.round(fkp).astype(int).T)
    assert np.all(p["fixed_seg"][idx] > 0)
    u_kp = np.stack([ndi.map_coordinates(disp[..., j], fkp.T, order=1)
                     for j in range(disp.shape[-1])], -1)
    np.testing.assert_allclose(mkp, fkp + u_kp, atol=1e-5)
    assert np.abs(mkp - fkp).max() > 0.1
    # the moving keypoints land on the same tissue in the moving labels (mostly)
    lab_m = ndi.map_coordinates(p["moving_seg"], mkp.T, order=0)
    assert np.mean(lab_m == p["fixed_seg"][idx]) > 0.85


def test_cubic_moving_image_option(pair2d):
    q = S.generate_pair(7, (64, 64), image_order=3)
    np.testing.assert_array_equal(q["disp"], pair2d["disp"])
    body = ndi.binary_erosion(q["fixed"] > 0.1, iterations=2)
    e_lin = np.abs(S.warp(pair2d["moving"], pair2d["disp"]) - pair2d["fixed"])[body].mean()
    e_cub = np.abs(S.warp(q["moving"], q["disp"]) - q["fixed"])[body].mean()
    assert e_cub < 0.8 * e_lin
    assert q["moving"].min() >= 0 and q["moving"].max() <= 1


def test_force_reproduces_disp_and_overrides(pair2d):
    lam, mu = S.lame_maps(pair2d["fixed_seg"], pair2d["lame"])
    u = S.solve_navier_cauchy(lam, mu, pair2d["force"].astype(np.float64))
    np.testing.assert_allclose(u, pair2d["disp"], atol=1e-4 * np.abs(pair2d["disp"]).max())
    q = S.generate_pair(7, (64, 64), lame={2: (6.0, 4.0)}, max_disp=2.0)
    assert q["lame"][2] == (6.0, 4.0) and q["lame"][1] == S.DEFAULT_LAME[1]
    assert np.isclose(np.linalg.norm(q["disp"], axis=-1).max(), 2.0, atol=1e-4)
    np.testing.assert_array_equal(q["fixed"], pair2d["fixed"])  # phantom independent of lame
    # softer "bone": bone strain relative to lung strain goes up
    def rel(p):
        e = S.strain_norm(p["disp"])
        return e[p["fixed_seg"] == 2].mean() / e[p["fixed_seg"] == 1].mean()
    assert rel(q) > 2 * rel(pair2d)


def test_inverse_field_and_helpers():
    rng = np.random.default_rng(1)
    seg, img = S.make_phantom((30, 34), rng)
    assert seg.dtype == np.int32 and img.dtype == np.float32
    f = S.random_body_force((30, 34), rng, seg=seg, amplitude=2.0)
    assert f.shape == (30, 34, 2)
    assert np.isclose(np.linalg.norm(f, axis=-1).max(), 2.0)
    lam, mu = S.lame_maps(seg)
    u = S.solve_navier_cauchy(lam, mu, f)
    u *= 2.0 / np.linalg.norm(u, axis=-1).max()
    v = S.invert_displacement(u)
    grid = np.indices(u.shape[:-1]).astype(float)

    def compose(a, b):  # a(x) + b(x + a(x))
        return a + np.stack([ndi.map_coordinates(b[..., j], grid + np.moveaxis(a, -1, 0),
                                                 order=1, mode="nearest") for j in range(2)], -1)

    assert np.abs(compose(v, u)).max() < 1e-3          # the defining fixed-point equation
    assert np.abs(compose(u, v)).mean() < 0.02         # inverse up to interpolation error
    with pytest.raises(ValueError):
        S.lame_maps(np.array([[0, 7]]))
