"""JanusFlow: one LLM that understands images (SigLIP -> aligner -> AR text) and generates them
(rectified flow: latent -> g_enc -> LLM -> g_dec -> velocity).

The parameter tree mirrors the reference `MultiModalityCausalLM` (see `jfl/convert/mapping.py`):
`llm`, `siglip`, `und_aligner`, `beg_of_und_embed`, `gen_enc`, `gen_enc_aligner`, `gen_dec`,
`gen_dec_aligner_norm`, `gen_dec_aligner`. The REPA projector and the VAE are separate modules
(`repa.py`, `vae.py`): neither is part of the released checkpoint.

Sequence layouts (reference doc §4, §6):
  understanding  [BOS, text..., BOI->beg_of_und_embed, 576 x SigLIP token, EOI, text...]
  generation     [BOS, prompt..., t_emb, 576 x latent token]   (the appended <begin_of_image>
                 is dropped; t_emb takes its slot)
"""

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jfl.models import gen_heads, llama, siglip
from jfl.models.config import JanusFlowConfig
from jfl.models.layers import RMSNorm, dense, param_init

Array = jax.Array


class JanusFlow(nn.Module):
  """The released model. Methods are called with `model.apply(params, ..., method=...)`."""

  config: JanusFlowConfig
  dtype: Any = jnp.float32
  remat_policy: str = "none"

  def setup(self):
    c = self.config
    d, cg = c.llm.hidden_size, c.gen.channels
    self.llm = llama.Llama(c.llm, dtype=self.dtype, remat_policy=self.remat_policy)
    self.siglip = siglip.SiglipEncoder(c.siglip, dtype=self.dtype, remat_policy=self.remat_policy)
    self.und_aligner = dense(d, ("embed_vision", "embed"), None, dtype=self.dtype)
    self.beg_of_und_embed = self.param("beg_of_und_embed", param_init(nn.initializers.zeros_init(), (None, "embed")),
                                       (1, d), jnp.float32)
    self.gen_enc = gen_heads.GenEncoder(c.gen, cond_dim=d, dtype=self.dtype)
    self.gen_enc_aligner = dense(d, ("conv_out", "embed"), None, dtype=self.dtype)
    self.gen_dec = gen_heads.GenDecoder(c.gen, cond_dim=d, dtype=self.dtype)
    self.gen_dec_aligner_norm = RMSNorm(c.llm.rms_norm_eps)
    self.gen_dec_aligner = dense(cg, ("embed", "conv_in"), None, dtype=self.dtype)

  # --- understanding ---------------------------------------------------------------------------

  def embed_images(self, images: Array) -> Array:
    """Understanding image slots: images [B, n, H, W, 3] in [-1, 1] -> [B, n * (1 + P), D].

    Each image contributes `beg_of_und_embed` (the BOI slot) followed by its P aligned SigLIP tokens.
    """
    b, n = images.shape[:2]
    feats = self.siglip(images.reshape(b * n, *images.shape[2:]))          # [B*n, P, C]
    tokens = self.und_aligner(feats)                                         # [B*n, P, D]
    boi = jnp.broadcast_to(self.beg_of_und_embed.astype(tokens.dtype), (b * n, 1, tokens.shape[-1]))
    return jnp.concatenate([boi, tokens], axis=1).reshape(b, -1, tokens.shape[-1])

  def understanding_embeds(self, input_ids: Array, images: Array, images_seq_mask: Array,
                           images_emb_mask: Array) -> Array:
    """Text embeddings with image slots scattered in, as the reference `prepare_inputs_embeds`.

    Args:
      input_ids: int [B, L] (negative ids are treated as 0, as the reference does).
      images: [B, n, H, W, 3] in [-1, 1].
      images_seq_mask: bool [B, L], True on the 1 + P positions (BOI + placeholders) of each image.
      images_emb_mask: bool [B, n, 1 + P], True for the slots of real images.
    Returns:
      [B, L, D]; the k-th True position of a row receives that row's k-th valid image slot.
    """
    chex.assert_rank([input_ids, images, images_seq_mask, images_emb_mask], [2, 5, 2, 3])
    embeds = self.llm.embed(jnp.maximum(input_ids, 0))
    slots = self.embed_images(images)                                        # [B, n*(1+P), D]
    valid = images_emb_mask.reshape(images_emb_mask.shape[0], -1)
    order = slot_order(valid, valid.shape[1])                                # valid slots first, in order
    return scatter_slots(embeds, jnp.take_along_axis(slots, order[..., None], axis=1), images_seq_mask)

  def logits(self, hidden: Array) -> Array:
    """[B, L, D] -> float32 [B, L, V]."""
    return self.llm.logits(hidden)

  def embed_tokens(self, ids: Array) -> Array:
    """int [B, L] -> [B, L, D]."""
    return self.llm.embed(ids)

  def run_llm(self, embeds, positions, mask, cache=None, cache_index=0, tap_layer=None):
    """The LLM trunk; see `llama.Llama.__call__`."""
    return self.llm(embeds, positions, mask, cache=cache, cache_index=cache_index, tap_layer=tap_layer)

  # --- generation ------------------------------------------------------------------------------

  def encode_latents(self, z: Array, t: Array) -> tuple[Array, Array, Array]:
    """g_enc + aligner: z [B, h, w, 4] (scaled latents), t [B] in [0, 1].

    Returns (tokens [B, P, D], t_emb [B, D], skip [B, h/2, w/2, C]). The time embedding sees t * 1000.
    """
    x_emb, t_emb = self.gen_enc(z, t * 1000.0)
    b, gh, gw, c = x_emb.shape
    return self.gen_enc_aligner(x_emb.reshape(b, gh * gw, c)), t_emb, x_emb

  def decode_velocity(self, hidden: Array, skip: Array, t_emb: Array) -> Array:
    """LLM outputs at the P image positions [B, P, D] -> velocity [B, h, w, 4]."""
    b, gh, gw, _ = skip.shape
    x = self.gen_dec_aligner(self.gen_dec_aligner_norm(hidden))
    return self.gen_dec(x.reshape(b, gh, gw, -1), skip, t_emb)

  def velocity(self, prefix_embeds: Array, prefix_mask: Array, z: Array, t: Array,
               tap_layer: int | None = None) -> tuple[Array, dict]:
    """One rectified-flow velocity evaluation with the whole sequence recomputed.

    Args:
      prefix_embeds: [B, Lp, D] prompt embeddings without the trailing <begin_of_image>.
      prefix_mask: [B, Lp] 1 = visible (unconditional rows keep only BOS).
      z: [B, h, w, 4] noisy scaled latents; t: [B] in [0, 1] (0 = noise, 1 = data).
      tap_layer: also return the LLM hidden state after this many blocks at the image positions.
    Returns:
      (velocity [B, h, w, 4], aux) with aux["tap"] [B, P, D] when tap_layer is given.
      Positions are 0..Lp+P for every row, as the reference (not derived from the mask).
    """
    tokens, t_emb, skip = self.encode_latents(z, t)
    b, lp = prefix_mask.shape
    p = tokens.shape[1]
    seq = jnp.concatenate([prefix_embeds.astype(tokens.dtype), t_emb[:, None].astype(tokens.dtype), tokens], 1)
    key_valid = jnp.concatenate([prefix_mask.astype(bool), jnp.ones((b, 1 + p), bool)], axis=1)
    slots = jnp.arange(lp + 1 + p, dtype=jnp.int32)
    mask = llama.attention_mask(key_valid, slots)
    hidden, aux = self.llm(seq, jnp.broadcast_to(slots, (b, lp + 1 + p)), mask, tap_layer=tap_layer)
    v = self.decode_velocity(hidden[:, -p:], skip, t_emb)
    return v, {"tap": None if aux["tap"] is None else aux["tap"][:, -p:]}

  def __call__(self, input_ids, images, images_seq_mask, images_emb_mask, z, t):
    """Touches every parameter (used by `init`): understanding logits and one velocity."""
    embeds = self.understanding_embeds(input_ids, images, images_seq_mask, images_emb_mask)
    positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    hidden, _ = self.llm(embeds, positions, llama.attention_mask(jnp.ones(input_ids.shape, bool),
                                                                 jnp.arange(input_ids.shape[1])))
    v, _ = self.velocity(embeds[:, :2], jnp.ones((input_ids.shape[0], 2), bool), z, t)
    return self.logits(hidden), v


def slot_order(mask: Array, count: int) -> Array:
  """int [B, count]: indices of the first `count` True positions of each row of bool [B, S]
  (in order; rows with fewer Trues continue with False positions, callers mask those)."""
  return jnp.argsort(~mask, axis=1, stable=True)[:, :count]


def scatter_slots(embeds: Array, slots: Array, seq_mask: Array) -> Array:
  """Writes the g-th of the `slots` [B, G, D] at the g-th True position of `seq_mask` [B, S]."""
  rank = jnp.clip(jnp.cumsum(seq_mask, axis=1) - 1, 0, slots.shape[1] - 1)
  gathered = jnp.take_along_axis(slots, rank[..., None], axis=1)
  return jnp.where(seq_mask[..., None], gathered.astype(embeds.dtype), embeds)


def dummy_inputs(cfg: JanusFlowConfig, batch: int = 1):
  """Smallest inputs that run every parameter (for init / eval_shape)."""
  p1 = cfg.siglip.grid ** 2 + 1
  n = cfg.latent_size
  return (jnp.zeros((batch, p1 + 2), jnp.int32),
          jnp.zeros((batch, 1, cfg.image_size, cfg.image_size, 3), jnp.float32),
          jnp.arange(p1 + 2)[None].repeat(batch, 0) < p1,
          jnp.ones((batch, 1, p1), bool),
          jnp.zeros((batch, n, n, cfg.gen.latent_channels), jnp.float32),
          jnp.zeros((batch,), jnp.float32))


def init_params(cfg: JanusFlowConfig, rng: Array) -> dict:
  """Random float32 params (logical-axis boxes removed)."""
  return nn.meta.unbox(JanusFlow(cfg).init(rng, *dummy_inputs(cfg))["params"])


def abstract_params(cfg: JanusFlowConfig) -> dict:
  """ShapeDtypeStructs of the params (boxed with logical axis names), without allocating."""
  return jax.eval_shape(lambda: JanusFlow(cfg).init(jax.random.key(0), *dummy_inputs(cfg)))["params"]
