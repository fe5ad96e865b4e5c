"""SigLIP-L/16 understanding encoder (timm `VisionTransformer` layout, reference doc §3).

Patch conv (with bias) -> + pos_embed (no class slot) -> `config.num_blocks` pre-norm blocks
(fused qkv, bidirectional attention, exact-GELU MLP) -> final LayerNorm. No class token and no
pooling head: the released `attn_pool.*` (MAP head) tensors are ignored at load time.
`select_layer` truncates the tower at build time (`config.num_blocks` blocks are built); the
output is always the final LayerNorm of the last built block.

Shape letters: B batch, P patches, C width, N heads, H head dim, F mlp, h w spatial.
"""

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jfl.models.config import SiglipConfig
from jfl.models.layers import default_kernel_init, dense, gelu, layer_norm, param_init

Array = jax.Array
Dtype = Any

_ACT = ("act_batch", "act_len", "act_embed")

# Remat policies by config string; "none" disables rematerialisation.
REMAT_POLICIES = {
    "full": None,  # save nothing but the scan carry: recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "block_input": jax.checkpoint_policies.save_only_these_names("siglip_block_input"),
}


class SiglipAttention(nn.Module):
  """Bidirectional multi-head self-attention with a fused qkv projection."""

  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x [B, P, C] -> [B, P, C]."""
    c = x.shape[-1]
    n = self.num_heads
    h = c // n
    # Torch packs the qkv output as [3, N, H]; kernel [C, 3, N, H] reproduces that layout.
    qkv = dense((3, n, h), ("embed", None, "heads", "head_dim"), "qkv", dtype=self.dtype)(x)  # [B, P, 3, N, H]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]                            # [B, P, N, H]
    o = jax.nn.dot_product_attention(q, k, v)                                      # [B, P, N, H]
    o = o.reshape(o.shape[:-2] + (c,))                                             # heads concatenated
    return dense(c, ("heads", "embed"), "proj", dtype=self.dtype, bias_axes=("embed",))(o)


class SiglipMlp(nn.Module):
  """fc1 -> exact GELU -> fc2."""

  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x [B, P, C] -> [B, P, C]."""
    y = dense(self.mlp_dim, ("embed", "mlp"), "fc1", dtype=self.dtype)(x)        # [B, P, F]
    y = gelu(y)
    return dense(x.shape[-1], ("mlp", "embed"), "fc2", dtype=self.dtype)(y)


class SiglipBlock(nn.Module):
  """Pre-norm ViT block; `(x, None) -> (x, None)` so it can be scanned."""

  config: SiglipConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, _=None):
    """x [B, P, C] -> ([B, P, C], None)."""
    cfg = self.config
    x = checkpoint_name(x, "siglip_block_input")
    y = layer_norm(cfg.layer_norm_eps, "norm1", self.dtype)(x)
    x = x + SiglipAttention(cfg.num_heads, self.dtype, name="attn")(y)
    y = layer_norm(cfg.layer_norm_eps, "norm2", self.dtype)(x)
    x = x + SiglipMlp(cfg.mlp_dim, self.dtype, name="mlp")(y)
    x = nn.with_logical_constraint(x, _ACT)
    return x, None


class SiglipEncoder(nn.Module):
  """SigLIP vision tower without class token or pooling head.

  Attributes:
    config: architecture; `config.num_blocks` blocks are built (select_layer truncation).
    dtype: compute dtype (parameters stay float32).
    remat_policy: "none" or a key of `REMAT_POLICIES`.
  """

  config: SiglipConfig
  dtype: Dtype = jnp.float32
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, images: Array) -> Array:
    """images [B, h, w, 3] NHWC in [-1, 1] (h = w = image_size) -> features [B, P, C].

    P = grid^2 in row-major order (token = row * grid + col).
    """
    cfg = self.config
    s, p, c, g = cfg.image_size, cfg.patch_size, cfg.width, cfg.grid
    chex.assert_rank(images, 4)
    chex.assert_shape(images, (None, s, s, 3))
    if cfg.width % cfg.num_heads:
      raise ValueError(f"width {cfg.width} is not divisible by num_heads {cfg.num_heads}")
    b = images.shape[0]

    x = nn.Conv(
        c, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=param_init(nn.initializers.lecun_normal(), (None, None, "conv_in", "embed")),
        bias_init=param_init(nn.initializers.zeros_init(), ("embed",)),
        name="patch_embed")(images.astype(self.dtype))                            # [B, g, g, C]
    x = x.reshape(b, g * g, c)                                                     # [B, P, C]
    pos = self.param("pos_embed", param_init(default_kernel_init, (None, None, "embed")),
                     (1, g * g, c), jnp.float32)
    x = x + pos.astype(self.dtype)
    x = nn.with_logical_constraint(x, _ACT)

    block = SiglipBlock
    if self.remat_policy != "none":
      if self.remat_policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {self.remat_policy!r}; "
                         f"known: none, {', '.join(REMAT_POLICIES)}")
      block = nn.remat(block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
    x, _ = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=cfg.num_blocks,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, self.dtype, name="blocks")(x, None)

    return layer_norm(cfg.layer_norm_eps, "norm", self.dtype)(x)                 # [B, P, C]
