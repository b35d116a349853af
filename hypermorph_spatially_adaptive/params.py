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

from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence

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
