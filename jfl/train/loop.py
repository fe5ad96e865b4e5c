"""`train(config, workdir)`: the training loop behind `jfl-train`.

Order of start-up: mesh and rules -> parameter labels and optimizer -> state layout -> data iterator
-> restore (newest readable checkpoint in `workdir/checkpoints`, data iterator included) or
initialise (`config.init_from` converted weights, else random) -> AOT-compile the step (printing
its memory analysis, so an OOM shows before any data is read) -> loop.

Each step's metrics are fetched one step late (the device stays one step ahead). A non-finite loss
skips the update (in the step) and `train.max_bad_steps` of them in a row stop the run. SIGTERM
(or a multi-host preemption notice) saves a checkpoint and returns. The workdir gets
`checkpoints/`, `tb/` (TensorBoard), `eval/` (samples) and, at the end, `export/` (EMA weights in
the jfl-convert layout).
"""

import json
import logging
import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jfl import batch as batch_lib, checkpoint as converted, sharding
from jfl.config_utils import split_list
from jfl.models.config import JanusFlowConfig
from jfl.train import checkpoint as ckpt_lib, evaluate, losses, metrics as metrics_lib, optim, state as state_lib
from jfl.train import step as step_lib

log = logging.getLogger("jfl.train")


def model_config(config) -> JanusFlowConfig:
  return JanusFlowConfig.from_dict(config.model.to_dict())


def loss_settings(config) -> losses.LossSettings:
  return losses.LossSettings(**config.loss.to_dict())


def make_data_iterator(config, start_step: int = 0):
  """`config.data.source`: "synthetic" (jfl.data.synthetic) or the Grain pipeline (jfl.data.pipeline)."""
  pi, pc = jax.process_index(), jax.process_count()
  if config.data.source == "synthetic":
    from jfl.data import synthetic  # pylint: disable=g-import-not-at-top
    return synthetic.make_iterator(config, pi, pc)
  from jfl import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  from jfl.data import pipeline  # pylint: disable=g-import-not-at-top
  if not config.data.tokenizer:
    raise ValueError("data.tokenizer: the Grain pipeline needs a tokenizer directory (--config.data.tokenizer=DIR)")
  return pipeline.make_train_iterator(config, tok_lib.load_tokenizer(config.data.tokenizer), pi, pc,
                                      start_step=start_step)


class Setup:
  """Everything the loop needs besides the state: mesh, modules, optimizer, shardings."""

  def __init__(self, config):
    self.config = config
    self.cfg = model_config(config)
    self.mesh = sharding.make_mesh(config.mesh)
    self.rules = sharding.rules(config.sharding)
    div = sharding.batch_divisor(self.mesh, self.rules) * config.train.accum_steps
    if config.data.batch_size % div:
      raise ValueError(f"data.batch_size {config.data.batch_size} must be a multiple of {div} (batch shards x "
                       f"train.accum_steps) on mesh {dict(self.mesh.shape)}")
    dtype, vae_dtype = jnp.dtype(config.compute_dtype), jnp.dtype(config.vae_dtype)
    self.model, self.projector, self.vae = state_lib.build_modules(self.cfg, dtype, config.remat_policy, vae_dtype)
    abstract = nn.meta.unbox(jax.eval_shape(lambda: state_lib.init_params_boxed(self.cfg, jax.random.key(0))))
    self.flops = metrics_lib.step_flops(self.cfg, self.step_shape(), abstract["model"])["total"]
    self.labels = optim.param_labels(abstract, tuple(split_list(config.optim.frozen)))
    self.optimizer = optim.make_optimizer(config.optim, self.labels)
    self.layout = state_lib.state_layout(self.cfg, self.optimizer, self.mesh, self.rules)
    x = jax.ShapeDtypeStruct((1, self.cfg.image_size, self.cfg.image_size, 3), jnp.float32)
    vae_boxed = jax.eval_shape(lambda x: self.vae.init(jax.random.key(0), x), x).get("params", {})
    self.vae_shardings = sharding.logical_shardings(vae_boxed, self.mesh, self.rules)
    self.settings = step_lib.StepSettings(
        mods=losses.Modules(self.model, self.projector, self.vae, self.cfg), loss=loss_settings(config),
        optimizer=self.optimizer, labels=self.labels, schedule=optim.schedule(config.optim),
        ema_decay=float(config.train.ema_decay), accum_steps=int(config.train.accum_steps))
    self.init_params, self.init_given = state_lib.state_initializers(self.cfg, self.optimizer, self.layout)
    self._compiled = {}

  def init_random(self, seed: int):
    """A sharded step-0 state with random params."""
    return self.init_given(seed, self.init_params(seed))

  def batch_shardings(self, batch: dict) -> dict:
    return sharding.batch_shardings(batch, self.mesh, self.rules)

  def compile_step(self, host_batch: dict, vae_params):
    """(AOT-compiled step, batch shardings) for batches like `host_batch`; memoised, so repeated
    `train()` calls in one process (tests, notebooks) compile once. Logs the memory analysis."""
    key = (tuple((k, np.shape(v), str(np.asarray(v).dtype)) for k, v in sorted(host_batch.items())), bool(vae_params))
    if key not in self._compiled:
      batch_sh = self.batch_shardings(host_batch)
      shapes = {k: jax.ShapeDtypeStruct((self.config.data.batch_size, *np.shape(v)[1:]), np.asarray(v).dtype,
                                        sharding=batch_sh[k]) for k, v in host_batch.items()}
      vae_sh = self.vae_shardings if vae_params else jax.tree.map(lambda _: None, vae_params)
      step_fn = step_lib.jit_train_step(self.settings, self.layout.shardings, batch_sh, vae_sh, self.mesh)
      t0 = time.time()
      compiled = step_fn.lower(sharding.abstract_with_shardings(self.layout.abstract, self.layout.shardings),
                               shapes, vae_params).compile()
      log.info("step compiled in %.1fs; memory: %s", time.time() - t0, compiled.memory_analysis())
      self._compiled[key] = (compiled, batch_sh)
    return self._compiled[key]

  def step_shape(self) -> metrics_lib.StepShape:
    """What the analytic FLOP count needs to know about this config's step."""
    from jfl.data import pipeline  # pylint: disable=g-import-not-at-top
    c, frozen = self.config, tuple(split_list(self.config.optim.frozen))
    nu, ng = pipeline.image_slots(c)
    return metrics_lib.StepShape(
        batch_size=c.data.batch_size, seq_len=c.data.seq_len, num_und=nu, num_gen=ng,
        llm_trains="model/llm" not in frozen and "model" not in frozen,
        siglip_trains="model/siglip" not in frozen and "model" not in frozen,
        vae_in_step=not c.data.cached_latents, repa_target_in_step=not (c.data.cached_latents and c.data.cached_repa))


_SETUPS: dict[str, Setup] = {}


def get_setup(config) -> Setup:
  """The `Setup` of `config`, reused by later calls whose config agrees on everything the step and
  its shardings depend on (the last few are kept)."""
  fields = ("model", "compute_dtype", "vae_dtype", "remat_policy", "mesh", "sharding", "optim", "loss", "data")
  key = json.dumps([config[f].to_dict() if hasattr(config[f], "to_dict") else config[f] for f in fields]
                   + [config.train.accum_steps, config.train.ema_decay], sort_keys=True, default=str)
  if key not in _SETUPS:
    while len(_SETUPS) >= 4:
      _SETUPS.pop(next(iter(_SETUPS)))
    _SETUPS[key] = Setup(config)
  return _SETUPS[key]

def initial_params(setup: Setup, config):
  """(params {"model", "repa"} from `config.init_from` with the `init_reinit` parts random, placed
  with the state's shardings; the checkpoint's VAE params on the host or None), or (None, None)."""
  if not config.init_from:
    return None, None
  if not converted.is_converted(config.init_from):
    raise ValueError(f"init_from {config.init_from}: not a jfl-convert directory (no {converted.CONFIG_FILE})")
  ckpt_cfg, model_params, vae_params = converted.load_converted(config.init_from)
  if ckpt_cfg.llm != setup.cfg.llm or ckpt_cfg.siglip != setup.cfg.siglip or ckpt_cfg.gen != setup.cfg.gen:
    raise ValueError(f"init_from {config.init_from}: its architecture differs from config.model")
  loaded = {"model": model_params, "repa": ckpt_lib.load_repa(config.init_from)}
  reinit = tuple(split_list(config.init_reinit))
  # Random values only where needed (re-initialised parts, a missing REPA projector).
  random = setup.init_params(config.seed) if reinit or loaded["repa"] is None else None
  shapes = setup.layout.abstract.params
  if reinit:
    optim.param_labels(shapes, reinit)  # ValueError for a prefix that matches nothing

  def pick(path, shape, sh):
    p = optim.path_str(path)
    if any(optim.matches_prefix(p, f) for f in reinit) or (p.startswith("repa/") and loaded["repa"] is None):
      return _leaf(random, path)
    node = loaded
    for k in p.split("/"):
      if not isinstance(node, dict) or k not in node:
        raise ValueError(f"init_from {config.init_from}: no parameter {p}")
      node = node[k]
    if np.shape(node) != shape.shape:
      raise ValueError(f"init_from {config.init_from}: {p} has shape {np.shape(node)}, the model needs {shape.shape}")
    return ckpt_lib.place(np.asarray(node, np.float32), sh)
  return jax.tree_util.tree_map_with_path(pick, shapes, setup.layout.param_shardings), vae_params


def _leaf(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


def make_vae_params(setup: Setup, config, loaded=None):
  """The frozen VAE: from init_from, else random; {} when nothing needs it (cached latents, no eval)."""
  if loaded is not None:
    return ckpt_lib.place(loaded, setup.vae_shardings)
  if config.data.cached_latents and not config.eval.every:
    return {}
  x = jnp.zeros((1, setup.cfg.image_size, setup.cfg.image_size, 3), jnp.float32)
  init = lambda: setup.vae.init(jax.random.key(config.seed + 7), x).get("params", {})
  return jax.jit(lambda: nn.meta.unbox(init()), out_shardings=setup.vae_shardings)()


class _Stop:
  """SIGTERM -> a flag the loop polls (installed in the main thread only)."""

  def __init__(self):
    self.requested = False
    self.previous = None

  def __enter__(self):
    try:
      self.previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self.previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    log.warning("SIGTERM: saving a checkpoint and stopping")
    self.requested = True

  def __exit__(self, *exc):
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


def _setup_logging():
  if not log.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s jfl-train %(levelname)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def train(config, workdir: str, step_callback=None, eval_fn=None) -> dict:
  """Trains `config` in `workdir` (resuming from its newest checkpoint).

  Args:
    config: a training ConfigDict (configs/common.py).
    workdir: output directory.
    step_callback: optional `f(step, metrics)` called on the host after each step's metrics arrive.
    eval_fn: optional `f(step, model_params, vae_params)` run every `config.eval.every` steps with the
      EMA weights (default: `jfl.train.evaluate.Evaluator`'s samples and answers under workdir/eval).
  Returns:
    {"state": final TrainState, "history": {step: metrics dict}, "status": "done" | "preempted" |
     "diverged"}.
  """
  if config.jax_cache_dir:
    jax.config.update("jax_compilation_cache_dir", config.jax_cache_dir)
  _setup_logging()
  os.makedirs(workdir, exist_ok=True)
  setup = get_setup(config)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint.every,
                               config.checkpoint.keep, config.checkpoint.async_save)
  writer = metrics_lib.Writer(workdir, config.train.num_steps)
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    try:
      eval_fn = eval_fn or _default_eval(setup, config, workdir)
      return _run(setup, config, workdir, ckpt, writer, step_callback, eval_fn)
    finally:
      ckpt.close()
      writer.close()


def _start(setup: Setup, config, ckpt):
  """(state, vae_params, data iterator): restored from the workdir, or freshly initialised."""
  abstract = sharding.abstract_with_shardings(setup.layout.abstract, setup.layout.shardings)
  data_iter = make_data_iterator(config)
  restored = ckpt.restore(abstract, data_iter)
  if restored is not None:
    log.info("resumed from step %d", restored[1])
    vae = ckpt_lib.load_vae(config.init_from) if config.init_from else None
    return restored[0], make_vae_params(setup, config, vae), data_iter
  params, vae = initial_params(setup, config)
  state = setup.init_random(config.seed) if params is None else setup.init_given(config.seed, params)
  log.info("initialised %s", f"from {config.init_from}" if params is not None else "randomly")
  return state, make_vae_params(setup, config, vae), data_iter


def _run(setup: Setup, config, workdir, ckpt, writer, step_callback, eval_fn) -> dict:
  state, vae_params, data_iter = _start(setup, config, ckpt)
  start, total = int(jax.device_get(state.step)), int(config.train.num_steps)
  if start >= total:
    return {"state": state, "history": {}, "status": "done"}
  host_batch = next(data_iter)
  batch_lib.check_batch(host_batch, setup.cfg.num_image_tokens)
  shapes = {k: np.shape(v) for k, v in host_batch.items()}
  compiled, batch_sh = setup.compile_step(host_batch, vae_params)
  log_step = _Logger(config, writer, step_callback, setup.flops,
                     metrics_lib.peak_flops() * jax.device_count(), start)
  status, pending = "done", None
  with _Stop() as stop:
    for step in range(start, total):
      if step > start:
        host_batch = next(data_iter)
        bad = [k for k, v in shapes.items() if np.shape(host_batch.get(k)) != v]
        if bad:
          got = np.shape(host_batch.get(bad[0]))
          raise ValueError(f"batch key {bad[0]}: shape {got}, the first batch had {shapes[bad[0]]}")
      state, m = compiled(state, sharding.to_global(host_batch, batch_sh), vae_params)
      status = log_step(*pending) if pending else status    # the previous step's metrics: one step late
      pending = (step + 1, m)
      if status != "done":
        break
      if config.eval.every and (step + 1) % config.eval.every == 0:
        eval_fn(step + 1, state.ema_params["model"], vae_params)
      ckpt.save(step + 1, state, data_iter)
      if stop.requested or ckpt.reached_preemption(step + 1):
        status = "preempted"
        break
  if status != "diverged":
    last = log_step(*pending)
    status = last if last == "diverged" else status
  if status != "diverged":
    ckpt.save(int(jax.device_get(state.step)), state, data_iter, force=True)
  ckpt.wait()
  if status == "done" and config.export_at_end:
    ckpt_lib.export(os.path.join(workdir, "export"), setup.cfg, state.ema_params, vae_params)
  return {"state": state, "history": log_step.history, "status": status}


class _Logger:
  """Host side of a finished step: history, logs, callback, divergence check."""

  def __init__(self, config, writer, callback, flops: float, peak: float, start: int):
    self.config, self.writer, self.callback = config, writer, callback
    self.flops, self.peak = flops, peak
    self.history = {}
    self.last = self.last_log = time.time()
    self.last_log_step = start

  def __call__(self, step: int, m) -> str:
    """Returns "done" or "diverged" (`train.max_bad_steps` non-finite losses in a row)."""
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    now = time.time()
    dt, self.last = now - self.last, now
    m.update(step_time=dt, tokens_per_s=m["tokens"] / max(dt, 1e-9), mfu=self.flops / max(dt, 1e-9) / self.peak)
    self.history[step] = m
    if step % self.config.train.log_every == 0 or step == self.config.train.num_steps:
      # Rates over the whole interval since the last log line (single steps overlap on the device).
      avg = (now - self.last_log) / max(step - self.last_log_step, 1)
      self.last_log, self.last_log_step = now, step
      shown = dict(m, step_time=avg, tokens_per_s=m["tokens"] / avg, mfu=self.flops / avg / self.peak)
      self.writer.scalars(step, shown)
      self.writer.progress(step, shown)
    if self.callback is not None:
      self.callback(step, m)
    if m["bad_steps"] >= self.config.train.max_bad_steps:
      log.error("%d non-finite losses in a row (step %d): stopping", int(m["bad_steps"]), step)
      return "diverged"
    return "done"


def _default_eval(setup: Setup, config, workdir) -> evaluate.Evaluator:
  tok = None
  if config.eval.every and config.data.tokenizer:
    from jfl import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
    tok = tok_lib.load_tokenizer(config.data.tokenizer)
  return evaluate.Evaluator(config, setup.cfg, tok, os.path.join(workdir, "eval"))
