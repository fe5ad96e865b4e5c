"""Stage 1, adaptation (paper Table 1): train the randomly initialised parts only.

Trainable: und_aligner, gen_enc_aligner, gen_dec_aligner(+_norm), beg_of_und_embed, g_enc, g_dec and
the REPA projector; frozen: the LLM and SigLIP (and the VAE, never trained). LR 1e-4 constant after
2,000 warm-up steps, 10,000 steps, 512 packed rows of 4,096 tokens, und:gen:text = 50:50:0.
`init_from` must provide the LLM and SigLIP weights (e.g. a jfl-convert directory of JanusFlow-1.3B;
`init_reinit` then re-initialises the parts this stage trains).

  jfl-train --config configs/stage1_adapt.py --workdir runs/stage1 --config.init_from=ckpt/janusflow_1_3b \\
      --config.data.und_sources=arrayrecord:/data/und --config.data.gen_sources=arrayrecord:/data/gen \\
      --config.data.tokenizer=ckpt/janusflow_1_3b
"""

from configs import common

REINIT = ("model/und_aligner;model/gen_enc_aligner;model/gen_dec_aligner;model/gen_dec_aligner_norm;"
          "model/beg_of_und_embed;model/gen_enc;model/gen_dec")


def get_config(arg: str | None = None):
  del arg
  c = common.stage(common.base(), lr=1e-4, warmup=2000, steps=10_000, batch=512, mix="0=50:50:0",
                   frozen=f"{common.LLM};{common.SIGLIP}")
  c.init_reinit = REINIT
  return c
