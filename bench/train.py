"""Train-step benchmark: step time, tokens/s and MFU with the full train state in memory.

Builds exactly what `jfl-train` builds (jfl.train.loop.Setup: sharded params + Adam + EMA, the
jitted donated step) on synthetic packed batches, compiles it ahead of time, prints XLA's memory
analysis and device memory statistics, then times `--steps` steps after `--warmup` ones.

  python bench/train.py                                  # JanusFlow-1.3B, stage 2, S = 4096
  python bench/train.py --config tiny                    # the tiny model (CPU)
  python bench/train.py --batch-size 2 --config.remat_policy=dots_no_batch --config.sharding=fsdp

MFU = analytic model FLOPs (jfl.train.metrics.step_flops) / step time / (devices x peak bf16
FLOP/s of the device, or --peak-tflops). (XLA's own cost analysis is not used: it counts the body
of the scanned layer stack once.)
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jfl.config_utils import load_config, split_config_args  # noqa: E402

CONFIGS = {"1.3b": "configs/stage2_pretrain.py", "tiny": "configs/train_tiny.py"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gib(n) -> str:
  return f"{n / 2**30:.2f} GiB"


def build_config(args, overrides):
  path = CONFIGS.get(args.config, args.config)
  config = load_config(os.path.join(ROOT, path) if not os.path.isabs(path) else path, overrides)
  config.data.source = "synthetic"
  config.data.synthetic_fixed = True
  if args.config == "1.3b" and not any(o.startswith("--config.data.batch_size") for o in overrides):
    import jax  # pylint: disable=g-import-not-at-top
    config.data.batch_size = args.batch_size or jax.device_count()
  elif args.batch_size:
    config.data.batch_size = args.batch_size
  if args.seq_len:
    config.data.seq_len = args.seq_len
  if args.config == "1.3b" and not any("images_per_row" in o for o in overrides):
    # A packed 4096-token row: ~2 understanding + ~4 generation examples (+ text).
    config.data.max_und_images_per_row, config.data.max_gen_images_per_row = 2, 4
    config.data.mix_schedule = "0=30:50:20"
  config.init_from = ""
  return config


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, overrides = split_config_args(argv)
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="--config.a.b=value overrides config fields")
  ap.add_argument("--config", default="1.3b", help="'1.3b', 'tiny' or a config file")
  ap.add_argument("--batch-size", type=int, default=0, help="global packed rows per step (default: one per device)")
  ap.add_argument("--seq-len", type=int, default=0, help="packed row length (default: the config's)")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--peak-tflops", type=float, default=0.0, help="per-device peak, if the device is not known")
  ap.add_argument("--json", help="also write the results here")
  ap.add_argument("--lower-only", action="store_true",
                  help="trace and lower the step with abstract inputs (no allocation, no run) and print the "
                       "analytic FLOPs by component")
  ap.add_argument("--compile-only", action="store_true",
                  help="as --lower-only, then compile and print XLA's memory analysis (no allocation)")
  args = ap.parse_args(rest)

  import jax  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jfl.data import synthetic  # pylint: disable=g-import-not-at-top
  from jfl.train import loop, metrics  # pylint: disable=g-import-not-at-top

  config = build_config(args, overrides)
  setup = loop.Setup(config)
  dev = jax.devices()[0]
  print(f"devices: {jax.device_count()} x {dev.device_kind}; mesh {dict(setup.mesh.shape)}; rules {config.sharding}; "
        f"remat {config.remat_policy}; dtype {config.compute_dtype}; batch {config.data.batch_size} x "
        f"{config.data.seq_len}; accum {config.train.accum_steps}; frozen {config.optim.frozen or '-'}", flush=True)
  if args.lower_only or args.compile_only:
    return lower_only(setup, config, compile_too=args.compile_only)
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    t0 = time.time()
    state = setup.init_random(config.seed)
    vae_params = loop.make_vae_params(setup, config)
    jax.block_until_ready((state, vae_params))
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    print(f"state: {n_params / 1e6:.1f}M params, {n_opt / 1e6:.1f}M optimizer values, EMA; "
          f"init {time.time() - t0:.1f}s", flush=True)
    it = synthetic.make_iterator(config, jax.process_index(), jax.process_count())
    host = next(it)
    t0 = time.time()
    compiled, batch_sh = setup.compile_step(host, vae_params)
    print(f"compile {time.time() - t0:.1f}s", flush=True)
    _print_memory(compiled.memory_analysis())
    batch = {k: jax.make_array_from_process_local_data(batch_sh[k], np.asarray(v)) for k, v in host.items()}
    times = []
    for i in range(args.warmup + args.steps):
      t0 = time.perf_counter()
      state, m = compiled(state, batch, vae_params)
      jax.block_until_ready(m)
      if i >= args.warmup:
        times.append(time.perf_counter() - t0)
    m = jax.device_get(m)
  step = float(np.median(times))
  peak = (args.peak_tflops * 1e12 if args.peak_tflops else metrics.peak_flops(dev)) * jax.device_count()
  flops = setup.flops
  tokens = float(m["tokens"])
  out = {
      "device": dev.device_kind, "devices": jax.device_count(), "batch": config.data.batch_size,
      "seq_len": config.data.seq_len, "step_time_s": step, "step_time_min_s": float(np.min(times)),
      "tokens_per_s": tokens / step, "tokens_per_s_per_device": tokens / step / jax.device_count(),
      "model_tflops_per_step": flops / 1e12, "mfu": flops / step / peak, "loss": float(m["loss"]),
  }
  stats = dev.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["peak_memory_gib"] = stats["peak_bytes_in_use"] / 2**30
  print(f"step {step * 1e3:.1f} ms (median of {args.steps}), {out['tokens_per_s']:.0f} tokens/s "
        f"({out['tokens_per_s_per_device']:.0f}/device), model {out['model_tflops_per_step']:.3f} TFLOP/step, "
        f"{flops / step / 1e12 / jax.device_count():.3f} TFLOP/s/device, MFU {100 * out['mfu']:.1f}%"
        + (f", peak memory {out['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in out else "")
        + ("" if np.isfinite(peak) else " (unknown device peak: pass --peak-tflops for MFU)"))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)
  return out


def _print_memory(mem):
  if mem is not None:
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    print(f"XLA memory per device: arguments {_gib(mem.argument_size_in_bytes)}, outputs "
          f"{_gib(mem.output_size_in_bytes)} (aliased {_gib(mem.alias_size_in_bytes)}), temporaries "
          f"{_gib(mem.temp_size_in_bytes)}; peak ~{_gib(peak)}", flush=True)


def lower_only(setup, config, compile_too=False):
  """Lowers (and optionally compiles) the step for abstract inputs; prints the analytic FLOPs."""
  import jax  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from jfl import sharding  # pylint: disable=g-import-not-at-top
  from jfl.data import pipeline  # pylint: disable=g-import-not-at-top
  from jfl.train import metrics, step as step_lib  # pylint: disable=g-import-not-at-top
  batch = pipeline.batch_spec(config)
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    batch_sh = setup.batch_shardings(batch)
    x = jax.ShapeDtypeStruct((1, setup.cfg.image_size, setup.cfg.image_size, 3), jax.numpy.float32)
    vae = jax.eval_shape(lambda x: nn.meta.unbox(setup.vae.init(jax.random.key(0), x)).get("params", {}), x)
    fn = step_lib.jit_train_step(setup.settings, setup.layout.shardings, batch_sh, setup.vae_shardings, setup.mesh)
    t_lower = time.time()
    lowered = fn.lower(sharding.abstract_with_shardings(setup.layout.abstract, setup.layout.shardings),
                       sharding.abstract_with_shardings(batch, batch_sh),
                       sharding.abstract_with_shardings(vae, setup.vae_shardings))
    lower_s = time.time() - t_lower
  if compile_too:
    t0 = time.time()
    compiled = lowered.compile()
    print(f"compiled in {time.time() - t0:.1f}s", flush=True)
    _print_memory(compiled.memory_analysis())
  n = sum(x.size for x in jax.tree.leaves(setup.layout.abstract.params))
  parts = metrics.step_flops(setup.cfg, setup.step_shape(), setup.layout.abstract.params["model"])
  out = {"params": n, **{f"tflops_{k}": v / 1e12 for k, v in parts.items()}}
  print(f"lowered in {lower_s:.1f}s: {n / 1e9:.3f}B params; model TFLOP/step: "
        + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in parts.items()))
  return out


if __name__ == "__main__":
  main()
