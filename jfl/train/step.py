"""The pure train step and its jitted, sharded, state-donating form.

`train_step(state, batch, vae_params) -> (state, metrics)`:
  1. RNG of this step = fold_in(state.rng, state.step); the noise, flow times and CFG drops of
     the whole batch are drawn from it before the batch is split into micro-batches.
  2. Gradient of `total_loss` w.r.t. the trainable params (frozen leaves are stop-gradient'ed, so
     no backward pass runs through parameters that do not train), accumulated over
     `accum_steps` micro-batches with a `lax.scan`; denominators and random draws come from the
     whole batch, so accumulation gives the same gradient as one big batch.
  3. AdamW update (frozen leaves untouched), EMA update, step += 1.
  4. A non-finite loss or gradient norm skips 3 (params, optimizer state and EMA stay as they were)
     and counts it in `bad_steps` (consecutive) and `skipped` (total).
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jfl.train import losses, optim
from jfl.train.state import TrainState

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """Everything static the step closes over."""
  mods: losses.Modules
  loss: losses.LossSettings
  optimizer: Any             # optax.GradientTransformation
  labels: Any                # tree of optim.TRAIN / FROZEN like state.params
  schedule: Any              # step -> learning rate (for logging)
  ema_decay: float = 0.99
  accum_steps: int = 1


def _freeze(params, labels):
  return jax.tree.map(lambda p, l: jax.lax.stop_gradient(p) if l == optim.FROZEN else p, params, labels)


def _micro_batches(batch: dict, n: int) -> dict:
  """[B, ...] -> [n, B/n, ...]; row r goes to micro-batch r % n, so each micro-batch keeps the
  batch's row sharding (a contiguous split would put whole micro-batches on few devices)."""
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into accum_steps={n} micro-batches")
    return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def grads_and_sums(st: StepSettings, params, vae_params, batch: dict, key: Array):
  """(grads like params, summed loss sums) over `st.accum_steps` micro-batches."""
  denom = losses.counts(batch)
  rand = losses.draw(key, batch, st.mods.config, st.loss)

  def loss_fn(p, mb, r, k):  # k only seeds VAE posterior sampling (loss.vae_sample)
    sums, _ = losses.compute_losses(st.mods, _freeze(p, st.labels), vae_params, mb, k, st.loss, **r)
    return losses.total_loss(sums, denom, st.loss), sums

  grad_fn = jax.grad(loss_fn, has_aux=True)
  if st.accum_steps == 1:
    return grad_fn(params, batch, rand, key)

  def body(acc, xs):
    mb, r, i = xs
    g, sums = grad_fn(params, mb, r, jax.random.fold_in(key, i))
    return jax.tree.map(jnp.add, acc, (g, sums)), None

  micro = (*_micro_batches((batch, rand), st.accum_steps), jnp.arange(st.accum_steps))
  _, sums_shape = jax.eval_shape(grad_fn, params, *jax.tree.map(lambda x: x[0], micro[:2]), key)
  zeros = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), sums_shape))
  (grads, sums), _ = jax.lax.scan(body, zeros, micro)
  return grads, sums


def train_step(st: StepSettings, state: TrainState, batch: dict, vae_params) -> tuple[TrainState, dict]:
  """One optimizer step; see the module docstring. Metrics are float32 scalars."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  grads, sums = grads_and_sums(st, state.params, vae_params, batch, key)
  loss = losses.total_loss(sums, losses.counts(batch), st.loss)
  grad_norm = optax.tree.norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  updates, opt_state = st.optimizer.update(grads, state.opt_state, state.params)
  params = optim.apply_updates(state.params, updates, st.labels)
  ema = optim.ema_update(state.ema_params, params, st.labels, st.ema_decay)
  # A non-finite step keeps the old values (fused into the elementwise updates; frozen leaves are
  # passed through untouched, so their donated buffers are reused as they are).
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
  keep_params = lambda new, old: jax.tree.map(lambda a, b, l: b if l == optim.FROZEN else jnp.where(ok, a, b),
                                              new, old, st.labels)
  bad = jnp.where(ok, 0, state.bad_steps + 1)
  new_state = TrainState(
      step=state.step + 1, params=keep_params(params, state.params), opt_state=keep(opt_state, state.opt_state),
      ema_params=keep_params(ema, state.ema_params), rng=state.rng, bad_steps=bad,
      skipped=state.skipped + (~ok).astype(jnp.int32))
  metrics = {"loss": loss, "grad_norm": grad_norm, "lr": st.schedule(state.step),
             "skipped": (~ok).astype(jnp.float32), "bad_steps": bad.astype(jnp.float32), **losses.summarize(sums)}
  return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)


def jit_train_step(st: StepSettings, state_shardings, batch_shardings, vae_shardings, mesh):
  """`train_step` jitted with NamedSharding in/out shardings and the state donated."""
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(functools.partial(train_step, st), in_shardings=(state_shardings, batch_shardings, vae_shardings),
                 out_shardings=(state_shardings, rep), donate_argnums=(0,))
