"""Generation encoder g_enc and decoder g_dec (the reference `ShallowUViTEncoder/Decoder`), NHWC.

g_enc: latent z_t [B, 2h, 2w, 4] -> patch conv -> ConvNeXt blocks FiLM-conditioned on the time
embedding -> x_emb [B, h, w, C] (LLM tokens after the aligner, and the decoder's skip).
g_dec: LLM output [B, h, w, C] -> RMSNorm -> concat [x, skip] -> ConvNeXt blocks at 2C ->
RMSNorm -> 1x1 conv -> pixel shuffle -> velocity [B, 2h, 2w, 4].

Parameter names follow `gen_enc_rules` / `gen_dec_rules` in `jfl/convert/mapping.py`.
Shape letters: B batch, D LLM width, C channels, h w spatial.
"""

import math

import chex
import flax.linen as nn
import jax.numpy as jnp

from jfl.models.config import GenHeadsConfig
from jfl.models.layers import RMSNorm, Array, Dtype, default_kernel_init, dense, gelu, param_init

_ACT = ("act_batch", "act_height", "act_width", "act_channels")


def timestep_sinusoid(t: Array, dim: int, max_period: float = 10000.0) -> Array:
  """diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`.

  Args:
    t: [B] times on the x1000 scale (any float dtype; used in float32).
    dim: embedding width.
  Returns:
    float32 [B, dim]: `[cos(t * f_k), sin(t * f_k)]`, `f_k = exp(-ln(max_period) * k / (dim // 2))`,
    zero-padded by one column when `dim` is odd.
  """
  chex.assert_rank(t, 1)
  half = dim // 2
  exponent = jnp.arange(half, dtype=jnp.float32) * jnp.float32(-math.log(max_period)) / jnp.float32(half)
  args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def pixel_shuffle(y: Array, r: int) -> Array:
  """`torch.nn.PixelShuffle(r)` in NHWC: out[b, r*h+i, r*w+j, c] = y[b, h, w, c*r*r + i*r + j].

  Args:
    y: [B, h, w, C*r*r].
  Returns:
    [B, r*h, r*w, C].
  """
  chex.assert_rank(y, 4)
  b, h, w, crr = y.shape
  if crr % (r * r):
    raise ValueError(f"pixel_shuffle: {crr} channels not divisible by r^2 = {r * r}")
  c = crr // (r * r)
  y = y.reshape(b, h, w, c, r, r)  # [B, h, w, C, i, j]
  y = y.transpose(0, 1, 4, 2, 5, 3)  # [B, h, i, w, j, C]
  return y.reshape(b, h * r, w * r, c)


def _conv(features, kernel, strides, padding, axes, name, dtype, groups=1):
  return nn.Conv(
      features=features, kernel_size=(kernel, kernel), strides=(strides, strides), padding=padding,
      feature_group_count=groups, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=param_init(default_kernel_init, axes),
      bias_init=param_init(nn.initializers.zeros_init(), (axes[-1],)), name=name)


class TimeEmbedding(nn.Module):
  """diffusers `Timesteps(dim, True, 0)` + `TimestepEmbedding(dim, features)`: t [B] -> [B, D].

  The float32 sinusoid is cast to `dtype`, then linear_1 -> SiLU -> linear_2 (both with bias).
  """

  dim: int        # sinusoid width (g_enc channels C)
  features: int   # output width (LLM width D)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: Array) -> Array:
    e = timestep_sinusoid(t, self.dim).astype(self.dtype)
    h = dense(self.features, ("conv_in", "embed"), "linear_1", dtype=self.dtype)(e)
    h = nn.silu(h)
    return dense(self.features, ("mlp", "embed"), "linear_2", dtype=self.dtype)(h)


class GlobalResponseNorm(nn.Module):
  """ConvNeXt-V2 GRN: `bias + x * (1 + scale * n)`, n = ||x||_hw / (mean_c ||x||_hw + 1e-6).

  x [B, h, w, C] -> [B, h, w, C]; scale, bias [C] (torch stores [1, 1, 1, C], zeros at init).
  The spatial L2 norm is computed in float32.
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    chex.assert_rank(x, 4)
    c = x.shape[-1]
    zeros = nn.initializers.zeros_init()
    scale = self.param("scale", param_init(zeros, ("mlp",)), (c,), jnp.float32)
    bias = self.param("bias", param_init(zeros, ("mlp",)), (c,), jnp.float32)
    x32 = x.astype(jnp.float32)
    g = jnp.sqrt(jnp.sum(x32 * x32, axis=(1, 2), keepdims=True))  # [B, 1, 1, C]
    n = (g / (jnp.mean(g, axis=-1, keepdims=True) + 1e-6)).astype(self.dtype)
    x = x.astype(self.dtype)
    return bias.astype(self.dtype) + x * (scale.astype(self.dtype) * n + 1)


class ConvNeXtBlock(nn.Module):
  """ConvNeXt block with FiLM: x [B, h, w, C], t_emb [B, D] -> [B, h, w, C].

  dwconv7x7 -> RMSNorm -> Linear C->fC -> GELU(erf) -> GRN -> Linear fC->C -> + x ->
  `h * (1 + scale) + shift` with (scale, shift) = split(cond_embeds_mapper(silu(t_emb))).
  """

  channels: int
  cond_dim: int
  ffn_factor: int = 4
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, t_emb: Array) -> Array:
    c, f = self.channels, self.channels * self.ffn_factor
    chex.assert_rank(x, 4)
    chex.assert_axis_dimension(x, -1, c)
    chex.assert_shape(t_emb, (x.shape[0], self.cond_dim))
    x = x.astype(self.dtype)
    h = _conv(c, 7, 1, ((3, 3), (3, 3)), (None, None, None, "conv_out"), "depthwise", self.dtype,
              groups=c)(x)
    h = RMSNorm(self.norm_eps, name="norm")(h)
    h = dense(f, ("conv_out", "mlp"), "channelwise_linear_1", dtype=self.dtype)(h)
    h = gelu(h)
    h = GlobalResponseNorm(self.dtype, name="channelwise_norm")(h)
    h = dense(c, ("mlp", "conv_out"), "channelwise_linear_2", dtype=self.dtype)(h)
    h = h + x
    cond = dense(2 * c, ("embed", "conv_out"), "cond_embeds_mapper", dtype=self.dtype)(
        nn.silu(t_emb.astype(self.dtype)))
    scale, shift = jnp.split(cond[:, None, None, :], 2, axis=-1)  # [B, 1, 1, C] each
    h = h * (1 + scale) + shift
    return nn.with_logical_constraint(h, _ACT)


class GenEncoder(nn.Module):
  """g_enc: (z [B, 2h, 2w, latent], t [B]) -> (x_emb [B, h, w, C], t_emb [B, D]).

  `t` is on the x1000 scale. `x_emb` goes to the LLM (through `gen_enc_aligner`) and is also
  the decoder's skip input.
  """

  config: GenHeadsConfig
  cond_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: Array, t: Array) -> tuple[Array, Array]:
    cfg = self.config
    chex.assert_rank(z, 4)
    chex.assert_axis_dimension(z, -1, cfg.latent_channels)
    chex.assert_shape(t, (z.shape[0],))
    t_emb = TimeEmbedding(cfg.channels, self.cond_dim, self.dtype, name="time_embed")(t)
    p = cfg.patch_size
    x = _conv(cfg.channels, p, p, "VALID", (None, None, "conv_in", "conv_out"), "in_conv",
              self.dtype)(z.astype(self.dtype))
    for j in range(cfg.num_blocks):
      x = ConvNeXtBlock(cfg.channels, self.cond_dim, cfg.ffn_factor, cfg.norm_eps, self.dtype,
                        name=f"res_blocks_{j}")(x, t_emb)
    return x, t_emb


class GenDecoder(nn.Module):
  """g_dec: (x [B, h, w, C], skip [B, h, w, C], t_emb [B, D]) -> velocity [B, p*h, p*w, latent].

  input_norm(x) -> concat [x, skip] (x first) -> ConvNeXt blocks at 2C -> out_norm ->
  unpatch_conv (the torch 1x1 conv, a dense 2C -> latent*p*p) -> pixel_shuffle(p).
  Output in `dtype`.
  """

  config: GenHeadsConfig
  cond_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, skip: Array, t_emb: Array) -> Array:
    cfg = self.config
    c2, p = 2 * cfg.channels, cfg.patch_size
    chex.assert_rank(x, 4)
    chex.assert_axis_dimension(x, -1, cfg.channels)
    chex.assert_equal_shape([x, skip])
    chex.assert_shape(t_emb, (x.shape[0], self.cond_dim))
    x = RMSNorm(cfg.norm_eps, name="input_norm")(x.astype(self.dtype))
    h = jnp.concatenate([x, skip.astype(self.dtype)], axis=-1)  # [B, h, w, 2C]
    for j in range(cfg.num_blocks):
      h = ConvNeXtBlock(c2, self.cond_dim, cfg.ffn_factor, cfg.norm_eps, self.dtype,
                        name=f"res_blocks_{j}")(h, t_emb)
    h = RMSNorm(cfg.norm_eps, name="out_norm")(h)
    h = dense(cfg.latent_channels * p * p, ("conv_in", "conv_out"), "unpatch_conv", dtype=self.dtype)(h)
    return nn.with_logical_constraint(pixel_shuffle(h, p), _ACT)
