"""jfl-train: train or fine-tune JanusFlow from a config file.

  jfl-train --config configs/stage3_sft.py --workdir runs/sft --config.init_from=ckpt/janusflow_1_3b \\
      --config.optim.lr=1e-5 --config.mesh.fsdp=-1

Multi-host: run the same command on every host with `--distributed` (implied under SLURM with
several tasks or with JAX_COORDINATOR_ADDRESS set): `jax.distributed.initialize()` runs first
(see launch/).
"""

import argparse
import os

from jfl.cli.common import friendly_errors
from jfl.config_utils import load_config, split_config_args


def maybe_initialize_distributed(force: bool = False) -> None:
  """`jax.distributed.initialize()` for multi-process runs; nothing for a plain single process.

  Triggered by `force`, SLURM with more than one task, or JAX_COORDINATOR_ADDRESS. The coordinator,
  process count and id come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
  when set (launch/local.sh), else from JAX's cluster detection (SLURM, TPU pods, ...).
  """
  import jax  # pylint: disable=g-import-not-at-top
  env = os.environ
  if not (force or int(env.get("SLURM_NTASKS", "1")) > 1 or "JAX_COORDINATOR_ADDRESS" in env):
    return
  kwargs = {}
  if "JAX_NUM_PROCESSES" in env:
    kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
  if "JAX_PROCESS_ID" in env:
    kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
  jax.distributed.initialize(**kwargs)


@friendly_errors("jfl-train")
def main(argv=None):
  args, overrides = split_config_args(list(argv) if argv is not None else __import__("sys").argv[1:])
  ap = argparse.ArgumentParser(prog="jfl-train", description=__doc__.splitlines()[0],
                               epilog="Any --config.a.b=value overrides a config field.")
  ap.add_argument("--config", required=True, help="config file, e.g. configs/stage2_pretrain.py")
  ap.add_argument("--workdir", required=True, help="checkpoints, TensorBoard logs, samples and the export go here")
  ap.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
  a = ap.parse_args(args)
  config = load_config(a.config, overrides)
  maybe_initialize_distributed(a.distributed)
  from jfl.train import loop  # pylint: disable=g-import-not-at-top
  result = loop.train(config, a.workdir)
  print(f"jfl-train: {result['status']} at step {int(result['state'].step)}; workdir {a.workdir}")
  return 0 if result["status"] in ("done", "preempted") else 1


if __name__ == "__main__":
  raise SystemExit(main())
