"""Hyperparameter layout of the four presets and the regularization parameters it gives.

Imports neither voxelmorph nor neurite (TensorFlow only inside the two functions that build
tensors), so identification, losses and the stage readers can use it cheaply. The layout of
``hyp`` is also described in CONVENTIONS.md.

The hyperparameter vector ``hyp`` per preset (``C`` tissue classes, class 0 = background):

=====================  =====================================================  ===========
preset                 hyp                                                    P
=====================  =====================================================  ===========
elastic, global        ``[lambda, mu]``                                       2
diffusion, global      ``[lambda]`` (the diffusion weight)                    1
elastic, SA            ``[lambda_0..lambda_C, mu_0..mu_C]``                   2 (C + 1)
diffusion, SA          ``[w_0..w_C]``                                         C + 1
=====================  =====================================================  ===========

Spatially adaptive (SA) parameter maps are built from the **fixed** segmentation ``S``:
``Lambda(x) = lambda_{S(x)}``, ``Gamma(x) = mu_{S(x)}`` (see :func:`parameter_maps`).

Two options of an SA model (``ParamSpec.smooth_sigma``, ``ParamSpec.weight_range``, saved in
``config.json["model"]``) change how the maps become regularization weights, everywhere the
maps are built (training loss, validation, refinement, the CSAIN network's input):

- ``smooth_sigma > 0``: the maps are Gaussian-smoothed (CSAIN paper's ``Lambda_gau``; sigma in
  voxels, window ``2 ceil(2.5 sigma) + 1``, i.e. 5 at the paper's 0.8), see :func:`smooth_maps`;
  0 leaves them piecewise constant (the behaviour before the option existed);
- ``weight_range``: ``'unit'`` uses ``hyp`` as the weights of paper eq. (1) (the default);
  ``'paper'`` is the CSAIN paper's range: regularization weights ``10 * hyp`` (so U(0, 1)
  sampling of ``hyp`` gives weights ~ U(0, 10)) with unit similarity weight (no ``(1 - w)``
  factor). ``hyp`` itself stays in [0, 1] in both, so every stage that handles ``hyp``
  (identification, inference, refinement) is unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence

import numpy as np

REGULARIZERS = ("elastic", "diffusion")
#: regularization weight per unit of ``hyp`` for each ``weight_range`` (see module docstring)
WEIGHT_SCALES = {"unit": 1.0, "paper": 10.0}
#: the Gaussian window is truncated at this many sigmas (radius ``ceil(2.5 sigma)``: 5 taps at 0.8)
GAUSS_TRUNCATE = 2.5


@dataclass(frozen=True)
class ParamSpec:
    """Which hyperparameters a model takes and how they map to regularization parameters."""

    regularizer: str            # 'elastic' | 'diffusion'
    spatially_adaptive: bool
    num_classes: int            # C tissue classes (background excluded)
    smooth_sigma: float = 0.0   # Gaussian smoothing of the SA maps, voxels (0: off)
    weight_range: str = "unit"  # 'unit' (eq. 1 weights in [0, 1]) | 'paper' (CSAIN: 10 * hyp, unit similarity)

    @classmethod
    def from_model_config(cls, model: Mapping) -> "ParamSpec":
        """The spec of a saved model configuration (``config.json["model"]``; runs saved before
        ``smooth_sigma``/``weight_range`` existed get 0 / 'unit', what they were trained with)."""
        return cls(model["regularizer"], bool(model["spatially_adaptive"]), int(model["num_classes"]),
                   float(model.get("smooth_sigma", 0.0)), str(model.get("weight_range", "unit")))

    def __post_init__(self):
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"unknown regularizer {self.regularizer!r}; expected one of {REGULARIZERS}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.weight_range not in WEIGHT_SCALES:
            raise ValueError(f"unknown weight_range {self.weight_range!r}; expected one of {sorted(WEIGHT_SCALES)}")
        if not (math.isfinite(self.smooth_sigma) and self.smooth_sigma >= 0):
            raise ValueError(f"smooth_sigma must be a finite number >= 0 (voxels), got {self.smooth_sigma}")
        if not self.spatially_adaptive and (self.smooth_sigma > 0 or self.weight_range != "unit"):
            raise ValueError("smoothed maps and the paper weight range apply to spatially adaptive models only")

    @property
    def weight_scale(self) -> float:
        """Regularization weight per unit of ``hyp`` (1 for 'unit', 10 for 'paper')."""
        return WEIGHT_SCALES[self.weight_range]

    @property
    def weighted_similarity(self) -> bool:
        """True for eq. (1)'s ``(1 - w)`` / ``(2 - lambda - mu)`` similarity weight ('unit'),
        False for the CSAIN paper's unit similarity weight ('paper')."""
        return self.weight_range == "unit"

    @property
    def num_fields(self) -> int:
        """1 for diffusion (weight), 2 for elastic (lambda, mu)."""
        return 2 if self.regularizer == "elastic" else 1

    @property
    def num_params(self) -> int:
        """Length P of the hyperparameter vector."""
        groups = self.num_classes + 1 if self.spatially_adaptive else 1
        return self.num_fields * groups

    def names(self, class_names: Optional[Sequence[str]] = None) -> List[str]:
        """Column names of the hyp vector, e.g. ``['lambda', 'mu']`` or
        ``['lambda_background', 'lambda_lung', ..., 'mu_liver']``."""
        fields = ["lambda", "mu"][: self.num_fields]
        if not self.spatially_adaptive:
            return fields
        cls = ["background"] + list(class_names or [f"class{c}" for c in range(1, self.num_classes + 1)])
        if len(cls) != self.num_classes + 1:
            raise ValueError(f"{len(cls) - 1} class names for {self.num_classes} classes")
        return [f"{f}_{c}" for f in fields for c in cls]


def regularization_parameters(spec: ParamSpec, hyp, fixed_seg=None):
    """Turn ``hyp [B, P]`` into the regularizer's parameters.

    Returns ``(lam, mu)`` where ``mu`` is ``None`` for diffusion. For global models each is
    ``[B]``; for SA models each is a map ``[B, *spatial]`` built from the fixed segmentation
    ``fixed_seg [B, *spatial]`` (int, labels 0..C), Gaussian-smoothed if ``spec.smooth_sigma``
    and multiplied by ``spec.weight_scale`` (:func:`conditioning_maps` times the scale). For
    diffusion ``lam`` is the weight ``w``.
    """
    import tensorflow as tf

    hyp = tf.convert_to_tensor(hyp, tf.float32)
    if not spec.spatially_adaptive:
        lam = hyp[:, 0]
        mu = hyp[:, 1] if spec.num_fields == 2 else None
        return lam, mu
    maps = conditioning_maps(spec, hyp, fixed_seg)
    if spec.weight_scale != 1.0:
        maps = maps * spec.weight_scale
    lam = maps[..., 0]
    mu = maps[..., 1] if spec.num_fields == 2 else None
    return lam, mu


def conditioning_maps(spec: ParamSpec, hyp, fixed_seg):
    """The SA parameter maps in ``hyp`` units, stacked: ``[B, *spatial, F]`` (F = 1 diffusion
    ``W``; F = 2 elastic ``Lambda, Gamma``), Gaussian-smoothed when ``spec.smooth_sigma > 0``.

    This is the CSAIN network's conditioning input (``Lambda_gau[, Gamma_gau]`` divided by the
    weight scale) and, times ``spec.weight_scale``, the loss's regularization weights.
    """
    import tensorflow as tf

    if not spec.spatially_adaptive:
        raise ValueError("parameter maps exist for spatially adaptive models only")
    if fixed_seg is None:
        raise ValueError("a spatially adaptive model needs the fixed segmentation to build parameter maps")
    hyp = tf.convert_to_tensor(hyp, tf.float32)
    k = spec.num_classes + 1
    maps = tf.stack([parameter_maps(hyp[:, f * k:(f + 1) * k], fixed_seg) for f in range(spec.num_fields)], axis=-1)
    return smooth_maps(maps, spec.smooth_sigma)


def gaussian_kernel_1d(sigma: float) -> np.ndarray:
    """Normalized 1D Gaussian taps ``exp(-t^2 / (2 sigma^2))``, ``t = -r..r`` with
    ``r = ceil(GAUSS_TRUNCATE * sigma)`` (5 taps at sigma 0.8); ``[1.]`` for sigma 0."""
    if sigma <= 0:
        return np.ones(1, np.float64)
    r = max(1, int(math.ceil(GAUSS_TRUNCATE * sigma - 1e-9)))
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def smooth_maps(maps, sigma: float):
    """Gaussian smoothing of parameter maps by normalized, separable depthwise convolution.

    Args:
        maps: ``[B, *spatial, K]`` float (2 or 3 spatial axes); each of the K maps is smoothed
            on its own (depthwise), samples independently.
        sigma: standard deviation in voxels; 0 returns ``maps`` unchanged (the same tensor).

    Border: normalized convolution. Along each axis the map is convolved with the 1D kernel
    (zero padding) and divided by the same convolution of an all-ones map, i.e. by the sum of
    the taps that fall inside the image. A constant map therefore stays exactly constant up to
    the border, and in the interior (more than the radius from every border) the result is the
    plain Gaussian filter; the total of a map whose support keeps twice the radius from the
    border is preserved exactly (near the border the renormalization can move the mean a
    little). Separable normalized 1D passes equal the normalized ND convolution because the
    kernel and the all-ones normalizer are both products over the axes.
    """
    import tensorflow as tf

    maps = tf.convert_to_tensor(maps, tf.float32)
    if sigma <= 0:
        return maps
    taps = gaussian_kernel_1d(sigma)
    r = len(taps) // 2
    shape = [int(s) for s in maps.shape[1:-1]]
    nd = len(shape)
    if nd not in (2, 3):
        raise ValueError(f"maps must be [B, *spatial, K] with 2 or 3 spatial axes, got {maps.shape}")
    chans = int(maps.shape[-1])
    # fold the K maps into the batch: one single-channel convolution per axis serves all of them
    perm = [0, nd + 1] + list(range(1, nd + 1))
    x = tf.reshape(tf.transpose(maps, perm), [-1, *shape, 1])
    for ax, n in enumerate(shape):
        kshape = [1] * nd + [1, 1]
        kshape[ax] = len(taps)
        kernel = tf.constant(taps.reshape(kshape), tf.float32)
        pos = np.arange(n)[:, None] + np.arange(-r, r + 1)[None, :]
        norm = (taps[None, :] * ((pos >= 0) & (pos < n))).sum(1)  # weight of the taps inside the image
        bshape = [1] * (nd + 2)
        bshape[ax + 1] = n
        x = tf.nn.convolution(x, kernel, padding="SAME") / tf.constant(norm.reshape(bshape), tf.float32)
    back = [0] + list(range(2, nd + 2)) + [1]
    return tf.transpose(tf.reshape(x, [-1, chans, *shape]), back)


def parameter_maps(class_params, seg):
    """Voxelwise parameter map ``M(x) = class_params[b, seg[b, x]]``.

    Args:
        class_params: ``[B, C+1]`` one value per class, class 0 = background.
        seg: ``[B, *spatial]`` or ``[B, *spatial, 1]`` integer labels in ``0..C``.

    Returns:
        ``[B, *spatial]`` float32 map.
    """
    import tensorflow as tf

    seg = tf.convert_to_tensor(seg)
    class_params = tf.convert_to_tensor(class_params, tf.float32)
    if seg.shape.rank is not None and seg.shape.rank >= 3 and seg.shape[-1] == 1 and seg.shape.rank in (4, 5):
        seg = seg[..., 0]
    return tf.gather(class_params, tf.cast(seg, tf.int32), batch_dims=1)


#: hyperparameter-to-weight mappings of the loss (``config["loss"]["hyp_mapping"]``)
MAPPINGS = ("linear", "log")


@dataclass(frozen=True)
class HypMapping:
    """How the loss turns a hyperparameter ``h`` in [0, 1] into regularization weights.

    - ``linear`` (paper eq. 1, the default): the weight is ``h`` itself and the similarity is
      weighted by ``2 - lambda - mu`` (elastic) or ``1 - w`` (diffusion). Relative to the
      centre of the box the regularization strength is ``t / (1 - t)`` (``t`` = every entry),
      from 0 at ``h = 0`` (no energy) to infinity at ``h = 1`` (no similarity).
    - ``log``: the weight is ``0.5 * 10^(decades * (h - 0.5))`` (log-uniform between
      ``0.5 * 10^(-decades/2)`` and ``0.5 * 10^(decades/2)``) and the similarity weight is
      constant, the linear mapping's at the centre (1 elastic, 0.5 diffusion). At ``h = 0.5``
      the loss equals the linear mapping's; the box spans ``decades`` decades of strength around it, both ends finite, so
      every part of the box is sampled as often in training (docs/extensions.md "Calibrated energy").

    ``h`` stays the network input and the identification grid stays evenly spaced in ``h``.
    """

    kind: str = "linear"
    decades: float = 2.0

    def __post_init__(self):
        if self.kind not in MAPPINGS:
            raise ValueError(f"unknown hyperparameter mapping {self.kind!r}; expected one of {MAPPINGS}")
        if not (math.isfinite(self.decades) and self.decades > 0):
            raise ValueError(f"decades must be a finite number > 0, got {self.decades}")

    @classmethod
    def from_loss_config(cls, loss: Optional[Mapping]) -> "HypMapping":
        """The mapping of a saved run (``config["loss"]``; runs made before it existed: linear)."""
        m = (loss or {}).get("hyp_mapping") or {"kind": "linear"}
        return cls(str(m.get("kind", "linear")), float(m.get("decades", 2.0)))

    def to_dict(self) -> dict:
        return {"kind": self.kind} if self.kind == "linear" else {"kind": self.kind, "decades": self.decades}

    @property
    def weighted_similarity(self) -> bool:
        """True if the similarity is weighted by ``2 - lambda - mu`` / ``1 - w`` (linear)."""
        return self.kind == "linear"

    @property
    def range(self) -> tuple:
        """``(weight at h = 0, weight at h = 1)``."""
        return (float(self.weight(0.0)), float(self.weight(1.0)))

    def weight(self, h):
        """Regularization weight of ``h`` (numpy or TensorFlow, elementwise; monotone increasing)."""
        if self.kind == "linear":
            return h
        if _is_tensor(h):
            import tensorflow as tf

            return 0.5 * tf.pow(10.0, self.decades * (tf.cast(h, tf.float32) - 0.5))
        return 0.5 * np.power(10.0, self.decades * (np.asarray(h, np.float64) - 0.5))

    def inverse(self, weight):
        """``h`` of a regularization weight (numpy; the inverse of :meth:`weight`)."""
        w = np.asarray(weight, np.float64)
        if self.kind == "linear":
            return w
        return 0.5 + np.log10(w / 0.5) / self.decades


def _is_tensor(x) -> bool:
    return type(x).__module__.startswith("tensorflow")
