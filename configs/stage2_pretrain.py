"""Stage 2, unified pre-training (paper Table 1): everything but SigLIP (and the VAE) trains.

LR 1e-4 constant after 2,000 warm-up steps, 390,000 steps, 512 packed rows of 4,096 tokens;
und:gen:text = 30:50:20 for the first 10,000 steps, then 14:80:6. Start from the stage-1 export.

  jfl-train --config configs/stage2_pretrain.py --workdir runs/stage2 --config.init_from=runs/stage1/export \\
      --config.data.und_sources=... --config.data.gen_sources=... --config.data.text_sources=... \\
      --config.data.tokenizer=ckpt/janusflow_1_3b
"""

from configs import common


def get_config(arg: str | None = None):
  del arg
  c = common.stage(common.base(), lr=1e-4, warmup=2000, steps=390_000, batch=512,
                   mix="0=30:50:20,10000=14:80:6", frozen=common.SIGLIP)
  return c
