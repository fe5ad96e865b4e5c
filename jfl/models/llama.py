"""DeepSeek-LLM decoder (HF LLaMA architecture) as a scanned Flax Linen stack with a KV cache.

Matches transformers' `LlamaForCausalLM` (reference doc §2): pre-norm blocks, RMSNorm (eps from
the config, float32 internally), half-split "rotate_half" RoPE, GQA attention, SwiGLU MLP, final
RMSNorm, untied `lm_head`. Positions and the attention mask are always explicit: build the mask
with `attention_mask(...)`.

Shape letters: B batch, T query length, S key length (T without a cache, the cache length with
one), D width, N query heads, K kv heads, H head dim, F mlp width, V vocab, L layers.
"""

import math
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jfl.models.config import LlamaConfig
from jfl.models.layers import RMSNorm, default_kernel_init, dense, param_init

Array = jax.Array
ACT = ("act_batch", "act_len", "act_embed")

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer, stacked.

  Attributes:
    k: [L, B, S, K, H] rotated keys.
    v: [L, B, S, K, H] values.
  """
  k: Array
  v: Array

  @classmethod
  def zeros(cls, config: LlamaConfig, batch: int, length: int, dtype=jnp.float32) -> "KVCache":
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

  @property
  def length(self) -> int:
    return self.k.shape[2]


def attention_mask(key_valid: Array, query_slots: Array, key_slots: Array | None = None,
                   query_segments: Array | None = None, key_segments: Array | None = None) -> Array:
  """Causal + padding (+ segment) mask.

  Args:
    key_valid: bool [B, S], False for padding keys (and not-yet-written cache slots).
    query_slots: int [B, T] or [T], cache slot of each query (0..T-1 without a cache).
    key_slots: int [S] or [B, S], slot of each key; defaults to arange(S).
    query_segments: optional int [B, T]; queries attend only keys of the same nonzero segment.
    key_segments: optional int [B, S]; defaults to `query_segments` (requires S == T).

  Returns:
    bool [B, T, S]: True where query t may attend key s, i.e.
    key_slot[s] <= query_slot[t] and key_valid[b, s] (and same nonzero segment).
  """
  chex.assert_rank(key_valid, 2)
  b, s = key_valid.shape
  query_slots = jnp.asarray(query_slots, jnp.int32)
  if query_slots.ndim == 1:
    query_slots = jnp.broadcast_to(query_slots[None], (b, query_slots.shape[0]))
  key_slots = jnp.arange(s, dtype=jnp.int32) if key_slots is None else jnp.asarray(key_slots, jnp.int32)
  key_slots = jnp.broadcast_to(key_slots, (b, s))
  mask = (key_slots[:, None, :] <= query_slots[:, :, None]) & key_valid.astype(bool)[:, None, :]
  if query_segments is not None:
    key_segments = query_segments if key_segments is None else key_segments
    chex.assert_shape(key_segments, (b, s))
    same = query_segments[:, :, None] == key_segments[:, None, :]
    mask = mask & same & (query_segments[:, :, None] != 0)
  return mask


def rotary(x: Array, positions: Array, theta: float) -> Array:
  """HF rotate_half RoPE on x [B, T, N, H] at positions [B, T]; tables in float32, cast to x.dtype."""
  h = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [H/2]
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq                  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]                # [B, T, 1, H]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = x[..., : h // 2], x[..., h // 2:]
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Attention(nn.Module):
  """GQA self-attention with RoPE, optionally reading/writing one layer's KV cache."""
  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache=None, cache_index=None):
    """x [B, T, D], positions [B, T], mask bool [B, T, S]; layer_cache (k, v) [B, S, K, H] or None.

    Returns (out [B, T, D], updated (k, v) or None)."""
    cfg = self.config
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = dense((n, h), ("embed", "heads", "head_dim"), "q_proj", use_bias=False, dtype=self.dtype)(x)
    key = dense((k, h), ("embed", "kv_heads", "head_dim"), "k_proj", use_bias=False, dtype=self.dtype)(x)
    val = dense((k, h), ("embed", "kv_heads", "head_dim"), "v_proj", use_bias=False, dtype=self.dtype)(x)
    q = rotary(q, positions, cfg.rope_theta)      # [B, T, N, H]
    key = rotary(key, positions, cfg.rope_theta)  # [B, T, K, H]
    new_cache = None
    if layer_cache is not None:
      ck, cv = layer_cache
      start = (jnp.int32(0), jnp.asarray(cache_index, jnp.int32), jnp.int32(0), jnp.int32(0))
      ck = jax.lax.dynamic_update_slice(ck, key.astype(ck.dtype), start)
      cv = jax.lax.dynamic_update_slice(cv, val.astype(cv.dtype), start)
      new_cache = (ck, cv)
      key, val = ck.astype(self.dtype), cv.astype(self.dtype)  # [B, S, K, H]
    out = jax.nn.dot_product_attention(q, key, val, mask=mask[:, None], scale=1.0 / math.sqrt(h))
    out = dense(cfg.hidden_size, ("heads", "head_dim", "embed"), "o_proj", use_bias=False,
                dtype=self.dtype, n_in=2)(out)
    return out, new_cache


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)); x [B, T, D] -> [B, T, D]."""
  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    f, d = self.config.intermediate_size, self.config.hidden_size
    gate = dense(f, ("embed", "mlp"), "gate_proj", use_bias=False, dtype=self.dtype)(x)
    up = dense(f, ("embed", "mlp"), "up_proj", use_bias=False, dtype=self.dtype)(x)
    h = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("act_batch", "act_len", "act_mlp"))
    return dense(d, ("mlp", "embed"), "down_proj", use_bias=False, dtype=self.dtype)(h)


class DecoderLayer(nn.Module):
  """One pre-norm block, written as an `nn.scan` body.

  carry = (x [B, T, D], tap [B, T, D] or None, layer index int32); broadcast: positions, mask,
  cache_index, tap_layer; scanned: this layer's (k, v) cache or None.
  """
  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry, positions, mask, cache_index, tap_layer, layer_cache):
    x, tap, index = carry
    x = checkpoint_name(x, "decoder_layer_input")
    eps = self.config.rms_norm_eps
    attn, new_cache = Attention(self.config, self.dtype, name="self_attn")(
        RMSNorm(eps, name="input_layernorm")(x), positions, mask, layer_cache, cache_index)
    x = x + attn
    x = x + MLP(self.config, self.dtype, name="mlp")(RMSNorm(eps, name="post_attention_layernorm")(x))
    x = nn.with_logical_constraint(x, ACT)
    if tap is not None:
      tap = jnp.where(index == tap_layer - 1, x, tap)
    return (x, tap, index + 1), new_cache


class Llama(nn.Module):
  """LlamaForCausalLM: `embed` -> `__call__` (decoder stack + final norm) -> `logits`.

  Parameters (leading `layers` axis of size L on everything under `layers/`): embed_tokens/embedding
  [V, D]; layers/{input,post_attention}_layernorm/scale [L, D]; layers/self_attn/{q,k,v}_proj/kernel
  [L, D, N|K, H]; layers/self_attn/o_proj/kernel [L, N, H, D]; layers/mlp/{gate,up}_proj/kernel
  [L, D, F]; layers/mlp/down_proj/kernel [L, F, D]; norm/scale [D]; lm_head/kernel [D, V].

  `init` through `__call__` creates every parameter (embed_tokens and lm_head are touched too).
  """
  config: LlamaConfig
  dtype: Any = jnp.float32
  remat_policy: str = "none"  # "none" | "full" | "dots" | "dots_no_batch", per scanned layer

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=param_init(default_kernel_init, ("vocab", "embed")), name="embed_tokens")
    layer = DecoderLayer
    if self.remat_policy != "none":
      if self.remat_policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {self.remat_policy!r}; "
                         f"expected 'none' or one of {sorted(REMAT_POLICIES)}")
      layer = nn.remat(layer, prevent_cse=False, policy=REMAT_POLICIES[self.remat_policy])
    self.layers = nn.scan(
        layer,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, self.dtype, name="layers")
    self.norm = RMSNorm(cfg.rms_norm_eps, name="norm")
    self.lm_head = dense(cfg.vocab_size, ("embed", "vocab"), "lm_head", use_bias=False, dtype=self.dtype)

  def embed(self, ids: Array) -> Array:
    """ids int [B, T] -> embeddings [B, T, D] in `dtype`."""
    chex.assert_rank(ids, 2)
    return nn.with_logical_constraint(self.embed_tokens(ids), ACT)

  def __call__(self, embeds: Array, positions: Array, mask: Array, cache: KVCache | None = None,
               cache_index=0, tap_layer: int | None = None):
    """Runs the decoder stack.

    Args:
      embeds: [B, T, D] input embeddings.
      positions: int [B, T] RoPE positions.
      mask: bool [B, T, S] (see `attention_mask`); S = T without a cache, the cache length with one.
      cache: optional KVCache [L, B, S, K, H]; this call's keys/values are written at slots
        cache_index .. cache_index + T - 1 and attention runs over the whole cache.
      cache_index: int or traced int32 scalar, first cache slot written.
      tap_layer: static int in 1..L; also return the hidden state after that many blocks.

    Returns:
      (hidden [B, T, D] after the final norm, {"cache": updated KVCache or None,
       "tap": [B, T, D] pre-final-norm output of block tap_layer - 1, or None}).
    """
    cfg = self.config
    b, t = embeds.shape[:2]
    chex.assert_shape(embeds, (b, t, cfg.hidden_size))
    chex.assert_shape(positions, (b, t))
    s = t if cache is None else cache.length
    chex.assert_shape(mask, (b, t, s))
    if tap_layer is not None and not 1 <= tap_layer <= cfg.num_layers:
      raise ValueError(f"tap_layer must be in 1..{cfg.num_layers}, got {tap_layer}")
    if self.is_initializing():  # create embed_tokens and lm_head params in a plain `init`
      self.logits(self.embed(jnp.zeros((1, 1), jnp.int32)))

    x = nn.with_logical_constraint(embeds.astype(self.dtype), ACT)
    tap = None if tap_layer is None else jnp.zeros_like(x)
    carry = (x, tap, jnp.int32(0))
    layer_cache = None if cache is None else (cache.k, cache.v)
    index = None if cache is None else jnp.asarray(cache_index, jnp.int32)
    tap_arg = None if tap_layer is None else jnp.int32(tap_layer)
    (x, tap, _), new_kv = self.layers(carry, positions, mask, index, tap_arg, layer_cache)
    new_cache = None if cache is None else KVCache(k=new_kv[0], v=new_kv[1])
    hidden = nn.with_logical_constraint(self.norm(x), ACT)
    return hidden, {"cache": new_cache, "tap": tap}

  def logits(self, hidden: Array) -> Array:
    """hidden [B, T, D] -> float32 logits [B, T, V] (untied lm_head)."""
    return self.lm_head(hidden).astype(jnp.float32)

  def forward(self, ids: Array, positions: Array, mask: Array) -> Array:
    """Convenience: ids int [B, T] -> float32 logits [B, T, V] without a cache."""
    hidden, _ = self(self.embed(ids), positions, mask)
    return self.logits(hidden)
