"""The train step on the tiny model: losses fall, freezing, EMA, REPA stop-gradient, packing, NaN skips."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import stage1_adapt, stage2_pretrain, stage3_sft
from jfl import batch as batch_lib, sharding
from jfl.data import synthetic
from jfl.models.config import JanusFlowConfig
from jfl.train import losses, optim, state as state_lib, step as step_lib

CFG = JanusFlowConfig.tiny()
SETTINGS = losses.LossSettings(ce_chunk=64)  # REPA tap: the tiny model's repa.layer (1)
# Adam eps 1e-6: updates stay continuous in the gradient, so float32 reduction-order noise in
# near-zero gradients cannot flip a full-size update (the sharded-vs-single-device comparison).
OPTIM = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=0, b1=0.9, b2=0.95, eps=1e-6, weight_decay=0.0,
                                       clip_norm=1.0))


@pytest.fixture(scope="module", autouse=True)
def fast_compile(tmp_path_factory):
  """Cheaper XLA compiles, and a compilation cache shared by this session's train tests (the same
  programs are compiled again by later tests and by every `train()` call)."""
  new = {"jax_disable_most_optimizations": True, "jax_persistent_cache_min_compile_time_secs": 0,
         "jax_compilation_cache_dir": str(tmp_path_factory.getbasetemp() / "jfl_xla_cache")}
  old = {k: jax.config.read(k) if k == "jax_disable_most_optimizations" else getattr(jax.config, k) for k in new}
  for k, v in new.items():
    jax.config.update(k, v)
  yield
  for k, v in old.items():
    jax.config.update(k, v)


def _modules():
  model, projector, vae = state_lib.build_modules(CFG)
  return losses.Modules(model, projector, vae, CFG)


def _abstract_params():
  return nn.meta.unbox(jax.eval_shape(lambda: state_lib.init_params_boxed(CFG, jax.random.key(0))))


def _random_like(tree, seed):
  """Host random values for every leaf (N(0, 0.05); norm scales around 1): cheaper than compiling
  the model's initializers, which these tests do not depend on."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: ((1.0 if optim.path_str(p).endswith("norm/scale") else 0.0)
                    + rng.normal(0, 0.05, x.shape)).astype(np.float32), tree)


@functools.lru_cache(maxsize=None)
def _params():
  """Host random params of the tiny model ({"model", "repa"}) and its VAE."""
  vae = _modules().vae
  vae_shapes = jax.eval_shape(lambda: nn.meta.unbox(vae.init(jax.random.key(2), jnp.zeros((1, 32, 32, 3)))["params"]))
  return _random_like(_abstract_params(), 0), _random_like(vae_shapes, 1)


def _batch(rows=8, seq=192, seed=0):
  return synthetic.synthetic_rows(CFG, range(rows), seq, seed=seed, index=0)


def _leaves(tree, prefix):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {optim.path_str(p): np.asarray(v) for p, v in flat if optim.path_str(p).startswith(prefix)}


def make_runner(mesh_shape=(1, 1, 1), rules="fsdp_tp", batch=None, accum_steps=1):
  """(jitted stage-2 step (SigLIP frozen) on a (data, fsdp, tensor) mesh, fresh-state factory, VAE
  params, mesh, rules) for the tiny model; the step is `jit_train_step` with NamedShardings."""
  mesh_cfg = ml_collections.ConfigDict(dict(zip(sharding.AXES, mesh_shape)))
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:int(np.prod(mesh_shape))])
  rule_set = sharding.rules(rules)
  mods = _modules()
  labels = optim.param_labels(_abstract_params(), ("model/siglip",))
  opt = optim.make_optimizer(OPTIM, labels)
  st = step_lib.StepSettings(mods=mods, loss=SETTINGS, optimizer=opt, labels=labels, schedule=optim.schedule(OPTIM),
                             accum_steps=accum_steps)
  layout = state_lib.state_layout(CFG, opt, mesh, rule_set)
  params, vae_params = _params()
  vae_boxed = jax.eval_shape(lambda: mods.vae.init(jax.random.key(2), jnp.zeros((1, 32, 32, 3)))["params"])
  vae_sh = sharding.logical_shardings(vae_boxed, mesh, rule_set)
  batch_sh = sharding.batch_shardings(batch if batch is not None else _batch(), mesh, rule_set)
  fn = step_lib.jit_train_step(st, layout.shardings, batch_sh, vae_sh, mesh)

  def fresh():
    return state_lib.init_state(CFG, opt, layout, 1, params)

  def run(state, b):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rule_set):
      return fn(state, sharding.to_global(b, batch_sh), jax.device_put(vae_params, vae_sh))
  return run, fresh, layout


@pytest.fixture(scope="module")
def runner():
  run, fresh, _ = make_runner()
  return run, fresh


def test_synthetic_batch_is_a_valid_packed_batch():
  b = _batch()
  batch_lib.check_batch(b, CFG.num_image_tokens)
  assert set(np.unique(b["task"])) == {0, 1, 2, 3}
  # Targets are next tokens within a segment; the loss never predicts across a segment boundary.
  seg = b["segment_ids"]
  same_next = np.concatenate([seg[:, 1:] == seg[:, :-1], np.zeros((seg.shape[0], 1), bool)], 1)
  assert np.all(b["loss_mask"][~same_next] == 0)
  np.testing.assert_array_equal(b["targets"][:, :-1][same_next[:, :-1]], b["tokens"][:, 1:][same_next[:, :-1]])
  # Prompt slots mark the prompt tokens of generation examples only.
  assert np.all(b["task"][b["gen_prompt_slot"] >= 0] == batch_lib.TASK_GEN)


def test_losses_decrease_frozen_stay_and_ema_follows_formula(runner):
  fn, fresh = runner
  state = fresh()
  batch = _batch()
  siglip0 = _leaves(state.params, "model/siglip")
  hist = []
  for i in range(20):
    if i == 19:
      before = jax.device_get(state)
    state, m = fn(state, batch)
    hist.append(jax.device_get(m))
  first = {k: hist[0][k] for k in ("ar_loss", "rf_loss", "repa_loss")}
  last = {k: np.mean([h[k] for h in hist[-5:]]) for k in first}
  assert last["ar_loss"] < first["ar_loss"] - 0.5, (first, last)
  assert last["rf_loss"] < first["rf_loss"] - 0.05, (first, last)
  assert last["repa_loss"] < first["repa_loss"] - 0.02, (first, last)
  assert all(h["skipped"] == 0 for h in hist) and int(state.step) == 20
  # Frozen SigLIP is bit-identical; trainable groups moved.
  for k, v in _leaves(state.params, "model/siglip").items():
    np.testing.assert_array_equal(v, siglip0[k], err_msg=k)
  after = jax.device_get(state)
  for group in ("model/llm", "model/gen_enc", "model/gen_dec", "model/und_aligner", "repa"):
    changed = [not np.array_equal(a, _leaves(before.params, group)[k]) for k, a in _leaves(after.params, group).items()]
    assert all(changed), group
  # EMA: ema' = 0.99 ema + 0.01 params' on trainable leaves; frozen EMA stays equal to the params.
  labels = optim.param_labels(after.params, ("model/siglip",))
  for (path, e0), e1, p1, lab in zip(jax.tree_util.tree_flatten_with_path(before.ema_params)[0],
                                     jax.tree.leaves(after.ema_params), jax.tree.leaves(after.params),
                                     jax.tree.leaves(labels)):
    want = p1 if lab == optim.FROZEN else 0.99 * e0 + 0.01 * p1
    np.testing.assert_allclose(e1, want, rtol=1e-6, atol=1e-8, err_msg=optim.path_str(path))
  assert not np.allclose(jax.tree.leaves(after.ema_params)[-1], jax.tree.leaves(after.params)[-1])


def test_nonfinite_loss_skips_the_update(runner):
  fn, fresh = runner
  state = fresh()
  good = _batch()
  bad = dict(good, und_images=np.full_like(good["und_images"], np.nan))
  before = jax.device_get(state)
  state, m = fn(state, bad)
  assert m["skipped"] == 1 and m["bad_steps"] == 1 and not np.isfinite(m["loss"])
  after = jax.device_get(state)
  assert int(after.step) == 1 and int(after.skipped) == 1
  for a, b in zip(jax.tree.leaves((before.params, before.ema_params, before.opt_state)),
                  jax.tree.leaves((after.params, after.ema_params, after.opt_state))):
    np.testing.assert_array_equal(a, b)
  state, m = fn(state, good)
  assert m["skipped"] == 0 and m["bad_steps"] == 0 and int(state.skipped) == 1


@pytest.mark.parametrize("module", [stage1_adapt, stage2_pretrain, stage3_sft])
def test_stage_configs_freeze_their_parameters(module):
  config = module.get_config()
  abstract = _abstract_params()
  frozen = tuple(s for s in config.optim.frozen.split(";") if s)
  labels = optim.param_labels(abstract, frozen)
  trainable = {p.split("/")[0] + "/" + p.split("/")[1] for p, l in
               ((optim.path_str(k), v) for k, v in jax.tree_util.tree_flatten_with_path(labels)[0])
               if l == optim.TRAIN}
  stage1 = {"model/und_aligner", "model/gen_enc_aligner", "model/gen_dec_aligner", "model/gen_dec_aligner_norm",
            "model/beg_of_und_embed", "model/gen_enc", "model/gen_dec"}
  repa = {p for p in trainable if p.startswith("repa/")}
  assert repa  # the projector always trains
  want = {stage1_adapt: stage1, stage2_pretrain: stage1 | {"model/llm"},
          stage3_sft: stage1 | {"model/llm", "model/siglip"}}[module]
  assert trainable - repa == want
  # The optimizer keeps no state for frozen leaves and leaves them bit-identical.
  oc = ml_collections.ConfigDict(config.optim.to_dict())
  oc.warmup_steps = 0  # a nonzero first update
  opt = optim.make_optimizer(oc, labels)
  params = jax.tree.map(lambda x: np.full(x.shape, 0.5, x.dtype), abstract)

  @jax.jit
  def one_update(p):
    opt_state = opt.init(p)
    upd, _ = opt.update(jax.tree.map(jnp.ones_like, p), opt_state, p)
    return opt_state, optim.apply_updates(p, upd, labels)

  opt_state, new = one_update(params)
  n_state = sum(x.size for x in jax.tree.leaves(opt_state))
  n_train = sum(x.size for x, l in zip(jax.tree.leaves(abstract), jax.tree.leaves(labels)) if l == optim.TRAIN)
  assert n_state == 2 * n_train + 2  # Adam mu + nu of trainable leaves, two step counters
  for p, n, l in zip(jax.tree.leaves(params), jax.tree.leaves(new), jax.tree.leaves(labels)):
    assert np.array_equal(p, n) == (l == optim.FROZEN)


def test_repa_gradient_does_not_reach_siglip():
  """With SigLIP trainable (stage 3), neither REPA (whose target is SigLIP's output) nor RF moves it."""
  mods = _modules()
  params, vae_params = _params()
  batch = jax.device_put(_batch(rows=2))

  def gen_losses(p):
    sums, _ = losses.compute_losses(mods, p, vae_params, batch, jax.random.key(0), SETTINGS)
    return sums["repa"] + sums["rf"]

  grads = jax.jit(jax.grad(gen_losses))(params)
  norm = lambda tree: float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))
  assert norm(grads["model"]["siglip"]) == 0.0
  assert norm(grads["model"]["llm"]) > 0 and norm(grads["repa"]) > 0 and norm(grads["model"]["gen_enc"]) > 0


def _unpack(row: dict) -> dict:
  """One packed row -> one row per segment, each example alone at the start of its row."""
  segs = [s for s in np.unique(row["segment_ids"][0]) if s]
  out = {k: np.zeros((len(segs), *v.shape[1:]), v.dtype) for k, v in row.items()}
  out["gen_prompt_slot"][:] = -1
  for i, s in enumerate(segs):
    idx = np.nonzero(row["segment_ids"][0] == s)[0]
    n = len(idx)
    for k in ("tokens", "positions", "targets", "loss_mask", "task", "und_slot_mask", "gen_slot_mask"):
      out[k][i, :n] = row[k][0, idx]
    out["segment_ids"][i, :n] = 1
    out["gen_prompt_slot"][i, :n] = np.where(row["gen_prompt_slot"][0, idx] >= 0, 0, -1)
    for kind in ("und", "gen"):
      if row[f"{kind}_slot_mask"][0, idx].any():
        k = int(row[f"{kind}_slot_mask"][0, :idx[0]].sum()) // (CFG.num_image_tokens + 1)
        out[f"{kind}_images"][i, 0] = row[f"{kind}_images"][0, k]
        out[f"{kind}_valid"][i, 0] = True
  return out


def test_packed_sequence_equals_examples_run_separately():
  mods = _modules()
  params, vae_params = _params()
  row = synthetic.synthetic_rows(CFG, range(1), 200, seed=3, index=0, mix=(1, 1, 1))
  sep = _unpack(row)
  n = sep["tokens"].shape[0]
  assert n >= 3 and set(sep["task"][:, 0]) == {1, 2, 3}
  packed = {k: np.concatenate([v, np.full((n - 1, *v.shape[1:]), -1 if k == "gen_prompt_slot" else 0, v.dtype)])
            for k, v in row.items()}
  gen_row = int(np.nonzero(sep["gen_valid"][:, 0])[0][0])
  noise = np.random.default_rng(0).normal(size=(CFG.latent_size, CFG.latent_size, 4)).astype(np.float32)
  z_packed, z_sep = np.zeros((n, 1, *noise.shape), np.float32), np.zeros((n, 1, *noise.shape), np.float32)
  z_packed[0, 0], z_sep[gen_row, 0] = noise, noise
  t = np.full((n, 1), 0.3, np.float32)

  @jax.jit
  def per_example(b, z, drop):
    _, per = losses.compute_losses(mods, params, vae_params, b, jax.random.key(0), SETTINGS, noise=z, t=t, drop=drop)
    return per

  for dropped in (False, True):
    drop = np.full((n, 1), dropped)
    pp, ps = per_example(packed, z_packed, drop), per_example(sep, z_sep, drop)
    for i in range(n):
      seg = packed["segment_ids"][0] == i + 1
      want = np.sum(np.asarray(ps["nll"])[i] * sep["loss_mask"][i])
      got = np.sum(np.asarray(pp["nll"])[0][seg] * packed["loss_mask"][0][seg])
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pp["rf"][0, 0], ps["rf"][gen_row, 0], rtol=1e-5)
    np.testing.assert_allclose(pp["repa"][0, 0], ps["repa"][gen_row, 0], rtol=1e-5, atol=1e-6)
    if not dropped:
      rf_cond = float(ps["rf"][gen_row, 0])
  assert abs(float(ps["rf"][gen_row, 0]) - rf_cond) > 1e-6  # dropping the prompt changes the prediction


def test_total_loss_weights_each_term():
  sums = {"ar_und": 3.0, "ar_text": 1.0, "rf": 3.0, "repa": -1.0}
  denom = {"ar": 4.0, "gen": 2.0}
  for ar_w, repa_w in ((1.0, 1.0), (0.1, 1.0), (1.0, 0.0)):
    got = losses.total_loss(sums, denom, losses.LossSettings(ar_weight=ar_w, repa_weight=repa_w))
    np.testing.assert_allclose(got, ar_w * 4.0 / 4.0 + (3.0 - repa_w) / 2.0, rtol=1e-6)
