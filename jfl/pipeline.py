"""`JanusFlowPipeline`: load a checkpoint and run the model from Python.

    pipe = JanusFlowPipeline.from_pretrained("JanusFlow-1.3B", vae_dir="sdxl-vae", dtype="bfloat16")
    logits = pipe.understanding_logits(**processor_outputs)   # the reference processor's arrays
    latents = pipe.encode(images)                             # NHWC in [-1, 1] -> scaled latents
    images = pipe.decode(latents)                             # -> uint8 NHWC
"""

import functools
import os

import jax
import jax.numpy as jnp

from jfl import checkpoint, tokenizer as tok_lib
from jfl.convert import hf
from jfl.models import janusflow, llama, vae as vae_lib
from jfl.models.config import JanusFlowConfig


class JanusFlowPipeline:
  """Params + config (+ VAE, tokenizer) with jitted entry points."""

  def __init__(self, config: JanusFlowConfig, params, vae_params=None, tokenizer=None, dtype="float32"):
    self.config = config
    self.params = params
    self.vae_params = vae_params
    self.tokenizer = tokenizer
    self.dtype = jnp.dtype(dtype)
    self.model = janusflow.JanusFlow(config, dtype=self.dtype)
    self.vae = vae_lib.AutoencoderKL(config.vae, dtype=self.dtype)

  @classmethod
  def from_pretrained(cls, model_dir: str, vae_dir: str | None = None, dtype: str = "float32"):
    """Loads a HF-layout JanusFlow directory, or a directory written by `jfl-convert --out`.

    The VAE comes from `vae_dir` (diffusers layout) or, for a converted directory, from inside it.
    The tokenizer is loaded when `model_dir` has one.
    """
    if checkpoint.is_converted(model_dir):
      config, params, vae_params = checkpoint.load_converted(model_dir)
    else:
      config, params = hf.load_janusflow(model_dir)
      vae_params = None
    if vae_dir is not None:
      vae_config, vae_params = hf.load_vae(vae_dir)
      config = JanusFlowConfig.from_dict({**config.to_dict(), "vae": vae_config.__dict__})
    tokenizer = tok_lib.load_tokenizer(model_dir) if _has_tokenizer(model_dir) else None
    return cls(config, jax.device_put(params), jax.device_put(vae_params), tokenizer, dtype)

  # --- understanding ---------------------------------------------------------------------------

  def understanding_logits(self, input_ids, pixel_values, images_seq_mask, images_emb_mask, attention_mask):
    """Logits of the understanding forward pass on the reference processor's arrays.

    Args:
      input_ids: int [B, T] (left-padded); pixel_values: [B, n, 3, H, W] (NCHW, as the processor);
      images_seq_mask: bool [B, T]; images_emb_mask: bool [B, n, 1 + P]; attention_mask: [B, T].
    Returns:
      float32 [B, T, V]. Positions are cumsum(attention_mask) - 1, as the reference `generate`.
    """
    images = jnp.transpose(jnp.asarray(pixel_values, jnp.float32), (0, 1, 3, 4, 2))
    return self._understanding_logits(self.params, jnp.asarray(input_ids), images, jnp.asarray(images_seq_mask, bool),
                                      jnp.asarray(images_emb_mask, bool), jnp.asarray(attention_mask, bool))

  @functools.partial(jax.jit, static_argnums=0)
  def _understanding_logits(self, params, input_ids, images, images_seq_mask, images_emb_mask, attention_mask):
    m = self.model
    embeds = m.apply({"params": params}, input_ids, images, images_seq_mask, images_emb_mask,
                     method=m.understanding_embeds)
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
    mask = llama.attention_mask(attention_mask, jnp.arange(input_ids.shape[1]))
    hidden, _ = m.apply({"params": params}, embeds, positions, mask, method=m.run_llm)
    return m.apply({"params": params}, hidden, method=m.logits)

  # --- VAE -------------------------------------------------------------------------------------

  def _require_vae(self):
    if self.vae_params is None:
      raise ValueError("no VAE loaded: pass vae_dir= to from_pretrained (e.g. a local stabilityai/sdxl-vae)")

  def encode(self, images) -> jax.Array:
    """NHWC images in [-1, 1] -> scaled latent means [B, H/8, W/8, 4] (x scaling_factor)."""
    self._require_vae()
    return self._encode(self.vae_params, jnp.asarray(images, jnp.float32))

  def decode(self, latents) -> jax.Array:
    """Scaled latents [B, h, w, 4] -> uint8 NHWC images (the reference's clip, scale, truncate)."""
    self._require_vae()
    return self._decode(self.vae_params, jnp.asarray(latents, jnp.float32))

  @functools.partial(jax.jit, static_argnums=0)
  def _encode(self, vae_params, images):
    mean, _ = self.vae.apply({"params": vae_params}, images.astype(self.dtype), method=self.vae.encode)
    return vae_lib.scale_latents(mean.astype(jnp.float32), self.config.vae)

  @functools.partial(jax.jit, static_argnums=0)
  def _decode(self, vae_params, latents):
    z = vae_lib.unscale_latents(latents, self.config.vae).astype(self.dtype)
    return vae_lib.images_to_uint8(self.vae.apply({"params": vae_params}, z, method=self.vae.decode))

  def __hash__(self):
    return id(self)


def _has_tokenizer(model_dir: str) -> bool:
  return any(os.path.isfile(os.path.join(model_dir, n)) for n in ("tokenizer.json", "tokenizer_config.json"))

