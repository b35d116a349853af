"""Global and spatially adaptive HyperMorph models (voxelmorph 0.2 ``HyperVxmDense``), and the
CSAIN alternative for the SA presets (``conditioning='csain'``, :mod:`.csain`).

Model I/O (both variants, 2D and 3D; layout, units and warp direction: CONVENTIONS.md):

- inputs:  ``moving [B, *spatial, 1]``, ``fixed [B, *spatial, 1]``, ``hyp [B, P]`` in [0, 1]
- outputs: ``warped [B, *spatial, 1]`` (moving warped by ``disp``),
  ``disp [B, *spatial, D]`` the *integrated* displacement in voxels (scaling and squaring of the
  SVF, upsampled to full resolution; ``warped(x) = moving(x + disp(x))``), and
  ``svf [B, *spatial, D]`` the stationary velocity field predicted by the U-Net.

CSAIN models take a fourth input, ``fixed_seg [B, *spatial]`` (int labels 0..C), from which they
build their conditioning map in the graph. Call any model through :func:`call_model` (or
:func:`model_inputs`), which passes the segmentation to the models that need it.

The layout of ``hyp`` and the SA parameter maps live in :mod:`.params` (re-exported here).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

from tf_compat import import_voxelmorph, quiet_onednn_notice

from .params import REGULARIZERS, ParamSpec, parameter_maps, regularization_parameters  # noqa: F401 (re-export)
from .unrolled import unroll_per_sample_layers

tf, vxm, ne = import_voxelmorph()

#: how the network sees the hyperparameters: HyperMorph's hypernetwork (one value per class)
#: or CSAIN (the voxelwise map, SA presets only)
CONDITIONINGS = ("hypernetwork", "csain")


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
    conditioning: str = "hypernetwork"   # CONDITIONINGS
    smooth_sigma: float = 0.0            # Gaussian smoothing of the SA maps, voxels (0: off)
    weight_range: str = "unit"           # 'unit' | 'paper' (see .params)
    csain_blocks: int = 2                # CSAIN residual blocks at the bottleneck (csain only)

    @property
    def spec(self) -> ParamSpec:
        return ParamSpec(self.regularizer, self.spatially_adaptive, self.num_classes,
                         float(self.smooth_sigma), self.weight_range)

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
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning {self.conditioning!r}; expected one of {CONDITIONINGS}")
        if self.conditioning == "csain" and not self.spatially_adaptive:
            raise ValueError("CSAIN conditions on a spatial parameter map: spatially adaptive presets only")
        self.spec  # checks smooth_sigma / weight_range


def build_model(cfg: ModelConfig, unroll: bool = True) -> "tf.keras.Model":
    """Build the HyperMorph model; outputs ``[warped, disp, svf]`` (see module docstring).

    With ``unroll`` (default) the per-sample ``tf.map_fn`` loops of voxelmorph/neurite layers run
    as unrolled Python loops when the batch size is static and small (see :mod:`.unrolled`):
    same outputs and weights, about half the graph tracing time, the same step time.
    """
    cfg.validate()
    quiet_onednn_notice(tf)  # the devices are set by now (tf_compat)
    if cfg.conditioning == "csain":
        from .csain import build_csain_model

        model = build_csain_model(cfg)
        if unroll:
            unroll_per_sample_layers(model)
        return model
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


def needs_segmentation(model) -> bool:
    """True for models that take the fixed segmentation as their fourth input (CSAIN)."""
    return len(model.inputs) == 4


def model_inputs(model, moving, fixed, hyp, fixed_seg=None) -> List:
    """The input list of ``model``: ``[moving, fixed, hyp]`` plus ``fixed_seg`` (int32
    ``[B, *spatial]``) for models that need it (a clear error if it is missing)."""
    if not needs_segmentation(model):
        return [moving, fixed, hyp]
    if fixed_seg is None:
        raise ValueError(f"model {model.name} (CSAIN) builds its conditioning map from the fixed "
                         "segmentation: pass fixed_seg")
    seg = tf.convert_to_tensor(fixed_seg)
    if seg.dtype != tf.int32:
        seg = tf.cast(seg, tf.int32)
    if seg.shape.rank is not None and seg.shape.rank == len(model.inputs[3].shape) + 1:
        seg = seg[..., 0]  # [B, *spatial, 1] -> [B, *spatial]
    return [moving, fixed, hyp, seg]


def call_model(model, moving, fixed, hyp, fixed_seg=None, training: bool = False):
    """``model(model_inputs(...), training=training)`` -> ``[warped, disp, svf]``."""
    return model(model_inputs(model, moving, fixed, hyp, fixed_seg), training=training)
