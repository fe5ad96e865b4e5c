"""Two local processes through jax.distributed (launch/local.sh's way) train like one process."""

import glob
import json
import os
import socket
import subprocess
import sys

import numpy as np

from jfl.train import checkpoint as ckpt_lib, loop
from tests.test_train_loop import OVERRIDES, _config, _losses, _params, fast_compile  # noqa: F401  (fixture)

STEPS_MP = 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  # Every run starts from the same exported random weights (no initializer to compile).
  init = str(tmp_path / "init")
  params, _ = _params()
  ckpt_lib.export(init, loop.model_config(_config()), params, None)
  extra = [f"--config.init_from={init}", f"--config.train.num_steps={STEPS_MP}"]
  workdir = str(tmp_path / "multi")
  port = _free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
               JAX_DISABLE_MOST_OPTIMIZATIONS="true", JAX_DEFAULT_MATMUL_PRECISION="highest",
               PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "jfl.cli.train", "--config", "configs/train_tiny.py", "--workdir", workdir, *OVERRIDES,
           *extra]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  try:
    # Meanwhile, the same run in this process (8 devices, one process).
    single = loop.train(_config(*extra), str(tmp_path / "single"))
    outs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert f"done at step {STEPS_MP}" in outs[0] and f"done at step {STEPS_MP}" in outs[1]
  logged = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      m = json.loads(line)
      logged[m["step"]] = m
  steps = list(range(1, STEPS_MP + 1))
  assert sorted(logged) == steps
  np.testing.assert_allclose(_losses(logged, steps), _losses(single["history"], steps), rtol=2e-5, atol=1e-6)
  # Both processes wrote their own data-iterator state into the shared checkpoint; the export is complete.
  assert len(glob.glob(os.path.join(workdir, "checkpoints", str(STEPS_MP), "data_iter", "process_*-of-2.json"))) == 2
  assert os.path.isfile(os.path.join(workdir, "export", "jfl_config.json"))
