"""REPA (Yu et al. 2410.06940): projector h_phi from LLM hidden states to SigLIP features, and its loss.

`L_REPA = -mean_{b, p} cos(h_phi(q_theta(z_t))[b, p], stopgrad(f_enc(x))[b, p])`.
The projector is not in the released checkpoint (trained from scratch).
Shape letters: B batch, P image tokens, D LLM width, C SigLIP width.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jfl.models.config import RepaConfig
from jfl.models.layers import Array, Dtype, dense, gelu

_ACTIVATIONS = {"silu": nn.silu, "gelu": gelu, "relu": nn.relu}


class RepaProjector(nn.Module):
  """MLP [B, P, D] -> [B, P, out_dim]: Dense(hidden_dims[0]) -> act -> ... -> Dense(out_dim).

  Layers are named `layers_0`, `layers_1`, ...; the activation ('silu' | 'gelu' (erf) | 'relu')
  follows every layer but the last.
  """

  config: RepaConfig
  out_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array) -> Array:
    chex.assert_rank(h, 3)
    if self.config.activation not in _ACTIVATIONS:
      raise ValueError(f"unknown REPA activation {self.config.activation!r}; "
                       f"known: {', '.join(sorted(_ACTIVATIONS))}")
    act = _ACTIVATIONS[self.config.activation]
    widths = (*self.config.hidden_dims, self.out_dim)
    x = h.astype(self.dtype)
    for i, width in enumerate(widths):
      axes = ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed")  # alternate so in/out never share a name
      x = dense(width, axes, f"layers_{i}", dtype=self.dtype)(x)
      if i < len(widths) - 1:
        x = act(x)
    return x


def _normalize(x: Array, eps: float = 1e-12) -> Array:
  """x / max(||x||, eps) over the last axis (torch `F.normalize`), finite gradient at 0."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def repa_loss(projected: Array, target: Array, mask: Array | None = None) -> Array:
  """Negative mean per-token cosine similarity, float32 scalar.

  Args:
    projected: [B, P, C] projector output (gradients flow).
    target: [B, P, C] SigLIP features; stop-gradient'ed here.
    mask: optional [B] (bool or 0/1) of examples to include. The loss averages the per-example
      token-mean similarity over the included examples; 0 when none is included.
  """
  chex.assert_rank(projected, 3)
  chex.assert_equal_shape([projected, target])
  target = jax.lax.stop_gradient(target)
  sim = jnp.sum(_normalize(projected.astype(jnp.float32)) * _normalize(target.astype(jnp.float32)),
                axis=-1)  # [B, P]
  per_example = jnp.mean(sim, axis=-1)  # [B]
  if mask is None:
    return -jnp.mean(per_example)
  chex.assert_shape(mask, (projected.shape[0],))
  w = mask.astype(jnp.float32)
  return -jnp.sum(w * per_example) / jnp.maximum(jnp.sum(w), 1.0)
