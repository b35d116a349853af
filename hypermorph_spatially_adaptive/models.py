"""Global and spatially adaptive HyperMorph models (voxelmorph 0.2 ``HyperVxmDense``).

Model I/O (both variants, 2D and 3D; layout, units and warp direction: CONVENTIONS.md):

- inputs:  ``moving [B, *spatial, 1]``, ``fixed [B, *spatial, 1]``, ``hyp [B, P]`` in [0, 1]
- outputs: ``warped [B, *spatial, 1]`` (moving warped by ``disp``),
  ``disp [B, *spatial, D]`` the *integrated* displacement in voxels (scaling and squaring of the
  SVF, upsampled to full resolution; ``warped(x) = moving(x + disp(x))``), and
  ``svf [B, *spatial, D]`` the stationary velocity field predicted by the U-Net.

The layout of ``hyp`` and the SA parameter maps live in :mod:`.params` (re-exported here).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Tuple

from tf_compat import import_voxelmorph

from .params import REGULARIZERS, ParamSpec, parameter_maps, regularization_parameters  # noqa: F401 (re-export)
from .unrolled import unroll_per_sample_layers

tf, vxm, ne = import_voxelmorph()


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
