"""Global and spatially adaptive HyperMorph models (voxelmorph 0.2 ``HyperVxmDense``).

Model I/O (both variants, 2D and 3D, channels-last):

- inputs:  ``moving [B, *spatial, 1]``, ``fixed [B, *spatial, 1]``, ``hyp [B, P]`` in [0, 1]
- outputs: ``warped [B, *spatial, 1]`` (moving warped by ``disp``),
  ``disp [B, *spatial, D]`` the *integrated* displacement in voxels (scaling and squaring of the
  SVF, upsampled to full resolution; ``warped(x) = moving(x + disp(x))``), and
  ``svf [B, *spatial, D]`` the stationary velocity field predicted by the U-Net.

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

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .compat import import_voxelmorph
from .unrolled import unroll_per_sample_layers

tf, vxm, ne = import_voxelmorph()

REGULARIZERS = ("elastic", "diffusion")


@dataclass(frozen=True)
class ParamSpec:
    """Which hyperparameters a model takes and how they map to regularization parameters."""

    regularizer: str            # 'elastic' | 'diffusion'
    spatially_adaptive: bool
    num_classes: int            # C tissue classes (background excluded)

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

    def pack(self, lam, mu=None):
        """Build ``hyp [B, P]`` from per-sample ``lam``/``mu``: ``[B]`` for global models,
        ``[B, C+1]`` per class for SA models (numpy or TF)."""
        lam = tf.convert_to_tensor(lam, tf.float32)
        parts = [lam[:, None] if not self.spatially_adaptive else lam]
        if self.num_fields == 2:
            if mu is None:
                raise ValueError("the elastic model needs mu")
            mu = tf.convert_to_tensor(mu, tf.float32)
            parts.append(mu[:, None] if not self.spatially_adaptive else mu)
        return tf.concat(parts, axis=1)


def regularization_parameters(spec: ParamSpec, hyp: tf.Tensor, fixed_seg: Optional[tf.Tensor] = None):
    """Turn ``hyp [B, P]`` into the regularizer's parameters.

    Returns ``(lam, mu)`` where ``mu`` is ``None`` for diffusion. For global models each is
    ``[B]``; for SA models each is a map ``[B, *spatial]`` built from the fixed segmentation
    ``fixed_seg [B, *spatial]`` (int, labels 0..C). For diffusion ``lam`` is the weight ``w``.
    """
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


def parameter_maps(class_params: tf.Tensor, seg: tf.Tensor) -> tf.Tensor:
    """Voxelwise parameter map ``M(x) = class_params[b, seg[b, x]]``.

    Args:
        class_params: ``[B, C+1]`` one value per class, class 0 = background.
        seg: ``[B, *spatial]`` or ``[B, *spatial, 1]`` integer labels in ``0..C``.

    Returns:
        ``[B, *spatial]`` float32 map.
    """
    seg = tf.convert_to_tensor(seg)
    class_params = tf.convert_to_tensor(class_params, tf.float32)
    if seg.shape.rank is not None and seg.shape.rank >= 3 and seg.shape[-1] == 1 and seg.shape.rank in (4, 5):
        seg = seg[..., 0]
    return tf.gather(class_params, tf.cast(seg, tf.int32), batch_dims=1)


@dataclass
class ModelConfig:
    """Architecture; everything needed to rebuild the model from its run folder."""

    image_shape: Tuple[int, ...]
    regularizer: str
    spatially_adaptive: bool
    num_classes: int
    enc_features: Tuple[int, ...] = (16, 32, 32, 32)
    dec_features: Tuple[int, ...] = (32, 32, 32, 32, 32, 16, 16)
    int_steps: int = 7
    int_resolution: int = 2
    hyp_layers: int = 6
    hyp_units: int = 128

    @property
    def spec(self) -> ParamSpec:
        return ParamSpec(self.regularizer, self.spatially_adaptive, self.num_classes)

    def to_dict(self) -> Dict:
        d = asdict(self)
        d["image_shape"] = list(self.image_shape)
        d["enc_features"] = list(self.enc_features)
        d["dec_features"] = list(self.dec_features)
        return d

    @classmethod
    def from_dict(cls, d: Dict) -> "ModelConfig":
        d = dict(d)
        for k in ("image_shape", "enc_features", "dec_features"):
            d[k] = tuple(int(v) for v in d[k])
        return cls(**d)

    def validate(self) -> None:
        ndim = len(self.image_shape)
        if ndim not in (2, 3):
            raise ValueError(f"image_shape must be 2D or 3D, got {self.image_shape}")
        levels = len(self.enc_features)
        if any(int(s) % (2 ** levels) for s in self.image_shape):
            raise ValueError(
                f"image size {tuple(self.image_shape)} must be divisible by 2^{levels} = {2 ** levels} "
                f"(U-Net with {levels} downsampling levels); pad or crop the images")
        if len(self.dec_features) < levels:
            raise ValueError("dec_features needs at least as many entries as enc_features")


def build_model(cfg: ModelConfig, unroll: bool = True) -> "tf.keras.Model":
    """Build the HyperMorph model; outputs ``[warped, disp, svf]`` (see module docstring).

    With ``unroll`` (default) the per-sample ``tf.map_fn`` loops of voxelmorph/neurite layers run
    as unrolled Python loops when the batch size is static and small (see :mod:`.unrolled`):
    same outputs and weights, about half the graph tracing time, the same step time.
    """
    cfg.validate()
    hyper = vxm.networks.HyperVxmDense(
        inshape=tuple(cfg.image_shape),
        nb_hyp_params=cfg.spec.num_params,
        nb_hyp_layers=cfg.hyp_layers,
        nb_hyp_units=cfg.hyp_units,
        nb_unet_features=[list(cfg.enc_features), list(cfg.dec_features)],
        int_steps=cfg.int_steps,
        int_resolution=cfg.int_resolution,
        svf_resolution=1,
        reg_field="warp",
        name="hypermorph",
    )
    refs = hyper.references
    model = tf.keras.Model(inputs=hyper.inputs,
                           outputs=[refs.y_source, refs.pos_flow, refs.svf],
                           name=f"hypermorph_{cfg.regularizer}_{'sa' if cfg.spatially_adaptive else 'global'}")
    if unroll:
        unroll_per_sample_layers(model)
    return model
