"""The packed training batch: the one contract between the data pipeline and the train step.

Each row is a fixed-length sequence of S tokens holding several examples back to back (packing).
Examples never see each other: attention is block-causal within `segment_ids` (0 = padding).

Understanding / text-only example:  [BOS, system + "User: ...", (BOI, 576 x IMG, EOI)*, "...Assistant:",
                                     response tokens, EOS]
Generation example:                 [BOS, "User: {prompt}\\n\\nAssistant:", T_EMB, 576 x latent]
    The T_EMB slot (where the appended <begin_of_image> would be) holds the time embedding; the
    576 slots hold g_enc tokens of the noisy latent. Their token ids are ignored (any id).

Keys (B rows, S tokens, NU / NG image slots per row, P = 576 image tokens, H W = image size):
  tokens          int32 [B, S]   token ids
  positions       int32 [B, S]   RoPE positions, restarting at 0 in every segment
  segment_ids     int32 [B, S]   1, 2, ... per packed example; 0 on padding
  targets         int32 [B, S]   token to predict at each position (the next token of the segment)
  loss_mask       f32   [B, S]   1 where `targets` is a response token (AR loss), else 0
  und_images      f32   [B, NU, H, W, 3] in [-1, 1] (understanding preprocessing)
  und_valid       bool  [B, NU]  which understanding image slots are real
  und_slot_mask   bool  [B, S]   True on the 1 + P positions (BOI + placeholders) of each real image,
                                 in image order (the k-th run belongs to und_images[:, k])
  gen_images      f32   [B, NG, H, W, 3] in [-1, 1] (generation preprocessing), or, with cached latents,
  gen_latents     f32   [B, NG, h, w, 4] scaled VAE latents and
  gen_repa_target f32   [B, NG, P, C]    frozen SigLIP features of the clean image
  gen_valid       bool  [B, NG]
  gen_slot_mask   bool  [B, S]   True on the 1 + P positions (T_EMB + latent tokens) of each real image
  gen_prompt_slot int32 [B, S]   k on the prompt tokens after BOS of the example owning gen image k,
                                 -1 elsewhere (the step masks them to drop 10% of prompts for CFG)
  task            int32 [B, S]   0 padding, 1 understanding, 2 generation, 3 text-only (for metrics)
"""

import jax
import jax.numpy as jnp
import numpy as np

PAD_SEGMENT = 0
TASK_NONE, TASK_UND, TASK_GEN, TASK_TEXT = 0, 1, 2, 3


def batch_shapes(batch_size: int, seq_len: int, image_size: int, num_und: int, num_gen: int,
                 latents: tuple[int, int, int] | None = None, repa: tuple[int, int] | None = None) -> dict:
  """ShapeDtypeStructs of a batch. With `latents=(h, w, c)` and `repa=(P, C)` the generation images
  are replaced by cached latents and REPA targets."""
  b, s = batch_size, seq_len
  sds = jax.ShapeDtypeStruct
  out = {
      "tokens": sds((b, s), jnp.int32), "positions": sds((b, s), jnp.int32),
      "segment_ids": sds((b, s), jnp.int32), "targets": sds((b, s), jnp.int32),
      "loss_mask": sds((b, s), jnp.float32), "task": sds((b, s), jnp.int32),
      "und_images": sds((b, num_und, image_size, image_size, 3), jnp.float32),
      "und_valid": sds((b, num_und), jnp.bool_), "und_slot_mask": sds((b, s), jnp.bool_),
      "gen_valid": sds((b, num_gen), jnp.bool_), "gen_slot_mask": sds((b, s), jnp.bool_),
      "gen_prompt_slot": sds((b, s), jnp.int32),
  }
  if latents is None:
    out["gen_images"] = sds((b, num_gen, image_size, image_size, 3), jnp.float32)
  else:
    out["gen_latents"] = sds((b, num_gen, *latents), jnp.float32)
    out["gen_repa_target"] = sds((b, num_gen, *repa), jnp.float32)
  return out


def check_batch(batch: dict, num_image_tokens: int) -> None:
  """Host-side consistency checks of a numpy batch; ValueError naming the broken key."""
  p1 = num_image_tokens + 1
  for slot, valid in (("und_slot_mask", "und_valid"), ("gen_slot_mask", "gen_valid")):
    got = np.asarray(batch[slot]).sum(axis=1)
    want = np.asarray(batch[valid]).sum(axis=1) * p1
    if not np.array_equal(got, want):
      raise ValueError(f"{slot}: rows have {got.tolist()} image positions, {valid} implies {want.tolist()}")
  seg = np.asarray(batch["segment_ids"])
  if np.any(np.asarray(batch["loss_mask"])[seg == PAD_SEGMENT] != 0):
    raise ValueError("loss_mask: nonzero on padding positions")
