"""Heterogeneous linear elasticity on a voxel grid (numpy + scipy only): the solver behind the
synthetic phantoms (:mod:`datasets.phantoms`).

:func:`solve_navier_cauchy` solves ``div sigma(u) + f = 0`` for voxelwise Lamé maps with ``u = 0`` on the
border; :func:`assemble_elasticity` builds its sparse operator, :func:`elastic_energy` the discrete energy;
:func:`displacement_gradient`, :func:`strain_norm` and :func:`principal_strain` measure a field's strain.

Conventions: arrays are indexed ``[*shape]``; a displacement has shape ``[*shape, D]`` and
channel ``j`` is the displacement along array axis ``j`` in voxel units (voxelmorph 'ij');
``spacing`` is the voxel size per axis (default 1).

Discretization of the Navier-Cauchy equation (:func:`assemble_elasticity`)
------------------------------------------------------------------------
Displacements live on the voxel centres (nodes). The scheme is the Q1 (bi/trilinear) finite
element method on the dual grid whose cells have 2^D voxel centres as corners, integrated with
the *vertex* (trapezoidal) quadrature rule and with the Lamé parameters sampled at the quadrature
points, i.e. at the voxels themselves. At vertex ``x`` of a cell the Q1 gradient is exactly the
one-sided difference along the cell edges leaving ``x``, so the discrete energy is

    E(u) = sum_x sum_{s in {-1,+1}^D, cell (x, s) inside the grid} 2^-D *
           [ mu(x) |eps_s(u)(x)|^2 + lambda(x)/2 tr(eps_s(u)(x))^2 ],
    (grad_s u)_{ij}(x) = s_i (u_j(x + s_i e_i) - u_j(x)) / h_i,   eps_s = sym(grad_s u),

and the linear system ``A u = f`` is ``grad E(u) = f`` (lumped right-hand side, everything
divided by the voxel volume, so ``A u ~ -div sigma(u)`` pointwise like a finite-difference
scheme). Properties: A is assembled from a sum of positive semidefinite local energies, hence
symmetric positive definite with the homogeneous Dirichlet condition (unknowns = interior
voxels, border voxels fixed to 0); it is conservative (a variational/finite-element scheme) and
handles discontinuous coefficients without special treatment (an edge shared by two voxels
of different tissue gets the arithmetic mean of their coefficients through the two vertex
rules). Summing the 2^D corner rules analytically gives a compact closed form (see
:func:`assemble_elasticity`): diagonal blocks ``-sum_i D_i^- (k D_i^+ u_j)`` with face-averaged
coefficients (``k = mu`` or ``lambda + 2 mu``) and off-diagonal blocks
``mu D_i^0 u_j D_j^0 u_i + lambda D_i^0 u_i D_j^0 u_j`` with centred differences and voxel
coefficients. For constant coefficients it is the standard second-order scheme for
``-mu Lap u - (lambda + mu) grad div u`` (measured errors against a manufactured solution fall
by 3.84 / 3.95 / 3.99 per grid halving in 2D, 3.84 / 3.97 in 3D). Non-zeros per row: 9 in 2D,
15 in 3D. Assembly is vectorized: a few numpy slice operations per (component, axis, stencil
offset), the CSR arrays are written directly (no loop over voxels, no COO sort).

Solvers: conjugate gradients preconditioned by a geometric multigrid V-cycle (Galerkin coarse
operators ``P^T A P`` with (bi/tri)linear prolongation, Chebyshev-Jacobi smoothing, SuperLU on
the coarsest level; the V-cycle is symmetric positive definite, so plain CG applies), relative
residual 1e-8 by default. Small systems (<= 4000 unknowns in 2D, <= 1000 in 3D) and
``method="direct"`` use SuperLU (minimum-degree ordering of A + A^T). On 128^2 the
preconditioned CG is ~3-4x faster than SuperLU and agrees with it to ~1e-10 relative; in 3D
SuperLU's fill-in makes direct solves impractical beyond ~16^3.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

__all__ = ["assemble_elasticity", "elastic_energy", "solve_navier_cauchy", "displacement_gradient", "strain_norm",
           "principal_strain"]


def _spacing(spacing, ndim):
    if spacing is None:
        return (1.0,) * ndim
    if np.isscalar(spacing):
        return (float(spacing),) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        raise ValueError(f"spacing has {len(spacing)} entries for a {ndim}-D grid")
    return spacing


def _shifted(region, offset):
    return tuple(slice(r.start + o, r.stop + o) for r, o in zip(region, offset))


def _unit(D, i, v=1):
    o = [0] * D
    o[i] = v
    return o


def assemble_elasticity(lam_map, mu_map, spacing=None):
    """Assemble the SPD stiffness matrix of ``-div sigma(u)`` with ``u = 0`` on the border.

    Returns ``(A, interior)``: ``A`` is a CSR matrix over the unknowns ordered component-major
    (``dof = j * N + k`` for component j of the k-th interior voxel in C order) and
    ``interior`` is the boolean mask of the unknown voxels. ``A @ u_flat ~ -div sigma(u)`` at
    the interior voxels; ``u^T A u / 2`` equals :func:`elastic_energy` (vertex-quadrature Q1
    energy, see the module docstring).

    Closed form of that energy's Hessian (summing the 2^D corner rules analytically):

    * block (j, j): ``-sum_i D_i^- (k_ij D_i^+ u_j)`` with the face coefficient
      ``k_ij = mean of c_ij over the two voxels of the face``, ``c_ij = mu`` for i != j and
      ``lambda + 2 mu`` for i == j (compact 3-point stencils);
    * block (j, i), i != j: entry between (y, j) and (y + tau e_j - sigma e_i, i),
      sigma, tau in {-1, +1}, equal to
      ``sigma tau (mu(y - sigma e_i) + lambda(y + tau e_j)) / (4 h_i h_j)``: the energy
      ``mu D_i^0 u_j D_j^0 u_i + lambda D_i^0 u_i D_j^0 u_j`` with centred differences and
      coefficients at the voxel (the one-sided terms cancel exactly because the coefficient
      of a corner rule is the same for all 2^D rules of a voxel).
    The result is exactly symmetric (same floating-point operations for an entry and its
    transpose) and has 2D + 1 + 4 (D - 1) non-zeros per row.
    """
    lam_map = np.asarray(lam_map, dtype=np.float64)
    mu_map = np.asarray(mu_map, dtype=np.float64)
    if lam_map.shape != mu_map.shape:
        raise ValueError("lambda and mu maps differ in shape")
    shape = lam_map.shape
    D = len(shape)
    if min(shape) < 3:
        raise ValueError("every axis needs at least 3 voxels (border voxels are fixed)")
    h = _spacing(spacing, D)
    interior = np.zeros(shape, dtype=bool)
    interior[tuple(slice(1, n - 1) for n in shape)] = True
    entries = _stencil_entries(lam_map, mu_map, h)
    return _entries_to_csr(entries, int(interior.sum()), D), interior


def _stencil_entries(lam_map: np.ndarray, mu_map: np.ndarray, h: tuple) -> dict:
    """The stencil of :func:`assemble_elasticity` as ``{a: [(column offset, V), ...]}``.

    For row component ``a``, every entry is a column offset ``b * N + flat(d)`` (column
    component ``b``, neighbour offset ``d``, ``N`` interior voxels, C-order strides of the
    interior grid) and values ``V`` of shape ``[*interior shape]``, one per row voxel ``y``;
    NaN where the neighbour ``y + d`` is a (Dirichlet) border voxel. Every row of component
    block ``a`` has the same K candidate entries, so sorting them by column offset gives sorted
    CSR rows directly. ``lam_map``, ``mu_map``: float64 ``[*shape]``; ``h``: spacing per axis.
    """
    shape = lam_map.shape
    D = len(shape)
    inner = tuple(slice(1, n - 1) for n in shape)
    m = tuple(n - 2 for n in shape)
    N = int(np.prod(m))
    strides = [int(np.prod(m[k + 1:])) for k in range(D)]
    entries = {a: [] for a in range(D)}

    def add(a, b, d, values, region):
        """Entries between (y, a) and (y + d, b) for the rows y in ``region`` (y, y+d interior)."""
        V = np.full(m, np.nan)
        V[_shifted(region, [-1] * D)] = values
        entries[a].append((b * N + sum(int(o) * st for o, st in zip(d, strides)), V))

    lam2mu = lam_map + 2.0 * mu_map
    for j in range(D):
        diag = np.zeros(tuple(n - 2 for n in shape))
        for i in range(D):
            c = lam2mu if i == j else mu_map
            lo = tuple(slice(0, n - 1) if k == i else slice(1, n - 1) for k, n in enumerate(shape))
            hi = _shifted(lo, _unit(D, i))
            face = 0.5 * (c[lo] + c[hi]) / h[i] ** 2  # face between y and y + e_i
            # face array index f = lower voxel (0 .. n-2 along i); y interior: faces y-1 and y
            sl_m = tuple(slice(0, n - 2) if k == i else slice(None) for k, n in enumerate(shape))
            sl_p = tuple(slice(1, n - 1) if k == i else slice(None) for k, n in enumerate(shape))
            diag += face[sl_m] + face[sl_p]
            # off-diagonal (y, y + e_i) for y, y + e_i interior (y = 1 .. n-3), and transpose
            reg = tuple(slice(1, n - 2) if k == i else slice(1, n - 1) for k, n in enumerate(shape))
            off = -face[tuple(slice(1, n - 2) if k == i else slice(None)
                              for k, n in enumerate(shape))]
            add(j, j, _unit(D, i), off, reg)
            add(j, j, _unit(D, i, -1), off, _shifted(reg, _unit(D, i)))
        add(j, j, [0] * D, diag, inner)
        for i in range(D):
            if i == j:
                continue
            for sigma in (-1, 1):
                for tau in (-1, 1):
                    d = np.array(_unit(D, j, tau)) - np.array(_unit(D, i, sigma))
                    region = tuple(slice(max(1, 1 - o), min(n - 1, n - 1 - o))
                                   for o, n in zip(d, shape))
                    vals = (sigma * tau / (4.0 * h[i] * h[j])) * (
                        mu_map[_shifted(region, _unit(D, i, -sigma))]
                        + lam_map[_shifted(region, _unit(D, j, tau))])
                    add(j, i, d, vals, region)
    return entries


def _entries_to_csr(entries: dict, N: int, D: int) -> sp.csr_matrix:
    """CSR matrix ``[D N, D N]`` from :func:`_stencil_entries` (NaN candidates dropped).

    Rows are component-major (``j * N + k``); the index arrays are int32 unless the candidate
    count needs int64. Rows come out sorted (``has_sorted_indices`` is set).
    """
    K = len(entries[0])
    itype = np.int32 if D * N * K < 2 ** 31 - 1 else np.int64
    base = np.arange(N, dtype=itype)
    data = np.empty((D, K, N))
    cols = np.empty((D, K, N), dtype=itype)
    for a in range(D):
        for k, (key, V) in enumerate(sorted(entries[a], key=lambda e: e[0])):
            data[a, k] = V.ravel()
            np.add(base, key, out=cols[a, k])
    data = data.transpose(0, 2, 1).ravel()  # row-major (row, entry) order
    cols = cols.transpose(0, 2, 1).ravel()
    valid = ~np.isnan(data)
    indptr = np.zeros(D * N + 1, dtype=itype)
    np.cumsum(valid.reshape(D * N, K).sum(axis=1), out=indptr[1:])
    A = sp.csr_matrix((data[valid], cols[valid], indptr), shape=(D * N, D * N))
    A.has_sorted_indices = True
    return A


def elastic_energy(disp, lam_map, mu_map, spacing=None):
    """Discrete elastic energy of the scheme (``1/2 u^T A u`` for u vanishing on the border).

    Computed directly from one-sided differences (independent of the assembly; used in tests).
    """
    disp = np.asarray(disp, dtype=np.float64)
    shape = disp.shape[:-1]
    D = len(shape)
    h = _spacing(spacing, D)
    total = 0.0
    for signs in itertools.product((-1, 1), repeat=D):
        region = tuple(slice(0, n - 1) if s > 0 else slice(1, n) for s, n in zip(signs, shape))
        g = np.empty(tuple(r.stop - r.start for r in region) + (D, D))
        for i in range(D):
            o = np.zeros(D, dtype=int)
            o[i] = signs[i]
            g[..., i, :] = signs[i] * (disp[_shifted(region, o)] - disp[region]) / h[i]
        e = 0.5 * (g + np.swapaxes(g, -1, -2))
        tr = np.trace(g, axis1=-2, axis2=-1)
        dens = mu_map[region] * np.sum(e * e, axis=(-1, -2)) + 0.5 * lam_map[region] * tr ** 2
        total += 0.5 ** D * dens.sum()
    return float(total)


# ---------------------------------------------------------------- multigrid preconditioner
def _prolongation_1d(m):
    """Linear interpolation from the coarse interior nodes to m fine interior nodes.

    Fine interior node k sits at position k + 1 (the borders 0 and m + 1 are Dirichlet);
    coarse node c sits at fine position 2 (c + 1). Coarse count m // 2.
    """
    mc = m // 2
    rows, cols, vals = [], [], []
    for k in range(m):
        pos = k + 1
        if pos % 2 == 0:
            rows.append(k), cols.append(pos // 2 - 1), vals.append(1.0)
        else:
            for c in ((pos - 1) // 2 - 1, (pos + 1) // 2 - 1):
                if 0 <= c < mc:
                    rows.append(k), cols.append(c), vals.append(0.5)
    return sp.csr_matrix((vals, (rows, cols)), shape=(m, mc)), mc


class _MultigridPreconditioner:
    """Symmetric geometric V-cycle used as the CG preconditioner.

    Levels: Galerkin coarse operators ``A_c = P^T A P`` with (bi/tri)linear prolongation P
    (Kronecker product of 1D interpolations, one copy per displacement component); smoother:
    Chebyshev polynomial of degree ``degree`` in ``D^-1 A`` (D = diagonal of A) on the interval
    ``[lmax / 10, lmax]``, lmax = 1.2 x a power-iteration estimate (the 12-step estimate was
    >= 0.86 x the true value; Chebyshev(2) stays contractive up to ~1.1 x its upper bound, so
    the smoother converges); the same smoother before and after the coarse correction makes
    the V-cycle a symmetric positive definite operator; SuperLU on the coarsest level.
    Chebyshev(2) halved the CG iterations of damped Jacobi on 64^3.
    """

    def __init__(self, A, interior_shape, ndim, coarse_size=None, degree=2, lower_frac=0.1,
                 power_steps=12):
        if coarse_size is None:
            coarse_size = 4000 if ndim == 2 else 1000  # SuperLU fill-in grows fast in 3D
        self.degree = degree
        self.levels = []
        shp = tuple(interior_shape)
        rng = np.random.default_rng(12345)  # fixed: the preconditioner is deterministic
        while True:
            A = A.tocsr()
            dinv = 1.0 / A.diagonal()
            v = rng.standard_normal(A.shape[0])
            lmax = 1.0
            for _ in range(power_steps):
                v = dinv * (A @ v)
                lmax = float(np.sqrt(_dot(v, v)))
                v /= lmax
            bounds = (1.2 * lmax * lower_frac, 1.2 * lmax)
            if A.shape[0] <= coarse_size or min(shp) < 3:
                self.levels.append((A, dinv, bounds, None, None))
                break
            mats, cshp = [], []
            for m in shp:
                P1, mc = _prolongation_1d(m)
                mats.append(P1)
                cshp.append(mc)
            Ps = mats[0]
            for M in mats[1:]:
                Ps = sp.kron(Ps, M, format="csr")
            P = sp.block_diag([Ps] * ndim, format="csr")
            R = P.T.tocsr()
            self.levels.append((A, dinv, bounds, P, R))
            A = R @ (A @ P)
            shp = tuple(cshp)
        self.coarse_lu = spla.splu(self.levels[-1][0].tocsc(), permc_spec="MMD_AT_PLUS_A")

    def _smooth(self, A, dinv, bounds, b, x):
        """x + Chebyshev(D^-1 A) correction for A x = b (x None means a zero start)."""
        lo, hi = bounds
        theta, delta = 0.5 * (hi + lo), 0.5 * (hi - lo)
        sigma = theta / delta
        rho = 1.0 / sigma
        if x is None:
            r = b.copy()
            x = np.zeros_like(b)
        else:
            r = b - A @ x
        d = (dinv * r) / theta
        for k in range(self.degree):
            x += d
            if k == self.degree - 1:
                break
            r -= A @ d
            rho_new = 1.0 / (2.0 * sigma - rho)
            d *= rho_new * rho
            d += (2.0 * rho_new / delta) * (dinv * r)
            rho = rho_new
        return x

    def _cycle(self, lev, b):
        A, dinv, bounds, P, R = self.levels[lev]
        if P is None:
            return self.coarse_lu.solve(b)
        x = self._smooth(A, dinv, bounds, b, None)
        x += P @ self._cycle(lev + 1, R @ (b - A @ x))
        return self._smooth(A, dinv, bounds, b, x)

    def apply(self, b):
        return self._cycle(0, np.asarray(b, dtype=np.float64).ravel())


def _dot(a, b):
    # elementwise product + sum instead of BLAS ddot: multithreaded BLAS level-1 calls on
    # oversubscribed machines were measured 10x slower than this
    return float(np.add.reduce(a * b))


def _pcg(A, b, apply_m, rtol, maxiter):
    """Preconditioned conjugate gradients; returns (x, iterations, converged)."""
    x = np.zeros_like(b)
    r = b.copy()
    bnorm = math.sqrt(_dot(b, b))
    if bnorm == 0.0:
        return x, 0, True
    z = apply_m(r)
    p = z.copy()
    rz = _dot(r, z)
    for k in range(1, maxiter + 1):
        Ap = A @ p
        alpha = rz / _dot(p, Ap)
        x += alpha * p
        r -= alpha * Ap
        if math.sqrt(_dot(r, r)) <= rtol * bnorm:
            return x, k, True
        z = apply_m(r)
        rz_new = _dot(r, z)
        p *= rz_new / rz
        p += z
        rz = rz_new
    return x, maxiter, False


def _solve_system(A: sp.csr_matrix, b: np.ndarray, interior_shape: tuple, *, method: str,
                  rtol: float, maxiter: int, direct_max: int | None) -> tuple:
    """Solve ``A x = b`` for the stiffness matrix of :func:`assemble_elasticity`.

    ``interior_shape`` is the grid of the unknown voxels (its length is D; the multigrid
    coarsens it). ``method``, ``rtol``, ``maxiter``, ``direct_max`` as in
    :func:`solve_navier_cauchy`. Returns ``(x, info)`` with ``info`` = method actually used,
    CG iterations (0 for the direct solver) and the relative residual ``|A x - b| / |b|``.
    """
    D = len(interior_shape)
    if method == "auto":
        method = "direct" if b.size <= (direct_max if direct_max is not None else
                                        (4000 if D == 2 else 1000)) else "cg"
    info = {"method": method, "iterations": 0}
    if method == "direct":
        lu = spla.splu(A.tocsc(), permc_spec="MMD_AT_PLUS_A")
        x = lu.solve(b)
    elif method == "cg":
        M = _MultigridPreconditioner(A, interior_shape, D)
        x, info["iterations"], converged = _pcg(A, b, M.apply, rtol, maxiter)
        if not converged:
            raise RuntimeError(f"CG did not reach rtol={rtol} in {maxiter} iterations")
    else:
        raise ValueError(f"unknown method {method!r}")
    bn = np.linalg.norm(b)
    info["relative_residual"] = float(np.linalg.norm(A @ x - b) / bn) if bn > 0 else 0.0
    return x, info


def solve_navier_cauchy(lam_map, mu_map, force, spacing=None, *, method="auto", rtol=1e-8,
                        maxiter=1000, direct_max=None, return_info=False, pad=0,
                        pad_lame=None):
    """Solve ``div(lambda tr(eps) I + 2 mu eps) + f = 0``, ``u = 0`` on the image border.

    With ``pad > 0`` the domain is first extended by ``pad`` voxels on every side with the
    material ``pad_lame = (lambda, mu)`` (e.g. air) and no force; ``u = 0`` then holds on the
    border of the extended domain and the solution is cropped back to ``[*shape, D]``.

    Args:
        lam_map, mu_map: ``[*shape]`` Lamé parameters (may be discontinuous).
        force: ``[*shape, D]`` body force per unit volume; channel j along array axis j.
        spacing: voxel size per axis (default 1): displacements come out in the units of the
            spacing; with the default they are voxel units.
        method: ``"direct"`` (SuperLU), ``"cg"`` (multigrid-preconditioned CG) or ``"auto"``
            (direct for at most ``direct_max`` unknowns, default 4000 in 2D / 1000 in 3D,
            CG otherwise; on 128^2 the preconditioned CG was ~4x faster than SuperLU, and
            SuperLU's fill-in makes 3D direct solves impractical beyond ~16^3).
        rtol: relative residual tolerance of CG (default 1e-8: far below the discretization
            error; CG and the direct solver agreed to <= 1e-9 relative in max-norm).
    Returns:
        ``disp`` float64 ``[*shape, D]`` (zero on the border when ``pad = 0``); with
        ``return_info`` also a dict (method, iterations, relative residual).
    """
    lam_map = np.asarray(lam_map, dtype=np.float64)
    mu_map = np.asarray(mu_map, dtype=np.float64)
    force = np.asarray(force, dtype=np.float64)
    shape = lam_map.shape
    D = len(shape)
    if force.shape != shape + (D,):
        raise ValueError(f"force must have shape {shape + (D,)}, got {force.shape}")
    pad = int(pad)
    if pad > 0:
        if pad_lame is None:
            raise ValueError("pad > 0 needs pad_lame = (lambda, mu) of the padding material")
        width = [(pad, pad)] * D
        lam_map = np.pad(lam_map, width, constant_values=float(pad_lame[0]))
        mu_map = np.pad(mu_map, width, constant_values=float(pad_lame[1]))
        force = np.pad(force, width + [(0, 0)])
        disp, info = solve_navier_cauchy(lam_map, mu_map, force, spacing, method=method,
                                         rtol=rtol, maxiter=maxiter, direct_max=direct_max,
                                         return_info=True)
        disp = disp[tuple(slice(pad, pad + n) for n in shape)]
        info["pad"] = pad
        return (disp, info) if return_info else disp
    A, interior = assemble_elasticity(lam_map, mu_map, spacing)
    b = np.concatenate([force[..., j][interior] for j in range(D)])
    x, info = _solve_system(A, b, tuple(s - 2 for s in shape), method=method, rtol=rtol,
                            maxiter=maxiter, direct_max=direct_max)
    N = b.size // D
    disp = np.zeros(shape + (D,))
    for j in range(D):
        disp[..., j][interior] = x[j * N:(j + 1) * N]
    return (disp, info) if return_info else disp


def displacement_gradient(disp, spacing=None):
    """``g[..., j, i] = d_i u_j`` (central differences, one-sided at the border), float64
    ``[*shape, D, D]`` for ``disp [*shape, D]``."""
    disp = np.asarray(disp, dtype=np.float64)
    D = disp.ndim - 1
    h = _spacing(spacing, D)
    g = np.empty(disp.shape + (D,))
    for j in range(D):
        grads = np.gradient(disp[..., j], *h)
        for i in range(D):
            g[..., j, i] = grads[i]
    return g


def strain_norm(disp, spacing=None):
    """Voxelwise Frobenius norm of the small strain ``sym(grad u)`` (central differences)."""
    g = displacement_gradient(disp, spacing)
    e = 0.5 * (g + np.swapaxes(g, -1, -2))
    return np.sqrt(np.sum(e * e, axis=(-1, -2)))


def principal_strain(disp, spacing=None):
    """Voxelwise largest absolute principal strain ``max |eig(sym(grad u))|`` ``[*shape]``
    (central differences; 0.1 = 10 % stretch or compression along the principal direction)."""
    g = displacement_gradient(disp, spacing)
    return np.abs(np.linalg.eigvalsh(0.5 * (g + np.swapaxes(g, -1, -2)))).max(axis=-1)
