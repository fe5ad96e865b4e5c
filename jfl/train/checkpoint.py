"""Training checkpoints (Orbax CheckpointManager) and the end-of-training export.

A checkpoint `workdir/checkpoints/<step>/` holds two items: `state` (the whole TrainState: params,
optimizer state, EMA, step, RNG, skip counters; sharded OCDBT, restored directly into the target
shardings) and `data_iter` (the Grain iterator state, one JSON file per process). Saves are
asynchronous; the last `keep` are kept. A checkpoint that fails to restore is skipped with a
warning and the previous one is tried.
"""

import logging
import os
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jfl import checkpoint as converted

log = logging.getLogger("jfl.train")
REPA_DIR = "repa_params"


def _registry():
  """Orbax type handlers for the state. Replica-parallel array saving (Orbax's default off GPU) is
  turned off except on TPU: it slices every replicated array eagerly per replica, which costs
  more than it saves on GPUs and (simulated) CPU devices."""
  th = ocp.type_handlers
  array = th.ArrayHandler(use_replica_parallel=jax.devices()[0].platform == "tpu")
  return th.create_type_handler_registry((int, th.ScalarHandler()), (float, th.ScalarHandler()),
                                         (np.number, th.ScalarHandler()), (np.ndarray, th.NumpyHandler()),
                                         (jax.Array, array))


class Checkpointer:
  """Save/restore of (TrainState, data iterator) pairs under `directory`."""

  def __init__(self, directory: str, every: int, keep: int, async_save: bool = True):
    if every <= 0 or keep <= 0:
      raise ValueError(f"checkpoint.every and checkpoint.keep must be positive, got {every} and {keep}")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=True,
                                           enable_async_checkpointing=async_save)
    handlers = {"state": ocp.PyTreeCheckpointHandler(type_handler_registry=_registry()),
                "data_iter": grain.checkpoint.CheckpointHandler()}
    self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)
    self.last_saved = None

  def save(self, step: int, state, data_iter, force: bool = False) -> bool:
    """Saves when the interval policy (or `force`) says so; returns whether a save started."""
    if step == self.last_saved:
      return False
    args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), data_iter=grain.checkpoint.CheckpointSave(data_iter))
    saved = self.manager.save(step, args=args, force=force)
    if saved:
      self.last_saved = step
    return saved

  def restore(self, abstract_state, data_iter):
    """(state, step) of the newest readable checkpoint (data_iter restored in place), or None.

    Unreadable checkpoints are renamed to `<step>.unreadable-<time>` (kept for inspection, out of
    the way of the next save of that step) after a warning.
    """
    bad, found = [], None
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state_args = ocp.args.PyTreeRestore(abstract_state, ocp.checkpoint_utils.construct_restore_args(abstract_state))
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=state_args, data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
        found = (out["state"], step)
        break
      except Exception as e:  # pylint: disable=broad-except
        log.warning("checkpoint at step %d is unreadable (%s: %s); falling back to the previous one",
                    step, type(e).__name__, (str(e).splitlines() or [""])[0][:200])
        bad.append(step)
    if bad:
      if jax.process_index() == 0:
        for step in bad:
          src = os.path.join(str(self.manager.directory), str(step))
          os.replace(src, f"{src}.unreadable-{int(time.time())}")
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jfl_checkpoint_quarantine")
      self.manager.reload()
    if found is not None:
      self.last_saved = found[1]
    return found

  def reached_preemption(self, step: int) -> bool:
    """True on every process once any of them was told to stop (multi-host preemption notice)."""
    return self.manager.reached_preemption(step)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def gather(tree):
  """Sharded (possibly multi-host) arrays -> full numpy arrays on every process."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))
  return multihost_utils.process_allgather(tree, tiled=True)


def export(out_dir: str, model_config, params: dict, vae_params) -> None:
  """Writes `params` = {"model", "repa"} (typically the EMA) and the VAE in the jfl-convert layout
  (`jfl.checkpoint.load_converted` and `JanusFlowPipeline.from_pretrained` read it); the REPA
  projector goes to `out_dir/repa_params` so a later stage can continue training it."""
  full = gather(params)
  converted.save_converted(out_dir, model_config, full["model"], gather(vae_params) if vae_params else None)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(os.path.abspath(out_dir), REPA_DIR), full["repa"], force=True)


def _restore_dir(path: str, name: str):
  d = os.path.join(os.path.abspath(path), name)
  if not os.path.isdir(d):
    return None
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(d)


def load_repa(path: str):
  """The REPA projector params saved by `export`, or None."""
  return _restore_dir(path, REPA_DIR)


def load_vae(path: str):
  """Only the VAE params of a jfl-convert directory (None if it has none), as numpy."""
  return _restore_dir(path, "vae_params")


def place(tree, shardings):
  """Host numpy arrays (identical on every process) -> global arrays with `shardings`."""
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x[i])),
                      tree, shardings)
