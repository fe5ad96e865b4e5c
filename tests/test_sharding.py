"""Mesh construction, logical-axis rules, and a 2x2x2-sharded train step equal to one device."""

import glob
import math
import os
import re

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jfl import sharding
from jfl.models import vae as vae_lib
from jfl.models.config import JanusFlowConfig
from jfl.train import optim, state as state_lib
from tests.test_train_step import _batch, _params, fast_compile, make_runner  # noqa: F401  (fixture)


def _mesh(data=1, fsdp=1, tensor=1, **dcn):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, **dcn))


def test_mesh_shape_fills_minus_one_and_rejects_bad_shapes():
  assert sharding.mesh_shape(_mesh(data=-1, tensor=2), 8) == ((4, 1, 2), (1, 1, 1))
  assert sharding.mesh_shape(_mesh(fsdp=-1, dcn_data=2), 8) == ((1, 4, 1), (2, 1, 1))
  for bad in (_mesh(data=-1, fsdp=-1), _mesh(data=3), _mesh(data=-1, tensor=3), _mesh(data=0)):
    with pytest.raises(ValueError):
      sharding.mesh_shape(bad, 8)
  mesh = sharding.make_mesh(_mesh(data=2, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="unknown sharding preset"):
    sharding.rules("zero3")


def test_every_logical_axis_name_has_a_rule_in_every_preset():
  cfg = JanusFlowConfig()
  boxed = jax.eval_shape(lambda: state_lib.init_params_boxed(cfg, jax.random.key(0)))
  vae_boxed = vae_lib.abstract_params(cfg.vae)
  names = set()
  for tree in (boxed, vae_boxed):
    for spec in jax.tree.leaves(nn.get_partition_spec(tree), is_leaf=lambda x: isinstance(x, P)):
      names |= {a for a in spec if a is not None}
  assert names <= set(sharding.PARAM_AXES), names - set(sharding.PARAM_AXES)
  src = ""
  for path in glob.glob(os.path.join(os.path.dirname(sharding.__file__), "models", "*.py")):
    with open(path) as f:
      src += f.read()
  acts = set(re.findall(r'"(act_[a-z_]+)"', src))
  assert acts and acts <= set(sharding.ACT_AXES), acts - set(sharding.ACT_AXES)
  for preset, rule_set in sharding.RULES.items():
    assert set(sharding.PARAM_AXES + sharding.ACT_AXES) <= {name for name, _ in rule_set}, preset


def _per_device_fraction(shardings, shapes) -> float:
  total = shard = 0
  for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(shapes)):
    n = math.prod(x.shape)
    total += n
    shard += n / math.prod(s.mesh.shape[a] for dim in s.spec if dim for a in ((dim,) if isinstance(dim, str) else dim))
  return shard / total


def test_presets_on_the_full_model():
  cfg = JanusFlowConfig()
  boxed = jax.eval_shape(lambda: state_lib.init_params_boxed(cfg, jax.random.key(0)))
  shapes = nn.meta.unbox(boxed)
  mesh = sharding.make_mesh(_mesh(fsdp=4, tensor=2))
  sh = sharding.logical_shardings(boxed, mesh, sharding.rules("fsdp_tp"))
  llm = sh["model"]["llm"]
  assert llm["layers"]["self_attn"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor", None)
  assert llm["layers"]["self_attn"]["o_proj"]["kernel"].spec == P(None, "tensor", None, "fsdp")
  assert llm["layers"]["mlp"]["down_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
  assert llm["embed_tokens"]["embedding"].spec == P("tensor", "fsdp")
  assert llm["lm_head"]["kernel"].spec == P("fsdp", "tensor")
  assert llm["norm"]["scale"].spec == P(None)
  assert sh["model"]["und_aligner"]["kernel"].spec == P(None, "fsdp")
  # Almost every byte is split 8 ways (only norms, biases and a few odd-sized tensors are not).
  assert _per_device_fraction(sh, shapes) < 1 / 8 * 1.02
  dp = sharding.logical_shardings(boxed, mesh, sharding.rules("dp"))
  assert _per_device_fraction(dp, shapes) == 1.0
  fsdp = sharding.logical_shardings(boxed, sharding.make_mesh(_mesh(fsdp=8)), sharding.rules("fsdp"))
  assert _per_device_fraction(fsdp, shapes) < 1 / 8 * 1.02
  # Optimizer moments mirror their parameter's sharding; frozen leaves have no moments.
  labels = optim.param_labels(shapes, ("model/siglip",))
  opt = optim.make_optimizer(ml_collections.ConfigDict(dict(lr=1e-4, warmup_steps=10, b1=0.9, b2=0.95, eps=1e-8,
                                                            weight_decay=0.0, clip_norm=1.0)), labels)
  layout = state_lib.state_layout(cfg, opt, mesh, sharding.rules("fsdp_tp"))
  mu = [s for p, s in jax.tree_util.tree_flatten_with_path(layout.shardings.opt_state)[0]
        if optim.path_str(p).endswith("model/llm/layers/self_attn/q_proj/kernel")]
  assert len(mu) == 2 and all(s.spec == P(None, "fsdp", "tensor", None) for s in mu)
  assert not any("siglip" in optim.path_str(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(layout.shardings.opt_state)[0])
  assert sharding.batch_spec(sharding.rules("fsdp_tp")) == P(("data", "fsdp"))
  assert sharding.fit_spec(P("fsdp", "tensor"), (6, 3), mesh) == P(None, None)


def _two_steps(mesh_shape, batch, accum_steps=1):
  run, fresh, _ = make_runner(mesh_shape, "fsdp_tp", batch, accum_steps)
  state = fresh()
  metrics = []
  for _ in range(2):
    state, m = run(state, batch)
    metrics.append(jax.device_get(m))
  return metrics, jax.device_get(state.params), state


def _assert_same(run_a, run_b):
  (ma, pa, _), (mb, pb, _) = run_a, run_b
  for a, b in zip(ma, mb):
    for k in ("loss", "ar_loss", "rf_loss", "repa_loss", "grad_norm"):
      np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(pa)[0], jax.tree.leaves(pb)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=optim.path_str(path))


def test_sharded_accumulated_step_matches_one_device():
  """2x2x2 (data, fsdp, tensor) mesh with 2 accumulated micro-batches == one device, one batch."""
  batch = _batch(rows=8)
  single = _two_steps((1, 1, 1), batch)
  sharded = _two_steps((2, 2, 2), batch, accum_steps=2)
  _assert_same(single, sharded)
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(single[1]), jax.tree.leaves(_params()[0]))]
  assert sum(moved) > len(moved) // 2  # the comparison is between trained params
  q = sharded[2].params["model"]["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == P(None, "fsdp", "tensor", None) and len(q.addressable_shards) == 8
  assert q.addressable_shards[0].data.shape == (2, 32, 2, 16)
