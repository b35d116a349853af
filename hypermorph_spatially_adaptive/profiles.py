"""Fidelity profiles: the paper's text (``paper``, the default) or the authors' released code (``authors``).

Every difference between this project and the authors' code (annareithmeir/
miccai2024-spatially-adaptive-elastic-hypermorph) that changes a number is one field of
:class:`Fidelity`; ``--profile`` picks the defaults of all of them and each field is also its
own command-line option. docs/fidelity.md lists the sources (paper text / authors' code path)
and the reason for each difference.

Training fields (recorded in ``config.json["fidelity"]``, fixed for the life of a run):

- ``int_resolution``: relative voxel size of the scaling-and-squaring integration (paper: no
  value; this project 2; authors' scripts ``int_downsize = 1``).
- ``reg_field``: the field the energy acts on, ``disp`` (the integrated displacement ``u`` of
  paper eq. 1) or ``svf`` (the stationary velocity field: voxelmorph's default
  ``reg_field='preintegrated'``, what the authors' ``grad_loss`` receives).
- ``oversample_endpoints``: probability that a sampled hyperparameter is replaced by an endpoint
  (authors' ``utils.random_hyperparam``: 0.2; the paper text: plain U(0, 1)).
- ``elastic_sampling``: ``independent`` (lambda, mu ~ U(0, 1) each), ``constrained-global``
  (global elastic preset only: ``mu ~ U[0, 1 - lambda]``, authors' ``hyp_generator_elastic(...,
  constrained=True)``; their SA script samples unconstrained) or ``constrained`` (every elastic
  preset, per class).
- ``similarity_weight``: ``paper`` (``2 - Lambda - Gamma`` elastic, ``1 - W`` diffusion, eq. 1)
  or ``authors`` (``max(1 - Lambda - Gamma, 0)`` elastic, ``1 - W`` diffusion). The authors'
  code uses ``1 - lambda - mu`` unclipped; with the constrained global sampling it is >= 0, but
  their SA script samples unconstrained, so it reaches -1 there: it is clipped at 0 here.
- ``diffusion_energy``: ``sum`` (``w * sum_ij (d_i u_j)^2`` averaged over voxels) or
  ``voxelmorph`` (voxelmorph's ``Grad('l2')``: per axis the mean of the squared differences over
  the valid differences and the D components, summed over axes and divided by D; the authors'
  weighted variant multiplies each difference by the weight at its first voxel).
- ``crop_in_loss``: the warped image is zeroed where the fixed image is 0 before the similarity
  (authors' ``crop_in_loss``, on for NLST and LungCT, whose fixed images are 0 outside the body
  mask / the padded field of view). Not part of a profile: its default is the dataset's
  (``crop_in_loss_default``: True for nlst and l2r-lung, False elsewhere) under both profiles.
- ``ncc``: ``clipped`` (this project: windows clipped at the border, only inside voxels, signed
  cross term squared) or ``voxelmorph`` (cross term clamped at eps, variances clamped at eps,
  zero-padded border windows divided by the full window size).

Identification fields (defaults of ``parameter_identification.py``; also recorded):

- ``background``: ``best-mean`` (the grid point with the best mean Dice) or ``zero`` (lambda = mu
  = 0 / weight 0, authors' ``background_val=[0, 0]``).
- ``zero_point``: ``include`` or ``exclude`` the grid point lambda = mu = 0 (weight 0) from every
  choice (authors' ``greater_zero=True``).
- ``objective``: ``dice`` (class Dice; -g and background by mean Dice), ``tre`` (-g and, with
  ``best-mean`` background, the background by the mean keypoint TRE; tissues still by class
  Dice: TRE is not per tissue) or ``auto`` (``tre`` where the pairs have keypoints, else ``dice``).
- ``unit``: ``pair`` (one choice per pair, paper sec. 2.2) or ``set`` (one choice from the grid
  Dice averaged over the identified pairs themselves, what the authors' released script reads
  from its per-grid-point mean files).

Imports neither TensorFlow nor voxelmorph.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Dict, Mapping, Optional

PROFILES = ("paper", "authors")
CHOICES = {
    "reg_field": ("disp", "svf"),
    "elastic_sampling": ("independent", "constrained-global", "constrained"),
    "similarity_weight": ("paper", "authors"),
    "diffusion_energy": ("sum", "voxelmorph"),
    "ncc": ("clipped", "voxelmorph"),
    "background": ("best-mean", "zero"),
    "zero_point": ("include", "exclude"),
    "objective": ("dice", "tre", "auto"),
    "unit": ("pair", "set"),
}
#: fields that decide a trained network (the rest only steer identification)
TRAINING_FIELDS = ("int_resolution", "reg_field", "oversample_endpoints", "elastic_sampling", "similarity_weight",
                   "diffusion_energy", "ncc", "crop_in_loss")
IDENTIFICATION_FIELDS = ("background", "zero_point", "objective", "unit")
#: training fields that decide what a hyperparameter value means in the loss: runs whose values are
#: exchanged (a global run's identified values fed to an SA run) must share them and the profile
MEANING_FIELDS = ("reg_field", "similarity_weight", "diffusion_energy", "ncc")


@dataclass(frozen=True)
class Fidelity:
    """One profile's settings (see the module docstring); ``Fidelity()`` is the ``paper`` profile."""

    profile: str = "paper"
    int_resolution: int = 2
    reg_field: str = "disp"
    oversample_endpoints: float = 0.0
    elastic_sampling: str = "independent"
    similarity_weight: str = "paper"
    diffusion_energy: str = "sum"
    ncc: str = "clipped"
    crop_in_loss: bool = False
    background: str = "best-mean"
    zero_point: str = "include"
    objective: str = "dice"
    unit: str = "pair"

    def __post_init__(self):
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; expected one of {PROFILES}")
        if not isinstance(self.crop_in_loss, bool):
            raise ValueError(f"crop_in_loss must be True or False, got {self.crop_in_loss!r}")
        if not (isinstance(self.int_resolution, int) and self.int_resolution >= 1):
            raise ValueError(f"int_resolution must be an integer >= 1, got {self.int_resolution!r}")
        p = self.oversample_endpoints
        if not (isinstance(p, (int, float)) and math.isfinite(p) and 0.0 <= p <= 1.0):
            raise ValueError(f"oversample_endpoints must be a probability in [0, 1], got {p!r}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {allowed}")

    @classmethod
    def of(cls, profile: str, **overrides) -> "Fidelity":
        """The named profile with ``overrides`` (``None`` values ignored: "not given on the command line")."""
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; expected one of {PROFILES}")
        base = AUTHORS if profile == "authors" else PAPER
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown fidelity setting(s) {sorted(unknown)}")
        return replace(base, **given)

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Fidelity":
        """Inverse of :meth:`to_dict`; missing entries take the ``paper`` values, unknown keys are refused."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown fidelity entries {sorted(unknown)}")
        d = dict(d)
        if "int_resolution" in d:
            d["int_resolution"] = int(d["int_resolution"])
        if "oversample_endpoints" in d:
            d["oversample_endpoints"] = float(d["oversample_endpoints"])
        return cls(**d)

    @classmethod
    def from_run_config(cls, config: Mapping) -> "Fidelity":
        """The fidelity of a saved run (``config.json``). Runs made before ``fidelity`` was
        recorded are ``paper`` runs with their own ``model.int_resolution``,
        ``loss.reg_field`` and ``loss.oversample_endpoints``."""
        if isinstance(config.get("fidelity"), Mapping):
            return cls.from_dict(config["fidelity"])
        model, loss = config.get("model", {}) or {}, config.get("loss", {}) or {}
        return cls(int_resolution=int(model.get("int_resolution", 2)), reg_field=str(loss.get("reg_field", "disp")),
                   oversample_endpoints=float(loss.get("oversample_endpoints", 0.0)))

    def training(self) -> Dict:
        """The training fields (and the profile name): what two runs must share to be combined."""
        return {"profile": self.profile, **{k: getattr(self, k) for k in TRAINING_FIELDS}}

    def identification(self) -> Dict:
        return {"profile": self.profile, **{k: getattr(self, k) for k in IDENTIFICATION_FIELDS}}

    def constrained(self, spatially_adaptive: bool) -> bool:
        """Whether an elastic preset samples ``mu ~ U[0, 1 - lambda]`` (per class for SA)."""
        return self.elastic_sampling == "constrained" or (
            self.elastic_sampling == "constrained-global" and not spatially_adaptive)


PAPER = Fidelity()
AUTHORS = Fidelity(profile="authors", int_resolution=1, reg_field="svf", oversample_endpoints=0.2,
                   elastic_sampling="constrained-global", similarity_weight="authors", diffusion_energy="voxelmorph",
                   ncc="voxelmorph", background="zero", zero_point="exclude", objective="auto", unit="pair")


def check_same_profile(configs: Mapping[str, Mapping], stage_profile: Optional[str] = None) -> Fidelity:
    """The training fidelity of the first of the runs ``{run folder: config.json}``; ``ValueError``
    naming the runs when their profile or a field that decides what a hyperparameter means
    (:data:`MEANING_FIELDS`) differs, or when ``stage_profile`` (the ``--profile`` given to a later
    stage) is not the runs' profile."""
    found = {run: Fidelity.from_run_config(cfg) for run, cfg in configs.items()}
    trainings = {run: {k: f.training()[k] for k in ("profile", *MEANING_FIELDS)} for run, f in found.items()}
    first_run, first = next(iter(trainings.items()))
    for run, t in trainings.items():
        diff = {k: (first[k], t[k]) for k in t if t[k] != first[k]}
        if diff:
            what = "; ".join(f"{k}: {a!r} in {first_run}, {b!r} in {run}" for k, (a, b) in diff.items())
            raise ValueError(f"the runs were trained with different fidelity settings ({what}); a hyperparameter then "
                             f"means another loss in each model: train them with the same --profile and options")
    if stage_profile is not None and stage_profile != first["profile"]:
        raise ValueError(f"--profile {stage_profile}: {first_run} was trained with --profile {first['profile']} "
                         f"(config.json 'fidelity'); give --profile {first['profile']} or leave it out (a later stage "
                         f"takes the runs' profile)")
    return found[first_run]
