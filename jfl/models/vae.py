"""SDXL-VAE (diffusers `AutoencoderKL`) in Flax Linen, NHWC.

Frozen in JanusFlow: `encode` turns training images into latent targets, `decode` turns sampled
latents into images. Module and parameter names follow diffusers (`down_blocks_0` for
`down_blocks.0`), so `jfl.convert.mapping.vae_rules` derives the torch keys from the Flax paths.
Parameters are float32; `dtype` is the compute dtype (bfloat16 or float32, never float16:
SDXL-VAE activations overflow in fp16). GroupNorm statistics and the attention softmax always
run in float32; `encode`/`decode` return float32.

Shape letters: B batch, H W image size, h w spatial size inside the network, C channels.
"""

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jfl.models import layers
from jfl.models.gen_heads import pixel_shuffle
from jfl.models.config import VAEConfig

Array = jax.Array
Dtype = Any

_CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")


def _conv(features, kernel, name, dtype, stride=1, padding=None):
  """nn.Conv with logical axes; `padding` defaults to explicit symmetric `kernel // 2` per side."""
  p = kernel // 2
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride),
      padding=((p, p), (p, p)) if padding is None else padding,
      dtype=dtype, param_dtype=jnp.float32,
      kernel_init=layers.param_init(nn.initializers.lecun_normal(), _CONV_AXES),
      bias_init=layers.param_init(nn.initializers.zeros_init(), ("conv_out",)),
      name=name)


def _group_norm(cfg: VAEConfig, name, dtype):
  """GroupNorm with two-pass variance (as torch), statistics in float32."""
  return nn.GroupNorm(
      num_groups=cfg.norm_num_groups, epsilon=cfg.norm_eps, dtype=dtype, param_dtype=jnp.float32,
      use_fast_variance=False,
      scale_init=layers.param_init(nn.initializers.ones_init(), ("norm",)),
      bias_init=layers.param_init(nn.initializers.zeros_init(), ("norm",)),
      name=name)


class ResnetBlock(nn.Module):
  """diffusers `ResnetBlock2D` without time embedding: [B,h,w,Cin] -> [B,h,w,out_channels].

  `conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))) + shortcut(x)`, shortcut a 1x1 conv iff Cin != out.
  """
  config: VAEConfig
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, dt = self.config, self.dtype
    h = nn.silu(_group_norm(cfg, "norm1", dt)(x))
    h = _conv(self.out_channels, 3, "conv1", dt)(h)
    h = nn.silu(_group_norm(cfg, "norm2", dt)(h))
    h = _conv(self.out_channels, 3, "conv2", dt)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "conv_shortcut", dt)(x)
    return x.astype(h.dtype) + h


class Attention(nn.Module):
  """Mid-block self-attention: GroupNorm -> one head of width C over h*w tokens -> + x.

  [B,h,w,C] -> [B,h,w,C]; scale 1/sqrt(C), softmax in float32.
  """
  config: VAEConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, hh, ww, c = x.shape
    h = _group_norm(self.config, "group_norm", self.dtype)(x).reshape(b, hh * ww, 1, c)  # [B,P,N=1,C]
    proj = lambda name: layers.dense(c, ("conv_in", "conv_out"), name, dtype=self.dtype)
    q, k, v = proj("to_q")(h), proj("to_k")(h), proj("to_v")(h)
    o = jax.nn.dot_product_attention(q, k, v)                                             # [B,P,1,C]
    o = proj("to_out_0")(o.reshape(b, hh * ww, c)).reshape(b, hh, ww, c)
    return x.astype(o.dtype) + o


class MidBlock(nn.Module):
  """`UNetMidBlock2D`: resnets_0 -> attentions_0 (optional) -> resnets_1, [B,h,w,C] -> same."""
  config: VAEConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    x = ResnetBlock(self.config, c, self.dtype, name="resnets_0")(x)
    if self.config.mid_block_attention:
      x = Attention(self.config, self.dtype, name="attentions_0")(x)
    return ResnetBlock(self.config, c, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
  """Zero-pad bottom/right by 1, then 3x3 stride-2 VALID conv: [B,h,w,C] -> [B,h/2,w/2,C]."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(x.shape[-1], 3, "conv", self.dtype, stride=2, padding="VALID")(x)


class Upsample(nn.Module):
  """Nearest x2, then 3x3 conv pad 1: [B,h,w,C] -> [B,2h,2w,C]."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, "conv", self.dtype)(x)


class DownBlock(nn.Module):
  """`DownEncoderBlock2D`: layers_per_block resnets, then an optional downsampler."""
  config: VAEConfig
  out_channels: int
  add_downsample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for j in range(self.config.layers_per_block):
      x = ResnetBlock(self.config, self.out_channels, self.dtype, name=f"resnets_{j}")(x)
    if self.add_downsample:
      x = Downsample(self.dtype, name="downsamplers_0")(x)
    return x


class UpBlock(nn.Module):
  """`UpDecoderBlock2D`: layers_per_block + 1 resnets, then an optional upsampler."""
  config: VAEConfig
  out_channels: int
  add_upsample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for j in range(self.config.layers_per_block + 1):
      x = ResnetBlock(self.config, self.out_channels, self.dtype, name=f"resnets_{j}")(x)
    if self.add_upsample:
      x = Upsample(self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Image [B,H,W,in_channels] -> moments [B,H/f,W/f,2*latent_channels] (before quant_conv)."""
  config: VAEConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, dt = self.config, self.dtype
    chans = cfg.block_out_channels
    x = _conv(chans[0], 3, "conv_in", dt)(x)
    for i, c in enumerate(chans):
      x = DownBlock(cfg, c, i < len(chans) - 1, dt, name=f"down_blocks_{i}")(x)
    x = MidBlock(cfg, dt, name="mid_block")(x)
    x = nn.silu(_group_norm(cfg, "conv_norm_out", dt)(x))
    return _conv(2 * cfg.latent_channels, 3, "conv_out", dt)(x)


class Decoder(nn.Module):
  """Latent [B,h,w,latent_channels] (after post_quant_conv) -> image [B,h*f,w*f,out_channels]."""
  config: VAEConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    cfg, dt = self.config, self.dtype
    chans = tuple(reversed(cfg.block_out_channels))
    x = _conv(chans[0], 3, "conv_in", dt)(z)
    x = MidBlock(cfg, dt, name="mid_block")(x)
    for i, c in enumerate(chans):
      x = UpBlock(cfg, c, i < len(chans) - 1, dt, name=f"up_blocks_{i}")(x)
    x = nn.silu(_group_norm(cfg, "conv_norm_out", dt)(x))
    return _conv(cfg.out_channels, 3, "conv_out", dt)(x)


class AutoencoderKL(nn.Module):
  """SDXL-VAE. f = config.downsample (8 for SDXL): images [B,H,W,3] <-> latents [B,H/f,W/f,4]."""
  config: VAEConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg, dt = self.config, self.dtype
    if jnp.dtype(dt) == jnp.float16:
      raise ValueError("SDXL-VAE overflows in float16; use bfloat16 or float32")
    self.encoder = Encoder(cfg, dt)
    self.decoder = Decoder(cfg, dt)
    self.quant_conv = _conv(2 * cfg.latent_channels, 1, None, dt)
    self.post_quant_conv = _conv(cfg.latent_channels, 1, None, dt)

  def encode(self, x: Array) -> tuple[Array, Array]:
    """Images [B,H,W,in_channels] in [-1, 1] -> (mean, logvar), each [B,H/f,W/f,latent], float32.

    Unscaled latents (multiply by `scaling_factor` via `scale_latents`); logvar clipped to [-30, 20].
    """
    cfg = self.config
    chex.assert_rank(x, 4)
    chex.assert_axis_dimension(x, 3, cfg.in_channels)
    moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: Array) -> Array:
    """Unscaled latents [B,h,w,latent] -> images [B,h*f,w*f,out_channels], float32, not clamped."""
    chex.assert_rank(z, 4)
    chex.assert_axis_dimension(z, 3, self.config.latent_channels)
    return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

  def __call__(self, x: Array) -> Array:
    """Reconstruction through the posterior mean (used for init): [B,H,W,3] -> [B,H,W,3]."""
    return self.decode(self.encode(x)[0])


class PixelCodec(nn.Module):
  """A parameter-free stand-in for the VAE: f x f pixel blocks folded into channels (demo, tests).

  Same interface as `AutoencoderKL`: images [B,H,W,C] <-> latents [B,H/f,W/f,C*f*f], exactly invertible.
  """
  config: VAEConfig
  dtype: Dtype = jnp.float32

  def encode(self, x: Array) -> tuple[Array, Array]:
    b, h, w, c = x.shape
    f = self.config.space_to_depth
    z = x.astype(jnp.float32).reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 5, 2, 4)
    z = z.reshape(b, h // f, w // f, c * f * f)
    return z, jnp.full_like(z, -30.0)

  def decode(self, z: Array) -> Array:
    return pixel_shuffle(z.astype(jnp.float32), self.config.space_to_depth)

  def __call__(self, x: Array) -> Array:
    return self.decode(self.encode(x)[0])


def make_codec(config: VAEConfig, dtype: Dtype = jnp.float32) -> nn.Module:
  """The latent codec a config names: the SDXL-style `AutoencoderKL`, or a `PixelCodec`."""
  return PixelCodec(config, dtype) if config.space_to_depth else AutoencoderKL(config, dtype)


def scale_latents(mean: Array, config: VAEConfig) -> Array:
  """Unscaled VAE latents [B,h,w,latent] -> the flow model's latent space (x scaling_factor)."""
  return mean * config.scaling_factor


def unscale_latents(z: Array, config: VAEConfig) -> Array:
  """Inverse of `scale_latents`: divide by scaling_factor before `decode`."""
  return z / config.scaling_factor


def images_to_uint8(x: Array) -> Array:
  """[B,H,W,C] in ~[-1, 1] -> uint8 as the reference demo: float32, clip, ((x+1)/2*255) truncated."""
  x = jnp.clip(jnp.asarray(x).astype(jnp.float32), -1.0, 1.0)
  return ((x + 1.0) / 2.0 * 255.0).astype(jnp.uint8)


def abstract_params(config: VAEConfig) -> dict:
  """ShapeDtypeStructs of the VAE params (boxed with logical axis names), without allocating."""
  x = jax.ShapeDtypeStruct((1, 2 * config.downsample, 2 * config.downsample, config.in_channels), jnp.float32)
  return jax.eval_shape(lambda x: make_codec(config).init(jax.random.key(0), x), x).get("params", {})
