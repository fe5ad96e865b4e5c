"""SDXL-VAE parity against diffusers `AutoencoderKL` on tiny random configs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.torch_refs import randomize_, rel_err, state_dict_numpy  # noqa: I001 (shim before diffusers)
from diffusers import AutoencoderKL as TorchAutoencoderKL  # noqa: E402
from jfl.convert.mapping import rename_legacy_vae_keys, shapes_of, to_flax, to_torch, vae_rules
from jfl.models.config import VAEConfig
from jfl.models.vae import AutoencoderKL, images_to_uint8, scale_latents, unscale_latents

IMAGE = 16
CONFIGS = {"two_blocks": (8, 16), "three_blocks": (8, 16, 16)}


@functools.lru_cache(maxsize=None)
def _setup(name):
  """(jax config, torch vae, state dict, flax params) for one tiny config."""
  chans = CONFIGS[name]
  torch_vae = TorchAutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(chans),
      up_block_types=("UpDecoderBlock2D",) * len(chans), block_out_channels=chans,
      layers_per_block=1, norm_num_groups=4, latent_channels=4, sample_size=32)
  randomize_(torch_vae, seed=len(chans))
  cfg = VAEConfig(block_out_channels=chans, layers_per_block=1, norm_num_groups=4)
  sd = state_dict_numpy(torch_vae)
  shapes = _shapes(cfg)
  params = to_flax(sd, vae_rules(shapes), shapes)
  return cfg, torch_vae, sd, params


def _shapes(cfg):
  abstract = jax.eval_shape(AutoencoderKL(cfg).init, jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)))
  return shapes_of(abstract["params"])


def _images(seed, batch=2):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, IMAGE, IMAGE, 3)).astype(np.float32)


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_decode_parity(name):
  cfg, torch_vae, _, params = _setup(name)
  model = AutoencoderKL(cfg)
  x = _images(1)
  f = 2 ** (len(cfg.block_out_channels) - 1)
  z = np.random.default_rng(2).normal(size=(2, IMAGE // f, IMAGE // f, 4)).astype(np.float32)
  with torch.no_grad():
    dist = torch_vae.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
    ref_dec = _nhwc(torch_vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample)
  mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))(params, x)
  dec = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))(params, z)
  assert mean.shape == logvar.shape == (2, IMAGE // f, IMAGE // f, 4) and mean.dtype == jnp.float32
  assert dec.shape == (2, IMAGE, IMAGE, 3)
  errs = (rel_err(mean, _nhwc(dist.mean)), rel_err(logvar, _nhwc(dist.logvar)), rel_err(dec, ref_dec))
  print(name, "rel err mean/logvar/decode", errs)
  assert max(errs) <= 1e-5, errs
  assert np.max(np.abs(np.asarray(dec))) > 0.1  # not trivially zero


def test_param_names_and_shortcuts():
  """Shortcut convs exist exactly where the channel count changes; no stray parameters."""
  _, _, sd, _ = _setup("three_blocks")
  shortcuts = sorted(k for k in sd if "conv_shortcut.weight" in k)
  assert shortcuts == ["decoder.up_blocks.2.resnets.0.conv_shortcut.weight",
                       "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"]
  assert "encoder.down_blocks.2.downsamplers.0.conv.weight" not in sd
  assert "decoder.up_blocks.2.upsamplers.0.conv.weight" not in sd
  assert "encoder.mid_block.attentions.0.to_out.0.weight" in sd


def test_legacy_attention_names_load_same_params():
  cfg, _, sd, params = _setup("two_blocks")
  legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  legacy = {}
  for key, value in sd.items():
    for new, old in legacy_names.items():
      if f"attentions.0.{new}." in key:
        key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        if value.ndim == 2:  # old checkpoints stored them as 1x1 convs
          value = value[:, :, None, None]
    legacy[key] = value
  assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
  assert legacy["encoder.mid_block.attentions.0.query.weight"].ndim == 4
  shapes = _shapes(cfg)
  loaded = to_flax(rename_legacy_vae_keys(legacy), vae_rules(shapes), shapes)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_exact(name):
  cfg, _, sd, params = _setup(name)
  back = to_torch(params, vae_rules(_shapes(cfg)))
  assert sorted(back) == sorted(sd)
  for k in sd:
    assert back[k].shape == sd[k].shape and back[k].dtype == sd[k].dtype, k
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_bf16_close_to_f32():
  cfg, _, _, params = _setup("two_blocks")
  x = _images(3)
  run = lambda dtype: jax.jit(lambda p, x: AutoencoderKL(cfg, dtype).apply({"params": p}, x))(params, x)
  f32, bf16 = run(jnp.float32), run(jnp.bfloat16)
  assert bf16.dtype == jnp.float32 and bf16.shape == f32.shape
  err = rel_err(bf16, f32)
  print("bf16 vs f32 rel err", err)
  assert err < 5e-2, err
  with pytest.raises(ValueError, match="float16"):
    AutoencoderKL(cfg, jnp.float16).apply({"params": params}, x)


def test_params_are_float32_with_logical_axes():
  cfg = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
  boxed = jax.eval_shape(AutoencoderKL(cfg, jnp.bfloat16).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: hasattr(v, "names"))
  assert leaves and all(hasattr(v, "names") and len(v.names) == v.value.ndim for v in leaves)
  assert all(v.value.dtype == jnp.float32 for v in leaves)


def test_scaling_and_uint8():
  cfg = VAEConfig()
  z = jnp.asarray(np.random.default_rng(4).normal(size=(1, 3, 3, 4)), jnp.float32)
  np.testing.assert_allclose(scale_latents(z, cfg), z * 0.13025, rtol=1e-7)
  np.testing.assert_allclose(unscale_latents(scale_latents(z, cfg), cfg), z, rtol=1e-6)
  x = np.random.default_rng(5).uniform(-1.3, 1.3, (2, 7, 5, 3)).astype(np.float32)
  x[0, 0, 0] = [-1.0, 1.0, 0.0]
  want = ((np.clip(x, -1.0, 1.0) + 1) / 2.0 * 255).astype(np.uint8)  # the reference demo's formula
  for arr in (x, jnp.asarray(x, jnp.bfloat16)):
    got = images_to_uint8(arr)
    assert got.dtype == jnp.uint8
    ref = want if arr is x else ((np.clip(np.asarray(arr, np.float32), -1, 1) + 1) / 2.0 * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(got), ref)
  assert np.asarray(images_to_uint8(x))[0, 0, 0].tolist() == [0, 255, 127]


def test_pixel_codec_is_an_exact_local_inverse():
  """The demo's parameter-free codec: each f x f pixel block becomes one latent position."""
  from jfl.models.vae import make_codec
  cfg = VAEConfig(space_to_depth=2, latent_channels=12, scaling_factor=1.0)
  codec = make_codec(cfg)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  z, _ = codec.apply({}, x, method=codec.encode)
  assert z.shape == (2, 4, 4, 12)
  np.testing.assert_array_equal(np.sort(np.asarray(z[1, 2, 3])), np.sort(x[1, 4:6, 6:8].reshape(-1)))
  np.testing.assert_array_equal(codec.apply({}, z, method=codec.decode), x)
  with pytest.raises(ValueError, match="latent_channels=12"):
    VAEConfig(space_to_depth=2, latent_channels=4)
