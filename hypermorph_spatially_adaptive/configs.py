"""Settings as types: :class:`LossConfig` (``config.json["loss"]``, the training loss of paper eq. (1))
and :class:`RefineConfig` (the options of the per-pair refinement, :class:`.refinement.Refiner`).

Each is a frozen dataclass that holds its defaults, checks its values in ``__post_init__`` (a
``ValueError`` naming the field) and converts to and from a JSON-ready dict (``to_dict`` /
``from_dict``). The command-line options of the refinement are built from :class:`RefineConfig`
(:func:`add_refine_args`, :meth:`RefineConfig.from_args`, :meth:`RefineConfig.argv`).

Imports neither TensorFlow nor voxelmorph (argparse parsers are built from it without them).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .params import HypMapping

__all__ = ["LossConfig", "RefineConfig", "check_same_weighting", "split_steps"]


# ---- the training loss ---------------------------------------------------------------------------
REG_FIELDS = ("disp", "svf")


@dataclass(frozen=True)
class LossConfig:
    """The loss a run was trained with (paper eq. (1); :func:`.losses.loss_terms`), as recorded in
    ``config.json["loss"]``.

    - ``ncc_win``: local NCC window, voxels per axis (odd or even, >= 1).
    - ``spacing``: voxel size in mm per array axis (length D), or None (unit spacing). The
      regularizer differentiates in mm (CONVENTIONS.md "Units").
    - ``energy_scale``: ``K >= 0``, the factor on the regularization energy (1 = the paper's eq. 1).
    - ``hyp_mapping``: how ``hyp`` in [0, 1] becomes weights (:class:`.params.HypMapping`).
    - ``reg_field``: the field the energy acts on, ``disp`` (``u``) or ``svf`` (the velocity).
    - ``oversample_endpoints``: probability in [0, 1] that a sampled hyperparameter is replaced by
      an endpoint during training.
    - ``hyp_sampling``: the sampling of ``hyp`` in words (a record; no effect on the loss).

    Runs recorded before a field existed load with the value they were trained with (``from_dict``:
    ``K = 1``, linear mapping, ``disp``, no oversampling, unit spacing).
    """

    ncc_win: int = 9
    spacing: Optional[Tuple[float, ...]] = None
    energy_scale: float = 1.0
    hyp_mapping: HypMapping = field(default_factory=HypMapping)
    reg_field: str = "disp"
    oversample_endpoints: float = 0.0
    hyp_sampling: Optional[str] = None

    def __post_init__(self):
        win = self.ncc_win
        if isinstance(win, bool) or int(win) != win or win < 1:
            raise ValueError(f"ncc_win must be an integer >= 1, got {win!r}")
        object.__setattr__(self, "ncc_win", int(win))
        if self.spacing is not None:
            sp = tuple(float(s) for s in self.spacing)
            if not sp or not all(math.isfinite(s) and s > 0 for s in sp):
                raise ValueError(f"spacing must be positive finite mm values, got {list(self.spacing)}")
            object.__setattr__(self, "spacing", sp)
        k = float(self.energy_scale)
        if not (math.isfinite(k) and k >= 0):
            raise ValueError(f"energy_scale must be a finite number >= 0, got {self.energy_scale!r}")
        object.__setattr__(self, "energy_scale", k)
        if not isinstance(self.hyp_mapping, HypMapping):
            raise ValueError(f"hyp_mapping must be a HypMapping, got {self.hyp_mapping!r}")
        if self.reg_field not in REG_FIELDS:
            raise ValueError(f"reg_field must be one of {REG_FIELDS}, got {self.reg_field!r}")
        p = float(self.oversample_endpoints)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"oversample_endpoints must lie in [0, 1], got {self.oversample_endpoints!r}")
        object.__setattr__(self, "oversample_endpoints", p)

    def to_dict(self) -> Dict:
        """``config.json["loss"]``: the keys in the order training writes them; ``hyp_sampling``
        and ``spacing`` only when set."""
        out: Dict = {"ncc_win": self.ncc_win, "reg_field": self.reg_field}
        if self.hyp_sampling is not None:
            out["hyp_sampling"] = self.hyp_sampling
        out.update({"oversample_endpoints": self.oversample_endpoints, "energy_scale": self.energy_scale,
                    "hyp_mapping": self.hyp_mapping.to_dict()})
        if self.spacing is not None:
            out["spacing"] = list(self.spacing)
        return out

    @classmethod
    def from_dict(cls, loss: Optional[Mapping]) -> "LossConfig":
        """The loss of ``config.json["loss"]`` (None or {}: the defaults). Missing keys take the
        values runs made before them were trained with; an unknown key is refused (this code would
        compute another loss than the run's)."""
        loss = dict(loss or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(loss) - names)
        if unknown:
            raise ValueError(f"config.json 'loss' holds settings this code does not know: {unknown}")
        if "hyp_mapping" in loss:
            loss["hyp_mapping"] = HypMapping.from_loss_config({"hyp_mapping": loss["hyp_mapping"]})
        return cls(**loss)

    @classmethod
    def from_run_config(cls, config: Mapping) -> "LossConfig":
        """The loss of a saved run's ``config.json`` (its ``loss`` entry)."""
        return cls.from_dict(config.get("loss"))

    def with_spacing(self, spacing: Optional[Sequence[float]]) -> "LossConfig":
        """The same loss on voxels of ``spacing`` mm (e.g. a resampled grid or a coarser level)."""
        return replace(self, spacing=None if spacing is None else tuple(spacing))


def check_same_weighting(configs: Mapping[str, Mapping]) -> float:
    """The common energy scale ``K`` of runs ``{run folder: config.json}`` (``K = 1`` and the
    linear mapping where unrecorded); ValueError naming the runs if their ``K`` or hyperparameter
    mapping differ: a hyperparameter then means another regularization strength in each model,
    so identified values do not transfer between them."""
    def weighting(cfg: Mapping):
        loss = LossConfig.from_run_config(cfg)
        return loss.energy_scale, loss.hyp_mapping

    found = {run: weighting(cfg) for run, cfg in configs.items()}
    if len(set(found.values())) > 1:
        what = ", ".join(f"{run}: K = {k:g}, {m.kind} mapping" for run, (k, m) in found.items())
        raise ValueError(f"the runs were trained with different --energy-scale / --hyp-mapping ({what}); identified "
                         f"parameters do not transfer between them: train them with the same options")
    return next(iter(found.values()))[0]


# ---- the refinement ------------------------------------------------------------------------------
def split_steps(steps: int, weights: Sequence[float]) -> List[int]:
    """``steps`` split over levels in proportion to ``weights`` (floors; the remainder goes to the
    last, finest level), so the parts sum to ``steps`` exactly."""
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"level split weights must be >= 0 with a positive sum, got {list(weights)}")
    parts = [int(np.floor(int(steps) * x / w.sum())) for x in w]
    parts[-1] += int(steps) - sum(parts)
    return parts


@dataclass(frozen=True)
class RefineConfig:
    """The options of the per-pair refinement (:class:`.refinement.Refiner`, its module docstring
    says what each does). The defaults are the refinement that does not tear (measured with
    ``benchmarks/bench_refine.py``, docs/extensions.md "Refinement that does not tear"; the
    pyramid ``levels = (4, 2, 1)`` beat the single level on the stress pairs at the same 100 steps,
    docs/peer_and_refinement.md); :meth:`original` is the paper-style voxelwise refinement, which
    folds and tears anatomy.

    - ``fold_weight`` (>= 0): weight of ``mean_x relu(fold_eps - det(I + grad u))^2``.
    - ``fold_eps`` (> 0): the determinant below which the fold penalty acts (dimensionless).
    - ``logj_weight`` (>= 0): weight of ``mean_x log(max(det, fold_eps))^2``.
    - ``smooth`` (integer >= 0): 3-voxel box-filter passes on the update.
    - ``grid`` (integer >= 1): the update lives on a grid this many times coarser per axis.
    - ``svf``: refine a stationary velocity field and compose its exponential with ``u0``;
      ``int_steps`` (integer >= 0) squarings.
    - ``scale`` (integer >= 1, or 0 = auto): the single-level refinement on images this many
      times coarser per axis; only without ``levels`` (0 or 1 with them).
    - ``levels``: coarse-to-fine shrink factors (integers >= 1, strictly decreasing), or None
      (the single level ``scale``); ``level_split``: relative steps per level (>= 0, positive sum;
      None: equal shares), only with ``levels``.

    The command-line options ``--refine-*`` (:func:`.cli.add_refine_args`) take their defaults
    from here; :meth:`from_args` and :meth:`argv` convert parsed options and back.
    """

    fold_weight: float = 100.0
    fold_eps: float = 0.1
    logj_weight: float = 1.0
    smooth: int = 3
    grid: int = 2
    svf: bool = False
    int_steps: int = 7
    scale: int = 0
    levels: Optional[Tuple[int, ...]] = (4, 2, 1)
    level_split: Optional[Tuple[float, ...]] = None

    def __post_init__(self):
        for name in ("fold_weight", "logj_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.fold_eps > 0:
            raise ValueError(f"fold_eps must be > 0, got {self.fold_eps}")
        for name, low in (("smooth", 0), ("grid", 1), ("int_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value}")
        if self.scale < 0 or int(self.scale) != self.scale:
            raise ValueError(f"scale must be an integer >= 1, or 0 (auto), got {self.scale}")
        levels = self.levels
        if levels is not None:
            levels = list(levels)
            if not levels or any(int(f) != f or f < 1 for f in levels):
                raise ValueError(f"levels must be integers >= 1 (shrink factors, coarse to fine), got {levels}")
            if any(a <= b for a, b in zip(levels, levels[1:])):
                raise ValueError(f"levels must decrease (coarse to fine, e.g. 4 2 1), got {levels}")
            if int(self.scale) > 1:
                raise ValueError(f"give either scale ({self.scale}) or levels ({' '.join(map(str, levels))}), not "
                                 f"both: scale > 1 is the single-level refinement (--refine-scale {self.scale} "
                                 f"with --refine-levels off)")
            levels = tuple(int(f) for f in levels)
        if self.level_split is not None:
            if levels is None:
                raise ValueError("level_split needs levels (--refine-level-split needs --refine-levels)")
            if len(self.level_split) != len(levels):
                raise ValueError(f"level_split has {len(self.level_split)} weights for {len(levels)} levels")
            split_steps(1, self.level_split)  # validates the weights
        for name, value in (("fold_weight", float(self.fold_weight)), ("fold_eps", float(self.fold_eps)),
                            ("logj_weight", float(self.logj_weight)), ("smooth", int(self.smooth)),
                            ("grid", int(self.grid)), ("svf", bool(self.svf)), ("int_steps", int(self.int_steps)),
                            ("scale", int(self.scale)), ("levels", levels),
                            ("level_split", None if self.level_split is None
                             else tuple(float(w) for w in self.level_split))):
            object.__setattr__(self, name, value)

    @classmethod
    def original(cls) -> "RefineConfig":
        """The original refinement: Adam on ``u`` voxel by voxel at full resolution, no Jacobian
        penalty, no smoothing (the paper-style instance optimization; it folds and tears anatomy)."""
        return cls(fold_weight=0.0, logj_weight=0.0, smooth=0, grid=1, svf=False, scale=1, levels=None,
                   level_split=None)

    def to_dict(self) -> Dict:
        """Every option, JSON-ready (``levels``/``level_split`` as lists or None)."""
        d = asdict(self)
        for key in ("levels", "level_split"):
            d[key] = None if d[key] is None else list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "RefineConfig":
        """The options of ``d`` (missing ones: the defaults); an unknown key is refused."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown refinement options {unknown}")
        return cls(**dict(d))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RefineConfig":
        """The options of parsed ``--refine-*`` arguments (:func:`.cli.add_refine_args`); an
        option missing from ``args`` keeps its default. ``--refine-levels off`` is ``levels = None``."""
        default = cls()
        levels = getattr(args, "refine_levels", default.levels)
        if levels is not None and "off" in list(levels):
            if list(levels) != ["off"]:
                raise ValueError(f"--refine-levels: 'off' stands alone, got {' '.join(map(str, levels))}")
            levels = None
        kw = {name: getattr(args, f"refine_{name}", getattr(default, name)) for name in _CLI_FIELDS}
        return cls(**{**kw, "levels": levels})

    def argv(self) -> List[str]:
        """Command-line tokens that give these options to another script (the fields with a flag)."""
        return ["--refine-fold-weight", repr(self.fold_weight), "--refine-logj-weight", repr(self.logj_weight),
                "--refine-smooth", str(self.smooth), "--refine-grid", str(self.grid), "--refine-scale", str(self.scale),
                "--refine-svf" if self.svf else "--no-refine-svf",
                "--refine-levels", *(["off"] if self.levels is None else [str(f) for f in self.levels]),
                *(["--refine-level-split", *[repr(w) for w in self.level_split]] if self.level_split else [])]


#: the :class:`RefineConfig` fields with a ``--refine-<name>`` option (``fold_eps``, ``int_steps``: none)
_CLI_FIELDS = ("fold_weight", "logj_weight", "smooth", "grid", "svf", "scale", "level_split")
