"""The ``synthetic`` dataset: phantoms from the generator, cached as one compressed ``.npz`` per
pair, and the ``--motion`` presets.

Pairs come from :func:`datasets.phantoms.generate_pair` with ``seed = data_seed * 100003 +
index``; ``num_pairs`` pairs (default 40) split 70/15/15. Each pair is cached as one compressed
``.npz`` in ``cache_dir`` (default ``<data_dir>`` if given, else ``./.cache/synthetic``), named
``synthetic_<version>_<shape>_m<motion>_seed<seed>.npz`` where ``<version>`` combines the
generator's ``GENERATOR_VERSION`` with a hash of its source files (:mod:`datasets.cache`), so a
changed generator never reuses old phantoms. Writes are atomic; unreadable cache files are
regenerated with a warning. Spacing 1 mm, identity affine, keypoints from the generator,
``extras = {"disp_true": float32 [*shape, D], "lame": {class: (lambda, mu)}, "seed": int,
"meta": {...}}`` (``meta``: the generator's checks, e.g. inverse residual, min Jacobian, lung
strain p95, air Lamé parameters; ``{}`` for generators without it). ``--motion``: peak
displacement / mean image size (or a preset, see :class:`SyntheticDataset`).

``--pairing`` (default ``deformation``, today's pairs): ``deformation`` pairs a phantom with an
exact elastic deformation of itself, so a smooth exact solution always exists and the true field
is known. ``inter-subject`` pairs two *different* phantoms (different anatomy: every jittered
shape parameter of :func:`datasets.phantoms.make_phantom` -- body, lung, liver sizes and
positions, rib period and phase, vertebra period and phase -- and a different texture; same
tissue classes and intensity model): pair ``i`` (seed ``s = data_seed * 100003 + i``) keeps the
*moving* image and labels of deformation pair ``i`` (subject ``s`` after its ``--motion``
deformation, same cache file) and takes as *fixed* the undeformed phantom drawn by
``make_phantom(shape, numpy.random.default_rng([s, INTER_SUBJECT_STREAM]))``, another subject
(not cached: drawing it takes milliseconds). Such pairs have labels but no correspondence: no
``extras["disp_true"]`` (no dense EPE) and no keypoints (no TRE); ``extras["meta"]`` is the
moving subject's, plus ``"pairing": "inter-subject"``. Ribs and vertebrae of two subjects differ
in number and phase, so matching labels or texture exactly needs tearing: this is what exposes a
refinement that folds. Measured initial mean Dice on the demo's 9 test pairs (64^2, default
motion): 0.71 against 0.78 for the deformation pairs of the same seeds.

``--stiffness-spread S`` (default off): subject-specific stiffness. Without it every pair uses
the generator's one table (``phantoms.DEFAULT_LAME``), so there is nothing subject-specific for an
identification to find. With it pair ``i`` scales each tissue's (lambda, mu) by its own factor
``exp(S z)`` (:func:`subject_lame`, seeded by the pair, independent of the phantom and force
streams: the anatomy and force pattern are those of the spread-0 pair, the field differs); the
values used are ``extras["lame"]`` of the pair, so identified values can be scored against them
per pair (``benchmarks/stiffness_recovery.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import warnings

import numpy as np

from .base import RegistrationDataset, RegistrationPair
from .cache import decode_value, encode_value, generator_version, json_roundtrip
from .options import IMAGE_SIZE, NDIM, Option, arg_type, nonnegative_int, positive_int
from .atomic import atomic_write

SYNTHETIC_SEED_STRIDE = 100003


def _synthetic_module():
    """The phantom generator module (a function so tests can substitute it)."""
    from . import phantoms

    return phantoms


SYNTHETIC_MOTION_PRESETS = {"default": 0.05, "stress": 0.1}
#: ``--pairing`` modes (see the module docstring); the first is the default.
PAIRINGS = ("deformation", "inter-subject")
#: second entry of the seed sequence of an inter-subject pair's fixed subject
INTER_SUBJECT_STREAM = 1
#: second entry of the seed sequence of a pair's subject-specific stiffness factors
STIFFNESS_STREAM = 2
#: largest ``--stiffness-spread`` (log-normal sigma): at 2 a 2-sigma factor is ~55x
MAX_STIFFNESS_SPREAD = 2.0


def parse_stiffness_spread(value) -> float:
    """``--stiffness-spread`` value: a number in [0, MAX_STIFFNESS_SPREAD]."""
    try:
        spread = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"synthetic dataset: stiffness spread must be a number, got {value!r}") from None
    if not 0.0 <= spread <= MAX_STIFFNESS_SPREAD:
        raise ValueError(f"synthetic dataset: stiffness spread must be in [0, {MAX_STIFFNESS_SPREAD:g}], got {value}")
    return spread


def subject_lame(seed: int, spread: float, default_lame: dict) -> dict:
    """One subject's Lamé values ``{class: (lambda, mu)}``: every class of ``default_lame`` (the
    generator's tissue means, class 0 = soft tissue inside the body) times its own factor
    ``exp(spread * z_c)``, ``z_c ~ N(0, 1)`` drawn in class order from
    ``numpy.random.default_rng([seed, STIFFNESS_STREAM])``. One factor per class scales lambda
    and mu together, so each tissue keeps its Poisson ratio (its compressibility) and only its
    stiffness varies between subjects; the air outside the body is not in the table and stays
    fixed. ``spread`` 0 gives ``default_lame`` itself."""
    rng = np.random.default_rng([int(seed), STIFFNESS_STREAM])
    classes = sorted(int(c) for c in default_lame)
    factors = np.exp(float(spread) * rng.standard_normal(len(classes)))
    return {c: (float(default_lame[c][0] * f), float(default_lame[c][1] * f)) for c, f in zip(classes, factors)}


def synthetic_motion(value) -> float:
    """``--motion`` value: a number in (0, 0.5) or a preset name ("default", "stress")."""
    key = str(value).strip().lower()
    if key in SYNTHETIC_MOTION_PRESETS:
        return SYNTHETIC_MOTION_PRESETS[key]
    try:
        motion = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"synthetic dataset: motion must be a number in (0, 0.5) or one of "
                         f"{sorted(SYNTHETIC_MOTION_PRESETS)}, got {value!r}") from None
    if not 0 < motion < 0.5:
        raise ValueError(f"synthetic dataset: motion must be in (0, 0.5), got {value}")
    return motion


def _motion_arg(text: str) -> float:
    try:
        return synthetic_motion(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class SyntheticDataset(RegistrationDataset):
    """Phantoms from :mod:`datasets.phantoms` (see the module docstring).

    ``motion``: peak displacement as a fraction of the mean image size (+-25 % per pair), with
    the 95th percentile of the lung principal strain capped at 5 x motion (the real generator's
    ``motion_to_max_disp``), or a preset name: "default" (0.05: lung strain p95 <= 0.25,
    breathing-like) or "stress" (0.1: the larger motion of generator version 1). The
    generator's checks (inverse residual, Jacobian, lung strain) are in ``extras["meta"]``.
    ``pairing``: "deformation" (``None``, the default) or "inter-subject" (two different
    phantoms, no true field, no keypoints; module docstring).
    """

    name = "synthetic"
    split_ratios = (70, 15, 15)
    # (this order is the order run_pipeline.py passes them on, kept for its "same command" check)
    OPTIONS = (
        NDIM,
        Option("num_pairs", type=arg_type(positive_int), default=40,
               help="synthetic: total number of pairs, split 70/15/15"),
        Option("data_seed", type=arg_type(nonnegative_int), default=0,
               help="synthetic: base seed; pair i uses seed data_seed*100003+i"),
        Option("motion", type=_motion_arg, default=SYNTHETIC_MOTION_PRESETS["default"],
               help="synthetic: peak displacement as a fraction of the mean image size (varied by +-25%% "
                    "between pairs), with the 95th percentile of the lung principal strain capped at "
                    "5 x motion; or a preset: 'default' = 0.05 (lung strain p95 <= 0.25, breathing-like; "
                    "initial mean Dice ~0.78 at 64^2), 'stress' = 0.1 (lung strain p95 up to 0.5, min "
                    "Jacobian >= 0.3, initial mean Dice ~0.63)"),
        Option("pairing", choices=PAIRINGS, default=None,
               help="synthetic: 'deformation' (when not given): moving = an elastic deformation of the fixed "
                    "phantom, true field and keypoints known; 'inter-subject': fixed and moving are different "
                    "phantoms (different anatomy, same tissues and intensity model), labels only (no dense EPE, "
                    "no TRE); the moving images are the deformation pairs' (datasets/synthetic.py docstring)"),
        Option("stiffness_spread", type=arg_type(parse_stiffness_spread), default=None,
               help="synthetic: subject-specific stiffness. Each pair's tissues get their own Lame values: the "
                    "generator's tissue means times exp(S z), z ~ N(0, 1) per pair and tissue (lambda and mu "
                    "scaled together, Poisson ratio kept; seeded by the pair). Saved per pair in "
                    "extras['lame'] and the cache name. 0 or not given: one stiffness table for every pair "
                    "(mu lung : soft tissue : liver : bone = 1 : 2 : 4 : 40). 0.5 lets lung, soft tissue and "
                    "liver change order between pairs; bone stays the stiffest"),
        Option("cache_dir", path=True,
               help="synthetic: cache folder (if not given: --data-dir, else ./.cache/synthetic)"),
        IMAGE_SIZE,
    )
    _KEYS = ("fixed", "moving", "fixed_seg", "moving_seg", "disp", "fixed_kp", "moving_kp")

    def __init__(self, data_dir=None, ndim=None, image_size=None, num_pairs=40, data_seed=0,
                 cache_dir=None, motion=SYNTHETIC_MOTION_PRESETS["default"], pairing=None, stiffness_spread=None):
        super().__init__()
        self.motion = synthetic_motion(motion)
        self.stiffness_spread = 0.0 if stiffness_spread is None else parse_stiffness_spread(stiffness_spread)
        self.pairing = PAIRINGS[0] if pairing is None else str(pairing)
        if self.pairing not in PAIRINGS:
            raise ValueError(f"synthetic dataset: pairing must be one of {PAIRINGS}, got {pairing!r}")
        if image_size is not None:
            image_size = [int(s) for s in np.atleast_1d(image_size)]
            if ndim is None:
                ndim = len(image_size) if len(image_size) > 1 else 2
            if len(image_size) == 1:
                image_size = image_size * int(ndim)
        ndim = 2 if ndim is None else int(ndim)
        if ndim not in (2, 3):
            raise ValueError(f"synthetic dataset: ndim must be 2 or 3, got {ndim}")
        if image_size is None:
            image_size = [64] * ndim
        if len(image_size) != ndim or min(image_size) < 1:
            raise ValueError(f"synthetic dataset: image_size {image_size} does not match "
                             f"ndim={ndim}")
        if int(num_pairs) < 1:
            raise ValueError(f"synthetic dataset: num_pairs must be >= 1, got {num_pairs}")
        self.ndim = ndim
        self._image_shape = tuple(image_size)
        self.num_pairs = int(num_pairs)
        self.data_seed = int(data_seed)
        if cache_dir is None:
            cache_dir = data_dir if data_dir is not None else os.path.join(".", ".cache",
                                                                            "synthetic")
        self.cache_dir = os.path.abspath(cache_dir)
        self._module = None

    @classmethod
    def config_options(cls, data_dir, values: dict) -> dict:
        """The resolved values: ndim, image size, motion, the absolute cache folder, and the
        pairing and stiffness spread unless they are the defaults (so the demo's config and argv
        stay as they were)."""
        probe = cls(data_dir=data_dir, **{k: v for k, v in values.items() if v is not None})
        return {"ndim": probe.ndim, "image_size": list(probe.image_shape), "num_pairs": probe.num_pairs,
                "data_seed": probe.data_seed, "motion": probe.motion, "cache_dir": probe.cache_dir,
                "pairing": None if probe.pairing == PAIRINGS[0] else probe.pairing,
                "stiffness_spread": probe.stiffness_spread or None}

    @property
    def module(self):
        if self._module is None:
            self._module = _synthetic_module()
        return self._module

    def _infer_class_names(self):
        return tuple(self.module.CLASS_NAMES)

    def _all_ids(self):
        return [f"synthetic_{i:04d}" for i in range(self.num_pairs)]

    def seed_of(self, pair_id: str) -> int:
        self._check_id(pair_id)
        return self.data_seed * SYNTHETIC_SEED_STRIDE + int(pair_id.rsplit("_", 1)[1])

    def cache_path(self, pair_id: str) -> str:
        shape = "x".join(str(s) for s in self.image_shape)
        spread = f"s{self.stiffness_spread:g}_" if self.stiffness_spread else ""
        name = (f"synthetic_{generator_version(self.module)}_{shape}_m{self.motion:g}_{spread}"
                f"seed{self.seed_of(pair_id)}.npz")
        return os.path.join(self.cache_dir, name)

    def _read_cache(self, path: str):
        try:
            with np.load(path, allow_pickle=False) as npz:
                rec = {k: np.array(npz[k]) for k in npz.files}
            missing = [k for k in self._KEYS + ("lame_json",) if k not in rec]
            if missing:
                raise ValueError(f"missing arrays {missing}")
            if tuple(rec["fixed"].shape) != self.image_shape:
                raise ValueError(f"shape {rec['fixed'].shape} != {self.image_shape}")
            rec["lame"] = decode_value(json.loads(str(rec.pop("lame_json"))))
            rec["meta"] = (decode_value(json.loads(str(rec.pop("meta_json"))))
                           if "meta_json" in rec else {})
            return rec
        except Exception as exc:  # any unreadable / truncated / inconsistent file
            warnings.warn(f"synthetic cache file {path} is unreadable ({type(exc).__name__}: "
                          f"{exc}); regenerating it", stacklevel=3)
            return None

    def _write_cache(self, path: str, rec: dict) -> None:
        os.makedirs(self.cache_dir, exist_ok=True)
        payload = {k: np.asarray(rec[k]) for k in self._KEYS}
        payload["lame_json"] = np.array(json.dumps(encode_value(rec["lame"])))
        payload["meta_json"] = np.array(json.dumps(encode_value(rec.get("meta", {}))))

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **payload)
                fh.flush()
                os.fsync(fh.fileno())

        atomic_write(path, write)

    def _generate(self, seed: int) -> dict:
        # peak displacement: `motion` x mean image size, varied by +-25 % between pairs; the
        # real generator also caps the lung strain (motion_to_max_disp)
        kwargs = {}
        if hasattr(self.module, "motion_to_max_disp"):
            max_disp, kwargs["max_lung_strain"] = self.module.motion_to_max_disp(
                seed, tuple(self.image_shape), self.motion)
        else:
            jitter = np.random.default_rng([seed, 7]).uniform(0.75, 1.25)
            max_disp = self.motion * float(np.mean(self.image_shape)) * jitter
        if self.stiffness_spread:
            kwargs["lame"] = subject_lame(seed, self.stiffness_spread, self.module.DEFAULT_LAME)
        out = self.module.generate_pair(seed, tuple(self.image_shape), max_disp=max_disp,
                                        **kwargs)
        missing = [k for k in self._KEYS + ("lame",) if k not in out]
        if missing:
            raise ValueError(f"synthetic.generate_pair(seed={seed}) returned no {missing}")
        rec = {k: np.asarray(out[k]) for k in self._KEYS}
        rec["lame"] = out["lame"]
        rec["meta"] = dict(out.get("meta", {}))
        return rec

    def _load_pair(self, pair_id: str) -> RegistrationPair:
        seed = self.seed_of(pair_id)
        path = self.cache_path(pair_id)
        rec = self._read_cache(path) if os.path.exists(path) else None
        if rec is None:
            rec = self._generate(seed)
            self._write_cache(path, rec)
            rec["lame"] = json_roundtrip(rec["lame"])  # same types as when read from the cache
            rec["meta"] = json_roundtrip(rec["meta"])
        D = self.ndim

        def image(a):
            return np.clip(np.asarray(a, np.float32), 0.0, 1.0)[..., None]

        def kp(a):
            return np.asarray(a, np.float32).reshape(-1, D)

        if self.pairing == "inter-subject":
            return self._inter_subject_pair(pair_id, seed, image(rec["moving"]),
                                            np.asarray(rec["moving_seg"]).astype(np.int32), rec)
        return RegistrationPair(
            pair_id=pair_id,
            moving=image(rec["moving"]),
            fixed=image(rec["fixed"]),
            moving_seg=np.asarray(rec["moving_seg"]).astype(np.int32),
            fixed_seg=np.asarray(rec["fixed_seg"]).astype(np.int32),
            spacing=(1.0,) * D,
            fixed_kp=kp(rec["fixed_kp"]),
            moving_kp=kp(rec["moving_kp"]),
            affine=np.eye(4),
            extras={"disp_true": np.asarray(rec["disp"], np.float32), "lame": rec["lame"],
                    "seed": seed, "meta": rec.get("meta", {})},
        )

    def _inter_subject_pair(self, pair_id: str, seed: int, moving: np.ndarray, moving_seg: np.ndarray,
                            rec: dict) -> RegistrationPair:
        """The deformation pair's moving image and labels against another subject's phantom
        (module docstring): no true field, no keypoints."""
        rng = np.random.default_rng([int(seed), INTER_SUBJECT_STREAM])
        fixed_seg, fixed = self.module.make_phantom(tuple(self.image_shape), rng)
        meta = dict(rec.get("meta", {}))
        meta["pairing"] = "inter-subject"
        return RegistrationPair(
            pair_id=pair_id,
            moving=moving,
            fixed=np.clip(np.asarray(fixed, np.float32), 0.0, 1.0)[..., None],
            moving_seg=moving_seg,
            fixed_seg=np.asarray(fixed_seg).astype(np.int32),
            spacing=(1.0,) * self.ndim,
            affine=np.eye(4),
            extras={"lame": rec["lame"], "seed": seed, "meta": meta},
        )
