"""Autoregressive text decoding over a pre-allocated KV cache, in one jitted `lax.while_loop`.

As the reference `language_model.generate` (reference doc §4.2): left-padded prompts, positions
cumsum(mask) - 1, greedy (temperature 0) or temperature + top-p sampling, stop at EOS or after
`max_new_tokens`; finished rows are filled with `pad_id`.

Shape letters: B batch, L prompt length, M max new tokens, D width, V vocab.
"""

import functools

import jax
import jax.numpy as jnp

from jfl.models import llama

Array = jax.Array


def check_options(max_new_tokens: int, temperature: float, top_p: float) -> None:
  if int(max_new_tokens) != max_new_tokens or max_new_tokens <= 0:
    raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def check_context(prompt_len: int, max_new_tokens: int, max_positions: int) -> None:
  if prompt_len + max_new_tokens > max_positions:
    raise ValueError(f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                     f"context of {max_positions} positions")


def sample_token(logits: Array, key: Array, temperature: Array, top_p: Array) -> Array:
  """float32 [B, V] -> int32 [B]: argmax when temperature == 0, else temperature + nucleus sampling.

  Top-p keeps the most probable tokens whose preceding cumulative probability is < top_p (the
  first one always), as transformers' TopPLogitsWarper.
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.maximum(temperature, 1e-6)
  order = jnp.argsort(-scaled, axis=-1)                                     # descending
  sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
  choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
  sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)


def decode(model, params, embeds: Array, attention_mask: Array, key: Array, max_new_tokens: int,
           eos_id, pad_id, temperature, top_p) -> tuple[Array, Array]:
  """Generates after left-padded prompt embeddings.

  Args:
    model, params: a `JanusFlow` and its params.
    embeds: [B, L, D] prompt embeddings (text + image slots); attention_mask: [B, L], 1 = real.
    key: PRNG key (used when temperature > 0); step i uses fold_in(key, i).
    max_new_tokens: static M.
  Returns:
    (tokens int32 [B, M]: generated ids, EOS included, pad_id after it;
     lengths int32 [B]: tokens generated per row, EOS included).
  """
  apply = functools.partial(model.apply, {"params": params})
  b, length = attention_mask.shape
  m = max_new_tokens
  attention_mask = attention_mask.astype(bool)
  key_valid = jnp.concatenate([attention_mask, jnp.ones((b, m), bool)], axis=1)
  cache = llama.KVCache.zeros(model.config.llm, b, length + m, model.dtype)
  positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
  hidden, aux = apply(embeds, positions, llama.attention_mask(key_valid, jnp.arange(length)),
                      cache=cache, cache_index=0, method=model.run_llm)
  n_real = attention_mask.sum(1).astype(jnp.int32)

  def emit(i, logits, tokens, done, lengths):
    tok = sample_token(logits, jax.random.fold_in(key, i), temperature, top_p)
    tok = jnp.where(done, pad_id, tok)
    return tokens.at[:, i].set(tok), done | (tok == eos_id), lengths + (~done), tok

  init = (jnp.full((b, m), pad_id, jnp.int32), jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))
  state = emit(0, apply(hidden[:, -1], method=model.logits), *init)

  def cond(state):
    i, _, _, done, _, _ = state
    return (i < m) & ~jnp.all(done)

  def body(state):
    i, cache, tokens, done, lengths, tok = state
    x = apply(tok[:, None], method=model.embed_tokens)
    slot = length + i - 1
    hidden, aux = apply(x, (n_real + i - 1)[:, None], llama.attention_mask(key_valid, slot[None]),
                        cache=cache, cache_index=slot, method=model.run_llm)
    out = emit(i, apply(hidden[:, 0], method=model.logits), tokens, done, lengths)
    return (i + 1, aux["cache"], *out)

  _, _, tokens, _, lengths, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), aux["cache"], *state))
  return tokens, lengths


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def answer_tokens(model, params, input_ids, images, images_seq_mask, images_emb_mask, attention_mask, key,
                  max_new_tokens: int, eos_id, pad_id, temperature, top_p) -> tuple[Array, Array]:
  """Understanding: the processor's arrays (images NHWC [B, n, H, W, 3]) -> `decode`'s (tokens, lengths)."""
  embeds = model.apply({"params": params}, input_ids, images, images_seq_mask, images_emb_mask,
                       method=model.understanding_embeds)
  return decode(model, params, embeds, attention_mask, key, max_new_tokens, eos_id, pad_id, temperature, top_p)
