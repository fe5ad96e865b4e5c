"""The train state (a plain pytree) and its sharded creation.

`TrainState` holds the step, params = {"model": JanusFlow params, "repa": RepaProjector params},
the optimizer state, the EMA of the params (what evaluation and export read), the base RNG key
(raw uint32 key data, so Orbax can save it) and NaN/Inf skip counters. The VAE params are not part
of it: they are a frozen input of the step.

Creation never materialises unsharded weights: `jax.eval_shape(init)` -> logical partition specs ->
`NamedSharding`s -> `jax.jit(init, out_shardings=...)`.
"""

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jfl import sharding
from jfl.models import janusflow, repa as repa_lib, vae as vae_lib
from jfl.models.config import JanusFlowConfig
from jfl.train import optim

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  """step int32 []; params / ema_params {"model", "repa"}; rng uint32 [2] key data;
  bad_steps int32 [] consecutive non-finite steps; skipped int32 [] non-finite steps in total."""
  step: Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: Array
  bad_steps: Array
  skipped: Array


def build_modules(cfg: JanusFlowConfig, dtype=jnp.float32, remat_policy: str = "none", vae_dtype=jnp.float32):
  """(JanusFlow, RepaProjector, AutoencoderKL) modules at compute dtype `dtype`."""
  model = janusflow.JanusFlow(cfg, dtype=dtype, remat_policy=remat_policy)
  projector = repa_lib.RepaProjector(cfg.repa, out_dim=cfg.siglip.width, dtype=dtype)
  vae = vae_lib.make_codec(cfg.vae, dtype=vae_dtype)
  return model, projector, vae


def init_params_boxed(cfg: JanusFlowConfig, key: Array) -> dict:
  """{"model", "repa"} params with their logical-axis boxes (float32)."""
  k1, k2 = jax.random.split(key)
  model = janusflow.JanusFlow(cfg).init(k1, *janusflow.dummy_inputs(cfg))["params"]
  h = jnp.zeros((1, cfg.num_image_tokens, cfg.llm.hidden_size), jnp.float32)
  repa = repa_lib.RepaProjector(cfg.repa, out_dim=cfg.siglip.width).init(k2, h)["params"]
  return {"model": model, "repa": repa}


def new_state(params: dict, optimizer: optax.GradientTransformation, rng: Array) -> TrainState:
  """A step-0 state around unboxed params (EMA starts equal to the params)."""
  zero = lambda: jnp.zeros((), jnp.int32)  # distinct buffers: the state is donated leaf by leaf
  return TrainState(step=zero(), params=params, opt_state=optimizer.init(params),
                    ema_params=jax.tree.map(jnp.copy, params), rng=jnp.asarray(rng), bad_steps=zero(), skipped=zero())


@dataclasses.dataclass
class StateLayout:
  """Shapes and shardings of the train state on a mesh."""
  abstract: TrainState          # ShapeDtypeStructs (unboxed)
  shardings: TrainState         # NamedShardings, same structure
  param_shardings: dict


def state_layout(cfg: JanusFlowConfig, optimizer, mesh, rules) -> StateLayout:
  """Derives every leaf's sharding from the params' logical axes (optimizer moments mirror them)."""
  boxed = jax.eval_shape(lambda: init_params_boxed(cfg, jax.random.key(0)))
  param_sh = sharding.logical_shardings(boxed, mesh, rules)
  abstract = jax.eval_shape(lambda: new_state(nn.meta.unbox(init_params_boxed(cfg, jax.random.key(0))),
                                              optimizer, jax.random.key_data(jax.random.key(0))))
  rep = sharding.replicated(mesh)
  opt_sh = _mirror_shardings(abstract.opt_state, param_sh, rep)
  shardings = TrainState(step=rep, params=param_sh, opt_state=opt_sh, ema_params=param_sh, rng=rep,
                         bad_steps=rep, skipped=rep)
  return StateLayout(abstract=abstract, shardings=shardings, param_shardings=param_sh)


def _mirror_shardings(tree, param_shardings, default):
  """Shardings for an optimizer state: a leaf whose key path ends with a parameter's path (and has
  its shape) gets that parameter's sharding (Adam moments, masked or not); others get `default`."""
  by_path = {optim.path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}

  def pick(path, leaf):
    keys = optim.path_str(path).split("/")
    for k in range(len(keys)):
      s = by_path.get("/".join(keys[k:]))
      if s is not None and len(s.spec) == len(leaf.shape):
        return s
    return default
  return jax.tree_util.tree_map_with_path(pick, tree)


def state_initializers(cfg: JanusFlowConfig, optimizer, layout: StateLayout):
  """Jitted, sharded makers: `(seed) -> params` (random, unboxed) and `(seed, params) -> step-0
  state` around any params. The state's RNG is fold_in(key(seed), 1)."""
  def params(seed):
    return nn.meta.unbox(init_params_boxed(cfg, jax.random.key(seed)))

  def state(seed, p):
    return new_state(p, optimizer, jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1)))
  return (jax.jit(params, out_shardings=layout.param_shardings),
          jax.jit(state, in_shardings=(None, layout.param_shardings), out_shardings=layout.shardings))


def init_state(cfg: JanusFlowConfig, optimizer, layout: StateLayout, seed: int, params: dict | None = None):
  """A sharded step-0 state: random params from `seed`, or the given `params`."""
  make_params, make_state = state_initializers(cfg, optimizer, layout)
  return make_state(seed, make_params(seed) if params is None else params)
