"""Stage 3, supervised fine-tuning (paper Table 1): everything trains, SigLIP included (the VAE never).

LR 2e-5 constant after 1,000 warm-up steps, 26,000 steps, 256 packed rows of 4,096 tokens,
und:gen:text = 21:70:9. Start from the stage-2 export (or fine-tune the released checkpoint).

  jfl-train --config configs/stage3_sft.py --workdir runs/sft --config.init_from=ckpt/janusflow_1_3b \\
      --config.data.und_sources=... --config.data.gen_sources=... --config.data.text_sources=... \\
      --config.data.tokenizer=ckpt/janusflow_1_3b
"""

from configs import common


def get_config(arg: str | None = None):
  del arg
  c = common.stage(common.base(), lr=2e-5, warmup=1000, steps=26_000, batch=256, mix="0=21:70:9", frozen="")
  return c
