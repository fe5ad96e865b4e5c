"""SigLIP encoder: float32 parity with timm's VisionTransformer (as the reference builds it)."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import torch_refs  # noqa: F401  (torchvision shim; must precede timm)
from tests.torch_refs import randomize_, rel_err, state_dict_numpy

import timm.models.vision_transformer as timm_vit  # noqa: E402
import torch  # noqa: E402

from jfl.convert import mapping  # noqa: E402
from jfl.models.config import SiglipConfig  # noqa: E402
from jfl.models.siglip import SiglipEncoder  # noqa: E402

CFG = SiglipConfig(image_size=32, patch_size=4, width=32, depth=3, num_heads=2, mlp_dim=64)
PREFIX = "vision_tower."
IGNORED = [r"vision_tower\.attn_pool\..*"]


def _timm_model(cfg: SiglipConfig, seed=0):
  """As `create_siglip_vit`: depth truncated at build time, no class token, MAP head unused."""
  model = timm_vit.VisionTransformer(
      img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width,
      depth=cfg.num_blocks, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.width,
      class_token=False, global_pool="map", num_classes=0, weight_init="skip",
      norm_layer=partial(torch.nn.LayerNorm, eps=cfg.layer_norm_eps), act_layer=torch.nn.GELU)
  return randomize_(model, seed=seed)


def _images(cfg, b=2, seed=1):
  return np.random.default_rng(seed).uniform(-1, 1, (b, cfg.image_size, cfg.image_size, 3)).astype(np.float32)


def _torch_features(model, images):
  with torch.no_grad():
    return model.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()


def _convert(cfg, model, dtype=jnp.float32):
  enc = SiglipEncoder(cfg, dtype=dtype)
  abstract = jax.eval_shape(enc.init, jax.random.key(0), jnp.zeros((1, cfg.image_size, cfg.image_size, 3)))
  rules = mapping.siglip_rules(cfg, src="vision_tower", dst=())
  sd = state_dict_numpy(model, PREFIX)
  params = mapping.to_flax(sd, rules, mapping.shapes_of(abstract["params"]), ignored=IGNORED)
  return enc, params, rules, sd


def _check_parity(cfg, seed):
  model = _timm_model(cfg, seed)
  assert any(k.startswith("attn_pool.") for k in model.state_dict())
  enc, params, _, _ = _convert(cfg, model)
  x = _images(cfg, seed=seed)
  ref = _torch_features(model, x)
  out = jax.jit(enc.apply)({"params": params}, x)
  assert out.shape == (2, cfg.grid ** 2, cfg.width) == ref.shape
  err = rel_err(out, ref)
  print(f"select_layer={cfg.select_layer} blocks={cfg.num_blocks}: rel err {err:.2e}")
  assert err <= 1e-5, err
  return model, enc, params


def test_parity_full_depth():
  _check_parity(CFG, seed=0)


def test_parity_select_layer_truncates():
  cfg = dataclasses.replace(CFG, select_layer=-2)
  assert cfg.num_blocks == CFG.depth - 1
  model, enc, params = _check_parity(cfg, seed=3)
  assert len(model.blocks) == 2 and params["blocks"]["norm1"]["scale"].shape[0] == 2
  # A checkpoint of the full-depth tower has a block the truncated model does not use.
  full_sd = state_dict_numpy(_timm_model(CFG), PREFIX)
  abstract = jax.eval_shape(enc.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(mapping.ConversionError, match=r"unexpected tensor vision_tower\.blocks\.2\."):
    mapping.to_flax(full_sd, mapping.siglip_rules(cfg, src="vision_tower", dst=()),
                    mapping.shapes_of(abstract["params"]), ignored=IGNORED)


def test_param_tree_and_axes():
  enc = SiglipEncoder(CFG)
  boxed = jax.eval_shape(enc.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  shapes = mapping.shapes_of(boxed)
  targets = {r.dst for r in mapping.siglip_rules(CFG, src="vision_tower", dst=())}
  assert set(shapes) == targets
  assert shapes[("patch_embed", "kernel")] == (4, 4, 3, 32)
  assert shapes[("pos_embed",)] == (1, 64, 32)
  assert shapes[("blocks", "attn", "qkv", "kernel")] == (3, 32, 3, 2, 16)
  assert shapes[("blocks", "attn", "qkv", "bias")] == (3, 3, 2, 16)
  assert shapes[("blocks", "attn", "proj", "kernel")] == (3, 32, 32)
  assert shapes[("blocks", "mlp", "fc1", "kernel")] == (3, 32, 64)
  flat = mapping.flatten(boxed)
  for path, leaf in flat.items():
    assert len(leaf.names) == len(leaf.value.shape), path
    if path[0] == "blocks":
      assert leaf.names[0] == "layers", path
  assert flat[("blocks", "attn", "qkv", "kernel")].names == ("layers", "embed", None, "heads", "head_dim")
  assert flat[("blocks", "mlp", "fc2", "kernel")].names == ("layers", "mlp", "embed")


def test_round_trip_exact():
  model = _timm_model(CFG, seed=5)
  _, params, rules, sd = _convert(CFG, model)
  back = mapping.to_torch(params, rules)
  expected = {k: v for k, v in sd.items() if not k.startswith(PREFIX + "attn_pool.")}
  assert set(back) == set(expected)
  for k, v in expected.items():
    assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_bf16_and_remat_close_to_f32():
  model = _timm_model(CFG, seed=7)
  enc, params, _, _ = _convert(CFG, model)
  x = _images(CFG, seed=7)
  ref = jax.jit(enc.apply)({"params": params}, x)
  out = jax.jit(SiglipEncoder(CFG, dtype=jnp.bfloat16).apply)({"params": params}, x)
  assert out.dtype == jnp.bfloat16 and out.shape == ref.shape
  err = rel_err(out, ref)
  print(f"bf16 vs f32 rel err {err:.2e}")
  assert err < 5e-2, err

  # Rematerialisation changes neither outputs nor gradients.
  def loss(p, policy):
    return jnp.sum(SiglipEncoder(CFG, remat_policy=policy).apply({"params": p}, x) ** 2)
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g0 = grad(params, "none")
  errs = jax.tree.map(lambda a, b: rel_err(a, b), grad(params, "full"), g0)
  assert max(jax.tree.leaves(errs)) <= 1e-5, errs
  with pytest.raises(ValueError, match="remat_policy"):
    SiglipEncoder(CFG, remat_policy="bogus").init(jax.random.key(0), x)


def test_init_and_apply_sharded():
  """Params materialise sharded by their logical axes on a (fsdp, tensor) mesh; output unchanged."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from jax.sharding import AxisType, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  cfg = dataclasses.replace(CFG, width=64, num_heads=4, mlp_dim=128)
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
  rules = [("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("act_batch", "fsdp")]
  enc, x = SiglipEncoder(cfg), jnp.asarray(_images(cfg, b=4))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = nn.logical_to_mesh_sharding(
        nn.get_partition_spec(jax.eval_shape(enc.init, jax.random.key(0), x)), mesh, rules)
    params = jax.jit(enc.init, out_shardings=shardings)(jax.random.key(0), x)
    out = jax.jit(enc.apply)(params, x)
  params = nn.unbox(params)
  assert params["params"]["blocks"]["attn"]["qkv"]["kernel"].sharding.spec == P(None, "fsdp", None, "tensor", None)
  assert params["params"]["blocks"]["mlp"]["fc1"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
  ref = jax.jit(enc.apply)(jax.device_get(params), x)  # same weights, unsharded
  assert rel_err(out, ref) <= 1e-5
