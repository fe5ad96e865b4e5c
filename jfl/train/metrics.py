"""Analytic FLOP count, MFU, and metric writers (TensorBoard + stdout).

Model FLOPs of one train step (matmul FLOPs = 2 x multiply-adds; remat recomputation is not
counted, as usual for MFU):
  LLM       k * (N_layers + D * V) per token over all B * S positions (the AR loss evaluates the
            lm_head everywhere) + causal attention k/2 * 2 * S^2 * N * H * L per row,
            with k = 6 when the LLM trains (forward, input and weight gradients) and 4 when it is
            frozen but gradients pass through it (stage 1)
  SigLIP    per understanding image slot: k * (N_blocks * P + attention), k = 6 trainable / 2 frozen;
            plus a 2x forward per generation image for the REPA target (unless cached)
  g_enc/dec per generation image slot: 6 * N_gen * P (every weight applied at the P grid, a slight
            over-count for the per-image time-embedding and FiLM weights)
  REPA h    6 * N_repa * P per generation image slot
  VAE       the encoder's forward FLOPs per generation image (XLA's count of one encode), unless cached
"""

import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jfl.models.config import JanusFlowConfig

# Dense bf16 peak FLOP/s per device (no sparsity).
PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "gh200": 989e12, "b200": 2250e12, "a100": 312e12, "l4": 121e12,
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v5": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12,
}


def peak_flops(device=None) -> float:
  """Peak bf16 FLOP/s of `device` (default the first device); nan when unknown (e.g. CPU)."""
  kind = (device or jax.devices()[0]).device_kind.lower()
  for name, value in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name in kind:
      return value
  return float("nan")


def _llm_layer_params(c) -> int:
  attn = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_heads * c.head_dim * c.hidden_size
  return attn + 3 * c.hidden_size * c.intermediate_size


def _siglip_block_params(c) -> int:
  return 4 * c.width * c.width + 2 * c.width * c.mlp_dim


def _gen_params(model_params) -> int:
  """g_enc + g_dec + aligners, counted from the (abstract, unboxed) JanusFlow parameter shapes."""
  names = ("gen_enc", "gen_enc_aligner", "gen_dec", "gen_dec_aligner", "gen_dec_aligner_norm")
  return sum(math.prod(x.shape) for n in names for x in jax.tree.leaves(model_params[n]))


def _vae_encode_flops(cfg: JanusFlowConfig) -> float:
  from jfl.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  codec = vae_lib.make_codec(cfg.vae)
  x = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.vae.in_channels), jnp.float32)
  params = jax.eval_shape(lambda x: codec.init(jax.random.key(0), x), x)
  cost = jax.jit(lambda p, x: codec.apply(p, x, method=codec.encode)).lower(params, x).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


@dataclasses.dataclass(frozen=True)
class StepShape:
  """What the FLOP count needs to know about a step."""
  batch_size: int                 # global rows
  seq_len: int
  num_und: int                    # understanding image slots per row
  num_gen: int                    # generation image slots per row
  llm_trains: bool = True
  siglip_trains: bool = False
  vae_in_step: bool = True        # False with cached latents
  repa_target_in_step: bool = True


def step_flops(cfg: JanusFlowConfig, s: StepShape, model_params) -> dict[str, float]:
  """Model FLOPs of one train step by component, and their "total".

  `model_params`: JanusFlow params or their ShapeDtypeStructs (only shapes are read).
  """
  llm, sig, p = cfg.llm, cfg.siglip, cfg.num_image_tokens
  b, n = s.batch_size, s.seq_len
  k_llm = 6 if s.llm_trains else 4
  out = {
      "llm": k_llm * (llm.num_layers * _llm_layer_params(llm) + llm.hidden_size * llm.vocab_size) * b * n,
      "attention": k_llm / 2 * 2 * n * n * llm.num_heads * llm.head_dim * llm.num_layers * b,
  }
  sp = sig.grid ** 2
  sig_fwd = 2 * sig.num_blocks * (_siglip_block_params(sig) * sp + 2 * sp * sp * sig.width)
  out["siglip"] = sig_fwd * (3 if s.siglip_trains else 1) * b * s.num_und
  out["siglip"] += sig_fwd * b * s.num_gen * s.repa_target_in_step
  out["gen_heads"] = 6 * _gen_params(model_params) * p * b * s.num_gen
  repa_dims = (llm.hidden_size, *cfg.repa.hidden_dims, sig.width)
  out["repa"] = 6 * sum(a * c for a, c in zip(repa_dims[:-1], repa_dims[1:])) * p * b * s.num_gen
  out["vae"] = _vae_encode_flops(cfg) * b * s.num_gen if s.vae_in_step else 0.0
  out["total"] = sum(out.values())
  return out


class Writer:
  """Scalars to TensorBoard and `metrics.jsonl` (process 0 only), progress lines to stdout."""

  def __init__(self, workdir: str | None, total_steps: int):
    self.total = total_steps
    self.tb = self.jsonl = None
    if workdir and jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.tb = SummaryWriter(os.path.join(workdir, "tb"))
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self.t0 = time.time()
    self.start_step = None

  def scalars(self, step: int, values: dict) -> None:
    if self.tb is not None:
      for k, v in values.items():
        if np.isfinite(v):
          self.tb.add_scalar(k, float(v), step)
      self.jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")
      self.jsonl.flush()

  def progress(self, step: int, values: dict) -> None:
    """One log line: step/total, the losses, rates and ETA (process 0)."""
    if self.start_step is None:
      self.start_step, self.t0 = step, time.time()
    if jax.process_index() != 0:
      return
    done = step - self.start_step
    rate = done / max(time.time() - self.t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    keys = ("loss", "ar_loss", "rf_loss", "repa_loss", "grad_norm", "lr")
    parts = [f"{k} {values[k]:.4g}" for k in keys if k in values]
    rates = [f"{values[k]:.4g} {u}" for k, u in (("step_time", "s/step"), ("tokens_per_s", "tok/s")) if k in values]
    if "mfu" in values and np.isfinite(values["mfu"]):
      rates.append(f"MFU {100 * values['mfu']:.1f}%")
    eta_s = "?" if not np.isfinite(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
    print(f"step {step}/{self.total} ({100 * step / max(self.total, 1):.1f}%) " + " ".join(parts)
          + " | " + " ".join(rates) + f" | ETA {eta_s}", file=sys.stdout, flush=True)

  def close(self):
    if self.tb is not None:
      self.tb.close()
      self.jsonl.close()
