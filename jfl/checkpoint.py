"""Orbax checkpoints of converted weights: `jfl_config.json` + `params/` (+ `vae_params/`)."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from jfl.models.config import JanusFlowConfig

CONFIG_FILE = "jfl_config.json"


def is_converted(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE))


def save_converted(out_dir: str, config: JanusFlowConfig, params, vae_params=None) -> None:
  """Writes the config and params (and VAE params) as an Orbax checkpoint directory."""
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    for name, tree in (("params", params), ("vae_params", vae_params)):
      if tree is not None:
        ckptr.save(os.path.join(out_dir, name), jax.tree.map(np.asarray, tree), force=True)
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(config.to_dict(), f, indent=2)


def load_converted(path: str):
  """(config, params, vae_params or None) of a directory written by `save_converted`."""
  path = os.path.abspath(path)
  with open(os.path.join(path, CONFIG_FILE)) as f:
    config = JanusFlowConfig.from_dict(json.load(f))
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(path, "params"))
    vae_dir = os.path.join(path, "vae_params")
    vae_params = ckptr.restore(vae_dir) if os.path.isdir(vae_dir) else None
  return config, params, vae_params
