"""Per-pair, per-tissue parameter identification with a trained *global* model (paper sec. 2.2).

For every test pair all grid points run through the global model as batched forward passes;
the moving labels are warped (nearest neighbour) with each displacement and class Dice and mean
Dice are computed per grid point. Then, per pair:

- tissue class ``c``: the grid point with the best ``Dice_c``;
- background (class 0) and the global baseline (``-g`` rows): the best *mean* Dice point.

Tie rule (documented, deterministic): among grid points with equal Dice the one with the
**larger regularization** wins: larger ``lambda + mu`` (elastic) or larger weight (diffusion),
then larger ``mu``, then larger ``lambda``. A class whose Dice is NaN at every grid point
(absent from both fixed and warped labels) falls back to the background choice and is flagged
in the ``fallback`` column.

Options of the authors' code (``--profile authors``, :mod:`.profiles`, docs/fidelity.md):
``background='zero'`` fixes the background at lambda = mu = 0 (diffusion weight 0) instead of the
best mean-Dice point; ``exclude_zero`` drops the grid point lambda = mu = 0 (weight 0) from every
choice; ``objective='tre'`` chooses the -g baseline (and a ``best-mean`` background) by the
smallest mean keypoint TRE (column ``tre``, mm) instead of the best mean Dice (ties as above).

Outputs (pandas DataFrames, written by ``parameter_identification.py``):
- grid table: ``pair_id, lambda[, mu], dice_<class>..., mean_dice`` (one row per pair x point)
- choice table: one row per pair with the SA hyperparameter columns
  (``lambda_<class>`` and, for elastic, ``mu_<class>``, background included, exactly the SA
  model's input order), ``dice_<class>`` (the Dice that chose each class), ``mean_dice`` (the
  background / baseline choice's mean Dice), and ``g_lambda[, g_mu], g_mean_dice``.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

import eval_metrics

from .artifacts import G_MEAN_DICE, PAIR_ID, global_columns, sa_columns
from .forward import auto_batch_size


def make_grid(regularizer: str, values: Sequence[float]) -> np.ndarray:
    """Grid points ``[G, 2]`` (lambda, mu) for elastic, ``[G, 1]`` for diffusion; values in [0, 1]."""
    v = np.round(np.asarray(sorted(set(float(x) for x in values)), np.float64), 6)
    if v.size == 0 or v.min() < 0 or v.max() > 1:
        raise ValueError(f"grid values must be a non-empty set in [0, 1]; got {list(values)}")
    if regularizer == "elastic":
        lam, mu = np.meshgrid(v, v, indexing="ij")
        return np.stack([lam.ravel(), mu.ravel()], axis=1)
    return v[:, None]


def grid_values(steps: int) -> List[float]:
    """``steps`` equidistant values in [0, 1] (11 -> 0, 0.1, ..., 1)."""
    if steps < 2:
        raise ValueError("the grid needs at least 2 values per axis")
    return [round(float(x), 6) for x in np.linspace(0.0, 1.0, steps)]


def grid_bytes(regularizer: str, n_values: int, image_shape: Sequence[int],
               batch_size: Optional[int] = None) -> int:
    """Bytes of fields :func:`grid_dice` holds at once for one pair: the displacement
    ``[*spatial, D]`` and warped image ``[*spatial, 1]`` (float32) of one chunk of grid points
    (``batch_size``, or :func:`.forward.auto_batch_size` when None: about 2^18 voxels; at most
    the whole grid: elastic ``n_values^2`` points, diffusion ``n_values``). Chunks are reduced to
    Dice one at a time, so the grid's size does not enter beyond its first chunk."""
    points = int(n_values) ** (2 if regularizer == "elastic" else 1)
    held = min(points, int(batch_size) if batch_size else auto_batch_size(image_shape, points))
    voxels = int(np.prod([int(s) for s in image_shape]))
    return held * voxels * (len(image_shape) + 1) * 4


def check_grid_size(regularizer: str, n_values: int, image_shape: Sequence[int], max_gb: float,
                    batch_size: Optional[int] = None) -> None:
    """Refuse a grid chunk whose memory (:func:`grid_bytes`) exceeds ``max_gb`` GB, with a
    ``ValueError`` naming ``--batch-size``, the estimate and the largest chunk that fits."""
    need = grid_bytes(regularizer, n_values, image_shape, batch_size)
    if need <= max_gb * 1e9:
        return
    per_point = grid_bytes(regularizer, 1, image_shape, 1)
    fit = int(max_gb * 1e9 // per_point)
    held = need // per_point
    where = f"{held} {regularizer} grid points per chunk at {' x '.join(map(str, image_shape))} voxels"
    advice = (f"use --batch-size {fit} or less" if fit >= 1 else
              "one grid point alone is larger: raise --max-grid-gb if the memory is there")
    raise ValueError(f"--batch-size {batch_size or 'auto'}: {where} hold ~{need / 1e9:.1f} GB of displacements and "
                     f"warped images, above --max-grid-gb {max_gb:g}; {advice}")


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` of a non-negative duration."""
    s = int(round(max(float(seconds), 0.0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def grid_dice(registrar, pair, grid: np.ndarray, class_names: Sequence[str], with_tre: bool = False) -> pd.DataFrame:
    """Class and mean Dice of one pair at every grid point (batched forward passes).

    ``grid`` is ``[G, P]`` with P = 2 (elastic) or 1 (diffusion), the global model's input.
    The grid runs chunk by chunk (``registrar.chunks``; chunk size ``registrar.batch_size`` or
    :func:`.forward.auto_batch_size` of the image), each chunk's fields reduced to Dice
    before the next, so memory holds one chunk of displacements, not G (3D).
    With ``with_tre`` (pairs with keypoints) a column ``tre`` holds the mean keypoint TRE in mm.
    """
    C = len(class_names)
    dice = np.empty((len(grid), C), np.float64)
    if with_tre and (pair.fixed_kp is None or pair.moving_kp is None):
        raise ValueError(f"pair {pair.pair_id}: the TRE objective needs keypoints, and this pair has none")
    tre = np.full(len(grid), np.nan)
    for start, _, disp in registrar.chunks(pair.moving, pair.fixed, grid):
        for k in range(len(disp)):
            warped_seg = eval_metrics.warp_labels(pair.moving_seg, disp[k])
            dice[start + k] = eval_metrics.dice_per_class(pair.fixed_seg, warped_seg, C)
            if with_tre:
                tre[start + k] = float(np.mean(eval_metrics.tre(pair.fixed_kp, pair.moving_kp, disp[k], pair.spacing)))
    df = pd.DataFrame({PAIR_ID: pair.pair_id, "lambda": grid[:, 0]})
    if grid.shape[1] == 2:
        df["mu"] = grid[:, 1]
    for c, name in enumerate(class_names):
        df[f"dice_{name}"] = dice[:, c]
    with warnings.catch_warnings():  # a class absent everywhere is NaN; all-NaN rows stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        df["mean_dice"] = np.nanmean(dice, axis=1)
    if with_tre:
        df["tre"] = tre
    return df


def _best_row(df: pd.DataFrame, col: str) -> Optional[pd.Series]:
    """Row with the best ``col``; ties -> larger regularization (see module docstring)."""
    if df[col].isna().all():
        return None
    key = df.assign(_strength=df["lambda"] + (df["mu"] if "mu" in df else 0.0),
                    _mu=df["mu"] if "mu" in df else 0.0)
    key = key.sort_values([col, "_strength", "_mu", "lambda"], ascending=False, na_position="last",
                          kind="mergesort")
    return key.iloc[0]


def zero_point(df: pd.DataFrame) -> pd.Series:
    """Boolean mask of the rows at lambda = mu = 0 (diffusion: weight 0)."""
    mask = df["lambda"] == 0
    return mask & (df["mu"] == 0) if "mu" in df else mask


def choose_parameters(grid_df: pd.DataFrame, regularizer: str, class_names: Sequence[str],
                      background: str = "best-mean", exclude_zero: bool = False,
                      objective: str = "dice") -> pd.DataFrame:
    """One row per pair with the identified per-class and global-baseline parameters.

    ``background`` 'best-mean' (default) or 'zero'; ``exclude_zero`` drops the lambda = mu = 0 point;
    ``objective`` 'dice' (default) or 'tre' (needs the column ``tre``) for the -g baseline (module
    docstring)."""
    if background not in ("best-mean", "zero"):
        raise ValueError(f"unknown background choice {background!r}; expected 'best-mean' or 'zero'")
    if objective not in ("dice", "tre"):
        raise ValueError(f"unknown objective {objective!r}; expected 'dice' or 'tre'")
    if objective == "tre" and "tre" not in grid_df:
        raise ValueError("the TRE objective needs the grid table's 'tre' column (pairs with keypoints)")
    elastic = regularizer == "elastic"
    sa_names = sa_columns(regularizer, class_names)
    if exclude_zero:
        grid_df = grid_df[~zero_point(grid_df)]
        if grid_df.empty:
            raise ValueError("the grid holds only the zero point, which exclude_zero removes: nothing to choose")
    rows: List[Dict] = []
    for pair_id, df in grid_df.groupby(PAIR_ID, sort=False):
        best_mean = _best_row(df, "mean_dice")
        if best_mean is None:
            raise ValueError(f"pair {pair_id}: every class is empty in fixed and warped labels; "
                             "no parameter can be identified")
        if objective == "tre":
            best_mean = _best_row(df.assign(_neg_tre=-df["tre"]), "_neg_tre")
            if best_mean is None:
                raise ValueError(f"pair {pair_id}: TRE is NaN at every grid point")
        row: Dict = {PAIR_ID: pair_id}
        chosen = {"background": best_mean if background == "best-mean" else
                  pd.Series({"lambda": 0.0, "mu": 0.0, "mean_dice": np.nan})}
        fallback = []
        for name in class_names:
            best = _best_row(df, f"dice_{name}")
            if best is None:
                fallback.append(name)
                best = best_mean
            chosen[name] = best
        for field in (["lambda", "mu"] if elastic else ["lambda"]):
            for name in ["background", *class_names]:
                row[f"{field}_{name}"] = float(chosen[name][field])
        for name in class_names:
            row[f"dice_{name}"] = float(chosen[name][f"dice_{name}"])
        row["mean_dice"] = float(best_mean["mean_dice"])
        for col, field in zip(global_columns(regularizer), ("lambda", "mu")):
            row[col] = float(best_mean[field])
        row[G_MEAN_DICE] = float(best_mean["mean_dice"])
        row["fallback"] = ";".join(fallback)
        rows.append(row)
    out = pd.DataFrame(rows)
    missing = [n for n in sa_names if n not in out]
    assert not missing, missing
    return out


def population_choice(grid_df: pd.DataFrame, regularizer: str, class_names: Sequence[str],
                      pair_ids: Sequence[str], **choice) -> pd.DataFrame:
    """One parameter setting from a grid table over several pairs, applied to ``pair_ids``.

    The label-free protocol of docs/reading_results.md "How to read the comparison": ``grid_df`` holds the grid of the *validation*
    pairs; per grid point the class Dice and mean Dice are averaged over those pairs (NaN
    skipped), then :func:`choose_parameters` picks per class the point with the best mean class
    Dice and, for the background and the -g baseline, the best mean (over pairs) mean Dice,
    with the same tie rule. Returns one identical row per id in ``pair_ids`` (the test pairs);
    its ``dice_*``/``mean_dice`` columns are the validation means that chose the setting.
    ``choice`` goes to :func:`choose_parameters` (background, exclude_zero, objective). With the
    grid of the identified pairs themselves this is the per-set unit of the authors' script.
    """
    keys = ["lambda", "mu"] if "mu" in grid_df else ["lambda"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        agg = grid_df.drop(columns=[PAIR_ID]).groupby(keys, as_index=False, sort=True).mean()
    agg.insert(0, PAIR_ID, "population")
    one = choose_parameters(agg, regularizer, class_names, **choice).iloc[0].to_dict()
    return pd.DataFrame([{**one, PAIR_ID: pid} for pid in pair_ids])
