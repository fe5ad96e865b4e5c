"""The main job: a small JanusFlow trained from scratch on the embedded shapes dataset, on a CPU.

32 px images of one coloured shape; the model learns to answer "what colour / shape / where" and to
draw "a red circle on the left". A parameter-free pixel codec (2x2 space-to-depth, 16x16x12
latents) stands in for the SDXL VAE; all three losses (AR, RF, REPA) and EMA are on.

The data schedule is generation only for the first 380 steps, then 60:35:5 (und:gen:text). In a
mix from the first step the understanding loss dominates Adam's normalisation of the shared LLM
weights and the generated shape never follows the position word within the budget (docs/DEMO.md);
trained alone first, generation binds colour and position, and keeps them when the mix starts.
Rows of 296 tokens hold two understanding examples (141 tokens each) or one plus two generation
examples (77 each).

  jfl-demo --workdir out/demo                      # train, then sample, answer and score
  jfl-demo --workdir out/demo --config.train.num_steps=20     # a quick smoke run
  jfl-demo --workdir out/curves --config.eval.every=100       # also score every 100 steps (curves)
"""

from configs import common
from jfl.demo import tokenizer as demo_tokenizer
from jfl.models.config import GenHeadsConfig, JanusFlowConfig, LlamaConfig, RepaConfig, SiglipConfig, VAEConfig


def architecture() -> JanusFlowConfig:
  vocab = -(-demo_tokenizer.VOCAB_SIZE // 64) * 64
  return JanusFlowConfig(
      llm=LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=344, num_layers=4, num_heads=4,
                      num_kv_heads=4, head_dim=32, max_position_embeddings=512),
      siglip=SiglipConfig(image_size=32, patch_size=4, width=64, depth=2, num_heads=2, mlp_dim=128),
      gen=GenHeadsConfig(latent_channels=12, channels=64, patch_size=2, num_blocks=1),
      repa=RepaConfig(hidden_dims=(128, 128), layer=2),
      vae=VAEConfig(latent_channels=12, space_to_depth=2, scaling_factor=1.0),
      image_size=32,
  )


def get_config(arg: str | None = None):
  del arg
  c = common.base(architecture())
  c.compute_dtype = c.vae_dtype = "float32"
  c.remat_policy = "full"   # on CPU, faster than keeping the [L, B, N, S, S] attention residuals
  c.mesh.data, c.mesh.fsdp = -1, 1
  c.optim.lr, c.optim.warmup_steps, c.optim.frozen = 1e-3, 100, ""   # from scratch: everything trains
  c.loss.ce_chunk = 296   # REPA taps model.repa.layer (2 of 4 blocks); --config.loss.repa_weight=0 turns it off
  c.loss.t_dist = "uniform"  # the layout is decided at small t, which logit-normal rarely samples
  c.train.num_steps, c.train.log_every, c.train.ema_decay = 820, 20, 0.99
  c.data.source = "grain"
  c.data.und_sources = "shapes:train?task=und&n=8192"
  c.data.gen_sources = "shapes:train?task=gen&n=8192"
  c.data.text_sources = "shapes:train?task=text&n=8192"
  c.data.mix_schedule = "0=0:100:0,380=60:35:5"
  c.data.batch_size, c.data.seq_len = 14, 296
  c.data.max_und_images_per_row, c.data.max_gen_images_per_row = 2, 3
  c.data.read_threads = 1
  c.checkpoint.every, c.checkpoint.keep = 200, 2
  c.eval.every = 0   # > 0: score `demo.curve_examples` held-out examples every N steps (curves.jsonl)
  c.eval.num_steps, c.eval.cfg_weight, c.eval.max_new_tokens = 20, 3.0, 4
  c.export_at_end = True
  # What the demo evaluates after training (jfl/demo/run.py).
  c.demo = dict(eval_examples=96, grid_examples=24, curve_examples=48)
  return c
