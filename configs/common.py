"""Blocks shared by the training configs (stage1_adapt, stage2_pretrain, stage3_sft, train_tiny).

Every training config is `base(...)` plus a few overrides. Fields (all overridable on the command
line as --config.a.b=value):

  model            architecture (jfl/models/config.py fields)
  init_from        a jfl-convert directory to start from ("" = random init); a run that finds a
                   checkpoint in its workdir resumes from that instead
  init_reinit      ';'-separated parameter path prefixes re-initialised randomly after init_from
  compute_dtype    activations ("bfloat16" | "float32"); params and optimizer state stay float32
  vae_dtype        the frozen VAE's compute dtype ("bfloat16" | "float32", never float16)
  remat_policy     per-block rematerialisation: "none" | "full" | "dots" | "dots_no_batch"
  mesh             degrees of the (data, fsdp, tensor) mesh axes inside a slice (one may be -1)
                   and across slices (dcn_*)
  sharding         logical-axis rule preset: "dp" | "fsdp" | "fsdp_tp" (jfl/sharding.py)
  seed             parameter init and the train RNG
  jax_cache_dir    persistent XLA compilation cache ("" = off)
  optim            AdamW (lr, warmup_steps, b1, b2, eps, weight_decay, clip_norm) and `frozen`:
                   ';'-separated parameter path prefixes that do not train, e.g. "model/siglip"
  loss             jfl.train.losses.LossSettings fields (repa_layer 0 = model.repa.layer, 6 for 1.3B)
  train            num_steps, accum_steps, ema_decay, max_bad_steps, log_every
  data             jfl.data.pipeline.default_data_config() plus `source` ("synthetic" | "grain"),
                   `synthetic_fixed` and `tokenizer` (a directory; needed by the grain pipeline/eval)
  checkpoint       every (steps), keep (last K), async_save
  eval             every (steps, 0 = off), prompts, questions ("image_path|question"), num_steps, cfg_weight
  export_at_end    write workdir/export (EMA params + VAE, jfl-convert layout) when training ends
"""

import ml_collections

from configs import janusflow_1_3b
from jfl.data.pipeline import default_data_config
from jfl.models.config import JanusFlowConfig

# Parameter groups (paths into params = {"model": JanusFlow, "repa": RepaProjector}).
LLM, SIGLIP = "model/llm", "model/siglip"


def base(arch: JanusFlowConfig = JanusFlowConfig()) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = janusflow_1_3b.model_config(arch)
  c.init_from = ""
  c.init_reinit = ""
  c.compute_dtype = "bfloat16"
  c.vae_dtype = "bfloat16"
  c.remat_policy = "full"
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
  c.sharding = "fsdp"
  c.seed = 0
  c.jax_cache_dir = ""
  c.optim = ml_collections.ConfigDict(dict(lr=1e-4, warmup_steps=2000, b1=0.9, b2=0.95, eps=1e-8,
                                           weight_decay=0.0, clip_norm=1.0, frozen=SIGLIP))
  c.loss = ml_collections.ConfigDict(dict(t_dist="logit_normal", t_mean=0.0, t_std=1.0, cfg_drop=0.1, ar_weight=1.0,
                                          repa_weight=1.0, repa_layer=0, vae_sample=False, ce_chunk=512))
  c.train = ml_collections.ConfigDict(dict(num_steps=1000, accum_steps=1, ema_decay=0.99, max_bad_steps=10,
                                           log_every=10))
  c.data = default_data_config()
  c.data.source = "grain"
  c.data.synthetic_fixed = False
  c.data.tokenizer = ""
  c.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=3, async_save=True))
  c.eval = ml_collections.ConfigDict(dict(
      every=0, prompts="a red apple on a wooden table;a lighthouse at sunset, oil painting",
      questions="", num_steps=30, cfg_weight=2.0, max_new_tokens=64))
  c.export_at_end = True
  return c


def stage(c: ml_collections.ConfigDict, *, lr: float, warmup: int, steps: int, batch: int, mix: str,
          frozen: str) -> ml_collections.ConfigDict:
  """Sets the paper's Table 1 values of one stage (reference doc §8.3)."""
  c.optim.lr, c.optim.warmup_steps, c.optim.frozen = lr, warmup, frozen
  c.train.num_steps = steps
  c.data.batch_size, c.data.seq_len, c.data.mix_schedule = batch, 4096, mix
  return c
