"""CSAIN conditioning: the registration U-Net modulated by the spatial parameter map.

Wang, Qiu and Qin, *Conditional deformable image registration with spatially-variant and
adaptive regularization* (docs/extensions.md "CSAIN conditioning"): instead of a hypernetwork fed with one value per
tissue, the network's features are modulated by the voxelwise regularization map itself.

- :class:`CSAIN` layer (paper eq. 2): ``h' = gamma(M) * (h - mean(h)) / std(h) + beta(M)``
  with instance statistics per sample and channel (over the spatial axes) and
  ``gamma = 1 + conv_gamma(M)``, ``beta = conv_beta(M)`` two 3x3(x3) convolutions of the map
  ``M`` resampled to the feature resolution. The map is padded by mirroring before the
  (``valid``) convolutions, so a constant map gives a constant ``gamma``, ``beta`` per channel:
  the layer is then plain conditional instance normalization. ``gamma`` is parameterized
  around 1 so that an untrained layer starts close to plain instance normalization.
- :func:`csain_block`: pre-activation residual block ``x + conv(act(CSAIN(conv(act(CSAIN(x))))))``
  (two CSAIN layers, each followed by LeakyReLU(0.2), skip connection).
- :func:`build_csain_model`: the *same* U-Net sizes as the HyperMorph models (voxelmorph's
  ``Unet`` with ``enc_features``/``dec_features``: one 3x3 conv + LeakyReLU(0.2) per level,
  max-pooling, upsampling with skip concatenation, extra full-resolution decoder convs), with
  ordinary convolutions instead of hyper-convolutions; conditioning enters through
  ``csain_blocks`` CSAIN blocks at the bottleneck (the paper replaces LapIRN's residual blocks)
  and one CSAIN layer after every decoder convolution (before its activation), so every
  decoder resolution sees the map. The flow head and integration are voxelmorph's
  (``RescaleTransform``, ``VecInt``, ``SpatialTransformer``), as in the HyperMorph models.

Model I/O (layout, units and warp direction: CONVENTIONS.md):

- inputs:  ``moving [B, *spatial, 1]``, ``fixed [B, *spatial, 1]``, ``hyp [B, P]`` in [0, 1]
  (same layout as the SA HyperMorph model), ``fixed_seg [B, *spatial]`` int32 labels 0..C;
- outputs: ``warped``, ``disp``, ``svf`` exactly as :mod:`.models`.

The map ``M = conditioning_maps(spec, hyp, fixed_seg)`` (``[B, *spatial, F]``: ``W`` for
diffusion, ``Lambda, Gamma`` for elastic, Gaussian-smoothed with the spec's ``smooth_sigma``)
is built inside the graph, in ``hyp`` units ([0, 1]; for the paper weight range the loss's
``Lambda_gau`` is 10 times it). It is differentiable in ``hyp``, so gradient identification
works unchanged. Resampling to a feature level ``l`` is average pooling by ``2^l``.
"""
from __future__ import annotations

from typing import List

from tf_compat import import_voxelmorph

from .params import ParamSpec, conditioning_maps

tf, vxm, ne = import_voxelmorph()
KL = tf.keras.layers

#: LeakyReLU slope of voxelmorph's U-Net, used everywhere here
LEAKY = 0.2
#: variance floor of the instance normalization
IN_EPS = 1e-5


class CSAIN(KL.Layer):
    """Conditional spatially adaptive instance normalization (see module docstring).

    Call ``layer([h, m])`` with features ``h [B, *s, C]`` and the map at the same resolution
    ``m [B, *s, F]``; returns ``[B, *s, C]``. ``gamma_conv``/``beta_conv`` are the two map
    convolutions (kernel ``kernel_size`` per axis, ``valid`` after mirror padding).
    """

    def __init__(self, kernel_size: int = 3, eps: float = IN_EPS, **kwargs):
        super().__init__(**kwargs)
        self.kernel_size = int(kernel_size)
        self.eps = float(eps)

    def build(self, input_shape):
        h_shape, m_shape = [list(s) for s in input_shape]
        nd = len(h_shape) - 2
        channels = int(h_shape[-1])
        Conv = getattr(KL, f"Conv{nd}D")
        self.gamma_conv = Conv(channels, self.kernel_size, padding="valid", name="gamma")
        self.beta_conv = Conv(channels, self.kernel_size, padding="valid", name="beta")
        map_shape = [None] * (nd + 1) + [int(m_shape[-1])]
        for conv in (self.gamma_conv, self.beta_conv):  # built here, under their own names (<layer>/gamma/kernel)
            with tf.name_scope(conv.name):
                conv.build(map_shape)
        self._nd = nd
        super().build(input_shape)

    def modulation(self, m):
        """``(gamma, beta)`` ``[B, *s, C]`` from the map ``m [B, *s, F]``."""
        r = self.kernel_size // 2
        pad = [[0, 0]] + [[r, r]] * self._nd + [[0, 0]]
        padded = tf.pad(m, pad, mode="SYMMETRIC")
        return 1.0 + self.gamma_conv(padded), self.beta_conv(padded)

    def call(self, inputs):
        h, m = inputs
        axes = list(range(1, self._nd + 1))
        mean, var = tf.nn.moments(h, axes=axes, keepdims=True)
        gamma, beta = self.modulation(m)
        return gamma * (h - mean) * tf.math.rsqrt(var + self.eps) + beta

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size, "eps": self.eps}


class ConditioningMap(KL.Layer):
    """``[hyp [B, P], fixed_seg [B, *s]] -> conditioning_maps(spec, hyp, fixed_seg) [B, *s, F]``."""

    def __init__(self, spec: ParamSpec, **kwargs):
        super().__init__(**kwargs)
        self.spec = spec

    def call(self, inputs):
        hyp, seg = inputs
        return conditioning_maps(self.spec, hyp, seg)


def _conv(x, nf: int, name: str):
    nd = x.shape.rank - 2
    return getattr(KL, f"Conv{nd}D")(nf, 3, padding="same", kernel_initializer="he_normal", name=name)(x)


def csain_block(x, m, name: str):
    """Pre-activation residual CSAIN block: ``x + conv2(act(CSAIN2(conv1(act(CSAIN1(x))))))``.

    ``x [B, *s, C]``, ``m [B, *s, F]`` (same resolution); keeps the channel count C.
    """
    c = int(x.shape[-1])
    y = KL.LeakyReLU(LEAKY, name=f"{name}_act1")(CSAIN(name=f"{name}_csain1")([x, m]))
    y = _conv(y, c, f"{name}_conv1")
    y = KL.LeakyReLU(LEAKY, name=f"{name}_act2")(CSAIN(name=f"{name}_csain2")([y, m]))
    y = _conv(y, c, f"{name}_conv2")
    return KL.Add(name=f"{name}_add")([x, y])


def _map_pyramid(m, levels: int) -> List:
    """``[m at full resolution, m / 2, ..., m / 2^levels]`` by average pooling."""
    nd = m.shape.rank - 2
    Pool = getattr(KL, f"AveragePooling{nd}D")
    out = [m]
    for level in range(1, levels + 1):
        out.append(Pool(2 ** level, name=f"csain_map_level{level}")(m))
    return out


def _decoder_conv(x, m, nf: int, name: str):
    """conv -> CSAIN -> LeakyReLU (the decoder's conv block with CSAIN before the activation)."""
    x = _conv(x, nf, name)
    x = CSAIN(name=f"{name}_csain")([x, m])
    return KL.LeakyReLU(LEAKY, name=f"{name}_activation")(x)


def build_csain_model(cfg, name: str = "csain") -> "tf.keras.Model":
    """The CSAIN registration network for ``cfg`` (:class:`.models.ModelConfig`, SA presets).

    Returns a Keras model ``[moving, fixed, hyp, fixed_seg] -> [warped, disp, svf]`` (module
    docstring); no unrolling is applied here (see :func:`.models.build_model`).
    """
    shape = tuple(int(s) for s in cfg.image_shape)
    nd = len(shape)
    spec = cfg.spec
    if not spec.spatially_adaptive:
        raise ValueError("CSAIN conditions on a spatial parameter map: spatially adaptive presets only")
    moving = KL.Input(shape=(*shape, 1), name=f"{name}_source_input")
    fixed = KL.Input(shape=(*shape, 1), name=f"{name}_target_input")
    hyp = KL.Input(shape=(spec.num_params,), name=f"{name}_hyp_input")
    seg = KL.Input(shape=shape, dtype="int32", name=f"{name}_fixed_seg_input")
    m = ConditioningMap(spec, name=f"{name}_map")([hyp, seg])

    enc, dec = list(cfg.enc_features), list(cfg.dec_features)
    levels = len(enc)
    maps = _map_pyramid(m, levels)
    Pool = getattr(KL, f"MaxPooling{nd}D")
    Up = getattr(KL, f"UpSampling{nd}D")
    x = KL.Concatenate(name=f"{name}_input_concat")([moving, fixed])
    skips = []
    for level, nf in enumerate(enc):
        x = KL.LeakyReLU(LEAKY, name=f"{name}_enc_conv_{level}_activation")(_conv(x, nf, f"{name}_enc_conv_{level}"))
        skips.append(x)
        x = Pool(2, name=f"{name}_enc_pooling_{level}")(x)
    for b in range(int(cfg.csain_blocks)):
        x = csain_block(x, maps[levels], f"{name}_bottleneck_{b}")
    for i in range(levels):
        level = levels - i  # resolution 1 / 2^level before this level's upsampling
        x = _decoder_conv(x, maps[level], dec[i], f"{name}_dec_conv_{level - 1}")
        x = Up(2, name=f"{name}_dec_upsample_{level - 1}")(x)
        x = KL.Concatenate(name=f"{name}_dec_concat_{level - 1}")([x, skips[level - 1]])
    for j, nf in enumerate(dec[levels:]):
        x = _decoder_conv(x, maps[0], nf, f"{name}_dec_final_conv_{j}")

    Conv = getattr(KL, f"Conv{nd}D")
    svf = Conv(nd, 3, padding="same", kernel_initializer=tf.keras.initializers.RandomNormal(0.0, 1e-5),
               name=f"{name}_flow")(x)
    flow = svf
    if cfg.int_steps > 0:
        res = int(cfg.int_resolution)
        if res > 1:
            flow = vxm.layers.RescaleTransform(1.0 / res, name=f"{name}_flow_resize")(flow)
        flow = vxm.layers.VecInt(method="ss", int_steps=int(cfg.int_steps), name=f"{name}_flow_int")(flow)
        if res > 1:
            flow = vxm.layers.RescaleTransform(float(res), name=f"{name}_diffflow")(flow)
    warped = vxm.layers.SpatialTransformer(interp_method="linear", indexing="ij", fill_value=None,
                                           name=f"{name}_transformer")([moving, flow])
    return tf.keras.Model(inputs=[moving, fixed, hyp, seg], outputs=[warped, flow, svf],
                          name=f"csain_{spec.regularizer}_sa")
