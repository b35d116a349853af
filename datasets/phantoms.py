"""Synthetic registration pairs with known linear-elastic physics (numpy + scipy only).

Purpose: a dataset in which the tissues *really* differ in stiffness, so that the question
"do tissue-specific elastic parameters help registration" has a ground truth.

Pipeline of :func:`generate_pair` (everything deterministic for a seed; generator version
:data:`GENERATOR_VERSION`, part of the dataset cache key):

1. :func:`make_phantom` draws a thorax-like phantom on the FIXED grid: label map
   (0 background = everything that is not a tissue, 1 "lung" soft, 2 "bone" stiff, 3 "liver"
   medium; the class order of :data:`CLASS_NAMES` matches the NLST order [lung, bone, liver]),
   a textured image in [0, 1] and the body mask.
2. Lamé maps ``lambda(x), mu(x)`` are read from the FIXED labels and the body mask
   (:func:`lame_maps`): label 0 inside the body is soft tissue (``DEFAULT_LAME[0]``, stiffer
   than lung), label 0 outside the body is air (:data:`DEFAULT_AIR_LAME`, mu = 1e-2 x lung: it
   transmits almost no stress but keeps the system positive definite).
3. :func:`random_body_force` draws a smooth body force (wide Gaussian blobs + a breathing-like
   push of the lungs), confined to the body and self-equilibrated (no net force or torque:
   :func:`equilibrate_force`), and :func:`.elasticity.solve_navier_cauchy` solves the heterogeneous
   linear-elastic equilibrium ``div sigma(u) + f = 0`` on the image padded with
   ``ceil(max_disp)`` voxels of air, ``u = 0`` on the padded border (so the body never presses
   the air against a wall; the solution is cropped back). The problem is linear, so the solution
   (and the force) is rescaled to the requested peak displacement, and further down if the 95th
   percentile of the lung principal strain would exceed ``max_lung_strain``;
   ``solve_navier_cauchy`` of ``pair["force"]`` (same maps and padding) reproduces
   ``pair["disp"]`` (up to float32 rounding).
4. The moving image is built so that ``moving(x + disp(x)) = fixed(x)`` (the registration
   convention: ``warped(x) = moving(x + disp(x))`` should match ``fixed``): the inverse
   ``v(y)`` with ``y + v(y) + disp(y + v(y)) = y`` is computed by a few fixed-point steps and
   damped Newton iteration to 1e-6 voxel (:func:`invert_displacement`), then
   ``moving = fixed o (id + v)`` (image: linear interpolation, or cubic with ``image_order=3``;
   labels: nearest neighbour). The inverse residual ``|v(y) + disp(y + v(y))|`` is checked at
   every moving-grid point that comes from the body; a pair above :data:`RESIDUAL_BOUND`
   (0.05 voxel) raises :class:`SyntheticPairError` naming the seed. Keypoints:
   ``moving_kp = fixed_kp + disp(fixed_kp)`` (exact by construction). ``pair["meta"]`` records
   the residuals, the minimum Jacobian and the lung strain.

Motion (``motion`` = peak displacement / mean image size, see :func:`motion_to_max_disp`):
measured on 64^2 and 128^2, seeds 0-59, the default 0.05 gives lung principal strain p95 of
0.14-0.25 (capped at 0.25, breathing-like), min Jacobian in the body >= 0.65 and an initial
mean Dice (lung, bone, liver) of 0.78 (64^2) / 0.79 (128^2); the "stress" preset 0.1 gives
p95 up to 0.5, min Jacobian >= 0.31 and initial mean Dice 0.63 / 0.64 (docs/data.md "Synthetic data").

Conventions: arrays are indexed ``[*shape]``; a displacement has shape ``[*shape, D]`` and
channel ``j`` is the displacement along array axis ``j`` in voxel units (voxelmorph 'ij').
Keypoints are ``[K, D]`` voxel (index) coordinates in the same axis order.

The linear-elastic solver (discretization, multigrid-preconditioned CG, strains) is
:mod:`datasets.elasticity`.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import scipy.ndimage as ndi

from eval_metrics import jacobian_determinant

from . import elasticity

__all__ = [
    "CLASS_NAMES", "DEFAULT_LAME", "DEFAULT_SHEAR_MODULUS", "DEFAULT_POISSON_RATIO",
    "lame_from_shear_poisson", "lame_maps",
    "make_phantom", "random_body_force", "warp",
    "invert_displacement", "sample_keypoints", "generate_pair",
    "GENERATOR_VERSION", "DEFAULT_AIR_LAME", "RESIDUAL_BOUND", "MOTION_PRESETS", "DEFAULT_MOTION",
    "LUNG_STRAIN_PER_MOTION",
    "equilibrate_force", "inverse_consistency", "motion_to_max_disp", "SyntheticPairError",
]

#: Tissue classes 1..3 (label 0 is background). Same order as the NLST classes [lung, bone, liver].
CLASS_NAMES = ("lung", "bone", "liver")

BACKGROUND, LUNG, BONE, LIVER = 0, 1, 2, 3


def lame_from_shear_poisson(mu, nu):
    """First Lamé parameter ``lambda = 2 mu nu / (1 - 2 nu)`` from shear modulus and Poisson
    ratio."""
    return 2.0 * mu * nu / (1.0 - 2.0 * nu)


#: Version of the generator's output (part of the dataset cache key, see ``datasets.py``).
#: 2: soft air outside the body, self-equilibrated forces confined to the body, Newton inverse
#: with a checked residual, strain-based default motion.
GENERATOR_VERSION = "2"
#: Modules whose source, with this file's, keys the synthetic cache (:func:`datasets.cache.generator_version`).
GENERATOR_DEPENDENCIES = (elasticity,)

#: Shear moduli (arbitrary consistent units): lung soft, liver medium, bone stiff; class 0
#: inside the body is generic soft tissue (muscle/fat/mediastinum), moderately stiff.
DEFAULT_SHEAR_MODULUS = {BACKGROUND: 2.0, LUNG: 1.0, BONE: 40.0, LIVER: 4.0}
#: Poisson ratios: lung compressible, liver nearly incompressible (capped at 0.45 so that the
#: system stays well conditioned).
DEFAULT_POISSON_RATIO = {BACKGROUND: 0.40, LUNG: 0.25, BONE: 0.30, LIVER: 0.45}
#: class -> (lambda, mu): {0: (8, 2), 1: (1, 1), 2: (60, 40), 3: (36, 4)}. Class 0 here is the
#: soft tissue INSIDE the body; outside the body label 0 is air (:data:`DEFAULT_AIR_LAME`).
DEFAULT_LAME = {
    c: (float(round(lame_from_shear_poisson(DEFAULT_SHEAR_MODULUS[c],
                                            DEFAULT_POISSON_RATIO[c]), 10)),
        float(DEFAULT_SHEAR_MODULUS[c]))
    for c in (BACKGROUND, LUNG, BONE, LIVER)
}
#: Air outside the body (label 0, outside the body mask): it transmits (almost) no stress. A
#: strictly zero modulus would leave the body floating (singular system), so the air is a very
#: soft, compressible filler: mu = 1e-2 x lung, Poisson ratio 0.1 -> (lambda, mu) = (0.0025, 0.01).
AIR_SHEAR_MODULUS = 0.01
AIR_POISSON_RATIO = 0.1
DEFAULT_AIR_LAME = (float(round(lame_from_shear_poisson(AIR_SHEAR_MODULUS, AIR_POISSON_RATIO), 10)),
                    AIR_SHEAR_MODULUS)

#: Bound (voxels) on the inverse-consistency residual ``|u(x) + v(x + u(x))|`` inside the body
#: that every generated pair must meet (:func:`generate_pair` raises otherwise).
RESIDUAL_BOUND = 0.05

#: Motion presets: peak displacement as a fraction of the mean image size (varied +-25 % per
#: pair). "default" keeps the lung strain breathing-like (see :func:`generate_pair`); "stress" is
#: the larger motion of generator version 1 (lung principal strain p95 ~0.5).
MOTION_PRESETS = {"default": 0.05, "stress": 0.1}
DEFAULT_MOTION = MOTION_PRESETS["default"]
#: ``motion`` m also caps the 95th percentile of the lung principal strain at
#: ``LUNG_STRAIN_PER_MOTION * m`` (:func:`motion_to_max_disp`): 0.25 at the default motion.
LUNG_STRAIN_PER_MOTION = 5.0


# ----------------------------------------------------------------------------------------------
# Lamé maps of the phantom's tissues (the solver: datasets.elasticity)
# ----------------------------------------------------------------------------------------------
def lame_maps(seg, lame=None, body=None, air=None):
    """Voxelwise ``(lambda_map, mu_map)`` (float64 ``[*shape]``) from a label map.

    Args:
        seg: integer label map ``[*shape]``.
        lame: ``{class: (lambda, mu)}``; missing classes fall back to :data:`DEFAULT_LAME`;
            labels without any entry raise.
        body: optional boolean body mask ``[*shape]``; voxels outside it get the air
            parameters ``air`` whatever their label (label 0 covers both the soft tissue inside
            the body and the air outside it). Without ``body`` every voxel uses its class.
        air: ``(lambda, mu)`` outside the body (default :data:`DEFAULT_AIR_LAME`).
    """
    table = dict(DEFAULT_LAME)
    if lame is not None:
        table.update({int(k): v for k, v in lame.items()})
    seg = np.asarray(seg)
    labels = np.unique(seg)
    missing = [int(l) for l in labels if int(l) not in table]
    if missing:
        raise ValueError(f"no Lamé parameters for labels {missing}")
    top = max(max(table), int(labels.max()))
    lut_l = np.zeros(top + 1)
    lut_m = np.zeros(top + 1)
    for k, (la, mu) in table.items():
        lut_l[k], lut_m[k] = la, mu
    lam_map, mu_map = lut_l[seg], lut_m[seg]
    if body is not None:
        body = np.asarray(body, dtype=bool)
        if body.shape != seg.shape:
            raise ValueError(f"body mask shape {body.shape} != label shape {seg.shape}")
        air_l, air_m = DEFAULT_AIR_LAME if air is None else (float(air[0]), float(air[1]))
        if not air_m > 0 or air_l < 0:
            raise ValueError(f"air needs mu > 0 and lambda >= 0, got {(air_l, air_m)}")
        lam_map[~body] = air_l
        mu_map[~body] = air_m
    return lam_map, mu_map



# ----------------------------------------------------------------------------------------------
# Phantom
# ----------------------------------------------------------------------------------------------
def _norm_coords(shape):
    """Normalized coordinates in [-1, 1] per axis (voxel centres), as an open grid."""
    return np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij", sparse=True)


def _smooth_noise(shape, rng, sigma):
    f = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    s = f.std()
    return f / s if s > 0 else f


def make_phantom(shape, rng, return_body: bool = False):
    """Thorax-like phantom: ``(seg int32 [*shape], image float32 [*shape] in [0, 1])``, and with
    ``return_body`` also the boolean body mask ``[*shape]`` (label 0 inside it is soft tissue,
    outside it air).

    Geometry in normalized coordinates (axis 0 = superior -> inferior, last axis = left-right,
    in 3D axis 1 = anterior-posterior; the 2D phantom is a coronal slice): a rounded body,
    two lung lobes in the upper half, a liver under the lung at the low end of the last axis
    (larger axis-0 index = inferior), a ring of
    ribs around the lungs (a shell banded along axis 0) and a segmented spine-like column
    between the lungs. Sizes/positions are jittered per draw. Intensities: per-tissue mean +
    smooth random texture + a little noise, slightly blurred (partial volume), clipped to [0, 1].
    """
    shape = tuple(int(s) for s in shape)
    D = len(shape)
    if D not in (2, 3):
        raise ValueError("shape must be 2D or 3D")
    if isinstance(rng, (int, np.integer)) or rng is None:
        rng = np.random.default_rng(rng)
    seg, body = _phantom_labels(shape, rng)
    img = _phantom_image(seg, body, rng)
    return (seg, img, body.astype(bool)) if return_body else (seg, img)


def _phantom_labels(shape: tuple, rng: np.random.Generator) -> tuple:
    """Tissue layout of :func:`make_phantom`: ``(seg int32 [*shape], body bool [*shape])``.

    Draws the jittered body, lungs, liver, ribs and spine (geometry: see :func:`make_phantom`)
    from ``rng``; tissue labels are set only inside the body (bone over lung over liver).
    """
    D = len(shape)
    g = _norm_coords(shape)
    z, x = g[0], g[-1]
    y = g[1] if D == 3 else 0.0

    def jit(v, rel=0.08):
        return v * (1.0 + rel * rng.uniform(-1, 1))

    def shift(v, amount=0.04):
        return v + amount * rng.uniform(-1, 1)

    # body: super-ellipsoid, rounded box in the coronal plane
    bz, bx, by = jit(0.88, 0.05), jit(0.84, 0.05), jit(0.72, 0.05)
    body = (x / bx) ** 4 + (z / bz) ** 4 + ((y / by) ** 4 if D == 3 else 0.0) <= 1.0

    seg = np.zeros(shape, dtype=np.int32)
    lungs = np.zeros(shape, dtype=bool)
    lung_z = shift(-0.22)
    lung_rz = jit(0.42)
    for side in (-1.0, 1.0):
        cz, cx = shift(lung_z, 0.03), side * shift(0.37, 0.03)
        rz, rx, ry = jit(lung_rz, 0.05), jit(0.22), jit(0.42)
        lungs |= ((z - cz) / rz) ** 2 + ((x - cx) / rx) ** 2 + \
            (((y - shift(0.0)) / ry) ** 2 if D == 3 else 0.0) <= 1.0
    # liver under the lung at x < 0
    lz, lx = shift(lung_z + lung_rz + 0.22, 0.03), shift(-0.28)
    liver = ((z - lz) / jit(0.24)) ** 2 + ((x - lx) / jit(0.42)) ** 2 + \
        (((y - shift(0.0)) / jit(0.45)) ** 2 if D == 3 else 0.0) <= 1.0
    # ribs: banded elliptic shell around the lungs (lateral rib segments in the coronal slice)
    rx_in, ry_in = jit(0.66, 0.04), jit(0.56, 0.04)
    thick = jit(0.1, 0.1)
    rho = np.sqrt((x / rx_in) ** 2 + ((y / ry_in) ** 2 if D == 3 else 0.0))
    zr0, zr1 = lung_z - lung_rz - 0.05, lung_z + lung_rz + 0.02
    period = jit(0.2, 0.1)
    phase = rng.uniform(0, 2 * np.pi)
    ribs = (rho >= 1.0) & (rho <= 1.0 + thick / rx_in) & (z >= zr0) & (z <= zr1) & \
        (np.cos(2 * np.pi * z / period + phase) > -0.3)
    # spine-like column of vertebrae between the lungs
    sr = jit(0.085, 0.1)
    scx = shift(0.0, 0.02)
    vper = jit(0.16, 0.08)
    vphase = rng.uniform(0, 2 * np.pi)
    spine = (((x - scx) / sr) ** 2 + ((y / sr) ** 2 if D == 3 else 0.0) <= 1.0) & \
        (z >= zr0) & (z <= min(0.8, bz - 0.1)) & (np.cos(2 * np.pi * z / vper + vphase) > -0.6)

    seg[liver & body] = LIVER
    seg[lungs & body] = LUNG
    seg[(ribs | spine) & body] = BONE
    return seg, body


def _phantom_image(seg: np.ndarray, body: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Intensities of :func:`make_phantom`: float32 ``[*shape]`` in [0, 1].

    Per-tissue mean (jittered) + smooth random texture inside ``body``, dark faint texture
    outside, a slight blur (partial volume) and a little noise, clipped to [0, 1].
    """
    shape = seg.shape
    n = min(shape)
    sigma_tex = max(1.0, n / 80.0)
    tex1 = _smooth_noise(shape, rng, sigma_tex)
    tex2 = _smooth_noise(shape, rng, 2.5 * sigma_tex)
    mean = {BACKGROUND: 0.42, LUNG: 0.14, BONE: 0.88, LIVER: 0.62}
    amp = {BACKGROUND: 0.06, LUNG: 0.07, BONE: 0.04, LIVER: 0.05}
    img = np.full(shape, 0.03)
    for c in (BACKGROUND, LUNG, BONE, LIVER):
        m = (seg == c) & body
        base = mean[c] * (1.0 + 0.06 * rng.uniform(-1, 1))
        img[m] = base + amp[c] * (0.7 * tex1[m] + 0.5 * tex2[m])
    outside = ~body
    img[outside] = 0.03 + 0.01 * tex2[outside]
    img = ndi.gaussian_filter(img, 0.6)
    img = img + 0.008 * rng.standard_normal(shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _rigid_modes(shape, weight):
    """Rigid-body fields ``[M, *shape, D]`` (D translations, D(D-1)/2 infinitesimal rotations
    about the ``weight``-weighted centroid), in voxel coordinates."""
    D = len(shape)
    grid = _grid(shape)
    wsum = weight.sum()
    centre = [float((weight * grid[k]).sum() / wsum) for k in range(D)]
    modes = []
    for j in range(D):
        m = np.zeros(shape + (D,))
        m[..., j] = 1.0
        modes.append(m)
    for a, b in itertools.combinations(range(D), 2):
        m = np.zeros(shape + (D,))
        m[..., a] = -(grid[b] - centre[b])
        m[..., b] = grid[a] - centre[a]
        modes.append(m)
    return np.stack(modes)


def equilibrate_force(force, body):
    """Confine ``force [*shape, D]`` to the ``body`` mask and remove its net force and torque.

    Returns ``f = body * (force - sum_k c_k r_k)`` over the rigid modes ``r_k`` (translations,
    rotations), with ``c`` chosen so that ``sum_x f(x) . r_k(x) = 0`` for every k: the load is
    self-equilibrated, like the internal (muscle, breathing) forces of a free body. Without this,
    a body embedded in soft air would mostly translate/rotate as a whole.
    """
    force = np.asarray(force, dtype=np.float64)
    w = np.asarray(body, dtype=np.float64)
    shape = w.shape
    if w.sum() == 0:
        return np.zeros_like(force)
    R = _rigid_modes(shape, w)                                   # [M, *shape, D]
    Rf = R.reshape(R.shape[0], -1)
    wf = np.broadcast_to(w[..., None], shape + (len(shape),)).ravel()
    gram = (Rf * wf) @ Rf.T
    rhs = (Rf * wf) @ force.ravel()
    c = np.linalg.solve(gram, rhs)
    f = (force - np.tensordot(c, R, axes=(0, 0))) * w[..., None]
    return f


def random_body_force(shape, rng, seg=None, n_blobs=4, breathing=0.5, amplitude=1.0,
                      body=None, width=(0.3, 0.6)):
    """Smooth random body force ``[*shape, D]`` (float64), max magnitude ``amplitude``.

    Sum of ``n_blobs`` Gaussian blobs (random centre in the central region, standard deviation
    uniform in ``width`` (fractions of the half-extent), random direction) and, when ``seg`` is
    given and ``breathing > 0``, a breathing-like push of the lungs: inferior (+axis 0) and
    laterally outward (last axis), on a smoothed lung mask. (Generator version 2 uses wider
    blobs and half the lung push of version 1, ``width=(0.15, 0.35), breathing=1``: at the same
    lung strain the motion is larger-scale, so there is more to register; measured on 64^2,
    12 seeds, lung strain p95 capped at 0.25: initial mean Dice 0.76 instead of 0.82.) With a ``body`` mask the force is confined to the body and made
    self-equilibrated (:func:`equilibrate_force`: no net force or torque; air carries no load).
    The displacement it produces depends on the tissue stiffness, so :func:`generate_pair`
    rescales the (linear) solution to the wanted maximum displacement.
    """
    shape = tuple(int(s) for s in shape)
    D = len(shape)
    if isinstance(rng, (int, np.integer)) or rng is None:
        rng = np.random.default_rng(rng)
    g = _norm_coords(shape)
    f = np.zeros(shape + (D,))
    for _ in range(n_blobs):
        c = rng.uniform(-0.55, 0.55, size=D)
        sigma = rng.uniform(*width)
        d = rng.standard_normal(D)
        d /= np.linalg.norm(d) + 1e-12
        weight = rng.uniform(0.5, 1.0)
        r2 = sum((g[i] - c[i]) ** 2 for i in range(D))
        blob = weight * np.exp(-0.5 * r2 / sigma ** 2)
        for j in range(D):
            f[..., j] += d[j] * blob
    if seg is not None and breathing > 0 and np.any(np.asarray(seg) == LUNG):
        lung = ndi.gaussian_filter((np.asarray(seg) == LUNG).astype(np.float64),
                                   max(1.0, min(shape) / 40.0))
        lung /= lung.max()
        s = breathing * rng.uniform(0.7, 1.3)
        f[..., 0] += s * lung
        f[..., -1] += 0.4 * s * np.sign(g[-1]) * lung
        if D == 3:
            f[..., 1] += 0.2 * s * np.sign(g[1]) * lung
    if body is not None:
        f = equilibrate_force(f, body)
    mag = np.sqrt(np.sum(f * f, axis=-1)).max()
    if mag > 0:
        f *= amplitude / mag
    return f


# ----------------------------------------------------------------------------------------------
# Warping and pairs
# ----------------------------------------------------------------------------------------------
def _grid(shape):
    return np.indices(shape, dtype=np.float64)


def warp(image, disp, order=1, mode="nearest"):
    """``image(x + disp(x))`` with ``scipy.ndimage.map_coordinates`` (voxel units)."""
    image = np.asarray(image)
    disp = np.asarray(disp, dtype=np.float64)
    shape = image.shape
    coords = _grid(shape) + np.moveaxis(disp, -1, 0)
    return ndi.map_coordinates(image, coords, order=order, mode=mode)


def _sample_field(disp, coords):
    """Linear interpolation of each channel of ``disp`` at ``coords`` [D, ...]."""
    return np.stack([ndi.map_coordinates(disp[..., j], coords, order=1, mode="nearest")
                     for j in range(disp.shape[-1])], axis=-1)


def _interp_jacobian(disp, coords):
    """Exact derivative of the multilinear interpolant of ``disp`` at ``coords`` ``[D, ...]``:
    ``[..., j, i] = d_i u_j`` (on a cell face the cell above is used; constant extension
    outside the grid is ignored, the border cells' slopes are used there)."""
    shape = disp.shape[:-1]
    D = len(shape)
    out = np.empty(coords.shape[1:] + (D, D))
    for i in range(D):
        diff = np.diff(disp, axis=i)
        c = coords.copy()
        c[i] = np.clip(np.floor(coords[i]), 0, shape[i] - 2)
        for j in range(D):
            out[..., j, i] = ndi.map_coordinates(diff[..., j], c, order=1, mode="nearest")
    return out


def _inverse_defect(disp: np.ndarray, grid: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``p + disp(p) - y`` ``[*shape, D]`` at ``p = y + v(y)`` for every grid point ``y``
    (``grid`` = :func:`_grid`, ``disp`` interpolated linearly)."""
    return v + _sample_field(disp, grid + np.moveaxis(v, -1, 0))


def _fixed_point_step(disp: np.ndarray, grid: np.ndarray, v: np.ndarray, F: np.ndarray,
                      rn: np.ndarray) -> None:
    """One step ``v <- v - F`` of :func:`invert_displacement`, kept (in place in ``v``, the
    defect ``F [*shape, D]`` and its norm ``rn [*shape]``) only where it lowers the residual."""
    v_fp = v - F
    F_fp = _inverse_defect(disp, grid, v_fp)
    rn_fp = np.linalg.norm(F_fp, axis=-1)
    better = rn_fp < rn
    v[better], F[better], rn[better] = v_fp[better], F_fp[better], rn_fp[better]


def _damped_newton_step(disp: np.ndarray, grid: np.ndarray, v: np.ndarray, F: np.ndarray,
                        rn: np.ndarray, tol: float) -> bool:
    """One damped Newton step of :func:`invert_displacement` at the points with ``rn >= tol``.

    Updates ``v``, ``F``, ``rn`` in place (shapes as in :func:`_fixed_point_step`): Newton
    direction with the interpolant's Jacobian ``I + grad disp(p)`` (fixed-point direction where
    its determinant is <= 1e-3), step halved up to 10 times until the point's residual
    decreases. Returns whether any point accepted a step.
    """
    D = disp.ndim - 1
    act = rn >= tol                                           # points still iterating
    va, Fa, ra = v[act], F[act], rn[act]
    ya = np.stack([grid[k][act] for k in range(D)])           # [D, n]
    J = np.eye(D) + _interp_jacobian(disp, ya + va.T)         # [n, D, D]
    det = np.linalg.det(J)
    ok = det > 1e-3
    step = Fa.copy()                                          # fixed-point step
    if ok.any():
        step[ok] = np.linalg.solve(J[ok], Fa[ok][..., None])[..., 0]
    accepted = np.zeros(ra.shape, dtype=bool)
    t = 1.0
    for _ in range(11):
        pend = ~accepted
        cand = va[pend] - t * step[pend]
        Fc = cand + _sample_field(disp, ya[:, pend] + cand.T)
        rc = np.linalg.norm(Fc, axis=-1)
        good = rc < ra[pend]
        idx = np.flatnonzero(pend)[good]
        va[idx], Fa[idx], ra[idx] = cand[good], Fc[good], rc[good]
        accepted[idx] = True
        if accepted.all():
            break
        t *= 0.5
    v[act], F[act], rn[act] = va, Fa, ra
    return bool(accepted.any())


def invert_displacement(disp, n_iter: int = 100, tol: float = 1e-6, *, n_fixed_point: int = 3,
                        return_info: bool = False):
    """Inverse field ``v [*shape, D]`` of ``x -> x + disp(x)`` at the grid points.

    Solves, for every grid point ``y``, ``p + disp(p) = y`` for ``p = y + v(y)``, where ``disp``
    between grid points is its multilinear interpolant (the interpolation every warp uses).
    Hence ``v(y) = -disp(y + v(y))`` and ``(x + disp(x)) + v(x + disp(x)) = x`` (the second one up
    to the interpolation of ``v``, see :func:`inverse_consistency`).

    Scheme: ``n_fixed_point`` fixed-point steps ``v <- -disp(y + v)`` (a good start), then damped
    Newton steps with the exact Jacobian ``I + grad disp(p)`` of the interpolant (step halved up
    to 10 times until the point's residual ``|p + disp(p) - y|`` decreases; points whose
    Jacobian is singular or inverted take a fixed-point step). The fixed-point iteration alone
    converges only for ``|grad disp| < 1``; Newton converges wherever the map is invertible.
    Stops when the residual is below ``tol`` voxel at every point or after ``n_iter`` steps.

    Returns ``v`` (float64), and with ``return_info`` a dict: ``iterations``, ``converged``
    (bool), ``residual`` (``[*shape]`` final ``|p + disp(p) - y|``), ``max_residual``.
    """
    disp = np.asarray(disp, dtype=np.float64)
    grid = _grid(disp.shape[:-1])
    v = -disp.copy()
    F = _inverse_defect(disp, grid, v)
    rn = np.linalg.norm(F, axis=-1)
    it = 0
    for _ in range(n_fixed_point):
        if rn.max() < tol or it >= n_iter:
            break
        _fixed_point_step(disp, grid, v, F, rn)
        it += 1
    while rn.max() >= tol and it < n_iter:
        it += 1
        if not _damped_newton_step(disp, grid, v, F, rn, tol):
            break                                                  # stagnated everywhere
    if not return_info:
        return v
    return v, {"iterations": it, "converged": bool(rn.max() < tol), "residual": rn,
               "max_residual": float(rn.max())}


def inverse_consistency(disp, inv):
    """Residual ``|disp(x) + inv(x + disp(x))|`` ``[*shape]`` (voxels) on the FIXED grid.

    ``inv`` is interpolated multilinearly (``map_coordinates(order=1, mode="nearest")``). This is
    the direction that matters for a pair built as ``moving = fixed o (id + inv)``:
    ``warped(x) = moving(x + disp(x))`` samples ``fixed`` at ``x + disp(x) + inv(x + disp(x))``
    (to first order in the image's smoothness, with linear interpolation of ``moving``), so
    the residual is the geometric error of the ground truth at ``x``.
    """
    disp = np.asarray(disp, dtype=np.float64)
    inv = np.asarray(inv, dtype=np.float64)
    coords = _grid(disp.shape[:-1]) + np.moveaxis(disp, -1, 0)
    return np.linalg.norm(disp + _sample_field(inv, coords), axis=-1)


def sample_keypoints(seg, rng, n=50, margin=2):
    """``n`` deterministic keypoints ``[n, D]`` (float64 voxel coordinates) inside the tissues.

    Stratified over the tissue classes present (about n / C each), at least ``margin`` voxels
    from the border, with a sub-voxel jitter.
    """
    seg = np.asarray(seg)
    shape = seg.shape
    D = seg.ndim
    if isinstance(rng, (int, np.integer)) or rng is None:
        rng = np.random.default_rng(rng)
    inner = np.zeros(shape, dtype=bool)
    inner[tuple(slice(margin, s - margin) for s in shape)] = True
    classes = [c for c in range(1, len(CLASS_NAMES) + 1) if np.any((seg == c) & inner)]
    if not classes:
        return np.zeros((0, D))
    counts = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    pts = []
    for c, k in zip(classes, counts):
        idx = np.flatnonzero((seg == c) & inner)
        pick = rng.choice(idx, size=min(k, idx.size), replace=False)
        pts.append(np.stack(np.unravel_index(np.sort(pick), shape), axis=-1).astype(np.float64))
    pts = np.concatenate(pts, axis=0)
    pts += rng.uniform(-0.3, 0.3, size=pts.shape)
    return pts


class SyntheticPairError(RuntimeError):
    """A pair whose ground truth cannot be trusted (the message names the seed)."""


def motion_to_max_disp(seed: int, shape: tuple, motion: float) -> tuple:
    """``(max_disp, max_lung_strain)`` of the ``motion`` convention (synthetic dataset).

    ``max_disp = motion * mean(shape) * j`` voxels with a per-seed factor ``j`` in
    [0.75, 1.25] (``default_rng([seed, 7])``), and the lung strain cap
    ``LUNG_STRAIN_PER_MOTION * motion`` (95th percentile of :func:`.elasticity.principal_strain` in the lung).
    """
    jitter = np.random.default_rng([int(seed), 7]).uniform(0.75, 1.25)
    motion = float(motion)
    return motion * float(np.mean(shape)) * jitter, LUNG_STRAIN_PER_MOTION * motion


def _scaled_displacement(lam_map: np.ndarray, mu_map: np.ndarray, force: np.ndarray,
                         lung: np.ndarray, target: float, max_lung_strain: float | None,
                         air: tuple, solver_method: str) -> tuple:
    """Solve the padded Navier-Cauchy problem and rescale it (step 3 of :func:`generate_pair`).

    The Dirichlet wall of the solve is moved ``pad = ceil(target)`` voxels away from the image
    border (extra air): the body surface moves up to about the peak displacement, and a body
    pressed against a wall a few voxels away folds the air in between. The linear solution is
    scaled to the peak displacement ``target`` (voxels), and further down if the 95th
    percentile of the principal strain inside ``lung`` (bool ``[*shape]``) would exceed
    ``max_lung_strain``. ``force`` ``[*shape, D]`` is scaled in place by the same factor.
    Returns ``(disp float32 [*shape, D], force, pad, solve_info)``.
    """
    pad = int(math.ceil(target))
    disp, solve_info = elasticity.solve_navier_cauchy(lam_map, mu_map, force, method=solver_method,
                                                      return_info=True, pad=pad, pad_lame=air)
    peak = np.sqrt(np.sum(disp * disp, axis=-1)).max()
    scale = target / peak if peak > 0 else 0.0
    if max_lung_strain is not None and lung.any():
        p95 = float(np.percentile(elasticity.principal_strain(disp)[lung], 95))
        if p95 * scale > max_lung_strain:
            scale = float(max_lung_strain) / p95
    disp = (disp * scale).astype(np.float32)
    force *= scale
    return disp, force, pad, solve_info


def _inverse_residual(u: np.ndarray, v: np.ndarray, body: np.ndarray) -> np.ndarray:
    """``|v(y) + u(y + v(y))|`` (voxels, 1-D) at the moving-grid points ``y`` whose source
    ``y + v(y)`` lies in ``body``; ``u``, ``v`` float64 ``[*shape, D]``."""
    src = _grid(u.shape[:-1]) + np.moveaxis(v, -1, 0)
    r = np.linalg.norm(v + _sample_field(u, src), axis=-1)
    from_body = ndi.map_coordinates(body, src, order=0, mode="nearest").astype(bool)
    return r[from_body]


def _checked_inverse(u: np.ndarray, body: np.ndarray, seed: int, target: float,
                     residual_bound: float) -> tuple:
    """Inverse of ``u`` (float64 ``[*shape, D]``) checked inside ``body`` (step 4 of
    :func:`generate_pair`).

    :func:`invert_displacement` with its defaults, retried as pure damped Newton with 10x more
    steps when the residual (:func:`_inverse_residual` of the float32 inverse, the one that is
    stored) exceeds ``residual_bound`` voxel. Returns ``(inv float32 [*shape, D], inv_info,
    residuals)``; raises :class:`SyntheticPairError` naming ``seed`` if the bound still fails.
    """
    inv, inv_info = invert_displacement(u, return_info=True)
    inv = inv.astype(np.float32)  # the stored inverse is the one that is checked
    res = _inverse_residual(u, inv.astype(np.float64), body)
    if not res.max() <= residual_bound:  # more robust: pure damped Newton, 10x more steps
        inv2, info2 = invert_displacement(u, n_iter=1000, n_fixed_point=0, return_info=True)
        res2 = _inverse_residual(u, inv2.astype(np.float32).astype(np.float64), body)
        if res2.max() < res.max():
            inv, inv_info, res = inv2.astype(np.float32), info2, res2
    if not res.max() <= residual_bound:
        raise SyntheticPairError(
            f"synthetic pair seed={int(seed)} shape={tuple(u.shape[:-1])} max_disp={target:.3g}: "
            f"inverse residual {res.max():.3g} voxel inside the body exceeds the bound "
            f"{residual_bound:g} (min Jacobian {jacobian_determinant(u)[body].min():.3g}); "
            f"the deformation is not invertible there, use a smaller motion / max_disp")
    return inv, inv_info, res


def _pair_meta(u: np.ndarray, v: np.ndarray, res: np.ndarray, body: np.ndarray,
               lung: np.ndarray, air: tuple, pad: int) -> dict:
    """The checks of ``generate_pair``'s ``meta`` (see its docstring) from the stored field
    ``u``, its inverse ``v`` (float64 ``[*shape, D]``), the inverse residuals ``res`` and the
    ``body`` / ``lung`` masks; the caller adds the iteration counts."""
    cons = inverse_consistency(u, v)[body]
    jac = jacobian_determinant(u)
    return {
        "residual_max": float(res.max()),
        "residual_mean": float(res.mean()),
        "consistency_residual_max": float(cons.max()),
        "consistency_residual_mean": float(cons.mean()),
        "jacobian_min": float(jac[body].min()),
        "jacobian_min_all": float(jac.min()),
        "lung_strain_p95": float(np.percentile(elasticity.principal_strain(u)[lung], 95))
        if lung.any() else 0.0,
        "max_disp": float(np.sqrt(np.sum(u * u, axis=-1)).max()),
        "lame_air": tuple(float(a) for a in air),
        "solve_pad": pad,
    }


def generate_pair(seed: int, shape: tuple, lame: dict | None = None,
                  max_disp: float | None = None, *, max_lung_strain: float | None = None,
                  n_keypoints: int = 50, image_order: int = 1, solver_method: str = "auto",
                  air: tuple | None = None, residual_bound: float = RESIDUAL_BOUND) -> dict:
    """One synthetic registration pair with a ground-truth elastic displacement.

    Args:
        seed: everything (phantom, force, displacement size, keypoints) is a function of it.
        shape: 2D or 3D grid shape.
        lame: ``{class: (lambda, mu)}`` overriding :data:`DEFAULT_LAME` (partial dicts allowed);
            class 0 is the soft tissue inside the body.
        max_disp: peak displacement magnitude in voxels; default (``None``): the default
            motion, ``motion_to_max_disp(seed, shape, DEFAULT_MOTION)`` (the synthetic dataset's
            default pairs), which also sets ``max_lung_strain`` to 0.25 unless given.
        max_lung_strain: if given, the displacement is scaled down further when needed so that
            the 95th percentile of the lung's :func:`.elasticity.principal_strain` is at most this value
            (the peak displacement is then below ``max_disp``; ``meta["max_disp"]`` has it).
        n_keypoints: number of keypoints (stratified over the tissue classes).
        image_order: spline order of the image warp that builds ``moving`` (1 = linear, the
            default; 3 = cubic B-spline, smaller residual ``|moving(x + disp) - fixed|``).
        solver_method: passed to :func:`.elasticity.solve_navier_cauchy`.
        air: ``(lambda, mu)`` of the air outside the body (default :data:`DEFAULT_AIR_LAME`).
        residual_bound: maximum allowed inverse residual inside the body (voxels).
    Returns dict with
        ``fixed``, ``moving`` float32 [*shape] in [0, 1]; ``fixed_seg``, ``moving_seg`` int32;
        ``disp`` float32 [*shape, D] on the FIXED grid, voxel units, with
        ``moving(x + disp(x)) ~ fixed(x)``; ``disp_inv`` float32 [*shape, D] on the MOVING grid
        (``moving = fixed o (id + disp_inv)``: image linear/cubic, labels nearest neighbour);
        ``lame`` (the class dict used); ``body`` bool [*shape] (fixed grid; label 0 outside
        it is air with ``meta["lame_air"]``); ``force`` float32 [*shape, D] (rescaled so that
        ``solve_navier_cauchy(*lame_maps(fixed_seg, lame, body, lame_air), force,
        pad=meta["solve_pad"], pad_lame=lame_air)`` gives ``disp``); ``fixed_kp`` [K, D]
        float64 inside the tissues and ``moving_kp = fixed_kp + disp(fixed_kp)`` (linear
        interpolation; exact by construction: the ground truth has TRE 0); ``meta`` (checks):

        * ``residual_max`` / ``residual_mean``: inverse residual
          ``|v(y) + disp(y + v(y))|`` (``v = disp_inv``, ``disp`` interpolated linearly) at the
          moving-grid points ``y`` whose source ``y + v(y)`` lies in the body. This is the
          direction in which ``moving`` is built: ``moving(y) = fixed(y + v(y))`` is exact iff
          the ground truth maps ``y + v(y)`` onto ``y``. Bounded by ``residual_bound``.
        * ``consistency_residual_max`` / ``_mean``: :func:`inverse_consistency`
          ``|disp(x) + v(x + disp(x))|`` at the fixed-grid body points, with ``v`` interpolated
          linearly between the grid points: a diagnostic, it adds the resampling error of the
          grid inverse (kinks of ``v`` at tissue interfaces) and is not bounded.
        * ``jacobian_min`` / ``jacobian_min_all``: min of ``det(I + grad disp)`` (central
          differences) inside the body / over the image; ``lung_strain_p95``: 95th percentile of
          :func:`.elasticity.principal_strain` in the lung; ``max_disp`` (actual peak displacement);
          ``lame_air``; ``solve_pad``; ``solver_iterations``; ``inverse_iterations``.
    Raises:
        SyntheticPairError: (naming the seed) if the inverse residual inside the body exceeds
            ``residual_bound`` after the Newton inversion and a 10x longer retry.
    """
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng(int(seed))
    table = dict(DEFAULT_LAME)
    if lame is not None:
        table.update({int(k): (float(v[0]), float(v[1])) for k, v in lame.items()})
    air = DEFAULT_AIR_LAME if air is None else (float(air[0]), float(air[1]))

    fixed_seg, fixed, body = make_phantom(shape, rng, return_body=True)
    lam_map, mu_map = lame_maps(fixed_seg, table, body=body, air=air)
    force = random_body_force(shape, rng, seg=fixed_seg, body=body)
    if max_disp is None:
        target, default_cap = motion_to_max_disp(seed, shape, DEFAULT_MOTION)
        if max_lung_strain is None:
            max_lung_strain = default_cap
    else:
        target = float(max_disp)
    lung = fixed_seg == LUNG
    disp, force, pad, solve_info = _scaled_displacement(
        lam_map, mu_map, force, lung, target, max_lung_strain, air, solver_method)
    u = disp.astype(np.float64)  # every check uses exactly the stored field
    inv, inv_info, res = _checked_inverse(u, body, seed, target, residual_bound)
    v = inv.astype(np.float64)
    moving = np.clip(warp(fixed.astype(np.float64), v, order=image_order), 0.0, 1.0)
    moving = moving.astype(np.float32)
    moving_seg = warp(fixed_seg, v, order=0).astype(np.int32)

    fixed_kp = sample_keypoints(fixed_seg, rng, n_keypoints)
    moving_kp = fixed_kp + _sample_field(u, fixed_kp.T) if len(fixed_kp) else fixed_kp.copy()

    meta = _pair_meta(u, v, res, body, lung, air, pad)
    meta["solver_iterations"] = int(solve_info["iterations"])
    meta["inverse_iterations"] = int(inv_info["iterations"])
    return {
        "fixed": fixed,
        "moving": moving,
        "fixed_seg": fixed_seg.astype(np.int32),
        "moving_seg": moving_seg,
        "disp": disp,
        "disp_inv": inv,
        "lame": {int(k): (float(v[0]), float(v[1])) for k, v in sorted(table.items())},
        "body": body,
        "force": force.astype(np.float32),
        "fixed_kp": fixed_kp,
        "moving_kp": moving_kp,
        "meta": meta,
    }
