"""JanusFlow's three training losses on a packed batch (reference doc §8.4, layout: jfl/batch.py).

* AR: next-token cross-entropy on `loss_mask` positions (understanding and text-only responses),
  computed chunk by chunk over the sequence so [B, S, V] float32 logits never exist.
* RF: ||v_theta(z_t, t | prompt) - (x - z0)||^2 averaged over latent elements, z_t = t x + (1 - t) z0,
  t ~ uniform or logit-normal, z0 ~ N(0, I). A fraction of prompts is dropped for CFG: their keys
  are masked as in the reference's unconditional rows (BOS, t_emb and image tokens stay visible).
* REPA: -cos(h_phi(LLM hidden after `model.repa.layer` blocks at the latent tokens), stopgrad(SigLIP(x_img))).

`compute_losses` returns *sums* and counts so that gradient accumulation and data parallelism give
the exact full-batch mean (see `total_loss`). Shape letters: B rows, S sequence, NU/NG image slots
per row, P image tokens, D LLM width, C SigLIP width, V vocab, h w latent size.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jfl import batch as batch_lib
from jfl.models import llama, repa as repa_lib, vae as vae_lib
from jfl.models.janusflow import scatter_slots, slot_order
from jfl.models.config import JanusFlowConfig

Array = jax.Array

# fold_in constants: one RNG stream per purpose (STYLE §7).
RNG_T, RNG_NOISE, RNG_CFG, RNG_VAE = 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """Static knobs of the losses (from `config.loss`)."""
  t_dist: str = "logit_normal"     # "logit_normal" | "uniform"
  t_mean: float = 0.0              # logit-normal location m
  t_std: float = 1.0               # logit-normal scale s
  cfg_drop: float = 0.1            # probability of dropping a generation prompt
  ar_weight: float = 1.0           # weight of L_AR against L_RF (the paper: 1)
  repa_weight: float = 1.0         # lambda in L_RF + lambda * L_REPA
  repa_layer: int = 0              # LLM blocks before the REPA tap; 0 = the architecture's repa.layer
  vae_sample: bool = False         # sample the VAE posterior instead of taking its mean
  ce_chunk: int = 512              # sequence chunk of the AR loss

  def __post_init__(self):
    if self.t_dist not in ("logit_normal", "uniform"):
      raise ValueError(f"loss.t_dist must be 'logit_normal' or 'uniform', got {self.t_dist!r}")
    if not 0.0 <= self.cfg_drop <= 1.0:
      raise ValueError(f"loss.cfg_drop must be in [0, 1], got {self.cfg_drop}")


@dataclasses.dataclass(frozen=True)
class Modules:
  """The Flax modules the losses apply (bound to params inside `compute_losses`)."""
  model: Any        # jfl.models.janusflow.JanusFlow
  projector: Any    # jfl.models.repa.RepaProjector
  vae: Any          # jfl.models.vae.AutoencoderKL
  config: JanusFlowConfig


def sample_t(key: Array, shape: tuple[int, ...], s: LossSettings) -> Array:
  """Flow times in (0, 1): 0 = noise, 1 = data."""
  if s.t_dist == "uniform":
    return jax.random.uniform(key, shape, jnp.float32)
  return jax.nn.sigmoid(s.t_mean + s.t_std * jax.random.normal(key, shape, jnp.float32))


def draw(key: Array, batch: dict, cfg: JanusFlowConfig, s: LossSettings) -> dict:
  """The step's random draws for a whole batch: z0 "noise" [B, NG, h, w, C], flow times "t" [B, NG]
  and CFG prompt drops "drop" bool [B, NG] (per image, in valid-first order). Drawing them for the
  whole batch before splitting it into micro-batches makes accumulation equal one big batch."""
  b, ng = batch["gen_valid"].shape
  shape = (b, ng, cfg.latent_size, cfg.latent_size, cfg.vae.latent_channels)
  return {"noise": jax.random.normal(jax.random.fold_in(key, RNG_NOISE), shape, jnp.float32),
          "t": sample_t(jax.random.fold_in(key, RNG_T), (b, ng), s),
          "drop": jax.random.bernoulli(jax.random.fold_in(key, RNG_CFG), s.cfg_drop, (b, ng))}


def token_nll(logits_fn, hidden: Array, targets: Array, chunk: int) -> Array:
  """Per-position next-token NLL without materialising all logits.

  Args:
    logits_fn: [B, c, D] -> float32 [B, c, V] (the lm_head).
    hidden: [B, S, D]; targets: int [B, S].
    chunk: sequence chunk c; S is padded up to a multiple. Each chunk's logits are recomputed in
      the backward pass (jax.checkpoint), so peak memory holds one [B, c, V] block.
  Returns:
    float32 [B, S] = logsumexp(logits) - logits[target].
  """
  b, s, d = hidden.shape
  c = min(chunk, s)
  n = -(-s // c)
  pad = n * c - s
  h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, d).swapaxes(0, 1)   # [n, B, c, D]
  t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, c).swapaxes(0, 1)              # [n, B, c]

  @jax.checkpoint
  def one(hc, tc):
    logits = logits_fn(hc)                                                            # [B, c, V] f32
    picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked

  nll = jax.lax.map(lambda xs: one(*xs), (h, t))                                      # [n, B, c]
  return nll.swapaxes(0, 1).reshape(b, n * c)[:, :s]


def _gen_inputs(mods: Modules, params, vae_params, batch: dict, order: Array, key: Array, s: LossSettings):
  """Clean scaled latents x [B, NG, h, w, 4] and REPA targets [B, NG, P, C] (None when the batch
  has cached latents but no cached targets) in valid-first order."""
  take = lambda a: jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)
  if "gen_latents" in batch:
    target = batch.get("gen_repa_target")
    return take(batch["gen_latents"]), None if target is None else jax.lax.stop_gradient(take(target))
  images = take(batch["gen_images"])
  b, ng = images.shape[:2]
  flat = images.reshape(b * ng, *images.shape[2:])
  mean, logvar = mods.vae.apply({"params": vae_params}, flat, method=mods.vae.encode)
  if s.vae_sample:
    mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(jax.random.fold_in(key, RNG_VAE), mean.shape)
  x = jax.lax.stop_gradient(vae_lib.scale_latents(mean, mods.config.vae))
  m = mods.model
  feats = m.apply({"params": params["model"]}, flat, method=lambda mod, im: mod.siglip(im))
  feats = jax.lax.stop_gradient(feats.astype(jnp.float32))
  return x.reshape(b, ng, *x.shape[1:]), feats.reshape(b, ng, *feats.shape[1:])


def compute_losses(mods: Modules, params: dict, vae_params, batch: dict, key: Array, s: LossSettings,
                   noise: Array | None = None, t: Array | None = None, drop: Array | None = None):
  """Forward pass of a packed batch and the three losses.

  Args:
    params: {"model": JanusFlow params, "repa": RepaProjector params}.
    vae_params: frozen VAE params (unused when the batch holds `gen_latents`).
    batch: a jfl/batch.py batch (jax arrays).
    key: PRNG key of this (micro-)batch; streams are derived with fold_in.
    noise / t / drop: z0 [B, NG, h, w, 4], t [B, NG] and the CFG drop bool [B, NG] in the
      valid-first image order; drawn from `key` (see `draw`) when not given.
  Returns:
    (sums, per_example): sums of float32 scalars {ar_und, ar_text, rf, repa, und_tokens,
    text_tokens, gen_examples, tokens}; per_example {"nll" [B, S], "rf" [B, NG], "repa" [B, NG],
    "gen_valid" [B, NG]} (image order: valid slots first).
  """
  m, cfg = mods.model, mods.config
  b, seq = batch["tokens"].shape
  ng = batch["gen_valid"].shape[1]
  p = cfg.num_image_tokens
  order = slot_order(batch["gen_valid"], ng)                                        # [B, NG] slot ids
  gen_valid = jnp.take_along_axis(batch["gen_valid"], order, axis=1)
  x, repa_target = _gen_inputs(mods, params, vae_params, batch, order, key, s)

  # Noisy latents and the flow target.
  if noise is None or t is None or drop is None:
    rand = draw(key, batch, cfg, s)
    noise, t, drop = (rand[k] if v is None else v for k, v in (("noise", noise), ("t", t), ("drop", drop)))
  z0 = noise
  tb = t[:, :, None, None, None]
  z_t = tb * x + (1.0 - tb) * z0
  v_target = x - z0
  apply = lambda method, *a, **kw: m.apply({"params": params["model"]}, *a, method=method, **kw)
  tokens, t_emb, skip = apply(m.encode_latents, z_t.reshape(b * ng, *x.shape[2:]), t.reshape(-1))

  # Input embeddings: text, understanding image slots, then [t_emb, P latent tokens] per gen image.
  und_valid = batch["und_valid"]
  emb_mask = jnp.broadcast_to(und_valid[..., None], (*und_valid.shape, p + 1))
  embeds = apply(m.understanding_embeds, batch["tokens"], batch["und_images"], batch["und_slot_mask"], emb_mask)
  gen_slots = jnp.concatenate([t_emb[:, None], tokens], axis=1).reshape(b, ng * (p + 1), -1)
  embeds = scatter_slots(embeds, gen_slots, batch["gen_slot_mask"])

  # Block-causal attention within segments; dropped prompts (CFG) are masked as keys.
  drop_by_slot = jnp.zeros((b, ng), bool).at[jnp.arange(b)[:, None], order].set(drop & gen_valid)
  prompt_slot = batch["gen_prompt_slot"]
  dropped = (prompt_slot >= 0) & jnp.take_along_axis(drop_by_slot, jnp.maximum(prompt_slot, 0), axis=1)
  seg = batch["segment_ids"]
  mask = llama.attention_mask((seg != batch_lib.PAD_SEGMENT) & ~dropped, jnp.arange(seq), query_segments=seg)
  hidden, aux = apply(m.run_llm, embeds, batch["positions"], mask, tap_layer=s.repa_layer or cfg.repa.layer)

  # AR.
  nll = token_nll(lambda h: apply(m.logits, h), hidden, batch["targets"], s.ce_chunk)
  task = batch["task"]
  lm = batch["loss_mask"].astype(jnp.float32)
  und_w, text_w = lm * (task == batch_lib.TASK_UND), lm * (task == batch_lib.TASK_TEXT)

  # RF and REPA at the latent-token positions (the last P of each gen slot run).
  pos = slot_order(batch["gen_slot_mask"], ng * (p + 1)).reshape(b, ng, p + 1)[:, :, 1:].reshape(b, ng * p)
  pick = lambda h: jnp.take_along_axis(h, pos[..., None], axis=1).reshape(b * ng, p, -1)
  v = apply(m.decode_velocity, pick(hidden), skip, t_emb).astype(jnp.float32)
  rf = jnp.mean((v - v_target.reshape(v.shape)) ** 2, axis=(1, 2, 3)).reshape(b, ng)
  if repa_target is None:  # cached latents without cached SigLIP features: no REPA term
    repa = jnp.zeros((b, ng), jnp.float32)
  else:
    proj = mods.projector.apply({"params": params["repa"]}, pick(aux["tap"]))
    target = repa_target.reshape(b * ng, p, -1)
    repa = jax.vmap(lambda a, c: repa_lib.repa_loss(a[None], c[None]))(proj, target).reshape(b, ng)

  gw = gen_valid.astype(jnp.float32)
  sums = {
      "ar_und": jnp.sum(nll * und_w), "ar_text": jnp.sum(nll * text_w),
      "rf": jnp.sum(rf * gw), "repa": jnp.sum(repa * gw),
      "und_tokens": jnp.sum(und_w), "text_tokens": jnp.sum(text_w), "gen_examples": jnp.sum(gw),
      "tokens": jnp.sum((seg != batch_lib.PAD_SEGMENT).astype(jnp.float32)),
  }
  return sums, {"nll": nll, "rf": rf, "repa": repa, "gen_valid": gen_valid}


def counts(batch: dict) -> dict:
  """Loss denominators of a whole (global) batch; data only, no gradients."""
  lm = batch["loss_mask"].astype(jnp.float32)
  return {"ar": jnp.sum(lm * ((batch["task"] == batch_lib.TASK_UND) | (batch["task"] == batch_lib.TASK_TEXT))),
          "gen": jnp.sum(batch["gen_valid"].astype(jnp.float32))}


def total_loss(sums: dict, denom: dict, s: LossSettings) -> Array:
  """w_AR L_AR (token mean) + L_RF + lambda L_REPA (example means) with whole-batch denominators."""
  ar = (sums["ar_und"] + sums["ar_text"]) / jnp.maximum(denom["ar"], 1.0)
  gen = (sums["rf"] + s.repa_weight * sums["repa"]) / jnp.maximum(denom["gen"], 1.0)
  return s.ar_weight * ar + gen


def summarize(sums: dict) -> dict:
  """Per-loss means and counts for logging."""
  div = lambda a, c: a / jnp.maximum(c, 1.0)
  ar_tokens = sums["und_tokens"] + sums["text_tokens"]
  return {
      "ar_loss": div(sums["ar_und"] + sums["ar_text"], ar_tokens),
      "ar_und_loss": div(sums["ar_und"], sums["und_tokens"]), "ar_text_loss": div(sums["ar_text"], sums["text_tokens"]),
      "rf_loss": div(sums["rf"], sums["gen_examples"]), "repa_loss": div(sums["repa"], sums["gen_examples"]),
      "und_tokens": sums["und_tokens"], "text_tokens": sums["text_tokens"], "gen_examples": sums["gen_examples"],
      "tokens": sums["tokens"],
  }
