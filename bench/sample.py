"""Sampler throughput: images/s and achieved TFLOP/s (LLM matmuls) of the jitted flow sampler.

  python bench/sample.py --config 1_3b --batch 1,8,32                 # GPU: 384px, 30 steps, CFG 2, bf16
  python bench/sample.py --config tiny --batch 1,8 --steps 30         # CPU smoke run
  python bench/sample.py --config tiny_wide --compare-cache --prompt-len 64 --steps 10 --dtype float32

Random weights. The VAE decode is timed separately. `--compare-cache` also times the same sampler
recomputing the prompt at every step (`use_cache=False`). FLOPs count the LLM's matmuls only
(projections, MLP and the attention score/value products over the keys actually computed).
"""

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run without installing jfl

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jfl.models import janusflow, vae as vae_lib
from jfl.models.config import JanusFlowConfig, LlamaConfig
from jfl.sampling import flow


def get_config(name: str) -> JanusFlowConfig:
  if name == "1_3b":
    return JanusFlowConfig()
  tiny = JanusFlowConfig.tiny()
  if name == "tiny":
    return tiny
  if name == "tiny_wide":  # tiny images (P = 64 latent tokens), a 4-layer 512-wide LLM
    return dataclasses.replace(tiny, llm=LlamaConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1408, num_layers=4, num_heads=8, num_kv_heads=8,
        head_dim=64, max_position_embeddings=1024))
  raise ValueError(f"unknown --config {name!r}; expected 1_3b, tiny or tiny_wide")


def llm_flops(cfg: LlamaConfig, tokens: int, keys: int) -> float:
  """Matmul FLOPs of `tokens` query tokens attending `keys` keys each, all layers."""
  d, f, nh, kh = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  dense = 2 * (d * nh + 2 * d * kh + nh * d + 3 * d * f)
  return float(cfg.num_layers * tokens * (dense + 4 * nh * keys))


def sampler_flops(cfg: JanusFlowConfig, rows: int, prompt_len: int, steps: int, use_cache: bool) -> float:
  """LLM FLOPs of one `sample_latents` call: rows = 2 x images with CFG."""
  lp, new = prompt_len - 1, cfg.num_image_tokens + 1
  if use_cache:
    return llm_flops(cfg.llm, rows * lp, lp) + steps * llm_flops(cfg.llm, rows * new, lp + new)
  return steps * llm_flops(cfg.llm, rows * (lp + new), lp + new)


def random_params(abstract, seed: int, dtype):
  """Random params with the shapes of an abstract (boxed) tree: norm scales 1, everything else
  N(0, 0.02^2). One normal draw sliced into leaves (quick to compile)."""
  paths, tree = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract))
  sizes = [int(np.prod(leaf.shape)) for _, leaf in paths]

  @jax.jit
  def make(key):
    flat = jax.random.normal(key, (sum(sizes),), dtype)
    out, start = [], 0
    for (path, leaf), n in zip(paths, sizes):
      x = flat[start:start + n].reshape(leaf.shape) * jnp.asarray(0.02, dtype)
      out.append(jnp.ones(leaf.shape, dtype) if path[-1].key == "scale" else x)
      start += n
    return out

  return jax.tree.unflatten(tree, make(jax.random.key(seed)))


def timed(fn, repeats: int) -> tuple[float, float]:
  """(first-call seconds incl. compilation, best of `repeats` seconds)."""
  t = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t)
  return first, best


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="1_3b", help="1_3b | tiny | tiny_wide")
  ap.add_argument("--batch", default="1,8,32", help="comma-separated images per call")
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--cfg", type=float, default=2.0)
  ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens incl. BOS and <begin_of_image>")
  ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="compute dtype")
  ap.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--compare-cache", action="store_true", help="also time use_cache=False")
  ap.add_argument("--no-vae", action="store_true", help="skip the VAE decode timing")
  args = ap.parse_args(argv)

  cfg = get_config(args.config)
  dtype = jnp.dtype(args.dtype)
  params = random_params(janusflow.abstract_params(cfg), 0, jnp.dtype(args.param_dtype))
  vae_params = random_params(vae_lib.abstract_params(cfg.vae), 1, jnp.dtype(args.param_dtype))
  model = janusflow.JanusFlow(cfg, dtype=dtype)
  vae = vae_lib.make_codec(cfg.vae, dtype=dtype)
  decode = jax.jit(lambda p, z: vae.apply({"params": p}, vae_lib.unscale_latents(z, cfg.vae).astype(dtype),
                                          method=vae.decode))
  rows_per_image = 1 if args.cfg == 1.0 else 2
  print(f"device={jax.devices()[0].device_kind} config={args.config} {cfg.image_size}px P={cfg.num_image_tokens} "
        f"steps={args.steps} cfg={args.cfg} prompt={args.prompt_len} dtype={args.dtype} params={args.param_dtype}")
  for b in (int(x) for x in args.batch.split(",")):
    rng = np.random.default_rng(b)
    ids = rng.integers(10, cfg.llm.vocab_size, (b, args.prompt_len)).astype(np.int32)
    noise = flow.noise_for_seeds(range(b), (cfg.latent_size, cfg.latent_size, cfg.gen.latent_channels))
    for use_cache in (True, False) if args.compare_cache else (True,):
      run = lambda: flow.sample_latents(model, params, ids, noise, args.steps, args.cfg,  # noqa: E731
                                        use_cache=use_cache)
      first, best = timed(run, args.repeats)
      flops = sampler_flops(cfg, rows_per_image * b, args.prompt_len, args.steps, use_cache)
      print(f"batch={b:3d} cache={'on ' if use_cache else 'off'} sample {best:8.3f}s  {b / best:8.2f} img/s  "
            f"{flops / best / 1e12:7.3f} TFLOP/s (LLM {flops / 1e12:.3f} TFLOP)  first call {first:.1f}s")
    if not args.no_vae:
      latents = run()
      first, best = timed(lambda: decode(vae_params, latents), args.repeats)
      print(f"batch={b:3d} VAE decode {best:8.3f}s  {b / best:8.2f} img/s  first call {first:.1f}s")


if __name__ == "__main__":
  main()
