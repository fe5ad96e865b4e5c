"""g_enc / g_dec (ShallowUViT) and the REPA projector/loss: float32 parity with torch references."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import torch_refs  # noqa: F401  (torchvision shim; must precede transformers)
from tests.torch_refs import randomize_, rel_err, state_dict_numpy
from tests.reference_torch import TorchDecoder, TorchEncoder

import torch  # noqa: E402
from diffusers.models.embeddings import TimestepEmbedding, Timesteps  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

from jfl.convert import mapping  # noqa: E402
from jfl.models.config import GenHeadsConfig, RepaConfig  # noqa: E402
from jfl.models.gen_heads import GenDecoder, GenEncoder, TimeEmbedding, pixel_shuffle, timestep_sinusoid  # noqa: E402
from jfl.models.repa import RepaProjector  # noqa: E402
from jfl.models.repa import repa_loss as _repa_loss  # noqa: E402

CFG = GenHeadsConfig(channels=16)
D = 32          # LLM width (cond_dim)
LATENT = 8      # latent spatial size -> 4x4 tokens
repa_loss = jax.jit(_repa_loss)  # eager op-by-op dispatch is slow on CPU
T = np.array([0.0, 33.25, 500.0, 966.7], np.float32)


# ---------------------------------------------------------------------------------------------

def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(x):
  return x.detach().numpy().transpose(0, 2, 3, 1)


def _abstract(model, *args):
  return jax.eval_shape(model.init, jax.random.key(0), *args)["params"]


def _enc_setup(seed=0):
  tm = randomize_(TorchEncoder(CFG, D), seed=seed)
  model = GenEncoder(CFG, D)
  z = np.random.default_rng(seed + 1).standard_normal((len(T), LATENT, LATENT, CFG.latent_channels)).astype(np.float32)
  rules = mapping.gen_enc_rules(CFG, D, src="enc", dst=())
  params = mapping.to_flax(state_dict_numpy(tm, "enc."), rules, mapping.shapes_of(_abstract(model, z, T)))
  return tm, model, params, z


def _dec_setup(seed=0):
  tm = randomize_(TorchDecoder(CFG, D), seed=seed)
  model = GenDecoder(CFG, D)
  rng = np.random.default_rng(seed + 1)
  g = LATENT // CFG.patch_size
  x = rng.standard_normal((2, g, g, CFG.channels)).astype(np.float32)
  skip = rng.standard_normal((2, g, g, CFG.channels)).astype(np.float32)
  t_emb = rng.standard_normal((2, D)).astype(np.float32)
  rules = mapping.gen_dec_rules(CFG, D, src="dec", dst=())
  params = mapping.to_flax(state_dict_numpy(tm, "dec."), rules,
                           mapping.shapes_of(_abstract(model, x, skip, t_emb)))
  return tm, model, params, (x, skip, t_emb)


def test_timestep_sinusoid_matches_diffusers():
  for dim in (16, 17):
    ref = Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)(torch.from_numpy(T)).numpy()
    out = np.asarray(timestep_sinusoid(jnp.asarray(T), dim))
    assert out.dtype == np.float32
    assert rel_err(out, ref) <= 1e-5, rel_err(out, ref)


def test_time_embedding_matches_diffusers():
  ref_proj = Timesteps(CFG.channels, True, 0)
  ref_emb = randomize_(TimestepEmbedding(CFG.channels, D), seed=3)
  ref = ref_emb(ref_proj(torch.from_numpy(T))).detach().numpy()
  model = TimeEmbedding(CFG.channels, D)
  rules = [dataclasses.replace(r, dst=r.dst[1:]) for r in mapping.gen_enc_rules(CFG, D, src="enc", dst=())
           if r.dst[0] == "time_embed"]
  params = mapping.to_flax(state_dict_numpy(ref_emb, "enc.time_embed."), rules,
                           mapping.shapes_of(_abstract(model, T)))
  out = model.apply({"params": params}, jnp.asarray(T))
  assert out.shape == (len(T), D)
  assert rel_err(out, ref) <= 1e-5, rel_err(out, ref)


def test_encoder_matches_torch():
  tm, model, params, z = _enc_setup()
  with torch.no_grad():
    ref_x, ref_t = tm(_nchw(z), torch.from_numpy(T))
  x, t_emb = jax.jit(model.apply)({"params": params}, z, T)
  g = LATENT // CFG.patch_size
  assert x.shape == (len(T), g, g, CFG.channels) and t_emb.shape == (len(T), D)
  assert rel_err(t_emb, ref_t.numpy()) <= 1e-5, rel_err(t_emb, ref_t.numpy())
  assert rel_err(x, _nhwc(ref_x)) <= 1e-5, rel_err(x, _nhwc(ref_x))


def test_decoder_matches_torch():
  tm, model, params, (x, skip, t_emb) = _dec_setup()
  with torch.no_grad():
    ref = tm(_nchw(x), _nchw(skip), torch.from_numpy(t_emb))
  v = jax.jit(model.apply)({"params": params}, x, skip, t_emb)
  assert v.shape == (2, LATENT, LATENT, CFG.latent_channels)
  assert rel_err(v, _nhwc(ref)) <= 1e-5, rel_err(v, _nhwc(ref))


def test_decoder_concat_order_matters():
  """Swapping x and skip must change the output (guards the [x, skip] order check above)."""
  _, model, params, (x, skip, t_emb) = _dec_setup()
  apply = jax.jit(model.apply)
  a = apply({"params": params}, x, skip, t_emb)
  b = apply({"params": params}, skip, x, t_emb)
  assert rel_err(a, b) > 1e-2


@pytest.mark.parametrize("r,c", [(2, 4), (3, 2)])
def test_pixel_shuffle_matches_torch(r, c):
  y = np.random.default_rng(0).standard_normal((2, 3, 5, c * r * r)).astype(np.float32)
  ref = _nhwc(torch.nn.PixelShuffle(r)(_nchw(y)))
  np.testing.assert_array_equal(np.asarray(pixel_shuffle(jnp.asarray(y), r)), ref)


def test_bfloat16_close_to_float32():
  _, enc32, p_enc, z = _enc_setup()
  _, dec32, p_dec, (x, _, _) = _dec_setup()
  enc16, dec16 = GenEncoder(CFG, D, jnp.bfloat16), GenDecoder(CFG, D, jnp.bfloat16)
  outs = {}
  for name, enc, dec in (("f32", enc32, dec32), ("bf16", enc16, dec16)):
    x_emb, t_emb = jax.jit(enc.apply)({"params": p_enc}, z, T)
    v = jax.jit(dec.apply)({"params": p_dec}, np.resize(x, x_emb.shape), x_emb, t_emb)
    outs[name] = (x_emb, t_emb, v)
  for a, b in zip(outs["bf16"], outs["f32"]):
    assert a.dtype == jnp.bfloat16 and b.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(a, np.float32)))
    assert rel_err(np.asarray(a, np.float32), b) <= 5e-2, rel_err(np.asarray(a, np.float32), b)


@pytest.mark.parametrize("which", ["enc", "dec"])
def test_rules_round_trip(which):
  tm, _, params, _ = _enc_setup(seed=5) if which == "enc" else _dec_setup(seed=5)
  sd = state_dict_numpy(tm, f"{which}.")
  rules = (mapping.gen_enc_rules if which == "enc" else mapping.gen_dec_rules)(CFG, D, src=which, dst=())
  back = mapping.to_torch(params, rules)
  assert sorted(back) == sorted(sd)
  for k in sd:
    assert back[k].dtype == sd[k].dtype
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


# --------------------------------------------------------------------------------------------- REPA

def test_repa_projector_shapes():
  cfg = RepaConfig(hidden_dims=(24, 20))
  h = np.random.default_rng(0).standard_normal((2, 5, D)).astype(np.float32)
  for act in ("silu", "gelu", "relu"):
    model = RepaProjector(dataclasses.replace(cfg, activation=act), out_dim=12)
    params = jax.eval_shape(model.init, jax.random.key(0), h)["params"]
    assert mapping.shapes_of(params) == {
        ("layers_0", "kernel"): (D, 24), ("layers_0", "bias"): (24,),
        ("layers_1", "kernel"): (24, 20), ("layers_1", "bias"): (20,),
        ("layers_2", "kernel"): (20, 12), ("layers_2", "bias"): (12,)}
    out = jax.eval_shape(model.apply, {"params": params}, h)
    assert out.shape == (2, 5, 12) and out.dtype == jnp.float32
  with pytest.raises(ValueError, match="activation"):
    jax.eval_shape(RepaProjector(dataclasses.replace(cfg, activation="tanh"), out_dim=12).init, jax.random.key(0), h)


def test_repa_projector_matches_numpy():
  cfg = RepaConfig(hidden_dims=(24, 20), activation="gelu")
  h = np.random.default_rng(0).standard_normal((2, 5, D)).astype(np.float32)
  model = RepaProjector(cfg, out_dim=12)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), h)["params"])
  params = jax.tree.map(lambda p: np.asarray(p) + 0.05, params)  # non-zero biases
  ref = torch.from_numpy(h)
  for i in range(3):
    ref = ref @ torch.from_numpy(params[f"layers_{i}"]["kernel"]) + torch.from_numpy(params[f"layers_{i}"]["bias"])
    if i < 2:
      ref = torch.nn.functional.gelu(ref)
  out = jax.jit(model.apply)({"params": params}, h)
  assert rel_err(out, ref.numpy()) <= 1e-5, rel_err(out, ref.numpy())


def test_repa_loss_values_and_gradients():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((3, 4, 8)).astype(np.float32)
  assert abs(float(repa_loss(a, 2.5 * a)) + 1.0) <= 1e-6
  assert abs(float(repa_loss(a, -a)) - 1.0) <= 1e-6
  e = np.zeros((3, 4, 8), np.float32)
  f = np.zeros((3, 4, 8), np.float32)
  e[..., 0], f[..., 1] = 1.0, 3.0
  assert abs(float(repa_loss(e, f))) <= 1e-7
  assert repa_loss(a, a).dtype == jnp.float32
  b = rng.standard_normal((3, 4, 8)).astype(np.float32)
  g_target = jax.grad(repa_loss, argnums=1)(jnp.asarray(a), jnp.asarray(b))
  g_proj = jax.grad(repa_loss, argnums=0)(jnp.asarray(a), jnp.asarray(b))
  assert np.all(np.asarray(g_target) == 0)
  assert np.max(np.abs(g_proj)) > 1e-3
  # Matches torch's cosine similarity.
  ref = -torch.nn.functional.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b), dim=-1).mean()
  assert abs(float(repa_loss(a, b)) - float(ref)) <= 1e-6


def test_repa_loss_mask():
  a = np.random.default_rng(1).standard_normal((2, 4, 8)).astype(np.float32)
  target = np.stack([a[0], -a[1]])  # example 0 aligned (sim 1), example 1 opposite (sim -1)
  assert abs(float(repa_loss(a, target))) <= 1e-6
  assert abs(float(repa_loss(a, target, jnp.array([True, False]))) + 1.0) <= 1e-6
  assert abs(float(repa_loss(a, target, jnp.array([0.0, 1.0]))) - 1.0) <= 1e-6
  assert float(repa_loss(a, target, jnp.array([False, False]))) == 0.0
  other = np.random.default_rng(2).standard_normal(a.shape).astype(np.float32)
  g = jax.grad(repa_loss)(jnp.asarray(a), jnp.asarray(other), jnp.array([False, True]))
  assert np.all(np.asarray(g[0]) == 0) and np.max(np.abs(g[1])) > 1e-3
  assert np.all(np.isfinite(np.asarray(jax.grad(repa_loss)(jnp.zeros((1, 2, 3)), jnp.ones((1, 2, 3))))))
