"""Rectified-flow sampling with classifier-free guidance and a prompt KV cache (reference doc §6).

The reference step: the prompt (deepseek chat format, empty system prompt, then <begin_of_image>)
minus its last token, then the time-embedding token, then the P latent tokens; the batch doubled
for CFG, the unconditional rows seeing only their first token (BOS); positions 0..Lp+P for every
row; v = w * v_cond - (w - 1) * v_uncond; Euler z <- z + v / N with t = s / N, s = 0..N-1.

Here the prompt's keys/values are computed once (`prefill`) into a `llama.KVCache` of length
Lp + 1 + P; every step recomputes only the 1 + P new tokens, written at cache slot Lp. The whole
ODE is one jitted `lax.scan`. Prompts of different lengths may be left- or right-padded with
`pad_id`: padding is moved to the front and masked, and positions count real tokens only, so
every row computes what it would alone.

Shape letters: B images, R = 2B rows with CFG (cond rows first) or B without, L prompt length
(with the trailing <begin_of_image>), Lp = L - 1, P latent tokens, h w latent size.
"""

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jfl.models import llama

Array = jax.Array


class FlowPrompt(NamedTuple):
  """The CFG rows of a batch of prompts, ready for the LLM (numpy, built on the host).

  Attributes:
    ids: int32 [R, Lp] prompt ids without the trailing token, padding moved to the front.
    positions: int32 [R, Lp] RoPE positions: 0.. over the row's real tokens.
    visible: bool [R, Lp] keys the image tokens may attend (uncond rows: their first real token).
    lengths: int32 [R] real tokens per row = position of the time-embedding token.
  """
  ids: np.ndarray
  positions: np.ndarray
  visible: np.ndarray
  lengths: np.ndarray


def check_options(num_steps: int | None = None, cfg_weight: float | None = None) -> None:
  """ValueError for steps <= 0 or a CFG weight < 1."""
  if num_steps is not None and (int(num_steps) != num_steps or num_steps <= 0):
    raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
  if cfg_weight is not None and not cfg_weight >= 1.0:
    raise ValueError(f"cfg_weight must be >= 1 (1 disables guidance), got {cfg_weight}")


def prepare_prompt(input_ids, pad_id: int | None, guided: bool, max_positions: int,
                   num_new: int) -> FlowPrompt:
  """Conditional prompts [B, L] (each ending in <begin_of_image>) -> the CFG rows.

  Tokens equal to `pad_id` are padding (left or right); `pad_id=None` means no padding. The
  unconditional rows (when `guided`) keep each prompt's first real token visible; their other
  tokens become `pad_id` and are masked, as the reference.
  """
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
  real = np.ones(ids.shape, bool) if pad_id is None else ids != pad_id
  n_real = real.sum(1)
  if n_real.min() < 2:
    raise ValueError("each prompt needs at least 2 tokens (BOS ... <begin_of_image>), "
                     f"got {int(n_real.min())}")
  if ids.shape[1] - 1 + num_new > max_positions:
    raise ValueError(f"prompt of {ids.shape[1]} tokens + {num_new - 1} image tokens exceeds the model's "
                     f"context of {max_positions} positions")
  order = np.argsort(real, axis=1, kind="stable")          # padding first, real tokens in order
  ids = np.take_along_axis(ids, order, 1)[:, :-1]          # drop the trailing <begin_of_image>
  real = np.take_along_axis(real, order, 1)[:, :-1]
  positions = np.maximum(np.cumsum(real, 1) - 1, 0)
  lengths = real.sum(1)
  visible = real
  if guided:
    first = real & (np.cumsum(real, 1) == 1)
    uncond = ids if pad_id is None else np.where(first, ids, pad_id)   # masked anyway
    ids, visible = np.concatenate([ids, uncond]), np.concatenate([real, first])
    positions, lengths = np.concatenate([positions, positions]), np.concatenate([lengths, lengths])
  return FlowPrompt(ids.astype(np.int32), positions.astype(np.int32), visible, lengths.astype(np.int32))


# ----------------------------------------------------------------------------------------------
# Pieces of one step (pure; `model` is a `JanusFlow`, `params` its params).
# ----------------------------------------------------------------------------------------------

def _new_positions(prompt: FlowPrompt, num_new: int) -> tuple[Array, Array]:
  """(positions [R, 1+P] of the new tokens, key_valid [R, Lp+1+P])."""
  r = prompt.ids.shape[0]
  positions = prompt.lengths[:, None] + jnp.arange(num_new, dtype=jnp.int32)
  key_valid = jnp.concatenate([prompt.visible, jnp.ones((r, num_new), bool)], axis=1)
  return positions, key_valid


def prefill(model, params, prompt: FlowPrompt, num_new: int) -> llama.KVCache:
  """Keys/values of the prompt rows in a cache of length Lp + num_new (slots Lp.. still empty)."""
  r, lp = prompt.ids.shape
  apply = functools.partial(model.apply, {"params": params})
  embeds = apply(prompt.ids, method=model.embed_tokens)
  cache = llama.KVCache.zeros(model.config.llm, r, lp + num_new, model.dtype)
  _, key_valid = _new_positions(prompt, num_new)
  mask = llama.attention_mask(key_valid, jnp.arange(lp))
  _, aux = apply(embeds, prompt.positions, mask, cache=cache, cache_index=0, method=model.run_llm)
  return aux["cache"]


def _llm_new_tokens(model, params, prompt: FlowPrompt, new: Array, cache: llama.KVCache | None) -> Array:
  """LLM outputs of the new tokens [R, 1+P, D], from the cache or recomputing the prompt."""
  apply = functools.partial(model.apply, {"params": params})
  lp, n = prompt.ids.shape[1], new.shape[1]
  positions, key_valid = _new_positions(prompt, n)
  if cache is not None:
    mask = llama.attention_mask(key_valid, lp + jnp.arange(n))
    hidden, _ = apply(new, positions, mask, cache=cache, cache_index=lp, method=model.run_llm)
    return hidden
  seq = jnp.concatenate([apply(prompt.ids, method=model.embed_tokens).astype(new.dtype), new], axis=1)
  mask = llama.attention_mask(key_valid, jnp.arange(lp + n))
  hidden, _ = apply(seq, jnp.concatenate([prompt.positions, positions], 1), mask, method=model.run_llm)
  return hidden[:, lp:]


def guided_velocity(model, params, prompt: FlowPrompt, cache: llama.KVCache | None, z: Array, t: Array,
                    cfg_weight: Array) -> Array:
  """One CFG-combined velocity: z [B, h, w, 4], t scalar in [0, 1) -> float32 [B, h, w, 4].

  g_enc runs once on the B latents (cond and uncond rows see the same z, t); the LLM and g_dec
  run on all R rows.
  """
  apply = functools.partial(model.apply, {"params": params})
  b = z.shape[0]
  rows = prompt.ids.shape[0] // b
  tokens, t_emb, skip = apply(z, jnp.full((b,), t, jnp.float32), method=model.encode_latents)
  tile = lambda x: jnp.concatenate([x] * rows, axis=0)  # noqa: E731
  tokens, t_emb, skip = tile(tokens), tile(t_emb), tile(skip)
  new = jnp.concatenate([t_emb[:, None].astype(tokens.dtype), tokens], axis=1)    # [R, 1+P, D]
  hidden = _llm_new_tokens(model, params, prompt, new, cache)
  v = apply(hidden[:, 1:], skip, t_emb, method=model.decode_velocity).astype(jnp.float32)
  if rows == 1:
    return v
  v_c, v_u = v[:b], v[b:]
  return cfg_weight * v_c - (cfg_weight - 1.0) * v_u


# ----------------------------------------------------------------------------------------------
# Jitted entry points.
# ----------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("model", "use_cache"))
def _velocity(model, params, prompt, z, t, cfg_weight, use_cache=True):
  cache = prefill(model, params, prompt, model.config.num_image_tokens + 1) if use_cache else None
  return guided_velocity(model, params, prompt, cache, z, t, cfg_weight)


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "use_cache", "progress"))
def _sample(model, params, prompt, noise, cfg_weight, num_steps, use_cache=True, progress=None):
  cache = prefill(model, params, prompt, model.config.num_image_tokens + 1) if use_cache else None

  def step(z, s):
    if progress is not None:
      jax.debug.callback(progress, s)
    v = guided_velocity(model, params, prompt, cache, z, s.astype(jnp.float32) / num_steps, cfg_weight)
    return z + v / num_steps, None

  z, _ = jax.lax.scan(step, noise.astype(jnp.float32), jnp.arange(num_steps, dtype=jnp.int32))
  return z


def _prompt(model, input_ids, cfg_weight, pad_id) -> FlowPrompt:
  check_options(cfg_weight=cfg_weight)
  cfg = model.config
  return prepare_prompt(input_ids, pad_id, cfg_weight != 1.0, cfg.llm.max_position_embeddings,
                        cfg.num_image_tokens + 1)


def _check_latents(model, z, batch, what):
  n, c = model.config.latent_size, model.config.gen.latent_channels
  if tuple(np.shape(z)) != (batch, n, n, c):
    raise ValueError(f"{what} must be [batch={batch}, {n}, {n}, {c}] (NHWC), got {tuple(np.shape(z))}")


def velocity(model, params, input_ids, z, t, cfg_weight: float, pad_id: int | None = None,
             use_cache: bool = True) -> Array:
  """One CFG-combined velocity, as the reference step.

  Args:
    input_ids: int [B, L] conditional prompts ending in <begin_of_image> (padded with pad_id).
    z: [B, h, w, 4] scaled latents (NHWC); t: float in [0, 1) (0 = noise).
    cfg_weight: w >= 1; 1 skips the unconditional rows.
  Returns:
    float32 [B, h, w, 4].
  """
  prompt = _prompt(model, input_ids, cfg_weight, pad_id)
  _check_latents(model, z, np.shape(input_ids)[0], "z")
  return _velocity(model, params, prompt, jnp.asarray(z, jnp.float32), jnp.float32(t), jnp.float32(cfg_weight),
                   use_cache=use_cache)


def sample_latents(model, params, input_ids, noise, num_steps: int = 30, cfg_weight: float = 2.0,
                   pad_id: int | None = None, use_cache: bool = True,
                   progress: Callable[[Array], None] | None = None) -> Array:
  """Integrates the flow ODE from `noise` (t = 0) to data (t = 1) with N Euler steps.

  Args:
    input_ids: int [B, L] conditional prompts ending in <begin_of_image>.
    noise: [B, h, w, 4] standard normal latents (NHWC).
    use_cache: False recomputes the prompt at every step (same result, slower; for checks).
    progress: optional host callback called with the step index at every step.
  Returns:
    float32 [B, h, w, 4] scaled latents (divide by the VAE scaling factor before decoding).
  """
  check_options(num_steps=num_steps)
  prompt = _prompt(model, input_ids, cfg_weight, pad_id)
  _check_latents(model, noise, np.shape(input_ids)[0], "noise")
  return _sample(model, params, prompt, jnp.asarray(noise, jnp.float32), jnp.float32(cfg_weight),
                 int(num_steps), use_cache=use_cache, progress=progress)


def noise_for_seeds(seeds, shape) -> Array:
  """One standard normal latent per seed: [len(seeds), *shape]; image k depends only on seeds[k]."""
  keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
  return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)
