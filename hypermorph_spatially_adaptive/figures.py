"""Figures of the paper (Fig. 2, Fig. 3), training curves and Dice box plots. No TensorFlow.

Every ``plot_*`` function validates its inputs (``ValueError`` with a message naming the
problem), draws one figure and writes it as a PNG **atomically**: the figure is saved to a
temporary file in the destination folder and then renamed with ``os.replace``, so a reader never
sees a half-written PNG and no temporary file is left behind (also on errors). The function
returns the output path.

Rendering uses matplotlib's Agg canvas explicitly (``matplotlib.figure.Figure`` +
``FigureCanvasAgg``); :mod:`matplotlib.pyplot` is never imported, so no GUI backend is touched,
the global pyplot state of a notebook that imports this module is left alone, and every figure is
freed when the function returns.

Conventions: CONVENTIONS.md (single pairs, no batch axis: ``disp [*spatial, D]``). In addition:

* Images are 2D ``[H, W]`` or 3D ``[X, Y, Z]`` arrays. For 3D inputs the panel shows the middle
  slice along the **last** axis (index ``Z // 2``) and the two in-plane displacement components
  (channels 0 and 1).
* Arrays are drawn as stored: array axis 0 runs down the rows of the picture, axis 1 to the
  right (``imshow`` with ``origin='upper'``); no transposes or flips.

Functions
---------
* :func:`plot_parameter_scatter`  Fig. 2: per-pair identified parameters per tissue class.
* :func:`plot_registration_panel` Fig. 3: moving / fixed / warped / grid / Jacobian / difference /
  contours, one row per method.
* :func:`plot_training_curves`    loss and NCC against step for several runs.
* :func:`plot_dice_boxplots`      Dice per method (mean and per class).
* :func:`plot_comparison_forest`  paired differences with intervals, pooled and per seed (the study).
* :func:`grid_positions`, :func:`deformed_grid_lines` the numeric part of the deformation grid.
"""
from __future__ import annotations

import os
import sys
from typing import List, Mapping, Optional, Sequence, Tuple

import matplotlib

if "matplotlib.pyplot" not in sys.modules:
    # Headless default for scripts; an interactive session that already chose a backend for
    # pyplot keeps it (we render on FigureCanvasAgg explicitly and never touch pyplot).
    matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.colors import ListedColormap, Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from datasets.atomic import atomic_write

__all__ = [
    "plot_parameter_scatter",
    "plot_registration_panel",
    "plot_training_curves",
    "plot_dice_boxplots",
    "plot_comparison_forest",
    "grid_positions",
    "deformed_grid_lines",
]

DPI = 130
#: default half-width of the uniform jitter added to plotted (mu, lambda) points (axis units);
#: the default grid step of the parameter search is 0.1, so this is 15 % of a grid cell.
SCATTER_JITTER = 0.015
_POINT_COLOR = "tab:blue"
_JAC_CMAP = "PRGn"  # purple (compression) - white (det = 1) - green (expansion); no red in it


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------
def _new_figure(figsize: Tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _check_out_png(out_png) -> str:
    path = os.fspath(out_png)
    if not str(path).lower().endswith(".png"):
        raise ValueError(f"out_png must end with '.png', got {path!r}")
    return path


def _save_png_atomic(fig: Figure, out_png: str, dpi: int = DPI) -> str:
    """Save ``fig`` as a PNG with the one atomic writer (:func:`datasets.atomic.atomic_write`)."""
    return atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def _require_columns(df: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{name} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"{name} is missing column(s) {missing}; it has {list(df.columns)}"
        )


def _check_class_names(class_names) -> List[str]:
    if isinstance(class_names, str) or class_names is None:
        raise ValueError(f"class_names must be a list of class names, got {class_names!r}")
    names = [str(c) for c in class_names]
    if not names:
        raise ValueError("class_names is empty")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names has duplicates: {names}")
    return names


def _numeric(series: pd.Series) -> np.ndarray:
    """Column as float64 (empty strings etc. -> NaN)."""
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)


def _class_color(c: int):
    """Colour of tissue class ``c`` (1..C) in the panel's contour column."""
    return matplotlib.colormaps["tab10"]((int(c) - 1) % 10)


def _swarm_offsets(values: np.ndarray, width: float = 0.38, bin_size: float = 0.02,
                   spacing: float = 0.045) -> np.ndarray:
    """Horizontal offsets for a swarm-like strip plot (deterministic).

    Values are binned (``bin_size``); the ``m`` points of one bin are spread symmetrically
    around 0 with ``spacing`` between neighbours, squeezed so that ``|offset| <= width``.
    """
    values = np.asarray(values, dtype=np.float64)
    out = np.zeros(values.shape)
    if values.size == 0:
        return out
    bins = np.round(values / bin_size).astype(np.int64)
    for b in np.unique(bins):
        idx = np.flatnonzero(bins == b)
        m = idx.size
        step = spacing if (m - 1) * spacing <= 2 * width else 2 * width / max(m - 1, 1)
        out[idx] = (np.arange(m) - (m - 1) / 2.0) * step
    return out


# --------------------------------------------------------------------------------------
# deformation grid (numeric helpers, tested)
# --------------------------------------------------------------------------------------
def grid_positions(n: int, step: int) -> np.ndarray:
    """Indices of the grid lines along an axis of length ``n``: every ``step`` voxels, centred.

    The first line is at ``((n - 1) % step) // 2`` so the unused margin is split between both
    ends, e.g. ``n = 32, step = 4 -> 1, 5, ..., 29``.
    """
    n, step = int(n), int(step)
    if n < 1:
        raise ValueError(f"axis length must be >= 1, got {n}")
    if step < 1:
        raise ValueError(f"grid step must be >= 1, got {step}")
    return np.arange(((n - 1) % step) // 2, n, step)


def deformed_grid_lines(disp: np.ndarray, step: int = 4) -> Tuple[np.ndarray, np.ndarray]:
    """Polylines of a regular grid deformed by ``phi(x) = x + disp(x)`` (2D, voxel units).

    Args:
        disp: ``[H, W, 2]`` displacement, channel 0 along rows (axis 0), channel 1 along columns.
        step: grid spacing in voxels; line positions from :func:`grid_positions`.

    Returns:
        ``(row_lines, col_lines)`` in ``(row, col)`` coordinates:

        * ``row_lines`` ``[len(grid_positions(H)), W, 2]``: the line of constant row ``r``,
          sampled at every column ``c``: ``(r + disp[r, c, 0], c + disp[r, c, 1])``.
        * ``col_lines`` ``[len(grid_positions(W)), H, 2]``: the line of constant column ``c``,
          sampled at every row ``r``: same formula.

        With ``disp = 0`` these are straight lines on the grid positions; a constant
        displacement ``(a, b)`` shifts every line by ``(a, b)``. To draw them with ``imshow``
        orientation plot ``x = col``, ``y = row``.
    """
    disp = np.asarray(disp, dtype=np.float64)
    if disp.ndim != 3 or disp.shape[-1] != 2:
        raise ValueError(f"disp must have shape [H, W, 2], got {disp.shape}")
    h, w = disp.shape[:2]
    rows, cols = grid_positions(h, step), grid_positions(w, step)
    rr, cc = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                         indexing="ij")
    pos = np.stack([rr + disp[..., 0], cc + disp[..., 1]], axis=-1)  # [H, W, 2]
    row_lines = pos[rows, :, :]  # [n_rows, W, 2]
    col_lines = np.transpose(pos[:, cols, :], (1, 0, 2))  # [n_cols, H, 2]
    return row_lines, col_lines


# --------------------------------------------------------------------------------------
# 1. Fig. 2: identified parameters
# --------------------------------------------------------------------------------------
def _regularizer_kind(regularizer: str) -> str:
    r = str(regularizer).strip().lower()
    if r in ("elastic", "elas"):
        return "elastic"
    if r in ("diffusion", "diff"):
        return "diffusion"
    raise ValueError(
        f"regularizer must be 'elastic' (or 'elas') or 'diffusion' (or 'diff'), got {regularizer!r}"
    )


def _check_choices(choices: pd.DataFrame, names: Sequence[str], params: Sequence[str]) -> None:
    """``choices`` must hold ``pair_id`` and ``<param>_<class>`` for every class name and parameter, at
    least one row, and values in [0, 1] (NaN allowed)."""
    required = ["pair_id"] + [f"{p}_{c}" for c in names for p in params]
    _require_columns(choices, required, "choices")
    if len(choices) == 0:
        raise ValueError("choices has no rows")
    for col in required[1:]:
        v = _numeric(choices[col])
        bad = v[np.isfinite(v) & ((v < -1e-9) | (v > 1 + 1e-9))]
        if bad.size:
            raise ValueError(f"choices[{col!r}] has values outside [0, 1]: {bad[:5].tolist()}")


#: axis range and ticks of the parameter plots (values in [0, 1] with a small margin)
_PARAM_LIM = (-0.05, 1.05)
_PARAM_TICKS = np.linspace(0, 1, 6)


def _elastic_scatter(choices: pd.DataFrame, names: Sequence[str], jitter: float, seed: int) -> Figure:
    """Fig. 2, elastic: one square ``mu`` (x) / ``lambda`` (y) subplot per class, points jittered by
    ``U(-jitter, jitter)`` from ``default_rng(seed)`` (drawn class by class, x then y)."""
    rng = np.random.default_rng(seed)
    lo, hi = _PARAM_LIM
    k = len(names)
    ncols = min(k, 4)
    nrows = int(np.ceil(k / ncols))
    fig = _new_figure((3.0 * ncols + 0.4, 3.0 * nrows + 1.0))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, c in zip(axes, names):
        mu = _numeric(choices[f"mu_{c}"])
        lam = _numeric(choices[f"lambda_{c}"])
        ok = np.isfinite(mu) & np.isfinite(lam)
        mu, lam = mu[ok], lam[ok]
        jx = rng.uniform(-jitter, jitter, mu.size) if jitter > 0 else 0.0
        jy = rng.uniform(-jitter, jitter, lam.size) if jitter > 0 else 0.0
        ax.scatter(mu + jx, lam + jy, s=22, color=_POINT_COLOR, alpha=0.7,
                   edgecolors="white", linewidths=0.4, zorder=3)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xticks(_PARAM_TICKS)
        ax.set_yticks(_PARAM_TICKS)
        ax.set_aspect("equal")
        ax.grid(True, color="0.88", linewidth=0.6, zorder=0)
        ax.set_title(f"{c} (n = {int(ok.sum())})")
        ax.set_xlabel(r"$\mu$")
        ax.set_ylabel(r"$\lambda$")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    note = f"\none dot per pair, jittered by up to ±{jitter:g}" if jitter > 0 else ""
    fig.suptitle(f"Identified tissue-specific parameters, elastic regularizer "
                 f"({len(choices)} pairs){note}")
    return fig


def _diffusion_strip(choices: pd.DataFrame, names: Sequence[str]) -> Figure:
    """Fig. 2, diffusion: one strip of weights per class (deterministic swarm layout, median bar)."""
    fig = _new_figure((max(4.0, 1.5 * len(names) + 1.8), 4.2))
    ax = fig.subplots()
    labels = []
    for i, c in enumerate(names):
        w = _numeric(choices[f"lambda_{c}"])
        w = w[np.isfinite(w)]
        x = i + _swarm_offsets(w)
        ax.scatter(x, w, s=22, color=_POINT_COLOR, alpha=0.75, edgecolors="white",
                   linewidths=0.4, zorder=3)
        if w.size:
            ax.hlines(np.median(w), i - 0.4, i + 0.4, colors="0.25", linewidths=1.5, zorder=4)
        labels.append(f"{c}\nn = {w.size}")
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(labels)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylim(*_PARAM_LIM)
    ax.set_yticks(_PARAM_TICKS)
    ax.grid(True, axis="y", color="0.88", linewidth=0.6, zorder=0)
    ax.set_ylabel(r"diffusion weight $\lambda$")
    fig.suptitle(f"Identified tissue-specific weights, diffusion regularizer ({len(choices)} pairs)"
                 f"\none dot per pair, bar = median")
    return fig


def plot_parameter_scatter(choices: pd.DataFrame, class_names: List[str], regularizer: str,
                           out_png: str, jitter: float = SCATTER_JITTER, seed: int = 0,
                           include_background: bool = False) -> str:
    """Fig. 2: the per-pair, per-class parameters identified by the grid search.

    Args:
        choices: one row per test pair with column ``pair_id`` and, for ``elastic``,
            ``lambda_<class>`` and ``mu_<class>`` for every name in ``class_names``; for
            ``diffusion`` ``lambda_<class>`` (the per-class diffusion weight). Background
            columns (``lambda_background``/``mu_background``) and any other columns are
            ignored unless ``include_background``. NaN entries (e.g. a class absent from a
            pair) are skipped; ``n`` counts the plotted pairs.
        class_names: tissue class names (background excluded), e.g. ``["lung", "bone", "liver"]``.
        regularizer: ``"elastic"`` / ``"elas"`` or ``"diffusion"`` / ``"diff"``.
        out_png: output path (``.png``).
        jitter: elastic only: every plotted point is moved by independent ``U(-jitter, jitter)``
            offsets on both axes (seeded with ``seed``, so the figure is reproducible), so that
            pairs that chose the same grid point stay visible as a small cluster instead of one
            dot. The true values are the grid points; 0 disables the jitter. Diffusion uses a
            deterministic swarm layout instead (points with (nearly) equal weight are spread
            horizontally; y is never jittered).
        seed: seed of the jitter.
        include_background: also plot a ``background`` panel/strip (needs its columns).

    Returns:
        ``out_png``.

    Layout: elastic: one square subplot per class, ``mu`` on x and ``lambda`` on y, both on
    ``[0, 1]`` with a small margin, ``n`` written in the corner. Diffusion: one strip plot, classes
    on x, weight on y, median as a horizontal bar. The title names the regularizer.
    """
    out_png = _check_out_png(out_png)
    kind = _regularizer_kind(regularizer)
    names = _check_class_names(class_names)
    if include_background and "background" not in names:
        names = ["background"] + names
    if jitter < 0 or not np.isfinite(jitter):
        raise ValueError(f"jitter must be a finite number >= 0, got {jitter}")
    _check_choices(choices, names, ("lambda", "mu") if kind == "elastic" else ("lambda",))
    fig = _elastic_scatter(choices, names, jitter, seed) if kind == "elastic" else _diffusion_strip(choices, names)
    return _save_png_atomic(fig, out_png)


# --------------------------------------------------------------------------------------
# 2. Fig. 3: registration panel
# --------------------------------------------------------------------------------------
def _as_image(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2D [H, W] or 3D [X, Y, Z] array, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number) and a.dtype != bool:
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    return a.astype(np.float64)


def _as_labels(a, name: str) -> np.ndarray:
    a = _as_image(a, name)
    finite = np.isfinite(a)
    if not finite.all() or np.any(a != np.round(a)) or np.any(a < 0):
        raise ValueError(f"{name} must hold non-negative integer labels (0 = background)")
    return a.astype(np.int64)


def _mid(a: np.ndarray, ndim: int) -> np.ndarray:
    """Middle slice along the last spatial axis for 3D (keeps trailing channel axes)."""
    if ndim == 2:
        return a
    return a[:, :, a.shape[2] // 2]


def _robust_range(*arrays: np.ndarray) -> Tuple[float, float]:
    v = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [1, 99])
    if hi <= lo:
        lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _panel_label(method, res: Mapping) -> str:
    """Row label of a panel row: the method name and, when given, its mean Dice and %negJ."""
    label = str(method)
    extras = []
    for key, fmt in (("dice", "Dice {:.3f}"), ("negj", "%negJ {:.3f}")):
        if res.get(key) is not None:
            try:
                extras.append(fmt.format(float(res[key])))
            except (TypeError, ValueError) as e:
                raise ValueError(f"results[{method!r}][{key!r}] must be a number, "
                                 f"got {res[key]!r}") from e
    if extras:
        label += "\n" + "\n".join(extras)
    return label


def _panel_rows(results: Mapping[str, Mapping], shape: Tuple[int, ...]) -> List[dict]:
    """Validate the entries of the non-empty ``results`` (see :func:`plot_registration_panel`) against the image ``shape`` and
    return one dict per method with its ``label`` and the drawn slices: ``warped``, ``wseg``
    (``[H, W]``), ``disp`` (``[H, W, 2]``, in-plane channels 0 and 1, voxels) and ``det``
    (``det(I + grad u)`` of the full field, ``[H, W]``)."""
    import eval_metrics  # repo-root module (numpy / scipy only)

    nd = len(shape)
    rows = []
    for method, res in results.items():
        if not isinstance(res, Mapping):
            raise ValueError(f"results[{method!r}] must be a dict, got {type(res).__name__}")
        missing = [k for k in ("warped", "disp", "warped_seg") if k not in res]
        if missing:
            raise ValueError(f"results[{method!r}] is missing key(s) {missing}")
        warped = _as_image(res["warped"], f"results[{method!r}]['warped']")
        wseg = _as_labels(res["warped_seg"], f"results[{method!r}]['warped_seg']")
        disp = np.asarray(res["disp"], dtype=np.float64)
        if warped.shape != shape:
            raise ValueError(f"results[{method!r}]['warped'] has shape {warped.shape}, "
                             f"expected the image shape {shape}")
        if wseg.shape != shape:
            raise ValueError(f"results[{method!r}]['warped_seg'] has shape {wseg.shape}, "
                             f"expected the image shape {shape}")
        if disp.shape != (*shape, nd):
            raise ValueError(f"results[{method!r}]['disp'] has shape {disp.shape}, expected "
                             f"{(*shape, nd)} ([*spatial, D] for images of shape {shape})")
        det = eval_metrics.jacobian_determinant(disp)
        label = _panel_label(method, res)
        rows.append(dict(label=label, warped=_mid(warped, nd), wseg=_mid(wseg, nd),
                         disp=_mid(disp, nd)[..., :2], det=_mid(det, nd)))
    return rows


def _panel_scales(m2: np.ndarray, f2: np.ndarray, rows: Sequence[dict]) -> dict:
    """Colour scales shared by every row of the panel, from the drawn slices ``m2``, ``f2`` ``[H, W]``:
    ``image`` (imshow keywords of the grey images: robust 1-99 % range of M and F), ``dmax`` (top of
    the difference scale: 99th percentile of the before-registration ``|F - M|``) and ``jnorm``
    (determinant range ``1 +- r``, ``r`` the 99th percentile of ``|det - 1|`` clipped to [0.1, 1])."""
    vmin, vmax = _robust_range(m2, f2)
    before = np.abs(f2 - m2)
    dmax = float(np.percentile(before, 99)) if before.size else 0.0
    if not np.isfinite(dmax) or dmax <= 0:
        dmax = max(float(np.nanmax(before)) if before.size else 0.0, 1e-6)
    devs = np.concatenate([np.abs(r["det"][np.isfinite(r["det"])] - 1).ravel() for r in rows])
    jr = float(np.percentile(devs, 99)) if devs.size else 0.0
    jr = float(np.clip(jr, 0.1, 1.0))
    return {"image": dict(cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest"), "dmax": dmax,
            "jnorm": Normalize(vmin=1 - jr, vmax=1 + jr)}


def _draw_panel_row(ax: Sequence, r: dict, m2: np.ndarray, f2: np.ndarray, s2: np.ndarray, classes: Sequence[int],
                    scales: dict, step: int) -> tuple:
    """Draw the seven columns of one method's row ``r`` (from :func:`_panel_rows`) into the axes ``ax``;
    ``m2``, ``f2``, ``s2`` are the drawn slices of M, F and the fixed labels. Returns the Jacobian
    and the difference images (for the colour bars)."""
    im_kw = scales["image"]
    h, w = f2.shape
    ax[0].imshow(m2, **im_kw)
    ax[1].imshow(f2, **im_kw)
    ax[2].imshow(r["warped"], **im_kw)
    ax[3].imshow(r["warped"], alpha=0.45, **im_kw)
    row_lines, col_lines = deformed_grid_lines(r["disp"], step)
    segs = [line[:, ::-1] for line in list(row_lines) + list(col_lines)]  # (x=col, y=row)
    ax[3].add_collection(LineCollection(segs, colors="tab:orange", linewidths=0.6))
    ax[3].set_xlim(-0.5, w - 0.5)
    ax[3].set_ylim(h - 0.5, -0.5)
    jac_im = ax[4].imshow(r["det"], cmap=_JAC_CMAP, norm=scales["jnorm"], interpolation="nearest")
    neg = np.ma.masked_where(~(r["det"] <= 0), np.ones_like(r["det"]))
    ax[4].imshow(neg, cmap=ListedColormap(["red"]), vmin=0, vmax=1, interpolation="nearest")
    diff = np.abs(f2 - r["warped"])
    diff_im = ax[5].imshow(diff, cmap="magma", vmin=0, vmax=scales["dmax"], interpolation="nearest")
    ax[5].text(0.03, 0.97, f"mean {np.mean(diff):.3g}", transform=ax[5].transAxes,
               ha="left", va="top", fontsize=7, color="white")
    ax[6].imshow(f2, **im_kw)
    for c in classes:
        for seg, ls in ((s2, "solid"), (r["wseg"], "dashed")):
            mask = seg == c
            if mask.any() and not mask.all():
                ax[6].contour(mask.astype(float), levels=[0.5], colors=[_class_color(c)],
                              linestyles=ls, linewidths=0.9)
    for a in ax:
        a.set_xticks([])
        a.set_yticks([])
    ax[0].set_ylabel(r["label"], fontsize=9)
    return jac_im, diff_im


def _panel_legend(fig: Figure, classes: Sequence[int], class_names: Optional[Sequence[str]]) -> None:
    """Contour legend under the panel: one colour per class (``class_names`` of classes 1..C, else
    ``class <c>``) and the line styles of fixed / warped labels."""
    names = list(class_names) if class_names is not None else []
    handles = [Line2D([], [], color=_class_color(c), lw=1.5,
                      label=names[c - 1] if c - 1 < len(names) else f"class {c}")
               for c in classes]
    handles += [Line2D([], [], color="0.2", lw=1.2, ls="solid", label="fixed"),
                Line2D([], [], color="0.2", lw=1.2, ls="dashed", label="warped")]
    fig.legend(handles=handles, loc="outside lower right", ncols=min(len(handles), 4),
               fontsize=8, frameon=False)


def plot_registration_panel(moving, fixed, fixed_seg, results: Mapping[str, Mapping],
                            out_png: str, title: str = "",
                            class_names: Optional[Sequence[str]] = None,
                            grid_step: Optional[int] = None) -> str:
    """Fig. 3: qualitative comparison of methods on one pair, one row per method.

    Args:
        moving, fixed: images ``[H, W]`` or ``[X, Y, Z]`` (same shape). 3D: the middle slice
            along the last axis is drawn.
        fixed_seg: fixed label map, same shape (0 = background, 1..C).
        results: ``{method name: dict(warped=..., disp=..., warped_seg=...)}`` in row order;
            ``warped`` and ``warped_seg`` have the image shape, ``disp`` ``[*spatial, D]`` in
            voxels. Optional keys ``dice`` (float, mean Dice) and ``negj`` (float, percent of
            voxels with det <= 0) are written in the row label.
        out_png: output path (``.png``).
        title: figure title (first line); the second line gives the before-registration
            difference ``mean |F - M|`` and the slice drawn for 3D inputs.
        class_names: optional names of classes 1..C for the contour legend.
        grid_step: spacing of the deformation grid lines in voxels; default
            ``max(4, round(min(H, W) / 32))`` (4 px up to 128 px images, then at most ~32 lines).

    Columns: (0) moving M, (1) fixed F, (2) warped M∘φ, (3) the regular grid deformed by
    ``x + u(x)`` (in-plane components) over a dimmed warped image, (4) the Jacobian determinant
    ``det(I + grad u)`` (diverging colormap centred at 1 with a symmetric range shared by all
    rows; voxels with ``det <= 0`` in solid red; for 3D the determinant of the full 3D field,
    sliced), (5) ``|F - M∘φ|`` on the colour scale of the before-registration difference
    ``|F - M|`` (shared by all rows, so rows and "before" are comparable; per-row mean in the
    corner), (6) class contours of the fixed labels (solid) and warped labels (dashed) over F,
    one colour per class.
    """
    out_png = _check_out_png(out_png)
    mov = _as_image(moving, "moving")
    fix = _as_image(fixed, "fixed")
    fseg = _as_labels(fixed_seg, "fixed_seg")
    if mov.shape != fix.shape:
        raise ValueError(f"moving {mov.shape} and fixed {fix.shape} must have the same shape")
    if fseg.shape != fix.shape:
        raise ValueError(f"fixed_seg {fseg.shape} must have the image shape {fix.shape}")
    if not isinstance(results, Mapping) or len(results) == 0:
        raise ValueError("results must be a non-empty dict {method: dict(warped, disp, warped_seg)}")
    if grid_step is not None and int(grid_step) < 1:
        raise ValueError(f"grid_step must be >= 1, got {grid_step}")
    shape = fix.shape
    nd = len(shape)
    rows = _panel_rows(results, shape)

    m2, f2, s2 = _mid(mov, nd), _mid(fix, nd), _mid(fseg, nd)
    h, w = f2.shape
    step = int(grid_step) if grid_step is not None else max(4, int(round(min(h, w) / 32)))
    scales = _panel_scales(m2, f2, rows)
    classes = sorted(set(np.unique(s2).tolist()).union(*[np.unique(r["wseg"]).tolist() for r in rows])
                     - {0})

    ncols = 7
    cell = 1.9
    fig = _new_figure((cell * ncols + 0.6, cell * (h / w) * len(rows) + 1.9))
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    col_titles = ["moving M", "fixed F", "warped M∘φ", "deformation grid",
                  "Jacobian det (red: ≤ 0)", "|F − M∘φ|", "contours F (—) / M∘φ (--)"]
    for i, r in enumerate(rows):
        jac_im, diff_im = _draw_panel_row(axes[i], r, m2, f2, s2, classes, scales, step)
    for j, t in enumerate(col_titles):
        axes[0, j].set_title(t, fontsize=9)
    # colour bars in inset axes under the last row: the image columns keep equal sizes
    for j, im, ext, lab in ((4, jac_im, "both", "det(I + ∇u)"),
                            (5, diff_im, "max", "absolute difference")):
        cax = axes[-1, j].inset_axes([0.08, -0.13, 0.84, 0.06])
        cb = fig.colorbar(im, cax=cax, orientation="horizontal", extend=ext)
        cb.ax.tick_params(labelsize=7)
        cb.set_label(lab, fontsize=8)
    if classes:
        _panel_legend(fig, classes, class_names)
    sub = f"before registration: mean |F − M| = {np.mean(np.abs(f2 - m2)):.3g}"
    if nd == 3:
        sub += f"; 3D, middle slice z = {shape[2] // 2} of {shape[2]}"
    fig.suptitle(f"{title}\n{sub}" if title else sub, fontsize=10)
    return _save_png_atomic(fig, out_png)


# --------------------------------------------------------------------------------------
# 3. training curves
# --------------------------------------------------------------------------------------
def plot_training_curves(logs: Mapping[str, pd.DataFrame], out_png: str) -> str:
    """Loss and NCC against step for several runs (the trainer's ``train_log.csv``).

    Args:
        logs: ``{run name: DataFrame}``; each frame needs ``step``, ``loss`` and ``ncc``;
            ``val_loss`` (and ``val_ncc``) are optional and usually empty/NaN except every
            ``--val-every`` steps (empty strings are read as NaN). Rows are sorted by step.
        out_png: output path (``.png``).

    Two subplots: training loss (line) with ``val_loss`` as markers of the same colour, and the
    training NCC (line) with ``val_ncc`` as markers if present. One colour per run.
    """
    out_png = _check_out_png(out_png)
    if not isinstance(logs, Mapping) or len(logs) == 0:
        raise ValueError("logs must be a non-empty dict {run name: DataFrame}")
    for name, df in logs.items():
        _require_columns(df, ["step", "loss", "ncc"], f"logs[{name!r}]")
        if len(df) == 0:
            raise ValueError(f"logs[{name!r}] has no rows")
    fig = _new_figure((10.0, 3.8))
    ax_loss, ax_ncc = fig.subplots(1, 2)
    colors = matplotlib.colormaps["tab10"]
    any_val = False
    for k, (name, df) in enumerate(logs.items()):
        col = colors(k % 10)
        step = _numeric(df["step"])
        order = np.argsort(step, kind="stable")
        step = step[order]
        for ax, key, vkey in ((ax_loss, "loss", "val_loss"), (ax_ncc, "ncc", "val_ncc")):
            y = _numeric(df[key])[order]
            ok = np.isfinite(step) & np.isfinite(y)
            ax.plot(step[ok], y[ok], color=col, linewidth=1.2, label=str(name))
            if vkey in df.columns:
                v = _numeric(df[vkey])[order]
                okv = np.isfinite(step) & np.isfinite(v)
                if okv.any():
                    any_val = True
                    ax.plot(step[okv], v[okv], linestyle="none", marker="o", markersize=5,
                            markerfacecolor="white", markeredgecolor=col, markeredgewidth=1.3)
    ax_loss.set_title("loss")
    ax_loss.set_ylabel("loss (lower is better)")
    ax_ncc.set_title("NCC")
    ax_ncc.set_ylabel("local NCC (higher is better)")
    for ax in (ax_loss, ax_ncc):
        ax.set_xlabel("step")
        ax.grid(True, color="0.9", linewidth=0.6)
    handles, _ = ax_loss.get_legend_handles_labels()
    handles = list(handles) + [Line2D([], [], color="0.5", lw=1.2, label="train")]
    if any_val:
        handles.append(Line2D([], [], linestyle="none", marker="o", markerfacecolor="white",
                              markeredgecolor="0.3", label="validation"))
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle("Training curves")
    return _save_png_atomic(fig, out_png)


def plot_response_curves(curves: pd.DataFrame, out_png: str) -> str:
    """How trained models respond to their hyperparameters (``benchmarks/bench_response.py --curves``).

    Args:
        curves: one row per run, axis and value ``h`` with columns ``run, preset, axis, h,
            mean_u`` (mean displacement magnitude, voxels) and ``dice`` (mean Dice).
        out_png: output path (``.png``).

    One row of two subplots per run: mean |u| and mean Dice against ``h`` along each axis (the
    other entries at 0.5); the ``all`` axis (every entry together) is drawn black and thick.
    """
    out_png = _check_out_png(out_png)
    _require_columns(curves, ["run", "preset", "axis", "h", "mean_u", "dice"], "curves")
    runs = list(dict.fromkeys(curves["run"]))
    if not runs:
        raise ValueError("curves has no rows")
    fig = _new_figure((9.0, 2.6 * len(runs)))
    axs = np.atleast_2d(fig.subplots(len(runs), 2, squeeze=False))
    colors = matplotlib.colormaps["tab10"]
    for r, run in enumerate(runs):
        c = curves[curves["run"] == run]
        for k, axis in enumerate(dict.fromkeys(c["axis"])):
            a = c[c["axis"] == axis]
            style = dict(color="black", linewidth=2.2) if axis == "all" else dict(color=colors(k % 10), linewidth=1.1)
            for j, key in enumerate(("mean_u", "dice")):
                axs[r, j].plot(_numeric(a["h"]), _numeric(a[key]), marker=".", label=str(axis), **style)
        preset = str(c["preset"].iloc[0])
        axs[r, 0].set_ylabel(f"{preset}\nmean |u| (voxel)")
        axs[r, 1].set_ylabel("mean Dice")
        axs[r, 1].legend(fontsize=6, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
        for ax in axs[r]:
            ax.grid(True, color="0.9", linewidth=0.6)
            ax.set_xlim(0, 1)
    for ax in axs[-1]:
        ax.set_xlabel("h (others at 0.5)")
    fig.suptitle("Response to the hyperparameters")
    return _save_png_atomic(fig, out_png)


# --------------------------------------------------------------------------------------
# 4. Dice box plots
# --------------------------------------------------------------------------------------
def _draw_dice_boxes(ax, data: Sequence[np.ndarray], methods: Sequence[str], rng: np.random.Generator) -> None:
    """One Dice subplot: a box (median, quartiles, 1.5 IQR whiskers) per method with finite values
    ``data[i]``, the pairs as dots jittered by ``U(-0.15, 0.15)`` from ``rng`` and the mean as a white
    diamond; y from just below the lowest value to 1."""
    colors = matplotlib.colormaps["tab10"]
    pos = np.arange(1, len(methods) + 1)
    nonempty = [i for i, d in enumerate(data) if d.size]
    if nonempty:
        bp = ax.boxplot([data[i] for i in nonempty], positions=pos[nonempty], widths=0.6,
                        patch_artist=True, showfliers=False,
                        medianprops=dict(color="black", linewidth=1.3))
        for patch, i in zip(bp["boxes"], nonempty):
            patch.set_facecolor(colors(i % 10))
            patch.set_alpha(0.35)
    for i, d in enumerate(data):
        if d.size:
            x = pos[i] + rng.uniform(-0.15, 0.15, d.size)
            ax.scatter(x, d, s=9, color=colors(i % 10), alpha=0.8, zorder=3,
                       linewidths=0)
            ax.scatter([pos[i]], [d.mean()], marker="D", s=22, color="white",
                       edgecolors="black", linewidths=0.8, zorder=4)
    ax.set_xticks(pos)
    ax.set_xticklabels(methods, rotation=30, ha="right")
    ax.set_xlim(0.4, len(methods) + 0.6)
    allv = np.concatenate(data) if data else np.array([])
    if allv.size:
        lo = float(allv.min())
        ax.set_ylim(max(0.0, lo - 0.05 * max(1.0 - lo, 0.1)) if lo >= 0 else lo - 0.05, 1.005)
    ax.set_ylabel("Dice")
    ax.grid(True, axis="y", color="0.9", linewidth=0.6)


def plot_dice_boxplots(per_pair: pd.DataFrame, class_names: List[str], out_png: str,
                       method_order: Optional[Sequence[str]] = None) -> str:
    """Box plots of the Dice per method: one subplot for ``mean_dice`` + one per class.

    Args:
        per_pair: one row per (pair, method) with columns ``method``, ``mean_dice`` and
            ``dice_<class>`` for every class name. NaN Dice values (absent class) are skipped.
        class_names: tissue class names (background excluded).
        out_png: output path (``.png``).
        method_order: order of the boxes (default: order of first appearance in ``method``);
            methods listed here must occur in the table.

    Each box shows the median, quartiles and 1.5 IQR whiskers; the individual pairs are drawn
    as jittered dots over it and the mean as a white diamond.
    """
    out_png = _check_out_png(out_png)
    names = _check_class_names(class_names)
    cols = ["mean_dice"] + [f"dice_{c}" for c in names]
    _require_columns(per_pair, ["method"] + cols, "per_pair")
    if len(per_pair) == 0:
        raise ValueError("per_pair has no rows")
    present = list(dict.fromkeys(per_pair["method"].astype(str)))
    if method_order is None:
        methods = present
    else:
        methods = [str(m) for m in method_order]
        unknown = [m for m in methods if m not in present]
        if unknown:
            raise ValueError(f"method_order has methods not in per_pair: {unknown}; "
                             f"present: {present}")
    method_col = per_pair["method"].astype(str)
    k = len(cols)
    ncols = min(k, 4)
    nrows = int(np.ceil(k / ncols))
    width = max(3.2, 0.55 * len(methods) + 1.2)
    fig = _new_figure((width * ncols, 3.6 * nrows + 0.4))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    rng = np.random.default_rng(0)
    for ax, col in zip(axes, cols):
        data = []
        for m in methods:
            v = _numeric(per_pair.loc[method_col == m, col])
            data.append(v[np.isfinite(v)])
        _draw_dice_boxes(ax, data, methods, rng)
        ax.set_title("mean Dice" if col == "mean_dice" else f"Dice {col[len('dice_'):]}")
    for ax in axes[k:]:
        ax.set_visible(False)
    n = per_pair.groupby(method_col).size()
    fig.suptitle("Dice per method (" + ", ".join(f"{m}: n={int(n.get(m, 0))}" for m in methods)
                 + "; ◇ = mean)", fontsize=10)
    return _save_png_atomic(fig, out_png)


# --------------------------------------------------------------------------------------
# 5. the study: paired differences with intervals, pooled and per seed
# --------------------------------------------------------------------------------------
def plot_comparison_forest(comp: pd.DataFrame, out_png: str, metric: str = "mean_dice",
                           comparisons: Optional[Sequence[str]] = None) -> str:
    """Forest plot of paired differences (``benchmarks/study.py``): one panel per ``setting`` (or
    one panel without that column), one line per (protocol, comparison ``a - b``).

    Args:
        comp: rows of :func:`.tables.paired_comparison` with columns ``protocol, seed,
            comparison, metric, mean_diff, ci_low, ci_high, p_holm, n_seeds, n_pairs`` (``seed``
            ``'all'`` = pooled over seeds x pairs; other values = one seed over its pairs).
        out_png: output path (``.png``).
        metric: the metric drawn (e.g. ``mean_dice``, ``percent_neg_jac``, ``hd95``).
        comparisons: only these comparison names (default: all rows of ``metric``).

    The pooled estimate is a black square with its 95 % interval (filled when its Holm-adjusted
    p < 0.05); each seed's estimate is a small coloured dot with its interval just below it. The
    dashed line is no difference.
    """
    out_png = _check_out_png(out_png)
    _require_columns(comp, ["protocol", "seed", "comparison", "metric", "mean_diff", "ci_low", "ci_high",
                            "p_holm", "n_seeds", "n_pairs"], "comp")
    df = comp[comp["metric"] == metric].copy()
    if comparisons is not None:
        df = df[df["comparison"].isin(list(comparisons))]
    if df.empty:
        raise ValueError(f"comp has no rows for metric {metric!r}")
    df["seed"] = df["seed"].astype(str)
    df["protocol"] = df["protocol"].fillna("").astype(str)
    settings = list(dict.fromkeys(df["setting"])) if "setting" in df else [None]
    lines = list(dict.fromkeys(zip(df["protocol"], df["comparison"])))
    seeds = sorted(s for s in df["seed"].unique() if s != "all")
    colors = matplotlib.colormaps["tab10"]
    fig = _new_figure((4.2 * len(settings) + 2.6, 0.32 * len(lines) * (1 + 0.35 * min(len(seeds), 3)) + 1.4))
    axs = np.atleast_1d(fig.subplots(1, len(settings), sharey=True, squeeze=False)).ravel()
    step = 0.7 / max(len(seeds), 1)
    for ax, setting in zip(axs, settings):
        part = df if setting is None else df[df["setting"] == setting]
        for y, (protocol, name) in enumerate(lines):
            rows = part[(part["protocol"] == protocol) & (part["comparison"] == name)].set_index("seed")
            if "all" in rows.index:
                r = rows.loc["all"]
                ax.plot([r["ci_low"], r["ci_high"]], [-y, -y], color="black", linewidth=1.6)
                ax.scatter([r["mean_diff"]], [-y], marker="s", s=30, zorder=3, edgecolors="black",
                           color="black" if r["p_holm"] < 0.05 else "white")
            for k, s in enumerate(seeds):
                if s in rows.index:
                    r = rows.loc[s]
                    yy = -y - (k + 1) * step / (len(seeds) + 1) * 1.2
                    ax.plot([r["ci_low"], r["ci_high"]], [yy, yy], color=colors(k % 10), linewidth=0.8, alpha=0.8)
                    ax.scatter([r["mean_diff"]], [yy], s=8, color=colors(k % 10), zorder=3)
        ax.axvline(0.0, color="0.4", linestyle="--", linewidth=0.8)
        ax.grid(True, axis="x", color="0.9", linewidth=0.6)
        pooled = part[part["seed"] == "all"]
        size = (f"{int(pooled['n_seeds'].max())} seeds x {int(pooled['n_pairs'].max())} pairs"
                if len(pooled) else "")
        ax.set_title(f"{setting + ': ' if setting else ''}{size}", fontsize=9)
        ax.set_xlabel(f"difference a - b in {metric}")
    axs[0].set_yticks([-y for y in range(len(lines))])
    axs[0].set_yticklabels([f"[{p[:3]}] {n}" if p else n for p, n in lines], fontsize=7)
    handles = [Line2D([], [], marker="s", color="black", markerfacecolor="black", linestyle="-",
                      label="pooled, Holm p < 0.05"),
               Line2D([], [], marker="s", color="black", markerfacecolor="white", linestyle="-", label="pooled"),
               *[Line2D([], [], marker=".", color=colors(k % 10), label=f"seed {s}") for k, s in enumerate(seeds)]]
    axs[-1].legend(handles=handles, fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Paired differences with 95 % intervals (pooled: seeds x pairs; per seed: over pairs)", fontsize=10)
    return _save_png_atomic(fig, out_png)
