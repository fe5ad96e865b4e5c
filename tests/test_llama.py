"""Parity of jfl.models.llama.Llama with transformers' LlamaForCausalLM (tiny random weights)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tests.torch_refs import randomize_, rel_err, state_dict_numpy  # noqa: F401  (torch_refs first: shim)
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from jfl.convert.mapping import flatten, llama_rules, shapes_of, to_flax, to_torch
from jfl.models.config import LlamaConfig
from jfl.models.llama import KVCache, Llama, attention_mask

CONFIGS = {
    "mha": LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3,
                       num_heads=4, num_kv_heads=4, head_dim=16, rope_theta=500.0),
    "gqa": LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3,
                       num_heads=4, num_kv_heads=2, head_dim=16),
}
B, T = 3, 12
PAD = np.array([0, 3, 7])  # left padding per row


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  """These tests are compile-bound: skip XLA's optimisation passes (results stay within tolerance)."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def _hf_model(cfg: LlamaConfig):
  hf_cfg = HFLlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
      max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
      attn_implementation="eager")
  return randomize_(LlamaForCausalLM(hf_cfg), seed=1)


def _inputs(cfg):
  rng = np.random.default_rng(0)
  ids = rng.integers(0, cfg.vocab_size, (B, T))
  valid = np.arange(T)[None] >= PAD[:, None]                    # [B, T]
  positions = np.clip(np.cumsum(valid, axis=1) - 1, 0, None)    # left padding skipped
  return ids, valid, positions


@functools.lru_cache(maxsize=None)
def _setup(name):
  """(cfg, flax params, hf model, torch state_dict, inputs)."""
  cfg = CONFIGS[name]
  hf = _hf_model(cfg)
  sd = state_dict_numpy(hf, prefix="language_model.")
  ids, valid, positions = _inputs(cfg)
  model = Llama(cfg)
  mask = attention_mask(jnp.asarray(valid), jnp.arange(T))
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((B, T, cfg.hidden_size)),
                            jnp.asarray(positions), mask)["params"]
  params = to_flax(sd, llama_rules(cfg, src="language_model", dst=()), shapes_of(abstract))
  params = jax.tree.map(jnp.asarray, params)
  return cfg, params, hf, sd, (ids, valid, positions, mask)


def _hf_forward(hf, ids, valid, positions, hidden_states=False):
  with torch.no_grad():
    return hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(valid, dtype=torch.long),
              position_ids=torch.as_tensor(positions), output_hidden_states=hidden_states, use_cache=False)


@functools.lru_cache(maxsize=None)
def _forward(cfg, dtype=jnp.float32, tap_layer=None):
  """Jitted ids -> (float32 logits [B, T, V], tap or None), compiled once per (cfg, dtype, tap)."""
  model = Llama(cfg, dtype=dtype)

  @jax.jit
  def fwd(params, ids, positions, mask):
    embeds = model.apply({"params": params}, ids, method=Llama.embed)
    hidden, aux = model.apply({"params": params}, embeds, positions, mask, tap_layer=tap_layer)
    return model.apply({"params": params}, hidden, method=Llama.logits), aux["tap"]
  return fwd


def _apply(cfg, params, ids, positions, mask, dtype=jnp.float32, tap_layer=None):
  return _forward(cfg, dtype, tap_layer)(params, jnp.asarray(ids), jnp.asarray(positions), mask)


def test_init_param_tree():
  """Plain `init` creates exactly the leaves (and logical axes) the mapping table fills."""
  cfg = CONFIGS["gqa"]
  model = Llama(cfg)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, cfg.hidden_size)),
                             jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4, 4), bool))
  shapes = shapes_of(variables["params"])
  rules = llama_rules(cfg, src="language_model", dst=())
  assert set(shapes) == {r.dst for r in rules}
  assert shapes[("layers", "self_attn", "k_proj", "kernel")] == (3, 64, 2, 16)
  assert shapes[("layers", "self_attn", "o_proj", "kernel")] == (3, 4, 16, 64)
  names = {p: v.names for p, v in flatten(variables["params"]).items()}
  assert names["layers", "self_attn", "q_proj", "kernel"] == ("layers", "embed", "heads", "head_dim")
  assert names["layers", "self_attn", "v_proj", "kernel"] == ("layers", "embed", "kv_heads", "head_dim")
  assert names["layers", "mlp", "down_proj", "kernel"] == ("layers", "mlp", "embed")
  assert names["layers", "input_layernorm", "scale"] == ("layers", "norm")
  assert names["embed_tokens", "embedding"] == ("vocab", "embed")
  assert names["lm_head", "kernel"] == ("embed", "vocab")
  assert names["norm", "scale"] == ("norm",)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_tap_match_transformers(name):
  """Left-padded batch, positions = cumsum(mask) - 1; only valid query rows are compared."""
  cfg, params, hf, _, (ids, valid, positions, mask) = _setup(name)
  ref = _hf_forward(hf, ids, valid, positions, hidden_states=True)
  taps = range(1, cfg.num_layers) if name == "gqa" else [1]
  for k in taps:
    logits, tap = _apply(cfg, params, ids, positions, mask, tap_layer=k)
    err = rel_err(np.asarray(tap)[valid], ref.hidden_states[k].numpy()[valid])
    print(f"{name} tap {k} rel err {err:.2e}")
    assert err <= 1e-5
  err = rel_err(np.asarray(logits)[valid], ref.logits.numpy()[valid])
  print(f"{name} logits rel err {err:.2e}")
  assert err <= 1e-5
  with pytest.raises(ValueError):
    _apply(cfg, params, ids, positions, mask, tap_layer=cfg.num_layers + 1)


def test_attention_mask():
  valid = jnp.array([[False, True, True, True]])
  m = attention_mask(valid, jnp.arange(4))
  expect = np.tril(np.ones((4, 4), bool)) & np.array([False, True, True, True])[None]
  np.testing.assert_array_equal(np.asarray(m[0]), expect)
  # one query at slot 2 against a cache of 4 slots
  m = attention_mask(jnp.ones((1, 4), bool), jnp.array([[2]]))
  np.testing.assert_array_equal(np.asarray(m[0, 0]), [True, True, True, False])
  seg = jnp.array([[1, 1, 2, 0]])
  m = attention_mask(jnp.ones((1, 4), bool), jnp.arange(4), query_segments=seg)
  expect = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(np.asarray(m[0]), expect)


def test_kv_cache_decode():
  """Prefill P tokens into a cache of S slots, then decode chunks of 1 and 3; equals no-cache logits."""
  cfg, params, _, _, (ids, valid, positions, mask) = _setup("gqa")
  full, _ = _apply(cfg, params, ids, positions, mask)
  full = np.asarray(full)
  model = Llama(cfg)
  S, P = 16, 6
  key_valid = jnp.asarray(np.pad(valid, ((0, 0), (0, S - T))))  # unwritten slots are masked anyway

  @jax.jit
  def step(cache, chunk_ids, chunk_pos, index):
    t = chunk_ids.shape[1]
    slots = index + jnp.arange(t, dtype=jnp.int32)
    m = attention_mask(key_valid, slots)
    emb = model.apply({"params": params}, chunk_ids, method=Llama.embed)
    hidden, aux = model.apply({"params": params}, emb, chunk_pos, m, cache=cache, cache_index=index)
    return model.apply({"params": params}, hidden, method=Llama.logits), aux["cache"]

  cache = KVCache.zeros(cfg, B, S, jnp.float32)
  out = []
  bounds = [0, P, P + 1, P + 2, P + 5, T]  # prefill, single tokens, a chunk of 3, a single token
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    logits, cache = step(cache, jnp.asarray(ids[:, lo:hi]), jnp.asarray(positions[:, lo:hi]), jnp.int32(lo))
    out.append(np.asarray(logits))
  assert cache.k.shape == (cfg.num_layers, B, S, cfg.num_kv_heads, cfg.head_dim)
  got = np.concatenate(out, axis=1)
  err = rel_err(got[valid], full[valid])
  print(f"gqa kv-cache rel err {err:.2e}")
  assert err <= 1e-5
  # a python-int cache_index traces too (shape check only: no extra compile)
  emb = jnp.zeros((B, 1, cfg.hidden_size))
  hidden, aux = jax.eval_shape(functools.partial(model.apply, cache=cache, cache_index=T - 1),
                               {"params": params}, emb, jnp.asarray(positions[:, T - 1:]),
                               attention_mask(key_valid, jnp.array([T - 1])))
  assert hidden.shape == (B, 1, cfg.hidden_size) and aux["cache"].k.shape == cache.k.shape


def test_bfloat16_close_to_float32():
  cfg, params, _, _, (ids, valid, positions, mask) = _setup("gqa")
  f32, _ = _apply(cfg, params, ids, positions, mask, tap_layer=1)
  bf16, tap = _apply(cfg, params, ids, positions, mask, dtype=jnp.bfloat16, tap_layer=1)
  assert bf16.dtype == jnp.float32 and tap.dtype == jnp.bfloat16
  err = rel_err(np.asarray(bf16)[valid], np.asarray(f32)[valid])
  print(f"bf16 vs f32 rel err {err:.2e}")
  assert err <= 3e-2


def test_remat_same_gradient():
  cfg, params, _, _, (ids, valid, positions, mask) = _setup("gqa")
  targets = jnp.asarray(np.roll(ids, -1, axis=1))

  def loss(p, policy):
    model = Llama(cfg, remat_policy=policy)
    logits = model.apply({"params": p}, jnp.asarray(ids), jnp.asarray(positions), mask, method=Llama.forward)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * valid) / valid.sum()

  for policy in ("none", "full"):  # the remat wrapper is really in the graph
    jaxpr = str(jax.make_jaxpr(jax.grad(functools.partial(loss, policy=policy)))(params))
    assert ("remat" in jaxpr) == (policy != "none")
  g_none = jax.jit(jax.grad(functools.partial(loss, policy="none")))(params)
  g_full = jax.jit(jax.grad(functools.partial(loss, policy="full")))(params)
  err = max(jax.tree.leaves(jax.tree.map(rel_err, g_full, g_none)))
  print(f"remat full vs none grad rel err {err:.2e}")
  assert err <= 1e-5
  jax.jit(jax.grad(functools.partial(loss, policy="dots"))).lower(params)  # traces (no compile)
  with pytest.raises(ValueError):
    loss(params, "bogus")


def test_mapping_round_trip_exact():
  cfg, params, _, sd, _ = _setup("gqa")
  back = to_torch(params, llama_rules(cfg, src="language_model", dst=()))
  assert set(back) == set(sd)
  for k, v in sd.items():
    assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
    np.testing.assert_array_equal(back[k], v, err_msg=k)
