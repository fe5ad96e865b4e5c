"""`JanusFlowPipeline`: load a checkpoint and run the model from Python.

    pipe = JanusFlowPipeline.from_pretrained("JanusFlow-1.3B", vae_dir="sdxl-vae", dtype="bfloat16")
    images = pipe.generate("a red apple", num_images=4, seed=0)    # -> PIL images
    answer = pipe.chat("photo.png", "What is in the image?")       # -> str
    logits = pipe.understanding_logits(**processor_outputs)   # the reference processor's arrays
    latents = pipe.encode(images)                             # NHWC in [-1, 1] -> scaled latents
    images = pipe.decode(latents)                             # -> uint8 NHWC
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jfl import chat as chat_lib, checkpoint, tokenizer as tok_lib
from jfl.convert import hf
from jfl.models import janusflow, llama, vae as vae_lib
from jfl.models.config import JanusFlowConfig
from jfl.sampling import flow, text


class JanusFlowPipeline:
  """Params + config (+ VAE, tokenizer) with jitted entry points."""

  def __init__(self, config: JanusFlowConfig, params, vae_params=None, tokenizer=None, dtype="float32",
               source: str = "this pipeline"):
    self.config = config
    self.source = source
    self.params = params
    self.vae_params = {} if vae_params is None and config.vae.space_to_depth else vae_params  # pixel codec
    self.tokenizer = tokenizer
    self.dtype = jnp.dtype(dtype)
    self.model = janusflow.JanusFlow(config, dtype=self.dtype)
    self.vae = vae_lib.make_codec(config.vae, dtype=self.dtype)

  @classmethod
  def from_pretrained(cls, model_dir: str, vae_dir: str | None = None, dtype: str = "float32"):
    """Loads a HF-layout JanusFlow directory, or a directory written by `jfl-convert --out`.

    The VAE comes from `vae_dir` (diffusers layout) or, for a converted directory, from inside it.
    The tokenizer is loaded when `model_dir` has one.
    """
    vae_config, vae_params = hf.load_vae(vae_dir) if vae_dir is not None else (None, None)
    if checkpoint.is_converted(model_dir):
      config, params, saved_vae_params = checkpoint.load_converted(model_dir)
      if vae_config is None:
        vae_params = saved_vae_params
      else:
        config = dataclasses.replace(config, vae=vae_config)
    else:
      config, params = hf.load_janusflow(model_dir, **({"vae": vae_config} if vae_config else {}))
    tokenizer = tok_lib.load_tokenizer(model_dir) if _has_tokenizer(model_dir) else None
    return cls(config, jax.device_put(params), jax.device_put(vae_params), tokenizer, dtype, source=model_dir)

  def _require_tokenizer(self):
    if self.tokenizer is None:
      raise ValueError(f"{self.source}: no tokenizer (tokenizer.json / tokenizer_config.json); text prompts need one")
    return self.tokenizer

  # --- understanding ---------------------------------------------------------------------------

  def understanding_logits(self, input_ids, pixel_values, images_seq_mask, images_emb_mask, attention_mask):
    """Logits of the understanding forward pass on the reference processor's arrays.

    Args:
      input_ids: int [B, T] (left-padded); pixel_values: [B, n, 3, H, W] (NCHW, as the processor);
      images_seq_mask: bool [B, T]; images_emb_mask: bool [B, n, 1 + P]; attention_mask: [B, T].
    Returns:
      float32 [B, T, V]. Positions are cumsum(attention_mask) - 1, as the reference `generate`.
    """
    return self._understanding_logits(self.params, jnp.asarray(input_ids), _nhwc(pixel_values),
                                      jnp.asarray(images_seq_mask, bool), jnp.asarray(images_emb_mask, bool),
                                      jnp.asarray(attention_mask, bool))

  @functools.partial(jax.jit, static_argnums=0)
  def _understanding_logits(self, params, input_ids, images, images_seq_mask, images_emb_mask, attention_mask):
    m = self.model
    embeds = m.apply({"params": params}, input_ids, images, images_seq_mask, images_emb_mask,
                     method=m.understanding_embeds)
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
    mask = llama.attention_mask(attention_mask, jnp.arange(input_ids.shape[1]))
    hidden, _ = m.apply({"params": params}, embeds, positions, mask, method=m.run_llm)
    return m.apply({"params": params}, hidden, method=m.logits)

  def chat(self, image=None, question="", max_new_tokens: int = 256, temperature: float = 0.0,
           top_p: float = 0.95, seed: int = 0) -> str:
    """Answers a question about image(s).

    `image`: None, a path / PIL image, or a list of them; `question`: a string (one placeholder
    line per image is prepended) or a whole conversation as a list of messages
    `{"role", "content", "images"}` (multi-turn, multi-image; `image`, if given, goes first).
    temperature 0 = greedy; otherwise temperature + top-p sampling seeded by `seed`.
    """
    if isinstance(question, (list, tuple)):
      conv = [dict(m) for m in question]
      if image is not None and conv:
        extra = list(image) if isinstance(image, (list, tuple)) else [image]
        conv[0]["images"] = extra + list(conv[0].get("images") or [])
    else:
      conv = chat_lib.conversation(image, question)
    return self.chat_batch([conv], max_new_tokens, temperature, top_p, seed)[0]

  def chat_batch(self, conversations, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 0.95,
                 seed: int = 0) -> list[str]:
    """One answer per conversation (lists of messages), decoded together as one left-padded batch."""
    tokens, lengths = self.answer_tokens(conversations, max_new_tokens, temperature, top_p, seed)
    return [chat_lib.decode_answer(self.tokenizer, t, n) for t, n in zip(tokens, lengths)]

  def answer_tokens(self, conversations, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 0.95,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Generated ids [B, max_new_tokens] (EOS included, pad after) and lengths [B] (see `text.decode`)."""
    text.check_options(max_new_tokens, temperature, top_p)
    tok = self._require_tokenizer()
    batch = chat_lib.process(tok, conversations, self.config.image_size, self.config.siglip.grid ** 2)
    text.check_context(batch.input_ids.shape[1], max_new_tokens, self.config.llm.max_position_embeddings)
    ids_of = tok_lib.special_ids(tok)
    tokens, lengths = text.answer_tokens(
        self.model, self.params, jnp.asarray(batch.input_ids, jnp.int32), _nhwc(batch.pixel_values),
        jnp.asarray(batch.images_seq_mask), jnp.asarray(batch.images_emb_mask),
        jnp.asarray(batch.attention_mask, bool), jax.random.key(seed), int(max_new_tokens), ids_of.eos,
        ids_of.pad, jnp.float32(temperature), jnp.float32(top_p))
    return np.asarray(tokens), np.asarray(lengths)

  # --- generation ------------------------------------------------------------------------------

  def generation_ids(self, prompts) -> tuple[np.ndarray, int]:
    """Text prompts -> (int32 [B, L] ids of `generation_prompt` (ending in <begin_of_image>),
    left-padded with the pad id, pad id)."""
    tok = self._require_tokenizer()
    pad = tok_lib.special_ids(tok).pad
    rows = [tok.encode(tok_lib.generation_prompt(p) + tok_lib.BOI) for p in prompts]
    ids = np.full((len(rows), max(map(len, rows))), pad, np.int32)
    for i, r in enumerate(rows):
      ids[i, ids.shape[1] - len(r):] = r
    return ids, pad

  def velocity(self, input_ids, z, t, cfg_weight, pad_id=None) -> jax.Array:
    """One CFG-combined velocity (reference step, prompt cached): conditional prompts [B, L]
    ending in <begin_of_image>, z [B, h, w, 4] NHWC, t in [0, 1) -> float32 [B, h, w, 4]."""
    return flow.velocity(self.model, self.params, input_ids, z, t, cfg_weight, pad_id)

  def sample_latents(self, input_ids, noise, num_steps=30, cfg_weight=2.0, pad_id=None, progress=None) -> jax.Array:
    """Euler ODE from `noise` [B, h, w, 4] (NHWC) to scaled latents, as the reference loop."""
    return flow.sample_latents(self.model, self.params, input_ids, noise, num_steps, cfg_weight, pad_id,
                               progress=progress)

  def generate(self, prompts, num_images: int = 1, seed=0, num_steps: int = 30, cfg_weight: float = 2.0,
               progress=None) -> list[Image.Image]:
    """Text -> PIL images: `num_images` per prompt (prompt-major order).

    `seed` is an int (image k uses seed + k) or one seed per image; each image's noise depends
    only on its own seed.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or int(num_images) != num_images or num_images < 1:
      raise ValueError(f"need at least one prompt and num_images >= 1, got {len(prompts)} and {num_images}")
    flow.check_options(num_steps, cfg_weight)
    self._require_vae()
    rows = [p for p in prompts for _ in range(num_images)]
    seeds = [seed + k for k in range(len(rows))] if isinstance(seed, int) else list(seed)
    if len(seeds) != len(rows):
      raise ValueError(f"got {len(seeds)} seeds for {len(rows)} images")
    ids, pad = self.generation_ids(rows)
    n, c = self.config.latent_size, self.config.gen.latent_channels
    latents = self.sample_latents(ids, flow.noise_for_seeds(seeds, (n, n, c)), num_steps, cfg_weight, pad, progress)
    return [Image.fromarray(x) for x in np.asarray(self.decode(latents))]

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


def _nhwc(pixel_values) -> jax.Array:
  """[B, n, 3, H, W] (the processor's NCHW) -> float32 [B, n, H, W, 3]."""
  return jnp.transpose(jnp.asarray(pixel_values, jnp.float32), (0, 1, 3, 4, 2))


def _has_tokenizer(model_dir: str) -> bool:
  return any(os.path.isfile(os.path.join(model_dir, n)) for n in ("tokenizer.json", "tokenizer_config.json"))

