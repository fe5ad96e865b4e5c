"""A tiny training run on synthetic packed batches (tests, smoke runs, CPU benchmarks).

The tiny architecture (2 LLM layers x 64, 32 px images, 64 image tokens, a 2-level VAE), float32,
8 rows of 256 tokens, stage-2 trainable set. Runs in about a minute on a laptop CPU:

  jfl-train --config configs/train_tiny.py --workdir /tmp/jfl_tiny --config.train.num_steps=20
"""

from configs import common
from jfl.models.config import JanusFlowConfig


def get_config(arg: str | None = None):
  del arg
  c = common.base(JanusFlowConfig.tiny())
  c.compute_dtype = c.vae_dtype = "float32"
  c.remat_policy = "none"
  c.mesh.data, c.mesh.fsdp = -1, 1
  c.optim.lr, c.optim.warmup_steps, c.optim.frozen = 1e-3, 2, common.SIGLIP
  c.loss.ce_chunk = 128
  c.train.num_steps, c.train.log_every = 20, 5
  c.data.source = "synthetic"
  c.data.batch_size, c.data.seq_len = 8, 256
  c.data.max_und_images_per_row = c.data.max_gen_images_per_row = 1
  c.data.mix_schedule = "0=1:1:1"
  c.checkpoint.every, c.checkpoint.keep = 10, 2
  c.eval.prompts = "a red circle;a blue square"
  c.eval.num_steps = 4
  c.eval.max_new_tokens = 8
  return c
