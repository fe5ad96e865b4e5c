"""Understanding inputs: the text half of the reference `VLChatProcessor` (reference doc §4.1-4.2).

A conversation is a list of messages `{"role": "User" | "Assistant", "content": str,
"images": [path or PIL image, ...]}` (the reference's format); each `<image_placeholder>` in the
contents takes the next image in order. The prompt is the deepseek SFT template with the
understanding system prompt (`jfl.tokenizer.sft_prompt`), ending in an open "Assistant:" turn.
After tokenization (BOS first) every placeholder id becomes [BOI, P x placeholder, EOI]; a batch
is left-padded. Pixels come from `jfl.processor.understanding_image`.

    batch = process(tokenizer, [conversation(img, "What is this?")], image_size=384, num_image_tokens=576)
    logits = pipe.understanding_logits(**batch.arrays())
"""

import dataclasses
import os

import numpy as np
from PIL import Image

from jfl import processor, tokenizer as tok_lib

ROLES = ("User", "Assistant")


@dataclasses.dataclass
class ChatBatch:
  """Exactly the reference processor's batch (numpy).

  Attributes:
    input_ids: int64 [B, T], left-padded with the pad id.
    attention_mask: int64 [B, T], 1 on real tokens.
    pixel_values: float32 [B, n, 3, H, W] in [-1, 1] (NCHW; zeros for missing images), n >= 1.
    images_seq_mask: bool [B, T], True on BOI and the P placeholders of each image.
    images_emb_mask: bool [B, n, 1 + P], True for the slots of real images.
    prompts: the formatted prompt strings.
  """
  input_ids: np.ndarray
  attention_mask: np.ndarray
  pixel_values: np.ndarray
  images_seq_mask: np.ndarray
  images_emb_mask: np.ndarray
  prompts: list[str]

  def arrays(self) -> dict[str, np.ndarray]:
    """The keyword arguments of `JanusFlowPipeline.understanding_logits`."""
    return {k: getattr(self, k) for k in ("input_ids", "pixel_values", "images_seq_mask", "images_emb_mask",
                                          "attention_mask")}


def conversation(images=None, question: str = "") -> list[dict]:
  """A one-turn conversation: one `<image_placeholder>` line per image, then the question.

  `images` is None, one image (path or PIL) or a list; a question that already contains
  placeholders is kept as is.
  """
  images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
  content = question if tok_lib.IMAGE in question else "".join(f"{tok_lib.IMAGE}\n" for _ in images) + question
  return [{"role": "User", "content": content, "images": images}, {"role": "Assistant", "content": ""}]


def format_prompt(messages: list[dict], system: str = tok_lib.UNDERSTANDING_SYSTEM_PROMPT) -> str:
  """The SFT prompt of a conversation; an open "Assistant" turn is appended if it does not end in one."""
  if not messages:
    raise ValueError("empty conversation")
  for m in messages:
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise ValueError(f"a message must be a dict with 'role' and 'content', got {m!r}")
  if messages[-1]["role"] != ROLES[1] or messages[-1]["content"].strip():
    messages = list(messages) + [{"role": ROLES[1], "content": ""}]
  return tok_lib.sft_prompt(messages, system)


def load_images(messages: list[dict]) -> list[Image.Image]:
  """The images of a conversation in order, as RGB PIL images (paths are read; ValueError if unreadable)."""
  out = []
  for m in messages:
    for img in m.get("images") or ():
      out.append(processor.load_image(img) if isinstance(img, (str, os.PathLike)) else img.convert("RGB"))
  return out


def expand_image_tokens(ids, ids_of: tok_lib.SpecialIds, num_image_tokens: int) -> np.ndarray:
  """Replaces every placeholder id by [BOI, P x placeholder, EOI]: int [T] -> int64 [T + n (P + 1)]."""
  out = []
  for i in np.asarray(ids).tolist():
    out.extend([ids_of.boi, *[ids_of.image] * num_image_tokens, ids_of.eoi] if i == ids_of.image else [i])
  return np.asarray(out, np.int64)


def process(tokenizer, conversations: list[list[dict]], image_size: int, num_image_tokens: int,
            system: str = tok_lib.UNDERSTANDING_SYSTEM_PROMPT) -> ChatBatch:
  """Conversations -> the reference processor's left-padded batch (`ChatBatch`)."""
  ids_of = tok_lib.special_ids(tokenizer)
  rows, pixels, prompts = [], [], []
  for conv in conversations:
    prompt = format_prompt(conv, system)
    images = load_images(conv)
    ids = np.asarray(tokenizer.encode(prompt))
    if (ids == ids_of.image).sum() != len(images):
      raise ValueError(f"the conversation has {(ids == ids_of.image).sum()} {tok_lib.IMAGE} tag(s) "
                       f"but {len(images)} image(s)")
    rows.append(expand_image_tokens(ids, ids_of, num_image_tokens))
    pixels.append([processor.understanding_image(img, image_size).transpose(2, 0, 1) for img in images])
    prompts.append(prompt)
  b, t, n = len(rows), max(len(r) for r in rows), max(1, max(len(p) for p in pixels))
  batch = ChatBatch(
      input_ids=np.full((b, t), ids_of.pad, np.int64), attention_mask=np.zeros((b, t), np.int64),
      pixel_values=np.zeros((b, n, 3, image_size, image_size), np.float32),
      images_seq_mask=np.zeros((b, t), bool), images_emb_mask=np.zeros((b, n, num_image_tokens + 1), bool),
      prompts=prompts)
  for i, (row, pix) in enumerate(zip(rows, pixels)):
    batch.input_ids[i, t - len(row):] = row
    batch.attention_mask[i, t - len(row):] = 1
    batch.images_seq_mask[i, t - len(row):] = (row == ids_of.image) | (row == ids_of.boi)
    if pix:
      batch.pixel_values[i, :len(pix)] = np.stack(pix)
      batch.images_emb_mask[i, :len(pix)] = True
  return batch


def decode_answer(tokenizer, tokens, length: int) -> str:
  """Generated ids (EOS included) -> text, special tokens skipped."""
  return tokenizer.decode(np.asarray(tokens)[:int(length)].tolist(), skip_special_tokens=True)
