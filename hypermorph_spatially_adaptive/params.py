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
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence

import numpy as np

REGULARIZERS = ("elastic", "diffusion")


@dataclass(frozen=True)
class ParamSpec:
    """Which hyperparameters a model takes and how they map to regularization parameters."""

    regularizer: str            # 'elastic' | 'diffusion'
    spatially_adaptive: bool
    num_classes: int            # C tissue classes (background excluded)

    @classmethod
    def from_model_config(cls, model: Mapping) -> "ParamSpec":
        """The spec of a saved model configuration (``config.json["model"]``)."""
        return cls(model["regularizer"], bool(model["spatially_adaptive"]), int(model["num_classes"]))

    def __post_init__(self):
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"unknown regularizer {self.regularizer!r}; expected one of {REGULARIZERS}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")

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
    ``fixed_seg [B, *spatial]`` (int, labels 0..C). For diffusion ``lam`` is the weight ``w``.
    """
    import tensorflow as tf

    hyp = tf.convert_to_tensor(hyp, tf.float32)
    if not spec.spatially_adaptive:
        lam = hyp[:, 0]
        mu = hyp[:, 1] if spec.num_fields == 2 else None
        return lam, mu
    if fixed_seg is None:
        raise ValueError("a spatially adaptive model needs the fixed segmentation to build parameter maps")
    k = spec.num_classes + 1
    lam = parameter_maps(hyp[:, :k], fixed_seg)
    mu = parameter_maps(hyp[:, k:2 * k], fixed_seg) if spec.num_fields == 2 else None
    return lam, mu


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
      every part of the box is sampled as often in training (README "Calibrated energy").

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
